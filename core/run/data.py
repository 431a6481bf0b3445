"""Step 1, data: read a file, choose the AnnData a modality works on, and let the modality make the cells
x genes :class:`~cellscribe.core.types.FeatureMatrix` (of the query, of several modalities, or of a
labelled reference).

Nothing here knows a modality: the registered components do the work, looked up by name.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..plugins import Host, get_host
from ..spec import DataSpec
from ..types import Assay, FeatureMatrix

log = logging.getLogger(__name__)


def is_mudata(data: Any) -> bool:
    """Whether ``data`` is a MuData (checked by shape, so mudata need not be imported)."""
    return hasattr(data, "mod") and hasattr(data, "obs")


def select_modality_data(data: Any, modality: Any, mod: str | None) -> tuple[Any, str | None]:
    """The AnnData a modality works on: ``data`` itself, or ``data.mod[mod]`` for a MuData.

    Without ``mod`` the modality's ``mudata_keys`` are tried in order.
    """
    if not is_mudata(data):
        if mod is not None:
            raise TypeError(f"mod={mod!r} was given but the data is an AnnData, not a MuData; drop mod=")
        return data, None
    keys = list(data.mod)
    if mod is None:
        mod = next((k for k in modality.mudata_keys if k in data.mod), None)
        if mod is None:
            raise TypeError(
                f"this MuData has no modality for {modality.name!r} under the usual keys "
                f"{list(modality.mudata_keys)}; it has {keys}. Pass mod=<key>."
            )
    elif mod not in data.mod:
        raise TypeError(f"this MuData has no modality {mod!r}; it has {keys}. Pass one of them as mod=")
    return data.mod[mod], mod


def read_input(path: str | Path, host: Host | None = None, **options: Any) -> Any:
    """Read ``path`` with the first registered reader whose suffix matches."""
    host = host or get_host()
    name = str(path).lower()
    for reader in host.registry.readers_for(name).values():
        suffix = next((s for s in reader.suffixes if name.endswith(s)), None)
        if suffix is None:
            continue
        try:
            return reader.read(str(path), **options)
        except (ValueError, KeyError, TypeError, FileNotFoundError):
            raise  # the reader's own message names the problem
        except (OSError, EOFError) as exc:
            raise ValueError(f"cannot read {path} as a {suffix} file: {_read_problem(exc)}") from exc
        except BaseException as exc:
            if type(exc).__name__ != "PanicException":  # a Rust panic (snapatac2) is a BaseException
                raise
            raise ValueError(f"cannot read {path} as a {suffix} file: {_read_problem(exc)}") from None
    known = sorted({s for r in host.registry.all("reader").values() for s in r.suffixes})
    raise ValueError(f"no reader for {path}; readable file types: {', '.join(known)}")


def _read_problem(exc: BaseException) -> str:
    """What is wrong with a file a reader could not open, in one line (the library's words kept)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    lowered = text.lower()
    if "truncated file" in lowered:
        return f"the file is truncated (an interrupted copy or download?); copy it again ({text})"
    if "file signature not found" in lowered:
        return "it is not an HDF5 file (.h5ad and .h5mu files are HDF5), or it is damaged"
    if "not a gzipped file" in lowered or "bad gzip" in lowered:
        return "it is not gzip-compressed (fragment files are .tsv.gz, compressed with bgzip or gzip)"
    if isinstance(exc, EOFError) or "compressed file ended" in lowered:
        return f"the compressed file ends early (truncated?); copy it again ({text})"
    if isinstance(exc, PermissionError):
        return f"permission denied ({text})"
    return text


def label_column(obs: pd.DataFrame, key: str, what: str) -> pd.Series:
    """``obs[key]``; a ``KeyError`` listing the columns when there is none."""
    if key not in obs.columns:
        raise KeyError(
            f"{what} has no obs column {key!r} with labels; available columns: {list(obs.columns)}"
        )
    return obs[key]


def check_groupby(adata: Any, groupby: str | None) -> None:
    """A ``KeyError`` naming the columns when ``groupby`` is not an obs column of ``adata``."""
    if groupby is not None and groupby not in adata.obs.columns:
        raise KeyError(f"groupby={groupby!r} is not an obs column; available: {list(adata.obs.columns)}")


def make_features(component: Any, adata: Any, *, layer: str | None = None, use_raw: bool | None = None,
                  chunk_size: int = 10_000, options: Mapping[str, Any] | None = None) -> FeatureMatrix:
    """``component.prepare(adata, ...)``: the one call that turns an AnnData into a FeatureMatrix. A
    modality must keep every cell (a ``RuntimeError`` says which broke the rule)."""
    features = component.prepare(adata, layer=layer, use_raw=use_raw, chunk_size=chunk_size, **dict(options or {}))
    if features.n_cells != adata.n_obs:
        raise RuntimeError(
            f"modality {component.name!r} returned {features.n_cells} rows for {adata.n_obs} cells; "
            "a modality must keep every cell"
        )
    return features


@attrs.frozen(eq=False)
class Prepared:
    """The data of a run as its modalities prepared it (step 1's result).

    ``adata``: where results go (the AnnData of the modality, or the MuData for several modalities);
    ``mod``: the MuData key read (``None`` for an AnnData or several modalities); ``parts``: one
    ``(label, component name, FeatureMatrix)`` per modality, rows = the cells annotated (for several
    modalities, those present in every one, in the MuData's order); ``assay``: what they measure;
    ``rows``: the position in ``adata`` of each of those cells.

    The FeatureMatrix cell ids are the run's unit ids: the obs names, made unique when some repeat
    (:func:`unique_cell_ids`), so every cell's answer is its own.
    """

    adata: Any
    mod: str | None
    parts: tuple[tuple[str, str, FeatureMatrix], ...]
    assay: Assay
    #: Row of ``adata`` of each annotated cell (results are written by position, never by name).
    rows: np.ndarray = attrs.field(factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def features(self) -> FeatureMatrix:
        """The (first) modality's FeatureMatrix."""
        return self.parts[0][2]


def prepare_data(data: Any, spec: DataSpec, *, host: Host, groupby: str | None = None) -> Prepared:
    """Select and prepare the data of ``spec.modality`` (``"rna"``, or several: ``"rna+atac"``).

    Several modalities need a MuData: each is prepared from its own modality (``mod="rna+peaks"`` names
    them, else the modalities' usual keys) and only the cells present in all of them are kept.
    ``groupby`` (an obs column the run will need) is checked before any matrix is read.
    """
    names = spec.modality.split("+")
    read = {"layer": spec.layer, "use_raw": spec.use_raw, "chunk_size": spec.chunk_size,
            "options": spec.modality_options}
    if len(names) == 1:
        component = host.registry.get("modality", spec.modality)
        adata, mod = select_modality_data(data, component, spec.mod)
        if adata.n_obs == 0:
            raise ValueError("the data has no cells")
        check_groupby(adata, groupby)
        features = make_features(component, adata, **read)
        features = attrs.evolve(features, cell_ids=unique_cell_ids(adata.obs_names, "the data"))
        return Prepared(adata, mod, ((component.sentence_label or spec.modality.upper(), spec.modality, features),),
                        Assay.from_features(features), np.arange(adata.n_obs, dtype=np.int64))
    if not is_mudata(data):
        raise TypeError(f"modality={spec.modality!r} needs a MuData holding each of {names}; got an AnnData")
    check_groupby(data, groupby)
    keys = spec.mod.split("+") if spec.mod else [None] * len(names)
    prepared = []
    for name, key in zip(names, keys):
        component = host.registry.get("modality", name)
        adata_i, key_i = select_modality_data(data, component, key)
        if not adata_i.obs_names.is_unique:
            raise ValueError(
                f"modality {key_i!r} repeats obs names (e.g. {_repeated(adata_i.obs_names)!r}): "
                f"modality={spec.modality!r} pairs each cell's modalities by name. Make them unique first "
                "(mdata.obs_names_make_unique(), or each modality's obs_names_make_unique())"
            )
        prepared.append((component, adata_i, make_features(component, adata_i, **read)))
    common = pd.Index(data.obs_names)
    for _, adata_i, _ in prepared:
        common = common[common.isin(adata_i.obs_names)]
    if len(common) == 0:
        raise ValueError(f"no cell is present in every modality of {spec.modality!r}")
    parts = tuple(
        (component.sentence_label or name.upper(), name, features_i.subset_rows(adata_i.obs_names.get_indexer(common)))
        for (component, adata_i, features_i), name in zip(prepared, names)
    )
    rows = np.flatnonzero(pd.Index(data.obs_names).isin(common)).astype(np.int64)
    return Prepared(data, None, parts, Assay.from_features(*(f for _, _, f in prepared)), rows)


def _repeated(names: pd.Index) -> str:
    return str(names[names.duplicated()][0])


def unique_cell_ids(names: pd.Index, what: str) -> np.ndarray:
    """The cells' ids for a run: ``names`` (obs names), with repeats made unique as
    ``anndata.utils.make_index_unique(join="#")`` does (``GSM1#1``, ``GSM1#2``) and a warning.

    Repeated obs names are common after concatenation and in published files; results are written by
    position, so each cell still gets its own answer. The ids with a suffix appear in the sidecar and
    checkpoint."""
    index = pd.Index(names.astype(str))
    if index.is_unique:
        return index.to_numpy(dtype=object)
    import warnings

    from anndata.utils import make_index_unique

    n = int(index.duplicated(keep=False).sum())
    warnings.warn(
        f"{n} cells of {what} share their obs name with another cell (e.g. {_repeated(index)!r}); each gets "
        "its own answer (results are written by position), and the sidecar names the repeats "
        f"'{_repeated(index)}#1', ... Call obs_names_make_unique() to give the cells unique names",
        UserWarning,
        stacklevel=4,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's own note on suffixes that already exist
        return make_index_unique(index, join="#").to_numpy(dtype=object)


# -------------------------------------------------------------------------------------------------
# References (k-shot examples, label transfer), of the query's modality or of another one
# -------------------------------------------------------------------------------------------------

#: A feature name that is a genomic interval (``chr1:100-600``, ``chr1-100-600``, ``1_100_600``).
_INTERVAL = re.compile(r"^(chr)?[0-9A-Za-z_.]+[:_-][0-9]+[-_][0-9]+$", re.IGNORECASE)
#: Feature names looked at to tell intervals (peaks) from gene symbols.
_SAMPLED_NAMES = 1000


def _names_are_intervals(adata: Any) -> bool:
    """Whether most of the first feature names of ``adata`` are genomic intervals (peaks)."""
    names = adata.var_names[:_SAMPLED_NAMES].astype(str)
    return len(names) > 0 and float(np.mean([bool(_INTERVAL.match(n)) for n in names])) > 0.5


def _reference_modality_guess(
    reference: Any, adata: Any, modality: str, reference_modality: str | None, mod: str | None, host: Host
) -> tuple[Any, Any, str]:
    """The reference's AnnData, its modality component and name.

    ``reference_modality=None`` means the query's modality, unless the reference obviously is another
    one: peaks (genomic-interval features) on one side and gene symbols on the other stop with an error
    naming the fix; a MuData without the query modality's keys is read from the first registered
    modality whose usual key it has.
    """
    reg = host.registry
    others = [m for m in reg.names("modality") if m != modality]
    if reference_modality is None and is_mudata(reference):
        component = reg.get("modality", modality)
        keys = [mod] if mod is not None else list(component.mudata_keys)
        if not any(k in reference.mod for k in keys):
            found = next((m for m in others if any(k in reference.mod for k in reg.get("modality", m).mudata_keys)),
                         None)
            if found is not None:
                log.info("reference: a MuData without %s data; reading its %s modality", modality, found)
                reference_modality = found
    name = reference_modality or modality
    component = reg.get("modality", name)
    same = name == modality
    ref_adata, _ = select_modality_data(reference, component, mod if same and is_mudata(reference) else None)
    if reference_modality is None and not is_mudata(reference):
        query_peaks, ref_peaks = _names_are_intervals(adata), _names_are_intervals(ref_adata)
        if query_peaks != ref_peaks:
            sides = ("peaks", "gene symbols")
            raise ValueError(
                f"the reference's features are {sides[not ref_peaks]} ({', '.join(ref_adata.var_names[:3])}) "
                f"but the query's are {sides[not query_peaks]} ({', '.join(adata.var_names[:3])}): "
                f"another modality. Pass reference_modality= (one of {', '.join(map(repr, others))}; "
                f"{modality!r} if it is the same assay)"
            )
    return ref_adata, component, name


def measured_mask(features: FeatureMatrix, chunk_size: int = 10_000) -> np.ndarray:
    """Boolean mask of the features a data set can show: those its modality measures
    (``FeatureMatrix.measured`` when set) that are non-zero in at least one cell (one chunked pass)."""
    seen = np.zeros(features.n_features, dtype=bool)
    for _, _, chunk in features.iter_chunks(chunk_size):
        seen[chunk.indices[chunk.data != 0]] = True
    return seen if features.measured is None else seen & np.asarray(features.measured, dtype=bool)


def restrict_features(features: FeatureMatrix, keep: np.ndarray) -> FeatureMatrix:
    """``features`` with only the columns ``keep`` (a boolean mask), through its column transform
    (nothing is read or copied)."""
    keep = np.asarray(keep, dtype=bool)
    columns = np.flatnonzero(keep)
    source = features.column_transform if features.column_transform is not None else features.X
    dtype = getattr(source, "dtype", np.float32)
    select = sp.csr_matrix(
        (np.ones(len(columns), dtype=dtype), (columns, np.arange(len(columns)))),
        shape=(features.n_features, len(columns)),
    )
    if features.column_transform is not None:
        select = sp.csr_matrix(features.column_transform @ select)
    changes: dict[str, Any] = {"column_transform": select, "feature_names": features.feature_names[keep]}
    if features.measured is not None:
        changes["measured"] = np.asarray(features.measured, dtype=bool)[keep]
    return attrs.evolve(features, **changes)


def prepare_reference(
    reference: Any,
    reference_key: str,
    adata: Any,
    features: FeatureMatrix,
    *,
    modality: str,
    reference_modality: str | None,
    mod: str | None,
    layer: str | None,
    use_raw: bool | None,
    chunk_size: int,
    modality_options: Mapping[str, Any] | None,
    host: Host,
) -> tuple[Any, pd.Series, FeatureMatrix, str, dict[str, int] | None]:
    """A labelled reference prepared for a query whose features are ``features``.

    The reference is prepared by its own modality component (``reference_modality``, default the
    query's; see :func:`_reference_modality_guess`). Of the query's modality, it is read as the query is
    (``layer``, ``use_raw``, ``modality_options``). Of another modality (an scRNA-seq reference for
    scATAC cells) it is read with that modality's defaults plus ``modality_options`` (each component
    ignores the others' options), and its features are restricted to the genes both sides can show
    (:func:`measured_mask` of each): an example gene the query can never show must not make a label
    win or lose.

    :return: ``(reference AnnData, its labels, its features, the reference modality, gene counts)``;
        the counts (``query``, ``reference``, ``shared`` measured genes) only across modalities.
    :raises KeyError: without the label column. :raises ValueError: no gene measured on both sides.
    """
    ref_adata, component, name = _reference_modality_guess(reference, adata, modality, reference_modality, mod, host)
    labels = label_column(ref_adata.obs, reference_key, "the reference")
    if name == modality:
        ref_features = make_features(component, ref_adata, layer=layer, use_raw=use_raw, chunk_size=chunk_size,
                                     options=modality_options)
        return ref_adata, labels, ref_features, name, None
    started = time.perf_counter()
    ref_features = make_features(component, ref_adata, chunk_size=chunk_size, options=modality_options)
    query_genes = pd.Index(features.feature_names[measured_mask(features, chunk_size)].astype(str))
    ref_measured = measured_mask(ref_features, chunk_size)
    keep = ref_measured & pd.Index(ref_features.feature_names.astype(str)).isin(query_genes)
    counts = {"query": len(query_genes), "reference": int(ref_measured.sum()), "shared": int(keep.sum())}
    if counts["shared"] == 0:
        raise ValueError(
            f"no gene is measured both in the query ({modality}, {counts['query']} genes, e.g. "
            f"{', '.join(query_genes[:3])}) and in the {name} reference ({counts['reference']} genes, e.g. "
            f"{', '.join(ref_features.feature_names[ref_measured][:3].astype(str))}); check that both use "
            "gene symbols of the same species"
        )
    log.info(
        "%s reference for %s cells: %d of its %d measured genes are measured in the query (%d genes) "
        "and kept (%.2f s)", name, modality, counts["shared"], counts["reference"], counts["query"],
        time.perf_counter() - started,
    )
    return ref_adata, labels, restrict_features(ref_features, keep), name, counts
