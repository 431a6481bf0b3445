"""End-to-end pipeline behaviour with a deterministic rule-based backend (see _rule_backend.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).parent))
from _rule_backend import RulePlugin  # noqa: E402

import cellscribe as cs  # noqa: E402
from cellscribe.core import run  # noqa: E402


@pytest.fixture
def rules(with_plugin):
    plugin = RulePlugin()
    with_plugin(plugin, "rules")
    return plugin.backend.model


def test_zero_shot_writes_documented_fields(pancreas, rules, tmp_path):
    sidecar = tmp_path / "raw.jsonl"
    cs.tl.annotate(pancreas, model="rules", sidecar=sidecar, progress=False)
    obs = pancreas.obs
    assert isinstance(obs["cellscribe"].dtype, pd.CategoricalDtype)
    assert set(obs["cellscribe_status"].cat.categories) == {"ok", "unresolved"}
    ok = obs["cellscribe_status"] == "ok"
    assert ok.mean() > 0.9
    assert np.allclose(obs.loc[ok, "cellscribe_confidence"], 0.9)
    params = pancreas.uns["cellscribe"]["params"]
    assert params["prompt"] == "zero-shot" and params["model"] == "rules"
    assert params["sentence_resolved"] == "ranked-hvg"
    assert params["plugins"]["modality"] == "rna"
    assert "anndata" in params["versions"] and params["seed"] == 0
    assert pancreas.uns["cellscribe"]["sidecar"] == str(sidecar)
    records = [json.loads(line) for line in sidecar.read_text().splitlines()]
    assert len(records) == len(rules.calls) == 350
    assert records[0]["messages"][0]["role"] == "system" and records[0]["output"]
    # The AnnData, with everything written, still saves.
    pancreas.write_h5ad(tmp_path / "out.h5ad")


def test_labels_follow_the_cells_markers(pancreas, rules):
    # The rule model names the first marker in the sentence: expression order needs top-expressed.
    cs.tl.annotate(pancreas, model="rules", sentence="top-expressed", n_genes=200, sidecar=False, progress=False)
    obs = pancreas.obs
    assert (obs["cellscribe"].astype(str) == obs["Group"].astype(str)).mean() > 0.8
    alpha = obs["cellscribe"] == "alpha"
    assert (obs.loc[alpha, "cellscribe_ontology_id"] == "CL:0000171").all()
    assert (obs.loc[alpha, "cellscribe_ontology_name"] == "pancreatic A cell").all()
    assert pancreas.uns["cellscribe"]["params"]["n_genes"] == 200


def test_undecodable_output_is_unresolved_not_fatal(pancreas, with_plugin, tmp_path):
    bad = list(pancreas.obs_names[:5])
    with_plugin(RulePlugin(garbage_for=bad), "rules")
    cs.tl.annotate(
        pancreas, model="rules", candidates=sorted(pancreas.obs["Group"].unique()),
        sidecar=tmp_path / "raw.jsonl", progress=False,
    )
    obs = pancreas.obs
    assert (obs.loc[bad, "cellscribe_status"] == "unresolved").all()
    assert obs.loc[bad, "cellscribe"].isna().all()
    assert (obs["cellscribe_status"] == "ok").sum() > 300
    raw = [json.loads(line) for line in (tmp_path / "raw.jsonl").read_text().splitlines()]
    kept = [r["output"] for r in raw if r["unit_ids"][0] in bad]
    assert kept and all("cannot tell" in text for text in kept)


def test_cells_without_expressed_genes_are_kept_unresolved(pancreas, rules):
    X = pancreas.X.tolil()
    X[:3] = 0
    pancreas.X = sp.csr_matrix(X)
    pancreas.X.eliminate_zeros()
    cs.tl.annotate(pancreas, model="rules", sidecar=False, progress=False)
    first = pancreas.obs.iloc[:3]
    assert (first["cellscribe_status"] == "unresolved").all()
    assert (first["cellscribe_note"] == run.EMPTY_NOTE).all()
    assert pancreas.n_obs == 350 and len(rules.calls) == 347


def test_groupby_majority_vote(pancreas, rules):
    cs.tl.annotate(pancreas, model="rules", groupby="Group", n_representatives=3, sidecar=False, progress=False)
    obs = pancreas.obs
    assert len(rules.calls) == 15  # 5 groups x 3 representatives
    per_group = obs.groupby("Group", observed=True)["cellscribe"].agg(lambda s: s.astype(str).unique().tolist())
    assert all(len(v) == 1 for v in per_group)
    assert obs["cellscribe_cell"].notna().sum() == 15
    clusters = pancreas.uns["cellscribe"]["clusters"]  # a table indexed by group
    assert set(clusters.index) == set(obs["Group"].astype(str))
    assert clusters.loc["alpha", "label"] == "alpha" and clusters.loc["alpha", "n_representatives"] == 3


def test_k_shot_from_the_query_labelled_cells(pancreas, rules):
    pancreas.obs.loc[pancreas.obs_names[::2], "Group"] = np.nan
    cs.tl.annotate(pancreas, model="rules", prompt="k-shot", reference_key="Group", k=2,
                   sidecar=False, progress=False)
    prompt = rules.calls[0]
    assert len(prompt.examples) == 2 * 5
    assert pancreas.uns["cellscribe"]["params"]["n_reference_cells"] == 175


def test_puzzle_annotation_mode_by_cluster(pancreas, rules):
    candidates = sorted(pancreas.obs["Group"].unique())
    cs.tl.annotate(pancreas, model="rules", prompt="puzzle", candidates=candidates, groupby="Group",
                   sentence="top-expressed", n_genes=200, sidecar=False, progress=False)
    assert len(rules.calls) == 1 and len(rules.calls[0].unit_ids) == 5
    obs = pancreas.obs
    assert (obs["cellscribe"].astype(str) == obs["Group"].astype(str)).mean() == 1.0


def test_copy_leaves_input_untouched(pancreas, rules):
    before = pancreas.obs.copy()
    out = cs.tl.annotate(pancreas, model="rules", copy=True, sidecar=False, progress=False, key_added="ct")
    pd.testing.assert_frame_equal(pancreas.obs, before)
    assert "ct" in out.obs and "ct" in out.uns


def test_mudata_modality_by_name(pancreas, rules):
    import mudata

    mudata.set_options(pull_on_update=False)
    mdata = mudata.MuData({"expression": pancreas})
    cs.tl.annotate(mdata, model="rules", mod="expression", sidecar=False, progress=False)
    assert "cellscribe" in mdata.mod["expression"].obs
    assert "expression:cellscribe" in mdata.obs
    with pytest.raises(TypeError, match="has no modality 'rna'"):
        cs.tl.annotate(mdata, model="rules", mod="rna", sidecar=False, progress=False)
    with pytest.raises(TypeError, match="Pass mod="):
        cs.tl.annotate(mdata, model="rules", sidecar=False, progress=False)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"prompt": "k-shot", "reference_key": "cell_type"}, KeyError, "no obs column 'cell_type'"),
        ({"groupby": "leiden"}, KeyError, "groupby='leiden' is not an obs column"),
        ({"mode": "think"}, ValueError, "mode must be"),
        ({"prompt": "few-shot"}, Exception, "unknown prompt 'few-shot'"),
        ({"model": "no such model here"}, Exception, "no backend can load model"),
    ],
)
def test_bad_arguments_fail_before_any_model_call(pancreas, rules, kwargs, error, match):
    with pytest.raises(error, match=match):
        cs.tl.annotate(pancreas, **{"model": "rules", "sidecar": False, "progress": False, **kwargs})
    assert rules.calls == []


def test_sentences_api(pancreas, host):
    series = cs.tl.sentences(pancreas, sentence="top-expressed", n_genes=5)
    assert series.attrs["strategy"] == "top-expressed"
    assert len(series) == 350 and series.index[0] == pancreas.obs_names[0]
    assert len(series.iloc[0].split(", ")) == 5


def test_data_hvg_list_is_learned_on_the_reference_and_shared(pancreas, rules):
    reference = pancreas[pancreas.obs["Batch"] == "human"].copy()
    query = pancreas[pancreas.obs["Batch"] == "mouse"].copy()
    cs.tl.annotate(query, model="rules", prompt="k-shot", reference=reference, reference_key="Group",
                   sentence="data-hvg", sidecar=False, progress=False)
    learned = cs.tl.sentences(reference, sentence="data-hvg").attrs["state"]["data_hvg"]["genes"]
    stored = query.uns["cellscribe"]["params"]["sentence_state"]["data_hvg"]["genes"]
    assert list(stored) == list(learned)
    example_genes = {g for ex in rules.calls[0].examples for g in ex.sentence.split(", ")}
    query_genes = set(rules.calls[0].sentences[0].split(", "))
    assert example_genes | query_genes <= set(learned)


class _Killer:
    """Wraps a model so that the process 'dies' (KeyboardInterrupt) after ``after`` prompts."""

    def __init__(self, model, after):
        self.model, self.after, self.seen = model, after, 0

    def __getattr__(self, name):  # the same model in every other respect (its identity too)
        return getattr(self.model, name)

    def generate(self, prompts, **kw):
        if self.seen + len(prompts) > self.after:
            raise KeyboardInterrupt
        self.seen += len(prompts)
        return self.model.generate(prompts, **kw)


def test_killed_run_resumes_to_the_uninterrupted_result(pancreas, with_plugin, tmp_path):
    kw = dict(model="rules", sentence="top-expressed", n_genes=100, batch_size=2, sidecar=False, progress=False)
    plugin = RulePlugin()
    with_plugin(plugin, "rules")
    reference = pancreas.copy()
    cs.tl.annotate(reference, **kw)

    real = plugin.backend.model
    plugin.backend.model = _Killer(real, after=100)
    with pytest.raises(KeyboardInterrupt):
        cs.tl.annotate(pancreas, checkpoint=tmp_path / "ckpt", **kw)
    saved = sorted(p.name for p in (tmp_path / "ckpt").glob("batch-*.json"))
    assert len(saved) == 6  # 6 finished batches of 16 prompts before the 'kill' at prompt 100

    plugin.backend.model = real
    real.calls.clear()
    cs.tl.annotate(pancreas, checkpoint=tmp_path / "ckpt", **kw)
    assert len(real.calls) == 350 - 6 * 16
    assert pancreas.uns["cellscribe"]["params"]["resumed_batches"] == 6
    columns = [c for c in reference.obs if c.startswith("cellscribe")]
    pd.testing.assert_frame_equal(pancreas.obs[columns], reference.obs[columns])


def test_a_failing_batch_is_split_and_only_its_bad_prompt_lost(pancreas, with_plugin):
    plugin = RulePlugin()
    with_plugin(plugin, "rules")
    model = plugin.backend.model
    bad = str(pancreas.obs_names[7])
    original = model.generate

    def flaky(prompts, **kw):
        if any(bad in p.unit_ids for p in prompts):
            raise RuntimeError("CUDA out of memory")
        return original(prompts, **kw)

    model.generate = flaky
    with pytest.raises(cs.FailedPromptsError, match="1 of 350 prompts got no answer") as failed:
        cs.tl.annotate(pancreas, model="rules", batch_size=4, sidecar=False, progress=False)
    assert failed.value.summary["n_failed_prompts"] == 1
    assert pancreas.uns["cellscribe"]["summary"]["n_failed_prompts"] == 1  # written before the error
    obs = pancreas.obs
    assert obs.loc[bad, "cellscribe_status"] == "unresolved"
    assert "out of memory" in obs.loc[bad, "cellscribe_note"]
    assert (obs["cellscribe_status"] == "ok").sum() >= 340


def test_model_manifest_sets_its_formats_where_defaults_were_kept(pancreas, host):
    candidates = sorted(pancreas.obs["Group"].unique())
    plan = run.plan_run(pancreas, model="cell-o1", candidates=candidates)
    assert plan.params["prompt"] == "puzzle" and plan.params["sentence_resolved"] == "top-expressed"
    assert plan.params["n_genes"] == 50 and plan.prompts[0].decoder == "cellpuzzles"
    assert all(len(s.split(", ")) == 50 for s in plan.prompts[0].sentences)
    # What the user chose explicitly wins.
    plan = run.plan_run(pancreas, model="cell-o1", candidates=candidates, n_genes=20)
    assert plan.params["n_genes"] == 20


def test_a_checkpoint_keeps_every_field_of_a_generation(tmp_path):
    from cellscribe.core.run.checkpoint import Checkpoint
    from cellscribe.core.types import Generation

    generations = [
        Generation("The cell expresses", n_prompt_tokens=290, n_output_tokens=32, finish_reason="length"),
        Generation("B cell", confidence=(0.7,), label_scores=({"B cell": 0.7, "T cell": 0.3},), notes=("x",),
                   finish_reason="stop"),
        Generation("", error="HTTP 500"),
    ]
    checkpoint = Checkpoint(tmp_path, "run")
    checkpoint.save(0, "key", generations)
    loaded = checkpoint.load(0, "key")
    assert loaded == generations and loaded[0].capped and not loaded[1].capped
