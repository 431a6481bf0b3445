"""Executors without a cluster: the default ``local`` executor, and what ``executor="ray"`` says where Ray
is not installed (these tests run with or without the ray extra)."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

import cellscribe as cs
from cellscribe.cli import main
from cellscribe.core.spec import RunSpec

PANCREAS = "tests/data/pancreas_baron_human_mouse_350.h5ad"


def test_executors_are_registered_plugins(host):
    assert {"local", "ray"} <= set(host.registry.names("executor"))
    provided = {i.name: i.provides for i in host.plugins()}
    assert "executor:local" in provided["local"] and "executor:ray" in provided["ray"]
    assert RunSpec().execution.executor == "local"


def test_ray_is_imported_only_when_the_ray_executor_runs(host):
    import subprocess

    code = ("import sys, cellscribe.core.plugins as p; p.get_host(); import cellscribe.plugins.ray; "
            "print('ray' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_without_ray_the_ray_executor_stops_in_one_line_naming_the_extra(host, pancreas, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    before = pancreas.copy()
    with pytest.raises(ValueError, match=r"^executor='ray' needs Ray, which the ray extra installs: "
                                         r"pip install 'cellscribe\[ray\]'$"):
        cs.tl.annotate(pancreas, executor="ray", progress=False)
    assert list(pancreas.obs.columns) == list(before.obs.columns) and not pancreas.uns  # nothing written


def test_without_ray_the_command_line_exits_1_in_one_line_before_reading_the_data(host, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    out = tmp_path / "out.h5ad"
    result = CliRunner().invoke(main, ["annotate", PANCREAS, "-o", str(out), "--executor", "ray",
                                       "--ray-address", "auto", "--no-progress"])
    assert result.exit_code == 1, result.output  # README, "Exit status": an error before the run
    assert result.output.strip() == ("Error: executor='ray' needs Ray, which the ray extra installs: "
                                     "pip install 'cellscribe[ray]'")
    assert not out.exists() and not (tmp_path / "out.h5ad.cellscribe.ckpt").exists()


def test_the_local_executor_refuses_cluster_settings(host, pancreas):
    with pytest.raises(ValueError, match="executor_address is for a cluster executor.*executor='ray'"):
        cs.tl.annotate(pancreas, executor_address="auto", progress=False)
    with pytest.raises(ValueError, match=r"executor_options \['workers'\] is for a cluster executor"):
        cs.tl.annotate(pancreas, executor_options={"workers": 2}, progress=False)


def test_an_unknown_executor_lists_the_installed_ones(host, pancreas):
    with pytest.raises(Exception, match="unknown executor 'dask'; available: local, ray"):
        cs.tl.annotate(pancreas, executor="dask", progress=False)


def test_bad_ray_options_are_refused_before_any_work(host, pancreas):
    pytest.importorskip("ray", reason="option checks follow the check for Ray itself (the ray extra)")
    with pytest.raises(ValueError, match="unknown executor option.*'worker'.*known: workers"):
        cs.tl.annotate(pancreas, executor="ray", executor_options={"worker": 2}, progress=False)
    with pytest.raises(ValueError, match="engine must be one of actors, vllm"):
        cs.tl.annotate(pancreas, executor="ray", executor_options={"engine": "dask"}, progress=False)


def test_the_executor_is_recorded_and_a_run_re_created_from_it(host, pancreas):
    small = pancreas[:20].copy()
    cs.tl.annotate(small, progress=False, sidecar=False)
    params = small.uns["cellscribe"]["params"]
    assert params["executor"] == "local" and RunSpec.from_params(params).execution.executor == "local"


# -- engine="vllm": what the driver sends to Ray Data's vLLM processor (vLLM itself is not needed here) --


def test_vllm_rows_are_the_transformers_backends_own_token_ids_and_settings(host, tmp_path):
    """Each prompt becomes one row with the ids the transformers backend feeds its model (chat template,
    edits, response prefix) and its effective settings as vLLM sampling parameters, greedy when asked."""
    from _tiny_models import make_tiny_model

    from cellscribe.core.run import plan_run
    from cellscribe.plugins.ray._workers import vllm_rows

    model_dir = make_tiny_model(tmp_path / "tiny", seed=0)
    adata = __import__("anndata").read_h5ad(PANCREAS)[:6].copy()
    loaded = host.registry.get("backend", "transformers").load(str(model_dir))
    plan = plan_run(adata, model=str(model_dir), n_genes=20, mode="reasoning", host=host)
    settings = {"do_sample": False, "max_new_tokens": 8, "seed": 3}
    calls = [(plan.prompts[:4], settings), (plan.prompts[4:], settings)]
    rows = vllm_rows(calls, loaded)
    assert [(r["call"], r["pos"]) for r in rows] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    tokenizer = loaded.tokenizer
    for row, prompt in zip(rows, plan.prompts):
        assert row["tokenized_prompt"] == tokenizer(loaded.render(prompt), add_special_tokens=False)["input_ids"]
        assert loaded.render(prompt).endswith(prompt.response_prefix)
        assert prompt.generation["repetition_penalty"] == 1.1  # the prompt's defaults (CellReasoner's) carry over
        assert row["sampling_params"] == {"max_tokens": 8, "seed": 3, "temperature": 0.0, "repetition_penalty": 1.1,
                                          "truncate_prompt_tokens": prompt.generation["max_prompt_tokens"]}


def test_vllm_sampling_parameters_and_outputs():
    from cellscribe.plugins.ray._workers import sampling_params, vllm_generation

    assert sampling_params({"do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64}) == {
        "temperature": 0.7, "top_p": 0.9, "max_tokens": 64}
    assert sampling_params({"max_new_tokens": 4}) == {"max_tokens": 4, "temperature": 0.0}
    with pytest.raises(ValueError, match=r"\['num_beams'\] have no vLLM equivalent.*engine='actors'"):
        sampling_params({"num_beams": 4})
    ok = vllm_generation({"generated_text": "beta cell", "num_input_tokens": 40, "num_generated_tokens": 3})
    assert (ok.text, ok.n_prompt_tokens, ok.n_output_tokens, ok.error) == ("beta cell", 40, 3, None)
    failed = vllm_generation({"__inference_error__": "CUDA out of memory", "generated_text": "",
                              "num_input_tokens": -1})
    assert failed.error == "vLLM: CUDA out of memory" and failed.text == ""


@pytest.mark.gpu
def test_vllm_engine_gives_the_transformers_labels(host, tmp_path):
    """On a GPU machine with ``ray[llm]``: greedy answers of Ray Data's vLLM processor equal the
    transformers backend's for the tiny model."""
    pytest.importorskip("vllm", reason="engine='vllm' needs vLLM: pip install 'ray[llm]'")
    from _tiny_models import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "tiny", seed=0)
    adata = __import__("anndata").read_h5ad(PANCREAS)[:32].copy()
    run = dict(model=str(model_dir), n_genes=20, progress=False, generation={"do_sample": False, "max_new_tokens": 8})
    local, distributed = adata.copy(), adata.copy()
    cs.tl.annotate(local, **run)
    cs.tl.annotate(distributed, executor="ray", executor_options={"engine": "vllm", "workers": 1}, **run)
    assert (local.uns["cellscribe"]["raw"]["output"] == distributed.uns["cellscribe"]["raw"]["output"]).all()
