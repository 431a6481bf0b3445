"""Benchmark: the ``openai`` backend's HTTP client against an instant local OpenAI-compatible server.

What it measures is the client: the server (``tests/_openai_server.py``, run in this process: HTTP/1.1,
``TCP_NODELAY``, a listen backlog of 1024) answers every request at once with a fixed label. Each run is
``cellscribe annotate CELLS.h5ad -o OUT --model openai:bench --base-url URL`` in a fresh process
(start-up, reading, sentences, prompts, requests, decoding and writing the h5ad and sidecar included), on
``--cells`` cells (pbmc68k_reduced repeated; zero-shot prompts of 50 genes).

Runs: ``default`` (the backend's defaults: 64 requests in flight on kept-alive connections) and ``c8``
(``--model-option max_concurrency=8``, the default before issue 16). For each: wall time, cells/s, the
client process's CPU time per request (user + system of the CLI process, from ``os.wait4``, start-up
included), requests the server saw, and how many TCP connections they came on (one per request when
none is kept alive). The bare start-up (``import cellscribe.cli`` plus ``--help``) is timed too.
``--nagle`` leaves Nagle's algorithm on in the server (its answers then wait for delayed ACKs and the
server sets the pace); ``--backlog 5`` listens with socketserver's default backlog (a client that opens
many connections at once overflows it, and the kernel retries them after ~1 s).

Usage::

    .venv/bin/python benchmarks/openai_client.py                    # 5,000 cells, default and c8
    .venv/bin/python benchmarks/openai_client.py --cells 20000 --runs default

Results: benchmarks/README.md ("The openai client").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _openai_server import OpenAIServer  # noqa: E402

RUNS = {"default": [], "c8": ["--model-option", "max_concurrency=8"]}


def write_cells(path: Path, n: int) -> None:
    import anndata as ad
    import scanpy as sc

    base = sc.datasets.pbmc68k_reduced().raw.to_adata()  # log-normalised values (X is scaled)
    copies = -(-n // base.n_obs)
    ad.concat([base] * copies, index_unique="-")[:n].copy().write_h5ad(path)


def timed(cmd: list[str]) -> tuple[float, float, int, str]:
    """Run ``cmd``; (wall s, CPU s of the child, exit status, stderr tail)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - t0
        err.seek(0)
        tail = err.read().decode(errors="replace")[-1500:]
    return wall, usage.ru_utime + usage.ru_stime, os.waitstatus_to_exitcode(status), tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=5000)
    parser.add_argument("--runs", default="default,c8")
    parser.add_argument("--nagle", action="store_true",
                        help="leave Nagle's algorithm on in the server (its default): headers and body then "
                             "go out in two segments and each answer can wait for a delayed ACK")
    parser.add_argument("--backlog", type=int, default=1024,
                        help="the server's listen backlog (socketserver's default is 5: a burst of new "
                             "connections then overflows it and the kernel retries them after ~1 s)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cellscribe-openai-bench")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.workdir / f"cells_{args.cells}.h5ad"
    if not data.exists():
        write_cells(data, args.cells)
    cli = [sys.executable, "-c", "from cellscribe.cli import main; main()"]
    wall, cpu, _, _ = timed([*cli, "--help"])
    print(f"{args.cells} cells; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}; "
          f"start-up (import + --help): {wall:.2f} s wall, {cpu:.2f} s CPU")

    server = OpenAIServer(answer=lambda body: "B cell", lifetime=3600)
    handler = server._httpd.RequestHandlerClass
    handler.disable_nagle_algorithm = not args.nagle
    server._httpd.socket.listen(args.backlog)
    with server:
        print(f"{'run':<8} {'wall s':>7} {'cells/s':>8} {'CPU ms/request':>15} {'requests':>9} {'connections':>12}")
        for name in [r.strip() for r in args.runs.split(",") if r.strip()]:
            server.requests.clear()
            connections_before = server.connections
            out = args.workdir / f"{name}.h5ad"
            cmd = [*cli, "annotate", str(data), "-o", str(out), "--model", "openai:bench", "--base-url",
                   server.base_url, "--no-progress", "--force", *RUNS[name]]
            wall, cpu, rc, tail = timed(cmd)
            if rc != 0:
                print(f"{name}: failed ({rc})\n{tail}")
                continue
            n = len(server.requests)
            print(f"{name:<8} {wall:>7.2f} {args.cells / wall:>8.0f} {1000 * cpu / max(n, 1):>15.2f} {n:>9} "
                  f"{server.connections - connections_before:>12}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
