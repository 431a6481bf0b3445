"""Cross-modal references: scATAC cells annotated from a labelled scRNA-seq reference.

Real data, vendored in tests/data/atac (see PROVENANCE.md): PBSmall's scATAC fragments (150 PBMC, hg19
chr5/chr11; ArchR's labels B cell / T cell / monocyte, 50 each) and ArchR's *unpaired* scRNA-seq
companion (150 other cells of the same chromosomes, ``obs["CellType"]`` B / M / T, 50 each). Two ways:
``tl.annotate(prompt="k-shot", reference=rna, reference_modality="rna")`` (examples are RNA sentences,
queries gene-activity sentences) and ``tl.transfer_labels`` (SingleR-style correlation, no model).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cellscribe
from cellscribe.core import run

atac = pytest.importorskip("cellscribe.plugins.atac")

DATA = Path(__file__).parent / "data" / "atac"
FRAGMENTS = DATA / "PBSmall_fragments.tsv.gz"
GTF = DATA / "hg19_chr5_chr11_genes.gtf.gz"
SIZES = DATA / "hg19.chrom.sizes"
RNA = DATA / "PBSmall_rna_unpaired_150cells.h5ad"
#: The RNA reference's labels in ArchR's ATAC label names.
TO_ATAC = {"B": "B cell", "M": "monocyte", "T": "T cell"}
#: Real B-cell genes on chromosomes PBSmall's scATAC does not cover (chr16, chr19, chr9, chr8): the
#: query can never show them.
UNSEEN = ["CD19", "CD79A", "PAX5", "BLK"]


@pytest.fixture(scope="module")
def truth():
    return pd.read_csv(DATA / "PBSmall_labels.tsv", sep="\t", index_col=0)["cell_type"]


@pytest.fixture
def rna():
    """The unpaired scRNA-seq reference (a fresh read per test)."""
    return ad.read_h5ad(RNA)


def _snapshot(adata: ad.AnnData) -> tuple:
    return (adata.X.copy(), adata.obs.copy(), adata.var.copy(), sorted(adata.uns), sorted(adata.layers),
            adata.obs_names.copy(), adata.var_names.copy())


def _assert_untouched(adata: ad.AnnData, snapshot: tuple) -> None:
    X, obs, var, uns, layers, obs_names, var_names = snapshot
    assert (adata.X != X).nnz == 0
    pd.testing.assert_frame_equal(adata.obs, obs)
    pd.testing.assert_frame_equal(adata.var, var)
    assert sorted(adata.uns) == uns and sorted(adata.layers) == layers
    assert adata.obs_names.equals(obs_names) and adata.var_names.equals(var_names)


def _accuracy(predicted: pd.Series, truth: pd.Series) -> tuple[float, pd.DataFrame]:
    """Share of cells whose reference label names their ArchR label (unresolved cells count as wrong),
    and the confusion table."""
    mapped = predicted.astype(object).map(TO_ATAC)
    gold = truth.reindex(predicted.index)
    table = pd.crosstab(gold.rename("truth"), mapped.fillna("unresolved").rename("predicted"))
    return float((mapped == gold).mean()), table


def _with_unseen_genes(rna: ad.AnnData) -> ad.AnnData:
    """``rna`` plus B-cell genes the query cannot show, given to the *T* cells at very high counts."""
    counts = np.zeros((rna.n_obs, len(UNSEEN)), dtype=rna.X.dtype)
    counts[(rna.obs["CellType"] == "T").to_numpy()] = 500
    extra = ad.AnnData(sp.csr_matrix(counts), obs=rna.obs[[]], var=pd.DataFrame(index=UNSEEN))
    poisoned = ad.concat([rna, extra], axis=1, merge="first")
    poisoned.obs = rna.obs.copy()
    return poisoned


def _mouse_like(rna: ad.AnnData) -> ad.AnnData:
    """``rna`` with lower-case symbols (``cd3e``): no gene in common with the human query."""
    mouse = rna.copy()
    mouse.var = pd.DataFrame(index=[g.lower() for g in rna.var["gene_name"]])
    return mouse


# -------------------------------------------------------------------------------------------------
# k-shot with an RNA reference
# -------------------------------------------------------------------------------------------------


def test_kshot_examples_are_rna_sentences_within_the_genes_both_measure(atac_host, pbsmall, rna):
    plan = run.plan_run(
        pbsmall, modality="atac", prompt="k-shot", model="markers", reference=_with_unseen_genes(rna),
        reference_key="CellType", reference_modality="rna", host=atac_host,
    )
    counts = plan.params["reference_genes"]
    # Measured: 1,034 genes with activity in PBSmall, 1,181 detected in the RNA cells, 802 in both.
    assert plan.params["reference_modality"] == "rna" and plan.params["modality"] == "atac"
    assert counts["shared"] <= min(counts["query"], counts["reference"]) and counts["shared"] > 500
    measured = set(plan.features.feature_names[run.measured_mask(plan.features)])
    examples = plan.prompts[0].examples
    assert {e.label for e in examples} == {"B", "M", "T"}
    assert all(e.cell_id.startswith("rna_") for e in examples)  # the examples are RNA cells
    for example in examples:
        genes = example.sentence.split(", ")
        assert set(genes) <= measured and not set(genes) & set(UNSEEN)
    # The queries are the ATAC cells' own gene-activity sentences.
    assert [p.unit_ids[0] for p in plan.prompts] == list(pbsmall.obs_names)


def test_kshot_with_an_rna_reference_annotates_pbsmall(atac_host, pbsmall, rna, truth):
    adata = pbsmall.copy()
    before = _snapshot(rna)
    cellscribe.tl.annotate(
        adata, modality="atac", prompt="k-shot", reference=rna, reference_key="CellType",
        reference_modality="rna", progress=False, sidecar=False,
    )
    _assert_untouched(rna, before)
    accuracy, table = _accuracy(adata.obs["cellscribe"], truth)
    # Measured (markers model, k=3, the ATAC neighbour vote): 0.91; B cells are the hard ones (36 of 50;
    # the rest go to T), T 50/50, monocytes 50/50 (0.88 and 33 B cells without the vote).
    assert accuracy >= 0.85, table
    assert table.loc["T cell", "T cell"] >= 45 and table.loc["monocyte", "monocyte"] >= 45 and table.loc["B cell", "B cell"] >= 30
    params = adata.uns["cellscribe"]["params"]
    assert params["reference_modality"] == "rna" and params["reference_key"] == "CellType"
    assert params["reference_genes"]["shared"] > 500


@pytest.mark.slow
def test_genes_the_query_cannot_show_do_not_change_kshot_calls(atac_host, pbsmall, rna):
    plain, poisoned = pbsmall.copy(), pbsmall.copy()
    for adata, reference in ((plain, rna), (poisoned, _with_unseen_genes(rna))):
        cellscribe.tl.annotate(
            adata, modality="atac", prompt="k-shot", reference=reference, reference_key="CellType",
            reference_modality="rna", progress=False, sidecar=False,
        )
    pd.testing.assert_series_equal(plain.obs["cellscribe"], poisoned.obs["cellscribe"])
    np.testing.assert_allclose(plain.obs["cellscribe_confidence"], poisoned.obs["cellscribe_confidence"])


def test_data_hvg_is_learned_on_the_reference_within_the_shared_genes(atac_host, pbsmall, rna):
    plan = run.plan_run(
        pbsmall, modality="atac", prompt="k-shot", model="markers", reference=_with_unseen_genes(rna),
        reference_key="CellType", reference_modality="rna", sentence="data-hvg", host=atac_host,
    )
    learned = plan.params["sentence_state"]["data_hvg"]
    assert learned["flavor"] == "seurat_v3"  # learned on the RNA counts
    assert len(learned["genes"]) == plan.params["reference_genes"]["shared"]
    measured = set(plan.features.feature_names[run.measured_mask(plan.features)])
    assert set(learned["genes"]) <= measured and not set(learned["genes"]) & set(UNSEEN)
    order = {g: i for i, g in enumerate(learned["genes"])}
    query = plan.prompts[0].sentences[0].split(", ")
    assert set(query) <= set(order) and [order[g] for g in query] == sorted(order[g] for g in query)


def test_reference_modality_errors(atac_host, pbsmall, rna):
    with pytest.raises(ValueError, match="reference_modality='rna' needs reference="):
        run.plan_run(pbsmall, modality="atac", prompt="k-shot", model="markers",
                          reference_key="cell_type", reference_modality="rna", host=atac_host)
    with pytest.raises(KeyError, match="'celltype'"):
        run.plan_run(pbsmall, modality="atac", prompt="k-shot", model="markers", reference=rna,
                          reference_key="celltype", reference_modality="rna", host=atac_host)
    mouse = _mouse_like(rna)
    with pytest.raises(ValueError, match="no gene is measured both"):
        run.plan_run(pbsmall, modality="atac", prompt="k-shot", model="markers", reference=mouse,
                          reference_key="CellType", reference_modality="rna", host=atac_host)
    # A peak matrix given as the reference of an RNA query is another modality, obviously.
    peaks = ad.AnnData(
        sp.csr_matrix(np.ones((3, 3), dtype=np.float32)),
        obs=pd.DataFrame({"cell_type": ["a", "b", "a"]}, index=["p1", "p2", "p3"]),
        var=pd.DataFrame(index=["chr5:1000-1500", "chr5:2000-2600", "chr11:500-900"]),
    )
    with pytest.raises(ValueError, match="peaks .* gene symbols .*Pass reference_modality="):
        run.plan_run(rna, modality="rna", prompt="k-shot", model="markers", reference=peaks,
                          reference_key="cell_type", host=atac_host)


@pytest.mark.slow
def test_cli_reference_modality(atac_host, tmp_path):
    from click.testing import CliRunner

    from cellscribe import cli

    built = {name: cli.main.commands.pop(name) for name in ("annotate", "sentences") if name in cli.main.commands}
    try:
        out = tmp_path / "pbsmall.h5ad"
        result = CliRunner().invoke(cli.main, [
            "annotate", str(FRAGMENTS), "--modality", "atac", "--gtf", str(GTF), "--chrom-sizes", str(SIZES),
            "--prompt", "k-shot", "--reference", str(RNA), "--reference-key", "CellType",
            "--reference-modality", "rna", "-o", str(out), "--no-progress",
        ])
        assert result.exit_code == 0, result.output
        written = ad.read_h5ad(out)
        assert set(written.obs["cellscribe"].dropna()) <= {"B", "M", "T"}
        assert written.uns["cellscribe"]["params"]["reference_modality"] == "rna"
    finally:
        for name in ("annotate", "sentences"):
            cli.main.commands.pop(name, None)
        cli.main.commands.update(built)


# -------------------------------------------------------------------------------------------------
# transfer_labels
# -------------------------------------------------------------------------------------------------


def test_transfer_labels_pbsmall(atac_host, pbsmall, rna, truth):
    adata = pbsmall.copy()
    before = _snapshot(rna)
    assert cellscribe.tl.transfer_labels(adata, rna, reference_key="CellType") is None
    _assert_untouched(rna, before)
    obs = adata.obs
    accuracy, table = _accuracy(obs["transfer"], truth)
    # The ATAC modality's transfer_options give log-normalised activity by default. Measured: 0.933
    # (B 47/50, T 45/50, monocytes 48/50, 1 pruned).
    assert accuracy >= 0.9, table
    assert table.loc["T cell", "T cell"] >= 43 and table.loc["monocyte", "monocyte"] >= 46 and table.loc["B cell", "B cell"] >= 44
    assert list(obs["transfer"].cat.categories) == ["B", "M", "T"]
    ok = obs["transfer_status"] == "ok"
    assert obs.loc[ok, "transfer"].notna().all() and obs.loc[~ok, "transfer"].isna().all()
    assert obs.loc[ok, "transfer_confidence"].between(0, 1).all()
    assert obs.loc[~ok, "transfer_note"].str.contains("pruned|no activity").all()
    assert obs.loc[ok, "transfer_note"].str.contains("Spearman").all()
    # Right calls lead by wider margins than wrong ones.
    right = obs["transfer"].astype(object).map(TO_ATAC) == truth.reindex(obs.index)
    assert obs.loc[ok & right, "transfer_confidence"].mean() > obs.loc[ok & ~right, "transfer_confidence"].mean()
    entry = adata.uns["transfer"]
    params, summary = entry["params"], entry["summary"]
    assert params["modality"] == "atac" and params["reference_modality"] == "rna"
    assert params["reference_key"] == "CellType" and list(params["labels"]) == ["B", "M", "T"]
    assert 0 < params["genes"]["informative"] <= params["genes"]["shared"] <= params["genes"]["query"]
    assert summary["n_ok"] + summary["n_unresolved"] == 150 == summary["n_cells"]


def test_transfer_labels_with_the_activity_sentences_rank(atac_host, pbsmall, rna, truth):
    labelled = cellscribe.tl.transfer_labels(
        pbsmall, rna, reference_key="CellType", modality_options={"normalization": "enrichment"}, copy=True,
    )
    assert "transfer" not in pbsmall.obs  # copy=True leaves the input alone
    accuracy, table = _accuracy(labelled.obs["transfer"], truth)
    # Measured: 0.913 (B 38/50, the others called T or pruned; T 50/50; monocytes 49/50; 3 pruned).
    assert accuracy >= 0.88, table
    assert table.loc["T cell", "T cell"] >= 48 and table.loc["monocyte", "monocyte"] >= 47 and table.loc["B cell", "B cell"] >= 33
    assert labelled.uns["transfer"]["params"]["modality_options"]["normalization"] == "enrichment"


def test_genes_the_query_cannot_show_do_not_change_transferred_labels(atac_host, pbsmall, rna):
    plain = cellscribe.tl.transfer_labels(pbsmall, rna, reference_key="CellType", copy=True)
    poisoned = cellscribe.tl.transfer_labels(pbsmall, _with_unseen_genes(rna), reference_key="CellType", copy=True)
    for column in ("transfer", "transfer_status", "transfer_note"):
        pd.testing.assert_series_equal(plain.obs[column], poisoned.obs[column])
    np.testing.assert_allclose(plain.obs["transfer_confidence"], poisoned.obs["transfer_confidence"])
    assert poisoned.uns["transfer"]["params"]["genes"]["reference"] == plain.uns["transfer"]["params"]["genes"][
        "reference"] + len(UNSEEN)


def test_transfer_labels_on_a_mudata(atac_host, pbsmall, rna):
    import mudata

    with mudata.set_options(pull_on_update=False), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        mdata = mudata.MuData({"atac": pbsmall.copy()})
        cellscribe.tl.transfer_labels(mdata, rna, reference_key="CellType", key_added="xfer")
    assert "xfer" in mdata.mod["atac"].obs and "atac:xfer" in mdata.obs
    assert mdata.uns["atac:xfer"]["params"]["mod"] == "atac"


def test_transfer_labels_errors(atac_host, pbsmall, rna):
    with pytest.raises(KeyError, match="'celltype'"):
        cellscribe.tl.transfer_labels(pbsmall, rna, reference_key="celltype", copy=True)
    single = rna.copy()
    single.obs["one"] = "T"
    with pytest.raises(ValueError, match="needs at least two"):
        cellscribe.tl.transfer_labels(pbsmall, single, reference_key="one", copy=True)
    mouse = _mouse_like(rna)
    with pytest.raises(ValueError, match="measured both in the query"):
        cellscribe.tl.transfer_labels(pbsmall, mouse, reference_key="CellType", copy=True)
    with pytest.raises(ValueError, match="n_markers"):
        cellscribe.tl.transfer_labels(pbsmall, rna, reference_key="CellType", n_markers=0, copy=True)
    assert "transfer" not in pbsmall.obs
