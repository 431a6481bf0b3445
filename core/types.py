"""Value types that flow between the pipeline's steps (and between plugins).

Every type here is an immutable ``attrs`` value except the registry entries, which describe a
plugin-provided component. Plugins exchange these objects and nothing else, so a modality written by a
third party and a prompt strategy written by another cooperate without importing each other.

Flow of one run::

    reader        path -> AnnData | MuData
    modality      AnnData -> FeatureMatrix               (cells x genes with gene symbols)
    sentence      FeatureMatrix -> CellSentences         (ranked gene lists)
    prompt        CellSentences -> [Prompt]              (chat messages + structured fields)
    backend       [Prompt] -> [Generation]               (raw model text)
    decoder       Generation + Prompt -> [Annotation]    (one per unit of the prompt)
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import attrs
import numpy as np

from .answers import FREE, AnswerFormat

__all__ = [
    "FeatureMatrix",
    "Assay",
    "CellSentences",
    "Example",
    "Prompt",
    "Generation",
    "Annotation",
    "ModelUnavailableError",
    "sentence_genes",
    "STATUS_OK",
    "STATUS_UNRESOLVED",
    "FINISH_STOP",
    "FINISH_LENGTH",
    "warn_capped",
]

STATUS_OK = "ok"
STATUS_UNRESOLVED = "unresolved"
#: :attr:`Generation.finish_reason` values: the output ended by itself, or hit the token limit.
FINISH_STOP = "stop"
FINISH_LENGTH = "length"


def _tuple_of_str(value: Sequence[str] | None) -> tuple[str, ...]:
    return tuple(map(str, value)) if value is not None else ()


@attrs.frozen(eq=False)
class FeatureMatrix:
    """A cells x features matrix with feature symbols, produced by a modality.

    The matrix may be a SciPy sparse matrix, a dense array or a backed (on-disk) sparse dataset; it is
    only ever read in row chunks through :meth:`iter_chunks`, so a million-cell file never has to fit in
    memory.

    Attributes
    ----------
    X
        The source matrix (cells x source columns).
    feature_names
        One symbol per *output* column (unique).
    cell_ids
        One identifier per row (``obs_names``).
    column_transform
        Optional sparse matrix (source columns x output columns) applied to every chunk: selects,
        reorders or sums source columns (duplicate gene symbols are summed this way). ``None`` means the
        source columns are the output columns.
    value_kind
        What the values are: ``"counts"``, ``"log"``, ``"activity"``, ... (informational).
    source
        Human-readable description of where the values came from (``"X"``, ``"layers['counts']"``,
        ``"raw.X"``), recorded in the run parameters.
    modality
        The modality that made the matrix.
    measured
        Optional boolean mask over the output columns: the features this data set can show at all. A
        peak matrix measures only the genes some peak overlaps; ``None`` (the default, as for RNA) means
        every column is measured. See :class:`Assay`.
    notes
        What the modality did differently from what was asked, and why (a smaller smoothing
        neighbourhood or another normalisation for a run of few cells); recorded in
        ``uns[key_added]["params"]["matrix_notes"]``.
    coverage
        Optional per-gene table (index: gene symbols) of how densely the assay's features cover each
        gene: ``peaks`` found in its region and ``expected`` for a region of its length. A peak set is
        called where the profiled cells are open, so it tells which genes they share before any cell is
        read (the ATAC modality's ``peak_prior``); ``None`` (the default) where the features say nothing
        of the sort (RNA, gene activity, fragments).

    Reading a chunk that holds a NaN or infinite value raises a ``ValueError`` naming the cell and gene.
    """

    X: Any
    feature_names: np.ndarray = attrs.field(converter=lambda v: np.asarray(v, dtype=object))
    cell_ids: np.ndarray = attrs.field(converter=lambda v: np.asarray(v, dtype=object))
    column_transform: Any = None
    value_kind: str = "counts"
    source: str = "X"
    modality: str = "rna"
    measured: np.ndarray | None = attrs.field(
        default=None, converter=lambda v: None if v is None else np.asarray(v, dtype=bool)
    )
    notes: tuple[str, ...] = attrs.field(converter=_tuple_of_str, factory=tuple)
    coverage: Any = None

    @property
    def measured_names(self) -> np.ndarray:
        """The symbols of the features the assay measures in this data set (all of them when
        :attr:`measured` is ``None``)."""
        return self.feature_names if self.measured is None else self.feature_names[self.measured]

    @property
    def n_cells(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def iter_chunks(self, chunk_size: int = 10_000) -> Iterator[tuple[int, int, Any]]:
        """Yield ``(start, stop, chunk)`` with ``chunk`` a CSR matrix of rows ``start:stop``.

        Only one chunk is materialised at a time; backed matrices are read with contiguous row slices.
        """
        from .domain.matrix import iter_row_chunks

        for start, stop, chunk in iter_row_chunks(self.X, chunk_size):
            if self.column_transform is not None:
                chunk = (chunk @ self.column_transform).tocsr()
            self._check_finite(start, stop, chunk)
            yield start, stop, chunk

    def _check_finite(self, start: int, stop: int, chunk: Any) -> None:
        """A ``ValueError`` naming the first NaN or infinite value of a chunk (its cell, gene and the
        matrix it was read from): such a value cannot be ranked, and an inf would top its cell's sentence."""
        bad = ~np.isfinite(chunk.data)
        if not bad.any():
            return
        k = int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(chunk.indptr, k, side="right")) - 1
        value = float(chunk.data[k])
        shown = "NaN" if np.isnan(value) else ("inf" if value > 0 else "-inf")
        matrix = str(self.source).split(":")[0].split(";")[0].strip() or "the matrix"
        more = int(bad.sum()) - 1
        raise ValueError(
            f"{matrix} holds {shown} for cell {str(self.cell_ids[start + row])!r} (row {start + row}) and gene "
            f"{str(self.feature_names[chunk.indices[k]])!r}"
            + (f", and {more} more NaN or infinite value(s) in rows {start}-{stop - 1}" if more else "")
            + ": cell sentences rank genes by value and cannot rank NaN or infinite values; replace them "
            "(e.g. numpy.nan_to_num) or choose another matrix with layer= or use_raw="
        )

    def subset_rows(self, rows: np.ndarray) -> FeatureMatrix:
        """Return a new FeatureMatrix holding only ``rows`` (an integer index), read into memory."""
        from .domain.matrix import read_rows

        return attrs.evolve(self, X=read_rows(self.X, rows), cell_ids=self.cell_ids[rows])


@attrs.frozen(eq=False)
class Assay:
    """What the measurement behind a run's cell sentences can see: its modality and the genes it measures.

    A sentence can only ever contain measured genes. A peak matrix of 5,000 peaks measures the ~5,000
    genes some peak overlaps, and a marker gene without a peak is neither present nor absent: it is not
    observed. Models that weigh genes against knowledge (the ``markers`` model) must score within this
    universe; the pipeline gives it to them before any prompt (``LoadedModel.use_assay``) and records
    :meth:`summary` in ``uns[key]["params"]["assay"]``.

    Attributes
    ----------
    modality
        The modality name (``"rna"``, ``"atac"``, ``"rna+atac"``).
    genes
        The measured gene symbols (unique, in feature order).
    value_kind
        What the sentence values are (``"counts"``, ``"activity"``).
    description
        Where the features came from (the FeatureMatrix ``source``).
    coverage
        The per-gene feature coverage of the modality that has one (:attr:`FeatureMatrix.coverage`:
        ``peaks`` and ``expected`` per gene symbol), or ``None``.
    """

    modality: str
    genes: np.ndarray = attrs.field(converter=lambda v: np.asarray(v, dtype=object))
    value_kind: str = ""
    description: str = ""
    coverage: Any = None

    @classmethod
    def from_features(cls, *features: FeatureMatrix) -> Assay:
        """The assay of one FeatureMatrix, or the union of several modalities' (``"rna+atac"``)."""
        if not features:
            raise ValueError("an assay needs at least one FeatureMatrix")
        genes = dict.fromkeys(str(g) for f in features for g in f.measured_names)
        return cls(
            modality="+".join(f.modality for f in features),
            genes=list(genes),
            value_kind="+".join(dict.fromkeys(f.value_kind for f in features)),
            description="; ".join(f.source for f in features),
            coverage=next((f.coverage for f in features if f.coverage is not None), None),
        )

    @property
    def digest(self) -> str:
        """A short hash of the modality and the measured genes (part of a checkpoint's identity)."""
        import hashlib

        h = hashlib.sha256(self.modality.encode())
        h.update("\x1f".join(self.genes.tolist()).encode())
        if self.coverage is not None:  # it can change the answers (a composition prior)
            h.update(np.ascontiguousarray(self.coverage[["peaks", "expected"]].to_numpy(np.float64)).tobytes())
        return h.hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        """A JSON-able description for the run parameters."""
        out = {"modality": self.modality, "n_measured_genes": int(len(self.genes)),
               "value_kind": self.value_kind, "digest": self.digest}
        if self.coverage is not None:
            out["coverage"] = f"peaks around {len(self.coverage)} annotated genes"
        return out


@attrs.frozen(eq=False)
class CellSentences:
    """Ranked gene lists for a set of cells ("cell sentences").

    Stored compactly as a CSR-like ragged array of indices into ``vocabulary``: the genes of cell ``i``
    are ``vocabulary[indices[indptr[i]:indptr[i + 1]]]`` in rank order (most informative first).

    Attributes
    ----------
    cell_ids
        One id per cell.
    vocabulary
        Gene symbols the indices point into.
    indptr, indices
        The ragged ranked lists.
    strategy
        Name of the sentence strategy that made them (``"ranked-hvg"``, ``"top-expressed"``, ...).
    params
        The settings the strategy used (``n_genes``, resolved strategy for ``auto``, ...).
    sections
        For several modalities of the same cells (``modality="rna+atac"``): ``((label, sentences), ...)``
        aligned with ``cell_ids``. The ranked lists above are then the union of the sections' genes, and
        :meth:`texts` renders one line per section (see :meth:`combine`).
    """

    cell_ids: np.ndarray = attrs.field(converter=lambda v: np.asarray(v, dtype=object))
    vocabulary: np.ndarray = attrs.field(converter=lambda v: np.asarray(v, dtype=object))
    indptr: np.ndarray = attrs.field(converter=lambda v: np.asarray(v, dtype=np.int64))
    indices: np.ndarray = attrs.field(converter=lambda v: np.asarray(v, dtype=np.int64))
    strategy: str = ""
    params: Mapping[str, Any] = attrs.field(factory=dict)
    sections: tuple[tuple[str, CellSentences], ...] = attrs.field(converter=tuple, factory=tuple)

    def __len__(self) -> int:
        return len(self.cell_ids)

    def texts(self, sep: str = ", ") -> list[str]:
        """Every cell's sentence as text: its genes joined with ``sep``; with :attr:`sections`, one line
        ``"{label}: {genes}"`` per section that has genes (the multi-modality sentence format)."""
        from .domain.ranking import encode_names, join_ranked

        if not self.sections:
            return join_ranked(encode_names(self.vocabulary, sep), self.indptr, self.indices, sep)
        parts = [(label, part.texts(sep)) for label, part in self.sections]
        return [
            "\n".join(f"{label}: {texts[i]}" for label, texts in parts if texts[i])
            for i in range(len(self))
        ]

    def genes(self, i: int) -> list[str]:
        """The ranked gene symbols of cell ``i``."""
        return self.vocabulary[self.indices[self.indptr[i] : self.indptr[i + 1]]].tolist()

    def sentence(self, i: int, n_genes: int | None = None, sep: str = ", ") -> str:
        """Cell ``i``'s genes joined with ``sep`` (the first ``n_genes`` when given)."""
        genes = self.genes(i)
        return sep.join(genes if n_genes is None else genes[:n_genes])

    def lengths(self) -> np.ndarray:
        """Number of genes in each cell's sentence."""
        return np.diff(self.indptr)

    def empty(self) -> np.ndarray:
        """Boolean mask of cells with an empty sentence (no expressed gene)."""
        return self.lengths() == 0

    def take(self, rows: Sequence[int] | np.ndarray) -> CellSentences:
        """A new CellSentences with the cells ``rows`` in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, stops = self.indptr[rows], self.indptr[rows + 1]
        lengths = stops - starts
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        gather = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
        return attrs.evolve(
            self,
            cell_ids=self.cell_ids[rows],
            indptr=indptr,
            indices=self.indices[gather],
            sections=tuple((label, part.take(rows)) for label, part in self.sections),
        )

    @classmethod
    def combine(cls, parts: Sequence[tuple[str, CellSentences]]) -> CellSentences:
        """Sentences of several modalities of the same cells (same ``cell_ids`` order) as one.

        Each cell's ranked list is the first part's genes, then the genes of later parts not listed yet;
        the parts themselves are kept as :attr:`sections` for rendering.
        """
        if not parts:
            raise ValueError("nothing to combine")
        ids = parts[0][1].cell_ids
        for label, part in parts[1:]:
            if len(part) != len(ids) or not np.array_equal(part.cell_ids, ids):
                raise ValueError(f"section {label!r} is not aligned with the first section's cells")
        names = [part.vocabulary[part.indices] for _, part in parts]
        genes = []
        for i in range(len(ids)):
            seen: dict[str, None] = {}
            for (_, part), flat in zip(parts, names):
                seen.update(dict.fromkeys(flat[part.indptr[i] : part.indptr[i + 1]].tolist()))
            genes.append(list(seen))
        combined = cls.from_lists(ids, genes, strategy="+".join(p.strategy for _, p in parts))
        return attrs.evolve(
            combined,
            params={label: dict(part.params) for label, part in parts},
            sections=tuple(parts),
        )

    @classmethod
    def concatenate(cls, parts: Sequence[CellSentences]) -> CellSentences:
        """Join chunks made by the same strategy over the same vocabulary, in order."""
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        offsets = np.cumsum([0] + [p.indptr[-1] for p in parts[:-1]])
        indptr = np.concatenate(
            [[0]] + [p.indptr[1:] + off for p, off in zip(parts, offsets, strict=True)]
        )
        return cls(
            cell_ids=np.concatenate([p.cell_ids for p in parts]),
            vocabulary=first.vocabulary,
            indptr=indptr,
            indices=np.concatenate([p.indices for p in parts]),
            strategy=first.strategy,
            params=first.params,
        )

    @classmethod
    def from_lists(
        cls, cell_ids: Sequence[str], genes: Sequence[Sequence[str]], strategy: str = "given", **params
    ) -> CellSentences:
        """Build from explicit gene lists (parsed prompts, tests, user-supplied sentences)."""
        vocab: dict[str, int] = {}
        indices = [vocab.setdefault(g, len(vocab)) for cell in genes for g in cell]
        indptr = np.concatenate([[0], np.cumsum([len(c) for c in genes])])
        return cls(
            cell_ids=list(cell_ids),
            vocabulary=np.array(list(vocab), dtype=object),
            indptr=indptr,
            indices=np.asarray(indices, dtype=np.int64),
            strategy=strategy,
            params=params,
        )


def sentence_genes(text: str, sep: str = ", ") -> list[str]:
    """The genes of a sentence text, also of a multi-section one (``"RNA: a, b\\nATAC: c"``).

    A line with ``": "`` is a section whose genes follow it; gene names never contain ``": "``.
    """
    genes: list[str] = []
    for line in text.split("\n"):
        body = line.split(": ", 1)[1] if ": " in line else line
        genes.extend(g for g in body.split(sep) if g)
    return genes


@attrs.frozen
class Example:
    """One labelled example cell shown to the model in a k-shot prompt."""

    cell_id: str
    sentence: str
    label: str


@attrs.frozen
class Prompt:
    """One model call: chat messages plus the structured fields they were made from.

    A prompt covers one or more *units* (cells, or clusters when annotating by ``groupby``): a zero-shot
    prompt has one, a CellPuzzles prompt has N. The decoder returns one :class:`Annotation` per unit.

    Attributes
    ----------
    messages
        Chat messages ``({"role": ..., "content": ...}, ...)`` rendered through the model's chat template.
    unit_ids
        The cells (or clusters) this prompt annotates, in answer order.
    sentences
        The cell sentence of each unit, same order.
    strategy
        Prompt strategy name (``"zero-shot"``, ``"k-shot"``, ``"puzzle"``).
    decoder
        Name of the decoder that reads this prompt's output.
    answer
        The answer format the prompt asks for (:data:`cellscribe.core.answers.FREE`, one free-text
        label after optional ``<think>`` reasoning, or :data:`~cellscribe.core.answers.TAGGED`,
        ``<think>...</think>\n<answer>a | b</answer>``); decoders read, and backends write, the output
        with it.
    candidates
        Allowed labels, if any (puzzle candidates, user candidates, k-shot reference labels).
    examples
        k-shot examples shown before the query.
    context
        Free-text context (donor, tissue) when the strategy uses it.
    tissue
        The tissue of origin of the prompt's units as the run determined it (the run's ``tissue=``, or
        a standard ``obs`` column; the general tissue's name, e.g. ``"pancreas"``), ``""`` when nothing
        states it. The prompt's text does not change with it; models that weigh knowledge answer within
        it (the ``markers`` model), and may infer one where it is empty (``LoadedModel.survey``).
    remove_from_rendered
        Strings deleted from the chat-template output before generation (CellReasoner deletes every
        ``<think>``; see FORMATS.md).
    response_prefix
        Text appended after the generation prompt (CellReasoner reasoning mode appends ``"<think> "``);
        the model's output is read as if it started with it.
    generation
        Default generation settings of this format (temperature, top_p, max_new_tokens, ...); a user's
        settings override them.
    meta
        Anything else a strategy wants to keep (mode, gold answer in benchmark mode, ...).
    """

    messages: tuple[Mapping[str, str], ...] = attrs.field(converter=tuple)
    unit_ids: tuple[str, ...] = attrs.field(converter=_tuple_of_str)
    sentences: tuple[str, ...] = attrs.field(converter=_tuple_of_str, factory=tuple)
    strategy: str = ""
    decoder: str = ""
    answer: AnswerFormat = FREE
    candidates: tuple[str, ...] = attrs.field(converter=_tuple_of_str, factory=tuple)
    examples: tuple[Example, ...] = attrs.field(converter=tuple, factory=tuple)
    context: str = ""
    tissue: str = ""
    remove_from_rendered: tuple[str, ...] = attrs.field(converter=_tuple_of_str, factory=tuple)
    response_prefix: str = ""
    generation: Mapping[str, Any] = attrs.field(factory=dict)
    meta: Mapping[str, Any] = attrs.field(factory=dict)

    def render(self, apply_chat_template: Callable[..., str]) -> str:
        """Render to model input text with ``apply_chat_template(messages, tokenize=False,
        add_generation_prompt=True)``, then apply this format's edits (removals, response prefix)."""
        text = apply_chat_template(
            [dict(m) for m in self.messages], tokenize=False, add_generation_prompt=True
        )
        for token in self.remove_from_rendered:
            text = text.replace(token, "")
        return text + self.response_prefix

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (for sidecars and ``--dry-run``)."""
        return attrs.asdict(self, recurse=True, value_serializer=_jsonable)


def _jsonable(inst: Any, field: Any, value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


@attrs.frozen
class Generation:
    """Raw output of a backend for one prompt.

    ``text`` excludes the prompt (and the ``response_prefix``). ``label_scores`` is an optional
    ``{label: probability}`` per unit that backends able to score candidates provide; ``confidence``
    one value per unit when the backend has one. ``notes`` is an optional remark per unit that decoders
    add to the unit's ``note`` (how much of the model's knowledge the data could show, why it doubts or
    abstains). ``error`` is set when the call failed (the prompt's units become ``unresolved``; the run
    goes on).

    ``finish_reason`` says why the output ended, in the OpenAI API's words: :data:`FINISH_STOP` (the
    model's end-of-sequence token or a stop string), :data:`FINISH_LENGTH` (the output hit
    ``max_new_tokens`` before it ended: :attr:`capped`), ``None`` when unknown or when nothing was
    generated (candidate scoring). Decoders mark the units of a capped output.
    """

    text: str
    confidence: tuple[float, ...] | None = None
    label_scores: tuple[Mapping[str, float], ...] | None = None
    n_prompt_tokens: int | None = None
    n_output_tokens: int | None = None
    error: str | None = None
    notes: tuple[str, ...] | None = None
    finish_reason: str | None = None

    @property
    def capped(self) -> bool:
        """Whether the output hit the token limit before it ended (``finish_reason == "length"``)."""
        return self.finish_reason == FINISH_LENGTH


def warn_capped(generations: Sequence[Generation | None]) -> None:
    """What a backend calls after generating: a ``UserWarning`` when outputs hit ``max_new_tokens``
    before they ended (logged with the count). Its text names no count, so Python shows it once per
    process however many batches a run has; each unit of a capped output says so in its note (the
    decoders)."""
    capped = sum(g is not None and g.capped for g in generations)
    if not capped:
        return
    logging.getLogger(__name__).info("%d of %d outputs hit max_new_tokens before they ended", capped,
                                     len(generations))
    warnings.warn(
        "outputs hit max_new_tokens before they ended (cut off; their cells' note says so): raise it with "
        "generation={'max_new_tokens': N} (--generation max_new_tokens=N) if answers are cut short",
        UserWarning,
        stacklevel=3,
    )


class ModelUnavailableError(RuntimeError):
    """The model cannot answer any prompt now (a server that is down or stops answering, a refused API
    key, an unknown model name): raised by ``LoadedModel.generate`` to stop the run instead of failing
    every remaining prompt one by one.

    ``generations``: one entry per prompt of the call, the :class:`Generation` of those answered before
    the failure and ``None`` for the others (or ``None`` when the backend kept nothing); the run saves the
    answered ones, so a re-run once the model is back sends only the rest.
    """

    def __init__(self, message: str, generations: Sequence[Generation | None] | None = None) -> None:
        super().__init__(message)
        self.generations = list(generations) if generations is not None else None


@attrs.frozen
class Annotation:
    """The decoded answer for one unit (a cell, or a cluster).

    ``label`` is ``None`` when the output could not be decoded; ``status`` is then ``"unresolved"`` and
    ``raw`` keeps the model text so nothing is lost. ``note`` says why a unit is unresolved or how a
    label was matched (``"matched candidate case-insensitively"``).
    """

    unit_id: str
    label: str | None
    status: Literal["ok", "unresolved"] = attrs.field(
        validator=attrs.validators.in_((STATUS_OK, STATUS_UNRESOLVED))
    )
    confidence: float | None = None
    reasoning: str = ""
    raw: str = ""
    note: str = ""

    @classmethod
    def unresolved(cls, unit_id: str, raw: str = "", note: str = "", reasoning: str = "") -> Annotation:
        """An explicit 'could not decode' answer that keeps the raw text."""
        return cls(unit_id, None, STATUS_UNRESOLVED, None, reasoning, raw, note)
