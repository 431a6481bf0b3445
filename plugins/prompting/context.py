"""Donor and sample context sentences from ``obs`` (CellPuzzles, FORMATS.md).

The context describes where a cell comes from, using the CELLxGENE schema fields ``sex``,
``development_stage``, ``self_reported_ethnicity``, ``tissue`` and ``disease``::

    The cell is from a {sex} at the {development_stage} with {self_reported_ethnicity} background,
    originating from the {tissue}. The patient has been diagnosed with {disease}.

Rules (each piece is left out when its field is missing or one of nan/unknown/none/na/empty):

- First sentence: ``"The cell is from a {sex}"``, then ``" at the {development_stage}"``,
  ``" with {self_reported_ethnicity} background"``, ``", originating from the {tissue}"``, then
  ``"."``. Without a sex the subject is ``"donor"`` (``"The cell is from a donor at the ..."``); when
  sex, stage and ethnicity are all missing but the tissue is known the sentence is
  ``"The cell originates from the {tissue}."``; with none of the four it is left out.
- Disease: ``"normal"`` (any case) gives ``"The patient is healthy with no diagnosed disease."``, any
  other value ``"The patient has been diagnosed with {disease}."``.
- Then optional dataset-specific sentences: ``templates`` (``{column: "The lung condition is described
  as {}."}``, filled per cell and left out when the value is missing) and ``extra`` (fixed sentences).

Every sentence is followed by one space, so the context ends with a space; that is how the context
precedes ``"Top expressed genes are"`` in Cell-o1's per-cell prompts and how it appears before
``"\\n\\n"`` in the puzzle prompt. A cell with no usable field has the empty context ``""``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ._text import is_missing

#: The CELLxGENE obs columns the context reads, by role.
CONTEXT_FIELDS = ("sex", "development_stage", "self_reported_ethnicity", "tissue", "disease")

HEALTHY = "The patient is healthy with no diagnosed disease."


def context_sentence(
    sex: Any = None,
    development_stage: Any = None,
    self_reported_ethnicity: Any = None,
    tissue: Any = None,
    disease: Any = None,
    *,
    extra: Sequence[str] = (),
) -> str:
    """The context text of one cell (see the module docstring for the rules); ``""`` when empty."""
    vals = [
        None if is_missing(v) else str(v).strip()
        for v in (sex, development_stage, self_reported_ethnicity, tissue)
    ]
    sex_, stage, ethnicity, tissue_ = vals
    sentences = []
    if sex_ or stage or ethnicity:
        text = f"The cell is from a {sex_ or 'donor'}"
        if stage:
            text += f" at the {stage}"
        if ethnicity:
            text += f" with {ethnicity} background"
        if tissue_:
            text += f", originating from the {tissue_}"
        sentences.append(text + ".")
    elif tissue_:
        sentences.append(f"The cell originates from the {tissue_}.")
    if not is_missing(disease):
        disease_ = str(disease).strip()
        sentences.append(
            HEALTHY if disease_.lower() == "normal" else f"The patient has been diagnosed with {disease_}."
        )
    sentences.extend(s.strip() for s in extra if s and s.strip())
    return "".join(s + " " for s in sentences)


def contexts_from_obs(
    obs: pd.DataFrame | None,
    index: Sequence[Any] | None = None,
    *,
    columns: Mapping[str, str] | None = None,
    templates: Mapping[str, str] | None = None,
    extra: Sequence[str] | str = (),
) -> list[str]:
    """The context text of every cell of ``obs`` (or of the cells ``index``, in that order).

    The sentences are built once per distinct combination of the fields, so a million cells from a
    few donors cost a few hundred string operations.

    :param obs: cell metadata; ``None`` gives empty contexts (then ``index`` sets their number).
    :param index: the cells to describe (``obs`` is reindexed to them; unknown ids get no context).
    :param columns: obs column for each field of :data:`CONTEXT_FIELDS` when the data does not use the
        CELLxGENE names (``{"sex": "Sex"}``); fields without a column are left out.
    :param templates: ``{column: "sentence with {}"}``: dataset-specific sentences filled per cell.
    :param extra: fixed sentences appended to every cell's context.
    """
    if isinstance(extra, str):
        extra = [extra]
    if obs is None:
        return [context_sentence(extra=extra)] * (0 if index is None else len(index))
    if index is not None:
        if not obs.index.is_unique:
            raise ValueError("obs has duplicate cell ids; make them unique (adata.obs_names_make_unique())")
        obs = obs.reindex(pd.Index(index))
    mapping = {f: (columns or {}).get(f, f) for f in CONTEXT_FIELDS}
    missing_templates = [c for c in (templates or {}) if c not in obs.columns]
    if missing_templates:
        raise ValueError(
            f"context templates name obs columns that do not exist: {missing_templates}; "
            f"available: {list(obs.columns)}"
        )
    used = [mapping[f] for f in CONTEXT_FIELDS] + list(templates or {})
    table = pd.DataFrame(
        {
            f"c{i}": (
                obs[col].astype(object)
                if col in obs.columns
                else pd.Series(None, index=obs.index, dtype=object)
            )
            for i, col in enumerate(used)
        }
    )
    if len(table) == 0:
        return []
    # One sentence per distinct combination of fields (missing values group together).
    codes = table.groupby(list(table.columns), dropna=False, sort=False).ngroup().to_numpy()
    _, first = np.unique(codes, return_index=True)
    texts = []
    for row in first:
        values = table.iloc[row].tolist()
        fixed = values[: len(CONTEXT_FIELDS)]
        per_cell = [
            template.format(str(value).strip())
            for template, value in zip((templates or {}).values(), values[len(CONTEXT_FIELDS) :], strict=True)
            if not is_missing(value)
        ]
        texts.append(context_sentence(*fixed, extra=[*per_cell, *extra]))
    return [texts[c] for c in codes]
