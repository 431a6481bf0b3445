"""The run: data -> modality -> sentences -> prompts -> model -> decoder -> results, in five steps.

=============  ==================  =================================================================
step           module              what it does
=============  ==================  =================================================================
1. data        :mod:`.data`,       the modality prepares the cells x genes matrix (of the query, of
               :mod:`.sentences`   each modality, of a reference); the sentence strategy ranks it
2. plan        :mod:`.plan`        the spec completed by the model (manifest, preferences), units,
                                   prompt arguments: everything before a model is loaded
3. execute     :mod:`.execute`     the model loads (or is reused), the prompts run in checkpointed
                                   batches (:mod:`.checkpoint`), the decoders read the answers
4. results     :mod:`.results`     per-cell columns, group votes (:mod:`.units`), neighbour votes
                                   (:mod:`.vote`), ontology terms
5. record      :mod:`.record`      ``obs``/``uns`` of the data, the sidecar, the parameters
=============  ==================  =================================================================

A run is defined by one :class:`~cellscribe.core.spec.RunSpec`; :func:`annotate` is what
``cellscribe.tl.annotate`` and ``cellscribe annotate`` call. Every step looks its components up in the
plugin registry by name; nothing here is specific to a modality, strategy or model. Stored CellPuzzles
files are solved by :mod:`.puzzles`, labels transferred without a model by :mod:`.transfer`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import attrs

from ..plugins import Host, get_host
from ..spec import DataSpec, RunSpec, SentenceSpec
from .data import is_mudata, label_column, measured_mask, prepare_data, read_input, select_modality_data
from .execute import decode_all, execute, model_for
from .plan import RunPlan, plan_run
from .record import (
    clusters_table,
    h5_safe,
    new_run_id,
    raw_outputs,
    run_params,
    sidecar_path,
    without_credentials,
    write_results,
    write_sidecar,
)
from .results import EMPTY_NOTE, results_frame, warn_low_confidence
from .units import unit_label_scores
from .sentences import prepare_sentences, sentence_chunks, sentences_frame
from .stream import STREAM_MIN_CELLS, annotate_backed, is_backed, streaming_obstacle

log = logging.getLogger(__name__)

__all__ = [
    "annotate",
    "FailedPromptsError",
    "plan_run",
    "RunPlan",
    "prepare_sentences",
    "write_sentences",
    "read_input",
    "select_modality_data",
    "is_mudata",
    "measured_mask",
    "sentences_frame",
    "EMPTY_NOTE",
    "is_backed",
    "streaming_obstacle",
    "STREAM_MIN_CELLS",
]


class FailedPromptsError(RuntimeError):
    """Some prompts got no answer because their model call failed (a server error or timeout, a server
    that went down, a refused key): raised by ``cellscribe.tl.annotate`` after everything else was
    written. ``summary`` is the run's summary (``n_failed_prompts``, ``n_failed_units``, ``stopped``,
    ``first_error``); ``data`` the annotated copy when ``copy=True`` was asked, else ``None``."""

    def __init__(self, summary: dict[str, Any], *, key_added: str, checkpoint: str | None, data: Any = None) -> None:
        self.summary, self.data = summary, data
        why = summary.get("stopped") or summary.get("first_error") or "model call failed"
        resume = (
            f"run the same call again (checkpoint={checkpoint!r}) to send only the failed prompts"
            if checkpoint else "pass checkpoint=FOLDER to keep the answers, so that a re-run sends only the failed ones"
        )
        copy = " (the annotated copy is this error's .data)" if data is not None else ""
        super().__init__(
            f"{summary['n_failed_prompts']} of {summary['n_prompts']} prompts got no answer from the model ({why}); "
            f"their {summary['n_failed_units']} units are unresolved with the error in obs['{key_added}_note'] and "
            f"everything else is written{copy}; {resume}"
        )


def annotate(data: Any, spec: RunSpec | None = None, *, host: Host | None = None, **params: Any) -> dict[str, Any]:
    """Annotate ``data`` in place as ``spec`` (or the run parameters as keywords) says, and return the
    run's summary. See :func:`cellscribe.tl.annotate` for the parameters and what is written.

    Prompts whose model call failed leave their cells unresolved and are counted in the summary
    (``n_failed_prompts``, ``n_failed_units``; ``stopped`` says why the model stopped answering, if it
    did); this function does not raise for them (``tl.annotate`` does, the command line exits 3)."""
    host = host or get_host()
    spec = spec if spec is not None else RunSpec.from_kwargs(**params)
    run_id = new_run_id()
    if is_backed(data) and streaming_obstacle(spec, host) is None:  # data on disk: chunk by chunk (core/run/stream.py)
        return annotate_backed(data, spec, host=host, run_id=run_id)
    plan = plan_run(data, spec, host=host, build_prompts=False)             # 1-2: data, sentences, plan
    budgeted = voted = None
    if plan.budget is not None:  # 3-4 in two rounds, labels spread to the cells not sent (budget.py)
        from .budget import run_budgeted

        budgeted = run_budgeted(plan, model_for(plan, host), run_id, host)
        execution, by_unit, frame, summary = budgeted.execution, budgeted.by_unit, budgeted.frame, budgeted.summary
    else:
        execution = execute(plan, model_for(plan, host), run_id, host=host)  # 3: the model answers
        by_unit = decode_all(plan.prompts, execution.generations, host)
        if plan.vote is not None:  # each cell's label decided with its neighbours' (vote.py)
            from .vote import vote

            by_unit, voted = vote(plan.vote, by_unit, plan.sentences.cell_ids.astype(str))
        frame, summary = results_frame(plan, by_unit, plan.spec.output.key_added,  # 4: results
                                       unit_label_scores(plan.prompts, execution.generations))

    out = plan.spec.output                                                   # 5: record
    sidecar = sidecar_path(out.sidecar)
    if sidecar is not None:
        write_sidecar(sidecar, plan.prompts, execution.generations, by_unit)
    failed_units = sum(len(p.unit_ids) for p, g in zip(plan.prompts, execution.generations) if g.error)
    summary.update({"seconds_generation": round(execution.seconds, 3), "n_prompts": len(plan.prompts),
                    "n_failed_prompts": execution.failed, "n_failed_units": failed_units,
                    "stopped": execution.stopped or "",
                    "first_error": next((g.error for g in execution.generations if g.error), ""),
                    "sidecar": str(sidecar) if sidecar else None})
    warn_low_confidence(summary)
    entry = {
        "params": h5_safe(without_credentials(run_params(plan, execution, run_id))),
        "summary": h5_safe({k: v for k, v in summary.items() if k != "clusters"}),
        "sidecar": str(sidecar) if sidecar else "",
    }
    if sidecar is None and out.sidecar is not False:  # no file unless asked: the raw outputs stay in uns
        entry["raw"] = raw_outputs(plan.prompts, execution.generations)
    if "clusters" in summary:
        entry["clusters"] = clusters_table(summary["clusters"])
    if execution.observability:
        entry["observability"] = h5_safe(dict(execution.observability))
    if budgeted is not None:
        entry["budget"] = h5_safe(budgeted.record)
    if voted is not None:
        entry["vote"] = h5_safe(voted)
    write_results(data, plan, frame, entry)
    log.info(
        "annotated %d cells: %d ok, %d unresolved (%d prompts, %d failed, %.1f s generation)",
        summary["n_cells"], summary["n_ok"], summary["n_unresolved"], len(plan.prompts), execution.failed,
        execution.seconds,
    )
    return summary


def write_sentences(
    data: Any,
    output: str | Path,
    data_spec: DataSpec,
    *,
    sentence: str | None = None,
    n_genes: int | None = None,
    sentence_options: dict[str, Any] | None = None,
    format: str = "jsonl",
    label_key: str | None = None,
    reasoning: bool = False,
    format_options: dict[str, Any] | None = None,
    host: Host | None = None,
) -> int:
    """Stream cell sentences of ``data`` to ``output`` in the file format ``format``.

    Chunks of cells go from the modality through the sentence strategy into the format writer one at a
    time, so memory stays bounded on backed files. ``sentence=None`` uses the format's own strategy
    (``ranked-hvg`` for ``cellreasoner``, ``top-expressed`` for ``cellpuzzles``) or ``auto``. Writes
    only ``output`` (the caller makes it atomic). Returns the number of records written.
    """
    host = host or get_host()
    fmt = host.registry.get("format", format)
    component = host.registry.get("modality", data_spec.modality)
    adata, _ = select_modality_data(data, component, data_spec.mod)
    labels = None
    if label_key is not None:
        labels = label_column(adata.obs, label_key, "the data")
        labels.index = labels.index.astype(str)
    elif fmt.needs_labels:
        raise ValueError(f"format {format!r} needs labels: pass --label-key COLUMN (an obs column)")
    sentence_spec = SentenceSpec(sentence=sentence or fmt.sentence or "auto", n_genes=n_genes,
                                 sentence_options=sentence_options)
    prepared = prepare_data(adata, attrs.evolve(data_spec, mod=None), host=host)
    chunks = sentence_chunks(prepared.features, sentence_spec, state={}, host=host, chunk_size=data_spec.chunk_size)
    with open(output, "wb") as fh:
        n = fmt.write(fh, chunks, labels=labels, obs=adata.obs, reasoning=reasoning, **dict(format_options or {}))
    log.info("wrote %d %s records to %s", n, format, output)
    return n
