"""Benchmark: ``cellscribe annotate`` end to end with the offline ``markers`` model on a large ``.h5ad``.

Builds a large input by tiling real cells (``--source``), then runs ``cellscribe annotate INPUT -o OUT``
in a fresh process and reports its wall time, CPU time (user + system), cells/s by both, peak resident
memory, the size of the output against the input's (bytes added per cell), the sidecar's size, and
whether ``anndata.read_h5ad`` reads the output back with every result column.

``--kill-at 0.5`` also checks that a run killed with SIGKILL half-way (when half of the chunks are
checkpointed, or half of the batches for a run in memory) and started again with the same command
resumes and ends with the same result columns, ``uns`` summary and sidecar records as the uninterrupted
run.

``--pythonpath DIR`` runs another copy of cellscribe (e.g. ``git archive`` of an older commit unpacked
as ``DIR/cellscribe``), for before/after figures on the same input and machine.

Run ``python benchmarks/annotate.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
KEEP = 0.9  # each copy keeps this share of the stored values (see make_input)
RECIPE = 2  # bump when make_input changes, so stale files are rebuilt
KEY = "cellscribe"


# -------------------------------------------------------------------------------------------------
# Data
# -------------------------------------------------------------------------------------------------


def _base(source: str):
    """The real cells that are tiled: ``(CSR matrix, gene names, labels, label column)``."""
    import anndata as ad
    import scipy.sparse as sp

    if source == "pbmc68k":
        import scanpy as sc

        base = sc.datasets.pbmc68k_reduced()  # 700 PBMCs; .raw is log-normalised, 765 genes
        return (sp.csr_matrix(base.raw.X, dtype=np.float32), base.raw.var_names.copy(),
                base.obs["bulk_labels"].astype(str).to_numpy(), "bulk_labels")
    base = ad.read_h5ad(REPO / "tests" / "data" / "pancreas_baron_human_mouse_350.h5ad")
    base = base[base.obs["Batch"] == "human"]  # raw counts, 12,474 genes
    return (sp.csr_matrix(base.X, dtype=np.float32), base.var_names.copy(),
            base.obs["Group"].astype(str).to_numpy(), "Group")


def make_input(path: Path, source: str, n_cells: int, keep: float = KEEP) -> None:
    """Write ``n_cells`` rows made from the ``source`` cells, repeated in order, as an uncompressed CSR h5ad
    (float32 values, int32 indices, int64 indptr). Every copy after the first keeps each stored value with
    probability ``keep`` (seeded by the copy's number), so no two cells are alike, as in real data:
    identical copies would let anything that repeats per cell (sentences, reasoning text) look smaller or
    faster than it is. Written block by block, so a million cells are written in bounded memory. Cell
    names ``cell0000000``...; the source's labels in ``obs``."""
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import write_elem

    X, genes, labels, label_key = _base(source)
    n_base = X.shape[0]
    tmp = path.with_suffix(".partial")
    with h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        g = f.create_group("X")
        g.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_cells, X.shape[1])})
        chunks = (1 << 20,)
        data = g.create_dataset("data", shape=(0,), maxshape=(None,), chunks=chunks, dtype=np.float32)
        indices = g.create_dataset("indices", shape=(0,), maxshape=(None,), chunks=chunks, dtype=np.int32)
        indptr = g.create_dataset("indptr", shape=(n_cells + 1,), dtype=np.int64)
        indptr[0] = 0
        row = pos = copy = 0
        while row < n_cells:
            block = X[: min(n_base, n_cells - row)].copy()
            if copy:
                block.data[np.random.default_rng(copy).random(block.nnz) >= keep] = 0
                block.eliminate_zeros()
            block = sp.csr_matrix(block)
            data.resize((pos + block.nnz,))
            indices.resize((pos + block.nnz,))
            data[pos:] = block.data
            indices[pos:] = block.indices
            indptr[row + 1 : row + block.shape[0] + 1] = block.indptr[1:] + pos
            row, pos, copy = row + block.shape[0], pos + block.nnz, copy + 1
        obs = pd.DataFrame({label_key: pd.Categorical(np.resize(labels, n_cells))},
                           index=pd.Index([f"cell{i:07d}" for i in range(n_cells)]))
        write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame(index=pd.Index(genes.astype(str))))
        write_elem(f, "uns", {"benchmark_recipe": RECIPE, "benchmark_source": source})
        for key in ("obsm", "varm", "layers", "obsp", "varp"):
            write_elem(f, key, {})
    tmp.replace(path)


def dataset(workdir: Path, source: str, n_cells: int) -> Path:
    """The input file for ``source`` and ``n_cells`` in ``workdir``, built unless it exists."""
    path = workdir / f"{source}_{n_cells}_r{RECIPE}.h5ad"
    if not path.exists():
        t = time.perf_counter()
        make_input(path, source, n_cells)
        print(f"built {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f} s", flush=True)
    return path


# -------------------------------------------------------------------------------------------------
# Measured runs
# -------------------------------------------------------------------------------------------------

# Started as its own small process, because Linux carries the memory high-water mark of the process that
# spawns a child into the child's ru_maxrss (the driver holds the data it built).
_LAUNCHER = """
import json, os, resource, subprocess, sys, threading, time

def tree(pid):
    out = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            for child in fh.read().split():
                out += tree(int(child))
    except OSError:
        pass
    return out

def pss(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0

t = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
peak = [0]
def sample():
    while proc.poll() is None:
        peak[0] = max(peak[0], sum(pss(p) for p in tree(proc.pid)))
        time.sleep(1.0)
threading.Thread(target=sample, daemon=True).start()
err = proc.stderr.read()
proc.wait()
wall = time.perf_counter() - t
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"code": proc.returncode, "wall": wall, "cpu": u.ru_utime + u.ru_stime, "user": u.ru_utime,
                  "maxrss": u.ru_maxrss * 1024, "tree_pss": peak[0], "stderr": err.decode(errors="replace")[-3000:]}))
"""


def _env(pythonpath: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def annotate_command(input_path: Path, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-c", "import sys; from cellscribe.cli import main; sys.exit(main())", "annotate",
            str(input_path), "-o", str(out), "--model", "markers", "--no-progress", "--force", *extra]


def run_measured(cmd: list[str], pythonpath: str | None) -> dict:
    """Run ``cmd`` in a fresh process: exit code, wall and CPU seconds, peak RSS in bytes."""
    launcher = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True,
                              env=_env(pythonpath))
    if launcher.returncode != 0 or not launcher.stdout.strip():
        raise SystemExit(f"could not measure {' '.join(cmd)}:\n{launcher.stderr}")
    return json.loads(launcher.stdout.strip().splitlines()[-1])


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def sidecar_of(out: Path) -> Path | None:
    for name in (out.name + ".cellscribe.jsonl.gz", out.name + ".cellscribe.jsonl"):
        if (out.parent / name).exists():
            return out.parent / name
    return None


def read_sidecar(path: Path | None) -> list[dict] | None:
    if path is None:
        return None
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_output(out: Path, n_cells: int):
    """The output read with ``anndata.read_h5ad`` (``backed="r"`` above 2,000,000 cells: its matrix is as
    large as the input's) and the run's result columns."""
    import anndata as ad

    backed = n_cells > 2_000_000
    adata = ad.read_h5ad(out, backed="r" if backed else None)
    columns = [c for c in adata.obs.columns if c == KEY or c.startswith(KEY + "_")]
    return adata, columns, backed


def report(name: str, n_cells: int, r: dict, input_path: Path, out: Path) -> None:
    sidecar = sidecar_of(out)
    added = (out.stat().st_size - input_path.stat().st_size) / n_cells if out.exists() else float("nan")
    print(f"{name}: exit {r['code']}, {r['wall']:.1f} s wall, {r['cpu']:.1f} s CPU -> {n_cells / r['wall']:,.0f} "
          f"cells/s (wall), {n_cells / r['cpu']:,.0f} cells per CPU-second; peak memory {r['tree_pss'] / 2**20:,.0f} MiB "
          f"(PSS of the process and its workers, sampled every second; largest one process's RSS "
          f"{r['maxrss'] / 2**20:,.0f} MiB)",
          flush=True)
    if out.exists():
        print(f"  output {out.stat().st_size / 1e6:,.1f} MB for a {input_path.stat().st_size / 1e6:,.1f} MB input: "
              f"+{added:,.0f} bytes per cell; sidecar "
              + (f"{sidecar.name} {sidecar.stat().st_size / 1e6:,.1f} MB" if sidecar else "none"), flush=True)
    if r["code"]:
        print(r["stderr"])


def kill_half_way(cmd: list[str], checkpoint: Path, pythonpath: str | None, n_chunks: int, at: float) -> float:
    """Start ``cmd``, SIGKILL it once ``at`` of its chunks (``chunk-*.json``) are in ``checkpoint`` (or as
    many batch files, for a run in memory); return how many seconds it ran."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(pythonpath),
                            start_new_session=True)
    t = time.perf_counter()
    want = max(1, int(n_chunks * at))
    try:
        while proc.poll() is None:
            done = len(list(checkpoint.glob("chunk-*.json"))) if checkpoint.exists() else 0
            if done >= want:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return time.perf_counter() - t
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    raise SystemExit(f"the run ended (exit {proc.returncode}) before {want} chunks were checkpointed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=("pbmc68k", "pancreas"), default="pbmc68k",
                        help="cells to tile: pbmc68k_reduced (700 PBMCs x 765 genes, log-normalised; scanpy's "
                             "wheel) or the 350-cell pancreas file's human cells (raw counts, 12,474 genes)")
    parser.add_argument("--cells", type=int, default=100_100)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cellscribe-bench")
    parser.add_argument("--pythonpath", default=None, help="run the cellscribe found on this PYTHONPATH")
    parser.add_argument("--kill-at", type=float, default=None, metavar="SHARE",
                        help="also kill a run when this share of its chunks is done, resume it, compare")
    parser.add_argument("--chunk-size", type=int, default=10_000)
    parser.add_argument("--tag", default="run", help="name of the output files")
    parser.add_argument("--reuse", action="store_true",
                        help="with --kill-at: compare with the OUTPUT of an earlier uninterrupted run of the same tag")
    parser.add_argument("args", nargs="*", help="extra arguments for cellscribe annotate (after --)")
    args = parser.parse_args(argv)

    args.workdir.mkdir(parents=True, exist_ok=True)
    input_path = dataset(args.workdir, args.source, args.cells)
    print(f"input: {input_path.name}, {args.cells:,} cells ({args.source} tiled), "
          f"{input_path.stat().st_size / 1e6:,.1f} MB; load: {load()}", flush=True)
    extra = ["--chunk-size", str(args.chunk_size), *args.args]

    out = args.workdir / f"{args.tag}_{args.source}_{args.cells}.h5ad"
    if not (args.reuse and out.exists()):
        r = run_measured(annotate_command(input_path, out, extra), args.pythonpath)
        report("annotate", args.cells, r, input_path, out)
        if r["code"]:
            raise SystemExit(1)
    adata, columns, backed = read_output(out, args.cells)
    how = '(backed="r")' if backed else ""
    print(f"  anndata.read_h5ad{how}: {adata.n_obs:,} cells, columns {columns}; "
          f"labels: {adata.obs[KEY].value_counts().head(4).to_dict()}; load: {load()}", flush=True)

    if args.kill_at is None:
        return
    import pandas as pd

    resumed = args.workdir / f"{args.tag}_{args.source}_{args.cells}_resumed.h5ad"
    checkpoint = args.workdir / f"{resumed.name}.ckpt"
    if checkpoint.exists():
        import shutil

        shutil.rmtree(checkpoint)
    cmd = annotate_command(input_path, resumed, [*extra, "--checkpoint", str(checkpoint)])
    n_chunks = -(-args.cells // args.chunk_size)
    ran = kill_half_way(cmd, checkpoint, args.pythonpath, n_chunks, args.kill_at)
    done = len(list(checkpoint.glob("chunk-*.json")))
    print(f"killed (SIGKILL) after {ran:.1f} s with {done} of {n_chunks} chunks checkpointed; output written: "
          f"{resumed.exists()}", flush=True)
    r2 = run_measured(cmd, args.pythonpath)
    report("resumed run", args.cells, r2, input_path, resumed)
    if r2["code"]:
        raise SystemExit(1)
    again, columns2, _ = read_output(resumed, args.cells)
    same_columns = columns == columns2
    same_obs = same_columns and all(adata.obs[c].equals(again.obs[c]) for c in columns)
    summary_a = {k: v for k, v in dict(adata.uns[KEY]["summary"]).items() if k not in ("seconds_generation",
                                                                                      "resumed_chunks", "sidecar")}
    summary_b = {k: v for k, v in dict(again.uns[KEY]["summary"]).items() if k not in ("seconds_generation",
                                                                                       "resumed_chunks", "sidecar")}
    same_summary = json.dumps(summary_a, default=str, sort_keys=True) == json.dumps(summary_b, default=str,
                                                                                     sort_keys=True)
    side_a, side_b = read_sidecar(sidecar_of(out)), read_sidecar(sidecar_of(resumed))
    same_sidecar = side_a == side_b
    print(f"  resumed {again.uns[KEY]['summary'].get('resumed_chunks')} chunks; identical to the uninterrupted run: "
          f"obs columns {same_obs}, summary {same_summary}, sidecar records {same_sidecar} "
          f"({0 if side_a is None else len(side_a):,} records)", flush=True)
    if not (same_obs and same_summary and same_sidecar):
        for c in columns:
            if c in again.obs and not adata.obs[c].equals(again.obs[c]):
                diff = pd.concat([adata.obs[c], again.obs[c]], axis=1).loc[lambda d: d.iloc[:, 0].astype(str)
                                                                           != d.iloc[:, 1].astype(str)]
                print(f"  {c} differs on {len(diff)} cells, e.g.\n{diff.head(3)}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
