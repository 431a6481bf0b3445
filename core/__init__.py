"""cellscribe's core: hook specifications, value types, the plugin host and shared machinery.

The core knows no modality, prompt strategy or model: those are plugins (``cellscribe.plugins.*`` and
third-party packages) registered through the ``cellscribe`` entry-point group.
"""

from .hookspecs import hookimpl, hookspec
from .types import STATUS_OK, STATUS_UNRESOLVED, Annotation, CellSentences, Example, FeatureMatrix, Generation, Prompt

__all__ = [
    "hookimpl",
    "hookspec",
    "Annotation",
    "CellSentences",
    "Example",
    "FeatureMatrix",
    "Generation",
    "Prompt",
    "STATUS_OK",
    "STATUS_UNRESOLVED",
]
