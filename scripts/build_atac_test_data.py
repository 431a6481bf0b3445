"""Build the ATAC test data in tests/data/atac/ from the project's shared data folder.

Copies the PBSmall fragment file, its labels, its unpaired scRNA companion, the hg19 chromosome sizes
and the Schep 2017 peak matrix unchanged, writes the gene annotation restricted to what the fragments cover (the ``gene`` and
``transcript`` records of chr5 and chr11 of the hg19 ArchR annotation; exon records dropped: snapatac2
and cellscribe read genes from transcript records), the same records of every chromosome for the
genome-wide peak matrices, and a subset of the Buenrostro 2018 progenitors (40 cells per sorting gate,
chosen with ``numpy.random.default_rng(0)``, all peaks). Deterministic: the same input gives the same
output.

Usage::

    python scripts/build_atac_test_data.py [SHARED_DATA_DIR]   # default: ../shared/data
"""

from __future__ import annotations

import gzip
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "atac"
KEEP_CHROMS = ("chr5", "chr11")
KEEP_TYPES = ("gene", "transcript")


def subset_gtf(source: Path, target: Path, chroms: tuple[str, ...] | None = KEEP_CHROMS) -> int:
    """Write the header and the gene and transcript records of ``source`` on ``chroms`` (``None``: all);
    return the count."""
    n = 0
    with gzip.open(source, "rt", encoding="utf-8") as fin, open(target, "wb") as raw:
        # mtime=0 keeps the gzip header (and so the file) identical from run to run.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as fout:
            for line in fin:
                if line.startswith("#"):
                    fout.write(line.encode("utf-8"))
                    continue
                fields = line.split("\t", 3)
                if (chroms is None or fields[0] in chroms) and fields[2] in KEEP_TYPES:
                    fout.write(line.encode("utf-8"))
                    n += 1
    return n


def main(shared: Path) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in ("atac/PBSmall_fragments.tsv.gz", "atac/PBSmall_labels.tsv", "genome/hg19.chrom.sizes"):
        shutil.copyfile(shared / name, OUT / Path(name).name)
    n = subset_gtf(shared / "genome" / "hg19_archr_genes.gtf.gz", OUT / "hg19_chr5_chr11_genes.gtf.gz")
    print(f"wrote {OUT}: {n} gene/transcript records of {', '.join(KEEP_CHROMS)}")
    n = subset_gtf(shared / "genome" / "hg19_archr_genes.gtf.gz", OUT / "hg19_genes.gtf.gz", None)
    print(f"wrote {OUT}: {n} gene/transcript records of every chromosome")
    for name in ("schep2017_blood_celllines_600cells.h5ad", "PBSmall_rna_unpaired_150cells.h5ad"):
        shutil.copyfile(shared / "atac" / name, OUT / name)
    write_buenrostro_subset(shared / "atac" / "buenrostro2018_bm0828_facs_533cells.h5ad",
                            OUT / "buenrostro2018_bm0828_facs_280cells.h5ad")


def write_buenrostro_subset(source: Path, target: Path, per_gate: int = 40) -> None:
    """40 cells of each sorting gate of the Buenrostro 2018 matrix (all peaks), gzip-compressed."""
    import anndata as ad
    import numpy as np

    full = ad.read_h5ad(source)
    rng = np.random.default_rng(0)
    gates = full.obs["cell_type"].astype(str)
    keep = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(gates == g), size=min(per_gate, int((gates == g).sum())), replace=False)
        for g in sorted(gates.unique())
    ]))
    subset = full[keep].copy()
    subset.uns["source"] = (f"{full.uns.get('source', '')} | subset: {per_gate} cells per sorting gate "
                            "(numpy default_rng(0)), all peaks")
    subset.write_h5ad(target, compression="gzip")
    print(f"wrote {target}: {subset.n_obs} cells x {subset.n_vars} peaks")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data")
