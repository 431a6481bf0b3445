"""Sentence strategies (auto, ranked-hvg, top-expressed, data-hvg) and the jsonl sentence format."""

from __future__ import annotations

import gzip
import io
import json
import logging

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellscribe.core.components import SentenceFormat, SentenceStrategy
from cellscribe.core.types import CellSentences, FeatureMatrix

STRATEGIES = ("auto", "ranked-hvg", "top-expressed", "data-hvg")


def features_of(adata, **kwargs) -> FeatureMatrix:
    return FeatureMatrix(X=adata.X, feature_names=adata.var_names, cell_ids=adata.obs_names, **kwargs)


def build(host, name, features, **kwargs) -> list[CellSentences]:
    """All chunks of strategy ``name`` (the keyword arguments the pipeline passes, plus ``kwargs``)."""
    kwargs.setdefault("state", {})
    kwargs.setdefault("chunk_size", 10_000)
    strategies = host.registry.all("sentence")
    return list(host.registry.get("sentence", name).build(features, strategies=strategies, **kwargs))


def joined(chunks: list[CellSentences]) -> CellSentences:
    return CellSentences.concatenate(chunks)


def all_genes(sentences: CellSentences) -> list[list[str]]:
    return [sentences.genes(i) for i in range(len(sentences))]


def naive_top(X, names, n, exclude=()) -> list[list[str]]:
    """Reference top-expressed rule, one cell at a time: positive values, highest first, ties by column."""
    X = sp.csr_matrix(X)
    out = []
    for i in range(X.shape[0]):
        row = X.getrow(i).toarray().ravel()
        cols = [j for j in np.flatnonzero(row > 0) if names[j] not in exclude]
        cols.sort(key=lambda j: (-row[j], j))
        out.append([names[j] for j in cols[:n]])
    return out


@pytest.fixture
def pbmc68k_features():
    """scanpy's pbmc68k_reduced: 700 cells, raw.X log-normalised, 765 genes (422 of CellReasoner's)."""
    sc = pytest.importorskip("scanpy")
    adata = sc.datasets.pbmc68k_reduced()
    return FeatureMatrix(
        X=adata.raw.X, feature_names=adata.raw.var_names, cell_ids=adata.obs_names, value_kind="log",
        source="raw.X",
    )


# -------------------------------------------------------------------------------------------------
# Registration
# -------------------------------------------------------------------------------------------------


def test_strategies_and_format_are_registered(host):
    for name in STRATEGIES:
        strategy = host.registry.get("sentence", name)
        assert isinstance(strategy, SentenceStrategy)
        assert strategy.name == name and strategy.description
    assert host.registry.get("sentence", "ranked-hvg").default_n_genes == 1000
    assert host.registry.get("sentence", "top-expressed").default_n_genes == 50
    fmt = host.registry.get("format", "jsonl")
    assert isinstance(fmt, SentenceFormat)
    assert (fmt.suffix, fmt.sentence, fmt.needs_labels) == (".jsonl", None, False)


# -------------------------------------------------------------------------------------------------
# ranked-hvg
# -------------------------------------------------------------------------------------------------


def test_ranked_hvg_reproduces_cellreasoner_inputs(host, pancreas, data_dir):
    with gzip.open(data_dir / "pancreas_350_cellreasoner_direct.json.gz", "rt", encoding="utf-8") as fh:
        reference = json.load(fh)
    chunks = build(host, "ranked-hvg", features_of(pancreas), chunk_size=128)
    sentences = joined(chunks)
    assert [r["cell_name"] for r in reference] == list(sentences.cell_ids)
    assert [sentences.sentence(i) for i in range(len(sentences))] == [r["input"] for r in reference]
    assert max(sentences.lengths()) == 1000  # the cap is reached by some cells
    assert all(c.vocabulary is chunks[0].vocabulary for c in chunks)
    assert len(chunks[0].vocabulary) == 10_000
    assert {c.strategy for c in chunks} == {"ranked-hvg"}
    assert chunks[0].params == {
        "gene_list": "cellreasoner", "n_genes": 1000, "n_list": 10_000, "n_present": 5314,
    }


def test_ranked_hvg_n_genes_truncates(host, pancreas, data_dir):
    with gzip.open(data_dir / "pancreas_350_cellreasoner_direct.json.gz", "rt", encoding="utf-8") as fh:
        reference = json.load(fh)
    sentences = joined(build(host, "ranked-hvg", features_of(pancreas[:20]), n_genes=5))
    assert all_genes(sentences) == [r["input"].split(", ")[:5] for r in reference[:20]]


def test_ranked_hvg_gene_list_option(host, tmp_path):
    X = sp.csr_matrix(np.array([[1, 0, 2, 5], [0, 3, 0, 0], [0, 0, 0, 0]], dtype=np.float32))
    features = FeatureMatrix(X=X, feature_names=["A", "B", "C", "D"], cell_ids=["c0", "c1", "c2"])
    path = tmp_path / "list.txt"
    path.write_text("D\nZ\n\nA\nB\n", encoding="utf-8")
    for gene_list, origin in ((path, str(path)), (["D", "Z", "A", "B"], "given")):
        chunks = build(host, "ranked-hvg", features, gene_list=gene_list)
        assert all_genes(joined(chunks)) == [["D", "A"], ["B"], []]
        assert chunks[0].params["gene_list"] == origin
        assert chunks[0].params["n_present"] == 3
    with pytest.raises(ValueError, match="repeats symbols"):
        build(host, "ranked-hvg", features, gene_list=["A", "B", "A"])
    with pytest.raises(ValueError, match="not a file"):
        build(host, "ranked-hvg", features, gene_list=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="n_genes must be a positive integer"):
        build(host, "ranked-hvg", features, n_genes=0)


def test_ranked_hvg_warns_when_no_listed_gene_is_present(host):
    X = sp.csr_matrix(np.ones((2, 2), dtype=np.float32))
    features = FeatureMatrix(X=X, feature_names=["ENSG00000000003", "ENSG00000000005"], cell_ids=["a", "b"])
    with pytest.warns(UserWarning, match="gene symbols"):
        sentences = joined(build(host, "ranked-hvg", features))
    assert sentences.lengths().tolist() == [0, 0]


# -------------------------------------------------------------------------------------------------
# top-expressed
# -------------------------------------------------------------------------------------------------


def test_top_expressed_matches_naive_reference(host, pancreas):
    names = list(pancreas.var_names)
    chunks = build(host, "top-expressed", features_of(pancreas), chunk_size=100)
    assert all_genes(joined(chunks)) == naive_top(pancreas.X, names, 50)
    assert {c.strategy for c in chunks} == {"top-expressed"}
    assert chunks[0].vocabulary is chunks[-1].vocabulary
    assert chunks[0].params == {"n_genes": 50, "n_excluded": 0}


def test_top_expressed_exclude(host, pancreas):
    names = list(pancreas.var_names)
    ribo = {g for g in names if g.startswith(("RPL", "RPS"))}
    expected = naive_top(pancreas.X, names, 30, exclude=ribo)
    by_set = build(host, "top-expressed", features_of(pancreas), n_genes=30, exclude=sorted(ribo))
    by_callable = build(
        host, "top-expressed", features_of(pancreas), n_genes=30,
        exclude=lambda g: g.startswith(("RPL", "RPS")),
    )
    assert all_genes(joined(by_set)) == expected == all_genes(joined(by_callable))
    assert by_set[0].params["n_excluded"] == len(ribo) > 0
    assert not any(g in ribo for cell in expected for g in cell)


def test_top_expressed_ties_follow_feature_order(host):
    # Cell 0: three genes tie at 3; cell 1 ties at the cut-off after its top gene. Indices are stored
    # in reverse order, so the result cannot come from the storage order.
    dense = np.array([[1, 3, 3, 0, 2, 3], [2, 0, 2, 9, 2, 2]], dtype=np.float32)
    coo = sp.coo_matrix(dense)
    order = np.lexsort((-coo.col, coo.row))
    X = sp.csr_matrix((coo.data[order], coo.col[order], [0, 5, 10]), shape=dense.shape)
    assert not X.has_sorted_indices
    features = FeatureMatrix(X=X, feature_names=[f"G{i}" for i in range(6)], cell_ids=["c0", "c1"])
    assert all_genes(joined(build(host, "top-expressed", features, n_genes=3))) == [
        ["G1", "G2", "G5"],
        ["G3", "G0", "G2"],
    ]
    assert all_genes(joined(build(host, "top-expressed", features, n_genes=4))) == [
        ["G1", "G2", "G5", "G4"],
        ["G3", "G0", "G2", "G4"],
    ]


def test_top_expressed_ties_at_the_pruning_threshold(host):
    # 10 genes at 7, 60 at 3, 100 at 1, in shuffled columns: the 50th value is a 3, shared by 60 genes;
    # the pre-selection must keep all of them and the ranking take the first 40 in feature order.
    rng = np.random.default_rng(0)
    values = rng.permutation(np.repeat([7.0, 3.0, 1.0], [10, 60, 100]))
    X = sp.csr_matrix(np.vstack([values, values[::-1], np.zeros_like(values)]))
    names = [f"G{i:03d}" for i in range(len(values))]
    features = FeatureMatrix(X=X, feature_names=names, cell_ids=["a", "b", "c"])
    from cellscribe.plugins.sentences import candidates_for_top

    assert candidates_for_top(X, 50, None).getnnz(axis=1).tolist() == [70, 70, 0]  # the 1s are pruned
    got = all_genes(joined(build(host, "top-expressed", features)))
    assert got == naive_top(X, names, 50)
    chosen = sorted(values[[names.index(g) for g in got[0]]], reverse=True)
    assert [chosen[i] for i in (9, 10, 49)] == [7, 3, 3]


# -------------------------------------------------------------------------------------------------
# Properties shared by every strategy
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ranked-hvg", "top-expressed", "data-hvg"])
def test_chunk_size_does_not_change_the_result(host, pancreas, name):
    features = features_of(pancreas)
    results, states = [], []
    for chunk_size in (1, 7, 10_000):
        state: dict = {}
        chunks = build(host, name, features, chunk_size=chunk_size, state=state)
        assert len(chunks) == -(-pancreas.n_obs // chunk_size)
        assert all(c.vocabulary is chunks[0].vocabulary for c in chunks)
        results.append(joined(chunks))
        states.append(state)
    assert states[0] == states[1] == states[2]
    for other in results[1:]:
        assert list(other.cell_ids) == list(results[0].cell_ids)
        np.testing.assert_array_equal(other.indptr, results[0].indptr)
        np.testing.assert_array_equal(other.indices, results[0].indices)


@pytest.mark.parametrize("name", ["ranked-hvg", "top-expressed"])
def test_empty_cells_get_empty_sentences(host, pancreas, name):
    X = sp.vstack([
        pancreas.X[:2],
        sp.csr_matrix((1, pancreas.n_vars), dtype=pancreas.X.dtype),  # nothing stored
        sp.csr_matrix(([0, 0], [3, 7], [0, 2]), shape=(1, pancreas.n_vars)),  # explicit zeros
        pancreas.X[2:3],
    ], format="csr")
    ids = ["a", "b", "empty", "zeros", "c"]
    features = FeatureMatrix(X=X, feature_names=pancreas.var_names, cell_ids=ids)
    sentences = joined(build(host, name, features, chunk_size=2))
    assert list(sentences.cell_ids) == ids
    assert sentences.empty().tolist() == [False, False, True, True, False]


# -------------------------------------------------------------------------------------------------
# data-hvg
# -------------------------------------------------------------------------------------------------


def test_data_hvg_learns_stores_and_reuses_its_list(host, pancreas, monkeypatch):
    sc = pytest.importorskip("scanpy")
    features = features_of(pancreas)
    state: dict = {}
    first = joined(build(host, "data-hvg", features, state=state, n_top_genes=500))

    expected = sc.pp.highly_variable_genes(
        pancreas.copy(), flavor="seurat_v3", n_top_genes=500, inplace=False
    )
    expected = expected.loc[expected["highly_variable"]].sort_values("highly_variable_rank", kind="stable")
    assert state["data_hvg"] == {
        "genes": list(expected.index), "flavor": "seurat_v3", "n_top_genes": 500,
    }
    assert list(first.vocabulary) == list(expected.index)
    ranked = joined(build(host, "ranked-hvg", features, gene_list=state["data_hvg"]["genes"]))
    assert all_genes(first) == all_genes(ranked)
    assert first.params["gene_list"] == "data-hvg" and first.params["flavor"] == "seurat_v3"

    def no_scanpy(*args, **kwargs):
        raise AssertionError("data-hvg recomputed its gene list although the state holds one")

    monkeypatch.setattr(sc.pp, "highly_variable_genes", no_scanpy)
    again = joined(build(host, "data-hvg", features, state=state))
    assert all_genes(again) == all_genes(first)
    with pytest.warns(UserWarning, match="reuses the gene list"):
        build(host, "data-hvg", features, state=state, n_top_genes=100)
    assert len(state["data_hvg"]["genes"]) == 500


def test_data_hvg_uses_dispersion_on_log_data(host, pbmc68k_features):
    sc = pytest.importorskip("scanpy")
    import anndata as ad

    state: dict = {}
    chunks = build(host, "data-hvg", pbmc68k_features, state=state, n_top_genes=100)
    assert state["data_hvg"]["flavor"] == "seurat"
    adata = ad.AnnData(
        sp.csr_matrix(pbmc68k_features.X), var=pd.DataFrame(index=pbmc68k_features.feature_names)
    )
    stats = sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=100, inplace=False)
    stats.index = adata.var_names
    top = stats["dispersions_norm"].sort_values(ascending=False, kind="stable").index[:100]
    assert state["data_hvg"]["genes"] == list(top)
    assert set(top) == set(stats.index[stats["highly_variable"]])
    assert len(chunks[0].vocabulary) == 100


def test_data_hvg_rejects_a_malformed_state(host, pancreas):
    with pytest.raises(ValueError, match="'genes' list"):
        build(host, "data-hvg", features_of(pancreas[:5]), state={"data_hvg": "CD3E"})


# -------------------------------------------------------------------------------------------------
# auto
# -------------------------------------------------------------------------------------------------


def test_auto_chooses_ranked_hvg_when_the_list_is_covered(host, pancreas, caplog):
    state: dict = {}
    with caplog.at_level(logging.INFO, logger="cellscribe.plugins.sentences"):
        chunks = build(host, "auto", features_of(pancreas), state=state)
    assert state["auto"]["chosen"] == "ranked-hvg"
    assert (state["auto"]["n_present"], state["auto"]["n_list"]) == (5314, 10_000)
    assert "5314 of the 10000" in caplog.text and "auto -> ranked-hvg" in caplog.text
    assert {c.strategy for c in chunks} == {"ranked-hvg"}
    assert chunks[0].params["requested"] == "auto"
    direct = joined(build(host, "ranked-hvg", features_of(pancreas)))
    np.testing.assert_array_equal(joined(chunks).indices, direct.indices)


def test_auto_falls_back_to_top_expressed(host, pbmc68k_features, caplog):
    state: dict = {}
    with caplog.at_level(logging.INFO, logger="cellscribe.plugins.sentences"):
        chunks = build(host, "auto", pbmc68k_features, state=state)
    assert state["auto"]["chosen"] == "top-expressed"
    assert (state["auto"]["n_present"], state["auto"]["n_list"]) == (422, 10_000)
    assert "only 422 of the 10000" in caplog.text
    assert {c.strategy for c in chunks} == {"top-expressed"}
    sentences = joined(chunks)
    assert sentences.lengths().max() == 50
    names = list(pbmc68k_features.feature_names)
    assert all_genes(sentences)[:25] == naive_top(pbmc68k_features.X[:25], names, 50)


def test_auto_keeps_the_choice_in_its_state(host, pancreas):
    state = {"auto": {"chosen": "top-expressed", "reason": "given", "n_present": 0, "n_list": 10_000}}
    chunks = build(host, "auto", features_of(pancreas[:10]), state=state, n_genes=7)
    assert {c.strategy for c in chunks} == {"top-expressed"}
    assert joined(chunks).lengths().max() == 7


# -------------------------------------------------------------------------------------------------
# jsonl format
# -------------------------------------------------------------------------------------------------


def _jsonl(host, chunks, **kwargs) -> tuple[int, list[dict]]:
    fh = io.BytesIO()
    n = host.registry.get("format", "jsonl").write(fh, iter(chunks), **kwargs)
    text = fh.getvalue().decode("utf-8")
    assert text.endswith("\n") or not text
    return n, [json.loads(line) for line in text.splitlines()]


def test_jsonl_writes_one_object_per_cell(host, pancreas):
    chunks = build(host, "ranked-hvg", features_of(pancreas), chunk_size=64)
    sentences = joined(chunks)
    labels = pancreas.obs["Group"]
    n, records = _jsonl(host, chunks, labels=labels, obs=pancreas.obs, reasoning=False)
    assert n == len(records) == pancreas.n_obs
    assert [r["cell_id"] for r in records] == list(pancreas.obs_names)
    assert [r["sentence"] for r in records] == [sentences.sentence(i) for i in range(n)]
    assert [r["n_genes"] for r in records] == sentences.lengths().tolist()
    assert [r["label"] for r in records] == labels.astype(str).tolist()
    n, records = _jsonl(host, chunks)
    assert n == pancreas.n_obs and set(records[0]) == {"cell_id", "sentence", "n_genes"}


def test_jsonl_escapes_names_and_keeps_empty_cells(host):
    names = ['QUOTE"D', "BACK\\SLASH", "GÈNE-α", "TAB\tX"]
    X = sp.csr_matrix(np.array([[3, 1, 2, 0], [0, 0, 0, 0], [0, 0, 0, 5]], dtype=np.float32))
    features = FeatureMatrix(X=X, feature_names=names, cell_ids=["c\"1", "c2", "c3"])
    chunks = build(host, "top-expressed", features, chunk_size=2)
    labels = pd.Series(["B cell", "T cell"], index=["c\"1", "c2"])  # c3 has no label
    n, records = _jsonl(host, chunks, labels=labels)
    assert n == 3
    assert records[0] == {
        "cell_id": 'c"1', "sentence": 'QUOTE"D, GÈNE-α, BACK\\SLASH', "n_genes": 3, "label": "B cell",
    }
    assert records[1] == {"cell_id": "c2", "sentence": "", "n_genes": 0, "label": "T cell"}
    assert records[2] == {"cell_id": "c3", "sentence": "TAB\tX", "n_genes": 1, "label": None}
    with pytest.raises(ValueError, match="unique cell ids"):
        _jsonl(host, chunks, labels=pd.Series(["x", "y"], index=["c2", "c2"]))
