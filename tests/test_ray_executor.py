"""``executor="ray"`` on a local Ray cluster of 2 workers (skipped without the ray extra; CI installs it).

One cluster serves the module (starting one costs seconds). Every run here is compared with the same run
in this process (the ``local`` executor): the labels, confidences, statuses and raw outputs must be the
same, cell for cell, with the offline markers model, the tiny transformers model the tests build, and an
OpenAI-compatible model spread over two servers; a run stopped half-way resumes batch by batch.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray", reason="executor='ray' needs the ray extra: pip install -e '.[ray]'")
#: Each test starts a local Ray cluster (10-20 s on 2 cores): slow, run by CI with the ray extra.
pytestmark = pytest.mark.slow

import cellscribe as cs  # noqa: E402
from cellscribe.core.run import FailedPromptsError  # noqa: E402

from _fault_helpers import annotate_args, cli_process, invoke, kill_once_saved, rule_answer  # noqa: E402
from _openai_server import OpenAIServer  # noqa: E402
from _tiny_models import make_tiny_model  # noqa: E402

PANCREAS = Path(__file__).parent / "data" / "pancreas_baron_human_mouse_350.h5ad"
WORKERS = 2


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs, shared by the module's runs (the executor uses a Ray already
    initialised in the process, and leaves it running)."""
    ray.init(num_cpus=WORKERS, include_dashboard=False, object_store_memory=256 * 2**20, logging_level="warning")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def executor(host):
    return host.registry.get("executor", "ray")


def columns(adata: ad.AnnData) -> pd.DataFrame:
    return adata.obs[[c for c in adata.obs.columns if c.startswith("cellscribe")]]


def same_run(local: ad.AnnData, distributed: ad.AnnData) -> None:
    """Cell for cell the same annotation, and the same raw output for every prompt."""
    pd.testing.assert_frame_equal(columns(local), columns(distributed))
    pd.testing.assert_frame_equal(local.uns["cellscribe"]["raw"], distributed.uns["cellscribe"]["raw"])


def test_markers_model_on_two_workers_gives_the_local_labels_and_resumes_by_batch(cluster, host, executor, tmp_path):
    """The same labels as in one process; each batch saved as it finished, and a re-run sends only the
    batches whose files are missing (as after a kill), ending with the same result."""
    folder = tmp_path / "ckpt"
    options = {"workers": WORKERS, "block_prompts": 50}
    local, distributed = ad.read_h5ad(PANCREAS), ad.read_h5ad(PANCREAS)
    cs.tl.annotate(local, progress=False)
    cs.tl.annotate(distributed, progress=False, executor="ray", executor_options=options, checkpoint=str(folder))
    same_run(local, distributed)
    assert (local.obs["cellscribe_status"] == "ok").all()
    assert executor.last_run["workers"] == WORKERS and executor.last_run["calls"] == 7  # 350 cells / 50
    assert not executor.last_run["cluster_started"]  # the module's cluster was used, not a new one
    params = distributed.uns["cellscribe"]["params"]
    assert params["executor"] == "ray" and dict(params["executor_options"]) == options

    saved = sorted(folder.glob("batch-*.json"))
    assert len(saved) == 7
    for lost in saved[1::2]:  # batches 1, 3, 5 never finished
        lost.unlink()
    again = ad.read_h5ad(PANCREAS)
    summary = cs.core.run.annotate(again, progress=False, executor="ray", executor_options=options,
                                   checkpoint=str(folder))
    assert executor.last_run["calls"] == 3 and executor.last_run["prompts"] == 150
    assert summary["n_failed_prompts"] == 0
    same_run(local, again)


@pytest.fixture(scope="module")
def subset():
    """Four cells of each pancreas label (56 cells)."""
    adata = ad.read_h5ad(PANCREAS)
    groups = adata.obs["Group"]
    rows = np.concatenate([np.flatnonzero(groups == g)[:4] for g in sorted(groups.unique())])
    return adata[rows].copy()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.mark.parametrize("decode", ["generate", pytest.param("score", marks=pytest.mark.slow)])
def test_tiny_transformers_model_on_two_workers_gives_the_local_answers(cluster, host, executor, subset, tiny_dir,
                                                                       decode):
    """The run's own batches go to the replicas, so every replica answers exactly the prompts, with the
    seeds, that the local run's batches hold."""
    candidates = sorted(subset.obs["Group"].astype(str).unique())[:5]
    run = dict(model=str(tiny_dir), n_genes=20, batch_size=1, progress=False, decode=decode,
               generation={"do_sample": False, "max_new_tokens": 8},
               candidates=candidates if decode == "score" else None)
    local, distributed = subset.copy(), subset.copy()
    cs.tl.annotate(local, **run)
    cs.tl.annotate(distributed, executor="ray", executor_options={"workers": WORKERS}, **run)
    same_run(local, distributed)
    assert executor.last_run["workers"] == WORKERS and executor.last_run["calls"] >= WORKERS
    if decode == "score":
        assert (distributed.obs["cellscribe_status"] == "ok").all()
        assert set(distributed.obs["cellscribe"].astype(str)) <= set(candidates)


def test_openai_servers_spread_a_server_dying_stops_the_run_and_it_resumes(cluster, host, executor, tmp_path,
                                                                         monkeypatch):
    """Two OpenAI-compatible servers, one replica on each (``base_urls``); the second dies after 4
    answers: the run stops with the batches answered so far saved, and once it is back the same call
    sends only the rest and ends as a run on one server."""
    # Both replicas up before the first batch is handed out (Ray Data starts actors asynchronously: a
    # fast first replica could otherwise answer every batch before the second one has started).
    monkeypatch.setattr(ray.data.DataContext.get_current(), "wait_for_min_actors_s", 300)
    adata = ad.read_h5ad(PANCREAS)[:40].copy()
    model_options = {"max_concurrency": 2, "backoff": 0.01, "max_backoff": 0.05}
    run = dict(model="openai:tiny", batch_size=1, progress=False, sidecar=False)
    reference = adata.copy()
    with OpenAIServer(answer=rule_answer, lifetime=120) as one:
        cs.tl.annotate(reference, model_options={**model_options, "base_url": one.base_url}, **run)

    folder = str(tmp_path / "ckpt")
    first = adata.copy()
    with OpenAIServer(answer=rule_answer, lifetime=120) as a, OpenAIServer(answer=rule_answer, lifetime=120) as b:
        options = {"base_urls": f"{a.base_url},{b.base_url}", "block_prompts": 4}
        distributed = dict(model_options={**model_options, "base_url": a.base_url}, executor="ray",
                           executor_options=options, checkpoint=folder, **run)
        b.kill_after(4)
        with pytest.raises(FailedPromptsError, match="got no answer from the model") as stopped:
            cs.tl.annotate(first, **distributed)
        assert a.requests and b.requests  # both servers were used
        failed = stopped.value.summary["n_failed_prompts"]
        assert 0 < failed <= 40 - 4, (failed, len(a.requests), len(b.requests))  # the answers before the stop kept
        assert list(Path(folder).glob("batch-*.json"))
        port = b.port
    with OpenAIServer(answer=rule_answer, lifetime=120, port=a.port) as a2, \
            OpenAIServer(answer=rule_answer, lifetime=120, port=port) as b2:  # the same servers, back
        again = adata.copy()
        cs.tl.annotate(again, **distributed)
        assert len(a2.requests) + len(b2.requests) == failed  # only the prompts without an answer
    pd.testing.assert_frame_equal(columns(reference), columns(again))


@pytest.mark.slow
def test_the_command_killed_with_sigkill_resumes_by_batch(tmp_path):
    """``kill -9`` of ``cellscribe annotate --executor ray`` and the local cluster it started, once two
    batches are saved; the same command again sends only the prompts of the other batches and ends as
    an uninterrupted run in one process."""
    reference, out = tmp_path / "reference.h5ad", tmp_path / "out.h5ad"
    folder = tmp_path / "out.h5ad.cellscribe.ckpt"
    ray_flags = ["--executor", "ray", "--executor-option", "workers=2", "--executor-option", "block_prompts=4",
                 "--executor-option", "num_cpus=2"]
    with OpenAIServer(answer=rule_answer, lifetime=600) as local_server:
        assert invoke(annotate_args(reference, local_server.base_url)).exit_code == 0
    with OpenAIServer(answer=rule_answer, delay=0.2, lifetime=600) as server:
        args = annotate_args(out, server.base_url, *ray_flags)
        process = cli_process(args, start_new_session=True)  # its own process group: it and its Ray cluster
        saved = kill_once_saved(process, folder, "batch-*.json", 2, timeout=300, group=True)
        # Batches are saved in order: when the replica holding the first one starts last, the others'
        # answers wait for it and all may be saved at once (then the re-run sends nothing).
        assert process.returncode == -signal.SIGKILL and 2 <= saved <= 10 and not out.exists()
        sent = _settled(server)
        done = subprocess.run(cli_process_args(args), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert len(server.requests) - sent <= 40 - 4 * saved  # the saved batches were not sent again
    pd.testing.assert_frame_equal(columns(ad.read_h5ad(reference)), columns(ad.read_h5ad(out)))


def _settled(server: OpenAIServer, quiet: float = 2.0, timeout: float = 60.0) -> int:
    """The server's request count once no request has come for ``quiet`` seconds: a replica of the
    killed job may finish the prompts of the block it holds before its worker notices the driver is gone."""
    count, since, deadline = len(server.requests), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.1)
        if len(server.requests) != count:
            count, since = len(server.requests), time.monotonic()
    return count


def cli_process_args(args: list[str]) -> list[str]:
    return [sys.executable, "-c", "import sys; from cellscribe.cli import main; sys.exit(main())", *args]
