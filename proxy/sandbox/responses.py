"""Shared pieces of the HTTP layer: app keys, the Date stamp, JSON responses."""

from __future__ import annotations

import asyncio
import json
from email.utils import formatdate
from typing import Any

from aiohttp import web

from proxy.sandbox.jsontext import render
from proxy.sandbox.ratelimit import RateDecision
from proxy.sandbox.state import Sandbox

SANDBOX_KEY = web.AppKey("sandbox", Sandbox)
# Set when the server shuts down, so delayed (fault-injected) requests stop waiting.
CLOSING_KEY = web.AppKey("closing", asyncio.Event)

# Statuses aiohttp has no phrase for; a blank reason line would look broken in logs.
_REASONS = {475: "Incomplete Request"}


async def stamp_date(request: web.Request, response: web.StreamResponse) -> None:
    """Every response tells the server clock (offset included), as clients rely on it for skew."""
    sandbox = request.app[SANDBOX_KEY]
    response.headers["Date"] = formatdate(sandbox.now(), usegmt=True)


def api_response(status: int, payload: Any, rate: RateDecision | None) -> web.Response:
    """A response as the API sends it: LuxSci-style JSON text plus the rate limit headers."""
    headers = {"Content-Type": "application/json", "Pragma": "no-cache"}
    if rate is not None:
        headers.update(rate.headers())
    return web.Response(
        status=status, reason=_REASONS.get(status), body=render(payload), headers=headers
    )


def api_error(status: int, message: str, rate: RateDecision | None) -> web.Response:
    return api_response(status, {"success": 0, "error_message": message}, rate)


def plain_error(status: int) -> web.Response:
    """What a load balancer sends when no API is behind it: HTML, no JSON, no rate headers."""
    reason = _REASONS.get(status)
    response = web.Response(status=status, reason=reason, content_type="text/html")
    label = f"{status} {response.reason}".strip()
    response.text = (
        f"<html><head><title>{label}</title></head><body><h1>{label}</h1></body></html>\n"
    )
    return response


def control_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
