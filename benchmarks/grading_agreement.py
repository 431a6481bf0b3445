"""How well :mod:`cellscribe.core.evaluation.grading` agrees with the experts who graded CellReasoner's pairs.

Usage::

    .venv/bin/python benchmarks/grading_agreement.py
    .venv/bin/python benchmarks/grading_agreement.py --table PATH --seed 0 --show 25

Data: ``../shared/data/knowledge/cellreasoner_pair_scores_dev.csv``, a random 30% sample of
CellReasoner's graded (Ground Truth, Model Prediction) table (``Evaluation Score`` 1 / 0.5 / 0.25 /
0). The grader's rules were written while looking at a random half of it (``--seed 0``: the first half
of ``numpy.random.default_rng(0).permutation``); the other half was held out, so its numbers show
how the rules generalise. Nothing of the table is stored in the package.

Prints, for the tuning half, the held-out half and the whole table: exact grade agreement,
quadratic-weighted Cohen's kappa, per-grade recall (the share of pairs the experts gave a grade that
the grader gave the same grade) and the 4x4 confusion (experts' grades as rows); then the trivial
floors ("always incorrect", case-insensitive string equality) and, with ``--show N``, the N most
frequent disagreements of the held-out half with the rule that decided each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cellscribe.core.evaluation.grading import GradeAgreement, Grader, compare_grades

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT.parent / "shared" / "data" / "knowledge" / "cellreasoner_pair_scores_dev.csv"
TRUTH, PREDICTION, SCORE = "Ground Truth", "Model Prediction", "Evaluation Score"


def split(table: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tuning half and the held-out half (a fixed random permutation)."""
    order = np.random.default_rng(seed).permutation(len(table))
    half = len(table) // 2
    return table.iloc[np.sort(order[:half])], table.iloc[np.sort(order[half:])]


def show(name: str, result: GradeAgreement) -> None:
    recall = "  ".join(f"{grade}: {value:.3f}" for grade, value in result.recall.items())
    print(f"\n{name}: {result.n} pairs")
    print(f"  exact agreement {result.agreement:.4f}   quadratic-weighted kappa {result.kappa:.4f}")
    print(f"  recall per expert grade  {recall}")
    print("  confusion (rows: experts, columns: grader)")
    print("\n".join("    " + line for line in result.confusion.to_string().splitlines()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=Path, default=TABLE, help="the experts' graded pairs (CSV)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tuning/held-out split")
    parser.add_argument("--show", type=int, default=0, help="print the N most frequent held-out disagreements")
    args = parser.parse_args(argv)
    if not args.table.exists():
        print(f"{args.table} not found: pass --table", file=sys.stderr)
        return 2
    table = pd.read_csv(args.table)
    tune, held = split(table, args.seed)
    grader = Grader()
    start = time.perf_counter()
    grades = pd.Series(grader.grade_many(table[TRUTH], table[PREDICTION]), index=table.index)
    seconds = time.perf_counter() - start
    print(f"{len(table)} pairs graded in {seconds:.2f} s ({len(table) / seconds:,.0f} pairs/s, cold caches)")
    for name, part in (("tuning half", tune), ("held-out half", held), ("whole table", table)):
        show(name, compare_grades(part[SCORE].to_numpy(), grades[part.index].to_numpy()))

    print("\ntrivial floors on the whole table:")
    zero = compare_grades(table[SCORE], np.zeros(len(table)))
    equal = (table[TRUTH].astype(str).str.strip().str.casefold()
             == table[PREDICTION].astype(str).str.strip().str.casefold()).astype(float)
    same = compare_grades(table[SCORE], equal.to_numpy())
    print(f"  always incorrect            agreement {zero.agreement:.4f}  kappa {zero.kappa:.4f}")
    print(f"  case-insensitive equality   agreement {same.agreement:.4f}  kappa {same.kappa:.4f}")

    if args.show:
        wrong = held[grades[held.index] != held[SCORE]]
        counts = (
            wrong.assign(grade=grades[wrong.index], prediction=wrong[PREDICTION].astype(str).str.slice(0, 60))
            .groupby([SCORE, "grade", TRUTH, "prediction"]).size().sort_values(ascending=False).head(args.show)
        )
        print(f"\nmost frequent held-out disagreements (experts, grader, truth, prediction: count, rule):")
        for (expert, ours, truth, prediction), n in counts.items():
            full = wrong.loc[(wrong[TRUTH] == truth) & (wrong[PREDICTION].astype(str).str.slice(0, 60) == prediction),
                             PREDICTION].iloc[0]
            rule = grader.explain(truth, full).rule
            print(f"  {expert:<4g} {ours:<4g} {truth!r:28} {prediction!r:62} {n:>3}  {rule}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
