"""``cellscribe finetune`` and ``cellscribe export``: their flags are made from the run specification's
data, sentence, prompt and model-loading parameters and from the fine-tuning parameters
(:class:`cellscribe.core.spec.FinetuneSpec`), plus the options plugins add to ``annotate``."""

from __future__ import annotations

from typing import Any

import click

from ._common import (
    PluginCommand,
    flag_option,
    friendly_errors,
    parse_pairs,
    plugin_options,
    run_options,
    run_values,
    split_plugin_values,
)

#: The run parameters a training run takes: how cells become prompts, how the base is loaded.
TRAIN_RUN_FLAGS = ("mod", "layer", "use_raw", "modality_options", "chunk_size", "sentence", "n_genes",
                   "sentence_options", "prompt", "mode", "k", "seed", "max_prompt_tokens", "prompt_options",
                   "device", "dtype", "trust_remote_code", "model_options", "generation", "progress")


def _finetune_options(skip: tuple[str, ...] = ()) -> list[click.Option]:
    from ..core.spec import finetune_parameters

    return [flag_option(a.name, a.metadata["flag"], a.default) for a in finetune_parameters() if a.name not in skip]


def _values(kw: dict[str, Any], skip: tuple[str, ...] = ()) -> tuple[Any, Any]:
    """The RunSpec and FinetuneSpec of a command's keywords."""
    from ..core.spec import FinetuneSpec, RunSpec, finetune_parameters

    ft = {}
    for a in finetune_parameters():
        if a.name in skip or a.name not in kw:
            continue
        value = kw.pop(a.name)
        ft[a.name] = parse_pairs(value, a.metadata["flag"].decls[0]) if a.metadata["flag"].kind == "pairs" else value
    values = run_values(kw, TRAIN_RUN_FLAGS)
    return RunSpec.from_kwargs(**values, modality=kw.pop("modality")), FinetuneSpec(**ft)


def _modality_option() -> click.Option:
    return click.Option(["--modality"], default="rna", show_default=True,
                        help="Modality the adapter serves (rna, atac, ...); one adapter per modality.")


def finetune_command() -> click.Command:
    """``cellscribe finetune``: a LoRA adapter from labelled cells."""
    plugin_params = plugin_options("annotate")
    params: list[click.Parameter] = [
        click.Argument(["input_path"], metavar="INPUT", type=click.Path(exists=True, dir_okay=False)),
        click.Option(["-o", "--output"], required=True, type=click.Path(file_okay=False),
                     help="Adapter folder to create (must not exist, unless --resume)."),
        _modality_option(),
        *_finetune_options(),
        *run_options(TRAIN_RUN_FLAGS),
        *plugin_params,
    ]

    @friendly_errors
    def finetune(input_path: str, output: str, **kw: Any) -> None:
        from ..core.run import read_input
        from ..core.run.finetune import finetune as train

        extra = split_plugin_values(kw, plugin_params)
        spec, ft = _values(kw)
        if ft.base is None:
            raise click.UsageError("--base is required: the model the adapter is trained on")
        spec = spec.replace(modality_options={**spec.data.modality_options, **extra})
        data = read_input(input_path, **spec.data.modality_options)
        manifest = train(data, output, spec, ft, progress=spec.output.progress)
        t = manifest.training
        click.echo(f"adapter for {manifest.modality} written to {output}: {t['n_train']} training cells "
                   f"({t['n_records']} records, {manifest.trainer.get('steps')} steps, "
                   f"loss {manifest.trainer.get('train_loss', float('nan')):.4f}), {len(manifest.labels)} labels")
        if manifest.validation:
            v = manifest.validation
            click.echo(f"validation on {v['n_cells']} held-out cells ({t['method']}, decode={v['decode']}): "
                       f"accuracy {v['accuracy']:.3f}, lineage accuracy {v['lineage_accuracy']:.3f}, "
                       f"macro F1 {v['macro_f1']:.3f}")
        click.echo(f"took {t['seconds']['total']:.0f} s; use it with: cellscribe annotate DATA -o OUT --model "
                   f"{manifest.base_model} --adapter {manifest.modality}={output}")

    return PluginCommand(
        "finetune", params=params, callback=finetune, plugin_params=plugin_params,
        help="""Train a LoRA adapter on the labelled cells of INPUT (obs[--label-key]) into the folder OUTPUT.

        Training records are made exactly as cellscribe annotate makes its prompts (modality, sentence
        strategy, prompt strategy, the base model's chat template); the answers are the labels, the loss
        is on the answer tokens only. Whole donors/batches are held out for validation when the data has
        such a column; the adapter is validated on them at the end and its folder carries a manifest
        (cellscribe_adapter.json) that annotate --adapter reads.""",
    )


def export_command() -> click.Command:
    """``cellscribe export``: training sets for other trainers."""
    from ..core.run.finetune import EXPORT_FORMATS

    plugin_params = plugin_options("annotate")
    params: list[click.Parameter] = [
        click.Argument(["input_path"], metavar="INPUT", type=click.Path(exists=True, dir_okay=False)),
        click.Option(["-o", "--output"], required=True, type=click.Path(),
                     help="Output file (a folder for hf-datasets); must not exist."),
        click.Option(["--format", "format_"], type=click.Choice(EXPORT_FORMATS), default="chat-jsonl",
                     show_default=True, help="chat-jsonl: OpenAI/TRL messages per line; hf-datasets: a datasets "
                     "folder; cellreasoner / cellpuzzles: those models' own files."),
        click.Option(["--format-option"], multiple=True, metavar="KEY=VALUE",
                     help="Option of the cellreasoner/cellpuzzles formats (repeat)."),
        _modality_option(),
        *_finetune_options(skip=EXPORT_SKIPS),
        *run_options(TRAIN_RUN_FLAGS),
        *plugin_params,
    ]

    @friendly_errors
    def export(input_path: str, output: str, format_: str, format_option: tuple[str, ...], **kw: Any) -> None:
        from ..core.run import read_input
        from ..core.run.finetune import export_training_set

        extra = split_plugin_values(kw, plugin_params)
        spec, ft = _values(kw, EXPORT_SKIPS)
        spec = spec.replace(modality_options={**spec.data.modality_options, **extra})
        data = read_input(input_path, **spec.data.modality_options)
        counts = export_training_set(data, output, format_, spec, ft, progress=spec.output.progress,
                                     format_options=parse_pairs(format_option, "--format-option"))
        click.echo(f"wrote {counts['records']} {format_} records to {output}")
        if "n_train" in counts:
            click.echo(f"  {counts['n_train']} training / {counts['n_validation']} validation cells "
                       f"({counts['method']}); fingerprint {counts['fingerprint']}")

    return PluginCommand(
        "export", params=params, callback=export, plugin_params=plugin_params,
        help="""Write the labelled cells of INPUT as a training set for other trainers (TRL, LLaMA-Factory):
        the records cellscribe finetune trains on, made exactly as annotate makes its prompts.""",
    )


#: Fine-tuning parameters that say how to train, not what the records are (``export`` has no use for them).
EXPORT_SKIPS = ("epochs", "learning_rate", "lora_rank", "lora_alpha", "lora_dropout", "lora_layers",
                "train_batch_size", "save_steps", "resume", "eval_decode", "max_eval_cells", "trainer",
                "trainer_options")
