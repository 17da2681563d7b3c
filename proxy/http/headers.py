"""Header lines between bytes and text, unchanged both ways: shared by the listener and
the upstream client."""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDict, CIMultiDictProxy


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


# RFC 9110 7.6.1 hop-by-hop fields, plus the non-standard ones clients still send.
# Names as bytes: header lines are filtered as received, before any decoding.
HOP_BY_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    )
)
# Never upstream: Host and Content-Length are the client library's to set;
# Expect makes the API answer 417; credentials are the proxy's to add; X-Request-ID
# is added by the proxy (the client's, when it is a sane token).
_DROP_UPSTREAM = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"authorization",
    b"cookie",
    b"x-request-id",
}
# When the proxy sets the Content-Type itself, the client's is left out too.
_DROP_RETYPED = _DROP_UPSTREAM | {b"content-type"}
# From responses the framing is re-done for the client connection.
_DROP_DOWNSTREAM = HOP_BY_HOP | {b"content-length"}

# The Connection values nearly every message carries: they name no other field.
_PLAIN_CONNECTION = frozenset({"keep-alive", "close"})


def _drop_set(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], always: frozenset[bytes]
) -> frozenset[bytes]:
    """`always`, plus the fields named in `Connection` (hop-by-hop too, RFC 9110 7.6.1)."""
    values = headers.getall("Connection", ())
    if not values or (len(values) == 1 and values[0].strip().lower() in _PLAIN_CONNECTION):
        return always  # the usual case: no set built per message
    tokens = {
        t.strip().lower().encode("utf-8", "surrogateescape")
        for value in values
        for t in value.split(",")
        if t.strip()
    }
    return always | tokens


def _cookie_name(pair: str) -> str:
    """A cookie pair's name as a server might read it: trimmed, unquoted, lower case."""
    return pair.split("=", 1)[0].strip().strip('"').strip().lower()


def strip_cookies(cookie_headers: list[str], names: tuple[str, ...]) -> str | None:
    """The cookies of `cookie_headers` (joined into one value) minus those called `names`.

    Names match as a server might read them: in any case, quoted or not, and also inside
    an item that old clients joined with commas (`a=b,signature=EVIL`), so no spelling
    of a cookie the proxy makes itself gets through. An item with no such name is kept
    byte for byte (a comma may be part of a value)."""
    wanted = {n.lower() for n in names}
    kept = []
    for header in cookie_headers:
        for item in header.split(";"):
            pair = item.strip()
            if not pair:
                continue
            pieces = pair.split(",")
            if not any(_cookie_name(piece) in wanted for piece in pieces):
                kept.append(pair)
                continue
            rest = [p.strip() for p in pieces if p.strip() and _cookie_name(p) not in wanted]
            if rest:
                kept.append(",".join(rest))
    return "; ".join(kept) if kept else None


def strip_signature_cookie(cookie_headers: list[str]) -> str | None:
    """The client's cookies minus any `signature` one (that is the proxy's to make)."""
    return strip_cookies(cookie_headers, ("signature",))


def upstream_block(
    raw: list[tuple[bytes, bytes]],
    headers: CIMultiDictProxy[str] | CIMultiDict[str],
    retyped: bool = False,
) -> bytes:
    """The client's header lines minus hop-by-hop ones, credentials, X-Proxy-* (ours)
    and any name with an underscore, as received (`headers`: the same, decoded).
    `retyped`: the proxy sets the Content-Type, so the client's is left out.

    Underscores: CGI-style servers (the LuxSci API is Perl) read `X_Forwarded_For` and
    `X-Forwarded-For` as one variable, HTTP_X_FORWARDED_FOR, so such a name could carry a
    value past every rule here that looks for the dashed name (`Transfer_Encoding`,
    `Proxy_Authorization`, `X_Request_ID`). Dropped, as nginx drops them by default
    (underscores_in_headers off)."""
    drop = _drop_set(headers, _DROP_RETYPED if retyped else _DROP_UPSTREAM)
    return b"".join(
        [
            n + b": " + v + b"\r\n"
            for n, v in raw
            if (low := n.lower()) not in drop
            and not low.startswith(b"x-proxy-")
            and b"_" not in low
        ]
    )


def downstream_block(raw: list[tuple[bytes, bytes]], headers: CIMultiDictProxy[str]) -> bytes:
    """The answer's end-to-end header lines, as received (`headers`: the same, decoded)."""
    drop = _drop_set(headers, _DROP_DOWNSTREAM)
    return b"".join([n + b": " + v + b"\r\n" for n, v in raw if n.lower() not in drop])
