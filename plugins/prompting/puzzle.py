"""CellPuzzles prompts (Cell-o1, FORMATS.md): the ``puzzle`` strategy and benchmark puzzles.

A puzzle shows N cells and a list of candidate cell types in one prompt; the model assigns a type to
every cell and answers ``<think>...</think>\\n<answer>type 1 | type 2 | ...</answer>``. The user
message is exactly::

    Context: {context}\\n\\nCell 1: {genes}\\nCell 2: {genes}...\\n\\nMatch the cells above to one of the
    following cell types:\\n{candidates in Python sorted() order, one per line}

The context (:mod:`.context`) ends with a space. When there is no context at all the ``Context:``
line and its blank line are left out, so the message starts with ``Cell 1:``.

Rendering: the released inference script sends no system role, only one user message,
``user_msg + "\\n" + system_msg``; that is the default here. ``options={"system_role": True}`` sends
``[system: system_msg, user: user_msg]`` instead. Decoding is greedy; Cell-o1 allows 3500 new tokens.

Generation defaults: greedy, the answer ends at ``</answer>`` (the tagged format's stop string,
:meth:`~cellscribe.core.answers.AnswerFormat.stop_strings`), and at most :func:`puzzle_max_new_tokens`
new tokens: twice the ~100 tokens of reasoning per cell of Cell-o1's published reasoning trace (998
tokens for 10 cells), plus 512 for the answer, never above the published 3500 (1,112 for 3 cells, 2,512
for 10, 3,500 for 15). ``options={"generation": "published"}`` gives the published settings (3500, no
stop string).

Annotation mode (:class:`Puzzle`): the units are split into puzzles of at most ``puzzle_size`` cells
(default: the number of candidates, at most 15) that share one context (cells are grouped by their
context text first, in order of appearance), in near-equal sizes (11 cells with size 10 make puzzles
of 6 and 5), and every puzzle lists all the candidates. The system message says each of the N
candidates goes to exactly one cell; with more candidates than cells in a puzzle (or fewer) that rule
cannot hold, and the model is left to assign the closest types. When annotating clusters
(``groupby``), the strategy asks the pipeline for one representative cell per cluster
(``representatives_per_group = 1``), so a puzzle shows distinct clusters as CellPuzzles shows distinct
cell types.

Benchmark mode (:func:`plan_benchmark_puzzles`, used by the ``cellpuzzles`` file format): from
labelled cells and a donor (batch) column, puzzles of ``n`` cells (3-15, default 10) with ``n``
distinct labels from one donor, each cell used at most once, drawn with
``numpy.random.default_rng(seed)``; the candidates are the puzzle's own labels.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cellscribe.core.answers import TAGGED
from cellscribe.core.types import CellSentences, Prompt

from ._text import SEP, clean_labels, sentence_strings
from .cellreasoner import check_preset
from .context import contexts_from_obs

log = logging.getLogger(__name__)

#: The system message of the CellPuzzles data (field ``system_msg``).
SYSTEM_MSG = (
    "You are an expert assistant specialized in cell type annotation. You will be given a batch of N "
    "cells from the same donor, where each cell represents a unique cell type. For each cell, the top "
    "expressed genes are provided in descending order of expression. Using both the gene expression "
    "data and donor information, determine the correct cell type for each cell. You will also receive "
    "a list of N candidate cell types, and each candidate must be assigned to exactly one cell. Ensure "
    "that you consider all cells and candidate types together, rather than annotating each cell "
    "individually. Include your detailed reasoning within <think> and </think> tags, and provide your "
    "final answer within <answer> and </answer> tags. The final answer should be a single string "
    "listing the assigned cell types in order, separated by ' | '."
)
QUESTION = "Match the cells above to one of the following cell types:"
#: Published decoding: greedy, at most 3500 new tokens.
PUBLISHED_GENERATION = {"do_sample": False, "max_new_tokens": 3500}
#: New tokens per cell of a puzzle (reasoning), and for the answer, in the default limit.
TOKENS_PER_CELL = 200
ANSWER_TOKENS = 512


def puzzle_max_new_tokens(n_cells: int) -> int:
    """The default ``max_new_tokens`` of a puzzle of ``n_cells`` cells (see the module docstring)."""
    return min(PUBLISHED_GENERATION["max_new_tokens"], ANSWER_TOKENS + TOKENS_PER_CELL * max(1, int(n_cells)))


def puzzle_generation(n_cells: int, preset: str = "fitted") -> dict[str, Any]:
    """The generation defaults of a puzzle of ``n_cells`` cells (``preset="published"``: Cell-o1's)."""
    if check_preset(preset) == "published":
        return dict(PUBLISHED_GENERATION)
    return {"do_sample": False, "max_new_tokens": puzzle_max_new_tokens(n_cells),
            "stop_strings": list(TAGGED.stop_strings())}
MAX_PUZZLE_SIZE = 15
MIN_PUZZLE_SIZE = 3
DEFAULT_BENCHMARK_SIZE = 10
ANSWER_SEP = " | "

_CELL_LINE = re.compile(r"Cell (\d+): (.*)")


def build_puzzle_user_msg(
    context: str | None, sentences: Sequence[str | Sequence[str]], candidates: Sequence[str]
) -> str:
    """The CellPuzzles user message (see the module docstring).

    :param context: the context text (ending with a space), or ``None``/``""`` for none.
    :param sentences: per cell, its genes as a list or already joined with ``", "``.
    :param candidates: the candidate labels; listed in ``sorted()`` order.
    """
    cells = "\n".join(
        f"Cell {i}: {s if isinstance(s, str) else SEP.join(s)}" for i, s in enumerate(sentences, start=1)
    )
    body = f"{cells}\n\n{QUESTION}\n" + "\n".join(sorted(candidates))
    return f"Context: {context}\n\n{body}" if context else body


def parse_puzzle_user_msg(text: str) -> dict[str, Any]:
    """Split a CellPuzzles user message into its parts (the inverse of :func:`build_puzzle_user_msg`).

    :return: ``{"context": str, "sentences": list of gene lists, "candidates": list}``; ``context``
        is ``""`` when the message has no ``Context:`` line.
    :raises ValueError: when ``text`` is not a puzzle user message.
    """
    head, sep, tail = text.rpartition(f"\n\n{QUESTION}\n")
    if not sep:
        raise ValueError(f"not a CellPuzzles user message: no line {QUESTION!r} after a blank line")
    context = ""
    if head.startswith("Context: "):
        context, sep, head = head[len("Context: ") :].partition("\n\n")
        if not sep:
            raise ValueError("not a CellPuzzles user message: no blank line after the Context line")
    sentences = []
    for expected, line in enumerate(head.split("\n"), start=1):
        match = _CELL_LINE.fullmatch(line)
        if match is None or int(match.group(1)) != expected:
            raise ValueError(
                f"not a CellPuzzles user message: expected 'Cell {expected}: ...', got {line[:60]!r}"
            )
        sentences.append(match.group(2).split(SEP) if match.group(2) else [])
    return {"context": context, "sentences": sentences, "candidates": tail.split("\n")}


def puzzle_messages(
    user_msg: str, *, system_msg: str = SYSTEM_MSG, system_role: bool = False
) -> tuple[dict[str, str], ...]:
    """The chat messages of one puzzle: one user message ``user_msg + "\\n" + system_msg`` (the
    released inference script), or ``[system, user]`` with ``system_role=True``."""
    if system_role:
        return ({"role": "system", "content": system_msg}, {"role": "user", "content": user_msg})
    return ({"role": "user", "content": f"{user_msg}\n{system_msg}"},)


def puzzle_prompt(
    unit_ids: Sequence[str],
    sentences: Sequence[str],
    candidates: Sequence[str],
    *,
    context: str = "",
    system_role: bool = False,
    strategy: str = "puzzle",
    meta: Mapping[str, Any] | None = None,
    preset: str = "fitted",
) -> Prompt:
    """A :class:`Prompt` for one puzzle (decoder ``cellpuzzles``, the generation defaults of ``preset``)."""
    user_msg = build_puzzle_user_msg(context, sentences, candidates)
    return Prompt(
        messages=puzzle_messages(user_msg, system_role=system_role),
        unit_ids=tuple(unit_ids),
        sentences=tuple(sentences),
        strategy=strategy,
        decoder="cellpuzzles",
        answer=TAGGED,
        candidates=tuple(sorted(candidates)),
        context=context,
        generation=puzzle_generation(len(unit_ids), preset),
        meta={"system_role": system_role, **dict(meta or {})},
    )


def context_options(opts: Mapping[str, Any]) -> dict[str, Any]:
    """The :func:`~.context.contexts_from_obs` keyword arguments from strategy/format options."""
    return {
        "columns": opts.get("context_columns"),
        "templates": opts.get("context_templates"),
        "extra": opts.get("extra_context") or (),
    }


class Puzzle:
    """``puzzle``: CellPuzzles prompts, several units per prompt, all candidates listed in each.

    Options (``options=``): ``puzzle_size`` (int, default min(number of candidates, 15)),
    ``system_role`` (bool, default False), ``context`` (bool, default True: describe the donor from
    ``obs``), ``context_columns`` (``{field: obs column}``), ``context_templates``
    (``{obs column: "sentence with {}"}``), ``extra_context`` (fixed sentences, str or list),
    ``generation`` (``"fitted"`` or ``"published"``: the generation defaults, module docstring).
    ``mode`` is ignored: Cell-o1 always reasons before answering.
    """

    name = "puzzle"
    description = "CellPuzzles format (Cell-o1): batches of cells matched jointly to candidate types"
    default_decoder = "cellpuzzles"
    #: With ``groupby``, one representative cell per cluster: a puzzle then shows distinct clusters,
    #: as CellPuzzles shows distinct cell types, instead of several cells of one cluster.
    representatives_per_group = 1
    #: A puzzle's cells get distinct labels together: a neighbour vote would undo that constraint.
    neighbor_vote_allowed = False

    def build(
        self,
        sentences: CellSentences,
        *,
        candidates: Sequence[str] | None = None,
        obs: pd.DataFrame | None = None,
        options: Mapping[str, Any] | None = None,
        **_: Any,
    ) -> list[Prompt]:
        """Puzzles covering every unit with a non-empty sentence exactly once.

        :raises ValueError: without candidates, or with a puzzle size below 1.
        """
        opts = dict(options or {})
        if candidates is None or len(candidates) == 0:
            raise ValueError(
                "the puzzle prompt needs candidate cell types: pass candidates=[...] (every puzzle lists "
                "them all)"
            )
        cands = sorted(clean_labels(candidates, "candidates"))
        size = opts.get("puzzle_size")
        size = min(len(cands), MAX_PUZZLE_SIZE) if size is None else int(size)
        if size < 1:
            raise ValueError(f"puzzle_size must be at least 1, got {size}")
        if size > MAX_PUZZLE_SIZE:
            warnings.warn(
                f"puzzle_size={size} is above the {MAX_PUZZLE_SIZE} cells per puzzle Cell-o1 was trained on",
                UserWarning,
                stacklevel=2,
            )
        system_role = bool(opts.get("system_role", False))
        preset = check_preset(opts.get("generation"))

        keep = np.flatnonzero(~sentences.empty())
        units = sentences.take(keep) if len(keep) < len(sentences) else sentences
        if len(units) == 0:
            return []
        texts = sentence_strings(units)
        ids = [str(u) for u in units.cell_ids]
        if opts.get("context", True) and obs is not None:
            contexts = contexts_from_obs(obs, list(units.cell_ids), **context_options(opts))
        else:
            contexts = [""] * len(units)

        prompts = []
        codes, uniques = pd.factorize(pd.Series(contexts, dtype=object), sort=False)
        for code, context in enumerate(uniques):
            rows = np.flatnonzero(codes == code)
            n_puzzles = -(-len(rows) // size)
            for part in np.array_split(rows, n_puzzles):
                prompts.append(
                    puzzle_prompt(
                        [ids[r] for r in part],
                        [texts[r] for r in part],
                        cands,
                        context=context,
                        system_role=system_role,
                        strategy=self.name,
                        meta={"puzzle_size": size},
                        preset=preset,
                    )
                )
        log.debug("puzzle: %d units in %d puzzles of up to %d cells", len(units), len(prompts), size)
        return prompts


    def from_record(self, record: Mapping[str, Any], *, system_role: bool = False) -> Prompt:
        """The prompt of a stored CellPuzzles record (``system_msg``, ``user_msg``; other fields kept
        in ``meta["record"]``), sent as the released inference script sends it unless ``system_role``.

        Unit ids are ``"{record id}#{cell number}"``. Raises ``ValueError`` for a record whose
        ``user_msg`` is not a puzzle.
        """
        for field in ("user_msg",):
            if field not in record:
                raise ValueError(f"a CellPuzzles record needs the field {field!r}; it has {sorted(record)}")
        parts = parse_puzzle_user_msg(record["user_msg"])
        rid = str(record.get("id", "puzzle"))
        messages = puzzle_messages(
            record["user_msg"], system_msg=record.get("system_msg", SYSTEM_MSG), system_role=system_role
        )
        return Prompt(
            messages=messages,
            unit_ids=tuple(f"{rid}#{i}" for i in range(1, len(parts["sentences"]) + 1)),
            sentences=tuple(SEP.join(genes) for genes in parts["sentences"]),
            strategy=self.name,
            decoder="cellpuzzles",
            answer=TAGGED,
            candidates=tuple(parts["candidates"]),
            context=parts["context"],
            generation=puzzle_generation(len(parts["sentences"])),
            meta={"system_role": system_role, "record_id": rid},
        )


def check_benchmark_size(n: int) -> int:
    """``n`` if it is a benchmark puzzle size (3-15); ``ValueError`` otherwise."""
    n = int(n)
    if not MIN_PUZZLE_SIZE <= n <= MAX_PUZZLE_SIZE:
        raise ValueError(f"puzzle size n must be between {MIN_PUZZLE_SIZE} and {MAX_PUZZLE_SIZE}, got {n}")
    return n


def plan_benchmark_puzzles(
    labels: Sequence[Any], batches: Sequence[Any], *, n: int = DEFAULT_BENCHMARK_SIZE, seed: int = 0
) -> list[np.ndarray]:
    """Choose benchmark puzzles: ``n`` cells with ``n`` distinct labels from one batch each.

    Batches are visited in order of first appearance. Within a batch, every puzzle draws ``n``
    distinct labels among those with cells left, with probability proportional to the cells left
    (so abundant types appear in more puzzles), takes one random unused cell of each, and shuffles
    the cells' order; it stops when fewer than ``n`` labels have cells left. Cells with a missing label
    or batch are never used.

    :param labels: one label per cell (position = row).
    :param batches: one donor/batch key per cell.
    :return: per puzzle, the rows of its cells in puzzle order.
    """
    n = check_benchmark_size(n)
    labels = pd.Series(np.asarray(labels, dtype=object))
    batches = pd.Series(np.asarray(batches, dtype=object))
    if len(labels) != len(batches):
        raise ValueError(f"{len(labels)} labels but {len(batches)} batch values; give one of each per cell")
    rng = np.random.default_rng(seed)
    ok = labels.notna().to_numpy() & batches.notna().to_numpy()
    batch_codes, _ = pd.factorize(batches, sort=False)
    label_codes, _ = pd.factorize(labels, sort=True)
    puzzles: list[np.ndarray] = []
    # Usable rows grouped by batch (in order of first appearance), then by label, without a loop over
    # batches x cells.
    rows = np.flatnonzero(ok)
    rows = rows[np.argsort(batch_codes[rows], kind="stable")]
    for batch in np.split(rows, np.flatnonzero(np.diff(batch_codes[rows])) + 1):
        batch = batch[np.argsort(label_codes[batch], kind="stable")]
        by_label = np.split(batch, np.flatnonzero(np.diff(label_codes[batch])) + 1)
        pools = [rng.permutation(cells).tolist() for cells in by_label if len(cells)]
        left = np.array([len(p) for p in pools], dtype=np.int64)
        while np.count_nonzero(left) >= n:
            chosen = rng.choice(len(pools), size=n, replace=False, p=left / left.sum())
            cells = np.array([pools[c].pop() for c in chosen], dtype=np.int64)
            left[chosen] -= 1
            puzzles.append(cells[rng.permutation(n)])
    return puzzles


def benchmark_record(
    puzzle_id: str,
    cell_ids: Sequence[str],
    sentences: Sequence[str],
    labels: Sequence[str],
    *,
    context: str = "",
    batch: Any = None,
    system_role: bool = False,
) -> dict[str, Any]:
    """One CellPuzzles record: ``id``, ``system_msg``, ``user_msg``, ``answer`` (labels in cell order
    joined with ``" | "``), ``cell_ids``, ``batch`` and ``messages`` (as the model is sent them)."""
    user_msg = build_puzzle_user_msg(context, sentences, labels)
    return {
        "id": puzzle_id,
        "system_msg": SYSTEM_MSG,
        "user_msg": user_msg,
        "answer": ANSWER_SEP.join(labels),
        "cell_ids": list(cell_ids),
        "batch": None if batch is None else str(batch),
        "messages": [dict(m) for m in puzzle_messages(user_msg, system_role=system_role)],
    }
