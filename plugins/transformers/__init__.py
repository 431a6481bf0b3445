"""The ``transformers`` backend: local or Hugging Face hub causal language models, with PEFT adapters.

Registers:

- backend ``transformers`` (:class:`~._backend.TransformersBackend`): handles a local directory that
  holds a ``config.json``, any string shaped like a hub id (``"org/name"``) and the name of a model
  manifest (``"cellreasoner-7b"``, ``"cell-o1"``; :mod:`cellscribe.core.domain.manifests`). Registered with
  ``trylast=True`` so third-party backends are asked first. Token-budget batches; ``decode`` modes
  ``generate``, ``constrained`` (:mod:`._constrained`) and ``score`` (:mod:`._scoring`).
- ``cellscribe_load_adapter`` for ``backend="transformers"``: loads a PEFT adapter (safetensors only)
  named after its modality, so one base model can carry an adapter per modality; an adapter trained on
  another base model is refused.

torch, transformers and peft are imported only when a model or adapter is loaded, never here.
"""

from __future__ import annotations

from typing import Any

from cellscribe import hookimpl

from ._backend import BACKEND_NAME, TransformersBackend, TransformersModel

__all__ = ["TransformersBackend", "TransformersModel", "cellscribe_register_backends", "cellscribe_load_adapter"]


@hookimpl(trylast=True)
def cellscribe_register_backends(register) -> None:
    register(TransformersBackend())


@hookimpl(trylast=True)
def cellscribe_load_adapter(model: Any, adapter: str, modality: str, backend: str) -> Any | None:
    if backend != BACKEND_NAME:
        return None
    from ._adapters import load_peft_adapter

    return load_peft_adapter(model, adapter, modality)
