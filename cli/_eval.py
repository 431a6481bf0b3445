"""The ``cellscribe grade`` and ``cellscribe evaluate`` commands (added to the ``cellscribe`` group in
:mod:`cellscribe.cli`).

``grade`` adds CellReasoner-scale grades to a table of (truth, prediction) pairs; ``evaluate`` measures
annotated files against known labels and writes a report with figures.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from ._common import friendly_errors

log = logging.getLogger("cellscribe")

__all__ = ["grade_command", "evaluate_command"]


def _separator(path: Path, sep: str | None) -> str:
    if sep is not None:
        return "\t" if sep in {"\\t", "tab"} else sep
    return "\t" if path.suffix.lower() in {".tsv", ".tab", ".txt"} else ","


def _read_table(path: Path, sep: str | None):
    import pandas as pd

    if path.suffix.lower() in {".xlsx", ".xls"}:
        return pd.read_excel(path)
    return pd.read_csv(path, sep=_separator(path, sep), dtype=str, keep_default_na=False, na_values=[""])


@click.command(name="grade")
@click.argument("pairs", metavar="PAIRS", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--truth-col", required=True, help="Column of true labels.")
@click.option("--pred-col", required=True, help="Column of predictions (labels or raw model outputs).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Graded table to write (CSV, or TSV for .tsv).")
@click.option("--sep", default=None, help="Field separator of PAIRS (default: from the extension; 'tab' for tabs).")
@click.option("--explain/--no-explain", default=True, show_default=True,
              help="Also write grade_rule: the rule that decided each grade.")
@click.option("--compare-col", default=None,
              help="A column of reference grades (1/0.5/0.25/0): print agreement and quadratic kappa with it.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@friendly_errors
def grade_command(pairs: Path, truth_col: str, pred_col: str, output: Path, sep: str | None, explain: bool,
                  compare_col: str | None, force: bool) -> None:
    """Grade (truth, prediction) pairs on CellReasoner's scale.

    Adds grade (1 subtype correct, 0.5 major correct, 0.25 partially correct, 0 incorrect) and
    grade_name columns to PAIRS and writes OUTPUT. The rules are in cellscribe.core.evaluation.grading.
    """
    import numpy as np
    import pandas as pd

    from ..core.evaluation.grading import Grader, compare_grades, grade_name
    from ._files import atomic_output, check_output

    check_output(output, inputs=(pairs,), force=force)
    table = _read_table(pairs, sep)
    missing = [c for c in (truth_col, pred_col, compare_col) if c is not None and c not in table.columns]
    if missing:
        raise ValueError(f"PAIRS has no column {missing[0]!r}; its columns are {list(table.columns)}")
    grader = Grader()
    truths = table[truth_col].astype(object)
    preds = table[pred_col].astype(object).where(table[pred_col].notna(), None)
    explained = {}
    for t, p in zip(truths, preds):
        if (t, p) not in explained:
            explained[(t, p)] = grader.explain(t, p) if pd.notna(t) else None
    results = [explained[(t, p)] for t, p in zip(truths, preds)]
    table["grade"] = [np.nan if r is None else r.score for r in results]
    table["grade_name"] = ["" if r is None else grade_name(r.score) for r in results]
    if explain:
        table["grade_rule"] = ["truth missing" if r is None else r.rule for r in results]
    with atomic_output(output) as tmp:
        table.to_csv(tmp, sep="\t" if output.suffix.lower() == ".tsv" else ",", index=False)
    graded = table["grade"].dropna()
    click.echo(f"graded {len(graded)} pairs -> {output}; mean grade {graded.mean():.3f}")
    for value, count in graded.value_counts().sort_index(ascending=False).items():
        click.echo(f"  {grade_name(value):18} {value:<5g} {count:>7} ({count / len(graded):.1%})")
    if compare_col is not None:
        reference = pd.to_numeric(table[compare_col], errors="coerce")
        keep = reference.notna() & table["grade"].notna()
        agreement = compare_grades(reference[keep].to_numpy(), table.loc[keep, "grade"].to_numpy())
        click.echo(f"vs {compare_col}: agreement {agreement.agreement:.3f}, quadratic kappa {agreement.kappa:.3f} "
                   f"({agreement.n} pairs)")


def _read_annotated(path: Path):
    if path.suffix.lower() == ".h5mu":
        import mudata

        with mudata.set_options(pull_on_update=False):
            return mudata.read_h5mu(path)
    if path.suffix.lower() == ".h5ad":
        import anndata

        return anndata.read_h5ad(path)
    raise ValueError(f"{path} is neither .h5ad nor .h5mu; pass an annotated AnnData or MuData file")


@click.command(name="evaluate")
@click.argument("inputs", metavar="ANNOTATED...", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--truth", required=True, help="obs column of the true labels.")
@click.option("--pred", "keys", multiple=True,
              help="Run (key_added) to evaluate; repeat for several (default: all runs).")
@click.option("-o", "--output", "report_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for report.md, report.html, tables and figures.")
@click.option("--basis", default=None, help="Embedding for the figures (default: X_umap, else another obsm entry).")
@click.option("--figures/--no-figures", default=True, show_default=True, help="Draw figures into the report.")
@friendly_errors
def evaluate_command(inputs: tuple[Path, ...], truth: str, keys: tuple[str, ...], report_dir: Path | None,
                     basis: str | None, figures: bool) -> None:
    """Measure annotated files against the true labels in obs[TRUTH].

    Prints accuracy, macro F1, the graded score and its grade shares, ECE of the confidences and
    CellPuzzles metrics (for puzzle runs) per run; several runs and files side by side. With -o, also
    writes a Markdown and an HTML report with a confusion heatmap, grade bars, the embedding coloured
    by prediction and confidence, and a reliability diagram.
    """
    from ..core.evaluation.evaluate import evaluate, write_report

    objects: dict[str, Any] = {}
    for path in inputs:
        name = path.stem
        while name in objects:
            name = f"{name}_"
        objects[name] = _read_annotated(path)
    data = objects if len(objects) > 1 else next(iter(objects.values()))
    evaluation = evaluate(data, truth, list(keys) or None)
    summary = evaluation.summary()
    click.echo(summary.T.to_string(float_format=lambda v: f"{v:.3f}"))
    if report_dir is not None:
        found = {}
        if figures:
            import matplotlib

            matplotlib.use("Agg")
            from .. import pl

            found = pl.report_figures(data, evaluation, report_dir, truth=truth, basis=basis)
        written = write_report(evaluation, report_dir, figures=found)
        click.echo(f"report: {written['html']} and {written['markdown']}")
