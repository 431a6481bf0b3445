"""Built-in plugin: the ``rna`` modality (gene expression). See :mod:`.modality`."""

from __future__ import annotations

from cellscribe import hookimpl

from .modality import COUNT_LAYERS, LOG_LAYERS, RnaModality

__all__ = ["RnaModality", "COUNT_LAYERS", "LOG_LAYERS"]


@hookimpl
def cellscribe_register_modalities(register):
    register(RnaModality())
