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

    :param tissue: the user's tissue hint (``tissue=`` / ``--tissue``) or ``None``.
    :return: ``None``, or a table (a ``pandas.DataFrame`` or the path of a CSV) with columns
        ``cell_type``, ``gene`` and optionally ``weight`` (negative: expected absent), ``cl_id``,
        ``tissue``, ``source``. All results are combined, after the model's own knowledge.
    """
