"""The admin listener: liveness, readiness and Prometheus metrics."""

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


def create_admin_app(readiness: Readiness, registry: CollectorRegistry) -> web.Application:
    app = web.Application()
    app[READINESS] = readiness
    app[REGISTRY] = registry
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
