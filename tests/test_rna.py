"""The ``rna`` modality (matrix choice, scaled data, gene identifiers, duplicates) and core.domain.genes."""

from __future__ import annotations

import gzip
import logging
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata.tests.helpers import assert_equal

from cellscribe.core.domain import genes

ROOT = Path(__file__).resolve().parents[1]
GTF = ROOT.parent / "shared" / "data" / "genome" / "hg38_ensembl101_genes.gtf.gz"

# Checked by hand against the `gene` records of the Ensembl 101 GTF (GRCh38).
REAL_IDS = {
    "ENSG00000105369": "CD79A",
    "ENSG00000010610": "CD4",
    "ENSG00000090382": "LYZ",
    "ENSG00000115523": "GNLY",
    "ENSG00000163736": "PPBP",
    "ENSG00000257764": "AC020656.1",
}


@pytest.fixture
def rna(host):
    return host.registry.get("modality", "rna")


@pytest.fixture
def pbmc():
    """scanpy's pbmc68k_reduced: X scaled (negative values), .raw.X log-normalised."""
    import scanpy as sc

    return sc.datasets.pbmc68k_reduced()


@pytest.fixture
def small(pancreas):
    """60 pancreas cells x 40 of their expressed genes, raw counts."""
    adata = pancreas[:60].copy()
    expressed = np.flatnonzero(np.asarray((adata.X > 0).sum(axis=0)).ravel() >= 5)[:40]
    return adata[:, expressed].copy()


def scaled(adata: ad.AnnData) -> np.ndarray:
    """A centred copy of ``adata.X`` (dense, like sc.pp.scale's output)."""
    dense = np.asarray(adata.X.todense(), dtype=np.float32)
    return dense - dense.mean(axis=0)


def collect(features, chunk_size=17) -> sp.csr_matrix:
    """All chunks of a FeatureMatrix stacked back together."""
    starts = []
    blocks = []
    for start, stop, chunk in features.iter_chunks(chunk_size):
        starts.append((start, stop))
        blocks.append(chunk)
    assert starts[0][0] == 0 and starts[-1][1] == features.n_cells
    return sp.vstack(blocks).tocsr()


def same(a, b) -> bool:
    """Equal shape and values (sparse or dense, any dtype)."""
    a, b = sp.csr_matrix(a), sp.csr_matrix(b)
    return a.shape == b.shape and (a != b).nnz == 0


# -------------------------------------------------------------------------------------------------
# Registration and the plain case
# -------------------------------------------------------------------------------------------------


def test_registered_through_the_entry_point(host, rna):
    assert host.registry.entries["modality"]["rna"].plugin == "rna"
    assert rna.name == "rna"
    assert rna.mudata_keys == ("rna", "gex", "RNA")
    assert rna.description


def test_counts_in_x(rna, pancreas):
    features = rna.prepare(pancreas)
    assert features.source == "X"
    assert features.value_kind == "counts"
    assert features.modality == "rna"
    assert features.column_transform is None
    assert list(features.feature_names) == list(pancreas.var_names)
    assert list(features.cell_ids) == list(pancreas.obs_names)
    assert same(collect(features), pancreas.X)


def test_log_values_and_dense_x(rna, small):
    small.X = np.log1p(small.X.toarray())
    features = rna.prepare(small, modality_options_of_someone_else=3)
    assert features.value_kind == "log"
    assert same(collect(features), small.X)


def test_cells_without_expression_are_kept(rna, small):
    X = small.X.tolil()
    X[[3, 7], :] = 0
    small.X = X.tocsr()
    features = rna.prepare(small)
    assert features.n_cells == small.n_obs
    assert collect(features)[[3, 7]].nnz == 0


def test_mudata_is_refused_with_the_fix(rna, small):
    import mudata

    with mudata.set_options(pull_on_update=False):
        mdata = mudata.MuData({"rna": small})
    with pytest.raises(TypeError, match=r"mdata.mod\['rna'\]"):
        rna.prepare(mdata)


# -------------------------------------------------------------------------------------------------
# Which matrix: layer, raw, scaled X
# -------------------------------------------------------------------------------------------------


def test_scaled_x_with_raw_uses_raw_and_warns_once(rna, pbmc, caplog):
    with caplog.at_level(logging.WARNING), pytest.warns(UserWarning, match=r"negative values.*using raw\.X") as caught:
        features = rna.prepare(pbmc)
    # One message, as a warning: not also a log record (which would print it a second time).
    assert len(caught) == 1 and "using raw.X" not in caplog.text
    assert features.source == "raw.X"
    assert features.value_kind == "log"
    assert list(features.feature_names) == list(pbmc.raw.var_names)
    assert same(collect(features), pbmc.raw.X)


def test_scaled_x_prefers_a_counts_layer(rna, small):
    counts = small.X.copy()
    small.layers["log1p"] = np.log1p(counts)
    small.layers["counts"] = counts
    small.raw = small
    small.X = scaled(small)
    with pytest.warns(UserWarning, match=r"using layers\['counts'\]"):
        features = rna.prepare(small)
    assert features.source == "layers['counts']"
    assert features.value_kind == "counts"
    assert same(collect(features), counts)


def test_scaled_layers_are_skipped_in_the_fallback(rna, small):
    small.layers["log1p"] = small.X.log1p()
    small.X = scaled(small)
    small.layers["counts"] = small.X.copy()  # misnamed: scaled too
    with pytest.warns(UserWarning, match=r"using layers\['log1p'\]"):
        assert rna.prepare(small).source == "layers['log1p']"


def test_scaled_x_without_alternative_is_an_error(rna, pbmc):
    del pbmc.raw
    expected = r"X contains negative values \(it looks scaled, e\.g\. by sc\.pp\.scale\)"
    with pytest.raises(ValueError, match=expected) as err:
        rna.prepare(pbmc)
    message = str(err.value)
    assert "cell sentences need counts or log-normalised expression" in message
    assert "pass layer=NAME or use_raw=True" in message
    assert "layers: none; .raw: absent" in message


def test_use_raw_false_keeps_raw_out_of_the_fallback(rna, pbmc):
    with pytest.raises(ValueError, match="X contains negative values"):
        rna.prepare(pbmc, use_raw=False)


def test_explicit_scaled_layer_is_an_error(rna, small):
    small.layers["scaled"] = scaled(small)
    small.layers["counts"] = small.X.copy()
    with pytest.raises(ValueError, match=r"layers\['scaled'\] contains negative values") as err:
        rna.prepare(small, layer="scaled")
    assert "'counts'" in str(err.value)  # the alternatives are listed


def test_layer_is_used(rna, small):
    small.layers["counts"] = small.X.copy()
    small.X = small.X.log1p()
    features = rna.prepare(small, layer="counts")
    assert features.source == "layers['counts']"
    assert features.value_kind == "counts"
    assert same(collect(features), small.layers["counts"])


def test_missing_layer(rna, small):
    small.layers["counts"] = small.X.copy()
    with pytest.raises(ValueError, match=r"layer 'spliced' not found \(adata.layers has: 'counts'\)"):
        rna.prepare(small, layer="spliced")


def test_use_raw_without_raw(rna, small):
    with pytest.raises(ValueError, match=r"use_raw=True but adata has no \.raw"):
        rna.prepare(small, use_raw=True)


def test_layer_and_use_raw_together(rna, pbmc):
    pbmc.layers["counts"] = pbmc.raw.X.copy()
    with pytest.raises(ValueError, match="either layer= or use_raw=True, not both"):
        rna.prepare(pbmc, layer="counts", use_raw=True)


def test_use_raw_takes_raw_genes(rna, pbmc):
    features = rna.prepare(pbmc, use_raw=True)
    assert features.source == "raw.X"
    assert list(features.feature_names) == list(pbmc.raw.var_names)


# -------------------------------------------------------------------------------------------------
# Gene identifiers
# -------------------------------------------------------------------------------------------------


def with_ids(adata: ad.AnnData, ids) -> ad.AnnData:
    adata = adata[:, : len(ids)].copy()
    adata.var = pd.DataFrame(index=pd.Index(list(ids)))
    return adata


def test_ensembl_var_names_with_a_symbol_column(rna, small):
    symbols = list(small.var_names)
    ids = [f"ENSG{i:011d}" for i in range(small.n_vars)]
    small.var = pd.DataFrame(
        {"gene_ids": ids, "gene_symbols": pd.Categorical(symbols), "feature_types": "Gene Expression"},
        index=pd.Index(ids),
    )
    features = rna.prepare(small)
    assert list(features.feature_names) == symbols


def test_ensembl_var_names_mapped_with_the_table(rna, small):
    ids = [f"{gene_id}.{v}" for v, gene_id in enumerate(REAL_IDS, start=3)]
    ids.append("ENSG00000015479")  # real, but its symbol (MATR3) belongs to another id in the table
    adata = with_ids(small, ids)
    features = rna.prepare(adata)
    assert list(features.feature_names) == [*REAL_IDS.values(), "ENSG00000015479"]
    assert same(collect(features), adata.X)


def test_unmappable_ids_name_the_var_columns(rna, small):
    adata = with_ids(small, [f"ENSMUSG{i:011d}" for i in range(20)])
    adata.var["gene_ids"] = adata.var_names
    adata.var["feature_types"] = "Gene Expression"
    with pytest.raises(ValueError, match=r"Ensembl gene ids \(e\.g\. 'ENSMUSG00000000000'\)") as err:
        rna.prepare(adata)
    message = str(err.value)
    assert "var columns: 'gene_ids', 'feature_types'" in message
    assert "adata.var_names = adata.var['gene_symbols']" in message


def test_symbol_ensembl_pairs_are_cut(rna, small):
    pairs = [f"{s}_ENSG{i:011d}.1" for i, s in enumerate(small.var_names)]
    adata = with_ids(small, pairs)
    assert list(rna.prepare(adata).feature_names) == list(small.var_names)


def test_feature_name_is_preferred(rna, small):
    names = [f"GENE{i}" for i in range(small.n_vars)]
    names[4] = "AC020656.1_ENSG00000257764"
    small.var["feature_name"] = names
    small.var["gene_symbols"] = "ignored"
    features = rna.prepare(small)
    assert features.feature_names[0] == "GENE0"
    assert features.feature_names[4] == "AC020656.1"


def test_ids_in_feature_name_stay_ids(rna, small):
    # Cell-o1 keeps an id that CELLxGENE gave no symbol, version included.
    ids = [f"ENSG{i:011d}" for i in range(small.n_vars)]
    adata = with_ids(small, ids)
    names = list(small.var_names)
    names[2] = "ENSG00000257764.2"
    adata.var["feature_name"] = names
    features = rna.prepare(adata)
    assert features.feature_names[2] == "ENSG00000257764.2"
    assert features.feature_names[3] == names[3]


def test_duplicate_symbols_are_summed(rna, small):
    names = list(small.var_names)
    names[5] = names[1]
    names[9] = names[1]
    names[7] = names[3]
    small.var_names = names
    features = rna.prepare(small)
    assert features.n_features == small.n_vars - 3
    assert list(features.feature_names).count(names[1]) == 1
    assert features.column_transform is not None
    out = collect(features)
    dense = small.X.toarray()
    column = list(features.feature_names)

    def summed(symbol):
        return out[:, column.index(symbol)].toarray().ravel()

    np.testing.assert_array_equal(summed(names[1]), dense[:, [1, 5, 9]].sum(axis=1))
    np.testing.assert_array_equal(summed(names[3]), dense[:, [3, 7]].sum(axis=1))
    np.testing.assert_array_equal(summed(names[2]), dense[:, 2])
    assert out.dtype.kind in "iu" or np.all(np.mod(out.data, 1) == 0)


# -------------------------------------------------------------------------------------------------
# Backed files and leaving the input alone
# -------------------------------------------------------------------------------------------------


def test_backed_file_gives_the_same_chunks(rna, pancreas, tmp_path):
    path = tmp_path / "pancreas.h5ad"
    pancreas.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    features = rna.prepare(backed, chunk_size=50)
    expected = rna.prepare(pancreas)
    assert backed.isbacked and not sp.issparse(backed.X), "X must stay on disk"
    assert features.value_kind == expected.value_kind == "counts"
    assert list(features.feature_names) == list(expected.feature_names)
    for (s1, e1, a), (s2, e2, b) in zip(features.iter_chunks(100), expected.iter_chunks(100), strict=True):
        assert (s1, e1) == (s2, e2)
        assert same(a, b)


def test_backed_scaled_file_falls_back_to_backed_raw(rna, pbmc, tmp_path):
    path = tmp_path / "pbmc.h5ad"
    pbmc.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    with pytest.warns(UserWarning, match=r"using raw\.X"):
        features = rna.prepare(backed)
    assert features.source == "raw.X"
    assert not sp.issparse(features.X), "raw.X must stay on disk"
    assert same(collect(features, 128), pbmc.raw.X)


def test_input_is_not_modified(rna, pbmc):
    pbmc.layers["counts"] = pbmc.raw.X.expm1()
    pbmc.var["feature_name"] = [f"{g}_ENSG{i:011d}" for i, g in enumerate(pbmc.var_names)]
    before = pbmc.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rna.prepare(pbmc)
        rna.prepare(pbmc, use_raw=True)
    assert_equal(pbmc, before)


# -------------------------------------------------------------------------------------------------
# core.domain.genes
# -------------------------------------------------------------------------------------------------


def test_ensembl_id_detection():
    names = [
        "ENSG00000123456",
        "ENSG00000123456.2",
        "ENSMUSG00000051951",
        "ENSG00000002586.20_PAR_Y",
        "CD4",
        "CD79A_ENSG00000105369",
        "ENSG0000012345",  # one digit short
        None,
        3,
    ]
    expected = [True, True, True, True, False, False, False, False, False]
    np.testing.assert_array_equal(genes.is_ensembl_id(names), expected)
    stripped = genes.strip_ensembl_version(["ENSG00000257764.2", "ENSG00000002586.20_PAR_Y", "CD4"])
    assert list(stripped) == ["ENSG00000257764", "ENSG00000002586", "CD4"]
    cut, n = genes.cut_ensembl_suffix(["CD79A_ENSG00000105369", "HLA_A_ENSG00000206503.3", "MT_CO1", "CD4"])
    assert list(cut) == ["CD79A", "HLA_A", "MT_CO1", "CD4"] and n == 2


def test_map_ensembl_ids_keeps_unknown_ids():
    symbols, found = genes.map_ensembl_ids(["ENSG00000105369.10", "ENSMUSG00000051951", "NOT_AN_ID"])
    assert list(symbols) == ["CD79A", "ENSMUSG00000051951", "NOT_AN_ID"]
    assert list(found) == [True, False, False]


def test_gene_table_is_small_and_cached():
    path = ROOT / "core" / "domain" / "data" / genes.GENE_TABLE
    assert path.stat().st_size < 1_000_000
    table = genes.ensembl_symbol_table()
    assert table is genes.ensembl_symbol_table()
    assert len(table) == 59_609 and table.index.is_unique
    for gene_id, symbol in REAL_IDS.items():
        assert table[gene_id] == symbol


@pytest.mark.skipif(not GTF.exists(), reason="shared GTF not available")
def test_gene_table_is_rebuilt_identically_from_the_gtf(tmp_path):
    import importlib.util

    script = ROOT / "scripts" / "build_gene_table.py"
    spec = importlib.util.spec_from_file_location("build_gene_table", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "table.tsv.gz"
    module.main(["--gtf", str(GTF), "--out", str(out)])
    assert out.read_bytes() == (ROOT / "core" / "domain" / "data" / genes.GENE_TABLE).read_bytes()
    with gzip.open(out, "rt") as fh:
        assert fh.readline() == "gene_id\tgene_name\n"


def test_symbol_column_names_are_matched_loosely():
    ids = pd.Index(["ENSG00000105369", "ENSG00000010610"])
    var = pd.DataFrame({"n_cells": [3, 4], "GeneSymbol": ["CD79A", "CD4"]}, index=ids)
    result = genes.choose_gene_symbols(var)
    assert list(result.symbols) == ["CD79A", "CD4"]
    assert result.source == "var['GeneSymbol']"


def test_symbol_column_of_ids_is_not_a_symbol_column():
    ids = pd.Index(["ENSG00000105369.1", "ENSG00000010610.2"])
    var = pd.DataFrame({"gene_name": list(ids)}, index=ids)
    result = genes.choose_gene_symbols(var)
    assert list(result.symbols) == ["CD79A", "CD4"]
    assert result.source == "var_names mapped with Ensembl 101"
    assert "mapped 2 of 2" in result.note


def test_missing_entries_of_a_symbol_column_fall_back_to_var_names():
    var = pd.DataFrame({"feature_name": ["CD79A", None, ""]}, index=["a", "b", "c"])
    result = genes.choose_gene_symbols(var)
    assert list(result.symbols) == ["CD79A", "b", "c"]
    assert "2 missing entries" in result.note


def test_merge_duplicate_symbols():
    names, transform, n_dup = genes.merge_duplicate_symbols(["A", "B", "A", "C", "B", "A"], np.int32)
    assert list(names) == ["A", "B", "C"] and n_dup == 2
    assert transform.dtype == np.int64
    chunk = sp.csr_matrix(np.array([[1, 2, 3, 4, 5, 6]], dtype=np.int32))
    np.testing.assert_array_equal((chunk @ transform).toarray(), [[10, 7, 4]])
    names, transform, n_dup = genes.merge_duplicate_symbols(["A", "B"])
    assert transform is None and n_dup == 0
