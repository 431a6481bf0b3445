"""The answer grammar: where a model's output puts its reasoning and its labels.

Two formats, one object each. A prompt names its format (:attr:`~cellscribe.core.types.Prompt.answer`);
decoders read outputs with it, backends that write or force answers (the ``markers`` model, constrained
decoding, a server's separate reasoning) write them with it, and the CellPuzzles metrics judge them with
it. Nothing else spells the tags.

:data:`FREE` (CellReasoner)
    Optional reasoning in a think block, then the label as free text::

        <think>
        reasoning
        </think>

        label

    When the prompt already opened the think block (CellReasoner's reasoning mode ends its prompt with
    ``"<think> "``), the output starts with the reasoning: ``"reasoning\\n</think>\\n\\nlabel"``.

:data:`TAGGED` (CellPuzzles / Cell-o1)
    ``<think>reasoning</think>\\n<answer>label 1 | label 2 | ...</answer>``: one label per unit, in unit
    order. An output is *legitimate* (Cell-o1's evaluation rule) only if it has exactly one of each tag,
    matches ``^<think>.*?</think>\\n<answer>.*?</answer>$`` (reasoning may span lines) and its answer
    contains ``|``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import attrs

__all__ = ["AnswerFormat", "FREE", "TAGGED", "THINK_OPEN", "THINK_CLOSE", "ANSWER_OPEN", "ANSWER_CLOSE",
           "SEPARATOR", "TAG_NAMES", "printable", "opens_think", "ends_in_think", "with_reasoning"]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
#: Between the labels of a tagged answer.
SEPARATOR = " | "
#: The tag names (tolerant readers, such as the grader, match misspelt variants of them).
TAG_NAMES = ("think", "answer")

_LEGITIMATE = re.compile(r"^<think>.*?</think>\n<answer>.*?</answer>$", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_ANY_CASE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ENDS_IN_THINK = re.compile(r"<think>\s*$")


#: Characters an answer cannot carry into the results: C0 controls but tab, newline and carriage return
#: (h5ad strings refuse NUL), DEL, C1 controls, and lone surrogates (not encodable as UTF-8).
_UNPRINTABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def printable(text: str | None) -> tuple[str, int]:
    """``text`` with every control character (NUL, escape, ...) except tab, newline and carriage return,
    and every lone surrogate, replaced by a space; and how many were replaced. What a model answers is
    stored in ``obs`` strings, which h5ad cannot write with a NUL in them."""
    if not text:
        return text or "", 0
    cleaned, n = _UNPRINTABLE.subn(" ", text)
    return cleaned, n


def opens_think(text: str) -> bool:
    """Whether ``text`` (a prompt's response prefix) opens a think block the model's output continues."""
    return THINK_OPEN in text


def ends_in_think(rendered: str) -> bool:
    """Whether a rendered prompt ends inside an open think block (so the output starts with reasoning)."""
    return bool(_ENDS_IN_THINK.search(rendered))


def with_reasoning(reasoning: str, text: str, *, think_open: bool = False) -> str:
    """An answer ``text`` with separately returned ``reasoning`` (a server's reasoning parser) put back in
    front in a think block (already opened by the prompt when ``think_open``), so the output reads as
    one text, as from a local run."""
    return ("" if think_open else THINK_OPEN) + reasoning + THINK_CLOSE + text


@attrs.frozen
class AnswerFormat:
    """How an output holds its reasoning and labels (see the module docstring).

    ``tagged``: the labels stand in ``<answer>...</answer>`` separated by :data:`SEPARATOR`, one per
    unit; otherwise one free-text label follows the reasoning.
    """

    name: str
    tagged: bool
    description: str = attrs.field(default="", eq=False)

    # ------------------------------------------------------------------------------------ writing

    def text(self, labels: Sequence[str], reasoning: str = "", *, inside_think: bool = False) -> str:
        """The output that answers ``labels`` after ``reasoning`` (``inside_think``: the prompt opened
        the think block, so the output only closes it)."""
        if self.tagged:
            head = "" if inside_think else THINK_OPEN
            return f"{head}{reasoning}{THINK_CLOSE}\n{ANSWER_OPEN}{SEPARATOR.join(labels)}{ANSWER_CLOSE}"
        (label,) = labels
        if inside_think:
            return f"{reasoning}\n{THINK_CLOSE}\n\n{label}"
        return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{label}"

    def pieces(self, *, inside_think: bool) -> dict[str, object]:
        """The fixed text around the labels, for writing answers token by token (constrained decoding,
        scoring): ``open_text`` and ``close_text`` around the reasoning (``reasoning``: whether there is
        a reasoning part), ``separator`` between labels, ``tail_text`` after them."""
        if self.tagged:
            return {"reasoning": True, "open_text": "" if inside_think else THINK_OPEN,
                    "close_text": f"{THINK_CLOSE}\n{ANSWER_OPEN}", "separator": SEPARATOR,
                    "tail_text": ANSWER_CLOSE}
        return {"reasoning": inside_think, "open_text": "", "close_text": f"{THINK_CLOSE}\n" if inside_think else "",
                "separator": SEPARATOR, "tail_text": ""}

    def stop_strings(self, *, reasoning: bool = False) -> tuple[str, ...]:
        """The texts after which an answer in this format is complete, so generation may stop there.

        :data:`TAGGED`: ``</answer>`` (nothing follows it). :data:`FREE` without reasoning (direct mode):
        the newline that ends the label's line; with reasoning (``reasoning``: the prompt opened a think
        block or asks for one) none: the label comes on its own line after ``</think>``, and no literal
        string tells that line's end from the end of a line of reasoning, so such outputs end at the
        model's end-of-sequence token or at ``max_new_tokens``. A backend's output includes the stop
        string that ended it (:meth:`restore_stop` puts back one a server left out).
        """
        if self.tagged:
            return (ANSWER_CLOSE,)
        return () if reasoning else ("\n",)

    def restore_stop(self, text: str) -> str:
        """``text`` as it read before a server cut the stop string that ended it (the OpenAI API leaves
        the matched stop string out of the answer): for :data:`TAGGED`, an ``<answer>`` left open gets
        its ``</answer>`` back; free text is returned as it is (its stop, a newline, carries nothing)."""
        if self.tagged and text.rfind(ANSWER_OPEN) > text.rfind(ANSWER_CLOSE):
            return text + ANSWER_CLOSE
        return text

    # ------------------------------------------------------------------------------------ reading

    @staticmethod
    def split_reasoning(text: str) -> tuple[str, str, bool]:
        """``(reasoning, answer part, closed)``: the text up to the last ``</think>`` (tags removed), the
        text after it, and whether a ``</think>`` was found. Without one, a text that contains
        ``<think>`` is all reasoning; any other text is all answer."""
        cut = text.rfind(THINK_CLOSE)
        if cut >= 0:
            reasoning = text[:cut].replace(THINK_OPEN, "").replace(THINK_CLOSE, "")
            return reasoning.strip(), text[cut + len(THINK_CLOSE):], True
        if THINK_OPEN in text:
            return text.replace(THINK_OPEN, "").strip(), "", False
        return "", text, False

    @staticmethod
    def reasoning(text: str) -> str:
        """The text between the first ``<think>`` and the last ``</think>`` (``""`` without both)."""
        start, stop = text.find(THINK_OPEN), text.rfind(THINK_CLOSE)
        return text[start + len(THINK_OPEN):stop].strip() if 0 <= start < stop else ""

    @staticmethod
    def answer_tags(text: str) -> list[str]:
        """The insides of every ``<answer>...</answer>`` (tags in any case), in order."""
        return _ANSWER_ANY_CASE.findall(text)

    def labels(self, text: str) -> list[str] | None:
        """The labels of the first ``<answer>...</answer>`` split on ``|`` and stripped, or ``None``."""
        match = _ANSWER.search(text)
        if match is None:
            return None
        return [part.strip() for part in match.group(1).split("|")]

    def is_legitimate(self, text: str) -> bool:
        """Whether ``text`` follows this format exactly: for :data:`TAGGED`, Cell-o1's rule; free text
        has no such rule (always true)."""
        if not self.tagged:
            return True
        if any(text.count(tag) != 1 for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)):
            return False
        match = _ANSWER.search(text)
        return bool(_LEGITIMATE.match(text)) and match is not None and "|" in match.group(1)


FREE = AnswerFormat("free", tagged=False,
                    description="optional <think> reasoning, then one free-text label (CellReasoner)")
TAGGED = AnswerFormat("tagged", tagged=True,
                      description="<think>reasoning</think>\\n<answer>a | b</answer>, one label per unit (Cell-o1)")
