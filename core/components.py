"""Interfaces of the components plugins register (see :mod:`cellscribe.core.hookspecs`).

These are structural (``typing.Protocol``): any object with the listed attributes and methods works;
no base class is needed. Every method receives keyword arguments and must accept (and may ignore)
``**options`` it does not know, so core can grow arguments without breaking plugins.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData

    from .types import Annotation, CellSentences, FeatureMatrix, Generation, Prompt


@runtime_checkable
class Reader(Protocol):
    """Reads a file into memory.

    ``suffixes``: lower-case file name endings handled (``(".h5ad",)``, ``(".tsv.gz",)``).
    ``read(path, *, backed=None, **options)`` returns an ``AnnData`` or ``MuData``; ``backed="r"``
    asks for a lazily read (on-disk) matrix where the format allows it (streaming commands pass it;
    readers that cannot, ignore it); ``options`` are the values of the CLI options plugins added
    (``--gtf``), or ``modality_options`` in the Python API.
    ``modality``: the modality the data is for when the reader implies one (a fragments reader implies
    ``"atac"``), else ``None``.
    """

    name: str
    suffixes: tuple[str, ...]
    description: str

    def read(self, path: str, **options: Any) -> Any: ...


@runtime_checkable
class Modality(Protocol):
    """Tokenizing step 1: an AnnData of this modality to a cells x genes FeatureMatrix.

    ``mudata_keys``: the ``MuData.mod`` keys tried, in order, when the user gives a MuData but no
    ``mod=`` (``("rna", "gex")``).
    ``prepare(adata, *, layer=None, use_raw=None, **options)`` chooses and checks the matrix (layer or
    raw, scaled data, gene identifiers, duplicate names) and returns a FeatureMatrix with one row per
    cell of ``adata`` in the same order. It raises ``ValueError`` with the problem and the fix for bad
    input. It never modifies ``adata``.
    """

    name: str
    description: str
    mudata_keys: tuple[str, ...]

    def prepare(self, adata: AnnData, **options: Any) -> FeatureMatrix: ...


@runtime_checkable
class SentenceStrategy(Protocol):
    """Tokenizing step 2: a FeatureMatrix to ranked gene lists (cell sentences).

    ``build(features, *, n_genes=None, state, chunk_size, strategies, **options)`` yields
    :class:`CellSentences` chunks in row order, reading ``features`` chunk by chunk. ``state`` is a
    dict persisted in ``uns[key_added]["params"]["sentence_state"]``: a strategy that learns from the
    data (a ranked gene list) stores what it learned there and reuses it when it is already filled, so
    a reference and a query share it. ``strategies`` maps names to all registered strategies (for
    strategies that delegate, like ``auto``). Cells with no expressed gene get an empty list.
    """

    name: str
    description: str
    default_n_genes: int | None

    def build(self, features: FeatureMatrix, **options: Any) -> Iterator[CellSentences]: ...


@runtime_checkable
class PromptStrategy(Protocol):
    """Cell sentences to prompts.

    ``build(sentences, *, mode, candidates, reference, reference_labels, k, seed, obs, count_tokens,
    max_prompt_tokens, **options)`` returns a list of :class:`Prompt`, every unit of ``sentences``
    (except those with an empty sentence) in exactly one prompt.

    - ``mode``: ``"direct"`` or ``"reasoning"``.
    - ``candidates``: user-given labels or ``None``.
    - ``reference`` / ``reference_labels``: labelled example sentences (k-shot) or ``None``.
    - ``obs``: a DataFrame indexed like the units, for context fields (may be ``None``).
    - ``count_tokens``: ``callable(text) -> int`` from the model's tokenizer, or ``None``.

    ``default_decoder``: the decoder its prompts name.

    Optional: ``from_record(record, **options) -> Prompt`` rebuilds a prompt from a stored record of
    the strategy's file format (``cellscribe puzzles solve`` uses the ``puzzle`` strategy's);
    ``representatives_per_group``: cells per group the pipeline prompts with ``groupby`` (default 5).
    """

    name: str
    description: str
    default_decoder: str

    def build(self, sentences: CellSentences, **options: Any) -> list[Prompt]: ...


@runtime_checkable
class LoadedModel(Protocol):
    """A model ready to answer (returned by :meth:`Backend.load`).

    ``generate(prompts, *, settings, progress)`` returns one :class:`Generation` per prompt, in order;
    ``settings`` are the user's generation overrides (merged over each prompt's ``generation``
    defaults by the backend); ``progress(n)`` is called as prompts finish. A failure of one batch is
    reported in ``Generation.error`` rather than raised.
    ``count_tokens(text)`` counts tokens with the model's tokenizer (``None`` if it has none).
    ``info()`` returns what identifies the model (recorded in the run parameters).
    Optional: ``render(prompt) -> str`` (the exact model input), ``use_modality(modality)`` (switch to
    the modality's adapter), ``use_assay(assay) -> dict | None`` (answer within the genes the run's
    data measure, :class:`~cellscribe.core.types.Assay`; the returned report of what of the model's
    knowledge they show is recorded in ``uns[key]["observability"]``), ``decode_modes`` (the ``decode=`` values it supports; default
    ``("generate",)``), ``prompts_per_call`` (how many prompts the pipeline should send per call and
    checkpoint), ``max_concurrency`` (requests a serving backend keeps in flight).
    """

    def generate(self, prompts: Sequence[Prompt], **options: Any) -> list[Generation]: ...

    def count_tokens(self, text: str) -> int | None: ...

    def info(self) -> Mapping[str, Any]: ...


@runtime_checkable
class Backend(Protocol):
    """Loads models of one kind.

    ``handles(spec)`` says whether a ``model=`` string is for this backend (a local directory with a
    ``config.json``, a hub id, ``"openai:gpt-x"``). ``load(spec, *, adapters, hook, **options)``
    returns a :class:`LoadedModel`; ``adapters`` maps modality -> adapter path; ``hook`` is the plugin
    manager's hook relay (to call ``cellscribe_load_adapter``, or hooks its plugin added);
    ``tissue`` is the user's tissue hint or ``None``; other ``options`` come from ``model_options``.
    Optional ``sentence_preferences``: ``{"sentence": name, "n_genes": int, "options": {...},
    "modalities": {modality: {...}}}`` used when the user kept the default sentence settings; a
    modality's entry in ``"modalities"`` overrides the others for runs of that modality.
    """

    name: str
    description: str

    def handles(self, spec: str) -> bool: ...

    def load(self, spec: str, **options: Any) -> LoadedModel: ...


@runtime_checkable
class Decoder(Protocol):
    """Raw text to labels.

    ``decode(generation, prompt, *, vocabulary=None, **options)`` returns one :class:`Annotation` per
    ``prompt.unit_ids``, in order. ``vocabulary`` is the known label set (candidates, reference labels)
    the answer is matched to. Never raises on bad output: unresolved annotations keep the raw text.
    """

    name: str
    description: str

    def decode(self, generation: Generation, prompt: Prompt, **options: Any) -> list[Annotation]: ...


@runtime_checkable
class SentenceFormat(Protocol):
    """A file format for cell sentences (``cellscribe sentences --format NAME``).

    ``write(fh, chunks, *, labels=None, obs=None, **options)`` writes the records to the binary file
    ``fh`` and returns how many it wrote. ``chunks`` yields :class:`CellSentences` in row order (stream
    them: a file may hold millions of cells); ``labels`` is a Series of labels indexed by cell id (or
    ``None``); ``obs`` the cell metadata; ``options`` include ``reasoning`` (bool).
    ``sentence``: the sentence strategy the format's models were trained with (used when the user did
    not choose one), or ``None``; ``needs_labels``: whether ``--label-key`` is required.
    """

    name: str
    description: str
    suffix: str
    sentence: str | None
    needs_labels: bool

    def write(self, fh: Any, chunks: Iterator[CellSentences], **options: Any) -> int: ...


#: hook name -> (kind, protocol, methods that must exist)
KINDS: Mapping[str, tuple[str, type, tuple[str, ...]]] = {
    "cellscribe_register_readers": ("reader", Reader, ("read",)),
    "cellscribe_register_modalities": ("modality", Modality, ("prepare",)),
    "cellscribe_register_sentence_strategies": ("sentence", SentenceStrategy, ("build",)),
    "cellscribe_register_prompt_strategies": ("prompt", PromptStrategy, ("build",)),
    "cellscribe_register_backends": ("backend", Backend, ("handles", "load")),
    "cellscribe_register_decoders": ("decoder", Decoder, ("decode",)),
    "cellscribe_register_formats": ("format", SentenceFormat, ("write",)),
}

__all__ = [
    "Reader",
    "Modality",
    "SentenceStrategy",
    "PromptStrategy",
    "LoadedModel",
    "Backend",
    "Decoder",
    "SentenceFormat",
    "KINDS",
]

