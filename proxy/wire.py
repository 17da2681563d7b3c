"""Header bytes as text: shared by the listener (requests) and the upstream client (answers)."""

from __future__ import annotations


def decode_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Header lines as text, any bytes kept (as aiohttp's parsers decode them), so that
    they can be encoded back byte for byte."""
    try:
        # Nearly always plain UTF-8 (ASCII): the strict codec, with no error handler, is
        # the fast one (about half the cost per header).
        return [(n.decode(), v.decode()) for n, v in raw]
    except UnicodeDecodeError:
        return [
            (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
            for n, v in raw
        ]
