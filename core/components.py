"""Interfaces of the components plugins register (see :mod:`cellscribe.core.hookspecs`).

These are structural (``typing.Protocol``): any object with the listed attributes and methods works;
no base class is needed. Every method receives keyword arguments and must accept (and may ignore)
``**options`` it does not know, so core can grow arguments without breaking plugins.

Each protocol declares its *optional* capabilities, below a ``# optional`` line, with their defaults
(a value, or a method body that does the neutral thing). A component may leave them out: the registry
(and :class:`~cellscribe.core.models.Model` for loaded models) gives it the declared defaults
(:func:`with_defaults`), so the run reads ``modality.mudata_keys`` or calls ``model.use_assay(...)``
without probing for them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from anndata import AnnData

    from .types import Annotation, Assay, CellSentences, FeatureMatrix, Generation, Prompt


@runtime_checkable
class Reader(Protocol):
    """Reads a file into memory.

    ``suffixes``: lower-case file name endings handled (``(".h5ad",)``, ``(".tsv.gz",)``).
    ``read(path, *, backed=None, **options)`` returns an ``AnnData`` or ``MuData``; ``backed="r"``
    asks for a lazily read (on-disk) matrix where the format allows it (streaming commands pass it;
    readers that cannot, ignore it); ``options`` are the values of the CLI options plugins added
    (``--gtf``), or ``modality_options`` in the Python API.
    """

    name: str
    suffixes: tuple[str, ...]
    description: str

    def read(self, path: str, **options: Any) -> Any: ...

    # optional
    #: The modality the data is for when the reader implies one (a fragments reader: ``"atac"``).
    modality: str | None = None


@runtime_checkable
class Modality(Protocol):
    """Tokenizing step 1: an AnnData of this modality to a cells x genes FeatureMatrix.

    ``prepare(adata, *, layer=None, use_raw=None, **options)`` chooses and checks the matrix (layer or
    raw, scaled data, gene identifiers, duplicate names) and returns a FeatureMatrix with one row per
    cell of ``adata`` in the same order. It raises ``ValueError`` with the problem and the fix for bad
    input. It never modifies ``adata``.
    """

    name: str
    description: str

    def prepare(self, adata: AnnData, **options: Any) -> FeatureMatrix: ...

    # optional
    #: The ``MuData.mod`` keys tried, in order, when the user gives a MuData but no ``mod=``.
    mudata_keys: tuple[str, ...] = ()
    #: The label of this modality's line in a several-modality sentence (default: the upper-cased name).
    sentence_label: str | None = None
    #: Options that give values fit for correlation, used by label transfer (``tl.transfer_labels``).
    transfer_options: Mapping[str, Any] = {}
    #: Neighbours whose labels decide each cell's when the run leaves ``neighbor_vote`` unset (0: none):
    #: for modalities whose single cells carry too little signal for a stable call on their own.
    default_neighbor_vote: int = 0

    def embedding(self, adata: AnnData, **options: Any) -> tuple[Any, str] | None:
        """A low-dimensional embedding of the cells of ``adata`` in which neighbours are similar cells
        (the standard one of the modality: a PCA of log-normalised expression, an LSI of accessibility),
        for budgeted runs (``budget=``). Called with ``features`` (the FeatureMatrix :meth:`prepare`
        made), ``n_components``, ``seed``, ``chunk_size`` and the modality's options. Returns
        ``(cells x components array, a note saying what it is)``; ``None`` (the default): the run uses
        a truncated SVD of ``log1p`` of the FeatureMatrix. Never modifies ``adata``."""
        return None


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

    def build(self, features: FeatureMatrix, **options: Any) -> Iterator[CellSentences]: ...

    # optional
    #: Genes per sentence when the user gives none (``None``: the strategy decides).
    default_n_genes: int | None = None
    #: Whether it ranks genes per group and wants the run's groups (``groups=``) with ``groupby``.
    uses_groups: bool = False


@runtime_checkable
class PromptStrategy(Protocol):
    """Cell sentences to prompts.

    ``build(sentences, *, mode, candidates, reference, reference_labels, k, seed, obs, count_tokens,
    max_prompt_tokens, **options)`` returns a list of :class:`Prompt`, every unit of ``sentences``
    (except those with an empty sentence) in exactly one prompt.

    - ``mode``: ``"direct"`` or ``"reasoning"``.
    - ``candidates``: the allowed labels (the user's, else the reference's labels) or ``None``; the
      prompts carry them (``Prompt.candidates``), the one place decoders read them from.
    - ``reference`` / ``reference_labels``: labelled example sentences (k-shot) or ``None``.
    - ``obs``: a DataFrame indexed like the units, for context fields (may be ``None``).
    - ``count_tokens``: ``callable(text) -> int`` from the model's tokenizer, or ``None``.

    ``default_decoder``: the decoder its prompts name.
    """

    name: str
    description: str
    default_decoder: str

    def build(self, sentences: CellSentences, **options: Any) -> list[Prompt]: ...

    # optional
    #: Cells per group the run prompts with ``groupby``.
    representatives_per_group: int = 5
    #: Whether a cell's answer may be revised by its neighbours' (``neighbor_vote``): not for prompts
    #: whose cells are labelled together under a constraint (a puzzle's distinct labels).
    neighbor_vote_allowed: bool = True

    def from_record(self, record: Mapping[str, Any], **options: Any) -> Prompt:
        """Rebuild a prompt from a stored record of the strategy's file format (``cellscribe puzzles
        solve`` uses the ``puzzle`` strategy's)."""
        raise ValueError(f"prompt strategy {getattr(self, 'name', '?')!r} cannot rebuild prompts from records")


@runtime_checkable
class LoadedModel(Protocol):
    """A model ready to answer (returned by :meth:`Backend.load`).

    ``generate(prompts, *, settings, progress)`` returns one :class:`Generation` per prompt, in order;
    ``settings`` are the user's generation overrides (merged over each prompt's ``generation``
    defaults by the backend); ``progress(n)`` is called as prompts finish. A failure of one batch is
    reported in ``Generation.error`` rather than raised; a model that cannot answer any prompt now (a
    server down, a refused key) raises :class:`~cellscribe.core.types.ModelUnavailableError` with the
    generations it finished, which stops the run (resumable from its checkpoint).
    """

    def generate(self, prompts: Sequence[Prompt], **options: Any) -> list[Generation]: ...

    # optional
    #: The ``decode=`` values it supports.
    decode_modes: tuple[str, ...] = ("generate",)
    #: Prompts the run should send per call and checkpoint (``None``: from the batch size).
    prompts_per_call: int | None = None
    #: Requests a serving backend keeps in flight.
    max_concurrency: int = 1
    #: Whether forked copies of the loaded model may answer prompts side by side (CPU only, no device,
    #: thread or connection state): a streamed run then answers its chunks in ``workers`` processes.
    forkable: bool = False

    def count_tokens(self, text: str) -> int | None:
        """Tokens of ``text`` with the model's tokenizer (``None``: it has none)."""
        return None

    def info(self) -> Mapping[str, Any]:
        """What identifies the model (recorded in the run parameters)."""
        return {}

    def identity(self) -> Mapping[str, Any] | None:
        """What determines its answers, for a checkpoint's identity (a run resumes only answers of the same
        identity): e.g. a server's URL (without credentials), the served model, the rendering, but not
        timeouts or concurrency. ``None`` (the default): its :meth:`info` and every model option count.
        The run adds the model's name, adapter, dtype and the content of the local files it was loaded
        from (:func:`cellscribe.core.run.execute.model_identity`)."""
        return None

    def use_modality(self, modality: str) -> None:
        """Switch to the modality's adapter (the base model for a modality without one)."""

    def use_assay(self, assay: Assay) -> Mapping[str, Any] | None:
        """Answer within the genes the run's data measure (:class:`~cellscribe.core.types.Assay`; its
        ``coverage``, when a modality gives one, may inform a prior over the answers); return a report of
        what of the model's knowledge they show (``uns[key]["observability"]``)."""
        return None

    def trainable(self) -> Mapping[str, Any] | None:
        """What a trainer needs to fine-tune this model: ``{"model": the framework's model (a torch
        module), "tokenizer": its tokenizer, "device": where it runs, "base": what was loaded}``.
        ``None``: this model cannot be fine-tuned here (a server, a knowledge-based model)."""
        return None

    def encode_example(self, prompt: Prompt, answer: str) -> tuple[list[int], list[int]] | None:
        """One training example: the token ids of ``prompt`` exactly as :meth:`generate` feeds it (the
        same rendering and tokenisation), and those of ``answer`` followed by the end-of-sequence token
        that stops generation. ``None``: the model has no tokenizer."""
        return None

    def survey(self, prompts: Sequence[Prompt]) -> Mapping[str, Any] | None:
        """Look at the whole run before answering (e.g. infer a tissue context for the prompts whose
        ``tissue`` is empty); return what was found (``uns[key]["observability"]["context"]``)."""
        return None


@runtime_checkable
class Backend(Protocol):
    """Loads models of one kind.

    ``handles(spec)`` says whether a ``model=`` string is for this backend (a local directory with a
    ``config.json``, a hub id, ``"openai:gpt-x"``). ``load(spec, *, adapters, hook, **options)``
    returns a :class:`LoadedModel`; ``adapters`` maps modality -> adapter path; ``hook`` is the plugin
    manager's hook relay (to call ``cellscribe_load_adapter``, or hooks its plugin added);
    other ``options`` come from ``model_options``. (The cells' tissue is not a load option: it travels
    on each prompt, ``Prompt.tissue``.)
    """

    name: str
    description: str

    def handles(self, spec: str) -> bool: ...

    def load(self, spec: str, **options: Any) -> LoadedModel: ...

    # optional
    #: ``{"sentence": name, "n_genes": int, "options": {...}, "modalities": {modality: {...}}}``, used
    #: when the user kept the default sentence settings; a modality's entry in ``"modalities"``
    #: overrides the others for runs of that modality.
    sentence_preferences: Mapping[str, Any] | None = None

    def rates(self, spec: str, **options: Any) -> Mapping[str, Any] | None:
        """The model's assumed speed for a run's cost estimate (``--dry-run``,
        :mod:`cellscribe.core.run.estimate`) where timing it on this machine would not tell what the run
        costs (the model runs on a GPU, or behind a server): ``{"prompt_tokens_per_s", "new_tokens_per_s",
        "source"}`` (or ``"prompts_per_s"``), ``source`` saying what is assumed. Called with ``device``,
        ``dtype``, ``batch_size`` and ``model_options``. ``None`` (the default): the estimate loads the
        model and times it on a few of the run's prompts here. A backend whose calls cost money returns
        an assumption."""
        return None


@runtime_checkable
class Decoder(Protocol):
    """Raw text to labels.

    ``decode(generation, prompt, **options)`` returns one :class:`Annotation` per ``prompt.unit_ids``,
    in order. The labels an answer is matched to are the prompt's ``candidates`` (the user's
    candidates, or the reference's labels). Never raises on bad output: unresolved annotations keep the
    raw text.
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
    """

    name: str
    description: str
    suffix: str

    def write(self, fh: Any, chunks: Iterator[CellSentences], **options: Any) -> int: ...

    # optional
    #: The sentence strategy the format's models were trained with (used when the user chose none).
    sentence: str | None = None
    #: Whether ``--label-key`` is required.
    needs_labels: bool = False


@runtime_checkable
class Trainer(Protocol):
    """Fine-tunes a loaded model on training examples and writes an adapter (``cellscribe finetune``).

    ``train(examples, *, model, output, spec, seed, resume, progress, **options)``: ``examples`` are
    ``{"prompt_ids", "answer_ids"}`` token-id lists (the model's own
    :meth:`LoadedModel.encode_example`; the loss belongs on the answer ids only); ``model`` the
    :class:`LoadedModel` (its ``trainable()`` gives the framework model); ``output`` the adapter folder
    to write (PEFT's ``adapter_config.json`` and ``adapter_model.safetensors``; checkpoints in
    ``output / "checkpoints"``); ``spec`` the :class:`~cellscribe.core.spec.FinetuneSpec`;
    ``resume`` continue from the last checkpoint there; ``progress`` show a bar. Returns the settings
    it used and what happened (steps, final loss, seconds), recorded in the adapter's manifest. Input
    it cannot train on raises ``ValueError`` before any step.
    """

    name: str
    description: str

    def train(self, examples: Sequence[Mapping[str, Any]], **options: Any) -> Mapping[str, Any]: ...


@runtime_checkable
class Executor(Protocol):
    """Where a run's prompts are answered: in this process (``local``, the default) or by replicas of
    the model spread over a cluster (``ray``). Chosen with ``executor=`` (``--executor``).

    ``run(loaded, prompts, *, replica, address, options, **batches)`` answers ``prompts`` and returns
    the :class:`~cellscribe.core.run.checkpoint.BatchOutcome` that
    :func:`~cellscribe.core.run.checkpoint.run_batches` returns: one generation per prompt, in order.
    ``loaded`` is the run's own model (prepared for the run), ``replica`` the
    :class:`~cellscribe.core.models.Replica` another process loads to answer as it does, ``address``
    the cluster's address (``executor_address=``; ``None``: the executor's default), ``options`` the
    ``executor_options``. ``batches`` are :func:`run_batches`'s keywords (settings, model identity,
    batch size, checkpoint, progress, ...): an executor passes them on unchanged, so that batches,
    seeds, checkpoint files and resumption are those of a local run.
    """

    name: str
    description: str

    def run(self, loaded: LoadedModel, prompts: Sequence[Prompt], **options: Any) -> Any: ...

    # optional
    def check(self, **options: Any) -> None:
        """Raise ``ValueError`` (one line: the problem and the fix) when the executor cannot run with
        ``address`` and ``options`` here (a missing extra, an unknown option); called before any data
        is read."""


def optional_members(protocol: type) -> dict[str, Any]:
    """The optional members a protocol declares, with their defaults (plain functions for methods)."""
    return {
        name: value for name, value in vars(protocol).items()
        if not name.startswith("_") and name not in _REQUIRED.get(protocol, ())
    }


#: Members each protocol requires (everything else it defines is optional).
_REQUIRED: dict[type, tuple[str, ...]] = {
    Reader: ("read",),
    Modality: ("prepare",),
    SentenceStrategy: ("build",),
    PromptStrategy: ("build",),
    LoadedModel: ("generate",),
    Backend: ("handles", "load"),
    Decoder: ("decode",),
    SentenceFormat: ("write",),
    Trainer: ("train",),
    Executor: ("run",),
}


class _WithDefaults:
    """A component seen through its protocol: its own members, else the protocol's declared defaults
    (methods bound to the component). ``isinstance`` and attribute writes reach the component."""

    __slots__ = ("_component", "_defaults")

    def __init__(self, component: Any, defaults: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_component", component)
        object.__setattr__(self, "_defaults", dict(defaults))

    def __getattr__(self, name: str) -> Any:
        try:
            return getattr(self._component, name)
        except AttributeError:
            if name not in self._defaults:
                raise
            value = self._defaults[name]
            return value.__get__(self._component) if callable(value) else value

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._component, name, value)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # isinstance() sees the component's class
        return type(self._component)

    def __repr__(self) -> str:
        return repr(self._component)


def with_defaults(component: Any, protocol: type) -> Any:
    """``component`` itself when it has every optional member of ``protocol``, else a view of it that
    supplies the missing ones with the protocol's defaults. The one place optional members are looked
    up; everything else reads them as plain attributes."""
    missing = {name: value for name, value in optional_members(protocol).items() if not hasattr(component, name)}
    return _WithDefaults(component, missing) if missing else component


#: hook name -> (kind, protocol, methods that must exist)
KINDS: Mapping[str, tuple[str, type, tuple[str, ...]]] = {
    "cellscribe_register_readers": ("reader", Reader, _REQUIRED[Reader]),
    "cellscribe_register_modalities": ("modality", Modality, _REQUIRED[Modality]),
    "cellscribe_register_sentence_strategies": ("sentence", SentenceStrategy, _REQUIRED[SentenceStrategy]),
    "cellscribe_register_prompt_strategies": ("prompt", PromptStrategy, _REQUIRED[PromptStrategy]),
    "cellscribe_register_backends": ("backend", Backend, _REQUIRED[Backend]),
    "cellscribe_register_decoders": ("decoder", Decoder, _REQUIRED[Decoder]),
    "cellscribe_register_formats": ("format", SentenceFormat, _REQUIRED[SentenceFormat]),
    "cellscribe_register_trainers": ("trainer", Trainer, _REQUIRED[Trainer]),
    "cellscribe_register_executors": ("executor", Executor, _REQUIRED[Executor]),
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
    "Trainer",
    "Executor",
    "KINDS",
    "optional_members",
    "with_defaults",
]
