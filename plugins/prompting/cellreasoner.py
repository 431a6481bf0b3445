"""CellReasoner prompts (compbioNJU/CellReasoner, FORMATS.md) and the ``zero-shot`` strategy.

A CellReasoner prompt is two chat messages, ``[system: instruction, user: cell sentence]``, rendered
with the model's chat template. The released code then deletes every ``<think>`` from the rendered
text (so the reasoning instruction's "within the <think></think> tag" reads "within the </think> tag",
as in training) and, in reasoning mode, appends ``"<think> "``: the model's output starts inside its
reasoning. :class:`~cellscribe.core.types.Prompt` carries both edits (``remove_from_rendered``,
``response_prefix``) so every backend applies them the same way.

Candidate labels given by the user are appended to the user message as
``"\\n\\nCandidate cell types (answer with exactly one):\\n"`` followed by one label per line (labels
may contain commas, so they are never joined on one line). CellReasoner was trained without such a
list: leave ``candidates`` out for the published behaviour, or pass ``options={"show_candidates":
False}`` to keep them for decoding only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from cellscribe.core.answers import THINK_OPEN
from cellscribe.core.types import CellSentences, Example, Prompt

from ._text import clean_labels, sentence_strings

log = logging.getLogger(__name__)

#: The system instruction of direct mode (the ``instruction`` field of CellReasoner's training data).
DIRECT_INSTRUCTION = (
    "These are highly expressed genes within a certain type of tumor cells; please annotate the cell "
    "type based on these marker genes. Please infer the cell type based on the marker genes, and "
    "directly give the final annotation result."
)
#: The system instruction of reasoning mode.
REASONING_INSTRUCTION = (
    "These are highly expressed genes within a certain type of tumor cells; please annotate the cell "
    "type based on these marker genes. Please infer the cell type based on the marker genes, and "
    "place the reason within the <think></think> tag."
)
INSTRUCTIONS = {"direct": DIRECT_INSTRUCTION, "reasoning": REASONING_INSTRUCTION}

#: Deleted from the rendered prompt in both modes (as the released inference code does).
REMOVE_FROM_RENDERED = (THINK_OPEN,)
#: Appended to the rendered prompt in reasoning mode.
REASONING_PREFIX = THINK_OPEN + " "
#: Prompts longer than this are truncated by the published inference code.
MAX_PROMPT_TOKENS = 8192

_COMMON_GENERATION = {"do_sample": True, "repetition_penalty": 1.1, "max_new_tokens": 4096}
#: Published generation settings per mode (FORMATS.md).
GENERATION = {
    "direct": {**_COMMON_GENERATION, "temperature": 0.01, "top_p": 0.01},
    "reasoning": {**_COMMON_GENERATION, "temperature": 0.6, "top_p": 0.4},
}

CANDIDATES_HEADER = "\n\nCandidate cell types (answer with exactly one):\n"
MODES = ("direct", "reasoning")


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is ``"direct"`` or ``"reasoning"``; raise ``ValueError`` otherwise."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'direct' or 'reasoning', got {mode!r}")
    return mode


def generation_defaults(mode: str, max_prompt_tokens: int | None = None) -> dict[str, Any]:
    """The published generation settings of ``mode`` with the prompt token limit."""
    settings = dict(GENERATION[check_mode(mode)])
    settings["max_prompt_tokens"] = int(max_prompt_tokens or MAX_PROMPT_TOKENS)
    return settings


def candidate_block(candidates: Sequence[str]) -> str:
    """The text appended to a user message to list the allowed labels (``""`` without candidates)."""
    return CANDIDATES_HEADER + "\n".join(candidates) if candidates else ""


def cellreasoner_prompt(
    unit_id: str,
    sentence: str,
    *,
    mode: str,
    strategy: str,
    instruction: str | None = None,
    candidates: Sequence[str] = (),
    show_candidates: bool = True,
    examples: Sequence[Example] = (),
    max_prompt_tokens: int | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Prompt:
    """One CellReasoner-style prompt for one unit.

    Messages: ``system`` (the mode's instruction), then for each example a ``user`` turn (its
    sentence) and an ``assistant`` turn (its label), then the ``user`` query: the sentence, followed by
    the candidate block when ``show_candidates``.
    """
    messages: list[dict[str, str]] = [{"role": "system", "content": instruction or INSTRUCTIONS[mode]}]
    for ex in examples:
        messages.append({"role": "user", "content": ex.sentence})
        messages.append({"role": "assistant", "content": ex.label})
    query = sentence + (candidate_block(candidates) if show_candidates else "")
    messages.append({"role": "user", "content": query})
    return Prompt(
        messages=tuple(messages),
        unit_ids=(unit_id,),
        sentences=(sentence,),
        strategy=strategy,
        decoder="cellreasoner",
        candidates=tuple(candidates),
        examples=tuple(examples),
        remove_from_rendered=REMOVE_FROM_RENDERED,
        response_prefix=REASONING_PREFIX if mode == "reasoning" else "",
        generation=generation_defaults(mode, max_prompt_tokens),
        meta={"mode": mode, **dict(meta or {})},
    )


class ZeroShot:
    """``zero-shot``: one CellReasoner prompt per unit, the published format (FORMATS.md).

    Options (``options=``): ``show_candidates`` (bool, default True: list the user's candidates in
    the user message), ``instruction`` (str: replace the system instruction, for other models).
    """

    name = "zero-shot"
    description = "CellReasoner format: [system instruction, user cell sentence], one cell per prompt"
    default_decoder = "cellreasoner"

    def build(
        self,
        sentences: CellSentences,
        *,
        mode: str = "direct",
        candidates: Sequence[str] | None = None,
        max_prompt_tokens: int | None = None,
        options: Mapping[str, Any] | None = None,
        **_: Any,
    ) -> list[Prompt]:
        """One prompt per unit with a non-empty sentence, in the order of ``sentences``."""
        check_mode(mode)
        opts = dict(options or {})
        cands = clean_labels(candidates, "candidates")
        show = bool(opts.get("show_candidates", True))
        instruction = opts.get("instruction")
        texts = sentence_strings(sentences)
        prompts = [
            cellreasoner_prompt(
                str(uid),
                text,
                mode=mode,
                strategy=self.name,
                instruction=instruction,
                candidates=cands,
                show_candidates=show,
                max_prompt_tokens=max_prompt_tokens,
            )
            for uid, text in zip(sentences.cell_ids, texts, strict=True)
            if text
        ]
        log.debug("zero-shot: %d prompts (%s mode)", len(prompts), mode)
        return prompts
