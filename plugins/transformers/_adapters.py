"""Loading PEFT adapters (LoRA and the other PEFT methods) onto a transformers model.

Adapters are named after the modality they serve, so several can share one base model and the backend
switches between them with ``set_adapter``. Only ``adapter_model.safetensors`` is ever read: pickled
``adapter_model.bin`` files can run arbitrary code on load.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ._backend import looks_like_hub_id

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def resolve_adapter(adapter: str) -> Path:
    """The local folder of ``adapter`` (a folder, or a hub id fetched into the Hugging Face cache).

    Raises ``ValueError`` when the folder is missing, is not a PEFT adapter, or has no safetensors
    weights.
    """
    path = Path(adapter).expanduser()
    if not path.exists():
        if not looks_like_hub_id(adapter):
            raise ValueError(
                f"adapter {adapter!r} does not exist. Give the folder written by PEFT's save_pretrained "
                f"(with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}) or a hub id like 'org/name'."
            )
        from huggingface_hub import snapshot_download

        # Fetch only the config and the safetensors weights, so a pickled .bin is never downloaded.
        try:
            path = Path(snapshot_download(adapter, allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS]))
        except Exception as exc:
            raise ValueError(
                f"adapter {adapter!r} is not a local folder and could not be fetched from the Hugging Face "
                f"hub ({type(exc).__name__}: {exc}). Check the path, or the hub id and your network access."
            ) from exc
    if not (path / ADAPTER_CONFIG).is_file():
        raise ValueError(
            f"adapter {adapter!r} is not a PEFT adapter: {ADAPTER_CONFIG} is missing. Give the folder written "
            "by PEFT's save_pretrained."
        )
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise ValueError(
            f"adapter {adapter!r} has no {ADAPTER_WEIGHTS}; cellscribe loads adapter weights only in "
            "safetensors format. Re-save it with save_pretrained(..., safe_serialization=True)."
        )
    return path


def load_peft_adapter(model: Any, adapter: str, modality: str) -> Any:
    """Load ``adapter`` onto ``model`` under the name ``modality`` and make it the active adapter.

    The first adapter wraps the base model in a ``PeftModel`` (LoRA layers are injected into the base in
    place); further ones are added to that ``PeftModel``. Returns the ``PeftModel``, in eval mode with
    frozen adapter weights.
    """
    from peft import PeftModel

    path = resolve_adapter(adapter)
    if isinstance(model, PeftModel):
        if modality in model.peft_config:
            raise ValueError(
                f"an adapter for modality {modality!r} is already loaded on this model; give one adapter "
                "per modality."
            )
        model.load_adapter(str(path), adapter_name=modality, is_trainable=False)
    else:
        model = PeftModel.from_pretrained(model, str(path), adapter_name=modality, is_trainable=False)
    model.set_adapter(modality, inference_mode=True)
    model.eval()
    log.info("loaded adapter %s for modality %s", adapter, modality)
    return model
