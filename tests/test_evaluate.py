"""Evaluation of annotated data: metrics by hand, runs found in AnnData and MuData, puzzle metrics from
the sidecar, the report, and the ``grade`` / ``evaluate`` commands."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cellscribe.core.evaluation.evaluate import (
    UNRESOLVED,
    confusion_table,
    evaluate,
    evaluate_labels,
    coverage_table,
    expected_calibration_error,
    find_runs,
    match_labels,
    reliability_table,
    write_report,
)
from cellscribe.core.evaluation.metrics import puzzle_metrics

from _eval_backend import MarkerPlugin
from _rule_backend import RulePlugin

PANCREAS_TYPES = ["alpha", "beta", "delta", "activated_stellate", "macrophage"]


# ------------------------------------------------------------------------------------ metrics by hand


def test_match_labels_writes_predictions_in_the_truth_vocabulary():
    truths = ["CD56+ NK", "CD19+ B", "CD14+ Monocyte", "Dendritic"]
    preds = ["NK cells", "B cells", "cd14+ monocytes", "T cells", None, "NK cells or T cells"]
    assert match_labels(truths, preds).tolist() == [
        "CD56+ NK", "CD19+ B", "CD14+ Monocyte", "T cells", None, "NK cells or T cells"
    ]


def test_evaluate_labels_by_hand():
    truths = ["T cell", "T cell", "B cell", "B cell", "NK", "NK"]
    preds = ["T cells", "B cell", "B cells", None, "NK cell", "CD8 T cells"]
    conf = [0.9, 0.8, 0.7, np.nan, 0.95, 0.3]
    run = evaluate_labels(truths, preds, conf, name="hand")
    correct = [True, False, True, False, True, False]
    assert run.correct.tolist() == correct
    assert run.accuracy == pytest.approx(3 / 6)
    assert run.n_cells == 6 and run.n_resolved == 5
    # per label: T cell tp1 (pred T:1) -> p 1, r .5; B cell tp1 (pred B:2) -> p .5, r .5; NK tp1 -> p 1, r .5
    table = run.per_label
    assert table.loc["T cell", ["precision", "recall"]].tolist() == pytest.approx([1.0, 0.5])
    assert table.loc["B cell", ["precision", "recall"]].tolist() == pytest.approx([0.5, 0.5])
    f1 = [2 * 1 / (2 + 1), 2 * 1 / (2 + 2), 2 * 1 / (2 + 1)]
    assert run.macro_f1 == pytest.approx(np.mean(f1))
    assert run.grades.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert run.graded_score == pytest.approx(0.5)
    assert run.grade_counts == {0.0: 3, 0.25: 0, 0.5: 0, 1.0: 3}
    # ECE over the 5 cells with a confidence: bins .9 (1 right), .8 (wrong), .7 (right), .9-1 (.95 right), .3 (wrong)
    ece = (abs(0.9 - 1) + abs(0.8 - 0) + abs(0.7 - 1) + abs(0.95 - 1) + abs(0.3 - 0)) / 5
    assert run.ece == pytest.approx(ece)
    summary = run.summary()
    assert summary["share Subtype correct"] == pytest.approx(0.5) and summary["resolved"] == pytest.approx(5 / 6)


def test_reliability_table_and_ece():
    conf = np.array([0.05, 0.15, 0.15, 0.95, 1.0, np.nan])
    ok = np.array([False, True, False, True, True, True])
    table = reliability_table(conf, ok, n_bins=10)
    assert table["n"].tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert table.loc[1, "accuracy"] == 0.5 and table.loc[9, "confidence"] == pytest.approx(0.975)
    assert np.isnan(table.loc[2, "accuracy"])
    expected = (1 * 0.05 + 2 * abs(0.15 - 0.5) + 2 * abs(0.975 - 1)) / 5
    assert expected_calibration_error(conf, ok, 10) == pytest.approx(expected)
    assert np.isnan(expected_calibration_error([np.nan], [True]))
    with pytest.raises(ValueError, match="n_bins"):
        reliability_table(conf, ok, n_bins=0)


def test_coverage_table_by_hand():
    # 6 cells: confidences .9 .8 .7 .6, one without, one unresolved (never called)
    conf = np.array([0.9, 0.6, 0.8, 0.7, np.nan, 0.95])
    correct = np.array([True, False, True, False, True, True])
    grades = np.array([1.0, 0.5, 1.0, 1.0, 1.0, 0.0])
    called = np.array([True, True, True, True, True, False])
    table = coverage_table(conf, correct, grades, called, coverages=(1.0, 0.5, 1 / 3, 1 / 6))
    assert np.isnan(table.loc[1.0, "accuracy"])  # only 4 of 6 cells were called
    top3 = table.loc[0.5]  # .9, .8, .7
    assert top3["n"] == 3 and top3["min_confidence"] == pytest.approx(0.7)
    assert top3["accuracy"] == pytest.approx(2 / 3) and top3["subtype_correct"] == pytest.approx(1.0)
    assert top3["graded"] == pytest.approx(1.0)
    assert table.loc[1 / 6, "accuracy"] == 1.0 and table.loc[1 / 3, "n"] == 2


def test_confusion_table_rows_sum_to_one_and_keep_unresolved():
    truths = pd.Series(pd.Categorical(["NK", "NK", "B cell", "B cell"], categories=["NK", "B cell", "DC"]))
    table = confusion_table(truths, ["NK cells", None, "B cells", "monocyte"])
    assert table.index.tolist() == ["NK", "B cell"]  # category order, empty categories dropped
    assert table.columns.tolist() == ["NK", "B cell", "monocyte", UNRESOLVED]
    assert table.sum(axis=1).tolist() == pytest.approx([1.0, 1.0])
    assert table.loc["NK", UNRESOLVED] == 0.5 and table.loc["B cell", "B cell"] == 0.5
    counts = confusion_table(truths, ["NK cells", None, "B cells", "monocyte"], normalize=False)
    assert counts.to_numpy().sum() == 4


# ------------------------------------------------------------------------------------ annotated data


@pytest.fixture
def pbmc(with_plugin):
    """scanpy's pbmc68k_reduced annotated twice by a marker test model: per cell and per louvain cluster."""
    import scanpy as sc

    import cellscribe

    with_plugin(MarkerPlugin(), name="pbmc-markers")
    adata = sc.datasets.pbmc68k_reduced()
    options = dict(model="pbmc-markers", sentence="top-expressed", n_genes=50, sidecar=False, progress=False,
                   use_raw=True)
    cellscribe.tl.annotate(adata, **options)
    cellscribe.tl.annotate(adata, groupby="louvain", key_added="by_cluster", **options)
    return adata


def test_find_runs_ignores_other_tools(pbmc):
    assert "louvain" in pbmc.uns and "params" in pbmc.uns["louvain"]
    assert find_runs(pbmc) == ["cellscribe", "by_cluster"]


def test_evaluate_runs_side_by_side(pbmc):
    evaluation = evaluate(pbmc, "bulk_labels")
    assert list(evaluation.runs) == ["cellscribe", "by_cluster"]
    run = evaluation["cellscribe"]
    assert run.n_cells == pbmc.n_obs
    manual = evaluate_labels(pbmc.obs["bulk_labels"], pbmc.obs["cellscribe"], pbmc.obs["cellscribe_confidence"])
    assert run.accuracy == pytest.approx(manual.accuracy)
    assert run.graded_score == pytest.approx(manual.graded_score)
    assert 0.3 < run.accuracy < run.graded_score < 1  # the marker model is partly right
    assert 0 < run.ece < 1 and run.reliability["n"].sum() > 0.9 * pbmc.n_obs
    summary = evaluation.summary()
    assert summary.index.tolist() == ["cellscribe", "by_cluster"]
    assert {"accuracy", "macro_f1", "graded_score", "ece", "share Major correct"} <= set(summary.columns)
    only = evaluate(pbmc, "bulk_labels", "by_cluster")
    assert list(only.runs) == ["by_cluster"]
    both = evaluate({"a": pbmc, "b": pbmc}, "bulk_labels", ["cellscribe"])
    assert list(both.runs) == ["a:cellscribe", "b:cellscribe"]


def test_evaluate_explains_bad_input(pbmc):
    with pytest.raises(ValueError, match="true labels"):
        evaluate(pbmc, "no_such_column")
    with pytest.raises(ValueError, match="holds predictions"):
        evaluate(pbmc, "bulk_labels", "no_such_run")
    import anndata as ad

    with pytest.raises(ValueError, match="no cellscribe run"):
        evaluate(ad.AnnData(obs=pd.DataFrame({"t": ["a"]}, index=["c"])), "t")


def test_puzzle_runs_get_cell_o1_metrics_from_the_sidecar(with_plugin, pancreas, tmp_path):
    import cellscribe

    with_plugin(RulePlugin(), name="rules")
    sidecar = tmp_path / "puzzles.jsonl"
    cellscribe.tl.annotate(pancreas, model="rules", prompt="puzzle", candidates=PANCREAS_TYPES, sidecar=sidecar,
                           progress=False)
    run = evaluate(pancreas, "Group")["cellscribe"]
    records = [json.loads(line) for line in sidecar.read_text().splitlines()]
    truth = pancreas.obs["Group"].astype(str)
    expected = puzzle_metrics([r["output"] for r in records], [[truth[u] for u in r["unit_ids"]] for r in records])
    assert run.puzzle == expected
    assert run.puzzle.n_cells == pancreas.n_obs and run.puzzle.legitimate_ratio == 1.0
    assert run.summary()["puzzle exact_match"] == expected.exact_match
    sidecar.unlink()
    assert evaluate(pancreas, "Group")["cellscribe"].puzzle is None  # sidecar gone: no puzzle metrics


def test_mudata_runs_are_found_and_read_from_their_modality(with_plugin, pancreas):
    import mudata

    import cellscribe

    with_plugin(RulePlugin(), name="rules")
    with mudata.set_options(pull_on_update=False):
        mdata = mudata.MuData({"rna": pancreas})
    cellscribe.tl.annotate(mdata, model="rules", sidecar=False, progress=False)
    assert find_runs(mdata) == ["rna:cellscribe"]
    evaluation = evaluate(mdata, "Group")  # the truth lives in the modality only
    run = evaluation["rna:cellscribe"]
    assert run.n_cells == pancreas.n_obs
    direct = evaluate(pancreas, "Group")["cellscribe"]
    assert run.accuracy == direct.accuracy and run.graded_score == direct.graded_score


# ------------------------------------------------------------------------------------ report and CLI


def test_write_report(pbmc, tmp_path):
    evaluation = evaluate(pbmc, "bulk_labels")
    image = tmp_path / "fig.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n fake")
    written = write_report(evaluation, tmp_path / "report", figures={"A figure": image})
    markdown = written["markdown"].read_text()
    assert "| metric | cellscribe | by_cluster |" in markdown and "![A figure](" in markdown
    assert "## Per label: by_cluster" in markdown
    page = written["html"].read_text()
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page
    summary = pd.read_csv(written["summary"], index_col=0)
    assert summary.loc["cellscribe", "accuracy"] == pytest.approx(evaluation["cellscribe"].accuracy)
    assert written["per_label:cellscribe"].exists()
    # what each measure means, and accuracy against coverage from the confidences
    assert "subtype correct: the prediction is the true type or a subtype of it" in markdown
    assert "## Accuracy against coverage" in markdown and "### cellscribe" in markdown
    coverage = pd.read_csv(written["coverage:cellscribe"], index_col=0)
    assert coverage["accuracy"].dropna().tolist() == pytest.approx(
        evaluation["cellscribe"].coverage["accuracy"].dropna().tolist())


def test_grade_command(tmp_path):
    from cellscribe.cli._eval import grade_command

    pairs = tmp_path / "pairs.csv"
    pd.DataFrame(
        {"truth": ["NK", "CD4 CCR7", "T cell", "Malignant"], "pred": ["NK cells or T cells", "CD8+ T", "B cells", ""],
         "expert": [0.25, 0.5, 0, 0]}
    ).to_csv(pairs, index=False)
    out = tmp_path / "graded.csv"
    args = [str(pairs), "--truth-col", "truth", "--pred-col", "pred", "-o", str(out), "--compare-col", "expert"]
    result = CliRunner().invoke(grade_command, args)
    assert result.exit_code == 0, result.output
    graded = pd.read_csv(out)
    assert graded["grade"].tolist() == [0.25, 0.5, 0.0, 0.0]
    assert graded["grade_name"].tolist() == ["Partially correct", "Major correct", "Incorrect", "Incorrect"]
    assert "grade_rule" in graded.columns
    assert "agreement 1.000" in result.output
    again = CliRunner().invoke(grade_command, args)
    assert again.exit_code != 0 and "--force" in again.output
    missing = CliRunner().invoke(grade_command, [str(pairs), "--truth-col", "nope", "--pred-col", "pred",
                                                 "-o", str(tmp_path / "x.csv")])
    assert missing.exit_code != 0 and "no column 'nope'" in missing.output


def test_evaluate_command_writes_a_report(pbmc, tmp_path):
    from cellscribe.cli._eval import evaluate_command

    path = tmp_path / "pbmc.h5ad"
    pbmc.write_h5ad(path)
    report = tmp_path / "report"
    result = CliRunner().invoke(evaluate_command, [str(path), "--truth", "bulk_labels", "--pred", "cellscribe",
                                                   "-o", str(report)])
    assert result.exit_code == 0, result.output
    assert "graded_score" in result.output and "by_cluster" not in result.output
    assert (report / "report.html").exists() and (report / "report.md").exists()
    figures = sorted(p.name for p in (report / "figures").glob("*.png"))
    assert {"grades.png", "reliability.png", "confusion_cellscribe.png", "embedding_cellscribe.png"} <= set(figures)
    bad = CliRunner().invoke(evaluate_command, [str(path), "--truth", "nope"])
    assert bad.exit_code != 0 and "true labels" in bad.output
