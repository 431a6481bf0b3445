"""The neighbour vote (``neighbor_vote=``, core/run/vote.py): each cell's label decided with its nearest
cells' answers. The effect on real scATAC data is tested in tests/test_atac_real.py."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

import cellscribe as cs
from cellscribe.core.run import streaming_obstacle
from cellscribe.core.run.vote import Vote, effective_neighbor_vote, vote
from cellscribe.core.spec import RunSpec
from cellscribe.core.types import Annotation


def _chain(n: int) -> sp.csr_matrix:
    """Cells 0..n-1 in a line, each a neighbour of the next (weight 1)."""
    upper = sp.diags(np.ones(n - 1), 1, shape=(n, n))
    return sp.csr_matrix(upper + upper.T)


def test_a_cell_takes_the_label_its_neighbourhood_votes_for():
    ids = np.array(["a", "b", "c", "d", "e"])
    answers = {
        "a": Annotation("a", "B cell", "ok", 0.9),
        "b": Annotation("b", "T cell", "ok", 0.3, note="own note"),  # between two confident B cells
        "c": Annotation("c", "B cell", "ok", 0.8),
        "d": Annotation.unresolved("d", note="too little information"),
        "e": Annotation("e", "monocyte", "ok", 0.6),
    }
    voted, record = vote(Vote(2, np.arange(5), _chain(5), "test", 0.0), answers, ids)
    b = voted["b"]
    assert b.label == "B cell" and b.status == "ok"
    # B cell has 0.9 + 0.8 of the 0.9 + 0.3 + 0.8 votes; its voters' mean confidence is 0.85.
    assert b.confidence == pytest.approx((1.7 / 2.0) * 0.85)
    assert b.note.startswith("own note; neighbour vote: B cell for 2 of its 2 nearest cells")
    assert "its own call was T cell, 0.30" in b.note
    assert voted["a"] is answers["a"] and voted["c"] is answers["c"]
    # An unresolved cell neither votes nor gets a label; "e" has only itself against nobody.
    assert voted["d"] is answers["d"] and voted["e"] is answers["e"]
    assert answers["b"].label == "T cell"  # the answers given are not changed
    assert record["n_changed"] == 1 and record["changes"] == {"T cell -> B cell": 1}
    assert record["n_voting"] == 4 and record["n_cells"] == 5


def test_a_tie_keeps_the_cells_own_answer():
    ids = np.array(["a", "b"])
    answers = {"a": Annotation("a", "B cell", "ok", 0.5), "b": Annotation("b", "T cell", "ok", 0.5)}
    voted, record = vote(Vote(1, np.arange(2), _chain(2), "test", 0.0), answers, ids)
    assert voted == answers and record["n_changed"] == 0


def test_the_modality_chooses_the_default_and_the_run_can_override(host):
    assert effective_neighbor_vote(RunSpec.from_kwargs(model="markers"), host) == 0  # RNA: none
    assert effective_neighbor_vote(RunSpec.from_kwargs(model="markers", modality="atac"), host) == 15
    assert effective_neighbor_vote(RunSpec.from_kwargs(model="markers", modality="rna+atac"), host) == 15
    assert effective_neighbor_vote(RunSpec.from_kwargs(model="markers", modality="atac", neighbor_vote=0), host) == 0
    assert effective_neighbor_vote(RunSpec.from_kwargs(model="markers", neighbor_vote=7), host) == 7
    # Cells that do not stand alone: groups, a budget, puzzles (labelled together) vote no further.
    for kwargs in ({"groupby": "leiden"}, {"budget": 0.1}, {"prompt": "puzzle"}):
        assert effective_neighbor_vote(RunSpec.from_kwargs(model="markers", modality="atac", **kwargs), host) == 0
    # A vote needs every cell's answer and a graph of all cells: such runs are not streamed.
    assert "neighbor_vote" in streaming_obstacle(RunSpec.from_kwargs(model="markers", modality="atac"), host)
    assert streaming_obstacle(RunSpec.from_kwargs(model="markers", modality="atac", neighbor_vote=0), host) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"neighbor_vote": -1}, "neighbor_vote must be an integer >= 0"),
        ({"neighbor_vote": 10, "groupby": "leiden"}, "groupby already gives every cell its group's label"),
        ({"neighbor_vote": 10, "budget": 0.1}, "budget already spreads the answers"),
    ],
)
def test_bad_votes_are_refused_when_the_spec_is_made(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RunSpec.from_kwargs(model="markers", **kwargs)


def test_a_puzzle_with_a_vote_is_refused_before_the_model(pancreas):
    with pytest.raises(ValueError, match="labels its cells together"):
        cs.tl.annotate(pancreas[:20].copy(), prompt="puzzle", neighbor_vote=5, progress=False, sidecar=False)


def test_an_rna_run_votes_only_when_asked(pancreas):
    human = pancreas[pancreas.obs["Batch"] == "human"].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = cs.tl.annotate(human, tissue="pancreas", progress=False, sidecar=False, copy=True)
        voted = cs.tl.annotate(human, tissue="pancreas", neighbor_vote=10, progress=False, sidecar=False,
                               copy=True)
    assert "vote" not in plain.uns["cellscribe"]
    record = voted.uns["cellscribe"]["vote"]
    assert record["n_neighbors"] == 10 and "PCA" in record["embedding"] and record["n_cells"] == human.n_obs
    changed = voted.obs["cellscribe"].astype(object) != plain.obs["cellscribe"].astype(object)
    assert int(changed.sum()) == record["n_changed"]
    assert voted.obs.loc[changed, "cellscribe_note"].str.contains("neighbour vote").all()
    assert voted.uns["cellscribe"]["params"]["neighbor_vote"] == 10
    # The same cells in the same order, each with a result.
    assert voted.obs_names.tolist() == human.obs_names.tolist()


def test_a_small_run_votes_over_fewer_neighbours(pancreas):
    """A neighbourhood stays a small part of the run: 40 cells vote over 4 neighbours, 15 over none."""
    human = pancreas[pancreas.obs["Batch"] == "human"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        forty = cs.tl.annotate(human[:40].copy(), tissue="pancreas", neighbor_vote=15, progress=False,
                               sidecar=False, copy=True)
        fifteen = cs.tl.annotate(human[:15].copy(), tissue="pancreas", neighbor_vote=15, progress=False,
                                 sidecar=False, copy=True)
    record = forty.uns["cellscribe"]["vote"]
    assert record["n_neighbors"] == 4 and record["n_neighbors_asked"] == 15
    assert record["note"] == "15 neighbours asked, 40 cells allow 4"
    record = fifteen.uns["cellscribe"]["vote"]
    assert record["n_neighbors"] == 0 and record["n_changed"] == 0 and record["note"].startswith("no vote")
    assert not fifteen.obs["cellscribe_note"].astype(str).str.contains("neighbour vote").any()
