"""Throughput of the offline ``markers`` model on ~100k cells.

    python benchmarks/markers.py [--copies 143] [--prompt zero-shot|puzzle]

Stacks scanpy's ``pbmc68k_reduced`` (700 PBMCs; log-normalised ``.raw``) ``--copies`` times (143 copies:
100,100 cells), then times, in this process: the sentences and prompts (``plan_run``), the backend's
``generate`` over all prompts, and a whole ``tl.annotate`` run. Prints cells/s for each, and how long
the marker knowledge and the Cell Ontology take to load from cold caches (the tests check what they
hold, never how fast).
"""

from __future__ import annotations

import argparse
import logging
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=143)
    parser.add_argument("--prompt", default="zero-shot", choices=["zero-shot", "puzzle"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    import anndata as ad
    import scanpy as sc

    import cellscribe as cs
    from cellscribe.core import run
    from cellscribe.core.plugins import get_host

    import importlib.resources

    from cellscribe.core import ontology
    from cellscribe.plugins.markers import knowledge as kn

    t0 = time.perf_counter()
    with importlib.resources.as_file(importlib.resources.files(ontology.__package__).joinpath("data", ontology.CL_TABLE)) as path:
        ontology.CellOntology.from_table(path)
    print(f"Cell Ontology table load  {time.perf_counter() - t0:7.3f} s")
    for cached in (kn._panglao_table, kn._canonical_rows, kn.default_ubiquitous_genes):
        cached.cache_clear()
    t0 = time.perf_counter()
    kn.load_knowledge()
    print(f"marker knowledge load     {time.perf_counter() - t0:7.3f} s (cold caches)")

    base = sc.datasets.pbmc68k_reduced()
    base = ad.AnnData(base.raw.X, obs=base.obs[["bulk_labels"]], var=base.raw.var)
    adata = ad.concat([base] * args.copies, index_unique="-")
    n = adata.n_obs
    candidates = sorted({"T cell", "B cell", "natural killer cell", "classical monocyte", "dendritic cell"})
    extra = {"candidates": candidates} if args.prompt == "puzzle" else {}
    print(f"{n:,} cells x {adata.n_vars} genes ({args.copies} copies of pbmc68k_reduced), prompt {args.prompt}")

    host = get_host()
    t0 = time.perf_counter()
    plan = run.plan_run(adata, model="markers", prompt=args.prompt, host=host, **extra)
    t_plan = time.perf_counter() - t0
    loaded = host.registry.get("backend", "markers").load("markers", hook=host.hook)
    t0 = time.perf_counter()
    loaded.generate(plan.prompts)
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    cs.tl.annotate(adata, model="markers", prompt=args.prompt, sidecar=False, progress=False, **extra)
    t_all = time.perf_counter() - t0

    print(f"sentences + prompts  {t_plan:7.2f} s  {n / t_plan:10,.0f} cells/s")
    print(f"markers generate     {t_gen:7.2f} s  {n / t_gen:10,.0f} cells/s  ({len(plan.prompts):,} prompts)")
    print(f"tl.annotate (all)    {t_all:7.2f} s  {n / t_all:10,.0f} cells/s")


if __name__ == "__main__":
    main()
