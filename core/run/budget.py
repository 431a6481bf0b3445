"""Budgeted annotation (``budget=``): the model answers a few representative cells, the kNN graph the rest.

A run with a budget goes through the same steps as any run, with three additions:

1. **Choose** (in step 2, :func:`plan_budget`): an embedding of the cells, made by their modality
   (``Modality.embedding``: scanpy's PCA for RNA, the ATAC plugin's LSI; a truncated SVD of the
   FeatureMatrix for a modality without one) or taken from ``obsm[use_rep]``; then ``budget`` cells of
   it: the cell nearest each k-means centre (``method="medoids"``, k = the budget; sklearn), or a seeded
   uniform sample (``"random"``). With ``groupby`` the budget is shared among the groups in proportion
   to their size, at least one cell each, and chosen within each group.
2. **Spread** (after step 3, :func:`spread`): the answers go to every cell over the kNN graph of the
   embedding (``scanpy.pp.neighbors``, adaptive Gaussian kernel): label propagation with the answered
   cells clamped (the harmonic solution of Zhu, Ghahramani and Lafferty 2003, solved with scipy's sparse
   LU, or conjugate gradients on very large data), so a cell's weight on a label is the probability that
   a random walk from it over the graph reaches a cell answered with that label first. The *agreement*
   of a cell is the share of that weight its label carries; its confidence is the agreement times the
   mean confidence of the answers that carry the label (each weighted by its walk probability). Answers
   pull in proportion to the model's confidence in them. sklearn's ``LabelPropagation`` takes neither a
   graph nor weighted answers.
3. **Re-query** (one bounded second round): the cells whose label has an agreement below
   ``min_agreement`` (where the spread labels disagree, or no answer reaches) are sent too: at most
   ``requery`` x the budget's cells (fewer when ``groupby`` forced more into the first round), chosen
   among them as in step 1. Then the labels are spread again from every answer. With ``groupby``: the
   groups whose representatives disagree get more representatives. So ``budget=0.05`` sends at most
   10% of the cells in all.

Written: ``obs[f"{key}_source"]`` (``"model"``: the cell was sent to the model; ``"propagated"``: its
label was spread to it), the note of each propagated cell says so, ``uns[key]["budget"]`` records what
was spent (cells sent per round, re-queries, the embedding, the graph). The second round's batches are
checkpointed in ``checkpoint/requery`` and it is answered in the first round's context
(``LoadedModel.survey`` sees the first round's prompts): a resumed run ends as an uninterrupted one. A
first round with failed prompts is not followed by a second (its choice depends on every answer): the
re-run that answers them runs it.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.linalg import cg, splu

from ..types import STATUS_OK, Annotation

log = logging.getLogger(__name__)

__all__ = ["Budget", "BudgetResult", "METHODS", "DEFAULT_OPTIONS", "check_budget_options", "plan_budget",
           "run_budgeted", "spread", "choose_cells", "SOURCE_MODEL", "SOURCE_PROPAGATED"]

METHODS = ("medoids", "random")
#: ``budget_options`` and their defaults (``n_components``: the modality's own default when ``None``).
DEFAULT_OPTIONS: Mapping[str, Any] = {
    "method": "medoids",
    "use_rep": None,
    "n_components": None,
    "n_neighbors": 15,
    "requery": 1.0,
    "min_agreement": 0.9,
}
SOURCE_MODEL = "model"
SOURCE_PROPAGATED = "propagated"
#: Clusters above which the medoids are chosen in two levels (coarse k-means, then k-means within each
#: coarse cluster): one k-means with 50,000 centres over a million cells would take hours, and 1,000
#: centres over 20,000 cells took 21 s (k-means++ initialisation) against seconds in two levels.
FLAT_KMEANS_MAX = 200
#: Cells from which the kNN graph is approximate (pynndescent, scanpy's default above 8,192 cells): below,
#: an exact search (sklearn, brute force) is quicker than pynndescent's numba compilation (20,000 cells:
#: 13 s against 172 s on a loaded 2-core machine).
EXACT_KNN_MAX = 50_000
#: Cells to label up to which the propagation is solved directly (a sparse LU factorisation, scipy's
#: ``splu``: 0.4 s for 19,000 cells and every label at once), above by conjugate gradients per label.
DIRECT_SOLVE_MAX = 200_000
#: Relative residual at which the label propagation's linear solve (conjugate gradients) stops...
SPREAD_TOLERANCE = 1e-8
#: ... or after this many iterations (a warning says so).
SPREAD_MAX_ITER = 2_000


def check_budget_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``budget_options`` completed with the defaults; a ``ValueError`` naming a bad key or value."""
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise ValueError(f"unknown budget option(s) {', '.join(map(repr, unknown))}; known: "
                         f"{', '.join(DEFAULT_OPTIONS)}")
    out = {**DEFAULT_OPTIONS, **options}
    if out["method"] not in METHODS:
        raise ValueError(f"budget option method must be one of {', '.join(METHODS)}, got {out['method']!r}")
    for key in ("n_components", "n_neighbors"):
        value = out[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"budget option {key} must be a positive integer, got {value!r}")
    for key, low, high in (("requery", 0, math.inf), ("min_agreement", 0, 1)):
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ValueError(f"budget option {key} must be a number in [{low}, {high}], got {value!r}")
    if out["use_rep"] is not None and not isinstance(out["use_rep"], str):
        raise ValueError(f"budget option use_rep must be an obsm key, got {out['use_rep']!r}")
    return out


# -------------------------------------------------------------------------------------------------
# Step 2: the embedding, the graph and the first round
# -------------------------------------------------------------------------------------------------


@attrs.define(eq=False)
class Budget:
    """A budgeted run's plan: what the budget allows, the embedding and graph of the cells, and the cells
    chosen per round (rows of the run's sentences).

    ``pool``: rows that can be sent (cells with a sentence); ``graph``: the kNN graph (symmetric
    connectivities) over ``pool`` (indices are positions in ``pool``); ``groups``: the group of each row
    with ``groupby``.
    """

    asked: int | float
    options: dict[str, Any]
    n_first: int
    n_second_max: int
    embedding_source: str
    pool: np.ndarray
    graph: sp.csr_matrix | None
    embedding: np.ndarray
    cell_obs: pd.DataFrame
    groups: np.ndarray | None
    group_names: list[str]
    first: np.ndarray
    seed: int
    notes: list[str] = attrs.field(factory=list)
    second: np.ndarray = attrs.field(factory=lambda: np.zeros(0, dtype=np.int64))
    seconds: float = 0.0

    @property
    def everything(self) -> bool:
        """Whether the budget covers every cell (nothing is spread)."""
        return self.n_first >= len(self.pool)

    def by_group(self, rows: np.ndarray) -> dict[str, list[int]]:
        """``rows`` by group name (as ``RunPlan.representatives``), every group named."""
        return {name: rows[self.groups[rows] == code].tolist() for code, name in enumerate(self.group_names)}

    def summary(self) -> dict[str, Any]:
        """What the plan will spend (``--dry-run``)."""
        return {
            "budget": self.asked,
            "budget_cells_first_round": int(len(self.first)),
            "budget_cells_second_round_at_most": int(self.n_second_max),
            "budget_embedding": self.embedding_source,
        }


def _counts(asked: int | float, n: int) -> int:
    """Cells of the first round: ``asked`` of ``n`` (a share is rounded down; at least one)."""
    wanted = int(math.floor(asked * n + 1e-9)) if isinstance(asked, float) else int(asked)
    return max(1, min(wanted, n))


def plan_budget(prepared: Any, sentences: Any, spec: Any, cell_obs: pd.DataFrame, groups: pd.Series | None,
                host: Any) -> Budget:
    """The budget of a run (step 2): the embedding of its cells, their kNN graph and the first round's
    cells (see the module docstring). Raises ``ValueError`` for an ``obsm`` key that is not there or an
    embedding of the wrong shape, before any model work."""
    started = time.perf_counter()
    p = spec.prompts
    options = check_budget_options(p.budget_options)
    pool = np.flatnonzero(~sentences.empty()).astype(np.int64)
    n_first = _counts(p.budget, len(pool)) if len(pool) else 0
    asked = n_first
    codes, names = None, []
    notes: list[str] = []
    if groups is not None:
        codes, names = pd.factorize(groups.astype(str), sort=True)
        names = [str(n) for n in names]
        n_groups = len(np.unique(codes[pool]))
        if n_first < n_groups:
            note = (f"budget={p.budget!r} allows {n_first} cells but there are {n_groups} groups with expressed "
                    f"genes: one cell per group is sent, and fewer re-queried")
            warnings.warn(note, UserWarning, stacklevel=4)
            notes.append(note)
            n_first = n_groups
    everything = n_first >= len(pool)
    # Re-queries at most ``requery`` x the cells the budget asked for, counting any cell the groups forced
    # into the first round: the run never sends more than (1 + requery) x budget in all.
    in_all = int(math.floor((1 + options["requery"]) * asked + 1e-9))
    n_second_max = 0 if everything else max(0, min(in_all - n_first, len(pool) - n_first))
    graph = None
    if everything:  # nothing to choose or spread: no embedding
        embedding, source = np.zeros((len(sentences), 0), dtype=np.float32), "none (every cell is sent)"
    else:
        embedding, source = cells_embedding(prepared, spec, options, host)
        graph = knn_graph(embedding[pool], options["n_neighbors"], p.seed)
    budget = Budget(p.budget, options, n_first, n_second_max, source, pool, graph, embedding, cell_obs,
                    codes, names, np.zeros(0, dtype=np.int64), p.seed, notes)
    budget.first = pool if budget.everything else choose_cells(budget, pool, n_first)
    budget.seconds = time.perf_counter() - started
    log.info("budget: %d of %d cells in the first round (at most %d more in the second), chosen on %s in %.2f s",
             len(budget.first), len(pool), n_second_max, source, budget.seconds)
    return budget


#: The keywords :func:`cells_embedding` gives ``Modality.embedding`` itself.
EMBEDDING_KEYWORDS = frozenset({"features", "layer", "use_raw", "n_components", "seed", "chunk_size"})


def cells_embedding(prepared: Any, spec: Any, options: Mapping[str, Any], host: Any) -> tuple[np.ndarray, str]:
    """The embedding a budget is chosen on: ``obsm[use_rep]`` of the annotated data, else each
    modality's own (``Modality.embedding``), else a truncated SVD of ``log1p`` of its FeatureMatrix;
    several modalities' embeddings side by side, each scaled to unit total variance."""
    d = spec.data
    rows = prepared.rows
    if options["use_rep"] is not None:
        key = options["use_rep"]
        holder = prepared.adata
        if key not in holder.obsm:
            raise ValueError(f"budget option use_rep={key!r} is not in obsm (keys: "
                             f"{', '.join(map(repr, holder.obsm.keys())) or 'none'}); leave it out to let the "
                             "modality compute an embedding")
        embedding = np.asarray(holder.obsm[key], dtype=np.float32)[rows]
        if embedding.ndim != 2 or not np.isfinite(embedding).all():
            raise ValueError(f"obsm[{key!r}] must be a finite cells x components array")
        return embedding, f"obsm[{key!r}]"
    blocks, notes = [], []
    # The run's own keywords win over modality options of the same name (the atac option features="genes"
    # names the kind of matrix, the keyword the FeatureMatrix); the modality's n_components is the default.
    given = dict(d.modality_options)
    n_components = options["n_components"] if options["n_components"] is not None else given.get("n_components")
    extra = {k: v for k, v in given.items() if k not in EMBEDDING_KEYWORDS}
    for label, name, features in prepared.parts:
        component = host.registry.get("modality", name)
        adata = prepared.adata if len(prepared.parts) == 1 else _modality_data(prepared.adata, component, name, d)
        made = component.embedding(adata, features=features, layer=d.layer, use_raw=d.use_raw,
                                   n_components=n_components, seed=spec.prompts.seed,
                                   chunk_size=d.chunk_size, **extra)
        if made is None:
            made = svd_embedding(features, options["n_components"], spec.prompts.seed, d.chunk_size)
        block, note = made
        block = np.asarray(block, dtype=np.float32)
        if len(prepared.parts) > 1:  # the modality's rows of the cells present in every modality
            block = block[adata.obs_names.get_indexer(prepared.adata.obs_names[rows])]
        if block.shape[0] != len(rows):
            raise RuntimeError(f"modality {name!r} gave an embedding of {block.shape[0]} rows for {len(rows)} cells")
        if len(prepared.parts) > 1:
            block = block / max(float(np.sqrt((block.var(axis=0)).sum())), 1e-12)
        blocks.append(block)
        notes.append(note if len(prepared.parts) == 1 else f"{label}: {note}")
    return np.hstack(blocks), "; ".join(notes)


def _modality_data(mdata: Any, component: Any, name: str, d: Any) -> Any:
    from .data import select_modality_data

    keys = d.mod.split("+") if d.mod else [None] * len(d.modality.split("+"))
    key = keys[d.modality.split("+").index(name)]
    return select_modality_data(mdata, component, key)[0]


def svd_embedding(features: Any, n_components: int | None, seed: int, chunk_size: int) -> tuple[np.ndarray, str]:
    """A truncated SVD (sklearn, randomised) of ``log1p`` of a FeatureMatrix: the embedding of a modality
    that makes none of its own. Sparse throughout."""
    from sklearn.decomposition import TruncatedSVD

    X = sp.vstack([chunk for _, _, chunk in features.iter_chunks(chunk_size)], format="csr").astype(np.float32)
    X.data = np.log1p(np.maximum(X.data, 0))
    n = max(1, min(n_components or 50, min(X.shape) - 1))
    if min(X.shape) < 2:
        return np.zeros((X.shape[0], 1), dtype=np.float32), "no embedding: too few cells or features"
    embedding = TruncatedSVD(n, random_state=seed).fit_transform(X).astype(np.float32)
    return embedding, f"truncated SVD of log1p({features.source}) ({n} components)"


def knn_graph(embedding: np.ndarray, n_neighbors: int, seed: int) -> sp.csr_matrix:
    """The kNN graph of ``embedding`` as scanpy makes it for diffusion (``sc.pp.neighbors(method="gauss")``:
    a Gaussian kernel whose width adapts to each cell's distance to its neighbours, symmetric, Haghverdi
    et al. 2016, as scanpy's diffusion pseudotime uses): label propagation is a diffusion over it. (scanpy's
    default UMAP connectivities scored the same or up to 0.04 lower graded on pbmc68k and pancreas,
    ``benchmarks/budget.py``, and cost ~19 s of numba compilation in every process.) Built on a new AnnData."""
    import anndata as ad
    import scanpy as sc

    n = embedding.shape[0]
    if n < 3:
        return sp.csr_matrix((n, n), dtype=np.float64)
    k = int(min(n_neighbors, n - 1))
    transformer: Any = "sklearn"  # exact, as scanpy does for small data
    if n >= EXACT_KNN_MAX:
        from pynndescent import PyNNDescentTransformer

        # scanpy's own choice for large data (UMAP's settings), handed over as a sparse *matrix*:
        # pynndescent returns a csr_array, which scanpy 1.11 cannot read with scipy >= 1.13 (getnnz).
        transformer = _SparseMatrixKnn(PyNNDescentTransformer(
            n_neighbors=k, metric="euclidean", random_state=seed, n_trees=min(64, 5 + round(n ** 0.5 / 20.0)),
            n_iters=max(5, round(math.log2(n)))))
    tmp = ad.AnnData(obs=pd.DataFrame(index=pd.RangeIndex(n).astype(str)), obsm={"X_budget": embedding})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scanpy's notes on small data and on the default transformer
        sc.pp.neighbors(tmp, n_neighbors=k, use_rep="X_budget", method="gauss", transformer=transformer,
                        random_state=seed)
    weights = sp.csr_matrix(tmp.obsp["connectivities"], dtype=np.float64)
    # Symmetric for the propagation's solver; scanpy's gauss kernel over pynndescent's graph is not quite.
    weights = sp.csr_matrix(0.5 * (weights + weights.T))
    weights.setdiag(0)
    weights.eliminate_zeros()
    return weights


class _SparseMatrixKnn:
    """A kNN transformer (sklearn's ``fit``/``transform`` API) whose distance graphs are ``csr_matrix``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return self.inner.get_params(deep)

    def fit(self, X: Any, y: Any = None) -> _SparseMatrixKnn:
        self.inner.fit(X)
        return self

    def transform(self, X: Any) -> sp.csr_matrix:
        return sp.csr_matrix(self.inner.transform(X))

    def fit_transform(self, X: Any, y: Any = None) -> sp.csr_matrix:
        return sp.csr_matrix(self.inner.fit_transform(X))


def choose_cells(budget: Budget, candidates: np.ndarray, n: int) -> np.ndarray:
    """``n`` of the rows ``candidates`` (sorted), by the budget's method; with groups, ``n`` is shared
    among the groups of the candidates in proportion to their size (at least one each while ``n``
    allows) and each group's share is chosen within it."""
    candidates = np.asarray(candidates, dtype=np.int64)
    if n >= len(candidates):
        return np.sort(candidates)
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if budget.groups is None:
        return _choose(budget, candidates, n)
    codes = budget.groups[candidates]
    present, sizes = np.unique(codes, return_counts=True)
    quota = _allocate(sizes, n)
    chosen = [_choose(budget, candidates[codes == g], int(q)) for g, q in zip(present, quota) if q > 0]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def _allocate(sizes: np.ndarray, n: int) -> np.ndarray:
    """``n`` split over groups of ``sizes``: one each while ``n`` allows (largest groups first), the rest
    in proportion to size by largest remainder, never more than a group holds."""
    sizes = np.asarray(sizes, dtype=np.int64)
    quota = np.zeros(len(sizes), dtype=np.int64)
    order = np.argsort(-sizes, kind="stable")
    base = min(n, len(sizes))
    quota[order[:base]] = 1
    left = n - base
    while left > 0:
        room = sizes - quota
        if room.sum() == 0:
            break
        share = left * room / room.sum()
        add = np.minimum(np.floor(share).astype(np.int64), room)
        if add.sum() == 0:  # the remainders: the largest first
            add = np.zeros_like(quota)
            add[np.argsort(-(share - np.floor(share)) - (room > 0), kind="stable")[:left]] = 1
            add = np.minimum(add, room)
        quota += add
        left = n - int(quota.sum())
    return quota


def _choose(budget: Budget, rows: np.ndarray, n: int) -> np.ndarray:
    if n >= len(rows):
        return np.sort(rows)
    if budget.options["method"] == "random":
        return np.sort(np.random.default_rng(budget.seed).choice(rows, n, replace=False))
    return np.sort(_medoids(budget.embedding, rows, n, budget.seed))


def _medoids(embedding: np.ndarray, rows: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The row nearest each centre of a k-means of ``embedding[rows]`` into ``n`` clusters (sklearn); in
    two levels above :data:`FLAT_KMEANS_MAX` centres (``sqrt(n)`` coarse clusters, then each coarse
    cluster's share of ``n`` within it)."""
    if n >= len(rows):
        return rows
    X = embedding[rows]
    if n > FLAT_KMEANS_MAX:
        coarse = _kmeans(X, int(math.ceil(math.sqrt(n))), seed)
        present, sizes = np.unique(coarse, return_counts=True)
        quota = _allocate(sizes, n)
        parts = [_medoids(embedding, rows[coarse == c], int(q), seed) for c, q in zip(present, quota) if q > 0]
        return np.concatenate(parts)
    labels = _kmeans(X, n, seed)
    centres = np.zeros((labels.max() + 1, X.shape[1]), dtype=np.float64)
    np.add.at(centres, labels, X)
    centres /= np.maximum(np.bincount(labels), 1)[:, None]
    distance = ((X - centres[labels]) ** 2).sum(axis=1)
    order = np.lexsort((distance, labels))
    first = order[np.r_[True, labels[order][1:] != labels[order][:-1]]]
    return rows[first]


def _kmeans(X: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Cluster labels of a seeded k-means, the best of 3 starts (``KMeans``; ``MiniBatchKMeans`` above 20,000
    rows). At most :data:`FLAT_KMEANS_MAX` clusters come here, so the restarts cost little."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    n = max(1, min(n, len(X)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer distinct points than clusters: some clusters stay empty
        if len(X) > 20_000:
            model = MiniBatchKMeans(n, random_state=seed, n_init=3, batch_size=max(4096, 3 * n))
        else:
            model = KMeans(n, random_state=seed, n_init=3)
        return model.fit_predict(X)


# -------------------------------------------------------------------------------------------------
# Step 3 and after: the rounds, the spread, the results
# -------------------------------------------------------------------------------------------------


@attrs.frozen(eq=False)
class Spread:
    """Labels spread over the graph to the rows of ``Budget.pool``: the label (``None`` where no answer
    reaches), the agreement, the mean confidence of the answers carrying the label (NaN when the model
    gave none) and the confidence (agreement x that mean; the agreement alone without one)."""

    labels: np.ndarray
    agreement: np.ndarray
    model_confidence: np.ndarray
    confidence: np.ndarray
    n_answers: int


def spread(graph: sp.spmatrix, answered: np.ndarray, labels: np.ndarray, confidences: np.ndarray) -> Spread:
    """Label propagation over the symmetric weighted ``graph`` from the ``answered`` positions, clamped to
    their ``labels``, each answer weighted by its confidence (1 where the model gave none).

    The harmonic solution (Zhu, Ghahramani and Lafferty 2003): for the cells not answered, ``F`` solves
    ``(D - W)_UU F = W_UA Y`` (``D`` the degrees, ``A`` the answered cells, ``Y`` their weighted label
    indicators), so ``F[i, label]`` is the chance that a random walk from ``i`` first reaches an answer
    with that label, times that answer's weight. The system is symmetric positive definite on the cells
    connected to an answer: solved by a sparse LU factorisation (``scipy.sparse.linalg.splu``) for every
    label at once, above :data:`DIRECT_SOLVE_MAX` cells by conjugate gradients per label
    (``scipy.sparse.linalg.cg``, Jacobi-preconditioned). Cells in a connected component
    (``scipy.sparse.csgraph``) without any answer are not reached. See the module docstring for the
    agreement and the confidence."""
    from scipy.sparse.csgraph import connected_components

    graph = sp.csr_matrix(graph, dtype=np.float64)
    n = graph.shape[0]
    answered = np.asarray(answered, dtype=np.int64)
    names, codes = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    confidences = np.asarray(confidences, dtype=np.float64)
    known = np.isfinite(confidences)
    weight = np.where(known, np.clip(np.nan_to_num(confidences), 1e-6, 1.0), 1.0)
    m = len(names)
    # Per answer and label: its weight; its weight x its confidence; its weight when it has a confidence.
    columns = [weight, np.where(known, weight * confidences, 0.0)]
    mixed = bool(known.any() and not known.all())
    if mixed:
        columns.append(np.where(known, weight, 0.0))
    Y = sp.hstack([sp.csr_matrix((c, (np.arange(len(answered)), codes)), shape=(len(answered), m))
                   for c in columns], format="csc")
    values = np.zeros((n, Y.shape[1]))
    values[answered] = Y.toarray()

    _, component = connected_components(graph, directed=False)
    reached = np.isin(component, component[answered])
    free = np.setdiff1d(np.flatnonzero(reached), answered)
    if len(free):
        degree = np.asarray(graph.sum(axis=1)).ravel()
        to_free = graph[free]
        system = sp.csr_matrix(sp.diags(degree[free]) - to_free[:, free])
        rhs = (to_free[:, answered] @ Y).toarray()
        if len(free) <= DIRECT_SOLVE_MAX:
            values[free] = splu(system.tocsc()).solve(rhs)
        else:
            preconditioner = sp.diags(1.0 / degree[free])
            for j in range(rhs.shape[1]):
                if not rhs[:, j].any():
                    continue
                values[free, j], info = cg(system, rhs[:, j], rtol=SPREAD_TOLERANCE, atol=0.0, M=preconditioner,
                                           maxiter=SPREAD_MAX_ITER)
                if info > 0:
                    log.warning("budget: label propagation did not converge in %d iterations (label %r)",
                                SPREAD_MAX_ITER, names[j % m])
    F = np.maximum(values[:, :m], 0.0)
    C = np.maximum(values[:, m:2 * m], 0.0)
    K = np.maximum(values[:, 2 * m:], 0.0) if mixed else (F if known.all() else np.zeros_like(F))
    total = F.sum(axis=1)
    win = F.argmax(axis=1)
    r = np.arange(n)
    reached = reached & (total > 0)
    agreement = np.where(reached, F[r, win] / np.maximum(total, 1e-300), 0.0)
    mean_conf = np.where(K[r, win] > 0, C[r, win] / np.maximum(K[r, win], 1e-300), np.nan)
    confidence = np.where(np.isfinite(mean_conf), agreement * mean_conf, agreement)
    out = np.where(reached, names[win], None).astype(object)
    return Spread(out, agreement, mean_conf, np.where(reached, confidence, np.nan), len(answered))


@attrs.frozen(eq=False)
class BudgetResult:
    """A budgeted run's outcome: the merged execution of its rounds, the model's decoded answers, the
    results frame (with ``_source``), its summary and ``uns[key]["budget"]``."""

    execution: Any
    by_unit: dict[str, Annotation]
    frame: pd.DataFrame
    summary: dict[str, Any]
    record: dict[str, Any]


def run_budgeted(plan: Any, model: Any, run_id: str, host: Any) -> BudgetResult:
    """Steps 3 and 4 of a budgeted run: the first round, the spread, the second round, the final spread
    and the per-cell results (see the module docstring). ``plan.unit_rows``, ``plan.prompts`` (and
    ``plan.representatives`` with ``groupby``) end as every cell sent and every prompt of both rounds."""
    from .execute import decode_all, execute
    from .results import results_frame
    from .units import unit_label_scores

    budget: Budget = plan.budget
    key = plan.spec.output.key_added
    cell_ids = plan.sentences.cell_ids.astype(str)
    first = execute(plan, model, run_id, host=host)
    prompts, generations = list(plan.prompts), list(first.generations)
    by_unit = decode_all(prompts, generations, host)
    executions = [first]
    second_note = ""
    if budget.everything:
        second_note = "every cell was sent"
    elif first.failed:
        second_note = (f"not run: {first.failed} first-round prompts got no answer; the re-run that answers them "
                       "runs it")
    elif budget.n_second_max == 0:
        second_note = "not asked (requery=0)"
    else:
        candidates = _disagreeing(plan, budget, by_unit, cell_ids, unit_label_scores(prompts, generations))
        budget.second = choose_cells(budget, candidates, min(budget.n_second_max, len(candidates)))
        second_note = f"{len(candidates)} cells disagreed"
        if len(budget.second):
            round_two = _second_round_plan(plan, budget)
            second = execute(round_two, model, run_id, host=host, survey=prompts)
            by_unit.update(decode_all(round_two.prompts, second.generations, host))
            prompts += round_two.prompts
            generations += second.generations
            executions.append(second)
    sent = np.union1d(budget.first, budget.second)
    plan.prompts = prompts
    plan.unit_rows = sent
    scores = unit_label_scores(prompts, generations)
    source = np.full(len(cell_ids), SOURCE_PROPAGATED, dtype=object)
    source[sent] = SOURCE_MODEL
    n_unreached = 0
    if plan.groups is not None:
        plan.representatives = _representatives(budget, sent)
        frame, summary = results_frame(plan, by_unit, key, scores)
        members = np.setdiff1d(np.arange(len(cell_ids)), sent)
        note = frame[f"{key}_note"].to_numpy(dtype=object).copy()
        note[members] = [f"propagated: {n}" if n else "propagated from its group's representatives"
                         for n in note[members]]
        frame[f"{key}_note"] = note
    else:
        everyone = dict(by_unit)
        if not budget.everything:
            result = _spread_answers(budget, by_unit, cell_ids, sent)
            everyone.update(result[0])
            n_unreached = result[1]
        view = attrs.evolve(plan, unit_rows=budget.pool)
        frame, summary = results_frame(view, everyone, key, scores)
    if plan.groups is None:  # a cell with no expressed gene is neither sent nor given a label
        source[np.setdiff1d(np.arange(len(cell_ids)), budget.pool)] = None
    frame[f"{key}_source"] = pd.Categorical(source, categories=[SOURCE_MODEL, SOURCE_PROPAGATED])
    execution = _merged(executions)
    record = {
        "asked": budget.asked,
        "n_cells": int(len(budget.pool)),
        "n_sent": int(len(sent)),
        "n_first_round": int(len(budget.first)),
        "n_requeried": int(len(budget.second)),
        "share_sent": round(len(sent) / max(len(budget.pool), 1), 6),
        "second_round": second_note,
        "n_propagated": int(len(budget.pool) - len(sent)),
        "n_unreached": n_unreached,
        "embedding": budget.embedding_source,
        "seconds_choosing": round(budget.seconds, 3),
        "notes": list(budget.notes),
        **{k: v for k, v in budget.options.items() if v is not None},
    }
    summary.update({"n_cells_sent": record["n_sent"], "n_requeried": record["n_requeried"]})
    log.info("budget: %d of %d cells sent (%d in the second round), %d propagated", len(sent), len(budget.pool),
             len(budget.second), record["n_propagated"])
    return BudgetResult(execution, by_unit, frame, summary, record)


def _answers(by_unit: Mapping[str, Annotation], cell_ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, list]:
    """The rows of ``rows`` whose answer is a label, and those answers."""
    keep, anns = [], []
    for row in rows.tolist():
        ann = by_unit.get(str(cell_ids[row]))
        if ann is not None and ann.status == STATUS_OK and ann.label is not None:
            keep.append(row)
            anns.append(ann)
    return np.asarray(keep, dtype=np.int64), anns


def _spread_from(budget: Budget, by_unit: Mapping[str, Annotation], cell_ids: np.ndarray,
                 sent: np.ndarray) -> tuple[Spread | None, np.ndarray]:
    rows, anns = _answers(by_unit, cell_ids, sent)
    if not len(rows):
        return None, rows
    position = np.searchsorted(budget.pool, rows)
    confidences = np.array([np.nan if a.confidence is None else a.confidence for a in anns], dtype=np.float64)
    return spread(budget.graph, position, np.array([a.label for a in anns], dtype=object), confidences), rows


def _disagreeing(plan: Any, budget: Budget, by_unit: Mapping[str, Annotation], cell_ids: np.ndarray,
                 scores: Mapping[str, Any]) -> np.ndarray:
    """Rows not sent yet where the first round's answers disagree: cells whose spread label has less than
    ``min_agreement`` of their weight (or that no answer reaches); with groups, the unsent cells of the
    groups whose representatives' answers disagree (their most common answer has less than
    ``min_agreement`` of them, or none is resolved)."""
    unsent = np.setdiff1d(budget.pool, budget.first)
    threshold = budget.options["min_agreement"]
    if budget.groups is not None:
        from .units import majority_vote

        weak = []
        for g in np.unique(budget.groups[budget.pool]):
            reps = budget.first[budget.groups[budget.first] == g]
            anns = [by_unit.get(str(cell_ids[r])) for r in reps]
            ok = [a for a in anns if a is not None and a.status == STATUS_OK]
            label, share, _ = majority_vote([a.label for a in ok], [np.nan] * len(ok))
            if label is None or share < threshold:
                weak.append(g)
        return unsent[np.isin(budget.groups[unsent], weak)]
    result, _ = _spread_from(budget, by_unit, cell_ids, budget.first)
    if result is None:
        return unsent
    position = np.searchsorted(budget.pool, unsent)
    return unsent[result.agreement[position] < threshold]


def _second_round_plan(plan: Any, budget: Budget) -> Any:
    """The plan of the second round: its cells, their obs, its own checkpoint folder."""
    spec = plan.spec
    if spec.output.checkpoint is not None:
        spec = spec.replace(checkpoint=str(Path(spec.output.checkpoint) / "requery"))
    args = {**plan.prompt_args, "obs": budget.cell_obs.iloc[budget.second]}
    return attrs.evolve(plan, spec=spec, unit_rows=budget.second, prompt_args=args, prompts=[])


def _representatives(budget: Budget, sent: np.ndarray) -> dict[str, list[int]]:
    return budget.by_group(sent)


def _spread_answers(budget: Budget, by_unit: Mapping[str, Annotation], cell_ids: np.ndarray,
                    sent: np.ndarray) -> tuple[dict[str, Annotation], int]:
    """Annotations of the cells not sent, from the answers spread over the graph."""
    result, rows = _spread_from(budget, by_unit, cell_ids, sent)
    unsent = np.setdiff1d(budget.pool, sent)
    out: dict[str, Annotation] = {}
    if result is None:
        for row in unsent.tolist():
            out[str(cell_ids[row])] = Annotation.unresolved(
                str(cell_ids[row]), note="propagated: no cell the model answered to spread a label from")
        return out, len(unsent)
    position = np.searchsorted(budget.pool, unsent)
    labels = result.labels[position]
    agreement, mean_conf, confidence = (result.agreement[position], result.model_confidence[position],
                                        result.confidence[position])
    n_unreached = 0
    for row, label, a, m, c in zip(unsent.tolist(), labels, agreement, mean_conf, confidence):
        unit = str(cell_ids[row])
        if label is None:
            n_unreached += 1
            out[unit] = Annotation.unresolved(unit, note="propagated: no cell the model answered is connected to "
                                                          "this one in the kNN graph")
            continue
        of = "" if not np.isfinite(m) else f", their confidence {m:.2f}"
        out[unit] = Annotation(unit, str(label), STATUS_OK, float(c), note=(
            f"propagated over the kNN graph from {len(rows)} cells the model answered (agreement {a:.2f}{of})"))
    return out, n_unreached


def _merged(executions: list[Any]) -> Any:
    """One execution of every round: generations in order, resumed batches and seconds added, the first
    round's observability, the first reason to stop."""
    if len(executions) == 1:
        return executions[0]
    first = executions[0]
    return attrs.evolve(
        first,
        generations=[g for e in executions for g in e.generations],
        resumed=sum(e.resumed for e in executions),
        seconds=sum(e.seconds for e in executions),
        stopped=next((e.stopped for e in executions if e.stopped), None),
    )
