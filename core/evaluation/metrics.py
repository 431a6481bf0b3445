"""CellPuzzles metrics (Cell-o1's evaluation rules, FORMATS.md): the single implementation.

An output is *legitimate* only if it has exactly one ``<think>``, ``</think>``, ``<answer>`` and
``</answer>``, matches ``^<think>.*?</think>\\n<answer>.*?</answer>$`` (reasoning may span lines) and
its answer contains ``|``. An illegitimate output scores 0 on every cell.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import attrs

_LEGIT = re.compile(r"^<think>.*?</think>\n<answer>.*?</answer>$", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def is_legitimate(text: str) -> bool:
    """Whether a model output follows the CellPuzzles answer format exactly."""
    if any(text.count(tag) != 1 for tag in TAGS):
        return False
    match = _ANSWER.search(text)
    return bool(_LEGIT.match(text)) and match is not None and "|" in match.group(1)


def split_answer(text: str) -> list[str] | None:
    """The labels inside ``<answer>...</answer>`` split on ``|`` and stripped, or ``None``."""
    match = _ANSWER.search(text)
    if match is None:
        return None
    return [part.strip() for part in match.group(1).split("|")]


def split_gold(answer: str) -> list[str]:
    """A gold answer string (``"a | b | c"``) as a list of labels."""
    return [part.strip() for part in answer.split("|")]


@attrs.frozen
class PuzzleScores:
    """Aggregate CellPuzzles metrics over a set of puzzles."""

    n_puzzles: int
    n_cells: int
    partial_accuracy: float
    exact_match: float
    legitimate_ratio: float
    uniqueness: float

    def as_dict(self) -> dict[str, float]:
        return attrs.asdict(self)


def score_puzzle(output: str, gold: Sequence[str]) -> tuple[int, bool, bool, float]:
    """Score one output against its gold labels.

    :return: ``(correct cells, legitimate, every cell right, uniqueness)`` where uniqueness is distinct
        predicted labels / predicted labels (0 for an illegitimate output).
    """
    if not is_legitimate(output):
        return 0, False, False, 0.0
    predicted = split_answer(output) or []
    correct = sum(
        1 for p, g in zip(predicted, gold) if p.strip().lower() == g.strip().lower()
    )
    lowered = [p.lower() for p in predicted]
    uniqueness = len(set(lowered)) / len(lowered) if lowered else 0.0
    return correct, True, correct == len(gold) and len(predicted) == len(gold), uniqueness


def puzzle_metrics(outputs: Sequence[str], answers: Sequence[str | Sequence[str]]) -> PuzzleScores:
    """Partial accuracy, exact match, legitimate-format ratio and uniqueness of ``outputs``.

    :param outputs: raw model outputs, one per puzzle.
    :param answers: gold answers, each a ``"a | b"`` string or a list of labels.
    """
    if len(outputs) != len(answers):
        raise ValueError(f"{len(outputs)} outputs but {len(answers)} answers")
    cells = correct = exact = legit = 0
    uniq = 0.0
    for output, answer in zip(outputs, answers):
        gold = split_gold(answer) if isinstance(answer, str) else list(answer)
        c, ok, all_right, u = score_puzzle(output, gold)
        cells += len(gold)
        correct += c
        exact += all_right
        legit += ok
        uniq += u
    n = len(outputs)
    return PuzzleScores(
        n_puzzles=n,
        n_cells=cells,
        partial_accuracy=correct / cells if cells else 0.0,
        exact_match=exact / n if n else 0.0,
        legitimate_ratio=legit / n if n else 0.0,
        uniqueness=uniq / n if n else 0.0,
    )
