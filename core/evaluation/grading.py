"""Grade predicted cell type labels against true ones on CellReasoner's four-level scale.

CellReasoner scores a prediction by looking the (truth, prediction) pair up in a table graded by
experts, so a pair nobody graded gets no score. :class:`Grader` grades any pair from the Cell Ontology
(:mod:`cellscribe.core.domain.ontology`) and the rules below, on the same scale:

==== ================= =====================================================================
1    Subtype correct   the prediction names the true cell type or one of its subtypes
0.5  Major correct     another cell type of the same major lineage, or a broader class that
                       contains the truth ("T cell" for a CD4 T cell, "myeloid cell" for a
                       monocyte)
0.25 Partially correct a hedged answer that names a right cell type beside a wrong one ("NK cells
                       or T cells" for NK cells); with ``single_branch=True`` also a single answer
                       of another lineage of the same branch (lymphoid, myeloid, epithelial, ...)
0    Incorrect         anything else, including an answer the grader cannot read
==== ================= =====================================================================

The experts whose grades CellReasoner published give 0, not 0.25, to a single answer of a related
lineage (NK cells for T cells, monocytes for dendritic cells): giving it 0.25 drops the agreement
with them from 0.90 to 0.78, so ``single_branch`` is off by default.

How a label is read (:meth:`Grader.read`, :meth:`Grader.read_prediction`)
------------------------------------------------------------------------
1. A model's output that is a reasoning paragraph is decoded to its final label first
   (:func:`decode_prediction`): the label before a stray closing tag (``"Myeloid</answer>..."``),
   the inside of ``<answer>`` tags, the text after ``</think>``, or the label after the last
   concluding phrase ("the most likely answer is ...", "therefore, these cells are ..."); a
   paragraph that concludes nothing is unreadable and scores 0.
2. Hedged answers are split on "or" (:func:`split_alternatives`); a parenthesis adds detail and is
   read only when the text before it means nothing ("Natural Killer (NK) cells" is read without it).
3. Malignancy is a property of its own: "carcinoma", "glioblastoma", "tumor cells", "Malignant"
   (not "tumor-associated" or "cancer-associated") mark a malignant cell, whose cell of origin is
   read from the rest of the label ("pancreatic ductal adenocarcinoma" is a malignant pancreatic
   ductal cell, a bare "carcinoma" a malignant epithelial cell, "glioma" a malignant glial cell).
4. The rest is looked up in the Cell Ontology (:meth:`CellOntology.lookup`), helped by

   - :data:`SHORTHANDS` of annotation label sets ("LSEC", "CAF", "TAM", "LAM", "EryPro", "MDSC", ...);
   - a reader of T-cell labels: co-receptor and state ("CD8 TEM_2", "CD4Tconv", "Naive CD4+ T",
     "CTL"; cytotoxic T cells are CD8 and helper T cells CD4 T cells, as annotators mean them);
   - labels joined by "/" mean either cell type ("Mono/Macro");
   - when the whole label is unknown, its longest known part: marker genes after a cell type are
     dropped ("Acinar S100A6", "CD4 CD69", "Neutrophil SLPI" grade through their named parent), and
     so are trailing numbers ("Hepatocyte_4", "CD8 TEM_2") and modifiers ("Tumor-associated
     macrophages" is a macrophage). When a dropped word may narrow the type down (an organ, a
     place: "gastric epithelial cells") the reading is *partial*: some cell of that class, not any;
   - a label made only of canonical marker genes names the type they mark (:data:`MARKER_LABELS`:
     "CD19+" is a B cell, "FOXP3" a regulatory T cell).

   Labels that name no cell type ("Others", "Unknown", "#Invalid#") mean nothing.
5. A few shorthands mean two things (:data:`AMBIGUOUS`: "EC" is an epithelial or an endothelial
   cell, "HSC" a haematopoietic stem cell or a hepatic stellate cell): every reading is kept and the
   best grade wins, giving the prediction the benefit of the doubt.

How a pair is graded (:meth:`Grader.explain`)
---------------------------------------------
- Equal labels (after normalising case, punctuation and plurals) are subtype correct.
- A malignant truth: any malignant prediction is subtype correct (malignant cells are their own
  class, whatever their states are called: "AC-like Malignant", "OPC-like Malignant"); a
  non-malignant prediction of the truth's cell of origin is major correct; anything else incorrect.
- A malignant prediction of a non-malignant truth is graded by its cell of origin ("gastric
  adenocarcinoma cells" for "Epithelial cell" is subtype correct), but a cancer of a broad class
  ("acute myeloid leukemia" for a mast cell) names no cell type of it and is incorrect.
- Otherwise by terms. The truth is first taken at the level of its *cell class* when it is a state
  of one (:data:`CLASS_ANCHORS`): naive, memory and effector CD4 T cells are CD4 T cells, classical
  and non-classical monocytes are monocytes, M1 and M2 macrophages are macrophages, periportal and
  central hepatocytes hepatocytes; and a subset named by one marker is its named class ("B cell,
  CD19-positive" is a B cell; the co-receptors CD4 and CD8 do name subsets).

  Subtype correct: the prediction is that term or a descendant of it (is_a, plus the links of
  :data:`EXTRA_PARENTS`: plasma cells are B cells, basal and ciliated cells epithelial), unless the
  prediction's major lineage is another one (microglia are graded as microglia, not macrophages).

  Major correct: both fall in one major lineage of :data:`GRADING_LINEAGES` (T cell, NK cell, B cell,
  dendritic cell, monocyte/macrophage, granulocyte, endothelial cell, mural cell,
  fibroblast/stromal, hepatocyte, exocrine pancreas, ...; epithelial cells split into the
  ontology's own epithelia, since a keratinocyte is no "major correct" answer for a hepatocyte),
  or the prediction is an ancestor of the truth that is still a cell type ("lymphocyte", "myeloid
  cell", "epithelial cell"; not "cell") and not a partial reading.

  Incorrect otherwise.
- A hedged answer is graded by its best alternative when every alternative is right at least at the
  major level ("Monocytes or Macrophages" for CD14+ monocytes: 1); at most major correct when the
  others are only broader classes ("Tumor-associated macrophages or myeloid-derived suppressor
  cells" for a macrophage: 0.5); partially correct when some alternative is wrong ("CD8+ T cells or
  NK cells" for CD8 T cells: 0.25); incorrect when none is right.

Agreement with the experts' own grades is measured by ``benchmarks/grading_agreement.py``.
"""

from __future__ import annotations

import functools
import logging
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import pandas as pd

from ..answers import FREE, TAG_NAMES
from ..domain.ontology import ABBREVIATIONS, CellOntology, get_ontology, normalise_label

log = logging.getLogger(__name__)

__all__ = [
    "GRADE_SCALE",
    "GRADE_NAMES",
    "GRADING_LINEAGES",
    "COMPARTMENTS",
    "BRANCHES",
    "CLASS_ANCHORS",
    "SHORTHANDS",
    "MARKER_LABELS",
    "AMBIGUOUS",
    "EXTRA_PARENTS",
    "LabelReading",
    "Grade",
    "Grader",
    "GradeAgreement",
    "get_grader",
    "grade",
    "grade_labels",
    "grade_name",
    "decode_prediction",
    "split_alternatives",
    "compare_grades",
    "quadratic_kappa",
]

#: The four grades, lowest first.
GRADE_SCALE: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)

#: CellReasoner's names of the grades.
GRADE_NAMES: Mapping[float, str] = {
    1.0: "Subtype correct",
    0.5: "Major correct",
    0.25: "Partially correct",
    0.0: "Incorrect",
}

#: Major lineages for grading, checked in this order against a term and its is_a ancestors: the first
#: lineage with a root among them wins. Unlike :data:`cellscribe.core.domain.ontology.LINEAGES`, monocytes and
#: macrophages (with osteoclasts) form one lineage; pericytes and smooth muscle cells are mural cells,
#: apart from fibroblasts and other stromal cells; and epithelial cells fall into the ontology's own
#: epithelia (hepatocytes, exocrine pancreas, ducts, respiratory, alimentary, stratified, kidney,
#: mesothelium): a hepatocyte and a keratinocyte are different lineages, as annotators treat them.
GRADING_LINEAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("T cell", ("CL:0000084", "CL:0000893")),  # + thymocyte
    ("NK cell", ("CL:0000623",)),
    ("innate lymphoid cell", ("CL:0001065",)),
    ("B cell", ("CL:0000236", "CL:0000945", "CL:0000786", "CL:0000980")),  # + B-lineage, plasma(blast)
    ("dendritic cell", ("CL:0000451",)),
    ("microglia", ("CL:0000129",)),
    ("monocyte/macrophage", ("CL:0000576", "CL:0000235", "CL:0000113", "CL:0000092")),  # + osteoclast
    ("mast cell", ("CL:0000097",)),
    ("granulocyte", ("CL:0000094",)),
    ("megakaryocyte/platelet", ("CL:0000556", "CL:0000233")),
    ("erythroid", ("CL:0000764",)),
    ("HSPC", ("CL:0000037", "CL:0008001")),
    ("endothelial cell", ("CL:0000115",)),
    ("endocrine cell", ("CL:0000163",)),
    ("hepatocyte", ("CL:0000182", "CL:0005026")),  # + hepatoblast
    ("exocrine pancreas", ("CL:1001433", "CL:0000622")),  # + acinar cell
    ("duct epithelium", ("CL:0000068",)),  # cholangiocytes, other ducts
    ("respiratory epithelium", ("CL:0002368",)),
    ("alimentary epithelium", ("CL:0002251",)),
    ("stratified epithelium", ("CL:0000079", "CL:0000237", "CL:0000076")),  # keratinocytes, squamous
    ("kidney epithelium", ("CL:0002518",)),
    ("mesothelium", ("CL:0000077",)),
    ("epithelial cell", ("CL:0000066",)),
    ("mural cell", ("CL:0008034", "CL:0000669", "CL:0000192")),  # pericyte, smooth muscle cell
    ("bone/cartilage", ("CL:0000062", "CL:0000137", "CL:0000138", "CL:0000058")),
    (
        "fibroblast/stromal",
        (
            "CL:0000057",  # fibroblast (hepatic stellate cells are fibroblasts in CL)
            "CL:0000499",  # stromal cell
            "CL:0000186",  # myofibroblast cell
            "CL:0008019",  # mesenchymal cell
            "CL:0000134",  # mesenchymal stem cell
            "CL:0002410",  # pancreatic stellate cell
        ),
    ),
    ("muscle cell", ("CL:0000187",)),
    ("adipocyte", ("CL:0000136",)),
    ("neuron", ("CL:0000540",)),
    ("glial cell", ("CL:0000125", "CL:0002453")),  # + oligodendrocyte precursor cell
    ("melanocyte", ("CL:0000148",)),
    ("germ cell", ("CL:0000586",)),
)

#: is_a links the ontology lacks but annotators assume: basal, ciliated, serous and mucous cells of
#: single-cell atlases are epithelial cells, and plasma cells and plasmablasts are (differentiated)
#: B cells.
EXTRA_PARENTS: Mapping[str, str] = {
    "CL:0000786": "CL:0000236",  # plasma cell
    "CL:0000980": "CL:0000236",  # plasmablast
    "CL:0000646": "CL:0000066",  # basal cell
    "CL:0000064": "CL:0000066",  # ciliated cell
    "CL:0000313": "CL:0000066",  # serous secreting cell
    "CL:0000319": "CL:0000066",  # mucus secreting cell
}

#: Groupings of :data:`GRADING_LINEAGES` too broad to be a major lineage: two different cell types
#: in one of them share no lineage (a basal cell is no "major correct" answer for a ciliated cell),
#: though the grouping still counts as a broader class and a branch.
COMPARTMENTS: frozenset[str] = frozenset({"epithelial cell"})

#: Branches of related lineages (used by ``single_branch=True``).
BRANCHES: Mapping[str, str] = {
    "T cell": "lymphoid",
    "NK cell": "lymphoid",
    "innate lymphoid cell": "lymphoid",
    "B cell": "lymphoid",
    "dendritic cell": "myeloid",
    "microglia": "myeloid",
    "monocyte/macrophage": "myeloid",
    "mast cell": "myeloid",
    "granulocyte": "myeloid",
    "megakaryocyte/platelet": "myeloid",
    "erythroid": "myeloid",
    "HSPC": "myeloid",
    "endocrine cell": "epithelial",
    "hepatocyte": "epithelial",
    "exocrine pancreas": "epithelial",
    "duct epithelium": "epithelial",
    "respiratory epithelium": "epithelial",
    "alimentary epithelium": "epithelial",
    "stratified epithelium": "epithelial",
    "kidney epithelium": "epithelial",
    "mesothelium": "epithelial",
    "epithelial cell": "epithelial",
    "endothelial cell": "stromal/vascular",
    "mural cell": "stromal/vascular",
    "bone/cartilage": "stromal/vascular",
    "fibroblast/stromal": "stromal/vascular",
    "muscle cell": "stromal/vascular",
    "adipocyte": "stromal/vascular",
    "neuron": "neural",
    "glial cell": "neural",
    "melanocyte": "neural",
}

#: Cell classes whose subtypes a true label is graded at: naive, memory, effector, activated and
#: cycling states of CD4 and CD8 T cells, monocyte subsets, macrophage polarisations, hepatocyte
#: zones and neutrophil maturation stages are states of one class, so any prediction inside the
#: class is subtype correct. Regulatory T cells and the other T-cell classes stay distinct.
CLASS_ANCHORS: tuple[str, ...] = (
    "CL:0000624",  # CD4-positive, alpha-beta T cell
    "CL:0000625",  # CD8-positive, alpha-beta T cell
    "CL:0000576",  # monocyte
    "CL:0000235",  # macrophage
    "CL:0000182",  # hepatocyte
    "CL:0000775",  # neutrophil
)
_ANCHOR_EXCEPTIONS = ("CL:0000815",)  # regulatory T cell: a class of its own
# Cell Ontology names of marker-defined subsets: "B cell, CD19-positive", "CD14-positive monocyte".
_MARKER_NAMED = re.compile(
    r"^(?:(?P<first>[^,]+), (?P<marker>[A-Za-z0-9]+)-positive|(?P<marker2>[A-Za-z0-9]+)-positive (?P<last>[^,]+))$"
)

#: Annotation shorthands the ontology does not know, compared in :func:`normalise_label` form (so
#: plurals, case and punctuation do not matter). Checked before the ontology's own look-up.
SHORTHANDS: Mapping[str, str] = {
    # monocytes, macrophages, myeloid
    "monocyte derived macrophage": "CL:0000235",
    "mmφ": "CL:0000235",
    "macro": "CL:0000235",
    "mac": "CL:0000235",
    "tam": "CL:0000235",
    "histiocyte": "CL:0000235",
    "histiocytic": "CL:0000235",
    "lam": "CL:4033086",
    "m1 like": "CL:0000863",
    "m1": "CL:0000863",
    "m2 like": "CL:0000890",
    "m2": "CL:0000890",
    "microglia": "CL:0000129",
    "microglial": "CL:0000129",
    "classic dendritic cell": "CL:0000990",
    "classical dendritic cell": "CL:0000990",
    "mdsc": "CL:0000766",  # myeloid-derived suppressor cells: a state of monocytes or neutrophils
    "myeloid derived suppressor cell": "CL:0000766",
    "myeloid": "CL:0000763",
    "tan": "CL:0000775",
    "granulocytic": "CL:0000094",
    "gmp": "CL:0000557",
    "mk": "CL:0000556",
    "megakaryoblast": "CL:0000556",
    "erypro": "CL:0000038",
    "erythroid progenitor": "CL:0000038",
    "rbc": "CL:0000232",
    "mature rbc": "CL:0000232",
    # lymphocytes
    "lymphoid": "CL:0000542",
    "til": "CL:0000542",
    "tumor infiltrating lymphocyte": "CL:0000542",
    "immune": "CL:0000738",
    "cytotoxic cell": "CL:0000542",  # cytotoxic T or NK cells
    "immune cell": "CL:0000738",
    "plasmocyte": "CL:0000786",
    "plasmacyte": "CL:0000786",
    "immunoglobulin producing cell": "CL:0000786",
    "ig producing": "CL:0000786",
    "mzb": "CL:0000845",
    "gcb": "CL:0000844",
    "germinal centre b cell": "CL:0000844",
    "gcb b": "CL:0000844",
    "tfh": "CL:0002038",
    "nk like": "CL:0000623",
    "nkt": "CL:0000814",
    "thymocyte": "CL:0000893",
    # stromal and vascular
    "caf": "CL:0000057",
    "mycaf": "CL:0000057",
    "icaf": "CL:0000057",
    "apcaf": "CL:0000057",
    "cancer associated fibroblast": "CL:0000057",
    "smc": "CL:0000192",
    "vsmc": "CL:0000359",
    "myofibroblast": "CL:0000186",
    "lsec": "CL:1000398",
    "lec": "CL:0002138",
    "vascular endothelial cell": "CL:0000071",
    "arterial endothelial cell": "CL:0000115",
    "venous endothelial cell": "CL:0002543",
    # epithelial, liver, pancreas, lung, stomach
    "epithelial": "CL:0000066",
    "gland": "CL:0000150",
    "glandular": "CL:0000150",
    "glandular epithelial": "CL:0000150",
    "secretory glandular": "CL:0000150",
    "pit mucous": "CL:0002179",
    "gland mucous": "CL:0000319",
    "serous": "CL:0000313",
    "exocrine": "CL:0000152",
    "exocrine pancreas": "CL:1001433",
    "pancreatic epithelial cell": "CL:0000083",
    "hepatocellular": "CL:0000182",
    "hepatic progenitor": "CL:0005026",
    "biliary epithelial cell": "CL:1000488",
    "biliary": "CL:1000488",
    "pneumocyte": "CL:0000322",
    # nervous system, eye
    "glia": "CL:0000125",
    "oligodendroglial": "CL:0000128",
    "opc": "CL:0002453",
    "cone": "CL:0000573",
    "rod": "CL:0000604",
    "neural": "CL:0002319",
    # others
    "progenitor": "CL:0011026",
}

#: Canonical marker genes that annotators use as a label by themselves ("CD19+", "CD1c", "FOXP3"):
#: a label made only of marker genes that all point to one cell type means that cell type.
MARKER_LABELS: Mapping[str, str] = {
    "CD19": "CL:0000236",
    "CD20": "CL:0000236",
    "MS4A1": "CL:0000236",
    "CD79": "CL:0000236",
    "CD79A": "CL:0000236",
    "CD22": "CL:0000236",
    "CD3": "CL:0000084",
    "TCR": "CL:0000084",
    "CD3E": "CL:0000084",
    "FOXP3": "CL:0000815",
    "NCAM1": "CL:0000623",
    "CD56": "CL:0000623",
    "CD14": "CL:0000576",
    "CD163": "CL:0000235",
    "CD68": "CL:0000235",
    "CD1C": "CL:0002399",
    "CLEC9A": "CL:0002394",
    "LILRA4": "CL:0000784",
    "PPBP": "CL:0000233",
    "HBB": "CL:0000232",
    "EPCAM": "CL:0000066",
    "PECAM1": "CL:0000115",
    "COL1A1": "CL:0000057",
    "CD34": "CL:0008001",
    "TPSAB1": "CL:0000097",
}

#: Shorthands with two common meanings; each reading is graded and the best grade kept.
AMBIGUOUS: Mapping[str, tuple[str, ...]] = {
    "ec": ("CL:0000066", "CL:0000115"),  # epithelial cell, endothelial cell
    "hsc": ("CL:0000037", "CL:0000632"),  # haematopoietic stem cell, hepatic stellate cell
    "alveolar": ("CL:0000322", "CL:0000583"),  # alveolar epithelial cell, alveolar macrophage
    "stellate": ("CL:0000632", "CL:0002410"),  # hepatic or pancreatic stellate cell
}

# ------------------------------------------------------------------------------------ T-cell labels

_T_STATES: Mapping[str, tuple[str | None, str | None, str | None]] = {
    # state: (CD4 term, CD8 term, term without co-receptor)
    "naive": ("CL:0000895", "CL:0000900", "CL:0000898"),
    "memory": ("CL:0000897", "CL:0000909", "CL:0000813"),
    "tem": ("CL:0000905", "CL:0000913", "CL:0000813"),
    "tcm": ("CL:0000904", "CL:0000907", "CL:0000813"),
    "temra": ("CL:0001087", "CL:0001062", "CL:0000813"),
    "effector": ("CL:0001044", "CL:0001050", "CL:0000911"),
    "activated": ("CL:0000896", "CL:0000906", None),
    "exhausted": ("CL:0020030", "CL:0020031", "CL:0011025"),
    "cytotoxic": ("CL:0000934", "CL:0000794", "CL:0000794"),
    "helper": ("CL:0000492", None, "CL:0000492"),
    "cycling": ("CL:4033075", "CL:4033074", "CL:4033069"),
    "regulatory": ("CL:0000792", None, "CL:0000815"),
}
_T_STATE_WORDS: Mapping[str, str] = {
    "naive": "naive",
    "memory": "memory",
    "tem": "tem",
    "em": "tem",
    "effector memory": "tem",
    "tcm": "tcm",
    "cm": "tcm",
    "central memory": "tcm",
    "temra": "temra",
    "emra": "temra",
    "effector": "effector",
    "teff": "effector",
    "activated": "activated",
    "exhausted": "exhausted",
    "tex": "exhausted",
    "cytotoxic": "cytotoxic",
    "ctl": "cytotoxic",
    "helper": "helper",
    "th": "helper",
    "cycling": "cycling",
    "proliferating": "cycling",
    "prolif": "cycling",
    "tprolif": "cycling",
    "regulatory": "regulatory",
    "treg": "regulatory",
    "reg": "regulatory",
    "trm": "memory",
    "tconv": "",
    "conventional": "",
}
_T_WORDS = {"t", "cell", "lymphocyte", "positive"}
_T_SUBSETS = ("regulatory", "cytotoxic", "helper")
# State words that name T cells by themselves ("TEM", "CTL", "Treg").
_T_IMPLYING = {"tem", "tcm", "temra", "teff", "tex", "ctl", "th", "tprolif", "treg", "trm", "tconv"}
_CORECEPTOR = {"cd4": 0, "cd4+": 0, "cd8": 1, "cd8+": 1}

# ------------------------------------------------------------------------------------ malignancy

_MALIGNANT = re.compile(
    r"\b(?:malignan\w*|neoplas\w*|cancer(?:ous)?(?![\s-]*(?:associated|related))|"
    r"tumou?r(?![\s-]*(?:associated|infiltrating|derived|resident|related|stroma\w*|microenvironment|"
    r"immune|endotheli\w*))|"
    r"\w*carcinoma\w*|carcinoid|\w*sarcoma\w*|\w*blastoma\w*|glioma\w*|astrocytoma\w*|melanoma\w*|"
    r"lymphoma\w*|myeloma\w*|leuka?emi\w*|thymoma\w*|hepatoma\w*|mesothelioma\w*|"
    r"pdac|hcc|aml|cml|cll|burkitt\w*)\b",
    re.IGNORECASE,
)
#: The cell of origin a malignancy word implies when the rest of the label names none.
_MALIGNANT_ORIGIN: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), term)
    for pattern, term in (
        (r"hepatocellular|hepatoma|\bhcc\b", "CL:0000182"),
        (r"\bpdac\b", "CL:0002079"),
        (r"carcinoid", "CL:0000165"),
        (r"carcinoma|adenocarcinoma|thymoma", "CL:0000066"),
        (r"mesothelioma", "CL:0000077"),
        (r"glioma|glioblastoma|astrocytoma", "CL:0000125"),
        (r"neuroblastoma", "CL:0000540"),
        (r"melanoma", "CL:0000148"),
        (r"myeloma", "CL:0000786"),
        (r"burkitt", "CL:0000236"),
        (r"lymphoma|lymphoblastic|lymphocytic|\bcll\b", "CL:0000542"),
        (r"myeloid leuka?emia|\baml\b|\bcml\b", "CL:0000763"),
        (r"sarcoma", "CL:0008019"),
    )
)

# ------------------------------------------------------------------------------------ text

# The answer format's tags, read tolerantly: any case, inner spaces, misspelt endings ("</thinks>").
_TAG_NAME = "(?:" + "|".join(TAG_NAMES) + r")\w*"
_TAG = re.compile(rf"</?\s*{_TAG_NAME}\s*>", re.IGNORECASE)
_OPENING_TAG = re.compile(rf"<\s*{_TAG_NAME}\s*>", re.IGNORECASE)
_CLOSING_TAG = re.compile(rf"</\s*{_TAG_NAME}\s*>", re.IGNORECASE)
_CONCLUSION = re.compile(
    r"(?:(?:final|most\s+(?:likely|probable)|best|correct)\s+(?:answer|annotation|cell\s*type|identity|label|"
    r"classification|choice)|the\s+answer|annotation|cell\s+type|identity)"
    r"\s+(?:is|should\s+be|would\s+be|would\s+likely\s+be|will\s+be|is\s+likely|is\s+most\s+likely)\s*:?\s*"
    r"|(?:therefore|thus|so|hence|in\s+conclusion|overall)\s*,?\s*(?:these|this|the)\s+(?:cells?\s+)?"
    r"(?:is|are)\s+(?:most\s+likely\s+|likely\s+|probably\s+)?",
    re.IGNORECASE,
)
_PARAGRAPH_WORDS = 12
_MAX_LABEL_WORDS = 10
_OR = re.compile(r"\s*,?\s+(?:and/)?or\s+|\s*;\s*", re.IGNORECASE)
_PAREN = re.compile(r"\(([^()]*)\)|\[([^\[\]]*)\]")
_QUOTES = "\"'`“”‘’«»*#"
_NOTHING = {"", "other", "others", "unknown", "unassigned", "unclassified", "na", "nan", "none", "invalid",
            "undetermined", "ambiguous", "doublet", "doublets", "low quality", "mixed", "unresolved"}
_FILLER = {"cell", "cells", "like", "type", "population", "positive", "subset", "the", "a", "an", "of", "and",
           "likely", "probably", "possibly", "origin", "in", "with", "from", "high", "low", "expressing", "exp"}
_GREEK_WORDS = {"alpha", "beta", "gamma", "delta", "epsilon"}
# Words of a label that describe a state, not a narrower cell type: dropping them loses nothing.
_STATE_WORDS = {
    "tumor", "tumour", "associated", "cancer", "infiltrating", "activated", "active", "inflammatory", "non",
    "resting", "proliferating", "proliferative", "cycling", "dividing", "mature", "immature", "early", "late",
    "intermediate", "atypical", "classical", "classic", "conventional", "professional", "trained", "stressed",
    "tissue", "specific", "resident", "derived", "reactive", "quiescent", "naive", "memory", "effector",
    "human", "mouse", "putative", "normal", "primary", "stable", "exhausted", "cytotoxic", "helper", "secretory",
    "activation", "excited", "response", "responding", "circulating", "migratory", "senescent", "stem", "other",
}
# Terms too general to be an answer: "cell", "eukaryotic cell", "somatic cell".
_TOO_GENERAL = {"CL:0000000", "CL:0000255", "CL:0002371"}
_GLUED_CD = re.compile(r"(?<=[a-z])(?=CD\d)|(?<=CD[48])(?=T)|(?<=\d)(?=CD\d)|(?<=[A-Z0-9]\+)(?=[A-Za-z])")
_TRAILING_NUMBER = re.compile(r"(?:[\s_\-]+\d+|(?<=[a-z]{3})\d+)$")
_GENE_CASE = re.compile(r"^(?:[A-Z][A-Z0-9\-]*\d[A-Z0-9\-]*|[A-Z]{3,}\d*)$")


def _strip_accents(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return unicodedata.normalize("NFC", "".join(c for c in decomposed if not unicodedata.combining(c)))


def _clean(text: str) -> str:
    """One label without markup, quotes, surrounding punctuation or a leading article."""
    text = _strip_accents(unicodedata.normalize("NFKC", text))
    text = " ".join(text.replace("**", " ").split())
    previous = None
    while text != previous:
        previous = text
        text = text.strip().strip(_QUOTES).strip().rstrip(".,;:!。").strip()
        text = re.sub(r"^(?:an?|the)\s+", "", text, flags=re.IGNORECASE)
    return text


def decode_prediction(text: Any) -> str | None:
    """The label a model's output names, or ``None`` when it names none.

    A short answer is returned cleaned. A closing tag right after a short label (``"Myeloid</answer>
    Myeloid"``, ``"Pancreatic acinar cell </thinks>The user ..."``) gives that label; ``<answer>``
    tags give their inside; a reasoning paragraph (more than 12 words) gives the label after its last
    concluding phrase ("the most likely answer is", "therefore, these cells are"), cut at the end of
    its sentence, or ``None`` when it concludes nothing.
    """
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return None
    text = str(text).strip()
    if not text:
        return None
    answers = FREE.answer_tags(text)
    closing = list(_CLOSING_TAG.finditer(text))
    if answers and answers[-1].strip():
        text = answers[-1]
    elif closing:
        before = text[: closing[0].start()].strip()
        if _OPENING_TAG.search(before) is None and before and len(before.split()) <= _MAX_LABEL_WORDS:
            text = before  # a label, then a stray tag and more text
        else:
            text = text[closing[-1].end():] or _TAG.sub(" ", text)  # reasoning, then the answer
    text = _TAG.sub(" ", text).strip()
    if len(text.split()) > _PARAGRAPH_WORDS:
        matches = list(_CONCLUSION.finditer(text))
        if not matches:
            return None
        tail = text[matches[-1].end():]
        tail = re.split(r"(?<=[a-z0-9)])\.(?:\s|$)|\n|(?<=\w)[,;]\s+(?:which|as|because|since|due|given|with|based)\b",
                        tail, maxsplit=1, flags=re.IGNORECASE)[0]
        text = tail
        if len(text.split()) > _MAX_LABEL_WORDS:
            return None
    text = _clean(text)
    return text or None


def split_alternatives(label: str) -> list[str]:
    """The alternatives of a hedged answer (``"T cells or NK cells"`` -> ``["T cells", "NK cells"]``)."""
    parts = [_clean(part) for part in _OR.split(label)]
    return [part for part in parts if part]


# ------------------------------------------------------------------------------------ value types


@attrs.frozen
class LabelReading:
    """What one label means to the grader.

    ``text`` is the cleaned label; ``terms`` the Cell Ontology ids it may mean (several for an
    ambiguous shorthand, none when the grader does not know it); ``malignant`` whether it names a
    malignant cell (then ``terms`` hold its cell of origin, when known); ``partial`` whether the terms
    were read from part of the label only, leaving out words that may narrow them down ("gastric
    epithelial cells" reads as an epithelial cell of some kind).
    """

    text: str
    terms: tuple[str, ...] = ()
    malignant: bool = False
    partial: bool = False

    @property
    def known(self) -> bool:
        """Whether the label means anything to the grader."""
        return bool(self.terms) or self.malignant


@attrs.frozen
class Grade:
    """A graded pair: ``score`` (one of :data:`GRADE_SCALE`), the ``rule`` that decided it, and how
    the truth and each alternative of the prediction were read."""

    score: float
    rule: str
    truth: LabelReading
    prediction: tuple[LabelReading, ...]

    @property
    def name(self) -> str:
        """CellReasoner's name of the grade (``"Major correct"``)."""
        return GRADE_NAMES[self.score]


# ------------------------------------------------------------------------------------ the grader


class Grader:
    """Grades (truth, prediction) pairs of cell type labels; see the module docstring for the rules.

    :param ontology: the Cell Ontology to use (default: the vendored release).
    :param single_branch: also give 0.25 to a single (not hedged) prediction of another lineage of
        the same branch (NK cell for a T cell). Off by default: the experts' grades give it 0.
    Readings and grades are cached per distinct label and pair, so grading a column of a million
    cells costs one grade per distinct pair.
    """

    def __init__(self, ontology: CellOntology | None = None, *, single_branch: bool = False) -> None:
        self.ontology = ontology if ontology is not None else get_ontology()
        self.single_branch = single_branch
        self._symbols: frozenset[str] | None = None
        self._noun_set: frozenset[str] | None = None
        self._markers = {gene.upper(): term for gene, term in MARKER_LABELS.items()}
        self._extra = {c: p for c, p in EXTRA_PARENTS.items() if c in self.ontology and p in self.ontology}
        self._shorthands = {normalise_label(k): v for k, v in SHORTHANDS.items() if v in self.ontology}
        self._ambiguous = {
            normalise_label(k): tuple(t for t in v if t in self.ontology) for k, v in AMBIGUOUS.items()
        }
        self._lineage_roots = [
            (name, tuple(r for r in roots if r in self.ontology)) for name, roots in GRADING_LINEAGES
        ]
        self.read = functools.lru_cache(maxsize=65_536)(self._read)
        self.explain = functools.lru_cache(maxsize=262_144)(self._explain)

    # ---------------------------------------------------------------- ontology helpers

    def lineage(self, term: str) -> str | None:
        """The grading lineage of a term (a name of :data:`GRADING_LINEAGES`), or ``None``."""
        found = self._ancestors(term) | {term}
        for name, roots in self._lineage_roots:
            if not found.isdisjoint(roots):
                return name
        return None

    def is_a(self, child: str, parent: str, *, strict: bool = False) -> bool:
        """:meth:`CellOntology.is_a` with the links of :data:`EXTRA_PARENTS` added."""
        if self.ontology.is_a(child, parent, strict=strict):
            return True
        for node in self.ontology.ancestors(child) | {child}:
            extra = self._extra.get(node)
            if extra is not None and self.ontology.is_a(extra, parent):
                return True
        return False

    def _ancestors(self, term: str) -> frozenset[str]:
        found = set(self.ontology.ancestors(term))
        for node in list(found | {term}):
            extra = self._extra.get(node)
            if extra is not None:
                found |= {extra} | self.ontology.ancestors(extra)
        return frozenset(found)

    def _anchor(self, term: str) -> str:
        """The cell class a true term is graded at, or the term itself: a :data:`CLASS_ANCHORS` class
        it belongs to, or the parent a single marker names it after ("B cell, CD19-positive" is
        graded as a B cell; the CD4 and CD8 co-receptors name subsets, not markers)."""
        ancestors = self.ontology.ancestors(term)
        if term in _ANCHOR_EXCEPTIONS or not ancestors.isdisjoint(_ANCHOR_EXCEPTIONS):
            return term
        for anchor in CLASS_ANCHORS:
            if anchor in ancestors:
                return anchor
        return self.named_parent(term)

    def named_parent(self, term: str) -> str:
        """The parent a single-marker subset term is named after, or the term itself.

        "B cell, CD19-positive" is a B cell and "CD14-positive monocyte" a monocyte: the marker
        defines the class rather than a subtype. The CD4 and CD8 co-receptors do name subsets.
        """
        match = _MARKER_NAMED.match(self.ontology.name(term))
        marker = match and (match.group("marker") or match.group("marker2"))
        if match is not None and marker.upper() not in {"CD4", "CD8"}:
            named = match.group("first") or match.group("last")
            for parent in self.ontology.parents(term):
                if self.ontology.name(parent) == named:
                    return parent
        return term

    def _nouns(self) -> frozenset[str]:
        """One-word names of cell types: term names, exact synonyms and shorthands, normalised."""
        if self._noun_set is None:
            words = set(self._shorthands) | set(self._ambiguous)
            words |= {normalise_label(k) for k in ABBREVIATIONS}
            for term_id in self.ontology:
                term = self.ontology.term(term_id)
                words |= {normalise_label(name) for name in (term.name, *term.exact_synonyms)}
            self._noun_set = frozenset(w for w in words if " " not in w)
        return self._noun_set

    def _gene_symbols(self) -> frozenset[str]:
        if self._symbols is None:
            from ..domain.genes import ensembl_symbol_table

            self._symbols = frozenset(ensembl_symbol_table().astype(str).str.upper())
        return self._symbols

    def _is_marker(self, word: str) -> bool:
        """Whether a word of a label is a marker gene symbol written as one (``S100A6``, ``CD69``)."""
        core = word.rstrip("+-")
        if not _GENE_CASE.match(core):
            return False
        return core in self._gene_symbols() or bool(re.fullmatch(r"CD\d+[A-Z]?", core))

    # ---------------------------------------------------------------- reading labels

    def _t_cell(self, key: str) -> str | None:
        """The term of a T-cell label in normalised form (``"cd8 tem"``, ``"naive cd4+ t"``), or None."""
        words = key.split()
        coreceptor = None
        states: list[str] = []
        t_named = False
        i = 0
        while i < len(words):
            pair = " ".join(words[i:i + 2])
            word = re.sub(r"\d+$", "", words[i]) or words[i]
            if i + 1 < len(words) and pair in _T_STATE_WORDS:
                states.append(_T_STATE_WORDS[pair])
                i += 2
                continue
            if words[i] in _CORECEPTOR:
                coreceptor = coreceptor if coreceptor is not None else _CORECEPTOR[words[i]]
            elif word in _T_STATE_WORDS:
                states.append(_T_STATE_WORDS[word])
                t_named = t_named or word in _T_IMPLYING
            elif words[i] in _T_WORDS:
                t_named = t_named or words[i] in {"t", "lymphocyte"}
            else:
                return None
            i += 1
        states = [s for s in dict.fromkeys(states) if s]
        subsets = [s for s in states if s in _T_SUBSETS]
        if subsets:  # "activated cytotoxic T cells": the subset decides, activation is a state
            states = subsets[:1]
        if coreceptor is None and not t_named:
            return None
        if coreceptor is None and not states:
            return "CL:0000084" if t_named else None
        if len(states) == 1:
            term = _T_STATES[states[0]][coreceptor if coreceptor is not None else 2]
            if term is not None:
                return term
        if coreceptor is not None:
            return ("CL:0000624", "CL:0000625")[coreceptor]
        return "CL:0000084"

    def _lookup(self, phrase: str) -> tuple[str, ...]:
        """Terms of one phrase, whole: shorthands, ambiguous shorthands, T-cell labels, the ontology."""
        key = normalise_label(phrase)
        if not key:
            return ()
        if key in self._ambiguous:
            return self._ambiguous[key]
        if key in self._shorthands:
            return (self._shorthands[key],)
        stem = re.sub(r"\s+cell$", "", key)
        if stem != key and stem in self._shorthands:
            return (self._shorthands[stem],)
        term = self._t_cell(key)
        if term is None:
            term = self.ontology.lookup(phrase)
        if term is None or term in _TOO_GENERAL:
            return ()
        return (term,)

    def _terms(self, text: str) -> tuple[tuple[str, ...], bool]:
        """``(terms, partial)`` of a label without malignancy words: the whole label, then its longest
        known part. ``partial``: a word that may narrow the cell type down (an organ, a place) was
        dropped to find it ("gastric epithelial cells" is some epithelial cell, not any)."""
        text = _GLUED_CD.sub(" ", text)
        text = re.sub(r"\b(\w+)[\s-]+like(?:\s+cells?)?$", r"\1", text, flags=re.IGNORECASE)
        text = _TRAILING_NUMBER.sub("", text).strip() or text
        found = self._lookup(text)
        if found:
            return found, False
        if "/" in text:  # "Mono/Macro": either cell type
            parts = [self._terms(part) for part in text.split("/") if part.strip()]
            if len(parts) > 1 and all(terms for terms, _ in parts):
                return tuple(dict.fromkeys(t for terms, _ in parts for t in terms)), any(p for _, p in parts)
        words = [w for w in re.split(r"[\s_/]+", text) if w]
        # marker genes named after a cell type ("Acinar S100A6", "CD4 CD69"): the named parent
        named = list(words)
        while len(named) > 1 and self._is_marker(named[-1]):
            named.pop()
            found = self._lookup(" ".join(named))
            if found:
                return found, False
        words = [re.sub(r"\d+$", "", w) if re.search(r"[a-z]{2,}\d+$", w, re.IGNORECASE) and not
                 re.fullmatch(r"(?:cdc|th|m|at|cd)\d+", w, re.IGNORECASE) else w for w in words]
        if len(words) > 12:
            return (), False
        n = len(words)
        for size in range(n, 1, -1):
            for start in range(n - size, -1, -1):
                part = words[start:start + size]
                if all(w.casefold() in _FILLER for w in part):
                    continue
                found = self._lookup(" ".join(part))
                if found:
                    return found, self._narrows(words[:start] + words[start + size:])
        # single words: cell type nouns first ("Macrophage" in "Macrophage_M_1", not "M" for M cell)
        singles = [
            w for w in reversed(words)
            if (len(w) > 1 or w in {"B", "T"}) and w.casefold() not in _FILLER and w.casefold() not in _GREEK_WORDS
            and not self._is_marker(w)
        ]
        nouns = self._nouns()
        for word in sorted(singles, key=lambda w: normalise_label(w) not in nouns):
            found = self._lookup(word)
            if found:
                return found, self._narrows([w for w in words if w is not word])
        markers = [self._markers.get(w.rstrip("+").upper()) for w in words]
        found_markers = {m for m in markers if m is not None and m in self.ontology}
        return (tuple(found_markers), False) if len(found_markers) == 1 else ((), False)

    def _narrows(self, dropped: Sequence[str]) -> bool:
        """Whether dropped words may name a narrower cell type (not states, fillers, markers, numbers)."""
        for word in dropped:
            for token in re.split(r"[\W_]+", word.casefold()):
                if token and not token.isdigit() and token not in _FILLER and token not in _STATE_WORDS \
                        and not self._is_marker(word.upper()):
                    return True
        return False

    def _read(self, label: str) -> LabelReading:
        text = _clean(str(label))
        if normalise_label(text) in _NOTHING:
            return LabelReading(text=text)
        details = [a or b for a, b in _PAREN.findall(text)]
        main = _clean(_PAREN.sub(" ", text)) or text
        malignant = False
        origin: tuple[str, ...] = ()
        terms: tuple[str, ...] = ()
        partial = False
        for part in [main, *details]:
            hit = _MALIGNANT.search(part)
            rest = part
            if hit is not None:
                malignant = True
                for pattern, term in _MALIGNANT_ORIGIN:
                    if not origin and pattern.search(part) and term in self.ontology:
                        origin = (term,)
                rest = _clean(_MALIGNANT.sub(" ", part))
            terms, partial = self._terms(rest) if rest else ((), False)
            if terms:
                break
        if not terms:
            terms, partial = (origin if malignant else ()), False
        return LabelReading(text=text, terms=terms, malignant=malignant, partial=partial)

    def read_prediction(self, prediction: Any) -> tuple[LabelReading, ...]:
        """The alternatives of a decoded prediction, each read (empty when nothing can be decoded)."""
        decoded = decode_prediction(prediction)
        if decoded is None:
            return ()
        return tuple(self.read(part) for part in dict.fromkeys(split_alternatives(decoded)))

    # ---------------------------------------------------------------- grading

    def _grade_terms(self, truth: str, pred: str) -> tuple[float, str]:
        anchor = self._anchor(truth)
        t_lineage, p_lineage = self.lineage(truth), self.lineage(pred)
        # a subtype that annotators count as a lineage of its own (microglia for a macrophage, a
        # dendritic cell for a mononuclear phagocyte) is no subtype for grading
        split_off = (
            t_lineage is not None and p_lineage is not None and t_lineage != p_lineage
            and t_lineage not in COMPARTMENTS
        )
        if pred == anchor or (self.is_a(pred, anchor) and not split_off):
            return 1.0, "same cell type or a subtype of it"
        if t_lineage is not None and t_lineage == p_lineage and t_lineage not in COMPARTMENTS:
            return 0.5, f"same major lineage ({t_lineage})"
        if self.is_a(truth, pred, strict=True):
            return 0.5, "a broader class that contains the truth"
        if (
            t_lineage is not None
            and p_lineage is not None
            and BRANCHES.get(t_lineage) is not None
            and BRANCHES.get(t_lineage) == BRANCHES.get(p_lineage)
        ):
            return (0.25 if self.single_branch else 0.0), f"another lineage of the {BRANCHES[t_lineage]} branch"
        return 0.0, "unrelated cell types"

    def _grade_one(self, truth: LabelReading, pred: LabelReading) -> tuple[float, str, bool]:
        """``(score, rule, broader)`` for one alternative; ``broader`` marks a broader-class answer."""
        if not pred.known:
            if normalise_label(pred.text) and normalise_label(pred.text) == normalise_label(truth.text):
                return 1.0, "same label", False
            return 0.0, "the prediction names no cell type the grader knows", False
        if normalise_label(pred.text) == normalise_label(truth.text):
            return 1.0, "same label", False
        if truth.malignant:
            if pred.malignant:
                return 1.0, "both malignant", False
            for t in truth.terms:
                for p in pred.terms:
                    if p == t or self.is_a(p, t) or (
                        self.lineage(t) is not None and self.lineage(t) == self.lineage(p)
                    ):
                        return 0.5, "the non-malignant cell of origin of a malignant truth", False
            return 0.0, "a non-malignant cell for a malignant truth", False
        if not truth.terms:
            return 0.0, "the truth names no cell type the grader knows", False
        best = (0.0, "no cell type of origin" if pred.malignant else "unrelated cell types", False)
        for t in truth.terms:
            for p in pred.terms:
                score, rule = self._grade_terms(t, p)
                broader = rule.startswith("a broader")
                if pred.malignant and broader:
                    # a cancer of a broad class ("myeloid leukaemia") names no cell type of it
                    score, rule = 0.0, "a malignancy of a broad class"
                elif pred.partial and broader:
                    # "gastric epithelial cells" for an acinar cell: some other epithelial cell
                    score, rule = 0.0, "another cell type of a broader class"
                if score > best[0]:
                    best = (score, rule, broader)
        return best

    def _explain(self, truth: Any, prediction: Any) -> Grade:
        t = self.read(str(truth))
        alternatives = self.read_prediction(prediction)
        if not alternatives:
            return Grade(0.0, "no label could be decoded from the prediction", t, ())
        graded = [self._grade_one(t, p) for p in alternatives]
        if len(graded) == 1:
            score, rule, _ = graded[0]
            return Grade(score, rule, t, alternatives)
        best = max(graded, key=lambda g: g[0])
        if best[0] == 0.0:
            return Grade(0.0, f"hedged: {best[1]}", t, alternatives)
        if all(g[0] >= 0.5 for g in graded):
            if any(g[2] for g in graded) and best[0] > 0.5:
                return Grade(0.5, "hedged between the right type and a broader class", t, alternatives)
            return Grade(best[0], f"hedged within the lineage: {best[1]}", t, alternatives)
        return Grade(0.25, "hedged between a right and a wrong cell type", t, alternatives)

    def grade(self, truth: Any, prediction: Any) -> float:
        """The grade of one pair (see :meth:`explain` for why)."""
        return self.explain(truth, prediction).score

    def grade_many(self, truths: Iterable[Any], predictions: Iterable[Any]) -> np.ndarray:
        """Grades of pairs, one per element (``NaN`` where the truth is missing; a missing prediction
        is incorrect). Each distinct pair is graded once."""
        truths = pd.Series(list(truths), dtype=object)
        predictions = pd.Series(list(predictions), dtype=object)
        if len(truths) != len(predictions):
            raise ValueError(
                f"{len(truths)} true labels but {len(predictions)} predictions; pass one prediction per "
                "true label"
            )
        out = np.full(len(truths), np.nan)
        missing_truth = truths.isna().to_numpy()
        pairs = pd.DataFrame({"t": truths.astype(str), "p": predictions.where(predictions.notna(), None)})
        codes, uniques = pd.factorize(pd.MultiIndex.from_frame(pairs.astype({"p": object}).fillna({"p": ""})))
        scores = np.array([self.grade(t, p if p != "" else None) for t, p in uniques], dtype=float)
        out[:] = scores[codes]
        out[missing_truth] = np.nan
        return out


@functools.cache
def get_grader() -> Grader:
    """A shared :class:`Grader` on the vendored Cell Ontology (cached; its caches fill as it is used)."""
    return Grader()


def grade(truth: Any, prediction: Any) -> float:
    """The grade of one (truth, prediction) pair with the shared grader: 1, 0.5, 0.25 or 0."""
    return get_grader().grade(truth, prediction)


def grade_labels(truths: Iterable[Any], predictions: Iterable[Any]) -> np.ndarray:
    """Grades of (truth, prediction) pairs with the shared grader (``NaN`` where the truth is missing)."""
    return get_grader().grade_many(truths, predictions)


def grade_name(score: float) -> str:
    """CellReasoner's name of a grade (``0.5`` -> ``"Major correct"``)."""
    try:
        return GRADE_NAMES[float(score)]
    except KeyError:
        raise ValueError(f"{score!r} is not a grade; grades are {list(GRADE_SCALE)}") from None


# ------------------------------------------------------------------------------------ agreement


def quadratic_kappa(reference: Sequence[float], predicted: Sequence[float],
                    scale: Sequence[float] = GRADE_SCALE) -> float:
    """Cohen's kappa with quadratic weights between two gradings on an ordered scale."""
    confusion = _confusion(reference, predicted, scale).to_numpy(dtype=float)
    n = confusion.sum()
    if n == 0:
        return float("nan")
    k = len(scale)
    idx = np.arange(k)
    weights = (idx[:, None] - idx[None, :]) ** 2 / (k - 1) ** 2
    expected = np.outer(confusion.sum(axis=1), confusion.sum(axis=0)) / n
    denominator = (weights * expected).sum()
    if denominator == 0:
        return 1.0 if (weights * confusion).sum() == 0 else 0.0
    return float(1.0 - (weights * confusion).sum() / denominator)


def _confusion(reference: Sequence[float], predicted: Sequence[float], scale: Sequence[float]) -> pd.DataFrame:
    ref = np.asarray(reference, dtype=float)
    pred = np.asarray(predicted, dtype=float)
    if ref.shape != pred.shape:
        raise ValueError(f"{ref.size} reference grades but {pred.size} predicted grades; pass one of each per pair")
    values = np.asarray(scale, dtype=float)
    ri = np.searchsorted(values, ref)
    pi = np.searchsorted(values, pred)
    bad = (ri >= len(values)) | (pi >= len(values))
    bad |= ~np.isclose(values[np.minimum(ri, len(values) - 1)], ref)
    bad |= ~np.isclose(values[np.minimum(pi, len(values) - 1)], pred)
    if bad.any():
        raise ValueError(f"grades must be one of {list(scale)}; found {sorted(set(ref[bad]) | set(pred[bad]))[:5]}")
    matrix = np.zeros((len(values), len(values)), dtype=int)
    np.add.at(matrix, (ri, pi), 1)
    labels = [f"{v:g}" for v in values]
    return pd.DataFrame(matrix, index=pd.Index(labels, name="reference"), columns=pd.Index(labels, name="grader"))


@attrs.frozen
class GradeAgreement:
    """How well one grading agrees with a reference grading of the same pairs.

    ``confusion``: counts, reference grades as rows and graded ones as columns, lowest grade first.
    ``recall``: per reference grade, the share the grader gave the same grade.
    """

    n: int
    agreement: float
    kappa: float
    recall: Mapping[str, float]
    confusion: pd.DataFrame = attrs.field(eq=False)

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "agreement": self.agreement, "kappa": self.kappa, "recall": dict(self.recall),
                "confusion": self.confusion.to_dict()}


def compare_grades(reference: Sequence[float], predicted: Sequence[float],
                   scale: Sequence[float] = GRADE_SCALE) -> GradeAgreement:
    """Exact agreement, quadratic-weighted kappa, per-grade recall and the confusion of two gradings."""
    confusion = _confusion(reference, predicted, scale)
    matrix = confusion.to_numpy()
    n = int(matrix.sum())
    rows = matrix.sum(axis=1)
    recall = {label: (float(matrix[i, i] / rows[i]) if rows[i] else float("nan"))
              for i, label in enumerate(confusion.index)}
    return GradeAgreement(
        n=n,
        agreement=float(np.trace(matrix) / n) if n else float("nan"),
        kappa=quadratic_kappa(reference, predicted, scale),
        recall=recall,
        confusion=confusion,
    )
