"""Gene annotations for ATAC: reading a GTF/GFF into one row per gene, and each gene's regulatory region.

A gene's *regulatory region* is where chromatin accessibility counts as activity of that gene: its body
(transcription start to end) plus a promoter of ``upstream`` base pairs before the transcription start
site (TSS) and ``downstream`` base pairs after the end, strand-aware: on the minus strand the TSS is the
gene's right end, so the promoter lies to its right. This is the definition of
``snapatac2.pp.make_gene_matrix`` (``upstream``, ``downstream``, ``include_gene_body``), so peaks
aggregated here and fragments counted by snapatac2 describe the same regions. Without the gene body the
region is the TSS extended by ``upstream`` before it and ``downstream`` after it.

Coordinates are 0-based, end-exclusive (BED): a GTF's 1-based closed ``[start, end]`` becomes
``[start - 1, end)``. Chromosome names are compared through :func:`chrom_key` (``chr1`` = ``1``,
``chrM`` = ``MT``), so annotations and data that name chromosomes differently still meet.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

__all__ = [
    "GENE_COLUMNS",
    "chrom_key",
    "read_gene_annotation",
    "gene_regions",
    "write_transcript_gtf",
    "resolve_annotation",
    "builtin_genome",
]

#: Columns of the gene table :func:`read_gene_annotation` returns.
GENE_COLUMNS = ("chrom", "start", "end", "strand", "gene_name", "gene_id")

# Record types that describe transcripts: snapatac2 reads "transcript"; GFF3 files use "mRNA" and kin.
_TRANSCRIPT_TYPES = ("transcript", "mRNA", "ncRNA", "lnc_RNA", "primary_transcript")
_GENE_TYPES = ("gene",)


def chrom_key(names: Any) -> np.ndarray:
    """Comparable chromosome names: a leading ``chr`` (any case) removed, ``M`` written ``MT``.

    ``chr1``, ``Chr1`` and ``1`` all become ``1``; ``chrM``, ``M`` and ``MT`` become ``MT``. Works on
    any array-like of names at once and returns an object array.
    """
    series = pd.Series(np.asarray(names, dtype=object), dtype=object).astype(str)
    stripped = series.str.replace(r"^chr", "", case=False, regex=True)
    return stripped.mask(stripped.str.upper().isin(["M", "MT"]), "MT").to_numpy(dtype=object)


def _attribute(attributes: pd.Series, key: str) -> pd.Series:
    """The value of ``key`` in GTF (``key "value";``) or GFF3 (``key=value;``) attribute strings."""
    pattern = rf'(?:^|;)\s*{re.escape(key)}(?:\s+"([^"]*)"|\s+([^;\s"]+)|=([^;]*))'
    found = attributes.str.extract(pattern).to_numpy(dtype=object)
    value = found[:, 0]
    for column in (1, 2):
        value = np.where(pd.isna(value), found[:, column], value)
    return pd.Series(value, index=attributes.index, dtype=object)


@functools.lru_cache(maxsize=4)
def _read_cached(path: str, mtime_ns: int, size: int) -> pd.DataFrame:
    table = pd.read_csv(
        path,
        sep="\t",
        comment="#",
        header=None,
        usecols=[0, 2, 3, 4, 6, 8],
        names=["chrom", "type", "start", "end", "strand", "attributes"],
        dtype={"chrom": str, "type": str, "start": np.int64, "end": np.int64, "strand": str, "attributes": str},
        compression="infer",
    )
    types = table["type"]
    transcripts = types.isin(_TRANSCRIPT_TYPES)
    kind = "transcript"
    if not transcripts.any():
        transcripts = types.isin(_GENE_TYPES)
        kind = "gene"
    if not transcripts.any():
        found = ", ".join(sorted(map(str, types.unique()[:10]))) or "none"
        raise ValueError(
            f"the gene annotation {path} has neither transcript nor gene records (record types found: "
            f"{found}); give a GTF/GFF with 'transcript' (or at least 'gene') records, e.g. a GENCODE or "
            "Ensembl GTF"
        )
    records = table.loc[transcripts, ["chrom", "start", "end", "strand", "attributes"]]
    attributes = records.pop("attributes")
    gene_id = _attribute(attributes, "gene_id")
    gene_name = _attribute(attributes, "gene_name")
    if kind == "gene" or gene_id.isna().all():  # GFF3 gene records carry ID / Name
        gene_id = gene_id.fillna(_attribute(attributes, "ID"))
        gene_name = gene_name.fillna(_attribute(attributes, "Name"))
    if gene_id.isna().all() and gene_name.isna().all():
        raise ValueError(
            f"the {kind} records of {path} have no gene_id or gene_name attribute; cellscribe needs one of "
            "them to name genes"
        )
    records["gene_id"] = gene_id.fillna(gene_name).to_numpy()
    records["gene_name"] = gene_name.fillna(gene_id).to_numpy()
    n_unnamed = int(gene_name.isna().sum())
    # One row per gene: the span of its transcripts (a TSS-only region then uses the outermost TSS).
    genes = (
        records.groupby("gene_id", sort=False)
        .agg(chrom=("chrom", "first"), start=("start", "min"), end=("end", "max"),
             strand=("strand", "first"), gene_name=("gene_name", "first"))
        .reset_index()
    )
    genes["start"] -= 1  # GTF is 1-based and closed; regions here are BED-like
    genes = genes.loc[:, list(GENE_COLUMNS)]
    genes.attrs.update({"record_type": kind, "n_unnamed": n_unnamed, "path": path})
    log.info(
        "gene annotation %s: %d genes from %s records%s",
        path, len(genes), kind,
        f" ({n_unnamed} records without gene_name named by gene_id)" if n_unnamed else "",
    )
    return genes


def read_gene_annotation(path: str | os.PathLike[str]) -> pd.DataFrame:
    """One row per gene of a GTF or GFF3 file (plain or gzip-compressed).

    Genes are built from ``transcript`` records (GFF3: ``mRNA`` and other transcript types), each gene
    spanning its transcripts. A file without transcript records (only ``gene`` lines) is read from its
    gene records instead, which describe the same span. Genes are keyed by ``gene_id`` and named by
    ``gene_name``; a record without ``gene_name`` is named by its ``gene_id`` (snapatac2 panics on such
    records; see :func:`write_transcript_gtf`).

    :return: a DataFrame with :data:`GENE_COLUMNS` (``start`` 0-based, ``end`` exclusive) and
        ``attrs["record_type"]`` (``"transcript"`` or ``"gene"``) and ``attrs["n_unnamed"]``. Results
        are cached per file (path, modification time and size): treat them as read-only.
    :raises ValueError: the file has no usable records.
    :raises FileNotFoundError: no such file.
    """
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"no such gene annotation file: {str(path)!r}")
    stat = resolved.stat()
    return _read_cached(str(resolved), stat.st_mtime_ns, stat.st_size)


def gene_regions(
    genes: pd.DataFrame, *, upstream: int = 2000, downstream: int = 0, gene_body: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The regulatory region ``[start, end)`` of every gene of a :func:`read_gene_annotation` table.

    With ``gene_body`` the region is the gene extended by ``upstream`` base pairs before its TSS and
    ``downstream`` after its end; without it, the TSS extended the same way. Before and after follow
    the strand: on ``-`` the TSS is the gene's right end and "upstream" lies to the right. Genes of
    unknown strand (``.``) count as ``+``. Starts are clipped at 0.
    """
    if upstream < 0 or downstream < 0:
        raise ValueError(f"upstream and downstream must be >= 0 base pairs, got {upstream} and {downstream}")
    start = genes["start"].to_numpy(dtype=np.int64)
    end = genes["end"].to_numpy(dtype=np.int64)
    minus = genes["strand"].to_numpy(dtype=object) == "-"
    if not gene_body:
        tss = np.where(minus, end - 1, start)
        start, end = tss, tss + 1
    left = np.where(minus, downstream, upstream)
    right = np.where(minus, upstream, downstream)
    return np.maximum(start - left, 0), end + right


def write_transcript_gtf(genes: pd.DataFrame, path: str | os.PathLike[str], chrom_names: Any = None) -> int:
    """Write one ``transcript`` record per gene of ``genes`` to a plain GTF that snapatac2 reads.

    Every record has ``gene_id``, ``gene_name`` and ``transcript_id``, so files whose genes lack
    transcript records or a ``gene_name`` work with ``snapatac2.pp.make_gene_matrix``. With
    ``chrom_names`` (the chromosome names of the data), each gene's chromosome is written in the data's
    spelling (``1`` -> ``chr1``) and genes on chromosomes the data lacks are left out.

    :return: the number of records written.
    """
    chrom = genes["chrom"].to_numpy(dtype=object)
    keep = np.ones(len(genes), dtype=bool)
    if chrom_names is not None:
        names = np.asarray(list(chrom_names), dtype=object)
        lookup = pd.Series(names, index=chrom_key(names))
        lookup = lookup[~lookup.index.duplicated()]
        mapped = lookup.reindex(chrom_key(chrom)).to_numpy(dtype=object)
        keep = pd.notna(mapped)
        chrom = mapped
    sub = genes.loc[keep]
    quoted = lambda s: s.astype(str).str.replace('"', "'", regex=False)  # noqa: E731
    lines = pd.DataFrame(
        {
            "chrom": chrom[keep],
            "source": "cellscribe",
            "type": "transcript",
            "start": sub["start"].to_numpy() + 1,
            "end": sub["end"].to_numpy(),
            "score": ".",
            "strand": sub["strand"].where(sub["strand"].isin(["+", "-"]), "+").to_numpy(),
            "frame": ".",
            "attributes": (
                'gene_id "' + quoted(sub["gene_id"]) + '"; gene_name "' + quoted(sub["gene_name"])
                + '"; transcript_id "' + quoted(sub["gene_id"]) + '";'
            ).to_numpy(),
        }
    )
    lines.to_csv(path, sep="\t", header=False, index=False, quoting=3)  # csv.QUOTE_NONE
    return len(lines)


def builtin_genome(name: str) -> Any | None:
    """snapatac2's built-in genome called ``name`` (``"hg38"``, ``"GRCh38"``, ``"mm10"``...), or ``None``
    (also without snapatac2, the atac extra)."""
    try:
        import snapatac2 as snap
    except ImportError:
        return None

    # Look the name up without touching the genome's properties: they download files.
    for candidate in (str(name), str(name).lower()):
        genome = vars(snap.genome).get(candidate)
        if isinstance(genome, snap.genome.Genome):
            return genome
    return None


def resolve_annotation(gtf: str | os.PathLike[str] | None, *, option: str = "gtf=PATH (--gtf PATH)") -> str:
    """The local path of the gene annotation ``gtf``: a GTF/GFF path, or a snapatac2 genome name.

    A genome name (``"hg38"``) is resolved through snapatac2, which downloads the annotation on first use;
    offline that fails, and the error names the local-file option instead.

    :raises ValueError: no annotation given, an unknown name, or a built-in annotation that cannot be
        fetched.
    """
    if gtf is None:
        raise ValueError(
            "ATAC gene activity needs a gene annotation: pass a local GTF/GFF file with "
            f"{option} (for example an Ensembl or GENCODE GTF of the genome the data were aligned to)"
        )
    if Path(gtf).expanduser().is_file():
        return str(Path(gtf).expanduser())
    genome = builtin_genome(str(gtf))
    if genome is None:
        raise FileNotFoundError(
            f"no such gene annotation file: {str(gtf)!r} (nor a snapatac2 genome name); pass a local "
            f"GTF/GFF file with {option}"
        )
    try:
        return str(genome.annotation)
    except Exception as err:  # network errors of any kind: requests, urllib, pooch
        raise ValueError(
            f"gtf={str(gtf)!r} names snapatac2's built-in genome, whose gene annotation has to be "
            f"downloaded, and the download failed ({type(err).__name__}: {err}). Offline, pass a local "
            f"GTF/GFF file with {option}"
        ) from err
