"""Every example runs from a fresh clone, with nothing beside it, from any working directory."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, *args: str, cwd: Path, before: str = "") -> str:
    code = f"{before}import runpy, sys; sys.argv = {[script, *args]!r}; runpy.run_path({script!r}, run_name='__main__')"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600, check=True
    ).stdout


def test_every_example_is_tested():
    assert {p.name for p in EXAMPLES.glob("*.py")} == {"pbmc68k_annotate.py", "atac_pbsmall.py"}


@pytest.mark.slow
def test_pbmc68k_main_job(tmp_path):
    out = _run(str(EXAMPLES / "pbmc68k_annotate.py"), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert "annotated 700 cells" in out and "700 ok" in out
    lineage = float(re.search(r"lineage \(T/NK, B, myeloid, progenitor\): ([0-9.]+)", out).group(1))
    assert lineage >= 0.93
    for name in ("pbmc68k_annotated.h5ad", "umap.png", "raw_outputs.jsonl"):
        assert (tmp_path / "run" / name).stat().st_size > 0


@pytest.mark.skipif(importlib.util.find_spec("snapatac2") is None, reason="needs the atac extra (snapatac2)")
@pytest.mark.slow
def test_atac_example_with_the_extra(tmp_path):
    out = _run(str(EXAMPLES / "atac_pbsmall.py"), cwd=tmp_path)
    right = float(re.search(r"default settings \(smoothing on\): lineage right for ([0-9.]+)%", out).group(1))
    assert right > 50
    assert (tmp_path / "cellscribe_atac_pbsmall" / "pbsmall_annotated.h5ad").stat().st_size > 0


def test_atac_example_without_the_extra_says_so_and_exits_0(tmp_path):
    out = _run(str(EXAMPLES / "atac_pbsmall.py"), cwd=tmp_path, before="import sys; sys.modules['snapatac2'] = None; ")
    assert 'pip install -e ".[atac]"' in out
    assert not (tmp_path / "cellscribe_atac_pbsmall").exists()
