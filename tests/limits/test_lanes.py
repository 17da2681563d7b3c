"""Lanes and clients in the limiter, on a clock the test moves.

The server clock and the limiter's aging ticks are one fake clock; a pump that
naps (real seconds) is woken by hand after the clock moves, so every permit
here is handed out when the test says, and nothing depends on how fast the
machine is.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import eventually

from proxy.clock import ServerClock
from proxy.config import LimitsConfig, QueueConfig
from proxy.errors import QueueFull
from proxy.limits import Client, Lane, MemoryBackend, RateLimiter

FAR = 3600.0  # a deadline no test reaches


def limiter_at(now: list[float], per_minute: int, **queue: float) -> RateLimiter:
    """A limiter on the fake clock; no aging unless the test asks for it."""
    clock = ServerClock(wall=lambda: now[0])
    clock.known, clock.uncertainty = True, 0.0  # as after a few Date headers
    return RateLimiter(
        LimitsConfig(user_per_minute=per_minute, state_file=""),
        QueueConfig(**{"aging": FAR, **queue}),  # type: ignore[arg-type]
        MemoryBackend(),
        clock,
        ticks=lambda: now[0],
    )


def move_to(limiter: RateLimiter, now: list[float], t: float) -> None:
    """Set the clock, and wake the napping pumps to look at it."""
    now[0] = t
    for bucket in limiter.buckets.values():
        bucket.wake.set()


def wait_in(
    limiter: RateLimiter,
    lane: Lane = Lane.NORMAL,
    client: Client | None = None,
    served: list[str] | None = None,
    tag: str = "",
) -> asyncio.Task[float]:
    """A request for a user permit; `served` records `tag` when it gets one."""

    async def one() -> float:
        waited = await limiter.acquire("user", time.monotonic() + FAR, lane=lane, client=client)
        if served is not None:
            served.append(tag)
        return waited

    return asyncio.get_running_loop().create_task(one())


async def spend_window(limiter: RateLimiter, per_minute: int) -> None:
    for _ in range(per_minute):
        assert await limiter.acquire("user", time.monotonic() + FAR) == 0.0


async def queued(limiter: RateLimiter, count: int) -> None:
    await eventually(lambda: limiter.queue_depth("user") == count)


async def test_a_high_request_takes_the_next_permit_ahead_of_500_low_ones() -> None:
    now = [570.0]  # the middle of window 9
    limiter = limiter_at(now, per_minute=10)
    await spend_window(limiter, 10)
    served: list[str] = []
    lows = [wait_in(limiter, Lane.LOW, served=served, tag=f"low{i}") for i in range(500)]
    await queued(limiter, 500)
    high = wait_in(limiter, Lane.HIGH, served=served, tag="high")
    await queued(limiter, 501)
    assert limiter.lane_depths("user") == {"high": 1, "normal": 0, "low": 500, "background": 0}

    move_to(limiter, now, 600.0)  # window 10: ten permits
    await asyncio.wait_for(high, 5)
    await asyncio.wait_for(asyncio.gather(*lows[:9]), 5)
    # The high request went first, then the oldest nine low ones, in order.
    assert served == ["high"] + [f"low{i}" for i in range(9)]
    assert limiter.lane_depths("user")["low"] == 491
    for task in lows:
        task.cancel()
    await asyncio.gather(*lows, return_exceptions=True)
    assert limiter.queue_depth("user") == 0
    await limiter.close()


@pytest.mark.parametrize("aging", [100.0, 10_000.0])
async def test_a_low_request_climbs_a_lane_per_aging_period_so_it_is_not_starved(
    aging: float,
) -> None:
    # One permit a window; every window one new normal request arrives just before it
    # opens, so the normal lane is never empty. Without aging the low request would wait
    # for ever; with aging 100 s it climbs to normal at the third window (waited 150 s)
    # and is the head there at the fourth.
    now = [570.0]
    limiter = limiter_at(now, per_minute=1, aging=aging, max_wait=FAR)
    await spend_window(limiter, 1)
    served: list[str] = []
    low = wait_in(limiter, Lane.LOW, served=served, tag="low")
    normals = []
    for window in range(10, 20):
        now[0] = window * 60.0 - 1
        normals.append(wait_in(limiter, Lane.NORMAL, served=served, tag=f"n{window}"))
        await eventually(lambda: len(normals) + 1 - len(served) == limiter.queue_depth("user"))
        count = len(served)
        move_to(limiter, now, window * 60.0)
        await eventually(lambda c=count: len(served) == c + 1)  # one permit, one request
    if aging == 100.0:
        assert served[:4] == ["n10", "n11", "n12", "low"]
        assert low.done()
    else:
        assert "low" not in served  # what aging is for
        assert limiter.lane_depths("user")["low"] == 1
    for task in [low, *normals]:
        task.cancel()
    await asyncio.gather(low, *normals, return_exceptions=True)
    await limiter.close()


async def test_clients_in_a_lane_take_turns_so_a_flood_leaves_the_others_their_share() -> None:
    now = [570.0]
    limiter = limiter_at(now, per_minute=10)
    await spend_window(limiter, 10)
    batch, app = Client("batch"), Client("app")
    served: list[str] = []
    flood = [wait_in(limiter, client=batch, served=served, tag="batch") for _ in range(100)]
    await queued(limiter, 100)
    mine = [wait_in(limiter, client=app, served=served, tag="app") for _ in range(3)]
    await queued(limiter, 103)
    assert limiter.client_depths() == {"batch": 100, "app": 3}

    move_to(limiter, now, 600.0)
    await asyncio.wait_for(asyncio.gather(*mine), 5)
    await eventually(lambda: len(served) == 10)
    # Every other permit, although 100 of the batch's requests were there first.
    assert served == ["batch", "app"] * 3 + ["batch"] * 4
    for task in flood:
        task.cancel()
    await asyncio.gather(*flood, return_exceptions=True)
    assert limiter.client_depths() == {"batch": 0, "app": 0}
    await limiter.close()


async def test_a_client_over_its_max_queued_is_refused_while_others_still_queue() -> None:
    now = [570.0]
    limiter = limiter_at(now, per_minute=1, max_size=10)
    await spend_window(limiter, 1)
    batch, app = Client("batch", max_queued=3), Client("app", max_queued=3)
    waiting = [wait_in(limiter, client=batch) for _ in range(3)]
    await queued(limiter, 3)
    started = time.monotonic()
    with pytest.raises(QueueFull) as refused:
        await limiter.acquire("user", time.monotonic() + FAR, client=batch)
    assert time.monotonic() - started < 0.1  # at once: no waiting for a place
    assert "'batch'" in refused.value.message and "max_queued" in refused.value.message
    assert refused.value.retry_after >= 1
    waiting += [wait_in(limiter, client=app) for _ in range(3)]  # its own share is untouched
    await queued(limiter, 6)
    assert limiter.client_depths() == {"batch": 3, "app": 3}
    # The global bound still holds for everyone: 10 in all.
    waiting += [wait_in(limiter) for _ in range(4)]
    await queued(limiter, 10)
    with pytest.raises(QueueFull, match=r"queue\.max_size"):
        await limiter.acquire("user", time.monotonic() + FAR)
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    await limiter.close()


async def test_background_work_takes_a_permit_only_when_no_other_request_waits() -> None:
    now = [570.0]
    limiter = limiter_at(now, per_minute=2)  # a permit interval of 30 s
    await spend_window(limiter, 2)
    served: list[str] = []
    job = wait_in(limiter, Lane.BACKGROUND, served=served, tag="job")
    await queued(limiter, 1)
    lows = [wait_in(limiter, Lane.LOW, served=served, tag=f"low{i}") for i in range(3)]
    await queued(limiter, 4)

    move_to(limiter, now, 600.0)  # two permits: both low, though the job came first
    await eventually(lambda: len(served) == 2)
    assert served == ["low0", "low1"]
    move_to(limiter, now, 660.0)  # the last low goes at once; the job is paced after it
    await eventually(lambda: len(served) == 3)
    assert served == ["low0", "low1", "low2"] and not job.done()
    move_to(limiter, now, 690.0)  # one permit interval into the window
    await asyncio.wait_for(job, 5)
    assert served[-1] == "job"
    assert all(task.done() for task in lows)
    await limiter.close()


async def test_background_work_is_paced_so_a_request_never_finds_more_than_one_permit_gone() -> (
    None
):
    # A window of ten permits, a hundred jobs waiting: at a window's start they take one
    # permit, not ten, so a request arriving at any moment of the window finds room.
    now = [570.0]
    limiter = limiter_at(now, per_minute=10)  # a permit interval of 6 s
    await spend_window(limiter, 10)
    served: list[str] = []
    jobs = [wait_in(limiter, Lane.BACKGROUND, served=served, tag="job") for _ in range(100)]
    await queued(limiter, 100)
    move_to(limiter, now, 600.0)
    await eventually(lambda: len(served) == 1)
    assert limiter.backend.known_used("user", 10) == 1  # one job permit; nine left

    now[0] = 603.0  # half an interval on, a request arrives: it goes at once, no nap
    assert await asyncio.wait_for(wait_in(limiter, Lane.LOW), 5) < 0.5
    assert limiter.backend.known_used("user", 10) == 2
    # The jobs resume their pace: used 2, so the next one no earlier than 612.
    move_to(limiter, now, 611.0)
    await asyncio.sleep(0.05)
    assert len(served) == 1
    move_to(limiter, now, 612.0)
    await eventually(lambda: len(served) == 2)
    # Right after it, another request still finds the window open.
    assert await asyncio.wait_for(wait_in(limiter, Lane.HIGH), 5) < 0.5
    for task in jobs:
        task.cancel()
    await asyncio.gather(*jobs, return_exceptions=True)
    await limiter.close()


async def test_background_work_alone_still_uses_the_whole_budget_through_the_window() -> None:
    now = [600.0]
    limiter = limiter_at(now, per_minute=4)  # an interval of 15 s
    served: list[str] = []
    # The first job of a window goes at once; the next waits its turn, even with no queue.
    assert await limiter.acquire("user", time.monotonic() + FAR, lane=Lane.BACKGROUND) == 0.0
    jobs = [wait_in(limiter, Lane.BACKGROUND, served=served, tag="job") for _ in range(3)]
    await queued(limiter, 3)
    for step, t in enumerate((615.0, 630.0, 645.0), start=1):
        move_to(limiter, now, t)
        await eventually(lambda s=step: len(served) == s)
    await asyncio.wait_for(asyncio.gather(*jobs), 5)
    assert limiter.backend.known_used("user", 10) == 4  # all four permits of the window
    await limiter.close()
