"""cellscribe: annotate single cells with reasoning language models, across modalities.

Plugin authors need only ``from cellscribe import hookimpl``; analysts use ``cellscribe.tl`` (and
``cellscribe.load_model`` to load a model once for several runs; ``cellscribe.finetune`` to train a
LoRA adapter from labelled cells, ``cellscribe.export_training_set`` to write the training records).
Heavy libraries (torch, transformers, scanpy) are imported only when a run needs them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .core.hookspecs import hookimpl
from .core.types import Annotation, CellSentences, Example, FeatureMatrix, Generation, Prompt

__all__ = [
    "__version__",
    "hookimpl",
    "tl",
    "pl",
    "load_model",
    "Model",
    "finetune",
    "export_training_set",
    "Annotation",
    "CellSentences",
    "Example",
    "FeatureMatrix",
    "Generation",
    "Prompt",
]


def __getattr__(name: str):
    # ``tl`` and ``pl`` pull in anndata/matplotlib; import them on first use so ``import cellscribe``
    # stays cheap.
    import importlib

    if name in ("tl", "pl"):
        return importlib.import_module(f"{__name__}.{name}")
    if name in ("load_model", "Model"):
        return getattr(importlib.import_module(f"{__name__}.core.models"), name)
    if name == "FailedPromptsError":
        return getattr(importlib.import_module(f"{__name__}.core.run"), name)
    if name in ("finetune", "export_training_set"):
        module = importlib.import_module(f"{__name__}.core.run.finetune")
        return module.train_adapter if name == "finetune" else module.export
    raise AttributeError(f"module 'cellscribe' has no attribute {name!r}")
