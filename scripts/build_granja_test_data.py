"""Build tests/data/atac/granja2019_bmmc_600cells_5kpeaks.h5ad from the epiCHAOS package's data file.

The source is ``data/hemato_atac.rda`` of the R package CompEpigen/epiCHAOS (MIT): real 10x scATAC-seq of
bone-marrow mononuclear cells from Granja et al. 2019 (GEO GSE139369, "scATAC-Healthy-Hematopoiesis"),
which epiCHAOS subset to 5,000 peaks drawn at random from the study's ~570,000 (500 bp, hg19) and 100
cells of each of six populations (the study's ``BioClassification``: 01_HSC, 05_CMP.LMPP, 07_GMP,
15_CLP.2, 17_B, 19_CD8.N). Counts are the study's (Tn5 insertions per peak: a fragment inside a peak
counts 2), unbinarised.

The file is a sparse, random peak subset of a droplet assay, the case public matrices are in (about 77
accessible peaks per cell): the shared Schep and Buenrostro sets are deep plate-based (Fluidigm C1) cells.

Written: cells x peaks float32 CSR ``X``; peaks named ``chrN-start-end`` (0-based, half-open: GRanges
starts are 1-based); ``obs["cell_type"]`` (= ``BioClassification``) and the study's ``Group``,
``Clusters``, ``TotalReads`` and ``FRIP``. Deterministic.

Reading ``.rda`` needs the ``rdata`` package (``pip install rdata``), which cellscribe does not depend on.

Usage::

    git -C <epiCHAOS checkout> show HEAD:data/hemato_atac.rda > hemato_atac.rda
    python scripts/build_granja_test_data.py hemato_atac.rda
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "tests" / "data" / "atac" / "granja2019_bmmc_600cells_5kpeaks.h5ad"
KEEP_OBS = ("Group", "Clusters", "TotalReads", "FRIP")


def _rle(run) -> np.ndarray:
    """The values of an R ``Rle`` (a factor's labels, expanded)."""
    values = run.values
    labels = np.asarray(values.categories) if hasattr(values, "categories") else None
    codes = np.asarray(values.codes) if labels is not None else np.asarray(values)
    expanded = np.repeat(codes, np.asarray(run.lengths))
    return labels[expanded] if labels is not None else expanded.astype(str)


def main(source: Path, target: Path = TARGET) -> None:
    import anndata as ad
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns for each S4 class it returns as a plain object
        data = rdata.conversion.convert(rdata.parser.parse_file(str(source)))["hemato_atac"]
    counts = vars(data["counts"])
    n_peaks, n_cells = (int(v) for v in counts["Dim"])
    X = sp.csc_matrix((counts["x"], counts["i"], counts["p"]), shape=(n_peaks, n_cells)).T.tocsr().astype(np.float32)
    ranges = data["ranges"]
    chroms = _rle(ranges.seqnames)
    start = np.asarray(ranges.ranges.start, dtype=np.int64) - 1
    end = start + np.asarray(ranges.ranges.width, dtype=np.int64)
    peaks = [f"{c}-{s}-{e}" for c, s, e in zip(chroms, start, end)]
    meta = data["meta"].listData
    obs = pd.DataFrame(index=pd.Index(np.asarray(data["meta"].rownames).astype(str), name=None))
    obs["cell_type"] = np.asarray(meta["BioClassification"]).astype(str)
    for key in KEEP_OBS:
        values = np.asarray(meta[key])
        obs[key] = values.astype(str) if values.dtype.kind in "OUS" else values
    adata = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=peaks))
    adata.X.sort_indices()
    target.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(target, compression="gzip")
    print(f"wrote {target}: {adata.n_obs} cells x {adata.n_vars} peaks, {adata.X.nnz} non-zeros; "
          f"{obs['cell_type'].value_counts().to_dict()}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
