"""Priority lanes and named clients, over real sockets against the sandbox.

Windows are 3 s (the sandbox and the proxy agree); "before the next window"
is read from the proxy's own limiter, and queued requests are counted there,
so each step waits for the state it needs rather than for a guessed time.
Spawned requests are hung up on whatever a test's outcome (`hanging_up`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from conftest import USER, MakeProxy, MakeSandbox, RunningProxy, eventually
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from proxy.config import ClientConfig, Secret
from proxy.sandbox import SandboxServer

WINDOW = 3
PATH = f"/perl/api/v2/user/{USER}/profile"
APP_TOKEN = "app-token-0123456789abcdef"
BATCH_TOKEN = "batch-token-0123456789abcdef"
CLIENTS = (
    ClientConfig(name="app", token=Secret(APP_TOKEN), max_priority="high"),
    ClientConfig(name="batch", token=Secret(BATCH_TOKEN), max_priority="low", max_queued=20),
)


def as_client(token: str, priority: str | None = None) -> dict[str, str]:
    headers = {"Proxy-Authorization": f"Bearer {token}"}
    if priority is not None:
        headers["X-Proxy-Priority"] = priority
    return headers


@pytest.fixture
async def many() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session with no cap on connections: hundreds of requests wait at once."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


async def get(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], float]:
    started = time.monotonic()
    async with http.get(url, headers=headers) as resp:
        await resp.read()
        return resp.status, dict(resp.headers), time.monotonic() - started


Spawn = Callable[..., "asyncio.Task[tuple[int, dict[str, str], float]]"]


@pytest.fixture
async def spawn(many: aiohttp.ClientSession) -> AsyncIterator[Spawn]:
    """Start requests that wait in the background; they hang up when the test ends."""
    tasks: list[asyncio.Task[tuple[int, dict[str, str], float]]] = []

    def start(
        url: str, headers: dict[str, str] | None = None
    ) -> asyncio.Task[tuple[int, dict[str, str], float]]:
        task = asyncio.get_running_loop().create_task(get(many, url, headers))
        tasks.append(task)
        return task

    yield start
    # Clients that leave: their requests leave the queue, spending nothing.
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def limited(make_sandbox: MakeSandbox, make_proxy: MakeProxy, per_window: int, **sections):
    sandbox = await make_sandbox(window_seconds=WINDOW, user_per_window=per_window)
    proxy = await make_proxy(
        sandbox.url,
        # One request upstream at a time: the in-flight gate is first come, first served,
        # so the order the API sees them in is the order the limiter handed out permits
        # (several at once may finish in any order).
        limits={"window_seconds": WINDOW, "user_per_minute": per_window, "max_inflight": 1},
        shutdown_timeout=2,
        **sections,
    )
    return sandbox, proxy


async def quiet_mid_window(proxy: RunningProxy) -> float:
    """Wait until nothing is in flight and the next window is at least half a window
    away (time for a test's next steps); returns the seconds until it opens."""
    limiter = proxy.service.limiter

    def until_next() -> float:
        return limiter.windows.until_next(limiter.clock.now())

    await eventually(
        lambda: proxy.service.forwarder.inflight_count == 0 and until_next() > WINDOW / 2,
        within=2 * WINDOW,
    )
    return until_next()


def targets(sandbox: SandboxServer, since: int) -> list[str]:
    """What reached the API after the first `since` requests, in order, by query tag."""
    return [e["target"].partition("?")[2] for e in sandbox.sandbox.log[since:]]


async def test_a_high_request_overtakes_500_queued_low_ones(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, many: aiohttp.ClientSession, spawn: Spawn
) -> None:
    sandbox, proxy = await limited(
        make_sandbox, make_proxy, 10, queue={"max_wait": 120, "aging": 120}
    )
    for _ in range(500):
        spawn(f"{proxy.url}{PATH}?low", {"X-Proxy-Priority": "low"})
    limiter = proxy.service.limiter
    await eventually(
        lambda: limiter.queue_depth("user") + targets(sandbox, 0).count("low") == 500,
        within=20,
    )
    until_next = await quiet_mid_window(proxy)
    before = len(sandbox.sandbox.log)
    # The budget is saturated: tens of windows' worth wait (a few went while they arrived).
    assert limiter.lane_depths("user")["low"] >= 400

    status, headers, took = await get(many, f"{proxy.url}{PATH}?high", {"X-Proxy-Priority": "high"})
    assert status == 200 and "X-Proxy-Priority-Applied" not in headers
    # The very next request to reach the API, with the next permit: no low one before it.
    assert targets(sandbox, before)[0] == "high"
    assert took < until_next + 0.5
    assert sandbox.sandbox.stats.rate_limited == 0


async def test_asking_more_than_the_client_may_is_served_in_its_own_lane_and_said_so(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, many: aiohttp.ClientSession, spawn: Spawn
) -> None:
    sandbox, proxy = await limited(make_sandbox, make_proxy, 2, access={"clients": CLIENTS})
    await quiet_mid_window(proxy)
    for _ in range(2):  # the window's budget
        assert (await get(many, f"{proxy.url}{PATH}", as_client(APP_TOKEN)))[0] == 200
    with capture_logs() as logs:
        # The batch client may not go above low: its "high" waits behind the app's normal.
        batch = spawn(f"{proxy.url}{PATH}?batch", as_client(BATCH_TOKEN, "high"))
        limiter = proxy.service.limiter
        await eventually(lambda: limiter.lane_depths("user")["low"] == 1)
        before = len(sandbox.sandbox.log)
        app = spawn(f"{proxy.url}{PATH}?app", as_client(APP_TOKEN, "normal"))
        await eventually(lambda: limiter.lane_depths("user")["normal"] == 1)
        status, headers, _ = await batch
        assert status == 200
        assert headers["X-Proxy-Priority-Applied"] == "low"
        assert (await app)[0] == 200
        assert targets(sandbox, before)[:2] == ["app", "batch"]
        # Within its cap a client gets what it asks, and no header says otherwise.
        status, headers, _ = await get(many, f"{proxy.url}{PATH}?top", as_client(APP_TOKEN, "high"))
        assert status == 200 and "X-Proxy-Priority-Applied" not in headers
        # Not asking is asking for normal: above the batch client's cap too.
        status, headers, _ = await get(many, f"{proxy.url}{PATH}?plain", as_client(BATCH_TOKEN))
        assert status == 200 and headers["X-Proxy-Priority-Applied"] == "low"
    seen = sorted((e["client"], e["lane"]) for e in logs if e["event"] == "request")
    assert seen == [("app", "high"), ("app", "normal"), ("batch", "low"), ("batch", "low")]

    async with many.get(proxy.admin_url + "/metrics") as resp:
        text = await resp.text()
    samples = {
        # Less the one integration's label, which every series here has.
        (s.name, frozenset((k, v) for k, v in s.labels.items() if k != "integration")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    wait = "luxsci_proxy_queue_wait_by_lane_seconds_count"
    assert samples[(wait, frozenset({("lane", "low"), ("client", "batch")}))] == 2
    assert samples[(wait, frozenset({("lane", "normal"), ("client", "app")}))] == 3
    assert samples[(wait, frozenset({("lane", "high"), ("client", "app")}))] == 1
    # The existing series stay as they were: one per scope.
    assert samples[("luxsci_proxy_queue_wait_seconds_count", frozenset({("scope", "user")}))] == 6


async def test_one_apps_flood_leaves_another_app_every_other_permit(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, many: aiohttp.ClientSession, spawn: Spawn
) -> None:
    clients = (
        ClientConfig(name="app", token=Secret(APP_TOKEN)),
        ClientConfig(name="batch", token=Secret(BATCH_TOKEN)),
    )
    sandbox, proxy = await limited(
        make_sandbox, make_proxy, 10, access={"clients": clients}, queue={"max_wait": 60}
    )
    limiter = proxy.service.limiter
    for _ in range(80):
        spawn(f"{proxy.url}{PATH}?batch", as_client(BATCH_TOKEN))
    await eventually(
        lambda: limiter.queue_depth("user") + targets(sandbox, 0).count("batch") == 80, within=10
    )
    await quiet_mid_window(proxy)
    before = len(sandbox.sandbox.log)
    mine = [spawn(f"{proxy.url}{PATH}?app", as_client(APP_TOKEN)) for _ in range(4)]
    await eventually(lambda: limiter.client_depths().get("app") == 4)
    results = await asyncio.gather(*mine)
    assert [status for status, _, _ in results] == [200] * 4
    # Same lane, 80 of the batch's requests there first: the app's four still go within
    # the next eight permits, taking turns with the batch.
    assert sorted(targets(sandbox, before)[:8]) == ["app"] * 4 + ["batch"] * 4


async def test_a_client_over_its_max_queued_gets_queue_full_while_others_still_queue(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, many: aiohttp.ClientSession, spawn: Spawn
) -> None:
    sandbox, proxy = await limited(make_sandbox, make_proxy, 1, access={"clients": CLIENTS})
    await quiet_mid_window(proxy)
    assert (await get(many, f"{proxy.url}{PATH}", as_client(APP_TOKEN)))[0] == 200
    limiter = proxy.service.limiter
    for _ in range(20):
        spawn(f"{proxy.url}{PATH}", as_client(BATCH_TOKEN))
    await eventually(lambda: limiter.client_depths().get("batch") == 20)
    status, headers, took = await get(many, f"{proxy.url}{PATH}", as_client(BATCH_TOKEN))
    assert status == 503 and headers["X-Proxy-Error"] == "queue_full"
    assert int(headers["Retry-After"]) >= 1
    assert took < 0.5
    # The app's share is its own: its requests still get in line.
    for _ in range(3):
        spawn(f"{proxy.url}{PATH}", as_client(APP_TOKEN))
    await eventually(lambda: limiter.client_depths().get("app") == 3)
    async with many.get(proxy.admin_url + "/metrics") as resp:
        text = await resp.text()
    assert 'luxsci_proxy_queue_depth_by_client{client="batch",integration="default"} 20.0' in text
    assert 'luxsci_proxy_queue_depth_by_client{client="app",integration="default"} 3.0' in text
    assert (
        'luxsci_proxy_queue_depth_by_lane{integration="default",lane="low",scope="user"} 20.0'
        in text
    )
    assert (
        'luxsci_proxy_queue_depth_by_lane{integration="default",lane="normal",scope="user"} 3.0'
        in text
    )
    assert 'luxsci_proxy_queue_depth{integration="default",scope="user"} 23.0' in text
    assert 'luxsci_proxy_rejected_total{integration="default",reason="queue_full"} 1.0' in text
    # Every lane a client may wait in is there from the start, at zero; no other.
    wait = "luxsci_proxy_queue_wait_by_lane_seconds_count"
    assert f'{wait}{{client="batch",integration="default",lane="low"}} 0.0' in text
    assert f'{wait}{{client="app",integration="default",lane="high"}} 0.0' in text
    assert (
        f'{wait}{{client="app",integration="default",lane="normal"}} 1.0' in text
    )  # the request that spent it
    assert 'client="batch",lane="normal"' not in text
    assert sandbox.sandbox.stats.rate_limited == 0


async def test_a_priority_that_is_not_a_lane_is_refused_naming_the_header(
    sandbox: SandboxServer, proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    before = sandbox.sandbox.stats.requests
    for value in ("urgent", "background", ""):
        async with http.get(proxy.url + PATH, headers={"X-Proxy-Priority": value}) as resp:
            assert resp.status == 400
            assert resp.headers["X-Proxy-Error"] == "bad_request"
            assert "X-Proxy-Priority" in (await resp.json())["error_message"]
    assert sandbox.sandbox.stats.requests == before
    # Without identities every request is "anonymous", which may ask for any lane.
    with capture_logs() as logs:
        async with http.get(proxy.url + PATH, headers={"X-Proxy-Priority": " High"}) as resp:
            assert resp.status == 200
            assert "X-Proxy-Priority-Applied" not in resp.headers
    (line,) = [e for e in logs if e["event"] == "request"]
    assert (line["client"], line["lane"]) == ("anonymous", "high")


async def test_a_refusal_after_admission_says_which_lane_it_waited_in(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    _, proxy = await limited(make_sandbox, make_proxy, 1, access={"clients": CLIENTS})
    await quiet_mid_window(proxy)
    assert (await get(http, f"{proxy.url}{PATH}", as_client(APP_TOKEN)))[0] == 200
    headers = {**as_client(BATCH_TOKEN, "high"), "X-Proxy-Max-Wait": "0"}
    status, answer, _ = await get(http, f"{proxy.url}{PATH}", headers)
    assert status == 503 and answer["X-Proxy-Error"] == "queue_timeout"
    assert answer["X-Proxy-Priority-Applied"] == "low"
