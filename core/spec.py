"""The run specification: every parameter of an annotation run, declared once, here.

A :class:`RunSpec` is a frozen value made of seven small parts, one per stage of a run::

    DataSpec        which data and matrix        modality, mod, layer, use_raw, modality_options, chunk_size,
                                                 workers
    SentenceSpec    cell sentences               sentence, n_genes, sentence_options
    PromptSpec      prompts and units            prompt, mode, candidates, tissue, reference, reference_key,
                                                 reference_modality, k, groupby, n_representatives,
                                                 neighbor_vote, budget, budget_options, seed,
                                                 max_prompt_tokens, prompt_options
    ModelSpec       model and how to load it     model, adapter, device, dtype, trust_remote_code,
                                                 batch_size, model_options
    GenerationSpec  how the model answers        generation, decode
    ExecutionSpec   where the model answers      executor, executor_address, executor_options
    OutputSpec      where results go             key_added, sidecar, checkpoint, progress

Each field is declared with :func:`param`: its default, its check, its documentation and its
command-line flag. Everything else is derived from these declarations:

- ``cellscribe.tl.annotate``'s signature and the *Parameters* of its docstring (:func:`signature`,
  :func:`parameters_doc`);
- the flags and ``--help`` of ``cellscribe annotate`` (``cellscribe.cli`` reads :attr:`Flag`);
- the load options of :func:`cellscribe.load_model` (:data:`LOAD_OPTIONS`);
- ``uns[key_added]["params"]`` (:meth:`RunSpec.to_params`), from which :meth:`RunSpec.from_params`
  re-creates the run.

A spec is validated once, when it is made: bad input raises a one-line ``ValueError`` (or ``TypeError``
for a wrong keyword) naming the problem and the fix, before any data is read or model loaded.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from .models import Model

__all__ = [
    "Flag",
    "DataSpec",
    "SentenceSpec",
    "PromptSpec",
    "ModelSpec",
    "GenerationSpec",
    "ExecutionSpec",
    "OutputSpec",
    "RunSpec",
    "PARTS",
    "LOAD_OPTIONS",
    "MODES",
    "DECODE_MODES",
    "parameters",
    "signature",
    "parameters_doc",
    "split",
]

MODES = ("direct", "reasoning")
DECODE_MODES = ("generate", "constrained", "score")
#: What ``obs[f"{key_added}_reasoning"]`` keeps of each answer's reasoning (``reasoning=``).
REASONING_KEPT = ("short", "full", "none")


@attrs.frozen
class Flag:
    """How a run parameter appears on ``cellscribe annotate`` (turned into a ``click.Option`` by the CLI).

    ``kind``: ``"value"`` (one value of ``type``), ``"switch"`` (``--x/--no-x``), ``"flag"`` (on when
    given), ``"pairs"`` (repeatable ``KEY=VALUE``, collected into a dict), ``"multiple"`` (repeatable
    value). ``type``: ``"str"``, ``"int"``, ``"file"`` (an existing file), ``"path"`` (a file to
    write), ``"dir"``, ``"choice"`` (one of ``choices``).
    """

    decls: tuple[str, ...] = attrs.field(converter=tuple)
    help: str
    kind: str = attrs.field(default="value", validator=attrs.validators.in_(
        ("value", "switch", "flag", "pairs", "multiple")))
    type: str = "str"
    choices: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    metavar: str | None = None
    show_default: bool = False


def param(default: Any = None, *, doc: str, flag: Flag, converter: Any = None, validator: Any = None,
          eq: Any = True) -> Any:
    """Declare one run parameter: its default, conversion, check, documentation and CLI flag."""
    return attrs.field(default=default, converter=converter, validator=validator, eq=eq,
                       metadata={"doc": doc, "flag": flag})


# -- conversions and checks (messages say what is wrong and what to pass) ------------------------------


def _options(value: Any) -> dict[str, Any]:
    """An options mapping as a plain dict (``None`` is empty)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a dict of options, got {type(value).__name__} {value!r}")
    return dict(value)


def _labels(value: Any) -> tuple[str, ...] | None:
    """Candidate labels, stripped; ``None`` is unrestricted. Refused: a single string, an empty list, a
    single label (every cell would get it, at full confidence), blank, repeated or unprintable labels."""
    if value is None:
        return None
    if isinstance(value, str):
        raise ValueError(
            f"candidates must be a list of labels, not the single string {value!r}; wrap it in a list"
        )
    labels = tuple(str(v).strip() for v in _plain(value))
    if not labels:
        raise ValueError("candidates is empty; give at least two labels, or none (candidates=None) to let the "
                         "model answer freely")
    blank = [i for i, label in enumerate(labels) if not label]
    if blank:
        raise ValueError(f"candidate label number {blank[0] + 1} of {len(labels)} is blank; remove the empty label")
    from .answers import printable

    bad = [label for label in labels if printable(label)[1] or "\n" in label or "\t" in label]
    if bad:
        raise ValueError(f"candidate label {bad[0]!r} holds a control character (tab, newline, NUL); one label per "
                         "entry, printable text only")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"duplicate candidate labels: {repeated}; give each label once")
    if len(labels) == 1:
        raise ValueError(
            f"a single candidate ({labels[0]!r}) would give every cell that label; give at least two "
            "candidates, or none to let the model answer freely"
        )
    return labels


def _plain(value: Any) -> Any:
    """Numpy scalars and arrays (as read back from ``uns``) to Python values and lists."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    return value


def _positive(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be a positive integer, got {value!r}")


def _non_negative(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{attribute.name} must be an integer >= 0 (0 turns it off), got {value!r}")


def _budget(value: Any) -> Any:
    """A budget as given (``0.05``, ``2000``, ``"5%"``, ``"0.05"``) to a float share or an int count."""
    value = _plain(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            if text.endswith("%"):
                return float(text[:-1]) / 100
            return float(text) if any(c in text for c in ".eE") else int(text)
        except ValueError:
            raise ValueError(f"budget must be a share of cells (0.05, 5%) or a number of cells (2000), got "
                             f"{value!r}") from None
    if isinstance(value, float) and value > 1 and value.is_integer():
        return int(value)
    return value


def _budget_check(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    share = isinstance(value, float) and 0 < value <= 1
    count = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if not (share or count):
        raise ValueError(f"budget must be a share of cells in (0, 1] (0.05) or a number of cells >= 1 (2000), "
                         f"got {value!r}")


def _integer(value: Any) -> Any:
    value = _plain(value)
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _optional_int(value: Any) -> Any:
    return None if value is None else _integer(value)


def _text(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attribute.name} must be a non-empty string, got {value!r}")


def _optional_text(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None:
        _text(inst, attribute, value)


def _one_of(choices: Sequence[str], fix: str = "") -> Any:
    def check(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            quoted = " or ".join(repr(c) for c in choices) if len(choices) == 2 else ", ".join(choices)
            raise ValueError(f"{attribute.name} must be {'one of ' if len(choices) > 2 else ''}{quoted}, "
                             f"got {value!r}{fix}")

    return check


def _bool(value: Any) -> Any:
    value = _plain(value)
    return bool(value) if isinstance(value, int) else value


def _optional_bool(value: Any) -> Any:
    return None if value is None else _bool(value)


def _is_bool(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{attribute.name} must be True or False, got {value!r}")


def _sidecar(value: Any) -> Any:
    value = _plain(value)
    return value if value is None or isinstance(value, bool) else str(value)


def _path(value: Any) -> Any:
    return None if value is None else str(value)


def _model_name(value: Any) -> str:
    """What identifies a ``model=`` value: its name (a loaded model's too; ``None`` is the default)."""
    from .models import resolve_model_name

    return resolve_model_name(value if value is None or isinstance(value, str) else value.name)


# -------------------------------------------------------------------------------------------------
# The seven parts
# -------------------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class DataSpec:
    """Which data a run reads and how its matrix is chosen."""

    modality: str = param(
        "rna", validator=_text,
        doc="Modality plugin that turns the data into a cells x genes matrix (``\"rna\"``, ``\"atac\"``; "
            "``\"rna+atac\"`` puts each cell's modalities in one prompt; ``cellscribe plugins`` lists the "
            "installed ones).",
        flag=Flag(("--modality",), "Modality plugin (rna, atac, ...); repeat it to annotate several "
                  "modalities of a MuData with one loaded model.", kind="multiple", show_default=True),
    )
    mod: str | None = param(
        validator=_optional_text,
        doc="MuData modality key (default: the modality's usual keys, e.g. ``\"rna\"``).",
        flag=Flag(("--mod",), "MuData modality key (default: the modality's usual keys)."),
    )
    layer: str | None = param(
        validator=_optional_text,
        doc="Layer to read instead of ``X`` (scaled data is detected and counts/log layers or ``.raw`` "
            "used instead when present).",
        flag=Flag(("--layer",), "Layer to read instead of X."),
    )
    use_raw: bool | None = param(
        converter=_optional_bool,
        doc="Read ``.raw`` instead of ``X`` (default: decided by the modality).",
        flag=Flag(("--use-raw/--no-use-raw",), "Read .raw instead of X (default: the modality decides).",
                  kind="switch"),
    )
    modality_options: Mapping[str, Any] = param(
        converter=_options,
        doc="Modality- and reader-specific settings (``{\"gtf\": \"genes.gtf.gz\"}`` for ATAC).",
        flag=Flag(("--modality-option",), "Modality/reader option (repeat).", kind="pairs", metavar="KEY=VALUE"),
    )
    chunk_size: int = param(
        10_000, converter=_integer, validator=_positive,
        doc="Cells per chunk when reading the matrix.",
        flag=Flag(("--chunk-size",), "Cells per chunk when reading the matrix.", type="int", show_default=True),
    )
    workers: int | None = param(
        converter=_optional_int, validator=_positive,
        doc="Processes that answer the chunks of a streamed run side by side, for models that allow it "
            "(``LoadedModel.forkable``: the ``markers`` model); the results do not depend on it. Default: "
            "the CPUs this process may use, at most 4; ``1``: one process.",
        flag=Flag(("--workers",), "Processes answering a streamed run's chunks (markers model; default: the "
                  "CPUs, at most 4).", type="int"),
    )

    def __attrs_post_init__(self) -> None:
        if self.mod is not None and "+" in self.modality and len(self.mod.split("+")) != len(self.modality.split("+")):
            raise ValueError(f"mod={self.mod!r} must name one MuData modality per modality of {self.modality!r}")


@attrs.frozen(kw_only=True)
class SentenceSpec:
    """How cells become cell sentences."""

    sentence: str = param(
        "auto", validator=_text,
        doc="Sentence strategy: ``\"auto\"``, ``\"ranked-hvg\"``, ``\"top-expressed\"``, ``\"data-hvg\"``.",
        flag=Flag(("--sentence",), "Sentence strategy: auto, ranked-hvg, top-expressed, data-hvg.",
                  show_default=True),
    )
    n_genes: int | None = param(
        converter=_optional_int, validator=_positive,
        doc="Genes per sentence (default: the strategy's; 1000 for ranked-hvg, 50 for top-expressed).",
        flag=Flag(("--n-genes",), "Genes per cell sentence (default: the strategy's).", type="int"),
    )
    sentence_options: Mapping[str, Any] = param(
        converter=_options,
        doc="Sentence-strategy settings.",
        flag=Flag(("--sentence-option",), "Sentence strategy option (repeat).", kind="pairs", metavar="KEY=VALUE"),
    )


@attrs.frozen(kw_only=True)
class PromptSpec:
    """Which cells are prompted, and how."""

    prompt: str = param(
        "zero-shot", validator=_text,
        doc="Prompt strategy: ``\"zero-shot\"`` (CellReasoner), ``\"k-shot\"`` (examples from "
            "``reference``), ``\"puzzle\"`` (Cell-o1 CellPuzzles; needs ``candidates``).",
        flag=Flag(("--prompt",), "Prompt strategy: zero-shot, k-shot, puzzle.", show_default=True),
    )
    mode: str = param(
        "direct", validator=_one_of(MODES),
        doc="``\"direct\"`` (answer only) or ``\"reasoning\"`` (think first; CellReasoner's reasoning mode).",
        flag=Flag(("--mode",), "direct: answer only; reasoning: the model reasons before it answers.",
                  type="choice", choices=MODES, show_default=True),
    )
    candidates: Sequence[str] | None = param(
        converter=_labels,
        doc="Allowed labels. Answers are matched to them; unmatched answers are unresolved.",
        flag=Flag(("--candidate",), "An allowed label (repeat the flag; or --candidates-file).", kind="multiple"),
    )
    tissue: str | None = param(
        validator=_optional_text,
        doc="Tissue of origin of every cell (``\"blood\"``, ``\"pancreas\"``, an UBERON id or label); "
            "knowledge-based models answer within its cell types. Default: the tissue the data state per "
            "cell in a standard ``obs`` column (CELLxGENE's ``tissue_general``, ``tissue``, "
            "``tissue_ontology_term_id``; also ``organ_tissue``, ``organ``), else the model infers a "
            "likely context (the ``markers`` model: from the cells' markers). ``\"any\"``: no tissue, "
            "nothing inferred. What the run used and where it came from is recorded in "
            "``uns[key_added][\"params\"][\"tissue_stated\"]`` and ``[\"observability\"][\"context\"]``.",
        flag=Flag(("--tissue",), "Tissue of origin of all cells (default: read from obs, else inferred; "
                  "'any': no restriction)."),
    )
    reference: Any = param(
        eq=False,
        doc="Labelled examples for ``k-shot``: an AnnData (or MuData). With ``reference=None`` and a "
            "``reference_key``, the labelled cells of ``data`` itself are used.",
        flag=Flag(("--reference",), "Labelled reference .h5ad/.h5mu for k-shot.", type="file"),
    )
    reference_key: str | None = param(
        validator=_optional_text,
        doc="The ``obs`` column of labels of ``reference`` (or of ``data``).",
        flag=Flag(("--reference-key",), "Label column of the reference (or of INPUT)."),
    )
    reference_modality: str | None = param(
        validator=_optional_text,
        doc="The modality of ``reference`` when it differs from ``modality``: an scRNA-seq reference for "
            "scATAC cells is ``reference_modality=\"rna\"`` (examples are expression sentences, queries "
            "gene activity sentences; the reference keeps only the genes both can show). Default: the "
            "query's modality; a reference of peaks for a query of gene symbols, or the reverse, is "
            "refused with an error asking for it. Recorded with the gene counts in "
            "``uns[key_added][\"params\"]``.",
        flag=Flag(("--reference-modality",), "Modality of the reference when it is not the query's "
                  "(rna for an scRNA-seq reference of ATAC cells)."),
    )
    k: int = param(
        3, converter=_integer, validator=_positive,
        doc="Examples per label in ``k-shot`` prompts.",
        flag=Flag(("-k",), "Examples per label (k-shot).", type="int", show_default=True),
    )
    groupby: str | None = param(
        validator=_optional_text,
        doc="An ``obs`` column of clusters: each group is annotated from ``n_representatives`` typical "
            "cells and every cell receives its group's label: the label of highest mean probability over "
            "the representatives when the model gives per-label probabilities (``markers``, "
            "``decode=\"score\"``), else their majority vote. Sentence strategies that rank genes per "
            "group (``cluster-markers``) get these groups.",
        flag=Flag(("--groupby",), "obs column of clusters: annotate per cluster."),
    )
    n_representatives: int | None = param(
        converter=_optional_int, validator=_positive,
        doc="Cells per group with ``groupby`` (default: the prompt strategy's choice, 5; 1 for puzzles).",
        flag=Flag(("--n-representatives",), "Cells per cluster with --groupby.", type="int"),
    )
    neighbor_vote: int | None = param(
        converter=_optional_int, validator=_non_negative,
        doc="Decide each cell's label with its nearest cells: after the model answers, a cell takes the "
            "label that carries most of the confidence-weighted votes of itself and its ``neighbor_vote`` "
            "nearest cells (kNN graph of the modality's embedding: PCA for RNA, LSI for ATAC) when it has "
            "more votes than the cell's own answer; its note then gives its own call, and its confidence "
            "is the label's share times its voters' mean confidence. Unresolved cells stay unresolved. "
            "``0`` turns it off; ``None`` (default): the modality's choice (15 for ATAC, whose single "
            "cells are sparse; 0 for RNA). Per-cell prompts only (not puzzles, ``groupby`` or "
            "``budget``, which already give cells their group's or neighbours' labels). Writes "
            "``uns[key_added][\"vote\"]``.",
        flag=Flag(("--neighbor-vote",), "Each cell takes the label most of its N nearest cells were given "
                  "(0: off; default: the modality's choice, 15 for ATAC).", type="int", metavar="N"),
    )
    budget: int | float | None = param(
        converter=_budget, validator=_budget_check,
        doc="Send only some cells to the model: a fraction of the cells (``0.05``) or a number of cells "
            "(``2000``). Representative cells are chosen on an embedding (``budget_options``), their answers "
            "spread to every cell over the kNN graph, with a confidence that multiplies the neighbours' "
            "agreement and the model's confidence, and the cells where the spread labels disagree are sent "
            "in one second round (at most as many cells again: ``budget=0.05`` sends at most 10% of the "
            "cells). With ``groupby`` the budget is shared among the groups by size (at least one cell "
            "each) and every cell still gets its group's call. Writes ``obs[f\"{key_added}_source\"]`` "
            "(``model`` or ``propagated``) and ``uns[key_added][\"budget\"]``.",
        flag=Flag(("--budget",), "Send only this share (0.05) or number (2000) of cells to the model; the "
                  "rest get labels spread over the kNN graph.", metavar="SHARE|N"),
    )
    budget_options: Mapping[str, Any] = param(
        converter=_options,
        doc="Settings of ``budget``: ``method`` (``\"medoids\"``: the cell nearest each k-means centre of "
            "the embedding, the default; ``\"random\"``: a seeded uniform sample), ``use_rep`` (an ``obsm`` "
            "key to use as the embedding instead of the modality's PCA/LSI), ``n_components`` (50), "
            "``n_neighbors`` (kNN graph, 15), ``requery`` (second-round cells as a share of the first round, "
            "1.0; 0 for none), ``min_agreement`` (cells whose spread label carries less of their "
            "neighbourhood's weight are re-queried, 0.9).",
        flag=Flag(("--budget-option",), "Budget option (repeat): method, use_rep, n_components, n_neighbors, "
                  "requery, min_agreement.", kind="pairs", metavar="KEY=VALUE"),
    )
    seed: int = param(
        0, converter=_integer, validator=attrs.validators.instance_of(int),
        doc="Seed for example sampling and puzzle grouping.",
        flag=Flag(("--seed",), "Seed for k-shot example sampling and puzzle grouping.", type="int",
                  show_default=True),
    )
    max_prompt_tokens: int | None = param(
        converter=_optional_int, validator=_positive,
        doc="Token budget per prompt (k-shot examples are shortened to fit).",
        flag=Flag(("--max-prompt-tokens",), "Token budget per prompt.", type="int"),
    )
    prompt_options: Mapping[str, Any] = param(
        converter=_options,
        doc="Prompt-strategy settings (e.g. ``{\"system_role\": True}`` for puzzles).",
        flag=Flag(("--prompt-option",), "Prompt strategy option (repeat).", kind="pairs", metavar="KEY=VALUE"),
    )

    def __attrs_post_init__(self) -> None:
        if self.reference is not None and self.reference_key is None:
            raise ValueError("reference= needs reference_key= (the obs column with its labels)")
        if self.budget is not None and self.n_representatives is not None:
            raise ValueError("budget= decides how many cells of each group are sent; leave n_representatives out")
        if self.neighbor_vote and self.groupby is not None:
            raise ValueError("neighbor_vote= and groupby= both decide labels from several cells: groupby already "
                             "gives every cell its group's label; leave neighbor_vote out (or 0)")
        if self.neighbor_vote and self.budget is not None:
            raise ValueError("neighbor_vote= and budget= both decide labels over the kNN graph: budget already "
                             "spreads the answers to every cell; leave neighbor_vote out (or 0)")
        if self.budget_options and self.budget is None:
            raise ValueError("budget_options= needs budget= (the share or number of cells sent to the model)")
        if self.budget_options:
            from .run.budget import check_budget_options

            check_budget_options(self.budget_options)


@attrs.frozen(kw_only=True)
class ModelSpec:
    """Which model answers, and how it is loaded (the *load options* are every field but ``model``)."""

    model: str | Model | None = param(
        eq=_model_name,
        doc="``None`` (the offline default, ``\"markers\"``), a registered backend name, a model manifest "
            "name (``\"cellreasoner-7b\"``, ``\"cell-o1\"``: ``cellscribe adapters`` lists them; a manifest's "
            "prompt, sentence and generation settings apply wherever you kept the defaults), a local model "
            "directory or a Hugging Face hub id (transformers backend), or ``\"openai:<name>\"`` for a "
            "serving engine. Or a model already loaded by :func:`cellscribe.load_model`, reused without "
            "loading it again (its load options are fixed: ``adapter``, ``device``, ``dtype``, "
            "``trust_remote_code``, ``batch_size`` and ``model_options`` must then be left out).",
        flag=Flag(("--model",), "Backend name, manifest name, local model directory, hub id or openai:NAME "
                  "(default: markers)."),
    )
    adapter: str | None = param(
        converter=_path, validator=_optional_text,
        doc="A LoRA adapter (path or hub id) for this modality, loaded onto the model.",
        flag=Flag(("--adapter",), "LoRA adapter (path or hub id) for the modality; MODALITY=PATH with "
                  "several modalities.", kind="multiple", metavar="[MODALITY=]PATH"),
    )
    device: str | None = param(
        validator=_optional_text,
        doc="Model placement (default: GPU when available, else CPU).",
        flag=Flag(("--device",), "Model device (cpu, cuda, cuda:1)."),
    )
    dtype: str | None = param(
        validator=_optional_text,
        doc="Model dtype (default: bf16 on GPU, fp32 on CPU).",
        flag=Flag(("--dtype",), "Model dtype (auto, bfloat16, float32)."),
    )
    trust_remote_code: bool = param(
        False, converter=_bool, validator=_is_bool,
        doc="Allow a hub model's own code to run. Off unless you ask for it.",
        flag=Flag(("--trust-remote-code",), "Allow the model's own code to run (off by default).", kind="flag"),
    )
    batch_size: int | None = param(
        converter=_optional_int, validator=_positive,
        doc="Prompts per model call (default: the backend's choice; transformers fills batches up to a "
            "token budget, ``model_options={\"max_batch_tokens\": N}``).",
        flag=Flag(("--batch-size",), "Prompts per model call (default: the backend's).", type="int"),
    )
    model_options: Mapping[str, Any] = param(
        converter=_options,
        doc="Backend-specific settings passed to the backend's ``load``.",
        flag=Flag(("--model-option",), "Backend option (repeat).", kind="pairs", metavar="KEY=VALUE"),
    )

    def __attrs_post_init__(self) -> None:
        if self.handle is not None:
            from .models import check_run_options

            check_run_options(self.handle, {name: getattr(self, name) for name in LOAD_OPTIONS})

    @property
    def name(self) -> str:
        """The ``model=`` string (a loaded model's name; ``None`` is the offline default)."""
        return _model_name(self.model)

    @property
    def handle(self) -> Any:
        """The already loaded :class:`~cellscribe.core.models.Model` given as ``model=``, or ``None``."""
        return None if self.model is None or isinstance(self.model, str) else self.model

    def load_options(self) -> dict[str, Any]:
        """The load options other than ``adapter`` (what :func:`cellscribe.load_model` takes)."""
        return {name: getattr(self, name) for name in LOAD_OPTIONS if name != "adapter"}


@attrs.frozen(kw_only=True)
class GenerationSpec:
    """How the model answers."""

    generation: Mapping[str, Any] = param(
        converter=_options,
        doc="Generation settings overriding the format's defaults (``temperature``, ``top_p``, "
            "``max_new_tokens``, ``do_sample``, ``repetition_penalty``, ``seed`` ...).",
        flag=Flag(("--generation",), "Generation setting override (repeat).", kind="pairs", metavar="KEY=VALUE"),
    )
    decode: str = param(
        "generate", validator=_one_of(DECODE_MODES),
        doc="``\"generate\"`` (free text, decoded afterwards), ``\"constrained\"`` (the answer is forced to "
            "be one of the candidates; a permutation of them for puzzles) or ``\"score\"`` (each "
            "candidate's likelihood; gives a probability per candidate). The last two need candidates and "
            "a backend that supports them (transformers).",
        flag=Flag(("--decode",), "Free generation, answers forced to the candidates, or candidate scoring.",
                  type="choice", choices=DECODE_MODES, show_default=True),
    )


@attrs.frozen(kw_only=True)
class ExecutionSpec:
    """Where the prompts are answered: in this process, or by replicas of the model on a cluster."""

    executor: str = param(
        "local", validator=_text,
        doc="``\"local\"`` (in this process) or ``\"ray\"``: prompts become a Ray Data dataset answered by "
            "replicas of the model (actors; vLLM through Ray Data's LLM processors with "
            "``executor_options={\"engine\": \"vllm\"}``; several OpenAI-compatible servers with "
            "``{\"base_urls\": \"URL1,URL2\"}``), labels in cell order, resumable batch by batch with "
            "``checkpoint``. Needs the ``ray`` extra (``pip install 'cellscribe[ray]'``). ``cellscribe "
            "plugins`` lists the installed executors.",
        flag=Flag(("--executor",), "Where the model answers: local, or ray (model replicas on a Ray "
                  "cluster; the ray extra).", show_default=True),
    )
    executor_address: str | None = param(
        validator=_optional_text,
        doc="The cluster to run on (``executor=\"ray\"``: ``\"auto\"``, ``\"HOST:6379\"`` or "
            "``\"ray://HOST:10001\"``). Default: a local cluster on this machine, started for the run "
            "and stopped after it.",
        flag=Flag(("--ray-address", "--executor-address"), "Ray cluster address (default: start a local "
                  "cluster for the run)."),
    )
    executor_options: Mapping[str, Any] = param(
        converter=_options,
        doc="Executor settings (``ray``: ``workers``, ``cpus_per_worker``, ``gpus_per_worker``, "
            "``block_prompts``, ``base_urls``, ``engine``, ``num_cpus``; README, \"Distributed inference "
            "on Ray\").",
        flag=Flag(("--executor-option",), "Executor option (repeat).", kind="pairs", metavar="KEY=VALUE"),
    )


@attrs.frozen(kw_only=True)
class OutputSpec:
    """Where a run's results and records go."""

    key_added: str = param(
        "cellscribe", validator=_text,
        doc="Prefix of the written fields.",
        flag=Flag(("--key-added",), "Prefix of the written obs/uns keys.", show_default=True),
    )
    sidecar: str | bool | None = param(
        converter=_sidecar,
        doc="A file for every prompt and raw model output (JSONL, one record per prompt; gzip-compressed when "
            "the name ends in ``.gz``). ``None``: no file; the raw outputs are kept in memory, in "
            "``uns[key_added][\"raw\"]``; ``False``: not kept at all. (The command line writes "
            "``OUTPUT.cellscribe.jsonl.gz``; ``--sidecar none`` keeps none.)",
        flag=Flag(("--sidecar",), "Raw outputs JSONL, compressed when it ends in .gz (default: "
                  "OUTPUT.cellscribe.jsonl.gz; 'none': no sidecar).", type="path"),
    )
    checkpoint: str | None = param(
        converter=_path,
        doc="A folder where finished batches of outputs are saved as they complete; running the same call "
            "again with the same folder resumes where it stopped and sends again only the prompts whose model "
            "call failed (the CLI uses ``OUTPUT.cellscribe.ckpt``). Answers of another model, server, adapter, "
            "weights or data are never resumed, and one run at a time owns the folder.",
        flag=Flag(("--checkpoint",), "Folder of finished batches (default OUTPUT.cellscribe.ckpt); re-run "
                  "to resume.", type="dir"),
    )
    reasoning: str = param(
        "short", validator=_one_of(REASONING_KEPT),
        doc="What ``obs[f\"{key_added}_reasoning\"]`` keeps of each answer's reasoning: ``\"short\"`` its "
            "conclusion (the last line, at most 200 characters; a few bytes per cell where the whole text "
            "is several hundred), ``\"full\"`` the whole text, ``\"none\"`` no column. The whole text is "
            "always in the sidecar (or, without a sidecar file, in ``uns[key_added][\"raw\"]``).",
        flag=Flag(("--reasoning",), "obs reasoning column: short (its conclusion; the whole text is in the "
                  "sidecar), full, or none.", type="choice", choices=REASONING_KEPT, show_default=True),
    )
    progress: bool = param(
        True, converter=_bool, validator=_is_bool,
        doc="Show a progress bar.",
        flag=Flag(("--progress/--no-progress",), "Show a progress bar.", kind="switch", show_default=True),
    )


#: The parts of a run, in order: attribute of :class:`RunSpec` -> part class.
PARTS: dict[str, type] = {
    "data": DataSpec,
    "sentences": SentenceSpec,
    "prompts": PromptSpec,
    "model": ModelSpec,
    "generation": GenerationSpec,
    "execution": ExecutionSpec,
    "output": OutputSpec,
}


def parameters(parts: Sequence[str] | None = None) -> Iterator[tuple[str, attrs.Attribute]]:
    """Every run parameter (of ``parts``, default all) in declaration order, as ``(part, attribute)``."""
    for part, cls in PARTS.items():
        if parts is None or part in parts:
            for attribute in attrs.fields(cls):
                yield part, attribute


_PART_OF = {a.name: part for part, a in parameters()}

#: The load options of a run (fixed once a model is loaded; see :func:`cellscribe.load_model`).
LOAD_OPTIONS: tuple[str, ...] = tuple(a.name for a in attrs.fields(ModelSpec) if a.name != "model")


@attrs.frozen
class RunSpec:
    """Everything that defines an annotation run, validated once (see the module docstring).

    Build one with :meth:`from_kwargs` (``tl.annotate``'s keywords) or :meth:`from_params` (a finished
    run's ``uns[key_added]["params"]``); read a parameter with ``spec.prompts.k`` or ``spec["k"]``.
    """

    data: DataSpec = attrs.field(factory=DataSpec)
    sentences: SentenceSpec = attrs.field(factory=SentenceSpec)
    prompts: PromptSpec = attrs.field(factory=PromptSpec)
    model: ModelSpec = attrs.field(factory=ModelSpec)
    generation: GenerationSpec = attrs.field(factory=GenerationSpec)
    execution: ExecutionSpec = attrs.field(factory=ExecutionSpec)
    output: OutputSpec = attrs.field(factory=OutputSpec)

    def __attrs_post_init__(self) -> None:
        modality, prompts = self.data.modality, self.prompts
        if "+" in modality and (prompts.reference is not None or prompts.reference_key or prompts.reference_modality):
            raise ValueError(
                f"modality={self.data.modality!r} combines modalities; k-shot references are per modality: "
                "annotate one modality with k-shot, or use zero-shot/puzzle prompts"
            )
        if prompts.reference is None and prompts.reference_modality not in (None, modality):
            raise ValueError(
                f"reference_modality={prompts.reference_modality!r} needs reference= (a labelled data set of "
                f"that modality); without it the query's own labelled cells, of modality {modality!r}, are used"
            )

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> RunSpec:
        """A spec from ``tl.annotate``'s keyword arguments (unknown keywords are a ``TypeError``)."""
        unknown = sorted(set(kwargs) - set(_PART_OF))
        if unknown:
            import difflib

            hints = [difflib.get_close_matches(u, list(_PART_OF), n=1) for u in unknown]
            fix = "; ".join(f"did you mean {h[0]!r}?" for h in hints if h)
            raise TypeError(
                f"unknown run parameter(s) {', '.join(map(repr, unknown))}"
                f"{'; ' + fix if fix else ''} (cellscribe.tl.annotate's signature lists them)"
            )
        grouped: dict[str, dict[str, Any]] = {part: {} for part in PARTS}
        for name, value in kwargs.items():
            grouped[_PART_OF[name]][name] = value
        return cls(**{part: PARTS[part](**values) for part, values in grouped.items()})

    def __getitem__(self, name: str) -> Any:
        """A parameter by its keyword name (``spec["n_genes"]``)."""
        try:
            return getattr(getattr(self, _PART_OF[name]), name)
        except KeyError:
            raise KeyError(f"{name!r} is not a run parameter") from None

    def kwargs(self) -> dict[str, Any]:
        """Every parameter by keyword name (what ``tl.annotate`` was, or would be, called with)."""
        return {a.name: getattr(getattr(self, part), a.name) for part, a in parameters()}

    def replace(self, **changes: Any) -> RunSpec:
        """A new, validated spec with ``changes`` (keyword names) applied."""
        return type(self).from_kwargs(**{**self.kwargs(), **changes})

    def changed(self) -> dict[str, Any]:
        """The parameters that differ from their defaults."""
        defaults = RunSpec().kwargs()
        return {k: v for k, v in self.kwargs().items() if not _same(v, defaults[k])}

    def to_params(self) -> dict[str, Any]:
        """The spec as plain, JSON-able values: the run-defining part of ``uns[key_added]["params"]``.

        ``model`` is the model's name (a loaded model's too); ``reference`` is left out (an AnnData is
        not a parameter: :meth:`from_params` takes it again, and the run records where it came from).
        """
        out = {}
        for name, value in self.kwargs().items():
            if name == "reference":
                continue
            if name == "model":
                value = self.model.name if value is not None else None
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = {str(k): _jsonable(v) for k, v in value.items()}
            out[name] = value
        return out

    @classmethod
    def from_params(cls, params: Mapping[str, Any], *, reference: Any = None) -> RunSpec:
        """Re-create a run's spec from its ``uns[key_added]["params"]`` (as written, or read back from
        ``.h5ad``/``.h5mu``, where missing entries mean ``None``/empty). Entries that record what the run
        found rather than what it was asked (versions, resolved strategy, ...) are ignored. Parameters its
        model set (``"set_by_model"``: a manifest's formats, a backend's sentence preferences) start
        from what the user gave, and the model sets them again. A k-shot run with an external reference
        needs ``reference=`` again."""
        values = {name: _plain_tree(params[name]) for name in _PART_OF if name in params and name != "reference"}
        given = _plain_tree(params.get("as_given", {}))
        for name in _plain_tree(params.get("set_by_model", [])):
            values.pop(name, None)
            if name in given:  # absent: the user kept the default
                values[name] = given[name]
        if reference is not None:
            values["reference"] = reference
        return cls.from_kwargs(**values)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # objects (an AnnData) that do not compare
        return a is b


def _jsonable(value: Any) -> Any:
    value = _plain(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _plain_tree(value: Any) -> Any:
    value = _plain(value)
    if isinstance(value, Mapping):
        return {str(k): _plain_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_tree(v) for v in value]
    return value


# -------------------------------------------------------------------------------------------------
# What is derived from the declarations
# -------------------------------------------------------------------------------------------------


def signature(*, first: Sequence[inspect.Parameter] = (), last: Sequence[inspect.Parameter] = (),
              parts: Sequence[str] | None = None, returns: Any = inspect.Signature.empty) -> inspect.Signature:
    """A function signature with every run parameter (of ``parts``) as a keyword-only argument, between
    ``first`` and ``last``, defaults and annotations as declared."""
    params = list(first)
    for _, a in parameters(parts):
        annotation = a.type if a.type is not None else inspect.Parameter.empty
        if a.default is None and isinstance(annotation, str) and "None" not in annotation and annotation != "Any":
            annotation += " | None"  # options mappings: None is empty
        params.append(inspect.Parameter(a.name, inspect.Parameter.KEYWORD_ONLY, default=a.default,
                                        annotation=annotation))
    params.extend(last)
    return inspect.Signature(params, return_annotation=returns)


def parameters_doc(parts: Sequence[str] | None = None, indent: str = "    ") -> str:
    """The numpydoc *Parameters* entries of every run parameter (of ``parts``), in declaration order."""
    import textwrap

    lines = []
    for _, a in parameters(parts):
        lines.append(f"{indent}{a.name}")
        lines.extend(textwrap.wrap(a.metadata["doc"], width=100, initial_indent=indent * 2,
                                   subsequent_indent=indent * 2, break_on_hyphens=False))
    return "\n".join(lines)


def split(params: Mapping[str, Any], parts: Sequence[str]) -> dict[str, Any]:
    """The spec parts ``parts`` made from ``params`` (keyword names); a ``TypeError`` for a keyword
    that belongs to none of them."""
    known = {a.name: part for part, a in parameters(parts)}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                        f"accepted: {', '.join(known)}")
    return {part: PARTS[part](**{k: v for k, v in params.items() if known[k] == part}) for part in parts}


# -------------------------------------------------------------------------------------------------
# Fine-tuning (``cellscribe finetune``, ``cellscribe export``): the training parameters, declared as the
# run parameters are. Not a part of RunSpec: a training run also takes the data, sentence and prompt
# parts of a RunSpec (the records are rendered exactly as a run renders its prompts); these say what
# the answers are, how cells are split and how the adapter is trained.
# -------------------------------------------------------------------------------------------------

#: The ``obs`` columns tried, in order, to hold out whole donors or batches for validation.
SPLIT_COLUMNS = ("donor_id", "donor", "individual", "patient", "subject", "sample_id", "sample", "batch")


def _fraction(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{attribute.name} must be a number in [0, 1), got {value!r}")


def _positive_number(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{attribute.name} must be a positive number, got {value!r}")


def _float(value: Any) -> Any:
    value = _plain(value)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


@attrs.frozen(kw_only=True)
class FinetuneSpec:
    """What a fine-tuning run learns and how (``cellscribe.finetune``; see :mod:`cellscribe.core.run.finetune`)."""

    label_key: str = param(
        validator=_text,
        doc="The ``obs`` column of true labels: the answers the adapter learns, and its label vocabulary.",
        flag=Flag(("--label-key",), "obs column of true labels (the answers learned)."),
    )
    base: str | None = param(
        validator=_optional_text,
        doc="The base model the adapter is trained on: a local model folder or a hub id (transformers). "
            "``cellscribe export`` uses it, when given, to count prompt tokens and to add the rendered "
            "prompt text to each record.",
        flag=Flag(("--base",), "Base model (local folder or hub id) the adapter is trained on."),
    )
    split_key: str | None = param(
        validator=_optional_text,
        doc="An ``obs`` column of donors or batches: whole groups are held out for validation. Default: "
            "the first of " + ", ".join(SPLIT_COLUMNS) + " that the data has, else a random split "
            "stratified by label.",
        flag=Flag(("--split-key",), "obs column of donors/batches held out whole (default: donor_id, "
                  "donor, ... when present, else a stratified random split)."),
    )
    validation_fraction: float = param(
        0.3, converter=_float, validator=_fraction,
        doc="Share of the labelled cells held out for validation (0: train on every cell, no validation).",
        flag=Flag(("--validation-fraction",), "Share of labelled cells held out for validation.", type="float",
                  show_default=True),
    )
    epochs: float = param(
        1.0, converter=_float, validator=_positive_number,
        doc="Passes over the training records.",
        flag=Flag(("--epochs",), "Passes over the training records.", type="float", show_default=True),
    )
    learning_rate: float = param(
        1e-3, converter=_float, validator=_positive_number,
        doc="Peak learning rate (linear decay after a short warm-up).",
        flag=Flag(("--learning-rate",), "Peak learning rate.", type="float", show_default=True),
    )
    lora_rank: int = param(
        8, converter=_integer, validator=_positive,
        doc="LoRA rank ``r``.",
        flag=Flag(("--lora-rank",), "LoRA rank r.", type="int", show_default=True),
    )
    lora_alpha: int = param(
        16, converter=_integer, validator=_positive,
        doc="LoRA scaling ``alpha``.",
        flag=Flag(("--lora-alpha",), "LoRA alpha.", type="int", show_default=True),
    )
    lora_dropout: float = param(
        0.05, converter=_float, validator=_fraction,
        doc="Dropout on the LoRA inputs while training.",
        flag=Flag(("--lora-dropout",), "LoRA dropout.", type="float", show_default=True),
    )
    lora_layers: int | None = param(
        converter=_optional_int, validator=_positive,
        doc="Put LoRA weights only on the last N transformer layers (default: every layer). Fewer layers "
            "train faster: the backward pass stops at the lowest adapted layer.",
        flag=Flag(("--lora-layers",), "Adapt only the last N layers (default: all).", type="int"),
    )
    train_batch_size: int | None = param(
        converter=_optional_int, validator=_positive,
        doc="Training records per optimiser step (default: 8 on CPU; on GPU as many as fit the token "
            "budget ``trainer_options={\"max_batch_tokens\": N}``, default 16,384).",
        flag=Flag(("--train-batch-size",), "Records per optimiser step (default: 8 on CPU, by tokens on GPU).",
                  type="int"),
    )
    save_steps: int = param(
        50, converter=_integer, validator=_positive,
        doc="Write a checkpoint every N optimiser steps (``resume=True`` continues from the last one).",
        flag=Flag(("--save-steps",), "Checkpoint every N optimiser steps.", type="int", show_default=True),
    )
    resume: bool = param(
        False, converter=_bool, validator=_is_bool,
        doc="Continue an interrupted run in the same output folder from its last checkpoint (its data, "
            "base and settings must be the same).",
        flag=Flag(("--resume",), "Continue an interrupted run in OUTPUT from its last checkpoint.", kind="flag"),
    )
    reasoning_from: str | None = param(
        validator=_optional_text,
        doc="A teacher model (any ``model=``: ``\"markers\"``, ``\"openai:NAME\"``, a folder) that writes "
            "the reasoning of each training answer; needs ``mode=\"reasoning\"`` (or puzzles). Its "
            "reasoning is kept where its answer agrees with the true label; the other records get the "
            "answer alone. Stored with the dataset (``reasoning.jsonl``).",
        flag=Flag(("--reasoning-from",), "Teacher model writing the reasoning of the answers (markers, "
                  "openai:NAME, a model folder)."),
    )
    eval_decode: str = param(
        "score", validator=_one_of(DECODE_MODES),
        doc="How the final validation annotates the held-out cells with the new adapter.",
        flag=Flag(("--eval-decode",), "Decode mode of the final validation.", type="choice",
                  choices=DECODE_MODES, show_default=True),
    )
    max_eval_cells: int | None = param(
        converter=_optional_int, validator=_positive,
        doc="Validate on at most N held-out cells (a seeded sample; default: all).",
        flag=Flag(("--max-eval-cells",), "Validate on at most N held-out cells.", type="int"),
    )
    trainer: str = param(
        "lora", validator=_text,
        doc="The registered trainer (``cellscribe plugins`` lists them; ``lora``: peft LoRA with "
            "transformers' Trainer).",
        flag=Flag(("--trainer",), "Registered trainer.", show_default=True),
    )
    trainer_options: Mapping[str, Any] = param(
        converter=_options,
        doc="Trainer-specific settings (``target_modules``, ``warmup_ratio``, ``weight_decay``, "
            "``max_batch_tokens``, ``keep_checkpoints`` ...).",
        flag=Flag(("--trainer-option",), "Trainer option (repeat).", kind="pairs", metavar="KEY=VALUE"),
    )

    def to_params(self) -> dict[str, Any]:
        """The settings as plain, JSON-able values (objects in ``trainer_options`` as their text)."""
        out = {a.name: getattr(self, a.name) for a in attrs.fields(FinetuneSpec)}
        # Objects (callbacks) are not settings: left out, so two runs with the same settings compare equal.
        out["trainer_options"] = {str(k): _jsonable(v) for k, v in self.trainer_options.items()
                                  if _plain_tree(v) == _jsonable(v)}
        return out


def finetune_parameters() -> Iterator[attrs.Attribute]:
    """The fine-tuning parameters in declaration order."""
    return iter(attrs.fields(FinetuneSpec))
