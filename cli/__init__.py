"""The ``cellscribe`` command line.

The run flags of ``cellscribe annotate`` (and those ``sentences``, ``activity`` and ``puzzles solve``
share) are made from the run specification, :mod:`cellscribe.core.spec`, where every parameter of
:func:`cellscribe.tl.annotate` is declared once with its help; plugins add options through the
``cellscribe_cli_options`` hook. ``cellscribe --help`` loads no plugin: each plugin-extended command is
built when it is first used.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from .. import __version__
from ._common import friendly_errors, run_options, run_values

log = logging.getLogger("cellscribe")


class _OnceFilter(logging.Filter):
    """Let through only records that no handler below the root prints already (huggingface_hub, for
    one, has its own handler: its records would otherwise print twice)."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None and logger.parent is not None:
            if logger.handlers:
                return False
            if not logger.propagate:
                break
            logger = logger.parent
        return True


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(_OnceFilter())
        root.addHandler(handler)
        root.setLevel(level)
    logging.getLogger("cellscribe").setLevel(level)


def _lazy(module: str, name: str) -> Any:
    """A builder that imports ``cellscribe.cli.{module}`` and makes the command ``name``."""

    def build() -> click.Command:
        import importlib

        made = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        return made() if not isinstance(made, click.Command) else made

    return build


#: Commands built when first used (they load the plugins, whose options they carry): name -> (builder,
#: the line ``cellscribe --help`` shows without building it).
_LAZY_COMMANDS: dict[str, tuple[Any, str]] = {
    "annotate": (_lazy("_run", "annotate_command"), "Annotate the cells of INPUT and write the result to OUTPUT."),
    "sentences": (_lazy("_run", "sentences_command"), "Write the cell sentences of INPUT to OUTPUT, streaming..."),
    "activity": (_lazy("_run", "activity_command"), "Write the gene activity cellscribe ranks for the cells of..."),
    "transfer": (_lazy("_run", "transfer_command"), "Transfer the labels in obs[--reference-key] of REFERENCE to..."),
    "finetune": (_lazy("_finetune", "finetune_command"), "Train a LoRA adapter on the labelled cells of INPUT..."),
    "export": (_lazy("_finetune", "export_command"), "Write the labelled cells of INPUT as a training set..."),
    "grade": (_lazy("_eval", "grade_command"), "Grade (truth, prediction) pairs on CellReasoner's scale."),
    "evaluate": (_lazy("_eval", "evaluate_command"), "Measure annotated files against the true labels in obs[TRUTH]."),
}


class _LazyGroup(click.Group):
    """Builds each plugin-extended command when it is first used, so ``cellscribe --help`` and
    ``--version`` load no plugin."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *_LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in _LAZY_COMMANDS:
            self.add_command(_LAZY_COMMANDS[name][0](), name=name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        limit = formatter.width - 6 - max(len(name) for name in self.list_commands(ctx))
        rows = []
        for name in self.list_commands(ctx):
            command = self.commands.get(name)
            if command is None:
                rows.append((name, _LAZY_COMMANDS[name][1]))
            elif not command.hidden:
                rows.append((name, command.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cellscribe")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """cellscribe: annotate single cells with reasoning language models."""
    _setup_logging(verbose)


@main.group(name="puzzles")
def puzzles_group() -> None:
    """CellPuzzles files (Cell-o1 format)."""


#: The run parameters ``puzzles solve`` takes (the model, how it is loaded, how it answers).
SOLVE_FLAGS = ("model", "batch_size", "model_options", "generation", "progress")


@puzzles_group.command(name="solve")
@click.argument("puzzles_path", metavar="PUZZLES", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Predictions file (same layout as PUZZLES).")
@click.option("--system-role", is_flag=True, help="Send the system message as a system turn (default: as the released script).")
@click.option("--base-url", default=None, help="Server URL for openai: models.")
@click.option("--limit", type=int, default=None, help="Solve only the first N puzzles.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@friendly_errors
def puzzles_solve(puzzles_path: str, output: str, system_role: bool, base_url: str | None, limit: int | None,
                  force: bool, **kw: Any) -> None:
    """Solve the puzzles of PUZZLES (JSON list or JSONL with system_msg, user_msg, answer) and write
    them with a ``prediction`` field (the model's raw text); print partial accuracy, exact match,
    legitimate-format ratio and uniqueness when answers are present."""
    from tqdm.auto import tqdm

    from ..core.models import resolve_model_name
    from ..core.run import puzzles
    from ..core.spec import RunSpec
    from ._files import atomic_output, check_output

    spec = RunSpec.from_kwargs(**run_values(kw, SOLVE_FLAGS))
    model_options = {**spec.model.model_options, **({"base_url": base_url} if base_url else {})}
    out = check_output(output, inputs=(puzzles_path,), force=force)
    data = puzzles.read_puzzles(puzzles_path)
    if limit is not None:
        data = puzzles.PuzzleFile(data.records[:limit], data.jsonl)
    with tqdm(total=len(data.records), desc="puzzles", disable=None if spec.output.progress else True) as bar:
        solved, scores = puzzles.solve_puzzles(
            data, model=resolve_model_name(spec.model.model), system_role=system_role,
            generation=dict(spec.generation.generation), model_options=model_options,
            batch_size=spec.model.batch_size, progress=bar.update,
        )
    with atomic_output(out) as tmp:
        puzzles.write_puzzles(solved, tmp)
    if scores is not None:
        for line in puzzles.format_scores(scores):
            click.echo(line)
    click.echo(f"wrote {len(solved.records)} predictions to {out}")


puzzles_solve.params[1:1] = run_options(SOLVE_FLAGS)


@main.command(name="adapters")
@click.argument("folders", nargs=-1, type=click.Path(exists=True, file_okay=False), metavar="[ADAPTER_DIR]...")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def adapters_command(folders: tuple[str, ...], as_json: bool) -> None:
    """List the model manifests (shipped in adapters/manifests and in $CELLSCRIBE_MANIFESTS folders):
    the names usable as --model, with their base model, formats and LoRA adapter. With ADAPTER_DIR
    folders (made by cellscribe finetune), show what each adapter was trained on and how it validated."""
    if folders:
        _show_adapters(folders, as_json)
        return
    from ..core.domain.manifests import list_manifests

    manifests = list_manifests(errors="warn")
    if as_json:
        click.echo(json.dumps([m.to_dict() for m in manifests], indent=2, default=str))
        return
    for m in manifests:
        genes = f" ({m.n_genes} genes)" if m.n_genes else ""
        click.echo(f"{m.name}: {m.description}")
        click.echo(f"    base {m.base_model}; modality {m.modality}; prompt {m.prompt}; sentence {m.sentence}{genes}; "
                   f"decoder {m.decoder}; adapter {m.adapter or 'none'}")


def _show_adapters(folders: tuple[str, ...], as_json: bool) -> None:
    from ..core.domain.adapters import ADAPTER_MANIFEST, read_adapter_manifest

    found = []
    for folder in folders:
        manifest = read_adapter_manifest(folder)
        if manifest is None:
            raise click.ClickException(f"{folder} has no {ADAPTER_MANIFEST}: not an adapter made by cellscribe finetune")
        found.append(manifest)
    if as_json:
        click.echo(json.dumps([m.to_dict() for m in found], indent=2))
        return
    for m in found:
        t, v = m.training, m.validation
        click.echo(f"{m.path}: {m.modality} adapter on {m.base_model} ({m.base_fingerprint or 'no fingerprint'})")
        click.echo(f"    sentence {m.sentence} ({m.n_genes} genes); prompt {m.prompt}, mode {m.mode}; "
                   f"{len(m.labels)} labels from obs[{m.label_key!r}]")
        click.echo(f"    trained on {t.get('n_train')} cells ({t.get('method')}), data {t.get('fingerprint')}; "
                   f"{m.trainer.get('name')}: {m.trainer.get('steps')} steps, {m.trainer.get('epochs')} epochs, "
                   f"lr {m.trainer.get('learning_rate')}, r {m.trainer.get('lora_rank')}")
        if v:
            click.echo(f"    validation ({v.get('n_cells')} cells, decode={v.get('decode')}): accuracy "
                       f"{v.get('accuracy'):.3f}, lineage {v.get('lineage_accuracy'):.3f}, macro F1 {v.get('macro_f1'):.3f}")
        click.echo(f"    cellscribe {m.cellscribe_version}, {m.created}")


@main.command(name="plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins_command(as_json: bool) -> None:
    """List the loaded plugins: what each provides, its version and origin."""
    from ..core.plugins import get_host

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
