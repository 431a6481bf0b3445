"""The built-in sentence strategies: ranked gene lists from a cells x genes FeatureMatrix.

``ranked-hvg``
    CellReasoner's rule: the genes of a fixed global ranked list that the cell expresses, in list order.
``top-expressed``
    Cell-o1 / Cell2Sentence's rule: the cell's own highest values, in descending order.
``data-hvg``
    ``ranked-hvg`` with a list learned from the user's data by ``scanpy.pp.highly_variable_genes``.
``auto``
    ``ranked-hvg`` when the data carry enough of CellReasoner's genes, else ``top-expressed``.

Every strategy reads the matrix chunk by chunk (``FeatureMatrix.iter_chunks``) and ranks each chunk with
the vectorised functions of :mod:`cellscribe.core.domain.ranking`; nothing here loops over cells.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellscribe.core.domain.ranking import rank_by_order, rank_by_value
from cellscribe.core.types import CellSentences, FeatureMatrix

log = logging.getLogger(__name__)

#: Name recorded in the parameters when the list shipped with cellscribe is used.
CELLREASONER_LIST = "cellreasoner"
_LIST_RESOURCE = "cellreasoner_ranked_hvg.list"

DEFAULT_CHUNK = 10_000
DATA_HVG_TOP_GENES = 2000


# -------------------------------------------------------------------------------------------------
# Ranked gene lists
# -------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def cellreasoner_genes() -> np.ndarray:
    """CellReasoner's 10,000 genes in global HVG rank order (read once, then cached).

    The returned object array is shared by every caller: do not modify it.
    """
    text = importlib.resources.files(__package__).joinpath("data", _LIST_RESOURCE).read_text("utf-8")
    genes = _as_gene_list(text.splitlines(), _LIST_RESOURCE)
    genes.flags.writeable = False
    return genes


def _as_gene_list(genes: Iterable[Any], origin: str) -> np.ndarray:
    """Symbols stripped of surrounding white space, blank entries dropped, duplicates refused."""
    out = np.array([s for s in (str(g).strip() for g in genes) if s], dtype=object)
    if len(out) == 0:
        raise ValueError(f"the ranked gene list {origin} is empty; give a file with one symbol per line")
    index = pd.Index(out)
    if not index.is_unique:
        dups = index[index.duplicated()].unique()[:5].tolist()
        raise ValueError(
            f"the ranked gene list {origin} repeats symbols ({', '.join(map(str, dups))}); "
            "keep each gene once, at its best rank"
        )
    return out


def resolve_gene_list(gene_list: str | os.PathLike | Sequence[str] | None) -> tuple[np.ndarray, str]:
    """The ranked list to use and how to name it in the parameters.

    :param gene_list: ``None`` for CellReasoner's list; a path to a text file with one symbol per line;
        or a sequence of symbols, best first.
    :return: ``(genes, origin)`` where ``origin`` is ``"cellreasoner"``, the path, or ``"given"``.
    """
    if gene_list is None:
        return cellreasoner_genes(), CELLREASONER_LIST
    if isinstance(gene_list, (str, os.PathLike)):
        path = os.fspath(gene_list)
        if not os.path.isfile(path):
            raise ValueError(
                f"gene_list={path!r} is not a file; pass a text file with one gene symbol per line, "
                "or a list of symbols"
            )
        with open(path, encoding="utf-8") as fh:
            return _as_gene_list(fh.read().splitlines(), repr(path)), path
    return _as_gene_list(gene_list, "given as gene_list"), "given"


def list_positions(feature_names: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """For each feature, its position in ``genes`` or -1 (the ``position`` of :func:`rank_by_order`)."""
    return pd.Index(genes).get_indexer(pd.Index(feature_names)).astype(np.int64, copy=False)


def _check_n_genes(n_genes: int | None, default: int) -> int:
    if n_genes is None:
        return default
    if isinstance(n_genes, bool) or not isinstance(n_genes, (int, np.integer)) or n_genes < 1:
        raise ValueError(
            f"n_genes must be a positive integer (or None for the default {default}), got {n_genes!r}"
        )
    return int(n_genes)


def _by_list(
    features: FeatureMatrix,
    genes: np.ndarray,
    *,
    n_genes: int,
    chunk_size: int,
    strategy: str,
    params: Mapping[str, Any],
) -> Iterator[CellSentences]:
    """The chunks of the CellReasoner rule over ``genes`` (shared by ranked-hvg and data-hvg).

    Set-up (matching the list to the features, warnings) happens now; ranking as chunks are drawn.
    """
    position = list_positions(features.feature_names, genes)
    n_present = int(np.count_nonzero(position >= 0))
    params = {**params, "n_genes": n_genes, "n_list": len(genes), "n_present": n_present}
    log.info(
        "%s: %d of the %d listed genes are among the %d features",
        strategy, n_present, len(genes), features.n_features,
    )
    if n_present == 0:
        warnings.warn(
            f"sentence strategy {strategy!r}: none of the {len(genes)} genes of its ranked list is among "
            "the features, so every sentence is empty. Check that the feature names are gene symbols "
            "(not Ensembl ids), or choose sentence='top-expressed'.",
            UserWarning,
            stacklevel=3,
        )

    def chunks() -> Iterator[CellSentences]:
        for start, stop, chunk in features.iter_chunks(chunk_size):
            indptr, ranked = rank_by_order(chunk, position, len(genes), n_genes)
            yield CellSentences(
                cell_ids=features.cell_ids[start:stop],
                vocabulary=genes,
                indptr=indptr,
                indices=ranked,
                strategy=strategy,
                params=params,
            )

    return chunks()


# -------------------------------------------------------------------------------------------------
# ranked-hvg
# -------------------------------------------------------------------------------------------------


class RankedHVG:
    """CellReasoner's sentences: a global ranked gene list filtered by what each cell expresses.

    For each cell, the genes of the list that are among ``features.feature_names`` **and** non-zero in
    the cell are kept in the order of the list (not by the cell's own values; values only matter
    through zero / non-zero), and the first ``n_genes`` (CellReasoner's ``seq_length``, 1000) form the
    sentence. This is byte for byte the ``input`` field CellReasoner's own scripts write.

    ``vocabulary`` of the yielded chunks is the list itself; ``params`` are ``n_genes``, ``gene_list``
    (``"cellreasoner"``, a path, or ``"given"``), ``n_list`` and ``n_present`` (listed genes found among
    the features).

    Options: ``gene_list=`` a path to a file with one symbol per line or a sequence of symbols, best
    first, to use another global ranked list.
    """

    name = "ranked-hvg"
    description = "CellReasoner: the genes of a fixed global HVG ranking that the cell expresses, in its order"
    default_n_genes = 1000

    def build(
        self,
        features: FeatureMatrix,
        *,
        n_genes: int | None = None,
        state: MutableMapping[str, Any] | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        strategies: Mapping[str, Any] | None = None,
        gene_list: str | os.PathLike | Sequence[str] | None = None,
        **options: Any,
    ) -> Iterator[CellSentences]:
        n_genes = _check_n_genes(n_genes, self.default_n_genes)
        genes, origin = resolve_gene_list(gene_list)
        return _by_list(
            features, genes, n_genes=n_genes, chunk_size=chunk_size, strategy=self.name,
            params={"gene_list": origin},
        )


# -------------------------------------------------------------------------------------------------
# top-expressed
# -------------------------------------------------------------------------------------------------


def exclusion_mask(feature_names: np.ndarray, exclude: Iterable[str] | Callable[[str], bool] | None):
    """Boolean mask of the features never to rank, or ``None`` when nothing is excluded.

    :param exclude: symbols (a single string counts as one symbol) or a predicate on a symbol.
    """
    if exclude is None:
        return None
    if callable(exclude):
        mask = np.fromiter(
            (bool(exclude(str(g))) for g in feature_names), dtype=bool, count=len(feature_names)
        )
    else:
        symbols = [exclude] if isinstance(exclude, str) else [str(g) for g in exclude]
        mask = pd.Index(feature_names).isin(symbols)
    return mask if mask.any() else None


def _row_counts(mask: np.ndarray, indptr: np.ndarray, nonempty: np.ndarray) -> np.ndarray:
    """Number of ``True`` entries of ``mask`` (one per stored value) in every row of a CSR."""
    counts = np.zeros(len(indptr) - 1, dtype=np.int64)
    if len(nonempty):
        counts[nonempty] = np.add.reduceat(mask, indptr[nonempty], dtype=np.int64)
    return counts


def candidates_for_top(chunk: sp.csr_matrix, n_genes: int, exclude: np.ndarray | None) -> sp.csr_matrix:
    """The entries of ``chunk`` that can be among a row's ``n_genes`` highest positive values.

    Sorting every stored value is what makes ranking by value slow (a cell has ~1,000 non-zeros, the
    sentence 50). For each row this finds a threshold ``t`` with at least ``n_genes`` kept values
    ``>= t`` -- the largest of a few quantiles of the chunk's values that qualifies -- and drops the
    values below it. Those can never rank in the top ``n_genes`` (at least ``n_genes`` values beat
    them), and every value equal to ``t`` is kept, so ties are still broken the same way: ranking the
    result with :func:`rank_by_value` gives exactly the ranking of the full chunk. Excluded columns and
    non-positive values are dropped too.
    """
    data, indptr = chunk.data, chunk.indptr
    keep = data > 0
    if exclude is not None:
        keep &= ~exclude[chunk.indices]
    nonempty = np.flatnonzero(np.diff(indptr))
    total = _row_counts(keep, indptr, nonempty)
    if np.any(total > n_genes):
        values = data[keep]
        # The quantiles only decide how much is pruned, never the result: a sample is enough.
        sample = values[:: max(1, len(values) // 65_536)].astype(np.float64)
        threshold = np.zeros(chunk.shape[0], dtype=np.float64)
        for t in np.unique(np.quantile(sample, (0.5, 0.75, 0.9, 0.95, 0.98))):
            enough = _row_counts(keep & (data >= t), indptr, nonempty) >= n_genes
            threshold[enough] = t  # candidates ascend, so the last qualifying one is the tightest
        keep &= data >= np.repeat(threshold, np.diff(indptr))
    kept = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
    return sp.csr_matrix((data[keep], chunk.indices[keep], kept[indptr]), shape=chunk.shape)


class TopExpressed:
    """Cell-o1 / Cell2Sentence's sentences: each cell's ``n_genes`` highest values, highest first.

    Only positive values count as expressed. Ties are broken by feature order (the gene that comes
    first in ``var`` wins), so the result does not depend on how the matrix stores its values; this is
    :func:`cellscribe.core.domain.ranking.rank_by_value`'s rule. ``vocabulary`` is
    ``features.feature_names``; ``params`` are ``n_genes`` and ``n_excluded``.

    Options: ``exclude=`` symbols (an iterable) or a predicate ``callable(symbol) -> bool`` naming
    genes never to rank (ribosomal or mitochondrial genes, for example); the next gene moves up.
    """

    name = "top-expressed"
    description = "Cell-o1 / Cell2Sentence: the cell's most highly expressed genes, in descending order"
    default_n_genes = 50

    def build(
        self,
        features: FeatureMatrix,
        *,
        n_genes: int | None = None,
        state: MutableMapping[str, Any] | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        strategies: Mapping[str, Any] | None = None,
        exclude: Iterable[str] | Callable[[str], bool] | None = None,
        **options: Any,
    ) -> Iterator[CellSentences]:
        n_genes = _check_n_genes(n_genes, self.default_n_genes)
        mask = exclusion_mask(features.feature_names, exclude)
        params = {"n_genes": n_genes, "n_excluded": 0 if mask is None else int(mask.sum())}
        vocabulary = features.feature_names

        def chunks() -> Iterator[CellSentences]:
            for start, stop, chunk in features.iter_chunks(chunk_size):
                indptr, ranked = rank_by_value(candidates_for_top(chunk, n_genes, mask), n_genes)
                yield CellSentences(
                    cell_ids=features.cell_ids[start:stop],
                    vocabulary=vocabulary,
                    indptr=indptr,
                    indices=ranked,
                    strategy=self.name,
                    params=params,
                )

        return chunks()


# -------------------------------------------------------------------------------------------------
# data-hvg
# -------------------------------------------------------------------------------------------------


def learn_hvg_list(
    features: FeatureMatrix, *, n_top_genes: int = DATA_HVG_TOP_GENES, flavor: str | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> dict[str, Any]:
    """Rank the features by variability with ``scanpy.pp.highly_variable_genes``.

    ``flavor`` ``None`` picks ``"seurat_v3"`` (Seurat v3's variance-stabilised rank, needs
    scikit-misc) for count data (``features.value_kind == "counts"``) and ``"seurat"`` (normalised
    dispersion, for log-normalised values) otherwise. The matrix is read chunk by chunk into one
    in-memory CSR matrix (sparse; never densified), which HVG selection needs as a whole.

    :return: ``{"genes": [...], "flavor": ..., "n_top_genes": ...}``: at most ``n_top_genes`` symbols,
        most variable first (by ``highly_variable_rank`` for seurat_v3, by ``dispersions_norm``
        for seurat; ties in feature order).
    """
    import anndata as ad
    import scanpy as sc

    if flavor is None:
        flavor = "seurat_v3" if features.value_kind == "counts" else "seurat"
    if flavor not in ("seurat_v3", "seurat"):
        raise ValueError(f"flavor must be 'seurat_v3' (counts) or 'seurat' (log data), got {flavor!r}")
    if isinstance(n_top_genes, bool) or not isinstance(n_top_genes, (int, np.integer)) or n_top_genes < 1:
        raise ValueError(f"n_top_genes must be a positive integer, got {n_top_genes!r}")
    if features.n_cells < 2:
        raise ValueError(
            f"data-hvg needs at least 2 cells to rank genes by variability, got {features.n_cells}; "
            "use sentence='ranked-hvg' or 'top-expressed', or pass the state learned on a larger dataset"
        )
    n_top = min(int(n_top_genes), features.n_features)

    X = sp.vstack([chunk for _, _, chunk in features.iter_chunks(chunk_size)], format="csr")
    adata = ad.AnnData(
        X=X,
        obs=pd.DataFrame(index=pd.RangeIndex(features.n_cells).astype(str)),
        var=pd.DataFrame(index=pd.Index(features.feature_names.astype(str))),
    )
    log.info("data-hvg: ranking %d features of %d cells with flavor=%r", adata.n_vars, adata.n_obs, flavor)
    try:
        sc.pp.highly_variable_genes(adata, flavor=flavor, n_top_genes=n_top)
    except ValueError as err:  # seurat_v3's loess fit fails on small or nearly constant data
        raise ValueError(
            f"scanpy.pp.highly_variable_genes(flavor={flavor!r}) failed on {adata.n_obs} cells x "
            f"{adata.n_vars} features: {err}. Learn the list on more cells (and pass that state), or "
            "use sentence='ranked-hvg' or 'top-expressed'"
        ) from err
    var = adata.var
    if flavor == "seurat_v3":
        rank = var["highly_variable_rank"].to_numpy(dtype=np.float64)
        order = np.argsort(np.where(np.isnan(rank), np.inf, rank), kind="stable")
    else:
        dispersion = var["dispersions_norm"].to_numpy(dtype=np.float64)
        order = np.argsort(-np.where(np.isnan(dispersion), -np.inf, dispersion), kind="stable")
    genes = [str(g) for g in features.feature_names[order[:n_top]]]
    return {"genes": genes, "flavor": flavor, "n_top_genes": int(n_top_genes)}


class DataHVG:
    """CellReasoner's rule over a ranked list learned from the data itself.

    The list is the ``n_top_genes`` most variable features by ``scanpy.pp.highly_variable_genes``
    (see :func:`learn_hvg_list`: ``seurat_v3`` on counts, ``seurat`` on log data); each cell's
    sentence is then the listed genes it expresses, in list order, as in ``ranked-hvg``.

    State: the learned list is written to ``state["data_hvg"] = {"genes": [...], "flavor": ...,
    "n_top_genes": ...}``. When ``state`` already holds it (a query annotated against a reference, or a
    rerun) that list is used as is and nothing is recomputed, so reference and query sentences share
    one ranking; ``n_top_genes``/``flavor`` given with it are ignored with a warning. Learning needs the
    whole matrix in memory as sparse CSR.

    Options: ``n_top_genes=`` (default 2000), ``flavor=`` (``"seurat_v3"`` or ``"seurat"``; default
    by ``features.value_kind``). ``params`` are those of ``ranked-hvg`` with ``gene_list="data-hvg"``
    plus ``flavor``.
    """

    name = "data-hvg"
    description = "ranked-hvg over the most variable genes of the data itself (scanpy highly_variable_genes)"
    default_n_genes = 1000

    def build(
        self,
        features: FeatureMatrix,
        *,
        n_genes: int | None = None,
        state: MutableMapping[str, Any] | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        strategies: Mapping[str, Any] | None = None,
        n_top_genes: int | None = None,
        flavor: str | None = None,
        **options: Any,
    ) -> Iterator[CellSentences]:
        n_genes = _check_n_genes(n_genes, self.default_n_genes)
        state = {} if state is None else state
        learned = state.get("data_hvg")
        if learned is None:
            learned = learn_hvg_list(
                features,
                n_top_genes=DATA_HVG_TOP_GENES if n_top_genes is None else n_top_genes,
                flavor=flavor,
                chunk_size=chunk_size,
            )
            state["data_hvg"] = learned
        else:
            _check_learned(learned)
            asked = {"n_top_genes": n_top_genes, "flavor": flavor}
            differs = {k: v for k, v in asked.items() if v is not None and v != learned.get(k)}
            if differs:
                warnings.warn(
                    f"data-hvg reuses the gene list already in its state ({len(learned['genes'])} genes, "
                    f"flavor={learned.get('flavor')!r}, n_top_genes={learned.get('n_top_genes')!r}) and "
                    f"ignores {differs}; pass an empty state to learn a new list",
                    UserWarning,
                    stacklevel=2,
                )
            log.info("data-hvg: reusing the %d-gene list stored in the sentence state", len(learned["genes"]))
        genes = _as_gene_list(learned["genes"], "learned by data-hvg")
        return _by_list(
            features, genes, n_genes=n_genes, chunk_size=chunk_size, strategy=self.name,
            params={"gene_list": "data-hvg", "flavor": learned.get("flavor")},
        )


def _check_learned(learned: Any) -> None:
    if not isinstance(learned, Mapping) or not isinstance(learned.get("genes"), Sequence):
        raise ValueError(
            "state['data_hvg'] must be a mapping with a 'genes' list (as data-hvg writes it); "
            f"got {type(learned).__name__}. Remove it from the state to learn the list again"
        )


# -------------------------------------------------------------------------------------------------
# auto
# -------------------------------------------------------------------------------------------------


class Auto:
    """Chooses between ``ranked-hvg`` and ``top-expressed`` from the data.

    ``ranked-hvg`` (CellReasoner's training format) when at least half of its ranked list (5,000 of
    CellReasoner's 10,000 genes) is among the features, else ``top-expressed``: a panel or a reduced
    gene set (scanpy's pbmc68k_reduced holds 422 of them) would give CellReasoner sentences made of a
    few stray genes. The choice, its reason and the counts are logged (INFO) and written to
    ``state["auto"] = {"chosen", "reason", "n_present", "n_list"}``; when ``state`` already holds a
    choice (a query annotated against a reference) it is kept, so both get the same kind of sentences.

    Building is delegated to ``strategies[chosen]`` with every option; the chunks carry the chosen
    name as ``strategy`` and ``params["requested"] = "auto"``. ``n_genes=None`` means the chosen
    strategy's default.
    """

    name = "auto"
    description = "ranked-hvg when the data hold at least half of CellReasoner's genes, else top-expressed"
    default_n_genes = None

    def build(
        self,
        features: FeatureMatrix,
        *,
        n_genes: int | None = None,
        state: MutableMapping[str, Any] | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        strategies: Mapping[str, Any] | None = None,
        gene_list: str | os.PathLike | Sequence[str] | None = None,
        **options: Any,
    ) -> Iterator[CellSentences]:
        state = {} if state is None else state
        if strategies is None:
            from cellscribe.core.plugins import get_host

            strategies = get_host().registry.all("sentence")
        decision = state.get("auto")
        if decision is None:
            decision = self.decide(features, gene_list)
            state["auto"] = decision
            log.info("sentence strategy auto -> %s: %s", decision["chosen"], decision["reason"])
        else:
            log.info("sentence strategy auto -> %s (choice kept from the sentence state)", decision["chosen"])
        chosen = decision["chosen"]
        if chosen not in strategies:
            raise ValueError(
                f"auto chose sentence strategy {chosen!r}, which is not registered; "
                f"choose one of {', '.join(sorted(strategies))} explicitly"
            )
        chunks = strategies[chosen].build(
            features, n_genes=n_genes, state=state, chunk_size=chunk_size, strategies=strategies,
            gene_list=gene_list, **options,
        )
        return _tagged(chunks)

    @staticmethod
    def decide(features: FeatureMatrix, gene_list=None) -> dict[str, Any]:
        """The ``state["auto"]`` record for ``features``: which strategy and why."""
        genes, _ = resolve_gene_list(gene_list)
        n_list = len(genes)
        n_present = int(np.count_nonzero(list_positions(features.feature_names, genes) >= 0))
        needed = (n_list + 1) // 2
        if n_present >= needed:
            chosen = RankedHVG.name
            reason = (f"{n_present} of the {n_list} genes of the ranked HVG list are among the features "
                      f"(>= {needed} needed)")
        else:
            chosen = TopExpressed.name
            reason = (f"only {n_present} of the {n_list} genes of the ranked HVG list are among the "
                      f"features (< {needed} needed), so each cell's own top genes are used")
        return {"chosen": chosen, "reason": reason, "n_present": n_present, "n_list": n_list}


def _tagged(chunks: Iterator[CellSentences]) -> Iterator[CellSentences]:
    """Add ``requested="auto"`` to the delegate's params (one dict shared by all chunks)."""
    params = None
    for chunk in chunks:
        if params is None:
            params = {**chunk.params, "requested": Auto.name}
        yield CellSentences(
            cell_ids=chunk.cell_ids,
            vocabulary=chunk.vocabulary,
            indptr=chunk.indptr,
            indices=chunk.indices,
            strategy=chunk.strategy,
            params=params,
        )
