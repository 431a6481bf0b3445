"""Marker knowledge of the ``markers`` plugin: vendored tables, the weight matrix, user tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cellscribe
from cellscribe.core.domain.ontology import get_ontology
from cellscribe.plugins.markers import knowledge as kn
from cellscribe.plugins.markers.knowledge import MarkerKnowledge, load_knowledge, read_marker_table

ROOT = Path(cellscribe.__file__).parent
DATA = ROOT / "plugins" / "markers" / "data"
PANGLAO = ROOT.parent / "shared" / "data" / "knowledge" / "PanglaoDB_markers_27_Mar_2020.tsv"


@pytest.fixture(scope="module")
def knowledge() -> MarkerKnowledge:
    return load_knowledge()


def _weight(k: MarkerKnowledge, cell_type: str, gene: str) -> float:
    row = int(k.locate([cell_type], nearest=False)[0])
    col = int(k.gene_index([gene])[0])
    assert row >= 0 and col >= 0, (cell_type, gene)
    return float(k.weights[row, col])


# ------------------------------------------------------------------------------------------ vendored tables


@pytest.mark.skipif(not PANGLAO.exists(), reason="shared PanglaoDB table not available")
def test_vendored_panglao_table_is_what_the_build_script_writes(tmp_path, load_script):
    build = load_script("build_marker_table")
    table = build.build_table(PANGLAO, get_ontology())
    out = tmp_path / "panglao.tsv.gz"
    build.write_table(table, out)
    assert out.read_bytes() == (DATA / kn.PANGLAO_TABLE).read_bytes()


def test_panglao_table_content():
    table = kn._panglao_table()
    assert len(table) == 7851 and table["panglao_name"].nunique() == 178
    assert not table.duplicated(["cell_type", "gene"]).any()
    assert table["weight"].between(0, 1, inclusive="right").all()
    names = table.drop_duplicates("panglao_name").set_index("panglao_name")
    expected = {
        "NK cells": ("natural killer cell", "CL:0000623"),
        "Monocytes": ("monocyte", "CL:0000576"),
        "T cells": ("T cell", "CL:0000084"),
        "Alpha cells": ("pancreatic A cell", "CL:0000171"),
        "Acinar cells": ("pancreatic acinar cell", "CL:0002064"),
        "Crypt cells": ("intestinal crypt stem cell", "CL:0002250"),
        "Undefined placental cells": ("Undefined placental cells", ""),
    }
    for panglao, (cell_type, cl_id) in expected.items():
        assert (names.loc[panglao, "cell_type"], names.loc[panglao, "cl_id"]) == (cell_type, cl_id)
    ontology = get_ontology()
    with_id = names[names["cl_id"] != ""]
    assert with_id["cl_id"].is_unique
    assert all(ontology.name(i) == n for i, n in zip(with_id["cl_id"], with_id["cell_type"]))


def test_weight_formula(load_script):
    build = load_script("build_marker_table")
    weight = build.marker_weight(
        pd.Series([1.0, 0.0, np.nan, 1.0]),
        pd.Series([0.0, 0.05, np.nan, 0.0]),
        pd.Series([1.0, np.nan, 1.0, 0.0]),
        pd.Series([0.0, 0.0, 0.5, 0.0]),
    )
    np.testing.assert_allclose(weight, [1.0, 0.5 * 0.5 * 2 / 3, 0.5 * 0.5 * 0.5, 2 / 3])
    table = kn._panglao_table()
    ms4a1 = table[(table["gene"] == "MS4A1") & (table["cell_type"] == "B cell")]
    cd74 = table[(table["gene"] == "CD74") & (table["cell_type"] == "B cell")]
    assert float(ms4a1["weight"].iloc[0]) > float(cd74["weight"].iloc[0])  # specificity 0.011 vs 0.35


def test_canonical_table_rows_are_valid():
    table = pd.read_csv(DATA / kn.CANONICAL_TABLE, sep="\t", dtype=str, keep_default_na=False)
    assert list(table.columns) == ["cell_type", "cl_id", "gene", "weight", "tissue", "source"]
    assert not table.duplicated(["cell_type", "gene"]).any()
    assert (table["source"].str.len() > 10).all()
    ontology = get_ontology()
    for cell_type, cl_id in table[["cell_type", "cl_id"]].drop_duplicates().itertuples(index=False):
        assert ontology.name(cl_id) == cell_type
    weights = table["weight"].astype(float)
    assert weights.between(-1, 1).all() and (weights != 0).all()


# ------------------------------------------------------------------------------------------ the matrix


def test_knowledge_shapes(knowledge):
    n_types, n_genes = knowledge.shape
    assert isinstance(knowledge.weights, sp.csr_matrix) and knowledge.weights.dtype == np.float32
    assert n_types == len(knowledge.cell_types) == len(knowledge.cl_ids) == len(knowledge.sources)
    assert n_genes == len(knowledge.genes) > 4000
    assert n_types >= 178 + 8  # PanglaoDB's types plus the canonical layer's new ones (CD4 T, ...)
    assert len(set(knowledge.cell_types)) == n_types
    assert list(knowledge.genes) == sorted(knowledge.genes) and len(set(knowledge.genes)) == n_genes
    assert np.all(np.diff(knowledge.weights.indptr) > 0)  # every type has markers
    assert knowledge.version == "panglaodb_human_v1+canonical_markers_v3"
    assert "196 cell types" in repr(knowledge)  # 189 + the 7 progenitor types of canonical v2


def test_matrix_matches_rows(knowledge):
    rows = knowledge.rows.sample(200, random_state=0)
    r = pd.Index(knowledge.cell_types).get_indexer(rows["cell_type"])
    c = knowledge.gene_index(rows["gene"])
    got = np.asarray(knowledge.weights[r, c]).ravel()
    np.testing.assert_allclose(got, rows["weight"].to_numpy(), rtol=1e-6)
    assert knowledge.weights.nnz == len(knowledge.rows)


def test_load_from_cold_caches_gives_the_same_knowledge(knowledge):
    # How long a cold load takes is printed by benchmarks/markers.py, never asserted here.
    kn._panglao_table.cache_clear()
    kn._canonical_rows.cache_clear()
    kn.default_ubiquitous_genes.cache_clear()
    fresh = load_knowledge()
    assert list(fresh.cell_types) == list(knowledge.cell_types)
    assert (fresh.weights != knowledge.weights).nnz == 0


def test_canonical_rows_present_with_sources(knowledge):
    nk = int(knowledge.locate(["natural killer cell"])[0])
    assert _weight(knowledge, "natural killer cell", "CD3E") == -1.0
    assert _weight(knowledge, "natural killer cell", "NKG7") == 1.0
    assert "PanglaoDB 27 Mar 2020" in knowledge.sources[nk]
    assert any(s.startswith("Zheng 2017 Nat Commun PBMC") for s in knowledge.sources[nk])
    assert _weight(knowledge, "CD4-positive, alpha-beta T cell", "CD8A") < 0
    assert _weight(knowledge, "CD8-positive, alpha-beta T cell", "CD8B") == 1.0
    assert _weight(knowledge, "classical monocyte", "CD14") == 1.0
    assert _weight(knowledge, "classical monocyte", "FCGR3A") < 0  # CD16-negative by definition
    assert _weight(knowledge, "non-classical monocyte", "FCGR3A") == 1.0
    assert _weight(knowledge, "pancreatic A cell", "GCG") == 1.0
    assert _weight(knowledge, "type B pancreatic cell", "IAPP") == 1.0
    row = knowledge.rows.set_index(["cell_type", "gene"]).loc[("natural killer cell", "CD3E")]
    assert row["source"].startswith("Abbas") and row["cl_id"] == "CL:0000623"


def test_shared_mononuclear_phagocyte_genes_weigh_the_same_for_every_member(knowledge):
    """MHC class II, CD74, CST3, AIF1, FCER1G, TYROBP, CTSS are expressed by monocytes, dendritic cells
    and macrophages alike: they place a cell among them but must not pick the member (v3; in v2
    PanglaoDB listed them for dendritic cells only, and blood monocytes were called DCs)."""
    shared = ["HLA-DRA", "HLA-DRB1", "HLA-DPA1", "HLA-DQA1", "CD74", "CST3", "AIF1", "TYROBP"]
    for gene in shared:
        weights = {t: _weight(knowledge, t, gene) for t in ("monocyte", "dendritic cell", "macrophage")}
        assert len(set(weights.values())) == 1 and weights["monocyte"] > 0, (gene, weights)


def test_negative_markers_are_genes_the_type_does_not_express(knowledge):
    """v3 keeps negatives for absence (CD8 for CD4 T cells, CD3 for NK cells) and drops those for genes
    a type only expresses less (S100A4 in naive CD4 T cells, CD14 in CD16 monocytes, TCL1A in memory
    B cells): a 200-gene sentence holds genes that are merely lower."""
    assert _weight(knowledge, "naive thymus-derived CD4-positive, alpha-beta T cell", "CD8B") < 0
    assert _weight(knowledge, "naive thymus-derived CD4-positive, alpha-beta T cell", "S100A4") >= 0
    assert _weight(knowledge, "non-classical monocyte", "CD14") >= 0
    assert _weight(knowledge, "memory B cell", "TCL1A") >= 0


def test_canonical_rows_override_and_complement_panglao():
    panglao_only = load_knowledge(canonical=False)
    both = load_knowledge()
    # KLRD1 is in both layers for NK cells: the canonical weight wins
    assert _weight(panglao_only, "natural killer cell", "KLRD1") == pytest.approx(0.5164, abs=1e-4)
    assert _weight(both, "natural killer cell", "KLRD1") == 1.0
    # PanglaoDB-only genes stay
    xcl1 = _weight(panglao_only, "natural killer cell", "XCL1")
    assert _weight(both, "natural killer cell", "XCL1") == pytest.approx(xcl1)
    # canonical types PanglaoDB lacks are added
    assert panglao_only.locate(["CD4-positive, alpha-beta T cell"], nearest=False)[0] == -1
    assert len(both.cell_types) == len(panglao_only.cell_types) + 18  # 11 (v1) + 7 progenitor types (v2)


def test_ubiquitous_set(knowledge):
    for gene in ("MALAT1", "ACTB", "B2M", "TMSB4X", "FTL", "FTH1", "HLA-A", "HLA-B", "HLA-C", "ITM2B", "VIM"):
        assert gene in knowledge.ubiquitous, gene
    for gene in ("NCAM1", "CD3E", "MS4A1", "GCG", "CD14"):
        assert gene not in knowledge.ubiquitous, gene
    assert "RPL23A" in knowledge.ubiquitous  # a PanglaoDB marker that matches the ribosomal pattern
    genes = ["RPL13", "RPS4X", "RPLP0", "RPSA", "RPL13AP5", "RPS27A", "MT-CO1", "MTRNR2L12", "MALAT1",
             "RPS6KA1", "CD3E", "MTOR", "RPE65"]  # fmt: skip
    expected = [True] * 9 + [False] * 4
    assert knowledge.is_ubiquitous(genes).tolist() == expected


# ------------------------------------------------------------------------------------------ labels, restrict


def test_locate(knowledge):
    expected = {
        "NK cells": "natural killer cell",
        "CD14+ Mono": "classical monocyte",
        "CL:0000860": "classical monocyte",
        "alpha": "pancreatic A cell",
        "Natural Killer Cell": "natural killer cell",
        "CD14-positive, CD16-negative classical monocyte": "classical monocyte",  # nearest ancestor
        "foo": None,
        "Undefined placental cells": "Undefined placental cells",  # a PanglaoDB type without a term
    }
    rows = knowledge.locate(expected)
    assert [knowledge.cell_types[r] if r >= 0 else None for r in rows] == list(expected.values())
    assert knowledge.locate(["CD14-positive, CD16-negative classical monocyte"], nearest=False)[0] == -1


def test_markers_of_a_type(knowledge):
    nk = knowledge.markers("NK")
    assert nk.name == "natural killer cell"
    assert nk.is_monotonic_decreasing and nk.iloc[0] == 1.0 and nk["CD3E"] == -1.0
    with pytest.raises(KeyError):
        knowledge.markers("foo")


def test_restrict_to_cell_types(knowledge):
    labels = ["alpha", "beta", "delta", "activated_stellate", "macrophage", "not a cell type"]
    small = knowledge.restrict(labels)
    assert set(small.cell_types) == {
        "pancreatic A cell",
        "type B pancreatic cell",
        "pancreatic D cell",
        "pancreatic stellate cell",
        "macrophage",
    }
    assert small.shape[1] < knowledge.shape[1]
    assert np.all(small.weights.getnnz(axis=0) > 0)  # genes no kept type uses are dropped
    assert _weight(small, "macrophage", "C1QA") == _weight(knowledge, "macrophage", "C1QA")
    assert small.ubiquitous == knowledge.ubiquitous
    with pytest.raises(ValueError, match="no cell type"):
        knowledge.restrict(["not a cell type"])


def test_restrict_to_tissue(knowledge):
    pancreas = knowledge.restrict(tissue="pancreas")
    names = set(pancreas.cell_types)
    assert {"pancreatic A cell", "pancreatic acinar cell", "macrophage", "endothelial cell"} <= names
    assert "neuron" not in names and "hepatocyte" not in names
    # Resident types named for another site stay out; their own site keeps them.
    assert not names & {"splenic red pulp macrophage", "brain microvascular endothelial cell"}
    assert "splenic red pulp macrophage" in set(knowledge.restrict(tissue="spleen").cell_types)
    assert "brain microvascular endothelial cell" in set(knowledge.restrict(tissue="brain").cell_types)
    assert "splenic red pulp macrophage" in set(knowledge.restrict(tissue="immune system").cell_types)
    islet_only = knowledge.restrict(tissue="Pancreas", resident=False)
    assert "pancreatic A cell" in set(islet_only.cell_types)
    assert "macrophage" not in set(islet_only.cell_types)
    blood = load_knowledge(tissue="PBMC")
    assert {"natural killer cell", "platelet", "erythrocyte"} <= set(blood.cell_types)
    assert set(knowledge.restrict(tissue="lung").cell_types) >= {"pulmonary alveolar type 2 cell"}
    both = knowledge.restrict(["alpha", "NK"], tissue="pancreas", resident=False)
    assert list(both.cell_types) == ["pancreatic A cell"]
    # Bone marrow holds its stroma and bone-lining cells, not cartilage or cells walled into bone.
    marrow = set(knowledge.restrict(tissue="bone marrow").cell_types)
    assert {"hematopoietic stem cell", "osteoblast", "endothelial cell", "adipocyte", "erythroblast"} <= marrow
    assert not marrow & {"chondrocyte", "osteocyte"}
    assert "chondrocyte" in set(knowledge.restrict(tissue="connective tissue").cell_types)
    # Cartilage is not everywhere connective tissue is: chondrocytes only where cartilage is.
    for tissue in ("cartilage", "knee", "trachea", "lung", "bone"):
        assert "chondrocyte" in set(knowledge.restrict(tissue=tissue).cell_types), tissue
    for tissue in ("brain", "pancreas", "liver", "adipose tissue", "skin"):
        kept = set(knowledge.restrict(tissue=tissue).cell_types)
        assert "chondrocyte" not in kept and "fibroblast" in kept, tissue
    with pytest.raises(ValueError, match="unknown tissue 'mars'.*Pancreas"):
        knowledge.restrict(tissue="mars")
    with pytest.raises(ValueError, match="needs cell_types, a tissue"):
        knowledge.restrict()


# ------------------------------------------------------------------------------------------ user tables


def test_from_csv(tmp_path):
    path = tmp_path / "markers.csv"
    path.write_text(
        "Cell Type,Gene,Weight,Tissue\n"
        "NK,NKG7,1,blood\nNK,CD3E,-1,blood\nmy odd cell,FOO1,0.5,\nmy odd cell,FOO0,0,\n,,,\n"
        "B cells,MS4A1,,blood\n"
    )
    k = MarkerKnowledge.from_csv(path)
    assert list(k.cell_types) == ["B cells", "my odd cell", "NK"]
    assert list(k.cl_ids) == ["CL:0000236", "", "CL:0000623"]
    assert k.shape == (3, 4) and "FOO0" not in k.genes  # a weight of 0 says nothing
    assert _weight(k, "NK", "CD3E") == -1.0 and _weight(k, "B cells", "MS4A1") == 1.0  # empty weight = 1
    assert k.sources[0] == ("user table markers.csv",)
    assert "MALAT1" in k.ubiquitous
    assert list(MarkerKnowledge.from_csv(path, tissue="blood").cell_types) == ["B cells", "NK"]


def test_user_table_formats(tmp_path):
    tsv = tmp_path / "markers.tsv"
    tsv.write_text("cell_type\tgene symbol\tcl_id\tsource\nalpha\tGCG\tCL:0000171\tmy lab\nbeta\tINS\t\t\n")
    rows = read_marker_table(tsv)
    assert rows.columns.tolist() == ["cell_type", "cl_id", "gene", "weight", "tissue", "source"]
    assert rows["weight"].tolist() == [1.0, 1.0]  # no weight column: every marker weighs 1
    assert rows["cl_id"].tolist() == ["CL:0000171", "CL:0000169"]
    assert rows["source"].tolist() == ["my lab", "user table markers.tsv"]
    frame = pd.DataFrame({"celltype": ["NK", "NK"], "marker": ["GNLY", "GNLY"], "weight": [0.2, 0.7]})
    rows = read_marker_table(frame)
    assert rows["weight"].tolist() == [0.7]  # a gene listed twice keeps its last row


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("type,weight\nNK,1\n", r"lacks the column\(s\) 'cell type', 'gene' .*its columns: 'type', 'weight'"),
        ("cell type,weight\nNK,1\n", r"lacks the column\(s\) 'gene'"),
        ("cell type,gene,weight\nNK,NKG7,high\n", r"weights \['high'\] are not numbers"),
        ("cell type,gene\nNK,\n", r"cell type without a gene"),
        ("cell type,gene,cl_id\nNK,NKG7,CL:9999999\n", r"cl_id 'CL:9999999' of 'NK' is not a current"),
    ],
)
def test_user_table_errors(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        MarkerKnowledge.from_csv(path)


def test_empty_user_table(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("cell type,gene\n")
    with pytest.raises(ValueError, match="has no markers"):
        MarkerKnowledge.from_csv(path)


def test_extra_tables_combine_after_builtin_layers(tmp_path, knowledge):
    path = tmp_path / "mine.csv"
    path.write_text("cell type,gene,weight\nNK cells,KLRD1,0.1\nNK cells,MYGENE,0.9\nmy odd cell,FOO1,1\n")
    frame = pd.DataFrame({"cell type": ["my odd cell"], "gene": ["FOO2"], "weight": [-0.5]})
    k = load_knowledge(extra_tables=[path, frame])
    assert len(k.cell_types) == len(knowledge.cell_types) + 1  # "NK cells" joins natural killer cell
    assert _weight(k, "natural killer cell", "KLRD1") == pytest.approx(0.1)  # user row wins
    assert _weight(k, "natural killer cell", "MYGENE") == pytest.approx(0.9)
    assert _weight(k, "natural killer cell", "CD3E") == -1.0  # canonical row kept
    assert _weight(k, "my odd cell", "FOO1") == 1.0 and _weight(k, "my odd cell", "FOO2") == -0.5
    assert k.version == "panglaodb_human_v1+canonical_markers_v3+user:mine.csv+user"


def test_combine_layers_keeps_first_name_and_joins_by_name():
    first = pd.DataFrame(
        {"cell_type": ["natural killer cell"], "cl_id": ["CL:0000623"], "gene": ["NKG7"], "weight": [0.5],
         "tissue": [""], "source": ["a"]}  # fmt: skip
    )
    second = pd.DataFrame(
        {"cell_type": ["Natural killer cell", "NK"], "cl_id": ["", "CL:0000623"], "gene": ["GNLY", "NKG7"],
         "weight": [1.0, 0.8], "tissue": ["", ""], "source": ["b", "c"]}  # fmt: skip
    )
    rows = kn.combine_layers([first, second])
    assert rows["cell_type"].unique().tolist() == ["natural killer cell"]
    assert rows["cl_id"].unique().tolist() == ["CL:0000623"]
    assert rows.set_index("gene")["weight"].to_dict() == {"NKG7": 0.8, "GNLY": 1.0}


def test_no_layer_is_an_error():
    with pytest.raises(ValueError, match="no layer"):
        load_knowledge(panglaodb=False, canonical=False)
