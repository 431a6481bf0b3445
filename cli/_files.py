"""Writing the command line's result files safely: never over the input, never half-written, never over
an existing file unless asked, with the permissions the umask gives."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class OutputExistsError(FileExistsError):
    """The output file exists and overwriting was not requested."""


def check_output(output: str | os.PathLike, *, inputs: tuple[str | os.PathLike, ...] = (), force: bool = False) -> Path:
    """Validate an output path before any work is done.

    Raises ``ValueError`` when ``output`` is one of ``inputs`` (cellscribe never writes to its input) and
    :class:`OutputExistsError` when it exists and ``force`` is false.
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


def write_data(data: Any, output: Path, mod: str | None) -> None:
    """Write an AnnData (``.h5ad``) or MuData (``.h5mu``; ``.h5ad`` with ``mod``: that modality) to
    ``output``."""
    import click

    from ..core.run import is_mudata

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
