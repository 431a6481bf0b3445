"""The openai backend against a local OpenAI-compatible server (tests/_openai_server.py).

Every test talks HTTP to a real server on 127.0.0.1; retry delays are shrunk with ``backoff`` so the
whole module runs in seconds.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _openai_server import OpenAIServer, user_text  # noqa: E402
from _rule_backend import PANCREAS_RULES  # noqa: E402

import cellscribe as cs  # noqa: E402
import cellscribe.plugins.openai as openai_plugin  # noqa: E402
from cellscribe import Prompt  # noqa: E402
from cellscribe.core import plugins  # noqa: E402
from cellscribe.core.types import ModelUnavailableError  # noqa: E402
from cellscribe.plugins.openai import OpenAIBackend, retry_after_seconds  # noqa: E402

KEY = "sk-test-5f1c0a9e7d2b4c6a8e0f1a2b3c4d5e6f"
SYSTEM = "Name the cell type. Place the reason within the <think></think> tag."


@pytest.fixture(autouse=True)
def _no_ambient_openai_settings(monkeypatch):
    for name in ("OPENAI_API_KEY", "CELLSCRIBE_OPENAI_BASE_URL", "OPENAI_BASE_URL", "CELLSCRIBE_TEST_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server():
    with OpenAIServer() as running:
        yield running


@pytest.fixture
def openai_host(with_plugin):
    """The process-wide host with the openai backend (registered by hand while no entry point names it)."""
    host = plugins.make_host()
    if "openai" in host.registry.names("backend"):
        plugins.set_host(host)  # with_plugin restores the previous host afterwards
        return host
    return with_plugin(openai_plugin, "openai")


def connect(server: OpenAIServer, spec: str = "openai:tiny", **options):
    options.setdefault("backoff", 0.01)
    return OpenAIBackend().load(spec, base_url=server.base_url, **options)


def chat(sentence: str, **fields) -> Prompt:
    return Prompt(
        messages=({"role": "system", "content": "Name the cell type."}, {"role": "user", "content": sentence}),
        unit_ids=(sentence,),
        sentences=(sentence,),
        **fields,
    )


# -- registration and loading ------------------------------------------------------------------------


def test_registered_and_selected_by_prefix(openai_host):
    backend = openai_host.registry.backend_for("openai:Qwen/Qwen2.5-7B-Instruct")
    assert backend.name == "openai"
    assert backend.handles("openai:llama3.1:8b")
    assert not backend.handles("Qwen/Qwen2.5-7B-Instruct") and not backend.handles("openai")


def test_model_name_keeps_colons_and_info_has_no_credentials(server, monkeypatch):
    monkeypatch.setenv("CELLSCRIBE_OPENAI_BASE_URL", server.base_url.replace("//", "//alice:s3cret-pw@") + "/")
    model = OpenAIBackend().load("openai:llama3.1:8b", max_concurrency="4")
    info = model.info()
    assert info["model"] == "llama3.1:8b" and info["backend"] == "openai"
    assert info["base_url"] == server.base_url and info["max_concurrency"] == 4
    assert "s3cret-pw" not in json.dumps(info) + repr(model)
    model.generate([chat("GCG")])
    # Credentials in the URL travel as basic auth, never in the URL.
    assert server.requests[0].headers["authorization"].startswith("Basic ")
    assert server.requests[0].body["model"] == "llama3.1:8b"


@pytest.mark.parametrize(
    ("spec", "options", "match"),
    [
        ("openai:", {}, "served model name"),
        ("openai:x", {"base_url": "http://h:8000/v1/chat/completions"}, "API root"),
        ("openai:x", {"base_url": "localhost:8000"}, "http"),
        ("openai:x", {"base_url": "http://h/v1", "max_concurrency": 0}, "max_concurrency"),
        ("openai:x", {"base_url": "http://h/v1", "render": "client"}, "tokenizer"),
        ("openai:x", {"base_url": "http://h/v1", "api_key": KEY}, "environment variable"),
        ("openai:x", {"base_url": "http://h/v1", "extra_body": {"messages": []}}, "messages"),
        ("openai:x", {"base_url": "http://h/v1", "adapters": {"rna": "."}}, "lora-modules"),
        ("openai:gpt-4o-mini", {}, "OPENAI_API_KEY"),
    ],
)
def test_bad_configuration_is_refused_with_the_fix(spec, options, match):
    with pytest.raises(ValueError, match=match) as info:
        OpenAIBackend().load(spec, **options)
    assert KEY not in str(info.value)


def test_misspelled_option_warns():
    with pytest.warns(UserWarning, match="max_concurrency"):
        OpenAIBackend().load("openai:x", base_url="http://h/v1", max_concurency=2)


# -- requests ------------------------------------------------------------------------------------------


def test_round_trip_sends_the_messages_exactly(server):
    model = connect(server)
    prompt = chat("INS, IAPP, GCG", generation={"max_new_tokens": 16})
    (generation,) = model.generate([prompt])
    assert generation.text == "beta" and generation.error is None
    assert generation.n_output_tokens == 1 and generation.n_prompt_tokens > 0
    (request,) = server.requests
    assert request.path == "/v1/chat/completions"
    assert request.body["messages"] == [dict(m) for m in prompt.messages]
    assert request.body["model"] == "tiny" and request.body["max_tokens"] == 16
    assert request.headers["content-type"] == "application/json"
    assert "authorization" not in request.headers  # no key configured


def test_vllm_dialect_maps_every_setting(server):
    model = connect(server)
    defaults = {"do_sample": True, "temperature": 0.01, "top_p": 0.01, "repetition_penalty": 1.1,
                "max_new_tokens": 4096, "max_prompt_tokens": 8192}
    user = {"temperature": 0.6, "top_k": 20, "min_new_tokens": 2, "max_new_tokens": 64, "seed": 7,
            "stop_strings": ["\n\n"]}
    model.generate([chat("GCG", generation=defaults)], settings=user)
    body = server.requests[0].body
    sent = {k: v for k, v in body.items() if k not in ("model", "messages")}
    assert sent == {"temperature": 0.6, "top_p": 0.01, "repetition_penalty": 1.1, "top_k": 20, "min_tokens": 2,
                    "max_tokens": 64, "seed": 7, "stop": ["\n\n"]}


def test_greedy_sends_temperature_zero_without_sampling_keys(server):
    model = connect(server)
    model.generate([chat("GCG", generation={"do_sample": False, "temperature": 0.6, "top_p": 0.4,
                                             "top_k": 5, "max_new_tokens": 8})])
    body = server.requests[0].body
    assert body["temperature"] == 0 and body["max_tokens"] == 8
    assert not {"top_p", "top_k", "do_sample"} & set(body)


def test_openai_dialect_sends_only_standard_fields(server):
    model = connect(server, dialect="openai", extra_body={"user": "cellscribe-test"})
    settings = {"do_sample": True, "temperature": 0.6, "top_p": 0.4, "repetition_penalty": 1.1, "top_k": 0,
                "max_new_tokens": 32}
    with pytest.warns(UserWarning, match="repetition_penalty"):
        model.generate([chat("GCG")], settings=settings)
    body = server.requests[0].body
    assert {k: v for k, v in body.items() if k not in ("model", "messages")} == {
        "temperature": 0.6, "top_p": 0.4, "max_completion_tokens": 32, "user": "cellscribe-test"}


@pytest.mark.parametrize(
    ("settings", "match"),
    [({"num_beams": 4}, "beam search"), ({"typical_p": 0.9}, "typical_p"), ({"max_prompt_tokens": 0}, "positive")],
)
def test_unusable_settings_raise_before_any_request(server, settings, match):
    with pytest.raises(ValueError, match=match):
        connect(server).generate([chat("GCG")], settings=settings)
    assert server.requests == []


def test_concurrency_bound_is_respected(server):
    server.delay = 0.05
    model = connect(server, max_concurrency=4)
    generations = model.generate([chat(f"GENE{i}") for i in range(24)])
    assert all(g.text == "beta" for g in generations)
    assert server.max_in_flight == 4  # requests overlapped, never more than the bound


def test_connections_are_kept_alive_across_requests_and_calls(server):
    model = connect(server, max_concurrency=4)
    for _ in range(3):  # three calls (three checkpoint batches of a run)
        assert [g.text for g in model.generate([chat(f"GENE{i}") for i in range(20)])] == ["beta"] * 20
    assert len(server.requests) == 60 and server.connections <= 4  # one per request in flight, reused
    model.close()
    model.generate([chat("GCG")])  # a closed client opens a new connection
    assert server.connections <= 5


def test_default_concurrency_fills_a_local_server_and_spares_hosted_apis(server, monkeypatch):
    from cellscribe.plugins.openai.backend import DEFAULT_CONCURRENCY, HOSTED_CONCURRENCY

    assert connect(server).max_concurrency == DEFAULT_CONCURRENCY == 64
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert OpenAIBackend().load("openai:gpt-4o-mini").max_concurrency == HOSTED_CONCURRENCY == 8
    # A server that takes its time (a model generating): more requests in flight answer more per
    # second, so the backend doubles them from 8 up to the bound, and keeps the number it found.
    server.delay = 0.1
    model = connect(server)
    model.generate([chat(f"GENE{i}") for i in range(400)])
    assert server.max_in_flight >= 16 and (model.workers or model._probed) >= 16


def test_finish_reason_comes_from_the_server_and_a_cut_stop_string_is_restored(server):
    from cellscribe.core.answers import TAGGED

    replies = {"capped": {"content": "The cell expresses", "finish_reason": "length"},
               "tagged": {"content": "<think>x</think>\n<answer>alpha | beta", "finish_reason": "stop"},
               "plain": "beta", "newline": {"content": "B cell", "stop_reason": "\n"}}
    server.answer = lambda body: replies[user_text(body)]
    with pytest.warns(UserWarning, match="outputs hit max_new_tokens"):
        capped, tagged, plain, newline = connect(server).generate(
            [chat("capped"), chat("tagged", answer=TAGGED), chat("plain"), chat("newline")],
            settings={"stop_strings": ["</answer>", "\n"]},
        )
    assert (capped.finish_reason, capped.capped, capped.text) == ("length", True, "The cell expresses")
    # The server left out the stop string that ended the answer; the tagged format puts it back.
    assert tagged.text == "<think>x</think>\n<answer>alpha | beta</answer>" and tagged.finish_reason == "stop"
    assert plain.text == "beta" and plain.finish_reason == "stop"
    # A stop string vLLM names is put back as the local backend keeps it.
    assert newline.text == "B cell\n"
    assert server.requests[0].body["stop"] == ["</answer>", "\n"]
    connect(server).generate([chat("plain")], settings={"stop_strings": ""})  # no stop at all
    assert "stop" not in server.requests[-1].body


def test_one_request_at_a_time_when_bound_is_one(server):
    server.delay = 0.01
    connect(server, max_concurrency=1).generate([chat(f"GENE{i}") for i in range(6)])
    assert server.max_in_flight == 1 and len(server.requests) == 6


def test_results_keep_prompt_order_when_answers_arrive_out_of_order():
    # Earlier prompts answer later: completion order is the reverse of prompt order.
    n = 12
    with OpenAIServer(answer=lambda b: user_text(b).lower(),
                      delay=lambda b: 0.01 * (n - int(user_text(b)[4:]))) as server:
        finished = []
        generations = connect(server, max_concurrency=n).generate(
            [chat(f"GENE{i}") for i in range(n)], progress=finished.append
        )
    assert [g.text for g in generations] == [f"gene{i}" for i in range(n)]
    assert finished == [1] * n


# -- CellReasoner's edits ----------------------------------------------------------------------------------


def test_removals_and_response_prefix_in_server_rendering(server):
    prompt = Prompt(
        messages=({"role": "system", "content": SYSTEM}, {"role": "user", "content": "GCG, TTR"}),
        unit_ids=("c1",), sentences=("GCG, TTR",),
        remove_from_rendered=("<think>",), response_prefix="<think> ",
    )
    connect(server).generate([prompt])
    body = server.requests[0].body
    assert body["messages"] == [
        {"role": "system", "content": "Name the cell type. Place the reason within the </think> tag."},
        {"role": "user", "content": "GCG, TTR"},
        {"role": "assistant", "content": "<think> "},
    ]
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False

    with pytest.warns(UserWarning, match="prefill"):
        connect(server, dialect="openai").generate([prompt])
    body = server.requests[1].body
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "continue_final_message" not in body


def test_reasoning_returned_apart_is_put_back_in_think_tags():
    def answer(body):
        return {"content": "\n<answer>alpha</answer>", "reasoning_content": "GCG marks alpha cells."}

    with OpenAIServer(answer=answer) as server:
        plain, prefixed = connect(server).generate([chat("GCG"), chat("GCG", response_prefix="<think> ")])
    assert plain.text == "<think>GCG marks alpha cells.</think>\n<answer>alpha</answer>"
    # The prefix already opened the tag: the text continues it, as after a local prefill.
    assert prefixed.text == "GCG marks alpha cells.</think>\n<answer>alpha</answer>"


def test_client_rendering_sends_the_exact_local_input(server, tmp_path):
    from _tiny_models import make_tokenizer

    tokenizer = make_tokenizer(tmp_path / "tok")
    model = connect(server, render="client", tokenizer=str(tmp_path / "tok"))
    prompt = Prompt(
        messages=({"role": "system", "content": SYSTEM}, {"role": "user", "content": "GCG, TTR"}),
        unit_ids=("c1",), sentences=("GCG, TTR",),
        remove_from_rendered=("<think>",), response_prefix="<think> ",
        generation={"max_prompt_tokens": 5},
    )
    with pytest.warns(UserWarning, match="1 of 1 prompts are longer than max_prompt_tokens"):
        (generation,) = model.generate([prompt])
    assert generation.text == "beta"
    body = server.requests[0].body
    assert server.requests[0].path == "/v1/completions"
    assert body["prompt"] == prompt.render(tokenizer.apply_chat_template) == (
        "<|im_start|>system\nName the cell type. Place the reason within the </think> tag.<|im_end|>\n"
        "<|im_start|>user\nGCG, TTR<|im_end|>\n<|im_start|>assistant\n<think> "
    )
    assert body["add_special_tokens"] is False and body["truncate_prompt_tokens"] == 5
    assert model.count_tokens("GCG, TTR") == len(tokenizer("GCG, TTR", add_special_tokens=False)["input_ids"])
    assert model.info()["tokenizer"] == str(tmp_path / "tok")
    assert connect(server).count_tokens("GCG") is None


# -- decode modes --------------------------------------------------------------------------------------------


def test_score_and_unguided_constrained_decoding_are_refused(server):
    model = connect(server)
    assert model.decode_modes == ("generate",)
    with pytest.raises(ValueError, match="transformers backend"):
        model.generate([chat("GCG")], settings={"decode": "score"})
    with pytest.raises(ValueError, match="guided_choice"):
        model.generate([chat("GCG", candidates=("alpha", "beta"))], settings={"decode": "constrained"})
    assert server.requests == []


@pytest.mark.parametrize(
    ("option", "field"),
    [(True, {"structured_outputs": {"choice": ["alpha", "beta"]}}), ("guided_choice", {"guided_choice": ["alpha", "beta"]})],
)
def test_guided_choice_sends_the_candidates(server, option, field):
    model = connect(server, guided_choice=option)
    assert model.decode_modes == ("generate", "constrained")
    model.generate([chat("GCG", candidates=("alpha", "beta"))], settings={"decode": "constrained"})
    body = server.requests[0].body
    assert {k: body[k] for k in field} == field
    puzzle = Prompt(messages=({"role": "user", "content": "Cell 1: GCG\nCell 2: INS"},), unit_ids=("a", "b"),
                    candidates=("alpha", "beta"))
    with pytest.raises(ValueError, match="puzzles"):
        model.generate([puzzle], settings={"decode": "constrained"})


# -- failures ----------------------------------------------------------------------------------------------


def test_429_is_retried_after_retry_after(server):
    server.fail(429, retry_after="1")
    model = connect(server, backoff=0.001)
    delays = []
    choose = model._delay
    model._delay = lambda attempt, retry_after: delays.append(choose(attempt, retry_after)) or delays[-1]
    (generation,) = model.generate([chat("GCG")])
    assert generation.text == "beta" and generation.error is None
    assert len(server.requests) == 2
    assert delays == [1.0]  # the server's Retry-After, not the 0.001 s backoff


def test_500_is_retried_with_backoff(server):
    server.fail(500, times=2)
    (generation,) = connect(server).generate([chat("GCG")])
    assert generation.text == "beta" and len(server.requests) == 3


def test_timeout_is_retried_then_becomes_an_error_generation(server):
    server.stall(3.0, times=2)  # the first prompt's two attempts stall; the second prompt is answered
    model = connect(server, timeout=0.2, max_retries=1, max_concurrency=1)
    stalled, answered = model.generate([chat("GCG"), chat("INS")])
    assert stalled.text == "" and "within 0.2 s" in stalled.error and "after 2 attempts" in stalled.error
    assert answered.text == "beta" and answered.error is None
    assert len(server.requests) == 3


def test_retries_are_bounded_and_other_errors_not_retried(server):
    server.fail(503, times=3)
    (generation,) = connect(server, max_retries=2).generate([chat("GCG")])
    assert "HTTP 503" in generation.error and "after 3 attempts" in generation.error
    assert len(server.requests) == 3
    server.fail(400, message="context length exceeded")
    (generation,) = connect(server).generate([chat("GCG")])
    assert "HTTP 400" in generation.error and "context length exceeded" in generation.error
    assert len(server.requests) == 4


def test_unreachable_server_gives_error_generations():
    with OpenAIServer() as server:
        url = server.base_url
    model = OpenAIBackend().load("openai:tiny", base_url=url, max_retries=1, backoff=0.001, timeout=1)
    (generation,) = model.generate([chat("GCG")])
    assert "cannot reach" in generation.error or "connection" in generation.error


def test_retry_after_forms():
    assert retry_after_seconds({"Retry-After": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "250", "Retry-After": "9"}) == 0.25
    assert 0 <= retry_after_seconds({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert retry_after_seconds({"Retry-After": "soon"}) is None and retry_after_seconds({}) is None


# -- the API key ------------------------------------------------------------------------------------------


def test_api_key_is_sent_but_never_logged_shown_or_echoed(monkeypatch, caplog):
    monkeypatch.setenv("CELLSCRIBE_TEST_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    with OpenAIServer(api_key=KEY) as server:
        good = connect(server, api_key_env="CELLSCRIBE_TEST_KEY")
        (ok,) = good.generate([chat("GCG")])
        assert ok.text == "beta"
        assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"
    # A server that rejects the key and repeats it in its error message (as hosted APIs do).
    with OpenAIServer(api_key="another-key") as server:
        model = connect(server, api_key_env="CELLSCRIBE_TEST_KEY", max_concurrency=1)
        with pytest.raises(ModelUnavailableError) as stopped:  # a 401 stops the run: every request would get it
            model.generate([chat(f"GENE{i}") for i in range(5)])
        generations = stopped.value.generations
        assert len(server.requests) == 1  # no more requests after the 401
        assert KEY not in str(stopped.value)
    assert all("HTTP 401" in g.error and "CELLSCRIBE_TEST_KEY" in g.error for g in generations)
    shown = [g.error for g in generations] + [caplog.text, repr(model), json.dumps(model.info())]
    assert KEY not in "\n".join(shown)
    assert "***" in generations[0].error  # the echoed key was redacted, not just absent
    assert model.info()["authenticated"] is True and model.info()["api_key_env"] == "CELLSCRIBE_TEST_KEY"


# -- through the public API ------------------------------------------------------------------------------


def test_annotate_through_tl(pancreas, openai_host):
    def marker_label(sentence: str) -> str:
        return next((PANCREAS_RULES[g] for g in sentence.split(", ") if g in PANCREAS_RULES), "no idea at all")

    adata = pancreas[:40].copy()
    # Answers arrive out of order (delay varies with the sentence); labels must still land on their cells.
    with OpenAIServer(answer=lambda b: marker_label(user_text(b)),
                      delay=lambda b: 0.002 * (len(user_text(b)) % 7)) as server:
        cs.tl.annotate(adata, model="openai:tiny", model_options={"base_url": server.base_url},
                       sentence="top-expressed", n_genes=200, sidecar=False, progress=False)
    sentences = cs.tl.sentences(pancreas[:40].copy(), sentence="top-expressed", n_genes=200)
    expected = sentences.map(marker_label).replace("no idea at all", None)
    labels = adata.obs["cellscribe"].astype(object).where(adata.obs["cellscribe"].notna(), None)
    assert labels.tolist() == expected.reindex(adata.obs_names).tolist()
    assert (adata.obs["cellscribe"].astype(str) == adata.obs["Group"].astype(str)).mean() > 0.8
    assert len(server.requests) == 40
    info = adata.uns["cellscribe"]["params"]["model_info"]
    assert info["backend"] == "openai" and info["base_url"] == server.base_url
    assert isinstance(adata.obs["cellscribe"].dtype, pd.CategoricalDtype)
