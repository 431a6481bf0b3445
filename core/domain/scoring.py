"""Candidate scoring: from each candidate label's log-likelihood after a prompt to comparable scores.

A model scores a candidate by the log-probability of its tokens (and the end of the answer) after the
prompt. Summed, that favours short labels: every token costs probability, so a 2-token label beats a
12-token one whatever the cell (measured on SmolLM2-135M-Instruct and 100 pbmc68k cells: the shortest of
five candidates for 100 of 100 cells). Divided by the number of tokens it favours long ones (the later
tokens of a long label are nearly certain once it has begun: the longest for most cells). Neither asks
what the cell says.

``calibration="pmi"`` (the default) scores a candidate by how much more likely the cell's prompt makes it
than a *neutral* prompt does: the same prompt with every cell sentence replaced by
:data:`NEUTRAL_SENTENCE` (pointwise mutual information against a content-free input; Holtzman et al.
2021, "Surface form competition"; Zhao et al. 2021, "Calibrate before use"). The neutral prompt gives
each candidate's prior under the instruction and the candidate list, length included, so what is left
is the evidence of the genes. Its scores are computed once per distinct neutral prompt (one for a whole
zero-shot run). ``"mean"`` divides by the number of tokens scored, ``"sum"`` keeps the sum.

The probabilities reported are the softmax of the calibrated scores over the candidates. Puzzles (several
labels per prompt) are scored by the sum: one candidate per cell makes a constant per candidate, length
or prior, shift every assignment equally.

Both model backends that score (transformers, and openai through a server's prompt log-probabilities)
use these functions, so a label scored locally and through a server get the same score.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np

__all__ = ["CALIBRATIONS", "DEFAULT_CALIBRATION", "NEUTRAL_SENTENCE", "calibration_of", "neutral_prompt",
           "calibrate", "softmax"]

#: How candidate log-likelihoods are made comparable (module docstring).
CALIBRATIONS = ("pmi", "mean", "sum")
DEFAULT_CALIBRATION = "pmi"
#: What replaces each cell sentence in the neutral prompt (a content-free input, as in Zhao et al. 2021).
NEUTRAL_SENTENCE = "N/A"


def calibration_of(settings: Mapping[str, Any]) -> str:
    """The calibration the generation ``settings`` ask for: ``calibration``, else ``"mean"`` for the
    older ``length_normalize=True`` (``"sum"`` for ``False``), else :data:`DEFAULT_CALIBRATION`.
    Raises ``ValueError`` for an unknown value or a contradiction between the two keys."""
    value = settings.get("calibration")
    legacy = settings.get("length_normalize")
    if legacy is not None and not isinstance(legacy, (bool, np.bool_)):
        raise ValueError(f"length_normalize must be True or False, got {legacy!r}.")
    if value is None:
        return DEFAULT_CALIBRATION if legacy is None else ("mean" if legacy else "sum")
    if value not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {', '.join(map(repr, CALIBRATIONS))}, got {value!r}.")
    if legacy is not None and (value == "mean") != bool(legacy):
        raise ValueError(f"calibration={value!r} contradicts length_normalize={legacy!r}; give only calibration.")
    return value


def neutral_prompt(prompt: Any) -> Any:
    """``prompt`` (a :class:`~cellscribe.core.types.Prompt`) with each of its cell sentences replaced by
    :data:`NEUTRAL_SENTENCE` in its last user message (earlier turns, such as k-shot examples, stay):
    the content-free input whose candidate scores calibrate the prompt's."""
    messages = [dict(m) for m in prompt.messages]
    last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last is not None:
        content = messages[last]["content"]
        for sentence in sorted(set(prompt.sentences), key=len, reverse=True):
            if sentence:
                content = content.replace(sentence, NEUTRAL_SENTENCE)
        messages[last]["content"] = content
    return attrs.evolve(prompt, messages=tuple(messages), sentences=tuple(NEUTRAL_SENTENCE for _ in prompt.sentences))


def calibrate(log_likelihood: np.ndarray, method: str, *, n_tokens: np.ndarray | None = None,
              neutral: np.ndarray | None = None) -> np.ndarray:
    """Calibrated scores of a ``labels x candidates`` matrix of summed log-likelihoods.

    ``n_tokens`` (same shape, or one row per candidate) is needed for ``"mean"``; ``neutral`` (the
    neutral prompt's summed log-likelihoods, one row) for ``"pmi"``.
    """
    scores = np.asarray(log_likelihood, dtype=np.float64)
    if method == "sum":
        return scores
    if method == "mean":
        if n_tokens is None:
            raise ValueError("calibration='mean' needs the number of tokens of each candidate")
        return scores / np.maximum(np.asarray(n_tokens, dtype=np.float64), 1.0)
    if method == "pmi":
        if neutral is None:
            raise ValueError("calibration='pmi' needs the neutral prompt's scores")
        return scores - np.asarray(neutral, dtype=np.float64).reshape(1, -1)
    raise ValueError(f"calibration must be one of {', '.join(map(repr, CALIBRATIONS))}, got {method!r}.")


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax (probabilities over the candidates); ``-inf`` entries get 0."""
    scores = np.asarray(scores, dtype=np.float64)
    shifted = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)
