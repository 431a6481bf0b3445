"""Streaming annotate: data on disk (a backed AnnData, or a MuData modality of a backed MuData) annotated
chunk by chunk of cells, in memory bounded by a chunk and the per-cell results.

The run is planned once, on a **bounded sample** of the cells (:data:`SAMPLE_BLOCKS` evenly spaced blocks
of :data:`SAMPLE_BLOCK` cells, read from disk): there the sentence strategy learns what it learns from
data (``data-hvg``'s gene list, ``auto``'s choice; kept in ``sentence_state``) and the model looks at the
run before answering (``LoadedModel.survey``: the ``markers`` model's tissue context). Then, chunk after
chunk of ``chunk_size`` rows of the matrix, in file order: the modality's rows are read, the sentences
ranked with that state, the prompts built, answered in checkpointed batches, decoded, and the chunk's
result columns kept in a compact form (labels and statuses as categories, notes and reasoning as shared
strings). Only one chunk of the matrix, its prompts and its answers are in memory at a time. With forked
workers (a ``forkable`` model), a worker answers a chunk and also numbers and compresses its sidecar
records (numbered once the chunks before it have counted their prompts, which each worker shares as soon
as it has built them) and encodes its checkpoint file; the main process reads and ranks the chunks and
writes what comes back, in chunk order.

With a checkpoint folder a finished chunk is saved as it comes (``chunk-NNNNNN.json``: its result
columns and counts, under a key made of the run's identity, settings and parameters, the plan's state and
context and the chunk's own cells, sentences and tissues; and its sidecar records,
``sidecar-NNNNNN.jsonl[.gz]``); its batch files are removed then (the last batch of a chunk none of whose
prompts failed is not saved apart: the chunk file holds its answers). A run killed half-way and started again
reads the finished chunks back (their sentences are ranked again to check the key: cheap next to a
model), sends again only what was not answered, and ends with the results of an uninterrupted run. A
chunk with failed prompts is not saved as finished: its batches stay, and a re-run sends only those
prompts. Without a checkpoint the sidecar is written as the chunks come.

What needs the whole data is handled so:

- the plan (learned sentence state, the model's survey) reads the bounded sample, recorded in
  ``uns[key]["params"]["streamed"]``;
- ``groupby`` (representatives chosen from every cell of a group), several modalities (cells paired
  across modalities by name) and k-shot examples taken from the query's own labelled cells are not
  streamed (:func:`streaming_obstacle`): such runs read the data into memory;
- a modality whose preparation needs every cell (ATAC smoothing over an LSI neighbourhood) reads what it
  needs itself, with its own warning;
- prompts that hold several cells (``puzzle``) are built within each chunk;
- the raw outputs are kept only in a sidecar file (never in ``uns``, which would grow with the data).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pandas as pd

from ..domain.tissues import stated_tissues
from ..plugins import Host, get_host
from ..spec import RunSpec
from .checkpoint import Checkpoint, identity_digest, run_batches
from .data import is_mudata, prepare_data, select_modality_data
from .execute import Execution, batch_prompts, decode_all, generation_settings, model_for, model_identity
from .plan import RunPlan, plan_run
from .record import (
    encode_sidecar,
    h5_safe,
    is_compressed,
    numbered_lines,
    run_params,
    sidecar_lines,
    sidecar_path,
    without_credentials,
    write_results,
)
from .results import confidence_summary, results_frame, warn_low_confidence
from .sentences import sentence_chunks
from .units import unit_label_scores

log = logging.getLogger(__name__)

__all__ = [
    "STREAM_MIN_CELLS",
    "SAMPLE_BLOCKS",
    "SAMPLE_BLOCK",
    "is_backed",
    "streaming_obstacle",
    "sample_rows",
    "StreamedRun",
    "annotate_streamed",
    "annotate_backed",
]

#: ``cellscribe annotate`` streams an ``.h5ad``/``.h5mu`` input with at least this many cells.
STREAM_MIN_CELLS = 50_000
#: The bounded sample a streamed run is planned on: this many evenly spaced blocks ...
SAMPLE_BLOCKS = 10
#: ... of this many consecutive cells (contiguous rows are cheap to read from disk).
SAMPLE_BLOCK = 1_000


def is_backed(data: Any) -> bool:
    """Whether ``data`` (an AnnData or a MuData) keeps its matrices on disk (``backed="r"``)."""
    return bool(getattr(data, "isbacked", False))


def streaming_obstacle(spec: RunSpec, host: Any = None) -> str | None:
    """Why a run of ``spec`` cannot be streamed chunk by chunk (``None`` when it can)."""
    p = spec.prompts
    if "+" in spec.data.modality:
        return f"modality={spec.data.modality!r} pairs each cell's modalities across the whole data"
    if p.groupby is not None:
        return "groupby chooses each group's representative cells among all of its cells"
    if p.budget is not None:
        return "budget= chooses the cells sent on an embedding of all cells and spreads labels over their graph"
    if p.reference_key is not None and p.reference is None:
        return "k-shot examples taken from the query's own labelled cells need those cells first"
    if spec.execution.executor != "local":
        return f"executor={spec.execution.executor!r} sends the whole run's batches to its replicas at once"
    from .vote import effective_neighbor_vote

    if effective_neighbor_vote(spec, host or get_host()):
        return "neighbor_vote decides each cell's label with its nearest cells among all cells"
    return None


def sample_rows(n: int, blocks: int = SAMPLE_BLOCKS, block: int = SAMPLE_BLOCK) -> np.ndarray:
    """The rows of the bounded sample of ``n`` cells: every row when ``n <= blocks * block``, else
    ``blocks`` evenly spaced runs of ``block`` consecutive rows (the first at row 0, the last ending at
    the last row)."""
    if n <= blocks * block:
        return np.arange(n, dtype=np.int64)
    starts = np.linspace(0, n - block, blocks).astype(np.int64)
    return (starts[:, None] + np.arange(block, dtype=np.int64)[None, :]).ravel()


@attrs.frozen(eq=False)
class StreamedRun:
    """What :func:`annotate_streamed` returns: the plan (of the sample, with the data's own rows and
    parameters), the result columns of every cell (indexed by cell id), the execution and the summary."""

    plan: RunPlan
    frame: pd.DataFrame
    execution: Execution
    summary: dict[str, Any]


# -------------------------------------------------------------------------------------------------
# Result columns, chunk by chunk
# -------------------------------------------------------------------------------------------------


def _chunk_record(frame: pd.DataFrame, key_added: str) -> dict[str, Any]:
    """A chunk's result columns as JSON: per column (named by its suffix after ``key_added``) whether it
    is categorical, its categories and its values (missing values as NaN)."""
    columns = {}
    for name in frame.columns:
        values = frame[name]
        categorical = isinstance(values.dtype, pd.CategoricalDtype)
        columns[name[len(key_added):]] = {
            "categorical": categorical,
            "categories": [str(c) for c in values.cat.categories] if categorical else [],
            "values": values.astype(object).where(values.notna(), None).tolist()
            if values.dtype.kind == "O" or categorical else values.tolist(),
        }
    return columns


class _Columns:
    """The result columns of the chunks done so far, compact: one shared string object per distinct
    value (labels, statuses, notes and reasoning repeat across cells)."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {}
        self.categorical: dict[str, bool] = {}
        self.categories: dict[str, set[str]] = {}
        self._strings: dict[str, str] = {}

    def add(self, columns: Mapping[str, Mapping[str, Any]]) -> None:
        for suffix, column in columns.items():
            values = column["values"]
            if column["categorical"] or any(isinstance(v, str) for v in values[:1]) or not values:
                strings = self._strings
                array = np.empty(len(values), dtype=object)
                array[:] = [None if v is None else strings.setdefault(v, v) for v in values]
            else:
                array = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
            self.parts.setdefault(suffix, []).append(array)
            self.categorical[suffix] = bool(column["categorical"])
            self.categories.setdefault(suffix, set()).update(column["categories"])

    def frame(self, key_added: str, index: pd.Index) -> pd.DataFrame:
        """Every column over all cells: categoricals with their categories sorted (as each chunk's, and
        an in-memory run's, are), strings as objects (empty where missing), numbers as float64."""
        out = {}
        for suffix, parts in self.parts.items():
            values = np.concatenate(parts) if parts else np.zeros(0, dtype=object)
            if self.categorical[suffix]:
                out[key_added + suffix] = pd.Categorical(values, categories=sorted(self.categories[suffix]))
            else:
                out[key_added + suffix] = values
        return pd.DataFrame(out, index=index)


# -------------------------------------------------------------------------------------------------
# The run
# -------------------------------------------------------------------------------------------------


def _sample(adata: Any) -> tuple[Any, np.ndarray]:
    """The in-memory AnnData of the bounded sample of a backed ``adata`` (rows in file order)."""
    rows = sample_rows(adata.n_obs)
    return adata[rows].to_memory(), rows


def _run_key(identity: str, settings: Mapping[str, Any], plan: RunPlan, context: Any) -> str:
    """What every chunk of this run shares: the model's identity, the settings, the run's parameters,
    what the plan learned (sentence state) and the model's context."""
    params = {k: v for k, v in plan.spec.to_params().items() if k not in ("checkpoint", "sidecar", "progress", "workers")}
    payload = [identity, dict(settings), params, plan.found.get("sentence_state"), context]
    # The recorded parameters name a function by its repr (a model's sentence preference): without
    # its memory address, which differs from process to process.
    text = _ADDRESS.sub("", json.dumps(payload, sort_keys=True, default=_stable))
    return hashlib.sha256(text.encode()).hexdigest()


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _stable(value: Any) -> str:
    """A value JSON cannot hold, as text that is the same in every process: a function or class by its
    qualified name (a model's sentence preference may be one), anything else by ``str`` without memory
    addresses."""
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return _ADDRESS.sub("", str(value))


def _chunk_key(run_key: str, chunk: Any, tissues: np.ndarray) -> str:
    """A chunk's key: the run's, and the chunk's cells, sentences and tissues."""
    h = hashlib.sha256(run_key.encode())
    h.update("\x1f".join(map(str, chunk.cell_ids)).encode())
    h.update(np.ascontiguousarray(chunk.indptr, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(chunk.indices, dtype=np.int64).tobytes())
    h.update(hashlib.sha256("\x1f".join(map(str, chunk.vocabulary)).encode()).digest())
    h.update("\x1f".join(map(str, tissues)).encode())
    return h.hexdigest()


def _load_chunk(path: Path, key: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("unreadable checkpoint %s; the chunk runs again", path)
        return None
    return saved if saved.get("key") == key else None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _finish_chunk(path: Path, payload: bytes, batches: Sequence[Path]) -> None:
    """Save a finished chunk (``payload``: its key, counts and result columns as JSON) and remove its
    batch files."""
    _write_atomic(path, payload)
    for file in batches:
        file.unlink(missing_ok=True)


class _Sidecar:
    """The sidecar file of a streamed run, written chunk by chunk: into the checkpoint folder as one part
    per chunk (joined into the file at the end), or straight into the file without a checkpoint.

    A chunk's records come encoded (numbered and compressed where the chunk was answered, see
    :func:`_answer_chunk`); writing them happens on a thread, and at most one chunk waits for it."""

    def __init__(self, path: Path | None, checkpoint: Checkpoint | None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.path, self.checkpoint = path, checkpoint
        self.compressed = path is not None and is_compressed(path)
        self._direct = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cellscribe-sidecar")
        self._pending: Any = None
        if path is not None and checkpoint is None:
            self._direct = path.with_name(path.name + ".partial").open("wb")

    def part(self, index: int) -> Path | None:
        if self.path is None or self.checkpoint is None:
            return None
        return self.checkpoint.path / f"sidecar-{index:06d}.jsonl{'.gz' if self.compressed else ''}"

    def _put(self, index: int, data: bytes, after: Callable[[], None] | None) -> None:
        if self._direct is not None:
            self._direct.write(data)
        else:
            _write_atomic(self.part(index), data)
        if after is not None:
            after()

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # an error writing the sidecar stops the run here

    def write(self, index: int, data: bytes, after: Callable[[], None] | None = None) -> None:
        """Write chunk ``index``'s encoded records (:func:`encode_sidecar`), then call ``after`` (both on
        the writer's thread)."""
        self._wait()
        if self.path is None:
            if after is not None:
                after()
            return
        self._pending = self._pool.submit(self._put, index, data, after)

    def has(self, index: int) -> bool:
        part = self.part(index)
        return part is not None and part.exists()

    def finish(self, n_chunks: int) -> None:
        """Put the file in place (the parts joined in chunk order; gzip members concatenate)."""
        self._wait()
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".partial")
        if self._direct is not None:
            self._direct.close()
        else:
            with tmp.open("wb") as out:
                for index in range(n_chunks):
                    with self.part(index).open("rb") as part:
                        while block := part.read(1 << 22):
                            out.write(block)
        os.replace(tmp, self.path)

    def close(self) -> None:
        """Wait for the writes; a run that stopped before :meth:`finish` leaves no partial file."""
        self._pool.shutdown(wait=True)
        if self._direct is not None and not self._direct.closed:
            self._direct.close()
            Path(self._direct.name).unlink(missing_ok=True)


@attrs.frozen(eq=False)
class _ChunkWork:
    """What answering a chunk needs (inherited by forked workers). ``sidecar``: whether the sidecar is
    kept, compressed or not (``None``: no sidecar); ``counts``: the prompts of each chunk as soon as
    they are known (-1 before), shared with the workers, from which a chunk's records are numbered."""

    plan: RunPlan
    loaded: Any
    host: Host
    settings: Mapping[str, Any]
    digest: str
    per_batch: int
    checkpoint: Checkpoint | None
    tissues: Any
    cell_obs: pd.DataFrame
    key_added: str
    chunk_size: int
    sidecar: bool | None
    counts: Any


@attrs.frozen(eq=False)
class _ChunkDone:
    """A chunk answered: its result columns (:func:`_chunk_record`), counts, sidecar records (numbered
    after the chunks before it, encoded as the file holds them) and, when none of its prompts failed and
    the run keeps a checkpoint, the chunk file's content (:func:`_finish_chunk`)."""

    record: dict[str, Any]
    n_prompts: int
    n_empty: int
    n_failed_prompts: int
    n_failed_units: int
    resumed: int
    first_error: str
    stopped: str | None
    seconds: float
    sidecar: bytes
    finished: bytes | None


def _records_start(counts: Any, c: int) -> int:
    """The number of the first sidecar record of chunk ``c``: the prompts of the chunks before it, once
    each of them has counted its prompts (an earlier chunk is always started first, and a worker
    counts its prompts before answering them, so the wait is short)."""
    while True:
        before = counts[:c]
        if min(before, default=0) >= 0:
            return int(sum(before))
        time.sleep(0.002)


def _answer_chunk(work: _ChunkWork, c: int, chunk: Any, stopped: str | None, key: str) -> _ChunkDone:
    """Prompt, answer (in checkpointed batches), decode and tabulate chunk ``c`` of the cell sentences;
    encode its sidecar records and, when it is finished, its chunk file (under ``key``)."""
    plan = work.plan
    start = c * work.chunk_size
    stop = start + len(chunk)
    units = np.flatnonzero(~chunk.empty())
    chunk_plan = attrs.evolve(
        plan, sentences=chunk, unit_rows=units, prompts=[],
        tissues=attrs.evolve(work.tissues, names=work.tissues.names[start:stop]),
        prompt_args={**plan.prompt_args, "obs": work.cell_obs.iloc[start:stop].iloc[units]},
        rows=np.arange(start, stop, dtype=np.int64),
    )
    prompts = chunk_plan.make_prompts(work.loaded.count_tokens)
    work.counts[c] = len(prompts)
    began = time.perf_counter()
    # The chunk file saved once the chunk is done holds the last batch's answers: it is not saved apart.
    outcome = run_batches(work.loaded, prompts, settings=work.settings, model=work.digest,
                          batch_prompts=work.per_batch, checkpoint=work.checkpoint, part=f"c{c:06d}-",
                          seed_offset=c << 20, stopped=stopped, save_last=False)
    seconds = time.perf_counter() - began
    by_unit = decode_all(prompts, outcome.generations, work.host)
    frame, chunk_summary = results_frame(chunk_plan, by_unit, work.key_added,
                                         unit_label_scores(prompts, outcome.generations))
    failed = [(p, g) for p, g in zip(prompts, outcome.generations) if g.error]
    record = _chunk_record(frame, work.key_added)
    sidecar = b""
    if work.sidecar is not None:
        lines = sidecar_lines(prompts, outcome.generations, by_unit, None)
        sidecar = encode_sidecar(numbered_lines(lines, _records_start(work.counts, c)), work.sidecar)
    finished = None
    if work.checkpoint is not None and not failed:
        payload = {"key": key, "n_prompts": len(prompts), "n_empty": chunk_summary["n_empty"], "columns": record}
        finished = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    return _ChunkDone(
        record=record, n_prompts=len(prompts), n_empty=chunk_summary["n_empty"],
        n_failed_prompts=len(failed), n_failed_units=sum(len(p.unit_ids) for p, _ in failed),
        resumed=outcome.resumed, first_error=next((g.error for _, g in failed), ""), stopped=outcome.stopped,
        seconds=seconds, sidecar=sidecar, finished=finished,
    )


#: The state forked workers answer chunks with (set in the parent just before the fork).
_WORK: _ChunkWork | None = None


def _answer_in_worker(c: int, chunk: Any, stopped: str | None, key: str) -> _ChunkDone:
    return _answer_chunk(_WORK, c, chunk, stopped, key)


@contextlib.contextmanager
def _fork_pool(workers: int, work: _ChunkWork):
    """``workers`` forked processes that share ``work`` (copy-on-write), closed on exit."""
    import gc
    import multiprocessing

    global _WORK
    _WORK = work
    # Objects that exist at the fork are left out of the workers' garbage collections: a collection
    # writes to every object it visits, which would copy the shared pages into each worker.
    gc.freeze()
    try:
        pool = multiprocessing.get_context("fork").Pool(workers)
    finally:
        gc.unfreeze()
        _WORK = None
    try:
        yield pool
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _workers(asked: int | None, loaded: Any, n_chunks: int) -> int:
    """Processes answering chunks: 1 unless the model is ``forkable``, the platform forks and there are
    several chunks; then ``asked``, else the CPUs this process may use, at most 4."""
    import multiprocessing

    if not loaded.forkable or n_chunks < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    if asked is not None:
        return min(asked, n_chunks)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, 4, n_chunks))


def annotate_streamed(data: Any, spec: RunSpec, *, host: Host, run_id: str,
                      sidecar: Path | None) -> StreamedRun:
    """Annotate backed ``data`` chunk by chunk as ``spec`` says (see the module docstring); write the
    sidecar to ``sidecar`` (``None``: none) and, with ``spec.output.checkpoint``, every finished chunk
    to the checkpoint folder. Returns the result columns of every cell; nothing is written into
    ``data`` here."""
    obstacle = streaming_obstacle(spec, host)
    if obstacle is not None:
        raise ValueError(f"this run cannot be streamed: {obstacle}")
    started_all = time.perf_counter()
    d = spec.data

    # The plan, on the bounded sample: the spec completed by its model, the prompt strategy and its
    # arguments, the sentence state the strategy learned, the sample's prompts for the model's survey.
    # (Read first: anndata closes a backed file after reading part of it into memory.)
    sample, rows = _sample(select_modality_data(data, host.registry.get("modality", d.modality), d.mod)[0])
    sample_spec = spec.replace(mod=None, checkpoint=None) if is_mudata(data) else spec.replace(checkpoint=None)
    plan = plan_run(sample, sample_spec, host=host, build_prompts=False)

    # The data on disk as its modality prepares it (nothing is read but what the modality checks).
    prepared = prepare_data(data, d, host=host)
    adata, features = prepared.adata, prepared.features
    n = features.n_cells
    cell_ids = features.cell_ids
    index = pd.Index(cell_ids.astype(str))
    cell_obs = adata.obs.set_axis(index)
    plan = attrs.evolve(plan, spec=plan.spec.replace(checkpoint=spec.output.checkpoint, mod=d.mod),
                        adata=adata, mod=prepared.mod, features=features, assay=prepared.assay,
                        rows=np.arange(n, dtype=np.int64))
    tissues = stated_tissues(cell_obs, plan.spec.prompts.tissue, cells=index)
    sampled = ("every cell" if len(rows) == n else
               f"{SAMPLE_BLOCKS} evenly spaced blocks of {SAMPLE_BLOCK} consecutive cells")
    plan.found.update({
        "matrix": features.source,
        "matrix_notes": [note for _, _, f in prepared.parts for note in f.notes],
        "value_kind": features.value_kind,
        "assay": prepared.assay.summary(),
        "tissue_stated": tissues.summary(),
        "streamed": {"chunk_size": d.chunk_size, "n_chunks": -(-n // d.chunk_size), "sample_cells": len(rows),
                     "sample": sampled, "learned_from_sample": ["sentence_state", "survey"]},
    })
    log.info("streaming %d cells in chunks of %d; planned on %d sampled cells (%s)", n, d.chunk_size, len(rows),
             sampled)

    model = model_for(plan, host)
    loaded = model.loaded
    loaded.use_modality(plan.spec.data.modality)
    observability = loaded.use_assay(prepared.assay)
    survey_prompts = plan.make_prompts(loaded.count_tokens)
    context = loaded.survey(survey_prompts)
    if context:
        observability = {**dict(observability or {}), "context": {**dict(context), "sample": sampled}}
    settings = generation_settings(plan.spec, model)
    identity = model_identity(plan, model)
    digest = identity_digest(identity)
    run_key = _run_key(digest, settings, plan, context)
    per_batch = batch_prompts(loaded, model.options["batch_size"])
    key_added = plan.spec.output.key_added
    chunk_size = d.chunk_size

    from tqdm.auto import tqdm

    columns = _Columns()
    counts = {"n_prompts": 0, "n_failed_prompts": 0, "n_failed_units": 0, "n_empty": 0, "resumed_chunks": 0,
              "resumed_batches": 0}
    first_error = ""
    stopped: str | None = None
    seconds = 0.0
    n_chunks = -(-n // chunk_size)
    workers = _workers(d.workers, loaded, n_chunks)
    plan.found["streamed"]["workers"] = workers
    import multiprocessing

    prompt_counts = multiprocessing.RawArray("q", [-1] * n_chunks)  # shared with forked workers
    with contextlib.ExitStack() as stack:
        checkpoint = None
        if plan.spec.output.checkpoint is not None:
            checkpoint = stack.enter_context(Checkpoint.open(plan.spec.output.checkpoint, identity, run=run_id))
        writer = _Sidecar(sidecar, checkpoint)
        stack.callback(writer.close)
        work = _ChunkWork(plan, loaded, host, settings, digest, per_batch, checkpoint, tissues, cell_obs, key_added,
                          chunk_size, None if sidecar is None else writer.compressed, prompt_counts)
        pool = None
        if workers > 1:
            pool = stack.enter_context(_fork_pool(workers, work))
        bar = stack.enter_context(tqdm(total=n, desc="cellscribe", unit="cell",
                                       disable=None if plan.spec.output.progress else True))
        chunks = sentence_chunks(features, plan.spec.sentences, state=plan.found["sentence_state"], host=host,
                                 chunk_size=chunk_size)
        # Chunks in file order; with a pool, up to two per worker are answered while their results are
        # taken in order (a resumed chunk waits its turn).
        pending: collections.deque = collections.deque()

        def take() -> None:
            nonlocal first_error, stopped, seconds
            c, size, chunk_file, key, item = pending.popleft()
            if isinstance(item, dict):  # a finished chunk read back from the checkpoint
                columns.add(item["columns"])
                counts["n_prompts"] += item["n_prompts"]
                counts["n_empty"] += item["n_empty"]
                counts["resumed_chunks"] += 1
                bar.update(size)
                return
            done: _ChunkDone = item.get() if pool is not None else item
            columns.add(done.record)
            counts["n_prompts"] += done.n_prompts
            counts["n_empty"] += done.n_empty
            counts["n_failed_prompts"] += done.n_failed_prompts
            counts["n_failed_units"] += done.n_failed_units
            counts["resumed_batches"] += done.resumed
            first_error = first_error or done.first_error
            stopped = stopped or done.stopped
            seconds += done.seconds
            finished = None
            if chunk_file is not None and done.finished is not None:
                finished = functools.partial(_finish_chunk, chunk_file, done.finished,
                                             checkpoint.batches(f"c{c:06d}-"))
            # The chunk is saved as finished only once its sidecar part is on disk (then its batches go).
            writer.write(c, done.sidecar, after=finished)
            bar.update(size)

        for c, chunk in enumerate(chunks):
            start = c * chunk_size
            chunk_tissues = tissues.names[start : start + len(chunk)]
            key = _chunk_key(run_key, chunk, chunk_tissues)
            chunk_file = checkpoint.path / f"chunk-{c:06d}.json" if checkpoint is not None else None
            saved = _load_chunk(chunk_file, key) if chunk_file is not None else None
            if saved is not None and (sidecar is None or writer.has(c)):
                item: Any = saved
                prompt_counts[c] = saved["n_prompts"]
            elif pool is not None:
                item = pool.apply_async(_answer_in_worker, (c, chunk, stopped, key))
            else:
                item = _answer_chunk(work, c, chunk, stopped, key)
            pending.append((c, len(chunk), chunk_file, key, item))
            while len(pending) > (2 * workers if pool is not None else 0):
                take()
        while pending:
            take()
        writer.finish(n_chunks)

    frame = columns.frame(key_added, index)
    status = frame[f"{key_added}_status"]
    summary = {
        "n_cells": n,
        "n_ok": int((status == "ok").sum()),
        "n_unresolved": int((status != "ok").sum()),
        "n_empty": counts["n_empty"],
        "label_counts": {str(k): int(v) for k, v in frame[key_added].value_counts().items()},
        **confidence_summary(frame[f"{key_added}_confidence"].to_numpy(), (status == "ok").to_numpy()),
        "seconds_generation": round(seconds, 3),
        "n_prompts": counts["n_prompts"],
        "n_failed_prompts": counts["n_failed_prompts"],
        "n_failed_units": counts["n_failed_units"],
        "stopped": stopped or "",
        "first_error": first_error,
        "sidecar": str(sidecar) if sidecar else None,
        "n_chunks": n_chunks,
        "resumed_chunks": counts["resumed_chunks"],
    }
    execution = Execution(model, [], counts["resumed_batches"] + counts["resumed_chunks"], seconds, observability,
                          stopped)
    log.info("streamed %d cells in %d chunks (%d resumed) in %.1f s", n, n_chunks, counts["resumed_chunks"],
             time.perf_counter() - started_all)
    return StreamedRun(plan, frame, execution, summary)


def annotate_backed(data: Any, spec: RunSpec, *, host: Host, run_id: str) -> dict[str, Any]:
    """:func:`annotate_streamed`, then the results into ``data`` (its in-memory ``obs`` and ``uns``, as
    an in-memory run writes them; the file on disk is not touched). Returns the run's summary."""
    sidecar = sidecar_path(spec.output.sidecar)
    run = annotate_streamed(data, spec, host=host, run_id=run_id, sidecar=sidecar)
    warn_low_confidence(run.summary)
    entry = {
        "params": h5_safe(without_credentials(run_params(run.plan, run.execution, run_id))),
        "summary": h5_safe(dict(run.summary)),
        "sidecar": str(sidecar) if sidecar else "",
    }
    if run.execution.observability:
        entry["observability"] = h5_safe(dict(run.execution.observability))
    write_results(data, run.plan, run.frame, entry)
    s = run.summary
    log.info("annotated %d cells: %d ok, %d unresolved (%d prompts, %d failed, %.1f s generation)",
             s["n_cells"], s["n_ok"], s["n_unresolved"], s["n_prompts"], s["n_failed_prompts"],
             s["seconds_generation"])
    return run.summary
