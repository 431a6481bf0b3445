"""Annotate scanpy's bundled PBMC data end to end with cellscribe's offline default model.

    python examples/pbmc68k_annotate.py [--model markers] [--out cellscribe_pbmc68k]

Reads ``scanpy.datasets.pbmc68k_reduced()`` (700 PBMCs, shipped inside scanpy; its X is scaled, so the
RNA modality falls back to the log-normalised ``.raw`` and says so), annotates every cell, writes the
annotated AnnData, the raw-output sidecar and a UMAP figure to ``--out``, and prints counts per label
and the agreement with the sorted-population labels in ``obs["bulk_labels"]`` (Zheng et al. 2017),
at lineage level and at the fine level via the Cell Ontology.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import pandas as pd


#: Lineage groups for blood (as the issue that set the bar defines them): T and NK cells together,
#: B cells, myeloid cells (monocytes, macrophages, dendritic, mast cells, granulocytes), progenitors.
LINEAGE_GROUPS = {
    "T cell": "T/NK", "NK cell": "T/NK", "innate lymphoid cell": "T/NK", "B cell": "B",
    "monocyte": "myeloid", "macrophage": "myeloid", "dendritic cell": "myeloid", "mast cell": "myeloid",
    "granulocyte": "myeloid", "HSPC": "progenitor",
}


def agreement(truth: pd.Series, predicted: pd.Series) -> tuple[float, float, int]:
    """Share of cells whose prediction is the truth's Cell Ontology term or a subtype of it (fine), and
    whose lineage group matches (lineage). Only cells whose truth maps to a term count.

    :return: ``(fine, lineage, n_counted)``.
    """
    from cellscribe.core.domain.ontology import get_ontology

    onto = get_ontology()
    t_ids = onto.lookup_many(truth.astype(str))
    p_ids = [onto.lookup(p) if isinstance(p, str) else None for p in predicted.astype(object)]
    fine = lineage = n = 0
    for t, p in zip(t_ids, p_ids):
        if t is None:
            continue
        n += 1
        if p is None:
            continue
        fine += p == t or onto.is_a(p, t)
        group = [LINEAGE_GROUPS.get(onto.lineage(i) or "", onto.lineage(i)) for i in (t, p)]
        lineage += group[0] is not None and group[0] == group[1]
    return fine / max(n, 1), lineage / max(n, 1), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model (default: the offline 'markers' model)")
    parser.add_argument("--out", default="cellscribe_pbmc68k", help="output folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import scanpy as sc

    import cellscribe as cs

    out = Path(args.out)
    out.mkdir(exist_ok=True)
    adata = sc.datasets.pbmc68k_reduced()
    t0 = time.perf_counter()
    cs.tl.annotate(adata, model=args.model, tissue="blood", sidecar=out / "raw_outputs.jsonl", progress=False)
    seconds = time.perf_counter() - t0

    summary = adata.uns["cellscribe"]["summary"]
    print(f"annotated {adata.n_obs} cells in {seconds:.1f} s with model "
          f"{adata.uns['cellscribe']['params']['model']}: {summary['n_ok']} ok, {summary['n_unresolved']} unresolved")
    print("\ncells per label:")
    for label, n in adata.obs["cellscribe"].value_counts().items():
        print(f"  {n:5d}  {label}")
    fine, lineage, n = agreement(adata.obs["bulk_labels"], adata.obs["cellscribe"])
    print(f"\nagreement with obs['bulk_labels'] ({n} cells whose label maps to the Cell Ontology):")
    print(f"  lineage (T/NK, B, myeloid, progenitor): {lineage:.2f}   "
          f"fine (the known type or a subtype of it): {fine:.2f}")
    print("\nknown label -> predicted (most common):")
    table = pd.crosstab(adata.obs["bulk_labels"], adata.obs["cellscribe"])
    for truth, row in table.iterrows():
        print(f"  {truth:32s} -> {row.idxmax()} ({row.max()}/{row.sum()})")

    adata.write_h5ad(out / "pbmc68k_annotated.h5ad")
    fig = sc.pl.umap(adata, color=["bulk_labels", "cellscribe", "cellscribe_confidence"], show=False,
                     return_fig=True, ncols=1)
    fig.savefig(out / "umap.png", dpi=110, bbox_inches="tight")

    # The evaluation report (the same as `cellscribe evaluate ... --truth bulk_labels -o DIR`).
    from cellscribe import pl
    from cellscribe.core.evaluation.evaluate import evaluate, write_report

    evaluation = evaluate(adata, "bulk_labels", ["cellscribe"])
    run = next(iter(evaluation.runs.values()))
    print(f"graded score (CellReasoner's scale): {run.graded_score:.2f}   accuracy: {run.accuracy:.2f}   "
          f"macro F1: {run.macro_f1:.2f}   ECE: {run.ece:.2f}")
    figures = pl.report_figures(adata, evaluation, out / "report", truth="bulk_labels")
    report = write_report(evaluation, out / "report", figures=figures)
    print(f"\nwrote {out / 'pbmc68k_annotated.h5ad'}, {out / 'umap.png'} and {out / 'raw_outputs.jsonl'}")
    print(f"evaluation report: {report['html']} (also {report['markdown']})")


if __name__ == "__main__":
    main()
