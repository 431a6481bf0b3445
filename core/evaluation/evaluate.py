"""How good is an annotation: metrics of cellscribe runs against known labels, and a report.

:func:`evaluate` compares one or several runs (``key_added`` of :func:`cellscribe.tl.annotate`, in
one or several AnnData/MuData objects) with a column of true labels and returns an
:class:`Evaluation`: per run the accuracy, macro F1, the mean graded score of
:mod:`cellscribe.core.evaluation.grading` with its grade distribution, per-label precision and recall, the
expected calibration error (ECE) of the confidences with its reliability table, and Cell-o1's
CellPuzzles metrics (:mod:`cellscribe.core.evaluation.metrics`) when the run solved puzzles and its raw outputs
are still in the run's sidecar file.

Three ways to be right, from strict to lenient, each reported:

- *accuracy* (exact): the prediction names the true cell type: the labels are equal once case,
  punctuation and plurals are normalised (:func:`~cellscribe.core.domain.ontology.normalise_label`),
  or both map to the same Cell Ontology term ("NK cells" for "NK"). A finer answer than the truth's
  vocabulary ("classical monocyte" for "CD14+ Monocyte" is exact; "CD4-positive, alpha-beta memory T
  cell" for "CD4+ T" is not) counts as wrong here.
- *subtype correct* (grade 1 of CellReasoner's scale): the prediction is the true type or a subtype of
  it. This is what the confidence claims, so the reliability diagram, the ECE and the accuracy
  against coverage judge the confidence by it.
- *graded*: the mean grade on CellReasoner's scale (1 subtype correct, 0.5 major lineage correct, 0.25
  partially correct, 0 incorrect; :mod:`cellscribe.core.evaluation.grading`).

Cells whose prediction is unresolved count as wrong in all three; cells without a true label are left
out. *Accuracy against coverage* (:func:`coverage_table`) orders the called cells by confidence and
reports, for the most confident 100 %, 90 %, ... of all cells, the three measures among them: what
share of the data a run calls at what accuracy when it abstains on its least confident cells.

:func:`write_report` writes the numbers as a Markdown and a self-contained HTML report; it embeds
figure files it is given (``cellscribe.pl.report_figures`` draws them): the core draws nothing.
"""

from __future__ import annotations

import base64
import html
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pandas as pd

from .grading import GRADE_NAMES, GRADE_SCALE, Grader, get_grader
from .metrics import PuzzleScores, puzzle_metrics
from ..domain.ontology import normalise_label

log = logging.getLogger(__name__)

__all__ = [
    "UNRESOLVED",
    "RunEvaluation",
    "Evaluation",
    "find_runs",
    "resolve_run",
    "truth_column",
    "run_frame",
    "match_labels",
    "confusion_table",
    "reliability_table",
    "expected_calibration_error",
    "COVERAGES",
    "coverage_table",
    "evaluate_labels",
    "evaluate",
    "write_report",
]

#: The column name given to unresolved predictions in confusion tables.
UNRESOLVED = "(unresolved)"


# ------------------------------------------------------------------------------------ runs in data


def _is_mudata(data: Any) -> bool:
    return hasattr(data, "mod") and hasattr(data, "obs") and isinstance(getattr(data, "mod", None), Mapping)


def find_runs(data: Any) -> list[str]:
    """Keys of the cellscribe runs stored in ``data``, in ``obs`` column order.

    A run is an ``obs`` column whose name is also a ``uns`` entry as :func:`cellscribe.tl.annotate`
    writes it (``"params"`` with the prompt strategy, and ``"summary"``). In a MuData the runs
    mirrored to ``mdata.obs`` are found under their prefixed names (``"rna:cellscribe"``).
    """
    uns = data.uns
    return [column for column in map(str, data.obs.columns) if column in uns and _is_run_entry(uns[column])]


def _is_run_entry(entry: Any) -> bool:
    # what cellscribe.tl.annotate writes; other tools (scanpy's louvain) also store "params"
    return (
        isinstance(entry, Mapping)
        and "summary" in entry
        and isinstance(entry.get("params"), Mapping)
        and "prompt" in entry["params"]
    )


def resolve_run(data: Any, key: str) -> tuple[Any, str]:
    """The object and ``obs`` column that hold run ``key``: in a MuData a run mirrored as
    ``"{mod}:{key}"`` is read from its modality (whose ``obs``, ``obsm`` and ``uns`` belong to the
    run); anything else from ``data`` itself."""
    if _is_mudata(data) and ":" in key:
        mod, inner = key.split(":", 1)
        if mod in data.mod and inner in data.mod[mod].obs.columns:
            return data.mod[mod], inner
    return data, key


def truth_column(data: Any, truth: str) -> str:
    """The ``obs`` column of ``data`` with the true labels ``truth`` (in a MuData also found as a
    modality's ``"{mod}:{truth}"``); a clear error when there is none."""
    columns = list(map(str, data.obs.columns))
    if truth in columns:
        return truth
    if _is_mudata(data):
        prefixed = [f"{mod}:{truth}" for mod in data.mod if f"{mod}:{truth}" in columns]
        if len(prefixed) == 1:
            return prefixed[0]
    raise ValueError(
        f"no obs column {truth!r} holds the true labels; pass one of the obs columns with --truth/truth= "
        f"(found: {columns[:12]}{' ...' if len(columns) > 12 else ''})"
    )


def _truth_values(data: Any, holder: Any, truth: str) -> pd.Series:
    """True labels for the cells of ``holder`` (the run's object), taken from it or from ``data``."""
    try:
        return holder.obs[truth_column(holder, truth)]
    except ValueError:
        if holder is data:
            raise
    return data.obs[truth_column(data, truth)].reindex(holder.obs.index)


def run_frame(data: Any, truth: str, key: str) -> pd.DataFrame:
    """One run's per-cell table: ``truth``, ``prediction`` (``None`` where unresolved) and
    ``confidence`` (``NaN`` where absent), indexed by cell, cells without a true label dropped."""
    holder, column = resolve_run(data, key)
    obs = holder.obs
    if column not in obs.columns:
        raise ValueError(
            f"no obs column {key!r} holds predictions; runs found in this object: {find_runs(data) or 'none'} "
            "(pass their key_added with --pred/keys=)"
        )
    frame = pd.DataFrame(
        {
            "truth": _truth_values(data, holder, truth).astype(object),
            "prediction": obs[column].astype(object),
            "confidence": pd.to_numeric(obs[f"{column}_confidence"], errors="coerce")
            if f"{column}_confidence" in obs.columns
            else np.nan,
        },
        index=obs.index,
    )
    frame["prediction"] = frame["prediction"].where(frame["prediction"].notna(), None)
    return frame[frame["truth"].notna()]


# ------------------------------------------------------------------------------------ label metrics


def match_labels(truths: Sequence[Any], predictions: Sequence[Any], grader: Grader | None = None) -> np.ndarray:
    """Predictions written in the truth's vocabulary: a prediction that names the same cell type as a
    true label takes that label's spelling; other predictions stay as they are and unresolved ones
    become ``None``.

    Same cell type: equal labels after :func:`~cellscribe.core.domain.ontology.normalise_label`, or the same
    reading by the grader (:meth:`~cellscribe.core.evaluation.grading.Grader.read`: the same Cell Ontology
    terms, a single-marker subset counted as its named parent, and the same malignancy; so "NK
    cells" names "CD56+ NK" and "B cells" names "CD19+ B"). A hedged or unreadable prediction names
    no true label.
    """
    grader = grader or get_grader()
    truths = pd.Series(list(truths), dtype=object)
    preds = pd.Series(list(predictions), dtype=object)
    by_normal: dict[str, str] = {}
    by_reading: dict[tuple[frozenset[str], bool], str] = {}
    for label in map(str, pd.unique(truths.dropna())):
        by_normal.setdefault(normalise_label(label), label)
        reading = grader.read(label)
        if reading.terms:
            by_reading.setdefault(_identity(grader, reading), label)
    mapped: dict[str, str] = {}
    for label in map(str, pd.unique(preds.dropna())):
        target = by_normal.get(normalise_label(label))
        if target is None:
            alternatives = grader.read_prediction(label)
            if len(alternatives) == 1 and alternatives[0].terms:
                target = by_reading.get(_identity(grader, alternatives[0]))
        mapped[label] = target if target is not None else label
    return np.array([mapped[str(p)] if p is not None and not _isnan(p) else None for p in preds], dtype=object)


def _identity(grader: Grader, reading: Any) -> tuple[frozenset[str], bool]:
    return frozenset(grader.named_parent(t) for t in reading.terms), reading.malignant


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def confusion_table(
    truths: Sequence[Any],
    predictions: Sequence[Any],
    *,
    normalize: bool = True,
    matched: bool = True,
    grader: Grader | None = None,
) -> pd.DataFrame:
    """Truth x prediction counts (rows sum to 1 with ``normalize=True``).

    Rows are the true labels (categorical order when ``truths`` is categorical, else sorted);
    columns the same labels first, then predicted labels that name no true label, then
    :data:`UNRESOLVED`. With ``matched=True`` predictions are first written in the truth's
    vocabulary (:func:`match_labels`).
    """
    truths_s = pd.Series(list(truths) if not isinstance(truths, pd.Series) else truths.to_numpy(), dtype=object)
    preds = match_labels(truths_s, predictions, grader) if matched else np.array(list(predictions), dtype=object)
    preds = np.array([UNRESOLVED if p is None or _isnan(p) else str(p) for p in preds], dtype=object)
    if isinstance(truths, pd.Series) and isinstance(truths.dtype, pd.CategoricalDtype):
        rows = [str(c) for c in truths.cat.categories if (truths == c).any()]
    else:
        rows = sorted({str(t) for t in truths_s.dropna()})
    extra = sorted({p for p in preds if p not in rows and p != UNRESOLVED})
    columns = rows + extra + ([UNRESOLVED] if (preds == UNRESOLVED).any() else [])
    keep = truths_s.notna().to_numpy()
    t_codes = pd.Categorical(truths_s[keep].astype(str), categories=rows).codes
    p_codes = pd.Categorical(preds[keep], categories=columns).codes
    counts = np.zeros((len(rows), len(columns)), dtype=float)
    np.add.at(counts, (t_codes, p_codes), 1)
    if normalize:
        totals = counts.sum(axis=1, keepdims=True)
        counts = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    return pd.DataFrame(counts, index=pd.Index(rows, name="truth"), columns=pd.Index(columns, name="prediction"))


def _per_label(truths: np.ndarray, matched: np.ndarray) -> tuple[pd.DataFrame, float]:
    labels = sorted({str(t) for t in truths})
    t = truths.astype(str)
    p = np.array(["" if x is None else str(x) for x in matched], dtype=object)
    rows = []
    for label in labels:
        is_t, is_p = t == label, p == label
        tp = int((is_t & is_p).sum())
        support, n_pred = int(is_t.sum()), int(is_p.sum())
        precision = tp / n_pred if n_pred else float("nan")
        recall = tp / support if support else float("nan")
        f1 = 2 * tp / (support + n_pred) if (support + n_pred) else 0.0
        rows.append((label, support, n_pred, precision, recall, f1))
    table = pd.DataFrame(rows, columns=["label", "support", "n_predicted", "precision", "recall", "f1"]).set_index(
        "label"
    )
    return table, float(table["f1"].mean()) if len(table) else float("nan")


def reliability_table(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> pd.DataFrame:
    """Calibration in ``n_bins`` equal-width confidence bins over [0, 1]: per bin its edges, the
    number of cells, their mean confidence and their accuracy (cells without a confidence left out)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    conf = np.asarray(confidence, dtype=float)
    ok = np.asarray(correct, dtype=bool)
    keep = np.isfinite(conf)
    conf, ok = np.clip(conf[keep], 0.0, 1.0), ok[keep]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.minimum(np.searchsorted(edges, conf, side="right") - 1, n_bins - 1)
    n = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=conf, minlength=n_bins)
    ok_sum = np.bincount(which, weights=ok.astype(float), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.DataFrame(
            {
                "lower": edges[:-1],
                "upper": edges[1:],
                "n": n,
                "confidence": np.where(n > 0, conf_sum / np.maximum(n, 1), np.nan),
                "accuracy": np.where(n > 0, ok_sum / np.maximum(n, 1), np.nan),
            }
        )


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> float:
    """ECE: the cell-weighted mean gap between confidence and accuracy over equal-width bins
    (``NaN`` when no cell has a confidence)."""
    table = reliability_table(confidence, correct, n_bins)
    total = table["n"].sum()
    if total == 0:
        return float("nan")
    filled = table[table["n"] > 0]
    return float((filled["n"] * (filled["confidence"] - filled["accuracy"]).abs()).sum() / total)


#: Shares of all cells, most confident first, at which :func:`coverage_table` reports accuracy.
COVERAGES: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


def coverage_table(
    confidence: Sequence[float], correct: Sequence[bool], grades: Sequence[float],
    called: Sequence[bool] | None = None, coverages: Sequence[float] = COVERAGES,
) -> pd.DataFrame:
    """Accuracy against coverage: the called cells (``called``, default all; a cell without a
    confidence is never called) ordered by confidence, most confident first (ties in input order), and
    for each coverage (a share of *all* cells) the most confident ones: how many, the lowest confidence
    among them, and their accuracy (``correct``), share subtype correct (grade 1) and mean grade.
    Coverages beyond the share called get ``NaN``.
    """
    conf = np.asarray(confidence, dtype=float)
    grades = np.nan_to_num(np.asarray(grades, dtype=float), nan=0.0)
    ok = np.asarray(correct, dtype=bool)
    calls = np.isfinite(conf) & (np.ones(len(conf), dtype=bool) if called is None else np.asarray(called, dtype=bool))
    order = np.flatnonzero(calls)[np.argsort(-conf[calls], kind="stable")]
    rows = []
    for c in coverages:
        k = max(1, int(round(c * len(conf)))) if len(conf) else 0
        if k == 0 or k > len(order):
            rows.append((c, k, np.nan, np.nan, np.nan, np.nan))
            continue
        top = order[:k]
        rows.append((c, k, float(conf[top].min()), float(ok[top].mean()),
                     float(np.isclose(grades[top], 1.0).mean()), float(grades[top].mean())))
    return pd.DataFrame(rows, columns=["coverage", "n", "min_confidence", "accuracy", "subtype_correct",
                                       "graded"]).set_index("coverage")


# ------------------------------------------------------------------------------------ results


@attrs.frozen
class RunEvaluation:
    """Metrics of one run against the true labels.

    ``grades`` and ``correct`` are per evaluated cell, in ``cells`` order; ``grade_counts`` maps each
    grade of :data:`~cellscribe.core.evaluation.grading.GRADE_SCALE` to its number of cells; ``per_label`` has
    one row per true label (support, n_predicted, precision, recall, f1); ``reliability`` the
    calibration bins (empty when the run has no confidences); ``coverage`` the accuracy against
    coverage (:func:`coverage_table`; empty without confidences); ``puzzle`` Cell-o1's metrics or
    ``None``. ``accuracy`` counts predictions naming exactly the true type (``correct``); ``ece``,
    ``reliability`` and ``coverage`` judge the confidence against grade 1 (the true type or a subtype of
    it; see the module docstring).
    """

    name: str
    n_cells: int
    n_resolved: int
    accuracy: float
    macro_f1: float
    graded_score: float
    grade_counts: Mapping[float, int]
    ece: float
    per_label: pd.DataFrame = attrs.field(eq=False, repr=False)
    reliability: pd.DataFrame = attrs.field(eq=False, repr=False)
    cells: pd.Index = attrs.field(eq=False, repr=False)
    grades: np.ndarray = attrs.field(eq=False, repr=False)
    correct: np.ndarray = attrs.field(eq=False, repr=False)
    puzzle: PuzzleScores | None = None
    coverage: pd.DataFrame = attrs.field(eq=False, repr=False, factory=lambda: coverage_table([], [], []))

    def summary(self) -> dict[str, Any]:
        """The headline numbers as a flat dict (grade shares as ``"share <grade name>"``)."""
        out: dict[str, Any] = {
            "run": self.name,
            "n_cells": self.n_cells,
            "resolved": self.n_resolved / self.n_cells if self.n_cells else float("nan"),
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "graded_score": self.graded_score,
            "ece": self.ece,
        }
        for c in (0.8, 0.5):  # how much better the most confident calls are
            value = self.coverage["subtype_correct"].get(c, float("nan")) if len(self.coverage) else float("nan")
            out[f"subtype correct, top {c:.0%}"] = value
        for grade in sorted(GRADE_SCALE, reverse=True):
            count = self.grade_counts.get(grade, 0)
            out[f"share {GRADE_NAMES[grade]}"] = count / self.n_cells if self.n_cells else float("nan")
        if self.puzzle is not None:
            out.update({f"puzzle {k}": v for k, v in self.puzzle.as_dict().items()})
        return out


@attrs.frozen
class Evaluation:
    """Several runs evaluated against one truth column; ``runs`` keeps their order."""

    truth: str
    runs: Mapping[str, RunEvaluation]

    def summary(self) -> pd.DataFrame:
        """One row per run with the headline numbers (see :meth:`RunEvaluation.summary`)."""
        return pd.DataFrame([run.summary() for run in self.runs.values()]).set_index("run")

    def __getitem__(self, name: str) -> RunEvaluation:
        return self.runs[name]


def evaluate_labels(
    truths: Sequence[Any],
    predictions: Sequence[Any],
    confidence: Sequence[float] | None = None,
    *,
    name: str = "run",
    cells: Sequence[Any] | None = None,
    puzzle_outputs: Sequence[str] | None = None,
    puzzle_answers: Sequence[Sequence[str]] | None = None,
    grader: Grader | None = None,
    n_bins: int = 10,
) -> RunEvaluation:
    """Metrics of predicted labels against true ones (arrays of equal length; ``None``/``NaN``
    predictions are unresolved; cells without a true label must be removed first)."""
    truths_a = np.array([str(t) for t in truths], dtype=object)
    preds = np.array([None if p is None or _isnan(p) else str(p) for p in predictions], dtype=object)
    if len(truths_a) != len(preds):
        raise ValueError(f"{len(truths_a)} true labels but {len(preds)} predictions; pass one prediction per cell")
    conf = np.full(len(preds), np.nan) if confidence is None else np.asarray(confidence, dtype=float)
    grader = grader or get_grader()
    grades = grader.grade_many(truths_a, preds)
    matched = match_labels(truths_a, preds, grader)
    correct = np.array([m is not None and m == t for m, t in zip(matched, truths_a)], dtype=bool)
    per_label, macro_f1 = _per_label(truths_a, matched)
    has_conf = bool(np.isfinite(conf).any())
    # Confidence says how likely the answer is right; "right" is CellReasoner's "subtype correct"
    # (grade 1: the true type or a subtype of it), so a model naming finer types than the truth's
    # vocabulary ("CD4-positive, alpha-beta memory T cell" for "CD4+ T") is not counted wrong.
    right = np.isclose(np.nan_to_num(grades, nan=0.0), 1.0)
    reliability = reliability_table(conf, right, n_bins) if has_conf else reliability_table([], [], n_bins)
    coverage = coverage_table(conf, correct, grades, called=[p is not None for p in preds]) if has_conf \
        else coverage_table([], [], [])
    n = len(truths_a)
    puzzle = None
    if puzzle_outputs is not None and puzzle_answers is not None:
        puzzle = puzzle_metrics(list(puzzle_outputs), [list(a) for a in puzzle_answers])
    return RunEvaluation(
        name=name,
        n_cells=n,
        n_resolved=int(sum(p is not None for p in preds)),
        accuracy=float(correct.mean()) if n else float("nan"),
        macro_f1=macro_f1,
        graded_score=float(np.nanmean(grades)) if n else float("nan"),
        grade_counts={g: int(np.isclose(grades, g).sum()) for g in GRADE_SCALE},
        ece=expected_calibration_error(conf, right, n_bins) if has_conf else float("nan"),
        per_label=per_label,
        reliability=reliability,
        cells=pd.Index(cells if cells is not None else np.arange(n)),
        grades=grades,
        correct=correct,
        puzzle=puzzle,
        coverage=coverage,
    )


def _puzzle_inputs(data: Any, key: str, truth: pd.Series) -> tuple[list[str], list[list[str]]] | None:
    """Raw outputs and gold labels of a puzzle run, from its sidecar file or, without one, the raw outputs
    kept in ``uns`` (``None`` if it is no puzzle run or neither is there)."""
    from ..run.record import raw_records

    holder, column = resolve_run(data, key)
    entry = holder.uns.get(column, data.uns.get(key, {}))
    params = entry.get("params", {}) if isinstance(entry, Mapping) else {}
    if str(params.get("prompt", "")) != "puzzle":
        return None
    records = raw_records(entry)
    if records is None:
        log.warning("run %r solved puzzles but its raw outputs are gone (sidecar %r): no CellPuzzles metrics",
                    key, str(entry.get("sidecar") or ""))
        return None
    outputs, answers = [], []
    for record in records:
        units = [str(u) for u in record.get("unit_ids", [])]
        if not units or not all(u in truth.index for u in units):
            continue
        outputs.append(str(record.get("output") or ""))
        answers.append([str(truth[u]) for u in units])
    return (outputs, answers) if outputs else None


def evaluate(
    data: Any | Mapping[str, Any],
    truth: str,
    keys: str | Sequence[str] | None = None,
    *,
    grader: Grader | None = None,
    n_bins: int = 10,
) -> Evaluation:
    """Evaluate cellscribe runs against the true labels in ``obs[truth]``.

    :param data: an annotated AnnData or MuData, or a mapping ``name -> object`` to put runs of
        several files side by side (runs are then named ``"{name}:{key}"``).
    :param truth: the ``obs`` column of true labels (in a MuData also a modality's column, found as
        ``"{mod}:{truth}"``).
    :param keys: the runs (``key_added``) to evaluate; default: every run found (:func:`find_runs`).
    :param grader: the grader for graded scores (default: the shared one).
    :param n_bins: confidence bins for the ECE and the reliability table.
    :return: an :class:`Evaluation`. ``data`` is not modified.
    """
    objects = dict(data) if isinstance(data, Mapping) else {"": data}
    if not objects:
        raise ValueError("no data to evaluate; pass an annotated AnnData/MuData or a mapping of them")
    runs: dict[str, RunEvaluation] = {}
    for label, obj in objects.items():
        wanted = [keys] if isinstance(keys, str) else list(keys) if keys is not None else find_runs(obj)
        if not wanted:
            raise ValueError(
                f"no cellscribe run found in {label or 'the data'}; annotate it first "
                "(cellscribe.tl.annotate) or pass the prediction column with --pred/keys="
            )
        for key in wanted:
            frame = run_frame(obj, truth, key)
            name = f"{label}:{key}" if label else key
            puzzle = _puzzle_inputs(obj, key, frame["truth"])
            runs[name] = evaluate_labels(
                frame["truth"].to_numpy(),
                frame["prediction"].to_numpy(),
                frame["confidence"].to_numpy(),
                name=name,
                cells=frame.index,
                puzzle_outputs=puzzle[0] if puzzle else None,
                puzzle_answers=puzzle[1] if puzzle else None,
                grader=grader,
                n_bins=n_bins,
            )
            log.info("evaluated %s: accuracy %.3f, graded %.3f", name, runs[name].accuracy, runs[name].graded_score)
    return Evaluation(truth=truth, runs=runs)


# ------------------------------------------------------------------------------------ report


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "–" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join([str(frame.index.name or "")] + [str(c) for c in frame.columns]) + " |"
    rule = "|" + "---|" * (len(frame.columns) + 1)
    rows = [
        "| " + " | ".join([str(i)] + [_fmt(v) for v in row]) + " |" for i, row in zip(frame.index, frame.to_numpy())
    ]
    return "\n".join([header, rule, *rows])


def _html_table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in [frame.index.name or "", *frame.columns])
    body = "".join(
        "<tr>" + f"<th>{html.escape(str(i))}</th>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
        for i, row in zip(frame.index, frame.to_numpy())
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


#: What the report's measures mean (see the module docstring), said at the top of every report.
_DEFINITIONS = (
    "- accuracy (exact): the prediction names the true cell type (equal labels after normalising case and "
    "punctuation, or the same Cell Ontology term); a finer type than the truth's vocabulary counts as wrong.",
    "- subtype correct: the prediction is the true type or a subtype of it (grade 1 of CellReasoner's "
    "scale). The confidence claims this; the reliability diagram, the ECE (10 bins) and the accuracy against "
    "coverage judge it by this.",
    "- graded: the mean grade on CellReasoner's scale (1 subtype correct, 0.5 major lineage correct, 0.25 "
    "partially correct, 0 incorrect; `cellscribe.core.evaluation.grading`).",
    "- Unresolved cells count as wrong in all three.",
)

_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;"
    "text-align:right}th:first-child{text-align:left}img{max-width:100%;margin:.5em 0}"
)


def write_report(
    evaluation: Evaluation,
    out_dir: str | Path,
    *,
    figures: Mapping[str, str | Path] | None = None,
    title: str = "cellscribe evaluation",
) -> dict[str, Path]:
    """Write ``report.md``, a self-contained ``report.html`` and the tables behind them.

    :param figures: ``caption -> image file`` to embed, in order (Markdown links them relative to
        ``out_dir``; the HTML inlines them).
    :return: paths written: ``"markdown"``, ``"html"``, ``"summary"`` (CSV),
        ``"per_label:<run>"`` (CSV per run) and ``"coverage:<run>"`` (CSV per run with confidences:
        accuracy against coverage).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    summary = evaluation.summary()
    summary.to_csv(out / "summary.csv")
    written["summary"] = out / "summary.csv"
    md = [f"# {title}", "", f"True labels: `obs[{evaluation.truth!r}]`. Runs: {len(evaluation.runs)}.", ""]
    display = summary.astype(object)
    for column in display.columns:
        if column.startswith(("n_", "puzzle n_")):  # counts, not shares
            display[column] = [str(int(v)) if isinstance(v, (int, float, np.number)) and not pd.isna(v) else "–"
                               for v in display[column]]
    md += [
        *_DEFINITIONS,
        "",
        "## Summary",
        "",
        _markdown_table(display.T.rename_axis("metric")),
        "",
    ]
    parts_html = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>True labels: <code>obs[{html.escape(repr(evaluation.truth))}]</code>. Runs: {len(evaluation.runs)}.</p>",
        *(f"<p>{html.escape(line.lstrip('- '))}</p>" for line in _DEFINITIONS),
        "<h2>Summary</h2>",
        _html_table(display.T.rename_axis("metric")),
    ]
    with_coverage = [(name, run) for name, run in evaluation.runs.items() if run.coverage["n"].notna().any()
                     and run.coverage["accuracy"].notna().any()]
    if with_coverage:
        intro = ("Accuracy against coverage: the cells a run called, most confident first; for each share of "
                 "all cells (coverage), the lowest confidence among them and how many of them are right. A "
                 "run that abstains below that confidence calls that share of the data at that accuracy.")
        md += ["## Accuracy against coverage", "", intro, ""]
        parts_html += ["<h2>Accuracy against coverage</h2>", f"<p>{html.escape(intro)}</p>"]
        for name, run in with_coverage:
            table = run.coverage.reset_index()
            table["coverage"] = [f"{c:.0%}" for c in table["coverage"]]
            table = table.set_index("coverage")
            md += [f"### {name}", "", _markdown_table(table), ""]
            parts_html += [f"<h3>{html.escape(name)}</h3>", _html_table(table)]
    if figures:
        md += ["## Figures", ""]
        parts_html.append("<h2>Figures</h2>")
        for caption, path in figures.items():
            path = Path(path)
            try:
                link = path.resolve().relative_to(out.resolve()).as_posix()
            except ValueError:
                link = path.resolve().as_posix()
            md += [f"### {caption}", "", f"![{caption}]({link})", ""]
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            parts_html += [
                f"<h3>{html.escape(caption)}</h3>",
                f'<img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">',
            ]
    for name, run in evaluation.runs.items():
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        path = out / f"per_label_{safe}.csv"
        run.per_label.to_csv(path)
        written[f"per_label:{name}"] = path
        if run.coverage["accuracy"].notna().any():
            path = out / f"coverage_{safe}.csv"
            run.coverage.to_csv(path)
            written[f"coverage:{name}"] = path
        md += [f"## Per label: {name}", "", _markdown_table(run.per_label), ""]
        parts_html += [f"<h2>Per label: {html.escape(name)}</h2>", _html_table(run.per_label)]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>{''.join(parts_html)}</body></html>"
    )
    (out / "report.html").write_text(page, encoding="utf-8")
    written["markdown"] = out / "report.md"
    written["html"] = out / "report.html"
    return written
