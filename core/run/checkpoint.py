"""Running prompts in batches that survive interruption and failure.

Prompts are cut into fixed batches by position (the partition never depends on what is already done),
each batch's outputs are written to its own file in a checkpoint folder as soon as it finishes, and a
re-run of the same plan loads finished batches instead of generating them again. With greedy decoding
(or a per-batch seed derived from the run's seed) a resumed run therefore ends with exactly the result of
an uninterrupted one. A batch whose call raises is retried in halves down to single prompts; a prompt
that still fails becomes an error :class:`~cellscribe.core.types.Generation` (its units unresolved), and
the rest of the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from ..types import Generation, Prompt

log = logging.getLogger(__name__)


def fingerprint(prompts: Sequence[Prompt], model: str, settings: Mapping[str, Any]) -> str:
    """A hash of everything that determines a batch's outputs (prompt texts, model, settings)."""
    h = hashlib.sha256()
    h.update(json.dumps({"model": model, "settings": dict(settings)}, sort_keys=True, default=str).encode())
    for p in prompts:
        h.update(
            json.dumps(
                [list(map(dict, p.messages)), p.response_prefix, list(p.remove_from_rendered), dict(p.generation),
                 list(p.candidates), list(p.unit_ids)],
                sort_keys=True,
                default=str,
            ).encode()
        )
    return h.hexdigest()


def _to_json(g: Generation) -> dict[str, Any]:
    return attrs.asdict(g)


def _from_json(d: Mapping[str, Any]) -> Generation:
    return Generation(
        text=d["text"],
        confidence=tuple(d["confidence"]) if d.get("confidence") is not None else None,
        label_scores=tuple(d["label_scores"]) if d.get("label_scores") is not None else None,
        n_prompt_tokens=d.get("n_prompt_tokens"),
        n_output_tokens=d.get("n_output_tokens"),
        error=d.get("error"),
        notes=tuple(d["notes"]) if d.get("notes") is not None else None,
    )


def generate_safely(
    loaded: Any, prompts: Sequence[Prompt], settings: Mapping[str, Any], progress: Callable[[int], None] | None
) -> list[Generation]:
    """``loaded.generate`` that never raises for a bad batch: halves it until single prompts fail alone."""
    try:
        out = loaded.generate(list(prompts), settings=dict(settings), progress=progress)
        if len(out) != len(prompts):
            raise RuntimeError(f"backend returned {len(out)} outputs for {len(prompts)} prompts")
        return list(out)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - a failing batch must not end the run
        if len(prompts) == 1:
            log.warning("prompt for units %s failed: %s", prompts[0].unit_ids, exc)
            if progress:
                progress(1)
            return [Generation(text="", error=f"{type(exc).__name__}: {exc}")]
        log.warning("a batch of %d prompts failed (%s); retrying in halves", len(prompts), exc)
        half = len(prompts) // 2
        return generate_safely(loaded, prompts[:half], settings, progress) + generate_safely(
            loaded, prompts[half:], settings, progress
        )


def run_batches(
    loaded: Any,
    prompts: Sequence[Prompt],
    *,
    settings: Mapping[str, Any],
    model: str,
    batch_prompts: int,
    folder: str | os.PathLike | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Generation], int]:
    """Generate for every prompt, ``batch_prompts`` at a time, checkpointing to ``folder`` when given.

    When ``settings`` has a ``seed``, batch ``i`` runs with ``seed + i`` so sampling is reproducible
    batch by batch. Returns the generations in prompt order and how many batches were loaded from the
    checkpoint.
    """
    out: list[Generation] = []
    resumed = 0
    path = Path(folder) if folder is not None else None
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, len(prompts), batch_prompts)):
        batch = prompts[start : start + batch_prompts]
        batch_settings = dict(settings)
        if "seed" in batch_settings:
            batch_settings["seed"] = int(batch_settings["seed"]) + index
        key = fingerprint(batch, model, batch_settings)
        file = path / f"batch-{index:06d}.json" if path is not None else None
        if file is not None and file.exists():
            try:
                saved = json.loads(file.read_text(encoding="utf-8"))
                if saved.get("fingerprint") == key and not any(g.get("error") for g in saved["generations"]):
                    out.extend(_from_json(g) for g in saved["generations"])
                    resumed += 1
                    if progress:
                        progress(len(batch))
                    continue
                log.info("checkpoint %s is for other prompts or has errors; running the batch again", file.name)
            except (json.JSONDecodeError, KeyError, TypeError):
                log.warning("unreadable checkpoint %s; running the batch again", file)
        generations = generate_safely(loaded, batch, batch_settings, progress)
        if file is not None:
            tmp = file.with_suffix(".partial")
            tmp.write_text(json.dumps({"fingerprint": key, "generations": [_to_json(g) for g in generations]}),
                           encoding="utf-8")
            os.replace(tmp, file)
        out.extend(generations)
    if resumed:
        log.info("resumed %d finished batch(es) from %s", resumed, path)
    return out, resumed
