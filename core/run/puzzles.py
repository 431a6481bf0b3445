"""CellPuzzles files: read stored puzzles, solve them with any backend, score with Cell-o1's metrics.

A puzzle file is a JSON list or JSONL of records with ``system_msg``, ``user_msg`` and usually
``answer``; every other field is kept. The ``puzzle`` prompt strategy turns each record back into a
:class:`~cellscribe.core.types.Prompt` (``from_record``), so any backend solves them unchanged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from ..evaluation.metrics import PuzzleScores, puzzle_metrics
from ..plugins import Host, get_host
from ..types import Generation

log = logging.getLogger(__name__)


@attrs.frozen
class PuzzleFile:
    """Records of a puzzle file and whether it was JSONL (written back the same way)."""

    records: list[dict[str, Any]]
    jsonl: bool


def read_puzzles(path: str | Path) -> PuzzleFile:
    """Read a JSON list or JSONL of puzzle records; a clear error for anything else."""
    text = Path(path).read_text(encoding="utf-8")
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            records, jsonl = json.loads(text), False
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
            jsonl = True
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is neither a JSON list nor JSONL of puzzle records: {exc}") from None
    if not records or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path} holds no puzzle records (JSON objects with 'user_msg')")
    missing = [i for i, r in enumerate(records) if "user_msg" not in r]
    if missing:
        raise ValueError(
            f"{len(missing)} record(s) of {path} have no 'user_msg' (first: record {missing[0]}); "
            "each puzzle record needs system_msg, user_msg and (to be scored) answer"
        )
    return PuzzleFile(records, jsonl)


def write_puzzles(puzzles: PuzzleFile, path: str | Path) -> None:
    """Write records in the input's layout (JSONL, or an indented JSON list)."""
    with open(path, "w", encoding="utf-8") as fh:
        if puzzles.jsonl:
            for record in puzzles.records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            json.dump(puzzles.records, fh, ensure_ascii=False, indent=2)


def solve_puzzles(
    puzzles: PuzzleFile,
    *,
    model: str,
    system_role: bool = False,
    generation: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    model_options: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    host: Host | None = None,
) -> tuple[PuzzleFile, PuzzleScores | None]:
    """Solve every puzzle with ``model`` and add its raw output as ``prediction`` to each record.

    A record that cannot be turned into a prompt gets an empty prediction (scored 0) and a
    ``prediction_error``; the others still run. Returns the new records and, when every record has an
    ``answer``, the CellPuzzles metrics.
    """
    host = host or get_host()
    strategy = host.registry.get("prompt", "puzzle")
    prompts, failures = [], {}
    for i, record in enumerate(puzzles.records):
        try:
            prompts.append((i, strategy.from_record(record, system_role=system_role)))
        except ValueError as exc:
            failures[i] = str(exc)
            log.warning("puzzle %d skipped: %s", i, exc)
    loaded = host.registry.backend_for(model).load(
        model, hook=host.hook, batch_size=batch_size, **dict(model_options or {})
    )
    generations = loaded.generate([p for _, p in prompts], settings=dict(generation or {}), progress=progress)
    outputs: dict[int, Generation] = {i: g for (i, _), g in zip(prompts, generations, strict=True)}
    records = []
    for i, record in enumerate(puzzles.records):
        new = dict(record)
        gen = outputs.get(i)
        new["prediction"] = gen.text if gen is not None else ""
        error = failures.get(i) or (gen.error if gen is not None else None)
        if error:
            new["prediction_error"] = error
        records.append(new)
    scores = None
    if all("answer" in r for r in records):
        scores = puzzle_metrics([r["prediction"] for r in records], [r["answer"] for r in records])
    return PuzzleFile(records, puzzles.jsonl), scores


def format_scores(scores: PuzzleScores) -> list[str]:
    """Human-readable lines of the four CellPuzzles metrics."""
    return [
        f"puzzles: {scores.n_puzzles} ({scores.n_cells} cells)",
        f"partial accuracy: {scores.partial_accuracy:.3f}",
        f"exact match: {scores.exact_match:.3f}",
        f"legitimate format: {scores.legitimate_ratio:.3f}",
        f"uniqueness: {scores.uniqueness:.3f}",
    ]

