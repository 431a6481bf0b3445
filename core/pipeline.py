"""The annotation pipeline: reader -> modality -> sentences -> prompts -> backend -> decoder -> AnnData.

Every step is looked up in the plugin registry by name; this module holds no modality-, strategy- or
model-specific logic. :func:`annotate` is what ``cellscribe.tl.annotate`` and ``cellscribe annotate``
call; :func:`plan_run` does all the work up to the model (``--dry-run``); :func:`write_sentences` streams
cell sentences to a file (``cellscribe sentences``).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import platform
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .run.checkpoint import run_batches
from .models import Model, check_run_options, load_model, resolve_model_name
from .plugins import Host, get_host
from .types import STATUS_OK, STATUS_UNRESOLVED, Annotation, Assay, CellSentences, FeatureMatrix, Prompt

log = logging.getLogger(__name__)

DEFAULT_REPRESENTATIVES = 5
#: Prompts per checkpointed batch, in multiples of the backend's batch size.
CHECKPOINT_BATCHES = 8
DECODE_MODES = ("generate", "constrained", "score")
#: The defaults a model manifest may replace (a value the user chose explicitly is kept).
MANIFEST_OVERRIDABLE = {"prompt": "zero-shot", "sentence": "auto", "n_genes": None, "mode": "direct",
                        "prompt_options": None, "sentence_options": None}
EMPTY_NOTE = "no expressed gene in the cell sentence"


# -------------------------------------------------------------------------------------------------
# Data access
# -------------------------------------------------------------------------------------------------


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
        mod = next((k for k in getattr(modality, "mudata_keys", ()) if k in data.mod), None)
        if mod is None:
            raise TypeError(
                f"this MuData has no modality for {modality.name!r} under the usual keys "
                f"{list(getattr(modality, 'mudata_keys', ()))}; it has {keys}. Pass mod=<key>."
            )
    elif mod not in data.mod:
        raise TypeError(f"this MuData has no modality {mod!r}; it has {keys}. Pass one of them as mod=")
    return data.mod[mod], mod


def read_input(path: str | Path, host: Host | None = None, **options: Any) -> Any:
    """Read ``path`` with the first registered reader whose suffix matches."""
    host = host or get_host()
    name = str(path).lower()
    for reader in host.registry.all("reader").values():
        if any(name.endswith(s) for s in reader.suffixes):
            return reader.read(str(path), **options)
    known = sorted({s for r in host.registry.all("reader").values() for s in r.suffixes})
    raise ValueError(f"no reader for {path}; readable file types: {', '.join(known)}")


def _labels(obs: pd.DataFrame, key: str, what: str) -> pd.Series:
    if key not in obs.columns:
        raise KeyError(
            f"{what} has no obs column {key!r} with labels; available columns: {list(obs.columns)}"
        )
    return obs[key]


# -------------------------------------------------------------------------------------------------
# Sentences
# -------------------------------------------------------------------------------------------------


def build_sentences(
    features: FeatureMatrix,
    strategy: str,
    *,
    n_genes: int | None,
    state: dict,
    host: Host,
    chunk_size: int,
    options: Mapping[str, Any] | None = None,
) -> CellSentences:
    """Run the sentence strategy ``strategy`` over ``features`` and join its chunks."""
    strategies = host.registry.all("sentence")
    component = host.registry.get("sentence", strategy)
    chunks = list(
        component.build(
            features,
            n_genes=n_genes,
            state=state,
            chunk_size=chunk_size,
            strategies=strategies,
            **dict(options or {}),
        )
    )
    if not chunks:
        raise ValueError("the data has no cells")
    return CellSentences.concatenate(chunks)


def sentences_frame(sentences: CellSentences) -> pd.Series:
    """Cell sentences as a Series of strings indexed by cell id (metadata in ``.attrs``)."""
    series = pd.Series(sentences.texts(), index=pd.Index(sentences.cell_ids, name="cell_id"), name="sentence")
    series.attrs["strategy"] = sentences.strategy
    series.attrs["params"] = dict(sentences.params)
    return series


# -------------------------------------------------------------------------------------------------
# Units: cells, or representative cells of clusters
# -------------------------------------------------------------------------------------------------


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


# -------------------------------------------------------------------------------------------------
# The run
# -------------------------------------------------------------------------------------------------


@attrs.define
class RunPlan:
    """Everything decided before the model runs (what ``--dry-run`` prints)."""

    adata: Any
    mod: str | None
    features: FeatureMatrix
    sentences: CellSentences
    unit_rows: np.ndarray  # rows of ``sentences`` that are prompted
    groups: pd.Series | None
    representatives: dict[str, list[int]] | None
    prompts: list[Prompt]
    params: dict[str, Any]
    vocabulary: list[str] | None
    prompt_strategy: Any
    prompt_args: dict[str, Any]
    assay: Assay | None = None

    def make_prompts(self, count_tokens: Callable[[str], int] | None = None) -> list[Prompt]:
        """Build the prompts of the prompted units (``count_tokens`` from the model's tokenizer)."""
        units = self.sentences.take(self.unit_rows)
        self.prompts = self.prompt_strategy.build(units, count_tokens=count_tokens, **self.prompt_args)
        return self.prompts

    def summary(self) -> dict[str, Any]:
        """Cells, units, prompts and a token estimate (characters / 3.5 when no tokenizer counted)."""
        chars = sum(len(m["content"]) for p in self.prompts for m in p.messages)
        gen = self.prompts[0].generation if self.prompts else {}
        return {
            "cells": len(self.sentences),
            "empty_cells": int(self.sentences.empty().sum()),
            "units": int(len(self.unit_rows)),
            "prompts": len(self.prompts),
            "sentence_strategy": self.sentences.strategy,
            "prompt_strategy": self.params["prompt"],
            "model": self.params["model"],
            "estimated_prompt_tokens": int(chars / 3.5),
            "max_new_tokens_per_prompt": gen.get("max_new_tokens"),
        }


def _multimodal_sentences(
    data: Any,
    modality: str,
    mod: str | None,
    *,
    host: Host,
    sentence: str,
    n_genes: int | None,
    layer: str | None,
    use_raw: bool | None,
    chunk_size: int,
    sentence_opts: Mapping[str, Any],
    modality_options: Mapping[str, Any] | None,
) -> tuple[Any, FeatureMatrix, CellSentences, dict, Assay]:
    """Sentences of several modalities (``"rna+atac"``) of the cells present in all of them.

    Each modality is prepared from its own MuData modality (``mod="rna+peaks"`` names them, else the
    modalities' usual keys) and ranked by the same sentence strategy; cells are those in every modality,
    in the MuData's order. Returns the MuData (results go to its ``obs``), the first modality's features,
    the combined sentences (one section per modality, labelled by the modality's ``sentence_label`` or
    its upper-cased name), the per-modality strategy state and the union of the modalities' assays.
    """
    names = modality.split("+")
    if not is_mudata(data):
        raise TypeError(f"modality={modality!r} needs a MuData holding each of {names}; got an AnnData")
    keys = mod.split("+") if mod else [None] * len(names)
    if len(keys) != len(names):
        raise ValueError(f"mod={mod!r} must name one MuData modality per modality of {modality!r}")
    prepared = []
    for name, key in zip(names, keys):
        component = host.registry.get("modality", name)
        adata_i, _ = select_modality_data(data, component, key)
        features_i = component.prepare(
            adata_i, layer=layer, use_raw=use_raw, chunk_size=chunk_size, **dict(modality_options or {})
        )
        prepared.append((component, adata_i, features_i))
    common = pd.Index(data.obs_names)
    for _, adata_i, _ in prepared:
        common = common[common.isin(adata_i.obs_names)]
    if len(common) == 0:
        raise ValueError(f"no cell is present in every modality of {modality!r}")
    state: dict = {}
    parts = []
    for (component, adata_i, features_i), name in zip(prepared, names):
        rows = adata_i.obs_names.get_indexer(common)
        sentences_i = build_sentences(
            features_i.subset_rows(rows), sentence, n_genes=n_genes, state=state.setdefault(name, {}),
            host=host, chunk_size=chunk_size, options=sentence_opts,
        )
        parts.append((getattr(component, "sentence_label", name.upper()), sentences_i))
    assay = Assay.from_features(*(features_i for _, _, features_i in prepared))
    return data, prepared[0][2], CellSentences.combine(parts), state, assay


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
        keys = [mod] if mod is not None else list(getattr(component, "mudata_keys", ()))
        if not any(k in reference.mod for k in keys):
            found = next((m for m in others if any(k in reference.mod for k in
                                                  getattr(reg.get("modality", m), "mudata_keys", ()))), None)
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
    measured = getattr(features, "measured", None)
    return seen if measured is None else seen & np.asarray(measured, dtype=bool)


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
    if getattr(features, "measured", None) is not None:
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
    labels = _labels(ref_adata.obs, reference_key, "the reference")
    if name == modality:
        ref_features = component.prepare(
            ref_adata, layer=layer, use_raw=use_raw, chunk_size=chunk_size, **dict(modality_options or {})
        )
        return ref_adata, labels, ref_features, name, None
    started = time.perf_counter()
    ref_features = component.prepare(ref_adata, chunk_size=chunk_size, **dict(modality_options or {}))
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


def find_model_manifest(model: str) -> Any:
    """The shipped or user manifest named ``model`` (``"cell-o1"``), or ``None``."""
    from .domain.manifests import find_manifest

    return find_manifest(model)


def _batch_prompts(loaded: Any, batch_size: int | None) -> int:
    """Prompts per checkpointed batch: what the model asks for (``prompts_per_call``), else enough to
    keep every concurrent request of a serving backend busy for several calls."""
    per_call = getattr(loaded, "prompts_per_call", None)
    if per_call:
        return int(per_call)
    return max(1, batch_size or 8, getattr(loaded, "max_concurrency", 1)) * CHECKPOINT_BATCHES


def plan_run(
    data: Any,
    *,
    modality: str = "rna",
    mod: str | None = None,
    prompt: str = "zero-shot",
    model: str | Model | None = None,
    mode: str = "direct",
    candidates: Sequence[str] | None = None,
    reference: Any = None,
    reference_key: str | None = None,
    reference_modality: str | None = None,
    k: int = 3,
    groupby: str | None = None,
    n_representatives: int | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    sentence: str = "auto",
    n_genes: int | None = None,
    seed: int = 0,
    max_prompt_tokens: int | None = None,
    prompt_options: Mapping[str, Any] | None = None,
    sentence_options: Mapping[str, Any] | None = None,
    modality_options: Mapping[str, Any] | None = None,
    chunk_size: int = 10_000,
    count_tokens: Callable[[str], int] | None = None,
    build_prompts: bool = True,
    host: Host | None = None,
) -> RunPlan:
    """Prepare a run up to (not including) the model call. See :func:`annotate` for the arguments.

    Every input check happens here, before any model is loaded. With ``build_prompts=False`` the
    prompts are left for :meth:`RunPlan.make_prompts` (called once the model's tokenizer can count).
    """
    host = host or get_host()
    reg = host.registry
    if mode not in ("direct", "reasoning"):
        raise ValueError(f"mode must be 'direct' or 'reasoning', got {mode!r}")
    model_name = resolve_model_name(model.name if isinstance(model, Model) else model)
    manifest = find_model_manifest(model_name)
    if manifest is not None:
        # A model manifest (adapters/manifests) sets the formats its model was trained with, wherever the
        # user kept cellscribe's defaults.
        chosen = {"prompt": prompt, "sentence": sentence, "n_genes": n_genes, "mode": mode,
                  "prompt_options": prompt_options or None, "sentence_options": sentence_options or None}
        for key, value in manifest.annotate_defaults().items():
            if key in chosen and chosen[key] == MANIFEST_OVERRIDABLE[key]:
                log.info("model manifest %s sets %s=%r", manifest.name, key, value)
                chosen[key] = value
        prompt, sentence, n_genes, mode = chosen["prompt"], chosen["sentence"], chosen["n_genes"], chosen["mode"]
        prompt_options, sentence_options = chosen["prompt_options"], chosen["sentence_options"]
    prompt_c = reg.get("prompt", prompt)
    backend_c = reg.backend_for(model_name)
    # A backend may ask for its own sentence settings when the user kept the defaults.
    sentence_opts = dict(sentence_options or {})
    prefs = dict(getattr(backend_c, "sentence_preferences", None) or {})
    prefs.update(prefs.pop("modalities", {}).get(modality, {}))  # a modality's own preferences win
    if sentence == "auto" and n_genes is None and prefs:
        sentence = prefs.get("sentence", sentence)
        n_genes = prefs.get("n_genes", n_genes)
        sentence_opts = {**prefs.get("options", {}), **sentence_opts}
        log.info("model %s asks for %s sentences (n_genes=%s)", model_name, sentence, n_genes)

    if "+" in modality:
        if reference is not None or reference_key is not None or reference_modality is not None:
            raise ValueError(
                f"modality={modality!r} combines modalities; k-shot references are per modality: "
                "annotate one modality with k-shot, or use zero-shot/puzzle prompts"
            )
        t0 = time.perf_counter()
        adata, features, sentences, state, assay = _multimodal_sentences(
            data, modality, mod, host=host, sentence=sentence, n_genes=n_genes, layer=layer,
            use_raw=use_raw, chunk_size=chunk_size, sentence_opts=sentence_opts,
            modality_options=modality_options,
        )
        mod = None
        ref_sentences = ref_labels = ref_source = ref_genes = None
        log.info("%d cells with %s sentences in %.2f s", len(sentences), modality, time.perf_counter() - t0)
        if groupby is not None and groupby not in adata.obs.columns:
            raise KeyError(f"groupby={groupby!r} is not an obs column; available: {list(adata.obs.columns)}")
    else:
        modality_c = reg.get("modality", modality)
        adata, mod = select_modality_data(data, modality_c, mod)
        if adata.n_obs == 0:
            raise ValueError("the data has no cells")
        if groupby is not None and groupby not in adata.obs.columns:
            raise KeyError(f"groupby={groupby!r} is not an obs column; available: {list(adata.obs.columns)}")

        t0 = time.perf_counter()
        features = modality_c.prepare(
            adata, layer=layer, use_raw=use_raw, chunk_size=chunk_size, **dict(modality_options or {})
        )
        if features.n_cells != adata.n_obs:
            raise RuntimeError(
                f"modality {modality!r} returned {features.n_cells} rows for {adata.n_obs} cells; "
                "a modality must keep every cell"
            )
        assay = Assay.from_features(features)
        # A strategy that learns from the data (data-hvg) learns on the reference when there is one; the
        # query then reuses what it learned (the shared ``state``), so both speak the same gene list.
        state: dict = {}
        ref_sentences = ref_labels = ref_source = ref_genes = None
        if reference is None and reference_modality not in (None, modality):
            raise ValueError(
                f"reference_modality={reference_modality!r} needs reference= (a labelled data set of that "
                f"modality); without it the query's own labelled cells, of modality {modality!r}, are used"
            )
        if reference is not None or reference_key is not None:
            if reference_key is None:
                raise ValueError("reference= needs reference_key= (the obs column with its labels)")
            if reference is not None:
                ref_adata, labels, ref_features, reference_modality, ref_genes = prepare_reference(
                    reference, reference_key, adata, features, modality=modality,
                    reference_modality=reference_modality, mod=mod, layer=layer, use_raw=use_raw,
                    chunk_size=chunk_size, modality_options=modality_options, host=host,
                )
                ref_sentences = build_sentences(
                    ref_features, sentence, n_genes=n_genes, state=state, host=host,
                    chunk_size=chunk_size, options=sentence_opts,
                )
                ref_source = f"AnnData with {ref_adata.n_obs} cells"
            else:  # the labelled cells of the query itself
                labels = _labels(adata.obs, reference_key, "the query")
                ref_source = "query"

        sentences = build_sentences(
            features, sentence, n_genes=n_genes, state=state, host=host, chunk_size=chunk_size,
            options=sentence_opts,
        )
        log.info(
            "%d cell sentences (%s) in %.2f s", len(sentences), sentences.strategy, time.perf_counter() - t0
        )
        if ref_source is not None:
            if ref_sentences is None:
                ref_sentences = sentences
            keep = labels.notna().to_numpy() & ~ref_sentences.empty()
            if not keep.any():
                raise ValueError(f"reference column {reference_key!r} has no labelled cell with expressed genes")
            ref_sentences = ref_sentences.take(np.flatnonzero(keep))
            ref_labels = labels.astype(str).to_numpy()[keep].tolist()

    # Units: every cell with a sentence, or representative cells of each group.
    empty = sentences.empty()
    groups = representatives = None
    if groupby is not None:
        groups = adata.obs[groupby].reindex(pd.Index(sentences.cell_ids.astype(str)))
        per_group = n_representatives or getattr(prompt_c, "representatives_per_group", DEFAULT_REPRESENTATIVES)
        representatives = pick_representatives(sentences, groups, per_group)
        unit_rows = np.array(sorted(r for rows in representatives.values() for r in rows), dtype=np.int64)
    else:
        unit_rows = np.flatnonzero(~empty)
    units = sentences.take(unit_rows)

    vocabulary = list(candidates) if candidates else (sorted(set(ref_labels)) if ref_labels else None)
    prompt_args = {
        "mode": mode,
        "candidates": list(candidates) if candidates else None,
        "reference": ref_sentences,
        "reference_labels": ref_labels,
        "k": k,
        "seed": seed,
        "obs": adata.obs.reindex(pd.Index(sentences.cell_ids[unit_rows].astype(str))),
        "max_prompt_tokens": max_prompt_tokens,
        "options": dict(prompt_options or {}),
    }
    params = {
        "modality": modality,
        "mod": mod,
        "prompt": prompt,
        "mode": mode,
        "model": model_name,
        "backend": backend_c.name,
        "sentence": sentence,
        "sentence_resolved": sentences.strategy,
        "sentence_params": dict(sentences.params),
        "sentence_state": state,
        "n_genes": n_genes,
        "matrix": features.source,
        "value_kind": features.value_kind,
        "layer": layer,
        "use_raw": use_raw,
        "candidates": list(candidates) if candidates else None,
        "reference": ref_source,
        "reference_key": reference_key,
        "reference_modality": reference_modality or (modality if ref_source is not None else None),
        "reference_genes": ref_genes,
        "n_reference_cells": len(ref_labels) if ref_labels else None,
        "k": k if ref_labels else None,
        "groupby": groupby,
        "seed": seed,
        "max_prompt_tokens": max_prompt_tokens,
        "prompt_options": dict(prompt_options or {}),
        "modality_options": {k_: str(v) for k_, v in dict(modality_options or {}).items()},
        "assay": assay.summary(),
        "plugins": {
            "modality": ",".join(reg.entries["modality"][m].plugin for m in modality.split("+")),
            "sentence": reg.entries["sentence"][sentences.strategy].plugin
            if sentences.strategy in reg.entries["sentence"] else None,
            "prompt": reg.entries["prompt"][prompt].plugin,
            "backend": reg.entries["backend"][backend_c.name].plugin,
        },
    }
    plan = RunPlan(
        adata, mod, features, sentences, unit_rows, groups, representatives, [], params, vocabulary,
        prompt_c, prompt_args, assay,
    )
    if build_prompts:
        plan.make_prompts(count_tokens)
    return plan


def _decode_all(plan: RunPlan, generations: Sequence[Any], host: Host) -> dict[str, Annotation]:
    """Decode every prompt; a decoder that raises makes its units unresolved instead of stopping."""
    by_unit: dict[str, Annotation] = {}
    for prompt_obj, gen in zip(plan.prompts, generations, strict=True):
        try:
            decoder = host.registry.get("decoder", prompt_obj.decoder)
            annotations = decoder.decode(gen, prompt_obj, vocabulary=plan.vocabulary)
            if len(annotations) != len(prompt_obj.unit_ids):
                raise RuntimeError(
                    f"decoder {prompt_obj.decoder!r} returned {len(annotations)} answers for "
                    f"{len(prompt_obj.unit_ids)} units"
                )
        except Exception as exc:  # one bad output or decoder bug never stops the run
            log.warning("decoding failed for units %s: %s", prompt_obj.unit_ids, exc)
            annotations = [
                Annotation.unresolved(u, raw=gen.text, note=f"decoder error: {exc}") for u in prompt_obj.unit_ids
            ]
        for ann in annotations:
            by_unit[ann.unit_id] = ann
    return by_unit


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("cellscribe", "anndata", "numpy", "scanpy", "mudata", "torch", "transformers", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def _h5_safe(value: Any) -> Any:
    """Make a parameter tree writable to h5ad/h5mu ``uns``: no None, no empty dict, no mixed lists."""
    if isinstance(value, Mapping):
        out = {str(k): _h5_safe(v) for k, v in value.items() if v is not None}
        return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}
    if isinstance(value, (list, tuple)):
        items = [_h5_safe(v) for v in value if v is not None]
        if all(isinstance(v, str) for v in items):
            return np.array(items, dtype=object) if items else np.array([], dtype=object)
        if all(isinstance(v, (int, float, bool, np.number)) for v in items):
            return np.asarray(items)
        return json.dumps(value, default=str)
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (str, int, float, bool, np.ndarray)):
        return value
    return str(value)


def _default_sidecar(key_added: str, run_id: str) -> Path:
    folder = Path("cellscribe_runs")
    folder.mkdir(exist_ok=True)
    return folder / f"{key_added}-{run_id}.jsonl"


def _write_sidecar(path: Path, plan: RunPlan, generations: Sequence[Any], by_unit: Mapping[str, Annotation]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for i, (p, g) in enumerate(zip(plan.prompts, generations)):
            record = {
                "prompt_index": i,
                "unit_ids": list(p.unit_ids),
                "strategy": p.strategy,
                "messages": [dict(m) for m in p.messages],
                "response_prefix": p.response_prefix,
                "output": g.text,
                "error": g.error,
                "n_prompt_tokens": g.n_prompt_tokens,
                "n_output_tokens": g.n_output_tokens,
                "answers": [attrs.asdict(by_unit[u]) for u in p.unit_ids if u in by_unit],
            }
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def _write_results(
    plan: RunPlan, by_unit: Mapping[str, Annotation], key_added: str
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-cell columns (label, confidence, reasoning, status, note) and a summary."""
    cell_ids = plan.sentences.cell_ids
    n = len(cell_ids)
    label = np.full(n, None, dtype=object)
    conf = np.full(n, np.nan)
    reasoning = np.full(n, "", dtype=object)
    status = np.full(n, STATUS_UNRESOLVED, dtype=object)
    note = np.full(n, "", dtype=object)
    empty = plan.sentences.empty()
    note[empty] = EMPTY_NOTE
    extra: dict[str, Any] = {}

    def fill(row: int, ann: Annotation) -> None:
        label[row] = ann.label if ann.status == STATUS_OK else None
        conf[row] = np.nan if ann.confidence is None else ann.confidence
        reasoning[row] = ann.reasoning
        status[row] = ann.status
        note[row] = ann.note

    if plan.representatives is None:
        for row in plan.unit_rows.tolist():
            ann = by_unit.get(str(cell_ids[row]))
            if ann is not None:
                fill(row, ann)
    else:
        per_cell = np.full(n, None, dtype=object)
        clusters = {}
        codes = plan.groups.astype(str).to_numpy()
        for group, rows in plan.representatives.items():
            anns = [by_unit[str(cell_ids[r])] for r in rows if str(cell_ids[r]) in by_unit]
            for r in rows:
                a = by_unit.get(str(cell_ids[r]))
                per_cell[r] = a.label if a is not None else None
            ok = [a for a in anns if a.status == STATUS_OK]
            winner, share, mean_conf = majority_vote(
                [a.label for a in ok], [np.nan if a.confidence is None else a.confidence for a in ok]
            )
            members = np.flatnonzero(codes == group)
            if winner is None:
                status[members] = STATUS_UNRESOLVED
                note[members] = "no representative of this group was resolved"
                reasoning[members] = anns[0].reasoning if anns else ""
            else:
                label[members] = winner
                status[members] = STATUS_OK
                conf[members] = mean_conf
                reasoning[members] = next(a.reasoning for a in ok if a.label == winner)
                note[members] = f"{groupby_note(share, len(ok))}"
            clusters[group] = {
                "label": winner or "",
                "vote_share": share,
                "n_representatives": len(rows),
                "representatives": [str(cell_ids[r]) for r in rows],
            }
        extra["per_cell"] = per_cell
        extra["clusters"] = clusters
    frame = pd.DataFrame(
        {
            key_added: pd.Categorical(label),
            f"{key_added}_confidence": conf,
            f"{key_added}_reasoning": reasoning,
            f"{key_added}_status": pd.Categorical(status, categories=[STATUS_OK, STATUS_UNRESOLVED]),
            f"{key_added}_note": note,
        },
        index=pd.Index(cell_ids.astype(str)),
    )
    if "per_cell" in extra:
        frame[f"{key_added}_cell"] = pd.Categorical(extra["per_cell"])
    ontology_id, ontology_name = map_to_ontology(frame[key_added])
    frame[f"{key_added}_ontology_id"] = ontology_id
    frame[f"{key_added}_ontology_name"] = ontology_name
    counts = frame[key_added].value_counts().to_dict()
    summary = {
        "n_cells": n,
        "n_ok": int((status == STATUS_OK).sum()),
        "n_unresolved": int((status == STATUS_UNRESOLVED).sum()),
        "n_empty": int(empty.sum()),
        "label_counts": {str(k): int(v) for k, v in counts.items()},
    }
    if "clusters" in extra:
        summary["clusters"] = extra["clusters"]
    return frame, summary


def map_to_ontology(labels: pd.Series) -> tuple[pd.Categorical, pd.Categorical]:
    """Cell Ontology id and name of each label (each distinct label looked up once); NaN where a label
    does not map to a term unambiguously (never forced)."""
    from .domain.ontology import get_ontology

    onto = get_ontology()
    categories = [str(c) for c in pd.Categorical(labels).categories]
    ids = {c: onto.lookup(c) for c in categories}
    values = labels.astype(object).where(labels.notna(), None).tolist()
    id_list = [ids.get(str(v)) if v is not None else None for v in values]
    name_list = [onto.name(i) if i else None for i in id_list]
    return pd.Categorical(id_list), pd.Categorical(name_list)


def groupby_note(share: float, n: int) -> str:
    return f"group label by majority vote ({share:.0%} of {n} resolved representatives)"


def annotate(
    data: Any,
    *,
    modality: str = "rna",
    mod: str | None = None,
    prompt: str = "zero-shot",
    model: str | Model | None = None,
    mode: str = "direct",
    candidates: Sequence[str] | None = None,
    reference: Any = None,
    reference_key: str | None = None,
    reference_modality: str | None = None,
    k: int = 3,
    groupby: str | None = None,
    n_representatives: int | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    sentence: str = "auto",
    n_genes: int | None = None,
    generation: Mapping[str, Any] | None = None,
    decode: str = "generate",
    seed: int = 0,
    max_prompt_tokens: int | None = None,
    batch_size: int | None = None,
    checkpoint: str | Path | None = None,
    adapter: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    tissue: str | None = None,
    model_options: Mapping[str, Any] | None = None,
    prompt_options: Mapping[str, Any] | None = None,
    sentence_options: Mapping[str, Any] | None = None,
    modality_options: Mapping[str, Any] | None = None,
    sidecar: str | Path | bool | None = None,
    chunk_size: int = 10_000,
    progress: bool = True,
    key_added: str = "cellscribe",
    host: Host | None = None,
) -> dict[str, Any]:
    """Annotate ``data`` in place and return the run summary. See :func:`cellscribe.tl.annotate`."""
    host = host or get_host()
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    run_id = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    load_args = {"device": device, "dtype": dtype, "trust_remote_code": trust_remote_code,
                 "batch_size": batch_size, "tissue": tissue, "model_options": model_options}
    handle = model if isinstance(model, Model) else None
    if handle is not None:
        check_run_options(handle, {"adapter": adapter, **load_args})
    model_name = handle.name if handle else resolve_model_name(model)

    plan = plan_run(
        data, modality=modality, mod=mod, prompt=prompt, model=model_name, mode=mode,
        candidates=candidates, reference=reference, reference_key=reference_key,
        reference_modality=reference_modality, k=k,
        groupby=groupby, n_representatives=n_representatives, layer=layer, use_raw=use_raw,
        sentence=sentence, n_genes=n_genes, seed=seed, max_prompt_tokens=max_prompt_tokens,
        prompt_options=prompt_options, sentence_options=sentence_options,
        modality_options=modality_options, chunk_size=chunk_size, build_prompts=False, host=host,
    )
    if handle is None:
        handle = load_model(model_name, adapters={modality: adapter} if adapter else None, host=host, **load_args)
    loaded = handle.loaded
    load_options = handle.options
    if hasattr(loaded, "use_modality"):  # the modality's adapter when the model has one, else the base
        loaded.use_modality(modality)
    # Models that weigh genes against knowledge score within what this data set can show.
    observability = loaded.use_assay(plan.assay) if hasattr(loaded, "use_assay") else None
    plan.make_prompts(getattr(loaded, "count_tokens", None))
    if hasattr(loaded, "survey"):  # a model may look at the whole run first (a tissue context)
        context = loaded.survey(plan.prompts)
        if context:
            observability = {**dict(observability or {}), "context": context}

    t1 = time.perf_counter()
    from tqdm.auto import tqdm

    settings = dict(generation or {})
    if decode != "generate":
        modes = tuple(getattr(loaded, "decode_modes", ("generate",)))
        if decode not in modes:
            raise ValueError(
                f"model {model_name!r} ({handle.backend} backend) cannot decode={decode!r}; it supports "
                f"{', '.join(modes)}. Use a local transformers model for constrained decoding and scoring."
            )
        settings["decode"] = decode
    with tqdm(total=len(plan.prompts), desc="cellscribe", unit="prompt", disable=None if progress else True) as bar:
        generations, resumed = run_batches(
            loaded, plan.prompts, settings=settings, model=f"{model_name}|assay:{plan.assay.digest}",
            batch_prompts=_batch_prompts(loaded, load_options["batch_size"]),
            folder=checkpoint, progress=bar.update,
        )
    gen_seconds = time.perf_counter() - t1
    by_unit = _decode_all(plan, generations, host)
    frame, summary = _write_results(plan, by_unit, key_added)

    sidecar_path: Path | None
    if sidecar is False:
        sidecar_path = None
    else:
        sidecar_path = Path(sidecar) if sidecar not in (None, True) else _default_sidecar(key_added, run_id)
        _write_sidecar(sidecar_path, plan, generations, by_unit)

    adata = plan.adata
    target = pd.Index(adata.obs_names.astype(str))
    if not frame.index.equals(target):  # several modalities: only the cells present in all were run
        frame = frame.reindex(target)
    for column in frame.columns:
        adata.obs[column] = frame[column].to_numpy() if not isinstance(
            frame[column].dtype, pd.CategoricalDtype
        ) else frame[column].values
    params = {
        **plan.params,
        "generation": dict(generation or {}),
        "decode": decode,
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "resumed_batches": resumed,
        "generation_defaults": dict(plan.prompts[0].generation) if plan.prompts else {},
        "model_info": dict(loaded.info()) if hasattr(loaded, "info") else {},
        "adapter": load_options["adapters"].get(modality),
        "adapters": dict(load_options["adapters"]),
        "batch_size": load_options["batch_size"],
        "device": load_options["device"],
        "dtype": load_options["dtype"],
        "trust_remote_code": load_options["trust_remote_code"],
        "tissue": load_options["tissue"],
        "model_options": {k_: str(v) for k_, v in load_options["model_options"].items()},
        "versions": _versions(),
        "run_id": run_id,
        "started": run_id[:15],
    }
    summary.update(
        {
            "seconds_generation": round(gen_seconds, 3),
            "n_prompts": len(plan.prompts),
            "sidecar": str(sidecar_path) if sidecar_path else None,
        }
    )
    entry = {
        "params": _h5_safe(params),
        "summary": _h5_safe({k: v for k, v in summary.items() if k != "clusters"}),
        "sidecar": str(sidecar_path) if sidecar_path else "",
    }
    if "clusters" in summary:
        entry["clusters"] = _h5_safe(summary["clusters"])
    if observability:
        entry["observability"] = _h5_safe(dict(observability))
    adata.uns[key_added] = entry
    if plan.mod is not None:
        _mirror_to_mudata(data, plan.mod, list(frame.columns), key_added, entry)
    log.info(
        "annotated %d cells: %d ok, %d unresolved (%d prompts, %.1f s generation)",
        summary["n_cells"], summary["n_ok"], summary["n_unresolved"], len(plan.prompts), gen_seconds,
    )
    return summary


def _mirror_to_mudata(mdata: Any, mod: str, columns: list[str], key_added: str, entry: dict) -> None:
    """Pull the modality's new obs columns into ``mdata.obs`` as ``"{mod}:{column}"`` (mudata's own
    ``pull_obs``, so the MuData stays consistent) and record the run in ``mdata.uns``."""
    mdata.pull_obs(columns=columns, mods=[mod])
    mdata.uns[f"{mod}:{key_added}"] = entry


# -------------------------------------------------------------------------------------------------
# Sentences to a file
# -------------------------------------------------------------------------------------------------


def write_sentences(
    data: Any,
    output: str | Path,
    *,
    format: str = "jsonl",
    modality: str = "rna",
    mod: str | None = None,
    sentence: str | None = None,
    n_genes: int | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    label_key: str | None = None,
    reasoning: bool = False,
    format_options: Mapping[str, Any] | None = None,
    sentence_options: Mapping[str, Any] | None = None,
    modality_options: Mapping[str, Any] | None = None,
    chunk_size: int = 10_000,
    host: Host | None = None,
) -> int:
    """Stream cell sentences of ``data`` to ``output`` in the file format ``format``.

    Chunks of cells go from the modality through the sentence strategy into the format writer one at a
    time, so memory stays bounded on backed files. ``sentence=None`` uses the format's own strategy
    (``ranked-hvg`` for ``cellreasoner``, ``top-expressed`` for ``cellpuzzles``) or ``auto``. Writes
    only ``output`` (the caller makes it atomic). Returns the number of records written.
    """
    host = host or get_host()
    reg = host.registry
    fmt = reg.get("format", format)
    modality_c = reg.get("modality", modality)
    adata, _ = select_modality_data(data, modality_c, mod)
    labels = None
    if label_key is not None:
        labels = _labels(adata.obs, label_key, "the data")
        labels.index = labels.index.astype(str)
    elif getattr(fmt, "needs_labels", False):
        raise ValueError(f"format {format!r} needs labels: pass --label-key COLUMN (an obs column)")
    strategy_name = sentence or getattr(fmt, "sentence", None) or "auto"
    features = modality_c.prepare(
        adata, layer=layer, use_raw=use_raw, chunk_size=chunk_size, **dict(modality_options or {})
    )
    strategy = reg.get("sentence", strategy_name)
    state: dict = {}
    chunks = strategy.build(
        features, n_genes=n_genes, state=state, chunk_size=chunk_size,
        strategies=reg.all("sentence"), **dict(sentence_options or {}),
    )
    with open(output, "wb") as fh:
        n = fmt.write(fh, chunks, labels=labels, obs=adata.obs, reasoning=reasoning, **dict(format_options or {}))
    log.info("wrote %d %s records to %s", n, format, output)
    return n
