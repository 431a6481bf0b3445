"""Tissues, offline: the tissue a data set states for its cells, in the words of the CELLxGENE schema.

A cell's tissue of origin is part of what a data set says about it. CELLxGENE's schema states it as an
UBERON term (``obs["tissue_ontology_term_id"]``, e.g. ``UBERON:0000006``) with its label
(``obs["tissue"]``, ``"islet of Langerhans"``); the CELLxGENE Census adds ``tissue_general``, the
coarse tissue the term belongs to (``"pancreas"``): the first of a fixed, ordered list of 81 general
UBERON tissues that is the term itself or one of its ancestors (is_a, part_of). Other data sets use
columns named ``organ`` or ``organ_tissue`` and free text (``"PBMC"``, ``"Bone_Marrow"``).

:func:`standard_tissue` turns any of these values into the general tissue's name: an UBERON id or
label (or an unambiguous synonym) through a vendored table of the 13,236 UBERON terms that have a
general tissue (``data/uberon_tissues.tsv.gz``, built by ``scripts/build_tissue_table.py`` the
Census's way from the UBERON release CZI's ``cellxgene-ontology-guide`` 1.11.1 ships; see
``data/PROVENANCE.md``), plus a few common non-ontology spellings (:data:`COMMON_NAMES`). A value it
cannot place is kept as written (a model may still know it).

:func:`stated_tissues` reads a whole ``obs``: per cell the first of :data:`TISSUE_COLUMNS` that holds a
value for it (missing values, ``"unknown"`` and cells grown in culture state no tissue), as a
:class:`StatedTissues`.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import pandas as pd

__all__ = [
    "TISSUE_TABLE",
    "TISSUE_COLUMNS",
    "COMMON_NAMES",
    "MISSING_VALUES",
    "StatedTissues",
    "check_given",
    "standard_tissue",
    "stated_tissues",
    "tissue_table",
]

#: The vendored table (gzip TSV: ``id, name, general, synonyms``; see the module docstring).
TISSUE_TABLE = "uberon_tissues.tsv.gz"

#: ``obs`` columns that state a cell's tissue, in the order they are read (names compared ignoring
#: case; in a MuData also as a modality's ``"{mod}:{column}"``). The general tissue first: it is what a
#: knowledge of organs understands; then the specific term, its id, and the names other atlases use.
#: (``tissue_type`` is not one: in the CELLxGENE schema it says ``tissue``, ``organoid`` or ``cell
#: culture``.)
TISSUE_COLUMNS: tuple[str, ...] = (
    "tissue_general",
    "tissue_general_ontology_term_id",
    "tissue",
    "tissue_ontology_term_id",
    "organ_tissue",
    "organ",
)

#: Spellings of common tissues that are not UBERON labels or synonyms -> the general tissue's name
#: (compared after :func:`_key`: case, ``_``/``-`` and repeated spaces ignored).
COMMON_NAMES: Mapping[str, str] = {
    "pbmc": "blood",
    "pbmcs": "blood",
    "peripheral blood": "blood",
    "peripheral blood mononuclear cells": "blood",
    "peripheral blood mononuclear cell": "blood",
    "whole blood": "blood",
    "cord blood": "blood",
    "bm": "bone marrow",
    "bmmc": "bone marrow",
    "bmmcs": "bone marrow",
    "lymph nodes": "lymph node",
    "lungs": "lung",
    "kidneys": "kidney",
    "skin": "skin of body",
    "islet": "pancreas",
    "islets": "pancreas",
    "pancreatic islets": "pancreas",
    "gut": "intestine",
    "bladder": "urinary bladder",
    "fat": "adipose tissue",
    "muscle": "musculature",
    "skeletal muscle": "musculature",
}

#: Values that state no tissue.
MISSING_VALUES = frozenset({"", "nan", "none", "na", "n/a", "unknown", "unspecified", "not applicable", "null"})

_UBERON_ID = re.compile(r"^UBERON[:_]\d{7}$", re.IGNORECASE)
#: CELLxGENE schema 4 and earlier marked cultured samples in the id itself (``UBERON:0000178 (cell culture)``).
_SUFFIX = re.compile(r"\s*\((organoid|cell culture)\)\s*$", re.IGNORECASE)


def _key(value: str) -> str:
    return " ".join(str(value).casefold().replace("_", " ").replace("-", " ").split())


@attrs.frozen(eq=False)
class _Table:
    general_of_id: Mapping[str, str]  # UBERON id -> general tissue name
    general_of_name: Mapping[str, str]  # _key(label or synonym) -> general tissue name
    general_names: frozenset[str]


@functools.cache
def tissue_table() -> _Table:
    """The vendored UBERON table as look-ups (read once, ~0.1 s)."""
    path = importlib.resources.files(__package__).joinpath("data").joinpath(TISSUE_TABLE)
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as fh:
        table = pd.read_csv(fh, sep="\t", dtype=str, keep_default_na=False)
    label = dict(zip(table["id"], table["name"]))
    general = table["general"].map(label)
    of_id = dict(zip(table["id"], general))
    of_name: dict[str, str] = {}
    for synonyms, g in zip(table["synonyms"], general):  # synonyms first: labels overwrite them
        for s in synonyms.split("|") if synonyms else ():
            of_name[_key(s)] = g
    of_name.update({_key(n): g for n, g in zip(table["name"], general)})
    return _Table(of_id, of_name, frozenset(general))


def standard_tissue(value: Any) -> str | None:
    """The general tissue (its UBERON label, e.g. ``"pancreas"``) that ``value`` names, the value itself
    (stripped) when it names none this module knows, or ``None`` when it states no tissue.

    ``value``: an UBERON id (``"UBERON:0000006"``, also with a schema-4 ``" (organoid)"`` suffix), an
    UBERON label or synonym (``"islet of Langerhans"``, ``"pancreatic islet"``), a general tissue
    (``"pancreas"``), or a common spelling (:data:`COMMON_NAMES`: ``"PBMC"``, ``"Bone_Marrow"``).
    """
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = _SUFFIX.sub("", str(value)).strip()
    key = _key(text)
    if key in MISSING_VALUES:
        return None
    table = tissue_table()
    if _UBERON_ID.match(text):
        return table.general_of_id.get(text.upper().replace("_", ":"), text)
    if key in COMMON_NAMES:
        return COMMON_NAMES[key]
    return table.general_of_name.get(key, text)


@attrs.frozen(eq=False)
class StatedTissues:
    """The tissue each cell's data set states, and where it was read.

    Attributes
    ----------
    names
        Per cell (in the order asked for), the tissue's name (:func:`standard_tissue`), ``""`` where
        nothing states one.
    source
        ``"tissue="`` (the run's parameter), ``"obs"`` (standard columns) or ``"none"``.
    columns
        ``{column: cells whose tissue it gave}`` for ``source == "obs"``.
    written
        ``{value as written: tissue name}`` for the values that were translated (ids, labels, spellings).
    """

    names: np.ndarray
    source: str
    columns: Mapping[str, int] = attrs.field(factory=dict)
    written: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def n_stated(self) -> int:
        return int((self.names != "").sum())

    def counts(self) -> dict[str, int]:
        """Cells per stated tissue, most first."""
        values, n = np.unique(self.names[self.names != ""].astype(str), return_counts=True)
        order = np.argsort(-n, kind="stable")
        return {str(values[i]): int(n[i]) for i in order}

    def summary(self) -> dict[str, Any]:
        """What the run records (``uns[key]["params"]["tissue_stated"]``)."""
        return {
            "source": self.source,
            "columns": dict(self.columns),
            "cells": self.counts(),
            "n_cells": int(len(self.names)),
            "n_without": int(len(self.names) - self.n_stated),
            "translated": dict(list(self.written.items())[:50]),
        }


def check_given(tissue: str) -> None:
    """Refuse a ``tissue=`` that looks like a misspelt tissue (close to a general tissue or a common
    spelling, but none of them): a ``ValueError`` that names the likely one. Names far from any are let
    through (a model's knowledge may have tissues of its own); ``"any"`` asks for no tissue."""
    import difflib

    key = _key(tissue)
    table = tissue_table()
    if key == "any" or standard_tissue(tissue) in table.general_names or key in table.general_of_name:
        return
    known = sorted({*table.general_names, *COMMON_NAMES})
    close = [c for c in difflib.get_close_matches(key, known, n=3, cutoff=0.75) if abs(len(c) - len(key)) <= 2]
    if close:  # a misspelling, not a shorter or longer name (PanglaoDB's "Reproductive")
        raise ValueError(
            f"tissue={tissue!r} is not a tissue cellscribe knows; did you mean {close[0]!r}? (a tissue such as "
            "'blood', 'bone marrow', 'lung' or 'pancreas', an UBERON label or id, or 'any' for none)"
        )


def _find_columns(obs: pd.DataFrame) -> list[tuple[str, str]]:
    """``(standard name, obs column)`` of the tissue columns present, in :data:`TISSUE_COLUMNS` order."""
    by_key: dict[str, str] = {}
    for column in map(str, obs.columns):
        bare = column.split(":", 1)[1] if ":" in column else column
        by_key.setdefault(bare.casefold(), column)
    return [(name, by_key[name]) for name in TISSUE_COLUMNS if name in by_key]


def _culture(obs: pd.DataFrame) -> np.ndarray:
    """Cells the CELLxGENE schema marks as grown in culture (their tissue column names a cell type)."""
    for column in map(str, obs.columns):
        if (column.split(":", 1)[1] if ":" in column else column).casefold() == "tissue_type":
            return obs[column].astype(str).str.casefold().eq("cell culture").to_numpy()
    return np.zeros(len(obs), dtype=bool)


def stated_tissues(obs: pd.DataFrame | None, given: str | None = None,
                   cells: Sequence[str] | None = None) -> StatedTissues:
    """The tissue stated for each cell of ``obs`` (or of ``cells``, ids of its index, in that order).

    ``given`` (the run's ``tissue=``) states it for every cell and wins over any column. Otherwise each
    cell takes the first of :data:`TISSUE_COLUMNS` whose value names a tissue :func:`standard_tissue`
    knows, else the first that holds any value (kept as written); a cell with none, or in culture
    (``tissue_type == "cell culture"``), has ``""``.
    """
    n = len(obs) if cells is None else len(cells)
    if given is not None:
        check_given(given)
        name = standard_tissue(given) or ""
        written = {str(given): name} if name and name != str(given).strip() else {}
        return StatedTissues(np.full(n, name, dtype=object), "tissue=", {}, written)
    if obs is None:
        return StatedTissues(np.full(n, "", dtype=object), "none")
    if cells is not None:
        obs = obs.reindex(pd.Index(cells).astype(str)) if not obs.index.equals(pd.Index(cells)) else obs
    found = _find_columns(obs)
    names = np.full(n, "", dtype=object)
    if not found:
        return StatedTissues(names, "none")
    open_ = ~_culture(obs)
    general = tissue_table().general_names
    columns: dict[str, int] = {}
    written: dict[str, str] = {}
    per_column = []
    for _, column in found:
        values = obs[column]
        codes, uniques = pd.factorize(values.astype(object).where(values.notna(), None), use_na_sentinel=True)
        mapped = np.array([standard_tissue(u) or "" for u in uniques] + [""], dtype=object)
        for u, m in zip(uniques, mapped):
            if m and m != str(u).strip():
                written.setdefault(str(u), m)
        per_column.append((column, mapped[np.where(codes >= 0, codes, len(uniques))]))
    # A tissue this module knows beats a value it does not ("tumor" in one column, an UBERON id in the next).
    for known in (True, False):
        for column, per_cell in per_column:
            take = open_ & (per_cell != "")
            if known:
                take &= np.isin(per_cell, list(general))
            if take.any():
                names[take] = per_cell[take]
                columns[column] = columns.get(column, 0) + int(take.sum())
                open_ &= ~take
    return StatedTissues(names, "obs" if columns else "none", columns, written)
