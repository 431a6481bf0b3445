"""Fine-tuning: labelled cells -> training records rendered exactly as a run renders its prompts -> a
LoRA adapter that carries its provenance (``cellscribe finetune``, ``cellscribe export``).

=================  =================================================================================
step               what happens
=================  =================================================================================
check              the label column (two classes at least), the split (every label keeps training
                   cells), the output folder: all before a model is loaded
split              whole donors or batches held out for validation when the data has such a column
                   (``FinetuneSpec.split_key``, else the first of :data:`~cellscribe.core.spec.SPLIT_COLUMNS`),
                   else a random split stratified by label; seeded
records            the training cells go through the run's own step 1-2 (:func:`~.plan.plan_run`:
                   modality -> sentence strategy -> prompt strategy), with the label vocabulary as
                   candidates; each prompt's answer is written in its answer format
                   (:mod:`cellscribe.core.answers`), optionally after a teacher's reasoning; the model's
                   ``encode_example`` tokenises the prompt exactly as its ``generate`` does
train              the registered trainer (``lora``) trains on the answer tokens only, with checkpoints
manifest           ``cellscribe_adapter.json`` (:mod:`cellscribe.core.domain.adapters`)
validate           the held-out cells are annotated through ``annotate`` with the saved adapter loaded
                   by ``load_model`` (so the manifest's defaults and checks are exercised), and
                   measured with :mod:`cellscribe.core.evaluation`; the metrics go into the manifest
=================  =================================================================================

What is written (``output`` folder): ``adapter_config.json``, ``adapter_model.safetensors`` (PEFT),
``cellscribe_adapter.json``, ``training_plan.json`` (what a resumed run must match), ``dataset/``
(``train.jsonl``, ``validation.jsonl`` in the ``chat-jsonl`` layout, ``reasoning.jsonl`` with a
teacher), ``validation_answers.csv`` (each held-out cell: true label, answer, confidence), and
``checkpoints/`` while training (removed at the end unless
``trainer_options={"keep_checkpoints": True}``).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pandas as pd

from ..answers import FREE, opens_think
from ..plugins import Host, get_host
from ..spec import SPLIT_COLUMNS, FinetuneSpec, RunSpec
from ..types import STATUS_OK, Prompt
from .data import label_column, select_modality_data
from .plan import RunPlan, plan_run

log = logging.getLogger(__name__)

__all__ = [
    "Split",
    "TrainingRecord",
    "TrainingSet",
    "EXPORT_FORMATS",
    "split_cells",
    "check_training_data",
    "training_set",
    "finetune",
    "export_training_set",
]

#: ``cellscribe export --format``: the record layouts made here, and the sentence formats reused.
EXPORT_FORMATS = ("chat-jsonl", "hf-datasets", "cellreasoner", "cellpuzzles")
PLAN_FILE = "training_plan.json"
DATASET_DIR = "dataset"
CHECKPOINTS = "checkpoints"
VALIDATION_ANSWERS = "validation_answers.csv"


# -------------------------------------------------------------------------------------------------
# Labels and the split
# -------------------------------------------------------------------------------------------------


@attrs.frozen(eq=False)
class Split:
    """Rows (of the modality's AnnData) of the training and validation cells; ``key`` the ``obs`` column
    whose groups were held out whole (``None``: a random split stratified by label)."""

    train: np.ndarray
    validation: np.ndarray
    key: str | None
    groups_validation: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        return {
            "n_train": int(len(self.train)), "n_validation": int(len(self.validation)),
            "split_key": self.key,
            "method": f"whole groups of obs[{self.key!r}] held out" if self.key else "random, stratified by label",
            "groups_validation": list(self.groups_validation),
        }


def split_cells(obs: pd.DataFrame, labels: pd.Series, ft: FinetuneSpec, seed: int) -> Split:
    """Split the labelled cells (``labels`` not null, positionally aligned with ``obs``).

    With a split column (``ft.split_key`` or the first of :data:`SPLIT_COLUMNS` present with at least
    two groups), whole groups go to validation, in a seeded random order, until they hold
    ``ft.validation_fraction`` of the labelled cells (at least one group, never all). Without one, each
    label's cells are split at random in that proportion (at least one cell stays in training).
    """
    labelled = np.flatnonzero(labels.notna().to_numpy())
    rng = np.random.default_rng(seed)
    key = ft.split_key
    if key is not None and key not in obs.columns:
        raise KeyError(f"split_key={key!r} is not an obs column; available: {list(obs.columns)}")
    if key is None:
        key = next((c for c in SPLIT_COLUMNS if c in obs.columns and obs[c].iloc[labelled].nunique() > 1), None)
    if ft.validation_fraction == 0:
        return Split(labelled, labelled[:0], None)
    if key is not None:
        groups = obs[key].iloc[labelled].astype(str).to_numpy()
        names = pd.unique(groups)
        if len(names) < 2:
            raise ValueError(f"obs[{key!r}] has one group among the labelled cells; a held-out split needs two. "
                             "Pass another split_key, or validation_fraction=0")
        sizes = pd.Series(groups).value_counts()
        held, n_held, target = [], 0, ft.validation_fraction * len(labelled)
        for name in rng.permutation(names):
            if n_held >= target or len(held) == len(names) - 1:
                break
            held.append(str(name))
            n_held += int(sizes[name])
        is_val = np.isin(groups, held)
        return Split(labelled[~is_val], labelled[is_val], key, tuple(sorted(held)))
    values = labels.iloc[labelled].astype(str).to_numpy()
    is_val = np.zeros(len(labelled), dtype=bool)
    for label in sorted(set(values)):
        rows = np.flatnonzero(values == label)
        n_val = min(int(round(ft.validation_fraction * len(rows))), len(rows) - 1)
        is_val[rng.permutation(rows)[:n_val]] = True
    return Split(labelled[~is_val], labelled[is_val], None)


def check_training_data(adata: Any, ft: FinetuneSpec, seed: int) -> tuple[pd.Series, Split, tuple[str, ...]]:
    """The labels, the split and the label vocabulary of ``adata``; a one-line error for a label column
    that is missing or has one class, repeated cell names, or a label left without training cells."""
    labels = label_column(adata.obs, ft.label_key, "the data")
    if not adata.obs_names.is_unique:
        raise ValueError("the data's obs names repeat; training records are keyed by cell: make them unique "
                         "first (adata.obs_names_make_unique())")
    present = labels.dropna().astype(str)
    classes = sorted(set(present))
    if len(classes) < 2:
        found = f"one class ({classes[0]!r})" if classes else "no labelled cell"
        raise ValueError(f"obs[{ft.label_key!r}] has {found}: a classifier needs at least two labels to learn. "
                         "Choose another label column or add labelled cells of other types")
    split = split_cells(adata.obs, labels, ft, seed)
    trained = set(labels.iloc[split.train].astype(str))
    missing = [c for c in classes if c not in trained]
    if missing:
        n = present.value_counts()
        where = f"the held-out groups of obs[{split.key!r}]" if split.key else "the validation split"
        raise ValueError(
            f"label(s) {', '.join(f'{m!r} ({n[m]} cells)' for m in missing)} have no cell in the training split: "
            f"all are in {where}. Pass another split_key or seed, lower validation_fraction, or drop those cells"
        )
    return labels, split, tuple(classes)


# -------------------------------------------------------------------------------------------------
# Records
# -------------------------------------------------------------------------------------------------


@attrs.frozen(eq=False)
class TrainingRecord:
    """One training example: the prompt as a run makes it, the answer it should get (in the prompt's
    answer format), the true labels of its units, its split and the teacher's reasoning if any."""

    prompt: Prompt
    answer: str
    labels: tuple[str, ...]
    split: str
    reasoning: str = ""

    def chat(self) -> dict[str, Any]:
        """The ``chat-jsonl`` record: ``messages`` (the prompt's messages, then the assistant's answer),
        the same split into ``prompt``/``completion`` (TRL's conversational prompt-completion layout),
        and the cells, labels, split and strategy. A format that edits the rendered text (CellReasoner
        deletes ``<think>`` from it and may open the reasoning after the generation prompt) has the edit
        applied to the message texts, so the chat template renders what the model is sent."""
        messages = []
        for m in self.prompt.messages:
            content = str(m["content"])
            for token in self.prompt.remove_from_rendered:
                content = content.replace(token, "")
            messages.append({"role": str(m["role"]), "content": content})
        completion = [{"role": "assistant", "content": self.prompt.response_prefix + self.answer}]
        return {
            "messages": messages + completion, "prompt": messages, "completion": completion,
            "cell_ids": list(self.prompt.unit_ids), "labels": list(self.labels), "split": self.split,
            "strategy": self.prompt.strategy,
        }


def answer_text(prompt: Prompt, labels: Sequence[str], reasoning: str = "") -> str:
    """The output that answers ``labels`` for ``prompt``: one label (after the reasoning when the prompt
    opened a think block or reasoning is given) or a tagged answer, written by the answer grammar."""
    inside = opens_think(prompt.response_prefix)
    if prompt.answer.tagged or inside or reasoning:
        return prompt.answer.text(list(labels), reasoning, inside_think=inside)
    (label,) = labels
    return str(label)


@attrs.define(eq=False)
class TrainingSet:
    """The records of a training run (see :func:`training_set`)."""

    records: list[TrainingRecord]
    plan: RunPlan
    adata: Any
    mod: str | None
    labels: pd.Series
    vocabulary: tuple[str, ...]
    split: Split
    train_adata: Any
    teacher: dict[str, Any] | None = None
    teacher_records: list[dict[str, Any]] | None = None

    def of(self, split: str) -> list[TrainingRecord]:
        return [r for r in self.records if r.split == split]

    def fingerprint(self) -> str:
        """SHA-256 over every training record (messages, edits, answer) in order: equal fingerprints mean
        the same training data, whatever tokenizer reads it."""
        digest = hashlib.sha256()
        for r in self.of("train"):
            digest.update(json.dumps([[dict(m) for m in r.prompt.messages], list(r.prompt.remove_from_rendered),
                                      r.prompt.response_prefix, r.answer], ensure_ascii=False).encode("utf-8"))
        return "sha256:" + digest.hexdigest()


def _record_spec(spec: RunSpec, vocabulary: Sequence[str], label_key: str, model: Any) -> RunSpec:
    """The run spec records are made with: the user's data, sentence and prompt settings, the label
    vocabulary as candidates, the cells' own labels as k-shot reference, and the model that will read
    them (for its sentence preferences and tokenizer)."""
    return RunSpec.from_kwargs(**{
        **spec.kwargs(), "mod": None, "candidates": list(vocabulary), "reference": None,
        "reference_key": label_key, "model": model, "sidecar": False, "checkpoint": None,
        **{name: default for name, default in _load_defaults().items()},
    })


def _load_defaults() -> dict[str, Any]:
    from ..models import LOAD_OPTIONS

    return dict(LOAD_OPTIONS)


def _teacher_reasoning(teacher: Any, plan: RunPlan, prompts: Sequence[Prompt], truth: Mapping[str, str],
                       host: Host, progress: bool) -> tuple[dict[int, str], list[dict[str, Any]], dict[str, Any]]:
    """Let ``teacher`` (a loaded :class:`~cellscribe.core.models.Model`) answer the training prompts;
    keep its reasoning where every one of its labels is the true one."""
    from tqdm.auto import tqdm

    loaded = teacher.loaded
    loaded.use_modality(plan.spec.data.modality)
    loaded.use_assay(plan.assay)
    started = time.perf_counter()
    with tqdm(total=len(prompts), desc="teacher", unit="prompt", disable=None if progress else True) as bar:
        generations = loaded.generate(list(prompts), settings={}, progress=bar.update)
    kept: dict[int, str] = {}
    stored = []
    for i, (prompt, generation) in enumerate(zip(prompts, generations, strict=True)):
        decoded = host.registry.get("decoder", prompt.decoder).decode(generation, prompt)
        said = [a.label if a.status == STATUS_OK else None for a in decoded]
        gold = [truth[u] for u in prompt.unit_ids]
        agrees = all(s is not None and s.casefold() == g.casefold() for s, g in zip(said, gold))
        reasoning = FREE.split_reasoning(prompt.response_prefix + generation.text)[0]
        if agrees and reasoning:
            kept[i] = reasoning
        stored.append({"cell_ids": list(prompt.unit_ids), "labels": gold, "teacher_labels": said,
                       "agrees": agrees, "reasoning": reasoning, "kept": i in kept})
    summary = {"model": teacher.name, "n_prompts": len(prompts), "n_kept": len(kept),
               "seconds": round(time.perf_counter() - started, 1)}
    log.info("teacher %s: reasoning kept for %d of %d prompts (its answer was right)", teacher.name, len(kept),
             len(prompts))
    return kept, stored, summary


def training_set(data: Any, spec: RunSpec, ft: FinetuneSpec, *, model: Any = None, teacher: Any = None,
                 with_validation: bool = True, host: Host | None = None, progress: bool = True) -> TrainingSet:
    """The training (and validation) records of ``data`` (never modified).

    The training cells, in a seeded random order (so puzzles mix types), are planned as a run
    (:func:`~.plan.plan_run`) with ``spec``'s data, sentence and prompt settings, the label vocabulary
    as candidates and their own labels as the k-shot reference; ``model`` (a loaded
    :class:`~cellscribe.core.models.Model`, else the base's name) gives the sentence preferences and
    the tokenizer that counts prompt tokens, as it would at inference. Validation records are made the
    same way from the held-out cells, with the training cells as the k-shot reference. ``teacher``
    writes the reasoning of the training answers. Writes nothing.
    """
    host = host or get_host()
    if "+" in spec.data.modality:
        raise ValueError(f"modality={spec.data.modality!r}: an adapter serves one modality; train one per "
                         "modality (each is loaded for its own, see load_model(adapters=...))")
    component = host.registry.get("modality", spec.data.modality)
    adata, mod = select_modality_data(data, component, spec.data.mod)
    labels, split, vocabulary = check_training_data(adata, ft, spec.prompts.seed)
    if teacher is not None and spec.prompts.mode != "reasoning" and spec.prompts.prompt != "puzzle":
        raise ValueError("reasoning targets need prompts that ask for reasoning: pass mode='reasoning' "
                         "(--mode reasoning) or the puzzle prompt")
    rng = np.random.default_rng(spec.prompts.seed)
    train_adata = adata[rng.permutation(split.train)].copy()
    # Without a base, the records are made for a transformers model in general (no model's preferences).
    model_ref = model if model is not None else ft.base or "transformers"
    truth = labels.astype(object).where(labels.notna(), None).astype(str)
    truth.index = adata.obs_names.astype(str)
    count = model.loaded.count_tokens if model is not None else None

    plan = plan_run(train_adata, _record_spec(spec, vocabulary, ft.label_key, model_ref), host=host,
                    count_tokens=count)
    reasoning: dict[int, str] = {}
    stored = summary = None
    if teacher is not None:
        reasoning, stored, summary = _teacher_reasoning(teacher, plan, plan.prompts, truth, host, progress)
    records = []
    for i, prompt in enumerate(plan.prompts):
        gold = tuple(truth[u] for u in prompt.unit_ids)
        r = reasoning.get(i, "")
        records.append(TrainingRecord(prompt, answer_text(prompt, gold, r), gold, "train", r))
    if with_validation and len(split.validation):
        val_adata = adata[split.validation].copy()
        vspec = _record_spec(spec, vocabulary, ft.label_key, model_ref).replace(reference=train_adata)
        vplan = plan_run(val_adata, vspec, host=host, count_tokens=count)
        for prompt in vplan.prompts:
            gold = tuple(truth[u] for u in prompt.unit_ids)
            records.append(TrainingRecord(prompt, answer_text(prompt, gold), gold, "validation"))
    log.info("%d training records (%d cells), %d validation records (%d cells); %d labels",
             sum(r.split == "train" for r in records), len(split.train),
             sum(r.split == "validation" for r in records), len(split.validation), len(vocabulary))
    return TrainingSet(records, plan, adata, mod, labels, vocabulary, split, train_adata, summary, stored)


# -------------------------------------------------------------------------------------------------
# Writing datasets
# -------------------------------------------------------------------------------------------------


def _chat_records(ts: TrainingSet, split: str, render: Any = None) -> list[dict[str, Any]]:
    out = []
    for r in ts.of(split):
        record = r.chat()
        if render is not None:
            record["text"] = render(r.prompt)  # the exact model input, before the answer
        out.append(record)
    return out


def _write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_dataset(ts: TrainingSet, folder: Path, render: Any = None) -> dict[str, int]:
    """``folder/train.jsonl``, ``folder/validation.jsonl`` (``chat-jsonl``) and, with a teacher,
    ``folder/reasoning.jsonl``; returns the records per file."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "validation"):
        records = _chat_records(ts, split, render)
        _write_jsonl(folder / f"{split}.jsonl", records)
        counts[split] = len(records)
    if ts.teacher_records is not None:
        _write_jsonl(folder / "reasoning.jsonl", [{"teacher": ts.teacher["model"], **r} for r in ts.teacher_records])
        counts["reasoning"] = len(ts.teacher_records)
    return counts


def export_training_set(data: Any, output: str | Path, fmt: str, spec: RunSpec, ft: FinetuneSpec, *,
                        host: Host | None = None, progress: bool = True,
                        format_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the training set of ``data`` for another trainer, in ``fmt``:

    - ``chat-jsonl``: one JSON object per line (``messages``, ``prompt``/``completion``, ``cell_ids``,
      ``labels``, ``split``, ``strategy``; ``text`` the rendered prompt when ``ft.base`` is a model
      cellscribe can load), training records then validation records;
    - ``hf-datasets``: a Hugging Face ``datasets`` folder (``DatasetDict.save_to_disk``) with
      ``train`` and ``validation`` splits of the same records (needs ``datasets``);
    - ``cellreasoner`` / ``cellpuzzles``: the existing sentence formats of every labelled cell
      (``cellscribe sentences --format``; no split).

    ``output`` must not exist. With ``ft.reasoning_from`` the teacher's records go beside the output
    (``<output>.reasoning.jsonl``, or ``reasoning.jsonl`` in the folder). Returns the counts written.
    """
    from ..models import load_model

    host = host or get_host()
    output = Path(output)
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if output.exists():
        raise FileExistsError(f"{output} already exists; choose a new path")
    if fmt in ("cellreasoner", "cellpuzzles"):
        from . import write_sentences

        n = write_sentences(
            data, output, spec.data, sentence=None if spec.sentences.sentence == "auto" else spec.sentences.sentence,
            n_genes=spec.sentences.n_genes, sentence_options=dict(spec.sentences.sentence_options), format=fmt,
            label_key=ft.label_key, reasoning=spec.prompts.mode == "reasoning", format_options=format_options,
            host=host,
        )
        return {"records": n, "format": fmt}
    model = None
    if ft.base is not None:
        model = load_model(ft.base, **spec.model.load_options(), host=host)
    teacher = load_model(ft.reasoning_from, host=host) if ft.reasoning_from else None
    ts = training_set(data, spec, ft, model=model, teacher=teacher, host=host, progress=progress)
    render = model.loaded.render if model is not None and model.loaded.trainable() is not None else None
    counts: dict[str, Any] = {"format": fmt, "fingerprint": ts.fingerprint(), **ts.split.describe()}
    if fmt == "chat-jsonl":
        records = _chat_records(ts, "train", render) + _chat_records(ts, "validation", render)
        tmp = output.with_name(f".{output.name}.partial")
        _write_jsonl(tmp, records)
        tmp.replace(output)
        counts["records"] = len(records)
    else:
        try:
            import datasets
        except ImportError as exc:
            raise ValueError("--format hf-datasets needs the 'datasets' package: pip install 'cellscribe[finetune]'") from exc
        splits = {s: _chat_records(ts, s, render) for s in ("train", "validation")}
        dd = datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in splits.items() if r})
        dd.save_to_disk(str(output))
        counts["records"] = {s: len(r) for s, r in splits.items()}
    if ts.teacher_records is not None:
        beside = output / "reasoning.jsonl" if output.is_dir() else output.with_name(output.name + ".reasoning.jsonl")
        _write_jsonl(beside, [{"teacher": ts.teacher["model"], **r} for r in ts.teacher_records])
        counts["reasoning"] = str(beside)
    return counts


# -------------------------------------------------------------------------------------------------
# Training
# -------------------------------------------------------------------------------------------------


def _check_output(output: Path, ft: FinetuneSpec) -> None:
    from ..domain.adapters import ADAPTER_MANIFEST

    if ft.resume:
        if not (output / PLAN_FILE).is_file():
            raise ValueError(f"resume=True but {output} holds no interrupted training run ({PLAN_FILE} is missing); "
                             "drop --resume to start one")
        if (output / ADAPTER_MANIFEST).is_file():
            raise ValueError(f"{output} holds a finished adapter ({ADAPTER_MANIFEST}); nothing to resume")
    elif output.exists():
        raise FileExistsError(f"{output} already exists; choose a new adapter folder, or pass --resume "
                              "(resume=True) to continue the interrupted run in it")
    elif not output.parent.exists():
        raise FileNotFoundError(f"the folder {output.parent} does not exist; create it first")


def _check_resume(output: Path, plan: Mapping[str, Any]) -> None:
    """A resumed run must train the same records on the same base with the same settings."""
    before = json.loads((output / PLAN_FILE).read_text(encoding="utf-8"))
    for key, what in (("base_fingerprint", "base model weights"), ("base_model", "base model"),
                      ("fingerprint", "training records"), ("finetune", "training settings")):
        if before.get(key) != plan.get(key):
            raise ValueError(f"cannot resume in {output}: its run used other {what} ({key} differs). Resume "
                             "with the same data, base and settings, or train into a new folder")


def _lineage_accuracy(grades: np.ndarray) -> float:
    """Share of cells whose answer is at least right at the major-lineage level (grade >= 0.5 on
    CellReasoner's scale)."""
    return float(np.mean(np.nan_to_num(grades, nan=0.0) >= 0.5)) if len(grades) else float("nan")


def validate_adapter(ts: TrainingSet, output: Path, spec: RunSpec, ft: FinetuneSpec, *, host: Host,
                     progress: bool) -> dict[str, Any]:
    """Annotate the held-out cells with the adapter in ``output`` (loaded by :func:`load_model`, its
    manifest supplying the run's settings) and measure the answers with cellscribe's metrics; write each
    cell's true label, answer and confidence to ``output/validation_answers.csv``."""
    from ..evaluation.evaluate import evaluate_labels
    from ..models import load_model
    from . import annotate

    rows = ts.split.validation
    if ft.max_eval_cells is not None and len(rows) > ft.max_eval_cells:
        rows = np.sort(np.random.default_rng(spec.prompts.seed).choice(rows, ft.max_eval_cells, replace=False))
    cells = ts.adata[rows].copy()
    started = time.perf_counter()
    model = load_model(ft.base, adapters={spec.data.modality: str(output)}, **spec.model.load_options(), host=host)
    key = "cellscribe_validation"
    data_kw = {k: spec[k] for k in ("modality", "layer", "use_raw", "modality_options", "chunk_size")}
    run_spec = RunSpec.from_kwargs(**data_kw, model=model, decode=ft.eval_decode, reference=ts.train_adata,
                                   reference_key=ft.label_key, seed=spec.prompts.seed, sidecar=False,
                                   progress=progress, key_added=key, generation=dict(spec.generation.generation))
    annotate(cells, run_spec, host=host)
    truth = ts.labels.iloc[rows].astype(str).to_numpy()
    answers = cells.obs[key].astype(object).to_numpy()
    confidence = cells.obs[f"{key}_confidence"].to_numpy()
    result = evaluate_labels(truth, answers, confidence, name="validation", cells=cells.obs_names)
    pd.DataFrame({"cell": cells.obs_names, "label": truth, "answer": answers, "confidence": confidence}).to_csv(
        output / VALIDATION_ANSWERS, index=False)
    metrics = {
        "n_cells": result.n_cells, "decode": ft.eval_decode, "accuracy": result.accuracy,
        "lineage_accuracy": _lineage_accuracy(result.grades), "graded_score": result.graded_score,
        "macro_f1": result.macro_f1, "resolved": result.n_resolved / max(result.n_cells, 1),
        "ece": None if np.isnan(result.ece) else result.ece,
        "per_label_recall": {str(k): float(v) for k, v in result.per_label["recall"].items()}
        if "recall" in result.per_label else {},
        "seconds": round(time.perf_counter() - started, 1),
    }
    del model
    gc.collect()
    return metrics


def finetune(data: Any, output: str | Path, spec: RunSpec, ft: FinetuneSpec, *, host: Host | None = None,
             progress: bool = True) -> Any:
    """Train an adapter on the labelled cells of ``data`` (never modified) into the folder ``output``
    and return its :class:`~cellscribe.core.domain.adapters.AdapterManifest` (see the module docstring
    for the steps and what is written). ``spec`` gives the data, sentence, prompt and model-loading
    settings (as ``tl.annotate`` takes them), ``ft`` the training ones. Bad input (labels, split,
    output folder, a resume that does not match) raises before a model is loaded."""
    from ... import __version__
    from ..domain.adapters import AdapterManifest, base_fingerprint
    from ..models import load_model

    host = host or get_host()
    output = Path(output)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    _check_output(output, ft)
    trainer = host.registry.get("trainer", ft.trainer)
    component = host.registry.get("modality", spec.data.modality)
    adata, _ = select_modality_data(data, component, spec.data.mod)
    check_training_data(adata, ft, spec.prompts.seed)
    fingerprint_base = base_fingerprint(ft.base)
    if ft.resume:
        before = json.loads((output / PLAN_FILE).read_text(encoding="utf-8"))
        if before.get("base_fingerprint") != fingerprint_base or before.get("base_model") != ft.base:
            raise ValueError(f"cannot resume in {output}: it was trained on base {before.get('base_model')!r}, "
                             f"not {ft.base!r} (or its weights changed). Resume with --base "
                             f"{before.get('base_model')}, or train into a new folder")

    model = load_model(ft.base, **spec.model.load_options(), host=host)
    if model.loaded.trainable() is None:
        raise ValueError(f"model {ft.base!r} ({model.backend} backend) cannot be fine-tuned here; give a local "
                         "transformers model folder or hub id as base")
    timings["load"] = time.perf_counter() - t0
    teacher = load_model(ft.reasoning_from, host=host) if ft.reasoning_from else None
    t1 = time.perf_counter()
    ts = training_set(data, spec, ft, model=model, teacher=teacher, host=host, progress=progress)
    del teacher
    examples = []
    for r in ts.of("train"):
        prompt_ids, answer_ids = model.loaded.encode_example(r.prompt, r.answer)
        examples.append({"prompt_ids": prompt_ids, "answer_ids": answer_ids})
    timings["records"] = time.perf_counter() - t1
    plan_record = {"base_model": ft.base, "base_fingerprint": fingerprint_base, "fingerprint": ts.fingerprint(),
                   "finetune": {k: v for k, v in ft.to_params().items() if k != "resume"}}
    if ft.resume:
        _check_resume(output, plan_record)
    else:
        output.mkdir()
        (output / PLAN_FILE).write_text(json.dumps(plan_record, indent=2) + "\n", encoding="utf-8")
    counts = write_dataset(ts, output / DATASET_DIR, model.loaded.render)

    t2 = time.perf_counter()
    outcome = dict(trainer.train(examples, model=model.loaded, output=output, spec=ft, seed=spec.prompts.seed,
                                 resume=ft.resume, progress=progress))
    timings["train"] = time.perf_counter() - t2
    del model
    gc.collect()

    p = ts.plan
    n_tokens = [len(e["prompt_ids"]) + len(e["answer_ids"]) for e in examples]
    manifest = AdapterManifest(
        base_model=ft.base, base_fingerprint=fingerprint_base, base_revision=spec.model.model_options.get("revision"),
        modality=spec.data.modality, mod=ts.mod, sentence=p.sentences.strategy, n_genes=p.spec.sentences.n_genes,
        sentence_options=dict(p.spec.sentences.sentence_options), sentence_params=dict(p.sentences.params),
        sentence_state=p.found["sentence_state"], prompt=p.spec.prompts.prompt, mode=p.spec.prompts.mode,
        prompt_options=dict(p.spec.prompts.prompt_options), k=p.spec.prompts.k if ts.of("train")[0].prompt.examples else None,
        seed=spec.prompts.seed, max_prompt_tokens=p.spec.prompts.max_prompt_tokens, labels=ts.vocabulary,
        label_key=ft.label_key, decode=ft.eval_decode,
        training={"fingerprint": ts.fingerprint(), "n_records": counts["train"], **ts.split.describe(),
                  "label_counts": {str(k): int(v) for k, v in ts.labels.iloc[ts.split.train].value_counts().items()},
                  "tokens_per_record": {"mean": float(np.mean(n_tokens)), "max": int(np.max(n_tokens))},
                  "matrix": p.found["matrix"], "teacher": ts.teacher, "dataset": DATASET_DIR},
        trainer={"name": ft.trainer, **ft.to_params(), **outcome},
        cellscribe_version=__version__,
    )
    manifest.write(output)
    if len(ts.split.validation):
        t3 = time.perf_counter()
        validation = validate_adapter(ts, output, spec, ft, host=host, progress=progress)
        timings["validation"] = time.perf_counter() - t3
        manifest = attrs.evolve(manifest, validation=validation)
    timings["total"] = time.perf_counter() - t0
    manifest = attrs.evolve(manifest, training={**manifest.training,
                                                "seconds": {k: round(v, 1) for k, v in timings.items()}})
    manifest.write(output)
    if not ft.trainer_options.get("keep_checkpoints", False):
        import shutil

        shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)
    log.info("adapter written to %s in %.0f s", output, timings["total"])
    from ..domain.adapters import read_adapter_manifest

    return read_adapter_manifest(output)


# -------------------------------------------------------------------------------------------------
# The Python API (cellscribe.finetune, cellscribe.export_training_set)
# -------------------------------------------------------------------------------------------------


def _specs(params: dict[str, Any]) -> tuple[RunSpec, FinetuneSpec]:
    names = {a.name for a in attrs.fields(FinetuneSpec)}
    ft = FinetuneSpec(**{k: params.pop(k) for k in list(params) if k in names})
    return RunSpec.from_kwargs(**params), ft


def _data(data: Any, spec: RunSpec, host: Host) -> Any:
    from .data import read_input

    return read_input(data, host=host, **spec.data.modality_options) if isinstance(data, (str, Path)) else data


def train_adapter(data: Any, output: str | Path, *, host: Host | None = None, **params: Any) -> Any:
    """Train a LoRA adapter on the labelled cells of ``data`` into the new folder ``output``
    (``cellscribe finetune``); return its :class:`~cellscribe.core.domain.adapters.AdapterManifest`.

    ``data``: an AnnData, MuData or a path. ``params``: the fine-tuning parameters of
    :class:`~cellscribe.core.spec.FinetuneSpec` (``label_key`` and ``base`` are required; ``epochs``,
    ``learning_rate``, ``lora_rank``, ``split_key``, ``validation_fraction``, ``resume``,
    ``reasoning_from`` ...) and the run parameters of ``tl.annotate`` that make the prompts and load the
    base (``modality``, ``mod``, ``sentence``, ``n_genes``, ``prompt``, ``mode``, ``prompt_options``,
    ``seed``, ``device``, ``dtype``, ``progress`` ...). ``data`` is not modified; ``output`` receives the
    adapter, its manifest and its dataset (see :mod:`cellscribe.core.run.finetune`).

    Use the adapter with ``cellscribe.load_model(base, adapters={modality: output})`` or
    ``tl.annotate(..., model=base, adapter=output)``: its manifest sets the sentence, prompt and
    candidates of the run.
    """
    host = host or get_host()
    spec, ft = _specs(dict(params))
    if ft.base is None:
        raise ValueError("base= is required: the model the adapter is trained on (a local folder or hub id)")
    return finetune(_data(data, spec, host), output, spec, ft, host=host, progress=spec.output.progress)


def export(data: Any, output: str | Path, *, format: str = "chat-jsonl", host: Host | None = None,
           format_options: Mapping[str, Any] | None = None, **params: Any) -> dict[str, Any]:
    """Write the training set of ``data`` to ``output`` in ``format`` (``cellscribe export``; see
    :func:`export_training_set`); ``params`` as for :func:`train_adapter` (``label_key`` required,
    ``base`` optional). Returns the counts written."""
    host = host or get_host()
    spec, ft = _specs(dict(params))
    return export_training_set(_data(data, spec, host), output, format, spec, ft, host=host,
                               progress=spec.output.progress, format_options=format_options)
