"""The ``markers`` model on labelled PBMC and pancreas data: per-population calls, foreign labels,
accuracy against coverage, and cluster mode (representative cells vs cluster-marker sentences).

Usage::

    .venv/bin/python benchmarks/markers_biology.py                  # everything
    .venv/bin/python benchmarks/markers_biology.py --parts cells    # per-cell runs only
    .venv/bin/python benchmarks/markers_biology.py --parts clusters

Data (all real, all labelled; see ``benchmarks/markers_calibration.py``):

- ``pbmc68k``: ``scanpy.datasets.pbmc68k_reduced()`` (700 PBMCs, 765 genes; ``obs["bulk_labels"]``
  were assigned by correlation with sorted bulk profiles, not by sorting: read its monocyte/DC split as
  a weak reference), ``obs["louvain"]`` its own clusters;
- ``pancreas_human``: ``tests/data/pancreas_baron_human_mouse_350.h5ad``, ``Batch == "human"``
  (Baron 2016, 175 cells, ``obs["Group"]``);
- ``pbsmall_rna``: ArchR's unpaired PBMC scRNA companion (150 cells, chr5/chr11 genes only);
- ``multiome_rna``: the 10x PBMC multiome subset's RNA (1,000 cells, 45 genes, no labels).

Per-cell runs go through ``cellscribe.tl.annotate`` with the default settings, with and without a
tissue. Printed per run: correct / lineage / graded (the rules of ``markers_calibration.grade``), the
share of cells unresolved, the share given a *non-blood* label (a term that is not a hematopoietic
cell, CL:0000988) on PBMC data, and for pbmc68k the calls per ``bulk_labels`` population and the share
of its "CD14+ Monocyte" cells called a monocyte (the term or a subtype). Accuracy against coverage:
cells ordered by confidence, the accuracy (correct, graded) of the most confident 100/90/80/70/50 %.

Cluster mode: ``groupby=`` runs with the default representative cells (5 per group)
and with ``sentence="cluster-markers"`` (one sentence per group: its top differentially expressed
genes against the rest, ``scanpy.tl.rank_genes_groups``, over the run's ``groupby`` groups), scored
per cell after the group's call (the group's label from its representatives' pooled label
probabilities).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from markers_calibration import PBSMALL, PBSMALL_TERMS, PANCREAS, grade  # noqa: E402

MULTIOME = ROOT / "tests" / "data" / "multiome" / "pbmc10k_multiome_1000cells_subset.h5mu"
HEMATOPOIETIC = "CL:0000988"
MONOCYTE = "CL:0000576"
COVERAGES = (1.0, 0.9, 0.8, 0.7, 0.5)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def datasets() -> dict[str, tuple]:
    """``{name: (adata, truth terms or None, labels or None)}``."""
    import anndata as ad
    import scanpy as sc

    from cellscribe.core.domain.ontology import get_ontology

    ontology = get_ontology()
    out = {}
    pbmc = sc.datasets.pbmc68k_reduced()
    labels = pbmc.obs["bulk_labels"].astype(str).to_numpy()
    out["pbmc68k"] = (pbmc, [ontology.lookup(x) for x in labels], labels)
    pancreas = ad.read_h5ad(PANCREAS)
    human = pancreas[pancreas.obs["Batch"] == "human"].copy()
    labels = human.obs["Group"].astype(str).to_numpy()
    out["pancreas_human"] = (human, [ontology.lookup(x) for x in labels], labels)
    if PBSMALL.exists():
        small = ad.read_h5ad(PBSMALL)
        labels = small.obs["BioClassification"].astype(str).to_numpy()
        out["pbsmall_rna"] = (small, [PBSMALL_TERMS[x] for x in labels], labels)
    if MULTIOME.exists():
        import mudata

        mudata.set_options(pull_on_update=False)
        rna = mudata.read_h5mu(MULTIOME).mod["rna"].copy()
        out["multiome_rna"] = (rna, None, None)
    return out


def terms_of(labels) -> list[str | None]:
    from cellscribe.core.domain.ontology import get_ontology

    ontology = get_ontology()
    cache: dict = {}
    out = []
    for label in labels:
        if not isinstance(label, str) or label in ("nan", ""):
            out.append(None)
            continue
        if label not in cache:
            cache[label] = ontology.lookup(label)
        out.append(cache[label])
    return out


def metrics(terms, truth) -> dict[str, float]:
    grades = np.array([grade(p, t) for p, t in zip(terms, truth)], dtype=float)
    return {"correct": grades[:, 0].mean(), "lineage": grades[:, 1].mean(), "graded": grades[:, 2].mean()}


def foreign_share(terms) -> float:
    from cellscribe.core.domain.ontology import get_ontology

    ontology = get_ontology()
    called = [t for t in terms if t]
    return float(np.mean([not ontology.is_a(t, HEMATOPOIETIC) for t in called])) if called else 0.0


def coverage_curve(confidence, terms, truth) -> dict[str, str]:
    grades = np.array([grade(p, t) for p, t in zip(terms, truth)], dtype=float)
    conf = np.nan_to_num(np.asarray(confidence, dtype=float), nan=-1.0)
    order = np.argsort(-conf, kind="stable")
    out = {}
    for c in COVERAGES:
        top = order[: max(1, int(round(c * len(order))))]
        out[f"{int(c * 100)}%"] = f"{grades[top, 0].mean():.3f}/{grades[top, 2].mean():.3f}"
    return out


def run_cells(data) -> None:
    import cellscribe

    rows, curves = [], []
    for name, (adata, truth, labels) in data.items():
        tissues = {"pbmc68k": [None, "blood"], "pancreas_human": [None, "pancreas"]}.get(name, [None])
        for tissue in tissues:
            a = adata.copy()
            start = time.perf_counter()
            _quiet(cellscribe.tl.annotate, a, tissue=tissue, sidecar=False, progress=False)
            seconds = time.perf_counter() - start
            predicted = a.obs["cellscribe"].astype(object).to_numpy()
            terms = terms_of(predicted)
            row = {"data": name + (f" (tissue={tissue})" if tissue else ""), "cells": a.n_obs,
                   "unresolved": round(float((a.obs["cellscribe_status"] != "ok").mean()), 3)}
            if name != "pancreas_human":
                row["non-blood"] = round(foreign_share(terms), 4)
            if truth is not None:
                row.update({k: round(v, 3) for k, v in metrics(terms, truth).items()})
                curves.append({"data": row["data"], **coverage_curve(a.obs["cellscribe_confidence"], terms, truth)})
            context = a.uns["cellscribe"].get("observability", {}).get("context", {})
            row["context"] = ",".join(context.get("organs", [])) or context.get("tissue", "")
            row["seconds"] = round(seconds, 2)
            rows.append(row)
            if name == "pbmc68k":
                _pbmc_detail(labels, predicted, terms, tissue)
    print("\nper-cell runs (default settings):")
    print(pd.DataFrame(rows).to_string(index=False))
    print("\naccuracy against coverage (most confident share of cells: correct/graded):")
    print(pd.DataFrame(curves).to_string(index=False))


def _pbmc_detail(labels, predicted, terms, tissue) -> None:
    from cellscribe.core.domain.ontology import get_ontology

    ontology = get_ontology()
    mono = labels == "CD14+ Monocyte"
    rate = np.mean([bool(t) and ontology.is_a(t, MONOCYTE) for t, m in zip(terms, mono) if m])
    print(f"\npbmc68k (tissue={tissue}): 'CD14+ Monocyte' cells called a monocyte: {rate:.3f}")
    frame = pd.DataFrame({"truth": labels, "call": pd.Series(predicted).fillna("(unresolved)").astype(str)})
    for label, group in frame.groupby("truth"):
        counts = group["call"].value_counts()
        calls = ", ".join(f"{k} {v}" for k, v in counts.head(4).items())
        print(f"  {label:30s} {len(group):4d}: {calls}")


def run_clusters(data) -> None:
    import cellscribe

    runs = [("pbmc68k", "bulk_labels"), ("pbmc68k", "louvain"), ("pancreas_human", "Group"),
            ("pbsmall_rna", "BioClassification")]
    rows = []
    for name, key in runs:
        if name not in data:
            continue
        adata, truth, _ = data[name]
        for sentence in ("default", "cluster-markers"):
            a = adata.copy()
            # cluster-markers ranks genes per group: the run gives it its groupby column.
            kwargs = {} if sentence == "default" else {"sentence": "cluster-markers"}
            start = time.perf_counter()
            _quiet(cellscribe.tl.annotate, a, groupby=key, sidecar=False, progress=False, **kwargs)
            seconds = time.perf_counter() - start
            terms = terms_of(a.obs["cellscribe"].astype(object).to_numpy())
            clusters = a.uns["cellscribe"]["clusters"]  # one row per group
            rows.append({
                "data": name, "groupby": key, "sentences": sentence, "groups": len(clusters),
                **{k: round(v, 3) for k, v in metrics(terms, truth).items()},
                "seconds": round(seconds, 2),
            })
            calls = dict(sorted(clusters["label"].items()))
            print(f"  {name} by {key}, {sentence}: " + "; ".join(f"{g} -> {c}" for g, c in calls.items()))
    print("\ncluster mode (per cell, after the group's call):")
    print(pd.DataFrame(rows).to_string(index=False))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="cells,clusters")
    args = parser.parse_args(argv)
    pd.set_option("display.width", 220)
    pd.set_option("display.max_columns", 30)
    data = datasets()
    parts = set(args.parts.split(","))
    if "cells" in parts:
        run_cells(data)
    if "clusters" in parts:
        run_clusters(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
