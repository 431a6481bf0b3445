"""Build the vendored Cell Ontology table used by :mod:`cellscribe.core.domain.ontology`.

Reads an OBO release of the Cell Ontology (by default the shared ``cl-simple`` release of 26 Mar 2026)
with the small OBO reader below and writes a gzip-compressed, tab-separated table with a header line
and one row per current ``CL:`` term (obsolete terms and other id spaces are skipped), sorted by id.
Columns (several values in one cell are joined with ``|``, in file order):

``id``, ``name``, ``exact`` (exact synonyms), ``related``, ``narrow``, ``broad`` (the less reliable
synonym scopes, kept apart), ``is_a`` (parent ids), ``part_of`` (``BFO:0000050`` targets),
``develops_from`` (``RO:0002202`` targets), ``alt_id`` (retired ids that now mean this term).

Only links to terms that are themselves in the table are kept. The gzip header carries no file name or
time stamp, so rebuilding from the same OBO file gives identical bytes.

Usage::

    python scripts/build_cl_table.py [--obo PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import gzip
import io
import re
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OBO = ROOT.parent / "shared" / "data" / "knowledge" / "cl-simple_2026-03-26.obo"
DEFAULT_OUT = ROOT / "core" / "domain" / "data" / "cl_terms.tsv.gz"

COLUMNS = ("id", "name", "exact", "related", "narrow", "broad", "is_a", "part_of", "develops_from", "alt_id")
SEPARATOR = "|"
# Relationship ids of the OBO file -> table column.
RELATIONS = {"BFO:0000050": "part_of", "RO:0002202": "develops_from"}
SCOPES = {"EXACT": "exact", "RELATED": "related", "NARROW": "narrow", "BROAD": "broad"}

_QUOTED = re.compile(r'^"((?:[^"\\]|\\.)*)"\s*(.*)$')
_ESCAPE = re.compile(r"\\(.)")
_ESCAPED_CHARS = {"n": " ", "t": " ", "W": " "}  # whitespace escapes become one space in a label


def _unescape(text: str) -> str:
    return _ESCAPE.sub(lambda m: _ESCAPED_CHARS.get(m.group(1), m.group(1)), text)


def _strip_trailing(value: str) -> str:
    """A tag value without its ``! comment`` and ``{qualifiers}``: the first whitespace-separated part."""
    return value.split(None, 1)[0] if value.strip() else ""


def iter_stanzas(lines: Iterator[str]) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """Yield ``(stanza type, [(tag, value), ...])`` for each ``[Term]``/``[Typedef]``/... stanza.

    The header (before the first stanza) is skipped. Values keep their OBO escapes; tags are the text
    before the first ``:``.
    """
    kind: str | None = None
    tags: list[tuple[str, str]] = []
    for raw in lines:
        line = raw.rstrip("\n")
        if line.startswith("[") and line.endswith("]"):
            if kind is not None:
                yield kind, tags
            kind, tags = line[1:-1], []
        elif kind is not None and ":" in line and not line.startswith("!"):
            tag, value = line.split(":", 1)
            tags.append((tag.strip(), value.strip()))
    if kind is not None:
        yield kind, tags


def parse_term(tags: list[tuple[str, str]]) -> dict[str, object]:
    """One ``[Term]`` stanza as a dict: ``id``, ``name``, ``obsolete`` and lists for the other columns."""
    term: dict[str, object] = {"id": "", "name": "", "obsolete": False}
    for column in COLUMNS[2:]:
        term[column] = []
    for tag, value in tags:
        if tag == "id":
            term["id"] = value
        elif tag == "name":
            term["name"] = _unescape(value)
        elif tag == "is_obsolete":
            term["obsolete"] = value.lower() == "true"
        elif tag == "synonym":
            match = _QUOTED.match(value)
            if match is None:
                raise ValueError(f"malformed synonym line: synonym: {value}")
            text, rest = _unescape(match.group(1)).strip(), match.group(2).split()
            scope = SCOPES.get(rest[0] if rest else "")
            if scope is None:
                raise ValueError(f"synonym without a known scope: synonym: {value}")
            term[scope].append(text)
        elif tag == "is_a":
            term["is_a"].append(_strip_trailing(value))
        elif tag == "relationship":
            parts = value.split()
            column = RELATIONS.get(parts[0]) if len(parts) > 1 else None
            if column is not None:
                term[column].append(parts[1])
        elif tag == "alt_id":
            term["alt_id"].append(_strip_trailing(value))
    return term


def read_terms(obo: Path) -> list[dict[str, object]]:
    """The current ``CL:`` terms of ``obo``, sorted by id, with links restricted to terms kept.

    Repeated values (a synonym listed twice, or the same text under two scopes of one term, where the
    first scope in reliability order exact > narrow > broad > related wins) are kept once.
    """
    opener = gzip.open if obo.suffix == ".gz" else open
    with opener(obo, "rt", encoding="utf-8") as fh:
        terms = [parse_term(tags) for kind, tags in iter_stanzas(fh) if kind == "Term"]
    kept = {t["id"]: t for t in terms if str(t["id"]).startswith("CL:") and not t["obsolete"] and t["name"]}
    for term in kept.values():
        seen = {str(term["name"])}
        for scope in ("exact", "narrow", "broad", "related"):
            values = [s for s in dict.fromkeys(term[scope]) if s not in seen]
            seen.update(values)
            term[scope] = values
        for column in ("is_a", *RELATIONS.values()):
            term[column] = [t for t in dict.fromkeys(term[column]) if t in kept and t != term["id"]]
    return [kept[i] for i in sorted(kept)]


def write_table(terms: list[dict[str, object]], out: Path) -> None:
    """Write ``terms`` as a deterministic gzip TSV with the :data:`COLUMNS` header to ``out``."""
    text = io.StringIO()
    text.write("\t".join(COLUMNS) + "\n")
    for term in terms:
        cells = []
        for column in COLUMNS:
            value = term[column]
            if isinstance(value, list):
                if any(SEPARATOR in v for v in value):
                    raise ValueError(f"{term['id']}: a {column} value contains the separator {SEPARATOR!r}")
                cell = SEPARATOR.join(value)
            else:
                cell = str(value)
            if "\t" in cell or "\n" in cell:
                raise ValueError(f"{term['id']}: {column} value {cell!r} contains a tab or newline")
            cells.append(cell)
        text.write("\t".join(cells) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
            gz.write(text.getvalue().encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--obo", type=Path, default=DEFAULT_OBO, help="Cell Ontology release (.obo or .obo.gz)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="table to write (.tsv.gz)")
    args = parser.parse_args(argv)
    terms = read_terms(args.obo)
    if not terms:
        parser.error(f"{args.obo} has no current CL terms")
    write_table(terms, args.out)
    print(f"wrote {len(terms):,} Cell Ontology terms to {args.out} ({args.out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
