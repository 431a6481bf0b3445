"""cellscribe's core, the kernel: hook specifications (:mod:`.hookspecs`), component protocols
(:mod:`.components`), values (:mod:`.types`), answer formats (:mod:`.answers`), the run specification
(:mod:`.spec`), the plugin host (:mod:`.plugins`), loaded models (:mod:`.models`) and the run
(:mod:`.run`). Beside them: :mod:`.domain` (libraries core and plugins share) and :mod:`.evaluation`.

The core knows no modality, prompt strategy or model: those are plugins (``cellscribe.plugins.*`` and
third-party packages) registered through the ``cellscribe`` entry-point group. See docs/architecture.md.
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
