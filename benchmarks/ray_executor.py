"""Benchmark: what ``executor="ray"`` costs on one machine, and that it gives the local labels.

Measured on pbmc68k_reduced (700 cells, inside scanpy) with the offline markers model and with the tiny
transformers model the tests build (``tests/_tiny_models.py``; untrained, greedy, 8 new tokens):

- **cluster start**: ``ray.init`` of a local cluster (``num_cpus`` = workers, no dashboard), as the
  executor does with no ``executor_address``;
- **replicas ready**: from the dataset's start to the first answer (worker processes start, import
  cellscribe, load and prepare the model: ``executor.last_run["first_answer_seconds"]``);
- **per batch**: for the same prompts cut into 2, 10 and 100 batches, the Ray wall time after the
  replicas were ready, divided by the batches, against the local executor's time per batch;
- **labels identical**: the annotation columns and raw outputs of ``tl.annotate`` with
  ``executor="ray"`` equal those of the local run (every row).

Usage::

    .venv/bin/python benchmarks/ray_executor.py                # 2 workers
    .venv/bin/python benchmarks/ray_executor.py --workers 4

Results: benchmarks/README.md ("Distributed inference on Ray"), quoted in the README. The machine's
load (``os.getloadavg``) is printed: on a shared 2-core box the figures are noisy.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def annotate_both(adata, executor_options, **run):
    """(local, ray) annotated copies and the Ray run's measurements."""
    import cellscribe as cs
    from cellscribe.core.plugins import get_host

    local, distributed = adata.copy(), adata.copy()
    t0 = time.perf_counter()
    cs.tl.annotate(local, progress=False, **run)
    t_local = time.perf_counter() - t0
    t0 = time.perf_counter()
    cs.tl.annotate(distributed, progress=False, executor="ray", executor_options=executor_options, **run)
    t_ray = time.perf_counter() - t0
    return local, distributed, t_local, t_ray, dict(get_host().registry.get("executor", "ray").last_run)


def identical(local, distributed) -> bool:
    cols = [c for c in local.obs.columns if c.startswith("cellscribe")]
    return bool(local.obs[cols].equals(distributed.obs[cols])
                and local.uns["cellscribe"]["raw"].equals(distributed.uns["cellscribe"]["raw"]))


def per_batch(adata, workers: int) -> list[tuple[int, float, float, float]]:
    """(batches, local s per batch, Ray s per batch after the replicas were ready, replicas-ready s)."""
    from cellscribe.core.models import load_model
    from cellscribe.core.plugins import get_host
    from cellscribe.core.run import plan_run
    from cellscribe.core.run.checkpoint import run_batches

    host = get_host()
    plan = plan_run(adata, host=host, build_prompts=False)
    model = load_model(None, host=host)
    loaded = model.loaded
    loaded.use_assay(plan.assay)
    prompts = plan.make_prompts(None)
    loaded.survey(prompts)
    replica = model.replica(modality="rna", assay=plan.assay, surveyed=prompts)
    executor = host.registry.get("executor", "ray")
    out = []
    for n_batches in (2, 10, 100):
        size = -(-len(prompts) // n_batches)
        batches = dict(settings={}, model="bench", batch_prompts=size)
        t0 = time.perf_counter()
        run_batches(loaded, prompts, **batches)
        t_local = time.perf_counter() - t0
        t0 = time.perf_counter()
        executor.run(loaded, prompts, replica=replica, options={"workers": workers}, **batches)
        wall = time.perf_counter() - t0
        ready = executor.last_run["first_answer_seconds"] + executor.last_run["cluster_seconds"]
        out.append((n_batches, t_local / n_batches, (wall - ready) / n_batches, ready))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray
    import scanpy as sc

    from _tiny_models import make_tiny_model

    print(f"load average before: {os.getloadavg()[0]:.2f}")
    adata = sc.datasets.pbmc68k_reduced()
    t0 = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, object_store_memory=512 * 2**20,
             logging_level="warning")
    print(f"cluster start (ray.init, {args.workers} CPUs, no dashboard): {time.perf_counter() - t0:.1f} s")
    try:
        local, distributed, t_local, t_ray, last = annotate_both(
            adata, {"workers": args.workers, "block_prompts": 70})
        print(f"markers, 700 cells, 10 batches: local {t_local:.1f} s, ray {t_ray:.1f} s "
              f"(replicas ready {last['first_answer_seconds']:.1f} s); identical: {identical(local, distributed)}")
        with tempfile.TemporaryDirectory() as tmp:
            tiny = make_tiny_model(Path(tmp) / "tiny", seed=0)
            small = adata[:96].copy()
            local, distributed, t_local, t_ray, last = annotate_both(
                small, {"workers": args.workers}, model=str(tiny), n_genes=20, batch_size=1,
                generation={"do_sample": False, "max_new_tokens": 8})
            print(f"tiny transformers, 96 cells, {last['calls']} batches: local {t_local:.1f} s, ray {t_ray:.1f} s "
                  f"(replicas ready {last['first_answer_seconds']:.1f} s); identical: {identical(local, distributed)}")
        print("batches  local s/batch  ray s/batch (after replicas ready)  replicas ready s")
        for n, t_local_batch, t_ray_batch, ready in per_batch(adata, args.workers):
            print(f"{n:7d}  {t_local_batch:13.4f}  {t_ray_batch:34.4f}  {ready:16.1f}")
    finally:
        ray.shutdown()
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
