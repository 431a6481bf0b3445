"""The ``lora`` trainer: peft LoRA with transformers' ``Trainer``, loss on the answer tokens only.

Batches are padded on the left, so every example's answer ends at the last column, and the positions
are counted from the attention mask, as ``generate`` counts them for a left-padded batch: the model sees
each prompt exactly as at inference. The model computes logits only for the last ``answer + 1``
columns (``logits_to_keep``): the vocabulary projection of every prompt position is skipped, about a
third of a small model's forward and backward work. The loss is the cross-entropy of the answer tokens
(their end-of-sequence token included), averaged over the answer tokens of the step.

Checkpoints (``output/checkpoints/checkpoint-N``: adapter weights, optimiser, scheduler, RNG states and
the data order) are written every ``save_steps`` optimiser steps; ``resume=True`` continues from the
last one with the same data order, so an interrupted run ends with the weights of an uninterrupted one.

Options (``trainer_options``): ``target_modules`` (default ``"all-linear"``: every linear layer of the
transformer blocks), ``warmup_ratio`` (0.05), ``weight_decay`` (0.0), ``lr_scheduler_type``
(``"linear"``), ``max_grad_norm`` (1.0), ``logging_steps`` (10), ``max_batch_tokens`` (16,384: the
batch size on a GPU when ``train_batch_size`` is not given), ``callbacks`` (``TrainerCallback``
objects), ``keep_checkpoints`` (read by the run).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CPU_BATCH_SIZE = 8
GPU_BATCH_TOKENS = 16_384
CHECKPOINTS = "checkpoints"


def _collate(pad_id: int):
    """Left-pad a batch of ``{"prompt_ids", "answer_ids"}``; labels only on the answers."""
    import torch

    def collate(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        width = max(len(b["prompt_ids"]) + len(b["answer_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for i, b in enumerate(batch):
            seq = list(b["prompt_ids"]) + list(b["answer_ids"])
            ids[i, width - len(seq):] = torch.tensor(seq)
            mask[i, width - len(seq):] = 1
            labels[i, width - len(b["answer_ids"]):] = torch.tensor(list(b["answer_ids"]))
        positions = mask.cumsum(-1) - 1
        positions.masked_fill_(mask == 0, 1)  # what generate() does for left padding
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}

    return collate


class _Examples:
    """The examples as a map-style dataset (``len`` and indexing are all the Trainer needs)."""

    def __init__(self, examples: Sequence[Mapping[str, Any]]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Mapping[str, Any]:
        return self.examples[i]


def _answer_trainer():
    import torch
    import transformers

    class AnswerTrainer(transformers.Trainer):
        """Cross-entropy of the answer tokens only, with logits for the answer columns only."""

        loss_is_scaled_for_ga = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            keep = min(int((labels != -100).sum(-1).max()) + 1, labels.shape[1])
            outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
            logits = outputs.logits[:, :-1].float()
            targets = labels[:, labels.shape[1] - keep + 1:].to(logits.device)
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
            )
            n = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
            loss = loss / torch.as_tensor(n, device=loss.device, dtype=loss.dtype).clamp(min=1)
            return (loss, outputs) if return_outputs else loss

    return AnswerTrainer


def _log_callback():
    from transformers import TrainerCallback

    class LogProgress(TrainerCallback):
        """Every logged step (loss, learning rate, epoch) into cellscribe's log."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items())
                log.info("step %d/%d: %s", state.global_step, state.max_steps, shown)

    return LogProgress()


def _linear_names(model: Any) -> list[str]:
    """The names of the linear layers inside the transformer blocks (what peft's ``"all-linear"`` means:
    every ``nn.Linear`` but the output projection), spelled out so a subset of layers can be chosen."""
    import torch

    output = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not output})


def _layers(model: Any, last: int | None) -> list[int] | None:
    if last is None:
        return None
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = int(config.num_hidden_layers)
    if last > n:
        raise ValueError(f"lora_layers={last} but the model has {n} layers; give at most {n}")
    return list(range(n - last, n))


class LoraTrainer:
    """``lora``: a peft LoRA adapter trained with transformers' ``Trainer`` (see the module docstring)."""

    name = "lora"
    description = ("peft LoRA with transformers' Trainer: loss on the answer tokens only, checkpoints and resume, "
                   "bf16 and token-budget batches on GPU")

    def train(self, examples: Sequence[Mapping[str, Any]], *, model: Any, output: Path, spec: Any, seed: int = 0,
              resume: bool = False, progress: bool = True, **_: Any) -> dict[str, Any]:
        """Train, save the adapter into ``output`` and return the settings used and the outcome."""
        handle = model.trainable()
        if handle is None:
            raise ValueError("this model cannot be fine-tuned (no trainable framework model); use a local "
                             "transformers model as base")
        if not examples:
            raise ValueError("no training example: the training split has no cell with an expressed gene")
        import peft
        import torch
        import transformers
        from transformers.trainer_utils import get_last_checkpoint

        opts = dict(spec.trainer_options)
        torch_model, tokenizer, device = handle["model"], handle["tokenizer"], str(handle["device"])
        cuda = device.startswith("cuda")
        bf16 = cuda and torch.cuda.is_bf16_supported()
        longest = max(len(e["prompt_ids"]) + len(e["answer_ids"]) for e in examples)
        if spec.train_batch_size is not None:
            batch_size = spec.train_batch_size
        elif cuda:
            batch_size = max(1, int(opts.get("max_batch_tokens", GPU_BATCH_TOKENS)) // longest)
        else:
            batch_size = CPU_BATCH_SIZE
        batch_size = min(batch_size, len(examples))
        steps_per_epoch = math.ceil(len(examples) / batch_size)
        total = math.ceil(steps_per_epoch * spec.epochs)

        config = peft.LoraConfig(
            r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
            target_modules=(_linear_names(torch_model) if opts.get("target_modules", "all-linear") == "all-linear"
                            else opts["target_modules"]),
            layers_to_transform=_layers(torch_model, spec.lora_layers), task_type="CAUSAL_LM",
        )
        torch_model.config.use_cache = False
        transformers.set_seed(seed)  # the LoRA A matrices are drawn now: the same seed, the same start
        peft_model = peft.get_peft_model(torch_model, config)
        trainable, everything = peft_model.get_nb_trainable_parameters()
        log.info("LoRA r=%d on %s: %d trainable of %d parameters; %d examples, batch %d, %d steps",
                 spec.lora_rank, config.target_modules, trainable, everything, len(examples), batch_size, total)

        folder = Path(output) / CHECKPOINTS
        args = transformers.TrainingArguments(
            output_dir=str(folder),
            per_device_train_batch_size=batch_size,
            num_train_epochs=spec.epochs,
            learning_rate=spec.learning_rate,
            lr_scheduler_type=opts.get("lr_scheduler_type", "linear"),
            warmup_steps=int(math.ceil(float(opts.get("warmup_ratio", 0.05)) * total)),
            weight_decay=float(opts.get("weight_decay", 0.0)),
            max_grad_norm=float(opts.get("max_grad_norm", 1.0)),
            logging_steps=int(opts.get("logging_steps", 10)),
            save_strategy="steps",
            save_steps=spec.save_steps,
            save_total_limit=opts.get("save_total_limit", 2),
            seed=seed,
            data_seed=seed,
            report_to="none",
            disable_tqdm=not progress,
            use_cpu=not cuda,
            bf16=bf16,
            remove_unused_columns=False,
            dataloader_num_workers=0,
        )
        callbacks = [_log_callback(), *opts.get("callbacks", [])]
        trainer = _answer_trainer()(
            model=peft_model, args=args, train_dataset=_Examples(examples),
            data_collator=_collate(int(tokenizer.pad_token_id)), callbacks=callbacks,
        )
        # Without a bar the Trainer prints every log line to stdout; cellscribe logs them (LogProgress).
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        last = get_last_checkpoint(str(folder)) if resume and folder.is_dir() else None
        if resume and last is None:
            log.warning("resume: no checkpoint in %s yet; training from the start", folder)
        started = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=last)
        seconds = time.perf_counter() - started
        peft_model.save_pretrained(str(output), safe_serialization=True)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return {
            "steps": int(trainer.state.global_step),
            "batch_size": batch_size,
            "train_loss": float(result.training_loss),
            "last_logged_loss": float(losses[-1]) if losses else None,
            "trainable_parameters": int(trainable),
            "target_modules": opts.get("target_modules", "all-linear"),
            "layers": config.layers_to_transform,
            "device": device,
            "precision": "bf16" if bf16 else str(torch_model.dtype).removeprefix("torch."),
            "resumed_from": Path(last).name if last else None,
            "seconds_training": round(seconds, 1),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        }
