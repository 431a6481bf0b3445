"""The vendored Cell Ontology: table, terms, is_a ancestry, label look-up, lineages, and its build."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import cellscribe
from cellscribe.core.domain import ontology as onto
from cellscribe.core.domain.ontology import ABBREVIATIONS, LINEAGES, CellOntology, get_ontology, normalise_label

ROOT = Path(cellscribe.__file__).parent
TABLE = ROOT / "core" / "domain" / "data" / onto.CL_TABLE
OBO = ROOT.parent / "shared" / "data" / "knowledge" / "cl-simple_2026-03-26.obo"


@pytest.fixture(scope="module")
def cl() -> CellOntology:
    return get_ontology()


# ------------------------------------------------------------------------------------------ table


def test_table_is_small_and_loads():
    assert TABLE.stat().st_size < 600_000
    fresh = CellOntology.from_table(TABLE)
    assert len(fresh) == 3324


def test_get_ontology_is_cached(cl):
    assert get_ontology() is cl
    assert "CL:0000860" in cl and "CL:9999999" not in cl
    assert all(term_id.startswith("CL:") for term_id in cl)


@pytest.mark.parametrize("obsolete", ["CL:0000003", "CL:0000012", "CL:0000013"])
def test_obsolete_terms_are_absent(cl, obsolete):
    assert obsolete not in cl
    with pytest.raises(KeyError, match="not a current Cell Ontology term"):
        cl.term(obsolete)


def test_every_link_points_to_a_current_term(cl):
    for term_id in cl:
        term = cl.term(term_id)
        assert all(parent in cl for parent in (*term.parents, *term.part_of, *term.develops_from))


@pytest.mark.skipif(not OBO.exists(), reason="shared Cell Ontology release not available")
def test_vendored_table_is_what_the_build_script_writes(tmp_path, load_script):
    build = load_script("build_cl_table")
    terms = build.read_terms(OBO)
    out = tmp_path / "cl.tsv.gz"
    build.write_table(terms, out)
    assert out.read_bytes() == TABLE.read_bytes()
    with OBO.open(encoding="utf-8") as fh:
        stanzas = [build.parse_term(tags) for kind, tags in build.iter_stanzas(fh) if kind == "Term"]
    obsolete = {t["id"] for t in stanzas if t["obsolete"]}
    assert len(obsolete) == 205  # 196 CL + 9 CP; the other 2 of the 207 flags are Typedefs
    assert obsolete.isdisjoint(t["id"] for t in terms)


def test_obo_reader_handles_escapes_qualifiers_and_obsolete_terms(tmp_path, load_script):
    build = load_script("build_cl_table")
    obo = tmp_path / "mini.obo"
    obo.write_text(
        "format-version: 1.2\n"
        "\n[Term]\nid: CL:0000001\nname: root cell\n"
        '\n[Term]\nid: CL:0000002\nname: child cell\nsynonym: "the \\"child\\"" EXACT []\n'
        'synonym: "kid" RELATED OMO:0003000 [PMID:1] {source="x"}\nsynonym: "kid" EXACT []\n'
        "is_a: CL:0000001 {is_inferred=\"true\"} ! root cell\nis_a: UBERON:0000001 ! not a cell\n"
        "relationship: RO:0002202 CL:0000001 ! develops from root cell\n"
        "relationship: RO:0002131 CL:0000001 ! overlaps\nalt_id: CL:0000009\n"
        "\n[Term]\nid: CL:0000003\nname: obsolete gone cell\nis_obsolete: true\n"
        "\n[Term]\nid: GO:0000001\nname: not a cell\n"
        "\n[Typedef]\nid: part_of\nname: part of\n"
    )
    terms = build.read_terms(obo)
    assert [t["id"] for t in terms] == ["CL:0000001", "CL:0000002"]
    child = terms[1]
    assert child["exact"] == ['the "child"', "kid"]
    assert child["related"] == []  # the same text as an exact synonym is kept once, as exact
    assert child["is_a"] == ["CL:0000001"] and child["develops_from"] == ["CL:0000001"]
    assert child["alt_id"] == ["CL:0000009"]
    out = tmp_path / "mini.tsv.gz"
    build.write_table(terms, out)
    mini = CellOntology.from_table(out)
    assert mini.lookup('the "child"') == "CL:0000002"
    assert mini.resolve("CL:0000009") == "CL:0000002"
    assert mini.is_a("CL:0000009", "CL:0000001")


# ------------------------------------------------------------------------------------------ terms


def test_term_fields(cl):
    term = cl.term("CL:0000623")
    assert term.name == "natural killer cell"
    assert "NK cell" in term.exact_synonyms
    assert "large granular lymphocyte" in term.broad_synonyms
    assert term.parents == ("CL:0001067",)
    assert term.develops_from == ("CL:0000825",)
    assert cl.name("CL:0000860") == "classical monocyte"
    assert cl.term("CL:0000860").exact_synonyms == ("inflammatory monocyte",)


def test_ids_resolve_in_several_forms(cl):
    assert cl.resolve("CL_0000860") == "CL:0000860"
    assert cl.resolve(" cl:0000860 ") == "CL:0000860"
    assert cl.resolve("CL:0000739") == "CL:0000043"  # a retired alt_id of mature basophil
    assert cl.name("CL:0000739") == "mature basophil"
    assert cl.resolve("CL:12") is None and cl.resolve("monocyte") is None
    with pytest.raises(KeyError, match="use lookup"):
        cl.name("monocyte")


def test_ancestors_and_is_a(cl):
    assert cl.parents("CL:0000860") == ("CL:0000576",)
    assert cl.is_a("CL:0000860", "CL:0000576")  # classical monocyte is a monocyte
    assert cl.is_a("CL:0000625", "CL:0000084")  # CD8-positive, alpha-beta T cell is a T cell
    assert cl.is_a("CL:0000171", "CL:0000163")  # pancreatic A cell is an endocrine cell
    assert cl.is_a("CL:0000784", "CL:0000451")  # pDC is a dendritic cell
    assert not cl.is_a("CL:0000236", "CL:0000084")  # B cell is not a T cell
    assert not cl.is_a("CL:0000576", "CL:0000860")  # the parent is not its child
    assert cl.is_a("CL:0000860", "CL:0000860") and not cl.is_a("CL:0000860", "CL:0000860", strict=True)
    ancestors = cl.ancestors("CL:0000860")
    assert {"CL:0000576", "CL:0000738", "CL:0000000"} <= ancestors and "CL:0000860" not in ancestors
    assert cl.ancestors("CL:0000860") is ancestors  # cached
    assert cl.ancestors("CL:0000000") == frozenset()


def test_children_and_descendants(cl):
    assert "CL:0000860" in cl.children("CL:0000576")
    descendants = cl.descendants("CL:0000084")
    assert {"CL:0000624", "CL:0000625", "CL:0000815"} <= descendants
    assert "CL:0000084" not in descendants and "CL:0000236" not in descendants
    assert all(cl.is_a(d, "CL:0000084", strict=True) for d in descendants)


# ------------------------------------------------------------------------------------------ lookup


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        # the brief's annotation shorthands
        ("CD14+ Mono", "CL:0000860"),
        ("CD16+ Mono", "CL:0000875"),
        ("FCGR3A+ Mono", "CL:0000875"),
        ("NK", "CL:0000623"),
        ("Treg", "CL:0000815"),
        ("pDC", "CL:0000784"),
        ("mDC", "CL:0000782"),
        ("cDC", "CL:0000990"),
        ("AT2", "CL:0002063"),
        ("AT1", "CL:0002062"),
        ("CD4 T", "CL:0000624"),
        ("CD8 T", "CL:0000625"),
        ("B", "CL:0000236"),
        ("Mono", "CL:0000576"),
        ("DC", "CL:0000451"),
        ("Platelet", "CL:0000233"),
        ("HSC", "CL:0000037"),
        ("Plasma", "CL:0000786"),
        ("Mast", "CL:0000097"),
        ("Memory CD4 T", "CL:0000897"),
        ("Naive CD4 T", "CL:0000895"),
        ("alpha", "CL:0000171"),
        ("beta", "CL:0000169"),
        ("delta", "CL:0000173"),
        ("activated_stellate", "CL:0002410"),
        ("stellate", "CL:0002410"),
        ("acinar", "CL:0002064"),
        ("ductal", "CL:0002079"),
        ("endothelial", "CL:0000115"),
        ("macrophage", "CL:0000235"),
        # plurals, case, punctuation, "+" and "positive", word order
        ("NK cells", "CL:0000623"),
        ("Monocytes", "CL:0000576"),
        ("T cells", "CL:0000084"),
        ("Platelets", "CL:0000233"),
        ("Alpha cells", "CL:0000171"),  # not the mouse alpha retinal ganglion cell
        ("natural killer cells", "CL:0000623"),
        ("B CELL", "CL:0000236"),
        ("t_cell", "CL:0000084"),
        ("classical monocytes", "CL:0000860"),
        ("Non-classical monocytes", "CL:0000875"),
        ("CD4+ T cells", "CL:0000624"),
        ("CD8-positive alpha-beta T cells", "CL:0000625"),
        ("cd8+ alpha beta t cell", "CL:0000625"),
        ("αβ T cell", "CL:0000789"),
        ("gamma delta T cells", "CL:0000798"),
        ("CD14+ Monocytes", "CL:0001054"),  # the ontology's own CD14-positive monocyte
        ("B cells memory", "CL:0000787"),
        ("Pulmonary alveolar type II cells", "CL:0002063"),
        ("type II pneumocyte", "CL:0002063"),
        ("CD4+/CD45RA+/CD25- Naive T", "CL:0000895"),
        ("Stromal", "CL:0000499"),
        # ids
        ("CL:0000860", "CL:0000860"),
        ("CL_0000623", "CL:0000623"),
    ],
)
def test_lookup(cl, label, expected):
    assert cl.lookup(label) == expected, cl.lookup(label) and cl.name(cl.lookup(label))


@pytest.mark.parametrize(
    "label",
    ["Unknown", "unassigned", "doublet", "Doublets", "foo", "Tumor", "low quality", "", "   ", "?", "CL:9999999"],
)
def test_unmappable_labels_stay_none(cl, label):
    assert cl.lookup(label) is None


def test_lookup_rejects_non_strings(cl):
    assert cl.lookup(None) is None  # type: ignore[arg-type]
    assert cl.lookup(float("nan")) is None  # type: ignore[arg-type]


def test_every_abbreviation_exists_and_looks_up_to_its_id(cl):
    for key, term_id in ABBREVIATIONS.items():
        assert term_id in cl, f"{key!r} -> {term_id} is not a current term"
        assert cl.lookup(key) == term_id, f"{key!r} looks up to {cl.lookup(key)}, not {term_id}"


def test_lookup_many_keeps_order(cl):
    assert cl.lookup_many(["NK", "foo", "NK", "B"]) == ["CL:0000623", None, "CL:0000623", "CL:0000236"]


def test_ambiguous_synonyms_are_not_used():
    empty = ["", "", ""]
    table = pd.DataFrame(
        {
            "id": ["CL:0000001", "CL:0000002", "CL:0000003"],
            "name": ["root cell", "left cell", "right cell"],
            "exact": ["", "shared name|only left", "shared name"],
            "related": empty,
            "narrow": empty,
            "broad": empty,
            "is_a": ["", "CL:0000001", "CL:0000001"],
            "part_of": empty,
            "develops_from": empty,
            "alt_id": empty,
        }
    )
    mini = CellOntology(table)
    assert mini.lookup("shared name") is None
    assert mini.lookup("Shared Names") is None
    assert mini.lookup("only left") == "CL:0000002"
    assert mini.lookup("Right cells") == "CL:0000003"


def test_table_without_columns_is_refused():
    with pytest.raises(ValueError, match="build_cl_table"):
        CellOntology(pd.DataFrame({"id": ["CL:0000001"], "name": ["cell"]}))


@pytest.mark.parametrize(
    ("label", "normal"),
    [
        ("NK cells", "nk cell"),
        ("CD14+ Monocytes", "cd14+ monocyte"),
        ("CD14-positive monocyte", "cd14+ monocyte"),
        ("CD14+CD16- monocyte", "cd14+ cd16- monocyte"),
        ("CD4-positive, alpha-beta T cell", "cd4+ alpha beta t cell"),
        ("activated_stellate", "activated stellate"),
        ("Type II pneumocytes", "type 2 pneumocyte"),
        ("γδ T cell", "gamma delta t cell"),
    ],
)
def test_normalise_label(label, normal):
    assert normalise_label(label) == normal


# ------------------------------------------------------------------------------------------ lineage


def test_lineage_roots_exist(cl):
    for lineage, roots in LINEAGES:
        for root in roots:
            assert root in cl, f"lineage {lineage!r}: {root} is not a current term"


@pytest.mark.parametrize(
    ("term_id", "lineage"),
    [
        ("CL:0000625", "T cell"),  # CD8-positive, alpha-beta T cell
        ("CL:0000815", "T cell"),  # regulatory T cell
        ("CL:0000623", "NK cell"),
        ("CL:0001069", "innate lymphoid cell"),  # ILC2
        ("CL:0000787", "B cell"),  # memory B cell
        ("CL:0000786", "B cell"),  # plasma cell
        ("CL:0000860", "monocyte"),
        ("CL:0000875", "monocyte"),
        ("CL:0000091", "macrophage"),  # Kupffer cell
        ("CL:0000784", "dendritic cell"),
        ("CL:0000097", "mast cell"),
        ("CL:0000775", "granulocyte"),  # neutrophil
        ("CL:0000232", "erythroid"),
        ("CL:0000233", "megakaryocyte/platelet"),
        ("CL:0000037", "HSPC"),
        ("CL:0000171", "pancreatic endocrine"),
        ("CL:0000169", "pancreatic endocrine"),
        ("CL:0002064", "epithelial cell"),  # pancreatic acinar cell
        ("CL:0000115", "endothelial cell"),
        ("CL:0002410", "fibroblast/stromal"),  # pancreatic stellate cell
        ("CL:0000127", "glial cell"),  # astrocyte
        ("CL:0000540", "neuron"),
    ],
)
def test_lineage(cl, term_id, lineage):
    assert cl.lineage(term_id) == lineage


def test_lineage_of_general_terms_is_none(cl):
    assert cl.lineage("CL:0000000") is None  # cell
    assert cl.lineage("CL:0000738") is None  # leukocyte: spans several lineages


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("This cell is a B cell, expressing CD19", ["B cell"]),
        ("CD14+ monocytes or a lymphocyte", ["CD14-positive monocyte", "lymphocyte"]),
        ("The cell type is CD8-positive, alpha-beta T cell", ["CD8-positive, alpha-beta T cell"]),  # not "T cell"
        ("natural killer cells, natural killer cells", ["natural killer cell"]),  # once
        ("a human leukocyte antigen (HLA) heavy chain", []),  # a gene family, not a leukocyte
        ("T cell receptor and NK cell receptor genes", []),
        ("eukaryotic cells in the body", []),  # every cell is one
        ("alpha beta gamma T", []),  # one-word abbreviations are not looked for in prose
        ("", []),
    ],
)
def test_mentions_finds_the_cell_types_a_text_names(text, names):
    ontology = get_ontology()
    assert [ontology.name(t) for t, _ in ontology.mentions(text)] == names
