"""The background lane: jobs take a permit only when no synchronous request waits.

`Permits` is the one thing the runner asks of the rate limiter. Until the
limiter has lanes of its own, `BackgroundPermits` builds the background lane on
today's `RateLimiter`:

- it waits while the foreground line of the scope holds anyone;
- it paces jobs through the window: by a moment `t` into a window of `W` seconds
  and `L` permits, jobs take a permit only while the window's count (everyone's)
  is under `L * t / W`. Alone, jobs use the whole budget, one permit every `W / L`
  seconds; with synchronous traffic they take only what it left unused so far.
  So a window is never spent ahead of time by jobs: a synchronous request always
  finds a permit, except in the window's last permit interval (then it waits for
  the next window, at most that one interval). Taking every permit at the window's
  start, as a waiting request does, would make a synchronous request that arrives
  mid-window wait for the next window;
- one job at a time per scope takes a permit, like any request.

A synchronous request that arrives meanwhile lines up behind at most that one job:
never delayed by more than one permit interval by queued jobs.

When the limiter gains lanes (`acquire(scope, deadline, front, lane)`), the body
of `BackgroundPermits.acquire` becomes one call with `lane="background"`; nothing
else in the jobs package changes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Protocol

from proxy.errors import QueueTimeout
from proxy.limits import RateLimiter

# How often a job waiting behind synchronous requests looks again. Short against a
# permit interval (a second at 60/minute); the cost is one length check per look.
POLL_SECONDS = 0.05


class Permits(Protocol):
    async def acquire(self, scope: str, deadline: float) -> float:
        """A permit of `scope` for a job, by `deadline` (monotonic), else QueueTimeout
        (DailyLimit when the day's budget is spent); returns seconds waited."""
        ...


class BackgroundPermits:
    def __init__(self, limiter: RateLimiter, poll: float = POLL_SECONDS) -> None:
        self.limiter = limiter
        self.poll = poll
        self._turns: dict[str, asyncio.Lock] = {}

    async def acquire(self, scope: str, deadline: float) -> float:
        started = time.monotonic()
        turn = self._turns.setdefault(scope, asyncio.Lock())
        async with turn:
            while True:
                if self.limiter.queue_depth(scope):
                    pause = self.poll
                else:
                    pause = self._paced(scope)
                    if pause <= 0:
                        break
                if time.monotonic() + pause > deadline:
                    raise QueueTimeout(
                        f"synchronous {scope} requests kept every permit for the job's wait",
                        retry_after=1.0,
                    )
                await asyncio.sleep(pause)
            await self.limiter.acquire(scope, deadline)
        return time.monotonic() - started

    def _paced(self, scope: str) -> float:
        """0 when a job may take a permit now; else seconds until the pace allows one."""
        limiter = self.limiter
        limit = limiter.buckets[scope].effective_limit
        windows = limiter.windows
        now = limiter.clock.now()
        window = windows.index(now)
        start = windows.end(window) - windows.length
        used = limiter.backend.known_used(scope, window)
        if used < limit * (now - start) / windows.length:
            return 0.0
        # When the pace line passes the count (or the next window begins).
        due = min(start + used * windows.length / limit, windows.end(window))
        return min(1.0, max(self.poll, due - now))


class LanePermits:
    """What the pipeline's Attempts asks of a limiter, with permits from the background
    lane (the retry holds and pauses stay the shared limiter's: one view of the API)."""

    def __init__(self, permits: Permits, limiter: RateLimiter) -> None:
        self.permits = permits
        self.limiter = limiter

    async def acquire(self, scope: str, deadline: float, front: bool = False) -> float:
        # `front` (a retry keeps its place) has no meaning in a lane of one job per scope.
        return await self.permits.acquire(scope, deadline)

    async def hold(self, scope: str, headers: Mapping[str, str]) -> float:
        return await self.limiter.hold(scope, headers)

    def hold_for(self, scope: str, seconds: float) -> float:
        return self.limiter.hold_for(scope, seconds)
