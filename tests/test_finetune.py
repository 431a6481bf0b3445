"""Fine-tuning (issue 17): training records rendered as inference renders prompts, the lora trainer,
adapters that carry and enforce their provenance, resume, bad input, export. Tiny Qwen2-shaped models;
the real-model figures are in benchmarks/finetune.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _tiny_models import make_tiny_model, make_tokenizer

import cellscribe as cs
from cellscribe.core.domain.adapters import ADAPTER_MANIFEST, read_adapter_manifest
from cellscribe.core.run import plan_run
from cellscribe.core.run.finetune import training_set
from cellscribe.core.spec import FinetuneSpec, RunSpec

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

#: Short prompts keep a tiny model's training to seconds.
FAST = {"n_genes": 6, "prompt_options": {"show_candidates": False, "instruction": "Cell type?"}, "progress": False}
TRAIN = {"epochs": 2, "learning_rate": 5e-3, "train_batch_size": 8, "save_steps": 1000}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("base") / "model", seed=0, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def other_base(tmp_path_factory, tokenizer) -> Path:
    """Same architecture and tokenizer, other weights: an adapter must not load onto it."""
    return make_tiny_model(tmp_path_factory.mktemp("other") / "model", seed=1, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def pbmc():
    """60 of pbmc68k_reduced's cells, labels in obs['bulk_labels'] (a donor column is added by tests
    that need one)."""
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    return adata[np.sort(np.random.default_rng(0).choice(adata.n_obs, 60, replace=False))].copy()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, pbmc, base) -> Path:
    """An adapter trained once for the module: data-hvg sentences (a learned gene list), zero-shot."""
    out = tmp_path_factory.mktemp("adapters") / "rna"
    cs.finetune(pbmc.copy(), out, label_key="bulk_labels", base=str(base), sentence="data-hvg", **FAST, **TRAIN,
                trainer_options={"logging_steps": 1})
    return out


@pytest.fixture(scope="module")
def model(base):
    return cs.load_model(str(base))


def _records(pbmc, model, base, **params):
    spec = RunSpec.from_kwargs(**{**FAST, **params})
    return training_set(pbmc, spec, FinetuneSpec(label_key="bulk_labels", base=str(base)), model=model, progress=False)


# -------------------------------------------------------------------------------------------------
# Training prompts are inference prompts
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["zero-shot", "k-shot", "puzzle"])
def test_a_training_prompt_is_the_inference_prompt_byte_for_byte(pbmc, model, base, prompt):
    """Each training record's prompt, rendered through the model's chat template, is exactly what an
    annotation run of the same cells sends the model (and the example's prompt ids are the ids
    generate() feeds it)."""
    ts = _records(pbmc, model, base, prompt=prompt)
    loaded = model.loaded
    tokenizer = loaded.trainable()["tokenizer"]
    records = ts.of("train")[:3] + ts.of("validation")[:2]
    for record in records:
        cells = list(record.prompt.unit_ids)
        if record.split == "train":
            query = ts.train_adata[cells].copy()
        else:
            query = ts.adata[cells].copy()
        plan = plan_run(query, RunSpec.from_kwargs(**FAST, prompt=prompt, candidates=list(ts.vocabulary),
                                                    reference=ts.train_adata, reference_key="bulk_labels",
                                                    model=model), count_tokens=loaded.count_tokens)
        (inference,) = plan.prompts
        assert inference.unit_ids == record.prompt.unit_ids
        assert loaded.render(inference) == loaded.render(record.prompt)
        prompt_ids, answer_ids = loaded.encode_example(record.prompt, record.answer)
        assert prompt_ids == tokenizer(loaded.render(inference), add_special_tokens=False)["input_ids"]
        assert answer_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    if prompt == "k-shot":
        assert all(r.prompt.examples for r in records)
        assert all(r.prompt.unit_ids[0] not in {e.cell_id for e in r.prompt.examples} for r in records
                   if hasattr(r.prompt.examples[0], "cell_id"))
    if prompt == "puzzle":
        record = ts.of("train")[0]
        assert len(record.prompt.unit_ids) > 1
        assert record.answer == record.prompt.answer.text(list(record.labels), "")
    else:
        assert all(r.answer == r.labels[0] for r in ts.records)


def test_the_adapter_defaults_make_the_training_prompt(adapter, pbmc, base):
    """annotate with only the adapter (no sentence, prompt or candidate settings) renders a training
    cell exactly as its training record, because the adapter's manifest sets them and its gene list."""
    model = cs.load_model(str(base), adapters={"rna": str(adapter)})
    record = json.loads((adapter / "dataset" / "train.jsonl").open().readline())
    cell = pbmc[record["cell_ids"]].copy()
    plan = plan_run(cell, model=model, count_tokens=model.loaded.count_tokens)
    assert model.loaded.render(plan.prompts[0]) == record["text"]
    assert plan.spec.sentences.sentence == "data-hvg"
    assert tuple(plan.spec.prompts.candidates) == read_adapter_manifest(adapter).labels


# -------------------------------------------------------------------------------------------------
# The adapter folder and its manifest
# -------------------------------------------------------------------------------------------------


def test_finetune_writes_an_adapter_with_its_provenance(adapter, base, pbmc):
    files = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", ADAPTER_MANIFEST, "training_plan.json",
            "dataset"} <= files
    assert "checkpoints" not in files and not list(adapter.glob("*.bin"))
    m = read_adapter_manifest(adapter)
    assert m.base_model == str(base) and m.base_fingerprint.startswith("sha256:")
    assert m.modality == "rna" and m.sentence == "data-hvg" and m.n_genes == 6 and m.prompt == "zero-shot"
    assert len(m.sentence_state["data_hvg"]["genes"]) > 100  # the gene list the sentences rank
    assert list(m.labels) == sorted(pbmc.obs["bulk_labels"].astype(str).unique())
    assert m.training["fingerprint"].startswith("sha256:")
    assert m.training["n_train"] + m.training["n_validation"] == pbmc.n_obs
    assert m.training["split_key"] is None and "stratified" in m.training["method"]
    assert m.trainer["name"] == "lora" and m.trainer["lora_rank"] == 8 and m.trainer["steps"] > 0
    assert m.cellscribe_version == cs.__version__
    for key in ("accuracy", "lineage_accuracy", "graded_score", "macro_f1"):
        assert 0.0 <= m.validation[key] <= 1.0
    assert m.validation["n_cells"] == m.training["n_validation"]
    import pandas as pd

    answers = pd.read_csv(adapter / "validation_answers.csv", keep_default_na=False)
    assert len(answers) == m.validation["n_cells"] and set(answers["cell"]) <= set(pbmc.obs_names)
    assert (answers["label"] == pbmc.obs.loc[answers["cell"], "bulk_labels"].astype(str).to_numpy()).all()
    assert np.isclose((answers["label"] == answers["answer"]).mean(), m.validation["accuracy"])
    lines = (adapter / "dataset" / "train.jsonl").read_text().splitlines()
    assert len(lines) == m.training["n_records"]


def test_training_lowers_the_answer_loss(adapter):
    """The trainer's logged answer loss falls from the first steps to the last."""
    state = read_adapter_manifest(adapter).trainer
    assert state["last_logged_loss"] < state["train_loss"] * 1.5
    history = json.loads((adapter / "training_plan.json").read_text())
    assert history["fingerprint"] == read_adapter_manifest(adapter).training["fingerprint"]


def test_annotate_records_the_adapter_manifest(adapter, base, pbmc):
    cells = pbmc[:8].copy()
    model = cs.load_model(str(base), adapters={"rna": str(adapter)})
    cs.tl.annotate(cells, model=model, decode="score", sidecar=False, progress=False)
    params = cells.uns["cellscribe"]["params"]
    recorded = params["adapter_manifests"]["rna"]
    assert recorded["training_fingerprint"] == read_adapter_manifest(adapter).training["fingerprint"]
    assert params["sentence"] == "data-hvg" and int(params["n_genes"]) == 6
    assert set(cells.obs["cellscribe"].dropna()) <= set(read_adapter_manifest(adapter).labels)
    assert "candidates" in list(params["set_by_model"])
    # Scored as it was trained: the label's likelihood after the prompt, not divided by a prior the
    # adapter learned (calibration="pmi", the default of untrained models); the user's choice wins.
    assert read_adapter_manifest(adapter).calibration == "sum"
    assert dict(params["generation"])["calibration"] == "sum"
    chosen = pbmc[:2].copy()
    cs.tl.annotate(chosen, model=model, decode="score", generation={"calibration": "pmi"}, sidecar=False,
                   progress=False)
    assert dict(chosen.uns["cellscribe"]["params"]["generation"])["calibration"] == "pmi"


def test_cli_annotate_with_adapter_and_adapters_listing(adapter, base, pbmc, tmp_path):
    from click.testing import CliRunner

    from cellscribe.cli import main

    data = tmp_path / "cells.h5ad"
    pbmc[:5].copy().write_h5ad(data)
    out = tmp_path / "out.h5ad"
    result = CliRunner().invoke(main, ["annotate", str(data), "-o", str(out), "--model", str(base),
                                       "--adapter", f"rna={adapter}", "--decode", "score", "--no-progress"])
    assert result.exit_code == 0, result.output
    import anndata as ad

    assert ad.read_h5ad(out).uns["cellscribe"]["params"]["adapter_manifests"]["rna"]["modality"] == "rna"
    listing = CliRunner().invoke(main, ["adapters", str(adapter)])
    assert listing.exit_code == 0, listing.output
    assert "rna adapter on" in listing.output and "validation" in listing.output
    as_json = json.loads(CliRunner().invoke(main, ["adapters", str(adapter), "--json"]).output)
    assert as_json[0]["label_key"] == "bulk_labels"


def test_an_adapter_refuses_another_base_and_another_strategy(adapter, other_base, base, pbmc):
    cells = pbmc[:4].copy()
    with pytest.raises(ValueError, match="weights differ|other weights"):
        cs.tl.annotate(cells, model=str(other_base), adapter=str(adapter), sidecar=False, progress=False)
    with pytest.raises(ValueError, match="other weights"):
        cs.load_model(str(other_base), adapters={"rna": str(adapter)})
    model = cs.load_model(str(base), adapters={"rna": str(adapter)})
    with pytest.raises(ValueError, match="sentence='data-hvg' records.*sentence='top-expressed'"):
        cs.tl.annotate(cells, model=model, sentence="top-expressed", sidecar=False, progress=False)
    with pytest.raises(ValueError, match="prompt='zero-shot'.*prompt='puzzle'"):
        cs.tl.annotate(cells, model=model, prompt="puzzle", sidecar=False, progress=False)
    assert "cellscribe" not in cells.obs


# -------------------------------------------------------------------------------------------------
# Bad input: a clear error before any model is loaded
# -------------------------------------------------------------------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the error must come first."""
    from cellscribe.core import models

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models, "load_model", refuse)


def test_bad_input_is_refused_before_training(pbmc, base, tmp_path, no_model):
    one = pbmc.copy()
    one.obs["one"] = "T cell"
    with pytest.raises(ValueError, match="one class"):
        cs.finetune(one, tmp_path / "a", label_key="one", base=str(base), **FAST)
    donors = pbmc.copy()
    labels = donors.obs["bulk_labels"].astype(str)
    # Each donor has types the other lacks: whichever is held out takes a label with it.
    donors.obs["donor_id"] = np.where(labels.isin(["CD19+ B", "CD14+ Monocyte"]), "d1", "d2")
    with pytest.raises(ValueError, match=r"label\(s\) '.+' \(\d+ cells\).* have no cell in the training split: "
                                         r"all are in the held-out groups of obs\['donor_id'\]"):
        cs.finetune(donors, tmp_path / "b", label_key="bulk_labels", base=str(base), validation_fraction=0.5,
                    seed=3, **FAST)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists.*--resume"):
        cs.finetune(pbmc.copy(), tmp_path / "exists", label_key="bulk_labels", base=str(base), **FAST)
    with pytest.raises(KeyError, match="no obs column 'nope'"):
        cs.finetune(pbmc.copy(), tmp_path / "c", label_key="nope", base=str(base), **FAST)
    assert not any((tmp_path / n).exists() for n in ("a", "b", "c"))


def test_the_command_line_refuses_bad_input_in_one_line_before_training(pbmc, base, other_base, tmp_path, no_model):
    """``cellscribe finetune``: each bad input exits 1 with one ``Error:`` line naming the problem and the
    fix, before a model is loaded and without creating the adapter folder."""
    from click.testing import CliRunner

    from cellscribe.cli import main

    cells = pbmc.copy()
    cells.obs["one"] = "T cell"
    # Each lane has types the other lacks: whichever is held out takes a label with it.
    cells.obs["lane"] = np.where(cells.obs["bulk_labels"].astype(str).isin(["CD19+ B", "CD14+ Monocyte"]), "s1", "s2")
    data = tmp_path / "cells.h5ad"
    cells.write_h5ad(data)
    (tmp_path / "exists").mkdir()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "training_plan.json").write_text(json.dumps({"base_model": str(base), "base_fingerprint": "sha256:x"}))
    common = ["--n-genes", "6", "--no-progress", "--seed", "3"]
    cases = {
        "one class": (["--label-key", "one", "-o", str(tmp_path / "a"), "--base", str(base)], "has one class ('T cell')"),
        "label only in validation": (["--label-key", "bulk_labels", "-o", str(tmp_path / "b"), "--base", str(base),
                                      "--split-key", "lane", "--validation-fraction", "0.5"],
                                     "have no cell in the training split"),
        "output exists": (["--label-key", "bulk_labels", "-o", str(tmp_path / "exists"), "--base", str(base)],
                          "already exists"),
        "another base": (["--label-key", "bulk_labels", "-o", str(resumed), "--base", str(other_base), "--resume"],
                         "cannot resume"),
    }
    for name, (args, message) in cases.items():
        result = CliRunner().invoke(main, ["finetune", str(data), *args, *common])
        assert result.exit_code == 1, (name, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], (name, result.output)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not any((tmp_path / "exists").iterdir()) and not (resumed / "checkpoints").exists()


def test_the_split_holds_out_whole_donors(pbmc):
    from cellscribe.core.run.finetune import split_cells

    obs = pbmc.obs.copy()
    obs["donor_id"] = [f"d{i % 5}" for i in range(len(obs))]
    split = split_cells(obs, obs["bulk_labels"], FinetuneSpec(label_key="bulk_labels"), seed=0)
    train, val = set(obs["donor_id"].iloc[split.train]), set(obs["donor_id"].iloc[split.validation])
    assert split.key == "donor_id" and not train & val and len(val) >= 1 and len(train) >= 1
    assert split_cells(obs, obs["bulk_labels"], FinetuneSpec(label_key="bulk_labels"), seed=0).validation.tolist() \
        == split.validation.tolist()


def test_resume_with_another_base_is_refused(pbmc, base, other_base, tmp_path, no_model):
    out = tmp_path / "run"
    out.mkdir()
    (out / "training_plan.json").write_text(json.dumps({"base_model": str(base), "base_fingerprint": "sha256:x"}))
    with pytest.raises(ValueError, match="cannot resume.*trained on base"):
        cs.finetune(pbmc.copy(), out, label_key="bulk_labels", base=str(other_base), resume=True, **FAST)


# -------------------------------------------------------------------------------------------------
# Checkpoints and resume
# -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_weights(pbmc, base, tmp_path):
    from safetensors.numpy import load_file
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt("killed after the first checkpoint")

    settings = dict(label_key="bulk_labels", base=str(base), validation_fraction=0, epochs=1, train_batch_size=8,
                    save_steps=2, learning_rate=5e-3, **FAST)
    cs.finetune(pbmc.copy(), tmp_path / "whole", **settings)
    with pytest.raises(KeyboardInterrupt):
        cs.finetune(pbmc.copy(), tmp_path / "cut", **settings, trainer_options={"callbacks": [Crash()]})
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint-2").is_dir()
    assert not (tmp_path / "cut" / ADAPTER_MANIFEST).exists()
    manifest = cs.finetune(pbmc.copy(), tmp_path / "cut", **settings, resume=True)
    assert manifest.trainer["resumed_from"] == "checkpoint-2"
    whole = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    assert whole.keys() == cut.keys()
    assert max(float(np.abs(whole[k] - cut[k]).max()) for k in whole) == 0.0
    assert any(float(np.abs(whole[k]).max()) > 0 for k in whole if "lora_B" in k)  # it learned something


# -------------------------------------------------------------------------------------------------
# Export
# -------------------------------------------------------------------------------------------------


def test_exported_chat_jsonl_loads_with_datasets_and_holds_the_inference_prompts(pbmc, base, model, tmp_path):
    import datasets
    from click.testing import CliRunner

    from cellscribe.cli import main

    data = tmp_path / "cells.h5ad"
    pbmc.write_h5ad(data)
    out = tmp_path / "train.jsonl"
    result = CliRunner().invoke(main, ["export", str(data), "-o", str(out), "--label-key", "bulk_labels",
                                       "--base", str(base), "--n-genes", "6", "--prompt-option", "show_candidates=false",
                                       "--prompt-option", "instruction=Cell type?", "--no-progress"])
    assert result.exit_code == 0, result.output
    loaded = datasets.load_dataset("json", data_files=str(out), split="train")
    assert len(loaded) == pbmc.n_obs and set(loaded["split"]) == {"train", "validation"}
    tokenizer = model.loaded.trainable()["tokenizer"]
    labels = sorted(pbmc.obs["bulk_labels"].astype(str).unique())
    for row in loaded.select(range(0, len(loaded), 7)):
        plan = plan_run(pbmc[row["cell_ids"]].copy(), model=model, candidates=labels, **FAST)
        rendered = model.loaded.render(plan.prompts[0])
        assert tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True) == rendered
        assert row["text"] == rendered
        assert row["messages"][-1] == {"role": "assistant", "content": row["labels"][0]}
        assert row["completion"][0]["content"] == pbmc.obs.loc[row["cell_ids"][0], "bulk_labels"]


def test_export_hf_datasets_and_the_published_formats(pbmc, tmp_path):
    import datasets

    folder = tmp_path / "hf"
    counts = cs.export_training_set(pbmc.copy(), folder, format="hf-datasets", label_key="bulk_labels", **FAST)
    dd = datasets.load_from_disk(str(folder))
    assert set(dd) == {"train", "validation"} and len(dd["train"]) == counts["records"]["train"]
    cr = cs.export_training_set(pbmc.copy(), tmp_path / "cr.json", format="cellreasoner", label_key="bulk_labels")
    records = json.loads((tmp_path / "cr.json").read_text())
    assert cr["records"] == len(records) == pbmc.n_obs and set(records[0]) == {"cell_name", "instruction", "input", "output"}
    with pytest.raises(FileExistsError):
        cs.export_training_set(pbmc.copy(), folder, format="hf-datasets", label_key="bulk_labels", **FAST)


def test_reasoning_targets_from_the_markers_model_are_stored_with_the_dataset(pbmc, tmp_path):
    out = tmp_path / "reasoning.jsonl"
    counts = cs.export_training_set(pbmc.copy(), out, label_key="bulk_labels", reasoning_from="markers",
                                    mode="reasoning", n_genes=50, progress=False, validation_fraction=0)
    teacher = [json.loads(line) for line in Path(counts["reasoning"]).open()]
    kept = [t for t in teacher if t["kept"]]
    assert len(teacher) == pbmc.n_obs and kept and all(t["agrees"] and t["reasoning"] for t in kept)
    rows = {r["cell_ids"][0]: r for r in map(json.loads, out.open())}
    for t in kept[:5]:
        answer = rows[t["cell_ids"][0]]["messages"][-1]["content"]
        assert answer.startswith("<think> " + t["reasoning"]) and answer.endswith("</think>\n\n" + t["labels"][0])
    for t in [t for t in teacher if not t["kept"]][:5]:
        assert rows[t["cell_ids"][0]]["messages"][-1]["content"].endswith("</think>\n\n" + t["labels"][0])
    with pytest.raises(ValueError, match="reasoning targets need prompts that ask for reasoning"):
        cs.export_training_set(pbmc.copy(), tmp_path / "x.jsonl", label_key="bulk_labels", reasoning_from="markers")


# -------------------------------------------------------------------------------------------------
# One model, an adapter per modality, one MuData
# -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rna_and_atac_adapters_answer_one_mudata_through_one_model(adapter, base, tmp_path, data_dir):
    """An ATAC adapter trained on labelled scATAC cells (Schep 2017 sorted populations) and the RNA
    adapter are loaded once onto one base; a MuData run annotates each modality with its own adapter
    and records it. The multiome cells carry no labels: this proves the switching and the records,
    not accuracy."""
    import anndata as ad
    import mudata

    atac = ad.read_h5ad(data_dir / "atac" / "schep2017_blood_celllines_600cells.h5ad")
    atac.obs_names_make_unique()
    atac = atac[np.random.default_rng(0).choice(atac.n_obs, 72, replace=False)].copy()
    atac_out = tmp_path / "atac"
    cs.finetune(atac, atac_out, modality="atac", label_key="cell_type", base=str(base), validation_fraction=0.2,
                modality_options={"gtf": str(data_dir / "atac" / "hg19_genes.gtf.gz")}, **FAST, **TRAIN)
    assert read_adapter_manifest(atac_out).modality == "atac"

    mdata = mudata.read_h5mu(data_dir / "multiome" / "pbmc10k_multiome_1000cells_subset.h5mu")[:20].copy()
    model = cs.load_model(str(base), adapters={"rna": str(adapter), "atac": str(atac_out)})
    for modality in ("rna", "atac"):
        cs.tl.annotate(mdata, modality=modality, model=model, decode="score", sidecar=False, progress=False)
    for modality, folder in (("rna", adapter), ("atac", atac_out)):
        params = mdata.mod[modality].uns["cellscribe"]["params"]
        assert params["adapter"] == str(folder)
        assert params["adapter_manifests"][modality]["path"] == str(folder.resolve())
        answers = set(mdata.mod[modality].obs["cellscribe"].dropna())
        assert answers and answers <= set(read_adapter_manifest(folder).labels)
