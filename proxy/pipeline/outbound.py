"""Turning a client's request into the outbound request: validation, body, headers.

Header filtering is pure (tested on plain data); `read_request` is the only
part that touches the client connection.
"""

from __future__ import annotations

import json

from proxy.errors import BadRequest
from proxy.http.headers import header_line, strip_signature_cookie, upstream_block
from proxy.http.server import Request
from proxy.schemes.base import Outbound
from proxy.schemes.luxsci import multipart, signing

_FORM = "application/x-www-form-urlencoded"


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
