"""The admin listener: the status page, liveness, readiness and Prometheus metrics.

`/` is a status page for people and `/status.json` the same data for programs
(proxy/observe/status.py); both are made when asked for, from values the service
reads without I/O, and both carry a Content-Security-Policy and `no-store`.

Its answers carry no `Server` header: aiohttp would announce itself and the Python
version (`Python/3.11 aiohttp/3.x`), which only helps someone matching known
vulnerabilities to a version. aiohttp's own answer to a request too malformed to
route (its parser's 400) is made before any application hook runs and still
carries it (aiohttp#8870); the NetworkPolicy in deploy/kubernetes/ limits who can
send one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Readiness = Callable[[], tuple[bool, dict[str, Any]]]
# One integration's readiness by name; None when there is no such integration.
IntegrationReadiness = Callable[[str], tuple[bool, dict[str, Any]] | None]
# The status of the integration named (None: all of them, or the only one); None when
# there is no integration of that name.
Status = Callable[[str | None], dict[str, Any] | None]
READINESS: web.AppKey[Readiness] = web.AppKey("readiness")
REGISTRY: web.AppKey[CollectorRegistry] = web.AppKey("registry")
STATUS: web.AppKey[Status] = web.AppKey("status")
INTEGRATION_READINESS: web.AppKey[IntegrationReadiness] = web.AppKey("integration_readiness")

# Every status answer: never cached (it is a moment's state), never sniffed as another
# type, never framed, and no Referer sent from the page.
_NO_STORE = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_JSON_HEADERS = {
    **_NO_STORE,
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
}


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    name = request.query.get("integration")
    if name is None:
        ready, checks = request.app[READINESS]()
        return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)
    found = request.app[INTEGRATION_READINESS](name)
    if found is None:
        return _no_integration(name)
    ready, checks = found
    return web.json_response(
        {"integration": name, "ready": ready, "checks": checks}, status=200 if ready else 503
    )


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _no_integration(name: str) -> web.Response:
    # The proxy's usual error shape (proxy/errors.py), as on the proxy port.
    return web.json_response(
        {
            "success": 0,
            "error_message": f"no integration named {name!r}" if name else "no integration runs",
        },
        status=404,
        headers={"X-Proxy-Error": "unknown_integration"},
    )


async def status_page(request: web.Request) -> web.Response:
    # The page's module is loaded when first asked for (a proxy nobody looks at never
    # loads it).
    from proxy.observe import status

    name = request.query.get("integration")
    data = request.app[STATUS](name)
    if data is None:
        return _no_integration(name or "")
    if "proxy" not in data:
        # Several integrations: the page shows one at a time (its script reads that
        # one's status.json), with links to the others; the first to begin with.
        first = next(iter(data["integrations"]), None)
        if first is None:
            return _no_integration("")
        raise web.HTTPFound(f"?integration={first}")
    page = status.render_html(data)
    headers = {**_NO_STORE, "Content-Security-Policy": status.CONTENT_SECURITY_POLICY}
    return web.Response(text=page, content_type="text/html", charset="utf-8", headers=headers)


async def status_json(request: web.Request) -> web.Response:
    from proxy.observe import status

    name = request.query.get("integration")
    data = request.app[STATUS](name)
    if data is None:
        return _no_integration(name or "")
    body = status.to_json(data)
    return web.Response(text=body, content_type="application/json", headers=_JSON_HEADERS)


async def _no_server_header(request: web.Request, response: web.StreamResponse) -> None:
    # on_response_prepare runs after aiohttp has filled in its default headers and
    # before they are written: the one public place to take its Server header out.
    response.headers.popall("Server", None)


def create_admin_app(
    readiness: Readiness,
    registry: CollectorRegistry,
    status: Status | None = None,
    integration_readiness: IntegrationReadiness | None = None,
) -> web.Application:
    """`status`: the status page's data (status.snapshot); None serves no page.
    `integration_readiness`: /readyz?integration=NAME (default: one named `default`)."""
    app = web.Application()
    app.on_response_prepare.append(_no_server_header)
    app[READINESS] = readiness
    app[INTEGRATION_READINESS] = (
        integration_readiness
        if integration_readiness is not None
        else lambda name: readiness() if name == "default" else None
    )
    app[REGISTRY] = registry
    if status is not None:
        app[STATUS] = status
        app.router.add_get("/", status_page)
        app.router.add_get("/status.json", status_json)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
