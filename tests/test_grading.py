"""The graded scorer: each rule on hand-made pairs, label reading, decoding, agreement statistics, and
agreement with the experts' grades (on the shared dev table, when present)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import cellscribe
from cellscribe.core.evaluation import grading
from cellscribe.core.evaluation.grading import (
    GRADE_NAMES,
    Grader,
    compare_grades,
    decode_prediction,
    grade,
    grade_labels,
    grade_name,
    quadratic_kappa,
    split_alternatives,
)
from cellscribe.core.domain.ontology import get_ontology

DEV = Path(cellscribe.__file__).parent.parent / "shared" / "data" / "knowledge" / "cellreasoner_pair_scores_dev.csv"


@pytest.fixture(scope="module")
def grader() -> Grader:
    return Grader()


# ------------------------------------------------------------------------------------ rules

SUBTYPE_CORRECT = [
    ("T cell", "T cell", "same label"),
    ("B cells", "b-cell", "same label"),
    ("T cell", "CD8+ T cells", "a descendant of the truth"),
    ("Epithelial", "Keratinocytes", "a descendant of the truth"),
    ("Epithelial cell", "ciliated cell", "ciliated cells are epithelial (extra is_a link)"),
    ("CD4 CD69", "CD4+ T-cells", "marker-named subtype graded through its named parent"),
    ("Acinar S100A6", "pancreatic acinar cells", "marker-named subtype"),
    ("Neutrophil SLPI", "Tumor-associated neutrophils", "marker-named subtype, modifier dropped"),
    ("CD8 TEM_2", "CD8 TEM_1", "numbered subtypes of one class"),
    ("Hepatocyte_4", "periportal hepatocyte", "numbered subtype, hepatocyte zones"),
    ("CD4 Naive", "Effector memory CD4+ T cell", "T-cell states of one class"),
    ("CD14 Mono", "CD16+ monocytes", "monocyte subsets"),
    ("Inflammatory_Macrophage", "M2 macrophages", "macrophage polarisations"),
    ("LAM3 CCL18", "Tumor-associated macrophages (TAMs)", "lipid-associated macrophage shorthand"),
    ("myCAF POSTN", "cancer-associated fibroblasts", "CAF shorthand"),
    ("Mono/Macro", "Monocyte", "either cell type of a slash label"),
    ("CD19+ B", "B cells", "a single-marker subset is its named class"),
    ("B", "CD19+", "a canonical marker as a label"),
    ("CD8 T", "Cytotoxic T lymphocytes", "cytotoxic T cells are CD8 T cells"),
    ("Plasma_Cells", "plasmocytes", "shorthand"),
    ("Erythroid_Cells", "Red blood cell", "erythrocyte is erythroid"),
    ("Malignant", "Glioblastoma", "malignant cells are their own class"),
    ("AC-like Malignant", "NPC-like Malignant", "malignant states"),
    ("Epithelial cell", "Gastric adenocarcinoma cells", "a malignant prediction graded by its origin"),
    ("EC CEACAM6", "epithelial tumor cells", "EC read as epithelial (or endothelial) cell"),
    ("CD14+ Mono", "Monocytes or Macrophages", "a hedge within one lineage"),
    ("Platelet", "Megakaryocytes or Platelets", "a hedge within one lineage"),
    ("NK", "Natural Killer (NK) cells", "parenthesis read without"),
    ("gamma-delta_T_Cells_1", "γδ T cells", "greek letters"),
    ("Naive B", "Naïve B cells", "accents"),
    ("CD14+ Mono", "CD14⁺ classical monocytes", "superscript plus"),
    ("Plasma", "Plasma cells</answer>Myeloid", "label before a stray closing tag"),
]

MAJOR_CORRECT = [
    ("CD4 CCR7", "CD8+ T cells", "same lineage, other subtype"),
    ("CD8 GZMK", "T cells", "the lineage itself"),
    ("Memory B", "Naive B cell", "same lineage"),
    ("Plasma", "B cell", "plasma cells are B cells: broader"),
    ("CD14+ Mono", "Macrophages", "monocyte and macrophage: one lineage"),
    ("CD14 Mono", "Myeloid", "a broader class"),
    ("NK", "Lymphoid", "a broader class"),
    ("Acinar S100A6", "Epithelial cells", "a broader class"),
    ("Periportal_LSECs", "Venous endothelial cells", "endothelial subtypes"),
    ("Pericytes", "Smooth muscle cell", "mural cells"),
    ("Hepatic_Stellate_Cells", "Fibroblasts", "stellate cells are fibroblasts"),
    ("LAM1 CSTB", "macrophages or myeloid-derived suppressor cells", "a hedge with a broader class"),
    ("OPC-like Malignant", "Oligodendrocyte precursor cells", "the cell of origin of a malignant truth"),
]

PARTIALLY_CORRECT = [
    ("NK", "NK cells or T cells", "a hedge with a wrong lineage"),
    ("CD8 T", "CD8+ T cells or NK cells", "a hedge with a wrong lineage"),
    ("LAM1 CSTB", "Tumor-associated macrophages or microglia", "microglia: a lineage of their own"),
    ("Hepatocyte_3", "Hepatocyte or Endothelial Cell", "a hedge with a wrong lineage"),
]

INCORRECT = [
    ("NK", "T cells", "another lineage of the lymphoid branch"),
    ("DC", "Monocyte", "another lineage of the myeloid branch"),
    ("CD14+ Mono", "Classic dendritic cell", "another lineage"),
    ("B cell", "Neutrophils", "unrelated"),
    ("Keratinocytes", "Club", "different epithelia"),
    ("Hepatocyte_3", "cholangiocyte", "different epithelia"),
    ("myCAF POSTN", "Pericytes", "fibroblasts and mural cells"),
    ("Malignant", "Fibroblasts", "a non-malignant cell for a malignant truth"),
    ("T cell", "Liver cancer", "a malignancy of another origin"),
    ("Mast cell", "Acute myeloid leukemia", "a cancer of a broad class names no cell type"),
    ("Acinar cell", "gastric epithelial cells", "another epithelial cell, not a broader class"),
    ("Inflammatory_Macrophage", "Microglia", "microglia are not graded as macrophages"),
    ("Others", "Goblet cell", "a truth that names no cell type"),
    ("T cell", "#Unknown#", "an answer that names nothing"),
    ("T cell", "", "an empty answer"),
    ("T cell", None, "an unresolved prediction"),
    ("T cell", "dendritic cells or macrophages", "a hedge with no right alternative"),
    (
        "NK",
        "First, I need to recall what each gene does. LYZ is a marker for macrophages, CD74 for antigen "
        "presentation and the list goes on and on without ever reaching a conclusion",
        "a reasoning paragraph without a conclusion",
    ),
]


@pytest.mark.parametrize(("truth", "prediction", "why"), SUBTYPE_CORRECT)
def test_subtype_correct(grader, truth, prediction, why):
    result = grader.explain(truth, prediction)
    assert result.score == 1.0, (why, result)
    assert result.name == "Subtype correct"


@pytest.mark.parametrize(("truth", "prediction", "why"), MAJOR_CORRECT)
def test_major_correct(grader, truth, prediction, why):
    result = grader.explain(truth, prediction)
    assert result.score == 0.5, (why, result)


@pytest.mark.parametrize(("truth", "prediction", "why"), PARTIALLY_CORRECT)
def test_partially_correct(grader, truth, prediction, why):
    result = grader.explain(truth, prediction)
    assert result.score == 0.25, (why, result)


@pytest.mark.parametrize(("truth", "prediction", "why"), INCORRECT)
def test_incorrect(grader, truth, prediction, why):
    result = grader.explain(truth, prediction)
    assert result.score == 0.0, (why, result)


def test_single_branch_option_gives_partial_credit_to_a_related_lineage():
    lenient = Grader(single_branch=True)
    assert lenient.grade("NK", "T cells") == 0.25
    assert lenient.grade("DC", "Monocyte") == 0.25
    assert lenient.grade("B cell", "Neutrophils") == 0.0  # another branch
    assert Grader().grade("NK", "T cells") == 0.0


def test_reasoning_paragraph_is_decoded_to_its_final_label(grader):
    text = (
        "First, look at MS4A1 (also known as CD20), one of the most common markers for B-cells. Next, CD79A "
        "and CD79B make up part of the B-cell receptor complex. Considering IGHM, FCRL1 and SPIB it may lean "
        "towards memory B-cells. Therefore, the final annotation should be Atypical memory B cell."
    )
    assert decode_prediction(text) == "Atypical memory B cell"
    assert grader.grade("Memory B", text) == 1.0
    assert grader.grade("T cell", text) == 0.0


def test_explain_says_why(grader):
    result = grader.explain("CD4 CCR7", "CD8+ T cells")
    assert result.rule == "same major lineage (T cell)"
    assert result.truth.terms == ("CL:0000624",)
    assert result.prediction[0].terms == ("CL:0000625",)
    hedged = grader.explain("NK", "NK cells or T cells")
    assert [r.text for r in hedged.prediction] == ["NK cells", "T cells"]
    assert "hedged" in hedged.rule


# ------------------------------------------------------------------------------------ reading labels


@pytest.mark.parametrize(
    ("label", "term"),
    [
        ("CD14⁺ classical monocytes", "CL:0000860"),
        ("Natural Killer (NK) cells", "CL:0000623"),
        ("NK-like_Cells", "CL:0000623"),
        ("alpha-beta_T_Cells", "CL:0000789"),
        ("γδ_T_Cells", "CL:0000798"),
        ("CD8 TEM_2", "CL:0000913"),
        ("CD4Tconv", "CL:0000624"),
        ("CD8Tex", "CL:0020031"),
        ("Tprolif", "CL:4033069"),
        ("Treg FOXP3", "CL:0000815"),
        ("TFH CXCL13", "CL:0002038"),
        ("Naive CD4+ T cell", "CL:0000895"),
        ("activated cytotoxic T-cells", "CL:0000794"),
        ("Central_venous_LSECs", "CL:1000398"),
        ("EryPro", "CL:0000038"),
        ("Plasmocytes", "CL:0000786"),
        ("Hepatocyte_Storage_Lipid_Enriched", "CL:0000182"),
        ("Macrophage_MARCO_low_exp_2", "CL:0000235"),
        ("Tumor-associated macrophages", "CL:0000235"),
        ("Fibroblast-like cells", "CL:0000057"),
        ("Stalk-like lymphatic endothelial cell", "CL:0002138"),
        ("pulmonary alveolar type 2 cell", "CL:0002063"),
        ("AT2", "CL:0002063"),
        ("pDC", "CL:0000784"),
        ("CD19+CD20", "CL:0000236"),
        ("NCAM1+NK", "CL:0000623"),
        ("Microglia", "CL:0000129"),
    ],
)
def test_tricky_labels_read_as_cell_ontology_terms(grader, label, term):
    assert grader.read(label).terms == (term,)


def test_reading_malignancy_ambiguity_and_nothing(grader):
    pdac = grader.read("Pancreatic Ductal Adenocarcinoma (PDAC) Cells")
    assert pdac.malignant and pdac.terms == ("CL:0002079",)
    hcc = grader.read("Hepatocellular carcinoma")
    assert hcc.malignant and hcc.terms == ("CL:0000182",)
    bare = grader.read("Malignant")
    assert bare.malignant and bare.terms == () and bare.known
    for harmless in ("Tumor-associated macrophages", "Cancer-associated fibroblasts", "tumor-infiltrating lymphocyte"):
        assert not grader.read(harmless).malignant, harmless
    assert set(grader.read("EC MKI67").terms) == {"CL:0000066", "CL:0000115"}
    assert set(grader.read("HSC").terms) == {"CL:0000037", "CL:0000632"}
    for nothing in ("Others", "Unknown", "#Invalid#", "NA"):
        assert not grader.read(nothing).known, nothing
    assert grader.read("gastric epithelial cells").partial
    assert not grader.read("Tumor-associated macrophages").partial


def test_ontology_lookup_of_plain_names_still_works():
    cl = get_ontology()
    assert cl.lookup("Natural killer cells") == "CL:0000623"
    assert cl.lookup("plasmacytoid dendritic cells") == "CL:0000784"
    assert cl.lookup("Kupffer cells") == "CL:0000091"
    assert cl.lookup("Pericytes") == "CL:0000669"
    assert cl.lookup("cytotoxic T lymphocyte definitely not a cell type") is None


def test_every_table_id_is_a_current_term(grader):
    cl = grader.ontology
    ids = {*grading.SHORTHANDS.values(), *grading.MARKER_LABELS.values(), *grading.CLASS_ANCHORS,
           *grading.EXTRA_PARENTS, *grading.EXTRA_PARENTS.values()}
    ids |= {t for terms in grading.AMBIGUOUS.values() for t in terms}
    ids |= {r for _, roots in grading.GRADING_LINEAGES for r in roots}
    ids |= {t for row in grading._T_STATES.values() for t in row if t}
    assert all(cl.resolve(i) == i for i in ids), sorted(i for i in ids if cl.resolve(i) != i)
    assert set(grading.BRANCHES) == {name for name, _ in grading.GRADING_LINEAGES} - {"germ cell"}


# ------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("  CD14+ Mono.  ", "CD14+ Mono"),
        ("**Memory CD4 T**", "Memory CD4 T"),
        ('"Treg"', "Treg"),
        ("Myeloid</answer>Myeloid", "Myeloid"),
        (
            "Pancreatic acinar cell </thinks>The user-supplied list includes several enzymes that are made by them",
            "Pancreatic acinar cell",
        ),
        ("<think>some reasoning here</think>\n<answer>NK cells</answer>", "NK cells"),
        ("<think>long reasoning about genes and more genes</think> B cell", "B cell"),
        ("Looking at CD3E, CD8A and GZMB together with the absence of B and myeloid genes, these cells are most "
         "likely cytotoxic. Therefore, these cells are most likely CD8+ T cells.", "CD8+ T cells"),
        ("Many genes are here and the list goes on; the most likely answer is: Plasma cells, given MZB1",
         "Plasma cells"),
        ("Genes were listed and each was looked at in turn without any final decision being made at all here", None),
        ("", None),
        (None, None),
        (float("nan"), None),
    ],
)
def test_decode_prediction(text, label):
    assert decode_prediction(text) == label


def test_split_alternatives():
    assert split_alternatives("T cells or NK cells") == ["T cells", "NK cells"]
    hedge = "B cells, or plasma cells or memory B cells"
    assert split_alternatives(hedge) == ["B cells", "plasma cells", "memory B cells"]
    assert split_alternatives("Mono/Macro") == ["Mono/Macro"]
    assert split_alternatives("Oligodendrocyte") == ["Oligodendrocyte"]  # "or" inside a word is no hedge


# ------------------------------------------------------------------------------------ many pairs


def test_grade_labels_handles_missing_values_and_repeats():
    truths = ["T cell", "T cell", None, "B cell", "NK"]
    preds = ["CD8 T cells", "CD8 T cells", "B cell", None, float("nan")]
    out = grade_labels(truths, preds)
    assert out[:2].tolist() == [1.0, 1.0]
    assert np.isnan(out[2])
    assert out[3:].tolist() == [0.0, 0.0]
    assert grade("T cell", "CD8 T cells") == 1.0
    with pytest.raises(ValueError, match="one prediction per"):
        grade_labels(["T cell"], [])


def test_grade_name():
    assert grade_name(0.5) == "Major correct"
    assert [grade_name(g) for g in (1, 0.25, 0)] == [GRADE_NAMES[1.0], GRADE_NAMES[0.25], GRADE_NAMES[0.0]]
    with pytest.raises(ValueError, match="not a grade"):
        grade_name(0.3)


# ------------------------------------------------------------------------------------ agreement statistics


def test_quadratic_kappa_by_hand():
    assert quadratic_kappa([0, 0.5, 1, 0.25], [0, 0.5, 1, 0.25]) == pytest.approx(1.0)
    assert quadratic_kappa([0, 0, 1, 1], [0, 0, 0, 0]) == pytest.approx(0.0)
    # reference 0,1 ; grader 1,0: complete disagreement on the two extremes
    # observed weighted = 2 * 1 = 2; expected = sum w_ij * r_i * g_j / n = (1*1 + 1*1)/2 = 1 -> kappa = -1
    assert quadratic_kappa([0, 1], [1, 0]) == pytest.approx(-1.0)
    # one step apart on a 4-point scale: weight (1/3)^2
    ref, ours = [0, 0, 1, 1], [0, 0.25, 1, 1]
    confusion = np.zeros((4, 4))
    for r, g in zip(ref, ours):
        confusion[int(r * 4) if r < 1 else 3, {0: 0, 0.25: 1, 0.5: 2, 1: 3}[g]] += 1
    w = (np.subtract.outer(np.arange(4), np.arange(4)) ** 2) / 9
    expected = np.outer(confusion.sum(1), confusion.sum(0)) / 4
    assert quadratic_kappa(ref, ours) == pytest.approx(1 - (w * confusion).sum() / (w * expected).sum())


def test_compare_grades():
    result = compare_grades([0, 0, 0.5, 1, 1, 0.25], [0, 0.5, 0.5, 1, 0.5, 0])
    assert result.n == 6
    assert result.agreement == pytest.approx(3 / 6)
    assert result.recall == pytest.approx({"0": 0.5, "0.25": 0.0, "0.5": 1.0, "1": 0.5})
    assert result.confusion.loc["0", "0.5"] == 1 and result.confusion.loc["1", "0.5"] == 1
    assert result.confusion.to_numpy().sum() == 6
    assert set(result.as_dict()) == {"n", "agreement", "kappa", "recall", "confusion"}
    with pytest.raises(ValueError, match="grades must be one of"):
        compare_grades([0.3], [0])
    with pytest.raises(ValueError, match="one of each"):
        compare_grades([0, 1], [0])


# ------------------------------------------------------------------------------------ the experts


def _halves(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    order = np.random.default_rng(0).permutation(len(table))
    half = len(table) // 2
    return table.iloc[np.sort(order[:half])], table.iloc[np.sort(order[half:])]


@pytest.mark.skipif(not DEV.exists(), reason="the experts' dev table is not available")
def test_agreement_with_the_experts_on_the_held_out_half():
    table = pd.read_csv(DEV)
    tune, held = _halves(table)
    grader = Grader()
    for part, floor_agreement, floor_kappa in ((held, 0.85, 0.70), (table, 0.85, 0.70)):
        ours = grader.grade_many(part["Ground Truth"], part["Model Prediction"])
        result = compare_grades(part["Evaluation Score"].to_numpy(), ours)
        assert result.agreement >= floor_agreement, result
        assert result.kappa >= floor_kappa, result
        # better than the trivial graders on every expert grade but the rarest
        assert result.recall["1"] > 0.75 and result.recall["0.5"] > 0.55 and result.recall["0"] > 0.9


def test_no_expert_pairs_are_vendored():
    root = Path(cellscribe.__file__).parent
    for path in [*root.glob("core/**/*.py"), *root.glob("core/domain/data/*")]:
        text = path.read_bytes()
        assert b"Evaluation Score" not in text and b"Prediction Evaluation" not in text, path
