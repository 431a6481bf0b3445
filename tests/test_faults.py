"""Fault injection: the real ``cellscribe annotate`` against a scripted OpenAI-compatible server that
misbehaves (empty, huge and NUL answers, HTTP 400, 401, 429, 500, timeouts, a 200 that is not JSON,
connections refused or cut, a server killed mid-run), against bad files, and killed itself with ``kill -9``.

Each case asserts the exit status (README, "Reliability": 0 answered, 1 error, 2 usage, 3 some prompts
unanswered, 4 none answered), the message, what was written, and that the same command run again once
the server is back ends with exactly the result of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cellscribe.core.run.record import read_sidecar

sys.path.insert(0, str(Path(__file__).parent))
from _fault_helpers import (  # noqa: E402
    N_CELLS,
    PANCREAS,
    annotate_args,
    cli_process,
    invoke,
    kill_once_saved,
    one_line,
    result_columns,
    rule_answer,
)
from _openai_server import OpenAIServer  # noqa: E402

#: The model options of a run are transport settings unless they change answers: a short timeout
#: keeps the timeout cases fast and is not part of the checkpoint's identity.
FAST_TIMEOUT = ("--model-option", "timeout=1")
ATAC = Path(__file__).parent / "data" / "atac"


pytestmark = pytest.mark.usefixtures("no_openai_env")


@pytest.fixture
def server():
    with OpenAIServer(answer=rule_answer, lifetime=120) as running:
        yield running


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The result of an uninterrupted run (what every resumed run must end with)."""
    out = tmp_path_factory.mktemp("reference") / "reference.h5ad"
    with OpenAIServer(answer=rule_answer, lifetime=120) as running:
        result = invoke(annotate_args(out, running.base_url))
        assert result.exit_code == 0, result.output
        assert len(running.requests) == N_CELLS
    return result_columns(out)


def _checkpoint(out: Path) -> Path:
    return out.with_name(out.name + ".cellscribe.ckpt")


# -- what a model may answer -----------------------------------------------------------------------------


@pytest.mark.parametrize("answer, note", [
    ("", "empty"),
    ("alpha\x00\x00 cell\x1b", "control character"),
    ("beta " * 50_000, None),  # a 250 kB answer (50,000 words)
])
def test_odd_answers_are_kept_and_the_run_succeeds(tmp_path, answer, note):
    out = tmp_path / "out.h5ad"
    with OpenAIServer(answer=lambda body: answer, lifetime=120) as running:
        result = invoke(annotate_args(out, running.base_url, "--n-genes", "20", "--sentence", "top-expressed"))
    assert result.exit_code == 0, result.output
    obs = ad.read_h5ad(out).obs
    assert len(obs) == N_CELLS and not _checkpoint(out).exists()
    if note:
        assert obs["cellscribe_note"].astype(str).str.contains(note).all()
    raw = read_sidecar(tmp_path / "out.h5ad.cellscribe.jsonl.gz")
    assert [r["output"] for r in raw] == [answer] * N_CELLS  # the raw answer, byte for byte, in the sidecar


def test_a_poisoned_checkpoint_resumes(tmp_path):
    """Answers with NUL saved in a checkpoint: the next run reads them back and writes its output."""
    out, folder = tmp_path / "out.h5ad", tmp_path / "kept"
    with OpenAIServer(answer=lambda body: "beta\x00", lifetime=120) as running:
        first = invoke(annotate_args(out, running.base_url, "--checkpoint", str(folder)))
        again = invoke(annotate_args(out, running.base_url, "--checkpoint", str(folder), "--force"))
        assert len(running.requests) == N_CELLS  # the second run sent nothing
    assert first.exit_code == 0 and again.exit_code == 0, again.output
    assert (ad.read_h5ad(out).obs["cellscribe_status"] == "ok").all()


# -- what a server may do -------------------------------------------------------------------------------


@pytest.mark.parametrize("status, requests, message", [
    (400, "all", "HTTP 400"),
    (401, "few", "OPENAI_API_KEY"),
    (404, "few", "check base_url"),
    (500, "few", "not answering"),
])
def test_every_request_refused_exits_4_and_writes_nothing(tmp_path, server, status, requests, message):
    server.fail(status, times=10_000)
    out = tmp_path / "out.h5ad"
    result = invoke(annotate_args(out, server.base_url))
    assert result.exit_code == 4, result.output
    assert message in result.output and "nothing was written" in result.output
    assert not out.exists() and not _checkpoint(out).exists()  # no answer to resume
    raw = read_sidecar(tmp_path / "out.h5ad.cellscribe.jsonl.gz")
    assert len(raw) == N_CELLS and all(r["error"] for r in raw)  # the sidecar says what each request got
    if requests == "all":  # a 400 is the prompt's own problem: each prompt once, never retried
        assert len(server.requests) == N_CELLS
    else:  # the run stops: no request for every remaining prompt
        assert len(server.requests) < N_CELLS


def test_no_server_exits_4_without_waiting_out_the_retries(tmp_path):
    with OpenAIServer() as gone:
        url = gone.base_url  # the port is free again: connections are refused
    out = tmp_path / "out.h5ad"
    result = invoke(annotate_args(out, url))
    assert result.exit_code == 4, result.output
    assert "not answering" in result.output and "Connection refused" in result.output
    assert not out.exists()


@pytest.mark.parametrize("fault", ["429", "500", "drop", "timeout"])
def test_transient_faults_are_retried(tmp_path, server, uninterrupted, fault):
    if fault == "429":
        server.fail(429, times=3, retry_after="0")
    elif fault == "500":
        server.fail(500, times=3)
    elif fault == "drop":
        server.drop(times=2)
    else:
        server.stall(3.0, times=1)
    out = tmp_path / "out.h5ad"
    result = invoke(annotate_args(out, server.base_url, *FAST_TIMEOUT))
    assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(result_columns(out), uninterrupted)
    assert len(server.requests) > N_CELLS  # the failed attempts were sent again


@pytest.mark.parametrize("fault", [pytest.param("timeout", marks=pytest.mark.slow), "not-json"])
def test_prompts_without_answer_exit_3_and_the_same_command_resumes_only_them(tmp_path, server, uninterrupted, fault):
    if fault == "timeout":
        server.stall(3.0, times=4)  # two prompts time out twice (one retry each)
    else:
        server.garbage(times=2)  # not retried: two prompts fail
    out = tmp_path / "out.h5ad"
    args = annotate_args(out, server.base_url, *FAST_TIMEOUT)
    first = invoke(args)
    assert first.exit_code == 3, first.output
    assert "2 of 40 prompts got no answer" in first.output and "same command again" in first.output
    obs = ad.read_h5ad(out).obs
    failed = obs["cellscribe_note"].astype(str).str.contains("generation failed")
    assert failed.sum() == 2 and (obs.loc[failed, "cellscribe_status"] == "unresolved").all()
    assert (obs.loc[~failed, "cellscribe_status"] == "ok").all()  # finished answers kept
    assert _checkpoint(out).exists()

    sent = len(server.requests)
    again = invoke(args)  # the same command: no --force needed for OUTPUT it left unfinished
    assert again.exit_code == 0, again.output
    assert len(server.requests) - sent == 2  # only the failed prompts
    pd.testing.assert_frame_equal(result_columns(out), uninterrupted)
    assert not _checkpoint(out).exists()


def test_an_output_changed_since_is_not_replaced_without_force(tmp_path, server):
    server.garbage(times=1)
    out = tmp_path / "out.h5ad"
    args = annotate_args(out, server.base_url)
    assert invoke(args).exit_code == 3
    os.utime(out, ns=(time.time_ns(), time.time_ns() + 10**9))  # someone touched OUTPUT since
    again = invoke(args)
    assert again.exit_code == 1 and "already exists" in again.output


def test_server_killed_mid_run_then_back(tmp_path, uninterrupted):
    out = tmp_path / "out.h5ad"
    with OpenAIServer(answer=rule_answer, lifetime=120) as first_server:
        first_server.kill_after(20)  # the first batch (16 prompts) and part of the second
        args = annotate_args(out, first_server.base_url)
        first = invoke(args)
        port = first_server.port
    assert first.exit_code == 3, first.output
    assert "not answering" in first.output
    answered = (ad.read_h5ad(out).obs["cellscribe_status"] == "ok").sum()
    assert 16 <= answered <= 24  # what was answered before the server died is in OUTPUT

    with OpenAIServer(answer=rule_answer, lifetime=120, port=port) as back:
        again = invoke(args)
        assert again.exit_code == 0, again.output
        assert len(back.requests) == N_CELLS - answered
    pd.testing.assert_frame_equal(result_columns(out), uninterrupted)


@pytest.mark.slow
def test_killed_with_sigkill_at_a_random_batch_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted):
    """``kill -9`` of the command while it runs; the same command again ends as an uninterrupted run."""
    out = tmp_path / "out.h5ad"
    folder = _checkpoint(out)
    stop_after = random.Random().randint(1, 2)  # finished batches before the kill (of 3)
    with OpenAIServer(answer=rule_answer, delay=0.1, lifetime=120) as running:
        args = annotate_args(out, running.base_url)
        process = cli_process(args)
        saved = kill_once_saved(process, folder, "batch-*.json", stop_after)
        assert process.returncode == -signal.SIGKILL and 1 <= saved < 3 and not out.exists()
        sent = len(running.requests)
        again = invoke(args)  # the lock died with the process: the folder is free
        assert again.exit_code == 0, again.output
        assert len(running.requests) - sent <= N_CELLS - 16 * saved
    pd.testing.assert_frame_equal(result_columns(out), uninterrupted)
    assert not folder.exists()


@pytest.mark.slow
def test_two_runs_on_one_output_do_not_share_a_checkpoint(tmp_path):
    out = tmp_path / "out.h5ad"
    folder = _checkpoint(out)
    with OpenAIServer(answer=rule_answer, delay=0.05, lifetime=120) as slow, \
            OpenAIServer(answer=lambda body: "gamma", lifetime=120) as other:
        first = cli_process(annotate_args(out, slow.base_url))
        try:
            deadline = time.monotonic() + 90
            while not (folder / "OWNER").exists():
                assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
                time.sleep(0.02)
            second = invoke(annotate_args(out, other.base_url))
            assert second.exit_code == 1 and "in use by run" in second.output and one_line(second.output)
            assert other.requests == []
            output, _ = first.communicate(timeout=120)
        finally:
            if first.poll() is None:
                first.kill()
    assert first.returncode == 0, output
    assert not ad.read_h5ad(out).obs["cellscribe"].astype(str).eq("gamma").any()


# -- bad files and bad requests: refused before any model work ------------------------------------------


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    truncated = tmp_path / "truncated.h5ad"
    truncated.write_bytes(PANCREAS.read_bytes()[:5000])
    text = tmp_path / "text.h5ad"
    text.write_text("cell\tgene\n")
    not_gzip = tmp_path / "fragments.tsv.gz"
    not_gzip.write_text("chr1\t100\t200\tAAAC-1\t1\n")
    empty = tmp_path / "labels.txt"
    empty.write_text("\n  \n")
    return {
        "truncated": ([str(truncated)], "truncated"),
        "not-hdf5": ([str(text)], "not an HDF5 file"),
        "not-gzip": ([str(not_gzip), "--modality", "atac", "--gtf", str(ATAC / "hg19_chr5_chr11_genes.gtf.gz"),
                      "--chrom-sizes", str(ATAC / "hg19.chrom.sizes")],
                     "not gzip-compressed"),
        "empty-candidates": ([str(PANCREAS), "--candidates-file", str(empty)], "holds no label"),
        "one-candidate": ([str(PANCREAS), "--candidate", "alpha"], "single candidate"),
    }


@pytest.mark.parametrize("case", ["truncated", "not-hdf5", "not-gzip", "empty-candidates", "one-candidate"])
def test_bad_input_is_one_line_before_any_request(tmp_path, server, case):
    source, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out.h5ad"
    args = ["annotate", *source, "-o", str(out), "--model", "openai:tiny", "--base-url", server.base_url,
            "--no-progress"]
    result = invoke(args)
    assert result.exit_code in (1, 2), result.output
    assert message in result.output and "Traceback" not in result.output
    assert server.requests == [] and not out.exists() and not _checkpoint(out).exists()


def test_nan_in_the_matrix_is_refused_naming_where(tmp_path, server):
    adata = ad.read_h5ad(PANCREAS)[:N_CELLS].copy()
    adata.X = adata.X.tocsr().astype(np.float32)
    adata.X.data[3] = np.inf
    source = tmp_path / "inf.h5ad"
    adata.write_h5ad(source)
    result = invoke(annotate_args(tmp_path / "out.h5ad", server.base_url, source=source))
    assert result.exit_code == 1 and one_line(result.output)
    assert "inf" in result.output and repr(str(adata.obs_names[0])) in result.output
    assert server.requests == []


def test_unwritable_output_folder_is_refused_before_any_request(tmp_path, server, readonly_folder):
    folder = readonly_folder
    result = invoke(annotate_args(folder / "out.h5ad", server.base_url, "--checkpoint", str(tmp_path / "ckpt")))
    assert result.exit_code == 1 and one_line(result.output) and "cannot write the output" in result.output
    assert server.requests == []


def test_mudata_to_h5ad_without_mod_is_refused_before_any_request(tmp_path, server):
    import mudata

    adata = ad.read_h5ad(PANCREAS)[:N_CELLS].copy()
    source = tmp_path / "in.h5mu"
    mudata.MuData({"rna": adata}).write(source)
    result = invoke(annotate_args(tmp_path / "out.h5ad", server.base_url, source=source))
    assert result.exit_code == 2 and "--mod" in result.output
    assert server.requests == [] and not (tmp_path / "out.h5ad").exists()
