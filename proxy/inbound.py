"""Turning a client's request into the outbound request: validation, body, headers.

Header filtering is pure (tested on plain data); `read_request` is the only
part that touches the client connection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy

from proxy import multipart, signing
from proxy.errors import BadRequest
from proxy.listener import Request
from proxy.wire import header_line

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

_FORM = "application/x-www-form-urlencoded"


@dataclass(slots=True)
class Outbound:
    """One request as it goes upstream (before the auth scheme adds credentials)."""

    method: str
    path: str
    query: str
    # The client's end-to-end header lines, as received (filtered), then ours.
    lines: bytes
    body: bytes
    body_digest: str
    # The client's own cookies, minus any `signature` one; the scheme adds its own.
    cookies: str | None = None
    # The scheme's header lines (Cookie, Authorization): replaced on every attempt.
    credentials: bytes = b""

    def cookie_header(self, extra: str | None = None) -> str | None:
        parts = [c for c in (self.cookies, extra) if c]
        return "; ".join(parts) if parts else None


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


def strip_signature_cookie(cookie_headers: list[str]) -> str | None:
    """The client's cookies minus any `signature` one (that is the proxy's to make)."""
    kept = []
    for header in cookie_headers:
        for item in header.split(";"):
            pair = item.strip()
            if pair and pair.split("=", 1)[0].strip() != "signature":
                kept.append(pair)
    return "; ".join(kept) if kept else None


def upstream_block(
    raw: list[tuple[bytes, bytes]],
    headers: CIMultiDictProxy[str] | CIMultiDict[str],
    retyped: bool = False,
) -> bytes:
    """The client's header lines minus hop-by-hop ones, credentials, and X-Proxy-* (ours),
    as received (`headers`: the same, decoded). `retyped`: the proxy sets the
    Content-Type, so the client's is left out."""
    drop = _drop_set(headers, _DROP_RETYPED if retyped else _DROP_UPSTREAM)
    return b"".join(
        [
            n + b": " + v + b"\r\n"
            for n, v in raw
            if (low := n.lower()) not in drop and not low.startswith(b"x-proxy-")
        ]
    )


def downstream_block(raw: list[tuple[bytes, bytes]], headers: CIMultiDictProxy[str]) -> bytes:
    """The answer's end-to-end header lines, as received (`headers`: the same, decoded)."""
    drop = _drop_set(headers, _DROP_DOWNSTREAM)
    return b"".join([n + b": " + v + b"\r\n" for n, v in raw if n.lower() not in drop])


# CONNECT would make the proxy a tunnel; TRACE would have the API echo the request,
# signature cookie (a live auth code) included, back to the client.
_REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})


def check_method(method: str) -> None:
    if method in _REFUSED_METHODS:
        raise BadRequest(f"{method} is not forwarded by the proxy")


def check_target(raw_target: str) -> tuple[str, str]:
    """Only origin-form targets (`/path?query`): nothing may redirect the proxy elsewhere."""
    if not raw_target.startswith("/") or raw_target.startswith("//"):
        raise BadRequest(
            "the request target must be a path such as /perl/api/v2/...; absolute URLs, "
            "authority-form (CONNECT) and '*' targets are not accepted"
        )
    return signing.split_target(raw_target)


def _looks_like_json(body: bytes) -> bool:
    head = body.lstrip(b" \t\r\n")[:1]
    if head not in (b"{", b"["):
        return False
    try:
        json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return True


def prepare_body(content_type: str, body: bytes) -> tuple[bytes, str, str | None]:
    """(body to send, body digest to sign, the Content-Type to send instead of the
    client's or None to keep it)."""
    if not body:
        return body, "", None
    boundary = multipart.boundary_of(content_type) if content_type else None
    if boundary is not None:
        upload = multipart.prepare_upload(body, boundary)
        return upload.body, upload.body_digest, None
    # The API takes only JSON bodies; a legacy client (or `curl -d`) that sends
    # JSON without a type, or labelled as a form, gets the type the API needs.
    media = content_type.split(";", 1)[0].strip().lower()
    if media in ("", _FORM) and _looks_like_json(body):
        return body, signing.body_hash(body), "application/json"
    if media == "application/json" or media.endswith("+json"):
        check_json(body)
    return body, signing.body_hash(body), None


def check_json(body: bytes) -> None:
    """The API takes UTF-8 JSON: say what is wrong before it has to."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"the JSON body is not UTF-8 (byte {e.start})") from None
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRequest(
            f"the JSON body is not valid JSON (line {e.lineno} column {e.colno})"
        ) from None


async def read_request(
    request: Request, path: str, query: str, max_body: int, time_limit: float
) -> Outbound:
    """The outbound request for an already checked target: headers, body, digest."""
    headers = request.headers
    body = await request.read_body(max_body, time_limit)
    body, digest, content_type = prepare_body(headers.get("Content-Type", ""), body)
    lines = upstream_block(request.raw_headers, headers, retyped=content_type is not None)
    if content_type is not None:
        lines += header_line("Content-Type", content_type)
    cookies = strip_signature_cookie(headers.getall("Cookie", [])) if "Cookie" in headers else None
    return Outbound(request.method, path, query, lines, body, digest, cookies)
