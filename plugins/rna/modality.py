"""The RNA modality: an AnnData of gene expression to a cells x gene-symbols FeatureMatrix.

It owns every RNA-specific choice: which matrix holds expression that can be ranked (counts or
log-normalised values, never scaled values), and which gene names to use. Nothing is copied or
densified: the FeatureMatrix points at the chosen matrix (in memory or on disk) and genes sharing a
symbol are summed chunk by chunk through a small sparse column transform.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import attrs
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellscribe.core.domain.genes import choose_gene_symbols, merge_duplicate_symbols
from cellscribe.core.domain.matrix import DEFAULT_CHUNK, MatrixSummary, iter_row_chunks, summarize
from cellscribe.core.types import FeatureMatrix

log = logging.getLogger(__name__)

#: Layers tried, in this order, when the default matrix (X) turns out to be scaled.
COUNT_LAYERS: tuple[str, ...] = ("counts", "raw_counts", "count")
LOG_LAYERS: tuple[str, ...] = ("log1p", "lognorm", "logcounts", "data")


@attrs.frozen
class _Choice:
    """A candidate expression matrix with the genes of its columns."""

    matrix: Any
    var: pd.DataFrame
    var_names: pd.Index
    source: str


def _in_memory(matrix: Any) -> bool:
    return sp.issparse(matrix) or isinstance(matrix, np.ndarray)


def _scan(matrix: Any, chunk_size: int) -> MatrixSummary:
    """Summarise the stored values of ``matrix``.

    In-memory matrices are scanned completely, chunk by chunk. Backed (on-disk) matrices are judged
    by their first chunk of rows only: reading a million-cell file once here and again when the
    sentences are built would double the run time, and scaling touches every row, so the first rows
    show it as well as all of them would.
    """
    if _in_memory(matrix) or matrix.shape[0] == 0:
        return summarize(matrix, chunk_size)
    _, stop, first = next(iter_row_chunks(matrix, chunk_size))
    log.debug("backed matrix: checked the values of its first %d of %d rows", stop, matrix.shape[0])
    return summarize(first, chunk_size)


def _describe_alternatives(adata: Any) -> str:
    layers = ", ".join(repr(k) for k in adata.layers.keys()) or "none"
    raw = "present" if adata.raw is not None else "absent"
    return f"layers: {layers}; .raw: {raw}"


def _requested(adata: Any, layer: str | None, use_raw: bool | None) -> _Choice:
    """The matrix the user asked for (X by default), with a clear error when it does not exist."""
    if layer is not None:
        if layer not in adata.layers:
            available = ", ".join(repr(k) for k in adata.layers.keys()) or "none"
            raise ValueError(
                f"layer {layer!r} not found (adata.layers has: {available}). Pass one of those as "
                "layer=, or leave layer unset to use adata.X."
            )
        return _Choice(adata.layers[layer], adata.var, adata.var_names, f"layers[{layer!r}]")
    if use_raw:
        if adata.raw is None:
            raise ValueError(
                "use_raw=True but adata has no .raw. Leave use_raw unset to use adata.X, or pass "
                f"layer= to use a layer ({_describe_alternatives(adata)})."
            )
        return _Choice(adata.raw.X, adata.raw.var, adata.raw.var_names, "raw.X")
    return _Choice(adata.X, adata.var, adata.var_names, "X")


def _fallbacks(adata: Any, use_raw: bool | None) -> list[_Choice]:
    """Unscaled alternatives to X, in order of preference: counts layers, log layers, then .raw.

    ``use_raw=False`` keeps ``.raw`` out of the list.
    """
    choices = [
        _Choice(adata.layers[name], adata.var, adata.var_names, f"layers[{name!r}]")
        for name in (*COUNT_LAYERS, *LOG_LAYERS)
        if name in adata.layers
    ]
    if adata.raw is not None and use_raw is not False:
        choices.append(_Choice(adata.raw.X, adata.raw.var, adata.raw.var_names, "raw.X"))
    return choices


def _scaled_message(source: str, adata: Any) -> str:
    return (
        f"{source} contains negative values (it looks scaled, e.g. by sc.pp.scale); cell sentences "
        "need counts or log-normalised expression: pass layer=NAME or use_raw=True to choose such a "
        f"matrix ({_describe_alternatives(adata)}). To keep one before scaling, store it first, e.g. "
        "`adata.layers['counts'] = adata.X.copy()` or `adata.raw = adata`."
    )


class RnaModality:
    """Gene expression (scRNA-seq, snRNA-seq, the RNA of a multiome)."""

    name = "rna"
    description = (
        "Gene expression: counts or log-normalised values from X, a layer or .raw; Ensembl ids "
        "mapped to symbols; duplicated symbols summed."
    )
    mudata_keys: tuple[str, ...] = ("rna", "gex", "RNA")

    def embedding(self, adata: Any, *, features: FeatureMatrix, n_components: int | None = None, seed: int = 0,
                  chunk_size: int = DEFAULT_CHUNK, **options: Any) -> tuple[np.ndarray, str]:
        """PCA of the log-normalised expression :meth:`prepare` chose (:func:`.embedding.pca_embedding`),
        the embedding a budgeted run spreads labels over. ``adata`` is not touched."""
        from .embedding import pca_embedding

        return pca_embedding(features, n_components=n_components, seed=seed, chunk_size=chunk_size)

    def prepare(
        self,
        adata: Any,
        *,
        layer: str | None = None,
        use_raw: bool | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        **options: Any,
    ) -> FeatureMatrix:
        """Choose and check the expression matrix of ``adata`` and describe it as a FeatureMatrix.

        Parameters
        ----------
        adata
            Cells x genes. Never modified; backed (``read_h5ad(..., backed="r")``) objects are not
            loaded into memory.
        layer
            Use ``adata.layers[layer]``.
        use_raw
            ``True``: use ``adata.raw.X`` with ``adata.raw.var``. ``False``: never use ``.raw``, not
            even as a replacement for a scaled X. ``None`` (default): use X.
        chunk_size
            Rows read at a time when checking the values.
        options
            Options of other components; ignored.

        Returns
        -------
        A FeatureMatrix over the chosen matrix, one row per cell in ``adata``'s order (cells without
        any expressed gene included), one column per distinct gene symbol. ``value_kind`` is
        ``"counts"`` when every stored value is an integer, else ``"log"``; ``source`` names the
        matrix (``"X"``, ``"layers['counts']"``, ``"raw.X"``).

        When the default X holds negative (scaled) values, the first unscaled matrix among the
        layers :data:`COUNT_LAYERS`, then :data:`LOG_LAYERS`, then ``.raw``, is used instead, with a
        ``UserWarning``. Backed matrices are judged (scaled or not, counts or not) by their first
        ``chunk_size`` rows, so the file is not read an extra time. Gene symbols are chosen by :func:`cellscribe.core.domain.genes.choose_gene_symbols`;
        genes sharing a symbol are summed into one column.

        Raises
        ------
        ValueError
            Both ``layer`` and ``use_raw=True``; a missing layer or ``.raw``; a scaled matrix chosen
            explicitly, or a scaled X with no unscaled alternative; gene ids that cannot be turned into
            symbols.
        TypeError
            ``adata`` is not an AnnData (a MuData must be narrowed to its RNA modality first).
        """
        import anndata

        if not isinstance(adata, anndata.AnnData):
            if hasattr(adata, "mod"):
                raise TypeError(
                    "the rna modality needs an AnnData, got a MuData; pass its RNA modality, e.g. "
                    f"mdata.mod['rna'] (modalities: {', '.join(map(repr, adata.mod))})"
                )
            raise TypeError(f"the rna modality needs an AnnData, got {type(adata).__name__}")
        if layer is not None and use_raw:
            raise ValueError("pass either layer= or use_raw=True, not both")
        started = time.perf_counter()

        choice = _requested(adata, layer, use_raw)
        summary = _scan(choice.matrix, chunk_size)
        if summary.has_negative:
            if layer is not None or use_raw:
                raise ValueError(_scaled_message(choice.source, adata))
            choice, summary = self._replace_scaled(adata, choice, use_raw, chunk_size)

        genes = choose_gene_symbols(choice.var, choice.var_names)
        log.info("rna: %s", genes.note)
        names, transform, n_duplicated = merge_duplicate_symbols(
            genes.symbols, getattr(choice.matrix, "dtype", np.float32)
        )
        if transform is not None:
            log.info(
                "rna: %d gene symbols occur more than once; their columns are summed (%d genes -> %d)",
                n_duplicated,
                len(genes.symbols),
                len(names),
            )

        features = FeatureMatrix(
            X=choice.matrix,
            feature_names=names,
            cell_ids=adata.obs_names.to_numpy(),
            column_transform=transform,
            value_kind="counts" if summary.all_integer else "log",
            source=choice.source,
            modality=self.name,
        )
        log.info(
            "rna: %d cells x %d genes from %s (%s) in %.2f s",
            features.n_cells,
            features.n_features,
            features.source,
            features.value_kind,
            time.perf_counter() - started,
        )
        return features

    @staticmethod
    def _replace_scaled(
        adata: Any, scaled: _Choice, use_raw: bool | None, chunk_size: int
    ) -> tuple[_Choice, MatrixSummary]:
        """The first unscaled fallback for a scaled default X, announced with a warning."""
        for candidate in _fallbacks(adata, use_raw):
            summary = _scan(candidate.matrix, chunk_size)
            if summary.has_negative:
                continue
            message = (
                f"{scaled.source} contains negative values (it looks scaled, e.g. by sc.pp.scale); "
                f"using {candidate.source} instead. Pass layer= or use_raw= to choose explicitly."
            )
            warnings.warn(message, UserWarning, stacklevel=3)
            return candidate, summary
        raise ValueError(_scaled_message(scaled.source, adata))
