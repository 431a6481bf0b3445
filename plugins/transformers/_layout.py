"""The shape of an answer made of candidate labels, as text and as tokens.

Constrained decoding (:mod:`._constrained`) and candidate scoring (:mod:`._scoring`) both need to know
what a legal answer to a prompt looks like:

The text around the labels comes from the prompt's answer format (:mod:`cellscribe.core.answers`):

- free-text answers (CellReasoner): exactly one candidate label, then the end-of-sequence token. When
  the rendered prompt ends inside a think block (reasoning mode appends ``"<think> "``), free reasoning
  comes first and is closed by ``"</think>\\n"``.
- tagged answers (CellPuzzles): ``<think>reasoning</think>\\n<answer>a | b | c</answer>``
  with one label per cell, all different (a permutation of the candidates when there are as many
  candidates as cells), then end-of-sequence. Such an output is legitimate under Cell-o1's metrics by
  construction.

Labels are tokenised piece by piece (the first label alone, every later one with its separator, the
closing text alone): for byte-level BPE tokenizers the pieces are split where the tokenizer's
pre-tokenizer splits anyway, so the ids are the canonical ones, and for any tokenizer their decoded
concatenation is the answer text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from cellscribe.core.answers import SEPARATOR, ends_in_think
from cellscribe.core.types import Prompt

#: Text standing for the reasoning in answers made by scoring (no reasoning was generated).
SCORED_REASONING = "scored"


@attrs.frozen
class AnswerLayout:
    """What a legal answer looks like, as text.

    ``open_text``, reasoning, ``close_text`` come first when ``reasoning`` is true; then ``n_labels``
    candidate labels joined by ``separator`` (all different when ``unique``), then ``tail_text``.
    """

    candidates: tuple[str, ...] = attrs.field(converter=tuple)
    n_labels: int = 1
    reasoning: bool = False
    open_text: str = ""
    close_text: str = ""
    separator: str = SEPARATOR
    tail_text: str = ""
    unique: bool = False

    def text(self, labels: Sequence[str], reasoning: str = "") -> str:
        """The full answer text for ``labels`` (and the given reasoning text)."""
        head = self.open_text + reasoning + self.close_text if self.reasoning else ""
        return head + self.separator.join(labels) + self.tail_text

    def scoring_prefix(self) -> str:
        """The text the labels are scored after: the opening and closing of an empty reasoning block."""
        return self.open_text + self.close_text if self.reasoning else ""


def layout_for(prompt: Prompt, rendered: str) -> AnswerLayout | None:
    """The answer layout of ``prompt`` (rendered as ``rendered``), or ``None`` without candidates."""
    candidates = tuple(dict.fromkeys(str(c) for c in prompt.candidates if str(c)))
    if not candidates:
        return None
    pieces = prompt.answer.pieces(inside_think=ends_in_think(rendered))
    if prompt.answer.tagged:
        return AnswerLayout(candidates=candidates, n_labels=max(1, len(prompt.unit_ids)), unique=True, **pieces)
    return AnswerLayout(candidates=candidates, n_labels=1, **pieces)


class Node:
    """A token trie node: ``children`` by token id, the ``label`` ending here (or ``None``) and the
    bit ``mask`` of every label at or below this node."""

    __slots__ = ("children", "label", "mask")

    def __init__(self) -> None:
        self.children: dict[int, Node] = {}
        self.label: int | None = None
        self.mask = 0


def build_trie(sequences: Sequence[Sequence[int]]) -> Node:
    """A trie of token sequences; sequence ``j`` ends at a node whose ``label`` is ``j``."""
    root = Node()
    for j, seq in enumerate(sequences):
        if not seq:
            raise ValueError(f"candidate {j} tokenises to nothing; remove empty labels from the candidates")
        node = root
        node.mask |= 1 << j
        for token in seq:
            node = node.children.setdefault(int(token), Node())
            node.mask |= 1 << j
        if node.label is not None:
            raise ValueError(f"candidates {node.label} and {j} tokenise identically; make the labels distinct")
        node.label = j
    return root


@attrs.frozen(eq=False)
class TokenLayout:
    """An :class:`AnswerLayout` in token ids of one tokenizer.

    ``first[j]`` / ``later[j]``: ids of candidate ``j`` as the first label / as a later label (with
    its separator); ``eos_ids``: every end-of-sequence id (the answer ends with any one of them).
    """

    layout: AnswerLayout
    open_ids: tuple[int, ...]
    close_ids: tuple[int, ...]
    first: tuple[tuple[int, ...], ...]
    later: tuple[tuple[int, ...], ...]
    tail_ids: tuple[int, ...]
    eos_ids: tuple[int, ...]
    first_trie: Node
    later_trie: Node | None
    #: Token that always starts a later label (the separator's first token), if there is one.
    separator_id: int | None

    @property
    def n_candidates(self) -> int:
        return len(self.first)

    @property
    def full_mask(self) -> int:
        return (1 << self.n_candidates) - 1

    def max_answer_tokens(self) -> int:
        """Tokens of the longest legal answer after the reasoning: close, labels, tail and eos."""
        n = self.layout.n_labels
        longest_first = max(len(s) for s in self.first)
        rest = sorted((len(s) for s in self.later), reverse=True)
        if self.layout.unique and n - 1 <= len(rest):
            later = sum(rest[: n - 1])
        else:
            later = (n - 1) * (rest[0] if rest else 0)
        return len(self.close_ids) + longest_first + later + len(self.tail_ids) + 1


def tokenize_layout(layout: AnswerLayout, tokenizer: Any, eos_ids: Sequence[int]) -> TokenLayout:
    """Tokenise ``layout``'s pieces with ``tokenizer`` in one call (see the module docstring)."""
    if not eos_ids:
        raise ValueError(
            "constrained and scored answers end with the end-of-sequence token, but the model has none; "
            "set eos_token_id in its generation_config.json"
        )
    k = len(layout.candidates)
    texts = [layout.open_text, layout.close_text, layout.tail_text, *layout.candidates]
    texts += [layout.separator + c for c in layout.candidates] if layout.n_labels > 1 else []
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    pieces = [tuple(int(t) for t in ids) if text else () for ids, text in zip(encoded, texts)]
    first = tuple(pieces[3 : 3 + k])
    later = tuple(pieces[3 + k :])
    starts = {seq[0] for seq in later if seq}
    return TokenLayout(
        layout=layout,
        open_ids=pieces[0],
        close_ids=pieces[1],
        first=first,
        later=later,
        tail_ids=pieces[2],
        eos_ids=tuple(int(e) for e in eos_ids),
        first_trie=build_trie(first),
        later_trie=build_trie(later) if later else None,
        separator_id=next(iter(starts)) if len(starts) == 1 else None,
    )
