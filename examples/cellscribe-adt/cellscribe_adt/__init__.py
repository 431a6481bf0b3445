"""cellscribe-adt: protein (ADT) counts as a cellscribe modality.

Antibody panels name proteins by CD number or clone; cell sentences need gene symbols, so each antibody
is mapped to the gene that encodes its target. Counts are CLR-normalised per cell (the usual CITE-seq
normalisation) so that a protein ranks high when it is enriched in the cell relative to its own panel.
"""

from __future__ import annotations

import re

import numpy as np
import scipy.sparse as sp

from cellscribe import FeatureMatrix, hookimpl

__version__ = "0.1.0"

#: Antibody target -> gene symbol (common TotalSeq/CITE-seq panel names).
TARGET_TO_GENE = {
    "CD3": "CD3E", "CD4": "CD4", "CD8": "CD8A", "CD8A": "CD8A", "CD14": "CD14", "CD16": "FCGR3A",
    "CD19": "CD19", "CD20": "MS4A1", "CD56": "NCAM1", "CD11C": "ITGAX", "CD11B": "ITGAM",
    "CD45RA": "PTPRC", "CD45RO": "PTPRC", "CD45": "PTPRC", "HLA-DR": "HLA-DRA", "CD127": "IL7R",
    "CD25": "IL2RA", "CD34": "CD34", "CD123": "IL3RA", "CD1C": "CD1C", "CD27": "CD27", "CD38": "CD38",
    "CD69": "CD69", "CD57": "B3GAT1", "PD-1": "PDCD1", "CD279": "PDCD1", "CD62L": "SELL",
}
_SUFFIX = re.compile(r"[_-](TOTALSEQ[ABC]?|ADT|PROT|PROTEIN)$", re.IGNORECASE)


def antibody_to_gene(name: str) -> str:
    """The gene symbol for an antibody name (``"CD16_TotalSeqB"`` -> ``"FCGR3A"``), else the name."""
    target = _SUFFIX.sub("", name.strip()).upper()
    return TARGET_TO_GENE.get(target, target)


def clr(X: sp.csr_matrix) -> sp.csr_matrix:
    """Centred log-ratio per cell over the stored values: ``log1p(x) - mean(log1p(x))``, floored at 0.

    Only proteins above the cell's own average stay non-zero, which is what a ranked sentence needs.
    """
    X = sp.csr_matrix(X, dtype=np.float64, copy=True)
    X.data = np.log1p(X.data)
    n_features = X.shape[1]
    means = np.asarray(X.sum(axis=1)).ravel() / max(n_features, 1)
    X.data -= np.repeat(means, np.diff(X.indptr))
    X.data[X.data < 0] = 0
    X.eliminate_zeros()
    return X


class ADTModality:
    name = "adt"
    description = "CITE-seq protein counts (CLR-normalised, antibodies mapped to gene symbols)"
    mudata_keys = ("prot", "adt", "protein")

    def prepare(self, adata, *, layer=None, use_raw=None, **options):
        X = adata.layers[layer] if layer else (adata.raw.X if use_raw else adata.X)
        if sp.issparse(X):
            values = X.data
        else:
            values = np.asarray(X)
        if values.size and values.min() < 0:
            raise ValueError("ADT matrix has negative values; pass the raw antibody counts (layer=...)")
        genes = [antibody_to_gene(n) for n in adata.var_names]
        # Several antibodies can target one gene (CD45RA/CD45RO): keep the first, sentences need unique names.
        _, first = np.unique(genes, return_index=True)
        keep = np.sort(first)
        matrix = clr(sp.csr_matrix(X)[:, keep])
        return FeatureMatrix(
            X=matrix,
            feature_names=np.asarray(genes, dtype=object)[keep],
            cell_ids=adata.obs_names.to_numpy(),
            value_kind="clr",
            source=f"layers[{layer!r}]" if layer else ("raw.X" if use_raw else "X"),
            modality=self.name,
        )


@hookimpl
def cellscribe_register_modalities(register):
    register(ADTModality())
