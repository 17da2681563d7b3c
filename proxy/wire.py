"""Header lines between bytes and text, unchanged both ways: shared by the listener and
the upstream client."""

from __future__ import annotations

from collections.abc import Iterable


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


def header_line(name: str, value: str) -> bytes:
    """One header line; text decoded from the wire goes back to the same bytes."""
    return f"{name}: {value}\r\n".encode("utf-8", "surrogateescape")


def header_lines(headers: Iterable[tuple[str, str]]) -> bytes:
    return b"".join([header_line(k, v) for k, v in headers])
