"""The tissue a run answers within: stated in obs (CELLxGENE schema), given, inferred, or mixed per cell.

Usage::

    .venv/bin/python benchmarks/tissue_context.py

Default ``markers`` model, default settings, real labelled data (see ``benchmarks/markers_biology.py``):
pbmc68k_reduced (700 PBMCs), the 10x multiome PBMC subset's RNA (1,000 cells, 45 genes), ArchR's PBSmall
scRNA companion (150 PBMCs), Baron 2016 pancreas, human cells (175).

Printed:

- PBMC runs without a tissue (per cell, ``groupby=`` clusters with representative cells and with
  ``cluster-markers`` sentences, random subsets of 1-20 cells, 30 draws each), and as CELLxGENE-style
  files (``obs["tissue"] = "blood"``, ``obs["tissue_ontology_term_id"] = "UBERON:0000178"``): the share
  of called cells given a *non-blood* label (a Cell Ontology term that is not a hematopoietic cell,
  CL:0000988), the cells with an organ note, and the context the run recorded;
- pancreas: correct (Baron's labels, the rules of ``markers_calibration.grade``) with
  ``tissue="pancreas"``, without, and as CELLxGENE-style files (the label ``islet of Langerhans``; the
  UBERON id alone);
- a mixed file: the pbmc68k cells and the pancreas cells in one AnnData (log-normalised; each cell
  keeps the genes its own data set measured, the others are 0), without a tissue and with ``obs["tissue"]`` per cell: non-blood share among the PBMCs,
  correct among the pancreas cells.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from markers_biology import MULTIOME, datasets, foreign_share, metrics, terms_of  # noqa: E402


def _annotate(adata, **kwargs):
    import cellscribe

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        cellscribe.tl.annotate(adata, sidecar=False, progress=False, **kwargs)
    return time.perf_counter() - start


def _row(name, adata, truth=None, seconds=None) -> dict:
    labels = adata.obs["cellscribe"].astype(object).to_numpy()
    terms = terms_of(labels)
    entry = adata.uns["cellscribe"]
    context = dict(entry.get("observability", {}).get("context", {}))
    stated = dict(entry["params"].get("tissue_stated", {}))
    row = {"run": name, "cells": adata.n_obs, "called": int(sum(t is not None for t in terms)),
           "non-blood": round(foreign_share(terms), 4),
           "organ notes": int(adata.obs["cellscribe_note"].astype(str).str.contains("cell type of the").sum()),
           "tissue from": stated.get("source", "(not recorded)"),
           "context": ",".join(map(str, context.get("organs", []))) if context.get("inferred")
           else str(context.get("tissue", ""))}
    if truth is not None:
        row["correct"] = round(metrics(terms, truth)["correct"], 3)
    if seconds is not None:
        row["seconds"] = round(seconds, 2)
    return row


def pbmc_runs(data) -> list[dict]:
    import scanpy as sc

    rows = []
    runs = {"pbmc68k": "louvain", "pbsmall_rna": "BioClassification", "multiome_rna": "leiden"}
    for name, key in runs.items():
        if name not in data:
            continue
        adata = data[name][0]
        if key == "leiden" and key not in adata.obs:
            clustered = adata.copy()
            sc.pp.normalize_total(clustered)
            sc.pp.log1p(clustered)
            sc.pp.pca(clustered, n_comps=20)
            sc.pp.neighbors(clustered, random_state=0)
            sc.tl.leiden(clustered, key_added="leiden", random_state=0, flavor="igraph", n_iterations=2)
            adata = adata.copy()
            adata.obs["leiden"] = clustered.obs["leiden"].to_numpy()
        a = adata.copy()
        rows.append(_row(f"{name}: per cell", a, seconds=_annotate(a)))
        a = adata.copy()
        rows.append(_row(f"{name}: groupby {key}", a, seconds=_annotate(a, groupby=key)))
        a = adata.copy()
        rows.append(_row(f"{name}: groupby {key}, cluster-markers", a,
                         seconds=_annotate(a, groupby=key, sentence="cluster-markers")))
        a = adata.copy()
        a.obs["tissue"] = "blood"
        a.obs["tissue_ontology_term_id"] = "UBERON:0000178"
        rows.append(_row(f"{name}: CELLxGENE-style obs tissue", a, seconds=_annotate(a)))
        rng = np.random.default_rng(0)
        for n in (1, 3, 5, 9, 20):
            called = bad = notes = 0
            for _ in range(30):
                a = adata[np.sort(rng.choice(adata.n_obs, n, replace=False))].copy()
                _annotate(a)
                r = _row("", a)
                called += r["called"]
                bad += round(r["non-blood"] * r["called"])
                notes += r["organ notes"]
            rows.append({"run": f"{name}: 30 random subsets of {n} cells", "cells": 30 * n, "called": called,
                         "non-blood": round(bad / max(called, 1), 4), "organ notes": notes,
                         "tissue from": "none", "context": "(per subset)"})
    return rows


def pancreas_runs(data) -> list[dict]:
    human, truth, _ = data["pancreas_human"]
    rows = []
    for name, tissue, obs in (("tissue='pancreas'", "pancreas", {}), ("no tissue", None, {}),
                              ("CELLxGENE-style obs tissue (label)", None, {"tissue": "islet of Langerhans"}),
                              ("obs tissue_ontology_term_id only", None, {"tissue_ontology_term_id": "UBERON:0000006"})):
        a = human.copy()
        for column, value in obs.items():
            a.obs[column] = value
        seconds = _annotate(a, tissue=tissue)
        row = _row(f"pancreas human: {name}", a, truth, seconds)
        row.pop("non-blood")
        rows.append(row)
    return rows


def mixed_runs(data) -> list[dict]:
    import anndata as ad
    import scanpy as sc

    pbmc = data["pbmc68k"][0]
    human, truth, _ = data["pancreas_human"]
    blood = ad.AnnData(pbmc.raw.X.copy(), obs=pd.DataFrame(index=pbmc.obs_names), var=pd.DataFrame(index=pbmc.raw.var_names))
    islets = human.copy()
    sc.pp.normalize_total(islets, target_sum=1e4)
    sc.pp.log1p(islets)
    mixed = ad.concat({"blood": blood, "pancreas": islets}, join="outer", fill_value=0, label="origin",
                      index_unique="-")
    is_blood = (mixed.obs["origin"] == "blood").to_numpy()
    rows = []
    for name, column in (("no tissue", None), ("obs tissue per cell", "origin")):
        a = mixed.copy()
        if column:
            a.obs["tissue"] = a.obs[column].astype(str)
        seconds = _annotate(a)
        terms = terms_of(a.obs["cellscribe"].astype(object).to_numpy())
        context = dict(a.uns["cellscribe"].get("observability", {}).get("context", {}))
        rows.append({
            "run": f"mixed pbmc68k + pancreas: {name}", "cells": a.n_obs,
            "non-blood among PBMCs": round(foreign_share([t for t, b in zip(terms, is_blood) if b]), 4),
            "correct among pancreas cells": round(metrics([t for t, b in zip(terms, is_blood) if not b], truth)["correct"], 3),
            "context": ",".join(map(str, context.get("organs", []))) if context.get("inferred")
            else str(dict(context.get("stated", {})) or context.get("tissue", "")),
            "seconds": round(seconds, 2),
        })
    return rows


def main() -> int:
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 20)
    pd.set_option("display.max_colwidth", 60)
    data = datasets()
    if not MULTIOME.exists():
        print("(no multiome data)")
    print("PBMC runs without --tissue:")
    print(pd.DataFrame(pbmc_runs(data)).to_string(index=False))
    print("\npancreas:")
    print(pd.DataFrame(pancreas_runs(data)).to_string(index=False))
    print("\nmixed file:")
    print(pd.DataFrame(mixed_runs(data)).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
