"""The README's main job: examples/pbmc68k_annotate.py, offline, with the default model."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_pbmc68k_main_job(tmp_path):
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "pbmc68k_annotate.py"), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    assert "annotated 700 cells" in out and "700 ok" in out
    lineage = float(re.search(r"lineage \(T/NK, B, myeloid, progenitor\): ([0-9.]+)", out).group(1))
    assert lineage >= 0.93
    for name in ("pbmc68k_annotated.h5ad", "umap.png", "raw_outputs.jsonl"):
        assert (tmp_path / "run" / name).stat().st_size > 0
