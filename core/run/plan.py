"""Step 2, plan: everything decided before a model is loaded (what ``--dry-run`` prints).

:func:`resolve` completes a spec with what the model asks for (a manifest's formats, a backend's
sentence preferences) wherever the user kept the defaults; :func:`plan_run` prepares the sentences (of
the reference first, when a k-shot reference teaches the strategy), chooses the units and the prompt
arguments. Every input check happens here or in the spec, before any model work.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import numpy as np
import pandas as pd

from ..domain.tissues import StatedTissues, stated_tissues
from ..plugins import Host, get_host
from ..spec import RunSpec
from ..types import Assay, CellSentences, FeatureMatrix, Prompt
from .data import is_mudata, label_column, prepare_data, prepare_reference
from .sentences import build_sentences, sentences_of
from .units import pick_representatives

log = logging.getLogger(__name__)

#: The parameters a model manifest may set, where the user kept their defaults.
MANIFEST_OVERRIDABLE = ("prompt", "sentence", "n_genes", "mode", "prompt_options", "sentence_options")


@attrs.define
class RunPlan:
    """Everything decided before the model runs (what ``--dry-run`` prints).

    ``spec`` is the resolved spec; ``found`` what the plan learned about the data (the matrix read,
    the sentence strategy ``auto`` chose and its state, the reference, the assay, the plugins used),
    recorded with the spec in ``uns[key_added]["params"]``.
    """

    spec: RunSpec
    adata: Any
    mod: str | None
    features: FeatureMatrix
    sentences: CellSentences
    unit_rows: np.ndarray  # rows of ``sentences`` that are prompted
    groups: pd.Series | None
    representatives: dict[str, list[int]] | None
    prompt_strategy: Any
    prompt_args: dict[str, Any]
    assay: Assay
    found: dict[str, Any]
    tissues: StatedTissues | None = None  # per row of ``sentences``: the tissue the run gives the model
    prompts: list[Prompt] = attrs.field(factory=list)
    #: Row of ``adata`` of each row of ``sentences`` (results are written by position).
    rows: np.ndarray | None = None
    #: With ``budget=``: the :class:`~cellscribe.core.run.budget.Budget` (embedding, graph, rounds).
    budget: Any = None
    #: With a neighbour vote: the :class:`~cellscribe.core.run.vote.Vote` (cells, kNN graph).
    vote: Any = None

    @property
    def params(self) -> dict[str, Any]:
        """The resolved spec and what the plan found, as recorded (before the model adds its part)."""
        return {**self.spec.to_params(), **self.found}

    def make_prompts(self, count_tokens: Callable[[str], int | None] | None = None) -> list[Prompt]:
        """Build the prompts of the prompted units (``count_tokens`` from the model's tokenizer)."""
        units = self.sentences.take(self.unit_rows)
        prompts = self.prompt_strategy.build(units, count_tokens=count_tokens, **self.prompt_args)
        self.prompts = with_tissues(prompts, self.tissues, self.sentences.cell_ids)
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
            "prompt_strategy": self.spec.prompts.prompt,
            "model": self.spec.model.name,
            "estimated_prompt_tokens": int(chars / 3.5),
            "max_new_tokens_per_prompt": gen.get("max_new_tokens"),
            **(self.budget.summary() if self.budget is not None else {}),
        }

    def estimate(self, *, rates: Mapping[str, Any] | None = None, measure: bool = True,
                 host: Host | None = None) -> dict[str, Any]:
        """The run's cost before it runs: prompts, prompt and new tokens, the model's estimated time and
        where its rates come from (:func:`~cellscribe.core.run.estimate.estimate_run`; ``rates`` override
        them: ``prompt_tokens_per_s``, ``new_tokens_per_s``, ``prompts_per_s``). A local model is loaded
        and timed on a few prompts unless ``measure=False``; nothing is written."""
        from .estimate import estimate_run

        return estimate_run(self, rates=rates, measure=measure, host=host)


def resolve(spec: RunSpec, host: Host) -> tuple[RunSpec, Any, dict[str, Any]]:
    """The spec completed by its model, the model's backend component, and the parameters the model set
    (with the values the user gave them).

    A model manifest (``adapters/manifests``) sets the formats its model was trained with, and a
    backend may ask for its sentence settings (for the run's modality first), wherever the user kept
    cellscribe's defaults. The run records which parameters they set and what the user gave
    (``"set_by_model"``): re-created, the run starts from the user's values and its model sets the rest
    again (a preference may hold a function, which no record can).
    """
    given = spec
    from ..domain.manifests import find_manifest

    name = spec.model.name
    defaults = RunSpec().kwargs()
    manifest = find_manifest(name)
    if manifest is not None:
        chosen = {
            key: value for key, value in manifest.annotate_defaults().items()
            if key in MANIFEST_OVERRIDABLE and spec[key] == defaults[key]
        }
        for key, value in chosen.items():
            log.info("model manifest %s sets %s=%r", manifest.name, key, value)
        spec = spec.replace(**chosen) if chosen else spec
    adapter = adapter_manifest_for(spec)
    if adapter is not None:  # a cellscribe-trained adapter: its records' settings, checked and applied
        adapter.check(spec.kwargs(), defaults, modality=spec.data.modality, model=name)
        chosen = {key: value for key, value in adapter.run_defaults().items()
                  if spec[key] == defaults[key] or (key == "sentence" and spec[key] == "auto")}
        for key, value in chosen.items():
            log.info("adapter %s sets %s=%r", adapter.path, key, value if key != "candidates" else f"{len(value)} labels")
        spec = spec.replace(**chosen) if chosen else spec
        generation = dict(spec.generation.generation)
        if not {"calibration", "length_normalize"} & set(generation):  # scored as it was trained
            spec = spec.replace(generation={**generation, "calibration": adapter.calibration})
            log.info("adapter %s sets calibration=%r for decode='score'", adapter.path, adapter.calibration)
        if spec.sentences.n_genes != adapter.n_genes:
            warnings.warn(f"adapter {adapter.path} was trained on {adapter.n_genes}-gene sentences; this run "
                          f"makes {spec.sentences.n_genes}-gene ones", UserWarning, stacklevel=3)
    backend = host.registry.backend_for(name)
    prefs = dict(backend.sentence_preferences or {})
    prefs.update(prefs.pop("modalities", {}).get(spec.data.modality, {}))  # a modality's own preferences win
    if spec.sentences.sentence == "auto" and spec.sentences.n_genes is None and prefs:
        spec = spec.replace(
            sentence=prefs.get("sentence", "auto"), n_genes=prefs.get("n_genes"),
            sentence_options={**prefs.get("options", {}), **spec.sentences.sentence_options},
        )
        log.info("model %s asks for %s sentences (n_genes=%s)", name, spec.sentences.sentence, spec.sentences.n_genes)
    set_by_model = {k: given.to_params()[k] for k, v in spec.kwargs().items()
                    if k != "reference" and given[k] is not v and given[k] != v}
    return spec, backend, set_by_model


def adapter_manifest_for(spec: RunSpec) -> Any:
    """The :class:`~cellscribe.core.domain.adapters.AdapterManifest` of the adapter a run of ``spec``
    answers with (its ``adapter=``, or the loaded model's adapter for the run's modality), or ``None``."""
    from ..domain.adapters import read_adapter_manifest

    m = spec.model
    path = m.adapter if m.handle is None else m.handle.options.get("adapters", {}).get(spec.data.modality)
    return read_adapter_manifest(path) if path else None


def plan_run(data: Any, spec: RunSpec | None = None, *, host: Host | None = None,
             count_tokens: Callable[[str], int | None] | None = None, build_prompts: bool = True,
             **params: Any) -> RunPlan:
    """Prepare a run up to (not including) the model call.

    ``spec`` (or the run parameters as keywords, as ``tl.annotate`` takes them) says what to do. With
    ``build_prompts=False`` the prompts are left for :meth:`RunPlan.make_prompts` (called once the
    model's tokenizer can count).
    """
    host = host or get_host()
    reg = host.registry
    spec = spec if spec is not None else RunSpec.from_kwargs(**params)
    spec, backend, set_by_model = resolve(spec, host)
    d, s, p = spec.data, spec.sentences, spec.prompts
    prompt_c = reg.get("prompt", p.prompt)
    # An unknown executor, or one that cannot run here (Ray not installed), stops before the data is read.
    x = spec.execution
    reg.get("executor", x.executor).check(address=x.executor_address, options=dict(x.executor_options))

    # Step 1: the data as its modality prepares it; a k-shot reference's sentences come first, so a
    # strategy that learns from the data (data-hvg) learns on the reference and the query reuses it.
    t0 = time.perf_counter()
    prepared = prepare_data(data, d, host=host, groupby=p.groupby)
    adata, features = prepared.adata, prepared.features
    # obs of the annotated cells by position, indexed by their unit ids (unique even where obs names repeat)
    cell_obs = adata.obs.iloc[prepared.rows].set_axis(pd.Index(features.cell_ids.astype(str)))
    adapter = adapter_manifest_for(spec)
    # A trained adapter's sentences reuse what its strategy learned on the training cells (a gene list).
    state: dict = copy.deepcopy(dict(adapter.sentence_state)) if adapter is not None else {}
    ref_sentences = ref_labels = ref_source = ref_genes = None
    reference_modality = p.reference_modality
    if p.reference_key is not None:
        if p.reference is not None:
            ref_adata, labels, ref_features, reference_modality, ref_genes = prepare_reference(
                p.reference, p.reference_key, adata, features, modality=d.modality,
                reference_modality=p.reference_modality, mod=prepared.mod, layer=d.layer, use_raw=d.use_raw,
                chunk_size=d.chunk_size, modality_options=d.modality_options, host=host,
            )
            ref_sentences = build_sentences(ref_features, s, state=state, host=host, chunk_size=d.chunk_size)
            ref_source = f"AnnData with {ref_adata.n_obs} cells"
        else:  # the labelled cells of the query itself
            labels = label_column(adata.obs, p.reference_key, "the query")
            ref_source = "query"
    sentences = sentences_of(prepared, s, state=state, host=host, chunk_size=d.chunk_size, groupby=p.groupby)
    log.info("%d cell sentences (%s) in %.2f s", len(sentences), sentences.strategy, time.perf_counter() - t0)
    if ref_source is not None:
        if ref_sentences is None:
            ref_sentences = sentences
        keep = labels.notna().to_numpy() & ~ref_sentences.empty()
        if not keep.any():
            raise ValueError(f"reference column {p.reference_key!r} has no labelled cell with expressed genes")
        ref_sentences = ref_sentences.take(np.flatnonzero(keep))
        ref_labels = labels.astype(str).to_numpy()[keep].tolist()

    # Units: every cell with a sentence, or representative cells of each group.
    groups = representatives = None
    if p.groupby is not None:
        groups = cell_obs[p.groupby]
        per_group = p.n_representatives or prompt_c.representatives_per_group
        representatives = pick_representatives(sentences, groups, per_group) if p.budget is None else None
        unit_rows = np.array(sorted(r for rows in (representatives or {}).values() for r in rows), dtype=np.int64)
    else:
        unit_rows = np.flatnonzero(~sentences.empty())
    budget = None
    if p.budget is not None:  # only some cells are sent (core/run/budget.py)
        from .budget import plan_budget

        budget = plan_budget(prepared, sentences, spec, cell_obs, groups, host)
        unit_rows = budget.first
        representatives = budget.by_group(unit_rows) if groups is not None else None

    # Each cell's label decided with its neighbours' (core/run/vote.py; none with groups or a budget).
    from .vote import plan_vote

    vote = plan_vote(prepared, sentences, spec, host, unit_rows)

    # The cells' tissue: the run's tissue=, else what a standard obs column states per cell (the model
    # infers a context for the cells without one); "any" asks for no tissue at all.
    tissues = stated_tissues(cell_obs, p.tissue, cells=sentences.cell_ids.astype(str))

    prompt_args = {
        "mode": p.mode,
        "candidates": list(p.candidates) if p.candidates else None,
        "reference": ref_sentences,
        "reference_labels": ref_labels,
        "k": p.k,
        "seed": p.seed,
        "obs": cell_obs.iloc[unit_rows],
        "max_prompt_tokens": p.max_prompt_tokens,
        "options": dict(p.prompt_options),
    }
    found = {
        "mod": prepared.mod if len(prepared.parts) == 1 else d.mod,
        "model": spec.model.name,
        "backend": backend.name,
        "sentence_resolved": sentences.strategy,
        "sentence_params": dict(sentences.params),
        "sentence_state": state,
        "matrix": features.source,
        "matrix_notes": [note for _, _, f in prepared.parts for note in f.notes],
        "value_kind": features.value_kind,
        "reference": ref_source,
        "reference_modality": reference_modality or (d.modality if ref_source is not None else None),
        "reference_genes": ref_genes,
        "n_reference_cells": len(ref_labels) if ref_labels else None,
        "k": p.k if ref_labels else None,
        "assay": prepared.assay.summary(),
        "tissue_stated": tissues.summary(),
        "adapter_manifests": {d.modality: adapter.summary()} if adapter is not None else None,
        "set_by_model": sorted(set_by_model),
        "as_given": set_by_model,
        "plugins": {
            "modality": ",".join(reg.entries["modality"][m].plugin for m in d.modality.split("+")),
            "sentence": reg.entries["sentence"][sentences.strategy].plugin
            if sentences.strategy in reg.entries["sentence"] else None,
            "prompt": reg.entries["prompt"][p.prompt].plugin,
            "backend": reg.entries["backend"][backend.name].plugin,
        },
    }
    plan = RunPlan(
        spec, adata, prepared.mod, features, sentences, unit_rows, groups, representatives, prompt_c,
        prompt_args, prepared.assay, found, tissues, rows=prepared.rows, budget=budget, vote=vote,
    )
    if build_prompts:
        plan.make_prompts(count_tokens)
    return plan


def with_tissues(prompts: list[Prompt], tissues: StatedTissues | None, cell_ids: np.ndarray) -> list[Prompt]:
    """``prompts`` with ``Prompt.tissue`` set from the tissue of their units' cells (that of the first
    unit that has one; a prompt's units come from one data set). Prompts of units without a stated
    tissue are returned as they are."""
    if tissues is None or not (tissues.names != "").any():
        return prompts
    by_cell = dict(zip(cell_ids.astype(str).tolist(), tissues.names.tolist()))
    out = []
    for prompt in prompts:
        tissue = next((t for t in (by_cell.get(u, "") for u in prompt.unit_ids) if t), "")
        out.append(attrs.evolve(prompt, tissue=tissue) if tissue and tissue != prompt.tissue else prompt)
    return out


__all__ = ["RunPlan", "plan_run", "resolve", "adapter_manifest_for", "with_tissues", "MANIFEST_OVERRIDABLE", "is_mudata"]
