"""Label transfer without a language model: SingleR-style correlation to a labelled reference.

:func:`transfer_labels` is what ``cellscribe.tl.transfer_labels`` calls. It adapts SingleR's classic
method (Aran et al. 2019, *Nat. Immunol.* 20:163; the ``SingleR`` Bioconductor package) to a reference
of another modality, typically scATAC-seq cells (gene activity) against a labelled scRNA-seq reference
(expression):

1. **Both sides as genes.** Each side is prepared by its own modality component (the query's
   ``modality``, the reference's ``reference_modality``) with ``modality_options`` on top of the
   component's ``transfer_options`` attribute when it has one (options giving values fit for
   correlation); counts are log-normalised (``log1p(1e4 * x / total)``, totals over the shared
   genes), other values (log data, gene
   activity) are used as the modality gives them. For scATAC that is the enrichment-normalised,
   smoothed activity by default; ``modality_options={"normalization": "depth"}`` gives log-normalised
   activity, SingleR's classical input, which keeps the information of genes *below* a cell's average
   (enrichment clips them to 0): on PBSmall 0.95 of the cells right against 0.91. Only the genes *both* sides measure (non-zero in some cell, and measured by the assay) are
   used: a marker the query cannot show never makes a label win or lose.
2. **Label profiles and informative genes.** Each reference label's profile is the mean of its cells'
   values. For every ordered pair of labels (A, B), the ``n_markers`` genes with the largest positive
   profile difference A - B are markers of A against B (SingleR's ``de.method="classic"``; default
   ``n_markers = round(500 * (2/3) ** log2(n_labels))``, SingleR's ``de.n``). The informative genes
   are the union over all pairs.
3. **Scores.** Each query cell's Spearman correlation with each label's profile over the informative
   genes (ranks within the cell against ranks within the profile: only the *order* of genes is
   compared, so the scales of expression and gene activity never meet).
4. **Fine-tuning** (``fine_tune=True``): the labels within ``tune_threshold`` of the cell's best score
   are compared again over only their own pairwise markers, the others dropped, until one label is left
   or the set stops shrinking (SingleR's fine-tuning). Cells sharing a candidate set are scored together.
5. **Confidence and status.** The *margin* is the winner's score minus the runner-up's in the last
   comparison; ``confidence = 1 - exp(-margin / tune_threshold)`` (0 when two labels tie, 0.63 at a
   margin equal to the tuning threshold; a monotone map, not a calibrated probability). A cell with
   no activity on any informative gene is ``unresolved``. With ``prune=True``, as SingleR's
   ``pruneScores(nmads=3)``, a cell whose delta (best initial score minus the median of its initial
   scores) is more than 3 median absolute deviations below that of the other cells given the same label
   is ``unresolved``, its best guess kept in the note.

Everything is chunked over cells (the query is read twice: once to find its measured genes, once to
score) and vectorised; only a block of cells x informative genes is dense at a time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import rankdata

from ..plugins import Host, get_host
from ..types import STATUS_OK, STATUS_UNRESOLVED, FeatureMatrix
from .data import label_column, measured_mask, select_modality_data
from .record import h5_safe, mirror_to_mudata, versions

log = logging.getLogger(__name__)

__all__ = ["transfer_labels", "default_n_markers", "METHOD"]

METHOD = "SingleR-style Spearman correlation to label profiles (Aran et al. 2019), across modalities"
#: Dense cells x genes entries ranked at once.
_BLOCK_ENTRIES = 1 << 22
#: SingleR's outlier rule for pruning: median absolute deviations below the label's median delta.
PRUNE_NMADS = 3.0
#: Scale of ``1.4826 * MAD``, R's ``mad()`` (consistent with the standard deviation of a normal).
_MAD_SCALE = 1.4826


def default_n_markers(n_labels: int) -> int:
    """SingleR's ``de.n`` for the classic marker method: ``round(500 * (2/3) ** log2(n_labels))``."""
    return max(1, int(round(500 * (2 / 3) ** math.log2(max(n_labels, 2)))))


def _expression(chunk: sp.csr_matrix, value_kind: str) -> sp.csr_matrix:
    """Counts log-normalised per cell (``log1p(1e4 * x / total)``, the total over the columns given:
    the genes both sides measure, so genes one side cannot show do not even change the depth); other
    values as they are."""
    chunk = sp.csr_matrix(chunk, dtype=np.float64)
    if value_kind != "counts":
        return chunk
    totals = np.asarray(chunk.sum(axis=1)).ravel()
    scale = 1e4 / np.where(totals > 0, totals, 1.0)
    data = np.log1p(chunk.data * np.repeat(scale, np.diff(chunk.indptr)))
    return sp.csr_matrix((data, chunk.indices, chunk.indptr), shape=chunk.shape)


def _label_profiles(
    features: FeatureMatrix, codes: np.ndarray, n_labels: int, columns: np.ndarray, chunk_size: int
) -> np.ndarray:
    """``(labels, columns)``: each label's mean value over its cells (cells with code -1 ignored)."""
    sums = np.zeros((n_labels, len(columns)))
    for start, stop, chunk in features.iter_chunks(chunk_size):
        rows = codes[start:stop]
        keep = rows >= 0
        indicator = sp.csr_matrix(
            (np.ones(int(keep.sum())), (rows[keep], np.flatnonzero(keep))), shape=(n_labels, stop - start)
        )
        sums += np.asarray((indicator @ _expression(chunk[:, columns], features.value_kind)).todense())
    sizes = np.bincount(codes[codes >= 0], minlength=n_labels).astype(np.float64)
    return sums / sizes[:, None]


def _pairwise_markers(profiles: np.ndarray, n_markers: int) -> list[list[np.ndarray]]:
    """``markers[a][b]``: the ``n_markers`` columns where label a exceeds label b most (positive only)."""
    n = len(profiles)
    markers: list[list[np.ndarray]] = [[np.zeros(0, dtype=np.int64)] * n for _ in range(n)]
    for a in range(n):
        for b in range(n):
            if a == b:
                continue
            diff = profiles[a] - profiles[b]
            order = np.argsort(-diff, kind="stable")[:n_markers]
            markers[a][b] = order[diff[order] > 0]
    return markers


def _genes_of(markers: list[list[np.ndarray]], labels: np.ndarray) -> np.ndarray:
    """The union of the pairwise markers among ``labels`` (sorted columns)."""
    parts = [markers[a][b] for a in labels for b in labels if a != b]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def _standard_ranks(values: np.ndarray) -> np.ndarray:
    """Row-wise average ranks, centred and scaled to unit norm (NaN rows where all values tie)."""
    ranks = rankdata(values, axis=1)
    ranks -= ranks.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(ranks, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, ranks / norms, np.nan)


def _spearman(cells: np.ndarray, profiles: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """``(cells, labels)`` Spearman correlations over ``genes`` (NaN for a cell without variation)."""
    if len(genes) < 2:
        return np.full((len(cells), len(profiles)), np.nan)
    return _standard_ranks(cells[:, genes]) @ _standard_ranks(profiles[:, genes]).T


class _Scorer:
    """Scores, fine-tuning and margins for blocks of query cells against the label profiles."""

    def __init__(self, profiles: np.ndarray, markers: list[list[np.ndarray]], threshold: float, fine_tune: bool):
        self.profiles = profiles
        self.markers = markers
        self.threshold = threshold
        self.fine_tune = fine_tune
        self.all_genes = _genes_of(markers, np.arange(len(profiles)))

    def score(self, cells: np.ndarray) -> dict[str, np.ndarray]:
        """Per cell: ``label`` (index, -1 without variation), ``margin``, ``score`` (the winner's
        final correlation), ``delta`` (best initial score minus the median initial score) and
        ``compared`` (labels in the last comparison)."""
        n, n_labels = len(cells), len(self.profiles)
        initial = _spearman(cells, self.profiles, self.all_genes)
        valid = ~np.isnan(initial).any(axis=1)
        label = np.full(n, -1, dtype=np.int64)
        margin = np.full(n, np.nan)
        score = np.full(n, np.nan)
        compared = np.zeros(n, dtype=np.int64)
        delta = np.full(n, np.nan)
        if valid.any():
            best = initial[valid].max(axis=1)
            delta[valid] = best - np.median(initial[valid], axis=1)
        rows = np.flatnonzero(valid)
        candidates = np.zeros((n, n_labels), dtype=bool)
        if rows.size:
            candidates[rows] = initial[rows] >= initial[rows].max(axis=1, keepdims=True) - self.threshold
        self._settle(rows, initial[rows], np.ones((len(rows), n_labels), dtype=bool), label, margin, score, compared)
        # Fine-tuning: cells whose best labels lie within the threshold are compared again over the
        # markers among those labels only, until one is left or the set stops shrinking.
        pending = rows[candidates[rows].sum(axis=1) > 1] if self.fine_tune else rows[:0]
        while pending.size:
            sets, group = np.unique(candidates[pending], axis=0, return_inverse=True)
            group = np.asarray(group).ravel()
            still = []
            for g, members in enumerate(sets):
                cells_g = pending[group == g]
                labels_g = np.flatnonzero(members)
                genes = _genes_of(self.markers, labels_g)
                sub = _spearman(cells[cells_g], self.profiles[labels_g], genes)
                ok = ~np.isnan(sub).any(axis=1)
                cells_g, sub = cells_g[ok], sub[ok]
                if not cells_g.size:
                    continue
                full = np.full((len(cells_g), n_labels), -np.inf)
                full[:, labels_g] = sub
                mask = np.zeros((len(cells_g), n_labels), dtype=bool)
                mask[:, labels_g] = True
                self._settle(cells_g, full, mask, label, margin, score, compared)
                kept = full >= full.max(axis=1, keepdims=True) - self.threshold
                shrunk = kept.sum(axis=1) < len(labels_g)
                candidates[cells_g] = kept
                still.append(cells_g[shrunk & (kept.sum(axis=1) > 1)])
            pending = np.concatenate(still) if still else rows[:0]
        return {"label": label, "margin": margin, "score": score, "delta": delta, "compared": compared}

    @staticmethod
    def _settle(rows, scores, mask, label, margin, score, compared) -> None:
        """Record the winner of a comparison (``scores`` over the labels in ``mask``) for ``rows``."""
        if not len(rows):
            return
        masked = np.where(mask, scores, -np.inf)
        order = np.argsort(-masked, axis=1, kind="stable")
        first = order[:, 0]
        top = masked[np.arange(len(rows)), first]
        second = masked[np.arange(len(rows)), order[:, 1]] if masked.shape[1] > 1 else np.full(len(rows), -np.inf)
        label[rows] = first
        score[rows] = top
        margin[rows] = np.where(np.isfinite(second), top - second, np.nan)
        compared[rows] = mask.sum(axis=1)


def _pruned(label: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """SingleR's pruning: per label, deltas more than :data:`PRUNE_NMADS` scaled MADs below its median."""
    out = np.zeros(len(label), dtype=bool)
    for lab in np.unique(label[label >= 0]):
        rows = np.flatnonzero(label == lab)
        values = delta[rows]
        median = np.median(values)
        mad = _MAD_SCALE * np.median(np.abs(values - median))
        out[rows] = values < median - PRUNE_NMADS * mad
    return out


def transfer_labels(
    data: Any,
    reference: Any,
    *,
    reference_key: str,
    modality: str = "atac",
    reference_modality: str = "rna",
    mod: str | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    n_markers: int | None = None,
    fine_tune: bool = True,
    tune_threshold: float = 0.05,
    prune: bool = True,
    modality_options: Mapping[str, Any] | None = None,
    chunk_size: int = 10_000,
    key_added: str = "transfer",
    host: Host | None = None,
) -> dict[str, Any]:
    """Transfer the labels of ``reference`` to the cells of ``data`` in place; return the summary.

    See the module docstring for the method and :func:`cellscribe.tl.transfer_labels` for the
    arguments and the fields written. ``reference`` is only read.
    """
    started = time.perf_counter()
    host = host or get_host()
    reg = host.registry
    if n_markers is not None and (isinstance(n_markers, bool) or int(n_markers) < 1):
        raise ValueError(f"n_markers must be a positive number of genes per pair of labels, got {n_markers!r}")
    if not 0 <= float(tune_threshold) < 2:
        raise ValueError(f"tune_threshold must be a correlation difference in [0, 2), got {tune_threshold!r}")
    modality_c = reg.get("modality", modality)
    ref_c = reg.get("modality", reference_modality)
    adata, mod = select_modality_data(data, modality_c, mod)
    ref_adata, _ = select_modality_data(reference, ref_c, None)
    labels = label_column(ref_adata.obs, reference_key, "the reference")
    known = labels.notna().to_numpy()
    codes, names = pd.factorize(labels.astype(object).where(known, None).to_numpy(), sort=True)
    names = np.asarray([str(x) for x in names], dtype=object)
    if len(names) < 2:
        raise ValueError(
            f"reference column {reference_key!r} has {len(names)} label(s) ({', '.join(names) or 'none'}); "
            "transferring labels needs at least two"
        )
    # A modality may declare the options that give values fit for correlation (log-normalised rather
    # than a ranking device); the user's modality_options come on top.
    options = {**dict(modality_c.transfer_options or {}), **dict(modality_options or {})}
    ref_options = {**dict(ref_c.transfer_options or {}), **dict(modality_options or {})}
    query = modality_c.prepare(adata, layer=layer, use_raw=use_raw, chunk_size=chunk_size, **options)
    ref = ref_c.prepare(ref_adata, chunk_size=chunk_size, **ref_options)

    query_measured = measured_mask(query, chunk_size)
    ref_measured = measured_mask(ref, chunk_size)
    ref_index = pd.Index(ref.feature_names.astype(str))
    shared = pd.Index(query.feature_names[query_measured].astype(str)).intersection(
        ref_index[ref_measured], sort=False
    )
    genes = {"query": int(query_measured.sum()), "reference": int(ref_measured.sum()), "shared": len(shared)}
    if len(shared) < 2:
        raise ValueError(
            f"only {len(shared)} gene(s) are measured both in the query ({modality}, {genes['query']} genes, "
            f"e.g. {', '.join(query.feature_names[query_measured][:3].astype(str))}) and in the reference "
            f"({reference_modality}, {genes['reference']} genes, e.g. "
            f"{', '.join(ref.feature_names[ref_measured][:3].astype(str))}); check that both use gene "
            "symbols of the same species"
        )
    ref_columns = ref_index.get_indexer(shared)
    query_columns = pd.Index(query.feature_names.astype(str)).get_indexer(shared)

    profiles = _label_profiles(ref, codes, len(names), ref_columns, chunk_size)
    n_markers = default_n_markers(len(names)) if n_markers is None else int(n_markers)
    markers = _pairwise_markers(profiles, n_markers)
    # Cells are read over the informative genes only; markers become positions among them.
    informative = _genes_of(markers, np.arange(len(names)))
    markers = [[np.searchsorted(informative, m) for m in row] for row in markers]
    scorer = _Scorer(profiles[:, informative], markers, float(tune_threshold), bool(fine_tune))
    genes["informative"] = int(len(informative))
    log.info("transfer: %d labels, %d shared genes, %d informative", len(names), len(shared), len(informative))

    block = max(1, _BLOCK_ENTRIES // max(len(informative), 1))
    results: dict[str, list[np.ndarray]] = {}
    for _, _, chunk in query.iter_chunks(chunk_size):
        values = _expression(chunk[:, query_columns], query.value_kind)[:, informative]
        for lo in range(0, values.shape[0], block):
            for k, v in scorer.score(values[lo : lo + block].toarray()).items():
                results.setdefault(k, []).append(v)
    out = {k: np.concatenate(v) for k, v in results.items()}
    frame, summary = _results(out, names, len(informative), float(tune_threshold), prune, key_added,
                              adata.obs_names)
    seconds = time.perf_counter() - started

    for column in frame.columns:
        values = frame[column]
        adata.obs[column] = values.values if isinstance(values.dtype, pd.CategoricalDtype) else values.to_numpy()
    params = {
        "method": METHOD,
        "modality": modality,
        "reference_modality": reference_modality,
        "mod": mod,
        "reference_key": reference_key,
        "n_reference_cells": int(known.sum()),
        "labels": names.tolist(),
        "genes": genes,
        "n_markers": n_markers,
        "fine_tune": bool(fine_tune),
        "tune_threshold": float(tune_threshold),
        "prune": bool(prune),
        "layer": layer,
        "use_raw": use_raw,
        "matrix": query.source,
        "reference_matrix": ref.source,
        "value_kind": query.value_kind,
        "reference_value_kind": ref.value_kind,
        "modality_options": {k: str(v) for k, v in options.items()},
        "versions": versions(),
    }
    summary["seconds"] = round(seconds, 3)
    entry = {"params": h5_safe(params), "summary": h5_safe(summary)}
    adata.uns[key_added] = entry
    if mod is not None:
        mirror_to_mudata(data, mod, list(frame.columns), key_added, entry)
    log.info(
        "transferred %d labels to %d cells in %.2f s: %d ok, %d unresolved",
        len(names), summary["n_cells"], seconds, summary["n_ok"], summary["n_unresolved"],
    )
    return summary


def _results(
    out: Mapping[str, np.ndarray], names: np.ndarray, n_informative: int, scale: float, prune: bool,
    key_added: str, cell_ids: pd.Index,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The obs columns (label, confidence, score, status, note) and the summary."""
    label, margin, score, delta, compared = (out[k] for k in ("label", "margin", "score", "delta", "compared"))
    n = len(label)
    empty = label < 0
    pruned = _pruned(label, delta) & ~empty if prune else np.zeros(n, dtype=bool)
    ok = ~empty & ~pruned
    confidence = np.where(ok, 1.0 - np.exp(-np.nan_to_num(margin, nan=0.0) / max(scale, 1e-9)), np.nan)
    guess = np.where(empty, None, names[np.maximum(label, 0)])
    note = np.full(n, "", dtype=object)
    note[empty] = f"no activity on any of the {n_informative} informative genes measured in both data sets"
    for i in np.flatnonzero(~empty):
        how = f"Spearman {score[i]:.2f} to {guess[i]}, margin {margin[i]:.2f}"
        if compared[i] < len(names):
            how += f" after fine-tuning among {compared[i]} labels"
        if pruned[i]:
            note[i] = (f"pruned (best guess {guess[i]}): its lead over the median label, {delta[i]:.2f}, is an "
                       f"outlier among the cells given {guess[i]} (SingleR's 3-MAD rule); {how}")
        else:
            note[i] = how
    status = np.where(ok, STATUS_OK, STATUS_UNRESOLVED)
    frame = pd.DataFrame(
        {
            key_added: pd.Categorical(np.where(ok, guess, None), categories=list(names)),
            f"{key_added}_confidence": confidence,
            f"{key_added}_score": np.where(empty, np.nan, score),
            f"{key_added}_status": pd.Categorical(status, categories=[STATUS_OK, STATUS_UNRESOLVED]),
            f"{key_added}_note": note,
        },
        index=cell_ids.astype(str),
    )
    counts = frame[key_added].value_counts().to_dict()
    summary = {
        "n_cells": n,
        "n_ok": int(ok.sum()),
        "n_unresolved": int((~ok).sum()),
        "n_empty": int(empty.sum()),
        "n_pruned": int(pruned.sum()),
        "label_counts": {str(k): int(v) for k, v in counts.items()},
    }
    return frame, summary
