"""``cellscribe puzzles solve``: stored CellPuzzles records in, predictions and Cell-o1 metrics out."""

from __future__ import annotations

import json

import pytest
from _rule_backend import RulePlugin
from click.testing import CliRunner

from cellscribe.cli import main
from cellscribe.core.run import puzzles

LUNG_RULES = {
    "TPSAB1": "mast cell", "CCL4": "CD8-positive, alpha-beta T cell", "SFTPC": "pulmonary alveolar type 2 cell",
    "IGKC": "B cell", "GNLY": "natural killer cell", "TPPP3": "ciliated columnar cell of tracheobronchial tree",
    "KRT7": "respiratory basal cell", "APOE": "elicited macrophage", "CD3D": "T cell", "JCHAIN": "plasma cell",
}


@pytest.fixture
def exemplar(data_dir):
    return json.loads((data_dir / "cellpuzzles_reasoning_exemplar.jsonl").read_text().splitlines()[0])


@pytest.fixture
def rules(with_plugin):
    plugin = RulePlugin(rules=LUNG_RULES)
    with_plugin(plugin, "rules")
    return plugin.backend.model


@pytest.mark.parametrize("layout", ["jsonl", "json"])
def test_solve_keeps_fields_layout_and_scores(rules, exemplar, tmp_path, layout):
    broken = {"id": "broken", "user_msg": "not a puzzle", "answer": "a | b", "extra": 1}
    records = [exemplar, broken]
    src = tmp_path / f"puzzles.{layout}"
    if layout == "jsonl":
        src.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        src.write_text(json.dumps(records))
    out = tmp_path / f"pred.{layout}"
    result = CliRunner().invoke(main, ["puzzles", "solve", str(src), "--model", "rules", "-o", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    solved = puzzles.read_puzzles(out)
    assert solved.jsonl == (layout == "jsonl")
    first, second = solved.records
    assert {k: v for k, v in first.items() if k != "prediction"} == exemplar
    # prediction holds the model's raw text (its think block and answer tag), not decoded labels
    assert first["prediction"].startswith("<think>markers</think>\n<answer>") and first["prediction"].endswith("</answer>")
    assert second["extra"] == 1 and second["prediction"] == "" and "prediction_error" in second
    # The rule model names the first marker it meets: IGKC precedes KRT7 and JCHAIN in cells 7 and 10,
    # so 8 of the 10 exemplar cells are right; the broken record scores 0 on its 2 cells.
    assert "partial accuracy: 0.667" in result.output and "exact match: 0.000" in result.output
    assert "legitimate format: 0.500" in result.output and "uniqueness: 0.400" in result.output
    assert len(rules.calls) == 1
    sent = rules.calls[0].messages
    assert len(sent) == 1 and sent[0]["content"] == exemplar["user_msg"] + "\n" + exemplar["system_msg"]


def test_solve_with_system_role(rules, exemplar, tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps(exemplar) + "\n")
    result = CliRunner().invoke(main, ["puzzles", "solve", str(src), "--model", "rules", "--system-role",
                                       "-o", str(tmp_path / "o.jsonl"), "--no-progress"])
    assert result.exit_code == 0, result.output
    roles = [m["role"] for m in rules.calls[0].messages]
    assert roles == ["system", "user"]


def test_bad_puzzle_files(rules, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"system_msg": "x"}\n')
    result = CliRunner().invoke(main, ["puzzles", "solve", str(bad), "--model", "rules", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "no 'user_msg'" in result.output
    bad.write_text("this is not json")
    result = CliRunner().invoke(main, ["puzzles", "solve", str(bad), "--model", "rules", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "neither a JSON list nor JSONL" in result.output
