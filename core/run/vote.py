"""Neighbour vote (``neighbor_vote=``): each cell's label decided with its nearest cells' answers.

A single cell of a sparse modality (scATAC: a few fragments per gene) gives the model little to go on,
so cells of one population are called as any of a few close types, cell by cell; scATAC is therefore
usually annotated per cluster. The vote keeps the per-cell run and its answers but lets each cell's
neighbourhood decide between close calls, the way CellTypist's majority voting refines per-cell
predictions over clusters, without choosing a clustering resolution:

1. **Plan** (step 2, :func:`plan_vote`, before any model work): the embedding of the cells the model
   will answer (the modality's own, as for ``budget=``: a PCA for RNA, the LSI for ATAC, its
   ``obsm["X_lsi"]`` when the data has one) and their kNN graph (scanpy, the adaptive Gaussian kernel
   of :func:`~.budget.knn_graph`).
2. **Vote** (after decoding, :func:`vote`): every answered cell votes for its label with weight
   ``closeness x confidence`` (its own vote has closeness 1; unresolved cells do not vote). A cell whose
   neighbourhood gives another label more votes than its own (a plurality, as CellTypist's majority
   voting takes the most frequent label of a cluster: close types split the votes of one population)
   takes that label: its confidence becomes the label's share of the votes times its voters' mean
   confidence, and its note names its own call. Other cells keep their answer. Unresolved cells stay
   unresolved (their note says why), and no cell without an answer gets one.

A neighbourhood stays a small part of the run: at most one neighbour per :data:`CELLS_PER_NEIGHBOR`
answered cells (a run of 24 cells votes over 2 neighbours; under 20 cells nobody votes).

Written: ``uns[key]["vote"]`` (neighbours used and asked, why fewer, embedding, cells that voted and
that changed label, the labels they changed from and to, seconds) and the notes of the changed cells.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np
import scipy.sparse as sp

from ..types import STATUS_OK, Annotation

log = logging.getLogger(__name__)

__all__ = ["Vote", "effective_neighbor_vote", "plan_vote", "vote"]

#: Label changes listed in ``uns[key]["vote"]["changes"]`` (the most frequent first).
LISTED_CHANGES = 20
#: Answered cells per voting neighbour at least: a small run votes over fewer neighbours (24 cells: 2),
#: so that a population smaller than the neighbourhood is not outvoted by the rest of the run.
CELLS_PER_NEIGHBOR = 10


def effective_neighbor_vote(spec: Any, host: Any) -> int:
    """Neighbours of the vote of a run of ``spec``: ``neighbor_vote`` when set, else the largest
    ``default_neighbor_vote`` of its modalities; 0 where the run's cells do not stand alone (``groupby``,
    ``budget``) or its prompt strategy labels cells together (puzzles)."""
    p = spec.prompts
    if p.groupby is not None or p.budget is not None:
        return 0
    if p.neighbor_vote is not None:
        return int(p.neighbor_vote)
    if not host.registry.get("prompt", p.prompt).neighbor_vote_allowed:
        return 0
    return max(int(host.registry.get("modality", m).default_neighbor_vote) for m in spec.data.modality.split("+"))


@attrs.define(eq=False)
class Vote:
    """The vote of a run: its neighbourhood size, the rows (of the run's sentences) of the cells that
    take part, their kNN graph (symmetric weights, no self loops) and what the embedding was."""

    n_neighbors: int
    rows: np.ndarray
    graph: sp.csr_matrix | None
    source: str
    seconds: float
    asked: int = 0
    note: str = ""


def plan_vote(prepared: Any, sentences: Any, spec: Any, host: Any, unit_rows: np.ndarray) -> Vote | None:
    """The vote of a run (step 2), or ``None`` when it has none (see :func:`effective_neighbor_vote`).

    :raises ValueError: a prompt strategy that labels cells together with an explicit ``neighbor_vote``.
    """
    from .budget import cells_embedding, knn_graph

    k = effective_neighbor_vote(spec, host)
    if k and not host.registry.get("prompt", spec.prompts.prompt).neighbor_vote_allowed:
        raise ValueError(f"neighbor_vote= revises single cells' answers, but prompt={spec.prompts.prompt!r} labels "
                         "its cells together (distinct labels in one answer); leave neighbor_vote out (or 0)")
    if not k:
        return None
    rows = np.asarray(unit_rows, dtype=np.int64)
    used = min(k, len(rows) // CELLS_PER_NEIGHBOR)
    if used < 2:
        note = (f"no vote: {k} neighbours asked, {len(rows)} cells allow none (at least "
                f"{2 * CELLS_PER_NEIGHBOR} needed for 2); each cell keeps its own answer")
        log.info("neighbour vote: %s", note)
        return Vote(0, rows, None, "none", 0.0, asked=k, note=note)
    note = "" if used == k else f"{k} neighbours asked, {len(rows)} cells allow {used}"
    started = time.perf_counter()
    options = {"use_rep": None, "n_components": None}
    embedding, source = cells_embedding(prepared, spec, options, host)
    graph = knn_graph(embedding[rows], used, spec.prompts.seed)
    seconds = time.perf_counter() - started
    log.info("neighbour vote: %d neighbours over %d cells on %s (%.2f s)", used, len(rows), source, seconds)
    return Vote(used, rows, graph, source, seconds, asked=k, note=note)


def vote(v: Vote, by_unit: Mapping[str, Annotation],
         cell_ids: np.ndarray) -> tuple[dict[str, Annotation], dict[str, Any]]:
    """Apply the vote ``v`` to the decoded answers ``by_unit`` (unit id -> Annotation; ``cell_ids`` the
    unit id of each row of the run's sentences). Returns the answers after the vote (a new dict;
    ``by_unit`` is not changed) and the record written to ``uns[key]["vote"]``."""
    started = time.perf_counter()
    units = [str(cell_ids[r]) for r in v.rows.tolist()]
    answers = [by_unit.get(u) for u in units]
    voting = np.array([a is not None and a.status == STATUS_OK and a.label is not None for a in answers])
    labels = np.array([a.label if ok else "" for a, ok in zip(answers, voting)], dtype=object)
    confidence = np.array([(1.0 if a.confidence is None else float(a.confidence)) if ok else 0.0
                           for a, ok in zip(answers, voting)])
    out = dict(by_unit)
    record: dict[str, Any] = {"n_neighbors": v.n_neighbors, "n_neighbors_asked": v.asked or v.n_neighbors,
                              "note": v.note, "embedding": v.source, "n_cells": len(units),
                              "n_voting": int(voting.sum()), "n_changed": 0, "changes": {}}
    if v.graph is not None and voting.sum() >= 2:
        names, codes = np.unique(labels[voting], return_inverse=True)
        weight = np.clip(confidence[voting], 1e-6, 1.0)
        who = np.flatnonzero(voting)
        ballots = sp.csr_matrix((weight, (who, codes)), shape=(len(units), len(names)))
        closeness = sp.csr_matrix(v.graph + sp.identity(len(units), format="csr"))
        tally = (closeness @ ballots).toarray()  # per cell and label: the closeness-weighted confidence
        voted = (ballots > 0).astype(np.float64)
        support = (closeness @ voted).toarray()  # the same without confidence
        neighbours = (v.graph > 0).astype(np.float64)
        n_voters = (neighbours @ voted).toarray()  # per cell and label: the neighbours voting for it
        n_neighbours = np.diff(neighbours.indptr)
        total = tally.sum(axis=1)
        win = tally.argmax(axis=1)
        r = np.arange(len(units))
        share = np.where(total > 0, tally[r, win] / np.maximum(total, 1e-300), 0.0)
        mean_conf = tally[r, win] / np.maximum(support[r, win], 1e-300)
        changes: Counter = Counter()
        own_code = np.full(len(units), -1, dtype=np.int64)
        own_code[who] = codes
        own_votes = np.where(own_code >= 0, tally[r, np.maximum(own_code, 0)], 0.0)
        for i in np.flatnonzero(voting & (names[win] != labels) & (tally[r, win] > own_votes)).tolist():
            own = answers[i]
            new = str(names[win[i]])
            own_conf = "" if own.confidence is None else f", {own.confidence:.2f}"
            note = (f"neighbour vote: {new} for {int(n_voters[i, win[i]])} of its {int(n_neighbours[i])} nearest "
                    f"cells ({share[i]:.0%} of the weighted votes); its own call was {own.label}{own_conf}")
            out[units[i]] = attrs.evolve(own, label=new, confidence=float(share[i] * mean_conf[i]),
                                         note="; ".join(x for x in (own.note, note) if x))
            changes[f"{own.label} -> {new}"] += 1
        record["n_changed"] = int(sum(changes.values()))
        record["changes"] = dict(changes.most_common(LISTED_CHANGES))
    record["seconds"] = round(v.seconds + time.perf_counter() - started, 3)
    log.info("neighbour vote: %d of %d cells changed label", record["n_changed"], len(units))
    return out, record
