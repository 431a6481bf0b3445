"""Candidate scoring: the log-likelihood of every candidate answer after a prompt.

One forward pass reads each prompt (all but its last token) into a KV cache. The cache is then
repeated once per candidate (``batch_select_indices`` with repeated row indices, on a deep copy when
the cache is needed again: the cache is mutated in place) and batched passes read every candidate's
tokens, so the prompt is never recomputed. The prompt's last token is the first token of every
continuation, so all the log-probabilities needed come out of the candidate passes. Candidate rows
are processed in chunks that keep the repeated cache within ``max_batch_tokens`` and the logits
within :data:`MAX_LOGIT_ELEMENTS`.

Rows of a batch are left-padded for the prompt pass and right-aligned for the candidate pass (padding
between the cached prompt and the candidate, masked out, positions continuing the prompt's), so only
the last few logits of each row are computed (``logits_to_keep``).

A one-label answer scores ``label + eos`` (the probability of exactly that answer, the end-of-sequence
term summed over every end id). A puzzle (``n_labels`` > 1) is scored position by position: round
``i`` scores every candidate as the ``i``-th label, after the labels chosen in the earlier rounds (the
best unused candidate of each round), followed by the separator, or by the tail and eos in the last
round. That gives an ``n_labels x candidates`` matrix per prompt, with the number of tokens each entry
scored; :mod:`cellscribe.core.domain.scoring` turns them into comparable scores.

The KV cache is passed as ``cache=`` (transformers >= 5.2x; ``past_key_values=``, which those versions
deprecate, before).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from ._layout import TokenLayout

#: Largest logits block (elements) computed in one candidate pass; larger batches are split.
MAX_LOGIT_ELEMENTS = 1 << 27


@attrs.frozen(eq=False)
class ScoreItem:
    """One prompt to score: its token ids (including the layout's scoring prefix) and layout."""

    ids: Sequence[int]
    tl: TokenLayout


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)`` int64 arrays with every row right-aligned (left padding), built without a
    Python loop over the cells."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    width = int(lengths.max()) if len(rows) else 0
    mask = np.arange(width)[None, :] >= (width - lengths)[:, None]
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    if lengths.sum():
        ids[mask] = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(lengths.sum()))
    return ids, mask.astype(np.int64)


@functools.cache
def cache_keyword() -> str:
    """The name under which this transformers passes and returns the KV cache: ``"cache"`` where
    ``CausalLMOutputWithPast`` has that field, else ``"past_key_values"``."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def score_items(
    model: Any,
    items: Sequence[ScoreItem],
    *,
    pad_id: int,
    device: Any,
    max_batch_tokens: int | None = None,
    max_logit_elements: int = MAX_LOGIT_ELEMENTS,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Score every candidate of every item: per item, two ``n_labels x n_candidates`` matrices.

    Entry ``[i, j]`` of the first (float64) is the summed log-probability of candidate ``j`` (with its
    separator or its ending) as label ``i``; of the second (int64) the number of tokens summed. At most
    ``max_batch_tokens`` cached plus candidate tokens are held per candidate pass (``None``: no limit).
    """
    import torch

    if any(len(item.ids) < 2 for item in items):
        raise ValueError("scoring needs prompts of at least two tokens")
    heads, mask = left_pad([item.ids[:-1] for item in items], pad_id)
    heads_t = torch.from_numpy(heads).to(device)
    mask_t = torch.from_numpy(mask).to(device)
    positions = (mask_t.cumsum(1) - 1).clamp(min=0)
    out = model(
        input_ids=heads_t, attention_mask=mask_t, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    base = getattr(out, cache_keyword())
    del out
    head_lengths = [len(item.ids) - 1 for item in items]
    lasts = [int(item.ids[-1]) for item in items]

    n_rounds = [item.tl.layout.n_labels for item in items]
    matrices = [np.full((n, item.tl.n_candidates), -np.inf) for n, item in zip(n_rounds, items)]
    counts = [np.zeros((n, item.tl.n_candidates), dtype=np.int64) for n, item in zip(n_rounds, items)]
    prefixes: list[list[int]] = [[] for _ in items]
    used = [0] * len(items)
    total_rounds = max(n_rounds)
    for r in range(total_rounds):
        rows = []  # (item, candidate, tokens, n_scored, ends_with_eos)
        for b, item in enumerate(items):
            if r >= n_rounds[b]:
                continue
            tl = item.tl
            last_round = r == n_rounds[b] - 1
            ending = [*tl.tail_ids, tl.eos_ids[0]] if last_round else (
                [tl.separator_id] if tl.separator_id is not None else []
            )
            for j in range(tl.n_candidates):
                piece = list(tl.first[j] if r == 0 else tl.later[j]) + ending
                rows.append((b, j, [lasts[b], *prefixes[b], *piece], len(piece), last_round))
        n_scored_max = max(row[3] for row in rows)
        vocab = model.get_output_embeddings().weight.shape[0]
        per_chunk = max(1, max_logit_elements // ((n_scored_max + 1) * vocab))
        if max_batch_tokens is not None:
            row_tokens = heads.shape[1] + max(len(row[2]) for row in rows)
            per_chunk = max(1, min(per_chunk, max_batch_tokens // row_tokens))
        starts = range(0, len(rows), per_chunk)
        for start in starts:
            chunk = rows[start : start + per_chunk]
            final_use = r == total_rounds - 1 and start == starts[-1]
            values = _score_rows(
                model, base if final_use else copy.deepcopy(base), chunk, mask_t, head_lengths,
                pad_id=pad_id, eos_ids=items[0].tl.eos_ids, device=device,
            )
            for (b, j, _, n_scored, _), value in zip(chunk, values):
                matrices[b][r, j] = value
                counts[b][r, j] = n_scored
        for b, item in enumerate(items):
            if r >= n_rounds[b] - 1:
                continue
            tl = item.tl
            available = np.ones(tl.n_candidates, dtype=bool)
            if tl.layout.unique:
                available = np.array([not (used[b] >> j) & 1 for j in range(tl.n_candidates)])
                if not available.any():
                    available[:] = True
            best = int(np.argmax(np.where(available, matrices[b][r], -np.inf)))
            used[b] |= 1 << best
            prefixes[b] += list(tl.first[best] if r == 0 else tl.later[best])
    return list(zip(matrices, counts))


def _score_rows(
    model: Any,
    cache: Any,
    rows: Sequence[tuple[int, int, list[int], int, bool]],
    prompt_mask: Any,
    head_lengths: Sequence[int],
    *,
    pad_id: int,
    eos_ids: Sequence[int],
    device: Any,
) -> list[float]:
    """Log-probabilities of the scored tail of each row, read on top of the prompt cache."""
    import torch

    which = torch.tensor([row[0] for row in rows], device=device)
    cache.batch_select_indices(which)
    ids, mask = left_pad([row[2] for row in rows], pad_id)
    width = ids.shape[1]
    n_scored = torch.tensor([row[3] for row in rows], device=device)
    lengths = np.fromiter((len(row[2]) for row in rows), dtype=np.int64, count=len(rows))
    starts = np.asarray(head_lengths, dtype=np.int64)[[row[0] for row in rows]]
    # Positions continue each prompt's own (unpadded) positions; padding gets 0 and is masked out.
    positions = np.where(mask == 1, starts[:, None] + np.arange(width)[None, :] - (width - lengths)[:, None], 0)
    ids_t = torch.from_numpy(ids).to(device)
    attention = torch.cat([prompt_mask.index_select(0, which), torch.from_numpy(mask).to(device)], dim=1)
    keep = int(n_scored.max()) + 1
    out = model(
        input_ids=ids_t,
        attention_mask=attention,
        position_ids=torch.from_numpy(positions).to(device),
        use_cache=True,
        **{cache_keyword(): cache},
        logits_to_keep=keep,
    )
    logits = out.logits[:, :-1].float()  # position k predicts token k + 1
    del out
    targets = ids_t[:, width - keep + 1 :]
    norm = logits.logsumexp(dim=-1)
    token_lp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - norm
    ends = torch.tensor([row[4] for row in rows], device=device)
    if bool(ends.any()):
        # The end-of-sequence term counts every end id the model has.
        eos = torch.tensor(list(eos_ids), device=device)
        eos_lp = logits[:, -1].index_select(-1, eos).logsumexp(dim=-1) - norm[:, -1]
        token_lp[:, -1] = torch.where(ends, eos_lp, token_lp[:, -1])
    scored = torch.arange(keep - 1, device=device)[None, :] >= (keep - 1 - n_scored)[:, None]
    total = torch.where(scored, token_lp, torch.zeros_like(token_lp)).sum(dim=1).double()
    return total.tolist()

