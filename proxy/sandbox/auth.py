"""POST /perl/api/v2/auth: token, date, signature (and user) in; a new session out."""

from __future__ import annotations

import hmac
import json

from aiohttp import web

from proxy.sandbox import parsing
from proxy.sandbox.call import ApiCall, is_json, read_body
from proxy.sandbox.config import SandboxConfig
from proxy.sandbox.responses import api_response
from proxy.schemes.luxsci import signing

# How far the auth request's date may lag behind / run ahead of the server clock.
DATE_BEHIND = 15 * 60
DATE_AHEAD = 60
INVALID_CREDENTIALS = "Invalid authentication credentials."


async def authenticate(call: ApiCall) -> web.Response:
    """POST /perl/api/v2/auth: check token, date, signature (and user) and start a session."""
    sandbox, config = call.sandbox, call.sandbox.config
    if not is_json(call.request):
        return call.error(400, "Content-Type must be application/json.")
    body = await read_body(call)
    if isinstance(body, web.Response):
        return body
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return call.error(400, "Request body is not valid JSON.")
    if not isinstance(payload, dict):
        return call.error(400, "Request body must be a JSON object.")
    token, date, signature = payload.get("token"), payload.get("date"), payload.get("signature")
    user, password = payload.get("user"), payload.get("pass")
    if not (isinstance(token, str) and isinstance(signature, str)):
        return call.error(401, INVALID_CREDENTIALS)
    if not all(value is None or isinstance(value, str) for value in (user, password)):
        return call.error(401, INVALID_CREDENTIALS)
    when = parsing.parse_auth_date(date)
    if when is None:
        return call.error(401, "Invalid date: send epoch seconds or a standard date string.")
    now = sandbox.now()
    if not now - DATE_BEHIND <= when <= now + DATE_AHEAD:
        return call.error(
            401,
            "Request date is too far from the server clock (at most 15 minutes behind or "
            "1 minute ahead; the Date response header tells the server time).",
        )
    # The date is signed exactly as it was sent: a JSON number as its digits.
    date_text = date if isinstance(date, str) else str(date)
    try:
        ok = _credentials_ok(config, token, date_text, signature, user, password)
    except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape
        ok = False
    if not ok:
        return call.error(401, INVALID_CREDENTIALS)
    code = sandbox.start_session(user)
    return api_response(201, {"auth": code, "success": 1}, call.rate)


def _credentials_ok(
    config: SandboxConfig,
    token: str,
    date_text: str,
    signature: str,
    user: str | None,
    password: str | None,
) -> bool:
    # Every comparison runs, so timing does not tell which part was wrong.
    expected = signing.auth_signature(config.secret, token, date_text, user, password)
    ok = hmac.compare_digest(token.encode(), config.token.encode())
    ok &= signing.verify(expected, signature)
    if user is not None:
        known = config.users.get(user)
        ok &= known is not None and hmac.compare_digest(known.encode(), (password or "").encode())
    return ok
