"""Loading PEFT adapters (LoRA and the other PEFT methods) onto a transformers model.

Adapters are named after the modality they serve, so several can share one base model and the backend
switches between them with ``set_adapter``. Only ``adapter_model.safetensors`` is ever read: pickled
``adapter_model.bin`` files can run arbitrary code on load.

An adapter only makes sense on the model it was trained on. Its ``adapter_config.json`` names that
model (``base_model_name_or_path``); :func:`check_adapter_base` refuses an adapter whose base is clearly
another model (see there for what counts as the same model).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cellscribe.core.domain.adapters import ADAPTER_MANIFEST, read_adapter_manifest, same_base

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


#: Config fields that must agree for an adapter trained on one local model folder to fit another.
_SHAPE_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)


def _base_config(model: Any) -> Any:
    get_base = getattr(model, "get_base_model", None)
    return (get_base() if callable(get_base) else model).config


def _shape(config: Any) -> dict[str, Any]:
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    return {k: get(k) for k in _SHAPE_FIELDS}


def check_adapter_base(model: Any, adapter_dir: Path, adapter: str) -> None:
    """Raise ``ValueError`` when the adapter in ``adapter_dir`` was trained on another base model.

    The adapter's ``base_model_name_or_path`` and the loaded model's name (what ``from_pretrained``
    was given) are the same model when they are equal (case-insensitively), name the same local
    folder, or end in the same folder or repository name (``Qwen/Qwen2.5-7B-Instruct`` and
    ``/models/Qwen2.5-7B-Instruct``). When the adapter names a local folder that still exists, its
    ``config.json`` decides instead: the architecture fields must match the loaded model's. An adapter
    that names no base is accepted.
    """
    recorded = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8")).get(
        "base_model_name_or_path"
    )
    config = _base_config(model)
    actual = getattr(config, "_name_or_path", None) or ""
    manifest = read_adapter_manifest(adapter_dir)
    if manifest is not None and actual:
        # A cellscribe-trained adapter records its base's weights fingerprint: compare the weights.
        if not same_base(manifest.base_model, manifest.base_fingerprint, str(actual)):
            raise ValueError(
                f"adapter {adapter!r} was trained on base model {manifest.base_model!r}, but the loaded model "
                f"{actual!r} has other weights (its {ADAPTER_MANIFEST} records the base's fingerprint). Load "
                f"it onto its own base: model={manifest.base_model!r}"
            )
        return
    if not recorded or not actual:
        log.info("adapter %s: base model not recorded, not checked", adapter)
        return
    expected, loaded = str(recorded).rstrip("/"), str(actual).rstrip("/")
    if expected.casefold() == loaded.casefold():
        return
    expected_path, loaded_path = Path(expected).expanduser(), Path(loaded).expanduser()
    if expected_path.exists() and loaded_path.exists() and expected_path.resolve() == loaded_path.resolve():
        return
    if (expected_path / "config.json").is_file():
        theirs = _shape(json.loads((expected_path / "config.json").read_text(encoding="utf-8")))
        ours = _shape(config)
        differ = {k: (theirs[k], ours[k]) for k in _SHAPE_FIELDS if theirs[k] != ours[k]}
        if not differ:
            return
        detail = "; ".join(f"{k}: {a} vs {b}" for k, (a, b) in differ.items())
        raise ValueError(
            f"adapter {adapter!r} was trained on {expected!r}, whose architecture differs from the loaded "
            f"model {loaded!r} ({detail}). Load the adapter onto the model it was trained on."
        )
    if expected_path.name.casefold() == loaded_path.name.casefold():
        return
    raise ValueError(
        f"adapter {adapter!r} was trained on base model {expected!r}, but the loaded model is {loaded!r}. "
        "Load it onto its own base model (model=...). If both name the same weights, set "
        f"base_model_name_or_path in {adapter_dir / ADAPTER_CONFIG} to {loaded!r}."
    )


def load_peft_adapter(model: Any, adapter: str, modality: str) -> Any:
    """Load ``adapter`` onto ``model`` under the name ``modality`` and make it the active adapter.

    The first adapter wraps the base model in a ``PeftModel`` (LoRA layers are injected into the base in
    place); further ones are added to that ``PeftModel``. Returns the ``PeftModel``, in eval mode with
    frozen adapter weights. Raises ``ValueError`` for a missing or pickled adapter, an adapter trained
    on another base (:func:`check_adapter_base`), one that does not fit the model's layers, or a second
    adapter for the same modality.
    """
    from peft import PeftModel

    path = resolve_adapter(adapter)
    check_adapter_base(model, path, adapter)
    if isinstance(model, PeftModel) and modality in model.peft_config:
        raise ValueError(
            f"an adapter for modality {modality!r} is already loaded on this model; give one adapter "
            "per modality."
        )
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(path), adapter_name=modality, is_trainable=False)
        else:
            model = PeftModel.from_pretrained(model, str(path), adapter_name=modality, is_trainable=False)
    except (RuntimeError, KeyError, ValueError) as exc:
        # Shape mismatches surface as RuntimeError("size mismatch ...") deep inside peft/torch.
        raise ValueError(
            f"adapter {adapter!r} does not fit this model ({_short(exc)}); load it onto the base model it "
            "was trained on."
        ) from exc
    model.set_adapter(modality, inference_mode=True)
    model.eval()
    log.info("loaded adapter %s for modality %s", adapter, modality)
    return model


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
