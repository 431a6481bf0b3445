"""Built-in fine-tuning plugin: the ``lora`` trainer (``cellscribe finetune``).

Registers the trainer ``lora`` (:class:`~._lora.LoraTrainer`): a peft LoRA adapter trained with
transformers' ``Trainer`` on the examples the run makes (prompt ids as the model's ``generate`` sees
them, answer ids after them; the loss on the answer tokens only), with checkpoints, resume and a
progress bar; bf16 and batches sized by a token budget on a GPU, float32 on CPU.

torch, transformers and peft are imported only when a trainer trains, never here.
"""

from __future__ import annotations

from cellscribe import hookimpl

from ._lora import LoraTrainer

__all__ = ["LoraTrainer", "cellscribe_register_trainers"]


@hookimpl
def cellscribe_register_trainers(register) -> None:
    register(LoraTrainer())
