"""The Redis limiter backend against a real redis-server over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import pytest
import redis.asyncio
from structlog.testing import capture_logs

from proxy.limits.backend import Verdict
from proxy.limits.redis_backend import RedisBackend, redact_url
from tests.redis_server import INSTALL_HINT, RedisServer, free_port, redis_server_binary

G, WF, DF, CF = Verdict.GRANTED, Verdict.WINDOW_FULL, Verdict.DAY_FULL, Verdict.CARRY_FULL
MakeBackend = Callable[..., Awaitable[RedisBackend]]


def wkey(scope: str, window: int, key: str = "k1") -> str:
    return f"luxsci-proxy:{{{key}}}:w:{scope}:{window}"


def ckey(scope: str, window: int, key: str = "k1") -> str:
    """The reserve in `window` made at the end of the window before."""
    return f"luxsci-proxy:{{{key}}}:c:{scope}:{window}"


def dkey(day: int, key: str = "k1") -> str:
    return f"luxsci-proxy:{{{key}}}:d:{day}"


def require_redis() -> None:
    if redis_server_binary() is None:
        pytest.fail(INSTALL_HINT)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    require_redis()
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client to look at what the backend wrote."""
    client = redis.asyncio.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def make() -> AsyncIterator[MakeBackend]:
    made: list[RedisBackend] = []

    async def make(url: str, key: str = "k1", **kw: Any) -> RedisBackend:
        options: dict[str, Any] = {
            "window_seconds": 60.0,
            "day_seconds": 86400.0,
            "fallback_share": 0.25,
        }
        options.update(kw)
        backend = RedisBackend(url, key, **options)
        made.append(backend)
        await backend.start()
        return backend

    yield make
    for backend in made:
        await backend.close()


async def count(raw: redis.asyncio.Redis, key: str) -> int:
    return int(await raw.get(key) or 0)


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


# -- counting ------------------------------------------------------------------------


async def test_window_limit_enforced(
    redis_server: RedisServer, raw: redis.asyncio.Redis, make: MakeBackend
) -> None:
    b = await make(redis_server.url)
    verdicts = [await b.acquire("user", 5, 3, 0, 100) for _ in range(4)]
    assert verdicts == [G, G, G, WF]
    assert await count(raw, wkey("user", 5)) == 3
    assert b.status() == {"ok": True, "backend": "redis"}


async def test_scopes_are_independent(
    redis_server: RedisServer, raw: redis.asyncio.Redis, make: MakeBackend
) -> None:
    b = await make(redis_server.url)
    assert [await b.acquire("user", 5, 2, 0, 100) for _ in range(3)] == [G, G, WF]
    assert [await b.acquire("account", 5, 2, 0, 100) for _ in range(3)] == [G, G, WF]
    assert await count(raw, wkey("user", 5)) == 2
    assert await count(raw, wkey("account", 5)) == 2
    assert await b.day_used(0) == 4


async def test_day_limit_across_scopes(redis_server: RedisServer, make: MakeBackend) -> None:
    b = await make(redis_server.url)
    assert await b.acquire("user", 5, 10, 0, 3) is G
    assert await b.acquire("account", 5, 10, 0, 3) is G
    assert await b.acquire("user", 5, 10, 0, 3) is G
    assert await b.acquire("account", 5, 10, 0, 3) is DF
    assert await b.acquire("user", 6, 10, 0, 3) is DF
    assert await b.day_used(0) == 3
    # The next day starts from nothing.
    assert await b.day_used(1) == 0
    assert await b.acquire("user", 7, 10, 1, 3) is G


async def test_new_window_resets_window_but_not_day(
    redis_server: RedisServer, make: MakeBackend
) -> None:
    b = await make(redis_server.url)
    assert [await b.acquire("user", 5, 2, 0, 5) for _ in range(3)] == [G, G, WF]
    assert [await b.acquire("user", 6, 2, 0, 5) for _ in range(3)] == [G, G, WF]
    assert [await b.acquire("user", 7, 2, 0, 5) for _ in range(2)] == [G, DF]
    assert await b.day_used(0) == 5


async def test_raise_used_raises_never_lowers(
    redis_server: RedisServer, raw: redis.asyncio.Redis, make: MakeBackend
) -> None:
    b = await make(redis_server.url)
    assert await b.acquire("user", 5, 5, 0, 100) is G
    await b.raise_used("user", 5, 4)
    assert await count(raw, wkey("user", 5)) == 4
    assert [await b.acquire("user", 5, 5, 0, 100) for _ in range(2)] == [G, WF]
    await b.raise_used("user", 5, 2)
    assert await count(raw, wkey("user", 5)) == 5
    # A window nobody counted yet: the server's word creates it, with an expiry.
    await b.raise_used("account", 6, 3)
    assert await count(raw, wkey("account", 6)) == 3
    assert 0 < await raw.pttl(wkey("account", 6)) <= 121_000
    # raise_used is about the window only, the day is untouched.
    assert await b.day_used(0) == 2


async def test_keys_expire(
    redis_server: RedisServer, raw: redis.asyncio.Redis, make: MakeBackend
) -> None:
    b = await make(redis_server.url, window_seconds=10.0, day_seconds=100.0)
    assert await b.acquire("user", 5, 5, 0, 100) is G
    assert 20_000 <= await raw.pttl(wkey("user", 5)) <= 21_000
    assert 200_000 <= await raw.pttl(dkey(0)) <= 201_000


async def test_a_reserve_expires_like_a_window_count(
    redis_server: RedisServer, raw: redis.asyncio.Redis, make: MakeBackend
) -> None:
    b = await make(redis_server.url, window_seconds=10.0, day_seconds=100.0)
    assert await b.acquire("user", 5, 5, 0, 100, carry_cap=1) is G
    assert await count(raw, ckey("user", 6)) == 1
    assert 20_000 <= await raw.pttl(ckey("user", 6)) <= 21_000


# -- a window's end --------------------------------------------------------------------


async def test_a_window_end_reserves_in_the_next_window_up_to_the_cap(
    redis_server: RedisServer, raw: redis.asyncio.Redis, make: MakeBackend
) -> None:
    a, b = await make(redis_server.url), await make(redis_server.url)
    assert [await a.acquire("user", 5, 10, 0, 100, carry_cap=2) for _ in range(2)] == [G, G]
    # The reserve is shared: the other process finds it spent.
    assert await b.acquire("user", 5, 10, 0, 100, carry_cap=2) is CF
    assert await b.acquire("user", 5, 10, 0, 100) is G  # before the window's end: no reserve
    assert await count(raw, wkey("user", 5)) == 3
    assert await count(raw, ckey("user", 6)) == 2
    assert await b.day_used(0) == 3  # a reserved permit is one of the day's, once
    assert (a.known_used("user", 5), a.known_used("user", 6)) == (2, 2)
    # Window 6: 10 less the 2 reserved, whichever process asks.
    verdicts = [await (a, b)[i % 2].acquire("user", 6, 10, 0, 100) for i in range(9)]
    assert verdicts == [G] * 8 + [WF]
    assert b.known_used("user", 6) == 10  # the reserve counts in what the API may have seen
    # A full window refuses as full, reserve or not.
    assert await a.acquire("user", 6, 10, 0, 100, carry_cap=2) is WF


async def test_the_servers_count_of_a_window_includes_its_reserve(
    redis_server: RedisServer, raw: redis.asyncio.Redis, make: MakeBackend
) -> None:
    b = await make(redis_server.url)
    assert [await b.acquire("user", 5, 10, 0, 100, carry_cap=3) for _ in range(3)] == [G] * 3
    await b.raise_used("user", 6, 3)  # the API counted the three in window 6: nothing new
    assert await count(raw, wkey("user", 6)) == 0
    await b.raise_used("user", 6, 5)  # two more from elsewhere
    assert await count(raw, wkey("user", 6)) == 2
    assert b.known_used("user", 6) == 5
    assert [await b.acquire("user", 6, 10, 0, 100) for _ in range(6)] == [G] * 5 + [WF]


async def test_concurrent_window_end_permits_never_pass_the_reserve(
    redis_server: RedisServer, raw: redis.asyncio.Redis, make: MakeBackend
) -> None:
    backends = [await make(redis_server.url, op_timeout=5.0) for _ in range(3)]
    verdicts = await asyncio.gather(
        *(backends[i % 3].acquire("user", 5, 100, 0, 1000, carry_cap=10) for i in range(90))
    )
    assert verdicts.count(G) == 10
    assert verdicts.count(CF) == 80
    assert await count(raw, wkey("user", 5)) == 10
    assert await count(raw, ckey("user", 6)) == 10


# -- sharing between processes ---------------------------------------------------------


async def test_instances_with_same_key_share_counts(
    redis_server: RedisServer, make: MakeBackend
) -> None:
    a, b, c = [await make(redis_server.url, "shared") for _ in range(3)]
    other = await make(redis_server.url, "other")
    assert await a.acquire("user", 5, 4, 0, 100) is G
    assert await b.acquire("user", 5, 4, 0, 100) is G
    assert await a.acquire("user", 5, 4, 0, 100) is G
    assert await c.acquire("user", 5, 4, 0, 100) is G
    assert [await x.acquire("user", 5, 4, 0, 100) for x in (a, b, c)] == [WF, WF, WF]
    assert await b.day_used(0) == 4
    # Another integration's key has its own limits.
    assert [await other.acquire("user", 5, 4, 0, 100) for _ in range(4)] == [G] * 4
    assert await other.day_used(0) == 4


async def test_concurrent_acquires_are_atomic(
    redis_server: RedisServer, raw: redis.asyncio.Redis, make: MakeBackend
) -> None:
    # Generous op timeout: this is about atomicity, not about a slow machine falling back.
    backends = [await make(redis_server.url, op_timeout=5.0) for _ in range(3)]
    verdicts = await asyncio.gather(
        *(backends[i % 3].acquire("user", 5, 50, 0, 1000) for i in range(300))
    )
    assert verdicts.count(G) == 50
    assert verdicts.count(WF) == 250
    assert await count(raw, wkey("user", 5)) == 50
    assert await count(raw, dkey(0)) == 50

    # The day too: two scopes with room, one day budget of 70.
    verdicts = await asyncio.gather(
        *(backends[i % 3].acquire(("user", "account")[i % 2], 6, 50, 1, 70) for i in range(300))
    )
    assert verdicts.count(G) == 70
    assert await count(raw, dkey(1)) == 70
    assert await count(raw, wkey("user", 6)) + await count(raw, wkey("account", 6)) == 70


# -- when Redis is gone ------------------------------------------------------------------


async def test_fallback_when_redis_stops_then_recovery(
    redis_server: RedisServer, make: MakeBackend
) -> None:
    b = await make(redis_server.url, fallback_share=0.25)
    assert await b.acquire("user", 1, 40, 0, 1000) is G
    redis_server.stop()
    with capture_logs() as logs:
        # The window Redis was lost in: others may have spent it, so nothing more here.
        assert await b.acquire("user", 1, 40, 0, 1000) is WF
        verdicts = [await b.acquire("user", 2, 40, 0, 1000) for _ in range(15)]
        # From the next window, the local share: floor(40 * 0.25) = 10 per window.
        assert verdicts == [G] * 10 + [WF] * 5
        status = b.status()
        assert status["ok"] is False
        assert status["fallback"] is True
        assert status["backend"] == "redis"
        assert status["error"]
        assert await b.day_used(0) == 10
        assert len(events(logs, "limits_redis_unavailable")) == 1
        assert events(logs, "limits_redis_unavailable")[0]["log_level"] == "warning"

        redis_server.restart()  # same port, empty: nothing was saved
        await asyncio.sleep(1.05)
        assert await b.acquire("user", 2, 40, 0, 1000) is G
        assert b.status() == {"ok": True, "backend": "redis"}
        assert len(events(logs, "limits_redis_recovered")) == 1

    # Back on Redis, and the permits granted locally were added to its counts.
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        assert await count(client, wkey("user", 2)) == 11
        assert await count(client, dkey(0)) == 11
    finally:
        await client.aclose()
    assert await b.day_used(0) == 11


async def test_a_reserve_made_on_the_local_share_is_added_to_the_shared_one(
    redis_server: RedisServer, make: MakeBackend
) -> None:
    b = await make(redis_server.url, fallback_share=0.25)
    assert await b.acquire("user", 1, 40, 0, 1000) is G
    redis_server.stop()
    assert await b.acquire("user", 1, 40, 0, 1000) is WF  # the window Redis was lost in
    # Window 2's end, on the local share: its share of a reserve of 4 is 1.
    verdicts = [await b.acquire("user", 2, 40, 0, 1000, carry_cap=4) for _ in range(2)]
    assert verdicts == [G, CF]
    assert b.known_used("user", 3) == 1
    # A share too small for a reserve waits out the window's end.
    assert await b.acquire("user", 2, 40, 0, 1000, carry_cap=3) is CF

    redis_server.restart()  # empty: nothing was saved
    await asyncio.sleep(1.05)
    assert await b.acquire("user", 3, 40, 0, 1000) is G
    assert b.status()["ok"] is True
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        assert await count(client, wkey("user", 2)) == 1
        assert await count(client, ckey("user", 3)) == 1  # the others now see it too
        assert await count(client, wkey("user", 3)) == 1
        assert await count(client, dkey(0)) == 2
    finally:
        await client.aclose()
    assert b.known_used("user", 3) == 2


async def test_an_outage_noticed_at_a_window_end_spares_the_next_windows_reserve(
    redis_server: RedisServer, make: MakeBackend
) -> None:
    b = await make(redis_server.url, fallback_share=0.25)
    redis_server.stop()
    # The others may have reserved up to a tenth of window 2 in Redis before it went.
    assert await b.acquire("user", 1, 40, 0, 1000, carry_cap=4) is WF
    verdicts = [await b.acquire("user", 2, 40, 0, 1000) for _ in range(10)]
    assert verdicts == [G] * 9 + [WF]  # floor((40 - 4) * 0.25), not floor(40 * 0.25)
    verdicts = [await b.acquire("user", 3, 40, 0, 1000) for _ in range(11)]
    assert verdicts == [G] * 10 + [WF]  # from the window after, the whole share


async def test_starts_in_fallback_when_redis_is_down(make: MakeBackend) -> None:
    require_redis()
    port = free_port()
    with capture_logs() as logs:
        b = await make(f"redis://127.0.0.1:{port}/0", fallback_share=0.25)
    assert b.status()["ok"] is False
    assert b.status()["fallback"] is True
    assert len(events(logs, "limits_redis_unavailable")) == 1
    # Nothing in the first window (what others spent of it is unknown), then
    # max(1, floor(4 * 0.25)) = 1; the day limit is scaled too: floor(9 * 0.25) = 2.
    assert await b.acquire("user", 5, 4, 0, 9) is WF
    assert [await b.acquire("user", 6, 4, 0, 9) for _ in range(2)] == [G, WF]
    assert await b.acquire("account", 6, 4, 0, 9) is G
    assert await b.acquire("account", 7, 4, 0, 9) is DF

    server = RedisServer(port)
    server.start()
    try:
        await asyncio.sleep(1.05)
        assert await b.acquire("user", 7, 4, 0, 9) is G
        assert b.status() == {"ok": True, "backend": "redis"}
        assert await b.day_used(0) == 3
    finally:
        server.stop()


async def test_hung_redis_does_not_stall_acquisitions(make: MakeBackend) -> None:
    """A Redis that accepts and never answers: every call is cut at op_timeout,
    and the fallback probes it at most once a second."""
    connections = 0
    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writers.append(writer)
        while await reader.read(4096):
            pass
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        b = await make(f"redis://127.0.0.1:{port}/0", op_timeout=0.2)
        assert time.monotonic() - started < 0.6
        assert b.status()["fallback"] is True

        assert await b.acquire("user", 4, 400, 0, 10_000) is WF  # the outage's own window
        granted = 0
        slowest = 0.0
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            t0 = time.monotonic()
            verdicts = await asyncio.gather(
                *(b.acquire("user", 5, 400, 0, 10_000) for _ in range(20))
            )
            slowest = max(slowest, time.monotonic() - t0)
            granted += verdicts.count(G)
            await asyncio.sleep(0.05)
        assert slowest < 0.5
        assert granted == 100  # floor(400 * 0.25): all from the local share
        # The start's PING plus one probe after a second; not one per acquisition.
        assert 2 <= connections <= 3
        assert b.status()["ok"] is False
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_password_never_in_status_or_logs(make: MakeBackend) -> None:
    require_redis()
    secret = "wr0ng/s3cret"
    server = RedisServer(extra_args=["--requirepass", "right-pass"])
    server.start()
    try:
        with capture_logs() as logs:
            wrong = await make(f"redis://:wr0ng%2Fs3cret@127.0.0.1:{server.port}/0")
            assert await wrong.acquire("user", 5, 4, 0, 100) is WF
            assert await wrong.acquire("user", 6, 4, 0, 100) is G
            down = await make(f"redis://user:wr0ng%2Fs3cret@127.0.0.1:{free_port()}/0")
            assert await down.acquire("user", 5, 4, 0, 100) is WF
            assert await down.acquire("user", 6, 4, 0, 100) is G
        for b in (wrong, down):
            assert b.status()["fallback"] is True
            assert b.status()["error"]
        text = repr([wrong.status(), down.status(), logs])
        assert len(events(logs, "limits_redis_unavailable")) == 2
        assert secret not in text
        assert "wr0ng%2Fs3cret" not in text

        right = await make(f"redis://:right-pass@127.0.0.1:{server.port}/0")
        assert await right.acquire("user", 5, 4, 0, 100) is G
        assert right.status() == {"ok": True, "backend": "redis"}
    finally:
        server.stop()


def test_redact_url() -> None:
    assert redact_url("redis://u:p%40ss@h:6379/0") == "redis://u:***@h:6379/0"
    assert redact_url("redis://:pw@h/1") == "redis://:***@h/1"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


async def test_an_idle_process_notices_an_outage_and_its_end_without_traffic(
    redis_server: RedisServer, make: MakeBackend
) -> None:
    b = await make(redis_server.url, watch_interval=0.2)
    assert b.status()["ok"] is True
    redis_server.stop()
    for _ in range(50):  # no acquire at all: only the watchdog can tell
        if b.status()["ok"] is False:
            break
        await asyncio.sleep(0.05)
    assert b.status()["ok"] is False
    redis_server.restart()
    for _ in range(60):
        if b.status()["ok"] is True:
            break
        await asyncio.sleep(0.05)
    assert b.status() == {"ok": True, "backend": "redis"}


async def test_close_ends_the_watchdog_even_when_a_redis_call_drops_the_cancellation(
    redis_server: RedisServer,
) -> None:
    b = RedisBackend(redis_server.url, "k1", 60.0, 86400.0, 0.25, watch_interval=0.01)
    await b.start()
    ping = b._client.ping
    in_ping = asyncio.Event()
    dropped = False

    async def ping_that_drops_one_cancellation() -> bool:
        # What asyncio.wait_for does on Python 3.11 when a cancellation lands as the
        # wrapped socket write completes: the cancellation is lost, the call goes on.
        nonlocal dropped
        in_ping.set()
        if not dropped:
            dropped = True
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(10)
        return bool(await ping())

    b._client.ping = ping_that_drops_one_cancellation  # type: ignore[method-assign]
    await in_ping.wait()  # the watchdog is probing
    closing = asyncio.ensure_future(b.close())
    await asyncio.wait({closing}, timeout=5)
    watchdog = b._watchdog
    assert watchdog is not None
    try:
        assert dropped
        assert closing.done()
        assert watchdog.done()
    finally:
        while not watchdog.done():  # a failed test still leaves nothing running
            watchdog.cancel()
            await asyncio.wait({watchdog}, timeout=0.1)
        await closing
