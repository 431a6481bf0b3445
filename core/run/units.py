"""Units: the cells that are prompted. Every cell with a sentence, or with ``groupby`` a few typical cells
per group (:func:`pick_representatives`) whose answers are put together: from their pooled per-label
probabilities when the model gives them (:func:`pooled_vote`), else by :func:`majority_vote`."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..types import CellSentences, Generation, Prompt


def pick_representatives(
    sentences: CellSentences, groups: pd.Series, per_group: int
) -> dict[str, list[int]]:
    """Choose up to ``per_group`` typical cells per group.

    A cell is typical when its genes are frequent in its group: score = mean over the cell's genes of the
    share of group cells whose sentence holds that gene. Computed with one sparse product; ties go to the
    earlier cell. Cells with an empty sentence are never chosen.
    """
    n = len(sentences)
    lengths = sentences.lengths()
    incidence = sp.csr_matrix(
        (np.ones(len(sentences.indices), dtype=np.float32), sentences.indices, sentences.indptr),
        shape=(n, len(sentences.vocabulary)),
    )
    codes, names = pd.factorize(groups.astype(str), sort=True)
    membership = sp.csr_matrix(
        (np.ones(n, dtype=np.float32), (codes, np.arange(n))), shape=(len(names), n)
    )
    sizes = np.asarray(membership.sum(axis=1)).ravel()
    freq = sp.csr_matrix(membership @ incidence).multiply(1.0 / sizes[:, None]).tocsr()
    # score[i] = incidence[i] . freq[group(i)]
    score = np.asarray(incidence.multiply(freq[codes]).sum(axis=1)).ravel() / np.maximum(lengths, 1)
    score[lengths == 0] = -np.inf
    chosen: dict[str, list[int]] = {}
    order = np.lexsort((np.arange(n), -score, codes))
    for g, name in enumerate(names):
        rows = order[codes[order] == g]
        rows = rows[np.isfinite(score[rows])][:per_group]
        chosen[str(name)] = rows.tolist()
    return chosen


def majority_vote(labels: Sequence[str], confidences: Sequence[float]) -> tuple[str | None, float, float]:
    """The most frequent label, ties broken by the higher mean confidence, then by name.

    :return: ``(label, vote share, mean confidence of its voters (NaN if none))``.
    """
    if not labels:
        return None, 0.0, math.nan
    counts = Counter(labels)

    def mean_conf(label: str) -> float:
        vals = [c for lab, c in zip(labels, confidences) if lab == label and not math.isnan(c)]
        return float(np.mean(vals)) if vals else math.nan

    best = sorted(counts, key=lambda lab: (-counts[lab], -np.nan_to_num(mean_conf(lab), nan=-1), lab))[0]
    return best, counts[best] / len(labels), mean_conf(best)


def groupby_note(share: float, n: int) -> str:
    return f"group label by majority vote ({share:.0%} of {n} resolved representatives)"


def unit_label_scores(prompts: Sequence[Prompt], generations: Sequence[Generation]) -> dict[str, Mapping[str, float]]:
    """Each unit's per-label probabilities (``Generation.label_scores``), where the model gave them."""
    out: dict[str, Mapping[str, float]] = {}
    for prompt, generation in zip(prompts, generations):
        scores = generation.label_scores
        if scores and generation.error is None and len(scores) == len(prompt.unit_ids):
            out.update((str(u), s) for u, s in zip(prompt.unit_ids, scores) if s)
    return out


def pooled_vote(
    labels: Sequence[str], scores: Sequence[Mapping[str, float]], confidences: Sequence[float]
) -> tuple[str | None, float, float, float]:
    """A group's label from its representatives' per-label probabilities: the label of highest mean
    probability over them (a label absent from a representative's scores counts 0 there), ties broken
    by the number of representatives that answered it, then by name. Five representatives split
    between two close subtypes still agree on what the group is most likely to be, which a count of
    their answers can miss.

    :return: ``(label, share of representatives that answered it, mean confidence of those (else its
        mean probability), its mean probability)``.
    """
    if not labels:
        return None, 0.0, math.nan, math.nan
    pooled: dict[str, float] = {}
    for s in scores:
        for label, p in s.items():
            pooled[str(label)] = pooled.get(str(label), 0.0) + float(p) / len(scores)
    counts = Counter(labels)
    best = sorted(pooled, key=lambda lab: (-round(pooled[lab], 12), -counts.get(lab, 0), lab))[0]
    voters = [c for lab, c in zip(labels, confidences) if lab == best and not math.isnan(c)]
    confidence = float(np.mean(voters)) if voters else pooled[best]
    return best, counts.get(best, 0) / len(labels), confidence, pooled[best]


def pooled_note(label_p: float, share: float, n: int) -> str:
    return (f"group label from the representatives' pooled label probabilities (mean {label_p:.2f} over "
            f"{n} resolved representatives; {share:.0%} of them answered it)")
