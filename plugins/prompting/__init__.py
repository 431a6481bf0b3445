"""Built-in prompting plugin: prompt strategies, decoders and sentence file formats.

Registers

- prompt strategies ``zero-shot`` (:mod:`.cellreasoner`), ``k-shot`` (:mod:`.kshot`) and ``puzzle``
  (:mod:`.puzzle`);
- decoders ``cellreasoner`` and ``cellpuzzles`` (:mod:`.decoders`);
- sentence formats ``cellreasoner`` and ``cellpuzzles`` (:mod:`.formats`).

The exact strings of both published formats are documented in FORMATS.md and kept as constants in the
modules above. The helpers most useful outside a run are re-exported here.
"""

from __future__ import annotations

from cellscribe import hookimpl

from .cellreasoner import DIRECT_INSTRUCTION, GENERATION, REASONING_INSTRUCTION, ZeroShot
from .context import context_sentence, contexts_from_obs
from .decoders import CellPuzzlesDecoder, CellReasonerDecoder, final_answer, match_label, split_reasoning
from .formats import CellPuzzlesFormat, CellReasonerFormat
from .kshot import KShot
from .puzzle import (
    SYSTEM_MSG,
    Puzzle,
    build_puzzle_user_msg,
    parse_puzzle_user_msg,
    plan_benchmark_puzzles,
    puzzle_messages,
)

__all__ = [
    "DIRECT_INSTRUCTION",
    "REASONING_INSTRUCTION",
    "GENERATION",
    "SYSTEM_MSG",
    "ZeroShot",
    "KShot",
    "Puzzle",
    "CellReasonerDecoder",
    "CellPuzzlesDecoder",
    "CellReasonerFormat",
    "CellPuzzlesFormat",
    "build_puzzle_user_msg",
    "parse_puzzle_user_msg",
    "puzzle_messages",
    "plan_benchmark_puzzles",
    "context_sentence",
    "contexts_from_obs",
    "split_reasoning",
    "final_answer",
    "match_label",
]


@hookimpl
def cellscribe_register_prompt_strategies(register):
    register(ZeroShot())
    register(KShot())
    register(Puzzle())


@hookimpl
def cellscribe_register_decoders(register):
    register(CellReasonerDecoder())
    register(CellPuzzlesDecoder())


@hookimpl
def cellscribe_register_formats(register):
    register(CellReasonerFormat())
    register(CellPuzzlesFormat())
