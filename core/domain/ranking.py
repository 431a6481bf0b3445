"""Ranking features into cell sentences: the vectorised machinery every sentence strategy shares.

All functions take one CSR chunk (cells x features) and return a ragged result ``(indptr, ranked)``:
the ranked feature positions of row ``i`` are ``ranked[indptr[i]:indptr[i + 1]]``. No Python loop runs
per cell or per gene; the work is a handful of NumPy sorts over the chunk's non-zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp


def _row_ids(chunk: sp.csr_matrix) -> np.ndarray:
    return np.repeat(np.arange(chunk.shape[0], dtype=np.int64), np.diff(chunk.indptr))


def _truncate(rows: np.ndarray, values: np.ndarray, n_rows: int, max_len: int | None):
    """Keep the first ``max_len`` entries of each row (``rows`` sorted); return ``(indptr, values)``."""
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_rows))])
    return _first(indptr, values, max_len)


def _first(indptr: np.ndarray, values: np.ndarray, max_len: int | None):
    """Keep the first ``max_len`` values of every row of a ragged array; return ``(indptr, values)``."""
    indptr = indptr.astype(np.int64, copy=False)
    counts = np.diff(indptr)
    if max_len is None or len(counts) == 0 or counts.max() <= max_len:
        return indptr, values
    rank = np.arange(len(values)) - np.repeat(indptr[:-1], counts)
    return np.concatenate([[0], np.cumsum(np.minimum(counts, max_len))]), values[rank < max_len]


def rank_by_order(
    chunk: sp.csr_matrix, position: np.ndarray, list_length: int, max_len: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Rank each cell's non-zero features by a fixed global order (CellReasoner's ranked HVG list).

    :param chunk: cells x features CSR.
    :param position: for each feature column, its position in the global list, or -1 if absent.
        Several columns may share a position (duplicate symbols): the gene is listed once.
    :param list_length: length of the global list.
    :param max_len: keep at most this many genes per cell (``None``: all).
    :return: ``(indptr, positions)``: positions into the global list, in list order.
    """
    pos = position[chunk.indices]
    hit = np.flatnonzero((pos >= 0) & (chunk.data != 0))
    # A cells x list-positions CSR of the hits; a CSR -> CSC -> CSR round trip is a linear-time
    # counting sort that leaves every row's positions ascending (no comparison sort of all hits).
    ranked = sp.csr_matrix(
        (np.ones(len(hit), dtype=bool), pos[hit], np.searchsorted(hit, chunk.indptr)),
        shape=(chunk.shape[0], list_length),
    ).tocsc().tocsr()
    ranked.sum_duplicates()  # columns sharing a position: the gene is listed once
    return _first(ranked.indptr, ranked.indices.astype(np.int64), max_len)


def rank_by_value(
    chunk: sp.csr_matrix, max_len: int | None, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Rank each cell's features by its own value, highest first (Cell-o1 / Cell2Sentence).

    Only positive values count as expressed. Ties are broken by column order (the feature that comes
    first in ``var`` wins), so the result is deterministic and independent of the storage order.

    :param exclude: optional boolean mask over columns never to rank.
    :return: ``(indptr, columns)``.
    """
    rows = _row_ids(chunk)
    cols = chunk.indices.astype(np.int64, copy=False)
    vals = chunk.data
    keep = vals > 0
    if exclude is not None:
        keep &= ~exclude[cols]
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    order = np.lexsort((cols, -vals.astype(np.float64, copy=False), rows))
    return _truncate(rows[order], cols[order], chunk.shape[0], max_len)


def encode_names(names: Sequence[str], sep: str = ", ") -> tuple[np.ndarray, np.ndarray]:
    """Encode every name followed by ``sep`` into one UTF-8 byte buffer: ``(buffer, offsets)``.

    Name ``j`` plus its separator is ``buffer[offsets[j]:offsets[j + 1]]``; the separator length is
    kept in the returned buffer's metadata by :func:`join_ranked`'s ``sep`` argument.
    """
    tail = sep.encode()
    encoded = [str(n).encode() + tail for n in names]
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def _ragged_gather(buffer: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> bytes:
    """``b"".join(buffer[s:s + n] for s, n in zip(starts, lengths))`` without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return b""
    step = np.ones(total, dtype=np.int64)
    piece_start = np.cumsum(lengths) - lengths
    nonempty = lengths > 0
    first = piece_start[nonempty]
    s, n = starts[nonempty], lengths[nonempty]
    step[first[0]] = s[0]
    step[first[1:]] = s[1:] - (s[:-1] + n[:-1]) + 1
    return buffer[np.cumsum(step)].tobytes()


def join_ranked(
    encoded: tuple[np.ndarray, np.ndarray],
    indptr: np.ndarray,
    ranked: np.ndarray,
    sep: str = ", ",
    block_bytes: int = 1 << 23,
) -> list[str]:
    """Join each row's ranked names into one string per row.

    The bytes of a block of rows are gathered in one vectorised step (bounded to about
    ``block_bytes`` so temporaries stay small); Python only slices the result per row.

    :param encoded: :func:`encode_names` of the vocabulary ``ranked`` points into, with the same ``sep``.
    """
    buffer, offsets = encoded
    sep_len = len(sep.encode())
    piece_len = offsets[ranked + 1] - offsets[ranked]
    # Bytes per row (with a trailing separator) and row boundaries in the piece array.
    cum = np.concatenate([[0], np.cumsum(piece_len)])
    row_bytes = cum[indptr]
    out: list[str] = []
    n_rows = len(indptr) - 1
    row = 0
    while row < n_rows:
        # Take rows until the block holds ~block_bytes (at least one row).
        stop = int(np.searchsorted(row_bytes, row_bytes[row] + block_bytes, side="right")) - 1
        stop = min(max(stop, row + 1), n_rows)
        a, b = indptr[row], indptr[stop]
        raw = _ragged_gather(buffer, offsets[ranked[a:b]], piece_len[a:b])
        base = row_bytes[row]
        bounds = (row_bytes[row : stop + 1] - base).tolist()
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            out.append(raw[lo : hi - sep_len].decode() if hi > lo else "")
        row = stop
    return out
