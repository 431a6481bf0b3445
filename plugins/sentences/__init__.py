"""Built-in sentence strategies (``auto``, ``ranked-hvg``, ``top-expressed``, ``data-hvg``,
``cluster-markers``) and the ``jsonl`` sentence file format.

``ranked-hvg`` reproduces CellReasoner's cell sentences byte for byte with the 10,000-gene ranked list
shipped in ``data/`` (see ``data/PROVENANCE.md``); ``top-expressed`` reproduces Cell-o1's. See
:mod:`cellscribe.plugins.sentences.strategies` for the rules.
"""

from __future__ import annotations

from cellscribe import hookimpl

from .cluster_markers import ClusterMarkers, group_markers
from .formats import JsonlFormat
from .strategies import (
    Auto,
    DataHVG,
    RankedHVG,
    TopExpressed,
    candidates_for_top,
    cellreasoner_genes,
    learn_hvg_list,
    resolve_gene_list,
)

__all__ = [
    "Auto",
    "ClusterMarkers",
    "DataHVG",
    "JsonlFormat",
    "RankedHVG",
    "TopExpressed",
    "candidates_for_top",
    "cellreasoner_genes",
    "group_markers",
    "learn_hvg_list",
    "resolve_gene_list",
]


@hookimpl
def cellscribe_register_sentence_strategies(register):
    for strategy in (Auto(), RankedHVG(), TopExpressed(), DataHVG(), ClusterMarkers()):
        register(strategy)


@hookimpl
def cellscribe_register_formats(register):
    register(JsonlFormat())
