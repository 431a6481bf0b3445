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

    def fill(row: int, ann: Annotation) -> None:
        label[row] = ann.label if ann.status == STATUS_OK else None
        conf[row] = np.nan if ann.confidence is None else ann.confidence
        reasoning[row] = ann.reasoning
        status[row] = ann.status
        note[row] = ann.note

    if plan.representatives is None:
        for row in plan.unit_rows.tolist():
            ann = by_unit.get(str(cell_ids[row]))
            if ann is not None:
                fill(row, ann)
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
    frame = pd.DataFrame(
        {
            key_added: pd.Categorical(label),
            f"{key_added}_confidence": conf,
            f"{key_added}_reasoning": reasoning,
            f"{key_added}_status": pd.Categorical(status, categories=[STATUS_OK, STATUS_UNRESOLVED]),
            f"{key_added}_note": note,
        },
        index=pd.Index(cell_ids.astype(str)),
    )
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
    }
    if "clusters" in extra:
        summary["clusters"] = extra["clusters"]
    return frame, summary


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
