"""Build ``core/domain/data/uberon_tissues.tsv.gz``: UBERON tissues and the general tissue of each.

CELLxGENE's schema states each cell's tissue as an UBERON term (``obs["tissue_ontology_term_id"]``,
its label in ``obs["tissue"]``), and the CELLxGENE Census adds ``tissue_general``: the first term of
a fixed, ordered list of 81 general tissues (blood, lung, spleen, bone marrow, ...) that is the tissue
itself or one of its ancestors (is_a and part_of). cellscribe reads the tissue of a data set from these
columns (:mod:`cellscribe.core.domain.tissues`) and needs, offline, the general tissue of any UBERON
term a file may name. This script computes that mapping once, the Census's way, from the UBERON release
and the general-tissue list shipped in CZI's ``cellxgene-ontology-guide`` package, and writes it as a
small table.

Columns: ``id`` (UBERON id), ``name`` (its label), ``general`` (the id of its general tissue),
``synonyms`` (its synonyms, ``|``-joined, only those that name terms of a single general tissue).
Rows: every current UBERON term that has a general tissue, sorted by id. Deterministic: rebuilding from
the same wheel gives identical bytes.

Usage (needs ``zstandard`` to read the package's compressed ontology; ``pip install zstandard``)::

    python scripts/build_tissue_table.py [--wheel cellxgene_ontology_guide-1.11.1-py3-none-any.whl]

Without ``--wheel`` the wheel is downloaded with ``pip download --no-deps`` (98 MB; nothing is
installed).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from pathlib import Path

PACKAGE = "cellxgene-ontology-guide"
VERSION = "1.11.1"
UBERON = "cellxgene_ontology_guide/data/UBERON-ontology-v2026-04-01.json.zst"
GENERAL = "cellxgene_ontology_guide/data/tissue_general_list.json"
OUT = Path(__file__).resolve().parents[1] / "core" / "domain" / "data" / "uberon_tissues.tsv.gz"


def _wheel(path: str | None, folder: Path) -> Path:
    if path:
        return Path(path)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"{PACKAGE}=={VERSION}", "-d",
                    str(folder)], check=True)
    return next(folder.glob("cellxgene_ontology_guide-*.whl"))


def build(wheel: Path) -> bytes:
    import zstandard

    with zipfile.ZipFile(wheel) as zf:
        terms = json.loads(zstandard.ZstdDecompressor().decompress(zf.read(UBERON), max_output_size=2**31))
        general = json.loads(zf.read(GENERAL))
    rows = []
    for term, entry in terms.items():
        if entry.get("deprecated") or not term.startswith("UBERON:"):
            continue
        lineage = set(entry.get("ancestors", {})) | {term}
        first = next((g for g in general if g in lineage), None)
        if first is not None:
            rows.append((term, entry["label"], first, [s for s in entry.get("synonyms", []) if s]))
    owners: dict[str, set[str]] = defaultdict(set)
    for _, name, first, synonyms in rows:
        for s in synonyms:
            owners[s.casefold()].add(first)
    lines = ["id\tname\tgeneral\tsynonyms"]
    for term, name, first, synonyms in sorted(rows):
        kept = sorted({s for s in synonyms if len(owners[s.casefold()]) == 1 and "\t" not in s and "|" not in s})
        lines.append(f"{term}\t{name}\t{first}\t{'|'.join(kept)}")
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, compresslevel=9) as fh:
        fh.write(("\n".join(lines) + "\n").encode("utf-8"))
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", help=f"a downloaded {PACKAGE} {VERSION} wheel")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = build(_wheel(args.wheel, Path(tmp)))
    Path(args.out).write_bytes(data)
    print(f"wrote {args.out} ({len(data) / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
