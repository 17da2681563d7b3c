"""Auth lifecycle through the real proxy and the sandbox, over real sockets."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from conftest import PASSWORD, USER, MakeProxy, MakeSandbox, RunningProxy

from proxy.sandbox import SandboxServer
from proxy.schemes.luxsci.scheme import LuxSciScheme

PROFILE = f"/perl/api/v2/user/{USER}/profile"


def statuses(sandbox: SandboxServer) -> list[int]:
    return [entry["status"] for entry in sandbox.sandbox.log if entry["scope"] != "auth"]


async def get_ok(http: aiohttp.ClientSession, proxy: RunningProxy, path: str = PROFILE) -> dict:
    async with http.get(proxy.url + path) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        return body


async def test_authenticates_at_start_up_so_readyz_is_true_before_any_request(
    sandbox: SandboxServer, proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    assert sandbox.sandbox.stats.auth_calls == 1
    async with http.get(proxy.admin_url + "/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["ready"] is True
    async with http.get(proxy.admin_url + "/healthz") as resp:
        assert resp.status == 200


async def test_user_login_is_sent_when_configured(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(sandbox.url, auth={"user": USER, "password": _secret(PASSWORD)})
    body = await get_ok(http, proxy)
    assert body["data"]["login"] == USER
    assert sandbox.sandbox.stats.auth_calls == 1


async def test_rolling_codes_keep_a_busy_proxy_logged_in_past_many_code_lifetimes(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await make_sandbox(code_lifetime=1.0)
    proxy = await make_proxy(sandbox.url, auth={"code_lifetime": 1.0, "refresh_margin": 0.3})
    deadline = time.monotonic() + 3.5  # three and a half code lifetimes
    sent = 0
    while time.monotonic() < deadline:
        await get_ok(http, proxy)
        sent += 1
        await asyncio.sleep(0.05)
    assert sent > 20
    # Every request used a harvested code: one login in all, no 401 anywhere.
    assert sandbox.sandbox.stats.auth_calls == 1
    assert 401 not in statuses(sandbox)


async def test_codes_are_harvested_from_large_streamed_answers_with_the_code_last(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await make_sandbox(code_lifetime=1.0)
    proxy = await make_proxy(sandbox.url, auth={"code_lifetime": 1.0, "refresh_margin": 0.3})
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        async with http.get(proxy.url + "/perl/api/v2/account/7/big?_bytes=300000") as resp:
            raw = await resp.read()
            assert resp.status == 200
            assert len(raw) > 300000
        await asyncio.sleep(0.05)
    assert sandbox.sandbox.stats.auth_calls == 1


async def test_an_idle_proxy_makes_no_calls_and_never_sends_an_expiring_code(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await make_sandbox(code_lifetime=1.0)
    proxy = await make_proxy(sandbox.url, auth={"code_lifetime": 1.0, "refresh_margin": 0.3})
    await get_ok(http, proxy)
    requests_before = sandbox.sandbox.stats.requests
    await asyncio.sleep(1.2)  # idle past the code's lifetime
    assert sandbox.sandbox.stats.requests == requests_before  # idle: no calls at all
    await get_ok(http, proxy)
    assert sandbox.sandbox.stats.auth_calls == 2
    # The stale code was never tried: the proxy logged in first.
    assert 401 not in statuses(sandbox)


async def test_server_side_revocation_costs_one_401_and_one_login(
    sandbox: SandboxServer, proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    await get_ok(http, proxy)
    sandbox.sandbox.revoke_all()
    await get_ok(http, proxy)
    assert sandbox.sandbox.stats.auth_calls == 2
    assert statuses(sandbox).count(401) == 1


async def test_fifty_concurrent_requests_share_one_reauthentication(
    sandbox: SandboxServer, proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    await get_ok(http, proxy)
    sandbox.sandbox.revoke_all()
    results = await asyncio.gather(*(get_ok(http, proxy) for _ in range(50)))
    assert len(results) == 50
    assert sandbox.sandbox.stats.auth_calls == 2  # start-up + exactly one shared re-login


async def test_concurrent_first_requests_share_one_login(
    sandbox: SandboxServer, proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    sandbox.sandbox.expire_all()
    # Make the proxy believe its code is gone too, so 20 requests all need a login at once.
    assert isinstance(proxy.service.scheme, LuxSciScheme)
    proxy.service.scheme.session._current = None
    await asyncio.gather(*(get_ok(http, proxy) for _ in range(20)))
    assert sandbox.sandbox.stats.auth_calls == 2


async def test_a_proxy_whose_clock_is_five_minutes_fast_still_logs_in(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    # The server's clock is 5 minutes behind ours: our own time is "in the future" to it.
    sandbox = await make_sandbox(clock_offset=-300.0)
    proxy = await make_proxy(sandbox.url)
    await get_ok(http, proxy)
    auth = [e for e in sandbox.sandbox.log if e["scope"] == "auth"]
    # One rejected date, then a login signed with the server's time; never again after.
    assert [e["status"] for e in auth] == [401, 201]
    assert abs(proxy.service.clock.offset + 300) < 3


async def test_a_slow_clock_within_the_window_needs_no_correction(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await make_sandbox(clock_offset=600.0)  # we are 10 minutes behind: allowed
    proxy = await make_proxy(sandbox.url)
    await get_ok(http, proxy)
    assert sandbox.sandbox.stats.auth_calls == 1


async def test_bad_credentials_answer_502_promptly_and_do_not_hammer_the_api(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(
        sandbox.url, auth={"secret": _secret("wrong-secret"), "retry_min": 30, "retry_max": 60}
    )
    calls_after_start = sandbox.sandbox.stats.auth_calls
    assert calls_after_start == 1
    for _ in range(5):
        started = time.monotonic()
        async with http.get(proxy.url + PROFILE) as resp:
            body = await resp.json()
            assert resp.status == 502
            assert resp.headers["X-Proxy-Error"] == "upstream_auth_failed"
            assert body["success"] == 0
            assert "Invalid authentication credentials" in body["error_message"]
        assert time.monotonic() - started < 1.0
    # Five client requests inside the backoff window: no further login attempts.
    assert sandbox.sandbox.stats.auth_calls == calls_after_start
    async with http.get(proxy.admin_url + "/readyz") as resp:
        assert resp.status == 503
        detail = await resp.json()
        assert detail["ready"] is False
        assert "Invalid authentication credentials" in detail["checks"]["auth"]["error"]


async def test_failed_login_is_retried_in_the_background_until_it_works(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    # The API refuses the first two logins (a 503 from in front of it), then recovers.
    sandbox.sandbox.add_fault(status=503, json=False, times=2, path_prefix="/perl/api/v2/auth")
    proxy = await make_proxy(sandbox.url, auth={"retry_min": 0.1, "retry_max": 0.2})
    assert proxy.service.readiness()[0] is False
    for _ in range(100):
        if proxy.service.readiness()[0]:
            break
        await asyncio.sleep(0.05)
    assert proxy.service.readiness()[0] is True  # recovered with no client traffic at all
    assert sandbox.sandbox.stats.auth_calls == 3
    await get_ok(http, proxy)


async def test_shutdown_finishes_in_flight_requests_then_revokes_the_session(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(sandbox.url)
    sandbox.sandbox.add_fault(delay=0.5, path_prefix="/perl/api/v2/user/")
    in_flight = asyncio.create_task(get_ok(http, proxy))
    await asyncio.sleep(0.2)
    await proxy.service.stop()
    body = await in_flight
    assert body["success"] == 1
    assert sandbox.sandbox.stats.revocations == 1
    # The revoked session's codes are dead at the API.
    assert all(entry["scope"] != "auth" or entry["status"] < 400 for entry in sandbox.sandbox.log)


def _secret(value: str):
    from proxy.config import Secret

    return Secret(value)
