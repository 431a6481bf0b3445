"""Prompt strategies: zero-shot and k-shot (CellReasoner), puzzle (CellPuzzles), donor context."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest

from cellscribe.core.types import CellSentences
from cellscribe.plugins.prompting import (
    DIRECT_INSTRUCTION,
    REASONING_INSTRUCTION,
    SYSTEM_MSG,
    KShot,
    Puzzle,
    ZeroShot,
    build_puzzle_user_msg,
    context_sentence,
    contexts_from_obs,
    parse_puzzle_user_msg,
    plan_benchmark_puzzles,
)
from cellscribe.plugins.prompting.kshot import MESSAGE_OVERHEAD, PROMPT_OVERHEAD

from _prompting import cellreasoner_reference, exemplar, qwen_template, ranked_hvg, top_expressed


@pytest.fixture
def cells(pancreas) -> CellSentences:
    return ranked_hvg(pancreas)


@pytest.fixture
def labels(pancreas) -> list[str]:
    return pancreas.obs["Group"].astype(str).tolist()


def test_strategies_are_registered(host):
    reg = host.registry
    assert {n: reg.get("prompt", n).default_decoder for n in ("zero-shot", "k-shot", "puzzle")} == {
        "zero-shot": "cellreasoner",
        "k-shot": "cellreasoner",
        "puzzle": "cellpuzzles",
    }
    assert {"cellreasoner", "cellpuzzles"} <= set(reg.names("decoder"))


# ---------------------------------------------------------------------------------------------------
# zero-shot (CellReasoner)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "instruction"), [("direct", DIRECT_INSTRUCTION), ("reasoning", REASONING_INSTRUCTION)]
)
def test_instructions_match_the_reference_files(mode, instruction):
    records = json.loads(cellreasoner_reference(mode))
    assert {r["instruction"] for r in records} == {instruction}


@pytest.mark.parametrize("mode", ["direct", "reasoning"])
def test_zero_shot_prompts_are_the_published_format(cells, mode):
    records = json.loads(cellreasoner_reference(mode))
    prompts = ZeroShot().build(cells, mode=mode)
    assert len(prompts) == 350
    for prompt, record in zip(prompts[:20], records):
        assert prompt.messages == (
            {"role": "system", "content": record["instruction"]},
            {"role": "user", "content": record["input"]},
        )
        assert prompt.unit_ids == (record["cell_name"],)
        assert prompt.decoder == "cellreasoner" and prompt.remove_from_rendered == ("<think>",)
    rendered = prompts[0].render(qwen_template)
    assert "<think>" not in rendered.removesuffix("<think> ")
    if mode == "reasoning":
        assert prompts[0].response_prefix == "<think> " and rendered.endswith(
            "<|im_start|>assistant\n<think> "
        )
        assert "place the reason within the </think> tag." in rendered
        sampling = {"do_sample": True, "temperature": 0.6, "top_p": 0.4, "repetition_penalty": 1.1}
        # Default: the published sampling with a limit fitted to a reasoning answer (no stop string:
        # the label follows the reasoning).
        assert prompts[0].generation == {**sampling, "max_new_tokens": 1024, "max_prompt_tokens": 8192}
    else:
        assert prompts[0].response_prefix == "" and rendered.endswith("<|im_start|>assistant\n")
        sampling = {"do_sample": True, "temperature": 0.01, "top_p": 0.01, "repetition_penalty": 1.1}
        # Default: one label line of at most 32 tokens, ended by its newline.
        assert prompts[0].generation == {
            **sampling, "max_new_tokens": 32, "stop_strings": ["\n"], "max_prompt_tokens": 8192,
        }
    # The published settings, one option away: CellReasoner's 4096 new tokens, no stop string.
    (published,) = ZeroShot().build(cells.take([0]), mode=mode, options={"generation": "published"})
    assert published.generation == {**sampling, "max_new_tokens": 4096, "max_prompt_tokens": 8192}
    assert published.messages == prompts[0].messages
    with pytest.raises(ValueError, match="'fitted'.*'published'"):
        ZeroShot().build(cells.take([0]), mode=mode, options={"generation": "short"})


def test_zero_shot_candidates_one_per_line():
    cells = CellSentences.from_lists(["a", "b", "empty"], [["CD3E", "CD4"], ["MS4A1"], []])
    candidates = ["CD8-positive, alpha-beta T cell", "B cell", "B cell", "T cell"]
    prompts = ZeroShot().build(cells, candidates=candidates)
    assert [p.unit_ids for p in prompts] == [("a",), ("b",)]  # empty sentences get no prompt
    assert prompts[0].messages[1]["content"] == (
        "CD3E, CD4\n\nCandidate cell types (answer with exactly one):\n"
        "CD8-positive, alpha-beta T cell\nB cell\nT cell"
    )
    assert prompts[0].candidates == ("CD8-positive, alpha-beta T cell", "B cell", "T cell")
    hidden = ZeroShot().build(cells, candidates=candidates, options={"show_candidates": False})
    assert hidden[0].messages[1]["content"] == "CD3E, CD4" and hidden[0].candidates == prompts[0].candidates


def test_zero_shot_rejects_bad_input():
    cells = CellSentences.from_lists(["a"], [["G"]])
    with pytest.raises(ValueError, match="mode"):
        ZeroShot().build(cells, mode="fast")
    with pytest.raises(ValueError, match="list of labels"):
        ZeroShot().build(cells, candidates="B cell")


# ---------------------------------------------------------------------------------------------------
# k-shot
# ---------------------------------------------------------------------------------------------------


def _word_tokens(text: str) -> int:
    """A stand-in tokenizer: words and punctuation marks."""
    return len(re.findall(r"\w+|[^\w\s]", text))


def _prompt_tokens(prompt, count) -> int:
    return sum(count(m["content"]) + MESSAGE_OVERHEAD for m in prompt.messages) + PROMPT_OVERHEAD


def test_k_shot_balanced_seeded_examples(cells, labels):
    query = cells.take(np.arange(0, 350, 35))
    prompts = KShot().build(query, reference=cells, reference_labels=labels, k=3, seed=7)
    first = prompts[0]
    counts = pd.Series([e.label for e in first.examples]).value_counts()
    assert counts.to_dict() == {lab: 3 for lab in sorted(set(labels))}
    assert first.candidates == tuple(sorted(set(labels)))
    # Examples alternate user (sentence) / assistant (label) turns before the query.
    msgs = first.messages
    assert msgs[0]["role"] == "system" and msgs[-1] == {"role": "user", "content": first.sentences[0]}
    assert [m["role"] for m in msgs[1:-1]] == ["user", "assistant"] * 15
    assert [m["content"] for m in msgs[2:-1:2]] == [e.label for e in first.examples]
    # Same examples for every query (none of them is its own example here), stable under the seed.
    ids = [tuple(e.cell_id for e in p.examples) for p in prompts]
    assert all(i == ids[0] for i in ids) and not set(query.cell_ids) & set(ids[0])
    again = KShot().build(query, reference=cells, reference_labels=labels, k=3, seed=7)
    assert [tuple(e.cell_id for e in p.examples) for p in again] == ids
    other = KShot().build(query, reference=cells, reference_labels=labels, k=3, seed=8)
    assert tuple(e.cell_id for e in other[0].examples) != ids[0]


def test_k_shot_fewer_cells_than_k_and_self_exclusion(cells, labels):
    alpha, beta = (np.flatnonzero(np.array(labels) == lab) for lab in ("alpha", "beta"))
    rows = np.r_[alpha[:2], beta[:5]]
    ref = cells.take(rows)
    ref_labels = [labels[i] for i in rows]
    prompts = KShot().build(ref, reference=ref, reference_labels=ref_labels, k=3, seed=0)
    # The drawn examples: both alpha cells (fewer than k) and 3 of the 5 beta cells.
    drawn = {e.cell_id: e.label for p in prompts for e in p.examples}
    assert sorted(drawn.values()) == ["alpha", "alpha", "beta", "beta", "beta"]
    for prompt in prompts:
        ids = [e.cell_id for e in prompt.examples]
        # Every query sees the drawn examples except itself.
        assert sorted(ids) == sorted(set(drawn) - {prompt.unit_ids[0]})


def test_k_shot_shortens_examples_to_fit_the_budget(cells, labels):
    query = cells.take([0, 100, 200])
    budget = 3000
    prompts = KShot().build(
        query,
        reference=cells,
        reference_labels=labels,
        k=2,
        seed=0,
        count_tokens=_word_tokens,
        max_prompt_tokens=budget,
    )
    full = {cid: cells.sentence(i) for i, cid in enumerate(cells.cell_ids)}
    for prompt in prompts:
        g = prompt.meta["example_genes"]
        assert g is not None and g >= 10
        assert _prompt_tokens(prompt, _word_tokens) <= budget
        for ex in prompt.examples:
            assert full[ex.cell_id].startswith(ex.sentence)
            assert len(ex.sentence.split(", ")) == min(g, len(full[ex.cell_id].split(", ")))
        # The query is never cut.
        assert prompt.messages[-1]["content"] == full[prompt.unit_ids[0]]
        # The cut is the largest that fits: one more gene per example would not have.
        estimate = prompt.meta["estimated_prompt_tokens"]
        assert estimate <= budget
        longer = [full[ex.cell_id].split(", ") for ex in prompt.examples]
        assert estimate + sum(_word_tokens(", " + genes[g]) for genes in longer if len(genes) > g) > budget
    # A generous budget keeps the examples whole.
    roomy = KShot().build(query, reference=cells, reference_labels=labels, k=1, max_prompt_tokens=10**6)
    assert roomy[0].meta["example_genes"] is None
    assert all(ex.sentence == full[ex.cell_id] for ex in roomy[0].examples)


def test_k_shot_estimate_without_tokenizer_is_pessimistic(cells, labels):
    prompts = KShot().build(
        cells.take([5]), reference=cells, reference_labels=labels, k=1, max_prompt_tokens=4000
    )
    assert _prompt_tokens(prompts[0], _word_tokens) <= prompts[0].meta["estimated_prompt_tokens"] <= 4000


def test_k_shot_warns_when_the_budget_cannot_hold(cells, labels):
    with pytest.warns(UserWarning, match="exceed max_prompt_tokens=500"):
        prompts = KShot().build(
            cells.take([0]), reference=cells, reference_labels=labels, k=1, max_prompt_tokens=500
        )
    assert prompts[0].meta["example_genes"] == 10


def _jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b)


def test_k_shot_nearest_picks_the_most_overlapping_examples(cells, labels):
    query_rows = [0, 80, 160, 240, 320]
    query = cells.take(query_rows)
    prompts = KShot().build(
        query,
        reference=cells,
        reference_labels=labels,
        k=2,
        seed=0,
        options={"nearest": True},
        max_prompt_tokens=10**6,
    )
    gene_sets = [cells.genes(i) for i in range(len(cells))]
    row_of = {c: i for i, c in enumerate(cells.cell_ids)}
    for qi, prompt in zip(query_rows, prompts):
        assert prompt.meta["nearest"] is True
        for lab in sorted(set(labels)):
            chosen = [row_of[e.cell_id] for e in prompt.examples if e.label == lab]
            others = [j for j in range(len(cells)) if labels[j] == lab and j not in chosen and j != qi]
            assert len(chosen) == 2 and qi not in chosen
            worst_chosen = min(_jaccard(gene_sets[qi], gene_sets[j]) for j in chosen)
            best_other = max(_jaccard(gene_sets[qi], gene_sets[j]) for j in others)
            assert worst_chosen >= best_other
        # Its own type's examples overlap it more than the average reference cell does.
        own = [row_of[e.cell_id] for e in prompt.examples if e.label == labels[qi]]
        mean = np.mean([_jaccard(gene_sets[qi], g) for g in gene_sets])
        assert min(_jaccard(gene_sets[qi], gene_sets[j]) for j in own) > mean
    # Different queries get different examples.
    assert len({tuple(e.cell_id for e in p.examples) for p in prompts}) == len(prompts)


def test_k_shot_nearest_with_separate_vocabularies():
    ref = CellSentences.from_lists(
        ["r1", "r2", "r3", "r4"], [["A", "B", "C"], ["X", "Y"], ["A", "B", "Q"], ["Y", "Z", "C"]]
    )
    query = CellSentences.from_lists(["q1", "q2"], [["C", "B", "A"], ["Y", "X", "Q"]])
    assert not np.array_equal(query.vocabulary, ref.vocabulary)
    prompts = KShot().build(
        query, reference=ref, reference_labels=["t1", "t2", "t1", "t2"], k=1, options={"nearest": True}
    )
    assert [{e.label: e.cell_id for e in p.examples} for p in prompts] == [
        {"t1": "r1", "t2": "r4"},
        {"t1": "r3", "t2": "r2"},
    ]


def test_k_shot_nearest_genes_compares_sentence_heads():
    ref = CellSentences.from_lists(["r1", "r2"], [["A", "X", "Y"], ["B", "C", "D"]])
    query = CellSentences.from_lists(["q"], [["B", "X", "Y"]])

    def pick(**options):
        (prompt,) = KShot().build(
            query, reference=ref, reference_labels=["t", "t"], k=1, options={"nearest": True, **options}
        )
        return prompt.examples[0].cell_id

    assert pick() == "r1"  # shares X and Y
    assert pick(nearest_genes=1) == "r2"  # the first genes: B against A and B
    with pytest.raises(ValueError, match="nearest_genes"):
        pick(nearest_genes=0)


def test_k_shot_candidates_restrict_examples(cells, labels):
    prompts = KShot().build(
        cells.take([0]),
        reference=cells,
        reference_labels=labels,
        k=1,
        candidates=["beta", "alpha"],
        options={"show_candidates": True},
        max_prompt_tokens=10**6,
    )
    assert {e.label for e in prompts[0].examples} == {"alpha", "beta"}
    assert prompts[0].candidates == ("beta", "alpha")
    assert prompts[0].messages[-1]["content"].endswith("answer with exactly one):\nbeta\nalpha")
    with pytest.warns(UserWarning, match="without any reference cell"):
        KShot().build(
            cells.take([0]), reference=cells, reference_labels=labels, candidates=["alpha", "gamma"]
        )


def test_k_shot_rejects_bad_input(cells, labels):
    with pytest.raises(ValueError, match="labelled examples"):
        KShot().build(cells)
    with pytest.raises(ValueError, match="one label per cell"):
        KShot().build(cells, reference=cells, reference_labels=labels[:10])
    with pytest.raises(ValueError, match="k must be"):
        KShot().build(cells, reference=cells, reference_labels=labels, k=0)
    with pytest.raises(ValueError, match="no labelled cell"):
        KShot().build(cells, reference=cells, reference_labels=[None] * 350)


# ---------------------------------------------------------------------------------------------------
# puzzle (CellPuzzles)
# ---------------------------------------------------------------------------------------------------


def test_exemplar_user_msg_parses_and_rebuilds_exactly():
    ex = exemplar()
    parsed = parse_puzzle_user_msg(ex["user_msg"])
    assert parsed["context"].endswith("Large Cell Carcinoma. ")
    assert len(parsed["sentences"]) == 10 and all(len(s) == 50 for s in parsed["sentences"])
    assert parsed["candidates"] == sorted(ex["answer"].split(" | "))
    assert build_puzzle_user_msg(**parsed) == ex["user_msg"]
    assert (
        build_puzzle_user_msg(
            parsed["context"], [", ".join(s) for s in parsed["sentences"]], parsed["candidates"][::-1]
        )
        == ex["user_msg"]
    )
    assert ex["system_msg"] == SYSTEM_MSG


def test_puzzle_user_msg_without_context_round_trips():
    text = build_puzzle_user_msg("", [["A", "B"], ["C"]], ["b type", "a type"])
    assert (
        text
        == "Cell 1: A, B\nCell 2: C\n\nMatch the cells above to one of the following cell types:\na type\nb type"
    )
    assert parse_puzzle_user_msg(text) == {
        "context": "",
        "sentences": [["A", "B"], ["C"]],
        "candidates": ["a type", "b type"],
    }


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "Context: x\n\nCell 2: A\n\nMatch the cells above to one of the following cell types:\nT",
    ],
)
def test_parse_puzzle_user_msg_rejects_other_text(text):
    with pytest.raises(ValueError, match="not a CellPuzzles user message"):
        parse_puzzle_user_msg(text)


def _exemplar_cells() -> tuple[CellSentences, list[str], pd.DataFrame]:
    ex = exemplar()
    parsed = parse_puzzle_user_msg(ex["user_msg"])
    ids = [f"cell{i}" for i in range(10)]
    obs = pd.DataFrame(
        {
            "sex": "male",
            "development_stage": "60-year-old stage",
            "self_reported_ethnicity": "unknown",
            "tissue": "lung",
            "disease": "lung large cell carcinoma",
            "lung_condition": "Large Cell Carcinoma",
        },
        index=ids,
    )
    return CellSentences.from_lists(ids, parsed["sentences"]), parsed["candidates"], obs


def test_puzzle_prompt_reproduces_the_exemplar():
    cells, candidates, obs = _exemplar_cells()
    ex = exemplar()
    options = {"context_templates": {"lung_condition": "The lung condition is described as {}."}}
    (prompt,) = Puzzle().build(cells, candidates=candidates[::-1], obs=obs, options=options)
    # Default: one user message, user_msg + "\n" + system_msg (the released inference script).
    assert prompt.messages == ({"role": "user", "content": ex["user_msg"] + "\n" + ex["system_msg"]},)
    assert prompt.unit_ids == tuple(cells.cell_ids) and prompt.candidates == tuple(candidates)
    # Greedy, ended at </answer>, at most 512 + 200 tokens per cell (never over Cell-o1's 3500).
    assert prompt.decoder == "cellpuzzles" and prompt.generation == {
        "do_sample": False,
        "max_new_tokens": min(3500, 512 + 200 * len(cells.cell_ids)),
        "stop_strings": ["</answer>"],
    }
    (published,) = Puzzle().build(cells, candidates=candidates[::-1], obs=obs,
                                  options={**options, "generation": "published"})
    assert published.generation == {"do_sample": False, "max_new_tokens": 3500}
    assert published.messages == prompt.messages
    assert prompt.context == parse_puzzle_user_msg(ex["user_msg"])["context"]
    (with_role,) = Puzzle().build(
        cells, candidates=candidates, obs=obs, options={**options, "system_role": True}
    )
    assert with_role.messages == (
        {"role": "system", "content": ex["system_msg"]},
        {"role": "user", "content": ex["user_msg"]},
    )
    rendered = with_role.render(qwen_template)
    assert rendered.startswith("<|im_start|>system\nYou are an expert") and "<think> " not in rendered[-10:]


def test_puzzle_groups_units_by_context_in_near_equal_puzzles():
    n = 23
    cells = CellSentences.from_lists([f"c{i}" for i in range(n)], [[f"G{i}", "X"] for i in range(n)])
    obs = pd.DataFrame({"sex": ["female"] * 20 + ["male"] * 3}, index=cells.cell_ids)
    candidates = [f"type {i}" for i in range(10)]
    prompts = Puzzle().build(cells, candidates=candidates, obs=obs)
    assert [len(p.unit_ids) for p in prompts] == [10, 10, 3]
    assert [p.context for p in prompts] == ["The cell is from a female. "] * 2 + ["The cell is from a male. "]
    assert [u for p in prompts for u in p.unit_ids] == list(cells.cell_ids)
    assert all(p.candidates == tuple(sorted(candidates)) for p in prompts)
    sized = Puzzle().build(cells, candidates=candidates, options={"puzzle_size": 8})
    assert [len(p.unit_ids) for p in sized] == [8, 8, 7]
    assert sized[0].messages[0]["content"].startswith("Cell 1: G0, X\nCell 2: G1, X\n")
    many = Puzzle().build(cells, candidates=[f"t{i}" for i in range(20)])
    assert [len(p.unit_ids) for p in many] == [12, 11]  # at most 15 per puzzle


def test_puzzle_rejects_bad_input():
    cells = CellSentences.from_lists(["a"], [["G"]])
    with pytest.raises(ValueError, match="candidate"):
        Puzzle().build(cells)
    with pytest.raises(ValueError, match="puzzle_size"):
        Puzzle().build(cells, candidates=["x"], options={"puzzle_size": 0})
    with pytest.warns(UserWarning, match="trained on"):
        Puzzle().build(cells, candidates=["x"], options={"puzzle_size": 20})


# ---------------------------------------------------------------------------------------------------
# context
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            ("female", "45-year-old stage", "European", "blood", "normal"),
            "The cell is from a female at the 45-year-old stage with European background, originating from "
            "the blood. The patient is healthy with no diagnosed disease. ",
        ),
        (
            ("male", "60-year-old stage", "unknown", "lung", "COVID-19"),
            "The cell is from a male at the 60-year-old stage, originating from the lung. The patient has been "
            "diagnosed with COVID-19. ",
        ),
        (
            (None, "adult stage", "na", "kidney", float("nan")),
            "The cell is from a donor at the adult stage, originating from the kidney. ",
        ),
        (
            ("unknown", "NaN", "", "liver", "Normal"),
            "The cell originates from the liver. The patient is healthy with no diagnosed disease. ",
        ),
        (("none", None, None, None, "unknown"), ""),
    ],
)
def test_context_sentence_rules(fields, expected):
    assert context_sentence(*fields) == expected


def test_contexts_from_obs_templates_extra_and_columns():
    obs = pd.DataFrame(
        {
            "Sex": pd.Categorical(["male", "female", "male"]),
            "tissue": ["lung", "lung", "lung"],
            "smoker": ["yes", None, "yes"],
        },
        index=["a", "b", "c"],
    )
    got = contexts_from_obs(
        obs,
        ["c", "a", "b", "zz"],
        columns={"sex": "Sex"},
        templates={"smoker": "Smoker: {}."},
        extra="Fixed.",
    )
    assert got == [
        "The cell is from a male, originating from the lung. Smoker: yes. Fixed. ",
        "The cell is from a male, originating from the lung. Smoker: yes. Fixed. ",
        "The cell is from a female, originating from the lung. Fixed. ",
        "Fixed. ",
    ]
    assert contexts_from_obs(None, ["a", "b"]) == ["", ""]
    with pytest.raises(ValueError, match="not exist"):
        contexts_from_obs(obs, templates={"missing": "{}"})


def test_context_reproduces_the_exemplar():
    _, _, obs = _exemplar_cells()
    expected = parse_puzzle_user_msg(exemplar()["user_msg"])["context"]
    got = contexts_from_obs(obs, templates={"lung_condition": "The lung condition is described as {}."})
    assert got == [expected] * 10


# ---------------------------------------------------------------------------------------------------
# benchmark puzzles
# ---------------------------------------------------------------------------------------------------


def test_plan_benchmark_puzzles_rules():
    rng = np.random.default_rng(0)
    labels = rng.choice(list("ABCDEFGH"), size=600).astype(object)
    batches = rng.choice(["d1", "d2", "d3"], size=600)
    labels[:5] = None
    plan = plan_benchmark_puzzles(labels, batches, n=6, seed=2)
    used = np.concatenate(plan)
    assert len(used) == len(set(used.tolist())) and not set(range(5)) & set(used.tolist())
    for rows in plan:
        assert len(rows) == 6 and len(set(labels[rows])) == 6 and len(set(batches[rows])) == 1
    assert len(plan) >= 80  # 595 labelled cells in 3 batches, 8 labels: most cells end up in a puzzle
    assert [r.tolist() for r in plan] == [
        r.tolist() for r in plan_benchmark_puzzles(labels, batches, n=6, seed=2)
    ]
    assert [r.tolist() for r in plan] != [
        r.tolist() for r in plan_benchmark_puzzles(labels, batches, n=6, seed=3)
    ]
    with pytest.raises(ValueError, match="between 3 and 15"):
        plan_benchmark_puzzles(labels, batches, n=16)


def test_puzzle_prompts_from_top_expressed_pancreas(pancreas):
    cells = top_expressed(pancreas)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prompts = Puzzle().build(cells, candidates=sorted(set(pancreas.obs["Group"].astype(str))))
    assert len(prompts) == 70 and all(len(p.unit_ids) == 5 for p in prompts)
    parsed = parse_puzzle_user_msg(prompts[0].messages[0]["content"].removesuffix("\n" + SYSTEM_MSG))
    assert parsed["sentences"] == [cells.genes(i) for i in range(5)]
