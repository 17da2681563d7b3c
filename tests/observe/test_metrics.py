"""Prometheus metrics over the real admin listener: counters must match reality."""

from __future__ import annotations

import asyncio

import aiohttp
from conftest import USER, MakeProxy, MakeSandbox, RunningProxy
from prometheus_client.parser import text_string_to_metric_families

from proxy.sandbox import SandboxServer

USER_PATH = f"/perl/api/v2/user/{USER}/profile"
ACCOUNT_PATH = "/perl/api/v2/account/42/things"


def _without_default(labels: dict[str, str]) -> frozenset:
    """A sample's labels, less `integration="default"`: every per-integration family
    carries it for the one integration of a config without `integrations:`."""
    assert labels.get("integration", "default") == "default"
    return frozenset((k, v) for k, v in labels.items() if k != "integration")


async def scrape(http: aiohttp.ClientSession, proxy: RunningProxy) -> tuple[str, dict]:
    async with http.get(proxy.admin_url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    samples: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, _without_default(s.labels))] = s.value
    return text, samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: dict, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


async def test_counters_match_what_was_sent_and_answered(
    sandbox: SandboxServer, proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    for _ in range(7):
        async with http.get(proxy.url + USER_PATH) as resp:
            assert resp.status == 200
    for _ in range(3):
        async with http.post(proxy.url + ACCOUNT_PATH, json={"a": 1}) as resp:
            assert resp.status == 200
    # Answered by the proxy itself: 400.
    async with http.get(proxy.url + USER_PATH, headers={"X-Proxy-Max-Wait": "soon"}) as resp:
        assert resp.status == 400

    text, s = await scrape(http, proxy)
    p = "luxsci_proxy_"
    assert value(s, p + "requests_total", method="GET", scope="user", status="200") == 7
    assert value(s, p + "requests_total", method="POST", scope="account", status="200") == 3
    assert total(s, p + "requests_total") == 11
    assert value(s, p + "rejected_total", reason="bad_request") == 1
    assert value(s, p + "request_duration_seconds_count", scope="user") == 7
    assert value(s, p + "upstream_duration_seconds_count", scope="account") == 3
    # Every answer from the API, the login's 201 included, matches the sandbox's own count.
    assert total(s, p + "upstream_responses_total") == sandbox.sandbox.stats.requests == 11
    assert value(s, p + "upstream_responses_total", status="201") == 1
    assert value(s, p + "auth_requests_total", result="success") == 1
    assert value(s, p + "queue_wait_seconds_count", scope="user") == 7
    assert value(s, p + "session_valid") == 1
    assert 0 <= value(s, p + "auth_code_age_seconds") < 5
    assert value(s, p + "daily_requests_used") == 11  # 10 forwarded + the login
    assert value(s, p + "rate_limit_limit", scope="user") == 100_000
    assert value(s, p + "rate_limit_remaining", scope="user") == 100_000 - 7
    assert value(s, p + "inflight_requests") == 0
    assert value(s, p + "build_info", version="0.1.0", scheme="luxsci", backend="memory") == 1
    # Low cardinality: never a path (and so never a user's address) in a label.
    assert USER not in text and "/perl/api" not in text


async def test_retries_and_rejections_are_counted_by_reason(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await make_sandbox(window_seconds=10, user_per_window=1)
    proxy = await make_proxy(
        sandbox.url,
        limits={"window_seconds": 10, "user_per_minute": 1},
        retry={"backoff_base": 0.01, "backoff_max": 0.02},
    )
    sandbox.sandbox.add_fault(status=475, times=1, path_prefix="/perl/api/v2/account/")
    async with http.get(proxy.url + ACCOUNT_PATH) as resp:
        assert resp.status == 200
    async with http.get(proxy.url + USER_PATH) as resp:
        assert resp.status == 200
    async with http.get(proxy.url + USER_PATH, headers={"X-Proxy-Max-Wait": "0"}) as resp:
        assert resp.status == 503

    _, s = await scrape(http, proxy)
    p = "luxsci_proxy_"
    assert value(s, p + "retries_total", reason="incomplete_475") == 1
    assert value(s, p + "upstream_responses_total", status="475") == 1
    assert value(s, p + "rejected_total", reason="queue_timeout") == 1
    assert value(s, p + "requests_total", method="GET", scope="user", status="503") == 1


async def test_queue_depth_and_inflight_show_the_live_state(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await make_sandbox(window_seconds=10, user_per_window=1)
    proxy = await make_proxy(sandbox.url, limits={"window_seconds": 10, "user_per_minute": 1})
    sandbox.sandbox.add_fault(delay=1.0, times=1, path_prefix="/perl/api/v2/user/")

    async def get() -> int:
        async with http.get(proxy.url + USER_PATH, headers={"X-Proxy-Max-Wait": "1.5"}) as resp:
            return resp.status

    tasks = [asyncio.create_task(get()) for _ in range(3)]
    await asyncio.sleep(0.4)
    _, s = await scrape(http, proxy)
    assert value(s, "luxsci_proxy_inflight_requests") == 1  # the one slow request
    assert value(s, "luxsci_proxy_queue_depth", scope="user") == 2  # the others wait
    assert value(s, "luxsci_proxy_queue_depth", scope="account") == 0
    assert sorted(await asyncio.gather(*tasks)) == [200, 503, 503]
    _, s = await scrape(http, proxy)
    assert value(s, "luxsci_proxy_queue_depth", scope="user") == 0


async def test_unusual_methods_share_one_label(
    proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    async with http.request("PROPFIND", proxy.url + ACCOUNT_PATH) as resp:
        await resp.read()
    _, s = await scrape(http, proxy)
    other = [
        v
        for (n, labels), v in s.items()
        if n == "luxsci_proxy_requests_total" and ("method", "other") in labels
    ]
    assert other == [1]


async def test_bearer_scheme_reports_a_valid_session_and_no_code_age(
    make_proxy: MakeProxy, echo_upstream, http: aiohttp.ClientSession
) -> None:
    from proxy.config import Secret

    proxy = await make_proxy(echo_upstream.url, auth={"scheme": "bearer", "api_key": Secret("k")})
    _, s = await scrape(http, proxy)
    assert value(s, "luxsci_proxy_session_valid") == 1
    assert ("luxsci_proxy_auth_code_age_seconds", frozenset()) not in s
