"""limits.windows in the running proxy: reloads, /readyz and the metrics."""

from __future__ import annotations

import dataclasses

import aiohttp
from conftest import USER, MakeProxy, MakeSandbox
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Secret, WindowConfig
from proxy.sandbox import SandboxServer, SandboxWindow
from proxy.sandbox.config import OAuthSettings

PATH = f"/perl/api/v2/user/{USER}/profile"
WINDOWS = [
    {"requests": 50, "per": "1s", "scope": "all"},
    {"requests": 500, "per": "1h", "scope": "user"},
    {"requests": 5000, "per": "1d", "scope": "all"},
]


def labels(**values: str) -> frozenset[tuple[str, str]]:
    return frozenset(values.items())


def _without_default(labels: dict[str, str]) -> frozenset:
    """A sample's labels, less `integration="default"`: every per-integration family
    carries it for the one integration of a config without `integrations:`."""
    assert labels.get("integration", "default") == "default"
    return frozenset((k, v) for k, v in labels.items() if k != "integration")


async def samples(
    http: aiohttp.ClientSession, admin_url: str
) -> dict[tuple[str, frozenset], float]:
    async with http.get(admin_url + "/metrics") as resp:
        text = await resp.text()
    return {
        (s.name, _without_default(s.labels)): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_each_window_is_reported_in_readyz_and_the_metrics(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(sandbox.url, limits={"windows": WINDOWS})
    for _ in range(3):
        async with http.get(proxy.url + PATH) as resp:
            assert resp.status == 200
    async with http.get(proxy.admin_url + "/readyz") as resp:
        limits = (await resp.json())["checks"]["limits"]
    assert limits["ok"] is True
    by_window = {(w["scope"], w["per"]): (w["limit"], w["used"]) for w in limits["windows"]}
    # The login spends the "all" windows only; the three requests every window of theirs.
    assert by_window[("user", "1h")] == (500, 3)
    assert by_window[("all", "1d")] == (5000, 4)
    assert by_window[("all", "1s")][0] == 50
    s = await samples(http, proxy.admin_url)
    p = "luxsci_proxy_"
    assert s[(p + "window_requests_used", labels(scope="user", per="1h"))] == 3
    assert s[(p + "window_requests_limit", labels(scope="all", per="1d"))] == 5000
    # The day gauges read the "all" window of a day.
    assert s[(p + "daily_requests_used", frozenset())] == 4
    assert s[(p + "daily_limit", frozenset())] == 5000


async def test_the_shorthand_is_reported_as_its_three_windows(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(sandbox.url, limits={"user_per_minute": 30})
    async with http.get(proxy.url + PATH) as resp:
        assert resp.status == 200
    s = await samples(http, proxy.admin_url)
    used = {
        dict(labels)["scope"] + "/" + dict(labels)["per"]: v
        for (name, labels), v in s.items()
        if name == "luxsci_proxy_window_requests_used"
    }
    assert used == {"user/1m": 1, "account/1m": 1, "all/1d": 2}  # the login is an account one
    assert s[("luxsci_proxy_window_requests_limit", labels(scope="user", per="1m"))] == 30


async def test_a_reload_applies_new_budgets_at_once_and_new_windows_at_a_restart(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await make_sandbox()
    proxy = await make_proxy(sandbox.url, limits={"windows": WINDOWS})
    service = proxy.service
    old = service.cfg.limits.windows
    budgets = dataclasses.replace(
        service.cfg,
        limits=dataclasses.replace(
            service.cfg.limits, windows=(dataclasses.replace(old[0], requests=7), *old[1:])
        ),
    )
    assert await service.reload(budgets) == []
    assert service.limiter.buckets["account"].effective_limit == 7  # the 1 s window
    assert service.cfg.limits.windows[0].requests == 7

    shape = dataclasses.replace(
        service.cfg,
        limits=dataclasses.replace(
            service.cfg.limits, windows=(*old, WindowConfig(100, 60.0, "account"))
        ),
    )
    assert await service.reload(shape) == ["limits.windows"]
    assert len(service.cfg.limits.windows) == 3  # kept till a restart
    # A shorthand window added beside the list is a new window too.
    day = dataclasses.replace(
        service.cfg, limits=dataclasses.replace(service.cfg.limits, per_day=10)
    )
    assert await service.reload(day) == ["limits.windows"]
    assert service.cfg.limits.per_day == 0 and len(service.cfg.limits.windows) == 3
    async with http.get(proxy.url + PATH) as resp:
        assert resp.status == 200


async def test_an_oauth_apis_spent_hour_is_answered_at_once_and_never_sent(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    # An OAuth 2.0 API with one budget, "all": 10 a second and 3 an hour.
    sandbox = await make_sandbox(
        oauth=OAuthSettings(), windows=(SandboxWindow(10, 1), SandboxWindow(3, 3600))
    )
    auth = {
        "scheme": "oauth2",
        "token_url": sandbox.url + "/oauth/token",
        "client_id": "sandbox-client",
        "client_secret": Secret("sandbox-client-secret"),
    }
    windows = [{"requests": 10, "per": "1s"}, {"requests": 3, "per": "1h"}]
    proxy = await make_proxy(sandbox.url, auth=auth, limits={"windows": windows})
    statuses = []
    for _ in range(4):
        async with http.get(proxy.url + "/v1/items") as resp:
            await resp.read()
            statuses.append(resp.status)
            headers = resp.headers
    assert statuses == [200, 200, 200, 503]
    assert headers["X-Proxy-Error"] == "budget_spent"
    assert 1 <= int(headers["Retry-After"]) <= 3600
    assert sandbox.sandbox.stats.rate_limited == 0  # the fourth never reached the API
