"""Decode modes of the transformers backend (constrained, score), its token-budget batching and seeds.

Every model here is a tiny Qwen2 with random weights (``_tiny_models``): constrained answers must be
legal whatever the weights, and scores must equal a brute-force forward pass.
"""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch
from _llm_helpers import (
    CANDIDATES,
    brute_force_log_likelihood,
    cellreasoner_prompt,
    puzzle_prompt,
    sentences,
)
from _tiny_models import make_tiny_model, make_tokenizer

from cellscribe.core.evaluation.metrics import is_legitimate, puzzle_metrics, split_answer
from cellscribe.core.plugins import make_host

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]

GREEDY = {"do_sample": False}
SAMPLED = {"do_sample": True, "temperature": 1.5, "seed": 0}


@pytest.fixture(scope="module")
def host():
    return make_host()


@pytest.fixture(scope="module")
def backend(host):
    return host.registry.get("backend", "transformers")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("decode") / "model", seed=0, tokenizer=make_tokenizer())


@pytest.fixture(scope="module")
def tiny(backend, tiny_dir):
    """The tiny model, loaded once for the module (tests must not modify it)."""
    return backend.load(str(tiny_dir))


def texts(generations) -> list[str]:
    return [g.text for g in generations]


def decode_with(host, name, generations, prompts):
    decoder = host.registry.get("decoder", name)
    return [decoder.decode(g, p) for g, p in zip(generations, prompts)]


# -- constrained: CellReasoner prompts ---------------------------------------------------------------


@pytest.mark.parametrize("settings", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_constrained_direct_answers_are_exactly_one_candidate(host, tiny, settings):
    prompts = [cellreasoner_prompt(s) for s in sentences(12)]
    out = tiny.generate(prompts, settings={**settings, "decode": "constrained"})
    assert all(g.text in CANDIDATES for g in out), texts(out)
    if settings is SAMPLED:
        assert len(set(texts(out))) > 2  # sampling explores the candidates
    # The answer is the label's tokens and one end token, nothing else.
    for g in out:
        assert g.n_output_tokens == len(tiny.tokenizer(g.text, add_special_tokens=False)["input_ids"]) + 1
    annotations = decode_with(host, "cellreasoner", out, prompts)
    assert [a[0].label for a in annotations] == texts(out)
    assert all(a[0].status == "ok" and a[0].note == "" for a in annotations)


def test_constrained_labels_sharing_a_prefix_can_both_be_chosen(tiny):
    # Greedy output of the untrained model after "T cell": forcing either ending must be possible.
    prompts = [cellreasoner_prompt(s, ("T cell", "T cell, CD8")) for s in sentences(12)]
    seen = set()
    for seed in range(6):
        seen |= set(texts(tiny.generate(prompts, settings={**SAMPLED, "seed": seed, "decode": "constrained"})))
    assert seen == {"T cell", "T cell, CD8"}


@pytest.mark.parametrize("settings", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_constrained_reasoning_is_free_and_only_the_answer_is_forced(host, tiny, settings):
    prompts = [cellreasoner_prompt(s, reasoning=True) for s in sentences(6)]
    cap = 12
    out = tiny.generate(prompts, settings={**settings, "decode": "constrained", "max_reasoning_tokens": cap})
    for g in out:
        reasoning, sep, label = g.text.rpartition("</think>\n")
        assert sep and label in CANDIDATES, g.text
        assert "<" not in reasoning  # no stray tag can appear in the reasoning
        answer = tiny.tokenizer("</think>\n", add_special_tokens=False)["input_ids"]
        answer += tiny.tokenizer(label, add_special_tokens=False)["input_ids"]
        assert g.n_output_tokens - len(answer) - 1 <= cap  # reasoning tokens generated
    assert any(g.text.split("</think>")[0].strip() for g in out)  # reasoning was actually written
    annotations = decode_with(host, "cellreasoner", out, prompts)
    assert all(a[0].status == "ok" and a[0].label in CANDIDATES for a in annotations)


def test_constrained_reasoning_fits_in_max_new_tokens(tiny):
    prompts = [cellreasoner_prompt(s, reasoning=True) for s in sentences(4)]
    out = tiny.generate(prompts, settings={**GREEDY, "decode": "constrained", "max_new_tokens": 20})
    assert all(g.n_output_tokens <= 20 and g.text.rpartition("</think>\n")[2] in CANDIDATES for g in out)
    # Too small for any reasoning: the answer is still complete.
    out = tiny.generate(prompts, settings={**GREEDY, "decode": "constrained", "max_new_tokens": 2})
    assert all(re.fullmatch(r"</think>\n(.+)", g.text).group(1) in CANDIDATES for g in out)


# -- constrained: CellPuzzles prompts ---------------------------------------------------------------


def _puzzles(n_cells: int, n_candidates: int, n_puzzles: int = 4):
    cells = sentences(n_cells * n_puzzles)
    return [
        puzzle_prompt(cells[i * n_cells : (i + 1) * n_cells], CANDIDATES[i : i + n_candidates])
        for i in range(n_puzzles)
    ]


@pytest.mark.parametrize("settings", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("shape", [(3, 3), (4, 4), (3, 5)], ids=["3x3", "4x4", "3 cells 5 candidates"])
def test_constrained_puzzles_are_legitimate_and_unique(host, tiny, settings, shape):
    n_cells, n_candidates = shape
    prompts = _puzzles(n_cells, n_candidates)
    out = tiny.generate(prompts, settings={**settings, "decode": "constrained", "max_new_tokens": 60})
    for g, p in zip(out, prompts):
        assert is_legitimate(g.text), g.text
        labels = split_answer(g.text)
        assert len(labels) == n_cells and len(set(labels)) == n_cells
        assert set(labels) <= set(p.candidates)
        if n_candidates == n_cells:
            assert sorted(labels) == sorted(p.candidates)  # a permutation
    scores = puzzle_metrics(texts(out), [split_answer(g.text) for g in out])
    assert scores.legitimate_ratio == 1.0 and scores.uniqueness == 1.0
    annotations = decode_with(host, "cellpuzzles", out, prompts)
    assert all(a.status == "ok" and a.note == "" for units in annotations for a in units)


def test_constrained_puzzle_without_reasoning_and_with_more_cells_than_candidates(tiny):
    out = tiny.generate(_puzzles(3, 3), settings={**GREEDY, "decode": "constrained", "max_reasoning_tokens": 0})
    assert all(g.text.startswith("<think></think>\n<answer>") and is_legitimate(g.text) for g in out)
    # Four cells, three candidates: every candidate is used before any is repeated.
    prompt = puzzle_prompt(sentences(4), ("alpha", "beta", "delta"))
    (g,) = tiny.generate([prompt], settings={"decode": "constrained"})
    labels = split_answer(g.text)
    assert is_legitimate(g.text) and len(labels) == 4 and set(labels) == {"alpha", "beta", "delta"}


def test_constrained_batches_equal_one_by_one(backend, tiny_dir):
    prompts = [cellreasoner_prompt(s, reasoning=True) for s in sentences(3)] + _puzzles(3, 4, 3)
    settings = {**GREEDY, "decode": "constrained", "max_new_tokens": 40}
    together = backend.load(str(tiny_dir)).generate(prompts, settings=settings)
    alone = backend.load(str(tiny_dir), batch_size=1).generate(prompts, settings=settings)
    assert texts(together) == texts(alone)


def test_constrained_without_candidates_generates_freely_with_a_warning(tiny):
    prompts = [cellreasoner_prompt(s, ()) for s in sentences(2)] + [cellreasoner_prompt(sentences(1)[0])]
    settings = {**GREEDY, "decode": "constrained", "max_new_tokens": 5}
    with pytest.warns(UserWarning, match="2 of 3 prompts have no candidate labels"):
        out = tiny.generate(prompts, settings=settings)
    assert texts(out[:2]) == texts(tiny.generate(prompts[:2], settings={**GREEDY, "max_new_tokens": 5}))
    assert out[2].text in CANDIDATES


def test_invalid_decode_settings_are_refused(tiny):
    prompt = [cellreasoner_prompt("INS, GCG")]
    with pytest.raises(ValueError, match="decode must be one of"):
        tiny.generate(prompt, settings={"decode": "beam"})
    with pytest.raises(ValueError, match="not beam search"):
        tiny.generate(prompt, settings={"decode": "constrained", "num_beams": 2})
    with pytest.raises(ValueError, match="max_reasoning_tokens must be an integer >= 0"):
        tiny.generate(prompt, settings={"decode": "constrained", "max_reasoning_tokens": -1})
    with pytest.raises(ValueError, match="length_normalize must be True or False"):
        tiny.generate(prompt, settings={"decode": "score", "length_normalize": "yes"})
    with pytest.raises(ValueError, match="decode='score' needs candidate labels"):
        tiny.generate([cellreasoner_prompt("INS", ())], settings={"decode": "score"})


# -- score ------------------------------------------------------------------------------------------


def _brute_force_probs(tiny, prompt, *, length_normalize=False):
    """Probability of each candidate as the whole answer, from one full forward pass per candidate."""
    reasoning = bool(prompt.response_prefix)
    prefix = "</think>\n" if reasoning else ""
    prefix_ids = tiny.tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    eos = tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")
    scores = []
    for label in prompt.candidates:
        label_ids = tiny.tokenizer(label, add_special_tokens=False)["input_ids"] + [eos]
        value = brute_force_log_likelihood(tiny, prompt, prefix_ids + label_ids, len(label_ids))
        scores.append(value / len(label_ids) if length_normalize else value)
    scores = np.array(scores)
    probs = np.exp(scores - scores.max())
    return probs / probs.sum()


@pytest.mark.parametrize("reasoning", [False, True], ids=["direct", "reasoning"])
@pytest.mark.parametrize("length_normalize", [False, True], ids=["summed", "length-normalised"])
def test_score_probabilities_sum_to_one_and_match_a_full_forward_pass(host, tiny, reasoning, length_normalize):
    prompts = [cellreasoner_prompt(s, reasoning=reasoning) for s in sentences(5)]
    out = tiny.generate(prompts, settings={"decode": "score", "length_normalize": length_normalize})
    for g, p in zip(out, prompts):
        (scores,) = g.label_scores
        assert list(scores) == list(CANDIDATES)
        assert math.isclose(sum(scores.values()), 1.0, abs_tol=1e-9)
        expected = _brute_force_probs(tiny, p, length_normalize=length_normalize)
        np.testing.assert_allclose(list(scores.values()), expected, atol=1e-4)
        best = max(scores, key=scores.get)
        assert g.confidence == (scores[best],)
        assert g.text == (f"scored</think>\n{best}" if reasoning else best)
    annotations = decode_with(host, "cellreasoner", out, prompts)
    assert all(a[0].status == "ok" and a[0].confidence == g.confidence[0] for a, g in zip(annotations, out))


def test_length_normalisation_changes_the_ranking_of_long_labels(tiny):
    prompts = [cellreasoner_prompt(s) for s in sentences(8)]
    summed = tiny.generate(prompts, settings={"decode": "score"})
    normalised = tiny.generate(prompts, settings={"decode": "score", "length_normalize": True})
    assert [g.label_scores for g in summed] != [g.label_scores for g in normalised]


def test_score_in_a_batch_equals_score_alone(backend, tiny_dir):
    prompts = [cellreasoner_prompt(s) for s in sentences(6)] + _puzzles(3, 4, 2)
    together = backend.load(str(tiny_dir)).generate(prompts, settings={"decode": "score"})
    alone = backend.load(str(tiny_dir), batch_size=1).generate(prompts, settings={"decode": "score"})
    # A small budget: three prompts per pass, their candidates in chunks of three rows.
    small = backend.load(str(tiny_dir), max_batch_tokens=1)
    longest = max(small.count_tokens(small.render(p)) for p in prompts)
    small.max_batch_tokens = 3 * (longest + 30)
    chunked = small.generate(prompts, settings={"decode": "score"})
    for other in (alone, chunked):
        assert texts(together) == texts(other)
        for a, b in zip(together, other):
            for x, y in zip(a.label_scores, b.label_scores):
                np.testing.assert_allclose(list(x.values()), list(y.values()), atol=1e-5)


def test_score_puzzles_assign_a_permutation_by_joint_likelihood(host, tiny):
    prompts = _puzzles(3, 3, 3) + _puzzles(3, 5, 2)
    out = tiny.generate(prompts, settings={"decode": "score"})
    eos = tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")
    encode = lambda text: tiny.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    for g, p in zip(out, prompts):
        assert is_legitimate(g.text) and g.text.startswith("<think>scored</think>\n<answer>")
        labels = split_answer(g.text)
        assert len(set(labels)) == 3 and set(labels) <= set(p.candidates)
        assert len(g.label_scores) == 3
        assert all(math.isclose(sum(s.values()), 1, abs_tol=1e-9) for s in g.label_scores)
        assert g.confidence == tuple(s[label] for s, label in zip(g.label_scores, labels))
        # The assignment maximises the summed log-probability over every permutation.
        joint = {
            perm: sum(math.log(s[label]) for s, label in zip(g.label_scores, perm))
            for perm in itertools.permutations(p.candidates, 3)
        }
        assert tuple(labels) == max(joint, key=joint.get)
        # The first cell's scores are those of a full forward pass after "<think></think>\n<answer>".
        head = encode("<think>") + encode("</think>\n<answer>")
        first = []
        for label in p.candidates:
            piece = encode(label) + encode(" | x")[:1]  # the label and the separator that ends it
            first.append(brute_force_log_likelihood(tiny, p, head + piece, len(piece)))
        first = np.exp(np.array(first) - max(first))
        np.testing.assert_allclose(list(g.label_scores[0].values()), first / first.sum(), atol=1e-4)
    # The last cell's answer ends the output: label, "</answer>", end of sequence.
    p = prompts[0]
    labels = split_answer(out[0].text)
    head = encode("<think>") + encode("</think>\n<answer>") + encode(labels[0]) + encode(" | " + labels[1])
    last = []
    for label in p.candidates:
        piece = encode(" | " + label) + encode("</answer>") + [eos]
        last.append(brute_force_log_likelihood(tiny, p, head + piece, len(piece)))
    last = np.exp(np.array(last) - max(last))
    np.testing.assert_allclose(list(out[0].label_scores[2].values()), last / last.sum(), atol=1e-4)
    annotations = decode_with(host, "cellpuzzles", out, prompts)
    assert all(a.status == "ok" for units in annotations for a in units)


def test_score_reuses_the_prompt_cache(tiny, monkeypatch):
    calls = []
    original = tiny.model.forward

    def spy(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(tiny.model, "forward", spy)
    prompts = [cellreasoner_prompt(s) for s in sentences(4)]
    tiny.generate(prompts, settings={"decode": "score"})
    # One pass over the four prompts, one over the 4 x 8 candidates (a few tokens each).
    assert len(calls) == 2
    assert calls[0][0] == 4 and calls[1][0] == 4 * len(CANDIDATES) and calls[1][1] < calls[0][1]


# -- batching, seeds, determinism -------------------------------------------------------------------


def test_token_budget_sorts_and_cuts_batches(backend, tiny_dir, monkeypatch):
    prompts = [cellreasoner_prompt(s, ()) for s in sentences(8)]
    settings = {**GREEDY, "max_new_tokens": 4}
    reference = texts(backend.load(str(tiny_dir), batch_size=1).generate(prompts, settings=settings))
    loaded = backend.load(str(tiny_dir), max_batch_tokens=1)
    lengths = sorted((loaded.count_tokens(loaded.render(p)) for p in prompts), reverse=True)
    budget = loaded.max_batch_tokens = 3 * (lengths[0] + 4)
    widths: list[tuple[int, int]] = []
    original = loaded.model.generate

    def spy(**kwargs):
        widths.append(tuple(kwargs["input_ids"].shape))
        return original(**kwargs)

    monkeypatch.setattr(loaded.model, "generate", spy)
    seen: list[int] = []
    assert texts(loaded.generate(prompts, settings=settings, progress=seen.append)) == reference
    assert sum(seen) == 8 and len(seen) > 1
    assert widths[0] == (3, lengths[0])  # the longest prompts first, three rows fit the budget
    assert [w for _, w in widths] == sorted((w for _, w in widths), reverse=True)
    assert all(rows * (width + 4) <= budget for rows, width in widths)
    assert loaded.info()["max_batch_tokens"] == budget
    # Without a budget given, one CPU batch holds them all.
    unlimited = backend.load(str(tiny_dir))
    seen.clear()
    unlimited.generate(prompts, settings=settings, progress=seen.append)
    assert seen == [8] and unlimited.info()["max_batch_tokens"] == 16_384


def test_a_failing_batch_is_split_in_halves(backend, tiny_dir, monkeypatch):
    prompts = [cellreasoner_prompt(s, ()) for s in sentences(8)]
    settings = {**GREEDY, "max_new_tokens": 3}
    loaded = backend.load(str(tiny_dir))
    expected = texts(loaded.generate(prompts, settings=settings))
    sizes: list[int] = []
    original = loaded.model.generate

    def fails_above_two(**kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(**kwargs)

    monkeypatch.setattr(loaded.model, "generate", fails_above_two)
    out = loaded.generate(prompts, settings=settings)
    assert texts(out) == expected and all(g.error is None for g in out)
    assert sizes == [8, 4, 2, 2, 4, 2, 2]


def test_sampling_seed_is_recorded_and_deterministic_means_greedy(backend, tiny_dir, tiny):
    prompts = [cellreasoner_prompt(s, ()) for s in sentences(4)]
    sampled = {"do_sample": True, "temperature": 2.0, "max_new_tokens": 8}
    first = tiny.generate(prompts, settings=sampled)
    seed = tiny.info()["seed"]
    assert isinstance(seed, int)
    assert texts(tiny.generate(prompts, settings={**sampled, "seed": seed})) == texts(first)
    greedy = texts(tiny.generate(prompts, settings={**GREEDY, "max_new_tokens": 8}))
    deterministic = backend.load(str(tiny_dir), deterministic=True)
    assert texts(deterministic.generate(prompts, settings=sampled)) == greedy
    assert deterministic.info()["deterministic"] is True
    seeded = backend.load(str(tiny_dir), seed=7)
    assert texts(seeded.generate(prompts, settings=sampled)) == texts(seeded.generate(prompts, settings=sampled))
    assert seeded.info()["seed"] == 7


def test_info_reports_attention_dtype_and_decode_modes(tiny):
    tiny.generate([cellreasoner_prompt("INS, GCG")], settings={"decode": "score"})
    info = tiny.info()
    assert (info["attn_implementation"], info["dtype"], info["device"]) == ("sdpa", "float32", "cpu")
    assert info["decode"] == ["score"]
    assert torch.get_default_dtype() == torch.float32


# -- issue 16: calibrated scores, constrained confidence, stop strings and the token cap ----------------


def _neutral_brute_force_probs(tiny, prompt):
    """Scores calibrated against the neutral prompt (PMI), from full forward passes."""
    from cellscribe.core.domain.scoring import neutral_prompt

    eos = tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")
    prefix = tiny.tokenizer("</think>\n", add_special_tokens=False)["input_ids"] if prompt.response_prefix else []
    scores = []
    for label in prompt.candidates:
        label_ids = tiny.tokenizer(label, add_special_tokens=False)["input_ids"] + [eos]
        after_cell = brute_force_log_likelihood(tiny, prompt, prefix + label_ids, len(label_ids))
        after_nothing = brute_force_log_likelihood(tiny, neutral_prompt(prompt), prefix + label_ids, len(label_ids))
        scores.append(after_cell - after_nothing)
    scores = np.array(scores)
    probs = np.exp(scores - scores.max())
    return probs / probs.sum()


@pytest.mark.parametrize("reasoning", [False, True], ids=["direct", "reasoning"])
def test_score_is_calibrated_against_a_neutral_prompt_by_default(tiny, reasoning):
    prompts = [cellreasoner_prompt(s, reasoning=reasoning) for s in sentences(4)]
    out = tiny.generate(prompts, settings={"decode": "score"})
    assert out == tiny.generate(prompts, settings={"decode": "score", "calibration": "pmi"})
    for g, p in zip(out, prompts):
        (scores,) = g.label_scores
        np.testing.assert_allclose(list(scores.values()), _neutral_brute_force_probs(tiny, p), atol=1e-4)
    summed = tiny.generate(prompts, settings={"decode": "score", "calibration": "sum"})
    assert [g.label_scores for g in summed] != [g.label_scores for g in out]
    with pytest.raises(ValueError, match="calibration must be one of"):
        tiny.generate(prompts, settings={"decode": "score", "calibration": "length"})


def test_constrained_confidence_is_the_label_probability_among_the_candidates(tiny):
    candidates = ("alpha", "beta", "T cell", "T cell, CD8")
    prompts = [cellreasoner_prompt(s, candidates) for s in sentences(6)]
    settings = {**GREEDY, "decode": "constrained", "repetition_penalty": 1.0}
    out = tiny.generate(prompts, settings=settings)
    eos = sorted(tiny._eos_ids())
    paths = {c: tiny.tokenizer(c, add_special_tokens=False)["input_ids"] for c in candidates}
    for g, p in zip(out, prompts):
        (confidence,) = g.confidence
        # Walk the chosen label's tokens; at each step the probability of the token taken among the
        # tokens a candidate could continue with (an end token where a candidate ends).
        prompt_ids = tiny.tokenizer(tiny.render(p), add_special_tokens=False)["input_ids"]
        chosen = paths[g.text] + [eos[0]]
        ids = torch.tensor([prompt_ids + chosen])
        with torch.inference_mode():
            probs = torch.softmax(tiny.model(input_ids=ids).logits[0].double(), dim=-1)
        expected = 1.0
        for k in range(len(chosen)):
            prefix = chosen[:k]
            nxt = {path[k] for path in paths.values() if path[:k] == prefix and len(path) > k}
            ends = any(path == prefix for path in paths.values())
            allowed = sorted(nxt | (set(eos) if ends else set()))
            row = probs[len(prompt_ids) + k - 1]
            taken = row[eos].sum() if chosen[k] in eos else row[chosen[k]]
            if len(allowed) > 1:
                expected *= float(taken / row[allowed].sum())
        assert confidence == pytest.approx(expected, rel=1e-3)
        assert 0 < confidence <= 1
    assert {a.confidence for (a,) in decode_with(make_host(), "cellreasoner", out, prompts)} == {
        g.confidence[0] for g in out}


def test_stop_strings_end_an_output_and_the_cap_is_reported(tiny):
    prompts = [cellreasoner_prompt(s, ()) for s in sentences(4)]
    with pytest.warns(UserWarning, match="outputs hit max_new_tokens"):
        free = tiny.generate(prompts, settings={**GREEDY, "max_new_tokens": 12})
    assert all(g.finish_reason == "length" and g.capped and g.n_output_tokens == 12 for g in free)
    # Stop at a piece of the first output: that output ends with it, a prefix of the free one.
    stop = free[0].text[3:6]
    stopped = tiny.generate(prompts, settings={**GREEDY, "max_new_tokens": 12, "stop_strings": [stop]})
    first = stopped[0]
    # (transformers stops at the token that completes the stop string: the token may run past it)
    assert stop in first.text and free[0].text.startswith(first.text)
    assert first.finish_reason == "stop" and first.n_output_tokens < 12
    for g, f in zip(stopped, free):
        assert f.text.startswith(g.text)
        assert g.finish_reason == ("stop" if stop in f.text else "length")
    # Outputs that end by themselves within the limit (a forced label and its end) are "stop", unwarned.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ended = tiny.generate([cellreasoner_prompt(s) for s in sentences(4)],
                              settings={**GREEDY, "max_new_tokens": 12, "decode": "constrained"})
    assert all(g.finish_reason == "stop" and not g.capped for g in ended)
