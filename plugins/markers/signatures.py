"""k-shot signatures: what the labelled examples of a prompt say about each of their labels.

A k-shot prompt shows ``k`` reference cells per label. For every label, each gene gets the mean rank
weight it has in that label's examples (0 where an example lacks it; the rank weights of
:mod:`.scoring`, ubiquitous genes excluded), and the label's *signature* weight for the gene is how much
that mean exceeds the largest mean of any other label::

    signature(l, g) = max(0, mean_l(g) - max_{l' != l} mean_l'(g))

so a gene frequent and high in one label's examples and rare in all the others' weighs most; genes
every label shares weigh nothing, and so do genes the query data do not measure (an RNA reference for
a peak matrix: see :meth:`MarkerScorer.within`). Each label keeps its :data:`SIGNATURE_GENES` heaviest genes. A
signature is scored like a marker list (same rank weights and normalisation), and where the label also
names a cell type of the knowledge the two scores are averaged (see
:meth:`~.backend.MarkersModel`).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np
import scipy.sparse as sp

from cellscribe.core.types import Example

from .scoring import MarkerScorer, Vocabulary

__all__ = ["SIGNATURE_GENES", "Signatures", "label_signatures"]

#: Genes kept per label signature.
SIGNATURE_GENES = 50


@attrs.frozen(eq=False)
class Signatures:
    """Signature weights of labels over an extended vocabulary.

    ``positive``: CSR ``(labels, vocabulary)``; ``norms``: per label, as :meth:`MarkerScorer.norms_of`;
    ``n_examples``: examples per label (0: the label had none and its row is empty).
    """

    labels: tuple[str, ...]
    vocabulary: Vocabulary
    positive: sp.csr_matrix
    norms: np.ndarray
    n_examples: np.ndarray


def label_signatures(scorer: MarkerScorer, examples: Sequence[Example], labels: Sequence[str]) -> Signatures:
    """The :class:`Signatures` of ``labels`` learned from ``examples`` (labels without examples get an
    empty row)."""
    labels = tuple(str(label) for label in labels)
    sentences = [ex.sentence for ex in examples]
    vocabulary = _vocabulary_with(scorer, sentences)
    units = scorer.parse(sentences, vocabulary)
    position = {label: i for i, label in enumerate(labels)}
    codes = np.asarray([position.get(str(ex.label), -1) for ex in examples], dtype=np.int64)
    keep = codes >= 0
    counts = np.bincount(codes[keep], minlength=len(labels)).astype(np.float64)
    indicator = sp.csr_matrix(
        (1.0 / counts[codes[keep]], (codes[keep], np.flatnonzero(keep))), shape=(len(labels), len(examples))
    )
    means = np.asarray((indicator @ units.weights).todense())
    signature = np.zeros_like(means)
    present = counts > 0
    signature[present] = np.maximum(means[present] - _mean_of_others(means[present]), 0.0)
    # Genes the query data cannot show never make a label (examples may come from another assay).
    signature[:, ~scorer.measured_columns(vocabulary)] = 0.0
    positive = _keep_heaviest(signature, SIGNATURE_GENES)
    return Signatures(labels, vocabulary, positive, scorer.norms_of(positive), counts.astype(np.int64))


def _vocabulary_with(scorer: MarkerScorer, sentences: Sequence[str]) -> Vocabulary:
    """The scorer's vocabulary extended with the informative genes of ``sentences``."""
    from .scoring import split_sentences

    _, tokens = split_sentences(sentences)
    distinct = np.unique(tokens.astype(str)) if len(tokens) else np.zeros(0, dtype=object)
    cleaned = scorer.vocabulary.clean(distinct)
    columns, ubiquitous = scorer.vocabulary.lookup(distinct)
    new = cleaned[(columns < 0) & ~ubiquitous & (cleaned != "")]
    return scorer.vocabulary.extended(new.tolist())


def _mean_of_others(values: np.ndarray) -> np.ndarray:
    """For each row, the column-wise mean over the *other* rows (0 with a single row)."""
    n = values.shape[0]
    if n < 2:
        return np.zeros_like(values)
    return (values.sum(axis=0, keepdims=True) - values) / (n - 1)


def _keep_heaviest(values: np.ndarray, n: int) -> sp.csr_matrix:
    """A CSR keeping each row's ``n`` largest positive values."""
    if values.shape[1] > n:
        cut = np.partition(values, values.shape[1] - n, axis=1)[:, values.shape[1] - n, None]
        values = np.where(values >= cut, values, 0.0)
    matrix = sp.csr_matrix(values)
    matrix.eliminate_zeros()
    matrix.sort_indices()
    return matrix
