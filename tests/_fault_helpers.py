"""What the reliability and fault-injection tests share: the real ``cellscribe annotate`` run against the
scripted OpenAI-compatible server of ``_openai_server.py``, on real cells (the vendored pancreas data).

The server answers like a model that knows the pancreas marker genes (``rule_answer``), so every run has
a known, deterministic result to compare a resumed run with.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import pandas as pd
from _openai_server import user_text
from _rule_backend import PANCREAS_RULES
from click.testing import CliRunner

PANCREAS = Path(__file__).parent / "data" / "pancreas_baron_human_mouse_350.h5ad"
#: Cells per test run, and the run's batches: with --batch-size 1 and max_concurrency=2 the openai
#: backend sends 2 * 8 = 16 prompts per checkpointed batch, so 40 cells are 3 batches.
N_CELLS = 40
OPTIONS = ("--batch-size", "1", "--model-option", "max_concurrency=2", "--model-option", "backoff=0.01",
           "--model-option", "max_backoff=0.05", "--no-progress")


def rule_answer(body: Mapping[str, Any]) -> str:
    """The label of the first pancreas marker gene in the prompt's cell sentence, else ``"unknown"``."""
    for gene in user_text(body).replace("\n", ", ").split(", "):
        if gene in PANCREAS_RULES:
            return PANCREAS_RULES[gene]
    return "unknown"


def annotate_args(output: Path, base_url: str, *extra: str, source: Path = PANCREAS, n_cells: int = N_CELLS) -> list[str]:
    """``cellscribe annotate`` arguments for an ``openai:tiny`` run of the first ``n_cells`` cells."""
    return ["annotate", str(source), "-o", str(output), "--model", "openai:tiny", "--base-url", base_url,
            "--limit", str(n_cells), *OPTIONS, *extra]


def invoke(args: Sequence[str]) -> Any:
    """Run the command line in this process (a ``click.testing.Result``: ``exit_code``, ``output`` with
    stderr)."""
    from cellscribe.cli import main

    return CliRunner().invoke(main, list(args))


def cli_process(args: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """The command line in its own process (for ``kill -9`` and for two runs at once)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-c", "import sys; from cellscribe.cli import main; sys.exit(main())", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def kill_once_saved(process: subprocess.Popen, folder: Path, pattern: str, count: int, *, timeout: float = 90,
                    group: bool = False) -> int:
    """``kill -9`` ``process`` (its whole process group with ``group``) as soon as ``folder`` holds
    ``count`` files matching ``pattern`` (finished batches or chunks); returns how many it holds then."""
    try:
        deadline = time.monotonic() + timeout
        while len(list(folder.glob(pattern))) < count and process.poll() is None:
            assert time.monotonic() < deadline, f"the run never saved {count} {pattern} files"
            time.sleep(0.01)
        if group:
            os.killpg(process.pid, signal.SIGKILL)  # the whole job, as a scheduler or Ctrl-\ kills it
        else:
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return len(list(folder.glob(pattern)))


def result_columns(path: Path) -> pd.DataFrame:
    """The annotation columns of an annotated file (what must not change between a resumed run and an
    uninterrupted one)."""
    obs = ad.read_h5ad(path).obs
    return obs[[c for c in obs.columns if c.startswith("cellscribe")]]


def one_line(output: str) -> bool:
    """Whether a failed command said what went wrong without a Python traceback."""
    return "Traceback" not in output and any(line.startswith("Error:") for line in output.splitlines())
