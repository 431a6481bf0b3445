"""``cluster-markers``: one sentence per group of cells, its top differentially expressed genes.

GPTCelltype (Hou & Ji 2024, Nat Methods 21:1462) and CASSIA prompt a language model with each
cluster's top marker genes from a differential-expression test of the cluster against all other cells
(Seurat's ``FindAllMarkers``, Wilcoxon rank-sum), not with single cells. This strategy makes those
sentences with :func:`scanpy.tl.rank_genes_groups` so every model (the ``markers`` model included) can
read them, and ``groupby=`` runs can answer a group from its own contrast with the rest of the data.

For each group: the genes ranked by the test's score (``method``, default ``"wilcoxon"``), keeping
only genes higher in the group than in the rest (log fold change > 0) and not excluded (ribosomal and
mitochondrially encoded genes by default: they differ between clusters for technical reasons and name
no cell type), the first ``n_genes`` (default 50). Every cell of the group gets the group's sentence,
so with ``groupby=`` each representative cell carries it; cells without a group get an empty one.
Counts (``FeatureMatrix.value_kind == "counts"``) are normalised to 10,000 per cell and log1p-
transformed first, as scanpy's test expects; log data and gene activity are tested as they are.

The groups are the run's ``groupby`` column (the pipeline gives them to strategies that declare
``uses_groups``), or ``groups=`` (``sentence_options={"groups": adata.obs["leiden"]}``: a Series
indexed by cell id, or a sequence aligned with the cells), which wins. What each group's sentence is, and how it
was made, is written to ``state["cluster_markers"]`` (recorded in the run's
``uns[key]["params"]["sentence_state"]``).

Edge cases: a group of one cell cannot be tested; it and a data set with a single group get the
group's genes of highest mean expression instead (said in the state as ``"by": "mean"``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellscribe.core.types import CellSentences, FeatureMatrix

log = logging.getLogger(__name__)

__all__ = ["ClusterMarkers", "group_markers", "DEFAULT_EXCLUDE"]

#: Genes left out by default: cytosolic ribosomal proteins, mitochondrially encoded genes.
DEFAULT_EXCLUDE = r"^(?:RP[LS]\d+[AXY]?\d*|RPLP\d|RPSA|MT-.+|MRP[LS]\d+)$"
#: Genes tested per group before filtering (kept small for speed; far above any sentence length).
_TESTED = 500


def _excluded(names: np.ndarray, exclude: Any) -> np.ndarray:
    if exclude is None:
        return np.zeros(len(names), dtype=bool)
    if callable(exclude):
        return np.fromiter((bool(exclude(str(g))) for g in names), dtype=bool, count=len(names))
    if isinstance(exclude, str):
        return pd.Series(names, dtype=object).astype(str).str.match(re.compile(exclude, re.I)).to_numpy(bool)
    return pd.Index(names).isin([str(g) for g in exclude])


def _group_codes(features: FeatureMatrix, groups: Any) -> pd.Categorical:
    if groups is None:
        raise ValueError(
            "sentence strategy 'cluster-markers' needs the cells' groups: pass groupby='leiden' (an obs "
            "column of clusters; --groupby on the command line), or sentence_options={'groups': "
            "adata.obs['leiden']} (a Series indexed by cell id, or one label per cell)"
        )
    if isinstance(groups, pd.Series) and not isinstance(groups.index, pd.RangeIndex):
        if not groups.index.is_unique:
            raise ValueError("cluster-markers: the groups' index (cell ids) repeats; pass one label per cell")
        aligned = groups.reindex(pd.Index(features.cell_ids.astype(str)))
        missing = int(aligned.isna().sum() - groups.isna().sum())
        if missing > 0 and missing == features.n_cells:
            raise ValueError("cluster-markers: none of the cells' ids is in the groups' index")
        values = aligned
    else:
        values = pd.Series(list(groups))
        if len(values) != features.n_cells:
            raise ValueError(
                f"cluster-markers: {len(values)} group labels for {features.n_cells} cells; pass one per cell"
            )
    return pd.Categorical(values.astype(object).where(values.notna(), None))


def _labels(codes: pd.Categorical) -> np.ndarray:
    """Each cell's group as a string, ``None`` where it has none."""
    names = np.asarray([str(c) for c in codes.categories], dtype=object)
    return np.where(codes.codes >= 0, names[np.maximum(codes.codes, 0)], None)


def _log_normalised(features: FeatureMatrix, chunk_size: int) -> sp.csr_matrix:
    X = sp.vstack([sp.csr_matrix(c) for _, _, c in features.iter_chunks(chunk_size)], format="csr")
    X = X.astype(np.float32)
    if features.value_kind == "counts":
        totals = np.asarray(X.sum(axis=1)).ravel()
        X = sp.csr_matrix(sp.diags(1e4 / np.maximum(totals, 1e-12)) @ X, dtype=np.float32)
        np.log1p(X.data, out=X.data)
    return X


def group_markers(
    features: FeatureMatrix,
    groups: Any,
    *,
    n_genes: int = 50,
    method: str = "wilcoxon",
    exclude: str | Iterable[str] | Callable[[str], bool] | None = DEFAULT_EXCLUDE,
    chunk_size: int = 10_000,
) -> dict[str, Any]:
    """Each group's top differentially expressed genes (see the module docstring).

    :return: ``{"method", "n_genes", "groups": {group: [genes]}, "by": {group: "test" | "mean"},
        "sizes": {group: cells}}``.
    """
    import anndata as ad
    import scanpy as sc

    codes = _group_codes(features, groups)
    names = features.feature_names.astype(str)
    keep_gene = ~_excluded(names, exclude)
    X = _log_normalised(features, chunk_size)
    has_group = np.asarray(codes.codes >= 0)
    labels = _labels(codes)
    sizes = pd.Series(labels[has_group]).value_counts()
    testable = [str(g) for g, n in sizes.items() if n >= 2]
    out: dict[str, Any] = {"method": method, "n_genes": int(n_genes), "groups": {}, "by": {},
                           "sizes": {str(g): int(n) for g, n in sizes.items()}}
    tested: dict[str, list[str]] = {}
    if len(testable) >= 2:
        rows = np.flatnonzero(has_group & pd.Index(labels).isin(testable))
        columns = np.flatnonzero(keep_gene)
        sub = ad.AnnData(
            X=X[rows][:, columns],
            obs=pd.DataFrame({"group": pd.Categorical(labels[rows].astype(str))},
                             index=pd.Index(features.cell_ids[rows].astype(str)).astype(str)),
            var=pd.DataFrame(index=pd.Index(names[columns])),
        )
        sub.obs_names_make_unique()
        sub.var_names_make_unique()
        sc.tl.rank_genes_groups(sub, "group", method=method, n_genes=min(_TESTED, sub.n_vars),
                                use_raw=False, key_added="cluster_markers")
        result = sub.uns["cluster_markers"]
        for g in testable:
            genes = np.asarray(result["names"][g]).astype(str)
            up = np.asarray(result["logfoldchanges"][g], dtype=np.float64) > 0
            tested[g] = [str(x) for x in genes[up][:n_genes]]
    for g in sizes.index.astype(str):
        if g in tested:
            out["groups"][g], out["by"][g] = tested[g], "test"
            continue
        members = np.flatnonzero(labels == g)
        mean = np.asarray(X[members].mean(axis=0)).ravel()
        mean[~keep_gene] = -np.inf
        order = np.argsort(-mean, kind="stable")
        order = order[np.isfinite(mean[order]) & (mean[order] > 0)][:n_genes]
        out["groups"][g], out["by"][g] = [str(x) for x in names[order]], "mean"
    if any(by == "mean" for by in out["by"].values()):
        log.info("cluster-markers: %d group(s) ranked by mean expression (one cell, or one group)",
                 sum(by == "mean" for by in out["by"].values()))
    return out


class ClusterMarkers:
    """Per group, the top differentially expressed genes against the other cells (see the module
    docstring); every cell gets its group's sentence.

    Options: ``groups=`` (required), ``method=`` (a :func:`scanpy.tl.rank_genes_groups` method,
    default ``"wilcoxon"``), ``exclude=`` (a regular expression, symbols, or a predicate; default
    :data:`DEFAULT_EXCLUDE`). ``params``: ``n_genes``, ``method``, ``n_groups``.
    """

    name = "cluster-markers"
    description = ("per group: its top differentially expressed genes against the other cells "
                   "(scanpy rank_genes_groups), as GPTCelltype and CASSIA prompt")
    default_n_genes = 50
    #: Asks the pipeline for the run's groups (``groups=``) when it has ``groupby``.
    uses_groups = True

    def build(
        self,
        features: FeatureMatrix,
        *,
        n_genes: int | None = None,
        state: MutableMapping[str, Any] | None = None,
        chunk_size: int = 10_000,
        strategies: Mapping[str, Any] | None = None,
        groups: Any = None,
        method: str = "wilcoxon",
        exclude: str | Sequence[str] | Callable[[str], bool] | None = DEFAULT_EXCLUDE,
        **options: Any,
    ) -> Iterator[CellSentences]:
        from .strategies import _check_n_genes

        n_genes = _check_n_genes(n_genes, self.default_n_genes)
        learned = group_markers(features, groups, n_genes=n_genes, method=method, exclude=exclude,
                                chunk_size=chunk_size)
        if state is not None:
            state["cluster_markers"] = learned
        codes = _group_codes(features, groups)
        index = pd.Index(features.feature_names.astype(str))
        per_group = {g: index.get_indexer(genes) for g, genes in learned["groups"].items()}
        labels = _labels(codes)
        lengths = np.asarray([len(per_group[str(x)]) if x is not None else 0 for x in labels], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        empty = np.zeros(0, dtype=np.int64)
        indices = np.concatenate([per_group[str(x)] if x is not None else empty for x in labels] or [empty])
        params = {"n_genes": n_genes, "method": method, "n_groups": len(per_group)}
        log.info("cluster-markers: %d groups, %s test, %d genes each", len(per_group), method, n_genes)

        def chunks() -> Iterator[CellSentences]:
            for start in range(0, features.n_cells, chunk_size):
                stop = min(start + chunk_size, features.n_cells)
                yield CellSentences(
                    cell_ids=features.cell_ids[start:stop],
                    vocabulary=features.feature_names,
                    indptr=indptr[start : stop + 1] - indptr[start],
                    indices=indices[indptr[start] : indptr[stop]],
                    strategy=self.name,
                    params=params,
                )

        return chunks()
