"""``cellscribe annotate`` end to end with real (tiny) transformers models built in the test.

The fine-tuned model learns, from prompts rendered by the pipeline itself, to answer each cell's label:
the ok path. An untrained model answers noise: with candidates every answer is unresolved, and the run
still completes with the raw text kept.
"""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pytest
from _tiny_models import finetune_to_answer, make_tiny_model
from click.testing import CliRunner

from cellscribe.cli import main
from cellscribe.core import run
from cellscribe.core.run.record import read_sidecar

N_GENES = 20
GEN = ["--generation", "do_sample=false", "--generation", "max_new_tokens=8"]


@pytest.fixture(scope="module")
def subset_path(tmp_path_factory):
    """Four cells of each pancreas label, as an h5ad file."""
    from conftest import DATA

    adata = ad.read_h5ad(DATA / "pancreas_baron_human_mouse_350.h5ad")
    rows = np.concatenate([np.flatnonzero(adata.obs["Group"] == g)[:4] for g in sorted(adata.obs["Group"].unique())])
    path = tmp_path_factory.mktemp("data") / "subset.h5ad"
    adata[rows].copy().write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def untrained_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, untrained_dir, subset_path):
    """The tiny model fine-tuned on the pipeline's own rendered zero-shot prompts of the subset."""
    from cellscribe.core.plugins import make_host

    host = make_host()
    path = tmp_path_factory.mktemp("trained") / "model"
    shutil.copytree(untrained_dir, path)
    adata = ad.read_h5ad(subset_path)
    plan = run.plan_run(adata, model=str(path), n_genes=N_GENES, host=host)
    loaded = host.registry.get("backend", "transformers").load(str(path))
    labels = adata.obs["Group"].astype(str).to_numpy()[plan.unit_rows]
    stats = finetune_to_answer(path, [loaded.render(p) for p in plan.prompts], labels.tolist(), steps=300)
    assert stats["min_target_prob"] > 0.5, stats
    return path


@pytest.mark.slow
def test_ok_path_labels_params_and_sidecar(host, trained_dir, subset_path, tmp_path):
    out = tmp_path / "out.h5ad"
    args = ["annotate", str(subset_path), "-o", str(out), "--model", str(trained_dir),
            "--n-genes", str(N_GENES), "--no-progress", *GEN]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    adata = ad.read_h5ad(out)
    obs = adata.obs
    assert (obs["cellscribe_status"] == "ok").all()
    assert (obs["cellscribe"].astype(str) == obs["Group"].astype(str)).all()
    params = adata.uns["cellscribe"]["params"]
    assert params["backend"] == "transformers" and params["model"] == str(trained_dir)
    assert params["sentence_resolved"] == "ranked-hvg" and params["n_genes"] == N_GENES
    assert params["generation"]["do_sample"] is False or params["generation"]["do_sample"] == 0
    assert params["model_info"]["backend"] == "transformers"
    assert params["trust_remote_code"] is False or params["trust_remote_code"] == 0
    sidecar = adata.uns["cellscribe"]["sidecar"]
    records = read_sidecar(sidecar)
    assert len(records) == 20
    assert all(r["output"].strip() == r["answers"][0]["label"] for r in records)


def test_unresolved_path_keeps_raw_text(host, untrained_dir, subset_path, tmp_path):
    out = tmp_path / "out.h5ad"
    args = ["annotate", str(subset_path), "-o", str(out), "--model", str(untrained_dir),
            "--n-genes", str(N_GENES), "--no-progress", *GEN,
            "--candidate", "alpha", "--candidate", "beta", "--candidate", "delta",
            "--candidate", "activated_stellate", "--candidate", "macrophage"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    adata = ad.read_h5ad(out)
    unresolved = adata.obs["cellscribe_status"] == "unresolved"
    assert unresolved.sum() >= 15
    assert adata.obs.loc[unresolved, "cellscribe"].isna().all()
    records = read_sidecar(adata.uns["cellscribe"]["sidecar"])
    raw = {r["unit_ids"][0]: r["output"] for r in records}
    assert all(raw[c] for c in adata.obs_names[unresolved])


@pytest.mark.parametrize("decode", ["constrained", "score"])
def test_decode_modes_force_candidates_even_for_an_untrained_model(host, untrained_dir, subset_path, decode):
    import cellscribe as cs

    adata = ad.read_h5ad(subset_path)
    candidates = ["alpha", "beta", "delta", "activated_stellate", "macrophage"]
    cs.tl.annotate(adata, model=str(untrained_dir), n_genes=N_GENES, candidates=candidates, decode=decode,
                   generation={"do_sample": False, "max_new_tokens": 8}, sidecar=False, progress=False)
    obs = adata.obs
    assert (obs["cellscribe_status"] == "ok").all()
    assert set(obs["cellscribe"].astype(str)) <= set(candidates)
    if decode == "score":
        assert obs["cellscribe_confidence"].between(0, 1).all()
    assert adata.uns["cellscribe"]["params"]["decode"] == decode
