"""The answer formats (core/answers.py): what one writes, it reads back; Cell-o1's legitimacy rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cellscribe.core import answers
from cellscribe.core.answers import FREE, TAGGED

EXEMPLAR = Path(__file__).parent / "data" / "cellpuzzles_reasoning_exemplar.jsonl"


@pytest.mark.parametrize("labels", [["B cell", "T cell"], ["CD14+ Mono", "NK", "pDC"]])
def test_tagged_answers_read_back_and_are_legitimate(labels):
    text = TAGGED.text(labels, "MS4A1 marks B cells; CD3E marks T cells.\nSo:")
    assert text.startswith("<think>") and text.endswith("</answer>")
    assert TAGGED.labels(text) == labels and TAGGED.is_legitimate(text)
    assert TAGGED.reasoning(text) == "MS4A1 marks B cells; CD3E marks T cells.\nSo:"


def test_cell_o1_rule_on_the_published_exemplar_and_on_broken_outputs():
    record = json.loads(EXEMPLAR.read_text(encoding="utf-8").splitlines()[0])
    gold = [label.strip() for label in record["answer"].split("|")]
    good = TAGGED.text(gold, "reasoning")
    assert TAGGED.is_legitimate(good)
    assert not TAGGED.is_legitimate(good + " trailing text")
    assert not TAGGED.is_legitimate(good.replace("\n<answer>", "<answer>"))
    assert not TAGGED.is_legitimate("<think>a</think>\n<answer>B cell</answer>")  # no "|"
    assert not TAGGED.is_legitimate("<think>a</think><think>b</think>\n<answer>x | y</answer>")
    assert TAGGED.labels("no tags at all") is None


@pytest.mark.parametrize("inside_think", [False, True])
def test_free_answers_split_into_reasoning_and_label(inside_think):
    text = FREE.text(["Memory CD4 T"], "IL7R and CCR7 are high.", inside_think=inside_think)
    reasoning, answer, closed = FREE.split_reasoning(text)
    assert (reasoning, answer.strip(), closed) == ("IL7R and CCR7 are high.", "Memory CD4 T", True)
    assert text.startswith("<think>") != inside_think


def test_reasoning_returned_apart_is_put_back_in_a_think_block():
    assert answers.with_reasoning("why", "\nB cell") == "<think>why</think>\nB cell"
    assert answers.with_reasoning("why", "\nB cell", think_open=True) == "why</think>\nB cell"
    assert answers.opens_think("<think> ") and not answers.opens_think("")
    assert answers.ends_in_think("<|im_start|>assistant\n<think> ") and not answers.ends_in_think("assistant\n")


def test_pieces_rebuild_the_written_text():
    for fmt, labels in ((TAGGED, ["a", "b"]), (FREE, ["a"])):
        for inside in (False, True):
            p = fmt.pieces(inside_think=inside)
            head = (p["open_text"] + "R" + p["close_text"]) if p["reasoning"] else ""
            built = head + p["separator"].join(labels) + p["tail_text"]
            if fmt.tagged or inside:
                assert fmt.split_reasoning(built)[1].strip().endswith(labels[-1] + p["tail_text"])
            assert fmt.labels(built) == (labels if fmt.tagged else None)
