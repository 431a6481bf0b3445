"""The ``k-shot`` strategy: labelled reference cells shown as earlier chat turns before the query.

Each prompt is the CellReasoner prompt (:mod:`.cellreasoner`) with examples inserted between the system
instruction and the query: a ``user`` turn holding an example's sentence and an ``assistant`` turn
holding its label, ``k`` examples per label of the reference.

Choosing the examples
    Balanced: ``k`` cells of every reference label (all of them when a label has fewer). By default
    the examples are drawn at random with ``numpy.random.default_rng(seed)``, once, and every query
    gets the same ones. With ``options={"nearest": True}`` every query gets, for each label, the ``k``
    reference cells whose gene sets overlap its own most (Jaccard index; ties broken by a seeded
    random order), computed blockwise with sparse cells x genes incidence matrices. In both cases the
    examples are shown in a seeded random order (not grouped by label, to avoid favouring the label
    shown last), and a query never sees itself as an example (same cell id).

Fitting the token budget (``max_prompt_tokens``, default 8192)
    The query sentence is never shortened. When the whole prompt would exceed the budget, every
    example sentence is cut to its first ``g`` genes, with ``g`` the largest number that fits (the
    same ``g`` for all examples of a prompt, so their most informative genes are kept). ``g`` never
    goes below ``min_example_genes`` (option, default 10); prompts still too long at that size are
    counted and reported in one warning (the backend will truncate them).

    Tokens are counted piecewise: the instruction, each label and the candidate block as texts, and a
    sentence as the sum over its genes of the tokens of ``", " + gene`` (which over-counts by about
    one token per sentence, on the safe side), plus :data:`MESSAGE_OVERHEAD` tokens per chat message
    and :data:`PROMPT_OVERHEAD` for the generation prompt. Pieces are counted with ``count_tokens``
    when the model's tokenizer is available; otherwise every piece is estimated as one token per
    :data:`CHARS_PER_TOKEN` characters, rounded up, a deliberately pessimistic guess for gene symbols.

Options (``options=``): ``nearest`` (bool, default False); ``nearest_genes`` (int, default all:
compare only the first N genes of every sentence; the similarity costs one operation per gene the
query shares with a reference cell, about 5 ms per query against 10,500 reference cells of ~560
genes on 2 cores, and N = 100 took a third of that); ``show_candidates`` (bool, default False: the
examples already show the labels; True appends the candidate block to the query);
``min_example_genes`` (int, default 10); ``instruction`` (str: replace the system instruction);
``generation`` (``"fitted"`` or ``"published"``: the generation defaults, as for ``zero-shot``).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellscribe.core.types import CellSentences, Example, Prompt

from ._text import SentenceJoiner, clean_labels, is_null, sentence_strings
from .cellreasoner import (
    INSTRUCTIONS,
    MAX_PROMPT_TOKENS,
    candidate_block,
    cellreasoner_prompt,
    check_mode,
    check_preset,
)

log = logging.getLogger(__name__)

DEFAULT_K = 1
DEFAULT_MIN_EXAMPLE_GENES = 10
#: Chat-template tokens per message (Qwen: ``<|im_start|>role\n ... <|im_end|>\n``, with margin).
MESSAGE_OVERHEAD = 8
#: Tokens of the generation prompt and response prefix (``<|im_start|>assistant\n<think> ``).
PROMPT_OVERHEAD = 8
#: Characters per token assumed when no tokenizer is given.
CHARS_PER_TOKEN = 2
#: Cells x reference cells similarities held at once in nearest mode.
_BLOCK_ENTRIES = 1 << 21


class TokenCounter:
    """Counts tokens of texts and of gene pieces with ``count_tokens``, or estimates them."""

    def __init__(self, count_tokens: Callable[[str], int | None] | None = None) -> None:
        # Tokens a tokenizer adds to every text (a BOS token), so pieces are not charged for it. A
        # model without a tokenizer answers None: estimate then.
        offset = count_tokens("") if count_tokens is not None else None
        self.count_tokens = count_tokens if offset is not None else None
        self._offset = int(offset or 0)

    def text(self, text: str) -> int:
        """Tokens of ``text``."""
        if not text:
            return 0
        if self.count_tokens is None:
            return math.ceil(len(text) / CHARS_PER_TOKEN)
        return max(int(self.count_tokens(text)) - self._offset, 0)

    def genes(self, names: Sequence[str]) -> np.ndarray:
        """Tokens of ``", " + name`` for every name (at least 1)."""
        if self.count_tokens is None:
            lengths = np.fromiter((len(str(n)) for n in names), dtype=np.int64, count=len(names))
            return -(-(lengths + 2) // CHARS_PER_TOKEN)
        return np.fromiter(
            (max(int(self.count_tokens(", " + str(n))) - self._offset, 1) for n in names),
            dtype=np.int64,
            count=len(names),
        )


def _shared_gene_ids(
    query: CellSentences, reference: CellSentences
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(names, query gene ids, reference gene ids)`` over one vocabulary covering both."""
    if query.vocabulary is reference.vocabulary:
        return reference.vocabulary, query.indices, reference.indices
    codes, names = pd.factorize(np.concatenate([reference.vocabulary, query.vocabulary]))
    n_ref = len(reference.vocabulary)
    return np.asarray(names, dtype=object), codes[n_ref:][query.indices], codes[:n_ref][reference.indices]


def _incidence(indptr: np.ndarray, ids: np.ndarray, n_genes: int, head: int | None = None) -> sp.csr_matrix:
    """Binary cells x genes matrix of the gene sets (of the first ``head`` genes of each cell)."""
    if head is not None:
        lengths = np.diff(indptr)
        rank = np.arange(len(ids)) - np.repeat(indptr[:-1], lengths)
        ids = ids[rank < head]
        indptr = np.concatenate([[0], np.cumsum(np.minimum(lengths, head))])
    m = sp.csr_matrix((np.ones(len(ids), dtype=np.float32), ids, indptr), shape=(len(indptr) - 1, n_genes))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def _ragged_cumsum(values: np.ndarray) -> np.ndarray:
    """``[0, v0, v0 + v1, ...]`` (int64) so a row's prefix sums are differences of two entries."""
    return np.concatenate([[0], np.cumsum(values, dtype=np.int64)])


class KShot:
    """``k-shot``: CellReasoner prompts with k labelled reference examples per label.

    See the module docstring for how examples are chosen and shortened, and for the options.
    """

    name = "k-shot"
    description = "CellReasoner format with k labelled reference cells per label as earlier chat turns"
    default_decoder = "cellreasoner"

    def build(
        self,
        sentences: CellSentences,
        *,
        mode: str = "direct",
        candidates: Sequence[str] | None = None,
        reference: CellSentences | None = None,
        reference_labels: Sequence[str] | None = None,
        k: int | None = None,
        seed: int = 0,
        count_tokens: Callable[[str], int] | None = None,
        max_prompt_tokens: int | None = None,
        options: Mapping[str, Any] | None = None,
        **_: Any,
    ) -> list[Prompt]:
        """One prompt per unit with a non-empty sentence, in the order of ``sentences``.

        :raises ValueError: without a reference, with labels that do not match it, or ``k < 1``.
        """
        check_mode(mode)
        opts = dict(options or {})
        k = DEFAULT_K if k is None else int(k)
        if k < 1:
            raise ValueError(f"k must be at least 1 (examples per label), got {k}")
        nearest = bool(opts.get("nearest", False))
        nearest_genes = opts.get("nearest_genes")
        if nearest_genes is not None and int(nearest_genes) < 1:
            raise ValueError(f"nearest_genes must be a positive number of genes, got {nearest_genes}")
        show = bool(opts.get("show_candidates", False))
        min_genes = max(int(opts.get("min_example_genes", DEFAULT_MIN_EXAMPLE_GENES)), 1)
        instruction = opts.get("instruction") or INSTRUCTIONS[mode]
        preset = check_preset(opts.get("generation"))
        budget = int(max_prompt_tokens or MAX_PROMPT_TOKENS)

        reference, ref_labels, cands = _usable_reference(reference, reference_labels, candidates)
        units = sentences.take(np.flatnonzero(~sentences.empty())) if sentences.empty().any() else sentences
        if len(units) == 0:
            return []
        rng = np.random.default_rng(seed)
        names, q_ids, r_ids = _shared_gene_ids(units, reference)
        counter = TokenCounter(count_tokens)
        cost = np.zeros(len(names), dtype=np.int64)
        used = np.unique(np.concatenate([q_ids, r_ids]))
        cost[used] = counter.genes(names[used])
        name_chars = np.fromiter((len(str(n)) + 2 for n in names), dtype=np.int64, count=len(names))

        label_cost = {lab: counter.text(lab) for lab in np.unique(ref_labels)}
        ref = _Reference(reference, ref_labels, r_ids, cost, name_chars, label_cost)
        q_cum = _ragged_cumsum(cost[q_ids])
        q_cost = q_cum[units.indptr[1:]] - q_cum[units.indptr[:-1]]
        fixed_cost = (
            counter.text(instruction)
            + PROMPT_OVERHEAD
            + 2 * MESSAGE_OVERHEAD
            + (counter.text(candidate_block(cands)) if show else 0)
        )
        ref_index = pd.Index(reference.cell_ids)
        # Rows of the queries in the reference (-1: not there), so no query is its own example.
        self_rows = ref_index.get_indexer(units.cell_ids) if ref_index.is_unique else None

        texts = sentence_strings(units)
        prompts: list[Prompt] = []
        over_budget = 0
        fixed = None if nearest else _balanced_sample(ref_labels, k, rng)
        block = max(1, min(len(units), _BLOCK_ENTRIES // max(len(reference), 1)))
        nearest_picker = (
            _NearestPicker(units, q_ids, reference, r_ids, len(names), ref_labels, k, rng, nearest_genes)
            if nearest
            else None
        )
        for start in range(0, len(units), block):
            stop = min(start + block, len(units))
            if nearest_picker is not None:
                examples = rng.permuted(nearest_picker.pick(start, stop, self_rows), axis=1)
            else:
                examples = np.tile(fixed, (stop - start, 1))
                if self_rows is not None:
                    examples[examples == self_rows[start:stop, None]] = -1
            valid = examples >= 0
            labels_cost = np.where(valid, ref.label_cost[np.maximum(examples, 0)], 0).sum(axis=1)
            room = (
                budget
                - fixed_cost
                - q_cost[start:stop]
                - labels_cost
                - 2 * MESSAGE_OVERHEAD * valid.sum(axis=1)
            )
            genes, fits = ref.fit(examples, room, min_genes)
            ref.prepare(examples, reset=nearest)
            over_budget += int((~fits).sum())
            for row in range(stop - start):
                i = start + row
                chosen = examples[row][valid[row]]
                g = None if genes[row] < 0 else int(genes[row])
                exs = [
                    Example(str(reference.cell_ids[e]), ref.sentence(e, g), str(ref_labels[e]))
                    for e in chosen
                ]
                used_tokens = int(budget - room[row] + ref.example_cost(chosen, g))
                prompts.append(
                    cellreasoner_prompt(
                        str(units.cell_ids[i]),
                        texts[i],
                        mode=mode,
                        strategy=self.name,
                        instruction=instruction,
                        candidates=cands,
                        show_candidates=show,
                        examples=exs,
                        max_prompt_tokens=budget,
                        preset=preset,
                        meta={
                            "k": k,
                            "nearest": nearest,
                            "example_genes": g,
                            "estimated_prompt_tokens": used_tokens,
                        },
                    )
                )
        if over_budget:
            warnings.warn(
                f"{over_budget} k-shot prompt(s) exceed max_prompt_tokens={budget} even with examples cut "
                f"to {min_genes} genes; the backend will truncate them. Lower k, use shorter sentences "
                "(n_genes) or raise max_prompt_tokens.",
                UserWarning,
                stacklevel=2,
            )
        log.debug("k-shot: %d prompts, k=%d, nearest=%s", len(prompts), k, nearest)
        return prompts


def _usable_reference(
    reference: CellSentences | None, labels: Sequence[Any] | None, candidates: Sequence[str] | None
) -> tuple[CellSentences, np.ndarray, list[str]]:
    """The labelled, non-empty reference cells (restricted to ``candidates`` when given), their labels
    as strings, and the candidate list (the given candidates, else the sorted reference labels)."""
    if reference is None or labels is None:
        raise ValueError(
            "the k-shot prompt needs labelled examples: pass reference= (or use the query's own labelled "
            "cells) together with reference_key= naming the obs column of labels"
        )
    labels = list(labels)
    if len(labels) != len(reference):
        raise ValueError(
            f"reference has {len(reference)} cells but {len(labels)} reference labels; "
            "give one label per cell"
        )
    keep = ~reference.empty() & ~np.fromiter((is_null(x) for x in labels), dtype=bool, count=len(labels))
    as_text = np.array([str(x).strip() for x in labels], dtype=object)
    if candidates is not None:
        cands = clean_labels(candidates, "candidates")
        keep &= np.isin(as_text, np.array(cands, dtype=object))
        missing = sorted(set(cands) - set(as_text[keep]))
        if missing:
            warnings.warn(
                f"candidates without any reference cell get no examples: {missing}", UserWarning, stacklevel=3
            )
    if not keep.any():
        raise ValueError(
            "the reference has no labelled cell with a non-empty sentence"
            + (
                " among the candidates; check that candidates are spelt like the reference labels"
                if candidates
                else ""
            )
        )
    rows = np.flatnonzero(keep)
    reference = reference.take(rows) if len(rows) < len(reference) else reference
    ref_labels = as_text[rows]
    return reference, ref_labels, (cands if candidates is not None else sorted(set(ref_labels)))


def _balanced_sample(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` random rows per label (all rows of smaller labels), labels in sorted order, then shuffled."""
    rows = [
        rng.choice(np.flatnonzero(labels == lab), size=min(k, int((labels == lab).sum())), replace=False)
        for lab in sorted(set(labels))
    ]
    picked = np.concatenate(rows).astype(np.int64)
    return picked[rng.permutation(len(picked))]


def _top_columns(values: np.ndarray, take: int) -> np.ndarray:
    """Per row, the columns of the ``take`` largest values, largest first, ties to the earlier column.

    The same result as ``np.argsort(-values, axis=1, kind="stable")[:, :take]`` in linear time: a
    partition finds each row's take-th largest value, every larger value is kept, and the ties at
    that value are filled in column order.
    """
    n = values.shape[1]
    if take >= n:
        return np.argsort(-values, axis=1, kind="stable")[:, :take]
    kth = np.partition(values, n - take, axis=1)[:, n - take, None]
    greater = values > kth
    tie = values == kth
    tie &= np.cumsum(tie, axis=1) <= take - greater.sum(axis=1, keepdims=True)
    cols = np.nonzero(greater | tie)[1].reshape(-1, take)  # row-major: ``take`` per row
    order = np.argsort(-np.take_along_axis(values, cols, axis=1), axis=1, kind="stable")
    return np.take_along_axis(cols, order, axis=1)


class _NearestPicker:
    """Per query, the ``k`` reference rows of each label with the highest Jaccard index."""

    def __init__(self, units, q_ids, reference, r_ids, n_genes, labels, k, rng, head=None) -> None:
        head = None if head is None else int(head)
        self.q = _incidence(units.indptr, q_ids, n_genes, head)
        self.r_t = _incidence(reference.indptr, r_ids, n_genes, head).T.tocsr()
        self.q_len = np.asarray(self.q.sum(axis=1)).ravel()
        self.r_len = np.asarray(self.r_t.sum(axis=0)).ravel()
        self.k = k
        # Columns of each label in a seeded random order: a stable sort then breaks ties at random.
        order = rng.permutation(len(labels))
        self.columns = [order[labels[order] == lab] for lab in sorted(set(labels))]
        self.width = sum(min(k, len(c)) for c in self.columns)

    def pick(self, start: int, stop: int, self_rows: np.ndarray | None) -> np.ndarray:
        """Example rows of queries ``start:stop`` (``-1`` pads a label left short by self-exclusion)."""
        inter = (self.q[start:stop] @ self.r_t).toarray()
        union = self.q_len[start:stop, None] + self.r_len[None, :] - inter
        sim = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        if self_rows is not None:
            rows = np.flatnonzero(self_rows[start:stop] >= 0)
            sim[rows, self_rows[start:stop][rows]] = -1.0
        out = np.full((stop - start, self.width), -1, dtype=np.int64)
        col = 0
        for cols in self.columns:
            take = min(self.k, len(cols))
            sub = sim[:, cols]
            # A query's own row (similarity -1) sorts last, so it is only reached when the label has
            # no more than k cells; it then becomes padding.
            top = _top_columns(sub, take)
            score = np.take_along_axis(sub, top, axis=1)
            out[:, col : col + take] = np.where(score >= 0, cols[top], -1)
            col += take
        return out


class _Reference:
    """Reference cells with prefix sums of token costs and characters per gene, for shortening."""

    def __init__(
        self,
        reference: CellSentences,
        labels: np.ndarray,
        ids: np.ndarray,
        cost: np.ndarray,
        chars: np.ndarray,
        label_cost: Mapping[str, int],
    ) -> None:
        self.cells = reference
        self.label_cost = np.array([label_cost[lab] for lab in labels], dtype=np.int64)
        self.starts = reference.indptr[:-1]
        self.lengths = np.diff(reference.indptr)
        self.cost_cum = _ragged_cumsum(cost[ids])
        self.char_cum = _ragged_cumsum(chars[ids])
        self._joiner = SentenceJoiner()
        self._text: dict[int, str] = {}

    def prepare(self, rows: np.ndarray, *, reset: bool = False) -> None:
        """Join the sentences of ``rows`` (``-1`` ignored) not joined yet, in one vectorised call;
        ``reset`` first forgets the others (bounded memory when every query has its own examples)."""
        if reset:
            self._text.clear()
        todo = [r for r in np.unique(rows[rows >= 0]).tolist() if r not in self._text]
        if todo:
            self._text.update(zip(todo, self._joiner(self.cells.take(todo)), strict=True))

    def _prefix_cost(self, rows: np.ndarray, genes: np.ndarray) -> np.ndarray:
        s = self.starts[rows]
        return self.cost_cum[s + np.minimum(genes, self.lengths[rows])] - self.cost_cum[s]

    def example_cost(self, rows: np.ndarray, genes: int | None) -> int:
        """Token cost of the example sentences ``rows`` cut to ``genes`` genes (``None``: whole)."""
        if len(rows) == 0:
            return 0
        g = self.lengths[rows] if genes is None else np.full(len(rows), genes)
        return int(self._prefix_cost(rows, g).sum())

    def fit(self, examples: np.ndarray, room: np.ndarray, min_genes: int) -> tuple[np.ndarray, np.ndarray]:
        """Per prompt, the most genes per example that fit ``room`` tokens.

        :return: ``(genes, fits)``: genes is ``-1`` where whole examples fit, else the cut (at least
            ``min_genes``); ``fits`` is False where even ``min_genes`` genes do not fit.
        """
        valid = examples >= 0
        rows = np.maximum(examples, 0)
        lengths = np.where(valid, self.lengths[rows], 0)

        def total(g: np.ndarray) -> np.ndarray:
            return np.where(valid, self._prefix_cost(rows, np.broadcast_to(g[:, None], rows.shape)), 0).sum(
                axis=1
            )

        longest = lengths.max(axis=1, initial=0)
        whole = total(longest) <= room
        lo = np.zeros(len(room), dtype=np.int64)
        hi = longest.copy()
        while np.any(lo < hi):  # largest g with total(g) <= room (binary search, all prompts at once)
            mid = (lo + hi + 1) // 2
            ok = total(mid) <= room
            lo = np.where(ok, mid, lo)
            hi = np.where(ok, hi, mid - 1)
        genes = np.maximum(lo, min_genes)
        fits = whole | (total(genes) <= room)
        # A cut at or beyond every example's length is no cut.
        return np.where(whole | (genes >= longest), -1, genes), fits

    def sentence(self, row: int, genes: int | None) -> str:
        """Example ``row``'s sentence (joined by :meth:`prepare`), cut to its first ``genes`` genes."""
        row = int(row)
        text = self._text[row]
        if genes is None or genes >= self.lengths[row]:
            return text
        s = self.starts[row]
        return text[: int(self.char_cum[s + genes] - self.char_cum[s]) - 2]
