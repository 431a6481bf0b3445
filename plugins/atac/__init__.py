"""Built-in plugin: the ``atac`` modality (scATAC-seq as gene activity) and a fragment file reader.

Registers

- modality ``atac`` (:class:`.modality.AtacModality`): gene activity, peaks or fragments-derived data
  to a cells x genes gene-activity FeatureMatrix, smoothed over neighbours and enrichment-normalised;
- reader ``fragments`` (:class:`.fragments.FragmentsReader`): ``.tsv.gz`` fragment files to gene
  activity with snapatac2;
- command-line options ``--gtf``, ``--chrom-sizes``, ``--whitelist``, ``--min-fragments``,
  ``--promoter`` and ``--smoothing/--no-smoothing`` on ``cellscribe annotate``, ``cellscribe
  sentences`` and ``cellscribe activity``; their values reach the reader and the modality as keyword
  options.

Modules: :mod:`.annotation` (GTF/GFF, gene regions), :mod:`.overlap` (peaks to genes),
:mod:`.embedding` (LSI, kNN smoothing operator), :mod:`.activity` (lazy activity matrix, normalisation),
:mod:`.fragments` (the reader), :mod:`.modality`. snapatac2 and scikit-learn are imported only when
used.
"""

from __future__ import annotations

from cellscribe import hookimpl

from .activity import NORMALIZATIONS, ActivityMatrix, gene_baseline, normalize_rows
from .annotation import chrom_key, gene_regions, read_gene_annotation, resolve_annotation, write_transcript_gtf
from .embedding import default_components, knn_operator, lsi
from .fragments import (
    DEFAULT_MIN_FRAGMENTS,
    DEFAULT_PROMOTER,
    FragmentsReader,
    SnapATACPanic,
    read_chrom_sizes,
    read_whitelist,
    tile_matrix,
)
from .modality import AtacModality
from .overlap import overlap_pairs, parse_peak_names, peak_coordinates, peaks_to_genes

__all__ = [
    "AtacModality",
    "FragmentsReader",
    "ActivityMatrix",
    "SnapATACPanic",
    "NORMALIZATIONS",
    "DEFAULT_MIN_FRAGMENTS",
    "DEFAULT_PROMOTER",
    "chrom_key",
    "default_components",
    "gene_baseline",
    "gene_regions",
    "knn_operator",
    "lsi",
    "normalize_rows",
    "overlap_pairs",
    "parse_peak_names",
    "peak_coordinates",
    "peaks_to_genes",
    "read_chrom_sizes",
    "read_gene_annotation",
    "read_whitelist",
    "resolve_annotation",
    "tile_matrix",
    "write_transcript_gtf",
]

_COMMANDS = ("annotate", "sentences", "activity", "transfer")


@hookimpl
def cellscribe_register_modalities(register):
    register(AtacModality())


@hookimpl
def cellscribe_register_readers(register):
    register(FragmentsReader())


@hookimpl
def cellscribe_cli_options(command):
    if command not in _COMMANDS:
        return None
    import click

    return [
        click.Option(
            ["--gtf"], type=click.Path(dir_okay=False), default=None,
            help="ATAC: gene annotation (GTF/GFF) for fragments and peaks.",
        ),
        click.Option(
            ["--chrom-sizes", "chrom_sizes"], default=None,
            help="ATAC fragments: chromosome sizes file (name, length) or a snapatac2 genome name (hg38).",
        ),
        click.Option(
            ["--whitelist"], type=click.Path(exists=True, dir_okay=False), default=None,
            help="ATAC fragments: barcodes to keep, one per line (all kept, even without fragments).",
        ),
        click.Option(
            ["--min-fragments", "min_fragments"], type=click.IntRange(min=0), default=None,
            help=(f"ATAC fragments: flag cells with fewer fragments as low_coverage (default "
                  f"{DEFAULT_MIN_FRAGMENTS}; never dropped)."),
        ),
        click.Option(
            ["--promoter"], type=click.IntRange(min=0), default=None,
            help=f"ATAC: promoter bp upstream of the TSS, added to the gene body (default {DEFAULT_PROMOTER}).",
        ),
        click.Option(
            ["--smoothing/--no-smoothing", "smoothing"], default=None,
            help="ATAC: average gene activity over LSI neighbours before ranking (default: on).",
        ),
        click.Option(
            ["--build-check/--no-build-check", "check_build"], default=None,
            help="ATAC peaks: refuse a gene annotation of another genome build (default: on).",
        ),
    ]
