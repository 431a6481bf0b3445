"""Budgeted annotation (issue 18 item 1): a few representative cells go to the model, labels spread over
the kNN graph, one bounded second round where they disagree."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cellscribe as cs
from cellscribe.core.run.budget import _allocate, spread
from cellscribe.core.spec import RunSpec

from _rule_backend import PANCREAS_RULES, RuleModel, RulePlugin


@pytest.fixture(scope="module")
def pbmc():
    import scanpy as sc

    return sc.datasets.pbmc68k_reduced()


def _graded(adata, truth: str) -> float:
    from cellscribe.core.evaluation.evaluate import evaluate_labels

    labels = adata.obs["cellscribe"].astype(object)
    return evaluate_labels(adata.obs[truth].astype(str), labels.where(labels.notna(), None),
                           adata.obs["cellscribe_confidence"]).graded_score


def _quiet_annotate(adata, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cs.tl.annotate(adata, progress=False, **params)


# -- the parameter ---------------------------------------------------------------------------------


@pytest.mark.parametrize("given, kept", [(0.05, 0.05), ("0.05", 0.05), ("5%", 0.05), (2000, 2000), ("2000", 2000),
                                         (2000.0, 2000), (1.0, 1.0), (np.float64(0.1), 0.1)])
def test_budget_is_a_share_or_a_number_of_cells(given, kept):
    value = RunSpec.from_kwargs(budget=given)["budget"]
    assert value == kept and type(value) is type(kept)


@pytest.mark.parametrize("params, message", [
    ({"budget": 0}, "share of cells in (0, 1]"),
    ({"budget": 1.5}, "share of cells in (0, 1]"),
    ({"budget": -0.1}, "share of cells in (0, 1]"),
    ({"budget": "lots"}, "share of cells (0.05, 5%)"),
    ({"budget": True}, "share of cells in (0, 1]"),
    ({"budget_options": {"method": "medoids"}}, "budget_options= needs budget="),
    ({"budget": 0.1, "budget_options": {"metod": "random"}}, "unknown budget option(s) 'metod'"),
    ({"budget": 0.1, "budget_options": {"method": "best"}}, "method must be one of medoids, random"),
    ({"budget": 0.1, "budget_options": {"min_agreement": 2}}, "min_agreement must be a number in [0, 1]"),
    ({"budget": 0.1, "groupby": "louvain", "n_representatives": 3}, "leave n_representatives out"),
])
def test_bad_budgets_are_refused_in_one_line(params, message):
    with pytest.raises(ValueError) as raised:
        RunSpec.from_kwargs(**params)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_the_budget_is_recorded_and_recreates_the_run():
    spec = RunSpec.from_kwargs(budget=0.05, budget_options={"method": "random"})
    assert RunSpec.from_params(spec.to_params()) == spec


def test_the_command_line_has_the_flags():
    from click.testing import CliRunner

    from cellscribe.cli import main

    out = CliRunner().invoke(main, ["annotate", "--help"]).output
    assert "--budget SHARE|N" in out and "--budget-option KEY=VALUE" in out


# -- the spread ------------------------------------------------------------------------------------


def test_spread_follows_the_graph_and_combines_agreement_and_confidence():
    # a chain 0 - 1 - 2 - 3 - 4: answers at both ends
    n = 5
    graph = sp.diags([np.ones(n - 1), np.ones(n - 1)], [-1, 1], format="csr")
    result = spread(graph, np.array([0, 4]), np.array(["B", "T"], dtype=object), np.array([0.8, 0.8]))
    assert result.labels[[0, 1, 3, 4]].tolist() == ["B", "B", "T", "T"]
    assert result.agreement[2] == pytest.approx(0.5, abs=1e-6)  # the middle is a tie
    # cell 1 reaches "B" first with probability 3/4 (a walk from the middle is even)
    assert result.agreement[1] == pytest.approx(0.75, abs=1e-3)
    assert result.confidence[1] == pytest.approx(0.75 * 0.8, abs=1e-3)
    # a more confident answer pulls harder
    stronger = spread(graph, np.array([0, 4]), np.array(["B", "T"], dtype=object), np.array([0.9, 0.3]))
    assert stronger.labels[2] == "B"
    # without the model's confidence, the agreement alone
    blind = spread(graph, np.array([0, 4]), np.array(["B", "T"], dtype=object), np.array([np.nan, np.nan]))
    assert np.isnan(blind.model_confidence[1]) and blind.confidence[1] == pytest.approx(blind.agreement[1])


def test_spread_is_the_harmonic_solution_of_the_graph():
    # a random symmetric graph: the walk probabilities solve (D - W)_UU F = W_UA Y, checked densely
    rng = np.random.default_rng(0)
    W = sp.random(60, 60, density=0.15, random_state=1, format="csr")
    W = sp.csr_matrix(W + W.T + sp.diags(np.ones(59), 1) + sp.diags(np.ones(59), -1))
    answered = np.array([0, 7, 19, 33, 50])
    labels = np.array(["a", "b", "a", "c", "b"], dtype=object)
    conf = np.array([0.9, 0.5, np.nan, 0.7, 1.0])
    result = spread(W, answered, labels, conf)
    dense = W.toarray()
    free = np.setdiff1d(np.arange(60), answered)
    weight = np.where(np.isfinite(conf), conf, 1.0)
    Y = np.zeros((5, 3))
    Y[np.arange(5), [0, 1, 0, 2, 1]] = weight
    F = np.linalg.solve(np.diag(dense.sum(1)[free]) - dense[np.ix_(free, free)], dense[np.ix_(free, answered)] @ Y)
    share = F / F.sum(1, keepdims=True)
    assert result.labels[free].tolist() == np.array(["a", "b", "c"])[F.argmax(1)].tolist()
    assert np.allclose(result.agreement[free], share.max(1), atol=1e-6)
    # the model confidence of a cell's label: the walk-weighted mean over the answers that carry one
    known = np.isfinite(conf)
    C = np.linalg.solve(np.diag(dense.sum(1)[free]) - dense[np.ix_(free, free)],
                        dense[np.ix_(free, answered)] @ (Y * np.where(known, conf, 0)[:, None]))
    K = np.linalg.solve(np.diag(dense.sum(1)[free]) - dense[np.ix_(free, free)],
                        dense[np.ix_(free, answered)] @ (Y * known[:, None]))
    win = F.argmax(1)
    expected = C[np.arange(len(free)), win] / K[np.arange(len(free)), win]
    assert np.allclose(result.model_confidence[free], expected, atol=1e-6)
    assert result.labels[answered].tolist() == labels.tolist()


def test_a_cell_no_answer_reaches_has_no_label():
    graph = sp.csr_matrix(np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=float))
    result = spread(graph, np.array([0]), np.array(["B"], dtype=object), np.array([0.9]))
    assert result.labels.tolist() == ["B", "B", None, None] and (result.agreement[2:] == 0).all()
    assert np.isnan(result.confidence[2:]).all()


def test_the_budget_is_shared_by_size_with_one_cell_per_group():
    assert _allocate(np.array([100, 10, 1]), 3).tolist() == [1, 1, 1]
    quota = _allocate(np.array([700, 200, 100]), 20)
    assert quota.sum() == 20 and quota.tolist() == [14, 4, 2]
    assert _allocate(np.array([2, 1]), 10).tolist() == [2, 1]  # never more than a group holds


# -- whole runs ------------------------------------------------------------------------------------


def test_five_percent_of_pbmc_sends_at_most_ten_percent_and_keeps_the_quality(pbmc):
    full = pbmc.copy()
    _quiet_annotate(full)
    budgeted = pbmc.copy()
    _quiet_annotate(budgeted, budget=0.05)
    record = budgeted.uns["cellscribe"]["budget"]
    n = budgeted.n_obs
    assert record["n_first_round"] == 35 == int(0.05 * n)
    assert record["n_sent"] <= 0.10 * n and record["n_sent"] == record["n_first_round"] + record["n_requeried"]
    assert budgeted.uns["cellscribe"]["summary"]["n_cells_sent"] == record["n_sent"]
    source = budgeted.obs["cellscribe_source"].astype(str)
    assert (source == "model").sum() == record["n_sent"] and (source == "propagated").sum() == n - record["n_sent"]
    # the model saw only the cells marked "model" (one unit per prompt, zero-shot)
    raw = budgeted.uns["cellscribe"]["raw"]
    assert sorted(raw["unit_ids"]) == sorted(budgeted.obs_names[source == "model"])
    propagated = budgeted.obs[source == "propagated"]
    assert propagated["cellscribe_note"].str.startswith("propagated over the kNN graph").all()
    assert propagated["cellscribe_confidence"].between(0, 1).all()
    # the cells sent keep the model's own answers (as in the full run: same context inferred? not always),
    # and the spread labels score within 0.02 of the full run or better
    assert _graded(budgeted, "bulk_labels") >= _graded(full, "bulk_labels") - 0.02
    assert budgeted.X is not pbmc.X and np.array_equal(budgeted.X, pbmc.X)  # the data is not touched


def test_a_budget_of_every_cell_is_the_full_run(pancreas):
    full = pancreas.copy()
    _quiet_annotate(full)
    everything = pancreas.copy()
    _quiet_annotate(everything, budget=1.0)
    assert everything.obs["cellscribe"].astype(str).equals(full.obs["cellscribe"].astype(str))
    assert (everything.obs["cellscribe_source"] == "model").all()
    assert everything.uns["cellscribe"]["budget"]["n_requeried"] == 0


def test_groupby_shares_the_budget_among_groups_and_keeps_one_label_per_group(pbmc):
    adata = pbmc.copy()
    _quiet_annotate(adata, budget=0.05, groupby="louvain")
    record = adata.uns["cellscribe"]["budget"]
    assert record["n_sent"] <= 0.10 * adata.n_obs
    sent = adata.obs["cellscribe_source"] == "model"
    assert set(adata.obs.loc[sent, "louvain"]) == set(adata.obs["louvain"])  # every group has one
    assert (adata.obs.groupby("louvain", observed=True)["cellscribe"].nunique() == 1).all()
    clusters = adata.uns["cellscribe"]["clusters"]
    assert clusters["n_representatives"].sum() == record["n_sent"]
    assert adata.obs.loc[~sent, "cellscribe_note"].str.startswith("propagated").all()


def test_an_obsm_embedding_can_be_used_and_a_missing_one_is_refused_first(pbmc, with_plugin):
    adata = pbmc.copy()
    _quiet_annotate(adata, budget=0.05, budget_options={"use_rep": "X_pca", "method": "random"})
    assert adata.uns["cellscribe"]["budget"]["embedding"] == "obsm['X_pca']"
    model = RuleModel(PANCREAS_RULES)
    with_plugin(RulePlugin(model=model))
    with pytest.raises(ValueError, match="use_rep='X_umap_missing' is not in obsm"):
        cs.tl.annotate(pbmc.copy(), model="rules", budget=0.05, budget_options={"use_rep": "X_umap_missing"})
    assert model.calls == []  # refused before any model work


def test_every_model_and_the_puzzle_prompts_work_with_a_budget(pancreas, with_plugin):
    model = RuleModel(PANCREAS_RULES)
    with_plugin(RulePlugin(model=model))
    candidates = sorted(set(PANCREAS_RULES.values()))
    adata = pancreas.copy()
    _quiet_annotate(adata, model="rules", budget=0.1, prompt="puzzle", candidates=candidates)
    record = adata.uns["cellscribe"]["budget"]
    units = [u for p in model.calls for u in p.unit_ids]
    assert len(units) == len(set(units)) == record["n_sent"] <= 0.2 * adata.n_obs
    assert set(adata.obs["cellscribe"].dropna()) <= set(candidates)


def test_a_resumed_budgeted_run_ends_as_the_uninterrupted_one(pancreas, with_plugin, tmp_path):
    model = RuleModel(PANCREAS_RULES)
    with_plugin(RulePlugin(model=model))
    first = pancreas.copy()
    folder = tmp_path / "ckpt"
    _quiet_annotate(first, model="rules", budget=0.05, checkpoint=str(folder))
    assert (folder / "requery").is_dir() and list((folder / "requery").glob("batch-*.json"))
    sent = len(model.calls)
    again = pancreas.copy()
    _quiet_annotate(again, model="rules", budget=0.05, checkpoint=str(folder))
    assert len(model.calls) == sent  # both rounds resumed, nothing sent again
    assert again.uns["cellscribe"]["params"]["resumed_batches"] == 2
    pd.testing.assert_frame_equal(again.obs.filter(like="cellscribe"), first.obs.filter(like="cellscribe"))


class _Failing(RuleModel):
    """Fails every call that holds the first unit it is asked about, while ``failing``."""

    def __init__(self):
        super().__init__(PANCREAS_RULES)
        self.failing = True
        self.bad = None

    def generate(self, prompts, **kw):
        if self.bad is None:
            self.bad = prompts[0].unit_ids[0]
        if self.failing and any(self.bad in p.unit_ids for p in prompts):
            raise RuntimeError("HTTP 500 from the server")
        return super().generate(prompts, **kw)


def test_failed_first_round_prompts_stop_the_second_round_and_raise(pancreas, with_plugin, tmp_path):
    model = _Failing()
    with_plugin(RulePlugin(model=model))
    adata = pancreas.copy()
    with pytest.raises(cs.FailedPromptsError):
        _quiet_annotate(adata, model="rules", budget=0.05, checkpoint=str(tmp_path / "c"))
    record = adata.uns["cellscribe"]["budget"]
    assert record["n_requeried"] == 0 and record["second_round"].startswith("not run: 1 first-round prompts")
    model.failing = False
    _quiet_annotate(adata, model="rules", budget=0.05, checkpoint=str(tmp_path / "c"))
    assert adata.uns["cellscribe"]["budget"]["n_requeried"] > 0


def test_a_python_call_writes_no_file(pancreas, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _quiet_annotate(pancreas, budget=0.05)
    assert list(tmp_path.iterdir()) == []


def test_atac_cells_are_chosen_on_the_modality_lsi(data_dir):
    import anndata as ad

    adata = ad.read_h5ad(data_dir / "atac" / "schep2017_blood_celllines_600cells.h5ad")
    adata.obs_names_make_unique()
    _quiet_annotate(adata, modality="atac", budget=0.05, sidecar=False,
                    modality_options={"gtf": str(data_dir / "atac" / "hg19_genes.gtf.gz")})
    record = adata.uns["cellscribe"]["budget"]
    assert record["embedding"].startswith("LSI of X")
    assert record["n_sent"] <= 0.1 * adata.n_obs
    assert adata.obs["cellscribe_status"].eq("ok").mean() > 0.9


def test_two_modalities_are_chosen_on_both_embeddings(data_dir):
    import mudata

    mudata.set_options(pull_on_update=False)
    path = data_dir / "multiome" / "pbmc10k_multiome_1000cells_subset.h5mu"
    mdata = mudata.read_h5mu(path)
    _quiet_annotate(mdata, modality="rna+atac", budget=0.1, sidecar=False)
    record = mdata.uns["cellscribe"]["budget"]
    assert record["embedding"].startswith("RNA: PCA") and "ATAC: LSI" in record["embedding"]
    assert record["n_first_round"] == int(0.1 * record["n_cells"]) and record["n_sent"] <= 0.2 * mdata.n_obs
    source = mdata.obs["cellscribe_source"].astype(str)
    assert (source == "model").sum() == record["n_sent"]
    assert mdata.obs["cellscribe_status"].eq("ok").mean() > 0.95
    before = mudata.read_h5mu(path)
    for key in ("rna", "atac"):  # the modalities themselves are not touched
        assert np.array_equal(before.mod[key].X.toarray(), mdata.mod[key].X.toarray())


def test_a_transformers_model_answers_only_the_chosen_cells(pancreas, tmp_path):
    pytest.importorskip("transformers")
    from _tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny", seed=0)
    adata = pancreas[::5].copy()  # 70 cells
    _quiet_annotate(adata, model=str(model), budget=0.1, generation={"max_new_tokens": 4}, device="cpu", n_genes=30)
    record = adata.uns["cellscribe"]["budget"]
    raw = adata.uns["cellscribe"]["raw"]
    source = adata.obs["cellscribe_source"].astype(str)
    assert record["n_first_round"] == 7 and record["n_sent"] <= 14
    assert sorted(raw["unit_ids"]) == sorted(adata.obs_names[source == "model"])
    # a random tiny model answers nonsense: unresolved answers are not spread, and nothing is invented
    labels = adata.obs["cellscribe"].dropna().astype(str)
    answered = adata.obs.loc[source == "model", "cellscribe"].dropna().astype(str)
    assert set(labels) <= set(answered)


def test_the_iterative_solver_of_large_data_gives_the_direct_solution(monkeypatch):
    import cellscribe.core.run.budget as budget

    rng = np.random.default_rng(3)
    W = sp.random(300, 300, density=0.03, random_state=4, format="csr")
    W = sp.csr_matrix(W + W.T + sp.diags(np.ones(299), 1) + sp.diags(np.ones(299), -1))
    answered = np.sort(rng.choice(300, 20, replace=False))
    labels = rng.choice(np.array(["a", "b", "c"], dtype=object), 20)
    conf = rng.uniform(0.3, 1.0, 20)
    direct = spread(W, answered, labels, conf)
    monkeypatch.setattr(budget, "DIRECT_SOLVE_MAX", 0)
    iterative = spread(W, answered, labels, conf)
    assert direct.labels.tolist() == iterative.labels.tolist()
    assert np.allclose(direct.agreement, iterative.agreement, atol=1e-6)
    assert np.allclose(direct.confidence, iterative.confidence, atol=1e-6)


def test_many_medoids_are_chosen_in_two_levels(monkeypatch):
    import cellscribe.core.run.budget as budget

    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 5)).astype(np.float32)
    rows = np.arange(500)
    flat = budget._medoids(X, rows, 30, 0)
    monkeypatch.setattr(budget, "FLAT_KMEANS_MAX", 5)
    levels = budget._medoids(X, rows, 30, 0)
    for chosen in (flat, levels):
        assert len(chosen) == len(np.unique(chosen)) == 30 and np.isin(chosen, rows).all()


@pytest.mark.slow  # pynndescent's numba compilation: about a minute
def test_the_approximate_graph_of_large_data_is_a_symmetric_knn_graph(monkeypatch):
    import cellscribe.core.run.budget as budget

    X = np.random.default_rng(0).normal(size=(600, 8)).astype(np.float32)
    exact = budget.knn_graph(X, 10, 0)
    monkeypatch.setattr(budget, "EXACT_KNN_MAX", 0)
    approximate = budget.knn_graph(X, 10, 0)
    assert isinstance(approximate, sp.csr_matrix) and abs(approximate - approximate.T).max() < 1e-9
    same = (exact.multiply(approximate) > 0).sum() / (exact > 0).sum()
    assert same > 0.9  # nearly the same neighbours


def test_more_groups_than_the_budget_still_sends_at_most_twice_the_budget(pbmc):
    adata = pbmc.copy()
    adata.obs["many"] = pd.Categorical((np.arange(adata.n_obs) % 50).astype(str))
    with pytest.warns(UserWarning, match="one cell per group is sent, and fewer re-queried"):
        cs.tl.annotate(adata, budget=0.05, groupby="many", progress=False)
    record = adata.uns["cellscribe"]["budget"]
    assert record["n_first_round"] == 50 and record["n_sent"] <= 70 == 2 * int(0.05 * adata.n_obs)
