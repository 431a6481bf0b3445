"""Built-in plugin: ``markers``, the offline default model.

A backend (``model="markers"``, cellscribe's default) that reads the same prompts an LLM reads and
answers in the same text formats from marker-gene knowledge, with reasoning written marker by marker
and a calibrated confidence. Needs no weights, no GPU and no network. Modules:

- :mod:`.knowledge`: the marker knowledge (PanglaoDB plus a curated canonical layer, user tables);
- :mod:`.scoring`: ranked gene lists x knowledge -> cell type scores (sparse, vectorised);
- :mod:`.signatures`: label signatures learned from k-shot examples;
- :mod:`.calibration`: scores -> calibrated confidences (fixed parameters, ``data/calibration_v3.json``);
- :mod:`.reasoning`: the written answers;
- :mod:`.backend`: the backend and the loaded model.

Other plugins can contribute knowledge with the ``cellscribe_marker_knowledge`` hook, which this
plugin owns (:mod:`.hookspecs`, added through ``cellscribe_addhooks``); users with ``marker_table=``
(``--model-option marker_table=PATH``).
"""

from __future__ import annotations

from cellscribe import hookimpl

from .backend import MarkersBackend, MarkersModel, is_uninformative_gene
from .calibration import Calibration, load_calibration
from .knowledge import MarkerKnowledge, load_knowledge, read_marker_table
from .scoring import MarkerScorer, ScoringParams

__all__ = [
    "MarkersBackend",
    "MarkersModel",
    "MarkerKnowledge",
    "MarkerScorer",
    "ScoringParams",
    "Calibration",
    "load_calibration",
    "load_knowledge",
    "read_marker_table",
    "is_uninformative_gene",
]


@hookimpl
def cellscribe_addhooks(pluginmanager):
    from . import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


@hookimpl
def cellscribe_register_backends(register):
    register(MarkersBackend())
