"""Signed requests: the signature cookie, session revocation and the generic endpoints."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from proxy.sandbox import parsing
from proxy.sandbox.call import ApiCall, is_json, read_body
from proxy.sandbox.jsontext import filler
from proxy.sandbox.responses import api_response
from proxy.sandbox.state import CodeState
from proxy.sandbox.uploads import (
    Upload,
    UploadError,
    parse_json_part,
    read_upload,
    verify_attachments,
)
from proxy.schemes.luxsci import signing

_CODE_ERRORS = {
    CodeState.UNKNOWN: "Unknown authentication code.",
    CodeState.EXPIRED: "Authentication code expired.",
    CodeState.REVOKED: "Authentication session revoked.",
}
PROFILE = {
    "name": "Joe Example",
    "description": "Sandbox user profile: this description is sent escaped, as LuxSci does.",
}


async def serve_signed(call: ApiCall) -> web.Response:
    """Every request but the auth POST: signature cookie first, then the endpoint."""
    request = call.request
    upload = None
    if request.content_type == "multipart/form-data":
        try:
            upload = await read_upload(request)
        except UploadError as exc:
            return call.error(400, str(exc))
        body = upload.json_bytes
    else:
        read = await read_body(call)
        if isinstance(read, web.Response):
            return read
        body = read
    session_id, problem = _check_cookie(call, signing.body_hash(body))
    if problem is not None:
        return call.error(401, problem)
    assert session_id is not None
    scope = call.route.scope
    if scope == "auth" and request.method == "DELETE":
        call.sandbox.revoke_session(session_id)
        call.sandbox.stats.revocations += 1
        return api_response(
            200, {"success": 1, "comment": "Authentication session revoked."}, call.rate
        )
    if scope not in ("user", "account"):
        return call.error(405, "no such endpoint")
    return _endpoint(call, session_id, body, upload)


def _check_cookie(call: ApiCall, body_digest: str) -> tuple[str | None, str | None]:
    """(session id, None) for a valid signature cookie, else (None, why it failed)."""
    request = call.request
    value = parsing.signature_cookie(request.headers.getall("Cookie", []))
    if value is None:
        return None, "Missing signature cookie."
    parts = parsing.split_cookie(value)
    if parts is None:
        return None, "Malformed signature cookie: expected <auth_code>:<signature_code>."
    code, given = parts
    state, session_id = call.sandbox.check_code(code)
    if state is not CodeState.VALID:
        return None, _CODE_ERRORS[state]
    secret = call.sandbox.config.secret
    expected = signing.request_signature(
        secret, code, request.method, call.path, call.query, body_digest
    )
    try:
        valid = signing.verify(expected, given)
    except UnicodeEncodeError:  # undecodable bytes in the cookie header
        valid = False
    if not valid:
        return None, "Invalid request signature."
    return session_id, None


def _endpoint(call: ApiCall, session_id: str, body: bytes, upload: Upload | None) -> web.Response:
    """A generic user/account endpoint: echo what arrived, with a fresh auth code."""
    request, route = call.request, call.route
    try:
        shape = parsing.response_shape(call.query)
    except ValueError as exc:
        return call.error(400, str(exc))
    payload: Any = None
    data: dict[str, Any] = {
        "method": request.method,
        "path": call.path,
        "query": call.query,
        "scope": route.scope,
        "target": route.target,
    }
    try:
        if upload is not None:
            payload = parse_json_part(upload.json_bytes)
            data["attachments"] = verify_attachments(payload, upload.files)
        elif body:
            if not is_json(request):
                return call.error(400, "Content-Type must be application/json.")
            payload = json.loads(body)
    except UploadError as exc:
        return call.error(400, str(exc))
    except (UnicodeDecodeError, ValueError):
        return call.error(400, "Request body is not valid JSON.")
    data["json"] = payload
    if route.scope == "user" and route.endpoint == ("profile",) and request.method == "GET":
        data.update({"login": unquote(route.target), **PROFILE})
    if shape.filler_bytes:
        data["filler"] = filler(shape.filler_bytes)
    code = call.sandbox.issue_code(session_id)
    if shape.auth_last:
        result: dict[str, Any] = {"success": 1, "data": data, "auth": code}
    else:
        result = {"auth": code, "success": 1, "data": data}
    return api_response(200, result, call.rate)
