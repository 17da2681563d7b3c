"""Traffic shaping against the sandbox's enforced limits, over real sockets.

Windows are 2 s here (the sandbox and the proxy agree) to keep the suite fast;
the default is the API's real minute.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio
from conftest import USER, MakeProxy, MakeSandbox
from redis_server import INSTALL_HINT, RedisServer, redis_server_binary

from proxy.clock import ServerClock
from proxy.config import LimitsConfig, QueueConfig
from proxy.errors import QueueTimeout
from proxy.limits import Backend, MemoryBackend, RateLimiter, Verdict
from proxy.limits.redis_backend import RedisBackend

WINDOW = 2
USER_PATH = f"/perl/api/v2/user/{USER}/profile"
ACCOUNT_PATH = "/perl/api/v2/account/42/things"


def limits(**overrides: object) -> dict[str, object]:
    return {"window_seconds": WINDOW, **overrides}


async def fetch(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], float]:
    started = time.monotonic()
    async with http.get(url, headers=headers) as resp:
        await resp.read()
        return resp.status, dict(resp.headers), time.monotonic() - started


async def test_five_times_overload_is_queued_with_no_rate_rejection_at_90_percent_of_the_rate(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await make_sandbox(window_seconds=WINDOW, user_per_window=10)
    proxy = await make_proxy(sandbox.url, limits=limits(user_per_minute=10))
    results = await asyncio.gather(*(fetch(http, proxy.url + USER_PATH) for _ in range(50)))

    assert [status for status, _, _ in results] == [200] * 50
    assert sandbox.sandbox.stats.rate_limited == 0  # the API never had to reject one
    served = [e["ts"] for e in sandbox.sandbox.log if e["scope"] == "user" and e["status"] == 200]
    per_window = Counter(int(ts // WINDOW) for ts in served)
    windows = sorted(per_window)
    # Every window from the first to the last was used, each at >= 90% of the limit
    # (the first may be partly spent when the burst arrives mid-window).
    assert windows == list(range(windows[0], windows[0] + len(windows)))
    assert all(per_window[w] >= 9 for w in windows[1:-1]), per_window
    assert len(windows) <= 6


async def test_queue_full_answers_503_at_once_with_retry_after(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await make_sandbox(window_seconds=WINDOW, user_per_window=2)
    proxy = await make_proxy(
        sandbox.url, limits=limits(user_per_minute=2), queue={"max_size": 3, "max_wait": 30}
    )
    results = await asyncio.gather(*(fetch(http, proxy.url + USER_PATH) for _ in range(10)))
    full = [(h, took) for status, h, took in results if status == 503]
    assert len(full) == 5  # 2 went at once, 3 waited, 5 did not fit
    for headers, took in full:
        assert headers["X-Proxy-Error"] == "queue_full"
        assert int(headers["Retry-After"]) >= 1
        assert took < 0.5  # prompt: no waiting for a place that will not come
    assert sum(1 for status, _, _ in results if status == 200) == 5
    assert sandbox.sandbox.stats.rate_limited == 0


async def test_queue_timeout_answers_503_when_the_wait_runs_out(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await make_sandbox(window_seconds=10, user_per_window=2)
    proxy = await make_proxy(
        sandbox.url,
        limits=limits(window_seconds=10, user_per_minute=2),
        queue={"max_size": 100, "max_wait": 0.5},
    )
    results = await asyncio.gather(*(fetch(http, proxy.url + USER_PATH) for _ in range(5)))
    timed_out = [(h, took) for status, h, took in results if status == 503]
    assert len(timed_out) == 3
    for headers, took in timed_out:
        assert headers["X-Proxy-Error"] == "queue_timeout"
        assert int(headers["Retry-After"]) >= 1
        assert 0.4 < took < 2.0
    # A client may ask for a shorter wait: zero means "now or never".
    status, headers, took = await fetch(
        http, proxy.url + USER_PATH, headers={"X-Proxy-Max-Wait": "0"}
    )
    assert status == 503 and headers["X-Proxy-Error"] == "queue_timeout" and took < 0.3
    async with http.get(proxy.url + USER_PATH, headers={"X-Proxy-Max-Wait": "soon"}) as resp:
        assert resp.status == 400
        assert resp.headers["X-Proxy-Error"] == "bad_request"
        assert "X-Proxy-Max-Wait" in (await resp.json())["error_message"]


async def test_daily_limit_fails_fast_with_retry_after_to_the_day_boundary(
    sandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(sandbox.url, limits=limits(per_day=5, day_seconds=3600))
    statuses = []
    for _ in range(6):
        status, headers, took = await fetch(http, proxy.url + ACCOUNT_PATH)
        statuses.append(status)
    # The login spent one of the day's five: four requests fit.
    assert statuses == [200, 200, 200, 200, 503, 503]
    assert headers["X-Proxy-Error"] == "daily_limit"
    assert 1 <= int(headers["Retry-After"]) <= 3600
    assert took < 0.3
    assert sandbox.sandbox.stats.requests == 5


async def test_user_and_account_budgets_are_independent(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await make_sandbox(window_seconds=10, user_per_window=2)
    proxy = await make_proxy(sandbox.url, limits=limits(window_seconds=10, user_per_minute=2))
    for _ in range(2):
        assert (await fetch(http, proxy.url + USER_PATH))[0] == 200
    waiting = asyncio.create_task(fetch(http, proxy.url + USER_PATH, {"X-Proxy-Max-Wait": "1"}))
    status, _, took = await fetch(http, proxy.url + ACCOUNT_PATH)
    assert status == 200 and took < 0.5  # the account budget is untouched by the user queue
    status, headers, _ = await waiting
    assert status == 503 and headers["X-Proxy-Error"] == "queue_timeout"


async def test_a_rate_limit_403_is_absorbed_by_waiting_for_the_reset(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    # Someone else spends this integration's budget too: the proxy thinks it has 9 per
    # window, the API allows 4. Its 403s (remaining 0) are not the client's problem.
    # (Under 10, nothing is sent ahead at a window's end: the burst goes out together.)
    sandbox = await make_sandbox(window_seconds=WINDOW, user_per_window=4)
    proxy = await make_proxy(sandbox.url, limits=limits(user_per_minute=9))
    results = await asyncio.gather(*(fetch(http, proxy.url + USER_PATH) for _ in range(12)))
    assert [status for status, _, _ in results] == [200] * 12
    assert sandbox.sandbox.stats.rate_limited > 0  # the API did refuse some attempts...
    # ...and the proxy learned the real limit from X-RateLimit-Limit.
    assert proxy.service.limiter.buckets["user"].effective_limit == 4


async def test_a_client_that_disconnects_while_queued_spends_no_permit(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await make_sandbox(window_seconds=WINDOW, user_per_window=1)
    proxy = await make_proxy(sandbox.url, limits=limits(user_per_minute=1))
    assert (await fetch(http, proxy.url + USER_PATH))[0] == 200  # the window's one permit

    async def impatient() -> None:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as s:
                await fetch(s, proxy.url + USER_PATH)
        except TimeoutError:
            pass

    await impatient()  # queued, then hung up
    await asyncio.sleep(0.05)
    assert proxy.service.limiter.queue_depth("user") == 0
    status, _, took = await fetch(http, proxy.url + USER_PATH)
    assert status == 200
    assert took < WINDOW + 0.5  # served in the next window: the leaver took no permit
    user_requests = [e for e in sandbox.sandbox.log if e["scope"] == "user"]
    assert len(user_requests) == 2


async def test_a_restart_keeps_the_days_count(
    sandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    state = str(tmp_path / "limits.json")
    day = limits(per_day=8, day_seconds=3600, state_file=state)
    first = await make_proxy(sandbox.url, limits=day)
    for _ in range(5):  # + 1 login = 6 of 8
        assert (await fetch(http, first.url + ACCOUNT_PATH))[0] == 200
    await first.service.stop()
    second = await make_proxy(sandbox.url, limits=day)  # its login: 7 of 8
    assert (await fetch(http, second.url + ACCOUNT_PATH))[0] == 200  # 8 of 8
    status, headers, _ = await fetch(http, second.url + ACCOUNT_PATH)
    assert status == 503 and headers["X-Proxy-Error"] == "daily_limit"


async def test_the_in_flight_cap_holds_whatever_the_rate(
    sandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(sandbox.url, limits=limits(max_inflight=2))
    sandbox.sandbox.add_fault(delay=0.2, times=8, path_prefix="/perl/api/v2/account/")
    results = await asyncio.gather(*(fetch(http, proxy.url + ACCOUNT_PATH) for _ in range(8)))
    assert [status for status, _, _ in results] == [200] * 8
    assert sandbox.sandbox.stats.max_inflight <= 2


# -- a window's end, on a clock the test moves ----------------------------------------------


def _limiter_at(now: list[float], per_minute: int, backend: Backend | None = None) -> RateLimiter:
    clock = ServerClock(wall=lambda: now[0])
    clock.known, clock.uncertainty = True, 0.0  # as after a few Date headers
    return RateLimiter(
        LimitsConfig(user_per_minute=per_minute, state_file=""),
        QueueConfig(),
        backend if backend is not None else MemoryBackend(),
        clock,
    )


async def _granted_at_once(limiter: RateLimiter) -> bool:
    try:
        return await limiter.acquire("user", time.monotonic() + 0.05) == 0.0
    except QueueTimeout:
        return False


async def _now_or_never(limiter: RateLimiter) -> bool:
    """A permit at once, or none: a deadline already past never joins the line (no pump)."""
    try:
        return await limiter.acquire("user", time.monotonic() - 1) == 0.0
    except QueueTimeout:
        return False


async def test_at_a_window_end_permits_go_at_once_and_are_reserved_in_the_next_window() -> None:
    now = [600.0 - 0.2]  # inside the last half second of window 9
    limiter = _limiter_at(now, per_minute=100)
    # A tenth of the next window may be reserved: 10 go at once, the 11th must wait.
    assert [await _granted_at_once(limiter) for _ in range(11)] == [True] * 10 + [False]
    assert limiter.backend.known_used("user", 9) == 10
    assert limiter.backend.known_used("user", 10) == 10  # the reserve, before window 10 begins
    now[0] = 601.0  # window 10: its budget less what was reserved from it
    await asyncio.sleep(0.3)  # the pump wakes from its nap and drops the waiter that left
    assert [await _granted_at_once(limiter) for _ in range(91)] == [True] * 90 + [False]
    assert limiter.backend.known_used("user", 10) == 100


@pytest.mark.parametrize("per_minute", [1, 9])
async def test_small_budgets_wait_out_a_window_end(per_minute: int) -> None:
    # A tenth of a budget under ten is no permit: nothing may be reserved.
    now = [600.0 - 0.2]
    limiter = _limiter_at(now, per_minute)
    assert not await _granted_at_once(limiter)
    now[0] = 600.5
    await asyncio.sleep(0.3)
    assert await _granted_at_once(limiter)


async def test_a_reload_resizes_the_reserve_and_what_it_takes_from_the_next_window() -> None:
    now = [600.0 - 0.2]
    limiter = _limiter_at(now, per_minute=100)
    assert [await _now_or_never(limiter) for _ in range(5)] == [True] * 5

    def reload(per_minute: int) -> None:
        limiter.reconfigure(LimitsConfig(user_per_minute=per_minute, state_file=""), QueueConfig())

    reload(30)  # a reserve of 3, and 5 are reserved already
    assert not await _now_or_never(limiter)
    reload(200)  # a reserve of 20: 15 more
    assert [await _now_or_never(limiter) for _ in range(16)] == [True] * 15 + [False]
    reload(50)
    now[0] = 601.0  # window 10: 50, less the 20 reserved under the larger budget
    assert [await _now_or_never(limiter) for _ in range(31)] == [True] * 30 + [False]


class _CountingBackend(MemoryBackend):
    """The memory backend, counting how often the limiter asks it."""

    asked = 0

    async def acquire(
        self, scope: str, window: int, limit: int, day: int, day_limit: int, carry_cap: int = 0
    ) -> Verdict:
        self.asked += 1
        return await super().acquire(scope, window, limit, day, day_limit, carry_cap)


async def test_a_spent_reserve_is_waited_out_in_one_nap_not_by_asking_again() -> None:
    now = [600.0 - 0.45]
    backend = _CountingBackend()
    limiter = _limiter_at(now, per_minute=100, backend=backend)
    assert [await _now_or_never(limiter) for _ in range(10)] == [True] * 10
    waiting = asyncio.create_task(limiter.acquire("user", time.monotonic() + 5))
    await asyncio.sleep(0.1)  # the clock stands still: the pump naps 0.45 s, to the window's end
    assert backend.asked == 12  # ten permits, the newcomer's own try, one try of the pump
    assert not waiting.done()
    now[0] = 600.0
    assert await waiting < 1.0  # the pump woke at the window's end and found room
    assert backend.asked == 13


def test_the_memory_backend_keeps_a_reserve_for_the_next_window_only() -> None:
    g, wf, cf = Verdict.GRANTED, Verdict.WINDOW_FULL, Verdict.CARRY_FULL
    b = MemoryBackend()
    # Window 5's end reserves up to 2 of window 6; each such permit is one of the day's.
    assert [b.acquire_now("user", 5, 10, 0, 100, carry_cap=2) for _ in range(3)] == [g, g, cf]
    assert (b.known_used("user", 5), b.known_used("user", 6)) == (2, 2)
    assert b.known_day_used(0) == 2
    assert b.acquire_now("account", 6, 10, 0, 100) is g  # another scope, its own reserve
    # Window 6: 10 less the 2 reserved; the reserve counts in what the API may have seen.
    assert [b.acquire_now("user", 6, 10, 0, 100) for _ in range(9)] == [g] * 8 + [wf]
    assert b.known_used("user", 6) == 10
    # Window 6's end reserves 1 of window 7 (a budget raised to 12 leaves room)...
    assert b.acquire_now("user", 6, 12, 0, 100, carry_cap=5) is g
    assert b.known_used("user", 7) == 1
    # ...but window 7 passes unused: window 8 starts whole, the old reserve dropped.
    assert [b.acquire_now("user", 8, 10, 0, 100) for _ in range(11)] == [g] * 10 + [wf]
    assert b.known_used("user", 7) == 0
    assert b.known_day_used(0) == 22


async def test_the_memory_backends_count_of_a_window_includes_its_reserve() -> None:
    b = MemoryBackend()
    assert [b.acquire_now("user", 5, 10, 0, 100, carry_cap=3) for _ in range(3)] == [
        Verdict.GRANTED
    ] * 3
    # The API reports 3 used in window 6: the reserved three, nothing new to learn.
    assert b.known_used("user", 6) == 3
    await b.raise_used("user", 6, 5)  # two more from elsewhere
    assert b.known_used("user", 6) == 5
    assert [b.acquire_now("user", 6, 10, 0, 100) for _ in range(6)] == [Verdict.GRANTED] * 5 + [
        Verdict.WINDOW_FULL
    ]
    await b.raise_used("user", 5, 10)  # a window already over: nothing to do
    assert b.known_used("user", 5) == 0


@pytest.fixture
def redis_url() -> Iterator[str]:
    if redis_server_binary() is None:
        pytest.fail(INSTALL_HINT)
    server = RedisServer()
    server.start()
    yield server.url
    server.stop()


async def test_processes_on_redis_share_one_reserve_at_a_window_end(redis_url: str) -> None:
    now = [570.0]  # the middle of window 9, on one clock for all three processes
    limiters = [
        _limiter_at(
            now,
            per_minute=100,
            # A generous op timeout: this is about sharing, not a slow machine falling back.
            backend=RedisBackend(redis_url, "shared", 60.0, 86400.0, 0.25, op_timeout=5.0),
        )
        for _ in range(3)
    ]
    for limiter in limiters:
        await limiter.start()

    async def granted_together(attempts: int) -> int:
        # All at once, spread over the three processes: the Lua script must be atomic.
        results = await asyncio.gather(*(_now_or_never(limiters[i % 3]) for i in range(attempts)))
        return sum(results)

    raw = redis.asyncio.Redis.from_url(redis_url)

    async def count(key: str) -> int:
        return int(await raw.get(f"luxsci-proxy:{{shared}}:{key}") or 0)

    try:
        assert await granted_together(50) == 50
        now[0] = 600.0 - 0.2  # the end of window 9
        # Together a tenth of window 10, not a tenth each, and none waits out the guard.
        assert await granted_together(30) == 10
        assert (await count("w:user:9"), await count("c:user:10")) == (60, 10)
        assert all(limiter.backend.known_used("user", 10) <= 10 for limiter in limiters)
        now[0] = 601.0  # window 10: together its budget less the reserve
        assert await granted_together(120) == 90
        # As the API may count them: never over the limit, whichever window the ten fell in.
        assert await count("w:user:9") + await count("c:user:10") <= 100
        assert await count("w:user:10") + await count("c:user:10") == 100
        now[0] = 660.0 - 0.2  # window 10 is full: its end reserves nothing in window 11
        assert await granted_together(10) == 0
        assert await count("c:user:11") == 0
        assert await count("d:0") == 150
    finally:
        await raw.aclose()
        for limiter in limiters:
            await limiter.close()
