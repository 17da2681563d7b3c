"""The admin listener: liveness and readiness (metrics join later)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

Readiness = Callable[[], tuple[bool, dict[str, Any]]]
READINESS: web.AppKey[Readiness] = web.AppKey("readiness")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ready, checks = request.app[READINESS]()
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


def create_admin_app(readiness: Readiness) -> web.Application:
    app = web.Application()
    app[READINESS] = readiness
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
