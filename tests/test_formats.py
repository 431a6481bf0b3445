"""Sentence file formats: CellReasoner JSON (byte for byte) and CellPuzzles benchmark JSONL."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest

from cellscribe.core.types import CellSentences
from cellscribe.plugins.prompting import SYSTEM_MSG, parse_puzzle_user_msg
from cellscribe.plugins.prompting.formats import CellPuzzlesFormat, CellReasonerFormat

from _prompting import cellreasoner_reference, exemplar, ranked_hvg_chunks, top_expressed


def _write(fmt, chunks, **kw) -> tuple[int, bytes]:
    buf = io.BytesIO()
    n = fmt.write(buf, chunks, **kw)
    return n, buf.getvalue()


# ---------------------------------------------------------------------------------------------------
# cellreasoner
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["direct", "reasoning"])
@pytest.mark.parametrize("chunk_size", [64, 350])
def test_cellreasoner_reproduces_reference_bytes(pancreas, mode, chunk_size):
    n, out = _write(
        CellReasonerFormat(),
        ranked_hvg_chunks(pancreas, chunk_size),
        labels=pancreas.obs["Group"],
        obs=pancreas.obs,
        reasoning=mode == "reasoning",
    )
    assert n == 350
    assert out == cellreasoner_reference(mode)


def test_cellreasoner_reproduces_reference_through_registry(host, pancreas):
    """The same bytes from the registered ``rna`` modality, ``ranked-hvg`` strategy and format."""
    reg = host.registry
    if "rna" not in reg.names("modality") or "ranked-hvg" not in reg.names("sentence"):
        pytest.skip("the rna modality or the ranked-hvg sentence strategy is not registered")
    features = reg.get("modality", "rna").prepare(pancreas)
    chunks = reg.get("sentence", "ranked-hvg").build(
        features, n_genes=None, state={}, chunk_size=100, strategies=reg.all("sentence")
    )
    fmt = reg.get("format", "cellreasoner")
    assert (fmt.suffix, fmt.sentence, fmt.needs_labels) == (".json", "ranked-hvg", True)
    labels = pancreas.obs["Group"].copy()
    labels.index = labels.index.astype(str)
    n, out = _write(fmt, chunks, labels=labels, obs=pancreas.obs, reasoning=False)
    assert n == 350 and out == cellreasoner_reference("direct")


def test_cellreasoner_streams_chunk_by_chunk(pancreas):
    buf = io.BytesIO()
    sizes = []

    def chunks():
        for chunk in ranked_hvg_chunks(pancreas, 100):
            sizes.append(buf.tell())
            yield chunk

    CellReasonerFormat().write(buf, chunks(), labels=pancreas.obs["Group"])
    # Each chunk was written before the next one was asked for.
    assert sizes[0] == 0 and all(b > a for a, b in zip(sizes, sizes[1:]))


def test_cellreasoner_escapes_like_json_dump():
    genes = [['A"B', "Ω1", "back\\slash", "tab\tX"], [], ["PLAIN", "é"]]
    cells = CellSentences.from_lists(['c"1', "cé2", "c3"], genes)
    labels = pd.Series(['β cell "x"', "alpha", "7"], index=['c"1', "cé2", "c3"])
    n, out = _write(
        CellReasonerFormat(), iter([cells.take([0]), cells.take([1, 2])]), labels=labels, reasoning=True
    )
    records = [
        {
            "cell_name": cid,
            "instruction": json.loads(cellreasoner_reference("reasoning"))[0]["instruction"],
            "input": ", ".join(g),
            "output": labels[cid],
        }
        for cid, g in zip(cells.cell_ids, genes)
    ]
    assert n == 3
    assert out == json.dumps(records, indent=4).encode()


def test_cellreasoner_no_cells_writes_empty_list():
    n, out = _write(CellReasonerFormat(), iter([]), labels=pd.Series(dtype=object))
    assert n == 0 and out == json.dumps([], indent=4).encode()


def test_cellreasoner_rejects_missing_labels():
    cells = CellSentences.from_lists(["a", "b"], [["G1"], ["G2"]])
    with pytest.raises(ValueError, match="label"):
        _write(CellReasonerFormat(), iter([cells]), labels=None)
    with pytest.raises(ValueError, match="no label"):
        _write(CellReasonerFormat(), iter([cells]), labels=pd.Series(["x", None], index=["a", "b"]))


# ---------------------------------------------------------------------------------------------------
# cellpuzzles
# ---------------------------------------------------------------------------------------------------


def _chunks(cells: CellSentences, size: int):
    for start in range(0, len(cells), size):
        yield cells.take(np.arange(start, min(start + size, len(cells))))


def _puzzles(pancreas, **options) -> list[dict]:
    cells = top_expressed(pancreas)
    n, out = _write(
        CellPuzzlesFormat(), _chunks(cells, 64), labels=pancreas.obs["Group"], obs=pancreas.obs, **options
    )
    records = [json.loads(line) for line in out.decode("utf-8").splitlines()]
    assert n == len(records)
    return records


def test_cellpuzzles_records_follow_the_benchmark_rules(pancreas):
    records = _puzzles(pancreas, batch_key="Sample", n=4, seed=1)
    cells = top_expressed(pancreas)
    row = {c: i for i, c in enumerate(pancreas.obs_names)}
    labels, donors = pancreas.obs["Group"].astype(str), pancreas.obs["Sample"].astype(str)
    seen = set()
    assert len(records) >= 40
    for rec in records:
        ids = rec["cell_ids"]
        gold = rec["answer"].split(" | ")
        assert len(ids) == 4 and len(set(gold)) == 4
        assert gold == [labels[c] for c in ids]
        assert {donors[c] for c in ids} == {rec["batch"]}
        assert not seen & set(ids)
        seen |= set(ids)
        assert rec["system_msg"] == SYSTEM_MSG == exemplar()["system_msg"]
        parsed = parse_puzzle_user_msg(rec["user_msg"])
        assert parsed["context"] == ""  # the pancreas obs has no CELLxGENE fields
        assert parsed["candidates"] == sorted(gold)
        assert parsed["sentences"] == [cells.genes(row[c]) for c in ids]
        assert rec["messages"] == [{"role": "user", "content": rec["user_msg"] + "\n" + SYSTEM_MSG}]
    assert records[0]["id"] == "puzzle_000000"


def test_cellpuzzles_seeded_and_system_role(pancreas):
    a = _puzzles(pancreas, batch_key="Sample", n=5, seed=3)
    assert a == _puzzles(pancreas, batch_key="Sample", n=5, seed=3)
    assert [r["cell_ids"] for r in a] != [
        r["cell_ids"] for r in _puzzles(pancreas, batch_key="Sample", n=5, seed=4)
    ]
    with_role = _puzzles(pancreas, batch_key="Sample", n=5, seed=3, system_role=True)
    assert with_role[0]["messages"] == [
        {"role": "system", "content": SYSTEM_MSG},
        {"role": "user", "content": with_role[0]["user_msg"]},
    ]


def test_cellpuzzles_context_from_obs(pancreas):
    obs = pancreas.obs.copy()
    obs["sex"] = np.where(obs["Batch"].astype(str) == "human", "female", "male")
    obs["tissue"] = "islet of Langerhans"
    obs["disease"] = "normal"
    pancreas.obs = obs
    records = _puzzles(pancreas, batch_key="Sample", n=3)
    human = next(r for r in records if r["batch"].startswith("human"))
    assert human["user_msg"].startswith(
        "Context: The cell is from a female, originating from the islet of Langerhans. "
        "The patient is healthy with no diagnosed disease. \n\nCell 1: "
    )


def test_cellpuzzles_checks_options(pancreas):
    cells = top_expressed(pancreas)
    with pytest.raises(ValueError, match="between 3 and 15"):
        _write(CellPuzzlesFormat(), iter([cells]), labels=pancreas.obs["Group"], obs=pancreas.obs, n=2)
    with pytest.raises(ValueError, match="batch_key"):
        _write(
            CellPuzzlesFormat(),
            iter([cells]),
            labels=pancreas.obs["Group"],
            obs=pancreas.obs,
            batch_key="nope",
        )
    with pytest.raises(ValueError, match="labels"):
        _write(CellPuzzlesFormat(), iter([cells]), labels=None, obs=pancreas.obs)
    with pytest.warns(UserWarning, match="batch_key"):
        n, _ = _write(CellPuzzlesFormat(), iter([cells]), labels=pancreas.obs["Group"], obs=pancreas.obs, n=5)
    assert n == 70  # one batch of 5 labels x 70 cells
    with pytest.warns(UserWarning, match="no batch has 6 cells"):
        n, _ = _write(
            CellPuzzlesFormat(),
            iter([cells]),
            labels=pancreas.obs["Group"],
            obs=pancreas.obs,
            n=6,
            batch_key="Batch",
        )
    assert n == 0


def test_formats_are_registered(host):
    reg = host.registry
    puzzles = reg.get("format", "cellpuzzles")
    assert (puzzles.suffix, puzzles.sentence, puzzles.needs_labels) == (".jsonl", "top-expressed", True)
    assert reg.get("format", "cellreasoner").suffix == ".json"
