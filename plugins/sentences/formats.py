"""The ``jsonl`` sentence file format: one JSON object per cell, for any downstream tool."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd

from cellscribe.core.domain.ranking import encode_names, join_ranked
from cellscribe.core.types import CellSentences

SEP = ", "


def _json_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


class JsonlFormat:
    """JSON Lines: ``{"cell_id": ..., "sentence": ..., "n_genes": ...}`` per cell, in row order.

    ``sentence`` is the cell's genes joined with ``", "`` (empty for a cell with no expressed gene; the
    cell is still written) and ``n_genes`` their number. With ``labels`` (a Series indexed by cell id)
    each object also has ``"label"`` (``null`` for a cell missing from ``labels`` or with a missing
    label). UTF-8, one line per cell, written chunk by chunk.
    """

    name = "jsonl"
    description = "JSON Lines: one {cell_id, sentence, n_genes[, label]} object per cell"
    suffix = ".jsonl"
    sentence = None
    needs_labels = False

    def write(
        self,
        fh: Any,
        chunks: Iterator[CellSentences],
        *,
        labels: pd.Series | None = None,
        obs: pd.DataFrame | None = None,
        **options: Any,
    ) -> int:
        """Write one line per cell of ``chunks`` to the binary file ``fh``; return the number written."""
        if labels is not None:
            labels = pd.Series(labels).set_axis(pd.Index(labels.index).astype(str))
            if not labels.index.is_unique:
                raise ValueError(
                    "labels must be indexed by unique cell ids to be matched to the cells; "
                    "make the cell names unique (AnnData.obs_names_make_unique) first"
                )
        written = 0
        encoded: tuple[Any, tuple[np.ndarray, np.ndarray]] | None = None
        for chunk in chunks:
            # Every chunk of a run shares one vocabulary: escape and encode its names once. A name
            # JSON-escaped on its own stays valid inside the joined string (", " needs no escape).
            if encoded is None or encoded[0] is not chunk.vocabulary:
                escaped = [_json_str(str(g))[1:-1] for g in chunk.vocabulary]
                encoded = (chunk.vocabulary, encode_names(escaped, SEP))
            sentences = join_ranked(encoded[1], chunk.indptr, chunk.indices, SEP)
            cell_ids = [str(c) for c in chunk.cell_ids]
            ids = [_json_str(c) for c in cell_ids]
            lengths = chunk.lengths().tolist()
            if labels is None:
                lines = [
                    f'{{"cell_id": {i}, "sentence": "{s}", "n_genes": {n}}}\n'
                    for i, s, n in zip(ids, sentences, lengths, strict=True)
                ]
            else:
                values = labels.reindex(pd.Index(cell_ids, dtype=object))
                missing = pd.isna(values).to_numpy()
                label_json = [
                    "null" if m else _json_str(str(v))
                    for v, m in zip(values.tolist(), missing.tolist(), strict=True)
                ]
                lines = [
                    f'{{"cell_id": {i}, "sentence": "{s}", "n_genes": {n}, "label": {lab}}}\n'
                    for i, s, n, lab in zip(ids, sentences, lengths, label_json, strict=True)
                ]
            fh.write("".join(lines).encode("utf-8"))
            written += len(lines)
        return written
