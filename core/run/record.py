"""Step 5, record: write the results where the user finds them, and what re-creates the run.

Into the annotated AnnData: the per-cell columns in ``obs``, and ``uns[key_added]`` with ``"params"``
(the run's resolved :class:`~cellscribe.core.spec.RunSpec`, serialised, plus what the run found: matrix,
strategies, model info, versions; :meth:`RunSpec.from_params` reads the spec back), ``"summary"``,
``"sidecar"`` (every prompt and raw output, JSONL) and, when present, ``"clusters"`` and
``"observability"``. For a MuData the columns are mirrored to ``mdata.obs`` as ``"{mod}:{column}"``.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..types import Annotation, Generation, Prompt


def new_run_id() -> str:
    """``YYYYmmdd-HHMMSS-xxxxxx``: when the run started, and a random suffix."""
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def versions() -> dict[str, str]:
    """Python's and the main libraries' versions (those installed)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("cellscribe", "anndata", "numpy", "scanpy", "mudata", "torch", "transformers", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def h5_safe(value: Any) -> Any:
    """Make a parameter tree writable to h5ad/h5mu ``uns``: no None, no empty dict, no mixed lists."""
    if isinstance(value, Mapping):
        out = {str(k): h5_safe(v) for k, v in value.items() if v is not None}
        return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}
    if isinstance(value, (list, tuple)):
        items = [h5_safe(v) for v in value if v is not None]
        if all(isinstance(v, str) for v in items):
            return np.array(items, dtype=object) if items else np.array([], dtype=object)
        if all(isinstance(v, (int, float, bool, np.number)) for v in items):
            return np.asarray(items)
        return json.dumps(value, default=str)
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (str, int, float, bool, np.ndarray)):
        return value
    return str(value)


def sidecar_path(sidecar: str | bool | None) -> Path | None:
    """The file the raw outputs go to: the path the user named, else none (a Python call writes no file
    unless asked; ``sidecar=None`` keeps them in ``uns``, see :func:`raw_outputs`)."""
    if sidecar in (None, True, False):
        return None
    return Path(sidecar)


def raw_outputs(prompts: Sequence[Prompt], generations: Sequence[Generation]) -> pd.DataFrame:
    """Every prompt's raw model output, in memory (``uns[key_added]["raw"]`` when no sidecar file is
    named): one row per prompt with its units (``" | "``-joined), the output text, the error of a failed
    call, the token counts and why the output ended (``finish_reason``: ``"stop"``, ``"length"`` when it hit
    ``max_new_tokens``, ``""`` when unknown). The prompts themselves are not kept (the sidecar file has them). Control
    characters, which h5ad cannot store, are replaced by spaces (a sidecar file keeps them)."""
    from ..answers import printable

    return pd.DataFrame({
        "unit_ids": [" | ".join(map(str, p.unit_ids)) for p in prompts],
        "output": [printable(g.text)[0] for g in generations],
        "error": [printable(g.error)[0] for g in generations],
        "n_prompt_tokens": pd.array([g.n_prompt_tokens for g in generations], dtype="Int64"),
        "n_output_tokens": pd.array([g.n_output_tokens for g in generations], dtype="Int64"),
        "finish_reason": [g.finish_reason or "" for g in generations],
    }, index=pd.Index([str(i) for i in range(len(prompts))], name="prompt_index"))


def raw_records(entry: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """A finished run's raw outputs, ``{"unit_ids": [...], "output": ..., "error": ...}`` per prompt, from
    its sidecar file (``entry["sidecar"]``) or, without one, from ``entry["raw"]``; ``None`` when neither
    is there (``sidecar=False``, or the file is gone)."""
    path = str(entry.get("sidecar") or "")
    if path and Path(path).is_file():
        return read_sidecar(path)
    raw = entry.get("raw")
    if isinstance(raw, pd.DataFrame):
        return [{"unit_ids": str(row.unit_ids).split(" | "), "output": str(row.output), "error": str(row.error)}
                for row in raw.itertuples()]
    return None


def clusters_table(clusters: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """``uns[key_added]["clusters"]``: one row per group, indexed by the group's name (names are data, so
    any name, ``"CD4+/CD25 T Reg"`` included, survives h5ad), with its label, vote share, number of
    representatives and their ids (``" | "``-joined); more columns when the vote gave more."""
    table = pd.DataFrame.from_dict(
        {str(g): {k: (" | ".join(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in c.items()}
         for g, c in clusters.items()},
        orient="index",
    )
    table.index.name = "group"
    return table


#: ``scheme://user:password@`` in a URL, and query parameters that carry secrets (``?api-key=...``).
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#\s]*@")
_SECRET_QUERY = re.compile(r"(?P<name>[?&][^=&#\s]*(?:key|token|secret|password|passwd|sig)[^=&#\s]*=)[^&#\s]*",
                           re.IGNORECASE)


def without_credentials(value: Any) -> Any:
    """``value`` (a string or a tree of mappings and sequences) with every URL's user and password
    removed and secret-looking query parameters replaced by ``***``: what a run records (``uns``, the
    checkpoint) never holds a credential."""
    if isinstance(value, str):
        if "://" not in value:
            return value
        return _SECRET_QUERY.sub(r"\g<name>***", _USERINFO.sub(r"\g<scheme>", value))
    if isinstance(value, Mapping):
        return {k: without_credentials(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(without_credentials(v) for v in value)
    return value


#: gzip level of a compressed sidecar (``.gz``): level 1 writes ~110 MB/s and makes the JSONL ~4.5x
#: smaller; level 6 (gzip's default) is ~4x slower for ~20% less.
SIDECAR_COMPRESSLEVEL = 1


def sidecar_lines(prompts: Sequence[Prompt], generations: Sequence[Generation],
                  by_unit: Mapping[str, Annotation], start: int | None = 0) -> str:
    """The sidecar records of ``prompts`` (numbered from ``start``), one JSON line each: the prompt's
    number, units, messages, raw output, token counts, ``finish_reason`` and decoded answers. ``start=None``: the lines
    without their number, for :func:`numbered_lines` (a streamed run numbers a chunk's records once the
    chunks before it are counted)."""
    lines = []
    for p, g in zip(prompts, generations):
        record = {
            "unit_ids": list(p.unit_ids),
            "strategy": p.strategy,
            "messages": [dict(m) for m in p.messages],
            "response_prefix": p.response_prefix,
            "output": g.text,
            "error": g.error,
            "n_prompt_tokens": g.n_prompt_tokens,
            "n_output_tokens": g.n_output_tokens,
            "finish_reason": g.finish_reason,
            "answers": [_annotation_json(by_unit[u]) for u in p.unit_ids if u in by_unit],
        }
        lines.append(_ENCODE(record))
    lines.append("")
    text = "\n".join(lines) if len(lines) > 1 else ""
    return text if start is None else numbered_lines(text, start)


def numbered_lines(text: str, start: int) -> str:
    """Sidecar lines made by ``sidecar_lines(..., start=None)`` with ``"prompt_index"`` (from ``start``)
    put first in each record, as ``json.dumps`` writes it."""
    if not text:
        return text
    lines = text.split("\n")[:-1]  # JSON lines hold no raw newline; the text ends with one
    return "".join([f'{{"prompt_index": {i}, {line[1:]}\n' for i, line in enumerate(lines, start)])


#: One encoder for every sidecar record (``json.dumps(..., ensure_ascii=False)`` makes a new one per call).
_ENCODE = json.JSONEncoder(ensure_ascii=False).encode


def _annotation_json(a: Annotation) -> dict[str, Any]:
    """An annotation as a dict (``attrs.asdict``'s layout, built directly: one call per unit)."""
    return {"unit_id": a.unit_id, "label": a.label, "status": a.status, "confidence": a.confidence,
            "reasoning": a.reasoning, "raw": a.raw, "note": a.note}


def is_compressed(path: str | Path) -> bool:
    """Whether a sidecar path names a gzip-compressed file (``.gz``)."""
    return str(path).lower().endswith(".gz")


def encode_sidecar(text: str, compressed: bool) -> bytes:
    """Sidecar lines as the bytes of the file: UTF-8, gzip-compressed (one gzip member, no time stamp,
    so the same lines give the same bytes and members written apart concatenate into one valid file)
    when ``compressed``."""
    import gzip

    data = text.encode("utf-8")
    return gzip.compress(data, compresslevel=SIDECAR_COMPRESSLEVEL, mtime=0) if compressed and data else data


def write_sidecar(path: Path, prompts: Sequence[Prompt], generations: Sequence[Generation],
                  by_unit: Mapping[str, Annotation]) -> None:
    """One JSON record per prompt (:func:`sidecar_lines`) in ``path``; gzip-compressed when it ends in
    ``.gz``."""
    with path.open("wb") as fh:
        step = 10_000  # bounded pieces: one gzip member each
        for start in range(0, len(prompts), step):
            text = sidecar_lines(prompts[start : start + step], generations[start : start + step], by_unit, start)
            fh.write(encode_sidecar(text, is_compressed(path)))


def read_sidecar(path: str | Path) -> list[dict[str, Any]]:
    """The records of a sidecar file (plain or gzip-compressed JSONL)."""
    import gzip

    opener = gzip.open if is_compressed(path) else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def run_params(plan: Any, execution: Any, run_id: str) -> dict[str, Any]:
    """``uns[key_added]["params"]``: the resolved spec, what the plan found, and what the model was
    (its load options as used: those of a model loaded beforehand, too)."""
    loaded = execution.model.loaded
    options = execution.model.options
    modality = plan.spec.data.modality
    return {
        **plan.params,
        "resumed_batches": execution.resumed,
        "generation_defaults": dict(plan.prompts[0].generation) if plan.prompts else {},
        "model_info": dict(loaded.info()),
        "adapter": options["adapters"].get(modality),
        "adapters": dict(options["adapters"]),
        "batch_size": options["batch_size"],
        "device": options["device"],
        "dtype": options["dtype"],
        "trust_remote_code": options["trust_remote_code"],
        "model_options": dict(options["model_options"]),
        "versions": versions(),
        "run_id": run_id,
        "started": run_id[:15],
    }


def write_results(data: Any, plan: Any, frame: pd.DataFrame, entry: Mapping[str, Any]) -> None:
    """The per-cell columns into the annotated AnnData's ``obs``, by position (``plan.rows``: a repeated
    obs name never mixes two cells' answers; cells the run did not cover, in a several-modality run, get
    missing values) and ``entry`` into its ``uns``; mirrored into a MuData."""
    key_added = plan.spec.output.key_added
    adata = plan.adata
    rows = np.arange(len(frame)) if plan.rows is None else np.asarray(plan.rows)
    if len(rows) != adata.n_obs or not np.array_equal(rows, np.arange(adata.n_obs)):
        where = np.full(adata.n_obs, -1, dtype=np.int64)  # several modalities: only the cells in all were run
        where[rows] = np.arange(len(rows))
        frame = frame.reset_index(drop=True).reindex(where)
    for column in frame.columns:
        values = frame[column]
        adata.obs[column] = values.values if isinstance(values.dtype, pd.CategoricalDtype) else values.to_numpy()
    adata.uns[key_added] = dict(entry)
    if plan.mod is not None:
        mirror_to_mudata(data, plan.mod, list(frame.columns), key_added, dict(entry))


def mirror_to_mudata(mdata: Any, mod: str, columns: list[str], key_added: str, entry: dict) -> None:
    """Pull a modality's new obs columns into ``mdata.obs`` as ``"{mod}:{column}"`` (mudata's own
    ``pull_obs``, so the MuData stays consistent) and record the entry in ``mdata.uns``."""
    mdata.pull_obs(columns=columns, mods=[mod])
    mdata.uns[f"{mod}:{key_added}"] = entry
