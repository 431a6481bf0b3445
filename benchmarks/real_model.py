"""Benchmark: a real small instruct model (SmolLM2-135M-Instruct) annotating pbmc68k cells (issue 16).

Each run is the product path a user takes: ``cellscribe annotate pbmc68k.h5ad -o OUT --model MODEL
--limit N ...`` in a fresh process, timed from process start to exit (start-up, model load and writing
included). The model is the folder ``scripts/build_real_model.py`` builds (built first if absent); the
cells are the first ``--cells`` of scanpy's bundled ``pbmc68k_reduced`` (its ``raw.X``, top-expressed
sentences of 50 genes: ~290-token zero-shot prompts). Runs (``--runs``):

``default``
    zero-shot, direct mode, every setting at its default (CellReasoner's: sampling at temperature
    0.01, ``max_new_tokens=4096``).
``tokens32``
    the same with ``--generation max_new_tokens=32``.
``greedy32``
    greedy (``do_sample=false``), 32 new tokens: the local reference for ``openai-greedy32``.
``score``, ``constrained``
    ``--decode score`` / ``--decode constrained`` over ``--candidates`` (default five PBMC labels of
    different token lengths; their token counts are printed).
``openai-greedy32``
    ``greedy32`` through ``--model openai:NAME --base-url URL`` (``--openai-base-url``; the served name
    is ``--openai-model``, default the model folder as vLLM names it).
``openai-constrained``
    ``--decode constrained`` through the server's structured outputs (``guided_choice=true``).

For every run it prints the wall time and cells/s, how many outputs hit ``max_new_tokens`` (output
tokens >= the cap, from the sidecar), the label length in characters (min / median / mean / max), the
share of cells with status ``ok``, the share with a confidence, the share of labels among the
candidates (candidate runs), the label distribution (top 8), and for ``greedy32`` against
``openai-greedy32`` the share of cells with the same label and with the same raw output. Outputs stay in
``--workdir``; ``--reuse`` reads finished runs from there instead of running them again.

Usage::

    .venv/bin/python benchmarks/real_model.py                                  # default, tokens32, score, constrained
    .venv/bin/python benchmarks/real_model.py --runs greedy32,openai-greedy32 --openai-base-url http://127.0.0.1:8000/v1
    .venv/bin/python benchmarks/real_model.py --runs default --timeout 5400 --json out.json

Results: benchmarks/README.md ("A real small model").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CANDIDATES = (
    "B cell",
    "natural killer cell",
    "CD14-positive monocyte",
    "plasmacytoid dendritic cell",
    "CD8-positive, alpha-beta cytotoxic T cell",
)
RUNS = {
    "default": [],
    "reasoning": ["--mode", "reasoning"],
    "published": ["--prompt-option", "generation=published"],
    "tokens32": ["--generation", "max_new_tokens=32"],
    "greedy32": ["--generation", "do_sample=false", "--generation", "max_new_tokens=32"],
    "score": ["--decode", "score"],
    "constrained": ["--decode", "constrained"],
    "openai-greedy32": ["--generation", "do_sample=false", "--generation", "max_new_tokens=32"],
    "openai-constrained": ["--decode", "constrained", "--model-option", "guided_choice=true"],
}
CANDIDATE_RUNS = ("score", "constrained", "openai-constrained")


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_real_model", ROOT / "scripts" / "build_real_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_input(path: Path, n_cells: int) -> None:
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()[:n_cells].copy()
    adata.write_h5ad(path)


def cli() -> list[str]:
    return [sys.executable, "-c", "from cellscribe.cli import main; main()"]


def _timed(cmd: list[str], timeout: float | None) -> tuple[int | None, float, float, str]:
    """Run ``cmd``: (exit status or None when stopped at ``timeout``, wall s, CPU s of the child, stderr)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                rc = os.waitstatus_to_exitcode(status)
                break
            if timeout is not None and time.perf_counter() - t0 > timeout:
                process.kill()
                _, status, usage = os.wait4(process.pid, 0)
                rc = None
                break
            time.sleep(0.2)
        wall = time.perf_counter() - t0
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    process.returncode = -1  # reaped above
    return rc, wall, usage.ru_utime + usage.ru_stime, stderr


def run_one(name: str, args: argparse.Namespace, data: Path, workdir: Path, candidates_file: Path) -> dict:
    out = workdir / f"{name}.h5ad"
    record_file = workdir / f"{name}.run.json"
    if args.reuse and out.exists() and record_file.exists():
        return json.loads(record_file.read_text())
    cmd = [*cli(), "annotate", str(data), "-o", str(out), "--force", "--no-progress", "--limit", str(args.cells)]
    if name.startswith("openai"):
        if not args.openai_base_url:
            raise SystemExit(f"run {name} needs --openai-base-url")
        cmd += ["--model", f"openai:{args.openai_model or args.model}", "--base-url", args.openai_base_url,
                "--model-option", f"max_concurrency={args.openai_concurrency}"]
    else:
        cmd += ["--model", str(args.model)]
    if name in CANDIDATE_RUNS:
        cmd += ["--candidates-file", str(candidates_file)]
    cmd += RUNS[name]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[3:])}", flush=True)
    load = os.getloadavg()[0]
    rc, wall, cpu, stderr = _timed(cmd, args.timeout)
    record = {"run": name, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "rc": rc, "load_before": round(load, 2),
              "load_after": round(os.getloadavg()[0], 2), "output": str(out)}
    if rc != 0:
        ckpt = Path(str(out) + ".cellscribe.ckpt")
        record["error"] = "timed out" if rc is None else stderr.strip().splitlines()[-1:]
        record["checkpoint_files"] = len(list(ckpt.glob("*"))) if ckpt.exists() else 0
        print(f"  failed ({record['error']}); stderr tail:\n{stderr[-2000:]}", flush=True)
    record_file.write_text(json.dumps(record, indent=2))
    return record


def measure(record: dict, candidates: list[str]) -> dict:
    import anndata as ad
    import numpy as np
    import pandas as pd

    if record.get("rc") != 0:
        return record
    out = Path(record["output"])
    adata = ad.read_h5ad(out)
    obs = adata.obs
    params = adata.uns["cellscribe"]["params"]
    cap = {**params.get("generation_defaults", {}), **params.get("generation", {})}.get("max_new_tokens")
    from cellscribe.core.run.record import read_sidecar

    sidecar = read_sidecar(str(out) + ".cellscribe.jsonl.gz")
    sidecar = sidecar or []
    n_out = [r.get("n_output_tokens") for r in sidecar]
    labels = obs["cellscribe"].dropna().astype(str)
    lengths = labels.str.len().to_numpy()
    stats = dict(record)
    stats.update({
        "cells": int(adata.n_obs),
        "cells_per_s": round(adata.n_obs / record["wall_s"], 2),
        "max_new_tokens": cap,
        # Outputs cut off at max_new_tokens: their finish_reason (older runs: output tokens >= the cap).
        "hit_cap": int(sum(r.get("finish_reason") == "length" for r in sidecar))
        if any("finish_reason" in r for r in sidecar) else
        None if cap is None or any(n is None for n in n_out) else int(sum(n >= cap for n in n_out)),
        "finish_reasons": {str(k): int(v) for k, v in
                           pd.Series([r.get("finish_reason") for r in sidecar]).value_counts(dropna=False).items()},
        "unresolved_notes": {str(k): int(v) for k, v in obs.loc[obs["cellscribe_status"] != "ok", "cellscribe_note"]
                             .astype(str).str.replace(r"'.*'", "'...'", regex=True).value_counts().head(5).items()},
        "output_tokens_mean": None if any(n is None for n in n_out) else round(float(np.mean(n_out)), 1),
        "raw_kept": int(sum(bool(r.get("output")) for r in sidecar)),
        "prompts": len(sidecar),
        "label_chars": None if not len(lengths) else
        [int(lengths.min()), float(np.median(lengths)), round(float(lengths.mean()), 1), int(lengths.max())],
        "ok": round(float((obs["cellscribe_status"] == "ok").mean()), 3),
        "confidence_filled": round(float(obs["cellscribe_confidence"].notna().mean()), 3),
        "labels": {str(k): int(v) for k, v in labels.value_counts().head(8).items()},
        "raw": {r["unit_ids"][0]: r.get("output") for r in sidecar if len(r["unit_ids"]) == 1},
        "label_by_cell": {str(k): (None if v != v else str(v)) for k, v in obs["cellscribe"].astype(object).items()},
    })
    if record["run"] in CANDIDATE_RUNS:
        stats["legal"] = round(float(obs["cellscribe"].astype(object).isin(candidates).mean()), 3)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="model folder (default: build_real_model's default folder, built if absent)")
    parser.add_argument("--cells", type=int, default=100)
    parser.add_argument("--runs", default="default,tokens32,score,constrained")
    parser.add_argument("--candidates", default="|".join(DEFAULT_CANDIDATES), help="'|'-separated labels")
    parser.add_argument("--openai-base-url", default=None)
    parser.add_argument("--openai-model", default=None, help="served model name (default: --model)")
    parser.add_argument("--openai-concurrency", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cellscribe-real-model")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run before it is stopped")
    parser.add_argument("--reuse", action="store_true", help="read finished runs from --workdir")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)

    builder = _load_builder()
    args.model = str(builder.build(args.model) if args.model is None or not builder.is_built(Path(args.model))
                     else args.model)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; choose from {sorted(RUNS)}")
    candidates = [c for c in args.candidates.split("|") if c]
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.workdir / f"pbmc68k_{args.cells}.h5ad"
    if not data.exists():
        write_input(data, args.cells)
    candidates_file = args.workdir / "candidates.txt"
    candidates_file.write_text("\n".join(candidates) + "\n")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    print("candidates (tokens):", ", ".join(
        f"{c} ({len(tokenizer(c, add_special_tokens=False)['input_ids'])})" for c in candidates))
    print(f"model {args.model}; {args.cells} cells of pbmc68k_reduced; {os.cpu_count()} CPUs; workdir {args.workdir}")

    results = {}
    for name in runs:
        stats = measure(run_one(name, args, data, args.workdir, candidates_file), candidates)
        results[name] = stats
        shown = {k: v for k, v in stats.items() if k not in ("raw", "label_by_cell", "output")}
        print(f"  {json.dumps(shown)}", flush=True)
    pair = ("greedy32", "openai-greedy32")
    if all(results.get(p, {}).get("rc") == 0 for p in pair) or (
        args.reuse and all((args.workdir / f"{p}.run.json").exists() for p in pair)
    ):
        a, b = (results.get(p) or measure(json.loads((args.workdir / f"{p}.run.json").read_text()),
                                          candidates) for p in pair)
        cells = list(a["label_by_cell"])
        same_label = sum(a["label_by_cell"][c] == b["label_by_cell"].get(c) for c in cells) / len(cells)
        shared = [c for c in a["raw"] if c in b["raw"]]
        same_raw = sum(a["raw"][c] == b["raw"][c] for c in shared) / max(len(shared), 1)
        diffs = [(c, a["raw"][c], b["raw"][c]) for c in shared if a["raw"][c] != b["raw"][c]][:3]
        results["agreement"] = {"same_label": round(same_label, 3), "same_raw_output": round(same_raw, 3),
                                "first_differences": diffs}
        print("agreement greedy32 vs openai-greedy32:", json.dumps(results["agreement"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
