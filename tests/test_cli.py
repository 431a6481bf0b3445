"""The command line: safe output handling, plan, sentences golden file, plugin listing."""

from __future__ import annotations

import gzip
import hashlib
import re
import sys
from pathlib import Path

import anndata as ad
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from _rule_backend import RulePlugin  # noqa: E402

from cellscribe.cli import main  # noqa: E402


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def rules(with_plugin):
    plugin = RulePlugin()
    with_plugin(plugin, "rules")
    return plugin.backend.model


@pytest.fixture
def runner():
    return CliRunner()


def test_annotate_writes_output_and_never_the_input(runner, rules, pancreas_path, tmp_path):
    src = tmp_path / "in.h5ad"
    src.write_bytes(pancreas_path.read_bytes())
    before = _sha(src)
    out = tmp_path / "out.h5ad"
    result = runner.invoke(main, ["annotate", str(src), "-o", str(out), "--model", "rules", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert _sha(src) == before
    annotated = ad.read_h5ad(out)
    assert {"cellscribe", "cellscribe_status", "cellscribe_confidence", "cellscribe_reasoning"} <= set(annotated.obs)
    assert (tmp_path / "out.h5ad.cellscribe.jsonl.gz").exists()  # compressed by default
    assert "annotated 350 cells" in result.output
    assert not list(tmp_path.glob("*.partial*"))

    again = runner.invoke(main, ["annotate", str(src), "-o", str(out), "--model", "rules"])
    assert again.exit_code != 0 and "already exists" in again.output and "--force" in again.output
    forced = runner.invoke(main, ["annotate", str(src), "-o", str(out), "--model", "rules", "--force", "--no-progress"])
    assert forced.exit_code == 0, forced.output

    same = runner.invoke(main, ["annotate", str(src), "-o", str(src), "--model", "rules", "--force"])
    assert same.exit_code != 0 and "never writes to its input" in same.output
    assert _sha(src) == before


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(runner, rules, pancreas_path, tmp_path, umask):
    import os

    out = tmp_path / "out.h5ad"
    previous = os.umask(umask)
    try:
        result = runner.invoke(main, ["annotate", str(pancreas_path), "-o", str(out), "--model", "rules",
                                      "--no-progress"])
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    expected = 0o666 & ~umask
    assert out.stat().st_mode & 0o777 == expected
    assert (tmp_path / "out.h5ad.cellscribe.jsonl.gz").stat().st_mode & 0o777 == expected


def test_annotate_help_is_clean(runner):
    text = runner.invoke(main, ["annotate", "--help"], terminal_width=200).output
    assert "[default: (" not in text  # no placeholder defaults
    for flag in ("--mode", "--seed"):
        line = next(line for line in text.splitlines() if line.strip().startswith(flag))
        words = re.sub(r"\[[^]]*\]", "", line).split()[2:]  # drop the flag, its metavar and [...]
        assert len(words) >= 3, f"{flag} has no help: {line!r}"


def test_failed_run_leaves_no_output(runner, rules, pancreas_path, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", boom)
    out = tmp_path / "out.h5ad"
    result = runner.invoke(main, ["annotate", str(pancreas_path), "-o", str(out), "--model", "rules", "--no-progress"])
    assert result.exit_code != 0
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_candidates_file_keeps_commas(runner, rules, pancreas_path, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("alpha\nbeta\ndelta\nactivated_stellate\nmacrophage\nCD8-positive, alpha-beta T cell\n")
    out = tmp_path / "out.h5ad"
    result = runner.invoke(main, ["annotate", str(pancreas_path), "-o", str(out), "--model", "rules",
                                  "--candidates-file", str(labels), "--limit", "20", "--no-progress"])
    assert result.exit_code == 0, result.output
    params = ad.read_h5ad(out).uns["cellscribe"]["params"]
    assert "CD8-positive, alpha-beta T cell" in list(params["candidates"])
    assert ad.read_h5ad(out).n_obs == 20


def test_dry_run_prints_plan_without_model(runner, rules, pancreas_path, tmp_path):
    # with the model's speed given, the plan and its cost come without calling the model
    result = runner.invoke(main, ["annotate", str(pancreas_path), "-o", str(tmp_path / "o.h5ad"),
                                  "--model", "rules", "--dry-run", "--rate", "prompts_per_s=100"])
    assert result.exit_code == 0, result.output
    assert "cells: 350" in result.output and "prompts: 350" in result.output
    assert "estimated_prompt_tokens" in result.output
    assert "estimate_model_time: 3.5 s" in result.output and "rate_source: given: prompts_per_s" in result.output
    assert rules.calls == [] and not (tmp_path / "o.h5ad").exists()


def test_bad_input_message_not_traceback(runner, rules, pancreas_path, tmp_path):
    result = runner.invoke(main, ["annotate", str(pancreas_path), "-o", str(tmp_path / "o.h5ad"),
                                  "--model", "rules", "--prompt", "k-shot", "--reference-key", "celltype"])
    assert result.exit_code == 1
    assert "no obs column 'celltype'" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("mode", ["direct", "reasoning"])
def test_sentences_cellreasoner_golden_file(runner, host, pancreas_path, data_dir, tmp_path, mode):
    out = tmp_path / f"{mode}.json"
    args = ["sentences", str(pancreas_path), "-o", str(out), "--format", "cellreasoner", "--label-key", "Group"]
    result = runner.invoke(main, args + (["--reasoning"] if mode == "reasoning" else []))
    assert result.exit_code == 0, result.output
    expected = gzip.decompress((data_dir / f"pancreas_350_cellreasoner_{mode}.json.gz").read_bytes())
    assert out.read_bytes() == expected


def test_plugins_command_lists_builtins(runner, host):
    result = runner.invoke(main, ["plugins"])
    assert result.exit_code == 0
    for name in ("io", "rna", "sentences", "prompting", "transformers"):
        assert f"{name}  (cellscribe.plugins.{name}, built-in" in result.output
    assert "modality:rna" in result.output and "prompt:puzzle" in result.output


def test_adapters_command_lists_shipped_manifests(runner, host):
    result = runner.invoke(main, ["adapters"])
    assert result.exit_code == 0
    for name in ("cellreasoner-7b", "cellreasoner-32b", "cell-o1"):
        assert f"{name}:" in result.output
    assert "base ncbi/Cell-o1" in result.output


def test_main_help_lists_every_command_without_building_it():
    from cellscribe import cli

    for name, (build, line) in cli._LAZY_COMMANDS.items():
        full = " ".join((build().help or "").split())
        assert full.startswith(line.removesuffix("...")), f"cellscribe --help misdescribes {name}"
    text = CliRunner().invoke(main, ["--help"]).output
    assert all(name in text for name in cli._LAZY_COMMANDS)


def test_progress_bar_only_on_a_terminal(runner, rules, pancreas_path, tmp_path):
    # --progress is the default; to a pipe or a log file the bar is not drawn (tqdm would write its
    # first and last state as two bars).
    out = tmp_path / "out.h5ad"
    result = runner.invoke(main, ["annotate", str(pancreas_path), "-o", str(out), "--model", "rules"])
    assert result.exit_code == 0, result.output
    assert "prompt/s" not in result.output and "%|" not in result.output


def test_result_columns_become_categoricals_as_anndata_makes_them():
    """The writer of a backed run's results orders categories as anndata's strings_to_categoricals
    (natsort's natural order), with a faster key for ASCII text."""
    import random

    import numpy as np
    import pandas as pd
    from natsort import natsort_keygen

    from cellscribe.cli._files import natural_key, strings_to_categoricals

    rng = random.Random(0)
    alphabet = "ab Z0123456789.,-+()_:é٣²"
    texts = ["", "0", "007x", "a01", "a1", "a1.5", " 1", "x٣", "²", "CD8+ T (2.10)", "CD8+ T (2.9)"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10))) for _ in range(3000)]
    keygen = natsort_keygen()
    assert [natural_key(t) for t in texts] == [keygen(t) for t in texts]
    values = [rng.choice(texts) for _ in range(5000)]
    frame = pd.DataFrame({"repeated": values, "unique": [f"u{i}" for i in range(5000)],
                          "number": np.arange(5000.0)}, index=[str(i) for i in range(5000)])
    ours, theirs = frame.copy(), frame.copy()
    strings_to_categoricals(ours)
    ad.AnnData(obs=theirs).strings_to_categoricals(theirs)
    for column in frame:
        assert ours[column].dtype == theirs[column].dtype
        if isinstance(theirs[column].dtype, pd.CategoricalDtype):
            assert list(ours[column].cat.categories) == list(theirs[column].cat.categories)
        assert ours[column].astype(object).equals(theirs[column].astype(object))
