"""Units: the cells that are prompted. Every cell with a sentence, or with ``groupby`` a few typical cells
per group (:func:`pick_representatives`) whose answers are put together by :func:`majority_vote`."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..types import CellSentences


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
