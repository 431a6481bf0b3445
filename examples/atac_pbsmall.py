"""Annotate scATAC-seq cells from their fragment file with cellscribe's offline default model.

    python examples/atac_pbsmall.py [--data DIR] [--out cellscribe_atac_pbsmall]

Needs the ``atac`` extra (``pip install -e ".[atac]"``: snapatac2 reads fragment files); without it the
example says so and exits. Reads ArchR's PBSmall fragments (150 PBMC, hg19, chr5 and chr11 only, ~170
fragments per cell) with an hg19 gene annotation and chromosome sizes (by default the copies bundled in
``tests/data/atac``; ``--data`` names a folder laid out as ``atac/`` + ``genome/``, like the project's
shared data), turns them into gene activity (``modality="atac"``: gene body
+ 2 kb promoter, LSI-neighbour smoothing, enrichment normalisation), annotates every cell with the
``markers`` model, writes the annotated AnnData to ``--out``, and compares the answers with ArchR's
labels (B cell / T cell / monocyte, 50 each) at the level of Cell Ontology lineages, with and without
smoothing. The same run from the command line::

    cellscribe annotate tests/data/atac/PBSmall_fragments.tsv.gz --modality atac \\
        --gtf tests/data/atac/hg19_chr5_chr11_genes.gtf.gz \\
        --chrom-sizes tests/data/atac/hg19.chrom.sizes -o pbsmall.h5ad
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
MYELOID = {"monocyte", "macrophage", "dendritic cell"}


def lineages(labels: pd.Series) -> pd.Series:
    """The Cell Ontology lineage of each label (``None`` where the label maps to no term)."""
    from cellscribe.core.domain.ontology import get_ontology

    onto = get_ontology()
    ids = labels.astype(object).map(lambda x: onto.lookup(x) if isinstance(x, str) else None)
    return ids.map(lambda i: onto.lineage(i) if i else None)


def report(name: str, predicted: pd.Series, truth: pd.Series) -> None:
    lineage = lineages(predicted)
    right = lineage == truth.reindex(lineage.index)
    merged = lineage.map(lambda x: "myeloid" if x in MYELOID else x) == truth.reindex(lineage.index).map(
        lambda x: "myeloid" if x in MYELOID else x
    )
    print(f"\n{name}: lineage right for {right.mean():.1%} of {len(right)} cells "
          f"({merged.mean():.1%} counting monocyte/macrophage/dendritic cell as one myeloid lineage)")
    table = pd.crosstab(truth.reindex(lineage.index).rename("ArchR label"),
                        lineage.fillna("(no lineage)").rename("predicted lineage"))
    print(table.to_string())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="a data folder with atac/ and genome/ (default: the files bundled in tests/data/atac)")
    parser.add_argument("--model", default=None, help="model (default: the offline markers model)")
    parser.add_argument("--out", type=Path, default=Path("cellscribe_atac_pbsmall"))
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    try:
        import snapatac2  # noqa: F401  (the fragments reader's engine)
    except ImportError:
        print('This example reads a fragment file, which needs the atac extra: pip install -e ".[atac]"')
        sys.exit(0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import cellscribe
    from cellscribe.core.run import read_input

    if args.data is None:  # bundled with the repository: chr5 and chr11 of the annotation
        bundled = HERE.parent / "tests" / "data" / "atac"
        fragments, labels = bundled / "PBSmall_fragments.tsv.gz", bundled / "PBSmall_labels.tsv"
        gtf, sizes = bundled / "hg19_chr5_chr11_genes.gtf.gz", bundled / "hg19.chrom.sizes"
    else:
        fragments, labels = args.data / "atac" / "PBSmall_fragments.tsv.gz", args.data / "atac" / "PBSmall_labels.tsv"
        gtf, sizes = args.data / "genome" / "hg19_archr_genes.gtf.gz", args.data / "genome" / "hg19.chrom.sizes"
    truth = pd.read_csv(labels, sep="\t", index_col=0)["cell_type"]
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    adata = read_input(fragments, gtf=gtf, chrom_sizes=sizes)  # the fragments reader of the atac plugin
    print(f"read {fragments.name}: {adata.n_obs} cells x {adata.n_vars} genes in "
          f"{time.perf_counter() - started:.1f} s; median {adata.obs['n_fragment'].median():.0f} fragments "
          f"per cell, {int(adata.obs['low_coverage'].sum())} cells under 200 flagged low_coverage (kept)")

    plain = adata.copy()
    started = time.perf_counter()
    cellscribe.tl.annotate(adata, modality="atac", model=args.model, progress=False,
                           sidecar=args.out / "pbsmall.cellscribe.jsonl")
    print(f"annotated in {time.perf_counter() - started:.1f} s")
    cellscribe.tl.annotate(plain, modality="atac", model=args.model, progress=False, sidecar=False,
                           modality_options={"smoothing": False})

    print("\nlabels given (default settings):")
    print(adata.obs["cellscribe"].value_counts().to_string())
    report("default settings (smoothing on)", adata.obs["cellscribe"], truth)
    report("without smoothing", plain.obs["cellscribe"], truth)

    adata.obs["archr_label"] = truth.reindex(adata.obs_names).to_numpy()
    adata.obs["cellscribe_no_smoothing"] = plain.obs["cellscribe"].to_numpy()
    path = args.out / "pbsmall_annotated.h5ad"
    adata.write_h5ad(path)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
