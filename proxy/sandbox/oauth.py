"""The sandbox's OAuth 2.0 mode over HTTP: the token endpoint, the Bearer API, controls.

The token endpoint (TOKEN_PATH) is the authorization server of oauth_state.py. The API
(RFC 6750) wants `Authorization: Bearer <access token>` on every request and answers 401
with a `WWW-Authenticate: Bearer` challenge otherwise; past its rate limit it answers
429 with Retry-After (seconds or an HTTP-date), and it states its limit in the header
dialect chosen (X-RateLimit-* with an epoch or a relative reset, or the IETF fields).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
from email.utils import formatdate
from typing import Any

from aiohttp import web

from proxy.sandbox import parsing
from proxy.sandbox.call import ApiCall, is_json, read_body
from proxy.sandbox.config import TOKEN_PATH
from proxy.sandbox.oauth_state import OAuthState, encode_answer
from proxy.sandbox.ratelimit import RateDecision
from proxy.sandbox.responses import CLOSING_KEY, SANDBOX_KEY, control_response

__all__ = ["TOKEN_PATH", "add_oauth_control_routes", "route_of", "serve_api", "serve_token"]

_REALM = 'Bearer realm="sandbox"'


def route_of(path: str) -> parsing.Route:
    """Every path is the API's here; LuxSci-shaped ones keep their budget."""
    return parsing.classify(path) or parsing.Route("api")


async def serve_token(request: web.Request, oauth: OAuthState) -> web.Response:
    """POST TOKEN_PATH: the authorization server. Not an API call: no rate limit."""
    body = await request.read()
    answer = oauth.token(
        request.method, request.content_type, request.headers.get("Authorization"), body
    )
    if oauth.settings.token_delay:
        # Wake early on shutdown so a slow endpoint never holds the server open.
        closing = request.app[CLOSING_KEY]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), timeout=oauth.settings.token_delay)
    content_type = "application/json" if answer.payload is not None else "text/plain"
    return web.Response(
        status=answer.status,
        body=encode_answer(answer),
        headers={"Content-Type": content_type, **answer.headers},
    )


async def serve_api(call: ApiCall, oauth: OAuthState) -> web.Response:
    """An API request: the rate limit, then the Bearer token, then an echo of the request."""
    request, sandbox = call.request, call.sandbox
    call.rate = sandbox.limiter.admit(call.route.bucket, sandbox.now())
    if call.rate.exceeded is not None:
        sandbox.stats.rate_limited += 1
        oauth.stats.rate_limited += 1
        return _answer(
            call,
            oauth,
            429,
            {"error": "rate_limited", "error_description": "Too many requests."},
            {"Retry-After": _retry_after(call, oauth, call.rate)},
        )
    problem = oauth.check_access(request.headers.get("Authorization"))
    if problem is not None:
        oauth.stats.api_unauthorized += 1
        challenge = (
            f'{_REALM}, error="invalid_token", error_description="{problem}"' if problem else _REALM
        )
        return _answer(
            call,
            oauth,
            401,
            {"error": "invalid_token" if problem else "unauthorized"},
            {"WWW-Authenticate": challenge},
        )
    body = await read_body(call)
    if isinstance(body, web.Response):
        return body
    payload: Any = None
    if body:
        if not is_json(request):
            return _answer(call, oauth, 400, {"error": "Content-Type must be application/json."})
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            return _answer(call, oauth, 400, {"error": "Request body is not valid JSON."})
    data = {"method": request.method, "path": call.path, "query": call.query, "json": payload}
    return _answer(call, oauth, 200, {"success": 1, "data": data})


def _answer(
    call: ApiCall,
    oauth: OAuthState,
    status: int,
    payload: Any,
    extra: dict[str, str] | None = None,
) -> web.Response:
    headers = {
        "Content-Type": "application/json",
        **rate_headers(call, oauth, call.rate),
        **(extra or {}),
    }
    return web.Response(status=status, body=json.dumps(payload).encode(), headers=headers)


def rate_headers(call: ApiCall, oauth: OAuthState, rate: RateDecision | None) -> dict[str, str]:
    """The limit as the configured dialect states it (limits/headers.py reads them all)."""
    if rate is None:
        return {}
    style = oauth.settings.rate_headers
    delta = max(0, math.ceil(rate.reset - call.sandbox.now()))
    window = call.sandbox.config.window_seconds
    if style == "x":
        return rate.headers()
    if style == "x-delta":
        return {**rate.headers(), "X-RateLimit-Reset": str(delta)}
    if style == "ietf":
        return {
            "RateLimit-Policy": f"{rate.limit};w={window}",
            "RateLimit": f"limit={rate.limit}, remaining={rate.remaining}, reset={delta}",
        }
    if style == "ietf-split":
        return {
            "RateLimit-Limit": f"{rate.limit}, {rate.limit};w={window}",
            "RateLimit-Remaining": str(rate.remaining),
            "RateLimit-Reset": str(delta),
        }
    return {}


def _retry_after(call: ApiCall, oauth: OAuthState, rate: RateDecision) -> str:
    if oauth.settings.retry_after == "date":
        # An HTTP-date has whole seconds: the first one at or after the reset.
        return formatdate(math.ceil(rate.reset), usegmt=True)
    return str(max(1, math.ceil(rate.reset - call.sandbox.now())))


# -- controls -----------------------------------------------------------------------------------


def _oauth(request: web.Request) -> OAuthState:
    oauth = request.app[SANDBOX_KEY].oauth
    if oauth is None:
        raise web.HTTPNotFound(
            text=json.dumps({"success": 0, "error_message": "the sandbox is not in OAuth mode"}),
            content_type="application/json",
        )
    return oauth


async def _body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise web.HTTPBadRequest(
            text=json.dumps({"success": 0, "error_message": f"invalid JSON: {exc}"}),
            content_type="application/json",
        ) from exc


def _bad(message: str) -> web.Response:
    return control_response({"success": 0, "error_message": message}, status=400)


async def mint(request: web.Request) -> web.Response:
    return control_response({"success": 1, "refresh_token": _oauth(request).mint_refresh_token()})


async def revoke(request: web.Request) -> web.Response:
    oauth = _oauth(request)
    body = await _body(request)
    if not isinstance(body, dict) or set(body) - {"access", "refresh"}:
        return _bad('expected {"access": true|false, "refresh": true|false}')
    oauth.revoke(bool(body.get("access", True)), bool(body.get("refresh", True)))
    return control_response({"success": 1})


async def expire(request: web.Request) -> web.Response:
    _oauth(request).expire()
    return control_response({"success": 1})


async def inject_error(request: web.Request) -> web.Response:
    oauth = _oauth(request)
    try:
        oauth.inject(await _body(request))
    except ValueError as exc:
        return _bad(str(exc))
    return control_response({"success": 1})


async def settings(request: web.Request) -> web.Response:
    oauth = _oauth(request)
    try:
        oauth.update(await _body(request))
    except (TypeError, ValueError) as exc:
        return _bad(str(exc))
    current = dataclasses.asdict(oauth.settings)
    current.pop("client_secret")
    return control_response({"success": 1, "settings": current})


def add_oauth_control_routes(app: web.Application, prefix: str) -> None:
    router = app.router
    router.add_post(f"{prefix}/oauth/refresh-token", mint)
    router.add_post(f"{prefix}/oauth/revoke", revoke)
    router.add_post(f"{prefix}/oauth/expire", expire)
    router.add_post(f"{prefix}/oauth/error", inject_error)
    router.add_post(f"{prefix}/oauth/settings", settings)
