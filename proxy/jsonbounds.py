"""JSON the proxy reads itself, within bounds: nesting depth, and work done on the loop.

json.loads runs in C, but unbounded in two ways that matter to a proxy serving every
client from one event loop. Nesting: the decoder recurses, so 100k levels of `[` raise
RecursionError (a 500, were it not caught). Work: a 20 MiB `[{},{},...]` builds millions
of objects, 600 MB and 0.4 s with the loop blocked (and the GIL held: a thread would not
help). So, with the worst shapes measured (bench/json_bounds.py):

- `MAX_DEPTH` bounds nesting, checked before any parse by `nesting_within`, a scan made
  of C-speed bytes operations, so json.loads never recurses past it. It is run on
  documents up to `SCAN_LIMIT` (256 KiB: at most ~10 ms);
- `PARSE_LIMIT`: documents up to 64 KiB are parsed (scan and parse: a few ms at worst;
  nested lists cost json.loads ~20 ms per 256 KiB). What larger ones get is the caller's
  decision; the pipeline passes them on as they are, for the API to judge.
"""

from __future__ import annotations

import re

# Deeper JSON is refused (400). Real API documents nest a handful of levels; serde_json's
# default limit is the same, and it stays far below Python's recursion limit.
MAX_DEPTH = 128
# Documents up to this size are parsed (validated) by the proxy; up to SCAN_LIMIT their
# nesting is checked.
PARSE_LIMIT = 64 * 1024
SCAN_LIMIT = 256 * 1024

# A JSON string, escapes included (possessive: one pass, no backtracking).
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
# Every opening bracket becomes "[", every closing one "]"; all other bytes are deleted.
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_RUNS = re.compile(rb"\[+|\]+")
_OPEN = ord("[")
# Passes that delete valleys before the runs are counted (see nesting_within).
_VALLEY_PASSES = 8


def nesting_within(data: bytes, max_depth: int = MAX_DEPTH) -> bool:
    """Whether brackets outside strings nest at most `max_depth` deep, so that json.loads
    on `data` cannot recurse deeper. (Past a closing bracket with nothing open, a parser
    stops; so may the count.)

    The depth is the highest point of the running count (+1 per opening bracket, -1 per
    closing one), summed per run of equal brackets in Python. A valley `][` never holds
    the highest point, so deleting valleys first (bytes.replace, in C) keeps the depth and
    merges runs: what survives 8 passes is structure 9 levels deep, at most one run per 9
    bytes, which bounds the Python loop.
    """
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return True  # nearly every document: not enough brackets to nest that deep
    brackets = _outside_strings(data).translate(_BRACKETS, _NOT_BRACKETS)
    for _ in range(_VALLEY_PASSES):
        shorter = brackets.replace(b"][", b"")
        if len(shorter) == len(brackets):
            break
        brackets = shorter
    depth = 0
    for run in _RUNS.findall(brackets):
        if run[0] == _OPEN:
            depth += len(run)
            if depth > max_depth:
                return False
        else:
            depth -= len(run)
    return True


def _outside_strings(data: bytes) -> bytes:
    """`data` without its JSON strings (brackets inside strings do not nest)."""
    if b'"' not in data:
        return data
    if b"\\" not in data:
        # No escapes: quotes alternate, so every other piece lies outside a string.
        return b"".join(data.split(b'"')[::2])
    return _STRING.sub(b"", data)
