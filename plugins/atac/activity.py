"""Gene activity as a lazily computed matrix: counts -> (genes) -> (neighbour smoothing) -> normalisation.

:class:`ActivityMatrix` behaves like a read-only cells x genes matrix for
:func:`cellscribe.core.domain.matrix.iter_row_chunks` and :func:`~cellscribe.core.domain.matrix.read_rows`: rows are
computed when they are read, one chunk at a time, so the smoothed and normalised matrix never exists
in memory as a whole (smoothing multiplies the non-zeros of a row by up to the number of neighbours).

Normalisations (``normalization=``), applied per cell after smoothing:

``"enrichment"`` (default)
    ``max(0, log1p(1e4 * x / total) - baseline[gene])``: the log fold enrichment of the gene's activity
    in this cell over the data set's average cell (``baseline`` is the mean of ``log1p(1e4 * x / total)``
    over cells with any count). Depth normalisation removes sequencing-depth differences; subtracting the
    baseline removes what every cell shares. Without it, genes open in every cell (``IRF1``, ``DUSP1``,
    ``EGR1`` on PBSmall) and long genes, which collect fragments everywhere, top every cell's ranking
    (the 20 best genes of a PBSmall cell are 40 kb long at the median, against 17 kb for all genes); with
    it, the genes a cell type opens more than others do (``POU2AF1``, ``MS4A1`` in B cells). With
    smoothing and the ``markers`` model this is the difference between 31% and 58% of PBSmall cells
    given the right lineage (``benchmarks/atac.py``). Only enrichment is kept, so the matrix stays
    sparse. Values are relative to the cells annotated together: a data set of a single cell type has
    little to enrich over, and ``"depth"`` suits it better.
``"depth"``
    ``log1p(1e4 * x / total)``: log-normalised activity, as for RNA.
``"none"``
    The values as they are (after aggregation and smoothing): for activity scores that are already
    normalised (ArchR's gene scores), or to rank raw counts.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import scipy.sparse as sp

from cellscribe.core.domain.matrix import DEFAULT_CHUNK, iter_row_chunks, read_rows

log = logging.getLogger(__name__)

__all__ = ["NORMALIZATIONS", "SCALE", "ActivityMatrix", "normalize_rows", "gene_baseline"]

NORMALIZATIONS = ("enrichment", "depth", "none")
#: Counts per cell after depth normalisation (as ``sc.pp.normalize_total(target_sum=1e4)``).
SCALE = 1e4
#: Rows smoothed and normalised at a time inside a chunk (bounds the memory of smoothing).
SMOOTHING_BLOCK = 1024


def _as_csr(block: Any, dtype: np.dtype) -> sp.csr_matrix:
    return sp.csr_matrix(block, dtype=dtype) if sp.issparse(block) else sp.csr_matrix(np.asarray(block), dtype=dtype)


def normalize_rows(chunk: sp.csr_matrix, normalization: str, baseline: np.ndarray | None = None) -> sp.csr_matrix:
    """Apply ``normalization`` (see the module docstring) to a CSR chunk of cells x genes counts.

    Returns a new CSR matrix; ``chunk`` is not modified. ``"enrichment"`` needs ``baseline`` (one value
    per gene, from :func:`gene_baseline`); entries that do not exceed it are dropped.
    """
    if normalization == "none":
        return chunk.copy()
    totals = np.asarray(chunk.sum(axis=1), dtype=np.float64).ravel()
    factor = (SCALE / np.where(totals > 0, totals, 1.0)).astype(chunk.dtype)
    data = chunk.data * np.repeat(factor, np.diff(chunk.indptr))
    np.log1p(data, out=data)
    if normalization == "depth":
        return sp.csr_matrix((data, chunk.indices.copy(), chunk.indptr.copy()), shape=chunk.shape)
    if baseline is None:
        raise ValueError("the 'enrichment' normalisation needs the genes' baseline (gene_baseline)")
    data = data - baseline[chunk.indices].astype(data.dtype, copy=False)
    keep = data > 0
    indptr = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])[chunk.indptr]
    return sp.csr_matrix((data[keep], chunk.indices[keep], indptr), shape=chunk.shape)


class ActivityMatrix:
    """A read-only cells x genes matrix whose rows are computed on request.

    A row is ``normalize(neighbors[row] @ counts @ to_genes)``:

    - ``counts``: cells x features counts (gene activity, or peaks with ``to_genes``); in memory, or
      an on-disk (backed) matrix when there is no smoothing (rows are then read in contiguous slices);
    - ``to_genes``: an optional features x genes sparse matrix (peaks -> genes);
    - ``neighbors``: an optional cells x cells averaging operator
      (:func:`~.embedding.knn_operator`); smoothing needs the gene counts of every cell at hand, so
      ``counts`` must then be an in-memory sparse matrix of genes (``to_genes=None``);
    - ``normalization`` and ``baseline``: see :func:`normalize_rows`.

    Supports ``shape``, ``dtype``, ``ndim``, and indexing by a row slice, an integer or an integer
    array (any order) returning a CSR matrix, which is what
    :class:`~cellscribe.core.types.FeatureMatrix` needs.
    """

    ndim = 2

    def __init__(
        self,
        counts: Any,
        *,
        to_genes: sp.spmatrix | None = None,
        neighbors: sp.spmatrix | None = None,
        normalization: str = "enrichment",
        baseline: np.ndarray | None = None,
        dtype: Any = np.float32,
    ) -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}; got {normalization!r}")
        if neighbors is not None and (to_genes is not None or not sp.issparse(counts)):
            raise ValueError("smoothing needs the gene counts as an in-memory sparse matrix (to_genes=None)")
        self.counts = counts
        self.to_genes = None if to_genes is None else sp.csr_matrix(to_genes, dtype=dtype)
        self.neighbors = None if neighbors is None else sp.csr_matrix(neighbors, dtype=dtype)
        self.normalization = normalization
        self.baseline = None if baseline is None else np.asarray(baseline, dtype=dtype)
        if normalization == "enrichment" and self.baseline is None:
            raise ValueError("normalization='enrichment' needs baseline= (see gene_baseline)")
        self.dtype = np.dtype(dtype)
        n_genes = counts.shape[1] if to_genes is None else to_genes.shape[1]
        self.shape = (int(counts.shape[0]), int(n_genes))

    def with_normalization(self, normalization: str, baseline: np.ndarray | None = None) -> ActivityMatrix:
        """The same matrix under another normalisation (shares the counts; nothing is copied)."""
        return ActivityMatrix(
            self.counts, to_genes=self.to_genes, neighbors=self.neighbors, normalization=normalization,
            baseline=baseline, dtype=self.dtype,
        )

    def __getitem__(self, key: Any) -> sp.csr_matrix:
        if isinstance(key, tuple):
            raise TypeError("ActivityMatrix is indexed by rows only")
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                return self._rows(np.arange(start, stop, step))
            return self._contiguous(start, stop)
        if isinstance(key, (int, np.integer)):
            return self._rows(np.array([key]))
        return self._rows(np.asarray(key, dtype=np.int64))

    def _contiguous(self, start: int, stop: int) -> sp.csr_matrix:
        if self.neighbors is not None:
            return self._smoothed(self.neighbors[start:stop])
        block = _as_csr(self.counts[start:stop], self.dtype)
        if self.to_genes is None:
            return self._finish(block)
        return self._finish(sp.csr_matrix(block @ self.to_genes), canonical=True)

    def _rows(self, rows: np.ndarray) -> sp.csr_matrix:
        if self.neighbors is not None:
            return self._smoothed(self.neighbors[rows])
        counts = _as_csr(read_rows(self.counts, rows), self.dtype)
        if self.to_genes is None:
            return self._finish(counts)
        return self._finish(sp.csr_matrix(counts @ self.to_genes), canonical=True)

    def _smoothed(self, neighbors: sp.csr_matrix) -> sp.csr_matrix:
        """Smoothed, normalised rows, made :data:`SMOOTHING_BLOCK` rows at a time.

        A smoothed row holds the union of its neighbours' genes; normalising block by block keeps only
        one block of those dense-ish rows in memory next to the (sparser, enrichment-clipped) result.
        """
        # A sparse product stores each (row, gene) once: no duplicates to sum, no need to sort.
        blocks = [
            self._finish(sp.csr_matrix(neighbors[lo : lo + SMOOTHING_BLOCK] @ self.counts, dtype=self.dtype),
                         canonical=True)
            for lo in range(0, neighbors.shape[0], SMOOTHING_BLOCK)
        ]
        if not blocks:
            return sp.csr_matrix((0, self.shape[1]), dtype=self.dtype)
        return blocks[0] if len(blocks) == 1 else sp.vstack(blocks, format="csr")

    def _finish(self, counts: sp.csr_matrix, canonical: bool = False) -> sp.csr_matrix:
        """Normalise ``counts``; ``canonical``: it comes from a sparse product (no duplicate entries)."""
        if not canonical:
            counts.sum_duplicates()
        counts.eliminate_zeros()
        return normalize_rows(counts, self.normalization, self.baseline)


def gene_baseline(activity: ActivityMatrix, chunk_size: int = DEFAULT_CHUNK) -> np.ndarray:
    """Each gene's mean ``log1p(1e4 * x / total)`` over the cells of ``activity`` that have any count.

    One pass over ``activity`` read with the ``"depth"`` normalisation (smoothing included), the
    baseline of the ``"enrichment"`` normalisation. Only sums are kept, so rows are read in blocks of at
    most :data:`SMOOTHING_BLOCK` when smoothing (a depth-normalised smoothed row is nearly dense).
    """
    if activity.neighbors is not None:
        chunk_size = min(chunk_size, SMOOTHING_BLOCK)
    depth = activity.with_normalization("depth")
    sums = np.zeros(activity.shape[1], dtype=np.float64)
    n_cells = 0
    for _, _, chunk in iter_row_chunks(depth, chunk_size):
        sums += np.bincount(chunk.indices, weights=chunk.data, minlength=activity.shape[1])
        n_cells += int(np.count_nonzero(np.diff(chunk.indptr)))
    return (sums / max(n_cells, 1)).astype(activity.dtype)
