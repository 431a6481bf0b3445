"""Does a gene annotation belong to the genome build of the peaks (or fragments)?

Gene activity is only as right as the gene coordinates: hg19 peaks aggregated over an hg38 annotation
still overlap plenty of "genes" (75% of the Schep 2017 peaks fall in an hg38 gene body + promoter,
against 90% with hg19), so the run goes on and ranks the wrong genes. Chromosome names do not tell
the builds apart either (``chr1`` in both). What does is the one landmark every scATAC data set
carries: transcription start sites are the most consistently accessible sites of the genome, so peaks
(and fragments) pile up exactly on the annotation's TSSs when the coordinates agree, and sit no closer
to them than to any other nearby position when they do not.

The statistic, :func:`measure_build`:

1. each position (peak or fragment) is *near a TSS* when it overlaps an annotated TSS +- 1 kb
   (:data:`TSS_WINDOW`); its *local background* is how often the same position moved by 10 to 100 kb
   (:data:`SHIFTS`, both directions) is near a TSS, which keeps the local gene density (genes cluster at
   the megabase scale) and loses the base-pair agreement;
2. the genome is cut into 10 Mb blocks (:data:`BLOCK_SIZE`); a block *agrees* when its positions are
   near a TSS at least twice (:data:`MIN_ENRICHMENT`) as often as their local background (and at least
   3 times). Blocks with fewer than :data:`MIN_BLOCK_POSITIONS` positions are judged together as one;
3. the result is the share of positions in agreeing blocks.

Why blocks and not one genome-wide share: two builds of one genome differ by local shifts and agree to
the base elsewhere (hg19 and hg38 share the first ~50 Mb of chr5). A genome-wide share mixes both: with
hg38, 11.3% of the (very promoter-rich) Schep peaks still lie within 1 kb of a TSS, while a correct
but distal-rich peak set can have about as few (large unfiltered sets: 10-15%). Blocks separate the
two: with the wrong build only the regions the builds share agree.

Measured on the shared real data (share of positions in agreeing blocks; in brackets the share within
1 kb of a TSS / its local background):

========================================  ====================  ====================
data (genome of its coordinates)          hg19 annotation       hg38 annotation
========================================  ====================  ====================
Schep 2017 peaks (hg19, 5,036)            100% (73.4% / 4.4%)   7.7% (11.3% / 7.6%)
Buenrostro 2018 peaks (hg19, 35,983)      100% (19.8% / 3.9%)   5.7% (8.0% / 7.0%)
PBSmall fragments (hg19, chr5 + chr11)    100% (68.6% / 4.5%)   22% (13.4% / 6.5%)
10x multiome peaks (GRCh38, 174)          0% (8.6% / 6.8%)      100% (31.0% / 13.0%)
multiome fragments (GRCh38, 367,439       6.5% (3.3% / 3.6%)    80% (22.9% / 5.6%)
within +-5 kb of 45 genes)
========================================  ====================  ====================

The threshold, :data:`MIN_AGREEING` = 50%, comes from the biology rather than from these files: with
the right annotation every region that has promoters agrees, because promoters are accessible in every
cell type (100% on every real peak set above; the Buenrostro peaks thinned to 10% promoter peaks still
give 64%); with the wrong one only the stretches the two builds share agree (hg19 and hg38: 6-8%
genome-wide, 22% on chr5 + chr11; none between species). So an annotation is refused when fewer than
half of the positions agree. A peak set with almost no promoter peaks (promoters removed on purpose;
the Buenrostro peaks thinned to 5% promoter peaks give 27%) cannot show its build this way and is
refused too. Fewer than :data:`MIN_POSITIONS` positions on annotated chromosomes are not judged (said
in the log).

Separately, :data:`MIN_CHROMOSOME_SHARE`: when (almost) no position lies on a chromosome the annotation
has genes on (``NC_000001.11`` against ``chr1``, another organism's scaffolds) nothing would be
counted; that is refused too, with the share.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import numpy as np
import pandas as pd

from .annotation import chrom_key
from .overlap import overlap_pairs

log = logging.getLogger(__name__)

__all__ = [
    "tss_share",
    "TSS_WINDOW",
    "SHIFTS",
    "BLOCK_SIZE",
    "MIN_BLOCK_POSITIONS",
    "MIN_ENRICHMENT",
    "MIN_AGREEING",
    "MIN_POSITIONS",
    "MIN_CHROMOSOME_SHARE",
    "MAX_POSITIONS",
    "BuildCheck",
    "measure_build",
    "check_build",
]

#: A position is near a TSS when it overlaps the TSS +- this many base pairs.
TSS_WINDOW = 1000
#: Shifts (bp) that give each position's local background.
SHIFTS = tuple(sign * step for step in (10_000, 20_000, 30_000, 50_000, 70_000, 100_000) for sign in (1, -1))
#: Genome block size (bp) judged on its own.
BLOCK_SIZE = 10_000_000
#: Blocks with fewer positions are judged together, as one block.
MIN_BLOCK_POSITIONS = 20
#: A block agrees when its positions are near a TSS at least this many times as often as their background.
MIN_ENRICHMENT = 2.0
#: The annotation is refused when fewer positions than this share lie in agreeing blocks.
MIN_AGREEING = 0.5
#: Fewer positions on annotated chromosomes than this are not judged.
MIN_POSITIONS = 100
#: The annotation is refused when fewer positions than this share lie on its chromosomes.
MIN_CHROMOSOME_SHARE = 0.05
#: At most this many positions (a fixed random sample) are measured.
MAX_POSITIONS = 200_000


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%" if value < 0.1 else f"{100 * value:.0f}%"


@attrs.frozen
class BuildCheck:
    """How positions (peaks or fragments) and a gene annotation agree; see the module docstring.

    ``n_positions``: positions with valid coordinates; ``n_on_annotated``: those on a chromosome the
    annotation has genes on; ``tss_share`` and ``background_share``: the share of the latter near an
    annotated TSS, and near one once moved 10-100 kb; ``agreeing_share``: the share in agreeing 10 Mb
    blocks, ``None`` when there are too few positions to judge; ``data_chroms`` and
    ``annotation_chroms``: a few chromosome names of each, for messages.
    """

    n_positions: int
    n_on_annotated: int
    tss_share: float = float("nan")
    background_share: float = float("nan")
    agreeing_share: float | None = None
    data_chroms: tuple[str, ...] = ()
    annotation_chroms: tuple[str, ...] = ()

    @property
    def chromosome_share(self) -> float:
        """The share of positions on chromosomes the annotation has genes on (1 when there are none)."""
        return self.n_on_annotated / self.n_positions if self.n_positions else 1.0

    @property
    def chromosomes_match(self) -> bool:
        return self.n_positions == 0 or self.chromosome_share >= MIN_CHROMOSOME_SHARE

    @property
    def judged(self) -> bool:
        return self.agreeing_share is not None

    @property
    def ok(self) -> bool:
        """``False`` when the annotation should be refused."""
        return self.chromosomes_match and (not self.judged or self.agreeing_share >= MIN_AGREEING)

    def summary(self) -> str:
        """One line with the measured numbers."""
        if not self.n_positions:
            return "no position to compare"
        text = f"{_pct(self.chromosome_share)} of {self.n_positions} on annotated chromosomes"
        if self.n_on_annotated:
            text += (f"; {_pct(self.tss_share)} within {TSS_WINDOW // 1000} kb of an annotated TSS against "
                     f"{_pct(self.background_share)} when moved 10-100 kb")
        if self.judged:
            text += f"; {_pct(self.agreeing_share)} in regions that gather at its TSSs"
        return text

    def to_dict(self) -> dict[str, Any]:
        """The numbers, for ``uns`` (no ``None``: h5ad cannot store it)."""
        return {
            "n_positions": self.n_positions,
            "chromosome_share": float(self.chromosome_share),
            "tss_share": float(self.tss_share),
            "background_share": float(self.background_share),
            "agreeing_share": float("nan") if self.agreeing_share is None else float(self.agreeing_share),
        }


def _tss_windows(genes: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    minus = genes["strand"].to_numpy(dtype=object) == "-"
    tss = np.where(minus, genes["end"].to_numpy(dtype=np.int64) - 1, genes["start"].to_numpy(dtype=np.int64))
    return genes["chrom"].to_numpy(dtype=object), np.maximum(tss - TSS_WINDOW, 0), tss + TSS_WINDOW + 1


def tss_share(chrom: Any, start: Any, end: Any, genes: pd.DataFrame) -> float:
    """The share of the positions on annotated chromosomes within :data:`TSS_WINDOW` of an annotated
    TSS (``tss_share`` of :func:`measure_build`, without its background; NaN when none is on one)."""
    chrom = np.asarray(chrom, dtype=object)
    keys = chrom_key(chrom)
    annotated = set(chrom_key(pd.unique(genes["chrom"].to_numpy(dtype=object))))
    on = np.fromiter((k in annotated for k in keys), dtype=bool, count=len(keys))
    if not on.any():
        return float("nan")
    query, _ = overlap_pairs((chrom[on], np.asarray(start)[on], np.asarray(end)[on]), _tss_windows(genes))
    return float(len(np.unique(query)) / on.sum())


def _near(chrom: np.ndarray, start: np.ndarray, end: np.ndarray, windows: tuple) -> np.ndarray:
    """Whether each position, moved by 0 and by each of :data:`SHIFTS`, overlaps a TSS window.

    One overlap join of the positions widened by the largest shift; a pair (position, window) overlaps
    under shift ``s`` when ``window_start - end < s < window_end - start``.

    :return: a booleans array, positions x (1 + len(SHIFTS)); column 0 is the unshifted position.
    """
    reach = max(abs(s) for s in SHIFTS)
    query, region = overlap_pairs((chrom, np.maximum(start - reach, 0), end + reach), windows)
    low = windows[1][region] - end[query]
    high = windows[2][region] - start[query]
    near = np.zeros((len(chrom), 1 + len(SHIFTS)), dtype=bool)
    for column, shift in enumerate((0, *SHIFTS)):
        near[query[(low < shift) & (shift < high)], column] = True
    return near


def measure_build(chrom: Any, start: Any, end: Any, genes: pd.DataFrame) -> BuildCheck:
    """Measure how positions and an annotation agree (the statistic of the module docstring).

    :param chrom, start, end: the positions (0-based, end-exclusive); invalid ones (missing, negative,
        empty) are left out.
    :param genes: a :func:`~.annotation.read_gene_annotation` table.
    """
    chrom = np.asarray(chrom, dtype=object)
    start = np.asarray(start, dtype=np.float64)
    end = np.asarray(end, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(start) & np.isfinite(end) & (start >= 0) & (end > start)
    chrom, start, end = chrom[valid], start[valid].astype(np.int64), end[valid].astype(np.int64)
    keys = chrom_key(chrom)
    annotated_keys = set(chrom_key(pd.unique(genes["chrom"].to_numpy(dtype=object))))
    on = np.fromiter((k in annotated_keys for k in keys), dtype=bool, count=len(keys))
    examples = {
        "data_chroms": tuple(map(str, pd.unique(chrom)[:3])),
        "annotation_chroms": tuple(map(str, pd.unique(genes["chrom"].to_numpy(dtype=object))[:3])),
    }
    n_on = int(on.sum())
    if n_on == 0:
        return BuildCheck(n_positions=len(chrom), n_on_annotated=0, **examples)
    chrom, start, end, keys = chrom[on], start[on], end[on], keys[on]
    if n_on > MAX_POSITIONS:  # a fixed random sample: the shares need no more
        keep = np.sort(np.random.default_rng(0).choice(n_on, MAX_POSITIONS, replace=False))
        chrom, start, end, keys = chrom[keep], start[keep], end[keep], keys[keep]
    shifted = _near(chrom, start, end, _tss_windows(genes))
    near, background = shifted[:, 0], shifted[:, 1:].mean(axis=1)
    agreeing = None
    if n_on >= MIN_POSITIONS:
        block = pd.Series(keys.astype(str)) + ":" + pd.Series(start // BLOCK_SIZE).astype(str)
        size = block.map(block.value_counts())
        block[size.to_numpy() < MIN_BLOCK_POSITIONS] = "small blocks"
        table = pd.DataFrame({"block": block, "near": near, "background": background}).groupby("block").agg(
            n=("near", "size"), near=("near", "sum"), background=("background", "sum")
        )
        agrees = (table["near"] >= MIN_ENRICHMENT * table["background"]) & (table["near"] >= 3)
        agreeing = float(table.loc[agrees, "n"].sum() / len(chrom))
    return BuildCheck(
        n_positions=int(valid.sum()), n_on_annotated=n_on, tss_share=float(near.mean()),
        background_share=float(background.mean()), agreeing_share=agreeing, **examples,
    )


def check_build(
    chrom: Any,
    start: Any,
    end: Any,
    genes: pd.DataFrame,
    *,
    what: str = "peaks",
    annotation: str | None = None,
    option: str = "gtf=PATH (--gtf PATH)",
) -> BuildCheck:
    """:func:`measure_build`, raising when the annotation belongs to another genome or build.

    :param what: what the positions are (``"peaks"``, ``"fragments"``), for the message.
    :param annotation: the annotation's name or path, for the message (default: the table's
        ``attrs["path"]``).
    :param option: how the user passes another annotation, for the message.
    :return: the :class:`BuildCheck` (logged).
    :raises ValueError: one line naming the problem, the measured percentages and the fix.
    """
    found = measure_build(chrom, start, end, genes)
    name = repr(str(annotation if annotation is not None else genes.attrs.get("path", "the gene annotation")))
    origin = "aligned to" if what == "fragments" else "called on"
    fix = f"pass the gene annotation of the genome the {what} were {origin} with {option}"
    if not found.chromosomes_match:
        raise ValueError(
            f"the {what} and the gene annotation {name} name different chromosomes (another genome?): only "
            f"{_pct(found.chromosome_share)} of the {found.n_positions} {what} lie on a chromosome the "
            f"annotation has genes on (the {what}: {', '.join(found.data_chroms)}; the annotation: "
            f"{', '.join(found.annotation_chroms)}); {fix}"
        )
    if not found.ok:
        raise ValueError(
            f"the gene annotation {name} does not match the genome build of the {what}: only "
            f"{_pct(found.agreeing_share)} of the {what} lie in regions where they gather at its "
            f"transcription start sites (the right build: over {_pct(MIN_AGREEING)}, usually all; "
            f"{_pct(found.tss_share)} within {TSS_WINDOW // 1000} kb of an annotated TSS against "
            f"{_pct(found.background_share)} for the same {what} moved 10-100 kb); {fix} (hg19 {what} need "
            f"an hg19/GRCh37 annotation, hg38 {what} an hg38/GRCh38 one)"
        )
    if found.judged:
        log.info("%s vs %s: %s", what, name, found.summary())
    else:
        log.info("%s vs %s: too few %s on annotated chromosomes to check the genome build (%s)", what, name,
                 what, found.summary())
    return found
