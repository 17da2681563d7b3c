"""One API request as it moves through the sandbox's pipeline."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from proxy.sandbox.parsing import Route
from proxy.sandbox.ratelimit import RateDecision
from proxy.sandbox.responses import api_error
from proxy.sandbox.state import Sandbox

MAX_BODY = 64 * 1024 * 1024


@dataclass
class ApiCall:
    """One API request, with the raw target split once."""

    request: web.Request
    sandbox: Sandbox
    route: Route
    path: str
    query: str
    # Filled in once the request is counted; every later response reports it.
    rate: RateDecision | None = None

    def error(self, status: int, message: str) -> web.Response:
        return api_error(status, message, self.rate)


def is_json(request: web.Request) -> bool:
    return request.content_type == "application/json"


async def read_body(call: ApiCall) -> bytes | web.Response:
    try:
        return await call.request.read()
    except web.HTTPRequestEntityTooLarge:
        return call.error(413, f"Request body larger than {MAX_BODY} bytes.")
