"""Cell sentences as text: vectorised joining shared by the prompt strategies and file formats."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cellscribe.core.domain.ranking import encode_names, join_ranked
from cellscribe.core.types import CellSentences

SEP = ", "


class SentenceJoiner:
    """Joins the ranked genes of :class:`CellSentences` chunks into strings, one per cell.

    The vocabulary's byte encoding (:func:`~cellscribe.core.domain.ranking.encode_names`) is computed once
    and reused while the chunks share the same vocabulary (a sentence strategy gives every chunk the
    same one).
    """

    def __init__(self, sep: str = SEP) -> None:
        self.sep = sep
        self._vocabulary: np.ndarray | None = None
        self._encoded: tuple[np.ndarray, np.ndarray] | None = None

    def _encoding(self, vocabulary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        same = self._vocabulary is vocabulary or (
            self._vocabulary is not None
            and len(self._vocabulary) == len(vocabulary)
            and np.array_equal(self._vocabulary, vocabulary)
        )
        if not same or self._encoded is None:
            self._encoded = encode_names(vocabulary, self.sep)
            self._vocabulary = vocabulary
        return self._encoded

    def __call__(self, sentences: CellSentences) -> list[str]:
        """One string per cell of ``sentences`` (an empty string for a cell without genes); sentences
        of several modalities render one ``"{label}: genes"`` line per modality."""
        if len(sentences) == 0:
            return []
        if sentences.sections:
            return sentences.texts(self.sep)
        encoded = self._encoding(sentences.vocabulary)
        return join_ranked(encoded, sentences.indptr, sentences.indices, self.sep)


def sentence_strings(sentences: CellSentences, sep: str = SEP) -> list[str]:
    """Every cell's genes joined with ``sep``, in rank order (vectorised)."""
    return SentenceJoiner(sep)(sentences)


def is_null(value: Any) -> bool:
    """Whether ``value`` is None, NaN, pandas NA or blank text."""
    if value is None:
        return True
    try:
        if value != value:  # NaN; pandas NA raises in bool()
            return True
    except (TypeError, ValueError):
        return True
    return isinstance(value, str) and not value.strip()


#: Metadata values that mean "not recorded" (FORMATS.md: each context piece is left out for these).
MISSING_TEXT = frozenset({"", "nan", "unknown", "none", "na"})


def is_missing(value: Any) -> bool:
    """Whether a metadata value counts as absent: null, or nan/unknown/none/na/empty as text."""
    return is_null(value) or str(value).strip().lower() in MISSING_TEXT


def clean_labels(labels: Sequence[Any] | None, what: str) -> list[str]:
    """Labels as unique, stripped, non-empty strings in their first-seen order.

    :raises ValueError: when ``labels`` is given but holds no usable label.
    """
    if labels is None:
        return []
    if isinstance(labels, str):
        raise ValueError(
            f"{what} must be a list of labels, not the single string {labels!r}; wrap it in a list"
        )
    seen: dict[str, None] = {}
    for label in labels:
        if is_null(label):
            continue
        seen.setdefault(str(label).strip(), None)
    if not seen:
        raise ValueError(f"{what} holds no usable label (all empty or missing); give at least one label")
    return list(seen)
