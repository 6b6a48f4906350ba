"""Regenerate ``src/nestedkv/data/austen.txt``, the public-domain essay haystack of the RULER tasks.

Source: Debian's ``r-cran-janeaustenr`` package (Jane Austen's six novels, public domain, as R
data; the R package itself is MIT). The excerpt is the opening of each novel, cleaned into plain
prose paragraphs (one per line, no chapter headings, no ``_emphasis_`` marks).

The R lazy-load database is read with the ``rdata`` package, which is not a dependency of
nestedkv; install it somewhere temporary::

    apt-get download r-cran-janeaustenr
    python -m venv /tmp/rd && /tmp/rd/bin/pip install rdata
    /tmp/rd/bin/python scripts/make_austen_excerpt.py r-cran-janeaustenr_*_all.deb
"""

from __future__ import annotations

import argparse
import gzip
import re
import subprocess
import tempfile
import warnings
import zlib
from pathlib import Path

import rdata

NOVELS = (  # (variable in the R data, title), in the order they appear in the excerpt
    ("prideprejudice", "Pride and Prejudice"),
    ("emma", "Emma"),
    ("sensesensibility", "Sense and Sensibility"),
    ("mansfieldpark", "Mansfield Park"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
)
CHARS_PER_NOVEL = 64_000
OUTPUT = Path(__file__).resolve().parents[1] / "src" / "nestedkv" / "data" / "austen.txt"
HEADING = re.compile(r"^(chapter|volume)\b", re.IGNORECASE)


def read_novels(deb: Path) -> dict[str, list[str]]:
    """Lines of every novel, read from the package's ``data/Rdata.rdb`` lazy-load database."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        data = next(Path(tmp).rglob("janeaustenr/data"))
        index = _convert(gzip.decompress((data / "Rdata.rdx").read_bytes()))
        blob = (data / "Rdata.rdb").read_bytes()
        novels = {}
        for name, (offset, length) in index["variables"].items():
            # each object: a 4-byte big-endian length, then a zlib stream of an R serialization
            lines = _convert(zlib.decompress(blob[offset + 4 : offset + length]))
            novels[str(name)] = [str(line) for line in lines]
    return novels


def _convert(raw: bytes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS"
        return rdata.conversion.convert(rdata.parser.parse_data(raw))


def paragraphs(lines: list[str]) -> list[str]:
    """Prose paragraphs from the first chapter heading on, unwrapped, headings dropped."""
    start = next(i for i, line in enumerate(lines) if HEADING.match(line.strip()))
    text = "\n".join(lines[start:])
    result = []
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.split()).replace("_", "")
        if not para or HEADING.match(para) or para.upper() == para:
            continue
        result.append(para)
    return result


def excerpt(novel_lines: list[str], budget: int) -> list[str]:
    """Whole paragraphs from the start of a novel, up to ``budget`` characters."""
    kept, size = [], 0
    for para in paragraphs(novel_lines):
        if size + len(para) > budget:
            break
        kept.append(para)
        size += len(para) + 1
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("deb", type=Path, help="r-cran-janeaustenr_*_all.deb")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    novels = read_novels(args.deb)
    header = (
        "# Jane Austen (public domain): the opening chapters of "
        + ", ".join(title for _, title in NOVELS)
        + ". Extracted from Debian's r-cran-janeaustenr by scripts/make_austen_excerpt.py;"
        " one paragraph per line."
    )
    body = [para for name, _ in NOVELS for para in excerpt(novels[name], CHARS_PER_NOVEL)]
    args.output.write_text("\n".join([header, *body]) + "\n", encoding="utf-8")
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes, {len(body)} paragraphs)")


if __name__ == "__main__":
    main()
