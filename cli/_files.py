"""Writing the command line's result files safely: never over the input, never half-written, never over
an existing file unless asked, with the permissions the umask gives."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


class OutputExistsError(FileExistsError):
    """The output file exists and overwriting was not requested."""


def check_output(output: str | os.PathLike, *, inputs: tuple[str | os.PathLike, ...] = (), force: bool = False) -> Path:
    """Validate an output path before any work is done.

    Raises ``ValueError`` when ``output`` is one of ``inputs`` (cellscribe never writes to its input),
    :class:`OutputExistsError` when it exists and ``force`` is false, and ``FileNotFoundError`` when its
    folder does not exist.
    """
    out = Path(output)
    for src in inputs:
        if src is not None and Path(src).exists() and out.exists() and out.resolve() == Path(src).resolve():
            raise ValueError(
                f"output {out} is the input file; cellscribe never writes to its input. "
                "Choose another output path."
            )
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force (force=True) to overwrite it")
    if not out.parent.exists():
        raise FileNotFoundError(f"output folder {out.parent} does not exist; create it first")
    return out


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """A ``PermissionError`` naming ``folder`` unless a file can be made in it (tried, then removed),
    so that a run never does its model work and then fails to write its result."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder {path} does not exist; create it first")
    try:
        fd, probe = tempfile.mkstemp(prefix=".cellscribe-write-test.", dir=path)
    except OSError as exc:
        raise PermissionError(
            f"cannot write the {what} in {path} ({exc.strerror or exc}); choose a folder you can write to"
        ) from None
    os.close(fd)
    os.unlink(probe)


def check_output_format(data: Any, output: Path, mod: str | None, several: bool) -> None:
    """A ``click.UsageError`` when the result of ``data`` cannot be written to ``output`` (checked
    before any model work): the suffix, a MuData to ``.h5ad`` without ``--mod``, an AnnData to
    ``.h5mu``."""
    import click

    from ..core.run import is_mudata

    suffix = output.name.lower()
    if not suffix.endswith((".h5ad", ".h5mu")):
        raise click.UsageError(f"OUTPUT {output.name!r} must end in .h5ad (an AnnData) or .h5mu (a MuData)")
    if is_mudata(data) and suffix.endswith(".h5ad"):
        if several:
            raise click.UsageError("several modalities are annotated into one MuData: write OUTPUT as .h5mu")
        if mod is None:
            raise click.UsageError("the input is a MuData: write OUTPUT as .h5mu, or to .h5ad with --mod KEY "
                                   "(the modality to write)")
    if not is_mudata(data) and suffix.endswith(".h5mu"):
        raise click.UsageError("the input is an AnnData: write it to a .h5ad file")


#: In a checkpoint folder: which OUTPUT a run left with failed prompts (so that the same command may
#: replace it without --force).
PARTIAL = "partial-output.json"


def command_key(input_path: str, values: Mapping[str, Any], extra: Mapping[str, Any]) -> str:
    """A hash of what defines an ``annotate`` command: its INPUT file (path, size, modification time),
    its run values (credentials removed) and ``extra`` (limit, modalities, OUTPUT)."""
    import hashlib
    import json

    from ..core.run.record import without_credentials

    st = Path(input_path).stat()
    described = {"input": str(Path(input_path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                 "values": without_credentials(dict(values)), **extra}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _file_state(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"output": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_partial_output(checkpoint: Path, output: Path, command: str) -> bool:
    """Whether ``output`` is, unchanged, what this same command wrote last time with failed prompts."""
    import json

    try:
        record = json.loads((checkpoint / PARTIAL).read_text(encoding="utf-8"))
        return output.exists() and record == {**_file_state(output), "command": command}
    except (OSError, ValueError):
        return False


def mark_partial_output(checkpoint: Path, output: Path, command: str | None) -> None:
    """Record (``command``) or forget (``None``) that ``output`` holds a run with failed prompts."""
    import json

    file = checkpoint / PARTIAL
    if command is None:
        file.unlink(missing_ok=True)
    else:
        file.write_text(json.dumps({**_file_state(output), "command": command}), encoding="utf-8")


def _umask() -> int:
    """The process's umask (read by setting it, then restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(output: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``output``; on success it replaces ``output`` in one rename.

    On any error the temporary file is removed and ``output`` is left as it was. The output's
    permissions follow the umask (``rw-r--r--`` under the usual 022), like a file made with ``open``.
    """
    out = Path(output)
    # Keep the real suffix last: writers such as anndata's choose the format from it.
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=f".partial{out.suffix}", dir=out.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes the file private (0600); the output gets the mode any other tool would give it.
    os.chmod(tmp_path, 0o666 & ~_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, out)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_data(data: Any, output: Path, mod: str | None, key_added: str | None = None) -> None:
    """Write an AnnData (``.h5ad``) or MuData (``.h5mu``; ``.h5ad`` with ``mod``: that modality) to
    ``output``. Data read from disk (backed) is written by :func:`write_backed` (``key_added`` names the
    result columns to add)."""
    import click

    from ..core.run import is_backed, is_mudata

    if is_backed(data):
        write_backed(data, output, mod, key_added or "cellscribe")
        return

    if is_mudata(data):
        import mudata

        if output.name.lower().endswith(".h5ad"):
            if mod is None:
                raise click.UsageError("writing a MuData to .h5ad needs --mod (which modality to write)")
            data.mod[mod].write_h5ad(output)
        else:
            # mudata 0.3 would otherwise re-derive obs on write and drop the pulled result columns.
            with mudata.set_options(pull_on_update=False):
                data.write(output)
    else:
        if output.name.lower().endswith(".h5mu"):
            raise click.UsageError("the input is an AnnData: write it to a .h5ad file")
        data.write_h5ad(output)


def result_columns(obs: Any, key_added: str) -> list[str]:
    """The columns of ``obs`` a run with ``key_added`` wrote (``key_added`` and ``f"{key_added}_..."``,
    also mirrored ``"{mod}:{key_added}..."`` ones)."""
    def ours(name: str) -> bool:
        name = name.split(":", 1)[1] if ":" in name else name
        return name == key_added or name.startswith(f"{key_added}_")

    return [c for c in obs.columns if ours(str(c))]


def write_backed(data: Any, output: Path, mod: str | None, key_added: str) -> None:
    """Write data that was read from disk (backed) with a run's results: the file it was read from is
    copied as it is (the matrices are never read into memory) and the run's ``obs`` columns and ``uns``
    entries are written into the copy with anndata's own element writer. A MuData keeps every modality
    (``.h5mu``), or gives the one named by ``mod`` as an ``.h5ad``."""
    import shutil

    import h5py

    from ..core.run import is_mudata

    source = Path(data.filename)
    if not is_mudata(data):
        shutil.copyfile(source, output)
        with h5py.File(output, "r+") as f:
            _add_results(f, data, key_added)
        return
    if output.name.lower().endswith(".h5ad"):
        if mod is None:
            import click

            raise click.UsageError("writing a MuData to .h5ad needs --mod (which modality to write)")
        with h5py.File(source, "r") as src, h5py.File(output, "w") as f:
            group = src["mod"][mod]
            for name, value in group.attrs.items():
                f.attrs[name] = value
            for name in group:
                src.copy(group[name], f, name)  # HDF5's own copy: chunks are copied, not decoded
            _add_results(f, data.mod[mod], key_added)
        return
    shutil.copyfile(source, output)
    with h5py.File(output, "r+") as f:
        for name, modality in data.mod.items():
            _add_results(f["mod"][name], modality, key_added)
        _add_results(f, data, key_added, uns_prefixes=tuple(f"{name}:" for name in data.mod))


def natural_key(text: str) -> tuple[str | int, ...]:
    """The key ``natsort`` sorts ``text`` by with its default settings (the order anndata gives the
    categories it makes): text and numbers alternating, a number first after ``""``. Made here for
    ASCII text (a regular expression split, several times faster); other text gets natsort's own key."""
    if not text.isascii():
        return _natsort_key()(text)
    parts = _DIGITS.split(text)
    key: list[str | int] = [""] if not parts[0] and len(parts) > 1 else []
    for i, part in enumerate(parts):
        if i % 2:
            key.append(int(part))
        elif part:
            key.append(part)
    return tuple(key)


_DIGITS = re.compile(r"([0-9]+)")


@functools.cache
def _natsort_key() -> Any:
    from natsort import natsort_keygen

    return natsort_keygen()


def strings_to_categoricals(frame: Any) -> None:
    """``AnnData.strings_to_categoricals`` for one DataFrame, in place: every string column with a
    repeated value becomes a categorical, its categories in natural order (``natsort``'s, through
    :func:`natural_key`). The result is anndata's; the natural keys cost a fraction of natsort's."""
    import numpy as np
    import pandas as pd
    from pandas.api.types import infer_dtype

    for column in [c for c in frame.columns if infer_dtype(frame[c]) == "string"]:
        values = pd.Categorical(frame[column])
        if len(values.categories) >= len(values):
            continue
        ordered = sorted(values.categories, key=natural_key)
        if not np.array_equal(values.categories, ordered):
            values = values.reorder_categories(ordered)
        frame[column] = values


def _add_results(group: Any, adata: Any, key_added: str, uns_prefixes: tuple[str, ...] = ("",)) -> None:
    """Write the result columns of ``adata.obs`` (:func:`result_columns`) into ``group["obs"]`` (each
    column replaced, the column order extended) and its ``uns`` entries for ``key_added`` into
    ``group["uns"]``, with :func:`anndata.io.write_elem`. String columns with repeated values are
    written as categoricals, by ``AnnData.strings_to_categoricals`` (as ``AnnData.write_h5ad`` writes
    them)."""
    from anndata.io import write_elem

    columns = result_columns(adata.obs, key_added)
    frame = adata.obs[columns].copy()
    strings_to_categoricals(frame)  # anndata's own rule, as AnnData.write_h5ad applies it
    group_obs = group["obs"]
    order = [str(c) for c in group_obs.attrs.get("column-order", [])]
    for column in columns:
        if column in group_obs:
            del group_obs[column]
        write_elem(group_obs, column, frame[column].values)
        if column not in order:
            order.append(column)
    group_obs.attrs["column-order"] = order
    uns = group.require_group("uns")
    for prefix in uns_prefixes:
        key = f"{prefix}{key_added}"
        if key in adata.uns:
            if key in uns:
                del uns[key]
            write_elem(uns, key, adata.uns[key])


def count_cells(path: str | os.PathLike) -> int:
    """The number of cells of an ``.h5ad`` or ``.h5mu`` file, read from its ``obs`` index without loading
    anything (0 when the file does not say)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            obs = f["obs"]
            index = obs.attrs.get("_index", "_index")
            return int(obs[index].shape[0])
    except (OSError, KeyError, TypeError, ValueError):
        return 0
