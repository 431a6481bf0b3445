"""The ``cluster-markers`` sentence strategy on real data (pbmc68k_reduced, Baron pancreas)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import cellscribe


@pytest.fixture(scope="module")
def pbmc():
    import scanpy as sc

    return sc.datasets.pbmc68k_reduced()


def _annotate(adata, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cellscribe.tl.annotate(adata, sidecar=False, progress=False, **kwargs)


def test_every_cell_gets_its_groups_top_de_genes(pancreas):
    human = pancreas[pancreas.obs["Batch"] == "human"].copy()
    sentences = cellscribe.tl.sentences(
        human, sentence="cluster-markers", n_genes=20, sentence_options={"groups": human.obs["Group"]}
    )
    genes = sentences.str.split(", ")
    groups = human.obs["Group"].astype(str)
    for group, members in genes.groupby(groups.to_numpy()):
        assert members.map(tuple).nunique() == 1  # one sentence per group
        top = members.iloc[0]
        assert len(top) == 20 and not any(g.startswith(("RPL", "RPS", "MT-")) for g in top)
    # The hormone of each endocrine group leads its contrast with the rest (Baron 2016).
    first = {g: genes[groups == g].iloc[0] for g in ("alpha", "delta")}
    assert "GCG" in first["alpha"][:5] and "SST" in first["delta"][:5]


def test_groupby_run_answers_each_group_from_its_markers(pancreas):
    human = pancreas[pancreas.obs["Batch"] == "human"].copy()
    _annotate(human, groupby="Group", sentence="cluster-markers",
              sentence_options={"groups": human.obs["Group"]})
    clusters = human.uns["cellscribe"]["clusters"]["label"]
    assert clusters["alpha"] == "pancreatic A cell"
    assert clusters["delta"] == "pancreatic D cell"
    assert clusters["macrophage"] == "macrophage"
    state = human.uns["cellscribe"]["params"]["sentence_state"]["cluster_markers"]
    assert state["method"] == "wilcoxon" and set(state["groups"]) == set(human.obs["Group"].astype(str))


def test_pbmc_clusters_by_markers_keep_the_lineage(pbmc):
    adata = pbmc.copy()
    _annotate(adata, groupby="louvain", sentence="cluster-markers", sentence_options={"groups": adata.obs["louvain"]})
    calls = adata.uns["cellscribe"]["clusters"]["label"].to_dict()
    truth = adata.obs.groupby("louvain", observed=True)["bulk_labels"].agg(lambda s: s.value_counts().index[0])
    # B-lineage clusters: B cells or plasma cells (cluster 8 ranks MZB1, TNFRSF17 among its markers).
    assert all("B cell" in calls[g] or calls[g] == "plasma cell" for g in truth[truth == "CD19+ B"].index)
    assert all("monocyte" in calls[g] for g in truth[truth == "CD14+ Monocyte"].index)


def test_groups_by_position_singletons_and_missing(pancreas):
    human = pancreas[pancreas.obs["Batch"] == "human"].copy()
    labels = human.obs["Group"].astype(str).to_numpy().copy()
    labels[0] = "lonely"  # a group of one cell: ranked by its mean expression
    groups = pd.Series(labels).where(np.arange(len(labels)) != 1, None).tolist()  # one cell without a group
    sentences = cellscribe.tl.sentences(human, sentence="cluster-markers", sentence_options={"groups": groups})
    assert sentences.iloc[1] == "" and len(sentences.iloc[0].split(", ")) == 50


def test_missing_groups_is_a_clear_error(pancreas):
    with pytest.raises(ValueError, match="needs the cells' groups"):
        cellscribe.tl.sentences(pancreas, sentence="cluster-markers")
    with pytest.raises(ValueError, match="group labels for"):
        cellscribe.tl.sentences(pancreas, sentence="cluster-markers", sentence_options={"groups": ["a", "b"]})


def test_groupby_gives_the_run_groups_to_the_strategy(pancreas, tmp_path):
    """``uses_groups`` strategies get the run's groupby column: no sentence_options needed, from Python
    and from the command line."""
    from cellscribe.cli import main
    from click.testing import CliRunner

    human = pancreas[pancreas.obs["Batch"] == "human"].copy()
    _annotate(human, groupby="Group", sentence="cluster-markers")
    calls = _calls(human)
    assert calls["alpha"] == "pancreatic A cell" and calls["beta"] == "type B pancreatic cell"
    state = human.uns["cellscribe"]["params"]["sentence_state"]["cluster_markers"]
    assert set(state["groups"]) == set(human.obs["Group"].astype(str))
    src, out = tmp_path / "human.h5ad", tmp_path / "out.h5ad"
    pancreas[pancreas.obs["Batch"] == "human"].copy().write_h5ad(src)
    result = CliRunner().invoke(main, ["annotate", str(src), "-o", str(out), "--groupby", "Group",
                                       "--sentence", "cluster-markers", "--no-progress"])
    assert result.exit_code == 0, result.output
    import anndata as ad

    written = ad.read_h5ad(out)
    assert (written.obs.loc[written.obs["Group"] == "delta", "cellscribe"] == "pancreatic D cell").all()


def test_a_group_call_pools_its_representatives_label_probabilities():
    from cellscribe.core.run.units import pooled_vote

    # Three representatives answer B, two A; but the two A answers are sure and the B answers torn
    # between B and A: the group is most likely A (mean 0.58 against 0.42).
    labels = ["B", "B", "B", "A", "A"]
    scores = [{"B": 0.45, "A": 0.40}, {"B": 0.45, "A": 0.40}, {"B": 0.45, "A": 0.40}, {"A": 0.95}, {"A": 0.95}]
    label, share, confidence, pooled = pooled_vote(labels, scores, [0.5, 0.5, 0.5, 0.9, 0.9])
    assert label == "A" and share == pytest.approx(0.4) and confidence == pytest.approx(0.9)
    assert pooled == pytest.approx((3 * 0.40 + 2 * 0.95) / 5)
    # the markers model gives label scores: its group calls say they were pooled
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    _annotate(adata, groupby="louvain")
    assert adata.obs["cellscribe_note"].str.startswith("group label from the representatives' pooled").all()
    clusters = adata.uns["cellscribe"]["clusters"]
    assert "pooled_probability" in (clusters.columns if isinstance(clusters, pd.DataFrame)
                                    else next(iter(clusters.values())))


def _calls(adata) -> dict[str, str]:
    """Group -> label of a groupby run (``uns[key]["clusters"]``, a table or a dict per group)."""
    clusters = adata.uns["cellscribe"]["clusters"]
    if isinstance(clusters, pd.DataFrame):
        return {str(g): str(v) for g, v in clusters["label"].items()}
    return {str(g): c["label"] for g, c in clusters.items()}
