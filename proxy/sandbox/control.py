"""/_sandbox/...: test and demo controls. No auth, no rate limits, never logged as API calls."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from proxy.sandbox.faults import FaultRule
from proxy.sandbox.oauth import add_oauth_control_routes
from proxy.sandbox.responses import SANDBOX_KEY, control_response

PREFIX = "/_sandbox"


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise web.HTTPBadRequest(
            body=json.dumps({"success": 0, "error_message": f"invalid JSON: {exc}"}),
            content_type="application/json",
        ) from exc


def _bad(message: str) -> web.Response:
    return control_response({"success": 0, "error_message": message}, status=400)


async def get_stats(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX_KEY]
    stats = sandbox.stats.as_dict()
    if sandbox.oauth is not None:
        stats["oauth"] = sandbox.oauth.stats.as_dict()
    return control_response(stats)


async def get_faults(request: web.Request) -> web.Response:
    rules = request.app[SANDBOX_KEY].faults.pending
    return control_response({"success": 1, "faults": [rule.as_dict() for rule in rules]})


async def add_faults(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX_KEY]
    body = await _json_body(request)
    items = body if isinstance(body, list) else [body]
    try:
        # Validate them all first so a bad list adds nothing.
        rules = [FaultRule.from_dict(item) for item in items]
    except (TypeError, ValueError) as exc:
        return _bad(f"invalid fault rule: {exc}")
    for rule in rules:
        sandbox.add_fault(rule)
    return control_response(
        {"success": 1, "added": len(rules), "pending": len(sandbox.faults.pending)}
    )


async def clear_faults(request: web.Request) -> web.Response:
    request.app[SANDBOX_KEY].clear_faults()
    return control_response({"success": 1})


async def revoke(request: web.Request) -> web.Response:
    request.app[SANDBOX_KEY].revoke_all()
    return control_response({"success": 1})


async def expire(request: web.Request) -> web.Response:
    request.app[SANDBOX_KEY].expire_all()
    return control_response({"success": 1})


async def get_clock(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX_KEY]
    return control_response({"success": 1, "offset": sandbox.clock_offset, "now": sandbox.now()})


async def set_clock(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX_KEY]
    body = await _json_body(request)
    offset = body.get("offset") if isinstance(body, dict) else None
    if isinstance(offset, bool) or not isinstance(offset, int | float):
        return _bad('expected {"offset": <seconds>}')
    try:
        sandbox.set_clock_offset(offset)
    except ValueError as exc:
        return _bad(str(exc))
    return control_response({"success": 1, "offset": sandbox.clock_offset, "now": sandbox.now()})


async def reset(request: web.Request) -> web.Response:
    request.app[SANDBOX_KEY].reset()
    return control_response({"success": 1})


def add_control_routes(app: web.Application) -> None:
    router = app.router
    router.add_get(f"{PREFIX}/stats", get_stats)
    router.add_get(f"{PREFIX}/faults", get_faults)
    router.add_post(f"{PREFIX}/faults", add_faults)
    router.add_delete(f"{PREFIX}/faults", clear_faults)
    router.add_post(f"{PREFIX}/revoke", revoke)
    router.add_post(f"{PREFIX}/expire", expire)
    router.add_get(f"{PREFIX}/clock", get_clock)
    router.add_post(f"{PREFIX}/clock", set_clock)
    router.add_post(f"{PREFIX}/reset", reset)
    add_oauth_control_routes(app, PREFIX)
