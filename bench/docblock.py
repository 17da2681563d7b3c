"""Blocks of docs/BENCHMARKS.md that one script owns, between HTML-comment markers.

run.py writes the whole file; soak.py and sidecar.py each own a block between
`<!-- NAME:begin -->` and `<!-- NAME:end -->`. `write_block` replaces one block (or
appends it), and `keep_blocks` carries the blocks of the file as it was into run.py's new
text, so that a full run does not erase the figures the other scripts wrote.
"""

from __future__ import annotations

import re
from pathlib import Path

_BLOCK = re.compile(r"<!-- (?P<name>[\w-]+):begin -->.*?<!-- (?P=name):end -->", re.DOTALL)


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace_block(doc: str, name: str, text: str) -> str:
    """`doc` with block `name` holding `text` (appended at the end when not there yet)."""
    begin, end = markers(name)
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in doc and end in doc[doc.index(begin) :]:
        start = doc.index(begin)
        stop = doc.index(end, start) + len(end)
        return doc[:start] + block + doc[stop:]
    return doc.rstrip("\n") + "\n\n" + block + "\n"


def write_block(path: Path, name: str, text: str) -> None:
    doc = path.read_text() if path.exists() else ""
    path.write_text(replace_block(doc, name, text))


def keep_blocks(old: str, new: str) -> str:
    """`new`, with every marked block of `old` carried over (in place when `new` has it too)."""
    for found in _BLOCK.finditer(old):
        begin, end = markers(found["name"])
        inner = found[0][len(begin) : -len(end)]
        new = replace_block(new, found["name"], inner)
    return new
