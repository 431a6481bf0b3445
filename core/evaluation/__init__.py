"""Evaluation: how good an annotation is.

:mod:`.metrics` holds Cell-o1's CellPuzzles metrics, :mod:`.grading` the graded score on CellReasoner's
scale (grounded in the Cell Ontology), :mod:`.evaluate` the measures of finished runs against known
labels and their report (``cellscribe evaluate``).
"""
