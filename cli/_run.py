"""``cellscribe annotate``, ``sentences`` and ``activity``: their run flags are made from the run
specification (:mod:`cellscribe.core.spec`), plus the options plugins add."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import click

from ._common import (
    PluginCommand,
    friendly_errors,
    parse_adapters,
    parse_pairs,
    plugin_options,
    read_candidates,
    run_options,
    run_values,
    split_plugin_values,
)

#: Run parameters that are not flags of ``cellscribe annotate``, and why.
NOT_FLAGS = {"data": "the INPUT argument", "copy": "the command always writes a new OUTPUT file"}
#: Parameters of the data and sentence parts that ``sentences`` and ``activity`` take as flags.
DATA_FLAGS = ("mod", "layer", "use_raw", "modality_options", "chunk_size")


def _input_argument() -> click.Argument:
    return click.Argument(["input_path"], metavar="INPUT", type=click.Path(exists=True, dir_okay=False))


def _force_option() -> click.Option:
    return click.Option(["--force"], is_flag=True, help="Overwrite OUTPUT if it exists.")


def annotate_command() -> click.Command:
    """``cellscribe annotate``: one flag per run parameter (``--modality`` and ``--adapter`` repeat for
    several modalities of one MuData, annotated with one loaded model)."""
    from ..core.run.stream import STREAM_MIN_CELLS

    plugin_params = plugin_options("annotate")
    params: list[click.Parameter] = [
        _input_argument(),
        click.Option(["-o", "--output"], required=True, type=click.Path(dir_okay=False),
                     help="Output .h5ad/.h5mu (never INPUT)."),
        *run_options(),
        click.Option(["--candidates-file"], type=click.Path(exists=True, dir_okay=False),
                     help="Allowed labels, one per line (with or instead of --candidate)."),
        click.Option(["--base-url"], default=None,
                     help="Server URL for openai: models (same as --model-option base_url=...)."),
        click.Option(["--limit"], type=int, default=None, help="Annotate only the first N cells."),
        click.Option(["--dry-run"], is_flag=True, help="Print the plan and its cost (prompts, prompt and new tokens, "
                     "estimated model time; a local model is timed on a few prompts) and exit."),
        click.Option(["--rate"], multiple=True, metavar="KEY=VALUE",
                     help="With --dry-run: the model's speed instead of the measured or assumed one (repeat): "
                          "prompt_tokens_per_s, new_tokens_per_s, prompts_per_s."),
        click.Option(["--stream/--no-stream"], default=None,
                     help="Annotate the input on disk chunk by chunk of cells, in bounded memory (default: when "
                          f"it has at least {STREAM_MIN_CELLS:,} cells and the run can be streamed)."),
        _force_option(),
        *plugin_params,
    ]

    @friendly_errors
    def annotate(input_path: str, output: str, **kw: Any) -> None:
        from ..core.models import load_model
        from ..core.run import plan_run, read_input
        from ..core.run import annotate as run
        from ..core.run.checkpoint import hold_folder
        from ..core.spec import LOAD_OPTIONS, RunSpec
        from ._files import (
            atomic_output,
            check_output,
            check_output_format,
            check_writable,
            command_key,
            is_partial_output,
            mark_partial_output,
            write_data,
        )

        modality_extra = split_plugin_values(kw, plugin_params)
        limit, dry_run, force, stream = kw.pop("limit"), kw.pop("dry_run"), kw.pop("force"), kw.pop("stream")
        candidates_file, base_url = kw.pop("candidates_file"), kw.pop("base_url")
        rates = parse_pairs(kw.pop("rate"), "--rate")
        if rates and not dry_run:
            raise click.UsageError("--rate is for --dry-run (the cost estimate); leave it out of a run")
        values = run_values(kw)
        values["candidates"] = read_candidates(values["candidates"], candidates_file)
        if base_url:
            values["model_options"]["base_url"] = base_url
        values["modality_options"] = {**values["modality_options"], **modality_extra}
        no_sidecar = str(values["sidecar"] or "").strip().lower() in ("none", "off")
        if no_sidecar:
            values["sidecar"] = None
        modalities = list(dict.fromkeys(values.pop("modality")))
        adapters = parse_adapters(values.pop("adapter"), modalities)
        several = len(modalities) > 1
        if several and values["mod"] is not None:
            raise click.UsageError("--mod names one MuData modality; leave it out with several --modality "
                                   "(each is read from its usual key)")
        # Every parameter checked (one spec per modality) before any file is read.
        specs = {m: RunSpec.from_kwargs(**values, modality=m) for m in modalities}
        out = Path(output)
        checkpoint = Path(values["checkpoint"] or out.with_name(out.name + ".cellscribe.ckpt"))
        sidecar = Path(values["sidecar"] or out.with_name(out.name + ".cellscribe.jsonl.gz"))
        command = command_key(input_path, {k: v for k, v in values.items() if k != "progress"},
                              {"limit": limit, "modalities": modalities, "adapters": adapters,
                               "output": str(out.resolve())})
        # OUTPUT left by this same command with failed prompts is replaced by its re-run, as resumed.
        resuming = not dry_run and not force and is_partial_output(checkpoint, out, command)
        out = check_output(output, inputs=(input_path, values["reference"]), force=force or dry_run or resuming)
        if not dry_run:
            check_writable(out.parent, "output")
            check_writable(sidecar.parent, "sidecar")

        stream = _streams(stream, input_path, specs, dry_run=dry_run, limit=limit)
        data = read_input(input_path, **({"backed": "r"} if stream else {}), **values["modality_options"])
        if limit is not None:
            data = data[: min(limit, data.n_obs)].copy()
        check_output_format(data, out, values["mod"], several or any("+" in m for m in modalities))
        reference = None
        if values["reference"] is not None:
            reference = read_input(values["reference"], **values["modality_options"])

        if dry_run:
            for spec in specs.values():
                plan = plan_run(data, spec.replace(reference=reference))
                for key, value in {**plan.summary(), **plan.estimate(rates=rates)}.items():
                    click.echo(f"{key}: {value}")
                if plan.prompts:
                    click.echo("first prompt:")
                    for m in plan.prompts[0].messages:
                        click.echo(f"  [{m['role']}] {m['content'][:300]}{'...' if len(m['content']) > 300 else ''}")
            return

        with hold_folder(checkpoint, run=f"cellscribe annotate -o {out.name}"):
            try:
                first = next(iter(specs.values())).model
                # One model for every modality, loaded by the first run once it has checked its input.
                model = load_model(first.name, adapters=adapters, lazy=True, **first.load_options())
                per_run = {k: v for k, v in values.items()
                           if k not in (*LOAD_OPTIONS, "model", "checkpoint", "sidecar")}
                summaries = []
                for modality in modalities:
                    suffix = f".{modality}" if several else ""
                    spec = RunSpec.from_kwargs(
                        **{**per_run, "reference": reference}, modality=modality, model=model,
                        checkpoint=str(checkpoint / modality if several else checkpoint),
                        sidecar=False if no_sidecar else str(_per_modality(sidecar, suffix)),
                    )
                    summaries.append((modality, run(data, spec)))
                n_prompts = sum(summary["n_prompts"] for _, summary in summaries)
                failed = sum(summary["n_failed_prompts"] for _, summary in summaries)
                why = next((s.get("stopped") or s.get("first_error") for _, s in summaries if s["n_failed_prompts"]),
                           "")
                if failed and failed == n_prompts:
                    raise click.exceptions.Exit(_no_answer(failed, why, out))
                with atomic_output(out) as tmp:
                    write_data(data, tmp, values["mod"], values["key_added"])
                mark_partial_output(checkpoint, out, command if failed else None)
                if not failed and values["checkpoint"] is None:
                    shutil.rmtree(checkpoint, ignore_errors=True)  # OUTPUT holds everything; a named folder stays
            except BaseException:
                if values["checkpoint"] is None and not any(checkpoint.rglob("batch-*.json")):
                    shutil.rmtree(checkpoint, ignore_errors=True)  # no answer to resume: leave no folder
                raise

        for modality, summary in summaries:
            if several:
                click.echo(f"{modality}:")
            _echo_summary(summary, out)
        if failed:
            click.echo(
                f"error: {failed} of {n_prompts} prompts got no answer from the model ({why}); their cells are "
                f"unresolved in {out} (the note column says why). Run the same command again once the model "
                f"answers: it sends only those {failed} prompts (the answers are kept in {checkpoint}).",
                err=True,
            )
            raise click.exceptions.Exit(EXIT_PARTIAL)

    return PluginCommand(
        "annotate", params=params, callback=annotate, plugin_params=plugin_params,
        help="""Annotate the cells of INPUT and write the result to OUTPUT.

        INPUT is read, never written; OUTPUT is written atomically (temporary file, then rename). Every
        keyword of cellscribe.tl.annotate is a flag here. Finished batches are kept in
        OUTPUT.cellscribe.ckpt/ until OUTPUT is complete: the same command again resumes.

        Exit status: 0 every prompt answered; 1 an error, nothing written; 2 a usage error; 3 some
        prompts got no answer from the model (OUTPUT written, their cells unresolved; run the same
        command again to send only them); 4 no prompt was answered (nothing written).""",
    )


def _per_modality(sidecar: Path, suffix: str) -> Path:
    """The sidecar of one modality of a several-modality run: ``out.cellscribe.rna.jsonl.gz``."""
    if not suffix:
        return sidecar
    name = sidecar.name
    for ending in (".jsonl.gz", ".jsonl", ".gz"):
        if name.lower().endswith(ending):
            return sidecar.with_name(f"{name[: -len(ending)]}{suffix}{name[-len(ending):]}")
    return sidecar.with_name(f"{name}{suffix}")


def _streams(asked: bool | None, input_path: str, specs: dict[str, Any], *, dry_run: bool, limit: int | None) -> bool:
    """Whether ``cellscribe annotate`` reads INPUT from disk chunk by chunk (``--stream``; by default when
    it holds at least ``STREAM_MIN_CELLS`` cells and the run can be streamed)."""
    from ..core.run import STREAM_MIN_CELLS, streaming_obstacle
    from ._files import count_cells

    why = next((reason for spec in specs.values() if (reason := streaming_obstacle(spec))), None)
    if not input_path.lower().endswith((".h5ad", ".h5mu")):
        why = why or "only .h5ad and .h5mu files are read chunk by chunk"
    if dry_run:
        why = why or "--dry-run plans in memory"
    if limit is not None:
        why = why or "--limit annotates a few cells in memory"
    if asked is None:
        return why is None and count_cells(input_path) >= STREAM_MIN_CELLS
    if asked and why is not None:
        raise click.UsageError(f"--stream: this run cannot be streamed ({why}); leave out --stream")
    return asked


#: Exit statuses of ``cellscribe annotate`` (README, "Reliability"): 0 every prompt answered; 1 the run
#: did not start or stopped on an error (nothing written); 2 a usage error; 3 some prompts got no answer
#: (OUTPUT written, those cells unresolved, the checkpoint kept for a re-run); 4 no prompt was answered
#: (no OUTPUT; the sidecar lists each request's error).
EXIT_PARTIAL = 3
EXIT_NO_ANSWER = 4


def _no_answer(failed: int, why: str, out: Path) -> int:
    click.echo(
        f"error: the model answered none of the {failed} prompts ({why}); nothing was written to {out} (the "
        "sidecar lists each request's error). Run the same command again once the model answers.",
        err=True,
    )
    return EXIT_NO_ANSWER


def _echo_summary(summary: dict[str, Any], output: Path) -> None:
    click.echo(
        f"annotated {summary['n_cells']} cells: {summary['n_ok']} ok, {summary['n_unresolved']} unresolved"
        f" ({summary['n_empty']} with no expressed gene)"
    )
    for label, count in sorted(summary["label_counts"].items(), key=lambda kv: -kv[1])[:20]:
        click.echo(f"  {count:6d}  {label}")
    click.echo(f"wrote {output}")
    if summary.get("sidecar"):
        click.echo(f"raw model outputs: {summary['sidecar']}")


def sentences_command() -> click.Command:
    """``cellscribe sentences``: the data and sentence flags of a run, and the file format."""
    from ..core.plugins import get_host

    plugin_params = plugin_options("sentences")
    formats = sorted(get_host().registry.names("format"))
    params: list[click.Parameter] = [
        _input_argument(),
        click.Option(["-o", "--output"], required=True, type=click.Path(dir_okay=False), help="Output file."),
        click.Option(["--format", "format_"], type=click.Choice(formats), default="jsonl", show_default=True,
                     help="cellreasoner: CellReasoner JSON; cellpuzzles: CellPuzzles JSONL; jsonl: plain."),
        click.Option(["--label-key"], default=None, help="obs column with labels (written as the answer)."),
        click.Option(["--reasoning"], is_flag=True, help="CellReasoner reasoning-mode instruction."),
        click.Option(["--sentence"], default=None, help="Sentence strategy (default: the format's own)."),
        click.Option(["--modality"], default="rna", show_default=True, help="Modality plugin (rna, atac, ...)."),
        *run_options(("n_genes", "sentence_options", *DATA_FLAGS)),
        click.Option(["--format-option"], multiple=True, metavar="KEY=VALUE", help="Format option (repeat)."),
        _force_option(),
        *plugin_params,
    ]

    @friendly_errors
    def sentences(input_path: str, output: str, format_: str, force: bool, **kw: Any) -> None:
        from ..core.run import read_input, write_sentences
        from ..core.spec import DataSpec
        from ._files import atomic_output, check_output

        extra = split_plugin_values(kw, plugin_params)
        label_key, reasoning, sentence = kw.pop("label_key"), kw.pop("reasoning"), kw.pop("sentence")
        format_options = parse_pairs(kw.pop("format_option"), "--format-option")
        values = run_values(kw, ("n_genes", "sentence_options", *DATA_FLAGS))
        n_genes, sentence_options = values.pop("n_genes"), values.pop("sentence_options")
        data_spec = DataSpec(modality=kw.pop("modality"), **{**values, "modality_options": {
            **values["modality_options"], **extra}})
        out = check_output(output, inputs=(input_path,), force=force)
        data = read_input(input_path, backed="r", **data_spec.modality_options)
        with atomic_output(out) as tmp:
            n = write_sentences(
                data, tmp, data_spec, sentence=sentence, n_genes=n_genes, sentence_options=sentence_options,
                format=format_, label_key=label_key, reasoning=reasoning, format_options=format_options,
            )
        click.echo(f"wrote {n} records to {out}")

    return PluginCommand(
        "sentences", params=params, callback=sentences, plugin_params=plugin_params,
        help="Write the cell sentences of INPUT to OUTPUT, streaming chunks of cells (bounded memory).",
    )


def activity_command() -> click.Command:
    """``cellscribe activity``: the gene activity the sentences rank (``tl.gene_activity``)."""
    plugin_params = plugin_options("activity")
    params: list[click.Parameter] = [
        _input_argument(),
        click.Option(["-o", "--output"], required=True, type=click.Path(dir_okay=False),
                     help="Output .h5ad (cells x genes; never INPUT)."),
        click.Option(["--modality"], default="atac", show_default=True, help="Modality plugin that makes the genes."),
        *run_options(DATA_FLAGS),
        _force_option(),
        *plugin_params,
    ]

    @friendly_errors
    def activity(input_path: str, output: str, force: bool, **kw: Any) -> None:
        from .. import tl
        from ..core.run import read_input
        from ._files import atomic_output, check_output

        if not output.lower().endswith(".h5ad"):
            raise click.UsageError("the gene activity is one AnnData: write it to a .h5ad file")
        extra = split_plugin_values(kw, plugin_params)
        values = run_values(kw, DATA_FLAGS)
        options = {**values.pop("modality_options"), **extra}
        out = check_output(output, inputs=(input_path,), force=force)
        data = read_input(input_path, **options)
        result = tl.gene_activity(data, modality=kw.pop("modality"), **values, **options)
        with atomic_output(out) as tmp:
            result.write_h5ad(tmp)
        click.echo(f"wrote the gene activity of {result.n_obs} cells x {result.n_vars} genes to {out}")
        click.echo(f"  X: what the cell sentences rank, from {result.uns['gene_activity']['source']}")
        click.echo("  layers['counts']: the same genes before smoothing and normalisation; var['n_peaks']: "
                   "input features per gene")

    return PluginCommand(
        "activity", params=params, callback=activity, plugin_params=plugin_params,
        help="""Write the gene activity cellscribe ranks for the cells of INPUT (peaks, fragments or a MuData)
        to OUTPUT, to inspect in scanpy or muon.

        X holds the smoothed, normalised activity the sentences are made of, layers['counts'] the
        aggregated counts, var['n_peaks'] the peaks per gene (cellscribe.tl.gene_activity). OUTPUT is
        written atomically (temporary file, then rename).""",
    )


def transfer_command() -> click.Command:
    """``cellscribe transfer``: a labelled reference's labels on the cells of INPUT, without a model
    (``tl.transfer_labels``)."""
    plugin_params = plugin_options("transfer")
    params: list[click.Parameter] = [
        _input_argument(),
        click.Argument(["reference_path"], metavar="REFERENCE", type=click.Path(exists=True, dir_okay=False)),
        click.Option(["-o", "--output"], required=True, type=click.Path(dir_okay=False),
                     help="Output .h5ad or .h5mu: INPUT with the labels (never INPUT itself)."),
        click.Option(["--reference-key"], required=True, help="obs column of REFERENCE with the labels."),
        click.Option(["--modality"], default="atac", show_default=True,
                     help="Modality of INPUT (atac: gene activity; rna: expression)."),
        click.Option(["--reference-modality"], default="rna", show_default=True,
                     help="Modality of REFERENCE (rna, or atac for a labelled scATAC reference)."),
        click.Option(["--key-added"], default="transfer", show_default=True, help="Prefix of the written obs columns."),
        *run_options(DATA_FLAGS),
        _force_option(),
        *plugin_params,
    ]

    @friendly_errors
    def transfer(input_path: str, reference_path: str, output: str, reference_key: str, force: bool,
                 **kw: Any) -> None:
        from ..core.run import read_input
        from ..core.run.transfer import transfer_labels
        from ._files import atomic_output, check_output, write_data

        extra = split_plugin_values(kw, plugin_params)
        modality, reference_modality = kw.pop("modality"), kw.pop("reference_modality")
        key_added = kw.pop("key_added")
        values = run_values(kw, DATA_FLAGS)
        options = {**values.pop("modality_options"), **extra}
        out = check_output(output, inputs=(input_path, reference_path), force=force)
        data = read_input(input_path, **options)
        reference = read_input(reference_path, **options)
        summary = transfer_labels(data, reference, reference_key=reference_key, modality=modality,
                                  reference_modality=reference_modality, key_added=key_added,
                                  modality_options=options, **values)
        with atomic_output(out) as tmp:
            write_data(data, tmp, values.get("mod"))
        click.echo(f"transferred {reference_key!r} to {summary['n_cells']} cells: {summary['n_ok']} ok, "
                   f"{summary['n_unresolved']} unresolved")
        for label, count in sorted(summary["label_counts"].items(), key=lambda kv: -kv[1])[:20]:
            if count:
                click.echo(f"  {count:6d}  {label}")
        click.echo(f"wrote {out}")

    return PluginCommand(
        "transfer", params=params, callback=transfer, plugin_params=plugin_params,
        help="""Transfer the labels in obs[--reference-key] of REFERENCE to the cells of INPUT, without a
        language model (SingleR's method across modalities: cellscribe.tl.transfer_labels).

        The default is scATAC cells against a labelled scRNA-seq reference; --reference-modality atac takes
        a labelled scATAC reference (another study's sorted populations), which also labels cells that all
        share one identity. Writes obs[KEY], KEY_confidence, KEY_score, KEY_status, KEY_note and uns[KEY];
        OUTPUT is written atomically.""",
    )
