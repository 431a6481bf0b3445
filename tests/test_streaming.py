"""Streaming annotate (issue 18 item 2): a backed ``.h5ad`` annotated chunk by chunk of cells gives what an
in-memory run gives, writes its results as the chunks come, resumes by chunk after ``kill -9``, and leaves
the input untouched; the sidecar is compressed and the obs reasoning compact by default (issue 15 item 5).
"""

from __future__ import annotations

import hashlib
import signal
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import cellscribe as cs
from cellscribe.core.run.record import read_sidecar
from cellscribe.core.run.results import SHORT_REASONING
from cellscribe.core.run.stream import sample_rows, streaming_obstacle
from cellscribe.core.spec import RunSpec

sys.path.insert(0, str(Path(__file__).parent))
from _fault_helpers import (  # noqa: E402
    OPTIONS,
    PANCREAS,
    cli_process,
    invoke,
    kill_once_saved,
    result_columns,
    rule_answer,
)
from _openai_server import OpenAIServer  # noqa: E402

QUIET = {"progress": False}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cells40(tmp_path_factory) -> Path:
    """The first 40 pancreas cells as their own file (a streamed run reads the whole file)."""
    path = tmp_path_factory.mktemp("stream") / "cells40.h5ad"
    ad.read_h5ad(PANCREAS)[:40].copy().write_h5ad(path)
    return path


def _markers_args(source: Path, out: Path, *extra: str) -> list[str]:
    return ["annotate", str(source), "-o", str(out), "--model", "markers", "--no-progress", *extra]


@pytest.mark.parametrize("workers", [pytest.param("1", marks=pytest.mark.slow), "2"])  # the markers model answers chunks in forked processes
def test_a_streamed_run_equals_the_in_memory_run_and_never_touches_the_input(tmp_path, workers):
    before = _digest(PANCREAS)
    streamed, in_memory = tmp_path / "streamed.h5ad", tmp_path / "in_memory.h5ad"
    first = invoke(_markers_args(PANCREAS, streamed, "--stream", "--chunk-size", "100", "--workers", workers))
    second = invoke(_markers_args(PANCREAS, in_memory, "--no-stream"))
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert _digest(PANCREAS) == before
    pd.testing.assert_frame_equal(result_columns(streamed), result_columns(in_memory))
    out = ad.read_h5ad(streamed)
    assert out.n_obs == 350 and (out.X != ad.read_h5ad(PANCREAS).X).nnz == 0  # the input's data, as it was
    entry = out.uns["cellscribe"]
    assert entry["params"]["streamed"]["n_chunks"] == 4 and entry["summary"]["n_chunks"] == 4
    assert entry["params"]["streamed"]["workers"] == int(workers)
    assert entry["summary"]["n_ok"] == (out.obs["cellscribe_status"] == "ok").sum()
    in_memory_summary = ad.read_h5ad(in_memory).uns["cellscribe"]["summary"]
    for key in ("mean_confidence", "n_confident", "warning"):  # one rule for both paths
        assert entry["summary"][key] == in_memory_summary[key]
    assert entry["summary"]["mean_confidence"] >= 0.25 and entry["summary"]["warning"] == ""
    records = read_sidecar(tmp_path / "streamed.h5ad.cellscribe.jsonl.gz")
    assert [r["prompt_index"] for r in records] == list(range(350))  # one record per cell, in order
    assert [r["unit_ids"][0] for r in records] == list(out.obs_names)
    assert records == read_sidecar(tmp_path / "in_memory.h5ad.cellscribe.jsonl.gz")


def test_tl_annotate_of_a_backed_anndata_streams_into_obs_and_writes_no_file(tmp_path):
    backed = ad.read_h5ad(PANCREAS, backed="r")
    listed = sorted(tmp_path.iterdir())
    cs.tl.annotate(backed, model="markers", chunk_size=128, sidecar=False, **QUIET)
    in_memory = ad.read_h5ad(PANCREAS)
    cs.tl.annotate(in_memory, model="markers", sidecar=False, **QUIET)
    assert backed.isbacked and sorted(tmp_path.iterdir()) == listed
    columns = [c for c in in_memory.obs if c.startswith("cellscribe")]
    for column in columns:
        np.testing.assert_array_equal(np.asarray(backed.obs[column], dtype=object),
                                      np.asarray(in_memory.obs[column], dtype=object))
    assert backed.uns["cellscribe"]["summary"]["n_chunks"] == 3


@pytest.mark.slow
def test_killed_half_way_with_sigkill_the_same_command_resumes_by_chunk_and_ends_identical(tmp_path, cells40):
    reference = tmp_path / "reference.h5ad"
    out = tmp_path / "out.h5ad"
    folder = out.with_name(out.name + ".cellscribe.ckpt")
    stream = ("--stream", "--chunk-size", "10")
    with OpenAIServer(answer=rule_answer, delay=0.05, lifetime=120) as running:
        base = ["annotate", str(cells40), "--model", "openai:tiny", "--base-url", running.base_url, *OPTIONS, *stream]
        assert invoke([*base, "-o", str(reference)]).exit_code == 0
        assert len(running.requests) == 40
        args = [*base, "-o", str(out)]
        process = cli_process(args)
        done = kill_once_saved(process, folder, "chunk-*.json", 2)
        assert process.returncode == -signal.SIGKILL and 2 <= done < 4 and not out.exists()
        sent = len(running.requests)
        again = invoke(args)
        assert again.exit_code == 0, again.output
        assert len(running.requests) - sent <= 40 - 10 * done  # finished chunks are never sent again
    pd.testing.assert_frame_equal(result_columns(out), result_columns(reference))
    assert ad.read_h5ad(out).uns["cellscribe"]["summary"]["resumed_chunks"] >= done
    records = read_sidecar(tmp_path / "out.h5ad.cellscribe.jsonl.gz")
    assert records == read_sidecar(tmp_path / "reference.h5ad.cellscribe.jsonl.gz")
    assert not folder.exists()  # OUTPUT holds everything


def test_runs_that_need_every_cell_are_not_streamed_and_say_why(tmp_path):
    assert streaming_obstacle(RunSpec.from_kwargs(model="markers")) is None
    assert "groupby" in streaming_obstacle(RunSpec.from_kwargs(model="markers", groupby="Group"))
    result = invoke(_markers_args(PANCREAS, tmp_path / "out.h5ad", "--stream", "--groupby", "Group"))
    assert result.exit_code == 2 and "cannot be streamed" in result.output and "groupby" in result.output
    # Backed data with groupby is read into memory (the whole group is needed), never refused.
    backed = ad.read_h5ad(PANCREAS, backed="r")
    cs.tl.annotate(backed, model="markers", groupby="Group", sidecar=False, **QUIET)
    assert backed.obs["cellscribe"].notna().all()


def test_the_plan_of_a_large_file_reads_a_bounded_sample():
    rows = sample_rows(1_000_000)
    assert len(rows) == 10_000 and rows[0] == 0 and rows[-1] == 999_999
    assert np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(sample_rows(500), np.arange(500))


def test_reasoning_is_kept_short_by_default_full_on_request_or_not_at_all(tmp_path):
    cells = ad.read_h5ad(PANCREAS)[:30].copy()
    short, full, none = cells.copy(), cells.copy(), cells.copy()
    cs.tl.annotate(short, model="markers", sidecar=None, **QUIET)
    cs.tl.annotate(full, model="markers", sidecar=None, reasoning="full", **QUIET)
    cs.tl.annotate(none, model="markers", sidecar=None, reasoning="none", **QUIET)
    assert "cellscribe_reasoning" not in none.obs
    kept, whole = short.obs["cellscribe_reasoning"], full.obs["cellscribe_reasoning"]
    assert kept.str.len().max() <= SHORT_REASONING and (kept.str.len() > 0).all()
    assert (whole.str.len() > kept.str.len()).all()
    assert all(w.rstrip().endswith(k.rstrip("\u2026").rstrip()) or k.endswith("\u2026") for k, w in zip(kept, whole))
    raw = short.uns["cellscribe"]["raw"]  # the whole text stays with the run
    assert all(w in r for w, r in zip(whole, raw["output"]))
    pd.testing.assert_series_equal(short.obs["cellscribe"], full.obs["cellscribe"])


def test_the_sidecar_is_compressed_by_default_and_none_keeps_no_file(tmp_path, cells40):
    out = tmp_path / "out.h5ad"
    assert invoke(_markers_args(cells40, out)).exit_code == 0
    sidecar = tmp_path / "out.h5ad.cellscribe.jsonl.gz"
    assert sidecar.read_bytes()[:2] == b"\x1f\x8b" and len(read_sidecar(sidecar)) == 40
    plain = tmp_path / "plain.jsonl"
    assert invoke(_markers_args(cells40, tmp_path / "b.h5ad", "--sidecar", str(plain))).exit_code == 0
    assert plain.read_bytes()[:1] == b"{" and read_sidecar(plain) == read_sidecar(sidecar)
    assert invoke(_markers_args(cells40, tmp_path / "c.h5ad", "--sidecar", "none")).exit_code == 0
    assert not any(p.name.startswith("c.h5ad.cellscribe") for p in tmp_path.iterdir())
    assert ad.read_h5ad(tmp_path / "c.h5ad").uns["cellscribe"]["sidecar"] == ""


def test_a_batch_fingerprint_tells_apart_what_json_tells_apart():
    from cellscribe.core.run.checkpoint import fingerprint
    from cellscribe.core.types import Prompt

    def prompt(**kw):
        base = dict(messages=({"role": "user", "content": "CD3E, CD8A"},), unit_ids=("c1",), strategy="zero-shot",
                    generation={"do_sample": True})
        return Prompt(**{**base, **kw})

    same = fingerprint([prompt(), prompt()], "m", {})
    assert same == fingerprint([prompt(), prompt()], "m", {})
    variants = [
        [prompt(generation={"do_sample": 1}), prompt()],  # True == 1 in Python, not in JSON
        [prompt(messages=({"role": "user", "content": "CD3E, CD8"},)), prompt()],
        [prompt(messages=({"role": "user", "content": "CD3E"}, {"role": "user", "content": ", CD8A"})), prompt()],
        [prompt(unit_ids=("c2",)), prompt()],
        [prompt(tissue="blood"), prompt()],
    ]
    assert len({same, *(fingerprint(v, "m", {}) for v in variants)}) == len(variants) + 1


def test_a_shared_object_is_fingerprinted_as_its_equal_copies_are():
    from cellscribe.core.run.checkpoint import fingerprint
    from cellscribe.core.types import Prompt

    shared = {"do_sample": True, "stop_strings": ["x"]}

    def prompt(generation):
        return Prompt(messages=({"role": "user", "content": "CD3E"},), unit_ids=("c1",), strategy="zero-shot",
                      generation=generation)

    assert fingerprint([prompt(shared), prompt(shared)], "m", {}) == fingerprint(
        [prompt(dict(shared)), prompt(dict(shared))], "m", {})


def test_the_last_batch_of_a_part_is_saved_only_when_the_part_has_a_failed_prompt(tmp_path):
    """run_batches(save_last=False), as a streamed chunk runs its batches: the chunk file that follows
    holds the last batch's answers, unless a prompt failed (then every batch stays for the re-run)."""
    from cellscribe.core.run.checkpoint import Checkpoint, run_batches
    from cellscribe.core.types import Generation, Prompt

    class Model:
        def __init__(self, failing=()):
            self.failing = set(failing)

        def generate(self, prompts, **_):
            return [Generation(text="", error="boom") if p.unit_ids[0] in self.failing else Generation(text="ok")
                    for p in prompts]

    prompts = [Prompt(messages=({"role": "user", "content": f"g{i}"},), unit_ids=(f"c{i}",), strategy="zero-shot")
               for i in range(5)]
    for failing, saved in (((), ["batch-a000000.json", "batch-a000001.json"]),
                           (("c0",), ["batch-a000000.json", "batch-a000001.json", "batch-a000002.json"])):
        with Checkpoint.open(tmp_path / f"ckpt{len(failing)}", {"model": "m"}) as checkpoint:
            out = run_batches(Model(failing), prompts, settings={}, model="m", batch_prompts=2, checkpoint=checkpoint,
                              part="a", save_last=False)
            assert [p.name for p in checkpoint.batches("a")] == saved
            assert [g.text for g in out.generations] == ["" if f"c{i}" in failing else "ok" for i in range(5)]


@pytest.mark.slow
def test_a_mudata_modality_on_disk_streams_and_equals_the_in_memory_run(tmp_path):
    mudata = pytest.importorskip("mudata")
    source = Path(__file__).parent / "data" / "multiome" / "pbmc10k_multiome_1000cells_subset.h5mu"
    streamed, in_memory = tmp_path / "streamed.h5mu", tmp_path / "in_memory.h5mu"
    first = invoke(_markers_args(source, streamed, "--mod", "rna", "--stream", "--chunk-size", "300"))
    second = invoke(_markers_args(source, in_memory, "--mod", "rna", "--no-stream"))
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    a, b = mudata.read_h5mu(streamed), mudata.read_h5mu(in_memory)
    columns = [c for c in b.mod["rna"].obs if c.startswith("cellscribe")]
    assert columns and all(a.mod["rna"].obs[c].equals(b.mod["rna"].obs[c]) for c in columns)
    assert "rna:cellscribe" in a.obs and "rna:cellscribe" in a.uns
    assert a.mod["atac"].shape == b.mod["atac"].shape  # every modality kept


@pytest.mark.slow
def test_a_markers_run_on_a_kept_checkpoint_resumes_every_chunk_in_a_new_process(tmp_path, cells40):
    """The markers model sets a sentence preference that is a function: the chunks' key must not hold
    its memory address, or a new process never resumes a chunk."""
    folder = tmp_path / "kept"
    args = ("--stream", "--chunk-size", "10", "--checkpoint", str(folder), "--workers", "1")
    first = cli_process(_markers_args(cells40, tmp_path / "a.h5ad", *args))
    second_args = _markers_args(cells40, tmp_path / "b.h5ad", *args)
    assert first.wait(timeout=300) == 0, first.stdout.read()
    assert len(list(folder.glob("chunk-*.json"))) == 4  # a named folder is kept
    second = cli_process(second_args)
    assert second.wait(timeout=300) == 0, second.stdout.read()
    assert ad.read_h5ad(tmp_path / "b.h5ad").uns["cellscribe"]["summary"]["resumed_chunks"] == 4
    pd.testing.assert_frame_equal(result_columns(tmp_path / "a.h5ad"), result_columns(tmp_path / "b.h5ad"))
