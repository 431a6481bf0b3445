"""Running prompts in batches that survive interruption and failure, in a folder one run owns.

Prompts are cut into fixed batches by position (the partition never depends on what is already done),
each batch's outputs are written to its own file in a checkpoint folder as soon as it finishes, and a
re-run of the same plan loads finished batches instead of generating them again. With greedy decoding
(or a per-batch seed derived from the run's seed) a resumed run therefore ends with exactly the result of
an uninterrupted one.

What a checkpoint may give back is decided by its **identity**: a hash of everything that determines the
answers (the model and how it is reached: its name, backend, what the backend reports as its identity,
such as a server's URL without credentials, the adapter, the content of every local weight, adapter or
table file the model is loaded from, and the assay), stored in ``run.json``. A folder holding another
run's answers is emptied before use, never resumed; each batch file also carries the hash of its prompts,
settings and that identity. A folder is **owned** by one run at a time: ``LOCK`` is held with an
exclusive ``flock`` while the run lives (the kernel releases it when the process dies, even by
``kill -9``), and ``OWNER`` names the holder, so a second run on the same folder stops with
:class:`CheckpointInUse` before any model work.

Failures: a batch whose call raises is retried in halves down to single prompts; a prompt that still
fails becomes an error :class:`~cellscribe.core.types.Generation` (its units unresolved) and is saved as
failed, so a re-run sends only the failed prompts again. A model that cannot answer at all
(:class:`~cellscribe.core.types.ModelUnavailableError`: a server down, a refused key) stops the run: the
answers finished so far are saved, the prompts not sent are reported as failed, and the re-run resumes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from ..types import Generation, ModelUnavailableError, Prompt

try:  # POSIX; elsewhere folders are not locked (a second run is not detected)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

__all__ = [
    "Checkpoint",
    "CheckpointInUse",
    "BatchOutcome",
    "fingerprint",
    "identity_digest",
    "path_digest",
    "generate_safely",
    "run_batches",
    "hold_folder",
]

#: Files up to this size are hashed whole; larger ones (model weights) by size, modification time, the
#: safetensors header (tensor names, shapes, dtypes, offsets) and :data:`SAMPLED_BLOCKS` blocks of
#: :data:`BLOCK` bytes spread over the file: ~1 MB read per file, milliseconds for a 15 GB shard.
WHOLE_FILE_LIMIT = 64 * 2**20
SAMPLED_BLOCKS = 16
BLOCK = 64 * 2**10
#: Most files of one folder that a digest reads (a model folder holds a few dozen).
MAX_FILES = 10_000
#: A folder is read as model files only when it holds one of these (so a value that happens to name
#: an unrelated folder in the working directory is not walked).
MODEL_FILE_MARKERS = ("config.json", "adapter_config.json", "tokenizer.json", "tokenizer_config.json")
MODEL_FILE_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".csv", ".tsv", ".json", ".jinja")

MANIFEST = "run.json"
LOCK = "LOCK"
OWNER = "OWNER"
#: The files of a run's answers in a checkpoint folder (batches; a streamed run's finished chunks and
#: their sidecar parts): removed together when the folder holds another run's.
RUN_FILES = ("batch-*.json", "chunk-*.json", "sidecar-*.jsonl*")


class CheckpointInUse(RuntimeError):
    """Another live run owns the checkpoint folder."""


# -------------------------------------------------------------------------------------------------
# Identity
# -------------------------------------------------------------------------------------------------


def file_digest(path: Path) -> str:
    """Content hash of one file: whole up to :data:`WHOLE_FILE_LIMIT`, else size, mtime, safetensors
    header and sampled blocks (a retrained or replaced weight file changes at least one of them)."""
    st = path.stat()
    h = hashlib.sha256(str(st.st_size).encode())
    with path.open("rb") as fh:
        if st.st_size <= WHOLE_FILE_LIMIT:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
            return h.hexdigest()
        h.update(str(st.st_mtime_ns).encode())
        if path.suffix == ".safetensors":
            n = int.from_bytes(fh.read(8), "little")
            if 0 < n <= min(st.st_size - 8, 100 * 2**20):
                h.update(fh.read(n))
        last = st.st_size - BLOCK
        for i in range(SAMPLED_BLOCKS + 1):
            fh.seek(i * last // SAMPLED_BLOCKS)
            h.update(fh.read(BLOCK))
    return h.hexdigest()


def path_digest(value: Any) -> str | None:
    """Content hash of the local file or model folder ``value`` names (every file below it, hidden
    ones excepted), or ``None`` when it names none."""
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        return None
    try:
        path = Path(value).expanduser()
        if path.is_file():
            return file_digest(path)
        if not path.is_dir():
            return None
        top = [p.name for p in path.iterdir()]
        if not any(n in MODEL_FILE_MARKERS or n.endswith(MODEL_FILE_SUFFIXES) for n in top):
            return None
        files = []
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path)
            if p.is_file() and not any(part.startswith(".") for part in rel.parts):
                files.append((str(rel), p))
            if len(files) >= MAX_FILES:
                log.warning("checkpoint identity: only the first %d files of %s are fingerprinted", MAX_FILES, path)
                break
        h = hashlib.sha256()
        for rel, p in files:
            h.update(rel.encode())
            h.update(file_digest(p).encode())
        return h.hexdigest()
    except OSError as exc:  # unreadable: the value still counts, by name
        log.debug("cannot fingerprint %s: %s", value, exc)
        return None


def identity_digest(identity: Mapping[str, Any]) -> str:
    """The hash of a run identity (a JSON-able mapping)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(prompts: Sequence[Prompt], model: str, settings: Mapping[str, Any]) -> str:
    """A hash of everything that determines a batch's outputs: its prompts (texts, prefix, edits,
    defaults, candidates, tissue, units), the model's identity (``model``) and the settings.

    Every field of every prompt is one string (texts as they are, other fields as JSON, each object
    that prompts share encoded once); the hash covers the strings joined and the length of each
    (``-1`` for a missing value), so no two different batches hash alike."""
    h = hashlib.sha256()
    h.update(json.dumps({"model": model, "settings": dict(settings)}, sort_keys=True, default=str).encode())
    shared: dict[Any, str] = {}
    by_object: dict[int, str] = {}  # the prompts hold every object, so ids are not reused meanwhile
    strings: list[str] = []
    lengths: list[int] = []

    def value(obj: Any) -> str:
        # Equal values (each prompt's own copy of the same defaults) are encoded once: keyed by their
        # items and the items' types (True == 1 == 1.0 in Python, not in JSON) when those can be
        # hashed, else by the object. An object prompts share is looked up by its id first.
        text = by_object.get(id(obj))
        if text is not None:
            return text
        mapping = isinstance(obj, Mapping)
        try:
            if mapping:
                key = (True, tuple((k, type(v), v) for k, v in obj.items()))
            elif isinstance(obj, tuple):
                key = (False, tuple((type(v), v) for v in obj))
            else:
                key = id(obj)
            hash(key)
        except TypeError:
            key = id(obj)
        text = shared.get(key)
        if text is None:
            plain = dict(obj) if mapping else list(obj) if isinstance(obj, tuple) else obj
            text = shared[key] = json.dumps(plain, sort_keys=True, default=str)
        by_object[id(obj)] = text
        return text

    add = strings.append
    for p in prompts:
        add(str(len(p.messages)))
        for m in p.messages:
            if len(m) == 2 and "role" in m and "content" in m:
                add(str(m["role"]))
                add(str(m["content"]))
            else:
                add(value(m))
        add(p.response_prefix or "")
        add(value(p.remove_from_rendered))
        add(value(p.generation))
        add(value(p.candidates))
        add("\x1f".join(map(str, p.unit_ids)))
        add(p.tissue or "")
        lengths.append(-1 if p.response_prefix is None else 0)
        lengths.append(-1 if p.tissue is None else 0)
    h.update("".join(strings).encode("utf-8", "surrogatepass"))
    h.update(np.fromiter(map(len, strings), dtype=np.int64, count=len(strings)).tobytes())
    h.update(np.asarray(lengths, dtype=np.int64).tobytes())
    return h.hexdigest()


# -------------------------------------------------------------------------------------------------
# Ownership
# -------------------------------------------------------------------------------------------------

#: Folders this process holds: resolved path -> [open lock file, hold count]. A folder held by the
#: command line is held again by the run it starts.
_HELD: dict[Path, list[Any]] = {}


def _owner_text(path: Path) -> str:
    try:
        owner = json.loads((path / OWNER).read_text(encoding="utf-8"))
        return (f"run {owner.get('run', '?')} (process {owner.get('pid', '?')} on {owner.get('host', '?')}, "
                f"started {owner.get('started', '?')})")
    except (OSError, ValueError):
        return "another run"


@contextlib.contextmanager
def hold_folder(folder: str | os.PathLike, run: str = "") -> Iterator[Path]:
    """Own ``folder`` (made if missing) for the duration of the block.

    Raises :class:`CheckpointInUse` naming the owner when another process holds it. Holding is
    re-entrant within a process. On exit the lock is released and ``OWNER`` removed (the folder is
    left, unless the block removed it).
    """
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    key = path.resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield path
        finally:
            _HELD[key][1] -= 1
        return
    handle = open(path / LOCK, "a+")  # noqa: SIM115 - held across the block
    if fcntl is not None:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise CheckpointInUse(
                f"the checkpoint folder {path} is in use by {_owner_text(path)}; two runs must not share one: "
                "wait for that run to end, or give this one another output or --checkpoint folder "
                "(checkpoint= in Python)"
            ) from None
    owner = {"run": run, "pid": os.getpid(), "host": socket.gethostname(),
             "started": _dt.datetime.now().isoformat(timespec="seconds")}
    (path / OWNER).write_text(json.dumps(owner), encoding="utf-8")
    _HELD[key] = [handle, 1]
    try:
        yield path
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            (path / OWNER).unlink()
        handle.close()  # releases the flock


@attrs.define
class Checkpoint:
    """An owned checkpoint folder of one run identity (see the module docstring).

    Open it with :meth:`open` (a context manager): the folder is held for the block, and batch files
    of another identity are removed before any is read.
    """

    path: Path
    identity: str

    @classmethod
    @contextlib.contextmanager
    def open(cls, folder: str | os.PathLike, identity: Mapping[str, Any], *, run: str = "") -> Iterator[Checkpoint]:
        """Hold ``folder`` and make it the checkpoint of ``identity`` (written to ``run.json``)."""
        digest = identity_digest(identity)
        with hold_folder(folder, run) as path:
            manifest = path / MANIFEST
            previous = None
            if manifest.exists():
                try:
                    previous = json.loads(manifest.read_text(encoding="utf-8")).get("identity")
                except (OSError, ValueError):
                    previous = "unreadable"
            batches = sorted(p for pattern in RUN_FILES for p in path.glob(pattern))
            if batches and previous != digest:
                log.warning(
                    "checkpoint folder %s holds %d batch(es) of another run (model, weights, server, adapter or "
                    "data differ): they are discarded, not resumed", path, len(batches),
                )
                for file in batches:
                    file.unlink()
            if previous != digest:
                _write_json(manifest, {"identity": digest, "what": dict(identity)})
            yield cls(path, digest)

    def file(self, index: int, part: str = "") -> Path:
        """The file of batch ``index`` (of the part ``part`` of a run: a streamed run's chunk)."""
        return self.path / f"batch-{part}{index:06d}.json"

    def load(self, index: int, key: str, part: str = "") -> list[Generation] | None:
        """The saved generations of batch ``index`` when its fingerprint is ``key``, else ``None``."""
        file = self.file(index, part)
        if not file.exists():
            return None
        try:
            saved = json.loads(file.read_text(encoding="utf-8"))
            if saved.get("fingerprint") != key:
                log.info("checkpoint %s is for other prompts; running the batch again", file.name)
                return None
            return [_from_json(g) for g in saved["generations"]]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("unreadable checkpoint %s; running the batch again", file)
            return None

    def save(self, index: int, key: str, generations: Sequence[Generation], part: str = "") -> None:
        """Write batch ``index`` atomically (a temporary file, then a rename)."""
        _write_json(self.file(index, part), {"fingerprint": key, "generations": [_to_json(g) for g in generations]})

    def batches(self, part: str = "") -> list[Path]:
        """The batch files of ``part`` (every batch file with ``part=""``)."""
        return sorted(self.path.glob(f"batch-{part}*.json"))

    def failed_prompts(self) -> int:
        """Prompts saved as failed (what a re-run sends again)."""
        n = 0
        for file in self.path.glob("batch-*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                n += sum(bool(g.get("error")) for g in json.loads(file.read_text(encoding="utf-8"))["generations"])
        return n


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(payload, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _to_json(g: Generation) -> dict[str, Any]:
    """A generation as the JSON-able dict :func:`_from_json` reads (``attrs.asdict``'s layout, built
    directly: it is called once per prompt)."""
    return {
        "text": g.text,
        "confidence": None if g.confidence is None else list(g.confidence),
        "label_scores": None if g.label_scores is None else [dict(s) for s in g.label_scores],
        "n_prompt_tokens": g.n_prompt_tokens,
        "n_output_tokens": g.n_output_tokens,
        "error": g.error,
        "notes": None if g.notes is None else list(g.notes),
        "finish_reason": g.finish_reason,
    }


def _from_json(d: Mapping[str, Any]) -> Generation:
    return Generation(
        text=d["text"],
        confidence=tuple(d["confidence"]) if d.get("confidence") is not None else None,
        label_scores=tuple(d["label_scores"]) if d.get("label_scores") is not None else None,
        n_prompt_tokens=d.get("n_prompt_tokens"),
        n_output_tokens=d.get("n_output_tokens"),
        error=d.get("error"),
        notes=tuple(d["notes"]) if d.get("notes") is not None else None,
        finish_reason=d.get("finish_reason"),
    )


# -------------------------------------------------------------------------------------------------
# Running the batches
# -------------------------------------------------------------------------------------------------


def generate_safely(
    loaded: Any, prompts: Sequence[Prompt], settings: Mapping[str, Any], progress: Callable[[int], None] | None
) -> list[Generation]:
    """``loaded.generate`` that never raises for a bad batch: halves it until single prompts fail alone.

    :class:`~cellscribe.core.types.ModelUnavailableError` is not a bad batch: it propagates (halving
    would only send the same failing requests again).
    """
    try:
        out = loaded.generate(list(prompts), settings=dict(settings), progress=progress)
        if len(out) != len(prompts):
            raise RuntimeError(f"backend returned {len(out)} outputs for {len(prompts)} prompts")
        return list(out)
    except (KeyboardInterrupt, SystemExit, ModelUnavailableError):
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


@attrs.frozen(eq=False)
class BatchOutcome:
    """What :func:`run_batches` did: one generation per prompt (in order), the batches loaded whole
    from the checkpoint, and why the run stopped early (``None`` when it did not)."""

    generations: list[Generation]
    resumed: int
    stopped: str | None = None

    @property
    def failed(self) -> int:
        """Prompts without an answer (their model call failed, or was never made)."""
        return sum(1 for g in self.generations if g.error)


def _unavailable(exc: ModelUnavailableError, n: int) -> list[Generation]:
    """The generations a :class:`ModelUnavailableError` carries for a batch of ``n`` prompts (the
    finished ones kept), every other prompt failed with its message."""
    partial = list(exc.generations or [])
    if len(partial) != n:
        partial = [None] * n
    return [g if g is not None else Generation(text="", error=f"model unavailable: {exc}") for g in partial]


def run_batches(
    loaded: Any,
    prompts: Sequence[Prompt],
    *,
    settings: Mapping[str, Any],
    model: str,
    batch_prompts: int,
    checkpoint: Checkpoint | None = None,
    progress: Callable[[int], None] | None = None,
    part: str = "",
    seed_offset: int = 0,
    stopped: str | None = None,
    save_last: bool = True,
) -> BatchOutcome:
    """Generate for every prompt, ``batch_prompts`` at a time, saving each batch to ``checkpoint``.

    When ``settings`` has a ``seed``, batch ``i`` runs with ``seed + seed_offset + i`` so sampling is
    reproducible batch by batch. A saved batch is resumed whole; one saved with failed prompts sends only
    those again. After a :class:`~cellscribe.core.types.ModelUnavailableError` nothing more is sent: saved
    batches are still read, the other prompts are returned as failed, and ``stopped`` says why (a
    ``stopped`` given by the caller, from an earlier part of the run, sends nothing from the start).
    ``part`` names the batch files of one part of a run (a streamed run's chunk of cells).
    ``save_last=False``: the last batch is not saved when no prompt of any batch failed (the caller
    saves the whole part as finished right after; a part with a failed prompt keeps every batch).
    """
    out: list[Generation] = []
    resumed = 0
    failed = False
    starts = range(0, len(prompts), batch_prompts)
    for index, start in enumerate(starts):
        batch = prompts[start : start + batch_prompts]
        batch_settings = dict(settings)
        if "seed" in batch_settings:
            batch_settings["seed"] = int(batch_settings["seed"]) + seed_offset + index
        key = ""
        saved = None
        if checkpoint is not None and checkpoint.file(index, part).exists():
            key = fingerprint(batch, model, batch_settings)
            saved = checkpoint.load(index, key, part)
        if saved is not None and len(saved) == len(batch):
            todo = [i for i, g in enumerate(saved) if g.error]
            if progress and len(batch) - len(todo):
                progress(len(batch) - len(todo))
            if not todo:
                out.extend(saved)
                resumed += 1
                continue
            log.info("checkpoint %s: %d failed prompt(s) sent again", checkpoint.file(index, part).name, len(todo))
        else:
            saved, todo = [Generation(text="", error="not sent")] * len(batch), list(range(len(batch)))
        if stopped is not None:
            fresh = [Generation(text="", error=f"not sent: {stopped}")] * len(todo)
            if progress:
                progress(len(todo))
        else:
            try:
                fresh = generate_safely(loaded, [batch[i] for i in todo], batch_settings, progress)
            except ModelUnavailableError as exc:
                stopped = str(exc)
                log.error("the model cannot answer: %s; no more prompts are sent", stopped)
                fresh = _unavailable(exc, len(todo))
        generations = list(saved)
        for i, g in zip(todo, fresh, strict=True):
            generations[i] = g
        failed = failed or any(g.error for g in generations)
        unneeded = not save_last and index == len(starts) - 1 and not failed
        if checkpoint is not None and any(not g.error for g in fresh) and not unneeded:
            checkpoint.save(index, key or fingerprint(batch, model, batch_settings), generations, part)
        out.extend(generations)
    if resumed:
        log.info("resumed %d finished batch(es) from %s", resumed, checkpoint.path if checkpoint else None)
    return BatchOutcome(out, resumed, stopped)
