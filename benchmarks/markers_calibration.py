"""Accuracy and calibration of the ``markers`` model on labelled data; fits its calibration.

Usage::

    .venv/bin/python benchmarks/markers_calibration.py                 # report, shipped calibration
    .venv/bin/python benchmarks/markers_calibration.py --fit           # also fit and print parameters
    .venv/bin/python benchmarks/markers_calibration.py --fit --write   # store them (calibration_v3.json)
    .venv/bin/python benchmarks/markers_calibration.py --tasks zero-shot,puzzle
    .venv/bin/python benchmarks/markers_calibration.py --tasks none --params norm_power=0.4

Data (all real, all labelled):

- ``pbmc68k``: ``scanpy.datasets.pbmc68k_reduced()`` (700 PBMCs, Zheng 2017; labels
  ``obs["bulk_labels"]``; ``.X`` is scaled, so the RNA modality reads ``.raw``);
- ``pancreas_human`` / ``pancreas_mouse``: ``tests/data/pancreas_baron_human_mouse_350.h5ad``
  (Baron 2016; labels ``obs["Group"]``, 175 cells each);
- ``pbsmall``: ``../shared/data/atac/PBSmall_rna_unpaired_150cells.h5ad`` (ArchR's PBMC scRNA
  companion, 2,164 genes of chr5 and chr11 only; labels ``obs["BioClassification"]``), when present.

Truth labels become Cell Ontology terms with :meth:`CellOntology.lookup` (PBSmall's cluster names with
:data:`PBSMALL_TERMS`). A prediction is

- *correct* (the accuracy, and what confidence is calibrated against) when it names the same cell
  class as the truth: the first of :data:`CLASSES` that both are a subtype of (CD4 T, CD8 T, NK, B,
  plasma, monocyte, DC, ...), or, for types outside those classes, the truth's term or a subtype of
  it; Baron's ``activated_stellate`` also accepts any fibroblast or stromal call;
- *lineage-correct* when its major lineage (:meth:`CellOntology.lineage`) falls in the same group as
  the truth's: T/NK, B, myeloid (monocytes, macrophages, dendritic, mast cells, granulocytes),
  progenitor, or the lineage itself for other cells;
- *graded* as CellReasoner's table does: 1 when correct, 0.5 when only the lineage (ungrouped)
  agrees, else 0.

Calibration: the shipped confidence is ``sigmoid(slope * logit(p) + intercept)`` with ``p`` the
softmax probability, at ``temperature``, of the answer and its subtypes among the types compared
(:mod:`cellscribe.plugins.markers.calibration`; "Confidence" in the backend). ``--fit`` chooses the
temperature on a grid and fits slope and intercept by weighted logistic regression of correctness on
``logit(p)`` over the zero-shot answers of the datasets without a tissue (each dataset weighs the
same in total). Expected calibration error (ECE) uses 15 equal-width
bins over [0, 1]: sum over bins of (share of cells in the bin) x |accuracy - mean confidence| in the
bin. "raw" is the softmax probability at temperature 1 with no calibration; "shipped" is the
calibrated confidence of the package; "held out" refits on the other datasets only and scores the
left-out one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PANCREAS = ROOT / "tests" / "data" / "pancreas_baron_human_mouse_350.h5ad"
PBSMALL = SHARED / "atac" / "PBSmall_rna_unpaired_150cells.h5ad"
N_BINS = 15
TEMPERATURES = (0.03, 0.05, 0.07, 0.1, 0.14, 0.2, 0.3, 0.5)

#: ArchR's PBSmall cluster names -> Cell Ontology terms.
PBSMALL_TERMS = {
    "17_B": "CL:0000236",  # B cell
    "11_CD14.Mono.1": "CL:0000860",  # classical monocyte
    "12_CD14.Mono.2": "CL:0000860",
    "21_CD4.N2": "CL:0000895",  # naive CD4 T
    "22_CD4.M": "CL:0000897",  # memory CD4 T
    "19_CD8.N": "CL:0000900",  # naive CD8 T
    "23_CD8.EM": "CL:0000913",  # effector memory CD8 T
    "24_CD8.CM": "CL:0000907",  # central memory CD8 T
}
#: Cell classes for "correct", most specific first.
CLASSES = (
    ("regulatory T cell", "CL:0000815"),
    ("CD4 T cell", "CL:0000624"),
    ("CD8 T cell", "CL:0000625"),
    ("gamma-delta T cell", "CL:0000798"),
    ("T cell", "CL:0000084"),
    ("NK cell", "CL:0000623"),
    ("plasma cell", "CL:0000786"),
    ("B cell", "CL:0000236"),
    ("monocyte", "CL:0000576"),
    ("plasmacytoid dendritic cell", "CL:0000784"),
    ("dendritic cell", "CL:0000451"),
    ("macrophage", "CL:0000235"),
    ("hematopoietic precursor", "CL:0008001"),
    ("hematopoietic precursor", "CL:0000037"),
)
GROUPS = {
    "T cell": "T/NK",
    "NK cell": "T/NK",
    "innate lymphoid cell": "T/NK",
    "B cell": "B",
    "monocyte": "myeloid",
    "macrophage": "myeloid",
    "dendritic cell": "myeloid",
    "mast cell": "myeloid",
    "granulocyte": "myeloid",
    "HSPC": "progenitor",
}
STELLATE = "CL:0002410"


# ------------------------------------------------------------------------------------------ data


class Dataset:
    """A labelled AnnData: ``labels`` as given, ``truth`` their Cell Ontology terms, ``names`` the labels
    used as candidates (the given ones, or the terms' names where the given ones are cluster codes)."""

    def __init__(self, name, adata, labels, truth):
        from cellscribe.core.domain.ontology import get_ontology

        self.name, self.adata, self.labels, self.truth = name, adata, np.asarray(labels, dtype=object), truth
        ontology = get_ontology()
        readable = all(ontology.lookup(x) for x in set(self.labels))
        self.names = self.labels if readable else np.asarray([ontology.name(t) for t in truth], dtype=object)


def load_datasets() -> list[Dataset]:
    import anndata as ad
    import scanpy as sc

    from cellscribe.core.domain.ontology import get_ontology

    ontology = get_ontology()
    out = []
    pbmc = sc.datasets.pbmc68k_reduced()
    labels = pbmc.obs["bulk_labels"].astype(str).to_numpy()
    out.append(Dataset("pbmc68k", pbmc, labels, [ontology.lookup(x) for x in labels]))
    pancreas = ad.read_h5ad(PANCREAS)
    for batch in ("human", "mouse"):
        part = pancreas[pancreas.obs["Batch"] == batch].copy()
        labels = part.obs["Group"].astype(str).to_numpy()
        out.append(Dataset(f"pancreas_{batch}", part, labels, [ontology.lookup(x) for x in labels]))
    if PBSMALL.exists():
        small = ad.read_h5ad(PBSMALL)
        labels = small.obs["BioClassification"].astype(str).to_numpy()
        out.append(Dataset("pbsmall", small, labels, [PBSMALL_TERMS[x] for x in labels]))
    return out


# ------------------------------------------------------------------------------------------ grading


def _class(ontology, term: str) -> str:
    for name, root in CLASSES:
        if ontology.is_a(term, root):
            return name
    return term


def _group(ontology, term: str) -> str | None:
    lineage = ontology.lineage(term)
    return GROUPS.get(lineage, lineage)


def grade(predicted: str | None, truth: str | None) -> tuple[bool, bool, float]:
    """``(correct, lineage-correct, graded score)`` of a predicted term against a truth term."""
    from cellscribe.core.domain.ontology import get_ontology

    ontology = get_ontology()
    if not predicted or not truth:
        return False, False, 0.0
    if truth == STELLATE:
        fibro = ontology.lineage(predicted) == "fibroblast/stromal"
        ok = predicted == truth or fibro
        return ok, fibro, 1.0 if ok else 0.0
    ok = _class(ontology, predicted) == _class(ontology, truth) or ontology.is_a(predicted, truth)
    lineage_ok = _group(ontology, predicted) == _group(ontology, truth)
    same_lineage = ontology.lineage(predicted) == ontology.lineage(truth) and ontology.lineage(truth) is not None
    return ok, lineage_ok, 1.0 if ok else (0.5 if same_lineage else 0.0)


def grade_all(predicted_terms, truth_terms) -> dict[str, float]:
    grades = np.array([grade(p, t) for p, t in zip(predicted_terms, truth_terms)], dtype=float)
    return {"correct": grades[:, 0].mean(), "lineage": grades[:, 1].mean(), "graded": grades[:, 2].mean()}


# ------------------------------------------------------------------------------------------ calibration


def ece(confidence, correct, n_bins: int = N_BINS) -> float:
    from cellscribe.plugins.markers.calibration import expected_calibration_error

    return expected_calibration_error(confidence, correct, n_bins)


def _logit(p):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def fit_platt(p, correct, weights) -> tuple[float, float, float]:
    """``(slope, intercept, weighted log-loss)`` of ``sigmoid(slope * logit(p) + intercept)``."""
    from scipy.optimize import minimize

    x, y, w = _logit(np.asarray(p)), np.asarray(correct, float), np.asarray(weights, float)

    def loss(theta):
        z = theta[0] * x + theta[1]
        # log(1 + exp(-z)) for y = 1, log(1 + exp(z)) for y = 0, computed stably
        return float(np.sum(w * (np.logaddexp(0, -z) * y + np.logaddexp(0, z) * (1 - y))) / w.sum())

    result = minimize(loss, x0=np.array([1.0, 0.0]), method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-9})
    return float(result.x[0]), float(result.x[1]), float(result.fun)


def decisions(model, sentences, truth) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """``{temperature: (p, correct)}`` for every temperature of the grid and 1.0: the probability the
    model puts on its answer and the answer's subtypes at that temperature (see "Confidence" in the
    backend), and whether the answer is correct."""
    decided = model.decide(sentences)
    terms = _terms_of(decided["label"], model.scorer)
    correct = np.array([grade(p, t)[0] for p, t in zip(terms, truth)])
    return {t: (model.decide(sentences, temperature=t)["p"].to_numpy(), correct)
            for t in sorted({*TEMPERATURES, 1.0})}


def _platt_on(runs, key) -> tuple[float, float, float]:
    ps, ys, ws = [], [], []
    for run in runs.values():
        p, correct = run[key]
        ps.append(p)
        ys.append(correct)
        ws.append(np.full(len(correct), 1.0 / len(correct)))
    return fit_platt(np.concatenate(ps), np.concatenate(ys), np.concatenate(ws))


def fit_calibration(runs: dict[str, dict]) -> dict:
    """Choose the temperature and fit Platt scaling on ``{dataset: decisions(...)}``."""
    best = None
    for temperature in TEMPERATURES:
        slope, intercept, loss = _platt_on(runs, temperature)
        if best is None or loss < best["loss"]:
            best = {"temperature": temperature, "slope": slope, "intercept": intercept, "loss": loss}
    return best


def calibrated(p, params) -> np.ndarray:
    z = params["slope"] * _logit(p) + params["intercept"]
    return 1.0 / (1.0 + np.exp(-z))


# ------------------------------------------------------------------------------------------ tasks


def _terms_of(names, scorer) -> list[str | None]:
    rows = scorer.locate([str(n) for n in names])
    return [scorer.cl_ids[r] or None if r >= 0 else None for r in rows]


def _quiet(fn: Callable, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def zero_shot(datasets, *, model_cache) -> tuple[list[dict], dict]:
    """Zero-shot accuracy through ``cellscribe.tl.annotate`` and the scores behind it."""
    import cellscribe
    from cellscribe.core.run import plan_run
    from cellscribe.core.plugins import get_host

    rows, runs = [], {}
    backend = get_host().registry.backend_for("markers")
    for ds in datasets:
        for tissue in ([None, "pancreas"] if ds.name.startswith("pancreas") else [None]):
            adata = ds.adata.copy()
            start = time.perf_counter()
            _quiet(cellscribe.tl.annotate, adata, model="markers", tissue=tissue, sidecar=False, progress=False)
            seconds = time.perf_counter() - start
            model = model_cache.setdefault(tissue, _quiet(backend.load, "markers", tissue=tissue))
            predicted = adata.obs["cellscribe"].astype(str).to_numpy()
            terms = _terms_of(predicted, model.scorer)
            metrics = grade_all(terms, ds.truth)
            correct = np.array([grade(p, t)[0] for p, t in zip(terms, ds.truth)])
            confidence = adata.obs["cellscribe_confidence"].to_numpy(dtype=float)
            plan = _quiet(plan_run, ds.adata, model="markers")
            # The scores the run answered from: within the data's genes and the inferred tissue context.
            model.use_assay(plan.assay)
            model.survey(plan.prompts)
            sentences = [p.sentences[0] for p in plan.prompts]
            run = decisions(model, sentences, ds.truth)
            key = ds.name + (f"+{tissue}" if tissue else "")
            if tissue is None:
                runs[key] = run
            rows.append(
                {
                    "task": "zero-shot",
                    "dataset": key,
                    "cells": len(adata),
                    **{k: round(v, 3) for k, v in metrics.items()},
                    "ece_raw": round(ece(*run[1.0]), 3),
                    "ece_shipped": round(ece(confidence, correct), 3),
                    "conf_correct": round(float(confidence[correct].mean()), 3) if correct.any() else None,
                    "conf_wrong": round(float(confidence[~correct].mean()), 3) if (~correct).any() else None,
                    "seconds": round(seconds, 2),
                }
            )
    return rows, runs


def candidates_task(datasets) -> list[dict]:
    import cellscribe

    rows = []
    for ds in datasets:
        cands = sorted(set(ds.names))
        adata = ds.adata.copy()
        _quiet(cellscribe.tl.annotate, adata, model="markers", candidates=cands, sidecar=False, progress=False)
        predicted = adata.obs["cellscribe"].astype(str).to_numpy()
        accuracy = round(float(np.mean(predicted == ds.names)), 3)
        rows.append({"task": "candidates", "dataset": ds.name, "cells": len(adata), "exact label": accuracy})
    return rows


def kshot_task(datasets) -> list[dict]:
    import cellscribe

    by_name = {ds.name: ds for ds in datasets}
    rows = []
    pairs = [("pancreas_human", "pancreas_mouse", 5), ("pancreas_mouse", "pancreas_human", 5), ("pbmc68k", None, 3)]
    for query, ref, k in pairs:
        if query not in by_name:
            continue
        ds = by_name[query]
        adata = ds.adata.copy()
        if ref is None:
            adata.obs["ref_label"] = ds.labels
            kwargs = {"reference_key": "ref_label"}
        else:
            reference = by_name[ref].adata.copy()
            reference.obs["ref_label"] = by_name[ref].labels
            kwargs = {"reference": reference, "reference_key": "ref_label"}
        _quiet(cellscribe.tl.annotate, adata, model="markers", prompt="k-shot", k=k, sidecar=False, progress=False, **kwargs)
        predicted = adata.obs["cellscribe"].astype(str).to_numpy()
        rows.append(
            {
                "task": f"k-shot (k={k})",
                "dataset": f"{query} <- {ref or 'itself'}",
                "cells": len(adata),
                "exact label": round(float(np.mean(predicted == ds.labels)), 3),
            }
        )
    return rows


def puzzle_task(datasets, *, n_genes: int = 50) -> list[dict]:
    """Benchmark puzzles (one cell of each of n labels, one donor) answered by the model."""
    from cellscribe.core.evaluation.metrics import puzzle_metrics
    from cellscribe.core.run import plan_run
    from cellscribe.core.plugins import get_host
    from cellscribe.plugins.prompting.puzzle import Puzzle, benchmark_record, plan_benchmark_puzzles

    model = _quiet(get_host().registry.backend_for("markers").load, "markers")
    rows = []
    for ds, n in [(ds, n) for ds in datasets for n in sorted({min(len(set(ds.names)), k) for k in (5, 10)})]:
        if n < 3:
            continue
        plan = _quiet(plan_run, ds.adata, model="markers", sentence="top-expressed", n_genes=n_genes)
        sentences = {p.unit_ids[0]: p.sentences[0] for p in plan.prompts}
        ids = ds.adata.obs_names.astype(str).to_numpy()
        puzzles = plan_benchmark_puzzles(ds.names, np.zeros(len(ids)), n=n, seed=0)
        strategy = Puzzle()
        prompts, answers = [], []
        for i, cells in enumerate(puzzles):
            cell_sentences = [sentences[c] for c in ids[cells]]
            record = benchmark_record(f"{ds.name}-{i}", ids[cells], cell_sentences, list(ds.names[cells]))
            prompts.append(strategy.from_record(record))
            answers.append(record["answer"])
        start = time.perf_counter()
        outputs = [g.text for g in model.generate(prompts)]
        seconds = time.perf_counter() - start
        joint = puzzle_metrics(outputs, answers)
        # per-cell argmax for comparison: the same scores without the joint assignment
        argmax_right = argmax_total = 0
        for prompt, answer in zip(prompts, answers):
            scores = model.score_sentences(prompt.sentences, prompt.candidates)
            picks = scores.columns[np.argmax(scores.to_numpy(), axis=1)]
            gold = [a.strip() for a in answer.split("|")]
            argmax_right += sum(p == g for p, g in zip(picks, gold))
            argmax_total += len(gold)
        rows.append(
            {
                "task": f"puzzle (n={n}, {n_genes} genes)",
                "dataset": ds.name,
                "puzzles": joint.n_puzzles,
                "partial accuracy": round(joint.partial_accuracy, 3),
                "exact match": round(joint.exact_match, 3),
                "legitimate": round(joint.legitimate_ratio, 3),
                "uniqueness": round(joint.uniqueness, 3),
                "per-cell argmax accuracy": round(argmax_right / max(argmax_total, 1), 3),
                "seconds": round(seconds, 3),
            }
        )
    return rows


def compare_params(datasets, settings: list[str]) -> list[dict]:
    """Zero-shot accuracy with other scoring constants (``"norm_power=0.3,rank_scale=5"``; the
    defaults first), from the same sentences and the same choice rule as the backend's."""
    import attrs

    from cellscribe.core.run import plan_run
    from cellscribe.plugins.markers.backend import MarkersModel
    from cellscribe.plugins.markers.knowledge import load_knowledge
    from cellscribe.plugins.markers.scoring import MarkerScorer, ScoringParams

    sentences, assays = {}, {}
    for ds in datasets:
        plan = _quiet(plan_run, ds.adata, model="markers")
        sentences[ds.name] = [p.sentences[0] for p in plan.prompts]
        assays[ds.name] = plan.assay
    knowledge = load_knowledge()
    rows = []
    for setting in ["", *settings]:
        changes = {}
        for item in filter(None, setting.split(",")):
            key, value = item.split("=")
            field = attrs.fields_dict(ScoringParams)[key.strip()]
            changes[key.strip()] = (value.strip().lower() in ("1", "true")) if field.type in (bool, "bool") else float(value)
        model = MarkersModel(MarkerScorer(knowledge, ScoringParams(**changes)))
        row = {"params": setting or "(defaults)"}
        for ds in datasets:
            model.use_assay(assays[ds.name])
            scores = model.score_sentences(sentences[ds.name])
            terms = _terms_of(scores.columns[np.argmax(scores.to_numpy(), axis=1)], model.scorer)
            metrics = grade_all(terms, ds.truth)
            row[f"{ds.name} correct"] = round(metrics["correct"], 3)
            row[f"{ds.name} lineage"] = round(metrics["lineage"], 3)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fit", action="store_true", help="fit the calibration and print it")
    parser.add_argument("--write", action="store_true", help="with --fit: write it to the package")
    parser.add_argument("--tasks", default="zero-shot,candidates,k-shot,puzzle")
    parser.add_argument(
        "--params",
        action="append",
        default=[],
        help="also compare zero-shot accuracy with these scoring constants, e.g. "
        "'norm_power=0.3,rank_scale=5' (repeatable; fields of ScoringParams)",
    )
    args = parser.parse_args(argv)
    tasks = set(args.tasks.split(","))
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 30)

    from cellscribe.plugins.markers.calibration import CALIBRATION_FILE, load_calibration
    from cellscribe.plugins.markers.scoring import SCORING_VERSION

    datasets = load_datasets()
    print("datasets:", ", ".join(f"{d.name} ({len(d.labels)} cells)" for d in datasets))
    model_cache: dict = {}
    rows, runs = zero_shot(datasets, model_cache=model_cache)
    if "zero-shot" in tasks or args.fit:
        print("\nzero-shot (no candidates), through cellscribe.tl.annotate:")
        print(pd.DataFrame(rows).to_string(index=False))

    if args.fit:
        fitted = fit_calibration(runs)
        print(f"\nfitted: temperature {fitted['temperature']}, slope {fitted['slope']:.4f}, intercept {fitted['intercept']:.4f}")
        report = []
        for name, run in runs.items():
            others = {k: v for k, v in runs.items() if k != name}
            held = fit_calibration(others)
            p, correct = run[fitted["temperature"]]
            report.append(
                {
                    "dataset": name,
                    "accuracy": round(float(correct.mean()), 3),
                    "ece_raw": round(ece(*run[1.0]), 3),
                    "ece_temperature_only": round(ece(p, correct), 3),
                    "ece_calibrated": round(ece(calibrated(p, fitted), correct), 3),
                    "ece_held_out": round(ece(calibrated(run[held["temperature"]][0], held), run[held["temperature"]][1]), 3),
                }
            )
        frame = pd.DataFrame(report)
        print(frame.to_string(index=False))
        if args.write:
            path = ROOT / "plugins" / "markers" / "data" / CALIBRATION_FILE
            payload = {
                "version": CALIBRATION_FILE.rsplit(".", 1)[0],
                "scoring_version": SCORING_VERSION,
                "temperature": fitted["temperature"],
                "slope": round(fitted["slope"], 6),
                "intercept": round(fitted["intercept"], 6),
                "formula": "confidence = sigmoid(slope * logit(p) + intercept), p = sum of softmax(scores / temperature) over the answer and its subtypes",
                "fitted_with": "benchmarks/markers_calibration.py --fit --write",
                "fitted_on": {name: int(len(run[1.0][1])) for name, run in runs.items()},
                "correct_means": "same cell class as the truth (see benchmarks/markers_calibration.py)",
                "ece_bins": N_BINS,
                "ece": {r["dataset"]: {k: v for k, v in r.items() if k != "dataset"} for r in report},
                "date": dt.date.today().isoformat(),
            }
            path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
            load_calibration.cache_clear()
            print(f"wrote {path}")

    other: list[dict] = []
    if "candidates" in tasks:
        other += candidates_task(datasets)
    if "k-shot" in tasks:
        other += kshot_task(datasets)
    if other:
        print("\ncandidates and k-shot (exact label = the reference's own label string):")
        print(pd.DataFrame(other).to_string(index=False))
    if args.params:
        print("\nzero-shot accuracy with other scoring constants (no tissue):")
        print(pd.DataFrame(compare_params(datasets, args.params)).to_string(index=False))
    if "puzzle" in tasks:
        print("\nCellPuzzles benchmark puzzles (joint assignment vs per-cell argmax):")
        print(pd.DataFrame(puzzle_task(datasets)).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
