"""The Cell Ontology, offline: terms, is_a ancestry, label look-up and major lineages.

Plugins that score cell types and the evaluation of predicted labels both need to know that
"CD14+ Mono" is *classical monocyte* (``CL:0000860``) and that a classical monocyte is a monocyte.
:func:`get_ontology` gives a :class:`CellOntology` read from a vendored table of the current ``CL:``
terms (built from the 26 Mar 2026 ``cl-simple`` release by ``scripts/build_cl_table.py``; see
``core/domain/data/PROVENANCE.md``). The table is read on first use (about 30 ms) and shared; the label index
behind :meth:`CellOntology.lookup` is built on the first look-up (about 0.15 s).

:meth:`CellOntology.lookup` turns a free-text label into a term id, or ``None`` when it cannot tell:
term names first (exactly, then in a normalised form that ignores case, punctuation, ``+`` versus
"positive" and plurals), then a short reviewed table of annotation shorthands (:data:`ABBREVIATIONS`),
then exact synonyms, then word order, then the label with " cell" added. Related, narrow and broad
synonyms are kept in :class:`Term` but never used to match: they are too loose to decide a label's
identity.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from os import PathLike

import attrs
import pandas as pd

log = logging.getLogger(__name__)

__all__ = [
    "CL_TABLE",
    "ROOT",
    "ABBREVIATIONS",
    "LINEAGES",
    "Term",
    "CellOntology",
    "get_ontology",
    "normalise_label",
]

#: The root term, *cell*: every term is one, so naming it says nothing.
ROOT = "CL:0000000"

#: Words after which a cell type's name names something else: "human leukocyte antigen" is a gene
#: family, "T cell receptor" a protein, "B cell lymphoma" a disease, "HL-60 cell line" a culture.
NOT_A_CELL_AFTER = frozenset({
    "antigen", "anti", "receptor", "marker", "gene", "protein", "ligand", "antibody", "immunoglobulin", "factor",
    "lymphoma", "leukemia", "leukaemia", "tumor", "tumour", "cancer", "carcinoma", "line", "differentiation",
    "activation", "development", "proliferation", "signaling", "signalling", "function", "specific",
})
#: Terms every cell of a body is (their common ancestors): naming one says nothing of a cell's type.
_UNIVERSAL_OF = ("CL:0000236", "CL:0000540", "CL:0000182", "CL:0000057")  # B cell, neuron, hepatocyte, fibroblast

#: The vendored table (gzip TSV, one row per current ``CL:`` term; see ``scripts/build_cl_table.py``).
CL_TABLE = "cl_terms.tsv.gz"

_LIST_COLUMNS = ("exact", "related", "narrow", "broad", "is_a", "part_of", "develops_from", "alt_id")
_SEPARATOR = "|"

#: Reviewed shorthands of common annotation label sets -> term id. Keys are compared in their
#: :func:`normalise_label` form (so ``"CD14+ Mono"`` also matches ``"cd14+ mono"``), after term names
#: and before synonyms: the ontology's synonyms include senses that are rarely meant in single-cell
#: annotation (``"alpha cell"`` is an exact synonym of the mouse *alpha retinal ganglion cell*). Where
#: the ontology has a term of its own for a label it wins: ``"CD14+ monocyte"`` is *CD14-positive
#: monocyte* and ``"CD16+ monocyte"`` an exact synonym of *CD14-positive, CD16-positive monocyte*,
#: while Seurat's ``"CD14+ Mono"`` and ``"FCGR3A+ Mono"`` name the classical and non-classical subsets.
#: Label sets covered: Seurat's PBMC 3k tutorial, Azimuth PBMC level-1/2 names, Zheng 2017's sorted
#: PBMC populations, the Baron 2016 pancreas labels (``alpha``, ``acinar``, ``activated_stellate``,
#: ...: pancreas-specific on purpose) and Human Lung Cell Atlas shorthands (``AT1``, ``AT2``). The
#: tests check that every id exists and every key looks up to its id.
ABBREVIATIONS: Mapping[str, str] = {
    # monocytes
    "Mono": "CL:0000576",
    "CD14 Mono": "CL:0000860",
    "CD14+ Mono": "CL:0000860",
    "Classical Mono": "CL:0000860",
    "cMono": "CL:0000860",
    "CD16 Mono": "CL:0000875",
    "CD16+ Mono": "CL:0000875",
    "FCGR3A+ Mono": "CL:0000875",
    "Non-classical Mono": "CL:0000875",
    "ncMono": "CL:0000875",
    # dendritic cells
    "DC": "CL:0000451",
    "pDC": "CL:0000784",
    "mDC": "CL:0000782",
    "cDC": "CL:0000990",
    "cDC1": "CL:0002394",
    "cDC2": "CL:0002399",
    # lymphocytes
    "T": "CL:0000084",
    "B": "CL:0000236",
    "NK": "CL:0000623",
    "NKT": "CL:0000814",
    "NKT cell": "CL:0000814",
    "NK T": "CL:0000814",
    "NK T cell": "CL:0000814",
    "natural killer T cell": "CL:0000814",
    "ILC": "CL:0001065",
    "Treg": "CL:0000815",
    "gdT": "CL:0000798",
    "gd T": "CL:0000798",
    "MAIT": "CL:0000940",
    "CD4 T": "CL:0000624",
    "CD4+ T": "CL:0000624",
    "CD4 T cell": "CL:0000624",
    "CD4+ T cell": "CL:0000624",
    "CD8 T": "CL:0000625",
    "CD8+ T": "CL:0000625",
    "CD8 T cell": "CL:0000625",
    "CD8+ T cell": "CL:0000625",
    "Memory CD4 T": "CL:0000897",
    "CD4 Memory": "CL:0000897",
    "Naive CD4 T": "CL:0000895",
    "CD4 Naive": "CL:0000895",
    "Memory CD8 T": "CL:0000909",
    "CD8 Memory": "CL:0000909",
    "Naive CD8 T": "CL:0000900",
    "CD8 Naive": "CL:0000900",
    "Naive B": "CL:0000788",
    "Memory B": "CL:0000787",
    "Plasma": "CL:0000786",
    # FACS-sorted PBMC populations of Zheng 2017 (scanpy's pbmc68k_reduced "bulk_labels")
    "CD4+/CD25 T Reg": "CL:0000792",
    "CD4+/CD45RA+/CD25- Naive T": "CL:0000895",
    "CD4+/CD45RO+ Memory": "CL:0000897",
    "CD8+ Cytotoxic T": "CL:0000794",
    "CD8+/CD45RA+ Naive Cytotoxic": "CL:0000900",
    "CD56+ NK": "CL:0000623",
    "CD34+": "CL:0008001",
    # other blood and bone marrow cells
    "Platelet": "CL:0000233",
    "Mk": "CL:0000556",
    "Eryth": "CL:0000232",
    "Erythroid": "CL:0000764",
    "HSC": "CL:0000037",
    "HSPC": "CL:0008001",
    "Mast": "CL:0000097",
    # pancreas (Baron 2016 labels)
    "alpha": "CL:0000171",
    "alpha cell": "CL:0000171",
    "beta": "CL:0000169",
    "beta cell": "CL:0000169",
    "delta": "CL:0000173",
    "delta cell": "CL:0000173",
    "gamma": "CL:0002275",
    "gamma cell": "CL:0002275",
    "epsilon": "CL:0005019",
    "epsilon cell": "CL:0005019",
    "acinar": "CL:0002064",
    "ductal": "CL:0002079",
    "ductal cell": "CL:0002079",
    "stellate": "CL:0002410",
    "activated_stellate": "CL:0002410",
    "quiescent_stellate": "CL:0002410",
    "endothelial": "CL:0000115",
    "macrophage": "CL:0000235",
    "schwann": "CL:0002573",
    # lung
    "AT1": "CL:0002062",
    "AT2": "CL:0002063",
    "AT I": "CL:0002062",
    "AT II": "CL:0002063",
    "type I pneumocyte": "CL:0002062",
    "type II pneumocyte": "CL:0002063",
}

#: Major lineages, checked in this order against a term and its is_a ancestors by
#: :meth:`CellOntology.lineage`: the first lineage with a root among them wins, so the more specific
#: lineages come first (NK before innate lymphoid cell, pancreatic endocrine before epithelial cell,
#: endothelial before epithelial).
LINEAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("T cell", ("CL:0000084",)),
    ("NK cell", ("CL:0000623",)),
    ("innate lymphoid cell", ("CL:0001065",)),
    ("B cell", ("CL:0000236", "CL:0000945", "CL:0000786")),  # B cell, B-lineage lymphocyte, plasma cell
    ("monocyte", ("CL:0000576",)),
    ("macrophage", ("CL:0000235",)),
    ("dendritic cell", ("CL:0000451",)),
    ("mast cell", ("CL:0000097",)),
    ("granulocyte", ("CL:0000094",)),
    ("megakaryocyte/platelet", ("CL:0000556", "CL:0000233")),
    ("erythroid", ("CL:0000764",)),
    ("HSPC", ("CL:0000037", "CL:0008001")),  # hematopoietic stem cell, hematopoietic precursor cell
    ("pancreatic endocrine", ("CL:0008024",)),
    ("endothelial cell", ("CL:0000115",)),
    ("epithelial cell", ("CL:0000066",)),
    ("smooth muscle cell", ("CL:0000192",)),
    ("muscle cell", ("CL:0000187",)),
    ("fibroblast/stromal", ("CL:0000057", "CL:0000499", "CL:0000669")),  # + pericyte
    ("adipocyte", ("CL:0000136",)),
    ("neuron", ("CL:0000540",)),
    ("glial cell", ("CL:0000125",)),
    ("germ cell", ("CL:0000586",)),
)

_CL_ID = re.compile(r"^CL[:_](\d{7})$", re.IGNORECASE)
_GREEK = str.maketrans({"α": "alpha ", "β": "beta ", "γ": "gamma ", "δ": "delta ", "ε": "epsilon "})
# A "-" that ends a marker ("CD16-", "CD27-/IgD+") means negative; other hyphens separate words.
_TRAILING_MINUS = re.compile(r"(?<=[a-z0-9])-(?=$|[\s,;/()])")
_NON_WORD = re.compile(r"[\W_]+")
_SIGNS = {"positive": "+", "negative": "-"}
_KEEP_S = ("ss", "us", "is")
_ROMAN = {"i": "1", "ii": "2", "iii": "3", "iv": "4"}  # "type II pneumocyte" = "type 2 pneumocyte"


def _singular(token: str) -> str:
    if token == "cells":
        return "cell"
    if len(token) > 3 and token.isalpha() and token.endswith("s") and not token.endswith(_KEEP_S):
        return token[:-1]
    return token


def _tokens(label: str) -> list[str]:
    text = unicodedata.normalize("NFKC", str(label)).casefold().translate(_GREEK)
    text = text.replace("+", " positive ")
    text = _TRAILING_MINUS.sub(" negative ", text)
    words = _NON_WORD.sub(" ", text).split()
    tokens: list[str] = []
    for word in words:
        if word in _SIGNS and tokens and not tokens[-1].endswith(("+", "-")):
            tokens[-1] += _SIGNS[word]  # "cd4 positive" -> "cd4+": a marker keeps its sign in any order
        else:
            tokens.append(_ROMAN.get(word) or _singular(word))
    return tokens


def normalise_label(label: str) -> str:
    """The comparison form of a cell type label used by :meth:`CellOntology.lookup`.

    Case-folded, Greek letters spelled out, ``+``/``positive`` and a trailing ``-``/``negative``
    attached to their marker (``"CD14+"``, ``"CD14-positive"`` and ``"cd14 positive"`` all become
    ``"cd14+"``), other punctuation, hyphens and underscores turned into single spaces, the roman
    numerals I-IV written as digits, and plural words made singular (``"NK cells"`` -> ``"nk cell"``).
    """
    return " ".join(_tokens(label))


def _split(cell: str) -> tuple[str, ...]:
    return tuple(cell.split(_SEPARATOR)) if cell else ()


def _unique_index(tiers: Iterable[Iterable[tuple[str, str]]]) -> dict[str, str]:
    """key -> id from ``(key, id)`` pairs in tiers, best tier first.

    A key takes its id from the first tier that has it, and only if that tier gives it exactly one id;
    a key that tier gives several ids is ambiguous and no later tier may claim it.
    """
    index: dict[str, str] = {}
    ambiguous: set[str] = set()
    for pairs in tiers:
        found: dict[str, set[str]] = defaultdict(set)
        for key, term_id in pairs:
            if key and key not in index and key not in ambiguous:
                found[key].add(term_id)
        for key, ids in found.items():
            if len(ids) == 1:
                index[key] = next(iter(ids))
            else:
                ambiguous.add(key)
    return index


@attrs.frozen
class Term:
    """One Cell Ontology term as stored in the vendored table.

    ``parents`` are the direct is_a parents; ``part_of`` and ``develops_from`` the targets of those
    relations; ``alt_ids`` retired ids that now mean this term. Only links to current ``CL:`` terms are
    kept.
    """

    id: str
    name: str
    exact_synonyms: tuple[str, ...] = ()
    related_synonyms: tuple[str, ...] = ()
    narrow_synonyms: tuple[str, ...] = ()
    broad_synonyms: tuple[str, ...] = ()
    parents: tuple[str, ...] = ()
    part_of: tuple[str, ...] = ()
    develops_from: tuple[str, ...] = ()
    alt_ids: tuple[str, ...] = ()


class CellOntology:
    """The current terms of the Cell Ontology with their is_a graph and a label look-up.

    Build it with :func:`get_ontology` (the vendored release, cached) or :meth:`from_table`. Ids may be
    given as ``CL:0000860`` or ``CL_0000860``; retired ids listed as ``alt_id`` resolve to their term.
    Methods that take an id raise :class:`KeyError` for an id that is not a current term.
    """

    def __init__(self, table: pd.DataFrame, *, source: str = "") -> None:
        missing = {"id", "name", *_LIST_COLUMNS} - set(table.columns)
        if missing:
            raise ValueError(
                f"the Cell Ontology table lacks columns {sorted(missing)}; build it with "
                "scripts/build_cl_table.py"
            )
        self.source = source
        self._ids = table["id"].tolist()
        self._row = {term_id: i for i, term_id in enumerate(self._ids)}
        self._names = table["name"].tolist()
        self._lists = {column: table[column].tolist() for column in _LIST_COLUMNS}
        self._alt = {
            alt: term_id for term_id, cell in zip(self._ids, self._lists["alt_id"]) for alt in _split(cell)
        }
        self._parents = {term_id: _split(cell) for term_id, cell in zip(self._ids, self._lists["is_a"])}
        self._ancestors: dict[str, frozenset[str]] = {}
        self._children: dict[str, tuple[str, ...]] | None = None
        self._indexes: dict[str, dict[str, str]] | None = None
        self._phrase_index: tuple[dict[str, str], int] | None = None

    @classmethod
    def from_table(cls, path: str | PathLike[str]) -> CellOntology:
        """Read a table written by ``scripts/build_cl_table.py`` (gzip or plain TSV)."""
        return cls(_read_table(path), source=str(path))

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __contains__(self, term_id: object) -> bool:
        return isinstance(term_id, str) and self.resolve(term_id) is not None

    def __repr__(self) -> str:
        return f"<CellOntology {len(self):,} terms from {self.source or 'a table'}>"

    # ---------------------------------------------------------------- terms

    def resolve(self, term_id: str) -> str | None:
        """The current id for ``term_id`` (``CL_…`` form and retired ``alt_id`` accepted), or ``None``."""
        match = _CL_ID.match(term_id.strip())
        if match is None:
            return None
        canonical = f"CL:{match.group(1)}"
        if canonical in self._row:
            return canonical
        return self._alt.get(canonical)

    def _resolved(self, term_id: str) -> str:
        resolved = self.resolve(term_id) if isinstance(term_id, str) else None
        if resolved is None:
            raise KeyError(
                f"{term_id!r} is not a current Cell Ontology term id (expected 'CL:' and 7 digits of a "
                f"term of {self.source or 'this table'}); use lookup() to find the id of a label"
            )
        return resolved

    def term(self, term_id: str) -> Term:
        """The :class:`Term` with id ``term_id``."""
        term_id = self._resolved(term_id)
        row = self._row[term_id]
        lists = {column: _split(self._lists[column][row]) for column in _LIST_COLUMNS}
        return Term(
            id=term_id,
            name=self._names[row],
            exact_synonyms=lists["exact"],
            related_synonyms=lists["related"],
            narrow_synonyms=lists["narrow"],
            broad_synonyms=lists["broad"],
            parents=lists["is_a"],
            part_of=lists["part_of"],
            develops_from=lists["develops_from"],
            alt_ids=lists["alt_id"],
        )

    def name(self, term_id: str) -> str:
        """The term's name (``"CL:0000860"`` -> ``"classical monocyte"``)."""
        return self._names[self._row[self._resolved(term_id)]]

    # ---------------------------------------------------------------- is_a graph

    def parents(self, term_id: str) -> tuple[str, ...]:
        """The direct is_a parents of the term."""
        return self._parents[self._resolved(term_id)]

    def ancestors(self, term_id: str) -> frozenset[str]:
        """Every term reachable through is_a links, the term itself excluded (cached)."""
        return self._ancestors_of(self._resolved(term_id))

    def _ancestors_of(self, term_id: str) -> frozenset[str]:
        cached = self._ancestors.get(term_id)
        if cached is None:
            found: set[str] = set()
            for parent in self._parents[term_id]:
                found.add(parent)
                found |= self._ancestors_of(parent)
            cached = self._ancestors[term_id] = frozenset(found)
        return cached

    def is_a(self, child: str, parent: str, *, strict: bool = False) -> bool:
        """Whether ``child`` is ``parent`` or a subtype of it (``strict=True``: a proper subtype only)."""
        child, parent = self._resolved(child), self._resolved(parent)
        if child == parent:
            return not strict
        return parent in self._ancestors_of(child)

    def children(self, term_id: str) -> tuple[str, ...]:
        """The terms whose direct is_a parents include ``term_id``."""
        term_id = self._resolved(term_id)
        if self._children is None:
            children: dict[str, list[str]] = defaultdict(list)
            for child, parents in self._parents.items():
                for parent in parents:
                    children[parent].append(child)
            self._children = {parent: tuple(kids) for parent, kids in children.items()}
        return self._children.get(term_id, ())

    def descendants(self, term_id: str) -> frozenset[str]:
        """Every term that is a proper subtype of ``term_id``."""
        found: set[str] = set()
        stack = list(self.children(term_id))
        while stack:
            current = stack.pop()
            if current not in found:
                found.add(current)
                stack.extend(self.children(current))
        return frozenset(found)

    def lineage(self, term_id: str) -> str | None:
        """The major lineage of the term (a name from :data:`LINEAGES`), or ``None`` when it has none.

        The term itself and its is_a ancestors are compared with each lineage's roots in the order of
        :data:`LINEAGES`; the first lineage with a root among them is returned. Roots missing from the
        table are ignored.
        """
        term_id = self._resolved(term_id)
        lineage_of = self._ancestors_of(term_id) | {term_id}
        for lineage, roots in LINEAGES:
            if not lineage_of.isdisjoint(roots):
                return lineage
        return None

    # ---------------------------------------------------------------- labels

    def _index(self) -> dict[str, dict[str, str]]:
        if self._indexes is None:
            names = list(zip(self._names, self._ids))
            exact = [
                (syn, term_id) for term_id, cell in zip(self._ids, self._lists["exact"]) for syn in _split(cell)
            ]
            normal_names = [(normalise_label(n), i) for n, i in names]
            normal_exact = [(normalise_label(s), i) for s, i in exact]
            self._indexes = {
                "name": _unique_index([names]),
                "normal name": _unique_index([normal_names]),
                "abbreviation": {normalise_label(k): v for k, v in ABBREVIATIONS.items() if v in self._row},
                "exact": _unique_index([exact]),
                "normal": _unique_index([normal_names, normal_exact]),
                "order": _unique_index(
                    [(" ".join(sorted(key.split())), term_id) for key, term_id in pairs]
                    for pairs in (normal_names, normal_exact)
                ),
            }
        return self._indexes

    def lookup(self, label: str) -> str | None:
        """The id of the term that ``label`` names, or ``None`` when no term matches unambiguously.

        Tried in order, the first hit wins:

        1. a term id itself (``"CL:0000860"``, ``"CL_0000860"``, retired ids);
        2. a term name, exactly, then in :func:`normalise_label` form (case, punctuation, hyphens and
           underscores, ``+``/``positive``, roman numerals, plurals: ``"NK cells"``);
        3. :data:`ABBREVIATIONS` (``"CD14+ Mono"``, ``"NK"``, ``"pDC"``, ``"alpha"``, ...), normalised;
        4. an exact synonym, exactly, then normalised (a synonym shared by several terms is skipped);
        5. the same words in another order (``"B cells memory"`` -> *memory B cell*);
        6. when the label does not say "cell": steps 4 and 5 for the label with " cell" added
           (``"Mast"`` -> *mast cell*, ``"endothelial"`` -> *endothelial cell*); for a one-letter label
           only a term name (``"B"`` -> *B cell*; ``"M"`` matches nothing, not the synonym "M cell").

        Related, narrow and broad synonyms are never used. Nothing is guessed beyond these steps: an
        unknown label gives ``None``.
        """
        if not isinstance(label, str) or not label.strip():
            return None
        text = label.strip()
        resolved = self.resolve(text)
        if resolved is not None:
            return resolved
        tokens = _tokens(text)
        if not tokens:
            return None
        index = self._index()
        normal = " ".join(tokens)
        for key, table in (
            (text, index["name"]),
            (normal, index["normal name"]),
            (normal, index["abbreviation"]),
            (text, index["exact"]),
            (normal, index["normal"]),
            (" ".join(sorted(tokens)), index["order"]),
        ):
            if key in table:
                return table[key]
        if "cell" not in tokens:
            words = [*tokens, "cell"]
            if len(normal) == 1:
                # One letter plus "cell" is a term's name ("B" -> B cell) or nothing: "M" in a blood
                # label set means monocytes, not the gut's "M cell" (a synonym of M cell of gut).
                return index["normal name"].get(" ".join(words))
            for key, table in ((" ".join(words), index["normal"]), (" ".join(sorted(words)), index["order"])):
                if key in table:
                    return table[key]
        return None

    def _phrases(self) -> tuple[dict[str, str], int]:
        """The phrases :meth:`mentions` looks for (normalised key -> id) and the longest in tokens."""
        if self._phrase_index is None:
            index = self._index()
            present = [t for t in _UNIVERSAL_OF if t in self._row]
            universal = ({ROOT} | frozenset.intersection(*(self.ancestors(t) for t in present))) if present \
                else {ROOT}
            phrases: dict[str, str] = {}
            for table in (index["normal"], index["abbreviation"]):
                for key, term_id in table.items():
                    words = key.split()
                    if term_id in universal or key in phrases:
                        continue
                    # One-word phrases only when they are words ("monocyte", "neutrophil"): one-word
                    # abbreviations and symbols ("T", "DC", "alpha", "LC") are too common in prose.
                    if len(words) > 1 or (table is index["normal"] and len(key) >= 5 and key.isalpha()):
                        phrases[key] = term_id
            self._phrase_index = (phrases, max((len(k.split()) for k in phrases), default=0))
        return self._phrase_index

    def mentions(self, text: str) -> list[tuple[str, str]]:
        """The cell types ``text`` names, as ``(term id, phrase)`` in order of appearance.

        A phrase is a term name, an exact synonym or an :data:`ABBREVIATIONS` entry of two words or
        more, or a one-word term name or synonym of five letters or more (``"monocyte"``), matched on
        whole words in :func:`normalise_label` form (``"CD14+ monocytes"`` names *CD14-positive
        monocyte*). A phrase inside a longer one found at the same place is not counted (``"T cell"`` in
        ``"CD8-positive, alpha-beta T cell"``), nor one followed by a word of :data:`NOT_A_CELL_AFTER`
        (``"human leukocyte antigen"`` names a gene family, not a leukocyte), nor a term every cell is
        (*cell*, *eukaryotic cell*, *animal cell*, ...: the common ancestors of a B cell, a neuron, a
        hepatocyte and a fibroblast). A term named twice is listed once.
        """
        if not isinstance(text, str) or not text.strip():
            return []
        phrases, longest = self._phrases()
        tokens = _tokens(text)
        found: list[tuple[int, int, str, str]] = []  # (start, end, id, phrase)
        pos = 0
        while pos < len(tokens):
            for n in range(min(longest, len(tokens) - pos), 0, -1):
                key = " ".join(tokens[pos:pos + n])
                if key in phrases:
                    if not (pos + n < len(tokens) and tokens[pos + n] in NOT_A_CELL_AFTER):
                        found.append((pos, pos + n, phrases[key], key))
                    pos += n
                    break
            else:
                pos += 1
        out: list[tuple[str, str]] = []
        seen: set[str] = set()
        for _, _, term_id, phrase in found:
            if term_id not in seen:
                seen.add(term_id)
                out.append((term_id, phrase))
        return out

    def named_terms(self, text: str) -> tuple[list[str], str]:
        """The terms ``text`` names, most specific only, and the words that name them: the term of the
        whole text (:meth:`lookup`), else those it :meth:`mentions` that no other mention is a kind of.
        One term: the text places a cell type; none or several: it does not."""
        whole = self.lookup(text)
        if whole is not None:
            return [whole], text
        mentions = self.mentions(text)
        ids = [t for t, _ in mentions]
        specific = [t for t in ids if not any(o != t and self.is_a(o, t) for o in ids)]
        phrases = [p for t, p in mentions if t in specific]
        return specific, ", ".join(phrases)

    def lookup_many(self, labels: Iterable[str]) -> list[str | None]:
        """:meth:`lookup` for each label, each distinct label looked up once."""
        labels = list(labels)
        found = {label: self.lookup(label) for label in dict.fromkeys(labels)}
        return [found[label] for label in labels]


def _read_table(path_or_file, compression: str = "infer") -> pd.DataFrame:
    """A table written by ``scripts/build_cl_table.py``, every cell a string (empty when absent)."""
    return pd.read_csv(
        path_or_file, sep="\t", dtype=str, keep_default_na=False, na_filter=False, compression=compression
    )


@functools.cache
def get_ontology() -> CellOntology:
    """The vendored Cell Ontology (26 Mar 2026 release), read on first use and cached.

    The object is shared: treat it as read-only.
    """
    resource = importlib.resources.files(__package__).joinpath("data", CL_TABLE)
    with resource.open("rb") as fh:
        table = _read_table(fh, compression="gzip")
    ontology = CellOntology(table, source=f"cellscribe.core data/{CL_TABLE}")
    log.debug("loaded %d Cell Ontology terms from %s", len(ontology), CL_TABLE)
    return ontology
