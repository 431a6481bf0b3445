"""Annotate scanpy's bundled PBMC data end to end with cellscribe's offline default model.

    python examples/pbmc68k_annotate.py [--model markers] [--out cellscribe_pbmc68k]

Reads ``scanpy.datasets.pbmc68k_reduced()`` (700 PBMCs, shipped inside scanpy; its X is scaled, so the
RNA modality falls back to the log-normalised ``.raw`` and says so), annotates every cell (they are
blood cells: ``tissue="blood"``), writes the annotated AnnData, the raw-output sidecar and a UMAP figure
to ``--out``, and prints counts per label and how the calls compare with ``obs["bulk_labels"]``.

Those labels are not sorted populations: Zheng et al. 2017 gave each cell the label of the FACS-sorted
bulk profile it correlated with best, so they are coarse (10 population names such as "CD19+ B" or
"Dendritic") and in places wrong (240 "Dendritic" cells, many of them monocytes by their LYZ, S100A8/9
and CD14). Read the figures accordingly; the script prints what each one means:

- lineage: the call is in the label's lineage (T/NK, B, myeloid, progenitor);
- graded: CellReasoner's scale, 1 subtype correct, 0.5 major lineage correct, 0.25 partially, 0 wrong;
- subtype correct: the call is the label's cell type or a subtype of it (what the confidence claims);
- exact: the call names the label's own population. It is low by construction: the model names Cell
  Ontology types finer than these populations ("naive B cell" for "CD19+ B" is subtype correct, not
  exact), and macro F1, the exact F1 averaged over the 10 populations, is low for the same reason.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
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
    whose lineage group matches (lineage). Only cells whose truth maps to a term count. (The fine share
    reads each label as its closest term: "CD14+ Monocyte" as *CD14-positive monocyte*, which a
    non-classical monocyte is not; the evaluation's graded scale reads them as the experts did.)

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
    print(f"\nagreement with obs['bulk_labels'] ({n} cells; labels assigned by correlation with sorted bulk "
          "profiles, not sorted cells):")
    print(f"  lineage (T/NK, B, myeloid, progenitor): {lineage:.2f}")
    print("\nbulk label -> predicted (most common):")
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
    top = run.coverage["subtype_correct"]
    print("\nthe same calls by each measure (high to low; see this script's docstring):")
    for value, name, meaning in (
        (lineage, "lineage", "in the label's lineage: T/NK, B, myeloid, progenitor"),
        (run.graded_score, "graded", "CellReasoner's scale: 1 subtype correct, 0.5 major lineage, 0.25 partial"),
        (float(np.isclose(run.grades, 1.0).mean()), "subtype correct", "the label's type or a subtype of it: "
         "what the confidence claims"),
        (top.get(0.5, float("nan")), "  most confident 50%", "subtype correct among the half of the cells "
         "called with the highest confidence"),
        (run.accuracy, "exact", "names the label's own population: low by construction, the model names "
         "finer Cell Ontology types"),
        (run.macro_f1, "macro F1", "exact F1 averaged over the 10 populations: low for the same reason"),
    ):
        print(f"  {name:20s} {value:.2f}  {meaning}")
    print(f"  {'ECE':20s} {run.ece:.2f}  expected calibration error of the confidence (judged by subtype correct)")
    figures = pl.report_figures(adata, evaluation, out / "report", truth="bulk_labels")
    report = write_report(evaluation, out / "report", figures=figures)
    print(f"\nwrote {out / 'pbmc68k_annotated.h5ad'}, {out / 'umap.png'} and {out / 'raw_outputs.jsonl'}")
    print(f"evaluation report: {report['html']} (also {report['markdown']})")


if __name__ == "__main__":
    main()
