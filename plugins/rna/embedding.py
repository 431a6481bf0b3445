"""The RNA modality's embedding for budgeted runs: scanpy's standard PCA of log-normalised expression."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)

#: Genes kept for the PCA when the data has more (scanpy's ``highly_variable_genes``, ``seurat`` flavour).
N_TOP_GENES = 2_000
#: Components when none are asked for (scanpy's ``pp.pca`` default).
N_COMPONENTS = 50


def pca_embedding(features: Any, *, n_components: int | None = None, seed: int = 0,
                  chunk_size: int = 10_000) -> tuple[np.ndarray, str]:
    """PCA of the expression a run ranks (``features``, the RNA FeatureMatrix), as scanpy's tutorials make it.

    The matrix is read chunk by chunk into one sparse matrix (never densified): counts are depth-normalised
    to 10,000 and ``log1p``-transformed (``sc.pp.normalize_total``, ``sc.pp.log1p``), log values used as
    they are; with more than :data:`N_TOP_GENES` genes the most variable ones are kept
    (``sc.pp.highly_variable_genes``); then ``sc.pp.pca`` (``arpack``, implicitly centred on sparse data).
    Everything happens on a new AnnData: the user's data is not touched.

    :return: ``(cells x components float32 array, a note)``; cells without any expressed gene get a zero row.
    """
    import anndata as ad
    import scanpy as sc

    started = time.perf_counter()
    X = sp.vstack([chunk for _, _, chunk in features.iter_chunks(chunk_size)], format="csr").astype(np.float32)
    tmp = ad.AnnData(X)
    expressed = np.diff(X.indptr) > 0
    note = "PCA of "
    if features.value_kind == "counts":
        sc.pp.normalize_total(tmp, target_sum=1e4)
        sc.pp.log1p(tmp)
        note += "log-normalised counts"
    else:
        note += "log expression"
    if tmp.n_vars > N_TOP_GENES and expressed.sum() > 2:
        sc.pp.highly_variable_genes(tmp, n_top_genes=N_TOP_GENES, flavor="seurat")
        tmp = tmp[:, tmp.var["highly_variable"].to_numpy()].copy()
        note += f", {N_TOP_GENES} highly variable genes"
    n = min(n_components or N_COMPONENTS, tmp.n_vars - 1, int(expressed.sum()) - 1)
    if n < 1:
        return np.zeros((tmp.n_obs, 1), dtype=np.float32), "no PCA: too few cells or genes"
    sc.pp.pca(tmp, n_comps=n, random_state=seed, svd_solver="arpack")
    embedding = np.asarray(tmp.obsm["X_pca"], dtype=np.float32)
    embedding[~expressed] = 0
    log.info("rna: %s, %d components, in %.2f s", note, n, time.perf_counter() - started)
    return embedding, f"{note} ({n} components, scanpy)"
