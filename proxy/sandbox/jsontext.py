"""The JSON text the sandbox sends, written the way LuxSci writes it.

LuxSci escapes the "s" of "script" (and so of "description") as \\u0073 to keep
content filters quiet; doing the same here makes clients really parse JSON
rather than pattern-match the raw text. Key order is the order of the dict,
which lets a response put "auth" last, the worst case for a streaming client.
"""

from __future__ import annotations

import json
from typing import Any

# "script" also covers "description"; the letters are never part of an escape, and
# JSON text outside strings has no letters but true/false/null, so this is safe.
_WORD = "script"
_ESCAPED = "\\u0073cript"


def dumps(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (from a client's own "\ud800") cannot be sent as UTF-8.
        text = json.dumps(value, separators=(",", ":"))
    return text


def render(value: Any) -> bytes:
    """API response body: compact JSON, UTF-8, with LuxSci's \\u0073 escapes."""
    return dumps(value).replace(_WORD, _ESCAPED).encode("utf-8")


def filler(size: int) -> str:
    """About `size` bytes of harmless text to make a response large."""
    unit = "luxsci-sandbox-filler-0123456789 "
    return (unit * (size // len(unit) + 1))[:size]
