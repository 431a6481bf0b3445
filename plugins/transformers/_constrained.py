"""Constrained decoding: a ``LogitsProcessor`` that lets a model write only legal answers.

Each row of a batch follows its :class:`~._layout.TokenLayout` through these stages:

``OPEN``  forced opening tokens (``<think>`` for a puzzle whose prompt does not open it);
``FREE``  free reasoning (only in reasoning layouts): the model writes what it likes except a ``<``
          character, special tokens and end-of-sequence, so no stray tag can appear in the reasoning.
          All the probability the model gives those tokens is moved to the first token of the closing
          text: a model that wants to write ``</think>`` (or to stop) closes its reasoning. After
          ``cap`` reasoning tokens the closing is forced;
``CLOSE`` the rest of the closing text (``</think>\\n<answer>``), forced;
``LABEL`` a walk down the candidate token trie, once per label; for unique layouts the labels
          already given are excluded, so a puzzle's answer is a permutation of its candidates;
``TAIL``  forced closing tokens (``</answer>``), then ``EOS`` (any end-of-sequence id), then ``DONE``.

Forced and label stages are a few tokens per row and run in Python; the free stage, where almost all
steps of a reasoning answer are spent, is one vectorised masked update for all its rows. The processor
runs before the sampling warpers (temperature, top-p), so greedy decoding and sampling both work, and
it never leaves a row without an allowed token. Beam search reorders rows between steps, which this
per-row state does not follow: it is refused.

Confidence: at every step of a label walk where the trie allows more than one token, the processor
keeps the model's log-probabilities of the allowed tokens, renormalised over them (after a repetition
penalty, before temperature and top-p). The product of those of the tokens chosen is the label's
probability under the model restricted, step by step, to legal answers: a distribution over the
candidates (it sums to one over them), equal to the model's probability of the label among the
candidates when they differ in their first token. :meth:`AnswerConstraint.confidences` reads it per
label once the tokens are known; a forced label (one candidate left) has confidence 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ._layout import TokenLayout

OPEN, FREE, CLOSE, LABEL, TAIL, EOS, DONE = range(7)
NEG_INF = float("-inf")


class RowState:
    """Where one row stands in its answer; :meth:`allowed` lists the legal next tokens (except in the
    ``FREE`` stage, which the processor handles for all rows at once) and :meth:`advance` consumes the
    token the model chose."""

    __slots__ = ("tl", "cap", "n_free", "used", "n_labels_done", "stage", "forced", "pos", "node")

    def __init__(self, tl: TokenLayout, cap: int) -> None:
        self.tl = tl
        self.cap = max(0, int(cap))
        self.n_free = 0
        self.used = 0
        self.n_labels_done = 0
        self.forced: Sequence[int] = ()
        self.pos = 0
        self.node: Any = None
        if tl.open_ids:
            self._force(OPEN, tl.open_ids)
        else:
            self._after_open()

    # -- transitions ---------------------------------------------------------------------------

    def _force(self, stage: int, ids: Sequence[int], pos: int = 0) -> None:
        self.stage, self.forced, self.pos = stage, ids, pos

    def _after_open(self) -> None:
        if self.tl.layout.reasoning and self.cap > 0:
            self.stage = FREE
        else:
            self._enter_close(0)

    def _enter_close(self, pos: int) -> None:
        if pos < len(self.tl.close_ids):
            self._force(CLOSE, self.tl.close_ids, pos)
        else:
            self._enter_label()

    def _enter_label(self) -> None:
        if self.n_labels_done >= self.tl.layout.n_labels:
            if self.tl.tail_ids:
                self._force(TAIL, self.tl.tail_ids)
            else:
                self.stage = EOS
            return
        self.stage = LABEL
        self.node = self.tl.first_trie if self.n_labels_done == 0 else self.tl.later_trie

    def _available(self, used: int) -> int:
        full = self.tl.full_mask
        if not self.tl.layout.unique:
            return full
        # More cells than candidates: once every candidate is used, any may be used again.
        return (full & ~used) or full

    # -- the protocol used by the processor ----------------------------------------------------

    def allowed(self) -> list[int]:
        """The token ids allowed next (not called in the ``FREE`` stage)."""
        stage = self.stage
        if stage in (OPEN, CLOSE, TAIL):
            return [self.forced[self.pos]]
        if stage in (EOS, DONE):
            return list(self.tl.eos_ids)
        available = self._available(self.used)
        node = self.node
        tokens = [t for t, child in node.children.items() if child.mask & available]
        if node.label is not None and (1 << node.label) & available:
            tokens += self._next_starts(self.used | (1 << node.label))
        return tokens

    def _next_starts(self, used: int) -> list[int]:
        """First tokens of what follows a completed label."""
        if self.n_labels_done + 1 < self.tl.layout.n_labels:
            available = self._available(used)
            return [t for t, child in self.tl.later_trie.children.items() if child.mask & available]
        return [self.tl.tail_ids[0]] if self.tl.tail_ids else list(self.tl.eos_ids)

    def advance(self, token: int) -> None:
        """Consume the token the model produced for this row."""
        stage = self.stage
        if stage in (OPEN, CLOSE, TAIL):
            self.pos += 1
            if self.pos == len(self.forced):
                if stage == OPEN:
                    self._after_open()
                elif stage == CLOSE:
                    self._enter_label()
                else:
                    self.stage = EOS
        elif stage == FREE:
            if token == self.tl.close_ids[0]:
                self._enter_close(1)
            else:
                self.n_free += 1
                if self.n_free >= self.cap:
                    self._enter_close(0)
        elif stage == LABEL:
            child = self.node.children.get(token)
            if child is not None and child.mask & self._available(self.used):
                self.node = child  # a longer label continues (preferred over ending here)
            elif self.node.label is not None:
                self.used |= 1 << self.node.label
                self.n_labels_done += 1
                self._enter_label()
                self.advance(token)  # the token starts the next piece
            else:  # not reachable while the mask is applied; stop constraining this row
                self.stage = DONE
        elif stage == EOS:
            self.stage = DONE

    @property
    def exit_token(self) -> int:
        """The token that ends free reasoning (the closing text's first token)."""
        return self.tl.close_ids[0]


def free_stage_masks(tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]) -> tuple[Any, Any]:
    """``(pool, banned)`` boolean tensors over the model's vocabulary for the ``FREE`` stage.

    ``pool``: tokens whose text contains ``<``, special tokens and end-of-sequence ids (their
    probability goes to the closing token); ``banned``: ``pool`` plus ids the tokenizer does not know
    (a model's vocabulary is often padded beyond the tokenizer's).
    """
    import torch

    n_known = min(len(tokenizer), vocab_size)
    texts = tokenizer.batch_decode([[i] for i in range(n_known)], skip_special_tokens=False)
    pool = torch.zeros(vocab_size, dtype=torch.bool)
    pool[[i for i, text in enumerate(texts) if "<" in text]] = True
    special = [int(i) for i in getattr(tokenizer, "all_special_ids", []) if 0 <= int(i) < vocab_size]
    pool[special + [int(e) for e in eos_ids if 0 <= int(e) < vocab_size]] = True
    banned = pool.clone()
    banned[n_known:] = True
    return pool, banned


class AnswerConstraint:
    """A ``transformers`` logits processor driving one :class:`RowState` per row of a batch.

    ``pool`` / ``banned``: the :func:`free_stage_masks` tensors on the model's device.
    """

    def __init__(self, states: Sequence[RowState], pool: Any, banned: Any) -> None:
        self.states = list(states)
        self.pool = pool
        self.banned = banned
        self._length: int | None = None
        self._start: int | None = None
        # Per row: (step, label index, {allowed token: renormalised log-probability}) of its label steps.
        self._label_steps: list[list[tuple[int, int, dict[int, float]]]] = [[] for _ in self.states]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        length = input_ids.shape[1]
        if self._length is not None and length > self._length:
            for state, token in zip(self.states, input_ids[:, -1].tolist()):
                state.advance(token)
        self._length = length
        if self._start is None:
            self._start = length

        free = [r for r, s in enumerate(self.states) if s.stage == FREE]
        fixed = [r for r, s in enumerate(self.states) if s.stage != FREE]
        if free:
            self._free_rows(scores, free)
        if fixed:
            allowed = torch.zeros((len(fixed), scores.shape[1]), dtype=torch.bool)
            rows: list[int] = []
            cols: list[int] = []
            walking: list[tuple[int, int, list[int]]] = []  # (position in fixed, row, tokens) in a label
            for i, r in enumerate(fixed):
                tokens = self.states[r].allowed()
                rows += [i] * len(tokens)
                cols += tokens
                if self.states[r].stage == LABEL and len(tokens) > 1:
                    walking.append((i, r, tokens))
            allowed[rows, cols] = True
            allowed = allowed.to(scores.device)
            index = torch.tensor(fixed, device=scores.device)
            sub = scores.index_select(0, index)
            masked = sub.masked_fill(~allowed, NEG_INF)
            # An earlier processor may have ruled out every allowed token (min_new_tokens on eos):
            # fall back to a uniform choice among them rather than an all -inf row.
            dead = torch.isneginf(masked).all(dim=1, keepdim=True)
            masked = torch.where(dead & allowed, torch.zeros_like(masked), masked)
            scores = scores.index_copy(0, index, masked)
            if walking:
                self._keep_label_steps(masked, walking, length - self._start)
        return scores

    def _keep_label_steps(self, masked: Any, walking: list[tuple[int, int, list[int]]], step: int) -> None:
        """Keep the renormalised log-probabilities of the allowed tokens of rows walking a label."""
        import torch

        at = torch.tensor([i for i, _, _ in walking], device=masked.device)
        logp = masked.index_select(0, at).float().log_softmax(dim=-1)
        rows = torch.tensor([k for k, (_, _, tokens) in enumerate(walking) for _ in tokens], device=masked.device)
        cols = torch.tensor([t for _, _, tokens in walking for t in tokens], device=masked.device)
        values = iter(logp[rows, cols].tolist())
        for _, r, tokens in walking:
            self._label_steps[r].append((step, self.states[r].n_labels_done, {t: next(values) for t in tokens}))

    def confidences(self, new_tokens: Any) -> list[tuple[float, ...]]:
        """Per row, the probability of each label it gave among the candidates it could give there (see
        the module docstring), from the tokens it generated (``new_tokens``: rows x steps). An end token
        chosen to end a label counts with every other end token allowed at that step."""
        out = []
        for r, steps in enumerate(self._label_steps):
            tl = self.states[r].tl
            eos = set(tl.eos_ids)
            sums = [0.0] * tl.layout.n_labels
            for step, label, logps in steps:
                if step >= new_tokens.shape[1] or label >= len(sums):
                    continue
                token = int(new_tokens[r, step])
                if token in eos:
                    value = math.log(sum(math.exp(v) for t, v in logps.items() if t in eos) or 1e-300)
                else:
                    value = logps.get(token, 0.0)
                sums[label] += value
            out.append(tuple(math.exp(v) for v in sums))
        return out

    def _free_rows(self, scores: Any, rows: list[int]) -> None:
        """Free reasoning rows: ban ``banned``, give the closing token the pool's total probability."""
        import torch

        every = len(rows) == scores.shape[0]
        index = None if every else torch.tensor(rows, device=scores.device)
        sub = scores if every else scores.index_select(0, index)
        exits = torch.tensor([self.states[r].exit_token for r in rows], device=scores.device)[:, None]
        pooled = sub.masked_fill(~self.pool, NEG_INF).logsumexp(dim=1, keepdim=True)
        own = sub.gather(1, exits)
        exit_logit = torch.where(self.pool[exits], pooled, torch.logaddexp(pooled, own))
        sub = sub.masked_fill(self.banned, NEG_INF).scatter(1, exits, exit_logit)
        if every:
            scores.copy_(sub)
        else:
            scores.index_copy_(0, index, sub)


def as_logits_processor(constraint: AnswerConstraint) -> Any:
    """Wrap ``constraint`` in a ``LogitsProcessorList`` for ``generate`` (imports transformers)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class _Processor(LogitsProcessor):
        def __call__(self, input_ids, scores):  # noqa: D401 - transformers' signature
            return constraint(input_ids, scores)

    return LogitsProcessorList([_Processor()])
