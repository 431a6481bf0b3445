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

Generation defaults (``Prompt.generation``; a user's ``generation=`` settings override them): the
published sampling settings of each mode (FORMATS.md), with a token limit and stop strings that fit the
answer instead of CellReasoner's 4096 new tokens, which a model that does not stop by itself runs to
(SmolLM2-135M-Instruct took over 25 minutes for 100 cells on two cores, every output at the limit):

- direct mode: at most :data:`DIRECT_MAX_NEW_TOKENS` new tokens, and the answer ends at its first
  newline (the free-text format's stop string, :meth:`~cellscribe.core.answers.AnswerFormat.stop_strings`):
  the answer is one label line. CellReasoner's own answers are 1-4 tokens; Cell Ontology names are 7
  tokens at the median, 22 at the 99th percentile and 31 at most (SmolLM2's tokenizer);
- reasoning mode: at most :data:`REASONING_MAX_NEW_TOKENS` new tokens and no stop string (the label
  follows the reasoning; the model's end-of-sequence token ends it): room for about ten times the ~100
  tokens of reasoning per cell of Cell-o1's published reasoning trace.

``options={"generation": "published"}`` (``--prompt-option generation=published``) gives the published
settings unchanged (4096 new tokens, no stop string). An output that hits the limit is marked: the
backend warns and the decoder notes it on the cell.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from cellscribe.core.answers import FREE, THINK_OPEN
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
PUBLISHED_GENERATION = {
    "direct": {**_COMMON_GENERATION, "temperature": 0.01, "top_p": 0.01},
    "reasoning": {**_COMMON_GENERATION, "temperature": 0.6, "top_p": 0.4},
}
#: New tokens a direct-mode answer may take (one label line; see the module docstring).
DIRECT_MAX_NEW_TOKENS = 32
#: New tokens a reasoning-mode answer may take (the reasoning and the label).
REASONING_MAX_NEW_TOKENS = 1024
#: The default generation settings per mode: published sampling, a limit and stops fitted to the answer.
GENERATION = {
    "direct": {**PUBLISHED_GENERATION["direct"], "max_new_tokens": DIRECT_MAX_NEW_TOKENS,
               "stop_strings": list(FREE.stop_strings())},
    "reasoning": {**PUBLISHED_GENERATION["reasoning"], "max_new_tokens": REASONING_MAX_NEW_TOKENS},
}
#: The values of the ``generation`` prompt option: the defaults above, or the published settings.
GENERATION_PRESETS = ("fitted", "published")

CANDIDATES_HEADER = "\n\nCandidate cell types (answer with exactly one):\n"
MODES = ("direct", "reasoning")


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is ``"direct"`` or ``"reasoning"``; raise ``ValueError`` otherwise."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'direct' or 'reasoning', got {mode!r}")
    return mode


def check_preset(preset: Any) -> str:
    """``preset`` (the ``generation`` prompt option; ``None`` is ``"fitted"``) if it is one of
    :data:`GENERATION_PRESETS`; ``ValueError`` otherwise."""
    preset = "fitted" if preset is None else preset
    if preset not in GENERATION_PRESETS:
        raise ValueError(f"prompt option generation must be 'fitted' (the default: limits and stops fitted to "
                         f"the answer) or 'published' (the published settings), got {preset!r}")
    return preset


def generation_defaults(mode: str, max_prompt_tokens: int | None = None, preset: str = "fitted") -> dict[str, Any]:
    """The default generation settings of ``mode`` (``preset="published"``: the published ones) with the
    prompt token limit."""
    table = PUBLISHED_GENERATION if check_preset(preset) == "published" else GENERATION
    settings = {k: list(v) if isinstance(v, list) else v for k, v in table[check_mode(mode)].items()}
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
    preset: str = "fitted",
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
        generation=generation_defaults(mode, max_prompt_tokens, preset),
        meta={"mode": mode, **dict(meta or {})},
    )


class ZeroShot:
    """``zero-shot``: one CellReasoner prompt per unit, the published format (FORMATS.md).

    Options (``options=``): ``show_candidates`` (bool, default True: list the user's candidates in
    the user message), ``instruction`` (str: replace the system instruction, for other models),
    ``generation`` (``"fitted"``, the default, or ``"published"``: the generation defaults, see the
    module docstring).
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
        preset = check_preset(opts.get("generation"))
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
                preset=preset,
            )
            for uid, text in zip(sentences.cell_ids, texts, strict=True)
            if text
        ]
        log.debug("zero-shot: %d prompts (%s mode)", len(prompts), mode)
        return prompts
