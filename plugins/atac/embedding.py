"""LSI embeddings of sparse accessibility matrices and the kNN operator that smooths activity over them.

ATAC cells are sparse (the PBSmall example holds ~170 fragments per cell; a gene of interest is seen in
a few percent of cells), so a cell's own gene activity is mostly zeros and chance. Averaging each cell
with its nearest neighbours in an LSI embedding (the standard scATAC embedding of Signac, ArchR and
snapATAC) gives every cell the profile of its neighbourhood. Everything here works on sparse matrices:
TF-IDF and the truncated SVD never densify the input, and the neighbour search runs over row chunks of
the (cells x components) embedding.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_NEIGHBORS", "default_components", "lsi", "knn_operator"]

#: Neighbours averaged per cell (the cell itself included). Twice scanpy's ``pp.neighbors`` default:
#: a peak matrix measures most genes through one or two peaks, and averaging more cells made the
#: gene-activity ranking steadier (Schep 2017 blood cells 0.50 -> 0.58 lineage accuracy with 15 -> 30;
#: PBSmall unchanged at 0.90; ``benchmarks/atac_real.py``).
DEFAULT_NEIGHBORS = 30
#: Most features (peaks or genome tiles) the LSI keeps: the most often accessible ones.
DEFAULT_LSI_FEATURES = 50_000
# Similarities held at once in the neighbour search (a block of cells x all cells, float32: 128 MiB).
_KNN_BLOCK_ENTRIES = 1 << 25


def default_components(n_cells: int) -> int:
    """LSI components used when none are given: one per 30 cells, between 5 and 30.

    Few cells support few reliable components: on the 150-cell PBSmall data 5 components gave kNN
    neighbourhoods of the same cell type more often than 10 or 20 (benchmarks/atac.py measures it);
    data sets of 900 cells and more get the customary 30.
    """
    return int(min(30, max(5, n_cells // 30)))


def lsi(
    matrix: sp.spmatrix,
    *,
    n_components: int | None = None,
    n_features: int | None = DEFAULT_LSI_FEATURES,
    seed: int = 0,
) -> np.ndarray:
    """Latent semantic indexing of a cells x features accessibility matrix.

    Binarises the matrix, keeps the ``n_features`` features accessible in the most cells, weights it by
    TF-IDF (``log1p(1e4 * tf * idf)`` with ``tf`` = a feature's share of the cell's accessible features and
    ``idf = log1p(n_cells / n_cells_accessible)``), takes a randomised truncated SVD and drops the first
    component, which follows sequencing depth rather than cell identity. Rows are scaled to unit length,
    so dot products are cosine similarities.

    :param matrix: cells x features (peaks, tiles or genes), sparse; cells without any accessible
        feature get a zero row.
    :param n_components: components kept (after dropping the first); default
        :func:`default_components`.
    :return: a dense ``(n_cells, n_components)`` float32 array.
    """
    from sklearn.utils.extmath import randomized_svd
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    X = sp.csr_matrix(matrix)
    n_cells = X.shape[0]
    accessible = np.bincount(X.indices[X.data != 0], minlength=X.shape[1]).astype(np.float64)
    keep = np.flatnonzero(accessible > 0)
    if n_features is not None and len(keep) > n_features:
        keep = np.sort(keep[np.argsort(-accessible[keep], kind="stable")[:n_features]])
    # One copy of the selected columns; everything after works on its data array in place.
    X = sp.csr_matrix(X[:, keep], dtype=np.float32, copy=True)
    X.data[X.data != 0] = 1.0
    X.eliminate_zeros()
    per_cell = np.diff(X.indptr).astype(np.float32)
    n_components = default_components(n_cells) if n_components is None else int(n_components)
    # The SVD needs more cells and features than components (+1 for the dropped first one).
    n_components = max(1, min(n_components, min(X.shape) - 2))
    if X.nnz == 0 or min(X.shape) < 3:
        return np.zeros((n_cells, n_components), dtype=np.float32)
    idf = np.log1p(n_cells / accessible[keep]).astype(np.float32)
    # log1p(1e4 * tf * idf) on the stored values: tf = 1 / (accessible features of the cell).
    X.data *= np.repeat(1e4 / np.maximum(per_cell, 1), np.diff(X.indptr))
    X.data *= idf[X.indices]
    np.log1p(X.data, out=X.data)
    weighted = X
    # The dense steps are small (cells x components): several BLAS threads only add contention there,
    # measured at twice the time right after snapatac2's own threads ran. Seven power iterations
    # converge (PBSmall kNN purity 0.90 for every seed; 4 iterations: 0.87-0.89 depending on the seed).
    with threadpool_limits(limits=1, user_api="blas"):
        u, s, _ = randomized_svd(weighted, n_components + 1, n_iter=7, random_state=seed)
    embedding = (u[:, 1:] * s[1:]).astype(np.float32)
    norms = np.linalg.norm(embedding, axis=1, keepdims=True)
    embedding /= np.where(norms > 0, norms, 1)
    embedding[per_cell == 0] = 0
    log.info(
        "LSI: %d cells x %d features -> %d components in %.2f s",
        n_cells, len(keep), n_components, time.perf_counter() - started,
    )
    return embedding


def knn_operator(
    embedding: np.ndarray, *, n_neighbors: int = DEFAULT_NEIGHBORS, active: np.ndarray | None = None
) -> sp.csr_matrix:
    """The cells x cells averaging operator of the ``n_neighbors`` nearest cells (the cell included).

    Neighbours are the most cosine-similar rows of ``embedding`` (rows are normalised here), searched
    exactly, block by block. Only ``active`` cells (default: cells with a non-zero embedding) are
    neighbours, and only they are smoothed: an inactive cell's row averages itself alone, so a cell
    without fragments stays empty instead of borrowing a profile.

    :return: a CSR matrix whose row ``i`` holds ``1 / k`` at the ``k`` neighbours of cell ``i``;
        ``operator @ counts`` averages counts over neighbourhoods.
    """
    if n_neighbors < 1:
        raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}")
    E = np.asarray(embedding, dtype=np.float32)
    n = E.shape[0]
    norms = np.linalg.norm(E, axis=1)
    if active is None:
        active = norms > 0
    active = np.asarray(active, dtype=bool) & (norms > 0)
    pool = np.flatnonzero(active)
    k = int(min(n_neighbors, len(pool)))
    E = E / np.where(norms > 0, norms, 1)[:, None]
    cols = np.repeat(np.arange(n, dtype=np.int64)[:, None], max(k, 1), axis=1)
    if k > 1:
        candidates = E[pool]
        block = max(1, _KNN_BLOCK_ENTRIES // len(pool))
        for lo in range(0, len(pool), block):
            rows = pool[lo : lo + block]
            sim = E[rows] @ candidates.T
            sim[np.arange(len(rows)), np.arange(lo, lo + len(rows))] = np.inf  # the cell itself first
            top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            cols[rows] = pool[top]
    counts = np.where(active, k, 1) if k > 1 else np.ones(n, dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    indices = _ragged(cols, counts)
    data = np.repeat(1.0 / counts, counts).astype(np.float32)
    operator = sp.csr_matrix((data, indices, indptr), shape=(n, n))
    operator.sort_indices()
    return operator


def _ragged(cols: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The first ``counts[i]`` entries of each row of ``cols``, concatenated."""
    mask = np.arange(cols.shape[1])[None, :] < counts[:, None]
    return cols[mask]
