"""Built-in plugin: readers for AnnData (``.h5ad``) and MuData (``.h5mu``) files."""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path
from typing import Any

from cellscribe import hookimpl

log = logging.getLogger(__name__)

__all__ = ["H5adReader", "H5muReader"]

_BACKED = ("r", None)


def _existing(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, f"no such file: {str(path)!r}", str(path))
    return path


def _check_backed(backed: Any) -> None:
    if backed not in _BACKED:
        raise ValueError(
            f"backed must be 'r' (leave the matrix on disk and read it in chunks) or None (read "
            f"everything into memory), got {backed!r}"
        )


class H5adReader:
    """Reads an AnnData ``.h5ad`` file."""

    name = "h5ad"
    suffixes: tuple[str, ...] = (".h5ad",)
    description = "AnnData .h5ad files (backed='r' keeps X on disk for files larger than memory)"
    modality = None

    def read(self, path: str | os.PathLike[str], *, backed: str | None = None, **options: Any) -> Any:
        """Read ``path`` with :func:`anndata.read_h5ad`.

        ``backed="r"`` opens the file read-only and leaves ``X`` (and ``raw.X``) on disk, to be read
        in row chunks; ``None`` reads everything into memory. Other options are ignored.
        """
        import anndata

        _check_backed(backed)
        path = _existing(path)
        started = time.perf_counter()
        adata = anndata.read_h5ad(path, backed=backed)
        log.info(
            "read %s: %d cells x %d genes%s in %.2f s",
            path,
            adata.n_obs,
            adata.n_vars,
            " (backed)" if backed else "",
            time.perf_counter() - started,
        )
        return adata


class H5muReader:
    """Reads a MuData ``.h5mu`` file."""

    name = "h5mu"
    suffixes: tuple[str, ...] = (".h5mu",)
    description = "MuData .h5mu files (multimodal; backed='r' keeps matrices on disk)"
    modality = None

    def read(self, path: str | os.PathLike[str], *, backed: str | None = None, **options: Any) -> Any:
        """Read ``path`` with :func:`mudata.read_h5mu`.

        Reading runs under ``mudata.set_options(pull_on_update=False)`` (mudata 0.4's behaviour): the
        modalities' ``obs``/``var`` columns are not copied into the global tables and mudata's
        per-update ``FutureWarning`` is not raised. The option is restored afterwards, so the caller's
        settings are untouched. ``backed`` is as for ``.h5ad``; other options are ignored.
        """
        import mudata

        _check_backed(backed)
        path = _existing(path)
        started = time.perf_counter()
        with mudata.set_options(pull_on_update=False):
            mdata = mudata.read_h5mu(path, backed=backed)
        log.info(
            "read %s: %d cells, modalities %s%s in %.2f s",
            path,
            mdata.n_obs,
            ", ".join(f"{k} ({m.n_vars} features)" for k, m in mdata.mod.items()),
            " (backed)" if backed else "",
            time.perf_counter() - started,
        )
        return mdata


@hookimpl
def cellscribe_register_readers(register):
    register(H5adReader())
    register(H5muReader())
