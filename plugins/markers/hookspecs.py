"""Hooks the ``markers`` plugin owns (added with ``cellscribe_addhooks``; see
:func:`cellscribe.core.hookspecs.cellscribe_addhooks`).

Implement them like any cellscribe hook, ``from cellscribe import hookimpl``; they are called only when
the ``markers`` plugin is installed.
"""

from __future__ import annotations

from typing import Any

from cellscribe.core.hookspecs import hookspec


@hookspec
def cellscribe_marker_knowledge(tissue: str | None) -> Any | None:
    """Contribute marker-gene knowledge to the ``markers`` model.

    Called when a ``markers`` model loads, with the hook relay its backend is given.

    :param tissue: the tissue the model was loaded for (``MarkersBackend.load(tissue=...)``), or ``None``:
        a run's tissue (``tissue=`` / ``--tissue``, or the data's own) is per run, so a model loaded by a
        run or by :func:`cellscribe.load_model` gets ``None``. Record the tissue of your types in the
        table's ``tissue`` column: the model then answers with them only for cells of that tissue.
    :return: ``None``, or a table (a ``pandas.DataFrame`` or the path of a CSV) with columns
        ``cell_type``, ``gene`` and optionally ``weight`` (negative: expected absent), ``cl_id``,
        ``tissue``, ``source``. All results are combined, after the model's own knowledge.
    """
