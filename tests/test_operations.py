"""Operations: graceful drain, reload, readiness and the log events operators read."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import aiohttp
import pytest
from conftest import PASSWORD, USER, MakeProxy, MakeSandbox, RunningProxy, raw_exchange
from structlog.testing import capture_logs

from proxy.config import Secret
from proxy.sandbox import SandboxServer

USER_PATH = f"/perl/api/v2/user/{USER}/profile"


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str], dict]:
    async with http.get(url) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def test_drain_finishes_in_flight_answers_the_rest_503_then_revokes(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await make_sandbox(window_seconds=30, user_per_window=1)
    proxy = await make_proxy(
        sandbox.url,
        limits={"window_seconds": 30, "user_per_minute": 1},
        shutdown_timeout=1.0,
    )
    sandbox.sandbox.add_fault(delay=0.5, times=1, path_prefix="/perl/api/v2/user/")
    # Not near a window's end, where the one permit would wait for the next window (the
    # clock's first uncertainty is 1.5 s) and the request would meet the shutdown queued.
    limiter = proxy.service.limiter
    left = limiter.windows.until_next(limiter.clock.now())
    if left < 3:
        await asyncio.sleep(left + 0.1)
    in_flight = asyncio.create_task(get(http, proxy.url + USER_PATH))
    await asyncio.sleep(0.1)
    queued = [asyncio.create_task(get(http, proxy.url + USER_PATH)) for _ in range(2)]
    await asyncio.sleep(0.1)

    started = time.monotonic()
    stopping = asyncio.create_task(proxy.service.stop())
    await asyncio.sleep(0.1)
    status, _, body = await get(http, proxy.admin_url + "/readyz")
    assert status == 503 and body["checks"]["shutdown"]["ok"] is False  # out of rotation
    with pytest.raises(aiohttp.ClientConnectionError):  # no new connections
        async with aiohttp.ClientSession() as fresh:
            await get(fresh, proxy.url + USER_PATH)

    assert (await in_flight)[0] == 200  # finished inside the grace period
    for status, headers, body in await asyncio.gather(*queued):
        assert status == 503
        assert headers["X-Proxy-Error"] == "shutting_down"
        assert headers["Retry-After"] == "1"
        assert body["success"] == 0
    await stopping
    assert 0.9 < time.monotonic() - started < 4
    assert sandbox.sandbox.stats.revocations == 1


async def test_reload_applies_limits_and_queue_at_once(
    sandbox: SandboxServer, proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    service = proxy.service
    new = dataclasses.replace(
        service.cfg,
        limits=dataclasses.replace(service.cfg.limits, per_day=2, user_per_minute=7),
        queue=dataclasses.replace(service.cfg.queue, max_wait=5),
        retry=dataclasses.replace(service.cfg.retry, max_attempts=2),
    )
    assert await service.reload(new) == []
    assert service.limiter.buckets["user"].effective_limit == 7
    assert service.forwarder.admission.queue.max_wait == 5
    assert service.forwarder.attempts.retries.max_attempts == 2
    # The day so far: the login, 1 of the new budget of 2; one request fits.
    assert (await get(http, proxy.url + USER_PATH))[0] == 200
    status, headers, _ = await get(http, proxy.url + USER_PATH)
    assert status == 503 and headers["X-Proxy-Error"] == "daily_limit"


async def test_reload_reports_what_needs_a_restart_and_keeps_it(
    sandbox: SandboxServer, proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    service = proxy.service
    old_port = service.cfg.listen.port
    new = dataclasses.replace(
        service.cfg,
        listen=dataclasses.replace(service.cfg.listen, port=1),
        limits=dataclasses.replace(service.cfg.limits, window_seconds=5),
    )
    assert await service.reload(new) == ["listen", "limits.window_seconds"]
    assert service.cfg.listen.port == old_port
    assert service.cfg.limits.window_seconds == 60
    assert (await get(http, proxy.url + USER_PATH))[0] == 200


async def test_reload_with_new_credentials_revokes_the_old_login_and_logs_in_again(
    sandbox: SandboxServer, proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    service = proxy.service
    new = dataclasses.replace(
        service.cfg,
        auth=dataclasses.replace(service.cfg.auth, user=USER, password=Secret(PASSWORD)),
    )
    with capture_logs() as logs:
        assert await service.reload(new) == []
    assert sandbox.sandbox.stats.revocations == 1
    assert sandbox.sandbox.stats.auth_calls == 2
    assert service.readiness()[0] is True
    assert "auth_credentials_changed" in [e["event"] for e in logs]
    assert (await get(http, proxy.url + USER_PATH))[0] == 200


async def test_login_events_say_why_a_login_happened(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await make_sandbox(code_lifetime=1.0)
    with capture_logs() as logs:
        proxy = await make_proxy(sandbox.url, auth={"code_lifetime": 1.0, "refresh_margin": 0.3})
        await asyncio.sleep(0.8)  # idle past lifetime minus margin
        assert (await get(http, proxy.url + USER_PATH))[0] == 200
        sandbox.sandbox.revoke_all()
        assert (await get(http, proxy.url + USER_PATH))[0] == 200
    reasons = [e["reason"] for e in logs if e["event"] == "auth_succeeded"]
    assert reasons == ["startup", "expired", "after_401"]


async def test_access_events_carry_the_fields_and_can_mask_user_paths(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(sandbox.url, logging={"redact_paths": True})
    with capture_logs() as logs:
        assert (await get(http, proxy.url + USER_PATH))[0] == 200
    (event,) = [e for e in logs if e["event"] == "request"]
    assert event["path"] == "/perl/api/v2/user/[user]/profile"
    for field in (
        "request_id",
        "method",
        "scope",
        "status",
        "upstream_status",
        "attempts",
        "queue_wait_ms",
        "upstream_ms",
        "total_ms",
        "bytes_in",
        "bytes_out",
    ):
        assert field in event, field
    assert event["scope"] == "user" and event["status"] == 200
    assert USER not in repr(logs)


async def test_a_reload_that_raises_the_budget_serves_waiting_requests_at_once(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await make_sandbox(window_seconds=60, user_per_window=100)
    proxy = await make_proxy(sandbox.url, limits={"window_seconds": 60, "user_per_minute": 1})
    assert (await get(http, proxy.url + USER_PATH))[0] == 200  # the window's only permit
    waiting = [asyncio.create_task(get(http, proxy.url + USER_PATH)) for _ in range(3)]
    await asyncio.sleep(0.2)
    assert proxy.service.limiter.queue_depth("user") == 3  # asleep until the next minute
    service = proxy.service
    new = dataclasses.replace(
        service.cfg, limits=dataclasses.replace(service.cfg.limits, user_per_minute=10)
    )
    started = time.monotonic()
    await service.reload(new)
    results = await asyncio.wait_for(asyncio.gather(*waiting), 5)
    assert [status for status, _, _ in results] == [200, 200, 200]
    assert time.monotonic() - started < 2  # not at the next window, within the one open now


async def test_a_percent_encoded_user_path_spends_the_user_budget_and_is_masked(
    sandbox: SandboxServer, make_proxy: MakeProxy
) -> None:
    """The review's case: one classification for the limiter, the log and the policy."""
    proxy = await make_proxy(sandbox.url, logging={"redact_paths": True})
    target = f"/perl/api/v2/%75ser/{USER}/profile"
    request = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    with capture_logs() as logs:
        await raw_exchange(proxy.service.port, request)
    (event,) = [e for e in logs if e["event"] == "request"]
    assert event["scope"] == "user"
    assert event["path"] == "/perl/api/v2/%75ser/[user]/profile"
    assert USER not in repr(logs)


async def test_not_ready_until_the_proxy_port_listens(sandbox: SandboxServer) -> None:
    """The admin port opens before the proxy port: /readyz must not say ready in between,
    even for a scheme with no login to wait for."""
    from conftest import proxy_config

    from proxy.service import ProxyService

    cfg = proxy_config(sandbox.url, auth={"scheme": "bearer", "api_key": Secret("k")})
    service = ProxyService(cfg)
    ready, checks = service.readiness()
    assert not ready and checks["listen"]["ok"] is False
    await service.start()
    try:
        ready, checks = service.readiness()
        assert ready and "listen" not in checks
    finally:
        await service.stop()
