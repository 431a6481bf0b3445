"""Build the vendored PanglaoDB marker table of the ``markers`` plugin.

Reads the PanglaoDB marker release of 27 Mar 2020 (by default the shared copy), keeps the human rows
(``species`` contains ``Hs``; the 30 rows without a species and the 3 with species ``4`` are dropped),
names each PanglaoDB cell type after its Cell Ontology term and writes
``plugins/markers/data/panglaodb_human_v1.tsv.gz``: a gzip-compressed, tab-separated table sorted by
cell type and gene, one row per (cell type, gene), with the columns

``cell_type``
    the Cell Ontology name of the type (``"natural killer cell"``), or the PanglaoDB name when no term
    fits (``"Undefined placental cells"``);
``cl_id``
    its Cell Ontology id, empty when none fits;
``panglao_name``, ``organ``
    PanglaoDB's cell type and organ (the 4 cell types without an organ get one from :data:`ORGANS` or
    stay empty);
``gene``
    the official gene symbol (surrounding spaces removed);
``weight``
    see :func:`marker_weight`, rounded to 4 decimals;
``sensitivity``, ``specificity``, ``canonical``, ``ubiquitousness``
    PanglaoDB's ``sensitivity_human``, ``specificity_human``, ``canonical marker`` (0/1) and
    ``ubiquitousness index`` (missing values left empty).

Cell types are mapped by :data:`PANGLAO_TO_CL` (reviewed by hand) where listed, otherwise by
``cellscribe.core.domain.ontology`` look-up of the PanglaoDB name. The gzip header carries no file name or time
stamp, so rebuilding from the same inputs gives identical bytes.

Usage::

    python scripts/build_marker_table.py [--panglao PATH] [--out PATH] [--show-mapping]
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from cellscribe.core.domain.ontology import CellOntology, get_ontology

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PANGLAO = ROOT.parent / "shared" / "data" / "knowledge" / "PanglaoDB_markers_27_Mar_2020.tsv"
DEFAULT_OUT = ROOT / "plugins" / "markers" / "data" / "panglaodb_human_v1.tsv.gz"

COLUMNS = (
    "cell_type",
    "cl_id",
    "panglao_name",
    "organ",
    "gene",
    "weight",
    "sensitivity",
    "specificity",
    "canonical",
    "ubiquitousness",
)

#: Specificity at which the specificity factor of :func:`marker_weight` is 1/2.
SPECIFICITY_HALF = 0.05
#: Factor of a marker PanglaoDB does not flag as canonical (canonical markers get 1).
NON_CANONICAL = 2 / 3

#: PanglaoDB cell types whose Cell Ontology term the automatic look-up misses or gets wrong, reviewed
#: by hand against the term definitions and the PanglaoDB marker genes. ``None``: no term fits, so the
#: type keeps its PanglaoDB name and no id.
PANGLAO_TO_CL: dict[str, str | None] = {
    "Acinar cells": "CL:0002064",  # organ Pancreas: pancreatic acinar cell, not the generic acinar cell
    "Adipocyte progenitor cells": "CL:0002334",  # preadipocyte
    "Airway goblet cells": "CL:0002370",  # respiratory tract goblet cell
    "Airway smooth muscle cells": "CL:0019019",  # tracheobronchial smooth muscle cell
    "Anterior pituitary gland cells": None,  # a mix of all anterior pituitary hormone cells
    "Bergmann glia": "CL:0000644",
    "Cardiac stem and precursor cells": "CL:0000513",  # cardiac muscle myoblast (cardiac progenitor)
    "Choroid plexus cells": "CL:0000706",  # choroid plexus epithelial cell
    "Crypt cells": "CL:0002250",  # LGR5/OLFM4/ASCL2: intestinal crypt stem cell, not the olfactory neuron
    "Distal tubule cells": "CL:0002305",  # epithelial cell of distal tubule
    "Endothelial cells (aorta)": "CL:0002544",  # aortic endothelial cell
    "Endothelial cells (blood brain barrier)": "CL:2000044",  # brain microvascular endothelial cell
    "Enteric glia cells": "CL:4040002",  # enteroglial cell
    "Erythroid-like and erythroid precursor cells": "CL:0000038",  # erythroid progenitor cell
    "Follicular cells": "CL:0002258",  # organ Thyroid: thyroid follicular cell
    "Foveolar cells": "CL:0002179",  # foveolar cell of stomach
    "Gamma (PP) cells": "CL:0002275",  # pancreatic PP cell
    "Glutaminergic neurons": "CL:0000679",  # glutamatergic neuron
    "His bundle cells": None,
    "Juxtaglomerular cells": "CL:0000648",  # kidney granular cell (JG cell)
    "Kidney progenitor cells": "CL:0000324",  # SIX2/CITED1/OSR1: metanephric mesenchyme stem cell
    "Loop of Henle cells": "CL:1000909",  # kidney loop of Henle epithelial cell
    "Luminal epithelial cells": "CL:0002326",  # organ Mammary gland
    "Meningeal cells": "CL:0000708",  # leptomeningeal cell
    "Microglia": "CL:0000129",  # microglial cell
    "Myeloid-derived suppressor cells": "CL:0000889",  # myeloid suppressor cell
    "Myocytes": "CL:0000188",  # organ Skeletal muscle: cell of skeletal muscle
    "Neural stem/precursor cells": "CL:0000047",  # neural stem cell
    "Oligodendrocyte progenitor cells": "CL:0002453",  # oligodendrocyte precursor cell
    "Osteoclast precursor cells": None,
    "Oxyphil cells": "CL:0002199",  # organ Parathyroid glands: oxyphil cell of parathyroid gland
    "Pancreatic progenitor cells": None,  # endocrine and exocrine progenitor genes mixed
    "Peri-islet Schwann cells": None,  # "Schwann cells" already stands for Schwann cell
    "Principal cells": "CL:1001431",  # organ Kidney: kidney collecting duct principal cell
    "Proximal tubule cells": "CL:0002306",  # epithelial cell of proximal tubule
    "Pulmonary vascular smooth muscle cells": None,  # "Vascular smooth muscle cells" has the term
    "Radial glia cells": "CL:0000681",  # radial glial cell
    "Red pulp macrophages": "CL:0000874",  # splenic red pulp macrophage
    "Salivary mucous cells": "CL:4052066",  # mucous acinar cell of salivary gland
    "Satellite cells": "CL:0000594",  # organ Skeletal muscle: skeletal muscle satellite cell
    "Satellite glial cells": None,
    "Spermatozoa": "CL:0000019",  # sperm
    "Transient cells": None,
    "Trophoblast progenitor cells": None,
    "Trophoblast stem cells": None,
    "Undefined placental cells": None,
}

#: Organs for PanglaoDB cell types that have none.
ORGANS = {"T cells naive": "Immune system"}


def marker_weight(
    sensitivity: pd.Series, specificity: pd.Series, canonical: pd.Series, ubiquitousness: pd.Series
) -> np.ndarray:
    """The weight of each PanglaoDB marker row, in (0, 1].

    ``weight = c * (0.5 + 0.5 * sensitivity) * 1 / (1 + specificity / 0.05) * (1 - ubiquitousness)``

    - ``sensitivity`` (fraction of the type's cells expressing the gene) moves the weight by at most a
      factor 2 (most human sensitivities are 0 because PanglaoDB had little human data), missing = 0;
    - ``specificity`` is the fraction of *other* cell types expressing the gene (lower = more
      specific): 0 gives 1, 0.05 gives 1/2, 0.35 (CD74) gives 1/8; missing counts as 0.05;
    - ``c`` is 1 for PanglaoDB's canonical markers and 2/3 otherwise;
    - ``ubiquitousness`` (fraction of all PanglaoDB clusters expressing the gene) discounts
      housekeeping genes, missing = 0.
    """
    sens = sensitivity.fillna(0.0).clip(0.0, 1.0).to_numpy(dtype=float)
    spec = specificity.fillna(SPECIFICITY_HALF).clip(0.0, 1.0).to_numpy(dtype=float)
    canon = np.where(canonical.fillna(0).to_numpy(dtype=float) == 1, 1.0, NON_CANONICAL)
    ubiq = ubiquitousness.fillna(0.0).clip(0.0, 1.0).to_numpy(dtype=float)
    return canon * (0.5 + 0.5 * sens) / (1.0 + spec / SPECIFICITY_HALF) * (1.0 - ubiq)


def map_cell_types(names: list[str], ontology: CellOntology) -> dict[str, tuple[str, str]]:
    """PanglaoDB cell type -> ``(cell_type, cl_id)`` (``cl_id`` empty when no term fits).

    Raises ValueError when a reviewed id is not a current term or two PanglaoDB types would get the
    same term (each must stay a separate row of the knowledge matrix).
    """
    mapping: dict[str, tuple[str, str]] = {}
    for name in names:
        if name in PANGLAO_TO_CL:
            cl_id = PANGLAO_TO_CL[name]
            if cl_id is not None and cl_id not in ontology:
                raise ValueError(f"PANGLAO_TO_CL[{name!r}] = {cl_id!r} is not a current Cell Ontology term")
        else:
            cl_id = ontology.lookup(name)
        mapping[name] = (ontology.name(cl_id), cl_id) if cl_id else (name, "")
    ids = pd.Series({name: cl_id for name, (_, cl_id) in mapping.items() if cl_id})
    clashes = ids[ids.duplicated(keep=False)]
    if len(clashes):
        raise ValueError(
            f"several PanglaoDB cell types map to one term: {clashes.to_dict()}; fix PANGLAO_TO_CL"
        )
    return mapping


def build_table(panglao: Path, ontology: CellOntology | None = None) -> pd.DataFrame:
    """The human marker table (:data:`COLUMNS`, sorted by cell type and gene) from a PanglaoDB TSV."""
    ontology = ontology or get_ontology()
    raw = pd.read_csv(panglao, sep="\t", dtype={"species": str}, keep_default_na=True)
    human = raw[raw["species"].fillna("").str.contains("Hs", regex=False)].copy()
    human["gene"] = human["official gene symbol"].str.strip()
    human["panglao_name"] = human["cell type"].str.strip()
    mapping = map_cell_types(sorted(human["panglao_name"].unique()), ontology)
    human["cell_type"] = human["panglao_name"].map(lambda n: mapping[n][0])
    human["cl_id"] = human["panglao_name"].map(lambda n: mapping[n][1])
    human["organ"] = human["organ"].fillna(human["panglao_name"].map(ORGANS)).fillna("")
    human["weight"] = marker_weight(
        human["sensitivity_human"],
        human["specificity_human"],
        human["canonical marker"],
        human["ubiquitousness index"],
    ).round(4)
    human["sensitivity"] = human["sensitivity_human"]
    human["specificity"] = human["specificity_human"]
    human["canonical"] = (human["canonical marker"].fillna(0) == 1).astype(int)
    human["ubiquitousness"] = human["ubiquitousness index"]
    duplicated = human.duplicated(["cell_type", "gene"], keep=False)
    if duplicated.any():
        rows = human.loc[duplicated, ["panglao_name", "gene"]].to_records(index=False).tolist()
        raise ValueError(f"{panglao}: a gene is listed twice for one human cell type: {rows[:5]}")
    table = human.loc[:, list(COLUMNS)].sort_values(["cell_type", "gene"], kind="stable")
    return table.reset_index(drop=True)


def write_table(table: pd.DataFrame, out: Path) -> None:
    """Write ``table`` as a deterministic gzip TSV to ``out``."""
    text = table.to_csv(sep="\t", index=False, lineterminator="\n", float_format="%.6g")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
            gz.write(text.encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--panglao", type=Path, default=DEFAULT_PANGLAO, help="PanglaoDB markers TSV")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="table to write (.tsv.gz)")
    parser.add_argument(
        "--show-mapping", action="store_true", help="print PanglaoDB name -> term, for review"
    )
    args = parser.parse_args(argv)
    table = build_table(args.panglao)
    write_table(table, args.out)
    if args.show_mapping:
        pairs = table.drop_duplicates("panglao_name")[["panglao_name", "cl_id", "cell_type"]]
        for row in pairs.itertuples(index=False):
            print(f"{row.panglao_name:48} {row.cl_id or '-':12} {row.cell_type}")
    n_types = table["panglao_name"].nunique()
    n_mapped = table.loc[table["cl_id"] != "", "panglao_name"].nunique()
    print(
        f"wrote {len(table):,} human markers of {n_types} cell types ({n_mapped} with a Cell Ontology id) "
        f"to {args.out} ({args.out.stat().st_size:,} bytes)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
