"""Step 3, execute: the model answers the plan's prompts and the decoders read the answers.

The model is loaded (or the given :class:`~cellscribe.core.models.Model` reused), switched to the run's
modality and data (``use_modality``, ``use_assay``), the prompts are built with its tokenizer, and the
prompts run in checkpointed batches (:mod:`.checkpoint`). Every optional capability of the model is read
as an attribute: the protocol declares its default (:mod:`cellscribe.core.components`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ..answers import printable
from ..models import Model, load_model
from ..plugins import Host, get_host
from ..types import Annotation, Generation, Prompt
from .checkpoint import Checkpoint, identity_digest, path_digest
from .plan import RunPlan

log = logging.getLogger(__name__)

#: Prompts per checkpointed batch, in multiples of the backend's batch size.
CHECKPOINT_BATCHES = 8


@attrs.frozen(eq=False)
class Execution:
    """What the model did: one generation per prompt, the batches resumed from a checkpoint, the
    seconds spent generating, what the model reported about the data (``observability``), and why the
    run stopped before every prompt was sent (``stopped``, ``None`` when it did not)."""

    model: Model
    generations: list[Generation]
    resumed: int
    seconds: float
    observability: Mapping[str, Any] | None
    stopped: str | None = None

    @property
    def failed(self) -> int:
        """Prompts whose model call failed (or was never made): their units are unresolved."""
        return sum(1 for g in self.generations if g.error)


def model_for(plan: RunPlan, host: Host) -> Model:
    """The run's model: the loaded one it was given, else loaded now from the spec's load options (the
    run's ``adapter`` for its modality)."""
    m = plan.spec.model
    if m.handle is not None:
        return m.handle
    adapters = {plan.spec.data.modality: m.adapter} if m.adapter else None
    return load_model(m.name, adapters=adapters, host=host, **m.load_options())


def model_identity(plan: RunPlan, model: Model) -> dict[str, Any]:
    """What determines the answers of ``model`` to this run's prompts, for its checkpoint: name, backend,
    the loaded model's own identity (``LoadedModel.identity``; by default its ``info`` and every model
    option), the adapter, dtype, the content digest of every local file or model folder it was loaded
    from (weights, adapter, tokenizer, marker table) and the assay. Credentials never enter it."""
    from .record import without_credentials

    loaded, options = model.loaded, model.options
    adapter = options["adapters"].get(plan.spec.data.modality)
    own = loaded.identity()
    if own is None:
        own = {"info": dict(loaded.info()), "model_options": dict(options["model_options"])}
    sources = {"model": model.name, "adapter": adapter,
               **{f"model_options.{k}": v for k, v in options["model_options"].items()}}
    if isinstance(own, Mapping) and isinstance(own.get("base_model"), str):
        sources["base_model"] = own["base_model"]
    files = {where: digest for where, value in sources.items() if (digest := path_digest(value)) is not None}
    return without_credentials({
        "model": model.name,
        "backend": model.backend,
        "loaded": dict(own),
        "adapter": adapter,
        "dtype": options["dtype"],
        "trust_remote_code": options["trust_remote_code"],
        "files": files,
        "assay": plan.assay.digest,
    })


def batch_prompts(loaded: Any, batch_size: int | None) -> int:
    """Prompts per checkpointed batch: what the model asks for (``prompts_per_call``), else enough to
    keep every concurrent request of a serving backend busy for several calls."""
    if loaded.prompts_per_call:
        return int(loaded.prompts_per_call)
    return max(1, batch_size or 8, loaded.max_concurrency) * CHECKPOINT_BATCHES


def generation_settings(spec: Any, model: Model) -> dict[str, Any]:
    """The user's generation settings for ``model``, with ``decode`` when it is not plain generation (a
    ``ValueError`` when the model cannot decode that way)."""
    settings = dict(spec.generation.generation)
    decode = spec.generation.decode
    if decode != "generate":
        modes = tuple(model.loaded.decode_modes)
        if decode not in modes:
            raise ValueError(
                f"model {model.name!r} ({model.backend} backend) cannot decode={decode!r}; it supports "
                f"{', '.join(modes)}. Use a local transformers model for constrained decoding and scoring."
            )
        settings["decode"] = decode
    return settings


def execute(
    plan: RunPlan, model: Model, run_id: str = "", *, host: Host | None = None, survey: Sequence[Prompt] | None = None
) -> Execution:
    """Build the plan's prompts for ``model`` and generate every answer (see the module docstring), with
    the run's executor (``executor=``: in this process, or replicas of the model on a cluster).

    With ``spec.output.checkpoint`` the folder is owned by this run while it generates
    (:class:`~cellscribe.core.run.checkpoint.CheckpointInUse` when another run holds it) and keeps
    every finished batch; nothing is removed here. ``survey``: the prompts the model looks at before
    answering (``LoadedModel.survey``; default the plan's)."""
    spec = plan.spec
    loaded = model.loaded
    loaded.use_modality(spec.data.modality)  # the modality's adapter when the model has one, else the base
    # Models that weigh genes against knowledge score within what this data set can show.
    observability = loaded.use_assay(plan.assay)
    plan.make_prompts(loaded.count_tokens)
    # A model may look at the whole run first (a tissue context); a budgeted run's second round passes
    # the first round's prompts, so that both rounds are answered in one context.
    surveyed = plan.prompts if survey is None else survey
    context = loaded.survey(surveyed)
    if context:
        observability = {**dict(observability or {}), "context": context}

    settings = generation_settings(spec, model)

    from tqdm.auto import tqdm

    started = time.perf_counter()
    identity = model_identity(plan, model)
    disable = None if spec.output.progress else True  # None: a bar only on a terminal, drawn once
    with contextlib.ExitStack() as stack:
        checkpoint = None
        if spec.output.checkpoint is not None:
            checkpoint = stack.enter_context(Checkpoint.open(spec.output.checkpoint, identity, run=run_id))
        bar = stack.enter_context(tqdm(total=len(plan.prompts), desc="cellscribe", unit="prompt", disable=disable))
        run = spec.execution
        executor = (host or get_host()).registry.get("executor", run.executor)
        # The executor runs run_batches's batches here or on replicas made as this model was made.
        replica = model.replica(modality=spec.data.modality, assay=plan.assay,
                                surveyed=surveyed if context else None)
        outcome = executor.run(
            loaded, plan.prompts, replica=replica, address=run.executor_address, options=dict(run.executor_options),
            settings=settings, model=identity_digest(identity),
            batch_prompts=batch_prompts(loaded, model.options["batch_size"]),
            checkpoint=checkpoint, progress=bar.update,
        )
    if outcome.failed:
        log.warning(
            "%d of %d prompts got no answer from the model%s; their cells are unresolved%s",
            outcome.failed, len(plan.prompts), f" ({outcome.stopped})" if outcome.stopped else "",
            f"; with the checkpoint {spec.output.checkpoint}, the same run again sends only them"
            if checkpoint is not None else "",
        )
    return Execution(model, outcome.generations, outcome.resumed, time.perf_counter() - started, observability,
                     outcome.stopped)


def decode_all(prompts: Sequence[Prompt], generations: Sequence[Generation], host: Host) -> dict[str, Annotation]:
    """Decode every prompt with the decoder it names (the labels it matches to are the prompt's
    candidates); a decoder that raises makes its units unresolved instead of stopping the run. Control
    characters in an answer (a NUL, which h5ad cannot store) are replaced by spaces first, and the
    units' note says so; the generations themselves (the sidecar, the checkpoint) keep the raw text."""
    by_unit: dict[str, Annotation] = {}
    decoders: dict[str, Any] = {}
    for prompt, generation in zip(prompts, generations, strict=True):
        text, removed = printable(generation.text)
        error, removed_error = printable(generation.error) if generation.error else (generation.error, 0)
        if removed or removed_error:
            # Control characters (a NUL) cannot be stored in h5ad strings; the sidecar keeps the raw text.
            generation = attrs.evolve(generation, text=text, error=error or None)
        try:
            decoder = decoders.get(prompt.decoder)
            if decoder is None:
                decoder = decoders[prompt.decoder] = host.registry.get("decoder", prompt.decoder)
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
            if removed:
                note = f"the answer held {removed} control character(s), replaced by spaces (raw text in the sidecar)"
                annotation = attrs.evolve(annotation, note="; ".join(n for n in (annotation.note, note) if n))
            by_unit[annotation.unit_id] = annotation
    return by_unit
