"""limits.windows on the Redis backend: one script over every window of a permit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio
from redis.crc import key_slot

from proxy.config import LimitsConfig, WindowConfig
from proxy.limits.backend import Verdict
from proxy.limits.plan import Window, windows_of
from proxy.limits.redis_backend import RedisBackend
from tests.redis_server import INSTALL_HINT, RedisServer, redis_server_binary

G, WF, CF = Verdict.GRANTED, Verdict.WINDOW_FULL, Verdict.CARRY_FULL
MakeBackend = Callable[..., Awaitable[RedisBackend]]


def plan(*windows: tuple[int, float, str]) -> tuple[Window, ...]:
    return windows_of(
        LimitsConfig(
            user_per_minute=0,
            account_per_minute=0,
            per_day=0,
            windows=tuple(WindowConfig(n, per, scope) for n, per, scope in windows),
        )
    )


HOUR_, SECOND_ = plan((70, 3600, "all"), (50, 1, "all"))  # longest first, as a scope has them
BOTH = (HOUR_, SECOND_)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    if redis_server_binary() is None:
        pytest.fail(INSTALL_HINT)
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def make() -> AsyncIterator[MakeBackend]:
    made: list[RedisBackend] = []

    async def make(url: str, **kw: Any) -> RedisBackend:
        options: dict[str, Any] = {"fallback_share": 0.25, "op_timeout": 5.0, **kw}
        backend = RedisBackend(url, "k1", 60.0, 86400.0, **options)
        made.append(backend)
        await backend.start()
        return backend

    yield make
    for backend in made:
        await backend.close()


async def count(raw: redis.asyncio.Redis, name: str, index: int, kind: str = "w") -> int:
    return int(await raw.get(f"luxsci-proxy:{{k1}}:{kind}:{name}:{index}") or 0)


async def test_three_processes_count_a_permit_in_every_window_or_none(
    redis_server: RedisServer, raw: redis.asyncio.Redis, make: MakeBackend
) -> None:
    backends = [await make(redis_server.url) for _ in range(3)]

    async def together(second: int) -> list[tuple[Verdict, int]]:
        return await asyncio.gather(
            *(backends[i % 3].take(BOTH, (2, second), (70, 50), (0, 0)) for i in range(150))
        )

    first = await together(7200)
    assert first.count((G, -1)) == 50
    assert first.count((WF, 1)) == 100  # the second refused; the hour counted none of them
    second = await together(7201)
    assert second.count((G, -1)) == 20
    assert second.count((WF, 0)) == 130  # now the hour
    assert (await count(raw, "all.1h", 2), await count(raw, "all.1s", 7200)) == (70, 50)
    assert await count(raw, "all.1s", 7201) == 20
    assert all(b.known_used("all.1h", 2) <= 70 for b in backends)
    # Every key of the integration hashes to one Redis Cluster slot (one hash tag).
    keys = [key async for key in raw.scan_iter("luxsci-proxy:*")]
    assert len(keys) == 3 and len({key_slot(k) for k in keys}) == 1


async def test_each_window_keeps_its_own_reserve(
    redis_server: RedisServer, raw: redis.asyncio.Redis, make: MakeBackend
) -> None:
    a, b = await make(redis_server.url), await make(redis_server.url)
    # The end of second 7200 (a reserve of up to 2 in 7201), mid-hour (none).
    assert [await (a, b)[i % 2].take(BOTH, (2, 7200), (70, 50), (0, 2)) for i in range(3)] == [
        (G, -1),
        (G, -1),
        (CF, 1),
    ]
    assert await count(raw, "all.1s", 7201, "c") == 2
    assert await count(raw, "all.1h", 3, "c") == 0
    assert b.known_used("all.1s", 7201) == 2
    # A cap under 0: no reserve may be made there, so the permit waits.
    assert await a.take(BOTH, (2, 7200), (70, 50), (-1, 0)) == (CF, 0)
    # Second 7201: its budget less the two reserved.
    verdicts = [await a.take(BOTH, (2, 7201), (70, 50), (0, 0)) for _ in range(49)]
    assert verdicts == [(G, -1)] * 48 + [(WF, 1)]
    await a.raise_used("all.1h", 2, 69)  # the API says one is left of the hour
    assert await b.take(BOTH, (2, 7202), (70, 50), (0, 0)) == (G, -1)
    assert await b.take(BOTH, (2, 7202), (70, 50), (0, 0)) == (WF, 0)


async def test_without_redis_a_process_takes_its_share_and_settles_it_after(
    redis_server: RedisServer, make: MakeBackend
) -> None:
    b = await make(redis_server.url, op_timeout=0.5)
    assert await b.take(BOTH, (2, 7200), (70, 50), (0, 0)) == (G, -1)
    redis_server.stop()
    # The second Redis was lost in: what the others spent of it is unknown, so none.
    assert await b.take(BOTH, (2, 7200), (70, 50), (0, 0)) == (WF, 1)
    # From the next second, a quarter of each window: 12 of the second's 50, and of the
    # hour (a long window, as the day) a quarter from the start: 17 of 70.
    verdicts = [await b.take(BOTH, (2, 7201), (70, 50), (0, 0)) for _ in range(13)]
    assert verdicts == [(G, -1)] * 12 + [(WF, 1)]
    verdicts = [await b.take(BOTH, (2, 7202), (70, 50), (0, 0)) for _ in range(6)]
    assert verdicts == [(G, -1)] * 5 + [(WF, 0)]
    assert b.status()["fallback"] is True

    redis_server.restart()  # empty: nothing was saved
    await asyncio.sleep(1.05)
    assert await b.take(BOTH, (2, 7203), (70, 50), (0, 0)) == (G, -1)
    assert b.status()["ok"] is True
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        # What the share granted in the hour is in Redis's count now, with the permit just
        # taken (the first was lost with Redis's data); the second that is over was not
        # worth adding.
        assert await count(client, "all.1h", 2) == 17 + 1
        assert await count(client, "all.1s", 7202) == 5
        assert await count(client, "all.1s", 7201) == 0
    finally:
        await client.aclose()


async def test_the_shorthands_day_beside_windows_is_the_days_count(
    redis_server: RedisServer, raw: redis.asyncio.Redis, make: MakeBackend
) -> None:
    day, second = windows_of(
        LimitsConfig(
            user_per_minute=0,
            account_per_minute=0,
            per_day=3,
            windows=(WindowConfig(10, 1.0, "all"),),
        )
    )
    b = await make(redis_server.url)
    assert await b.acquire("account", 5, 10, 100, 3) is G  # the shorthand's own way
    taken = [await b.take((day, second), (100, 7200), (3, 10), (0, 0)) for _ in range(3)]
    assert taken == [(G, -1), (G, -1), (WF, 0)]
    assert int(await raw.get("luxsci-proxy:{k1}:d:100") or 0) == 3  # one count, either way
    assert b.known_used("day", 100) == 3
