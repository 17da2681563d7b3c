"""The background lane: jobs take a permit only when no synchronous request waits.

`Permits` is the one thing the runner asks of the rate limiter. Until the
limiter has lanes of its own, `BackgroundPermits` builds the background lane on
today's `RateLimiter`:

- it waits while the foreground line of the scope holds anyone;
- it leaves the last tenth of each window's budget (at least one permit, when the
  budget has two or more) to synchronous requests, so one that arrives while jobs
  are draining a window still finds a permit at once instead of waiting for the
  next window;
- one job at a time per scope takes a permit, like any request.

A synchronous request that arrives meanwhile lines up behind at most that one job:
never delayed by more than one permit by queued jobs.

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
# The share of each window's budget jobs leave to synchronous requests.
RESERVE_SHARE = 10


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
                    pause = self._reserved(scope)
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

    def _reserved(self, scope: str) -> float:
        """0 when jobs may take a permit of this window; else seconds until they may
        look again (what is left of the window is the synchronous requests' reserve)."""
        limiter = self.limiter
        limit = limiter.buckets[scope].effective_limit
        if limit < 2:
            return 0.0  # nothing to share: a reserve would starve the jobs
        now = limiter.clock.now()
        window = limiter.windows.index(now)
        left = limit - limiter.backend.known_used(scope, window)
        if left > max(1, limit // RESERVE_SHARE):
            return 0.0
        return min(1.0, max(self.poll, limiter.windows.until_next(now)))


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
