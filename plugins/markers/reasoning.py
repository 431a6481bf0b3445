"""The written answers of the ``markers`` model, in the text formats the decoders read.

Reasoning is written marker by marker from :class:`~.scoring.Evidence`: which markers of a cell type
were found and at which rank of the cell sentence (ranks count from 1, as a reader of the prompt would
count them), which genes it expects absent are present, and which of its strongest markers are
missing. The two or three best-scoring types are compared before the answer.

Output formats (FORMATS.md; read back by the ``cellreasoner`` and ``cellpuzzles`` decoders):

- CellReasoner, reasoning mode (the prompt ends with ``"<think> "``, so the output continues inside
  the think block): ``{reasoning}\\n</think>\\n\\n{label}``;
- CellReasoner, direct mode: ``<think>\\n{reasoning}\\n</think>\\n\\n{label}`` (the reasoning is kept,
  the decoder reads the label after ``</think>``);
- CellPuzzles: ``<think>{reasoning}</think>\\n<answer>{label 1} | {label 2} | ...</answer>``.

Names put into reasoning (genes, cell types) have ``<`` and ``>`` replaced
(:func:`~.scoring.display_name`), so no tag can appear inside the think block; answer labels are
written verbatim.
"""

from __future__ import annotations

from collections.abc import Sequence

from cellscribe.core.answers import FREE, TAGGED

from .scoring import Evidence, display_name

__all__ = [
    "join_words",
    "markers_at",
    "type_line",
    "header_line",
    "cellreasoner_text",
    "puzzle_text",
]

#: Names put into reasoning: characters that could open or close a tag (or a line) replaced.
safe = display_name


def join_words(items: Sequence[str], conjunction: str = "and") -> str:
    """``"a"``, ``"a and b"``, ``"a, b and c"``."""
    items = [str(i) for i in items]
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} {conjunction} {items[-1]}"


def markers_at(genes: Sequence[tuple]) -> str:
    """``"MS4A1 at rank 12 and CD79A at rank 30"`` from ``(gene, position, ...)`` tuples (names as
    :class:`Evidence` holds them, already display-safe), listed in rank order."""
    ordered = sorted(genes, key=lambda g: g[1])
    return join_words([f"{g[0]} at rank {g[1]}" for g in ordered])


def _verb(n: int, singular: str, plural: str) -> str:
    return singular if n == 1 else plural


def evidence_clauses(evidence: Evidence, *, subject: str = "it") -> list[str]:
    """The clauses describing one type's evidence (found, expected absent but present, missing)."""
    clauses = []
    if evidence.found:
        verb = _verb(len(evidence.found), "supports", "support")
        clauses.append(f"{markers_at(evidence.found)} {verb} {subject}")
    if evidence.against:
        clauses.append(
            f"{markers_at(evidence.against)} {_verb(len(evidence.against), 'argues', 'argue')} against "
            f"{subject} (expected absent)"
        )
    missing = list(evidence.missing[:3])
    if missing:
        names = join_words(missing, "or")
        if evidence.found:
            clauses.append(f"no {names} among the genes")
        else:
            clauses.append(f"none of its markers is among the genes (no {names})")
    elif not evidence.found:
        clauses.append("none of its markers is among the genes")
    return clauses


def type_line(name: str, score: float, evidence: Evidence | None, *, extra: Sequence[str] = ()) -> str:
    """``"- B cell (score 0.82): MS4A1 at rank 12 and CD79A at rank 30 support it; ..."`` (``name``
    display-safe)."""
    clauses = list(extra) + (evidence_clauses(evidence) if evidence is not None else [])
    body = "; ".join(clauses) if clauses else "nothing in the genes speaks for or against it"
    return f"- {name} (score {score:.2f}): {body}."


def header_line(n_genes: int, n_skipped: int, *, what: str = "the cell") -> str:
    """The opening sentence: how many genes were read and how many were not evidence."""
    text = f"Looking for marker genes among the {n_genes} ranked genes of {what}"
    if n_skipped:
        text += (
            f" (ranks count from 1; {n_skipped} ribosomal, mitochondrial or housekeeping "
            f"{_verb(n_skipped, 'gene is', 'genes are')} no evidence and not counted)"
        )
    return text + ":"


def conclusion_line(ranked: Sequence[tuple[str, float]]) -> str:
    """``"B cell fits best (score 0.82), ahead of plasma cell (0.41) and T cell (0.05)."`` (names
    display-safe)."""
    (best, score), rest = ranked[0], ranked[1:]
    text = f"{best} fits best (score {score:.2f})"
    if rest:
        text += ", ahead of " + join_words([f"{n} ({s:.2f})" for n, s in rest])
    return text + "."


def priming_clause(
    mature: str, stem: str, progenitor: str, gap: float, ratio: float, *, unmeasured: bool = False
) -> str:
    """``"lineage priming: B cell is called common lymphoid progenitor, ..."`` (names display-safe):
    why a mature call became its lineage's committed progenitor; ``unmeasured``: the data cannot show
    the progenitor's own markers, which the clause then says."""
    return (
        f"lineage priming: {mature} is called {progenitor}, the progenitor it descends from, because "
        f"the stem program ({stem}) scores within {gap:.2f} of it (at least 1/{ratio:g} as probable) in "
        f"chromatin whose peaks show an open stem program"
        + (f" ({progenitor}'s own markers have too few peaks here to be read)" if unmeasured else "")
    )


def cellreasoner_text(reasoning: str, label: str, *, inside_think: bool) -> str:
    """The CellReasoner answer: reasoning in a think block, then the label on its own line.

    ``inside_think``: the prompt already opened the think block (reasoning mode), so the output starts
    with the reasoning and only closes it.
    """
    return FREE.text([label], reasoning, inside_think=inside_think)


def puzzle_text(reasoning: str, labels: Sequence[str]) -> str:
    """The CellPuzzles answer ``<think>...</think>\\n<answer>a | b</answer>`` (labels verbatim).

    A one-cell puzzle's answer holds one label and no ``|``, which the Cell-o1 rules count as not
    legitimate; the decoder still reads it. A candidate that itself contains ``|`` cannot be answered
    unambiguously in this format.
    """
    return TAGGED.text(labels, reasoning)
