"""Scoring cell sentences against marker knowledge, all units of a batch at once.

A cell sentence is a ranked gene list. :class:`MarkerScorer` turns a batch of sentences into a sparse
units x genes matrix of *rank weights* and multiplies it with the knowledge's cell types x genes
weights (:class:`~.knowledge.MarkerKnowledge`), so scoring 10,000 cells against 189 cell types is two
sparse matrix products. No Python loop runs over genes or cell types.

The score of cell type ``t`` for one cell::

    score(t) = sum_g r(g) w+(t, g) / (sum_g w+(t, g)) ** norm_power  -  negative_weight * sum_g r(g) w-(t, g)

- ``r(g)``, the rank weight of a gene found in the sentence, is ``(1 + k / rank_scale) ** -rank_power``
  with ``k`` the gene's 0-based rank among the sentence's *informative* genes: ubiquitous genes
  (ribosomal, mitochondrial, housekeeping; :meth:`MarkerKnowledge.is_ubiquitous`) are skipped when
  counting, so a sentence with or without them ranks a marker the same. With the defaults (10, 0.5)
  the first gene weighs 1, the 10th 0.72, the 50th 0.41, the 200th 0.22: expression ranks are roughly
  logarithmic in expression, and a marker deep in the list is weaker evidence, not none. Genes the
  sentence lacks weigh 0. Ubiquitous genes are never evidence.
- ``w+(t, g)`` is the positive marker weight after two knowledge-level adjustments:

  1. *Inheritance along the Cell Ontology*: a type also expects the markers of its is_a ancestors in the
     knowledge, the nearest ancestor's weight winning, unless it lists the gene itself (a gamma-delta T
     cell expects CD3E from *T cell*; an NK cell, which is no T cell, keeps CD3E as a negative marker).
  2. *Lineage specificity*: a gene listed as a marker by types of ``n`` different major lineages
     (:meth:`CellOntology.lineage`; a type without a lineage is its own) is multiplied by
     ``n ** -lineage_idf_power`` (HLA class II genes, markers of B cells, monocytes, macrophages and
     dendritic cells alike, say little about which of them a cell is).

- The normalisation ``(sum of w+) ** norm_power`` keeps types with long marker lists (PanglaoDB lists
  up to 217 genes for a type) from winning by sheer number, while a power below 1 keeps a type with one
  or two markers from winning on a single chance hit.
- ``w-(t, g)`` is the magnitude of a negative weight (a gene expected *absent*: CD3E for NK cells); its
  presence costs in proportion to its rank weight.

Measured genes (:meth:`MarkerScorer.within`)
    A data set shows only the genes its assay measures: a peak matrix of 5,000 peaks measures the
    ~5,000 genes some peak overlaps (on the shared Schep 2017 matrix, 9 of 133 canonical
    hematopoietic genes), a 765-gene panel its 765 genes. A marker without a measurement is neither
    present nor absent, so the scorer for a run keeps only the weights of measured genes, normalises
    each type over its *measurable* markers, and a type with fewer than
    :data:`MIN_OBSERVABLE_MARKERS` measurable markers cannot be called at all (a type must never win
    on genes the assay cannot see, nor on one chance hit).

Capped top marker (``ScoringParams.cap_top``; on for scATAC)
    A type's strongest marker in a unit counts no more than its second strongest: no call rests on a
    single gene. On a peak matrix one gene's rank is one or two peaks' worth of evidence, and a lone
    strongly enriched marker (RYR1, listed for dendritic cells, is the most enriched measured gene of
    the Schep 2017 erythroblasts) otherwise decides whole populations; capped, the Schep 2017 blood
    cells went from 0.58 to 0.71 lineage accuracy with ``tissue="blood"`` and from 0.28 to 0.44 without
    a tissue, PBSmall from 0.90 to 0.86 (``benchmarks/atac_real.py``).

Chance (``ScoringParams.chance``; on for scATAC, see the ``markers`` backend)
    A type with many measurable markers collects hits by chance: in a sentence of ``L`` informative
    genes drawn from ``n`` measured ones, a marker lands at a given rank with probability ``1 / n``,
    so it contributes ``R(L) / n`` on average, with ``R(L)`` the sum of the first ``L`` rank weights.
    The score subtracts this expectation, ``R(L) / n * sum_g w+(t, g) / norm(t)`` (measured markers
    only), so a type is ahead of another because its markers rank higher than chance would put them,
    not because it has more of them. On scATAC data, where long genes and gene-rich loci are measured
    more often, this is what keeps neuronal types with 100 measurable markers from winning blood
    cells on four chance hits; it changes PBMC RNA calls little (lineage 0.959 -> 0.964 on
    pbmc68k_reduced) but costs pancreas RNA (0.897 -> 0.863 correct), so it is used where the
    measurement itself is uneven (gene activity). Without a known universe ``n`` is the knowledge's
    gene count.

The constants were chosen once on labelled PBMC and pancreas data, from a region where accuracy
barely changes (``benchmarks/markers_calibration.py --params ...`` prints the accuracy for other
choices); :data:`SCORING_VERSION` names them and the calibration file records which version it was
fitted for.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellscribe.core.domain.genes import cut_ensembl_suffix, is_ensembl_id, map_ensembl_ids
from cellscribe.core.domain.ontology import get_ontology
from cellscribe.core.types import sentence_genes

from .knowledge import PANGLAO_SOURCE, MarkerKnowledge

log = logging.getLogger(__name__)

__all__ = [
    "SCORING_VERSION",
    "MIN_OBSERVABLE_MARKERS",
    "ScoringParams",
    "Vocabulary",
    "ParsedUnits",
    "Evidence",
    "MarkerScorer",
    "rank_weights",
    "split_sentences",
    "display_name",
]

#: Names the scoring formula and its constants (recorded by the calibration file).
SCORING_VERSION = "markers-scoring-v3"
#: Fewest measurable positive markers a cell type needs to be called (see "Measured genes").
MIN_OBSERVABLE_MARKERS = 3

_SEP = ","
_DISPLAY = str.maketrans({"<": "‹", ">": "›", "\n": " ", "\r": " "})


def display_name(name: str) -> str:
    """``name`` as it may appear in written reasoning: characters that could open or close a tag (or
    start a line) replaced."""
    return str(name).translate(_DISPLAY)


@attrs.frozen
class ScoringParams:
    """The constants of the score (see the module docstring): rank weights ``(1 + k / rank_scale) **
    -rank_power``, normalisation power, weight of negative markers, lineage specificity power, and
    whether types inherit the markers of their Cell Ontology ancestors, whether the expected chance
    score is subtracted, and whether a type's strongest marker counts no more than its runner-up."""

    rank_scale: float = 10.0
    rank_power: float = 0.5
    norm_power: float = 0.2
    negative_weight: float = 1.0
    lineage_idf_power: float = 0.5
    inherit: bool = True
    chance: bool = False
    cap_top: bool = False


def rank_weights(ranks: np.ndarray, params: ScoringParams) -> np.ndarray:
    """``(1 + ranks / rank_scale) ** -rank_power`` for 0-based ranks (float64)."""
    return (1.0 + np.asarray(ranks, dtype=np.float64) / params.rank_scale) ** -params.rank_power


def split_sentences(sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Split ``", "``-joined sentences into tokens (multi-modality sentences section by section).

    :return: ``(indptr, tokens)``: the tokens of sentence ``i`` are ``tokens[indptr[i]:indptr[i + 1]]``
        (stripped of spaces, an object array); an empty sentence has none.
    """
    texts = [s if isinstance(s, str) else "" for s in sentences]
    # Multi-modality sentences ("RNA: a, b\nATAC: c") read as one list: each section in turn.
    texts = [_SEP.join(sentence_genes(t)) if ": " in t else t for t in texts]
    lengths = np.fromiter(
        (t.count(_SEP) + 1 if t.strip() else 0 for t in texts), dtype=np.int64, count=len(texts)
    )
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    joined = _SEP.join(t for t in texts if t.strip())
    tokens = np.asarray(joined.split(_SEP) if joined else [], dtype=object)
    return indptr, tokens


class Vocabulary:
    """Maps sentence tokens to the columns of a gene list (the knowledge's genes, maybe extended).

    A token is matched as given, then after clean-up: surrounding spaces removed, a ``SYMBOL_ENSG...``
    name cut to ``SYMBOL``, a human Ensembl id mapped to its symbol (vendored Ensembl 101 table), and
    finally upper-cased (mouse ``Cd3e`` -> ``CD3E``). Every token is also classified as ubiquitous or
    not with ``is_ubiquitous`` (applied to the cleaned symbol).
    """

    def __init__(self, genes: Sequence[str], is_ubiquitous) -> None:
        self.genes = np.asarray(list(genes), dtype=object)
        self._index = pd.Index(self.genes)
        self._upper = pd.Index(pd.Series(self.genes, dtype=object).str.upper())
        self._is_ubiquitous = is_ubiquitous

    def __len__(self) -> int:
        return len(self.genes)

    @functools.cached_property
    def display(self) -> np.ndarray:
        """The genes as :func:`display_name` writes them (for reasoning text)."""
        return np.asarray([display_name(g) for g in self.genes], dtype=object)

    def extended(self, genes: Iterable[str]) -> Vocabulary:
        """A vocabulary with ``genes`` it lacks appended (existing columns keep their numbers)."""
        new = [g for g in dict.fromkeys(str(g) for g in genes) if g not in self._index]
        if not new:
            return self
        return Vocabulary(np.concatenate([self.genes, np.asarray(new, dtype=object)]), self._is_ubiquitous)

    def clean(self, tokens: Sequence[str]) -> np.ndarray:
        """The cleaned symbol of each token (see the class docstring; not upper-cased)."""
        series = pd.Series(list(tokens), dtype=object).astype(str).str.strip()
        cut, _ = cut_ensembl_suffix(series)
        ids = is_ensembl_id(cut)
        if ids.any():
            symbols, _ = map_ensembl_ids(cut[ids])
            cut[ids] = symbols
        return cut

    def lookup(self, tokens: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(columns, ubiquitous)`` of distinct tokens: the column (``-1`` when none) and whether the
        token is a ubiquitous gene."""
        tokens = np.asarray(list(tokens), dtype=object)
        columns = self._index.get_indexer(tokens)
        cleaned = self.clean(tokens)
        missing = columns < 0
        if missing.any():
            columns[missing] = self._index.get_indexer(cleaned[missing])
            missing = columns < 0
        if missing.any():
            upper = pd.Series(cleaned[missing], dtype=object).str.upper()
            columns[missing] = self._upper.get_indexer(upper)
        upper_all = pd.Series(cleaned, dtype=object).str.upper()
        ubiquitous = np.asarray(self._is_ubiquitous(cleaned), dtype=bool) | np.asarray(
            self._is_ubiquitous(upper_all), dtype=bool
        )
        return columns.astype(np.int64), ubiquitous


@attrs.frozen(eq=False)
class ParsedUnits:
    """A batch of cell sentences as sparse units x vocabulary matrices.

    Attributes
    ----------
    weights
        CSR (float64): the rank weight of every informative gene of the vocabulary found in a unit's
        sentence (a gene listed twice counts once, at its better rank).
    positions
        CSR with the same sparsity as ``weights``: the gene's 1-based position in the sentence as given
        (what a reader of the prompt sees).
    n_genes
        Number of genes in each sentence.
    n_skipped
        Number of ubiquitous genes in each sentence (skipped when ranking).
    vocabulary
        The vocabulary the columns refer to.
    """

    weights: sp.csr_matrix
    positions: sp.csr_matrix
    n_genes: np.ndarray
    n_skipped: np.ndarray
    vocabulary: Vocabulary

    def __len__(self) -> int:
        return int(self.weights.shape[0])

    @property
    def n_informative(self) -> np.ndarray:
        """Informative genes per sentence (the ranks that carry weight)."""
        return np.asarray(self.n_genes) - np.asarray(self.n_skipped)


@attrs.frozen
class Evidence:
    """Why one cell type scored as it did for one unit (for the written reasoning).

    ``found``: ``(gene, position, contribution)`` of its markers in the sentence, strongest first;
    ``against``: ``(gene, position)`` of genes it expects absent that are present; ``missing``: its
    strongest markers that are not in the sentence.
    """

    found: tuple[tuple[str, int, float], ...]
    against: tuple[tuple[str, int], ...]
    missing: tuple[str, ...]


def _gather_rows(matrix: sp.csr_matrix, rows: np.ndarray) -> sp.csr_matrix:
    """``matrix[rows]`` for a CSR with sorted indices (rows may repeat)."""
    gathered = matrix[rows]
    gathered.sort_indices()
    return gathered


class MarkerScorer:
    """Scores ranked gene lists against :class:`MarkerKnowledge` (see the module docstring).

    The effective weight matrices are built once per knowledge (about 0.1 s for the built-in one);
    scoring itself is a pair of sparse products per batch.

    Attributes
    ----------
    knowledge
        The knowledge the scorer was built from.
    params
        The scoring constants.
    positive, negative
        CSR ``(types, genes)``: effective positive weights (inherited, lineage-weighted, ubiquitous
        genes removed) and magnitudes of negative weights.
    norms
        Per type, ``(sum of positive weights) ** norm_power`` (1 for a type without positive markers).
    vocabulary
        The knowledge's genes as a :class:`Vocabulary`.
    measured
        Boolean mask over the vocabulary of the genes the data measure (``None``: all of them; see
        :meth:`within`).
    n_measured
        Informative measured genes (the universe a sentence draws from), or ``None``.
    full_weight, observable_weight, n_observable
        Per type: the sum of positive weights over all genes and over measured genes, and the number
        of measured positive markers.
    """

    def __init__(self, knowledge: MarkerKnowledge, params: ScoringParams | None = None) -> None:
        self.knowledge = knowledge
        self.params = params or ScoringParams()
        self.cell_types = knowledge.cell_types
        self.cl_ids = knowledge.cl_ids
        self.vocabulary = Vocabulary(knowledge.genes, knowledge.is_ubiquitous)
        positive, negative = self._effective_weights()
        self.positive = positive
        self.negative = negative
        self.norms = self.norms_of(positive)
        self._top_markers = self._strongest(positive, 4)
        self.measured: np.ndarray | None = None
        self._measured_upper: frozenset[str] = frozenset()
        self.n_measured: int | None = None
        self.full_weight = np.asarray(positive.sum(axis=1)).ravel()
        self.observable_weight = self.full_weight
        self.n_observable = np.diff(positive.indptr)

    def __repr__(self) -> str:
        return f"<MarkerScorer {len(self.cell_types)} cell types ({self.knowledge.version})>"

    # ---------------------------------------------------------------- knowledge -> weights

    def _effective_weights(self) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        weights = self.knowledge.weights.tocsr().astype(np.float64)
        weights.sort_indices()
        if self.params.inherit:
            weights = self._inherit(weights)
        positive = weights.maximum(0).tocsr()
        negative = (-weights).maximum(0).tocsr()
        informative = ~self.knowledge.is_ubiquitous(self.knowledge.genes)
        scale = informative * self._lineage_specificity()
        positive = (positive @ sp.diags(scale)).tocsr()
        negative = (negative @ sp.diags(informative.astype(np.float64))).tocsr()
        positive.eliminate_zeros()
        negative.eliminate_zeros()
        positive.sort_indices()
        negative.sort_indices()
        return positive, negative

    def _inherit(self, weights: sp.csr_matrix) -> sp.csr_matrix:
        """Each type's row completed with the genes of its is_a ancestors in the knowledge, nearest
        ancestor first (a gene keeps the first weight found: the type's own, else the nearest
        ancestor's)."""
        ontology = get_ontology()
        row_of = {cl: i for i, cl in enumerate(self.cl_ids) if cl}
        depth = {cl: len(ontology.ancestors(cl)) for cl in row_of}
        rows, cols, vals = [], [], []
        for i, cl in enumerate(self.cl_ids):
            chain = [i]
            if cl:
                ancestors = [a for a in ontology.ancestors(cl) if a in row_of]
                chain += [row_of[a] for a in sorted(ancestors, key=lambda a: (-depth[a], a))]
            seen: set[int] = set()
            for j in chain:
                start, stop = weights.indptr[j], weights.indptr[j + 1]
                for col, val in zip(weights.indices[start:stop].tolist(), weights.data[start:stop].tolist()):
                    if col not in seen:
                        seen.add(col)
                        rows.append(i)
                        cols.append(col)
                        vals.append(val)
        out = sp.csr_matrix((vals, (rows, cols)), shape=weights.shape, dtype=np.float64)
        out.sort_indices()
        return out

    def _lineage_specificity(self) -> np.ndarray:
        """Per gene, ``(number of lineages listing it as a positive marker) ** -lineage_idf_power``."""
        ontology = get_ontology()
        groups = [
            (ontology.lineage(cl) if cl else None) or f"type:{cl or name}"
            for cl, name in zip(self.cl_ids, self.cell_types)
        ]
        codes, uniques = pd.factorize(pd.Series(groups, dtype=object))
        incidence = sp.csr_matrix(
            (np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(uniques), len(codes))
        )
        marked = (self.knowledge.weights > 0).astype(np.float64)
        n_lineages = np.asarray(((incidence @ marked) > 0).sum(axis=0)).ravel()
        return np.maximum(n_lineages, 1).astype(np.float64) ** -self.params.lineage_idf_power

    def norms_of(self, positive: sp.csr_matrix) -> np.ndarray:
        """``(row sums of positive) ** norm_power``, 1 where a row has no positive weight."""
        totals = np.asarray(positive.sum(axis=1)).ravel()
        return np.where(totals > 0, totals, 1.0) ** self.params.norm_power

    @staticmethod
    def _strongest(positive: sp.csr_matrix, n: int) -> list[np.ndarray]:
        out = []
        for i in range(positive.shape[0]):
            start, stop = positive.indptr[i], positive.indptr[i + 1]
            order = np.argsort(-positive.data[start:stop], kind="stable")[:n]
            out.append(positive.indices[start:stop][order])
        return out

    # ---------------------------------------------------------------- measured genes

    def within(self, genes: Sequence[str] | None, **params: Any) -> MarkerScorer:
        """This scorer for data that measure only ``genes`` (``None``: all genes).

        The copy keeps the weights of measured genes only, normalises each type over its measurable
        markers, and records :attr:`measured`, :attr:`n_measured` (informative measured genes, the
        chance universe), :attr:`observable_weight` and :attr:`n_observable`. ``params`` replace
        scoring constants that act after the weights are built (``norm_power``, ``chance``,
        ``negative_weight``, ``rank_scale``, ``rank_power``). Genes are matched as sentence tokens are
        (case, Ensembl ids); ``self`` is not changed.
        """
        late = {"norm_power", "chance", "cap_top", "negative_weight", "rank_scale", "rank_power"}
        if set(params) - late:
            raise ValueError(f"within() can only change {sorted(late)}, not {sorted(set(params) - late)}")
        if any(getattr(self.params, k) != v for k, v in params.items()):
            out = copy.copy(self)
            out.params = attrs.evolve(self.params, **params)
            out.norms = out.norms_of(out.positive)
            return out.within(genes)
        if genes is None:
            return self
        distinct = pd.unique(pd.Series(list(genes), dtype=object).astype(str))
        columns, ubiquitous = self.vocabulary.lookup(distinct)
        mask = np.zeros(len(self.vocabulary), dtype=bool)
        mask[columns[columns >= 0]] = True
        keep = sp.diags(mask.astype(np.float64))
        out = copy.copy(self)
        out.measured = mask
        out._measured_upper = frozenset(
            pd.Series(self.vocabulary.clean(distinct), dtype=object).astype(str).str.upper()
        )
        out.n_measured = int((~ubiquitous).sum())
        out.positive = sp.csr_matrix(self.positive @ keep)
        out.negative = sp.csr_matrix(self.negative @ keep)
        for matrix in (out.positive, out.negative):
            matrix.eliminate_zeros()
            matrix.sort_indices()
        out.norms = out.norms_of(out.positive)
        out._top_markers = out._strongest(out.positive, 4)
        out.observable_weight = np.asarray(out.positive.sum(axis=1)).ravel()
        out.n_observable = np.diff(out.positive.indptr)
        return out

    def callable_types(self) -> np.ndarray:
        """Boolean mask of the types with at least :data:`MIN_OBSERVABLE_MARKERS` measurable markers
        (every type with markers when no universe is set)."""
        if self.measured is None:
            return self.n_observable > 0
        return self.n_observable >= MIN_OBSERVABLE_MARKERS

    def measured_columns(self, vocabulary: Vocabulary) -> np.ndarray:
        """Boolean mask over ``vocabulary`` (the knowledge's genes, possibly extended with example genes)
        of the genes the data measure (all of them when no universe is set)."""
        if self.measured is None:
            return np.ones(len(vocabulary), dtype=bool)
        out = np.zeros(len(vocabulary), dtype=bool)
        out[: len(self.measured)] = self.measured
        extra = pd.Series(vocabulary.genes[len(self.measured) :], dtype=object).astype(str).str.upper()
        out[len(self.measured) :] = extra.isin(self._measured_upper).to_numpy()
        return out

    def chance(self, units: ParsedUnits, weight: np.ndarray | None = None, norms: np.ndarray | None = None) -> np.ndarray:
        """``(units, types)``: the score each type gets by chance in each unit's sentence (see "Chance"
        in the module docstring); zeros when ``params.chance`` is off."""
        weight = self.observable_weight if weight is None else weight
        norms = self.norms if norms is None else norms
        if not self.params.chance:
            return np.zeros((len(units), len(weight)))
        universe = self.n_measured if self.n_measured else len(self.vocabulary)
        lengths = np.minimum(units.n_informative, universe).astype(np.int64)
        cumulative = np.concatenate([[0.0], np.cumsum(rank_weights(np.arange(int(lengths.max(initial=0))), self.params))])
        per_gene = cumulative[lengths] / max(universe, 1)
        return np.outer(per_gene, weight / norms)

    # ---------------------------------------------------------------- labels

    def locate(self, labels: Sequence[str]) -> np.ndarray:
        """The knowledge row of each label (:meth:`MarkerKnowledge.locate`, nearest ancestor allowed);
        ``-1`` for a label the knowledge cannot place."""
        return self.knowledge.locate([str(label) for label in labels], nearest=True)

    def tissue_mask(self, tissue: str | None) -> np.ndarray | None:
        """Boolean mask of the types kept by ``tissue`` (``None`` without a tissue): those
        :meth:`MarkerKnowledge.restrict` keeps, plus the types of user or plugin tables that record no
        tissue (a table given for a run is meant for it).

        :raises ValueError: for an unknown tissue (the message lists the known ones).
        """
        if tissue is None:
            return None
        kept = self.knowledge.restrict(tissue=tissue).cell_types
        pairs = zip(self.knowledge.tissues, self.knowledge.sources)
        untagged = np.asarray([not tissues and PANGLAO_SOURCE not in sources for tissues, sources in pairs], dtype=bool)
        return np.isin(self.cell_types, kept) | untagged

    # ---------------------------------------------------------------- sentences -> matrices

    def parse(self, sentences: Sequence[str], vocabulary: Vocabulary | None = None) -> ParsedUnits:
        """Turn sentences (genes joined with ``", "``) into :class:`ParsedUnits` over ``vocabulary``
        (default: the knowledge's genes)."""
        vocabulary = vocabulary or self.vocabulary
        indptr, tokens = split_sentences(sentences)
        n_units = len(indptr) - 1
        lengths = np.diff(indptr)
        codes, uniques = pd.factorize(tokens) if len(tokens) else (np.zeros(0, np.int64), np.zeros(0, object))
        columns, ubiquitous = vocabulary.lookup(uniques)
        token_columns = columns[codes] if len(codes) else np.zeros(0, np.int64)
        token_ubiquitous = ubiquitous[codes] if len(codes) else np.zeros(0, bool)
        unit = np.repeat(np.arange(n_units), lengths)
        position = np.arange(len(tokens)) - np.repeat(indptr[:-1], lengths)
        informative = ~token_ubiquitous
        counted = np.concatenate([[0], np.cumsum(informative, dtype=np.int64)])
        rank = counted[:-1] - np.repeat(counted[indptr[:-1]], lengths)  # informative genes before it
        n_skipped = lengths - (counted[indptr[1:]] - counted[indptr[:-1]])
        keep = informative & (token_columns >= 0)
        unit, column, position, rank = unit[keep], token_columns[keep], position[keep], rank[keep]
        # A gene listed twice counts once, at its first (best) position.
        key = unit * max(len(vocabulary), 1) + column
        _, first = np.unique(key, return_index=True)
        unit, column, position, rank = unit[first], column[first], position[first], rank[first]
        shape = (n_units, len(vocabulary))
        weights = sp.csr_matrix((rank_weights(rank, self.params), (unit, column)), shape=shape)
        positions = sp.csr_matrix(((position + 1).astype(np.float64), (unit, column)), shape=shape)
        weights.sort_indices()
        positions.sort_indices()
        return ParsedUnits(weights, positions, lengths, n_skipped, vocabulary)

    # ---------------------------------------------------------------- scores

    def score(
        self,
        units: ParsedUnits,
        positive: sp.csr_matrix | None = None,
        negative: sp.csr_matrix | None = None,
        norms: np.ndarray | None = None,
    ) -> np.ndarray:
        """Dense ``(units, types)`` scores (float64) against the knowledge, or against the given
        weight rows (over ``units.vocabulary``; used for k-shot signatures)."""
        weight = None if positive is None else np.asarray(positive.sum(axis=1)).ravel()
        positive, negative = self._weights_for(units, positive, negative)
        norms = self.norms if norms is None else norms
        pos = np.asarray((units.weights @ positive.T).todense())
        if self.params.cap_top:
            pos -= _top_excess(units.weights, positive)
        neg = np.asarray((units.weights @ negative.T).todense())
        return pos / norms - self.params.negative_weight * neg - self.chance(units, weight, norms)

    def _weights_for(
        self, units: ParsedUnits, positive: sp.csr_matrix | None, negative: sp.csr_matrix | None
    ) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        positive = self.positive if positive is None else positive
        negative = self.negative if negative is None else negative
        width = len(units.vocabulary)
        return self.widen(positive, width), self.widen(negative, width)

    @staticmethod
    def widen(matrix: sp.csr_matrix, width: int) -> sp.csr_matrix:
        """``matrix`` with zero columns appended up to ``width`` (for an extended vocabulary)."""
        if matrix.shape[1] == width:
            return matrix
        return sp.csr_matrix((matrix.data, matrix.indices, matrix.indptr), shape=(matrix.shape[0], width))

    def evidence(
        self,
        units: ParsedUnits,
        rows: np.ndarray,
        *,
        positive: sp.csr_matrix | None = None,
        negative: sp.csr_matrix | None = None,
        names: Sequence[str] | None = None,
        n_found: int = 4,
        n_missing: int = 3,
    ) -> list[list[Evidence | None]]:
        """For each unit ``u`` and each row ``rows[u, j]`` (``-1``: none), the :class:`Evidence` behind
        its score, computed with sparse element-wise products and one sort over the whole batch.

        Gene names are given as :func:`display_name` writes them. ``positive``/``negative`` describe
        other weight rows than the knowledge's (k-shot signatures); ``names`` replace the vocabulary's
        gene names in the result.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(len(units), -1)
        own = positive is None
        positive, negative = self._weights_for(units, positive, negative)
        genes = units.vocabulary.display if names is None else np.asarray(names, dtype=object)
        strongest = self._top_markers if own else self._strongest(positive, 4)
        out: list[list[Evidence | None]] = [[None] * rows.shape[1] for _ in range(len(units))]
        for j in range(rows.shape[1]):
            valid = np.flatnonzero(rows[:, j] >= 0)
            if len(valid) == 0:
                continue
            chosen = rows[valid, j]
            found = _top_entries(units, valid, _gather_rows(positive, chosen), n_found, genes)
            against = _top_entries(units, valid, _gather_rows(negative, chosen), 3, genes)
            missing = self._missing(units, valid, chosen, strongest, genes, n_missing)
            for k, u in enumerate(valid.tolist()):
                out[u][j] = Evidence(found=found[k], against=against[k], missing=missing[k])
        return out

    @staticmethod
    def _missing(units, valid, chosen, strongest, genes, n_missing) -> list[tuple[str, ...]]:
        """Per unit, up to ``n_missing`` of its type's strongest markers that are not in its sentence."""
        pairs_u = np.repeat(valid, [len(strongest[r]) for r in chosen])
        pairs_c = np.concatenate([strongest[r] for r in chosen]) if len(chosen) else np.zeros(0, np.int64)
        present = (np.asarray(units.weights[pairs_u, pairs_c]).ravel() > 0) if len(pairs_c) else np.zeros(0, bool)
        names = genes[pairs_c].tolist()
        out, at = [], 0
        for r in chosen.tolist():
            n = len(strongest[r])
            absent = [name for name, hit in zip(names[at : at + n], present[at : at + n]) if not hit]
            out.append(tuple(absent[:n_missing]))
            at += n
        return out



def _top_excess(weights: sp.csr_matrix, positive: sp.csr_matrix) -> np.ndarray:
    """``(units, types)``: how much each type's strongest marker contribution (rank weight x marker
    weight) exceeds its second strongest in each unit (see "Capped top marker")."""
    out = np.zeros((weights.shape[0], positive.shape[0]))
    used = np.unique(positive.indices)
    # One dense copy of the marker columns (units x genes any type uses); the units come in chunks.
    dense = np.zeros((weights.shape[0], weights.shape[1]), dtype=np.float32) if len(used) else None
    if dense is None:
        return out
    dense[:, used] = weights[:, used].toarray()
    for t in range(positive.shape[0]):
        start, stop = positive.indptr[t], positive.indptr[t + 1]
        if stop - start == 0:
            continue
        block = dense[:, positive.indices[start:stop]] * positive.data[start:stop][None, :]
        if block.shape[1] == 1:
            out[:, t] = block[:, 0]
            continue
        top2 = -np.partition(-block, 1, axis=1)[:, :2]
        out[:, t] = top2[:, 0] - top2[:, 1]
    return out


def _top_entries(
    units: ParsedUnits, valid: np.ndarray, gathered: sp.csr_matrix, n: int, genes: np.ndarray
) -> list[tuple[tuple[str, int, float], ...]]:
    """For each unit of ``valid`` (row ``k`` of ``gathered`` belongs to unit ``valid[k]``), the ``n``
    genes with the largest ``rank weight x weight``, as ``(gene, position, contribution)``."""
    contributions = units.weights[valid].multiply(gathered).tocsr()
    positions = units.positions[valid].multiply(gathered.astype(bool)).tocsr()
    contributions.sort_indices()
    positions.sort_indices()
    owner = np.repeat(np.arange(len(valid)), np.diff(contributions.indptr))
    order = np.lexsort((-contributions.data, owner))
    rank = np.arange(len(order)) - contributions.indptr[owner[order]]
    keep = order[rank < n]
    counts = np.bincount(owner[keep], minlength=len(valid))
    names = genes[contributions.indices[keep]].tolist()
    places = positions.data[keep].astype(np.int64).tolist()
    values = contributions.data[keep].tolist()
    out, at = [], 0
    for count in counts.tolist():
        out.append(tuple(zip(names[at : at + count], places[at : at + count], values[at : at + count])))
        at += count
    return out
