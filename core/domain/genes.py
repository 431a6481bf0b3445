"""Gene identifiers: recognising Ensembl ids, turning them into symbols, choosing a symbol column.

Cell sentences are made of gene *symbols* (``CD79A``), but data sets name genes in several ways:
symbols in ``var_names``, Ensembl ids in ``var_names`` with symbols in a ``var`` column (10x,
CELLxGENE), Ensembl ids alone, or ``SYMBOL_ENSG...`` pairs. :func:`choose_gene_symbols` settles this
for any modality that has genes; the pieces it is built from are public for modalities with other
needs. Human Ensembl ids are mapped offline with a vendored Ensembl 101 table (see
``core/domain/data/PROVENANCE.md``). Everything here works on whole arrays at once (pandas string methods,
index look-ups), so 60,000 genes take milliseconds.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp

log = logging.getLogger(__name__)

__all__ = [
    "ENSEMBL_GENE_ID",
    "SYMBOL_COLUMNS",
    "GENE_TABLE",
    "GeneSymbols",
    "is_ensembl_id",
    "strip_ensembl_version",
    "cut_ensembl_suffix",
    "ensembl_symbol_table",
    "map_ensembl_ids",
    "choose_gene_symbols",
    "merge_duplicate_symbols",
]

#: An Ensembl gene id of any species (``ENSG``, ``ENSMUSG``, ``ENSDARG``, ...), with an optional
#: version (``.2``) and GENCODE's pseudo-autosomal suffix (``_PAR_Y``).
ENSEMBL_GENE_ID = r"ENS[A-Z]{0,6}G\d{11}(?:\.\d+)?(?:_PAR_Y)?"

#: ``var`` columns that commonly hold gene symbols, in order of preference. ``feature_name`` (the
#: CELLxGENE schema, used by Cell-o1) comes first. Names are compared case-insensitively, ignoring
#: ``_``, ``-``, ``.`` and spaces, so ``GeneSymbol`` and ``gene-symbols`` match too.
SYMBOL_COLUMNS: tuple[str, ...] = (
    "feature_name",
    "gene_symbols",
    "gene_symbol",
    "symbol",
    "symbols",
    "gene_name",
    "gene_names",
    "hgnc_symbol",
    "gene",
    "genes",
)

#: The vendored human table (Ensembl 101, GRCh38): ``gene_id<TAB>gene_name``, ids without versions.
GENE_TABLE = "ensembl101_hg38_gene_symbols.tsv.gz"

_SUFFIX_RE = re.compile(rf"^(.+?)_{ENSEMBL_GENE_ID}$")
_BARE_ID_RE = re.compile(r"^(ENS[A-Z]{0,6}G\d{11})(?:\.\d+)?(?:_PAR_Y)?$")

# Share of names that must look like Ensembl ids for ``var_names`` to count as ids, and share of ids
# that must be found in the table before a mapping is trusted.
_MAJORITY = 0.5


class GeneSymbols(NamedTuple):
    """What :func:`choose_gene_symbols` decided.

    ``symbols``: one symbol per gene, in ``var`` order (an object array; may contain duplicates).
    ``source``: where they came from (``"var['feature_name']"``, ``"var_names"``,
    ``"var_names mapped with Ensembl 101"``). ``note``: one line for the log saying what was done.
    """

    symbols: np.ndarray
    source: str
    note: str


def _as_series(values: Sequence[Any] | np.ndarray | pd.Index | pd.Series) -> pd.Series:
    """``values`` as an object Series with a plain range index (categoricals become strings)."""
    series = pd.Series(np.asarray(values, dtype=object), dtype=object)
    return series.reset_index(drop=True)


def _is_text(series: pd.Series) -> pd.Series:
    """Which entries are strings (missing values, numbers and the like are not)."""
    try:
        return series.str.len().notna()
    except AttributeError:  # no string at all: pandas refuses the .str accessor
        return pd.Series(False, index=series.index)


def is_ensembl_id(names: Sequence[Any] | np.ndarray | pd.Index | pd.Series) -> np.ndarray:
    """Boolean array: which ``names`` are whole Ensembl gene ids (any species, version optional)."""
    return _as_series(names).str.fullmatch(ENSEMBL_GENE_ID, na=False).to_numpy(dtype=bool)


def strip_ensembl_version(ids: Sequence[Any] | np.ndarray | pd.Index | pd.Series) -> np.ndarray:
    """``ids`` without version and ``_PAR_Y`` suffixes (``ENSG00000257764.2`` -> ``ENSG00000257764``).

    Values that are not Ensembl gene ids pass through unchanged.
    """
    series = _as_series(ids)
    return series.str.extract(_BARE_ID_RE, expand=False).fillna(series).to_numpy(dtype=object)


def cut_ensembl_suffix(names: Sequence[Any] | np.ndarray | pd.Index | pd.Series) -> tuple[np.ndarray, int]:
    """Cut names of the form ``SYMBOL_ENSG...`` to ``SYMBOL``; other names are unchanged.

    Returns the new names (object array) and how many were cut.
    """
    series = _as_series(names)
    # A plain substring test first: the regex then runs only on the few candidates.
    candidates = series.str.contains("_ENS", regex=False, na=False)
    cut = series[candidates].str.replace(_SUFFIX_RE, r"\1", regex=True)
    changed = cut != series[candidates]
    out = series.to_numpy(dtype=object).copy()
    out[np.flatnonzero(candidates)[changed.to_numpy(dtype=bool)]] = cut[changed].to_numpy(dtype=object)
    return out, int(changed.sum())


@functools.cache
def ensembl_symbol_table() -> pd.Series:
    """The vendored human Ensembl id -> symbol table as a Series indexed by id.

    Read on first use and cached: the object is shared, so treat it as read-only.
    """
    resource = importlib.resources.files(__package__).joinpath("data", GENE_TABLE)
    with resource.open("rb") as fh:
        table = pd.read_csv(
            fh, sep="\t", compression="gzip", dtype=str, keep_default_na=False, na_filter=False
        )
    series = pd.Series(table["gene_name"].to_numpy(dtype=object), index=pd.Index(table["gene_id"]))
    log.debug("loaded %d Ensembl gene symbols from %s", len(series), GENE_TABLE)
    return series


def map_ensembl_ids(ids: Sequence[Any] | np.ndarray | pd.Index | pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Map human Ensembl gene ids to symbols with the vendored Ensembl 101 table.

    Versions are ignored in the look-up (``ENSG00000105369.10`` -> ``CD79A``). Returns the symbols
    (an object array; ids that are not in the table, including other species' ids, are kept exactly as
    given) and a boolean array of which ids were found.
    """
    given = _as_series(ids)
    table = ensembl_symbol_table()
    positions = table.index.get_indexer(strip_ensembl_version(given))
    found = positions >= 0
    symbols = given.to_numpy(dtype=object).copy()
    symbols[found] = table.to_numpy()[positions[found]]
    return symbols, found


def _normalise_column_name(name: Any) -> str:
    return re.sub(r"[\s_.\-]", "", str(name)).lower()


def _symbol_column(var: pd.DataFrame, ids_in_names: bool) -> str | None:
    """The ``var`` column to take symbols from, or ``None``.

    ``feature_name`` is always taken when present; the other :data:`SYMBOL_COLUMNS` only when
    ``var_names`` are Ensembl ids (otherwise ``var_names`` already are the symbols the user chose). A
    column qualifies only if it holds text and most of its values are not Ensembl ids themselves.
    """
    by_key: dict[str, Any] = {}
    for column in var.columns:
        by_key.setdefault(_normalise_column_name(column), column)
    wanted = SYMBOL_COLUMNS if ids_in_names else SYMBOL_COLUMNS[:1]
    for key in wanted:
        column = by_key.get(_normalise_column_name(key))
        if column is None:
            continue
        values = _as_series(var[column])
        text = values[_is_text(values)]
        if len(text) == 0 or (text == "").all():
            continue
        if is_ensembl_id(text).mean() > _MAJORITY:
            continue
        return column
    return None


def choose_gene_symbols(var: pd.DataFrame, var_names: Sequence[Any] | pd.Index | None = None) -> GeneSymbols:
    """Choose one gene symbol per row of ``var``.

    Rules, in order:

    1. ``var["feature_name"]`` when present (the CELLxGENE convention Cell-o1 follows);
    2. when ``var_names`` are (mostly) Ensembl ids, the first other symbol column of
       :data:`SYMBOL_COLUMNS` (``gene_symbols``, ``gene_symbol``, ``symbol``, ``gene_name``, ...);
    3. when ``var_names`` are Ensembl ids and no symbol column exists, the ids mapped with the vendored
       human Ensembl 101 table;
    4. otherwise ``var_names`` as they are.

    In a chosen column, missing or empty entries fall back to the ``var_names`` entry. Ids that get no
    symbol stay as the id, version included (Cell-o1 keeps ``ENSG00000257764.2``). Finally names of the
    form ``SYMBOL_ENSG...`` are cut to ``SYMBOL``.

    Parameters
    ----------
    var
        The gene table (``adata.var`` or ``adata.raw.var``); it is only read.
    var_names
        The gene names; ``var.index`` when omitted.

    Raises
    ------
    ValueError
        When ``var_names`` are Ensembl ids, ``var`` has no symbol column and fewer than half of the ids
        are human ids known to the table (mouse ``ENSMUSG...`` ids, for example). The message lists the
        ``var`` columns present and how to put symbols in ``var_names``.
    """
    names = _as_series(var.index if var_names is None else var_names)
    if len(names) != len(var):
        raise ValueError(f"var has {len(var)} rows but {len(names)} var_names were given")
    ids = is_ensembl_id(names)
    ids_in_names = len(names) > 0 and ids.mean() > _MAJORITY

    column = _symbol_column(var, ids_in_names)
    if column is not None:
        values = _as_series(var[column])
        usable = _is_text(values) & (values != "")
        symbols = values.where(usable, names.astype(str)).to_numpy(dtype=object)
        source = f"var[{column!r}]"
        note = f"gene symbols from {source}"
        if not usable.all():
            note += f" ({int((~usable).sum()):,} missing entries kept from var_names)"
    elif ids_in_names:
        symbols, found = map_ensembl_ids(names)
        n_ids, n_found = int(ids.sum()), int(found[ids].sum())
        if n_found < _MAJORITY * n_ids:
            columns = ", ".join(repr(c) for c in var.columns) or "none"
            example = next(iter(names[ids]))
            raise ValueError(
                f"var_names are Ensembl gene ids (e.g. {example!r}) but only {n_found:,} of {n_ids:,} "
                "are human Ensembl ids cellscribe can map to gene symbols, and var has no gene symbol "
                f"column (var columns: {columns}). Cell sentences need gene symbols: put them in "
                "var_names, e.g. `adata.var_names = adata.var['gene_symbols']` (then "
                "`adata.var_names_make_unique()`), or add them as var['feature_name']."
            )
        source = "var_names mapped with Ensembl 101"
        note = f"mapped {n_found:,} of {n_ids:,} Ensembl ids in var_names to symbols (Ensembl 101 table)"
        if n_found < n_ids:
            note += f"; {n_ids - n_found:,} without a symbol kept as ids"
    else:
        symbols = names.astype(str).to_numpy(dtype=object)
        source = "var_names"
        note = "gene symbols from var_names"

    symbols, n_cut = cut_ensembl_suffix(symbols)
    if n_cut:
        note += f"; cut {n_cut:,} 'SYMBOL_ENSG...' names to SYMBOL"
    return GeneSymbols(symbols, source, note)


def merge_duplicate_symbols(
    symbols: Sequence[Any] | np.ndarray, dtype: Any = np.float32
) -> tuple[np.ndarray, sp.csr_matrix | None, int]:
    """Plan the summing of columns that share a symbol.

    Returns ``(unique_symbols, transform, n_duplicated)``: the distinct symbols in order of first
    appearance; a sparse 0/1 matrix (columns x distinct symbols) that sums a chunk's columns by symbol
    when a chunk is multiplied by it (``None`` when every symbol is already unique, so callers can skip
    the product); and how many symbols occurred more than once. ``dtype`` is the matrix's value type;
    integer types are widened to int64 so summed counts cannot overflow.
    """
    codes, uniques = pd.factorize(_as_series(symbols), sort=False, use_na_sentinel=False)
    uniques = np.asarray(uniques, dtype=object)
    if len(uniques) == len(codes):
        return uniques, None, 0
    dtype = np.dtype(dtype)
    if dtype.kind in "biu":
        dtype = np.dtype(np.int64)
    n = len(codes)
    transform = sp.csr_matrix(
        (np.ones(n, dtype=dtype), (np.arange(n), codes)), shape=(n, len(uniques))
    )
    n_duplicated = int(np.count_nonzero(np.bincount(codes) > 1))
    return uniques, transform, n_duplicated
