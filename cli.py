"""The ``cellscribe`` command line.

Every keyword of :func:`cellscribe.tl.annotate` has a flag on ``cellscribe annotate`` (a test checks
this); plugins add their own options through the ``cellscribe_cli_options`` hook.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .core.plugins import get_host

log = logging.getLogger("cellscribe")

#: tl.annotate keyword -> the flag that sets it (``data`` is INPUT; ``copy`` has no meaning here since
#: the command always writes a new OUTPUT file).
ANNOTATE_FLAGS = {
    "modality": "--modality",
    "mod": "--mod",
    "prompt": "--prompt",
    "model": "--model",
    "mode": "--mode",
    "candidates": "--candidate/--candidates-file",
    "reference": "--reference",
    "reference_key": "--reference-key",
    "reference_modality": "--reference-modality",
    "k": "-k",
    "groupby": "--groupby",
    "n_representatives": "--n-representatives",
    "layer": "--layer",
    "use_raw": "--use-raw",
    "sentence": "--sentence",
    "n_genes": "--n-genes",
    "generation": "--generation",
    "decode": "--decode",
    "checkpoint": "--checkpoint",
    "seed": "--seed",
    "max_prompt_tokens": "--max-prompt-tokens",
    "batch_size": "--batch-size",
    "adapter": "--adapter",
    "device": "--device",
    "dtype": "--dtype",
    "trust_remote_code": "--trust-remote-code",
    "tissue": "--tissue",
    "model_options": "--model-option",
    "prompt_options": "--prompt-option",
    "sentence_options": "--sentence-option",
    "modality_options": "--modality-option",
    "sidecar": "--sidecar",
    "chunk_size": "--chunk-size",
    "progress": "--progress",
    "key_added": "--key-added",
}
NOT_FLAGS = {"data": "the INPUT argument", "copy": "the command always writes a new OUTPUT file"}


def _friendly_errors(func):
    """Show expected input errors as one clear message instead of a traceback."""
    import functools

    from .core.plugins import PluginError

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError, PluginError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise click.ClickException(str(message)) from exc

    return wrapper


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("cellscribe").setLevel(level)


def _parse_pairs(pairs: tuple[str, ...], flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` strings to a dict; values parsed as JSON when they are (numbers, true/false)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=flag)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _read_candidates(values: tuple[str, ...], path: str | None) -> list[str] | None:
    labels = list(values)
    if path:
        text = Path(path).read_text(encoding="utf-8")
        labels += [line.strip() for line in text.splitlines() if line.strip()]
    if len(set(labels)) != len(labels):
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        raise click.BadParameter(f"duplicate candidate labels: {dupes}", param_hint="--candidate")
    return labels or None


def _parse_adapters(values: tuple[str, ...], modalities: list[str]) -> dict[str, str]:
    """``--adapter`` values to ``{modality: path}``: ``MODALITY=PATH``, or a bare PATH for one modality."""
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if sep and name in modalities:
            adapters[name] = path
        elif sep and name in get_host().registry.names("modality"):
            raise click.BadParameter(
                f"{value!r} is an adapter for modality {name!r}, which is not annotated here; add "
                f"--modality {name} or drop the adapter",
                param_hint="--adapter",
            )
        elif len(modalities) == 1:
            adapters[modalities[0]] = value
        else:
            raise click.BadParameter(
                f"{value!r}: with several --modality, write MODALITY=PATH (one of {', '.join(modalities)})",
                param_hint="--adapter",
            )
    return adapters


def _plugin_options(command: str) -> list[click.Option]:
    options: list[click.Option] = []
    for result in get_host().hook.cellscribe_cli_options(command=command):
        options.extend(result or [])
    return options


def _split_plugin_values(kwargs: dict[str, Any], plugin_params: list[click.Option]) -> dict[str, Any]:
    """Remove the plugin-added options from ``kwargs``; return those that were set (not ``None``)."""
    values = {p.name: kwargs.pop(p.name, None) for p in plugin_params}
    return {name: value for name, value in values.items() if value is not None}


def _write_data(data: Any, output: Path, mod: str | None) -> None:
    """Write an AnnData (``.h5ad``) or MuData (``.h5mu``) to ``output``."""
    from .core.pipeline import is_mudata

    if is_mudata(data):
        import mudata

        if output.name.lower().endswith(".h5ad"):
            if mod is None:
                raise click.UsageError("writing a MuData to .h5ad needs --mod (which modality to write)")
            data.mod[mod].write_h5ad(output)
        else:
            # mudata 0.3 would otherwise re-derive obs on write and drop the pulled result columns.
            with mudata.set_options(pull_on_update=False):
                data.write(output)
    else:
        if output.name.lower().endswith(".h5mu"):
            raise click.UsageError("the input is an AnnData: write it to a .h5ad file")
        data.write_h5ad(output)


class _LazyGroup(click.Group):
    """Builds the plugin-extended commands on first use, so ``--help`` and ``--version`` stay fast."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._ensure()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        self._ensure()
        return super().get_command(ctx, name)

    def _ensure(self) -> None:
        builders = {"annotate": _annotate_command, "sentences": _sentences_command, "activity": _activity_command}
        missing = [name for name in (*builders, "grade", "evaluate") if name not in self.commands]
        if not missing:
            return
        from .cli_eval import evaluate_command, grade_command

        builders.update({"grade": lambda: grade_command, "evaluate": lambda: evaluate_command})
        for name in missing:  # each built once, on first use (a test may drop one to rebuild it)
            self.add_command(builders[name](), name=name)



@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cellscribe")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """cellscribe: annotate single cells with reasoning language models."""
    _setup_logging(verbose)


def _annotate_command() -> click.Command:
    plugin_params = _plugin_options("annotate")

    @click.command(name="annotate")
    @click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, dir_okay=False))
    @click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .h5ad/.h5mu (never INPUT).")
    @click.option("--modality", multiple=True, default=("rna",), show_default=True,
                  help="Modality plugin; repeat it to annotate several modalities of a MuData with one loaded model.")
    @click.option("--mod", default=None, help="MuData modality key.")
    @click.option("--prompt", default="zero-shot", show_default=True, help="Prompt strategy: zero-shot, k-shot, puzzle.")
    @click.option("--model", default=None, help="Backend name, local model directory or hub id (default: markers).")
    @click.option("--mode", type=click.Choice(["direct", "reasoning"]), default="direct", show_default=True)
    @click.option("--candidate", "candidate", multiple=True, help="An allowed label (repeat the flag).")
    @click.option("--candidates-file", type=click.Path(exists=True, dir_okay=False), help="Allowed labels, one per line.")
    @click.option("--reference", type=click.Path(exists=True, dir_okay=False), help="Labelled reference .h5ad/.h5mu for k-shot.")
    @click.option("--reference-key", default=None, help="Label column of the reference (or of INPUT).")
    @click.option("--reference-modality", default=None,
                  help="Modality of --reference when not the annotated one (rna for scATAC cells; default: the same).")
    @click.option("-k", "k", type=int, default=3, show_default=True, help="Examples per label (k-shot).")
    @click.option("--groupby", default=None, help="obs column of clusters: annotate per cluster.")
    @click.option("--n-representatives", type=int, default=None, help="Cells per cluster with --groupby.")
    @click.option("--layer", default=None, help="Layer to read instead of X.")
    @click.option("--use-raw/--no-use-raw", default=None, help="Read .raw instead of X.")
    @click.option("--sentence", default="auto", show_default=True, help="Sentence strategy.")
    @click.option("--n-genes", type=int, default=None, help="Genes per cell sentence.")
    @click.option("--generation", multiple=True, metavar="KEY=VALUE", help="Generation setting override (repeat).")
    @click.option("--decode", type=click.Choice(["generate", "constrained", "score"]), default="generate",
                  show_default=True, help="Free generation, answers forced to the candidates, or candidate scoring.")
    @click.option("--checkpoint", type=click.Path(file_okay=False), default=None,
                  help="Folder of finished batches (default OUTPUT.cellscribe.ckpt); re-run to resume.")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--max-prompt-tokens", type=int, default=None, help="Token budget per prompt.")
    @click.option("--batch-size", type=int, default=None, help="Prompts per model call (default: the backend's).")
    @click.option("--adapter", multiple=True, metavar="[MODALITY=]PATH",
                  help="LoRA adapter (path or hub id) for the modality; MODALITY=PATH with several modalities.")
    @click.option("--device", default=None, help="Model device (cpu, cuda, cuda:1).")
    @click.option("--dtype", default=None, help="Model dtype (auto, bfloat16, float32).")
    @click.option("--trust-remote-code", is_flag=True, help="Allow the model's own code to run (off by default).")
    @click.option("--tissue", default=None, help="Tissue of origin (knowledge-based models restrict to it).")
    @click.option("--model-option", multiple=True, metavar="KEY=VALUE", help="Backend option (repeat).")
    @click.option("--base-url", default=None, help="Server URL for openai: models (same as --model-option base_url=...).")
    @click.option("--prompt-option", multiple=True, metavar="KEY=VALUE", help="Prompt strategy option (repeat).")
    @click.option("--sentence-option", multiple=True, metavar="KEY=VALUE", help="Sentence strategy option (repeat).")
    @click.option("--modality-option", multiple=True, metavar="KEY=VALUE", help="Modality/reader option (repeat).")
    @click.option("--sidecar", type=click.Path(dir_okay=False), default=None, help="Raw outputs JSONL (default: OUTPUT.cellscribe.jsonl).")
    @click.option("--chunk-size", type=int, default=10_000, show_default=True, help="Cells per chunk.")
    @click.option("--progress/--no-progress", default=True, show_default=True)
    @click.option("--key-added", default="cellscribe", show_default=True, help="Prefix of the written obs/uns keys.")
    @click.option("--limit", type=int, default=None, help="Annotate only the first N cells.")
    @click.option("--dry-run", is_flag=True, help="Print the plan (cells, prompts, token estimate) and exit.")
    @click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
    @_friendly_errors
    def annotate(input_path: str, output: str, **kw: Any) -> None:
        """Annotate the cells of INPUT and write the result to OUTPUT.

        INPUT is read, never written; OUTPUT is written atomically (temporary file, then rename).
        """
        from .core import pipeline
        from .core.io import atomic_output, check_output
        from .core.models import LOAD_OPTIONS, load_model

        plugin_values = _split_plugin_values(kw, plugin_params)
        limit, dry_run, force = kw.pop("limit"), kw.pop("dry_run"), kw.pop("force")
        kw["candidates"] = _read_candidates(kw.pop("candidate"), kw.pop("candidates_file"))
        kw["generation"] = _parse_pairs(kw.pop("generation"), "--generation")
        kw["prompt_options"] = _parse_pairs(kw.pop("prompt_option"), "--prompt-option")
        kw["model_options"] = _parse_pairs(kw.pop("model_option"), "--model-option")
        base_url = kw.pop("base_url")
        if base_url:
            kw["model_options"]["base_url"] = base_url
        kw["sentence_options"] = _parse_pairs(kw.pop("sentence_option"), "--sentence-option")
        kw["modality_options"] = {**_parse_pairs(kw.pop("modality_option"), "--modality-option"), **plugin_values}
        modalities = list(dict.fromkeys(kw.pop("modality")))
        adapters = _parse_adapters(kw.pop("adapter"), modalities)
        if len(modalities) > 1 and kw["mod"] is not None:
            raise click.UsageError("--mod names one MuData modality; leave it out with several --modality "
                                   "(each is read from its usual key)")
        out = check_output(output, inputs=(input_path, kw.get("reference")), force=force or dry_run)

        data = pipeline.read_input(input_path, **kw["modality_options"])
        if limit is not None:
            data = data[: min(limit, data.n_obs)].copy()
        if kw["reference"] is not None:
            kw["reference"] = pipeline.read_input(kw["reference"], **kw["modality_options"])

        if dry_run:
            plan_kw = {k: v for k, v in kw.items() if k not in {
                "generation", "decode", "checkpoint", "batch_size", "device", "dtype", "trust_remote_code",
                "tissue", "model_options", "sidecar", "progress", "key_added"}}
            for modality in modalities:
                plan = pipeline.plan_run(data, **plan_kw, modality=modality)
                for key, value in plan.summary().items():
                    click.echo(f"{key}: {value}")
                if plan.prompts:
                    click.echo("first prompt:")
                    for m in plan.prompts[0].messages:
                        click.echo(f"  [{m['role']}] {m['content'][:300]}{'...' if len(m['content']) > 300 else ''}")
            return

        summaries = []
        load_options = {name: kw.pop(name) for name in LOAD_OPTIONS if name != "adapter"}
        # Loaded by the first run, once it has checked its input.
        model = load_model(kw.pop("model"), adapters=adapters, lazy=True, **load_options)
        checkpoint = Path(kw["checkpoint"] or out.with_name(out.name + ".cellscribe.ckpt"))
        sidecar = Path(kw["sidecar"] or out.with_name(out.name + ".cellscribe.jsonl"))
        several = len(modalities) > 1
        for modality in modalities:
            suffix = f".{modality}" if several else ""
            run_kw = dict(
                kw, modality=modality, checkpoint=str(checkpoint / modality if several else checkpoint),
                sidecar=str(sidecar.with_name(f"{sidecar.stem}{suffix}{sidecar.suffix}")),
            )
            summaries.append((modality, pipeline.annotate(data, model=model, **run_kw)))
        with atomic_output(out) as tmp:
            _write_data(data, tmp, kw["mod"])
        if kw["checkpoint"] is None:  # the output now holds everything; a user-named folder is left alone
            shutil.rmtree(checkpoint, ignore_errors=True)
        for modality, summary in summaries:
            if several:
                click.echo(f"{modality}:")
            _echo_summary(summary, out)

    annotate.params.extend(plugin_params)
    return annotate


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


def _sentences_command() -> click.Command:
    plugin_params = _plugin_options("sentences")
    formats = sorted(get_host().registry.names("format"))

    @click.command(name="sentences")
    @click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, dir_okay=False))
    @click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output file.")
    @click.option("--format", "format_", type=click.Choice(formats), default="jsonl", show_default=True,
                  help="cellreasoner: CellReasoner JSON; cellpuzzles: CellPuzzles JSONL; jsonl: plain.")
    @click.option("--label-key", default=None, help="obs column with labels (written as the answer).")
    @click.option("--reasoning", is_flag=True, help="CellReasoner reasoning-mode instruction.")
    @click.option("--sentence", default=None, help="Sentence strategy (default: the format's own).")
    @click.option("--n-genes", type=int, default=None, help="Genes per sentence.")
    @click.option("--modality", default="rna", show_default=True)
    @click.option("--mod", default=None, help="MuData modality key.")
    @click.option("--layer", default=None)
    @click.option("--use-raw/--no-use-raw", default=None)
    @click.option("--format-option", multiple=True, metavar="KEY=VALUE", help="Format option (repeat).")
    @click.option("--sentence-option", multiple=True, metavar="KEY=VALUE")
    @click.option("--modality-option", multiple=True, metavar="KEY=VALUE")
    @click.option("--chunk-size", type=int, default=10_000, show_default=True)
    @click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
    @_friendly_errors
    def sentences(input_path: str, output: str, format_: str, force: bool, **kw: Any) -> None:
        """Write the cell sentences of INPUT to OUTPUT, streaming chunks of cells (bounded memory)."""
        from .core import pipeline
        from .core.io import atomic_output, check_output

        plugin_values = _split_plugin_values(kw, plugin_params)
        out = check_output(output, inputs=(input_path,), force=force)
        modality_options = {**_parse_pairs(kw.pop("modality_option"), "--modality-option"), **plugin_values}
        data = pipeline.read_input(input_path, backed="r", **modality_options)
        with atomic_output(out) as tmp:
            n = pipeline.write_sentences(
                data, tmp, format=format_, modality_options=modality_options,
                format_options=_parse_pairs(kw.pop("format_option"), "--format-option"),
                sentence_options=_parse_pairs(kw.pop("sentence_option"), "--sentence-option"),
                **kw,
            )
        click.echo(f"wrote {n} records to {out}")

    sentences.params.extend(plugin_params)
    return sentences


def _activity_command() -> click.Command:
    plugin_params = _plugin_options("activity")

    @click.command(name="activity")
    @click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, dir_okay=False))
    @click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
                  help="Output .h5ad (cells x genes; never INPUT).")
    @click.option("--modality", default="atac", show_default=True, help="Modality plugin that makes the genes.")
    @click.option("--mod", default=None, help="MuData modality key.")
    @click.option("--layer", default=None, help="Layer to read instead of X.")
    @click.option("--use-raw/--no-use-raw", default=None, help="Read .raw instead of X.")
    @click.option("--modality-option", multiple=True, metavar="KEY=VALUE", help="Modality/reader option (repeat).")
    @click.option("--chunk-size", type=int, default=10_000, show_default=True, help="Cells per chunk.")
    @click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
    @_friendly_errors
    def activity(input_path: str, output: str, force: bool, **kw: Any) -> None:
        """Write the gene activity cellscribe ranks for the cells of INPUT (peaks, fragments or a MuData)
        to OUTPUT, to inspect in scanpy or muon.

        X holds the smoothed, normalised activity the sentences are made of, layers['counts'] the
        aggregated counts, var['n_peaks'] the peaks per gene (cellscribe.tl.gene_activity). OUTPUT is
        written atomically (temporary file, then rename).
        """
        from . import tl
        from .core import pipeline
        from .core.io import atomic_output, check_output

        if not output.lower().endswith(".h5ad"):
            raise click.UsageError("the gene activity is one AnnData: write it to a .h5ad file")
        plugin_values = _split_plugin_values(kw, plugin_params)
        options = {**_parse_pairs(kw.pop("modality_option"), "--modality-option"), **plugin_values}
        out = check_output(output, inputs=(input_path,), force=force)
        data = pipeline.read_input(input_path, **options)
        result = tl.gene_activity(data, **kw, **options)
        with atomic_output(out) as tmp:
            result.write_h5ad(tmp)
        click.echo(f"wrote the gene activity of {result.n_obs} cells x {result.n_vars} genes to {out}")
        click.echo(f"  X: what the cell sentences rank, from {result.uns['gene_activity']['source']}")
        click.echo("  layers['counts']: the same genes before smoothing and normalisation; var['n_peaks']: "
                   "input features per gene")

    activity.params.extend(plugin_params)
    return activity


@main.group(name="puzzles")
def puzzles_group() -> None:
    """CellPuzzles files (Cell-o1 format)."""


@puzzles_group.command(name="solve")
@click.argument("puzzles_path", metavar="PUZZLES", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Predictions file (same layout as PUZZLES).")
@click.option("--model", default="markers", show_default=True, help="Backend name, local model directory or hub id.")
@click.option("--system-role", is_flag=True, help="Send the system message as a system turn (default: as the released script).")
@click.option("--generation", multiple=True, metavar="KEY=VALUE", help="Generation setting override (repeat).")
@click.option("--model-option", multiple=True, metavar="KEY=VALUE", help="Backend option (repeat).")
@click.option("--base-url", default=None, help="Server URL for openai: models.")
@click.option("--batch-size", type=int, default=None, help="Prompts per model call (default: the backend's).")
@click.option("--limit", type=int, default=None, help="Solve only the first N puzzles.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@_friendly_errors
def puzzles_solve(puzzles_path: str, output: str, model: str, system_role: bool, generation: tuple[str, ...],
                  model_option: tuple[str, ...], base_url: str | None, batch_size: int, limit: int | None,
                  progress: bool, force: bool) -> None:
    """Solve the puzzles of PUZZLES (JSON list or JSONL with system_msg, user_msg, answer) and write
    them with a ``prediction`` field; print partial accuracy, exact match, legitimate-format ratio and
    uniqueness when answers are present."""
    from tqdm.auto import tqdm

    from .core import puzzles
    from .core.io import atomic_output, check_output

    out = check_output(output, inputs=(puzzles_path,), force=force)
    data = puzzles.read_puzzles(puzzles_path)
    if limit is not None:
        data = puzzles.PuzzleFile(data.records[:limit], data.jsonl)
    with tqdm(total=len(data.records), desc="puzzles", disable=not progress) as bar:
        solved, scores = puzzles.solve_puzzles(
            data, model=model, system_role=system_role, generation=_parse_pairs(generation, "--generation"),
            model_options={**_parse_pairs(model_option, "--model-option"), **({"base_url": base_url} if base_url else {})},
            batch_size=batch_size,
            progress=bar.update,
        )
    with atomic_output(out) as tmp:
        puzzles.write_puzzles(solved, tmp)
    if scores is not None:
        for line in puzzles.format_scores(scores):
            click.echo(line)
    click.echo(f"wrote {len(solved.records)} predictions to {out}")


@main.command(name="adapters")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def adapters_command(as_json: bool) -> None:
    """List the model manifests (shipped in adapters/manifests and in $CELLSCRIBE_MANIFESTS folders):
    the names usable as --model, with their base model, formats and LoRA adapter."""
    from .core.manifests import list_manifests

    manifests = list_manifests(errors="warn")
    if as_json:
        click.echo(json.dumps([m.to_dict() for m in manifests], indent=2, default=str))
        return
    for m in manifests:
        genes = f" ({m.n_genes} genes)" if m.n_genes else ""
        click.echo(f"{m.name}: {m.description}")
        click.echo(f"    base {m.base_model}; modality {m.modality}; prompt {m.prompt}; sentence {m.sentence}{genes}; "
                   f"decoder {m.decoder}; adapter {m.adapter or 'none'}")


@main.command(name="plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins_command(as_json: bool) -> None:
    """List the loaded plugins: what each provides, its version and origin."""
    infos = get_host().plugins()
    if as_json:
        click.echo(json.dumps([_info(i) for i in infos], indent=2))
        return
    for info in infos:
        click.echo(f"{info.name}  ({info.module}, {info.origin}{' ' + info.version if info.version else ''})")
        for item in info.provides:
            click.echo(f"    {item}")


def _info(info: Any) -> dict[str, Any]:
    return {"name": info.name, "module": info.module, "version": info.version, "origin": info.origin,
            "provides": list(info.provides)}




if __name__ == "__main__":  # pragma: no cover
    main()
