"""Model manifests (core.domain.manifests, adapters/manifests) and per-modality LoRA adapters on one base."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _llm_helpers import cellreasoner_prompt, make_lora, sentences
from _tiny_models import make_tiny_model, make_tokenizer

from cellscribe.core.domain import manifests
from cellscribe.core.domain.manifests import Manifest, find_manifest, list_manifests, load_manifest
from cellscribe.core.plugins import make_host

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]

GREEDY = {"do_sample": False, "max_new_tokens": 6}


@pytest.fixture(autouse=True)
def no_user_manifests(monkeypatch):
    monkeypatch.delenv(manifests.ENV_MANIFESTS, raising=False)


@pytest.fixture(scope="module")
def host():
    return make_host()


@pytest.fixture(scope="module")
def backend(host):
    return host.registry.get("backend", "transformers")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("base") / "model", seed=0, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory, base_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    return {
        "rna": make_lora(base_dir, root / "rna", seed=1),
        "atac": make_lora(base_dir, root / "atac", seed=2, targets=("k_proj", "o_proj")),
    }


def texts(generations) -> list[str]:
    return [g.text for g in generations]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# -- manifests --------------------------------------------------------------------------------------


def test_shipped_manifests(host):
    shipped = {m.name: m for m in list_manifests()}
    assert set(shipped) == {"cellreasoner-7b", "cellreasoner-32b", "cell-o1"}
    o1 = shipped["cell-o1"]
    assert (o1.base_model, o1.modality, o1.prompt, o1.sentence, o1.n_genes, o1.decoder, o1.adapter) == (
        "ncbi/Cell-o1", "rna", "puzzle", "top-expressed", 50, "cellpuzzles", None,
    )
    assert o1.generation == {"do_sample": False, "max_new_tokens": 3500}
    assert shipped["cellreasoner-7b"].base_model == "guangshuo/CellReasoner-7B"
    assert shipped["cellreasoner-32b"].base_model == "guangshuo/CellReasoner-32B"
    for manifest in shipped.values():
        manifest.check_components(host.registry)  # every named strategy and decoder is installed
        assert manifest.description and manifest.source.startswith("https://")
        assert manifest.path.parent == manifests.SHIPPED_DIR
        json.dumps(manifest.to_dict())
    assert o1.annotate_defaults() == {
        "prompt": "puzzle",
        "sentence": "top-expressed",
        "n_genes": 50,
        "generation": {"do_sample": False, "max_new_tokens": 3500},
    }


def test_backend_resolves_manifest_names_without_heavy_imports(backend):
    assert backend.handles("cell-o1") and backend.handles("cellreasoner-7b")
    assert not backend.handles("no-such-model")
    assert find_manifest("cell-o1").base_model == "ncbi/Cell-o1"
    assert find_manifest("ncbi/Cell-o1") is None and find_manifest("no-such-model") is None


def good(extra: str = "") -> str:
    """A valid manifest named ``{name}`` (filled in by the test), with ``extra`` top-level lines."""
    return (
        'name = "{name}"\nbase_model = "org/base"\nprompt = "zero-shot"\nn_genes = 200\n'
        + extra
        + "[generation]\ntemperature = 0.2\n"
    )


GOOD = good()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (good('colour = "red"\n'), r"unknown key\(s\) colour; allowed keys: name, base_model"),
        ('name = "{name}"\n', r"missing required key\(s\) base_model"),
        (GOOD.replace("200", "-3"), r"'n_genes' must be a positive integer; got -3"),
        (GOOD.replace("200", '"many"'), r"'n_genes' must be a positive integer; got 'many'"),
        (good('mode = "fast"\n'), r"'mode' must be one of direct, reasoning; got 'fast'"),
        (GOOD.replace('"org/base"', '""'), r"'base_model' must be a non-empty string"),
        (GOOD.replace("temperature = 0.2", "x = {{ a = 1 }}"), r"generation.x must be a string, number"),
        (GOOD.replace("[generation]", "[x]"), r"unknown key\(s\) x"),
        ('name = "{name}"\nbase_model = "b"\ngeneration = 3\n', r"'generation' must be a table"),
        ('name = "{name}\n', r"is not valid TOML"),
    ],
    ids=[
        "unknown-key", "missing", "negative", "type", "mode", "empty", "nested", "unknown-table",
        "not-a-table", "toml",
    ],
)
def test_bad_manifests_give_clear_errors(tmp_path, content, message):
    path = write(tmp_path / "broken.toml", content.format(name="broken"))
    with pytest.raises(ValueError, match=message) as info:
        load_manifest(path)
    assert "broken.toml" in str(info.value)


def test_manifest_names_files_and_json(tmp_path):
    with pytest.raises(ValueError, match="'name' must be lower-case"):
        load_manifest(write(tmp_path / "Big.toml", GOOD.format(name="Big")))
    with pytest.raises(ValueError, match="rename the file to other.toml"):
        load_manifest(write(tmp_path / "mine.toml", GOOD.format(name="other")))
    with pytest.raises(ValueError, match="does not exist"):
        load_manifest(tmp_path / "absent.toml")
    with pytest.raises(ValueError, match=r"must be a \.toml or \.json file"):
        load_manifest(write(tmp_path / "x.yaml", "name: x"))
    data = {"name": "as-json", "base_model": "org/base", "generation": {"max_new_tokens": 8}}
    (tmp_path / "as-json.json").write_text(json.dumps(data))
    assert load_manifest(tmp_path / "as-json.json").generation == {"max_new_tokens": 8}
    with pytest.raises(ValueError, match="not valid JSON"):
        load_manifest(write(tmp_path / "bad.json", "{"))
    with pytest.raises(ValueError, match="'name' must be lower-case"):
        Manifest(name="", base_model="x")  # built in code: the validators still apply
    with pytest.raises(ValueError, match="invalid manifest"):
        Manifest.from_mapping({"name": "Bad", "base_model": "x"})


def test_user_manifests_extend_and_override_the_shipped_ones(tmp_path, monkeypatch):
    user = tmp_path / "user"
    write(user / "cell-o1.toml", 'name = "cell-o1"\nbase_model = "/models/cell-o1"\n')
    write(user / "mine.toml", 'name = "mine"\nbase_model = "org/base"\nadapter = "loras/rna"\n')
    (user / "loras" / "rna").mkdir(parents=True)
    monkeypatch.setenv(manifests.ENV_MANIFESTS, str(user))
    found = {m.name: m for m in list_manifests()}
    assert set(found) == {"cellreasoner-7b", "cellreasoner-32b", "cell-o1", "mine"}
    assert found["cell-o1"].base_model == "/models/cell-o1" == find_manifest("cell-o1").base_model
    # A relative adapter folder is resolved against the manifest's folder.
    assert found["mine"].adapter == str((user / "loras" / "rna").resolve())
    write(user / "hub.toml", 'name = "hub"\nbase_model = "org/base"\nadapter = "org/lora-rna"\n')
    assert find_manifest("hub").adapter == "org/lora-rna"
    assert find_manifest("Cell-O1").base_model == "/models/cell-o1"  # names are case-insensitive
    write(user / "mine.json", json.dumps({"name": "mine", "base_model": "org/other"}))
    with pytest.raises(ValueError, match="two manifests named 'mine'"):
        list_manifests()
    write(user / "broken.toml", 'name = "broken"\n')
    # A listing can show the valid manifests and warn about the others.
    with pytest.warns(UserWarning) as caught:
        listed = [m.name for m in list_manifests(errors="warn")]
    assert "cell-o1" in listed and "broken" not in listed
    assert sorted(str(w.message).split(":")[0] for w in caught) == ["skipped", "skipped"]
    assert any("missing required key(s) base_model" in str(w.message) for w in caught)


def test_a_broken_manifest_is_reported_when_loaded(backend, tmp_path, monkeypatch):
    write(tmp_path / "broken.toml", 'name = "broken"\nbase_model = 3\n')
    monkeypatch.setenv(manifests.ENV_MANIFESTS, str(tmp_path))
    assert backend.handles("broken")  # so that load() can say what is wrong
    with pytest.raises(ValueError, match=r"broken\.toml.*'base_model' must be a non-empty string"):
        backend.load("broken")
    assert backend.handles("cell-o1")  # the other manifests are unaffected


def test_loading_by_manifest_name(backend, base_dir, lora_dirs, host, tmp_path, monkeypatch):
    shutil.copytree(lora_dirs["rna"], tmp_path / "lora-rna")
    write(
        tmp_path / "tiny-cell.toml",
        f"""\
        name = "tiny-cell"
        base_model = "{base_dir}"
        modality = "rna"
        prompt = "zero-shot"
        sentence = "ranked-hvg"
        adapter = "lora-rna"
        [generation]
        max_new_tokens = 5
        """,
    )
    monkeypatch.setenv(manifests.ENV_MANIFESTS, str(tmp_path))
    assert host.registry.backend_for("tiny-cell").name == "transformers"
    loaded = backend.load("tiny-cell", hook=host.hook)
    assert loaded.manifest.name == "tiny-cell"
    assert loaded.manifest.annotate_defaults()["generation"] == {"max_new_tokens": 5}
    info = loaded.info()
    assert (info["model"], info["manifest"], info["base_model"]) == ("tiny-cell", "tiny-cell", str(base_dir))
    assert info["adapters"] == {"rna": str((tmp_path / "lora-rna").resolve())}
    direct = backend.load(str(base_dir), adapters={"rna": str(lora_dirs["rna"])}, hook=host.hook)
    prompts = [cellreasoner_prompt(s, ()) for s in sentences(3)]
    assert texts(loaded.generate(prompts, settings=GREEDY)) == texts(direct.generate(prompts, settings=GREEDY))


# -- adapters ---------------------------------------------------------------------------------------


def test_two_modality_adapters_on_one_base_switch_within_a_run(backend, host, base_dir, lora_dirs):
    prompts = [cellreasoner_prompt(s, ()) for s in sentences(4)]
    both = backend.load(str(base_dir), adapters={m: str(p) for m, p in lora_dirs.items()}, hook=host.hook)
    assert set(both.model.peft_config) == {"rna", "atac"}
    outputs = {}
    # One run moving between modalities and back (as a MuData run does): no reload in between.
    for modality in ("rna", "atac", "rna", "adt", "atac"):
        both.use_modality(modality)
        outputs.setdefault(modality, []).append(texts(both.generate(prompts, settings=GREEDY)))
    assert outputs["rna"][0] == outputs["rna"][1] and outputs["atac"][0] == outputs["atac"][1]
    assert outputs["rna"][0] != outputs["atac"][0]
    for modality, path in lora_dirs.items():
        alone = backend.load(str(base_dir), adapters={modality: str(path)}, hook=host.hook)
        assert outputs[modality][0] == texts(alone.generate(prompts, settings=GREEDY))
        # Not only the greedy text: the logits agree too.
        both.use_modality(modality)
        ids = torch.tensor([alone.tokenizer(alone.render(prompts[0]))["input_ids"]])
        with torch.inference_mode():
            torch.testing.assert_close(both.model(input_ids=ids).logits, alone.model(input_ids=ids).logits)
    plain = backend.load(str(base_dir))
    assert outputs["adt"][0] == texts(plain.generate(prompts, settings=GREEDY))  # no adapter: the base


def test_constrained_and_score_modes_use_the_active_adapter(backend, host, base_dir, lora_dirs):
    prompts = [cellreasoner_prompt(s) for s in sentences(4)]
    both = backend.load(str(base_dir), adapters={m: str(p) for m, p in lora_dirs.items()}, hook=host.hook)
    scores = {}
    for modality in ("rna", "atac"):
        both.use_modality(modality)
        scores[modality] = [g.label_scores for g in both.generate(prompts, settings={"decode": "score"})]
        alone = backend.load(str(base_dir), adapters={modality: str(lora_dirs[modality])}, hook=host.hook)
        expected = [g.label_scores for g in alone.generate(prompts, settings={"decode": "score"})]
        for got, want in zip(scores[modality], expected):
            assert got[0] == pytest.approx(want[0], abs=1e-6)
    assert scores["rna"] != scores["atac"]


def test_adapter_for_another_base_is_refused(backend, host, base_dir, lora_dirs, tmp_path, tokenizer):
    # A base of another shape: its adapter names an existing folder whose config differs.
    other = make_tiny_model(tmp_path / "other" / "model", seed=3, tokenizer=tokenizer)
    config = json.loads((other / "config.json").read_text())
    config.update(intermediate_size=96)
    (other / "config.json").write_text(json.dumps(config))
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(other)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(other)
    foreign = make_lora(other, tmp_path / "foreign", seed=4)
    with pytest.raises(ValueError, match=r"whose architecture differs.*intermediate_size: 96 vs 128"):
        backend.load(str(base_dir), adapters={"rna": str(foreign)}, hook=host.hook)

    # An adapter trained on a hub model of another name.
    renamed = tmp_path / "renamed"
    shutil.copytree(lora_dirs["rna"], renamed)
    adapter_config = json.loads((renamed / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = "org/another-model"
    (renamed / "adapter_config.json").write_text(json.dumps(adapter_config))
    with pytest.raises(ValueError, match=r"trained on base model 'org/another-model'.*base_model_name_or_path"):
        backend.load(str(base_dir), adapters={"rna": str(renamed)}, hook=host.hook)

    # The same model under its hub name (the local folder is called like the repository): accepted.
    adapter_config["base_model_name_or_path"] = f"org/{base_dir.name}"
    (renamed / "adapter_config.json").write_text(json.dumps(adapter_config))
    loaded = backend.load(str(base_dir), adapters={"rna": str(renamed)}, hook=host.hook)
    assert loaded.info()["adapters"] == {"rna": str(renamed)}


def test_merged_adapter(backend, host, base_dir, lora_dirs):
    prompts = [cellreasoner_prompt(s, ()) for s in sentences(3)]
    separate = backend.load(str(base_dir), adapters={"rna": str(lora_dirs["rna"])}, hook=host.hook)
    merged = backend.load(
        str(base_dir), adapters={"rna": str(lora_dirs["rna"])}, hook=host.hook, merge_adapters=True
    )
    from peft import PeftModel

    assert not isinstance(merged.model, PeftModel)
    assert merged.info()["merged_adapter"] == "rna" and merged.info()["active_adapter"] == "rna"
    assert texts(merged.generate(prompts, settings=GREEDY)) == texts(separate.generate(prompts, settings=GREEDY))
    merged.use_modality("rna")
    with pytest.raises(ValueError, match="was merged into the weights"):
        merged.use_modality("atac")
    with pytest.raises(ValueError, match="merge_adapters needs exactly one adapter, got 2"):
        backend.load(
            str(base_dir), adapters={m: str(p) for m, p in lora_dirs.items()}, hook=host.hook, merge_adapters=True
        )


def test_a_manifest_family_loads_every_modality_adapter_once(backend, base_dir, lora_dirs, tmp_path, monkeypatch):
    """Manifests of one base for several modalities: loading one loads all their adapters, and
    switching modality gives exactly what that modality's manifest loaded alone gives."""
    folder = tmp_path / "manifests"
    for modality, lora in lora_dirs.items():
        write(folder / f"tiny-{modality}.toml", f"""
            name = "tiny-{modality}"
            base_model = "{base_dir}"
            modality = "{modality}"
            adapter = "{lora}"
            """)
    monkeypatch.setenv(manifests.ENV_MANIFESTS, str(folder))
    prompts = [cellreasoner_prompt(s) for s in sentences(3)]
    family = backend.load("tiny-rna")
    assert set(family.adapters) == {"rna", "atac"}
    family.use_modality("atac")
    switched = texts(family.generate(prompts, settings=GREEDY))
    family.use_modality("rna")
    back = texts(family.generate(prompts, settings=GREEDY))

    alone = {m: backend.load(str(base_dir), adapters={m: str(lora_dirs[m])}) for m in ("rna", "atac")}
    for m, model in alone.items():
        model.use_modality(m)
    assert switched == texts(alone["atac"].generate(prompts, settings=GREEDY))
    assert back == texts(alone["rna"].generate(prompts, settings=GREEDY))


def test_a_loaded_model_serves_every_modality_of_a_mudata(base_dir, lora_dirs, data_dir, monkeypatch):
    """``cellscribe.load_model`` loads the base and both adapters once; each ``tl.annotate`` call on a
    MuData modality answers with that modality's adapter, exactly as a run that loads the model with
    that adapter itself, and records the adapter it used."""
    import mudata

    import cellscribe as cs
    from cellscribe.plugins.transformers import TransformersBackend

    mudata.set_options(pull_on_update=False)
    mdata = mudata.read_h5mu(data_dir / "multiome" / "pbmc10k_multiome_1000cells_subset.h5mu")[:10].copy()
    options = dict(candidates=["T cell", "B cell", "monocyte", "natural killer cell"], decode="score",
                   sidecar=False, progress=False, modality_options=None)
    atac = {"smoothing": False}

    loads = []
    original = TransformersBackend.load
    monkeypatch.setattr(TransformersBackend, "load", lambda self, *a, **kw: loads.append(a) or original(self, *a, **kw))
    model = cs.load_model(str(base_dir), adapters={m: str(p) for m, p in lora_dirs.items()})
    assert "adapters for ['atac', 'rna']" in repr(model)
    cs.tl.annotate(mdata, modality="rna", mod="rna", model=model, **options)
    cs.tl.annotate(mdata, modality="atac", mod="atac", model=model, **{**options, "modality_options": atac})
    assert len(loads) == 1

    for mod, extra in (("rna", None), ("atac", atac)):
        alone = mdata.mod[mod].copy()
        cs.tl.annotate(alone, modality=mod, model=str(base_dir), adapter=str(lora_dirs[mod]),
                       **{**options, "modality_options": extra})
        shared = mdata.mod[mod].obs
        pd.testing.assert_series_equal(shared["cellscribe"], alone.obs["cellscribe"])
        np.testing.assert_allclose(shared["cellscribe_confidence"], alone.obs["cellscribe_confidence"], atol=1e-5)
        assert mdata.mod[mod].uns["cellscribe"]["params"]["adapter"] == str(lora_dirs[mod])
    assert len(loads) == 3
    # The two adapters answer differently (otherwise the comparison above proves nothing).
    rna_conf = mdata.mod["rna"].obs["cellscribe_confidence"].to_numpy()
    atac_conf = mdata.mod["atac"].obs["cellscribe_confidence"].to_numpy()
    assert not np.allclose(rna_conf, atac_conf)


def test_load_options_cannot_change_a_loaded_model(base_dir):
    import anndata as ad
    import scipy.sparse as sp

    import cellscribe as cs

    model = cs.load_model("markers")
    adata = ad.AnnData(sp.csr_matrix(np.ones((2, 3), dtype=np.float32)))
    for given in ({"device": "cpu"}, {"adapter": "lora/rna"}, {"model_options": {"a": 1}}):
        with pytest.raises(ValueError, match=r"cellscribe.load_model\(\)"):
            cs.tl.annotate(adata, model=model, progress=False, sidecar=False, **given)
    # The tissue belongs to the data, not the model: each run of a loaded model gives its own.
    cs.tl.annotate(adata, model=model, tissue="blood", progress=False, sidecar=False)
    assert adata.uns["cellscribe"]["params"]["tissue"] == "blood"
