"""The simulated LuxSci API: request handling in the order the real API applies it.

Expect header -> API host -> fault rules -> rate limits -> auth / signature -> endpoint

In OAuth 2.0 mode (oauth.py) the token endpoint answers first; API requests take the
same path up to the rate limit, then want a Bearer token instead of a signature.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from proxy.sandbox import oauth as oauth_http
from proxy.sandbox import parsing
from proxy.sandbox.auth import authenticate
from proxy.sandbox.call import MAX_BODY, ApiCall
from proxy.sandbox.control import add_control_routes
from proxy.sandbox.endpoints import serve_signed
from proxy.sandbox.faults import FaultRule
from proxy.sandbox.responses import (
    CLOSING_KEY,
    SANDBOX_KEY,
    api_error,
    control_response,
    plain_error,
    stamp_date,
)
from proxy.sandbox.state import Sandbox
from proxy.schemes.luxsci import signing


def make_app(sandbox: Sandbox) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app[SANDBOX_KEY] = sandbox
    app[CLOSING_KEY] = asyncio.Event()
    app.on_response_prepare.append(stamp_date)
    add_control_routes(app)
    app.router.add_route("*", "/{tail:.*}", handle, expect_handler=_no_continue)
    return app


async def _no_continue(request: web.Request) -> None:
    """Never answer `Expect: 100-continue`: the API refuses such requests with 417."""


async def handle(request: web.Request) -> web.StreamResponse:
    sandbox = request.app[SANDBOX_KEY]
    raw_target = parsing.origin_form(request.raw_path)
    path, query = signing.split_target(raw_target)
    oauth = sandbox.oauth
    if oauth is not None and path == oauth_http.TOKEN_PATH:
        return await oauth_http.serve_token(request, oauth)
    route = parsing.classify(path) if oauth is None else oauth_http.route_of(path)
    if route is None:
        return control_response({"success": 0, "error_message": "Not found."}, status=404)
    call = ApiCall(request, sandbox, route, path, query)
    sandbox.request_started()
    status: int | None = 500
    try:
        response = await _serve(call)
        status = None if response is None else response.status
    finally:
        sandbox.request_finished(
            request.method, raw_target, route.scope, status, request.headers.getall("Cookie", [])
        )
    # A dropped connection still needs a response object; writing it fails quietly.
    return response if response is not None else web.Response(status=499)


async def _serve(call: ApiCall) -> web.Response | None:
    request, sandbox = call.request, call.sandbox
    bucket = call.route.bucket
    if request.headers.get("Expect") is not None:
        response = api_error(
            417,
            "Expectation failed: do not send an Expect header.",
            sandbox.limiter.peek(bucket, sandbox.now()),
        )
        # The client may be holding its body back for a "100 Continue" that never
        # comes: end the connection after answering instead of keeping it alive.
        response.force_close()
        return response
    expected = sandbox.config.expected_host
    if expected and parsing.host_name(request.headers.get("Host")) != expected.lower():
        return api_error(
            403,
            "Requests must be addressed to this integration's API host.",
            sandbox.limiter.peek(bucket, sandbox.now()),
        )
    rule = sandbox.take_fault(request.method, call.path)
    if rule is not None:
        if rule.delay:
            await _sleep(request, rule.delay)
        if rule.drop or rule.status is not None:
            return _fault(call, rule)
    if sandbox.oauth is not None:
        return await oauth_http.serve_api(call, sandbox.oauth)
    call.rate = sandbox.limiter.admit(bucket, sandbox.now())
    if call.rate.exceeded is not None:
        sandbox.stats.rate_limited += 1
        if call.rate.exceeded == "day":
            return call.error(403, "Rate limit exceeded: the daily request limit is used up.")
        return call.error(403, "Rate limit exceeded: too many requests in this window.")
    if call.route.scope == "auth" and request.method == "POST":
        return await authenticate(call)
    return await serve_signed(call)


async def _sleep(request: web.Request, seconds: float) -> None:
    # Wake early on shutdown so a long injected delay never holds the server open.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(request.app[CLOSING_KEY].wait(), timeout=seconds)


def _fault(call: ApiCall, rule: FaultRule) -> web.Response | None:
    sandbox = call.sandbox
    bucket = call.route.bucket
    now = sandbox.now()
    if rule.counts_against_limit:
        call.rate = sandbox.limiter.charge(bucket, now)
    else:
        call.rate = sandbox.limiter.peek(bucket, now)
    if rule.drop:
        transport = call.request.transport
        if transport is not None:
            transport.abort()
        return None
    assert rule.status is not None
    if not rule.json:
        return plain_error(rule.status)
    return call.error(rule.status, rule.message())
