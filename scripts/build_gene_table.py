"""Build the vendored Ensembl id -> gene symbol table used by :mod:`cellscribe.core.domain.genes`.

Reads the ``gene`` records of a GTF (by default the shared Ensembl 101 / GRCh38 annotation converted
from liuzhenyu-yyy/Tc17Tools) and writes a gzip-compressed, tab-separated table with a header line
``gene_id<TAB>gene_name``: one row per gene, ids without their version suffix, sorted by id. The gzip
header carries no file name or time stamp, so rebuilding from the same GTF gives identical bytes.

Usage::

    python scripts/build_gene_table.py [--gtf PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import gzip
import io
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GTF = ROOT.parent / "shared" / "data" / "genome" / "hg38_ensembl101_genes.gtf.gz"
DEFAULT_OUT = ROOT / "core" / "domain" / "data" / "ensembl101_hg38_gene_symbols.tsv.gz"

_ATTR = re.compile(r'(\w+) "([^"]*)"')
_VERSION = re.compile(r"\.\d+$")


def read_gene_names(gtf: Path) -> dict[str, str]:
    """``gene_id`` (version removed) -> ``gene_name`` for every ``gene`` record of ``gtf``.

    Genes without a ``gene_name`` are skipped. An id seen twice with two different names is an error:
    the table must be a function.
    """
    opener = gzip.open if gtf.suffix == ".gz" else open
    names: dict[str, str] = {}
    with opener(gtf, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("#"):
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 9 or fields[2] != "gene":
                continue
            attrs = dict(_ATTR.findall(fields[8]))
            gene_id, gene_name = attrs.get("gene_id"), attrs.get("gene_name")
            if not gene_id or not gene_name:
                continue
            gene_id = _VERSION.sub("", gene_id)
            previous = names.setdefault(gene_id, gene_name)
            if previous != gene_name:
                raise ValueError(f"{gtf}: {gene_id} is named both {previous!r} and {gene_name!r}")
    return names


def write_table(names: dict[str, str], out: Path) -> None:
    """Write ``names`` as a deterministic gzip TSV (header ``gene_id<TAB>gene_name``) to ``out``."""
    text = io.StringIO()
    text.write("gene_id\tgene_name\n")
    for gene_id in sorted(names):
        text.write(f"{gene_id}\t{names[gene_id]}\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
            gz.write(text.getvalue().encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gtf", type=Path, default=DEFAULT_GTF, help="GTF(.gz) with gene records")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="table to write (.tsv.gz)")
    args = parser.parse_args(argv)
    names = read_gene_names(args.gtf)
    if not names:
        parser.error(f"{args.gtf} has no gene records with gene_id and gene_name")
    write_table(names, args.out)
    print(f"wrote {len(names):,} genes to {args.out} ({args.out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
