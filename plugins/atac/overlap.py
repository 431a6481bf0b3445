"""Peaks to genes: genomic coordinates of peaks, and a vectorised interval-overlap join.

:func:`overlap_pairs` finds every overlapping (query, region) pair of two interval sets without a Python
loop: both sets are cut into fixed-size genome bins, the bins are matched by sorting and
``np.searchsorted``, and each candidate pair is checked once (in the bin where the later of the two
starts falls, so a pair sharing several bins is reported once). Work and memory grow with the number of
intervals plus the number of overlapping pairs; long genes cost one entry per bin they cover.

:func:`peaks_to_genes` builds from it the sparse peaks x genes 0/1 matrix that turns a cells x peaks
matrix into cells x genes activity with one sparse product per chunk of cells.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .annotation import chrom_key, gene_regions

log = logging.getLogger(__name__)

__all__ = ["PEAK_NAME", "PEAK_FORMS", "parse_peak_names", "peak_coordinates", "overlap_pairs", "peaks_to_genes"]

#: A peak name: chromosome, then start and end, separated by ``:``/``-``/``_`` (``chr1:100-600``,
#: ``chr1-100-600``, ``chr1_100_600``). The chromosome is everything before the two numbers, so
#: ``chr1_KI270706v1_random:10-20`` works too.
PEAK_NAME = re.compile(r"^(?P<chrom>.+)[:_-](?P<start>\d+)[_-](?P<end>\d+)$")
#: The spellings of :data:`PEAK_NAME`, for messages.
PEAK_FORMS = "chr:start-end, chr-start-end or chr_start_end (chr1:100-600, chr1-100-600, chr1_100_600)"
#: Names that look like peaks written another way (``chr1:100..600``, ``chr1:1,000-2,000``).
_LOOKS_LIKE_A_PEAK = r"(?i)^chr[^:_\-\s]*[:_\-]\d"
#: Between this share and a half of the names are intervals: a mix, refused.
MIXED_SHARE = 0.01

# var columns that hold peak coordinates (compared case-insensitively): GRanges/Signac, BED, pyranges.
_CHROM_COLUMNS = ("chrom", "chr", "chromosome", "seqnames", "seqname", "chrom_name")
_START_COLUMNS = ("start", "chromstart", "chrom_start")
_END_COLUMNS = ("end", "chromend", "chrom_end")

#: Genome bin size of the overlap join (base pairs).
BIN_SIZE = 100_000


def parse_peak_names(names: Any) -> pd.DataFrame:
    """Coordinates of peak names (see :data:`PEAK_NAME`); unparsable names get missing values.

    :return: a DataFrame with ``chrom`` (object), ``start`` and ``end`` (float, NaN when unparsed), one
        row per name, in order.
    """
    series = pd.Series(np.asarray(names, dtype=object), dtype=object).astype(str).str.strip()
    found = series.str.extract(PEAK_NAME)
    return pd.DataFrame(
        {
            "chrom": found["chrom"].to_numpy(dtype=object),
            "start": pd.to_numeric(found["start"]).to_numpy(dtype=np.float64),
            "end": pd.to_numeric(found["end"]).to_numpy(dtype=np.float64),
        }
    )


def _column(var: pd.DataFrame, choices: tuple[str, ...]) -> Any:
    by_key = {str(c).lower(): c for c in var.columns}
    return next((by_key[c] for c in choices if c in by_key), None)


def peak_coordinates(var: pd.DataFrame, var_names: Any) -> tuple[pd.DataFrame, str] | None:
    """Peak coordinates from ``var`` columns (chrom/start/end) or else from the names, or ``None``.

    Columns win when all three exist (``chrom``/``chr``/``seqnames``, ``start``, ``end``, any case).
    Names count as peaks when more than half of them are intervals (:data:`PEAK_NAME` with
    ``start < end``); the others keep NaN starts (they map to no gene) and a ``UserWarning`` names a
    few. Names that are not peaks at all (gene symbols) give ``None``.

    :return: ``(coordinates, source)`` with ``source`` ``"var columns ..."`` or ``"var_names"``.
    :raises ValueError: the names are neither peaks nor something else: between 1% and half of them
        are intervals (a mix, such as genes and peaks in one matrix), or most look like peaks in
        another spelling (``chr1:100..600``). The message names the expected forms.
    """
    chrom, start, end = (_column(var, c) for c in (_CHROM_COLUMNS, _START_COLUMNS, _END_COLUMNS))
    if chrom is not None and start is not None and end is not None:
        coords = pd.DataFrame(
            {
                "chrom": var[chrom].astype(str).to_numpy(dtype=object),
                "start": pd.to_numeric(var[start], errors="coerce").to_numpy(dtype=np.float64),
                "end": pd.to_numeric(var[end], errors="coerce").to_numpy(dtype=np.float64),
            }
        )
        return coords, f"var columns {chrom!r}, {start!r}, {end!r}"
    names = pd.Series(np.asarray(var_names, dtype=object), dtype=object).astype(str)
    coords = parse_peak_names(names)
    if not len(coords):
        return None
    with np.errstate(invalid="ignore"):
        peak = (coords["end"] > coords["start"]).to_numpy()  # "IGHV7-4-1" parses, but is no interval
    share = float(peak.mean())
    if share > 0.5:
        coords.loc[~peak, ["start", "end"]] = np.nan
        if not peak.all():
            message = (
                f"{int((~peak).sum())} of {len(peak)} peak names are not intervals written {PEAK_FORMS} "
                f"(e.g. {_examples(names[~peak])}); they map to no gene"
            )
            log.warning(message)
            warnings.warn(message, UserWarning, stacklevel=3)
        return coords, "var_names"
    odd = names.str.contains(_LOOKS_LIKE_A_PEAK, regex=True).to_numpy() & ~peak
    if share >= MIXED_SHARE or odd.mean() > 0.5:
        raise ValueError(
            f"the feature names are not peaks in a form cellscribe reads: {100 * share:.0f}% of {len(peak)} are "
            f"intervals{f' (e.g. {_examples(names[peak], 2)})' if peak.any() else ''} and the rest are not "
            f"(e.g. {_examples(names[~peak])}); name peaks {PEAK_FORMS} or give var columns chrom, start, end "
            "(a matrix of genes and peaks together: keep the peaks, e.g. adata[:, adata.var['feature_types'] "
            "== 'Peaks'])"
        )
    return None


def _examples(names: pd.Series, n: int = 3) -> str:
    return ", ".join(repr(str(x)) for x in names.iloc[:n])


def _expand_bins(chrom: np.ndarray, start: np.ndarray, end: np.ndarray, bin_size: int, stride: int):
    """(interval index, bin key) for every genome bin each interval touches."""
    first = start // bin_size
    last = np.maximum(end - 1, start) // bin_size
    n = (last - first + 1).astype(np.int64)
    owner = np.repeat(np.arange(len(start), dtype=np.int64), n)
    offset = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
    return owner, chrom[owner] * stride + first[owner] + offset


def overlap_pairs(
    query: tuple[Any, Any, Any], regions: tuple[Any, Any, Any], *, bin_size: int = BIN_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (query interval, region) that overlaps by at least one base.

    :param query, regions: ``(chrom, start, end)`` arrays, 0-based and end-exclusive. Chromosome names
        are compared with :func:`~.annotation.chrom_key` (``chr1`` meets ``1``). Intervals with a
        missing or negative start, or ``end <= start``, overlap nothing.
    :return: ``(query_index, region_index)`` int64 arrays, sorted by query then region.
    """
    q_chrom, q_start, q_end = (np.asarray(v) for v in query)
    r_chrom, r_start, r_end = (np.asarray(v) for v in regions)
    q_ok = _valid(q_start, q_end)
    r_ok = _valid(r_start, r_end)
    q_idx, r_idx = np.flatnonzero(q_ok), np.flatnonzero(r_ok)
    if len(q_idx) == 0 or len(r_idx) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    codes, _ = pd.factorize(np.concatenate([chrom_key(q_chrom[q_idx]), chrom_key(r_chrom[r_idx])]))
    qc, rc = codes[: len(q_idx)].astype(np.int64), codes[len(q_idx):].astype(np.int64)
    qs, qe = q_start[q_idx].astype(np.int64), q_end[q_idx].astype(np.int64)
    rs, re_ = r_start[r_idx].astype(np.int64), r_end[r_idx].astype(np.int64)
    stride = int(max(qe.max(), re_.max()) // bin_size) + 2

    q_own, q_key = _expand_bins(qc, qs, qe, bin_size, stride)
    r_own, r_key = _expand_bins(rc, rs, re_, bin_size, stride)
    order = np.argsort(r_key, kind="stable")
    r_key, r_own = r_key[order], r_own[order]
    lo = np.searchsorted(r_key, q_key, side="left")
    hi = np.searchsorted(r_key, q_key, side="right")
    counts = hi - lo
    pq = np.repeat(q_own, counts)
    within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    pos = np.repeat(lo, counts) + within
    pr = r_own[pos]
    bin_of = np.repeat(q_key, counts) % stride
    # Overlap, counted only in the bin holding the later start: each pair once.
    keep = (qs[pq] < re_[pr]) & (rs[pr] < qe[pq]) & (np.maximum(qs[pq], rs[pr]) // bin_size == bin_of)
    pq, pr = q_idx[pq[keep]], r_idx[pr[keep]]
    order = np.lexsort((pr, pq))
    return pq[order], pr[order]


def _valid(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    start = np.asarray(start, dtype=np.float64)
    end = np.asarray(end, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.isfinite(start) & np.isfinite(end) & (start >= 0) & (end > start)


def peaks_to_genes(
    peaks: pd.DataFrame,
    genes: pd.DataFrame,
    *,
    upstream: int = 2000,
    downstream: int = 0,
    gene_body: bool = True,
    check_build: bool = True,
) -> tuple[sp.csr_matrix, np.ndarray]:
    """The peaks x genes 0/1 matrix: 1 where a peak overlaps a gene's regulatory region.

    :param peaks: ``chrom``, ``start``, ``end`` per peak (0-based, end-exclusive; see
        :func:`peak_coordinates`).
    :param genes: a :func:`~.annotation.read_gene_annotation` table.
    :param upstream, downstream, gene_body: the region of each gene (:func:`~.annotation.gene_regions`).
    :param check_build: first check that the annotation belongs to the peaks' genome build
        (:func:`~.build.check_build`: chromosome names, and peaks gathering at its TSSs).
    :return: ``(matrix, gene_names)``: a CSR float32 matrix (peaks x genes that overlap at least one
        peak) and those genes' names, in annotation order. A peak overlapping two genes counts for both.
    :raises ValueError: ``check_build`` and the annotation names other chromosomes or belongs to another
        genome build (the message gives the measured shares and the fix).
    """
    if check_build:
        from .build import check_build as check  # build.py uses this module's join

        check(peaks["chrom"].to_numpy(dtype=object), peaks["start"].to_numpy(), peaks["end"].to_numpy(), genes)
    r_start, r_end = gene_regions(genes, upstream=upstream, downstream=downstream, gene_body=gene_body)
    pq, pr = overlap_pairs(
        (peaks["chrom"].to_numpy(dtype=object), peaks["start"].to_numpy(), peaks["end"].to_numpy()),
        (genes["chrom"].to_numpy(dtype=object), r_start, r_end),
    )
    used, columns = np.unique(pr, return_inverse=True)
    matrix = sp.csr_matrix(
        (np.ones(len(pq), dtype=np.float32), (pq, columns)), shape=(len(peaks), len(used))
    )
    names = genes["gene_name"].to_numpy(dtype=object)[used]
    log.info(
        "peaks to genes: %d of %d peaks overlap the regions of %d genes (%d pairs)",
        int(np.count_nonzero(np.diff(matrix.indptr))), len(peaks), len(used), len(pq),
    )
    return matrix, names
