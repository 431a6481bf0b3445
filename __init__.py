"""cellscribe: annotate single cells with reasoning language models, across modalities.

Plugin authors need only ``from cellscribe import hookimpl``; analysts use ``cellscribe.tl``.
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
    "Annotation",
    "CellSentences",
    "Example",
    "FeatureMatrix",
    "Generation",
    "Prompt",
]


def __getattr__(name: str):
    # ``tl`` pulls in anndata; import it on first use so ``import cellscribe`` stays cheap.
    if name == "tl":
        import importlib

        return importlib.import_module(f"{__name__}.tl")
    raise AttributeError(f"module 'cellscribe' has no attribute {name!r}")
