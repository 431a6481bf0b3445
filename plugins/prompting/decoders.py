"""Decoders: raw model text to one :class:`~cellscribe.core.types.Annotation` per unit.

``cellreasoner`` (free text, one unit)
    1. Reasoning: everything up to the last ``</think>`` is reasoning (in reasoning mode the output
       starts inside the think block, after the ``"<think> "`` the prompt ends with); the rest is the
       answer part. Tags are removed from the kept reasoning. An output whose think block was opened
       (by the reasoning-mode prompt or by the model) and never closed was probably cut off while
       reasoning: its final answer is accepted only when it is explicit (``"Answer: ..."``, an answer
       tag) or exactly a vocabulary label.
    2. The final answer: the content of the last ``<answer>...</answer>`` when present; else the last
       line with an answer prefix (``Answer:``, ``Final answer:``, ``Final annotation:``, ``Cell type:``,
       ...); else the last non-empty line. It is cleaned of such prefixes, markdown (``**``, ``__``,
       backticks, bullets), quotes and trailing punctuation.
    3. With a vocabulary (the prompt's candidates: the user's, or a k-shot reference's labels) the answer
       is matched, in order:
       exactly; case-insensitively; after normalising (case, punctuation other than ``+``, plural
       ``s``, a trailing word "cell"); then the vocabulary label found inside the answer (whole words;
       the longest wins over the labels it contains, other labels found make it ambiguous); then the
       single label that contains the answer; then through the Cell Ontology (the vendored release,
       :mod:`cellscribe.core.domain.ontology`): the answer's term (:meth:`~CellOntology.lookup` of the
       whole answer, else the one cell type it names, :meth:`~CellOntology.mentions`) is the term of
       exactly one label, or a kind of exactly one label's term (the most specific). No match leaves the
       unit unresolved with the answer in the note.
    4. Without a vocabulary the answer must name a cell type of the Cell Ontology: the whole answer
       looks up to a term (a name, an exact synonym, a reviewed shorthand such as ``"CD14+ Mono"``: the
       answer is the label, as written), or it names exactly one cell type (after dropping those that
       are broader than another it names: "a lymphocyte, more precisely a B cell" names *B cell*): the
       term's name is the label, and the note quotes the words. An answer that names no cell type
       ("FTL (forktail lupine)", a sentence about genes) or several is unresolved, the answer in the
       note. An empty answer is unresolved. Give candidates (``candidates=``) to accept labels of your
       own label set.

``cellpuzzles`` (one answer per cell of a puzzle)
    The answer is read with the answer format :data:`cellscribe.core.answers.TAGGED` (its ``labels`` and
    ``is_legitimate``), the one implementation of the Cell-o1 rules. When ``<answer>...</answer>`` holds exactly one label per
    cell, the labels are taken by position and matched to the prompt's candidates (exactly, then
    case-insensitively, then normalised); a label that is no candidate leaves its cell unresolved. This
    is done even when the output is not legitimate (a stray tag, text after ``</answer>``, a one-cell
    answer without ``|``): the labels are still the model's answer, and the note says the output
    scores 0 under the official metrics, which are computed from the raw text and stay unchanged. A
    missing answer tag or a wrong number of labels leaves every cell unresolved.

Both decoders never raise on model output, copy ``generation.confidence`` per unit when given, add
``generation.notes`` (the model's own remark per unit) to each unit's note, keep the whole output in
``Annotation.raw`` and the think text in ``Annotation.reasoning``, and make every unit unresolved (note
= the error) when ``generation.error`` is set. An output that hit ``max_new_tokens`` before it ended
(``generation.capped``) says so in each of its units' notes (:data:`CAPPED_NOTE`), whatever its status.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

from cellscribe.core.answers import FREE, TAGGED, THINK_OPEN, opens_think
from cellscribe.core.types import STATUS_OK, Annotation, Generation, Prompt

#: The note of every unit of an output that hit ``max_new_tokens`` before it ended.
CAPPED_NOTE = "output cut off at max_new_tokens (raise it with --generation max_new_tokens=N)"
#: Longest answer quoted in full in a note.
_QUOTED_CHARS = 80

_PREFIX = re.compile(
    r"^(?:(?:the\s+)?(?:final|predicted|most\s+likely)?\s*"
    r"(?:answer|annotation|annotation\s+result|cell\s*type|cell\s+identity|label|prediction|result|conclusion)"
    r"(?:\s+is)?\s*[:：\-–—]\s*|the\s+cell\s+type\s+is\s+|this\s+(?:cell\s+)?is\s+(?:an?\s+)?)",
    re.IGNORECASE,
)
_BULLET = re.compile(r"^(?:[-*•>]+|\d+[.)])\s+")
_QUOTES = "\"'`“”‘’«»"
_TRAILING = " \t.;:,!。"
_NORMALISE = re.compile(r"[^\w+]+")
#: Longest answer text looked at (a runaway generation is cut to its end, where the answer is).
_MAX_ANSWER_CHARS = 20_000
#: Answers that say the model cannot tell (compared after :func:`normalise`).
ABSTENTIONS = frozenset({
    "unresolved", "unknown", "undetermined", "indeterminate", "uncertain", "unclassified", "unassigned",
    "none", "n a", "not determined", "cannot be determined", "cannot determine", "can not be determined",
    "insufficient information", "not enough information", "too little information",
})


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


#: ``(reasoning, answer part, closed)`` of an output (the answer format's reading).
split_reasoning = FREE.split_reasoning


def clean_answer(text: str) -> str:
    """One answer line without prefixes, markdown, bullets, quotes or trailing punctuation."""
    previous = None
    text = text.strip()
    while text != previous:
        previous = text
        text = text.replace("**", "").replace("__", "").strip()
        text = _BULLET.sub("", text)
        text = _PREFIX.sub("", text)
        text = text.strip().strip(_QUOTES).strip().rstrip(_TRAILING)
    return text


def _has_prefix(line: str) -> bool:
    return bool(_PREFIX.match(_BULLET.sub("", line.replace("**", "").replace("__", "").strip())))


def final_answer(answer_part: str) -> tuple[str, bool]:
    """``(answer, explicit)``: the cleaned final answer of a model's answer part, and whether it was
    marked (an ``<answer>`` tag or an answer prefix) rather than just the last line."""
    answer_part = answer_part[-_MAX_ANSWER_CHARS:]
    tags = FREE.answer_tags(answer_part)
    if tags:
        return clean_answer(" ".join(tags[-1].split())), True
    lines = [line for line in answer_part.splitlines() if line.strip()]
    for pos in range(len(lines) - 1, -1, -1):
        if _has_prefix(lines[pos]):
            answer = clean_answer(lines[pos])
            if not answer and pos + 1 < len(lines):  # "Final answer:" with the label on the next line
                answer = clean_answer(lines[pos + 1])
            if answer:
                return answer, True
    return (clean_answer(lines[-1]), False) if lines else ("", False)


def normalise(label: str) -> str:
    """Case-folded label with punctuation (except ``+``) as spaces, plural ``s`` and a trailing
    "cell" dropped: ``"Alpha-cells"`` -> ``"alpha"``."""
    words = _NORMALISE.sub(" ", label.casefold().replace("_", " ")).split()
    words = [w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words]
    if len(words) > 1 and words[-1] == "cell":
        words = words[:-1]
    return " ".join(words)


@functools.lru_cache(maxsize=4096)
def _abstains(answer: str) -> bool:
    """Whether an answer withholds the call (:data:`ABSTENTIONS`; answers repeat, each is read once)."""
    return normalise(answer) in ABSTENTIONS


@functools.lru_cache(maxsize=16)
def _normalised(vocabulary: tuple[str, ...]) -> dict[str, str]:
    return {v: normalise(v) for v in vocabulary}


def match_label(answer: str, vocabulary: Sequence[str], *, loose: bool = True) -> tuple[str | None, str]:
    """Match an answer to one vocabulary label.

    :param loose: also try the label found inside the answer and the label containing the answer.
    :return: ``(label, note)``; ``label`` is ``None`` when nothing (or more than one label) matches,
        and the note says why; for a match the note says how (``""`` for an exact match).
    """
    if not answer:
        return None, "empty answer"
    if answer in vocabulary:
        return answer, ""
    folded = answer.casefold()
    hits = [v for v in vocabulary if v.casefold() == folded]
    if len(hits) == 1:
        return hits[0], "matched case-insensitively"
    norm = normalise(answer)
    normed = _normalised(tuple(vocabulary))
    hits = [v for v, n in normed.items() if n and n == norm]
    if len(hits) == 1:
        return hits[0], "matched after normalising case, punctuation and plurals"
    if len(hits) > 1:
        return None, f"answer {answer!r} matches several labels: {hits}"
    if loose and norm:
        padded = f" {norm} "
        inside = [v for v, n in normed.items() if n and f" {n} " in padded]
        if inside:
            # The longest label wins over the labels it contains ("CD8 T" over "T"); labels found
            # elsewhere in the answer ("alpha or beta") make it ambiguous.
            best = max(inside, key=lambda v: len(normed[v]))
            rivals = sorted(v for v in inside if f" {normed[v]} " not in f" {normed[best]} ")
            if not rivals:
                return best, f"label found in the answer {answer!r}"
            return None, f"answer {answer!r} names several labels: {sorted([best, *rivals])}"
        containing = [v for v, n in normed.items() if f" {norm} " in f" {n} "]
        if len(containing) == 1:
            return containing[0], f"answer {answer!r} is part of this label"
        if len(containing) > 1:
            return None, f"answer {answer!r} is part of several labels: {sorted(containing)}"
    return None, f"answer {answer!r} matches no label of the vocabulary"


def _quoted(answer: str) -> str:
    return repr(answer if len(answer) <= _QUOTED_CHARS else answer[: _QUOTED_CHARS - 3] + "...")


def _answer_terms(answer: str) -> tuple[list[str], str]:
    """The Cell Ontology terms ``answer`` names, most specific only, and the words that name them: the
    term of the whole answer, else those it mentions that no other mention is a kind of."""
    from cellscribe.core.domain.ontology import get_ontology

    return get_ontology().named_terms(answer)


def ontology_label(answer: str) -> tuple[str | None, str]:
    """``(label, note)`` for a free-text answer without a vocabulary (module docstring, step 4)."""
    from cellscribe.core.domain.ontology import get_ontology

    return _ontology_label(get_ontology(), answer)


@functools.lru_cache(maxsize=4096)
def _ontology_label(ontology: Any, answer: str) -> tuple[str | None, str]:
    # Answers repeat (a run names a few dozen cell types): each is looked up once per ontology.
    terms, words = _answer_terms(answer)
    if len(terms) == 1:
        if words == answer:
            return answer, ""
        name = ontology.name(terms[0])
        return name, f"cell type named in the answer {_quoted(answer)}: {words!r} ({terms[0]})"
    if terms:
        names = sorted(ontology.name(t) for t in terms)
        return None, f"answer {_quoted(answer)} names several cell types: {names}"
    return None, (f"answer {_quoted(answer)} names no Cell Ontology cell type (give candidates to accept the "
                  "labels of another label set)")


def match_by_ontology(answer: str, vocabulary: Sequence[str]) -> tuple[str | None, str]:
    """``(label, note)``: the vocabulary label whose Cell Ontology term is the answer's, or, failing
    that, the most specific label whose term the answer's is a kind of; ``(None, "")`` when none."""
    from cellscribe.core.domain.ontology import get_ontology

    terms, _ = _answer_terms(answer)
    if len(terms) != 1:
        return None, ""
    ontology = get_ontology()
    term = terms[0]
    label_terms = dict(zip(vocabulary, ontology.lookup_many(vocabulary)))
    same = [v for v, t in label_terms.items() if t == term]
    if len(same) == 1:
        return same[0], f"answer {_quoted(answer)} matched through the Cell Ontology ({term})"
    broader = [v for v, t in label_terms.items() if t is not None and ontology.is_a(term, t, strict=True)]
    specific = [v for v in broader if all(label_terms[w] == label_terms[v] or ontology.is_a(label_terms[v],
                                                                                          label_terms[w])
                                          for w in broader)]
    if not same and len(specific) == 1:
        return specific[0], (f"answer {_quoted(answer)} ({ontology.name(term)}, {term}) is a kind of this label "
                             "(Cell Ontology)")
    return None, ""


def resolve_answer(answer: str, vocabulary: Sequence[str]) -> tuple[str | None, str]:
    """``(label, note)`` for a cleaned free-text answer: matched to ``vocabulary`` (step 3 of the
    module docstring) or, without one, to the Cell Ontology (step 4)."""
    if not vocabulary:
        return ontology_label(answer) if answer else (None, "empty answer")
    label, note = match_label(answer, vocabulary)
    if label is None and answer and "several" not in note:
        found, how = match_by_ontology(answer, vocabulary)
        if found is not None:
            return found, how
    return label, note


def _confidence(generation: Generation, i: int, n: int) -> float | None:
    conf = generation.confidence
    if conf is None or len(conf) != n:
        return None
    try:
        return float(conf[i])
    except (TypeError, ValueError):
        return None


def _unit_note(generation: Generation, i: int, n: int) -> str:
    notes = generation.notes
    if notes is None or len(notes) != n:
        return ""
    return str(notes[i] or "")


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _failed(units: Sequence[str], text: str, error: str) -> list[Annotation]:
    """Every unit unresolved because the model call itself failed."""
    return [Annotation.unresolved(u, raw=text, note=f"generation failed: {error}") for u in units]


class CellReasonerDecoder:
    """``cellreasoner``: free text (CellReasoner direct or reasoning mode) to one label per unit."""

    name = "cellreasoner"
    description = "free-text answer after an optional <think> block, matched to the label vocabulary"
    answer = FREE

    def decode(
        self, generation: Generation, prompt: Prompt, **_: Any
    ) -> list[Annotation]:
        """One annotation per ``prompt.unit_ids`` (normally one); see the module docstring."""
        units = list(prompt.unit_ids)
        text = _as_text(generation.text)
        if generation.error:
            return _failed(units, text, generation.error)
        vocab = [str(v) for v in prompt.candidates if str(v)]
        reasoning_mode = prompt.meta.get("mode") == "reasoning" or opens_think(prompt.response_prefix)
        reasoning, answer_part, closed = self.answer.split_reasoning(text)
        unclosed = not closed and (reasoning_mode or THINK_OPEN in text)
        if unclosed:
            # The think block was opened (by the prompt or the model) and never closed: the output is
            # reasoning that was probably cut off, so only an explicit answer line is trusted.
            answer_part = text.replace(THINK_OPEN, "")
            reasoning = answer_part.strip()
        answer, explicit = final_answer(answer_part)
        label, note = None, ""
        if unclosed:
            if explicit or (vocab and answer in vocab):
                label, note = resolve_answer(answer, vocab)
                note = "; ".join(filter(None, ["reasoning was not closed with </think>", note]))
            else:
                note = "reasoning was not closed with </think> (output cut off? raise max_new_tokens)"
        elif _abstains(answer) and answer not in vocab:
            # The model's own reason (generation.notes), when it gave one, says it better.
            note = "" if generation.notes else f"the model abstained (answer {answer!r})"
        else:
            label, note = resolve_answer(answer, vocab)
        capped = CAPPED_NOTE if generation.capped else ""
        out = []
        for i, unit in enumerate(units):
            unit_note = _join(capped, note, _unit_note(generation, i, len(units)))
            if label is None:
                out.append(Annotation.unresolved(unit, raw=text, note=unit_note, reasoning=reasoning))
            else:
                out.append(
                    Annotation(
                        unit, label, STATUS_OK, _confidence(generation, i, len(units)), reasoning, text, unit_note
                    )
                )
        return out


class CellPuzzlesDecoder:
    """``cellpuzzles``: ``<think>...</think>\\n<answer>a | b | ...</answer>`` to one label per cell."""

    name = "cellpuzzles"
    description = "CellPuzzles answer tag split on '|', labels by cell position (Cell-o1 rules)"
    answer = TAGGED

    def decode(
        self, generation: Generation, prompt: Prompt, **_: Any
    ) -> list[Annotation]:
        """One annotation per cell of the puzzle, in order; see the module docstring."""
        units = list(prompt.unit_ids)
        text = _as_text(generation.text)
        if generation.error:
            return _failed(units, text, generation.error)
        reasoning = self.answer.reasoning(text)
        labels = self.answer.labels(text)
        capped = CAPPED_NOTE if generation.capped else ""
        if labels is None:
            note = _join(capped, "no <answer>...</answer> in the output")
            return [Annotation.unresolved(u, raw=text, note=note, reasoning=reasoning) for u in units]
        if len(labels) != len(units):
            note = _join(
                capped, f"the answer has {len(labels)} label(s) for {len(units)} cell(s): cannot assign by position"
            )
            return [Annotation.unresolved(u, raw=text, note=note, reasoning=reasoning) for u in units]
        format_note = (
            ""
            if self.answer.is_legitimate(text)
            else "output not in the CellPuzzles answer format (scores 0 in the official metrics)"
        )
        candidates = [str(c) for c in prompt.candidates]
        out = []
        for i, (unit, given) in enumerate(zip(units, labels, strict=True)):
            if candidates:
                label, how = match_label(given, candidates, loose=False)
            else:
                label, how = (given or None), ("" if given else "empty answer")
            note = _join(capped, format_note, how, _unit_note(generation, i, len(units)))
            if label is None:
                out.append(Annotation.unresolved(unit, raw=text, note=note, reasoning=reasoning))
            else:
                out.append(
                    Annotation(
                        unit, label, STATUS_OK, _confidence(generation, i, len(units)), reasoning, text, note
                    )
                )
        return out
