"""Step 3, execute: the model answers the plan's prompts and the decoders read the answers.

The model is loaded (or the given :class:`~cellscribe.core.models.Model` reused), switched to the run's
modality and data (``use_modality``, ``use_assay``), the prompts are built with its tokenizer, and the
prompts run in checkpointed batches (:mod:`.checkpoint`). Every optional capability of the model is read
as an attribute: the protocol declares its default (:mod:`cellscribe.core.components`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ..models import Model, load_model
from ..plugins import Host
from ..types import Annotation, Generation, Prompt
from .checkpoint import run_batches
from .plan import RunPlan

log = logging.getLogger(__name__)

#: Prompts per checkpointed batch, in multiples of the backend's batch size.
CHECKPOINT_BATCHES = 8


@attrs.frozen(eq=False)
class Execution:
    """What the model did: one generation per prompt, the batches resumed from a checkpoint, the
    seconds spent generating, and what the model reported about the data (``observability``)."""

    model: Model
    generations: list[Generation]
    resumed: int
    seconds: float
    observability: Mapping[str, Any] | None


def model_for(plan: RunPlan, host: Host) -> Model:
    """The run's model: the loaded one it was given, else loaded now from the spec's load options (the
    run's ``adapter`` for its modality)."""
    m = plan.spec.model
    if m.handle is not None:
        return m.handle
    adapters = {plan.spec.data.modality: m.adapter} if m.adapter else None
    return load_model(m.name, adapters=adapters, host=host, **m.load_options())


def batch_prompts(loaded: Any, batch_size: int | None) -> int:
    """Prompts per checkpointed batch: what the model asks for (``prompts_per_call``), else enough to
    keep every concurrent request of a serving backend busy for several calls."""
    if loaded.prompts_per_call:
        return int(loaded.prompts_per_call)
    return max(1, batch_size or 8, loaded.max_concurrency) * CHECKPOINT_BATCHES


def execute(plan: RunPlan, model: Model) -> Execution:
    """Build the plan's prompts for ``model`` and generate every answer (see the module docstring)."""
    spec = plan.spec
    loaded = model.loaded
    loaded.use_modality(spec.data.modality)  # the modality's adapter when the model has one, else the base
    # Models that weigh genes against knowledge score within what this data set can show.
    observability = loaded.use_assay(plan.assay)
    plan.make_prompts(loaded.count_tokens)
    context = loaded.survey(plan.prompts)  # a model may look at the whole run first (a tissue context)
    if context:
        observability = {**dict(observability or {}), "context": context}

    settings = dict(spec.generation.generation)
    decode = spec.generation.decode
    if decode != "generate":
        modes = tuple(loaded.decode_modes)
        if decode not in modes:
            raise ValueError(
                f"model {model.name!r} ({model.backend} backend) cannot decode={decode!r}; it supports "
                f"{', '.join(modes)}. Use a local transformers model for constrained decoding and scoring."
            )
        settings["decode"] = decode

    from tqdm.auto import tqdm

    started = time.perf_counter()
    disable = None if spec.output.progress else True  # None: a bar only on a terminal, drawn once
    with tqdm(total=len(plan.prompts), desc="cellscribe", unit="prompt", disable=disable) as bar:
        generations, resumed = run_batches(
            loaded, plan.prompts, settings=settings, model=f"{model.name}|assay:{plan.assay.digest}",
            batch_prompts=batch_prompts(loaded, model.options["batch_size"]),
            folder=spec.output.checkpoint, progress=bar.update,
        )
    return Execution(model, generations, resumed, time.perf_counter() - started, observability)


def decode_all(prompts: Sequence[Prompt], generations: Sequence[Generation], host: Host) -> dict[str, Annotation]:
    """Decode every prompt with the decoder it names (the labels it matches to are the prompt's
    candidates); a decoder that raises makes its units unresolved instead of stopping the run."""
    by_unit: dict[str, Annotation] = {}
    for prompt, generation in zip(prompts, generations, strict=True):
        try:
            decoder = host.registry.get("decoder", prompt.decoder)
            annotations = decoder.decode(generation, prompt)
            if len(annotations) != len(prompt.unit_ids):
                raise RuntimeError(
                    f"decoder {prompt.decoder!r} returned {len(annotations)} answers for "
                    f"{len(prompt.unit_ids)} units"
                )
        except Exception as exc:  # one bad output or decoder bug never stops the run
            log.warning("decoding failed for units %s: %s", prompt.unit_ids, exc)
            annotations = [
                Annotation.unresolved(u, raw=generation.text, note=f"decoder error: {exc}") for u in prompt.unit_ids
            ]
        for annotation in annotations:
            by_unit[annotation.unit_id] = annotation
    return by_unit
