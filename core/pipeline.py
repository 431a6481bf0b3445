"""Moved: the run is the package :mod:`cellscribe.core.run` (one module per step) and its parameters are
:class:`cellscribe.core.spec.RunSpec`. This module only re-exports the old names for code written
before the move, with a ``DeprecationWarning``; nothing in cellscribe imports it (a test checks).
"""

from __future__ import annotations

import warnings

from .run import annotate, is_mudata, measured_mask, plan_run, read_input, select_modality_data, write_sentences
from .run.results import EMPTY_NOTE

__all__ = ["annotate", "plan_run", "read_input", "select_modality_data", "is_mudata", "measured_mask",
           "write_sentences", "EMPTY_NOTE"]

warnings.warn(
    "cellscribe.core.pipeline moved to cellscribe.core.run (plan_run, annotate, read_input, ...); "
    "import from there",
    DeprecationWarning,
    stacklevel=2,
)
