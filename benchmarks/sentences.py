"""Benchmark: writing CellReasoner cell sentences for a large h5ad file.

Builds a PBMC-sized synthetic count matrix from the vendored pancreas cells (see ``make_dataset``),
writes it uncompressed to disk as a CSR h5ad, then runs each mode in a fresh subprocess and reports
wall time, cells per second and peak resident memory above the import baseline:

``baseline``  ``python -c "import cellscribe.cli"`` (the memory every run pays before any work)
``cli``       ``cellscribe sentences BIG.h5ad -o OUT.json --format cellreasoner --label-key cell_type``
``python``    the ``ranked-hvg`` strategy on the backed file plus a streaming CellReasoner JSON writer
              defined here (``--python-only``: no CLI, pipeline or format plugin involved)
``naive``     CellReasoner's own script logic on the first ``--naive-cells`` cells: the whole file in
              memory, the list matched with Python ``in`` tests, then one Python loop step per cell
              (sparse rows, no densifying) and one ``json.dump(records, indent=4)`` at the end

Run ``python benchmarks/sentences.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PANCREAS = REPO / "tests" / "data" / "pancreas_baron_human_mouse_350.h5ad"
REFERENCE = REPO / "tests" / "data" / "pancreas_350_cellreasoner_direct.json.gz"
LABEL_KEY = "cell_type"
BASE_CELLS = 2700  # pbmc3k's size
THIN = 0.39  # keep each read with this probability: ~850 non-zero genes per cell, as in pbmc3k
RECIPE = 1  # bump when make_dataset changes, so stale files are rebuilt


# -------------------------------------------------------------------------------------------------
# Data
# -------------------------------------------------------------------------------------------------


def make_dataset(path: Path, n_cells: int, seed: int = 0) -> None:
    """Write a ``n_cells`` x 12,474 CSR h5ad of PBMC-like counts to ``path`` (uncompressed).

    Recipe: 2,700 base cells (the size of 10x's pbmc3k) are drawn with replacement from the 350
    vendored pancreas cells (Baron et al. 2016; raw counts, 12,474 genes, 5,314 of them in
    CellReasoner's list), and each base cell's counts are binomially thinned (every read kept with
    probability 0.39), which brings the mean from ~1,600 to ~850 non-zero genes per cell, pbmc3k's
    depth. The base block is repeated until ``n_cells`` rows are written (105,300 rows = 39 copies).
    Values are float32 (as 10x-derived h5ad files store them), ``obs["cell_type"]`` is the source
    cell's ``Group`` label, cell names are ``cell0000000``... The matrix is streamed to disk block by
    block, so a million-cell file is written in bounded memory.
    """
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import write_elem

    source = ad.read_h5ad(PANCREAS)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, source.n_obs, size=BASE_CELLS)
    base = sp.csr_matrix(source.X[picks], dtype=np.int64)
    base.data = rng.binomial(base.data, THIN)
    base.eliminate_zeros()
    base = sp.csr_matrix(base, dtype=np.float32)
    base_labels = source.obs["Group"].astype(str).to_numpy()[picks]
    row_nnz = np.diff(base.indptr)

    n_full, rest = divmod(n_cells, BASE_CELLS)
    nnz = int(row_nnz.sum()) * n_full + int(row_nnz[:rest].sum())
    tmp = path.with_suffix(".partial")
    with h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        X = f.create_group("X")
        X.attrs["encoding-type"] = "csr_matrix"
        X.attrs["encoding-version"] = "0.1.0"
        X.attrs["shape"] = (n_cells, base.shape[1])
        data = X.create_dataset("data", shape=(nnz,), dtype=np.float32)
        indices = X.create_dataset("indices", shape=(nnz,), dtype=np.int32)
        indptr = X.create_dataset("indptr", shape=(n_cells + 1,), dtype=np.int64)
        indptr[0] = 0
        row = pos = 0
        while row < n_cells:
            take = min(BASE_CELLS, n_cells - row)
            block = base[:take]
            data[pos : pos + block.nnz] = block.data
            indices[pos : pos + block.nnz] = block.indices
            indptr[row + 1 : row + take + 1] = block.indptr[1:] + pos
            row, pos = row + take, pos + block.nnz
        obs = pd.DataFrame(
            {LABEL_KEY: pd.Categorical(np.resize(base_labels, n_cells))},
            index=pd.Index([f"cell{i:07d}" for i in range(n_cells)]),
        )
        write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame(index=source.var_names.copy()))
        write_elem(f, "uns", {"benchmark_recipe": RECIPE, "benchmark_seed": seed})
        for key in ("obsm", "varm", "layers", "obsp", "varp"):
            write_elem(f, key, {})
    tmp.replace(path)


def dataset(workdir: Path, n_cells: int, rebuild: bool) -> Path:
    """The benchmark file for ``n_cells`` in ``workdir``, built unless an up-to-date one exists."""
    import h5py

    path = workdir / f"pbmclike_{n_cells}.h5ad"
    if path.exists() and not rebuild:
        with h5py.File(path, "r") as f:
            if tuple(f["X"].attrs["shape"])[0] == n_cells and f["uns/benchmark_recipe"][()] == RECIPE:
                return path
    t = time.perf_counter()
    make_dataset(path, n_cells)
    print(f"built {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.1f} s", flush=True)
    return path


# -------------------------------------------------------------------------------------------------
# Measured commands (each runs in a fresh subprocess)
# -------------------------------------------------------------------------------------------------


# Runs one command and reports its resources. It is started as its own small process because Linux
# carries the memory high-water mark of the process that spawns a child into the child's ru_maxrss
# (the benchmark driver holds hundreds of MiB after building the data).
_LAUNCHER = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
wall = time.perf_counter() - t
if proc.returncode:
    sys.stderr.write(proc.stderr.decode(errors="replace"))
u = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = u.ru_utime + u.ru_stime
print(json.dumps({"code": proc.returncode, "wall": wall, "cpu": cpu, "maxrss": u.ru_maxrss}))
"""


def run_measured(cmd: list[str]) -> tuple[float, float, int]:
    """Run ``cmd`` in a fresh process; return ``(wall seconds, CPU seconds, peak RSS in bytes)``.

    CPU time (user + system) does not grow when other processes compete for the cores, so it is the
    steadier figure on a shared machine.
    """
    launcher = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True)
    if launcher.returncode != 0 or not launcher.stdout.strip():
        raise SystemExit(f"could not measure {' '.join(cmd)}:\n{launcher.stderr}")
    result = json.loads(launcher.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        raise SystemExit(f"command failed ({result['code']}): {' '.join(cmd)}\n{launcher.stderr}")
    peak = result["maxrss"] * (1 if sys.platform == "darwin" else 1024)  # KiB on Linux
    return result["wall"], result["cpu"], peak


def cli_command(big: Path, out: Path, chunk_size: int) -> list[str]:
    exe = Path(sys.executable).with_name("cellscribe")
    prefix = [str(exe)] if exe.exists() else [sys.executable, "-m", "cellscribe.cli"]
    return prefix + [
        "sentences", str(big), "-o", str(out), "--format", "cellreasoner", "--label-key", LABEL_KEY,
        "--chunk-size", str(chunk_size),
    ]


def _instruction() -> str:
    """CellReasoner's direct-mode instruction, read from its reference output (not retyped)."""
    with gzip.open(REFERENCE, "rt", encoding="utf-8") as fh:
        return json.load(fh)[0]["instruction"]


def python_only(big: Path, out: Path, chunk_size: int, label_key: str = LABEL_KEY) -> int:
    """ranked-hvg on the backed file, written as CellReasoner JSON by a small streaming writer.

    The layout is that of CellReasoner's ``json.dump(records, fh, indent=4)``; ``--check`` verifies it
    byte for byte against CellReasoner's own output for the vendored pancreas file.
    """
    import anndata as ad

    from cellscribe.core.plugins import get_host
    from cellscribe.core.domain.ranking import encode_names, join_ranked
    from cellscribe.core.types import FeatureMatrix

    adata = ad.read_h5ad(big, backed="r")
    features = FeatureMatrix(X=adata.X, feature_names=adata.var_names, cell_ids=adata.obs_names)
    labels = adata.obs[label_key].astype(str).to_numpy()
    registry = get_host().registry
    chunks = registry.get("sentence", "ranked-hvg").build(
        features, state={}, chunk_size=chunk_size, strategies=registry.all("sentence")
    )
    instruction = json.dumps(_instruction())
    encoded = None
    n = 0
    with open(out, "wb") as fh:
        for chunk in chunks:
            if encoded is None:  # one vocabulary for the whole run: escape and encode it once
                encoded = encode_names([json.dumps(str(g))[1:-1] for g in chunk.vocabulary])
            sentences = join_ranked(encoded, chunk.indptr, chunk.indices)
            records = [
                f'    {{\n        "cell_name": {json.dumps(cid)},\n        "instruction": {instruction},\n'
                f'        "input": "{s}",\n        "output": {json.dumps(lab)}\n    }}'
                for cid, s, lab in zip(chunk.cell_ids, sentences, labels[n : n + len(chunk)])
            ]
            fh.write((("[\n" if n == 0 else ",\n") + ",\n".join(records)).encode("ascii"))
            n += len(records)
        fh.write(b"\n]" if n else b"[]")
    return n


def naive(big: Path, out: Path, n_cells: int) -> int:
    """CellReasoner's s01/s02 logic, minus densifying: whole file in memory, Python loop per cell."""
    import anndata as ad

    from cellscribe.plugins.sentences import cellreasoner_genes

    gene_list = list(cellreasoner_genes())
    instruction = _instruction()
    adata = ad.read_h5ad(big)[:n_cells]
    available = adata.var_names.tolist()
    matched = [g for g in gene_list if g in available]  # list membership, as in their s01
    X = adata[:, matched].X.tocsr()
    labels = adata.obs[LABEL_KEY].astype(str).tolist()
    records = []
    for i, name in enumerate(adata.obs_names):
        lo, hi = X.indptr[i], X.indptr[i + 1]
        cols = sorted(int(c) for c, v in zip(X.indices[lo:hi], X.data[lo:hi]) if v != 0)
        genes = [matched[c] for c in cols][:1000]
        records.append({
            "cell_name": name, "instruction": instruction, "input": ", ".join(genes), "output": labels[i],
        })
    with open(out, "w") as fh:
        json.dump(records, fh, indent=4)
    return len(records)


# -------------------------------------------------------------------------------------------------
# Per-chunk profile (in this process)
# -------------------------------------------------------------------------------------------------


def profile(big: Path, chunk_size: int, n_chunks: int) -> None:
    """Time the stages of the first ``n_chunks`` chunks: read, rank, join, JSON-encode."""
    import anndata as ad

    from cellscribe.core.domain.ranking import encode_names, join_ranked, rank_by_order
    from cellscribe.plugins.sentences.strategies import cellreasoner_genes, list_positions

    adata = ad.read_h5ad(big, backed="r")
    genes = cellreasoner_genes()
    position = list_positions(np.asarray(adata.var_names, dtype=object), genes)
    encoded = encode_names([json.dumps(str(g))[1:-1] for g in genes])
    totals = dict.fromkeys(("read", "rank", "join", "encode"), 0.0)
    n = 0
    for start in range(0, min(adata.n_obs, chunk_size * n_chunks), chunk_size):
        t0 = time.perf_counter()
        chunk = adata.X[start : start + chunk_size]
        t1 = time.perf_counter()
        indptr, ranked = rank_by_order(chunk, position, len(genes), 1000)
        t2 = time.perf_counter()
        sentences = join_ranked(encoded, indptr, ranked)
        t3 = time.perf_counter()
        "".join(f'"{s}"' for s in sentences).encode("ascii")
        t4 = time.perf_counter()
        for key, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            totals[key] += dt
        n += chunk.shape[0]
    per = {k: 1000 * v / (n / chunk_size) for k, v in totals.items()}
    print(f"per {chunk_size}-cell chunk (mean of {n // chunk_size}): "
          + ", ".join(f"{k} {v:.0f} ms" for k, v in per.items())
          + f"; {n / sum(totals.values()):,.0f} cells/s for these stages")


# -------------------------------------------------------------------------------------------------
# Driver
# -------------------------------------------------------------------------------------------------


def _self(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cellscribe-bench",
                        help="where the h5ad and outputs go (default: %(default)s)")
    parser.add_argument("--n-copies", type=int, default=39,
                        help="copies of the 2,700 base cells (default 39: 105,300 cells)")
    parser.add_argument("--cells", type=int, default=None, help="total cells (overrides --n-copies)")
    parser.add_argument("--chunk-size", type=int, default=10_000)
    parser.add_argument("--modes", default="cli,python,naive",
                        help="comma-separated from cli, python, naive (default: %(default)s)")
    parser.add_argument("--python-only", action="store_true", help="same as --modes python")
    parser.add_argument("--naive-cells", type=int, default=10_000, help="cells for the naive mode")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also time the stages of the first N chunks in this process")
    parser.add_argument("--check", action="store_true",
                        help="compare the first --naive-cells records of each output with the naive one")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the h5ad even if it exists")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the JSON outputs")
    # Internal: the measured subprocesses.
    parser.add_argument("--_run", choices=("python", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--_input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._run == "python":
        python_only(args._input, args._output, args.chunk_size)
        return
    if args._run == "naive":
        naive(args._input, args._output, args.naive_cells)
        return

    modes = ["python"] if args.python_only else [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - {"cli", "python", "naive"}
    if unknown:
        parser.error(f"unknown mode(s) {sorted(unknown)}; choose from cli, python, naive")
    n_cells = args.cells if args.cells is not None else BASE_CELLS * args.n_copies
    args.workdir.mkdir(parents=True, exist_ok=True)
    big = dataset(args.workdir, n_cells, args.rebuild)
    print(f"input: {big} ({n_cells:,} cells, {big.stat().st_size / 1e9:.2f} GB, CSR float32, uncompressed)")

    base_wall, base_cpu, base_rss = run_measured([sys.executable, "-c", "import cellscribe.cli"])
    print(f"{'baseline':9s} import cellscribe.cli: {base_wall:.2f} s wall, {base_cpu:.2f} s CPU, "
          f"peak RSS {base_rss / 2**20:.0f} MiB")
    outputs = {}
    for mode in modes:
        out = args.workdir / f"out_{mode}.json"
        out.unlink(missing_ok=True)
        cells = n_cells
        if mode == "cli":
            cmd = cli_command(big, out, args.chunk_size)
        elif mode == "python":
            cmd = _self("--_run", "python", "--_input", str(big), "--_output", str(out),
                        "--chunk-size", str(args.chunk_size))
        else:
            cells = min(args.naive_cells, n_cells)
            cmd = _self("--_run", "naive", "--_input", str(big), "--_output", str(out),
                        "--naive-cells", str(cells))
        wall, cpu, peak = run_measured(cmd)
        outputs[mode] = out
        print(f"{mode:9s} {cells:,} cells: {wall:.2f} s wall = {cells / wall:,.0f} cells/s; "
              f"{cpu:.2f} s CPU = {cells / cpu:,.0f} cells/CPU-s; peak RSS {peak / 2**20:.0f} MiB, "
              f"{(peak - base_rss) / 2**20:.0f} MiB above baseline; output {out.stat().st_size / 1e9:.2f} GB",
              flush=True)

    if args.profile:
        profile(big, args.chunk_size, args.profile)
    if args.check:
        _check(outputs, min(args.naive_cells, n_cells), args.workdir)
    if not args.keep_outputs:
        for out in outputs.values():
            out.unlink(missing_ok=True)


def _check(outputs: dict[str, Path], n: int, workdir: Path) -> None:
    """The python writer reproduces CellReasoner's reference file, and the first ``n`` records of every
    output equal the naive output's (outputs are parsed whole, so memory grows)."""
    reference = workdir / "pancreas_reference_check.json"
    python_only(PANCREAS, reference, 128, label_key="Group")
    with gzip.open(REFERENCE, "rb") as fh:
        same = fh.read() == reference.read_bytes()
    reference.unlink()
    print(f"check python writer on the pancreas file: {'identical to' if same else 'DIFFERS from'} "
          "CellReasoner's own output")
    if "naive" not in outputs:
        print("check skipped: needs the naive mode")
        return
    with open(outputs["naive"]) as fh:
        expected = json.load(fh)
    for mode, path in outputs.items():
        if mode == "naive":
            continue
        with open(path) as fh:
            got = json.load(fh)[:n]
        print(f"check {mode}: first {n:,} records {'match' if got == expected else 'DIFFER from'} naive")


if __name__ == "__main__":
    main()
