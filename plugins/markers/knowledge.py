"""Marker knowledge: which genes mark which cell types, as a sparse cell types x genes weight matrix.

Two vendored layers (see ``data/PROVENANCE.md``), combined by :func:`load_knowledge`:

1. ``panglaodb_human_v1.tsv.gz``: the human rows of PanglaoDB (27 Mar 2020), 178 cell types named after
   their Cell Ontology terms, each marker weighted from PanglaoDB's sensitivity, specificity, canonical
   flag and ubiquitousness (built by ``scripts/build_marker_table.py``);
2. ``canonical_markers_v3.tsv``: a small hand-written layer of textbook markers, each row with its
   citation, for the distinctions PanglaoDB cannot make (CD4 vs CD8 T cells, naive vs memory, NK vs T,
   classical vs non-classical monocytes, ...). Negative weights mark genes expected to be *absent*.

Layers combine per cell type (the same Cell Ontology id, or the same name when a type has no id): a
later layer's row replaces an earlier row for the same type and gene, and adds the genes the earlier
layers lack. Order: PanglaoDB, then the canonical layer, then user tables in the order given. A type
keeps the name and id of the first layer that has it.

Marker scorers must also discount genes that top every expression ranking; :attr:`MarkerKnowledge.
ubiquitous` and :meth:`MarkerKnowledge.is_ubiquitous` say which (see :data:`HOUSEKEEPING_GENES`,
:data:`UBIQUITOUS_PATTERN`, :data:`UBIQUITOUSNESS_THRESHOLD`), and they include the cell-cycle genes
(:data:`CELL_CYCLE_GENES`), which mark a state, not a type.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import re
import time
from collections.abc import Iterable, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Union

import attrs
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellscribe.core.domain.ontology import get_ontology

log = logging.getLogger(__name__)

__all__ = [
    "PANGLAO_TABLE",
    "CANONICAL_TABLE",
    "PANGLAO_SOURCE",
    "UBIQUITOUSNESS_THRESHOLD",
    "HOUSEKEEPING_GENES",
    "CELL_CYCLE_GENES",
    "UBIQUITOUS_PATTERN",
    "RESIDENT_ORGANS",
    "TISSUE_RESIDENTS",
    "TISSUE_ABSENT_TYPES",
    "tissue_key",
    "tissue_organs",
    "TISSUE_ALIASES",
    "COMMITTED_PROGENITORS",
    "STEM_PROGRAM_TYPES",
    "HEMATOPOIETIC_PRECURSOR",
    "MarkerKnowledge",
    "load_knowledge",
    "read_marker_table",
    "combine_layers",
    "default_ubiquitous_genes",
]

#: The vendored PanglaoDB layer (``data/``), version 1.
PANGLAO_TABLE = "panglaodb_human_v1.tsv.gz"
#: The vendored hand-written layer (``data/``), version 1.
CANONICAL_TABLE = "canonical_markers_v3.tsv"
#: ``source`` of every PanglaoDB row.
PANGLAO_SOURCE = "PanglaoDB 27 Mar 2020"

#: PanglaoDB genes whose ``ubiquitousness index`` (the fraction of all PanglaoDB cell clusters that
#: express them) is at least this are treated as ubiquitous: 57 genes such as ITM2B (0.85), PFN1,
#: CD81, VIM (0.43), FOS, JUNB. NCAM1 (0.35) is above it but is a canonical NK marker, hence exempt
#: (see :func:`default_ubiquitous_genes`).
UBIQUITOUSNESS_THRESHOLD = 0.3

#: Genes that dominate the top of raw-count expression rankings in nearly every cell (measured on PBMC
#: and pancreas data) although PanglaoDB rates several of them low (HLA-A 0.13, FTL 0.18) or not at all.
HOUSEKEEPING_GENES: frozenset[str] = frozenset(
    {
        "MALAT1", "NEAT1", "ACTB", "ACTG1", "B2M", "TMSB4X", "TMSB10", "FTL", "FTH1", "TPT1", "PTMA",
        "GAPDH", "EEF1A1", "EEF1B2", "EEF1D", "EEF1G", "EEF2", "FAU", "UBA52", "UBB", "UBC", "MYL6",
        "PFN1", "CFL1", "OAZ1", "NACA",
        "HLA-A", "HLA-B", "HLA-C", "HLA-E", "HLA-F",  # HLA class I: on every nucleated cell
    }
)  # fmt: skip

#: The cell-cycle genes of Tirosh et al. 2016 (Science 352:189; S phase, then G2/M; with the current
#: symbols of MLF1IP, FAM64A and HN1): proliferation is a state that cells of every type pass through,
#: not a type, yet PanglaoDB lists some of these genes for a few types (11 for gamma-delta T cells,
#: from a cycling cluster). They are no evidence for a type: a dividing erythroblast, progenitor or
#: plasmablast opens or expresses them as well.
CELL_CYCLE_GENES: frozenset[str] = frozenset(
    """
    MCM5 PCNA TYMS FEN1 MCM2 MCM4 RRM1 UNG GINS2 MCM6 CDCA7 DTL PRIM1 UHRF1 MLF1IP CENPU HELLS RFC2 RPA2
    NASP RAD51AP1 GMNN WDR76 SLBP CCNE2 UBR7 POLD3 MSH2 ATAD2 RAD51 RRM2 CDC45 CDC6 EXO1 TIPIN DSCC1 BLM
    CASP8AP2 USP1 CLSPN POLA1 CHAF1B BRIP1 E2F8
    HMGB2 CDK1 NUSAP1 UBE2C BIRC5 TPX2 TOP2A NDC80 CKS2 NUF2 CKS1B MKI67 TMPO CENPF TACC3 FAM64A PIMREG
    SMC4 CCNB2 CKAP2L CKAP2 AURKB BUB1 KIF11 ANP32E TUBB4B GTSE1 KIF20B HJURP CDCA3 HN1 JPT1 CDC20 TTK
    CDC25C KIF2C RANGAP1 NCAPD2 DLGAP5 CDCA2 CDCA8 ECT2 KIF23 HMMR AURKA PSRC1 ANLN LBR CKAP5 CENPE CTCF
    NEK2 G2E3 GAS2L3 CBX5 CENPA
    """.split()
)

#: Gene names that are always ubiquitous: cytosolic ribosomal proteins and their pseudogenes
#: (``RPL13``, ``RPS4X``, ``RPLP0``, ``RPSA``, ``RPL13AP5``; not ``RPS6KA1``), mitochondrially
#: encoded genes (``MT-CO1``) and the nuclear ``MT-RNR2``-like pseudogenes (``MTRNR2L12``).
UBIQUITOUS_PATTERN = r"^(?:RP[LS](?:P?\d+|A)(?:[AXY]\d*)?(?:L\d*)?(?:P\d+)?|MT-.+|MTRNR2L\d+)$"

#: PanglaoDB organs whose cell types live in every tissue: kept by :meth:`MarkerKnowledge.restrict`
#: with ``tissue=...`` unless ``resident=False``.
RESIDENT_ORGANS: tuple[str, ...] = ("Immune system", "Blood", "Vasculature", "Connective tissue")

#: Tissues whose resident cells are not those of :data:`RESIDENT_ORGANS`: blood holds hematopoietic
#: cells only (no vessel wall, no connective tissue), so with ``tissue="blood"`` an endothelial cell,
#: a pericyte or an adipocyte is not an answer. Other tissues keep all resident organs.
TISSUE_RESIDENTS: dict[str, tuple[str, ...]] = {
    "blood": ("Immune system", "Blood"),
    "peripheral blood": ("Immune system", "Blood"),
    "pbmc": ("Immune system", "Blood"),
    "cord blood": ("Immune system", "Blood"),
}

#: Types of the resident or recorded organs a tissue does not hold: bone marrow (an aspirate, BMMCs) is
#: the soft tissue inside bone, without cartilage or the cells walled into mineralised bone, so
#: chondrocytes and osteocytes are not its answers (with ``tissue="bone marrow"`` the Schep 2017
#: erythroblasts were called chondrocytes, 37 of 50).
TISSUE_ABSENT_TYPES: dict[str, tuple[str, ...]] = {
    "bone marrow": ("chondrocyte", "osteocyte"),
}

#: Types of the resident organs that belong to some sites only: with ``tissue=...`` (or a context the
#: run infers) they are kept only for these tissues, so pancreas macrophages are not called splenic
#: ones. Chondrocytes are recorded under connective tissue, which every tissue holds, but cartilage is
#: not everywhere: it lines joints and the growth plate, and shapes the airways, nose and ear. Without
#: this rule a context inferred as brain and immune system made them answers for erythroblasts (1,092
#: of 1,200 in a 14,400-cell run sampled from the Schep 2017 populations, no tissue given).
SITE_SPECIFIC_TYPES: dict[str, tuple[str, ...]] = {
    "splenic red pulp macrophage": ("spleen",),
    "brain microvascular endothelial cell": ("brain",),
    "aortic endothelial cell": ("heart", "vasculature"),
    "chondrocyte": ("cartilage", "bone", "skeletal system", "knee", "rib", "skull", "lungs", "nose", "trachea"),
}

#: Hematopoietic lineages (the Cell Ontology lineage names of
#: :data:`~cellscribe.core.domain.ontology.LINEAGES`) -> the committed progenitor (Cell Ontology id)
#: each passes through in the classical hierarchy: lymphocytes from the common lymphoid progenitor
#: (Kondo et al. 1997 Cell), erythroid and megakaryocytic cells from the megakaryocyte-erythroid
#: progenitor, monocytes, macrophages and granulocytes from the granulocyte-monocyte progenitor
#: (Akashi et al. 2000 Nature), mast cells and dendritic cells (which both branches give; Manz et al.
#: 2001 Blood) from the common myeloid progenitor. Used for lineage priming in chromatin data (see the
#: backend's "Lineage priming").
COMMITTED_PROGENITORS: dict[str, str] = {
    "B cell": "CL:0000051",
    "T cell": "CL:0000051",
    "NK cell": "CL:0000051",
    "innate lymphoid cell": "CL:0000051",
    "erythroid": "CL:0000050",
    "megakaryocyte/platelet": "CL:0000050",
    "monocyte": "CL:0000557",
    "macrophage": "CL:0000557",
    "granulocyte": "CL:0000557",
    "mast cell": "CL:0000049",
    "dendritic cell": "CL:0000049",
}

#: The uncommitted stem program: hematopoietic stem cells and multipotent progenitors.
STEM_PROGRAM_TYPES: tuple[str, ...] = ("CL:0000037", "CL:0000837")

#: Hematopoietic precursor cell: its subtypes (erythroid and megakaryocyte progenitors, pro-B cells,
#: myeloblasts) are progenitors already, and lineage priming leaves their calls as they are.
HEMATOPOIETIC_PRECURSOR = "CL:0008001"

#: Common tissue names -> the PanglaoDB organs they cover (other names are matched to organ names
#: directly, ignoring case and a plural "s": ``"lung"`` is ``"Lungs"``).
TISSUE_ALIASES: dict[str, tuple[str, ...]] = {
    "blood": ("Blood", "Immune system"),
    "peripheral blood": ("Blood", "Immune system"),
    "pbmc": ("Blood", "Immune system"),
    "cord blood": ("Blood", "Immune system"),
    "bone marrow": ("Bone", "Blood", "Immune system"),
    "spleen": ("Immune system", "Blood"),
    "islet": ("Pancreas",),
    "intestine": ("GI tract",),
    "gut": ("GI tract",),
    "colon": ("GI tract",),
    "small intestine": ("GI tract",),
    "stomach": ("GI tract",),
    "muscle": ("Skeletal muscle", "Smooth muscle"),
    "nervous system": ("Brain",),
    # CELLxGENE's general tissues (the UBERON labels cellscribe.core.domain.tissues gives for obs
    # columns) that are not PanglaoDB organ names; those that name no organ the knowledge records
    # (abdomen, axilla, mucosa, exocrine gland, ...) are left out: a run infers a context for them.
    "lymph node": ("Immune system", "Blood"),
    "hematopoietic system": ("Blood", "Immune system", "Bone"),
    "spinal cord": ("Brain",),
    "central nervous system": ("Brain",),
    "peripheral nervous system": ("Brain",),
    "ganglionic eminence": ("Brain",),
    "breast": ("Mammary gland",),
    "skin of body": ("Skin",),
    "zone of skin": ("Skin",),
    "skin of abdomen": ("Skin",),
    "skin of chest": ("Skin",),
    "skin of leg": ("Skin",),
    "esophagus": ("GI tract",),
    "large intestine": ("GI tract",),
    "digestive system": ("GI tract", "Liver", "Pancreas", "Oral cavity"),
    "lamina propria": ("GI tract",),
    "gallbladder": ("Liver", "GI tract"),
    "saliva": ("Oral cavity",),
    "tongue": ("Oral cavity",),
    "adipose tissue": ("Connective tissue",),
    "brown adipose tissue": ("Connective tissue",),
    "subcutaneous adipose tissue": ("Connective tissue",),
    "mesenteric fat pad": ("Connective tissue",),
    "omentum": ("Connective tissue",),
    "testis": ("Reproductive",),
    "prostate gland": ("Reproductive",),
    "fallopian tube": ("Reproductive",),
    "uterus": ("Reproductive",),
    "ovary": ("Reproductive",),
    "reproductive system": ("Reproductive",),
    "urethra": ("Urinary bladder",),
    "ureter": ("Urinary bladder",),
    "bladder organ": ("Urinary bladder",),
    "renal system": ("Kidney", "Urinary bladder"),
    "chorionic villus": ("Placenta",),
    "adrenal gland": ("Adrenal glands",),
    "thyroid gland": ("Thyroid",),
    "endocrine gland": ("Adrenal glands", "Thyroid", "Parathyroid glands", "Pancreas"),
    "endocrine system": ("Adrenal glands", "Thyroid", "Parathyroid glands", "Pancreas"),
    "musculature": ("Skeletal muscle", "Smooth muscle"),
    "musculature of body": ("Skeletal muscle", "Smooth muscle"),
    "nose": ("Lungs", "Olfactory system"),
    "respiratory system": ("Lungs",),
    "pleura": ("Lungs", "Epithelium"),
    "sensory system": ("Eye", "Olfactory system"),
    "vasculature": ("Vasculature",),
    "blood vasculature": ("Vasculature",),
    "lymph vasculature": ("Vasculature",),
    "circulatory system": ("Vasculature", "Heart"),
    "cardiovascular system": ("Vasculature", "Heart"),
    "skeletal system": ("Bone",),
    "rib": ("Bone",),
    "skull": ("Bone",),
    "knee": ("Bone",),
    "cartilage": ("Connective tissue", "Bone"),
    "trachea": ("Lungs",),
}

_ROW_COLUMNS = ("cell_type", "cl_id", "gene", "weight", "tissue", "source")
# Column name (lower case, no spaces, "_" or "-") -> canonical column, for user tables.
_COLUMN_ALIASES = {
    "celltype": "cell_type",
    "gene": "gene",
    "genes": "gene",
    "genesymbol": "gene",
    "symbol": "gene",
    "marker": "gene",
    "weight": "weight",
    "tissue": "tissue",
    "organ": "tissue",
    "clid": "cl_id",
    "cellontologyid": "cl_id",
    "source": "source",
}
_UBIQUITOUS_RE = re.compile(UBIQUITOUS_PATTERN)

TableLike = Union[str, PathLike, pd.DataFrame]


# ------------------------------------------------------------------------------------------ tables


def _data_file(name: str):
    return importlib.resources.files(__package__).joinpath("data").joinpath(name)


@functools.cache
def _panglao_table() -> pd.DataFrame:
    """The vendored PanglaoDB table as written by the build script (cached; treat as read-only)."""
    with _data_file(PANGLAO_TABLE).open("rb") as fh:
        table = pd.read_csv(
            fh,
            sep="\t",
            compression="gzip",
            dtype={"cell_type": str, "cl_id": str, "panglao_name": str, "organ": str, "gene": str},
            keep_default_na=False,
            na_values={"sensitivity": [""], "specificity": [""], "ubiquitousness": [""]},
        )
    return table


@functools.cache
def _canonical_rows() -> pd.DataFrame:
    """The vendored hand-written layer as knowledge rows (cached; treat as read-only)."""
    with _data_file(CANONICAL_TABLE).open("rb") as fh:
        table = pd.read_csv(fh, sep="\t", dtype=str, keep_default_na=False)
    return read_marker_table(table, name=CANONICAL_TABLE)


def _panglao_rows() -> pd.DataFrame:
    table = _panglao_table()
    return pd.DataFrame(
        {
            "cell_type": table["cell_type"],
            "cl_id": table["cl_id"],
            "gene": table["gene"],
            "weight": table["weight"].astype(np.float64),
            "tissue": table["organ"],
            "source": PANGLAO_SOURCE,
        }
    )


def _normalise_column(name: Any) -> str:
    return re.sub(r"[\s_\-]", "", str(name)).casefold()


def read_marker_table(table: TableLike, *, name: str | None = None) -> pd.DataFrame:
    """Read a marker table into knowledge rows (``cell_type, cl_id, gene, weight, tissue, source``).

    ``table`` is a CSV/TSV path (tab-separated when the name ends in ``.tsv``, ``.tab`` or ``.txt``,
    optionally ``.gz``; comma-separated otherwise) or a DataFrame. Column names are matched ignoring
    case, spaces, ``_`` and ``-``:

    - ``cell type`` (required): the cell type label;
    - ``gene`` (required; also ``gene symbol``, ``symbol``, ``marker``): the gene symbol, as it appears
      in cell sentences;
    - ``weight`` (optional, default 1): positive for a marker, negative for a gene expected absent;
    - ``tissue`` or ``organ`` (optional): used by :meth:`MarkerKnowledge.restrict`;
    - ``cl_id`` (optional): the Cell Ontology id; when absent or empty it is looked up from the cell
      type with :meth:`cellscribe.core.domain.ontology.CellOntology.lookup` (empty when nothing matches);
    - ``source`` (optional, default ``"user table <name>"``).

    Rows whose cell type and gene are both empty are skipped; a gene listed twice for a type keeps its
    last row.

    Raises
    ------
    ValueError
        When a required column is missing (the message names it and lists the columns found), a row has
        a cell type but no gene or the reverse, a weight is not a number, or a ``cl_id`` is not a
        current Cell Ontology id.
    """
    if isinstance(table, pd.DataFrame):
        name = name or "DataFrame"
        frame = table.astype(object).where(table.notna(), "")
    else:
        path = Path(table)
        name = name or path.name
        suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
        sep = "\t" if suffixes and suffixes[-1] in (".tsv", ".tab", ".txt") else ","
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, compression="infer")
    renamed: dict[Any, str] = {}
    for column in frame.columns:
        canonical = _COLUMN_ALIASES.get(_normalise_column(column))
        if canonical is not None and canonical not in renamed.values():
            renamed[column] = canonical
    required = (("cell type", "cell_type"), ("gene", "gene"))
    missing = [label for label, column in required if column not in renamed.values()]
    if missing:
        found = ", ".join(repr(str(c)) for c in frame.columns) or "none"
        raise ValueError(
            f"marker table {name} lacks the column(s) {', '.join(repr(m) for m in missing)} (its columns: "
            f"{found}). A marker table needs a 'cell type' and a 'gene' column, one row per marker, and "
            "may have 'weight' (default 1, negative = expected absent), 'tissue', 'cl_id' and 'source'."
        )
    frame = frame.rename(columns=renamed)
    rows = pd.DataFrame({column: frame[column].astype(str).str.strip() for column in renamed.values()})
    has_type, has_gene = rows["cell_type"] != "", rows["gene"] != ""
    rows = rows[has_type | has_gene]
    incomplete = rows.index[(rows["cell_type"] == "") | (rows["gene"] == "")]
    if len(incomplete):
        raise ValueError(
            f"marker table {name}: rows {list(incomplete[:5])} have a cell type without a gene or a gene "
            "without a cell type; fill in both or delete those rows"
        )
    if "weight" in rows:
        text = rows["weight"].replace("", "1")
        weight = pd.to_numeric(text, errors="coerce")
        bad = weight.isna() | ~np.isfinite(weight.to_numpy(dtype=float, na_value=np.nan))
        if bad.any():
            examples = text[bad].head(5).tolist()
            raise ValueError(
                f"marker table {name}: weights {examples} are not numbers; use a number (e.g. 1 for a "
                "marker, -1 for a gene expected absent) or leave the weight column out"
            )
        rows["weight"] = weight.astype(np.float64)
    else:
        rows["weight"] = 1.0
    rows["tissue"] = rows["tissue"] if "tissue" in rows else ""
    if "source" not in rows:
        rows["source"] = f"user table {name}"
    rows["source"] = rows["source"].where(rows["source"] != "", f"user table {name}")
    rows["cl_id"] = _resolve_cl_ids(rows, name)
    rows = rows.drop_duplicates(["cell_type", "gene"], keep="last")
    return rows.loc[:, list(_ROW_COLUMNS)].reset_index(drop=True)


def _resolve_cl_ids(rows: pd.DataFrame, name: str) -> pd.Series:
    """Each row's current Cell Ontology id: the given one resolved, else a look-up of the cell type.

    Each distinct (cell type, given id) pair is resolved once.
    """
    given = rows["cl_id"] if "cl_id" in rows else pd.Series("", index=rows.index, dtype=object)
    pairs = pd.MultiIndex.from_arrays([rows["cell_type"], given])
    distinct = pairs.unique()
    if len(distinct) == 0:
        return pd.Series("", index=rows.index, dtype=object)
    ontology = get_ontology()
    resolved = []
    for cell_type, cl_id in distinct:
        if cl_id:
            found = ontology.resolve(cl_id)
            if found is None:
                raise ValueError(
                    f"marker table {name}: cl_id {cl_id!r} of {cell_type!r} is not a current Cell "
                    "Ontology id; correct it (format 'CL:0000000') or leave it empty to look it up"
                )
        else:
            found = ontology.lookup(cell_type) or ""
        resolved.append(found)
    ids = np.asarray(resolved, dtype=object)[distinct.get_indexer(pairs)]
    return pd.Series(ids, index=rows.index, dtype=object)


def combine_layers(layers: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Combine knowledge-row tables, earliest first, into one (see the module docstring).

    Rows describe the same cell type when they share a ``cl_id``, or, without one, the same name
    ignoring case (a row without an id also joins a type of the same name that has one). Each type
    takes the name, id and order of its first row; for a type and gene the last layer's row wins.
    """
    if not layers:
        return pd.DataFrame({column: pd.Series(dtype=object) for column in _ROW_COLUMNS})
    rows = pd.concat([layer.loc[:, list(_ROW_COLUMNS)] for layer in layers], ignore_index=True)
    folded = rows["cell_type"].str.casefold()
    with_id = rows["cl_id"] != ""
    id_of_name = pd.Series(rows["cl_id"][with_id].to_numpy(), index=folded[with_id]).groupby(level=0).first()
    key = rows["cl_id"].where(with_id, folded.map(id_of_name))
    key = key.where(key.notna(), "name:" + folded)
    first_name = rows["cell_type"].groupby(key, sort=False).first()
    rows = rows.assign(
        _key=key,
        cell_type=key.map(first_name),
        cl_id=key.where(~key.str.startswith("name:"), ""),
    )
    rows = rows.drop_duplicates(["_key", "gene"], keep="last")
    return rows.loc[:, list(_ROW_COLUMNS)].reset_index(drop=True)


@functools.cache
def default_ubiquitous_genes() -> frozenset[str]:
    """The named ubiquitous genes of the built-in knowledge.

    PanglaoDB genes with ``ubiquitousness >=`` :data:`UBIQUITOUSNESS_THRESHOLD` plus
    :data:`HOUSEKEEPING_GENES` and :data:`CELL_CYCLE_GENES` (which say nothing of a type either), minus
    the genes the canonical layer lists as positive markers (NCAM1).
    Genes matching :data:`UBIQUITOUS_PATTERN` are added per knowledge object.
    """
    table = _panglao_table()
    frequent = set(table.loc[table["ubiquitousness"] >= UBIQUITOUSNESS_THRESHOLD, "gene"])
    canonical = _canonical_rows()
    markers = set(canonical.loc[canonical["weight"] > 0, "gene"])
    return frozenset((frequent | HOUSEKEEPING_GENES | CELL_CYCLE_GENES) - markers)


# ------------------------------------------------------------------------------------------ knowledge


def tissue_key(name: str) -> str:
    """A tissue or organ name as compared: case and ``_`` ignored, spaces collapsed, a plural "s" dropped."""
    key = " ".join(str(name).casefold().replace("_", " ").split())
    return key[:-1] if key.endswith("s") and not key.endswith("ss") else key


def tissue_organs(tissue: str) -> tuple[str, ...]:
    """The organs a tissue name covers: its :data:`TISSUE_ALIASES` entry, else the name itself (an
    organ name, compared ignoring case and a plural "s")."""
    aliases = {tissue_key(alias): organs for alias, organs in TISSUE_ALIASES.items()}
    return tuple(aliases.get(tissue_key(tissue), (tissue,)))


@attrs.frozen(eq=False, repr=False)
class MarkerKnowledge:
    """Marker genes of cell types as a sparse cell types x genes weight matrix.

    Build it with :func:`load_knowledge`, :meth:`from_csv` or :meth:`from_rows`.

    Attributes
    ----------
    cell_types
        One name per matrix row (object array, unique; Cell Ontology names where a term exists).
    cl_ids
        The Cell Ontology id of each row (``""`` where none).
    genes
        One gene symbol per matrix column (object array, sorted, unique).
    weights
        ``scipy.sparse.csr_matrix`` (float32) of shape ``(len(cell_types), len(genes))``: positive for
        a marker, negative for a gene expected absent, no entry for a gene that says nothing.
    sources
        For each row, the distinct sources of its markers (``("PanglaoDB 27 Mar 2020", "Zheng 2017
        Nat Commun PBMC: ...")``).
    tissues
        For each row, the tissues/organs its markers were recorded in (may be empty).
    ubiquitous
        Named genes a scorer should discount (see :meth:`is_ubiquitous`, which also applies
        :data:`UBIQUITOUS_PATTERN`).
    rows
        The long table the matrix was built from: ``cell_type, cl_id, gene, weight, tissue, source``.
    version
        Which tables it was built from (``"panglaodb_human_v1+canonical_markers_v3"``).
    """

    cell_types: np.ndarray
    cl_ids: np.ndarray
    genes: np.ndarray
    weights: sp.csr_matrix
    sources: tuple[tuple[str, ...], ...]
    tissues: tuple[frozenset[str], ...]
    ubiquitous: frozenset[str]
    rows: pd.DataFrame
    version: str = ""

    def __attrs_post_init__(self) -> None:
        shape = (len(self.cell_types), len(self.genes))
        per_type = {len(self.cl_ids), len(self.sources), len(self.tissues)}
        if self.weights.shape != shape or per_type != {shape[0]}:
            raise ValueError(f"weights {self.weights.shape}, cell types and genes {shape} do not agree")

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_rows(
        cls, rows: pd.DataFrame, *, ubiquitous: Iterable[str] = (), version: str = ""
    ) -> MarkerKnowledge:
        """Build from knowledge rows (``cell_type, cl_id, gene, weight, tissue, source``).

        Types are identified by name and sorted case-insensitively; a type's id is its first non-empty
        ``cl_id``; a gene listed twice for a type keeps its last row; rows of weight 0 are dropped.
        Genes of the result matching :data:`UBIQUITOUS_PATTERN` join ``ubiquitous``.
        """
        missing = set(_ROW_COLUMNS) - set(rows.columns)
        if missing:
            raise ValueError(
                f"knowledge rows lack columns {sorted(missing)}; read tables with read_marker_table()"
            )
        rows = rows.loc[:, list(_ROW_COLUMNS)].drop_duplicates(["cell_type", "gene"], keep="last")
        rows = rows[rows["weight"] != 0]
        names = pd.unique(rows["cell_type"])
        cell_types = np.asarray(sorted(names, key=lambda n: (n.casefold(), n)), dtype=object)
        genes = np.asarray(np.sort(pd.unique(rows["gene"]).astype(str)), dtype=object)
        type_codes = pd.Index(cell_types).get_indexer(rows["cell_type"])
        gene_codes = pd.Index(genes).get_indexer(rows["gene"])
        order = np.lexsort((gene_codes, type_codes))
        rows = rows.iloc[order].reset_index(drop=True)
        type_codes, gene_codes = type_codes[order], gene_codes[order]
        weights = sp.csr_matrix(
            (rows["weight"].to_numpy(dtype=np.float32), (type_codes, gene_codes)),
            shape=(len(cell_types), len(genes)),
        )
        with_id = rows[rows["cl_id"] != ""]
        cl_ids = with_id.groupby("cell_type", sort=False)["cl_id"].first().reindex(cell_types).fillna("")
        grouped = rows.groupby("cell_type", sort=False)
        sources = grouped["source"].unique().reindex(cell_types)
        tissues = grouped["tissue"].unique().reindex(cell_types)
        pattern = pd.Series(genes, dtype=object).str.match(_UBIQUITOUS_RE).to_numpy(dtype=bool)
        return cls(
            cell_types=cell_types,
            cl_ids=cl_ids.to_numpy(dtype=object),
            genes=genes,
            weights=weights,
            sources=tuple(tuple(s) for s in sources),
            tissues=tuple(frozenset(t for t in ts if t) for ts in tissues),
            ubiquitous=frozenset(ubiquitous) | frozenset(genes[pattern]),
            rows=rows,
            version=version,
        )

    @classmethod
    def from_csv(cls, path: str | PathLike[str], *, tissue: str | None = None) -> MarkerKnowledge:
        """Knowledge from a user marker table alone (format: :func:`read_marker_table`).

        ``ubiquitous`` is the built-in set (:func:`default_ubiquitous_genes`); ``tissue`` restricts the
        result as :meth:`restrict` does. To add a table to the built-in knowledge instead, use
        ``load_knowledge(extra_tables=[path])``.
        """
        rows = read_marker_table(path)
        if rows.empty:
            raise ValueError(f"marker table {path} has no markers; add rows with a cell type and a gene")
        version = f"user:{Path(path).name}"
        knowledge = cls.from_rows(rows, ubiquitous=default_ubiquitous_genes(), version=version)
        return knowledge.restrict(tissue=tissue) if tissue is not None else knowledge

    # ---------------------------------------------------------------- inspection

    @property
    def shape(self) -> tuple[int, int]:
        """``(number of cell types, number of genes)``."""
        return self.weights.shape

    def __repr__(self) -> str:
        n_types, n_genes = self.shape
        return (
            f"<MarkerKnowledge {n_types:,} cell types x {n_genes:,} genes, {self.weights.nnz:,} weights"
            f"{f' ({self.version})' if self.version else ''}>"
        )

    def gene_index(self, genes: Iterable[str]) -> np.ndarray:
        """The column of each gene in :attr:`weights` (``-1`` for genes the knowledge lacks)."""
        return pd.Index(self.genes).get_indexer(pd.Index(list(genes), dtype=object))

    def is_ubiquitous(self, genes: Iterable[str]) -> np.ndarray:
        """Boolean array: which genes are ubiquitous (:attr:`ubiquitous` or :data:`UBIQUITOUS_PATTERN`)."""
        series = pd.Series(list(genes), dtype=object).astype(str)
        named = series.isin(self.ubiquitous).to_numpy(dtype=bool)
        return named | series.str.match(_UBIQUITOUS_RE).to_numpy(dtype=bool)

    def markers(self, cell_type: str) -> pd.Series:
        """The weights of one cell type (located as :meth:`locate` does), largest first, indexed by gene."""
        row = int(self.locate([cell_type], nearest=False)[0])
        if row < 0:
            raise KeyError(f"{cell_type!r} is not a cell type of this marker knowledge")
        weights = self.weights.getrow(row)
        series = pd.Series(weights.data, index=self.genes[weights.indices], name=self.cell_types[row])
        return series.sort_values(ascending=False, kind="stable")

    # ---------------------------------------------------------------- matching labels

    def locate(self, labels: Iterable[str], *, nearest: bool = True) -> np.ndarray:
        """The row of :attr:`cell_types` that each label names, ``-1`` where none does.

        A label matches a type of the same name (ignoring case), else the type whose ``cl_id`` is the
        label's Cell Ontology id (:meth:`~cellscribe.core.domain.ontology.CellOntology.lookup`, so ``"NK
        cells"``, ``"CD14+ Mono"`` and ``"CL:0000860"`` work). With ``nearest=True`` a label whose term
        has no row takes the row of its most specific is_a ancestor that has one (``"CD14-positive,
        CD16-negative classical monocyte"`` -> *classical monocyte*).
        """
        labels = list(labels)
        by_name = {name.casefold(): i for i, name in enumerate(self.cell_types)}
        by_id = {cl_id: i for i, cl_id in enumerate(self.cl_ids) if cl_id}
        ontology = None
        found: dict[str, int] = {}
        for label in dict.fromkeys(labels):
            row = by_name.get(str(label).strip().casefold(), -1)
            if row < 0:
                ontology = ontology or get_ontology()
                cl_id = ontology.lookup(str(label))
                row = by_id.get(cl_id, -1) if cl_id else -1
                if row < 0 and nearest and cl_id:
                    candidates = [a for a in ontology.ancestors(cl_id) if a in by_id]
                    if candidates:
                        deepest = max(candidates, key=lambda a: (len(ontology.ancestors(a)), a))
                        row = by_id[deepest]
            found[label] = row
        return np.asarray([found[label] for label in labels], dtype=np.int64)

    def restrict(
        self,
        cell_types: str | Iterable[str] | None = None,
        *,
        tissue: str | None = None,
        resident: bool = True,
        nearest: bool = True,
    ) -> MarkerKnowledge:
        """A copy with only some cell types (genes no type uses any more are dropped).

        Parameters
        ----------
        cell_types
            Labels located as :meth:`locate` does; labels that match no type are skipped (logged).
        tissue
            Keep the types recorded in this tissue (PanglaoDB organ names, ignoring case and a plural
            "s", or a :data:`TISSUE_ALIASES` key such as ``"blood"`` or ``"pbmc"``), plus, with
            ``resident=True``, the types of :data:`RESIDENT_ORGANS` (immune, vascular and connective
            cells occur in every tissue; blood, PBMC and cord blood keep only immune and blood cells,
            :data:`TISSUE_RESIDENTS`) except those of :data:`SITE_SPECIFIC_TYPES` named for another
            site.
        nearest
            Passed to :meth:`locate`.

        With both ``cell_types`` and ``tissue``, a type must satisfy both.

        Raises
        ------
        ValueError
            When neither is given, the tissue is unknown (the message lists the known ones), or no type
            is left.
        """
        if cell_types is None and tissue is None:
            raise ValueError("restrict() needs cell_types, a tissue, or both")
        keep = np.ones(len(self.cell_types), dtype=bool)
        if cell_types is not None:
            labels = [cell_types] if isinstance(cell_types, str) else list(cell_types)
            rows = self.locate(labels, nearest=nearest)
            unmatched = [label for label, row in zip(labels, rows) if row < 0]
            if unmatched:
                log.info("no marker knowledge for %d label(s): %s", len(unmatched), unmatched[:10])
            chosen = np.zeros_like(keep)
            chosen[rows[rows >= 0]] = True
            keep &= chosen
        if tissue is not None:
            keep &= self._in_tissue(tissue, resident=resident)
        if not keep.any():
            raise ValueError(
                "no cell type of the marker knowledge is left after restricting to "
                f"cell_types={cell_types!r}, tissue={tissue!r}; check the labels, or add markers for them "
                "with load_knowledge(extra_tables=[...])"
            )
        kept_names = set(self.cell_types[keep])
        rows_kept = self.rows[self.rows["cell_type"].isin(kept_names)]
        return MarkerKnowledge.from_rows(rows_kept, ubiquitous=self.ubiquitous, version=self.version)

    def _in_tissue(self, tissue: str, *, resident: bool) -> np.ndarray:
        known = {tissue_key(t): t for ts in self.tissues for t in ts}
        key = tissue_key(tissue)
        aliases = {tissue_key(alias): organs for alias, organs in TISSUE_ALIASES.items()}
        wanted = {tissue_key(t) for t in aliases.get(key, ())}
        if key in known:
            wanted.add(key)
        if not wanted:
            raise ValueError(
                f"unknown tissue {tissue!r}; use one of {sorted(set(known.values()))} or "
                f"{sorted(TISSUE_ALIASES)}"
            )
        recorded = np.asarray([any(tissue_key(t) in wanted for t in ts) for ts in self.tissues], dtype=bool)
        asked = wanted | {key}
        # A type named for one site (splenic red pulp macrophage) belongs to that site, or to a request
        # for an organ it is recorded in by name (tissue="immune system"), not to another tissue.
        on_site = np.asarray([
            name not in SITE_SPECIFIC_TYPES
            or bool(asked & {tissue_key(x) for x in SITE_SPECIFIC_TYPES[name]})
            or key in {tissue_key(t) for t in ts}
            for name, ts in zip(self.cell_types, self.tissues)
        ], dtype=bool)
        absent = {tissue_key(name): types for name, types in TISSUE_ABSENT_TYPES.items()}.get(key, ())
        on_site &= ~np.isin(np.asarray(self.cell_types, dtype=object), list(absent))
        if not resident:
            return recorded & on_site
        overrides = {tissue_key(name): organs for name, organs in TISSUE_RESIDENTS.items()}
        residents = {tissue_key(t) for t in overrides.get(key, RESIDENT_ORGANS)}
        resident_here = np.asarray([any(tissue_key(t) in residents for t in ts) for ts in self.tissues], dtype=bool)
        return (recorded | resident_here) & on_site


# ------------------------------------------------------------------------------------------ loading


def load_knowledge(
    extra_tables: Iterable[TableLike] = (),
    tissue: str | None = None,
    *,
    panglaodb: bool = True,
    canonical: bool = True,
) -> MarkerKnowledge:
    """The built-in marker knowledge, optionally with user tables and restricted to a tissue.

    Parameters
    ----------
    extra_tables
        User marker tables (paths or DataFrames, format: :func:`read_marker_table`), combined after the
        built-in layers in the order given: their rows replace built-in rows of the same cell type and
        gene and add new genes and types.
    tissue
        Restrict to the types of one tissue (see :meth:`MarkerKnowledge.restrict`).
    panglaodb, canonical
        Whether to include the PanglaoDB layer and the hand-written canonical layer.

    The vendored tables are read once per process; building the matrix takes a few tens of ms.
    """
    start = time.perf_counter()
    layers, names = [], []
    if panglaodb:
        layers.append(_panglao_rows())
        names.append(PANGLAO_TABLE.split(".")[0])
    if canonical:
        layers.append(_canonical_rows())
        names.append(CANONICAL_TABLE.split(".")[0])
    for table in extra_tables:
        layers.append(read_marker_table(table))
        names.append("user" if isinstance(table, pd.DataFrame) else f"user:{Path(table).name}")
    if not layers:
        raise ValueError(
            "load_knowledge() has no layer to load: enable panglaodb or canonical, or pass extra_tables"
        )
    knowledge = MarkerKnowledge.from_rows(
        combine_layers(layers), ubiquitous=default_ubiquitous_genes(), version="+".join(names)
    )
    if tissue is not None:
        knowledge = knowledge.restrict(tissue=tissue)
    log.info("loaded %r in %.3f s", knowledge, time.perf_counter() - start)
    return knowledge
