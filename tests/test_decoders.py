"""Decoders (cellreasoner, cellpuzzles) on hand-made model outputs, and the CellPuzzles metrics."""

from __future__ import annotations

import pytest

from cellscribe.core.evaluation.metrics import is_legitimate, puzzle_metrics, split_answer
from cellscribe.core.types import Generation, Prompt
from cellscribe.plugins.prompting import Puzzle, ZeroShot, final_answer, match_label, parse_puzzle_user_msg
from cellscribe.plugins.prompting.decoders import CellPuzzlesDecoder, CellReasonerDecoder, normalise

from _prompting import exemplar

PANCREAS = ["activated_stellate", "alpha", "beta", "delta", "macrophage"]
PBMC = ["CD14+ Mono", "FCGR3A+ Mono", "Memory CD4 T", "Naive CD4 T", "CD8 T", "NK", "B", "DC", "Platelet"]


def _prompt(mode: str = "direct", candidates=()) -> Prompt:
    from cellscribe.core.types import CellSentences

    cells = CellSentences.from_lists(["cell1"], [["GCG", "TTR"]])
    return ZeroShot().build(cells, mode=mode, candidates=list(candidates) or None)[0]


def _decode(text, mode="direct", vocabulary=None, **gen):
    # The labels an answer is matched to travel on the prompt (its candidates), nowhere else.
    (ann,) = CellReasonerDecoder().decode(Generation(text, **gen), _prompt(mode, vocabulary or ()))
    return ann


# ---------------------------------------------------------------------------------------------------
# cellreasoner
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mode", "vocabulary", "label"),
    [
        ("alpha", "direct", PANCREAS, "alpha"),
        ("Alpha", "direct", PANCREAS, "alpha"),
        ("  **Alpha cells.**  \n", "direct", PANCREAS, "alpha"),
        ("Final annotation: Beta cell", "direct", PANCREAS, "beta"),
        ("Cell type: `delta`", "direct", PANCREAS, "delta"),
        ('"Activated stellate cells"', "direct", PANCREAS, "activated_stellate"),
        ("stellate", "direct", PANCREAS, "activated_stellate"),
        ("These look like pancreatic alpha cells producing glucagon.", "direct", PANCREAS, "alpha"),
        ("Answer: CD8 T cells, a type of T cell", "direct", ["T", "CD8 T"], "CD8 T"),
        ("CD14+ Mono", "direct", PBMC, "CD14+ Mono"),
        ("cd14+ monocytes", "direct", PBMC, None),  # "monocytes" is not the vocabulary's "Mono"
        ("Memory CD4 T cells", "direct", PBMC, "Memory CD4 T"),
        ("Naive CD4+ T", "direct", PBMC, None),  # "+" is kept: CD4+ is not CD4
        ("FCGR3A+ Mono", "direct", PBMC, "FCGR3A+ Mono"),
        ("Platelets", "direct", PBMC, "Platelet"),
        ("The cell type is NK.", "direct", PBMC, "NK"),
        ("<think> glucagon, TTR </think>\nalpha", "direct", PANCREAS, "alpha"),
        # Reasoning mode: the output starts inside the think block (the prompt ends with "<think> ").
        ("GCG is high, so this is an alpha cell.\n</think>\n\nalpha", "reasoning", PANCREAS, "alpha"),
        (
            "Looks endocrine. Answer so far: beta? no.\n</think>\nFinal answer: **Delta**",
            "reasoning",
            PANCREAS,
            "delta",
        ),
        ("r1 </think> r2 </think>\nbeta", "reasoning", PANCREAS, "beta"),
        ("reasoning\n</think>\n<answer>macrophage</answer>", "reasoning", PANCREAS, "macrophage"),
        ("reasoning\n</think>\nFinal answer:\n\nbeta\n", "reasoning", PANCREAS, "beta"),
        # No vocabulary: the cleaned answer is the label.
        ("Final annotation: Ductal cell.", "direct", None, "Ductal cell"),
        ("thinking...</think>\n- **Acinar cell**", "reasoning", None, "Acinar cell"),
        # Unresolved: nothing matches, ambiguous, empty, reasoning cut off.
        ("gamma cell", "direct", PANCREAS, None),
        ("alpha or beta", "direct", PANCREAS, None),
        ("", "direct", PANCREAS, None),
        ("   \n\n  ", "direct", None, None),
        ("GCG is high so it may be alpha and then the", "reasoning", PANCREAS, None),
        ("still thinking\nAnswer: alpha", "reasoning", PANCREAS, "alpha"),
        ("</think>", "reasoning", PANCREAS, None),
    ],
)
def test_cellreasoner_decoder(text, mode, vocabulary, label):
    ann = _decode(text, mode, vocabulary)
    assert ann.label == label
    assert ann.status == ("ok" if label is not None else "unresolved")
    assert ann.raw == text and ann.unit_id == "cell1"
    if label is None:
        assert ann.note


def test_cellreasoner_decoder_keeps_reasoning_and_confidence():
    ann = _decode("<think>GCG and TTR point to alpha.</think>\nalpha", "direct", PANCREAS, confidence=(0.8,))
    assert (ann.label, ann.reasoning, ann.confidence, ann.note) == (
        "alpha",
        "GCG and TTR point to alpha.",
        0.8,
        "",
    )
    ann = _decode("GCG high\n</think>\nAlpha", "reasoning", PANCREAS)
    assert ann.reasoning == "GCG high" and ann.note == "matched case-insensitively"


def test_cellreasoner_decoder_matches_the_prompt_candidates():
    prompt = _prompt("direct", ["B cell", "T cell"])
    (ann,) = CellReasonerDecoder().decode(Generation("t cells"), prompt)
    assert ann.label == "T cell"


@pytest.mark.parametrize(
    ("text", "label", "note"),
    [
        # A label the Cell Ontology knows is the label, as the model wrote it.
        ("B cell", "B cell", ""),
        ("NK cells", "NK cells", ""),
        ("CD14+ Mono", "CD14+ Mono", ""),
        ("Answer: classical monocyte.", "classical monocyte", ""),
        # A longer answer naming one cell type: that type's ontology name, the words quoted.
        ("This cell is a B cell, expressing CD19 and CD79A.", "B cell", "'b cell' (CL:0000236)"),
        ("Likely CD14+ monocytes given LYZ and S100A8", "CD14-positive monocyte", "CL:0001054"),
        # The broader of two types named gives way to the narrower one.
        ("a lymphocyte, more precisely a B cell", "B cell", "CL:0000236"),
        # A ramble naming no cell type, or two unrelated ones, is no label.
        ("FTL (forktail lupine)", None, "names no Cell Ontology cell type"),
        ("The top genes are FTL, FTH1 and TMSB4X, which are highly expressed in many tissues of the body",
         None, "names no Cell Ontology cell type"),
        ("NK cells or T cells", None, "names several cell types"),
        ("the cell", None, "names no Cell Ontology cell type"),
    ],
)
def test_cellreasoner_without_candidates_takes_only_cell_ontology_types(text, label, note):
    ann = _decode(text)
    assert (ann.label, ann.status) == (label, "ok" if label else "unresolved")
    assert note in ann.note and ann.raw == text
    if label is None:
        assert text[:40] in ann.note  # the answer is quoted


@pytest.mark.parametrize(
    ("text", "vocabulary", "label"),
    [
        ("NK cells", ["natural killer cell", "B cell"], "natural killer cell"),  # the same term
        ("Kupffer cells", ["macrophage", "B cell"], "macrophage"),  # a kind of one label
        ("Kupffer cells", ["leukocyte", "macrophage", "B cell"], "macrophage"),  # the most specific
        ("leukocyte", ["macrophage", "B cell"], None),  # broader than the labels: no
        ("lymphocyte", ["B cell", "T cell"], None),
    ],
)
def test_cellreasoner_matches_candidates_through_the_cell_ontology(text, vocabulary, label):
    ann = _decode(text, vocabulary=vocabulary)
    assert ann.label == label
    assert ("Cell Ontology" in ann.note) if label else ("matches no label" in ann.note)


def test_a_capped_output_is_marked_on_every_unit():
    from cellscribe.plugins.prompting.decoders import CAPPED_NOTE

    ann = _decode("B cell", finish_reason="length")
    assert ann.status == "ok" and CAPPED_NOTE in ann.note
    assert CAPPED_NOTE not in _decode("B cell", finish_reason="stop").note
    ann = _decode("The cell expresses FTL and FTH1, which", finish_reason="length")
    assert ann.status == "unresolved" and ann.note.startswith(CAPPED_NOTE)
    gold = exemplar()["answer"].split(" | ")
    anns = CellPuzzlesDecoder().decode(Generation("<think>" + "x " * 50, finish_reason="length"), _puzzle_prompt())
    assert all(a.status == "unresolved" and CAPPED_NOTE in a.note for a in anns) and len(anns) == len(gold)


def test_cellreasoner_decoder_generation_error():
    ann = _decode("partial", "direct", PANCREAS, error="CUDA out of memory")
    assert ann.status == "unresolved" and "CUDA out of memory" in ann.note and ann.raw == "partial"


GARBAGE = [
    None,
    "",
    "\x00\x01\x02",
    "<think>",
    "</think></think><think>",
    "<answer></answer>",
    "<answer>|||</answer>",
    "🧬🔬 細胞 ÄÖÜ \u202e",
    "Answer:",
    "**",
    "\"'`",
    "x" * 2_000_000,
    ("alpha, " * 200_000) + "</think>",
    "<think>" + "a\n" * 100_000,
    "Final annotation: " + "(" * 5000,
    123,
]


@pytest.mark.parametrize("text", GARBAGE, ids=range(len(GARBAGE)))
@pytest.mark.parametrize("mode", ["direct", "reasoning"])
def test_decoders_never_raise(text, mode):
    ann = _decode(text, mode, PANCREAS)
    assert ann.status in ("ok", "unresolved")
    ann = _decode(text, mode, None)
    assert ann.status in ("ok", "unresolved")
    for got in CellPuzzlesDecoder().decode(Generation(text), _puzzle_prompt()):
        assert got.status in ("ok", "unresolved")


def test_final_answer_and_normalise():
    assert final_answer("some text\nAnswer: **B cells**\nThanks!") == ("B cells", True)
    assert final_answer("first\nsecond.") == ("second", False)
    assert final_answer("") == ("", False)
    assert normalise("Alpha-Beta T-cells") == "alpha beta t"
    assert match_label("beta", ["alpha", "beta"]) == ("beta", "")
    label, note = match_label("alpha beta", ["alpha", "beta"])
    assert label is None and "several" in note


# ---------------------------------------------------------------------------------------------------
# cellpuzzles
# ---------------------------------------------------------------------------------------------------


def _puzzle_prompt() -> Prompt:
    from cellscribe.core.types import CellSentences

    parsed = parse_puzzle_user_msg(exemplar()["user_msg"])
    cells = CellSentences.from_lists([f"cell{i}" for i in range(10)], parsed["sentences"])
    return Puzzle().build(cells, candidates=parsed["candidates"])[0]


def _answer(labels, think="reasoning") -> str:
    return f"<think>{think}</think>\n<answer>{' | '.join(labels)}</answer>"


def test_cellpuzzles_decodes_the_exemplar():
    ex = exemplar()
    anns = CellPuzzlesDecoder().decode(
        Generation(ex["assistant_msg"], confidence=tuple(range(10))), _puzzle_prompt()
    )
    assert [a.label for a in anns] == ex["answer"].split(" | ")
    assert all(a.status == "ok" and a.note == "" for a in anns)
    assert [a.unit_id for a in anns] == [f"cell{i}" for i in range(10)]
    assert anns[0].reasoning.startswith("Step-by-step reasoning:") and "</think>" not in anns[0].reasoning
    assert [a.confidence for a in anns] == [float(i) for i in range(10)]


def test_cellpuzzles_matches_case_insensitively_and_flags_non_candidates():
    gold = exemplar()["answer"].split(" | ")
    given = [g.upper() for g in gold[:9]] + ["dendritic cell"]
    anns = CellPuzzlesDecoder().decode(Generation(_answer(given)), _puzzle_prompt())
    assert [a.label for a in anns[:9]] == gold[:9]
    assert anns[0].note == "matched case-insensitively"
    assert anns[9].status == "unresolved" and "dendritic cell" in anns[9].note


def test_cellpuzzles_wrong_count_or_no_answer_is_unresolved():
    gold = exemplar()["answer"].split(" | ")
    prompt = _puzzle_prompt()
    for text in (_answer(gold[:9]), "<think>x</think>\nno answer tag", "mast cell | T cell"):
        anns = CellPuzzlesDecoder().decode(Generation(text), prompt)
        assert len(anns) == 10 and all(a.status == "unresolved" and a.note for a in anns)
        assert all(a.raw == text for a in anns)


def test_cellpuzzles_illegitimate_but_parsable_answer_is_taken_with_a_note():
    gold = exemplar()["answer"].split(" | ")
    text = _answer(gold) + "\nI hope this helps."  # text after </answer>: not legitimate
    assert not is_legitimate(text)
    anns = CellPuzzlesDecoder().decode(Generation(text), _puzzle_prompt())
    assert [a.label for a in anns] == gold
    assert all("scores 0" in a.note for a in anns)


def test_cellpuzzles_generation_error():
    anns = CellPuzzlesDecoder().decode(Generation("", error="timeout"), _puzzle_prompt())
    assert all(a.status == "unresolved" and "timeout" in a.note for a in anns)


# ---------------------------------------------------------------------------------------------------
# metrics (core.evaluation.metrics, the official Cell-o1 rules) on hand-made outputs
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "legit"),
    [
        ("<think>a\nb</think>\n<answer>x | y</answer>", True),
        ("<think></think>\n<answer>x|y</answer>", True),
        ("<think>a</think><answer>x | y</answer>", False),  # no newline between the tags
        ("<think>a</think>\n<answer>x</answer>", False),  # no "|"
        ("<think>a</think>\n<answer>x | y</answer>\nthanks", False),  # trailing text
        ("<think>a</think>\n<answer>x | y</answer>\n", True),  # `$` allows one final newline
        (" <think>a</think>\n<answer>x | y</answer>", False),  # leading text
        ("<think>a <think> b</think>\n<answer>x | y</answer>", False),  # two <think>
        ("<answer>x | y</answer>", False),
        ("", False),
    ],
)
def test_is_legitimate(text, legit):
    assert is_legitimate(text) is legit


def test_puzzle_metrics_on_hand_made_outputs():
    gold = ["a | b | c", "a | b | c", "x | y | z"]
    outputs = [
        _answer(["A", "b", "c"]),  # all right (case-insensitive)
        _answer(["a", "c", "b"]),  # 1 of 3, legitimate
        "<answer>x | y | z</answer>",  # right labels but not legitimate: 0
    ]
    scores = puzzle_metrics(outputs, gold)
    assert scores.n_puzzles == 3 and scores.n_cells == 9
    assert scores.partial_accuracy == pytest.approx(4 / 9)
    assert scores.exact_match == pytest.approx(1 / 3)
    assert scores.legitimate_ratio == pytest.approx(2 / 3)
    assert scores.uniqueness == pytest.approx(2 / 3)  # two legitimate outputs with distinct labels
    assert split_answer(outputs[2]) == ["x", "y", "z"]
