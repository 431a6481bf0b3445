"""Step 4, results: the decoded answers as per-cell columns (a unit's answer for its cell, or a group's
majority answer for every member) with their Cell Ontology terms, and a summary of counts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from ..types import STATUS_OK, STATUS_UNRESOLVED, Annotation
from .plan import RunPlan
from .units import groupby_note, majority_vote, pooled_note, pooled_vote

#: The note of a cell with no expressed gene (never prompted, never dropped).
EMPTY_NOTE = "no expressed gene in the cell sentence"
#: A run whose answered cells' mean confidence is below this is flagged (:func:`low_confidence_warning`):
#: a calibrated confidence is the model's estimate that the call is right, so below 0.25 the model
#: itself expects at least three of four calls to be wrong.
LOW_CONFIDENCE = 0.25
#: Fewest answered cells with a confidence for the run-level flag (a handful of cells says little).
LOW_CONFIDENCE_MIN_CELLS = 10


def results_frame(
    plan: RunPlan, by_unit: Mapping[str, Annotation], key_added: str,
    label_scores: Mapping[str, Mapping[str, float]] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-cell columns (label, confidence, reasoning, status, note, ontology term; with ``groupby`` the
    group's label and each representative's own answer) and a summary of counts.

    A group's label comes from its resolved representatives' pooled ``label_scores`` (unit id ->
    per-label probabilities, :func:`~.units.pooled_vote`) when the model gave them for every one of
    them, else from their majority vote."""
    cell_ids = plan.sentences.cell_ids
    n = len(cell_ids)
    label = np.full(n, None, dtype=object)
    conf = np.full(n, np.nan)
    reasoning = np.full(n, "", dtype=object)
    status = np.full(n, STATUS_UNRESOLVED, dtype=object)
    note = np.full(n, "", dtype=object)
    empty = plan.sentences.empty()
    note[empty] = EMPTY_NOTE
    extra: dict[str, Any] = {}

    if plan.representatives is None:
        rows = plan.unit_rows
        anns = [by_unit.get(str(u)) for u in cell_ids[rows].tolist()]
        found = np.fromiter((a is not None for a in anns), dtype=bool, count=len(anns))
        if not found.all():
            rows, anns = rows[found], [a for a in anns if a is not None]
        if len(anns):
            label[rows] = _objects([a.label if a.status == STATUS_OK else None for a in anns])
            conf[rows] = [np.nan if a.confidence is None else a.confidence for a in anns]
            reasoning[rows] = _objects([a.reasoning for a in anns])
            status[rows] = _objects([a.status for a in anns])
            note[rows] = _objects([a.note for a in anns])
    else:
        per_cell = np.full(n, None, dtype=object)
        clusters = {}
        codes = plan.groups.astype(str).to_numpy()
        for group, rows in plan.representatives.items():
            anns = [by_unit[str(cell_ids[r])] for r in rows if str(cell_ids[r]) in by_unit]
            for r in rows:
                a = by_unit.get(str(cell_ids[r]))
                per_cell[r] = a.label if a is not None else None
            ok = [a for a in anns if a.status == STATUS_OK]
            ok_scores = [(label_scores or {}).get(a.unit_id) for a in ok]
            confidences = [np.nan if a.confidence is None else a.confidence for a in ok]
            pooled = None
            if ok and all(ok_scores):
                winner, share, mean_conf, pooled = pooled_vote([a.label for a in ok], ok_scores, confidences)
            else:
                winner, share, mean_conf = majority_vote([a.label for a in ok], confidences)
            members = np.flatnonzero(codes == group)
            if winner is None:
                status[members] = STATUS_UNRESOLVED
                note[members] = "no representative of this group was resolved"
                reasoning[members] = anns[0].reasoning if anns else ""
            else:
                label[members] = winner
                status[members] = STATUS_OK
                conf[members] = mean_conf
                reasoning[members] = next((a.reasoning for a in ok if a.label == winner), ok[0].reasoning)
                note[members] = groupby_note(share, len(ok)) if pooled is None else pooled_note(pooled, share, len(ok))
            clusters[group] = {
                "label": winner or "",
                "vote_share": share,
                **({} if pooled is None else {"pooled_probability": round(float(pooled), 4)}),
                "n_representatives": len(rows),
                "representatives": [str(cell_ids[r]) for r in rows],
            }
        extra["per_cell"] = per_cell
        extra["clusters"] = clusters
    columns = {
        key_added: pd.Categorical(label),
        f"{key_added}_confidence": conf,
        f"{key_added}_reasoning": kept_reasoning(reasoning, plan.spec.output.reasoning),
        f"{key_added}_status": pd.Categorical(status, categories=[STATUS_OK, STATUS_UNRESOLVED]),
        f"{key_added}_note": note,
    }
    if plan.spec.output.reasoning == "none":
        del columns[f"{key_added}_reasoning"]
    frame = pd.DataFrame(columns, index=pd.Index(cell_ids.astype(str)))
    if "per_cell" in extra:
        frame[f"{key_added}_cell"] = pd.Categorical(extra["per_cell"])
    ontology_id, ontology_name = map_to_ontology(frame[key_added])
    frame[f"{key_added}_ontology_id"] = ontology_id
    frame[f"{key_added}_ontology_name"] = ontology_name
    counts = frame[key_added].value_counts().to_dict()
    summary = {
        "n_cells": n,
        "n_ok": int((status == STATUS_OK).sum()),
        "n_unresolved": int((status == STATUS_UNRESOLVED).sum()),
        "n_empty": int(empty.sum()),
        "label_counts": {str(k): int(v) for k, v in counts.items()},
        **confidence_summary(conf, status == STATUS_OK),
    }
    if "clusters" in extra:
        summary["clusters"] = extra["clusters"]
    return frame, summary


def confidence_summary(confidence: Any, ok: Any) -> dict[str, Any]:
    """``mean_confidence`` (the mean over answered cells that have a confidence, ``None`` without any)
    and ``n_confident`` (how many such cells), for a run's summary."""
    values = np.asarray(confidence, dtype=np.float64)[np.asarray(ok, dtype=bool)]
    values = values[np.isfinite(values)]
    mean = round(float(values.mean()), 4) if len(values) else None
    return {"mean_confidence": mean, "n_confident": int(len(values))}


def low_confidence_warning(summary: Mapping[str, Any]) -> str:
    """A one-line warning when the model's own confidence says most of a run's calls are wrong (mean
    confidence below :data:`LOW_CONFIDENCE` over at least :data:`LOW_CONFIDENCE_MIN_CELLS` answered
    cells), else ``""``.

    Such calls are close to guesses: the data show little of what the model knows (a sparse peak matrix),
    or the cells differ in ways it cannot tell apart (sorted progenitors that all share one identity).
    The warning names what helps: the labels the user expects as candidates, or a labelled reference.
    """
    mean = summary.get("mean_confidence")
    n = int(summary.get("n_confident") or 0)
    if mean is None or n < LOW_CONFIDENCE_MIN_CELLS or mean >= LOW_CONFIDENCE:
        return ""
    return (
        f"the model's mean confidence is {mean:.2f} over {n} answered cells: by its own estimate most calls are "
        "wrong (the data show little of what it knows, or the cells differ in ways it cannot tell apart); name "
        "the cell types you expect (candidates=, --candidates) or give a labelled reference (prompt='k-shot' "
        "with reference=, or cellscribe.tl.transfer_labels; on the command line --reference or cellscribe "
        "transfer), and read these calls as guesses"
    )


def warn_low_confidence(summary: dict[str, Any]) -> None:
    """Record :func:`low_confidence_warning` in ``summary["warning"]`` (``""`` when none) and, when there
    is one, issue it as a ``UserWarning`` (the command line prints it on stderr)."""
    import warnings

    summary["warning"] = low_confidence_warning(summary)
    if summary["warning"]:
        warnings.warn(summary["warning"], UserWarning, stacklevel=4)


def _objects(values: list[Any]) -> np.ndarray:
    """``values`` as a 1-d object array (never a fixed-width string array, which would pad every text to
    the longest one)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


#: Characters of the reasoning ``reasoning="short"`` keeps per cell (its conclusion).
SHORT_REASONING = 200


def conclusion(text: str, limit: int = SHORT_REASONING) -> str:
    """The conclusion of a reasoning text: its last non-empty line, cut at a word to at most ``limit``
    characters (an ellipsis marks a cut)."""
    text = text.rstrip()
    line = text[text.rfind("\n") + 1 :].strip()
    if len(line) > limit:
        cut = line.rfind(" ", 0, limit)
        line = line[: cut if cut > limit // 2 else limit - 1].rstrip() + "\u2026"
    return line


def kept_reasoning(reasoning: np.ndarray, kept: str) -> np.ndarray:
    """What ``obs[f"{key}_reasoning"]`` keeps of each cell's reasoning (``reasoning=``): ``"short"``
    the :func:`conclusion` (each distinct text shortened once), ``"full"`` all of it."""
    if kept != "short" or len(reasoning) == 0:
        return reasoning
    short: dict[str, str] = {}
    return np.asarray([short[r] if r in short else short.setdefault(r, conclusion(r)) for r in reasoning.tolist()],
                      dtype=object)


def map_to_ontology(labels: pd.Series) -> tuple[pd.Categorical, pd.Categorical]:
    """Cell Ontology id and name of each label (each distinct label looked up once); NaN where a label
    does not map to a term unambiguously (never forced)."""
    from ..domain.ontology import get_ontology

    onto = get_ontology()
    categories = [str(c) for c in pd.Categorical(labels).categories]
    ids = {c: onto.lookup(c) for c in categories}
    values = labels.astype(object).where(labels.notna(), None).tolist()
    id_list = [ids.get(str(v)) if v is not None else None for v in values]
    name_list = [onto.name(i) if i else None for i in id_list]
    return pd.Categorical(id_list), pd.Categorical(name_list)
