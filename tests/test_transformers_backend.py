"""The transformers backend, its PEFT adapter hook and the tiny offline models the tests build."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from _tiny_models import (
    THINK_TOKENS,
    cellreasoner_records,
    finetune_to_answer,
    make_tiny_model,
    make_tokenizer,
    pancreas_examples,
)

from cellscribe import Prompt, hookimpl
from cellscribe.core.plugins import make_host

# peft calls a transformers API that v5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

DIRECT = cellreasoner_records("direct")[0]["instruction"]
REASONING = cellreasoner_records("reasoning")[0]["instruction"]


def chat_prompt(sentence: str, instruction: str = DIRECT, **fields) -> Prompt:
    return Prompt(
        messages=({"role": "system", "content": instruction}, {"role": "user", "content": sentence}),
        unit_ids=("cell",),
        sentences=(sentence,),
        **fields,
    )


def varied_prompts(n: int = 6) -> list[Prompt]:
    """Prompts of clearly different lengths (so batches need padding)."""
    pairs = pancreas_examples(2, n_genes=30)
    return [chat_prompt(", ".join(s.split(", ")[: 3 + 5 * i])) for i, (s, _) in enumerate(pairs[:n])]


@pytest.fixture(scope="session")
def backend():
    return make_host().registry.get("backend", "transformers")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny(backend, tiny_dir):
    """The untrained tiny model, loaded once (tests must not modify it)."""
    return backend.load(str(tiny_dir))


@pytest.fixture
def fresh(backend, tiny_dir):
    """The untrained tiny model loaded for one test (safe to monkeypatch)."""
    return backend.load(str(tiny_dir))


@pytest.fixture(scope="session")
def finetuned(tmp_path_factory, backend, tiny_dir, tiny):
    """A copy of the tiny model fine-tuned to answer the Group label of 20 pancreas cells."""
    path = tmp_path_factory.mktemp("finetuned") / "model"
    shutil.copytree(tiny_dir, path)
    examples = pancreas_examples(4, n_genes=20)
    prompts = [chat_prompt(sentence) for sentence, _ in examples]
    labels = [label for _, label in examples]
    stats = finetune_to_answer(path, [tiny.render(p) for p in prompts], labels, steps=300)
    return backend.load(str(path)), prompts, labels, stats


def make_lora(base_dir: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir))
    # init_lora_weights=False: peft's default (B = 0) would leave the outputs unchanged.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def lora_dirs(tmp_path_factory, tiny_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    return {"rna": make_lora(tiny_dir, root / "rna", 1), "atac": make_lora(tiny_dir, root / "atac", 2)}


def texts(generations) -> list[str]:
    return [g.text for g in generations]


# -- the tiny models themselves ---------------------------------------------------------------------


def test_tiny_tokenizer_ids_survive_reload_through_auto_tokenizer(tiny_tokenizer, tiny_dir):
    # transformers >= 5.8 rebuilds a Qwen2Tokenizer from the saved files (the trap the NOTES warn about),
    # older releases load the fast tokenizer as saved: the ids must survive either way.
    reloaded = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    text = tiny_tokenizer.apply_chat_template(
        [{"role": "system", "content": REASONING}, {"role": "user", "content": "INS, GCG, SST, Ünïcødé 12345"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    text += "<think> reasoning\r\n</think>\n<answer>beta</answer>"
    assert reloaded(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    assert reloaded.decode(reloaded(text)["input_ids"]) == text
    # <think> tags are ordinary added tokens: kept when special tokens are skipped.
    ids = reloaded("<think>x</think><|im_end|>")["input_ids"]
    assert [reloaded.convert_ids_to_tokens(i) for i in (ids[0], ids[-2])] == list(THINK_TOKENS)
    assert reloaded.decode(ids, skip_special_tokens=True) == "<think>x</think>"


def test_tiny_model_files(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "chat_template.jinja"} <= names
    assert not any(n.endswith(".bin") for n in names)
    config = json.loads((tiny_dir / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == ("qwen2", 64, 2)
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    assert generation["eos_token_id"] == generation["pad_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")


# -- registration and loading -----------------------------------------------------------------------


def test_plugin_import_does_not_import_heavy_libraries():
    code = textwrap.dedent(
        """
        import sys
        import cellscribe.plugins.transformers as plugin
        plugin.TransformersBackend().handles("org/name")
        heavy = [m for m in ("torch", "transformers", "peft") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_picks_transformers_for_a_local_model_dir(host, tiny_dir):
    backend = host.registry.backend_for(str(tiny_dir))
    assert backend.name == "transformers"
    loaded = backend.load(str(tiny_dir))
    info = loaded.info()
    assert info["backend"] == "transformers" and info["model"] == str(tiny_dir)
    assert (info["dtype"], info["device"], info["adapters"], info["revision"]) == ("float32", "cpu", {}, None)
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.count_tokens("INS, GCG") == len(loaded.tokenizer("INS, GCG")["input_ids"]) > 0


def test_handles(backend, tiny_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    assert backend.handles(str(tiny_dir))
    assert backend.handles("Qwen/Qwen2.5-7B-Instruct")
    assert backend.handles("guangshuo/CellReasoner-7B")
    for spec in ("openai:gpt-4o", "not a model", "a/b/c", "../x", str(tmp_path / "empty"), str(tmp_path / "file.txt")):
        assert not backend.handles(spec), spec


def test_third_party_backends_are_asked_first(with_plugin, tiny_dir):
    class Greedy:
        name = "greedy"
        description = "handles everything"

        def handles(self, spec):
            return True

        def load(self, spec, **options):
            raise AssertionError

    class Plugin:
        @hookimpl
        def cellscribe_register_backends(self, register):
            register(Greedy())

    host = with_plugin(Plugin())
    assert host.registry.backend_for(str(tiny_dir)).name == "greedy"
    assert host.registry.backend_for("transformers").name == "transformers"


def test_load_passes_safe_defaults_to_from_pretrained(backend, tiny_dir, monkeypatch):
    calls = {}
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained

        def spy(*args, _original=original, _name=cls.__name__, **kwargs):
            calls[_name] = kwargs
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    backend.load(str(tiny_dir))
    model_kwargs = calls["AutoModelForCausalLM"]
    assert model_kwargs["trust_remote_code"] is False
    assert model_kwargs["use_safetensors"] is True
    assert model_kwargs["dtype"] == torch.float32
    assert calls["AutoTokenizer"]["trust_remote_code"] is False
    backend.load(str(tiny_dir), trust_remote_code=True)
    assert calls["AutoModelForCausalLM"]["trust_remote_code"] is True


@pytest.mark.parametrize("how", ["env", "unreachable"])
def test_hub_id_offline_fails_at_once_from_the_cache_only(backend, monkeypatch, tmp_path, how):
    from cellscribe.plugins.transformers import _backend

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://cellscribe-test.invalid")
    assert _backend.hub_offline()
    calls = []
    original = transformers.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    with pytest.raises(ValueError, match="could not load a tokenizer for 'guangshuo/CellReasoner-7B'"):
        backend.load("guangshuo/CellReasoner-7B")
    assert calls[0]["local_files_only"] is True  # no download attempted, so no retries


def test_dtype_option(backend, tiny_dir):
    loaded = backend.load(str(tiny_dir), dtype="bfloat16")
    assert loaded.model.dtype == torch.bfloat16 and loaded.info()["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="unknown dtype"):
        backend.load(str(tiny_dir), dtype="float7")


def test_missing_or_non_model_paths_raise_clear_errors(backend, tmp_path, lora_dirs):
    with pytest.raises(ValueError, match="does not exist.*local model directory"):
        backend.load(str(tmp_path / "missing" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        backend.load(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="PEFT adapter"):
        backend.load(str(lora_dirs["rna"]))
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        backend.load(str(tmp_path / "weights.safetensors"))


def test_tokenizer_without_chat_template_is_refused(backend, tiny_dir, tmp_path):
    path = tmp_path / "plain"
    shutil.copytree(tiny_dir, path)
    (path / "chat_template.jinja").unlink()
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="this tokenizer has no chat template; cellscribe renders prompts"):
        backend.load(str(path))


# -- rendering and generation -----------------------------------------------------------------------


def test_render_applies_chat_template_removals_and_response_prefix(tiny):
    sentence = "INS, IAPP, HADH"
    prompt = chat_prompt(sentence, REASONING, remove_from_rendered=("<think>",), response_prefix="<think> ")
    expected = (
        "<|im_start|>system\n"
        + REASONING.replace("<think></think>", "</think>")
        + "<|im_end|>\n<|im_start|>user\n"
        + sentence
        + "<|im_end|>\n<|im_start|>assistant\n<think> "
    )
    assert tiny.render(prompt) == expected
    assert "within the </think> tag" in expected


def test_batched_generation_with_left_padding_equals_one_by_one(backend, tiny_dir):
    prompts = varied_prompts(6)
    settings = {"max_new_tokens": 8, "do_sample": False}
    batched = backend.load(str(tiny_dir), batch_size=4)
    seen: list[int] = []
    together = batched.generate(prompts, settings=settings, progress=seen.append)
    alone = backend.load(str(tiny_dir), batch_size=1).generate(prompts, settings=settings)
    assert texts(together) == texts(alone)
    assert len(set(texts(together))) > 1  # the untrained model's output depends on its input
    assert seen == [4, 2]
    lengths = [batched.count_tokens(batched.render(p)) for p in prompts]
    assert [g.n_prompt_tokens for g in together] == lengths
    assert all(g.error is None and 0 < g.n_output_tokens <= 8 for g in together)


def _spy_generate(loaded, monkeypatch) -> list[dict]:
    """Record the keyword arguments and inputs of every ``model.generate`` call."""
    calls: list[dict] = []
    original = loaded.model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(loaded.model, "generate", spy)
    return calls


def test_settings_override_prompt_defaults_and_group_batches(fresh, monkeypatch):
    calls = _spy_generate(fresh, monkeypatch)
    defaults = {"do_sample": True, "temperature": 0.6, "top_p": 0.4, "max_new_tokens": 3}
    prompts = [chat_prompt("INS, GCG", generation=defaults), chat_prompt("SST", generation={"max_new_tokens": 5})]

    out = fresh.generate(prompts, settings={"do_sample": False, "max_new_tokens": 4, "repetition_penalty": 1.1})
    # Both prompts have the same effective settings once overridden: one batch; sampling keys dropped.
    assert len(calls) == 1
    kwargs = {k: v for k, v in calls[0].items() if k not in ("input_ids", "attention_mask")}
    assert kwargs == {"do_sample": False, "max_new_tokens": 4, "repetition_penalty": 1.1}
    assert all(g.n_output_tokens <= 4 for g in out)

    calls.clear()
    fresh.generate(prompts)
    assert sorted(c["max_new_tokens"] for c in calls) == [3, 5]
    sampled = next(c for c in calls if c["max_new_tokens"] == 3)
    assert (sampled["temperature"], sampled["top_p"], sampled["do_sample"]) == (0.6, 0.4, True)


def test_unknown_settings_are_rejected_before_generating(fresh, monkeypatch):
    calls = _spy_generate(fresh, monkeypatch)
    with pytest.raises(ValueError, match="temprature"):
        fresh.generate([chat_prompt("INS")], settings={"temprature": 0.5})
    with pytest.raises(ValueError, match="num_return_sequences"):
        fresh.generate([chat_prompt("INS")], settings={"num_return_sequences": 2})
    assert calls == []


def test_seed_makes_sampling_reproducible(tiny):
    settings = {"do_sample": True, "temperature": 1.5, "max_new_tokens": 8, "seed": 3}
    prompts = varied_prompts(3)
    assert texts(tiny.generate(prompts, settings=settings)) == texts(tiny.generate(prompts, settings=settings))


@pytest.mark.parametrize("side", ["left", "right"])
def test_max_prompt_tokens_truncates(backend, tiny_dir, monkeypatch, side):
    loaded = backend.load(str(tiny_dir), truncation_side=side)
    calls = _spy_generate(loaded, monkeypatch)
    prompt = chat_prompt(pancreas_examples(1, n_genes=20)[0][0])
    full = loaded.tokenizer(loaded.render(prompt), add_special_tokens=False)["input_ids"]
    assert len(full) > 12
    with pytest.warns(UserWarning, match="1 of 1 prompts were longer than max_prompt_tokens"):
        (out,) = loaded.generate([prompt], settings={"max_prompt_tokens": 12, "max_new_tokens": 2})
    assert out.n_prompt_tokens == 12
    expected = full[-12:] if side == "left" else full[:12]
    assert calls[0]["input_ids"][0].tolist() == expected
    assert "max_prompt_tokens" not in calls[0]


@pytest.mark.slow
def test_finetuned_tiny_model_answers_its_labels(finetuned):
    loaded, prompts, labels, stats = finetuned
    assert stats["steps"] < 300  # stopped early: every answer token learned
    out = loaded.generate(prompts, settings={"do_sample": False, "max_new_tokens": 16})
    assert texts(out) == labels
    assert len(set(labels)) == 5
    assert all(g.n_output_tokens == len(loaded.tokenizer(lab)["input_ids"]) + 1 for g, lab in zip(out, labels))


def test_a_failing_batch_becomes_errors_not_an_exception(fresh, monkeypatch):
    def boom(**kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(fresh.model, "generate", boom)
    seen: list[int] = []
    out = fresh.generate(varied_prompts(3), settings={"max_new_tokens": 2}, progress=seen.append)
    assert [g.text for g in out] == ["", "", ""]
    assert all(g.error == "RuntimeError: CUDA out of memory (simulated)" for g in out)
    assert sum(seen) == 3


def test_a_failing_batch_is_retried_one_prompt_at_a_time(fresh, monkeypatch):
    prompts = varied_prompts(3)
    settings = {"max_new_tokens": 4, "do_sample": False}
    expected = texts(fresh.generate(prompts, settings=settings))
    original = fresh.model.generate

    def fails_when_batched(**kwargs):
        if kwargs["input_ids"].shape[0] > 1:
            raise RuntimeError("too big")
        return original(**kwargs)

    monkeypatch.setattr(fresh.model, "generate", fails_when_batched)
    out = fresh.generate(prompts, settings=settings)
    assert texts(out) == expected and all(g.error is None for g in out)


# -- adapters ---------------------------------------------------------------------------------------


def _logits(model, loaded, prompt) -> torch.Tensor:
    ids = loaded.tokenizer(loaded.render(prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_lora_adapter_is_loaded_for_its_modality(host, backend, tiny, tiny_dir, lora_dirs):
    from peft import PeftModel

    prompt = chat_prompt("INS, GCG, SST, PPY")
    loaded = backend.load(str(tiny_dir), adapters={"rna": str(lora_dirs["rna"])}, hook=host.hook)
    assert isinstance(loaded.model, PeftModel)
    assert loaded.info()["adapters"] == {"rna": str(lora_dirs["rna"])}
    base_logits = _logits(tiny.model, tiny, prompt)
    adapted_logits = _logits(loaded.model, loaded, prompt)
    assert not torch.allclose(base_logits, adapted_logits, atol=1e-3)


def test_adapters_switch_with_the_modality(host, backend, tiny, tiny_dir, lora_dirs):
    prompts = varied_prompts(4)
    settings = {"max_new_tokens": 6, "do_sample": False}
    adapters = {m: str(p) for m, p in lora_dirs.items()}
    loaded = backend.load(str(tiny_dir), adapters=adapters, hook=host.hook)
    assert set(loaded.model.peft_config) == {"rna", "atac"}

    by_modality = {}
    for modality in ("rna", "atac", "adt"):
        loaded.use_modality(modality)
        assert loaded.info()["active_adapter"] == (None if modality == "adt" else modality)
        by_modality[modality] = texts(loaded.generate(prompts, settings=settings))
    assert by_modality["rna"] != by_modality["atac"]
    # A modality without an adapter answers with the base model, exactly.
    assert by_modality["adt"] == texts(tiny.generate(prompts, settings=settings))
    loaded.use_modality("rna")
    assert texts(loaded.generate(prompts, settings=settings)) == by_modality["rna"]


def test_adapter_hook_errors_and_other_backends(host, tiny, tmp_path, lora_dirs):
    hook = host.hook.cellscribe_load_adapter
    assert hook(model=tiny.model, adapter=str(lora_dirs["rna"]), modality="rna", backend="vllm") is None
    with pytest.raises(ValueError, match="does not exist"):
        hook(model=tiny.model, adapter=str(tmp_path / "nope" / "lora"), modality="rna", backend="transformers")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(lora_dirs["rna"] / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors"):
        hook(model=tiny.model, adapter=str(pickled), modality="rna", backend="transformers")
