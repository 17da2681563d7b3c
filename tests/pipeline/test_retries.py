"""Retry rules: through the real proxy into the sandbox (LuxSci) and an echo upstream (Bearer)."""

from __future__ import annotations

import socket
import time
from typing import Any, cast

import aiohttp
import pytest
from conftest import EchoUpstream, MakeProxy, RunningProxy
from multidict import CIMultiDict
from structlog.testing import capture_logs

from proxy.clock import retry_after
from proxy.config import Secret
from proxy.errors import BadRequest, UpstreamBadResponse, UpstreamTimeout, UpstreamUnreachable
from proxy.http.client import ConnectFailed, StaleConnection
from proxy.pipeline import retry
from proxy.sandbox import SandboxServer
from proxy.schemes.base import AuthScheme
from proxy.schemes.bearer import BearerScheme
from proxy.schemes.luxsci.scheme import LuxSciScheme

PATH = "/perl/api/v2/account/42/things"
# judge() is pure: the LuxSci scheme's session is never touched.
SCHEMES: dict[str, AuthScheme] = {
    "luxsci": LuxSciScheme(cast(Any, None)),
    "bearer": BearerScheme("k"),
}
FAST = {"backoff_base": 0.01, "backoff_max": 0.05}


def attempts_at_sandbox(sandbox: SandboxServer) -> int:
    return sum(
        1 for e in sandbox.sandbox.log if e["scope"] == "account" and "/things" in e["target"]
    )


async def send(http: aiohttp.ClientSession, proxy: RunningProxy, method: str) -> int:
    body = b'{"a": 1}' if method in ("POST", "PATCH", "PUT") else None
    headers = {"Content-Type": "application/json"} if body else None
    async with http.request(method, proxy.url + PATH, data=body, headers=headers) as resp:
        await resp.read()
        return resp.status


@pytest.fixture
async def fast_proxy(sandbox: SandboxServer, make_proxy: MakeProxy) -> RunningProxy:
    return await make_proxy(sandbox.url, retry=FAST)


@pytest.mark.parametrize("method", ["GET", "POST", "PATCH"])
async def test_475_is_retried_for_any_method(
    sandbox: SandboxServer, fast_proxy: RunningProxy, http: aiohttp.ClientSession, method: str
) -> None:
    sandbox.sandbox.add_fault(status=475, times=1, path_prefix=PATH)
    assert await send(http, fast_proxy, method) == 200
    assert attempts_at_sandbox(sandbox) == 2


@pytest.mark.parametrize("status", [502, 503, 504, 408])
async def test_gateway_errors_are_retried_for_idempotent_methods(
    sandbox: SandboxServer, fast_proxy: RunningProxy, http: aiohttp.ClientSession, status: int
) -> None:
    sandbox.sandbox.add_fault(status=status, json=False, times=2, path_prefix=PATH)
    assert await send(http, fast_proxy, "GET") == 200
    assert attempts_at_sandbox(sandbox) == 3


@pytest.mark.parametrize("status", [502, 503, 504, 408])
async def test_post_is_not_retried_on_gateway_errors(
    sandbox: SandboxServer, fast_proxy: RunningProxy, http: aiohttp.ClientSession, status: int
) -> None:
    sandbox.sandbox.add_fault(status=status, json=False, times=1, path_prefix=PATH)
    assert await send(http, fast_proxy, "POST") == status
    assert attempts_at_sandbox(sandbox) == 1


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_429_too_many_objects_is_never_retried(
    sandbox: SandboxServer, fast_proxy: RunningProxy, http: aiohttp.ClientSession, method: str
) -> None:
    sandbox.sandbox.add_fault(status=429, times=1, path_prefix=PATH)
    assert await send(http, fast_proxy, method) == 429
    assert attempts_at_sandbox(sandbox) == 1


@pytest.mark.parametrize("status", [500, 400, 404, 409])
async def test_500_and_other_4xx_pass_through_untouched(
    sandbox: SandboxServer, fast_proxy: RunningProxy, http: aiohttp.ClientSession, status: int
) -> None:
    sandbox.sandbox.add_fault(status=status, times=1, path_prefix=PATH)
    assert await send(http, fast_proxy, "GET") == status
    assert attempts_at_sandbox(sandbox) == 1


async def test_a_dropped_connection_is_not_retried_for_post(
    sandbox: SandboxServer, fast_proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    sandbox.sandbox.add_fault(drop=True, times=1, path_prefix=PATH)
    assert await send(http, fast_proxy, "POST") == 502  # it may have reached the API
    assert attempts_at_sandbox(sandbox) == 1


async def test_retries_stop_at_the_attempt_cap(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(sandbox.url, retry={**FAST, "max_attempts": 3})
    sandbox.sandbox.add_fault(status=503, json=False, times=10, path_prefix=PATH)
    assert await send(http, proxy, "GET") == 503  # the API's last answer, passed on
    assert attempts_at_sandbox(sandbox) == 3


async def test_retries_stop_at_the_time_cap(
    sandbox: SandboxServer,
    make_proxy: MakeProxy,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The top of the jitter range every time: with random delays a short one could fit
    # under the cap, and the test would pass or fail by chance.
    monkeypatch.setattr(retry, "backoff", lambda attempt, base, cap: min(cap, base))
    proxy = await make_proxy(
        sandbox.url,
        retry={"backoff_base": 0.2, "backoff_max": 0.2, "max_time": 0.1, "max_attempts": 5},
    )
    sandbox.sandbox.add_fault(status=503, json=False, times=10, path_prefix=PATH)
    assert await send(http, proxy, "GET") == 503
    assert attempts_at_sandbox(sandbox) == 1  # a 0.2 s wait does not fit in 0.1 s


async def test_a_connection_never_made_is_retried_even_for_post(
    make_proxy: MakeProxy, echo_upstream: EchoUpstream, http: aiohttp.ClientSession
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy = await make_proxy(
        f"http://127.0.0.1:{port}",
        auth={"scheme": "bearer", "api_key": Secret("k")},
        retry={**FAST, "max_attempts": 3},
    )
    with capture_logs() as logs:
        async with http.post(proxy.url + "/v1/x", json={"a": 1}) as resp:
            assert resp.status == 502
    done = [e for e in logs if e["event"] == "request"]
    assert done[-1]["attempts"] == 3
    assert [e["reason"] for e in logs if e["event"] == "retry"] == ["connect_failed"] * 2


async def test_bearer_429_honours_retry_after(
    make_proxy: MakeProxy, echo_upstream: EchoUpstream, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(echo_upstream.url, auth={"scheme": "bearer", "api_key": Secret("k")})
    echo_upstream.script.append((429, {"Retry-After": "1"}))
    started = time.monotonic()
    async with http.post(proxy.url + "/v1/x", json={"a": 1}) as resp:
        assert resp.status == 200  # even a POST: a 429 here means "not done, come back"
    assert 0.9 < time.monotonic() - started < 3
    assert len(echo_upstream.requests) == 2


async def test_bearer_429_without_retry_after_backs_off(
    make_proxy: MakeProxy, echo_upstream: EchoUpstream, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(
        echo_upstream.url, auth={"scheme": "bearer", "api_key": Secret("k")}, retry=FAST
    )
    echo_upstream.script.extend([(429, {}), (429, {})])
    async with http.get(proxy.url + "/v1/x") as resp:
        assert resp.status == 200
    assert len(echo_upstream.requests) == 3


# -- the policy itself, as a table ------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "method", "status", "rate_limited", "expected"),
    [
        ("luxsci", "GET", 200, False, retry.Action.DONE),
        ("luxsci", "GET", 401, False, retry.Action.REAUTH),
        ("luxsci", "POST", 403, True, retry.Action.RATE_WAIT),
        ("luxsci", "GET", 403, False, retry.Action.DONE),
        ("luxsci", "POST", 475, False, retry.Action.RETRY),
        ("luxsci", "POST", 503, False, retry.Action.DONE),
        ("luxsci", "PUT", 503, False, retry.Action.RETRY),
        ("luxsci", "DELETE", 408, False, retry.Action.RETRY),
        ("luxsci", "GET", 429, False, retry.Action.DONE),
        ("luxsci", "GET", 500, False, retry.Action.DONE),
        ("bearer", "POST", 429, False, retry.Action.RATE_WAIT),
        ("bearer", "GET", 401, False, retry.Action.DONE),
        ("bearer", "GET", 475, False, retry.Action.DONE),
    ],
)
def test_retry_policy_table(
    scheme: str, method: str, status: int, rate_limited: bool, expected: retry.Action
) -> None:
    headers = CIMultiDict({"X-RateLimit-Remaining": "0"} if rate_limited else {})
    decision = retry.after_response(SCHEMES[scheme], method, status, headers, 0.0)
    assert decision.action is expected


def test_a_rate_limit_403_waits_for_the_reset_and_a_429_for_retry_after() -> None:
    remaining_0 = CIMultiDict({"X-RateLimit-Remaining": "0", "Retry-After": "7"})
    luxsci = retry.after_response(SCHEMES["luxsci"], "GET", 403, remaining_0, 0.0)
    assert luxsci.until_reset and luxsci.delay is None
    bearer = retry.after_response(SCHEMES["bearer"], "GET", 429, remaining_0, 0.0)
    assert bearer.delay == 7.0 and not bearer.until_reset


@pytest.mark.parametrize(
    ("method", "error", "expected"),
    [
        ("POST", ConnectFailed("x"), retry.Action.RETRY),
        ("POST", UpstreamUnreachable("x"), retry.Action.DONE),
        ("GET", UpstreamUnreachable("x"), retry.Action.RETRY),
        ("POST", UpstreamTimeout("x"), retry.Action.DONE),
        ("GET", UpstreamTimeout("x"), retry.Action.RETRY),
        ("GET", BadRequest("x"), retry.Action.DONE),
        ("GET", StaleConnection("x"), retry.Action.RETRY),
        ("POST", StaleConnection("x"), retry.Action.DONE),
        # The API answered, just not in HTTP we can relay: the same server answers alike.
        ("GET", UpstreamBadResponse("x"), retry.Action.DONE),
        ("POST", UpstreamBadResponse("x"), retry.Action.DONE),
    ],
)
def test_retry_policy_for_errors(method: str, error: Exception, expected: retry.Action) -> None:
    assert retry.after_error(method, error).action is expected  # type: ignore[arg-type]


def test_backoff_is_full_jitter_capped() -> None:
    assert retry.backoff(1, 0.5, 8, rand=lambda: 1.0) == 0.5
    assert retry.backoff(4, 0.5, 8, rand=lambda: 1.0) == 4.0
    assert retry.backoff(10, 0.5, 8, rand=lambda: 1.0) == 8.0
    assert retry.backoff(3, 0.5, 8, rand=lambda: 0.0) == 0.0


def test_a_stale_kept_alive_connection_is_retried_at_once_on_a_fresh_one() -> None:
    decision = retry.after_error("GET", StaleConnection("x"))
    assert (decision.reason, decision.delay, decision.fresh_connection) == (
        "stale_connection",
        0.0,
        True,
    )


def test_retry_after_reads_seconds_and_dates() -> None:
    assert retry_after("7", now=0) == 7.0
    assert retry_after("Thu, 01 Jan 1970 00:01:40 GMT", now=90.0) == 10.0
    assert retry_after("soon", now=0) is None
    assert retry_after(None, now=0) is None


async def test_a_get_on_a_dropped_kept_alive_connection_is_a_counted_attempt(
    sandbox: SandboxServer, fast_proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    """The upstream client never resends on its own: the stale-connection retry is an
    ordinary attempt, in the access line, the log and retries_total."""
    assert await send(http, fast_proxy, "GET") == 200  # a kept-alive connection to reuse
    sandbox.sandbox.add_fault(drop=True, times=1, path_prefix=PATH)
    with capture_logs() as logs:
        assert await send(http, fast_proxy, "GET") == 200
    (line,) = [e for e in logs if e["event"] == "request"]
    assert line["attempts"] == 2
    assert [e["reason"] for e in logs if e["event"] == "retry"] == ["stale_connection"]
    async with http.get(f"http://127.0.0.1:{fast_proxy.service.admin_port}/metrics") as resp:
        text = await resp.text()
    assert 'luxsci_proxy_retries_total{integration="default",reason="stale_connection"} 1.0' in text
