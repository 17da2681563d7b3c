"""Turning a client's request into the outbound request: validation, body, headers.

Header filtering is pure (tested on plain data); `read_request` is the only
part that touches the client connection.

JSON bodies are parsed (validated) only up to `jsonbounds.PARSE_LIMIT` (64 KiB), and
checked for nesting deeper than `jsonbounds.MAX_DEPTH` (400) up to `SCAN_LIMIT`
(256 KiB): this work runs on the event loop every client shares. Larger bodies go to
the API as they are, for it to judge: an untyped one is sent as JSON when its ends say
so (`{...}` or `[...]`), an `application/json` one unchecked.

A spooled body (proxy/http/body.py) gets the same rules: one up to SCAN_LIMIT (spooled
only because the global memory cap was reached) is read back and judged as if it were in
memory; a larger one is judged by its ends, read from the file. A multipart upload is
parsed from a read-only mapping of its file (one at a time: the parse never awaits, and
the mapping is closed before the next request runs), so only its `json` part is copied
into memory; when that part is filled in, the new body is another spool file, copied
from the first by the kernel. The body's own digest was computed as it was spooled.
"""

from __future__ import annotations

import json

from proxy.errors import BadRequest
from proxy.http.body import Body, Spool
from proxy.http.headers import header_line, strip_signature_cookie, upstream_block
from proxy.http.server import Request
from proxy.jsonbounds import MAX_DEPTH, PARSE_LIMIT, SCAN_LIMIT, nesting_within
from proxy.schemes.base import Outbound
from proxy.schemes.luxsci import multipart, signing
from proxy.target import Target

_FORM = "application/x-www-form-urlencoded"
_SPACE = b" \t\r\n"
# How far in from either end a JSON document's bracket is looked for in a large body.
_EDGE = 4096
_CLOSER = {b"{": b"}", b"[": b"]"}


def _looks_like_json(body: bytes) -> bool:
    """Whether an untyped body is JSON: parsed when small, judged by its ends when large."""
    # Slices first: stripping the whole body would copy it.
    if not _opens_json(body[:_EDGE]):
        return False
    _check_nesting(body)
    if len(body) > PARSE_LIMIT:
        return _ends_json(body[:_EDGE], body[-_EDGE:])
    try:
        json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return True


def _opens_json(head: bytes) -> bool:
    return head.lstrip(_SPACE)[:1] in _CLOSER


def _ends_json(head: bytes, tail: bytes) -> bool:
    """Whether a large body's last bracket closes its first."""
    return tail.rstrip(_SPACE)[-1:] == _CLOSER[head.lstrip(_SPACE)[:1]]


def _check_nesting(body: bytes) -> None:
    if len(body) <= SCAN_LIMIT and not nesting_within(body):
        raise BadRequest(f"the JSON body nests deeper than {MAX_DEPTH} levels")


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
    """The API takes UTF-8 JSON: say what is wrong before it has to (small bodies only)."""
    _check_nesting(body)
    if len(body) > PARSE_LIMIT:
        return  # not parsed on the event loop: the API judges it (module docstring)
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


def prepare(content_type: str, body: Body) -> tuple[Body, str, str | None]:
    """`prepare_body` for a body in memory or spooled: (body to send, digest to sign,
    Content-Type to send instead or None). A body that had to change replaces the one
    given, which is then closed."""
    data = body.in_memory
    if data is not None:  # the usual case: exactly what it always was
        sent, digest, new_type = prepare_body(content_type, data)
        if sent is not data:
            new = body.with_bytes(sent)
            body.close()
            return new, digest, new_type
        return body, digest, new_type
    boundary = multipart.boundary_of(content_type) if content_type else None
    if boundary is not None:
        with body.mapped() as mapping:
            plan = multipart.plan_upload(mapping, boundary)
        cut = plan.splice
        if cut is None:
            return body, plan.body_digest, None
        new = body.spliced(cut.start, cut.end, cut.insert)
        body.close()
        return new, plan.body_digest, None
    assert body.digest is not None, "a spooled body is hashed on its way in"
    if body.size <= SCAN_LIMIT:
        # Spooled only because the memory cap was reached: judged as it would be in memory.
        return body, body.digest, prepare_body(content_type, body.read(0, body.size))[2]
    media = content_type.split(";", 1)[0].strip().lower()
    if media in ("", _FORM):
        head = body.read(0, _EDGE)
        if _opens_json(head) and _ends_json(head, body.read(body.size - _EDGE, _EDGE)):
            return body, body.digest, "application/json"
    return body, body.digest, None


async def read_request(
    request: Request, target: Target, spool: Spool, max_body: int, time_limit: float
) -> Outbound:
    """The outbound request for an already checked target: headers, body, digest. The
    caller closes `Outbound.body`."""
    headers = request.headers
    body = await request.receive_body(max_body, time_limit, spool)
    try:
        body, digest, content_type = prepare(headers.get("Content-Type", ""), body)
    except BaseException:
        body.close()
        raise
    lines = upstream_block(request.raw_headers, headers, retyped=content_type is not None)
    if content_type is not None:
        lines += header_line("Content-Type", content_type)
    cookies = strip_signature_cookie(headers.getall("Cookie", [])) if "Cookie" in headers else None
    return Outbound(
        request.method,
        target.path,
        target.query,
        lines,
        body,
        digest,
        cookies,
        has_query=target.has_query,
    )
