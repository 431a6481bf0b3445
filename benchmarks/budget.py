"""Quality against budget: budgeted annotation (``budget=``) against the full run, offline ``markers`` model.

    python benchmarks/budget.py [--budgets 0.02 0.05 0.1 0.25 1.0] [--method medoids|random] [--seeds 0]
                                [--data pbmc pancreas] [--groupby COLUMN] [--cells N]

Data: scanpy's bundled ``pbmc68k_reduced`` (700 PBMCs, truth ``obs["bulk_labels"]``; its ``.X`` is scaled,
so the run reads the log-normalised ``.raw`` as every run does) and the pancreas cells in ``tests/data``
(Baron 2016, 350 cells, raw counts, human and mouse batches, truth ``obs["Group"]``). For each data set:
one full run (every cell sent), then one run per budget. Printed per run: the graded score
(``core.evaluation.evaluate_labels``, CellReasoner's scale: 1 subtype correct, 0.5 lineage, 0.25
partial), its difference from the full run, the share of cells whose label equals the full run's, the
cells the model was called on (first round + re-queries, and as a share of the cells) and seconds.
Seeds (``--seeds 0 1 2``) give the spread of a method's choice; the budget's defaults are used
otherwise. ``--cells N`` (scale): ``pancreas`` becomes N cells drawn from the 350 with replacement, each
binomially thinned (every count kept with probability 0.5, seeded), so no two cells are equal; its
seconds show what choosing and spreading cost at that size. Timings are wall clock on a shared machine:
noisy.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name: str, cells: int | None = None):
    import anndata as ad
    import numpy as np
    import scanpy as sc
    import scipy.sparse as sp

    if name == "pbmc":
        return sc.datasets.pbmc68k_reduced(), "bulk_labels"
    adata = ad.read_h5ad(ROOT / "tests" / "data" / "pancreas_baron_human_mouse_350.h5ad")
    if cells is None:
        return adata, "Group"
    rng = np.random.default_rng(0)
    rows = rng.integers(0, adata.n_obs, cells)
    X = sp.csr_matrix(adata.X)[rows]
    X.data = rng.binomial(X.data.astype(np.int64), 0.5).astype(np.float32)
    X.eliminate_zeros()
    obs = adata.obs.iloc[rows].reset_index(drop=True)
    obs.index = [f"cell{i}" for i in range(cells)]
    return ad.AnnData(X, obs=obs[["Batch", "Group"]], var=adata.var), "Group"


def graded(adata, truth: str) -> float:
    from cellscribe.core.evaluation.evaluate import evaluate_labels

    labels = adata.obs["cellscribe"].astype(object)
    return evaluate_labels(adata.obs[truth].astype(str), labels.where(labels.notna(), None),
                           adata.obs["cellscribe_confidence"]).graded_score


def run(adata, **params):
    import cellscribe as cs

    out = adata.copy()
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cs.tl.annotate(out, model="markers", sidecar=False, progress=False, **params)
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.25, 1.0])
    parser.add_argument("--data", nargs="+", default=["pbmc", "pancreas"], choices=["pbmc", "pancreas"])
    parser.add_argument("--method", default=None, choices=["medoids", "random"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--requery", type=float, default=None, help="budget option requery (default 1.0)")
    parser.add_argument("--groupby", default=None, help="an obs column: one call per group")
    parser.add_argument("--cells", type=int, default=None, help="pancreas as this many thinned cells (scale)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    for name in args.data:
        adata, truth = load(name, args.cells)
        extra = {"groupby": args.groupby} if args.groupby else {}
        full, seconds = run(adata, **extra)
        reference = graded(full, truth)
        full_labels = full.obs["cellscribe"].astype(str)
        print(f"\n{name}: {adata.n_obs} cells, truth obs[{truth!r}]{', groupby ' + args.groupby if args.groupby else ''}")
        print(f"  full run: graded {reference:.3f}  ({seconds:.1f} s)")
        print("  budget  seed  graded   vs full  same label  sent (first + re-queried)   share sent  seconds")
        for budget in args.budgets:
            for seed in args.seeds:
                options = {k: v for k, v in (("method", args.method), ("requery", args.requery)) if v is not None}
                out, seconds = run(adata, budget=budget, seed=seed, budget_options=options, **extra)
                record = out.uns["cellscribe"]["budget"]
                score = graded(out, truth)
                same = (out.obs["cellscribe"].astype(str) == full_labels).mean()
                print(f"  {budget:6.0%}  {seed:4d}  {score:6.3f}  {score - reference:+7.3f}  {same:10.1%}  "
                      f"{record['n_sent']:5d} ({record['n_first_round']:4d} + {record['n_requeried']:4d})"
                      f"{'':13s}{record['share_sent']:7.1%}  {seconds:7.1f}")


if __name__ == "__main__":
    main()
