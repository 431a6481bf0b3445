"""The ``markers`` backend: an offline model that answers prompts from marker-gene knowledge.

It reads the same prompts an LLM reads (through the structured fields of
:class:`~cellscribe.core.types.Prompt`, never the rendered text) and answers in the text format the
prompt's decoder expects, so decoding, ``obs`` columns and evaluation run exactly as for an LLM.

Per prompt type
    *zero-shot* (decoder ``cellreasoner``, no examples): every unit's sentence is scored against the
    cell types of the knowledge (:mod:`.scoring`), restricted to the cells' tissue context (below), or
    against the prompt's candidates when it has some. The answer is the best type's Cell Ontology-style
    name, or the candidate string verbatim.

    *k-shot* (decoder ``cellreasoner`` with examples): each label of the examples gets a signature
    learned from them (:mod:`.signatures`); where the label names a known cell type, its signature score
    and its knowledge score are averaged. Answers are the reference's own labels, verbatim.

    *puzzle* (decoder ``cellpuzzles``): the cells x candidates score matrix becomes per-cell
    log-probabilities (softmax at the calibrated temperature) and is solved jointly with
    :func:`scipy.optimize.linear_sum_assignment`, maximising the summed log-probability: with as many
    candidates as cells every candidate is used once; with more candidates, every cell gets a different
    one; with more cells than candidates, each candidate is used at most ``ceil(cells / candidates)``
    times.

Candidates
    A candidate is matched to the knowledge by name, then by Cell Ontology look-up, then by its nearest
    is_a ancestor that has markers (:meth:`MarkerKnowledge.locate`). A candidate the knowledge cannot
    place at all is scored *by elimination*: its score for a unit is the best score of the knowledge's
    types that no placed candidate explains (types that are not a placed candidate's type, nor its
    ancestor or descendant; within the units' tissue context) minus
    :data:`ELIMINATION_MARGIN`. A unit that none of the placed candidates explains, but some other cell
    type does, goes to the unplaced candidate; a unit a placed candidate explains stays with it. Two
    unplaced candidates tie; the first in the prompt's order wins a tie.

Confidence
    Per unit, from the softmax over the types or candidates it was compared with: the probability of
    the answer *and its Cell Ontology subtypes* among them (a "monocyte" answer is right when the cell
    is a classical monocyte, so their probabilities count for it), passed through the calibration
    (:mod:`.calibration`). Two unrelated types that score alike split the probability, so a cell whose
    best and second-best calls are not separable gets a low confidence; a type and its own subtypes
    do not compete. ``label_scores`` hold the per-option probabilities (the :data:`LABEL_SCORES` best,
    or every candidate up to :data:`MAX_CANDIDATE_SCORES`). :meth:`MarkersModel.decide` returns the
    answer and this probability without writing an answer (the calibration is fitted on it).

Subtype decisions
    Between close types the decision rests on the markers that distinguish them, which the knowledge
    (``canonical_markers_v3``) arranges: genes expressed by every member of a class (MHC class II,
    CD74, CST3, AIF1, FCER1G, TYROBP, CTSS for monocytes, dendritic cells and macrophages) carry the
    same weight for each member, so they place a cell in the class without picking the member (a
    database listing them for dendritic cells only made v2 call blood monocytes DCs); negative
    weights are kept for genes a type does not express (CD8A/CD8B for CD4 T cells, CD3 for NK cells,
    FCGR3A for CD16-negative classical monocytes, CD14 for DCs), not for genes it only expresses less
    (S100A4 in naive CD4 T cells, CD14 in CD16 monocytes), which a 200-gene sentence still holds.

A prompt of another decoder with several units is treated as one sample: its units' scores are
averaged and the reasoning describes the first unit.

Sentences
    Ranks are read as expression ranks. When the user keeps the default sentence settings the model
    asks for ``top-expressed`` sentences of :data:`DEFAULT_N_GENES` genes without ribosomal,
    mitochondrial and housekeeping genes (:attr:`MarkersBackend.sentence_preferences`): measured on the
    labelled data of ``benchmarks/markers_calibration.py``, leaving them out of the sentence (so 200
    genes reach deeper) beat keeping them and skipping them only when scoring (pancreas 0.897 against
    0.869 correct; PBMC unchanged). ``ranked-hvg`` sentences (CellReasoner's) follow a global gene order,
    not the cell's: the model still finds the markers in them, but their ranks carry less meaning.

    Gene activity (scATAC) is read differently (:data:`MODALITY_SCORING`, :data:`ATAC_N_GENES`). A peak
    matrix measures a fraction of the genes and each of them through one or two peaks, so a marker's
    rank is a noisy, small piece of evidence and a type is recognised from many of its markers ranking
    somewhat high rather than from a few at the top: the model asks for sentences of
    :data:`ATAC_N_GENES` genes, normalises a type's score by the square root of its measurable marker
    weight (``norm_power=0.5``, as for a sum of independent pieces of evidence, against 0.2 for RNA),
    subtracts the score its measurable markers would get by chance (``chance``) and lets no type win on
    one gene (``cap_top``: its strongest marker counts no more than its second; see :mod:`.scoring`). Measured with the
    default settings and ``tissue="blood"`` (``benchmarks/atac_real.py``): the Schep 2017 blood and
    lymphoblastoid cells went from 0.43 to 0.58 lineage accuracy and PBSmall from 0.853 to 0.900.

Measured genes and abstention
    Before answering, the pipeline tells the model which genes the run's data measure
    (:meth:`MarkersModel.use_assay`): types are scored over their measurable markers only and a type
    with fewer than ``MIN_OBSERVABLE_MARKERS`` of them is never an answer. A knowledge-only answer
    whose type has fewer than :data:`MIN_SUPPORT` markers among the cell's genes (or, with the chance
    correction, ranks no higher than chance) is withheld: the answer is :data:`ABSTENTION`, which the
    decoders read as unresolved, with the reason in the note.

Composition prior
    A peak set is called where the profiled cells are open, so it says which cell types the data hold
    before any cell is read; enrichment over the run's own cells cannot (in a sorted progenitor
    population every cell shares the stem-cell genes, and each cell's sentence ranks the mature lineage
    it is primed for). When the assay gives the genes' peak coverage (``Assay.coverage``: the ATAC
    modality's ``peak_prior``, on by default for peaks with a GTF), each type gets the prior
    ``log((found + a) / (expected + a))`` over its positive markers (weighted; found: peaks in their
    regions; expected: peaks of regions of the same lengths; ``a`` = :data:`PRIOR_PSEUDOCOUNT`, so that a
    type whose markers expect a few peaks keeps a prior near 0), and zero-shot and k-shot decisions add
    it times the calibrated temperature to the types' scores: the posterior is the cell's likelihood
    times a prior proportional to the peak density, no constant fitted. It applies to open-vocabulary
    answers (the model's own types) only: candidates, a reference's labels and puzzles are a label set
    the user chose, and among close types named that way the density favours the type with the most
    peak-rich markers (the seven Buenrostro gates as candidates: exact gate 0.257 -> 0.189 with it, the
    CLPs called HSCs and MPPs). The tissue-context inference does not use it either. The types with the
    strongest prior among all the knowledge's callable types (before any tissue context: a urothelial
    cell can be among them in a marrow run, where it is never an answer) are recorded in
    ``uns[key]["observability"]["prior"]``. Measured
    (``benchmarks/atac_real.py``): Buenrostro 2018 called a stem or progenitor type 0.205 -> 0.409 in a
    bone-marrow context; see the README for every set.

Lineage priming
    In chromatin, a progenitor committed to a lineage already opens that lineage's genes while its stem
    program is still open; the mature cell has closed the stem program. So a progenitor's sentence
    ranks the markers of the mature cells it will give, and its own markers (DNTT, VPREB1, MPO, ELANE)
    are often without a peak. For chromatin modalities (:data:`PRIMING_MODALITIES`) whose peak set
    shows an open stem program (the composition prior of the stem types,
    :data:`~.knowledge.STEM_PROGRAM_TYPES`, above 0: the data hold stem or progenitor cells), an
    open-vocabulary call of a mature hematopoietic type becomes its lineage's committed progenitor
    (:data:`~.knowledge.COMMITTED_PROGENITORS`: B cell -> common lymphoid progenitor, erythroblast ->
    megakaryocyte-erythroid progenitor, ...) when the best stem type is at least 1 / :data:`PRIMED_RATIO`
    (2.5) as probable as the call (its score within ``T log PRIMED_RATIO``) and scores above chance; a
    call that is a progenitor already (a :data:`~.knowledge.HEMATOPOIETIC_PRECURSOR` such as an erythroid progenitor)
    stays. The progenitor is named even where the data measure too few of its own markers to call it
    (sparse peak sets): it is then an option only priming answers, scored ``-inf`` (never a winner,
    absent from :meth:`MarkersModel.score_sentences`), and the note says its markers have too few
    peaks. The reasoning and the note say so (``lineage priming: ...``) and the confidence is the
    probability of the mature call and the progenitor together. A cell whose mature call would be
    withheld stays unresolved. Candidates, a reference's labels, puzzles, expression data and peak sets
    without that prior (fragments, promoter selections, atlas peak sets run with ``peak_prior=False``)
    are unchanged, and so is
    :meth:`MarkersModel.decide`. The run records ``uns[key]["observability"]["priming"]`` (the stem
    prior, whether it applies, the progenitors named without their own markers). Measured
    (``benchmarks/atac_real.py``): Buenrostro 2018 called a stem or progenitor type 0.409 -> 0.916 in a
    bone-marrow context; a quarter of its peaks 0.289 -> 0.569.

Tissue context
    Each prompt carries its units' tissue (``Prompt.tissue``: the run's ``tissue=``, or what a standard
    ``obs`` column of the data states per cell), and answers are restricted to that tissue's cell types
    (plus immune, vascular and stromal ones; blood: hematopoietic cells only). For the cells whose
    tissue nothing states, or states in words the knowledge does not know, :meth:`MarkersModel.survey`
    infers the organs they come from and restricts their answers to them (see its docstring). What was
    stated and inferred is recorded in ``uns[key]["observability"]["context"]``. An answer whose cell
    type belongs to an organ outside the cell's stated or inferred context (a candidate, or a run with
    too few cells to infer anything) says so in its note. A model loaded once serves runs of any
    tissue: the tissue is per prompt, never fixed at load (``load(tissue=)`` only sets it for prompts
    without one).
"""

from __future__ import annotations

import functools
import logging
import math
import re
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellscribe.core.domain.ontology import get_ontology
from cellscribe.core.answers import opens_think
from cellscribe.core.types import Generation, Prompt

from . import reasoning as text
from .calibration import Calibration, load_calibration, softmax
from .knowledge import (
    COMMITTED_PROGENITORS,
    HEMATOPOIETIC_PRECURSOR,
    HOUSEKEEPING_GENES,
    RESIDENT_ORGANS,
    SITE_SPECIFIC_TYPES,
    STEM_PROGRAM_TYPES,
    UBIQUITOUS_PATTERN,
    MarkerKnowledge,
    default_ubiquitous_genes,
    load_knowledge,
    tissue_key,
    tissue_organs,
)
from .scoring import MIN_OBSERVABLE_MARKERS, SCORING_VERSION, MarkerScorer, ParsedUnits
from .signatures import Signatures, label_signatures

log = logging.getLogger(__name__)

__all__ = [
    "NAME",
    "DEFAULT_N_GENES",
    "ELIMINATION_MARGIN",
    "MarkersBackend",
    "MarkersModel",
    "is_uninformative_gene",
]

NAME = "markers"
#: Genes per sentence the model asks for when the user keeps the default sentence settings.
DEFAULT_N_GENES = 200
#: The same for gene activity (scATAC): see "Sentences" in the module docstring.
ATAC_N_GENES = 1000
#: Units scored at once (bounds memory: a units x 189 float64 score matrix per chunk).
CHUNK_UNITS = 2_000
#: Types compared in the written reasoning of a zero-shot or k-shot answer.
COMPARED = 3
#: Best types given in ``Generation.label_scores`` without candidates.
LABEL_SCORES = 5
#: Most candidates given in ``Generation.label_scores``.
MAX_CANDIDATE_SCORES = 50
#: Score subtracted from the best unexplained type's score for a candidate without marker knowledge.
ELIMINATION_MARGIN = 0.1
#: Fewest of its markers a knowledge-only answer needs among the cell's genes (else: abstain).
MIN_SUPPORT = 2
#: Below this share of a type's marker weight measured, answers say how much the data show.
OBSERVED_NOTE_BELOW = 0.9
#: The answer written when the model withholds a call (the decoders read it as an abstention).
ABSTENTION = "unresolved"
#: Scoring constants that differ by modality (see "Sentences" in the module docstring).
MODALITY_SCORING: dict[str, dict[str, Any]] = {"atac": {"norm_power": 0.5, "chance": True, "cap_top": True}}
#: Peaks added to the found and to the expected count of a type's markers before the composition prior
#: takes their ratio (see "Composition prior"): a ratio of a few peaks stays near 1.
PRIOR_PSEUDOCOUNT = 2.0
#: Modalities whose features are chromatin accessibility, where lineage priming applies.
PRIMING_MODALITIES = frozenset({"atac"})
#: A mature hematopoietic call becomes its lineage's committed progenitor when the stem program is at
#: least 1 / PRIMED_RATIO as probable as the call (see "Lineage priming"). Set by what priming costs
#: mature cells: forced onto every real mature population (Schep 2017's monocytes, erythroblasts and
#: GM12878 B cells, which have no stem prior), 2.5 costs 4 of 250 cells without the neighbour vote and
#: none with it; 3 costs 11 and 2 (``benchmarks/atac_real.py --prime-everywhere --primed-ratio``).
PRIMED_RATIO = 2.5
#: Types named in the observability report's ``prior`` (the strongest priors each way).
PRIOR_REPORTED = 5
#: Without a tissue, a run of at least this many open-vocabulary cells infers its tissue context.
CONTEXT_MIN_CELLS = 10
#: Cells scored to infer the context (an even sample of larger runs).
CONTEXT_SAMPLE = 5_000
#: Organs whose estimated share of the cells is at least this make up the inferred context.
CONTEXT_MIN_SHARE = 0.05
#: Organs read as one blood context (only hematopoietic cells; see ``TISSUE_RESIDENTS``).
BLOOD_ORGANS = frozenset({"Immune system", "Blood"})
#: An inferred context of several organs is *uncertain* when fewer than this share of the cells it was
#: inferred from belong to one of its organs with a posterior of at least :data:`DECISIVE_POSTERIOR`
#: (a warning says so; see :meth:`MarkersModel.survey`).
CONTEXT_MIN_DECISIVE = 0.5
DECISIVE_POSTERIOR = 0.9
#: The name of the one mixture component the organs of :data:`BLOOD_ORGANS` form when a context is
#: inferred (:meth:`MarkersModel._organ_model`); it is one of them, so it reads as blood everywhere.
BLOOD_COMPONENT = "Immune system"
#: An inferred organ's own immune types (microglia, Kupffer cells, alveolar macrophages, Langerhans
#: cells, thymocytes) are answers only when the organ holds at least this share of the cells (see
#: :meth:`MarkersModel.survey`).
ORGAN_IMMUNE_MIN_SHARE = 0.5
#: Cell Ontology "hematopoietic cell": the root of the types :data:`ORGAN_IMMUNE_MIN_SHARE` is about.
HEMATOPOIETIC_CELL = "CL:0000988"

#: The tissue that asks for no tissue context (every cell type; nothing inferred).
ANY_TISSUE = "any"
#: Tissues named in messages as examples of what the model knows.
_EXAMPLE_TISSUES = ("blood", "bone marrow", "pancreas", "lung", "brain", "liver")
#: Organs whose cell types live in every tissue (their types never get an organ note).
_RESIDENT = frozenset(RESIDENT_ORGANS)
#: The resident organs every tissue holds besides its own cells: vessels and connective tissue.
_STROMA = frozenset({"Vasculature", "Connective tissue"})

# load() options the pipeline passes to every backend, which this model has no use for.
_PIPELINE_OPTIONS = frozenset({"device", "dtype", "trust_remote_code", "batch_size", "adapters"})
_UBIQUITOUS_RE = re.compile(UBIQUITOUS_PATTERN)


@functools.cache
def _uninformative() -> frozenset[str]:
    return frozenset(g.upper() for g in default_ubiquitous_genes() | HOUSEKEEPING_GENES)


def is_uninformative_gene(symbol: str) -> bool:
    """Whether a gene symbol is ribosomal, mitochondrial or housekeeping (the built-in knowledge's
    ubiquitous genes, ignoring case). The model's sentences leave these genes out so that 200 genes
    reach deeper into each cell's expression."""
    upper = str(symbol).strip().upper()
    return upper in _uninformative() or _UBIQUITOUS_RE.match(upper) is not None


@functools.cache
def _builtin_scorer() -> MarkerScorer:
    return MarkerScorer(load_knowledge())


def _as_tables(value: Any, what: str) -> list[Any]:
    """A list of marker tables (DataFrames or existing paths) from one value or an iterable."""
    if value is None:
        return []
    if isinstance(value, (str, PathLike, pd.DataFrame)):
        items = [value]
    elif isinstance(value, Iterable):
        items = [v for v in value if v is not None]
    else:
        raise TypeError(
            f"{what} must be a marker table (CSV path or DataFrame) or a list of them, got {value!r}"
        )
    tables = []
    for item in items:
        if isinstance(item, pd.DataFrame):
            tables.append(item)
            continue
        if isinstance(item, (list, tuple)):
            tables.extend(_as_tables(item, what))
            continue
        path = Path(item)
        if not path.is_file():
            raise ValueError(
                f"{what}: marker table {str(item)!r} does not exist; give the path of a CSV with columns "
                "'cell type' and 'gene' (optional 'weight', 'tissue', 'cl_id')"
            )
        tables.append(path)
    return tables


def nameable_types(cell_types: Sequence[str], ontology: Any) -> np.ndarray:
    """Boolean mask of the type names an open-vocabulary answer can carry: those that name exactly one
    Cell Ontology term (:meth:`~cellscribe.core.domain.ontology.CellOntology.named_terms`, as the decoder
    reads answers). An answer naming none or several ("Transient cells", "Osteoclast precursor cells":
    osteoclast or precursor cell?) is decoded as unresolved."""
    return np.asarray([len(ontology.named_terms(str(name))[0]) == 1 for name in cell_types], dtype=bool)


@functools.cache
def _unnameable_builtin_types() -> frozenset[str]:
    """The built-in knowledge's types that are never open-vocabulary answers: four PanglaoDB types no
    Cell Ontology term places (an answer naming them would be lost as unresolved). As candidates they
    are answers; a user table's own types stay answers whatever their names (its authors chose them)."""
    scorer = _builtin_scorer()
    return frozenset(str(t) for t, ok in zip(scorer.cell_types, nameable_types(scorer.cell_types, get_ontology()))
                     if not ok)


def composition_prior(scorer: MarkerScorer, coverage: pd.DataFrame, pseudocount: float = PRIOR_PSEUDOCOUNT) -> np.ndarray:
    """Each type's composition prior from a peak coverage table (see "Composition prior").

    :param scorer: the scorer of the marker knowledge; a type's own positive markers count (measured or
        not: a marker without a peak in a peak set called on the cells is evidence too), with their
        knowledge weights, ubiquitous genes left out. Markers a type inherits from its Cell Ontology
        ancestors in scoring do not: they are shared with its siblings and say nothing of which of them
        is present.
    :param coverage: ``peaks`` and ``expected`` per gene symbol (:attr:`~cellscribe.core.types.Assay.coverage`),
        matched to the knowledge's genes as sentence tokens are (case, Ensembl ids: a mouse annotation's
        Cd34 is the knowledge's CD34); markers the table lacks (not in the annotation) count for neither.
    :return: ``log((found + a) / (expected + a))`` per type of the knowledge (0 for types without markers).
    """
    knowledge = scorer.knowledge
    columns, _ = scorer.vocabulary.lookup(coverage.index.astype(str))
    placed = columns >= 0
    found = np.zeros(len(knowledge.genes))
    expected = np.zeros(len(knowledge.genes))
    found[columns[placed]] = coverage["peaks"].to_numpy(np.float64)[placed]
    expected[columns[placed]] = coverage["expected"].to_numpy(np.float64)[placed]
    informative = ~knowledge.is_ubiquitous(knowledge.genes)
    weights = sp.csr_matrix(knowledge.weights, dtype=np.float64).maximum(0) @ sp.diags(informative.astype(np.float64))
    return np.log((weights @ found + pseudocount) / (weights @ expected + pseudocount))


class MarkersBackend:
    """Backend ``markers``: the offline default model (see the module docstring).

    ``model="markers"``; ``"markers:TABLE.csv"`` adds a marker table (as ``marker_table=`` does).
    """

    name = NAME
    description = "offline marker-gene reasoner (PanglaoDB + canonical markers); no weights, no GPU"
    sentence_preferences = {
        "sentence": "top-expressed",
        "n_genes": DEFAULT_N_GENES,
        "options": {"exclude": is_uninformative_gene},
        "modalities": {"atac": {"n_genes": ATAC_N_GENES}},
    }

    def handles(self, spec: str) -> bool:
        return spec == NAME or spec.startswith(f"{NAME}:")

    def load(
        self,
        spec: str,
        *,
        hook: Any = None,
        tissue: str | None = None,
        marker_table: Any = None,
        **options: Any,
    ) -> MarkersModel:
        """A :class:`MarkersModel` over the built-in knowledge plus extra marker tables.

        :param spec: ``"markers"`` or ``"markers:PATH"`` (PATH: a marker table added to the knowledge).
        :param hook: the plugin manager's hook relay; every ``cellscribe_marker_knowledge(tissue=...)``
            result (a DataFrame, a CSV path, or a list of them) is added to the knowledge.
        :param tissue: the tissue of prompts that state none (``Prompt.tissue`` empty): their answers are
            restricted to its cell types (plus immune, vascular and connective cells; see
            :meth:`MarkerKnowledge.restrict`). Runs give the tissue per prompt instead.
        :param marker_table: a user marker table (CSV path or DataFrame) or a list of them
            (``--model-option marker_table=PATH``), added after the plugin tables.
        :raises ValueError: for an unknown tissue, a missing or malformed table.
        """
        start = time.perf_counter()
        unused = sorted(k for k, v in options.items() if k not in _PIPELINE_OPTIONS and v is not None)
        if unused:
            warnings.warn(
                f"the markers model ignores the option(s) {unused}; it understands marker_table "
                "(and tissue)",
                UserWarning,
                stacklevel=2,
            )
        if options.get("adapters"):
            warnings.warn("the markers model has no weights: adapters are ignored", UserWarning, stacklevel=2)
        tables: list[Any] = []
        if spec.startswith(f"{NAME}:"):
            tables += _as_tables(spec.split(":", 1)[1], f"model {spec!r}")
        if hook is not None:
            for result in hook.cellscribe_marker_knowledge(tissue=tissue):
                tables += _as_tables(result, "a cellscribe_marker_knowledge hook")
        tables += _as_tables(marker_table, "marker_table")
        scorer = MarkerScorer(load_knowledge(extra_tables=tables)) if tables else _builtin_scorer()
        model = MarkersModel(scorer, tissue=tissue, calibration=load_calibration(), n_tables=len(tables))
        log.info("markers model ready in %.2f s: %r", time.perf_counter() - start, scorer)
        return model


class _Context(NamedTuple):
    """Where a group of units' answers come from: ``mask`` of the types allowed (``None``: all),
    ``kind`` (``"stated"``, ``"inferred"``, ``"any"`` or ``"none"``) and ``what`` (the stated tissue, or
    the inferred organs); ``key`` tells contexts apart in caches."""

    key: str
    mask: np.ndarray | None
    kind: str
    what: str

    def allowed(self, n: int) -> np.ndarray:
        return np.ones(n, dtype=bool) if self.mask is None else self.mask

    def organ_note(self, label: str, organs: frozenset[str], row_allowed: bool) -> str:
        """The note for an answer whose type belongs to ``organs`` (none of them resident everywhere)
        when the context does not allow it (``""`` otherwise)."""
        if row_allowed and self.kind in ("stated", "inferred"):
            return ""
        where = _organ_list(sorted(organs))
        if self.kind == "stated":
            return f"{label} is a cell type of the {where}, not of the stated tissue ({self.what})"
        if self.kind == "inferred":
            return f"{label} is a cell type of the {where}, outside the tissue context inferred for these cells ({self.what})"
        if self.kind == "any":
            return ""
        return (f"{label} is a cell type of the {where}; no tissue was stated or could be inferred for this "
                "cell (pass tissue= if the cells are not from there)")


def _mixture_shares(probabilities: np.ndarray, membership: np.ndarray) -> np.ndarray:
    """Each component's share of the units by expectation-maximisation: a unit's probabilities over the
    types (``units x types``), re-weighted by the current shares of the components each type belongs
    to (``membership``: ``types x components``, rows summing to 1 or 0 for a type of none), until the
    shares settle."""
    share = np.full(membership.shape[1], 1.0 / max(membership.shape[1], 1))
    for _ in range(50):
        new = _mixture_posteriors(probabilities, membership, share).mean(axis=0)
        new /= max(new.sum(), 1e-300)
        if np.abs(new - share).max() < 1e-6:
            return new
        share = new
    return share


def _mixture_posteriors(probabilities: np.ndarray, membership: np.ndarray, share: np.ndarray) -> np.ndarray:
    """``(units, components)``: each unit's posterior over the components under the shares ``share``
    (the E-step of :func:`_mixture_shares`; a unit with no probability on a tagged type gets zeros)."""
    tagged = membership.sum(axis=1) > 0
    weighted = probabilities[:, tagged] * (membership[tagged] @ share)[None, :]
    weighted /= np.maximum(weighted.sum(axis=1, keepdims=True), 1e-300)
    return weighted @ membership[tagged]


class _Routes(NamedTuple):
    """A multi-organ inferred context split by organ: the knowledge ``rows`` scored, each row's
    share-weighted membership of each organ group (``weights``: rows x groups) and each group's
    context."""

    rows: np.ndarray
    weights: np.ndarray
    contexts: tuple[_Context, ...]
    shares: np.ndarray | None = None


def _organ_list(organs: Sequence[str]) -> str:
    """``"A"``, ``"A and B"``, ``"A, B and C"`` (organ names as the knowledge writes them, lower case)."""
    names = [str(o).lower() for o in organs]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1] if names else "no organ"


class _Options:
    """What the units of a group of prompts are compared with: knowledge rows, candidates, or k-shot
    labels, with the scores of each option computed from the type scores."""

    def __init__(
        self,
        names: Sequence[str],
        rows: np.ndarray,
        other: np.ndarray,
        *,
        display: Sequence[str] | None = None,
        inferred: np.ndarray | None = None,
    ) -> None:
        self.names = [str(n) for n in names]
        self.rows = np.asarray(rows, dtype=np.int64)
        self.other = other  # boolean mask of the types no option explains (for elimination)
        # Options only lineage priming may answer (a committed progenitor whose own markers the data
        # cannot show): they score -inf, so they never win and carry no probability of their own.
        self.inferred = np.zeros(len(self.names), dtype=bool) if inferred is None else np.asarray(inferred, bool)
        # Names as written in reasoning (display-safe), computed once per group of prompts.
        self.display = [text.safe(n) for n in (display if display is not None else self.names)]
        self._subtree: sp.csr_matrix | None = None
        self.organ_notes: list[str] | None = None  # see MarkersModel._organ_notes
        self.priming: tuple[np.ndarray, np.ndarray] | None = None  # see MarkersModel._priming_map

    def subtree(self, cl_ids: Sequence[str], ontology: Any) -> sp.csr_matrix:
        """``(options, options)``, 1 where option ``j`` is option ``i`` or one of its Cell Ontology
        descendants (an option the knowledge cannot place is only itself); computed once."""
        if self._subtree is None:
            terms = [str(cl_ids[r]) if r >= 0 and cl_ids[r] else "" for r in self.rows]
            index: dict[str, list[int]] = defaultdict(list)
            for j, term in enumerate(terms):
                if term:
                    index[term].append(j)
            pairs = {(j, j) for j in range(len(terms))}
            for j, term in enumerate(terms):
                if term:
                    for ancestor in ontology.ancestors(term):
                        pairs.update((i, j) for i in index.get(ancestor, ()))
            rows, cols = (np.asarray(x, dtype=np.int64) for x in zip(*sorted(pairs)))
            self._subtree = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(terms), len(terms)))
        return self._subtree

    def __len__(self) -> int:
        return len(self.names)

    def scores(self, type_scores: np.ndarray) -> np.ndarray:
        """``(units, options)``: known options take their type's score, unplaced ones the elimination
        score."""
        out = np.empty((type_scores.shape[0], len(self.names)), dtype=np.float64)
        known = self.rows >= 0
        out[:, known] = type_scores[:, self.rows[known]]
        if not known.all():
            out[:, ~known] = self.elimination(type_scores)[:, None]
        out[:, self.inferred] = -np.inf
        return out

    def elimination(self, type_scores: np.ndarray) -> np.ndarray:
        """Per unit, the best score of the types no placed option explains, minus the margin."""
        if not self.other.any():
            return np.full(type_scores.shape[0], -ELIMINATION_MARGIN)
        return type_scores[:, self.other].max(axis=1) - ELIMINATION_MARGIN


class MarkersModel:
    """The loaded ``markers`` model (a :class:`~cellscribe.core.components.LoadedModel`).

    Attributes
    ----------
    scorer
        The :class:`~.scoring.MarkerScorer` over the loaded knowledge, restricted to the genes of the
        current :attr:`assay` (:meth:`use_assay`).
    assay
        The :class:`~cellscribe.core.types.Assay` of the run being answered, or ``None`` (every gene
        counts as measured).
    tissue
        The tissue of prompts that state none (see :meth:`MarkersBackend.load`), or ``None``.
    calibration
        The fixed :class:`~.calibration.Calibration`.
    """

    #: Prompts per call the pipeline should send: scoring is vectorised over a call, and per-call
    #: costs (token look-ups) are paid once, so large calls are much faster than LLM-sized batches; a
    #: streamed chunk of the default 10,000 cells is one call (and one checkpointed batch).
    prompts_per_call = 10_000
    #: Decode modes that make sense for a scorer: its answers always come from scores.
    decode_modes = ("generate", "constrained", "score")
    #: NumPy and SciPy on the CPU, nothing open: forked copies answer a streamed run's chunks side by side.
    forkable = True

    def __init__(
        self,
        scorer: MarkerScorer,
        *,
        tissue: str | None = None,
        calibration: Calibration | None = None,
        n_tables: int = 0,
    ) -> None:
        self.scorer = scorer
        self._base_scorer = scorer
        self.assay: Any = None
        self.tissue = tissue
        self.calibration = calibration or load_calibration()
        self.n_tables = n_tables
        self._ontology = get_ontology()
        self._options_cache: dict[tuple, _Options] = {}
        self._stated: dict[str, _Context | None] = {}
        self._unrestricted = _Context("", None, "none", "")
        self._inferred: _Context | None = None
        self._routes: _Routes | None = None
        self._routes_of: dict[str, _Routes] = {}
        self._prior: np.ndarray | None = None
        self._stem_prior: float | None = None
        if tissue is not None and self._stated_context(tissue) is None:
            scorer.tissue_mask(tissue)  # raises the error naming the known tissues
        default = self._context_of("")
        self._allowed = default.allowed(len(scorer.cell_types))
        self._nameable = ~np.isin(scorer.cell_types, list(_unnameable_builtin_types()))

    @property
    def knowledge(self) -> MarkerKnowledge:
        return self.scorer.knowledge

    def __repr__(self) -> str:
        return f"<MarkersModel {self.scorer!r}{f' tissue={self.tissue!r}' if self.tissue else ''}>"

    # ---------------------------------------------------------------- LoadedModel protocol

    def use_assay(self, assay: Any) -> dict[str, Any]:
        """Answer the next prompts within what ``assay`` measures; return what of the knowledge it shows.

        The scorer keeps only measured genes (:meth:`MarkerScorer.within`): types are normalised over
        their measurable markers and a type with fewer than ``MIN_OBSERVABLE_MARKERS`` of them cannot
        be called. ``None`` restores the whole knowledge.

        :return: the observability report recorded in ``uns[key]["observability"]``: measured genes,
            the share of the knowledge's marker weight they carry (over the types this run may call),
            how many of those types can be called, and the types that cannot (at most 20 named).
        """
        self.assay = assay
        genes = None if assay is None else assay.genes
        params = {} if assay is None else MODALITY_SCORING.get(str(assay.modality), {})
        self.scorer = self._base_scorer.within(genes, **params)
        coverage = None if assay is None else getattr(assay, "coverage", None)
        self._prior = None if coverage is None else composition_prior(self._base_scorer, coverage)
        self._stem_prior = None
        if self._prior is not None and str(assay.modality) in PRIMING_MODALITIES:
            stem = np.isin(self.scorer.cl_ids, STEM_PROGRAM_TYPES)
            self._stem_prior = float(self._prior[stem].max()) if stem.any() else None
        self._options_cache.clear()
        return self.observability()

    def survey(self, prompts: Sequence[Prompt]) -> dict[str, Any]:
        """Look at a run's prompts before answering them: check their tissues, infer a context for the
        cells without one.

        Each prompt's ``tissue`` (the run's ``tissue=``, or what the data state per cell; the load-time
        ``tissue`` for prompts without one) restricts its answers to that tissue's cell types as
        :meth:`MarkerScorer.tissue_mask` does (``"any"``: no restriction). A tissue the knowledge does
        not know (``"tumor"`` in an ``obs`` column) restricts nothing: a warning names it, and its cells
        join those without a tissue.

        For those, a cell type from another organ would be the most visible error of a knowledge model
        (microglia in blood, hepatocytes in a glioma), so the context is inferred. Their units (at least
        :data:`CONTEXT_MIN_CELLS`; an even sample of :data:`CONTEXT_SAMPLE`; every unit of every kind of
        prompt: with candidates, examples or puzzles the context still decides which types a candidate
        without markers is eliminated against, and which answers are noted) are scored against every
        callable type, and the share of cells each organ of the knowledge accounts for is estimated by
        expectation-maximisation: each cell's calibrated probabilities over the types are re-weighted
        by the current organ shares (a type's share split evenly over its organs) until the shares
        settle, so organs that only noise points to fade while organs many cells agree on stay. The
        organs holding at least :data:`CONTEXT_MIN_SHARE` of the cells become the context and answers
        are restricted to them as a tissue would (immune and blood organs together as blood:
        hematopoietic cells only; they are one component of the mixture, see :meth:`_organ_model`).
        A context of several organs is only as good as the cells' evidence tells them apart: when fewer
        than :data:`CONTEXT_MIN_DECISIVE` of the cells belong to one of its organs with a posterior of at
        least :data:`DECISIVE_POSTERIOR`, a warning says the context is uncertain and asks for the
        tissue (a quarter of Schep 2017's peaks, drawn at random: 3% of the cells decisive, the brain
        0.58 of the context; Baron's pancreas with its macrophages: 0.97). Cell types without a
        recorded organ stay allowed. An organ's own immune types (hematopoietic types recorded in no
        blood or immune organ: microglia for the brain, Kupffer cells for the liver) are answers only
        when that organ holds at least :data:`ORGAN_IMMUNE_MIN_SHARE` of the cells: the share of an
        organ tells that its own cells are in the data, not that the immune cells beside them live in it
        (with 8% of the cells read as brain, 511 of 1,200 LMPPs in a 14,400-cell run sampled from the
        Schep 2017 populations were called microglia); in the brain's own data they stay.

        Within a stated tissue (of at least :data:`CONTEXT_MIN_CELLS` cells) the same mixture separates
        the tissue's own cells (with blood) from the vessels and connective tissue every tissue holds,
        unless the tissue names them: their shares are estimated on the tissue's cells and each cell
        answers within its most likely part, so that the few stromal cells of a marrow aspirate do not
        make fibroblasts and pericytes answers for monocytes and progenitors whose evidence is thin
        (Schep 2017 in a bone-marrow context 0.850 -> 0.897 lineage accuracy; Baron's pancreas, where
        the shares of vessels and stroma are 0, unchanged).

        :return: the context report recorded in ``uns[key]["observability"]["context"]``: ``tissue``
            (the one stated tissue when every unit has it), ``stated`` (units per stated tissue the
            knowledge knows), ``not_understood`` (units per stated tissue it does not), ``inferred``
            and, when inferred, ``organs``, ``n_cells``, ``organ_shares``, ``decisive`` (the share of the
            cells one organ holds with a posterior of at least :data:`DECISIVE_POSTERIOR`), ``routed``
            (the organs cells are routed between), ``warning`` (an uncertain context) and
            ``organ_immune_types_left_out``, else ``why`` not; ``routed_stated``
            (per stated tissue, the shares of its own cells, vessels and connective tissue).
        """
        self._inferred = None
        self._routes = None
        self._routes_of: dict[str, _Routes] = {}
        self._options_cache.clear()
        units: dict[str, int] = defaultdict(int)
        for p in prompts:
            units[p.tissue or self.tissue or ""] += max(len(p.unit_ids), 1)
        stated = {t: n for t, n in units.items() if t and self._stated_context(t) is not None}
        unknown = {t: n for t, n in units.items() if t and t not in stated}
        report: dict[str, Any] = {
            "tissue": next(iter(stated)) if len(stated) == 1 and len(units) == 1 else "",
            "stated": stated, "not_understood": unknown, "inferred": False,
        }
        if unknown:
            warnings.warn(
                f"the markers model knows no tissue named {', '.join(map(repr, list(unknown)[:5]))} "
                f"({sum(unknown.values())} cells): their answers come from an inferred tissue context; pass "
                f"tissue= with a tissue it knows (e.g. {', '.join(_EXAMPLE_TISSUES)}) to set it",
                UserWarning, stacklevel=2,
            )
        for tissue in stated:
            routes = self._stated_routes(tissue, prompts)
            if routes is not None:
                self._routes_of[tissue] = routes
                report.setdefault("routed_stated", {})[tissue] = {
                    c.key.rsplit(":", 1)[-1]: round(float(x), 4) for c, x in zip(routes.contexts, routes.shares)}
        sentences = [s for p in prompts if (p.tissue or self.tissue or "") not in stated for s in p.sentences if s]
        if not sentences:
            return report
        if len(sentences) < CONTEXT_MIN_CELLS:
            report["why"] = f"{len(sentences)} cells without a tissue: too few to infer a tissue context"
            return report
        step = max(1, len(sentences) // CONTEXT_SAMPLE)
        sample = sentences[::step]
        shares, decisive = self._organ_shares(sample)
        kept = sorted(o for o, share in shares.items() if share >= CONTEXT_MIN_SHARE)
        allowed = self._untagged_types()
        for organ in kept:
            allowed |= self._base_scorer.tissue_mask("blood" if organ in BLOOD_ORGANS else organ)
        organ_immune = self._organ_immune_types()
        minor = [r for r in np.flatnonzero(organ_immune & allowed)
                 if max((shares.get(o, 0.0) for o in self.knowledge.tissues[r]), default=0.0) < ORGAN_IMMUNE_MIN_SHARE]
        allowed[minor] = False
        self._inferred = _Context("(inferred)", allowed, "inferred", _organ_list(kept))
        self._routes = self._organ_routes(kept, shares, minor)
        top = dict(sorted(shares.items(), key=lambda kv: -kv[1])[:8])
        log.info("markers: inferred tissue context %s from %d cells (shares %s)", kept, len(sample), top)
        report.update({"inferred": True, "organs": kept, "n_cells": len(sample),
                       "organ_shares": {k: round(v, 4) for k, v in top.items()},
                       "decisive": round(decisive, 4),
                       "organ_immune_types_left_out": [str(self.knowledge.cell_types[r]) for r in minor]})
        if self._routes is not None:
            report["routed"] = [c.what for c in self._routes.contexts]
            if decisive < CONTEXT_MIN_DECISIVE:
                report["warning"] = (
                    f"the tissue context inferred for these cells is uncertain: {decisive:.0%} of them clearly "
                    f"belong to one of its organs ({self._inferred.what}), so answers may come from the wrong "
                    f"organ; pass tissue= (--tissue) with the tissue the cells come from (e.g. "
                    f"{', '.join(_EXAMPLE_TISSUES[:3])})"
                )
                warnings.warn(report["warning"], UserWarning, stacklevel=2)
        return report

    def _organ_routes(
        self, kept: Sequence[str], shares: Mapping[str, float], left_out: Sequence[int]
    ) -> _Routes | None:
        """With more than one organ (blood and immune system count as one) in the inferred context,
        what routes each cell to one of them (see :meth:`survey`); ``None`` otherwise."""
        groups: dict[str, list[str]] = {}
        for organ in kept:
            groups.setdefault("blood" if organ in BLOOD_ORGANS else organ, []).append(organ)
        if len(groups) < 2:
            return None
        rows, organs, membership = self._organ_model()
        index = {o: j for j, o in enumerate(organs)}
        untagged = self._untagged_types()
        weights = np.zeros((len(organs), len(groups)))
        contexts = []
        for g, (name, members) in enumerate(groups.items()):
            for organ in members:
                weights[index[organ], g] = shares.get(organ, 0.0)
            mask = untagged | self._base_scorer.tissue_mask(name)
            mask[list(left_out)] = False
            contexts.append(_Context(f"(inferred:{name})", mask, "inferred", _organ_list(members)))
        return _Routes(rows, membership @ weights, tuple(contexts))

    def _stated_routes(self, tissue: str, prompts: Sequence[Prompt]) -> _Routes | None:
        """Within a stated tissue: its own organs, blood, vessels and connective tissue as components,
        their shares of the tissue's cells, and what routes each cell to one of them."""
        context = self._stated_context(tissue)
        if context is None or context.mask is None:
            return None
        sentences = [s for p in prompts if (p.tissue or self.tissue or "") == tissue for s in p.sentences if s]
        if len(sentences) < CONTEXT_MIN_CELLS:
            return None
        sample = sentences[:: max(1, len(sentences) // CONTEXT_SAMPLE)]
        rows = np.flatnonzero(self.scorer.callable_types() & context.mask)
        named = {tissue_key(o) for o in tissue_organs(tissue)}
        names, membership = self._membership(
            rows, lambda organ: organ if organ in _STROMA and tissue_key(organ) not in named else "own")
        if len(names) < 2:
            return None
        units = self.scorer.parse(list(sample))
        share = _mixture_shares(self.calibration.probabilities(self.scorer.score(units)[:, rows]), membership)
        untagged = self._untagged_types()
        contexts = []
        for j, name in enumerate(names):
            in_part = untagged.copy()
            in_part[rows[membership[:, j] > 0]] = True
            contexts.append(_Context(f"tissue:{tissue}:{name}", context.mask & in_part, "stated", tissue))
        return _Routes(rows, membership * share[None, :], tuple(contexts), share)

    def _route(self, prompts: Sequence[Prompt], chunk: Sequence[int]) -> tuple[dict[int, _Context], dict[int, Any]]:
        """The part of its context each prompt of ``chunk`` is answered in, where the context is split
        (a multi-organ inferred context, or a stated tissue's own cells, vessels and stroma): the part
        with the largest posterior share for its (first) cell, ``share(part) * sum of the cell's
        calibrated probabilities of the part's types``, as in :meth:`_organ_shares`. Puzzles keep the
        whole context (their cells are assigned together). Also returns, per routed prompt of one
        sentence, its parsed unit and type scores, which its answer reuses."""
        by_routes: dict[int, list[int]] = defaultdict(list)
        table: dict[int, _Routes] = {}
        for i in chunk:
            p = prompts[i]
            if p.answer.tagged or not p.sentences or not p.sentences[0]:
                continue
            tissue = p.tissue or self.tissue or ""
            context = self._context_of(p.tissue)
            routes = self._routes_of.get(tissue) if context.kind == "stated" else (
                self._routes if context is self._inferred else None)
            if routes is not None:
                table[id(routes)] = routes
                by_routes[id(routes)].append(i)
        out: dict[int, _Context] = {}
        scored: dict[int, Any] = {}
        for key, chosen in by_routes.items():
            routes = table[key]
            units = self.scorer.parse([prompts[i].sentences[0] for i in chosen])
            type_scores = self.scorer.score(units)
            probabilities = self.calibration.probabilities(type_scores[:, routes.rows])
            best = np.argmax(probabilities @ routes.weights, axis=1)
            out.update({i: routes.contexts[g] for i, g in zip(chosen, best)})
            scored.update({i: (units, type_scores, j) for j, i in enumerate(chosen) if len(prompts[i].sentences) == 1})
        return out, scored

    def _organ_immune_types(self) -> np.ndarray:
        """Mask of the knowledge's hematopoietic types recorded only in organs outside
        :data:`BLOOD_ORGANS` (an organ's own immune cells; see :meth:`survey`)."""
        onto = get_ontology()
        out = np.zeros(len(self.knowledge.cell_types), dtype=bool)
        for row, (cl_id, organs) in enumerate(zip(self.knowledge.cl_ids, self.knowledge.tissues)):
            if organs and not set(organs) & BLOOD_ORGANS and cl_id:
                resolved = onto.resolve(str(cl_id))
                out[row] = bool(resolved) and onto.is_a(resolved, HEMATOPOIETIC_CELL)
        return out

    def _stated_context(self, tissue: str) -> _Context | None:
        """The context of a stated tissue (cached), ``None`` when the knowledge does not know it."""
        if tissue not in self._stated:
            if tissue.strip().casefold() == ANY_TISSUE:
                self._stated[tissue] = _Context(ANY_TISSUE, None, "any", ANY_TISSUE)
            else:
                try:
                    mask = self._base_scorer.tissue_mask(tissue)
                except ValueError:
                    mask = None
                self._stated[tissue] = None if mask is None else _Context(f"tissue:{tissue}", mask, "stated", tissue)
        return self._stated[tissue]

    def _context_of(self, tissue: str) -> _Context:
        """Where answers for units of ``tissue`` (``""``: none stated) come from: the stated tissue when
        the knowledge knows it, else the inferred context of the run, else every type."""
        tissue = tissue or self.tissue or ""
        stated = self._stated_context(tissue) if tissue else None
        return stated or self._inferred or self._unrestricted

    def _organ_shares(self, sentences: Sequence[str]) -> tuple[dict[str, float], float]:
        """Each organ's estimated share of the cells (see :meth:`survey`), and the share of the cells
        whose posterior for one organ (under those shares) is at least :data:`DECISIVE_POSTERIOR`."""
        rows, organs, membership = self._organ_model()
        if not organs:
            return {}, 0.0
        units = self.scorer.parse(list(sentences))
        probabilities = self.calibration.probabilities(self.scorer.score(units)[:, rows])
        share = _mixture_shares(probabilities, membership)
        posterior = _mixture_posteriors(probabilities, membership, share)
        decisive = float(np.mean(posterior.max(axis=1) >= DECISIVE_POSTERIOR)) if len(posterior) else 0.0
        return {o: float(x) for o, x in zip(organs, share)}, decisive

    def _organ_model(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """``(rows, organs, membership)``: the callable types, the organs they are recorded in, and each
        type's share of each of its organs (``1 / number of its organs``; none for a type without one).

        The organs of :data:`BLOOD_ORGANS` are one component, named :data:`BLOOD_COMPONENT`, as the
        context treats them: PanglaoDB records most hematopoietic types under both, and as two
        components they split each blood cell's evidence in half while an organ recorded alone (the
        brain) keeps all of its own, so that the mixture tipped to the brain on evidence that favoured
        neither (random halves of Buenrostro 2018's peaks: brain 0.30-0.67 of the progenitors, now
        0.01)."""
        rows = np.flatnonzero(self.scorer.callable_types())
        organs, membership = self._membership(rows, lambda organ: BLOOD_COMPONENT if organ in BLOOD_ORGANS else organ)
        return rows, organs, membership

    def _membership(self, rows: np.ndarray, component_of: Callable[[str], str]) -> tuple[list[str], np.ndarray]:
        """``(components, membership)``: the components (``component_of`` of the organs) the types
        ``rows`` are recorded in, sorted, and each type's share of each of its components (``1 / number of
        its components``; none for a type without an organ)."""
        parts = [{component_of(o) for o in self.knowledge.tissues[r]} for r in rows]
        names = sorted(set().union(*parts))
        index = {n: j for j, n in enumerate(names)}
        membership = np.zeros((len(rows), len(names)))
        for i, mine in enumerate(parts):
            for part in mine:
                membership[i, index[part]] = 1.0 / len(mine)
        return names, membership

    def _untagged_types(self) -> np.ndarray:
        """Mask of the knowledge's types without a recorded organ (allowed in every context)."""
        return np.asarray([not ts for ts in self.knowledge.tissues], dtype=bool)

    def observability(self) -> dict[str, Any]:
        """What of the knowledge the current assay can show (see :meth:`use_assay`)."""
        scorer = self.scorer
        allowed = self._allowed & (scorer.full_weight > 0)
        callable_ = allowed & scorer.callable_types()
        full = float(scorer.full_weight[allowed].sum())
        hidden = np.flatnonzero(allowed & ~callable_)
        hidden = hidden[np.argsort(-scorer.full_weight[hidden], kind="stable")]
        return {
            "modality": "" if self.assay is None else str(self.assay.modality),
            "n_measured_genes": None if scorer.n_measured is None else int(scorer.n_measured),
            "n_knowledge_genes_measured": int(
                len(scorer.vocabulary) if scorer.measured is None else scorer.measured.sum()
            ),
            "n_knowledge_genes": int(len(scorer.vocabulary)),
            "marker_weight_observable": round(float(scorer.observable_weight[allowed].sum()) / full, 4)
            if full else 0.0,
            "n_cell_types": int(allowed.sum()),
            "n_cell_types_callable": int(callable_.sum()),
            "min_observable_markers": MIN_OBSERVABLE_MARKERS,
            "not_callable": [str(scorer.cell_types[t]) for t in hidden[:20]],
            "not_nameable": [str(scorer.cell_types[t]) for t in np.flatnonzero(callable_ & ~self._nameable)],
            **({} if self._prior is None else {"prior": self._prior_report(callable_)}),
            **({} if self._stem_prior is None else {"priming": {
                "stem_prior": round(self._stem_prior, 3), "applies": self._priming_applies(),
                "ratio": PRIMED_RATIO,
                # committed progenitors answered only through priming: their own markers too unmeasured
                "inferred_only": self._inferred_only()}}),
        }

    def _priming_applies(self) -> bool:
        """Whether mature hematopoietic calls may become committed progenitors (see "Lineage priming"):
        chromatin data whose peak set shows an open stem program (the stem types' prior above 0)."""
        return self._stem_prior is not None and self._stem_prior > 0

    def _primed_targets(self, rows: np.ndarray) -> np.ndarray:
        """Boolean mask over the knowledge's types: the committed progenitors that lineage priming may
        make of the answerable types ``rows`` (:data:`COMMITTED_PROGENITORS` of their lineages), when
        priming applies and a stem type is among them. Open-vocabulary options include these even where
        the data cannot show the progenitor's own markers: a primed call rests on the mature lineage's
        and the stem program's measured markers, not on the progenitor's (in a peak set those often
        have no peak: DNTT, VPREB1, MME for the lymphoid progenitor)."""
        out = np.zeros(len(self.scorer.cell_types), dtype=bool)
        cl_ids, onto = self.scorer.cl_ids, self._ontology
        terms = [str(cl_ids[r]) for r in rows if cl_ids[r] and cl_ids[r] in onto]
        if not self._priming_applies() or not set(terms) & set(STEM_PROGRAM_TYPES):
            return out
        targets = {self._committed_progenitor(t) for t in terms}
        return np.isin(cl_ids, sorted(t for t in targets if t))

    def _committed_progenitor(self, term: str) -> str | None:
        """The committed progenitor (Cell Ontology id) a call of ``term`` becomes when primed: that of
        its lineage (:data:`COMMITTED_PROGENITORS`); ``None`` for other lineages and for a progenitor
        already (a :data:`HEMATOPOIETIC_PRECURSOR`)."""
        onto = self._ontology
        return None if onto.is_a(term, HEMATOPOIETIC_PRECURSOR) else COMMITTED_PROGENITORS.get(onto.lineage(term))

    def _inferred_only(self) -> list[str]:
        """The committed progenitors that primed calls may name but the data cannot call on their own
        markers (fewer than ``MIN_OBSERVABLE_MARKERS`` measured), when priming applies."""
        if not self._priming_applies():
            return []
        progenitors = np.isin(self.scorer.cl_ids, sorted(set(COMMITTED_PROGENITORS.values())))
        return sorted(str(t) for t in self.scorer.cell_types[progenitors & ~self.scorer.callable_types()])

    def _priming_map(self, options: _Options) -> tuple[np.ndarray, np.ndarray]:
        """``(progenitor, stem)`` for ``options``: per option, the option of its lineage's committed
        progenitor (:data:`COMMITTED_PROGENITORS`; -1 for none, when that progenitor is not an option,
        or when the option is a progenitor already, a :data:`HEMATOPOIETIC_PRECURSOR`), and the options
        of the stem program (:data:`STEM_PROGRAM_TYPES`). Computed once."""
        if options.priming is None:
            cl_ids, onto = self.scorer.cl_ids, self._ontology
            terms = [str(cl_ids[r]) if r >= 0 and cl_ids[r] and cl_ids[r] in onto else "" for r in options.rows]
            index = {t: j for j, t in enumerate(terms) if t}
            progenitor = np.full(len(options), -1, dtype=np.int64)
            for j, term in enumerate(terms):
                target = self._committed_progenitor(term) if term else None
                if target in index and index[target] != j:
                    progenitor[j] = index[target]
            stem = np.asarray(sorted(index[t] for t in STEM_PROGRAM_TYPES if t in index), dtype=np.int64)
            options.priming = (progenitor, stem)
        return options.priming

    def _primed(self, scores: np.ndarray, best: np.ndarray, options: _Options) -> np.ndarray:
        """Per unit, the stem option that makes its mature call a primed progenitor, or -1 (see
        "Lineage priming"): the call has a committed progenitor among the options and the best stem
        option's score is within ``T log PRIMED_RATIO`` of the call's (T: the calibrated temperature)
        and above 0 (above chance, with the prior)."""
        out = np.full(len(best), -1, dtype=np.int64)
        if not self._priming_applies():
            return out
        progenitor, stem = self._priming_map(options)
        if stem.size == 0:
            return out
        units = np.flatnonzero(progenitor[best] >= 0)
        if units.size == 0:
            return out
        stem_best = stem[np.argmax(scores[np.ix_(units, stem)], axis=1)]
        gap = scores[units, best[units]] - scores[units, stem_best]
        # The stem program must also rank above chance (with the prior): a sparse cell whose scores are
        # all near zero is not called a progenitor on the gap alone.
        within = gap <= self.calibration.temperature * math.log(PRIMED_RATIO)
        close = within & (scores[units, stem_best] > 0)
        out[units[close]] = stem_best[close]
        return out

    def _prior_report(self, callable_: np.ndarray) -> dict[str, Any]:
        """The composition prior of the callable types: the strongest each way, and its spread."""
        rows = np.flatnonzero(callable_)
        order = rows[np.argsort(-self._prior[rows], kind="stable")]
        named = lambda sel: {str(self.scorer.cell_types[r]): round(float(self._prior[r]), 3) for r in sel}  # noqa: E731
        return {"source": "peak coverage of the assay (log found / expected peaks of each type's markers)",
                "pseudocount": PRIOR_PSEUDOCOUNT, "highest": named(order[:PRIOR_REPORTED]),
                "lowest": named(order[::-1][:PRIOR_REPORTED]),
                "sd": round(float(np.std(self._prior[rows])), 3) if len(rows) else 0.0}

    def _prior_scores(self, options: _Options) -> np.ndarray | None:
        """The composition prior in score units per option (calibrated temperature x prior; 0 for
        candidates the knowledge cannot place), or ``None`` without one."""
        if self._prior is None:
            return None
        rows = options.rows
        return np.where(rows >= 0, self._prior[np.maximum(rows, 0)], 0.0) * self.calibration.temperature

    def count_tokens(self, text: str) -> int | None:
        """The model has no tokenizer: ``None`` (prompt strategies then estimate)."""
        return None

    def info(self) -> dict[str, Any]:
        """What identifies this model in the run parameters."""
        return {
            "backend": NAME,
            "knowledge": self.knowledge.version,
            "n_cell_types": int(len(self.scorer.cell_types)),
            "tissue": self.tissue or "",
            "extra_tables": self.n_tables,
            "scoring": SCORING_VERSION,
            "calibration": self.calibration.version,
        }

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        settings: Mapping[str, Any] | None = None,
        progress: Callable[[int], Any] | None = None,
        **_: Any,
    ) -> list[Generation]:
        """One :class:`Generation` per prompt, in order (see the module docstring).

        ``settings`` (sampling parameters) do not apply to this deterministic model and are ignored.
        Prompts are answered in chunks of about :data:`CHUNK_UNITS` units; a chunk that fails yields
        generations with ``error`` set instead of raising.
        """
        if settings:
            log.debug("markers model ignores generation settings %s", sorted(settings))
        out: list[Generation | None] = [None] * len(prompts)
        for chunk in _chunks(prompts, CHUNK_UNITS):
            try:
                for i, generation in self._answer(prompts, chunk).items():
                    out[i] = generation
            except Exception as exc:  # one bad chunk never stops the run (LoadedModel contract)
                log.exception("markers model failed on %d prompts", len(chunk))
                for i in chunk:
                    out[i] = Generation(text="", error=f"{type(exc).__name__}: {exc}")
            if progress is not None:
                progress(len(chunk))
        return [g if g is not None else Generation(text="", error="not answered") for g in out]

    def score_sentences(
        self, sentences: Sequence[str], candidates: Sequence[str] | None = None
    ) -> pd.DataFrame:
        """The scores a zero-shot answer is chosen from, as a DataFrame (one row per sentence, one
        column per cell type of the tissue, or per candidate; candidates the knowledge cannot place
        get their elimination score). Apply :meth:`Calibration.probabilities` for probabilities."""
        options = self._options(list(candidates) if candidates else None, self._context_of(""))
        units = self.scorer.parse(list(sentences))
        scores, _ = self._with_prior(options.scores(self.scorer.score(units)), options, open_vocabulary=not candidates)
        shown = ~options.inferred  # the progenitors only lineage priming answers have no score of their own
        return pd.DataFrame(scores[:, shown], columns=np.asarray(options.names, dtype=object)[shown])

    def decide(
        self, sentences: Sequence[str], candidates: Sequence[str] | None = None, *,
        temperature: float | None = None,
    ) -> pd.DataFrame:
        """The zero-shot decision for each sentence, without writing an answer: ``label`` (the
        best-scoring type or candidate) and ``p`` (the probability of it and its subtypes, which the
        calibrated confidence is computed from; see "Confidence"). ``temperature`` replaces the
        calibrated one (for fitting the calibration). Where no cell type can be called (none has
        :data:`MIN_OBSERVABLE_MARKERS` measured markers), every ``label`` is ``None`` and ``p`` NaN."""
        options = self._options(list(candidates) if candidates else None, self._context_of(""))
        if len(options) == 0:
            return pd.DataFrame({"label": np.full(len(sentences), None, dtype=object), "p": np.nan})
        units = self.scorer.parse(list(sentences))
        scores, _ = self._with_prior(options.scores(self.scorer.score(units)), options, open_vocabulary=not candidates)
        best, mass, _ = self._decide(scores, options, temperature)
        return pd.DataFrame({"label": np.asarray(options.names, dtype=object)[best], "p": mass})

    def _with_prior(
        self, scores: np.ndarray, options: _Options, *, open_vocabulary: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``(scores plus the composition prior, the prior per option)`` (see "Composition prior");
        ``(scores, None)`` without one, or when the answers are a given label set (candidates, a
        reference's labels)."""
        prior = self._prior_scores(options) if open_vocabulary else None
        return (scores if prior is None else scores + prior[None, :]), prior

    def _decide(
        self, scores: np.ndarray, options: _Options, temperature: float | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(best, p, probabilities)``: the best option per unit, the probability of it and its
        subtypes among the options (see "Confidence"), and every option's probability."""
        probabilities = (
            self.calibration.probabilities(scores) if temperature is None else softmax(scores, temperature)
        )
        best = np.argmax(scores, axis=1)
        subtree = options.subtree(self.scorer.cl_ids, self._ontology)
        mass = np.asarray(subtree[best].multiply(probabilities).sum(axis=1)).ravel()
        return best, mass, probabilities

    # ---------------------------------------------------------------- dispatch

    def _answer(self, prompts: Sequence[Prompt], chunk: Sequence[int]) -> dict[int, Generation]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        contexts: dict[str, _Context] = {}
        routed, scored = self._route(prompts, chunk)
        for i in chunk:
            p = prompts[i]
            context = routed.get(i) or self._context_of(p.tissue)
            contexts[context.key] = context
            if p.answer.tagged:
                groups[("puzzle", context.key)].append(i)
            elif p.examples:
                # Examples are identified by cell, label and sentence length (cut sentences differ).
                key = tuple((e.cell_id, e.label, len(e.sentence)) for e in p.examples)
                groups[("k-shot", context.key, p.candidates, key)].append(i)
            else:
                groups[("zero-shot", context.key, p.candidates)].append(i)
        answers: dict[int, Generation] = {}
        for key, members in groups.items():
            group = [prompts[i] for i in members]
            context = contexts[key[1]]
            if key[0] == "puzzle":
                generations = self._puzzles(group, context)
            elif key[0] == "k-shot":
                generations = self._single(group, context, examples=group[0].examples)
            else:
                generations = self._single(group, context, scored=_gather_scored(scored, members))
            answers.update(zip(members, generations, strict=True))
        return answers

    # ---------------------------------------------------------------- options

    def _explained(self, rows: np.ndarray) -> np.ndarray:
        """Boolean mask of the types that the knowledge rows ``rows`` explain: the rows themselves and
        the types that are their Cell Ontology ancestors or descendants."""
        explained = np.zeros(len(self.scorer.cell_types), dtype=bool)
        placed = sorted({int(r) for r in rows if r >= 0})
        explained[placed] = True
        ids = [self.scorer.cl_ids[r] for r in placed if self.scorer.cl_ids[r]]
        if ids:
            for t, cl in enumerate(self.scorer.cl_ids):
                if cl and not explained[t]:
                    explained[t] = any(
                        self._ontology.is_a(cl, other) or self._ontology.is_a(other, cl) for other in ids
                    )
        return explained

    def _options(self, labels: Sequence[str] | None, context: _Context | None = None) -> _Options:
        context = context if context is not None else self._context_of("")
        key = (tuple(labels or ()), context.key)
        if key not in self._options_cache:
            self._options_cache[key] = self._build_options(key[0], context.allowed(len(self.scorer.cell_types)))
        return self._options_cache[key]

    def _build_options(self, labels: Sequence[str], allowed: np.ndarray) -> _Options:
        callable_ = self.scorer.callable_types()
        if not labels:
            answerable = allowed & callable_ & self._nameable
            inferred = self._primed_targets(np.flatnonzero(answerable)) & self._nameable & ~callable_
            rows = np.flatnonzero(answerable | inferred)
            return _Options(self.scorer.cell_types[rows], rows, np.zeros(len(allowed), dtype=bool),
                            inferred=inferred[rows])
        rows = self.scorer.locate(labels)
        # A candidate whose type the data cannot show is scored by elimination, like an unknown one.
        rows = np.where((rows >= 0) & callable_[np.maximum(rows, 0)], rows, -1)
        other = allowed & callable_ & ~self._explained(rows)
        names = self.scorer.cell_types
        display = [
            label if r < 0 or names[r] == label else f"{label} [as {names[r]}]" for label, r in zip(labels, rows)
        ]
        return _Options(labels, rows, other, display=display)

    # ---------------------------------------------------------------- zero-shot and k-shot

    def _single(
        self, prompts: Sequence[Prompt], context: _Context, examples: Sequence[Any] = (),
        scored: tuple[ParsedUnits, np.ndarray] | None = None,
    ) -> list[Generation]:
        """Answers for CellReasoner-style prompts sharing candidates (and examples, for k-shot);
        ``scored``: the prompts' parsed units and type scores when already computed (one sentence each)."""
        labels = list(prompts[0].candidates)
        signatures: Signatures | None = None
        if examples:
            if not labels:
                labels = sorted({str(e.label) for e in examples})
            signatures = label_signatures(self.scorer, examples, labels)
        options = self._options(labels, context)
        if len(options) == 0:
            reason = (
                f"too little information for a call: no cell type of the knowledge has "
                f"{MIN_OBSERVABLE_MARKERS} markers among the genes these data measure"
            )
            return [_abstention(p, reason) for p in prompts]
        if scored is not None and signatures is None:
            units, type_scores = scored
            first_units = units
        else:
            counts = np.asarray([max(len(p.sentences), 1) for p in prompts])
            sentences = [s for p in prompts for s in (p.sentences or ("",))]
            units = self.scorer.parse(sentences, signatures.vocabulary if signatures else None)
            type_scores = _average_by_prompt(self.scorer.score(units), counts)
            first = np.concatenate([[0], np.cumsum(counts)[:-1]])
            first_units = _take_units(units, first)
        signature_scores = None
        if signatures is not None:
            empty = sp.csr_matrix((len(labels), len(units.vocabulary)))
            raw = self.scorer.score(units, positive=signatures.positive, negative=empty, norms=signatures.norms)
            signature_scores = _average_by_prompt(raw, counts)
            scores = _combine(options, type_scores, signature_scores, signatures.n_examples)
        else:
            scores = options.scores(type_scores)
        evidence_scores = scores
        scores, prior = self._with_prior(scores, options, open_vocabulary=not labels)
        best, mass, probabilities = self._decide(scores, options)
        compared = _top_columns(scores, COMPARED)
        evidence = self.scorer.evidence(first_units, np.where(compared >= 0, options.rows[compared], -1))
        sig_evidence = None
        if signatures is not None:
            sig_rows = np.where(signatures.n_examples[compared] > 0, compared, -1)
            sig_evidence = self.scorer.evidence(
                first_units,
                sig_rows,
                positive=signatures.positive,
                negative=sp.csr_matrix((len(labels), len(units.vocabulary))),
            )
        # Primed progenitors (see "Lineage priming"): the call changes after the evidence of the mature
        # call has been judged (a progenitor's own markers are often unmeasured in a peak set).
        primed = self._primed(scores, best, options) if not labels and signatures is None else None
        called, shown = best, probabilities
        if primed is not None and (primed >= 0).any():
            called, mass, shown = self._primed_calls(best, primed, mass, probabilities, options)
        confidence = self.calibration.confidence(mass)
        label_scores = _label_scores(options.names, shown, bool(labels))
        doubts = self._doubts(options, best, evidence_scores, evidence, knowledge_only=signatures is None)
        organ_notes = self._organ_notes(options, context)
        out = []
        # Plain Python numbers for the per-unit loop (NumPy scalars are slow to index and format there).
        compared_l, best_l, called_l = compared.tolist(), best.tolist(), called.tolist()
        primed_l = None if primed is None else primed.tolist()
        compared_scores = np.take_along_axis(scores, compared, axis=1).tolist()
        rows_l, confidence_l = options.rows.tolist(), confidence.tolist()
        n_genes_l, n_skipped_l = first_units.n_genes.tolist(), first_units.n_skipped.tolist()
        prior_l = None if prior is None else prior.tolist()
        for i, prompt in enumerate(prompts):
            lines = [text.header_line(int(n_genes_l[i]), int(n_skipped_l[i]))]
            shown_options = []
            for j, (option, score) in enumerate(zip(compared_l[i], compared_scores[i])):
                if options.inferred[option]:  # -inf: fewer answerable options than compared
                    continue
                shown_options.append((options.display[option], score))
                extra, found = [], evidence[i][j]
                if prior_l is not None and rows_l[option] >= 0:
                    extra.append(f"{prior_l[option]:+.2f} from the peak set's composition prior")
                if signatures is not None and signatures.n_examples[option] > 0:
                    extra.append(_signature_clause(sig_evidence[i][j], int(signatures.n_examples[option])))
                    if found is not None:  # both sources: say which evidence is the knowledge's
                        extra.append("its known markers: " + "; ".join(text.evidence_clauses(found)))
                        found = None
                if rows_l[option] < 0:
                    extra.append(self._elimination_clause(type_scores[i], options))
                lines.append(text.type_line(options.display[option], score, found, extra=extra))
            lines.append(text.conclusion_line(shown_options))
            b = called_l[i]
            label = options.names[b]
            inside = opens_think(prompt.response_prefix)
            abstain, note = doubts[i]
            if abstain:
                lines.append(f"{note[0].upper()}{note[1:]}.")
                label = ABSTENTION
            elif b != best_l[i]:
                clause = text.priming_clause(
                    options.display[best_l[i]], options.display[primed_l[i]], options.display[b],
                    scores[i, best_l[i]] - scores[i, primed_l[i]], PRIMED_RATIO,
                    unmeasured=bool(options.inferred[b]),
                )
                lines.append(f"{clause[0].upper()}{clause[1:]}.")
                note = "; ".join(x for x in (clause, note) if x)
            if not abstain and organ_notes[b]:
                lines.append(f"Note: {organ_notes[b]}.")
                note = "; ".join(x for x in (note, organ_notes[b]) if x)
            n = len(prompt.unit_ids)
            out.append(
                Generation(
                    text=text.cellreasoner_text("\n".join(lines), label, inside_think=inside),
                    confidence=(confidence_l[i],) * n,
                    label_scores=(label_scores[i],) * n,
                    notes=(note,) * n if note else None,
                )
            )
        return out

    def _primed_calls(
        self, best: np.ndarray, primed: np.ndarray, mass: np.ndarray, probabilities: np.ndarray,
        options: _Options,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(calls, p, probabilities)`` once primed units take their committed progenitor: such a
        unit's ``p`` is that of the mature call and the progenitor, with their subtypes (the stem option,
        which made the call, is not counted for it: a primed cell is not more certain than a mature
        one), and in the per-option probabilities it reports (``label_scores``, which a ``groupby``
        vote pools) the mature call's probability goes to the progenitor, so they name its answer."""
        progenitor, _ = self._priming_map(options)
        units = np.flatnonzero(primed >= 0)
        called = best.copy()
        called[units] = progenitor[best[units]]
        subtree = options.subtree(self.scorer.cl_ids, self._ontology)
        path = (subtree[best[units]] + subtree[called[units]]).toarray() > 0
        mass = mass.copy()
        mass[units] = (probabilities[units] * path).sum(axis=1)
        shown = probabilities.copy()
        shown[units, called[units]] += shown[units, best[units]]
        shown[units, best[units]] = 0.0
        return called, mass, shown

    def _organ_notes(self, options: _Options, context: _Context) -> list[str]:
        """Per option, the note its answer gets when its type belongs to an organ outside the context
        (:meth:`_Context.organ_note`; types of organs resident everywhere, and options without a type,
        get none). Computed once per options."""
        if options.organ_notes is None:
            allowed = context.allowed(len(self.scorer.cell_types))
            notes = []
            for name, row in zip(options.names, options.rows.tolist()):
                organs = self.knowledge.tissues[row] if row >= 0 else frozenset()
                site = SITE_SPECIFIC_TYPES.get(str(self.scorer.cell_types[row])) if row >= 0 else None
                if site:
                    organs = frozenset(site)
                elif organs & _RESIDENT:
                    organs = frozenset()
                notes.append(context.organ_note(name, organs, bool(allowed[row])) if organs else "")
            options.organ_notes = notes
        return options.organ_notes

    def _doubts(
        self, options: _Options, best: np.ndarray, scores: np.ndarray, evidence: Sequence[Sequence[Any]],
        *, knowledge_only: bool,
    ) -> list[tuple[bool, str]]:
        """Per unit, whether to abstain and the note on what the data could show of the answer.

        A knowledge-only answer (no k-shot examples) is withheld when its type's measured markers do
        not rank above chance (score <= 0) or fewer than :data:`MIN_SUPPORT` of them are among the
        cell's genes: too little information, not a guess. When the run's data measure less than
        :data:`OBSERVED_NOTE_BELOW` of a type's marker weight, the note says how much they show.
        """
        scorer, base = self.scorer, self._base_scorer
        out = []
        for i, b in enumerate(best.tolist()):
            row = int(options.rows[b])
            if row < 0:
                out.append((False, ""))
                continue
            found = evidence[i][0]
            support = len(found.found) if found is not None else 0
            parts = []
            shown = scorer.observable_weight[row] / max(scorer.full_weight[row], 1e-12)
            if scorer.measured is not None and shown < OBSERVED_NOTE_BELOW:
                parts.append(
                    f"{int(scorer.n_observable[row])} of the {int(base.n_observable[row])} markers of "
                    f"{options.names[b]} are measured in these data ({shown:.0%} of their weight)"
                )
            weak = knowledge_only and (scores[i, b] <= 0 or support < MIN_SUPPORT)
            if weak:
                why = (
                    f"the best cell type, {options.names[b]}, has {support} marker"
                    f"{'' if support == 1 else 's'} among the genes"
                    + (" and ranks no higher than chance" if scores[i, b] <= 0 else "")
                )
                parts.insert(0, f"too little information for a call: {why}")
            out.append((weak, "; ".join(parts)))
        return out

    def _elimination_clause(self, type_scores: np.ndarray, options: _Options) -> str:
        if not options.other.any():
            return "no marker knowledge, and every cell type of the knowledge is another candidate's"
        other = np.flatnonzero(options.other)
        best = other[int(np.argmax(type_scores[other]))]
        return (
            "no marker knowledge for it: scored by elimination, from the best cell type no other "
            f"candidate explains ({text.safe(self.scorer.cell_types[best])}, {type_scores[best]:.2f}) "
            f"minus {ELIMINATION_MARGIN}"
        )

    # ---------------------------------------------------------------- puzzles

    def _puzzles(self, prompts: Sequence[Prompt], context: _Context) -> list[Generation]:
        """Answers for CellPuzzles prompts: all their cells are scored at once, each puzzle solved
        jointly."""
        from scipy.optimize import linear_sum_assignment

        counts = np.asarray([len(p.sentences) for p in prompts])
        units = self.scorer.parse([s for p in prompts for s in p.sentences])
        type_scores = self.scorer.score(units)
        starts = np.concatenate([[0], np.cumsum(counts)])
        plans = []
        evidence_rows = np.full((len(units), 1), -1, dtype=np.int64)
        for k, prompt in enumerate(prompts):
            labels = tuple(prompt.candidates)
            if not labels or counts[k] == 0:
                plans.append(None)
                continue
            options = self._options(labels, context)
            cells = slice(starts[k], starts[k + 1])
            scores = options.scores(type_scores[cells])
            log_p = np.log(np.maximum(self.calibration.probabilities(scores), 1e-300))
            repeats = math.ceil(counts[k] / len(options))
            _, columns = linear_sum_assignment(-np.tile(log_p, (1, repeats)))
            assigned = columns % len(options)
            best = np.argmax(scores, axis=1)
            evidence_rows[cells, 0] = options.rows[assigned]
            plans.append((options, scores, log_p, assigned, best, repeats))
        evidence = self.scorer.evidence(units, evidence_rows)
        out = []
        for k, (prompt, plan) in enumerate(zip(prompts, plans)):
            if plan is None:
                error = "a puzzle prompt needs candidates and at least one cell"
                out.append(Generation(text="", error=error))
                continue
            options, scores, log_p, assigned, best, repeats = plan
            base = int(starts[k])
            lines = [
                self._puzzle_cell_line(
                    c, options, scores[c], assigned, best, evidence[base + c], type_scores[base + c]
                )
                for c in range(counts[k])
            ]
            lines.append(_assignment_note(int(counts[k]), len(options), repeats))
            probabilities = np.exp(log_p[np.arange(counts[k]), assigned])
            confidence = self.calibration.confidence(probabilities)
            out.append(
                Generation(
                    text=text.puzzle_text("\n".join(lines), [options.names[a] for a in assigned]),
                    confidence=tuple(float(c) for c in confidence),
                    label_scores=tuple(_label_scores(options.names, np.exp(log_p), True)),
                )
            )
        return out

    def _puzzle_cell_line(
        self,
        c: int,
        options: _Options,
        scores: np.ndarray,
        assigned: np.ndarray,
        best: np.ndarray,
        evidence: Sequence[Any],
        type_scores: np.ndarray,
    ) -> str:
        a, b = int(assigned[c]), int(best[c])
        name = options.display[a]
        found = evidence[0]
        if options.rows[a] < 0:
            why = self._elimination_clause(type_scores, options)
        elif found is not None:
            why = "; ".join(text.evidence_clauses(found))
        else:
            why = "nothing in its genes speaks for or against it"
        line = f"Cell {c + 1} ({name}, score {scores[a]:.2f}): {why}."
        if a != b:
            holders = np.flatnonzero(assigned == b)
            holder = f"cell {int(holders[0]) + 1} fits it better" if len(holders) else "it is taken"
            line += (
                f" On its own it fits {options.display[b]} best ({scores[b]:.2f}), but {holder}, so "
                f"jointly it is {name}."
            )
        return line


# ------------------------------------------------------------------------------------------ helpers


def _abstention(prompt: Prompt, reason: str) -> Generation:
    """An answer that withholds the call, with the reason as the units' note."""
    inside = opens_think(prompt.response_prefix)
    return Generation(
        text=text.cellreasoner_text(f"{reason[0].upper()}{reason[1:]}.", ABSTENTION, inside_think=inside),
        notes=(reason,) * len(prompt.unit_ids),
    )


def _top_columns(values: np.ndarray, k: int) -> np.ndarray:
    """Per row, the columns of the ``k`` largest values, largest first (ties: lower column first)."""
    k = min(k, values.shape[1])
    if k < values.shape[1]:
        part = np.argpartition(-values, k - 1, axis=1)[:, :k]
        part.sort(axis=1)  # column order, so the stable sort below breaks ties by column
    else:
        part = np.broadcast_to(np.arange(values.shape[1]), values.shape).copy()
    order = np.argsort(-np.take_along_axis(values, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def _chunks(prompts: Sequence[Prompt], size: int) -> Iterable[list[int]]:
    """Consecutive prompt indices holding about ``size`` units each."""
    chunk: list[int] = []
    units = 0
    for i, prompt in enumerate(prompts):
        chunk.append(i)
        units += max(len(prompt.unit_ids), 1)
        if units >= size:
            yield chunk
            chunk, units = [], 0
    if chunk:
        yield chunk


def _average_by_prompt(scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Rows of ``scores`` averaged over each prompt's consecutive units (identity for one unit each)."""
    if np.all(counts == 1):
        return scores
    owner = np.repeat(np.arange(len(counts)), counts)
    summed = np.zeros((len(counts), scores.shape[1]))
    np.add.at(summed, owner, scores)
    return summed / counts[:, None]


def _gather_scored(scored: Mapping[int, Any], members: Sequence[int]) -> tuple[ParsedUnits, np.ndarray] | None:
    """The parsed units and type scores of ``members`` from :meth:`MarkersModel._route`'s batch, or
    ``None`` unless every member has them from one batch."""
    found = [scored.get(i) for i in members]
    if not found or any(f is None for f in found) or any(f[0] is not found[0][0] for f in found):
        return None
    rows = np.asarray([f[2] for f in found], dtype=np.int64)
    return _take_units(found[0][0], rows), found[0][1][rows]


def _take_units(units: ParsedUnits, rows: np.ndarray) -> ParsedUnits:
    """The units ``rows`` of a parsed batch."""
    if len(rows) == len(units) and np.array_equal(rows, np.arange(len(units))):
        return units
    return ParsedUnits(
        units.weights[rows],
        units.positions[rows],
        units.n_genes[rows],
        units.n_skipped[rows],
        units.vocabulary,
    )


def _combine(
    options: _Options, type_scores: np.ndarray, signature_scores: np.ndarray, n_examples: np.ndarray
) -> np.ndarray:
    """k-shot option scores: the mean of the knowledge and signature scores where a label has both,
    whichever exists otherwise, elimination where it has neither."""
    knowledge = options.scores(type_scores)
    has_signature = n_examples > 0
    known = options.rows >= 0
    both = has_signature & known
    out = knowledge.copy()
    out[:, both] = (knowledge[:, both] + signature_scores[:, both]) / 2
    only = has_signature & ~known
    out[:, only] = signature_scores[:, only]
    return out


def _signature_clause(evidence: Any, n_examples: int) -> str:
    examples = f"its {n_examples} reference example{'s' if n_examples != 1 else ''}"
    if evidence is None or not evidence.found:
        return f"none of the genes typical of {examples} is among the genes"
    verb = "supports" if len(evidence.found) == 1 else "support"
    return f"{text.markers_at(evidence.found)}, typical of {examples}, {verb} it"


def _label_scores(
    names: Sequence[str], probabilities: np.ndarray, all_options: bool
) -> list[dict[str, float]]:
    """Per row of ``probabilities``, ``{label: probability}`` of the best options (rounded to 4
    decimals), best first."""
    order = _top_columns(probabilities, MAX_CANDIDATE_SCORES if all_options else LABEL_SCORES)
    values = np.round(np.take_along_axis(probabilities, order, axis=1), 4).tolist()
    labels = np.asarray([str(n) for n in names], dtype=object)[order].tolist()
    return [dict(zip(ls, vs)) for ls, vs in zip(labels, values)]


def _assignment_note(n_cells: int, n_candidates: int, repeats: int) -> str:
    if n_cells == n_candidates:
        rule = "every candidate used exactly once"
    elif n_cells < n_candidates:
        rule = "every cell given a different candidate"
    else:
        rule = f"each candidate used at most {repeats} times, as there are more cells than candidates"
    return (
        f"The {n_cells} cells and {n_candidates} candidates were matched jointly ({rule}), maximising "
        "the summed log-probability of the assignment."
    )
