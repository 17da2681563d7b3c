"""Bearer-style APIs: the limit learnt from the answers, and Retry-After in both forms.

The sandbox's OAuth mode is such an API: 429 past its limit, with Retry-After, and its
limit stated in the dialect asked for. The proxy is configured far above that limit, so
only what it learns from the answers keeps it inside. Windows are 2 s, as in
test_shaping.py (the sandbox and the proxy agree).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from conftest import MakeProxy, MakeSandbox

from proxy.config import Secret
from proxy.sandbox import SandboxServer
from proxy.sandbox.config import OAuthSettings

WINDOW = 2
PATH = "/v1/items"


async def bearer_api(make_sandbox: MakeSandbox, per_window: int, **settings: Any) -> SandboxServer:
    return await make_sandbox(
        window_seconds=WINDOW,
        account_per_window=per_window,
        oauth=OAuthSettings(**settings),
    )


def oauth2(sandbox: SandboxServer) -> dict[str, Any]:
    return {
        "scheme": "oauth2",
        "token_url": sandbox.url + "/oauth/token",
        "client_id": "sandbox-client",
        "client_secret": Secret("sandbox-client-secret"),
    }


async def fetch(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as resp:
        await resp.read()
        return resp.status


@pytest.mark.parametrize("dialect", ["x-delta", "ietf", "ietf-split"])
async def test_the_limit_learnt_from_the_first_answer_keeps_a_burst_inside_it(
    dialect: str, make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await bearer_api(make_sandbox, per_window=10, rate_headers=dialect)
    proxy = await make_proxy(
        sandbox.url,
        auth=oauth2(sandbox),
        limits={"window_seconds": WINDOW, "account_per_minute": 1000},
    )
    assert await fetch(http, proxy.url + PATH) == 200  # this answer states the limit
    results = await asyncio.gather(*(fetch(http, proxy.url + PATH) for _ in range(20)))
    assert results == [200] * 20
    assert sandbox.sandbox.stats.rate_limited == 0  # the API never had to refuse one
    assert proxy.service.limiter.buckets["account"].effective_limit == 10


@pytest.mark.parametrize("form", ["seconds", "date"])
async def test_a_429_is_waited_out_for_as_long_as_retry_after_says(
    form: str, make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    # No rate headers: the proxy cannot know the limit before the 429 tells it.
    sandbox = await bearer_api(make_sandbox, per_window=1, rate_headers="none", retry_after=form)
    proxy = await make_proxy(
        sandbox.url,
        auth=oauth2(sandbox),
        limits={"window_seconds": WINDOW, "account_per_minute": 1000},
    )
    started = time.monotonic()
    results = await asyncio.gather(*(fetch(http, proxy.url + PATH) for _ in range(2)))
    elapsed = time.monotonic() - started
    assert results == [200, 200]
    assert sandbox.sandbox.stats.rate_limited >= 1
    # The retry waited for the next window, not a quick backoff (which would be refused).
    log = [e for e in sandbox.sandbox.log if e["status"] == 200]
    assert int(log[0]["ts"] // WINDOW) != int(log[-1]["ts"] // WINDOW)
    assert elapsed < 2 * WINDOW + 1.5


async def test_a_bearer_429_without_retry_after_waits_for_the_reset_its_headers_name(
    make_sandbox: MakeSandbox,
    make_proxy: MakeProxy,
    echo_upstream: Any,
    http: aiohttp.ClientSession,
) -> None:
    proxy = await make_proxy(echo_upstream.url, auth={"scheme": "bearer", "api_key": Secret("k")})
    echo_upstream.script.append(
        (429, {"RateLimit": "limit=5, remaining=0, reset=1", "RateLimit-Policy": "5;w=60"})
    )
    started = time.monotonic()
    assert await fetch(http, proxy.url + "/v1/x") == 200
    assert 0.9 < time.monotonic() - started < 3
    assert len(echo_upstream.requests) == 2
