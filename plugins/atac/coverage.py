"""How densely a peak set covers each gene: what the peaks say about the cells they were called on.

Peaks are called where the profiled cells are open, so a peak matrix carries information before any cell
is read: the genes the data set's cells open have more peaks around them than genes of the same length
(peak callers pool the cells; a gene open in most of them gathers peaks in its promoter, body and
enhancers). On Buenrostro 2018's 35,983 peaks, called on bone-marrow progenitors, the stem and
progenitor genes ``HOXA9``, ``GATA2``, ``MEIS1`` and ``CRHBP`` have 1.2 to 1.8 standard deviations more
peaks than genes of their length, while ``MS4A1``, ``CD3E`` and ``LYZ`` of mature blood cells have none.
That is exactly what enrichment over the data set's own cells (:mod:`.activity`) removes: what every
cell of a sorted progenitor population shares.

:func:`peak_coverage` counts, for every gene of the annotation, the peaks in its region and the number a
region of that length gets on average in this peak set; the ATAC modality hands the table to models
through :class:`~cellscribe.core.types.Assay` (``coverage``), and the ``markers`` model reads a
composition prior over its cell types from it. A peak set cut down at random keeps these ratios in
expectation and loses precision, which the prior's pseudo-count absorbs.

A peak set chosen around promoters says something else. A genome-wide call set has a minority of its
peaks at promoters (19.8% of Buenrostro's within 1 kb of an annotated TSS; large unfiltered sets 10-30%),
and a gene's count follows how much of its locus the cells open. In a set made mostly of promoter peaks
(Schep 2017's 5,036: 73%, the strongest peaks kept) a gene has its promoter peak or not, and which ones
were kept reflects the selection: there, the counts favoured hemangioblasts and T cells and moved the
HL60 cell line from myeloid calls to T cells. So the coverage is only given to models when fewer than
:data:`MAX_TSS_SHARE` of the peaks lie within 1 kb of a TSS (:func:`usable`); a random subset of a
genome-wide set keeps its share. Nor when the set has fewer than :data:`MIN_PEAKS` peaks: peaks chosen
around some genes make those genes' types look abundant.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .annotation import chrom_key, gene_regions
from .build import tss_share

__all__ = ["LENGTH_BINS", "MAX_TSS_SHARE", "MIN_PEAKS", "peak_coverage", "usable"]

#: Region lengths are compared within this many quantile bins of log length (hundreds of genes each for
#: a human annotation): the expectation follows the length without assuming peaks grow linearly with it.
LENGTH_BINS = 40
#: Peak sets with at least this share of their peaks within 1 kb of an annotated TSS are promoter
#: selections, whose coverage says which promoters were kept (see the module docstring).
MAX_TSS_SHARE = 0.5
#: Peak sets with fewer peaks are targeted selections (the 10x multiome test subset: 174 peaks around 45
#: marker genes, which made those genes' types the likeliest) or samples too small for a prior; genome-wide
#: call sets and their public subsets have thousands (5,000-50,000 in most public matrices).
MIN_PEAKS = 2_000


def peak_coverage(
    peaks: pd.DataFrame, to_genes: sp.spmatrix, names: np.ndarray, genes: pd.DataFrame, *, upstream: int,
    downstream: int, gene_body: bool,
) -> pd.DataFrame:
    """Peaks found and expected in the region of every gene of ``genes``.

    :param peaks: the peaks' ``chrom``, ``start``, ``end`` (for the share at promoters).
    :param to_genes: the peaks x genes 0/1 matrix of the run (columns ``names``, unique symbols; a peak
        counts once per gene).
    :param genes: the :func:`~.annotation.read_gene_annotation` table the matrix came from.
    :param upstream, downstream, gene_body: the regions the matrix used (:func:`~.annotation.gene_regions`).
    :return: one row per distinct gene symbol of the annotation (genes without a peak included), columns
        ``peaks`` (peaks in the region), ``expected`` (mean peaks of the regions in the same length bin,
        :data:`LENGTH_BINS`, on the chromosomes some peak lies on; 0 on the others) and ``length`` (base pairs; a symbol with several genes: the longest);
        ``attrs["tss_share"]``: the share of the peaks within 1 kb of an annotated TSS
        (:func:`~.build.tss_share`), ``attrs["n_peaks"]``.
    """
    at_promoters = tss_share(peaks["chrom"].to_numpy(dtype=object), peaks["start"].to_numpy(),
                             peaks["end"].to_numpy(), genes)
    start, end = gene_regions(genes, upstream=upstream, downstream=downstream, gene_body=gene_body)
    symbols = genes["gene_name"].astype(str).to_numpy()
    # Only chromosomes the peak set covers set the expectation; genes elsewhere expect nothing (a peak
    # set of a few chromosomes says nothing of the others' genes).
    with_peaks = set(chrom_key(pd.unique(peaks["chrom"].to_numpy(dtype=object))))
    covered = np.fromiter((k in with_peaks for k in chrom_key(genes["chrom"].to_numpy(dtype=object))), dtype=bool,
                          count=len(genes))
    per_gene = pd.DataFrame({"length": (end - start).astype(np.float64), "covered": covered}, index=symbols)
    per_gene = per_gene.groupby(level=0, sort=False).max()
    length, covered = per_gene["length"], per_gene["covered"].to_numpy(dtype=bool)
    found = pd.Series(np.asarray(to_genes.sum(axis=0), dtype=np.float64).ravel(), index=np.asarray(names, dtype=str))
    found = found.groupby(level=0, sort=False).sum()
    found_per_gene = found.reindex(length.index).fillna(0.0).to_numpy()
    log_length = np.log10(np.maximum(length.to_numpy(), 1.0))
    n_bins = max(1, min(LENGTH_BINS, int(covered.sum()) // 20))
    edges = np.unique(np.quantile(log_length[covered] if covered.any() else log_length,
                                  np.linspace(0.0, 1.0, n_bins + 1)))
    bins = np.clip(np.searchsorted(edges, log_length, side="right") - 1, 0, max(len(edges) - 2, 0))
    totals = np.bincount(bins[covered], weights=found_per_gene[covered], minlength=len(edges))
    sizes = np.bincount(bins[covered], minlength=len(edges))
    expected = np.where(covered, (totals / np.maximum(sizes, 1))[bins], 0.0)
    table = pd.DataFrame({"peaks": found_per_gene, "expected": expected, "length": length.to_numpy()},
                         index=length.index)
    table.attrs.update({"tss_share": at_promoters, "n_peaks": int(len(peaks))})
    return table


def usable(coverage: pd.DataFrame) -> tuple[bool, str]:
    """Whether a :func:`peak_coverage` table may go to models, and if not, why (one clause)."""
    share = float(coverage.attrs.get("tss_share", float("nan")))
    n_peaks = int(coverage.attrs.get("n_peaks", 0))
    if n_peaks < MIN_PEAKS:
        return False, (f"{n_peaks} peaks (a targeted selection or a small sample; a genome-wide peak set has at "
                       f"least {MIN_PEAKS:,})")
    if not np.isfinite(share):
        return False, "no peak lies on a chromosome of the gene annotation"
    if share >= MAX_TSS_SHARE:
        return False, (f"{share:.0%} of the peaks lie within 1 kb of a TSS (a promoter selection; a genome-wide "
                       f"peak set has under {MAX_TSS_SHARE:.0%})")
    return True, ""
