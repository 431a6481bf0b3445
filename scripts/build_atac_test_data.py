"""Build the ATAC test data in tests/data/atac/ from the project's shared data folder.

Copies the PBSmall fragment file, its labels and the hg19 chromosome sizes unchanged, and writes the
gene annotation restricted to what the fragments cover: the ``gene`` and ``transcript`` records of
chr5 and chr11 of the hg19 ArchR annotation (exon records dropped; snapatac2 and cellscribe read genes
from transcript records). Deterministic: the same input gives byte-identical output.

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


def subset_gtf(source: Path, target: Path) -> int:
    """Write the header and the chr5/chr11 gene and transcript records of ``source``; return the count."""
    n = 0
    with gzip.open(source, "rt", encoding="utf-8") as fin, open(target, "wb") as raw:
        # mtime=0 keeps the gzip header (and so the file) identical from run to run.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as fout:
            for line in fin:
                if line.startswith("#"):
                    fout.write(line.encode("utf-8"))
                    continue
                fields = line.split("\t", 3)
                if fields[0] in KEEP_CHROMS and fields[2] in KEEP_TYPES:
                    fout.write(line.encode("utf-8"))
                    n += 1
    return n


def main(shared: Path) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in ("atac/PBSmall_fragments.tsv.gz", "atac/PBSmall_labels.tsv", "genome/hg19.chrom.sizes"):
        shutil.copyfile(shared / name, OUT / Path(name).name)
    n = subset_gtf(shared / "genome" / "hg19_archr_genes.gtf.gz", OUT / "hg19_chr5_chr11_genes.gtf.gz")
    print(f"wrote {OUT}: {n} gene/transcript records of {', '.join(KEEP_CHROMS)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data")
