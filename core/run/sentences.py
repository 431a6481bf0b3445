"""Step 1, sentences: a FeatureMatrix to ranked gene lists with a registered sentence strategy.

:func:`sentence_chunks` is the one call of a strategy (``cellscribe sentences`` streams it);
:func:`build_sentences` joins its chunks; :func:`prepare_sentences` is the whole of step 1 for a run or
``tl.sentences``: the data prepared by its modalities, then their sentences (one section per modality
for ``"rna+atac"``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs
import pandas as pd

from ..plugins import Host
from ..spec import DataSpec, SentenceSpec
from ..types import CellSentences, FeatureMatrix
from .data import Prepared, prepare_data


def sentence_chunks(features: FeatureMatrix, spec: SentenceSpec, *, state: dict, host: Host,
                    chunk_size: int = 10_000, groups: pd.Series | None = None) -> Iterator[CellSentences]:
    """The sentence strategy ``spec.sentence`` over ``features``, chunk by chunk (``state``: what a
    strategy learns from the data, shared with a reference).

    ``groups``: the run's groups (``obs[groupby]``), given as ``groups=`` to a strategy that ranks genes
    per group (``uses_groups``, e.g. ``cluster-markers``) unless ``sentence_options`` already has them.
    """
    strategy = host.registry.get("sentence", spec.sentence)
    options = dict(spec.sentence_options)
    if groups is not None and strategy.uses_groups:
        options.setdefault("groups", groups)
    return strategy.build(
        features, n_genes=spec.n_genes, state=state, chunk_size=chunk_size,
        strategies=host.registry.all("sentence"), **options,
    )


def build_sentences(features: FeatureMatrix, spec: SentenceSpec, *, state: dict, host: Host,
                    chunk_size: int = 10_000, groups: pd.Series | None = None) -> CellSentences:
    """All sentences of ``features`` (:func:`sentence_chunks` joined)."""
    chunks = list(sentence_chunks(features, spec, state=state, host=host, chunk_size=chunk_size, groups=groups))
    if not chunks:
        raise ValueError("the data has no cells")
    return CellSentences.concatenate(chunks)


def run_groups(prepared: Prepared, groupby: str | None) -> pd.Series | None:
    """The run's groups, ``obs[groupby]`` of the annotated data, indexed by cell id (``None`` without
    ``groupby``)."""
    if groupby is None:
        return None
    groups = prepared.adata.obs[groupby].iloc[prepared.rows]
    return groups.set_axis(pd.Index(prepared.features.cell_ids.astype(str)))


def sentences_of(prepared: Prepared, spec: SentenceSpec, *, state: dict, host: Host,
                 chunk_size: int = 10_000, groupby: str | None = None) -> CellSentences:
    """The sentences of prepared data: one modality's, or one section per modality (each with its own
    part of ``state``). With ``groupby``, a strategy that ranks genes per group gets the run's groups."""
    groups = run_groups(prepared, groupby)
    if len(prepared.parts) == 1:
        return build_sentences(prepared.features, spec, state=state, host=host, chunk_size=chunk_size, groups=groups)
    return CellSentences.combine([
        (label, build_sentences(features, spec, state=state.setdefault(name, {}), host=host, chunk_size=chunk_size,
                                groups=groups))
        for label, name, features in prepared.parts
    ])


@attrs.frozen(eq=False)
class PreparedSentences:
    """Step 1's result: the prepared data (:class:`~cellscribe.core.run.data.Prepared`), its sentences
    and what the strategy learned (``state``)."""

    data: Prepared
    sentences: CellSentences
    state: dict


def prepare_sentences(data: Any, data_spec: DataSpec, sentence_spec: SentenceSpec, *, host: Host,
                      groupby: str | None = None) -> PreparedSentences:
    """Data to cell sentences: the modality (or modalities) prepare the data, the strategy ranks it."""
    prepared = prepare_data(data, data_spec, host=host, groupby=groupby)
    state: dict = {}
    sentences = sentences_of(prepared, sentence_spec, state=state, host=host, chunk_size=data_spec.chunk_size,
                             groupby=groupby)
    return PreparedSentences(prepared, sentences, state)


def sentences_frame(sentences: CellSentences) -> pd.Series:
    """Cell sentences as a Series of strings indexed by cell id (metadata in ``.attrs``)."""
    series = pd.Series(sentences.texts(), index=pd.Index(sentences.cell_ids, name="cell_id"), name="sentence")
    series.attrs["strategy"] = sentences.strategy
    series.attrs["params"] = dict(sentences.params)
    return series
