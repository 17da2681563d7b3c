"""The admin listener: liveness, readiness and Prometheus metrics.

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
READINESS: web.AppKey[Readiness] = web.AppKey("readiness")
REGISTRY: web.AppKey[CollectorRegistry] = web.AppKey("registry")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ready, checks = request.app[READINESS]()
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _no_server_header(request: web.Request, response: web.StreamResponse) -> None:
    # on_response_prepare runs after aiohttp has filled in its default headers and
    # before they are written: the one public place to take its Server header out.
    response.headers.popall("Server", None)


def create_admin_app(readiness: Readiness, registry: CollectorRegistry) -> web.Application:
    app = web.Application()
    app.on_response_prepare.append(_no_server_header)
    app[READINESS] = readiness
    app[REGISTRY] = registry
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
