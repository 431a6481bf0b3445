"""CellPuzzles metrics (Cell-o1's evaluation rules, FORMATS.md): the single implementation.

Outputs are read with the answer format :data:`cellscribe.core.answers.TAGGED`, which owns the grammar
and the legitimacy rule; an illegitimate output scores 0 on every cell.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from ..answers import TAGGED

#: Whether a model output follows the CellPuzzles answer format exactly (the answer format's rule).
is_legitimate = TAGGED.is_legitimate
#: The labels inside ``<answer>...</answer>`` split on ``|`` and stripped, or ``None``.
split_answer = TAGGED.labels


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
