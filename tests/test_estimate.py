"""The cost of a run before it runs (issue 18 item 4): ``--dry-run`` and ``RunPlan.estimate``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from cellscribe.cli import main
from cellscribe.core.run import plan_run
from cellscribe.core.run.estimate import (
    CHARS_PER_TOKEN,
    GPU_EFFECTIVE_BANDWIDTH,
    GPU_EFFECTIVE_FLOPS,
    MEASURE_NEW_TOKENS,
    MEASURE_PROMPTS,
    assumed_gpu_rates,
    format_seconds,
)

from _rule_backend import PANCREAS_RULES, RuleModel, RulePlugin


def _plan(data, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return plan_run(data, **params)


def _chars(plan):
    return sum(len(m["content"]) for p in plan.prompts for m in p.messages)


def test_given_rates_give_the_time_without_calling_the_model(pancreas, with_plugin):
    model = RuleModel(PANCREAS_RULES)
    with_plugin(RulePlugin(model=model))
    plan = _plan(pancreas, model="rules", generation={"max_new_tokens": 10})
    est = plan.estimate(rates={"prompt_tokens_per_s": 1000, "new_tokens_per_s": 50})
    tokens = _chars(plan) / CHARS_PER_TOKEN
    assert est["estimate_prompts"] == 350 and est["estimate_prompt_tokens"] == round(tokens)
    assert est["estimate_new_tokens_at_most"] == 350 * 10
    assert est["estimate_model_seconds"] == pytest.approx(tokens / 1000 + 3500 / 50, rel=1e-3)
    assert est["rate_source"] == "given: prompt_tokens_per_s, new_tokens_per_s"
    assert model.calls == []


def test_a_local_model_is_timed_on_a_few_of_the_run_prompts(pancreas, with_plugin):
    model = RuleModel(PANCREAS_RULES)  # reports no token counts: timed per prompt
    with_plugin(RulePlugin(model=model))
    plan = _plan(pancreas, model="rules")
    est = plan.estimate()
    assert est["rate_source"].startswith("measured on this machine") and "timed per prompt" in est["rate_source"]
    assert est["rate_prompts_per_s"] > 0
    assert est["estimate_model_seconds"] == pytest.approx(350 / est["rate_prompts_per_s"], rel=1e-2)
    assert 0 < len(model.calls) <= 1 + 2 * MEASURE_PROMPTS + 256  # a sample, never the run
    # measure=False: no model is loaded, so no time without rates
    calls = len(model.calls)
    est = plan.estimate(measure=False)
    assert est["estimate_model_seconds"] is None and "pass --rate" in est["estimate_model_time"]
    assert len(model.calls) == calls


def test_a_budget_counts_the_first_round_the_requery_at_most_and_the_full_run(with_plugin):
    import scanpy as sc

    model = RuleModel(PANCREAS_RULES)
    with_plugin(RulePlugin(model=model))
    pbmc = sc.datasets.pbmc68k_reduced()
    plan = _plan(pbmc, model="rules", budget=0.05)
    est = plan.estimate(rates={"prompts_per_s": 7})
    assert est["estimate_prompts"] == 35 and est["estimate_model_seconds"] == pytest.approx(5.0)
    assert est["estimate_requery_prompts_at_most"] == 35
    assert est["estimate_model_seconds_with_requery_at_most"] == pytest.approx(10.0)
    assert est["estimate_model_time_without_budget"] == format_seconds(100.0) == "1 min 40 s"


def test_a_server_gets_the_documented_assumption_and_no_request(pancreas):
    plan = _plan(pancreas, model="openai:served-model", generation={"max_new_tokens": 64},
                 model_options={"base_url": "http://127.0.0.1:9/v1", "max_concurrency": 16})
    est = plan.estimate()  # nothing listens on port 9: a request would fail
    assert est["rate_source"].startswith("assumed: the server (16 requests in flight) as one NVIDIA H100")
    prefill = GPU_EFFECTIVE_FLOPS / (2 * 7e9)
    decode = 16 / (7e9 * 2 / GPU_EFFECTIVE_BANDWIDTH)
    assert est["rate_prompt_tokens_per_s"] == pytest.approx(prefill, rel=1e-3) == pytest.approx(50_000, rel=1e-3)
    expected = est["estimate_prompt_tokens"] / prefill + 350 * 64 / decode
    assert est["estimate_model_seconds"] == pytest.approx(expected, rel=1e-3)
    # any rate given overrides the assumption
    est = plan.estimate(rates={"new_tokens_per_s": 1000})
    assert est["rate_new_tokens_per_s"] == 1000 and est["rate_prompt_tokens_per_s"] == pytest.approx(prefill, rel=1e-3)


def test_bad_rates_are_refused_in_one_line(pancreas, with_plugin):
    with_plugin(RulePlugin(model=RuleModel(PANCREAS_RULES)))
    plan = _plan(pancreas, model="rules")
    for rates, message in (({"tokens": 3}, "unknown rate 'tokens'"), ({"prompts_per_s": 0}, "positive number"),
                           ({"prompts_per_s": "fast"}, "positive number")):
        with pytest.raises(ValueError, match=message):
            plan.estimate(rates=rates)


def test_the_gpu_assumption_scales_with_the_model_size():
    small, large = assumed_gpu_rates(1e9, concurrency=8), assumed_gpu_rates(7e9, concurrency=8)
    assert small.prompt_tokens_per_s == pytest.approx(7 * large.prompt_tokens_per_s)
    assert assumed_gpu_rates(7e9, concurrency=16).new_tokens_per_s == pytest.approx(2 * large.new_tokens_per_s)
    assert "size is not known" in assumed_gpu_rates(None, concurrency=1).source


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("transformers")
    from _tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def test_a_transformers_model_is_timed_here_and_its_tokenizer_counts(tiny, pancreas):
    plan = _plan(pancreas[:40].copy(), model=str(tiny), generation={"max_new_tokens": 32}, device="cpu", n_genes=30)
    est = plan.estimate()
    assert est["rate_source"].startswith(f"measured on this machine: {MEASURE_PROMPTS} of the run's prompts")
    assert f"{MEASURE_NEW_TOKENS} more new tokens" in est["rate_source"] or "more new tokens" in est["rate_source"]
    assert est["rate_prompt_tokens_per_s"] > 0 and est["rate_new_tokens_per_s"] > 0
    assert est["estimate_tokens_counted_by"].startswith("the model's tokenizer")
    assert est["estimate_new_tokens_at_most"] == 40 * 32
    expected = est["estimate_prompt_tokens"] / est["rate_prompt_tokens_per_s"] + 40 * 32 / est["rate_new_tokens_per_s"]
    assert est["estimate_model_seconds"] == pytest.approx(expected, rel=1e-3)


def test_a_transformers_model_on_a_gpu_gets_the_assumption_for_its_size(tiny, pancreas):
    from safetensors.numpy import load_file

    plan = _plan(pancreas[:20].copy(), model=str(tiny), device="cuda", batch_size=4)
    est = plan.estimate()  # no GPU needed: nothing is loaded
    n_params = sum(int(np.prod(t.shape)) for f in tiny.glob("*.safetensors") for t in load_file(f).values())
    assert est["rate_prompt_tokens_per_s"] == pytest.approx(GPU_EFFECTIVE_FLOPS / (2 * n_params), rel=1e-3)
    assert "decoding 4 prompts per step" in est["rate_source"]


def test_the_command_line_prints_the_estimate_and_writes_nothing(pancreas_path, tmp_path):
    out = tmp_path / "o.h5ad"
    result = CliRunner().invoke(main, ["annotate", str(pancreas_path), "-o", str(out), "--dry-run",
                                       "--budget", "0.05"])
    assert result.exit_code == 0, result.output
    for line in ("estimate_prompts: 17", "estimate_prompt_tokens:", "rate_source: measured on this machine",
                 "estimate_model_time:", "estimate_requery_prompts_at_most: 17", "budget_cells_first_round: 17"):
        assert line in result.output
    assert list(tmp_path.iterdir()) == []
    bad = CliRunner().invoke(main, ["annotate", str(pancreas_path), "-o", str(out), "--rate", "prompts_per_s=3"])
    assert bad.exit_code == 2 and "--rate is for --dry-run" in bad.output
