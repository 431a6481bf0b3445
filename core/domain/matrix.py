"""Reading cell x feature matrices in row chunks, whatever they are stored as.

Supported: SciPy sparse matrices and arrays (CSR is sliced in place; CSC and COO are converted per
chunk), NumPy arrays, AnnData backed sparse datasets (``adata.X`` of ``read_h5ad(..., backed="r")`` or
``anndata.io.sparse_dataset``) and h5py datasets. Nothing here densifies a sparse matrix.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs
import numpy as np
import scipy.sparse as sp

DEFAULT_CHUNK = 10_000


def _to_csr(block: Any) -> sp.csr_matrix:
    if sp.issparse(block):
        return sp.csr_matrix(block)
    return sp.csr_matrix(np.asarray(block))


def iter_row_chunks(X: Any, chunk_size: int = DEFAULT_CHUNK) -> Iterator[tuple[int, int, sp.csr_matrix]]:
    """Yield ``(start, stop, csr_chunk)`` over the rows of ``X``, one chunk in memory at a time."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = X.shape[0]
    if sp.issparse(X) and X.format not in ("csr",):
        # Row slicing a CSC matrix is quadratic-ish; convert once (same memory as the input).
        X = sp.csr_matrix(X)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        yield start, stop, row_slice(X, start, stop)


def row_slice(X: Any, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``start:stop`` of ``X`` as a CSR matrix.

    An in-memory CSR is sliced by its arrays (the data and indices of the rows are views): SciPy's own
    ``X[a:b]`` first casts the whole ``indptr`` and ``indices`` to one index type when they differ
    (int64 ``indptr`` with int32 ``indices``, as anndata writes large files), which costs a pass over
    every stored value for each slice (~1 s per 10,000-row slice of a 105k x 12k matrix).
    """
    if sp.issparse(X) and X.format == "csr":
        indptr = X.indptr[start : stop + 1]
        a, b = int(indptr[0]), int(indptr[-1])
        return sp.csr_matrix(
            (X.data[a:b], X.indices[a:b], indptr - a), shape=(stop - start, X.shape[1]), copy=False
        )
    return _to_csr(X[start:stop])


def read_rows(X: Any, rows: np.ndarray) -> sp.csr_matrix:
    """Rows ``rows`` (an integer array, any order) of ``X`` as an in-memory CSR matrix."""
    rows = np.asarray(rows, dtype=np.int64)
    if sp.issparse(X) or isinstance(X, np.ndarray):
        return _to_csr(X[rows])
    # Backed datasets want sorted unique indices; read in sorted order, then restore the order.
    order = np.argsort(rows, kind="stable")
    uniq, inverse = np.unique(rows[order], return_inverse=True)
    block = _to_csr(X[uniq])
    restore = np.empty_like(order)
    restore[order] = np.arange(len(order))
    return block[inverse[restore]]


@attrs.frozen
class MatrixSummary:
    """Facts about a matrix's stored values, gathered in one chunked pass."""

    n_rows: int
    n_cols: int
    nnz: int
    min: float
    max: float
    all_integer: bool
    empty_rows: int
    non_finite: int = 0

    @property
    def has_negative(self) -> bool:
        return self.min < 0


def summarize(X: Any, chunk_size: int = DEFAULT_CHUNK) -> MatrixSummary:
    """Scan ``X`` chunk by chunk: min, max and integrality of the finite stored values, empty rows, and
    how many values are NaN or infinite (reading the matrix as cells refuses those, naming them)."""
    lo, hi, nnz, empty, integer, non_finite = np.inf, -np.inf, 0, 0, True, 0
    for _, _, chunk in iter_row_chunks(X, chunk_size):
        data = chunk.data
        empty += int(np.count_nonzero(np.diff(chunk.indptr) == 0)) if data.size else chunk.shape[0]
        if data.size == 0:
            continue
        nnz += int(np.count_nonzero(data))
        finite = np.isfinite(data)
        if not finite.all():
            non_finite += int(data.size - np.count_nonzero(finite))
            data = data[finite]
            if data.size == 0:
                continue
        lo, hi = min(lo, float(data.min())), max(hi, float(data.max()))
        if integer and data.dtype.kind == "f":
            integer = bool(np.all(np.mod(data, 1) == 0))
    if lo > hi:
        lo = hi = 0.0
    return MatrixSummary(int(X.shape[0]), int(X.shape[1]), nnz, lo, hi, integer, empty, non_finite)
