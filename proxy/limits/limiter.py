"""The rate limiter: per-scope FIFO queues released as fast as the API's limits allow.

Each scope (user, account) has its own window budget and its own queue; both
share one day budget. A request takes a permit at once when its scope's queue
is empty and the window has room (the fast path: no task switch), otherwise it
waits in line. One pump task per scope hands permits to the head of the line,
sleeping to the next window when the current one is spent, and exits when the
line is empty. A waiter that leaves (client gone, deadline passed) is skipped
and never spends a permit.

At a window's end (the guard: the API may count a request in this window or
the next) a permit is counted in this window and reserved in the next one, up
to a tenth of the next one's budget; beyond that, permits wait for the next
window. The backend keeps the reserve, so with Redis all processes share it.

The server's rate-limit headers (X-RateLimit-* or the IETF RateLimit fields, read
by limits/headers.py) correct the local count (another client of the same
integration may be spending it too); a rate-limit 403 closes the scope until the
reset it names, and so does a spent window of the API's that is not ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from proxy.clock import ServerClock
from proxy.config import LimitsConfig, QueueConfig
from proxy.errors import DailyLimit, QueueFull, QueueTimeout
from proxy.limits import headers as rate_headers
from proxy.limits.backend import CARRY_SHARE, Backend, Verdict
from proxy.limits.windows import Windows

log = structlog.get_logger("proxy.limits")

SCOPES = ("user", "account")
# How far an API's reset may lie from our window's end and still name the same window:
# Date headers have whole seconds, and a reset in seconds from now is rounded up.
_ALIGNED = 2.0


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


@dataclass(eq=False)
class _Bucket:
    scope: str
    limit: int
    server_limit: int | None = None
    remaining: int | None = None
    # Server time until which the API told us this scope is spent (a 403).
    held_until: float = 0.0
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)
    pump: asyncio.Task[None] | None = None
    # Set to cut the pump's nap short (a reload changed the budget).
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def effective_limit(self) -> int:
        if self.server_limit is None:
            return self.limit
        return min(self.limit, self.server_limit)


class RateLimiter:
    def __init__(
        self,
        limits: LimitsConfig,
        queue: QueueConfig,
        backend: Backend,
        clock: ServerClock,
    ) -> None:
        self.cfg = limits
        self.queue = queue
        self.backend = backend
        self.clock = clock
        self.windows = Windows.of(limits.window_seconds, limits.day_seconds)
        self.buckets = {
            "user": _Bucket("user", limits.user_per_minute),
            "account": _Bucket("account", limits.account_per_minute),
        }
        self.waiting = 0

    def reconfigure(self, limits: LimitsConfig, queue: QueueConfig) -> None:
        """Reload: new budgets and queue bounds apply from the next permit on."""
        self.cfg = limits
        self.queue = queue
        self.buckets["user"].limit = limits.user_per_minute
        self.buckets["account"].limit = limits.account_per_minute
        for bucket in self.buckets.values():
            # A pump asleep until the next window must look again now: a raised
            # budget may have room in this one.
            bucket.wake.set()
            if bucket.waiters:
                self._ensure_pump(bucket)

    # -- taking permits ------------------------------------------------------------

    async def acquire(self, scope: str, deadline: float, front: bool = False) -> float:
        """Wait for a permit in `scope` until `deadline` (monotonic); returns seconds waited.

        `front`: a request that already waited (a retry) goes to the head of its line.
        """
        bucket = self.buckets[scope]
        if not bucket.waiters:
            now = self.clock.now()
            if now >= bucket.held_until:
                verdict = await self._try(bucket, now)
                if verdict is Verdict.GRANTED:
                    return 0.0
                if verdict is Verdict.DAY_FULL:
                    raise self._daily_limit()
        if self.waiting >= self.queue.max_size:
            raise QueueFull(
                f"{self.waiting} requests are already waiting for the API's rate limit "
                "(queue.max_size)",
                retry_after=self._retry_after(bucket),
            )
        started = time.monotonic()
        if deadline <= started:
            raise self._queue_timeout(bucket, 0.0)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if front:
            bucket.waiters.appendleft(future)
        else:
            bucket.waiters.append(future)
        self.waiting += 1
        self._ensure_pump(bucket)
        try:
            async with asyncio.timeout_at(self._loop_time(deadline)):
                await future
        except TimeoutError:
            raise self._queue_timeout(bucket, time.monotonic() - started) from None
        finally:
            self.waiting -= 1
            # A waiter that left stays in the deque, cancelled; the pump skips it.
        return time.monotonic() - started

    async def _try(self, bucket: _Bucket, now: float) -> Verdict:
        """Take a permit at server time `now` (the scope is not held) if the limits allow.

        In the guard at a window's end the API may count a request in this window or the
        next, so the backend counts a permit there in this one and reserves it in the next,
        while the next window's reserve has room (CARRY_FULL once it has none). Waiting out
        the guard instead stalled every request for up to half a second at each window's
        end, however much budget was left. `now` is read once by the caller: the fast path
        pays for one clock reading and one guard test per permit.
        """
        windows = self.windows
        window = windows.index(now)
        limit = bucket.effective_limit
        if now < windows.guard_start(window, self.clock.uncertainty):
            carry_cap = 0
        else:
            carry_cap = limit // CARRY_SHARE
            if not carry_cap:  # a budget under CARRY_SHARE has no reserve
                return Verdict.CARRY_FULL
        return await self.backend.acquire(
            bucket.scope, window, limit, windows.day(now), self.cfg.per_day, carry_cap
        )

    def _ensure_pump(self, bucket: _Bucket) -> None:
        if bucket.pump is None or bucket.pump.done():
            bucket.pump = asyncio.get_running_loop().create_task(self._pump(bucket))

    async def _pump(self, bucket: _Bucket) -> None:
        waiters = bucket.waiters
        while waiters:
            if waiters[0].done():  # left the line (timed out or client gone)
                waiters.popleft()
                continue
            now = self.clock.now()
            if now < bucket.held_until:
                await self._nap(bucket, bucket.held_until - now)
                continue
            verdict = await self._try(bucket, now)
            if verdict is Verdict.GRANTED:
                # The head may have left while the backend answered: the next in line gets it.
                while waiters and waiters[0].done():
                    waiters.popleft()
                if waiters:
                    waiters.popleft().set_result(None)
            elif verdict is Verdict.DAY_FULL:
                error = self._daily_limit()
                while waiters:
                    waiter = waiters.popleft()
                    if not waiter.done():
                        waiter.set_exception(error)
            else:
                # WINDOW_FULL, or CARRY_FULL in the guard, which ends with the window: both
                # end with the window tried, which the backend's answer may have outlived.
                end = self.windows.end(self.windows.index(now))
                await self._nap(bucket, max(0.0, end - self.clock.now()))

    @staticmethod
    async def _nap(bucket: _Bucket, seconds: float) -> None:
        """Sleep until the next chance of a permit, or until a reload says look again."""
        bucket.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(bucket.wake.wait(), seconds)

    # -- what the server says ----------------------------------------------------------

    async def observe(self, scope: str, headers: Mapping[str, str]) -> None:
        """Correct the local view from a response's rate-limit headers (limits/headers.py:
        X-RateLimit-*, or the IETF RateLimit fields)."""
        now = self.clock.now()
        view = rate_headers.read(headers, now)
        if view is None or not view.complete:
            return
        assert view.limit is not None and view.remaining is not None
        assert view.reset_at is not None
        bucket = self.buckets[scope]
        cap = view.cap_per(self.windows.length)
        bucket.server_limit = cap if cap else None
        bucket.remaining = view.remaining
        current = self.windows.index(now)
        # The API's window is this one of ours when it resets where ours ends (LuxSci's
        # resets are exactly our window ends; a reset given in whole seconds from now
        # may be a second or two off).
        aligned = abs(view.reset_at - self.windows.end(current)) <= min(
            _ALIGNED, self.windows.length / 2
        )
        if aligned and (view.window is None or view.window == self.windows.length):
            # Whatever others spent, at most `remaining` more fit in this window. Only
            # news is worth a call: usually the count already says as much.
            used = bucket.effective_limit - view.remaining
            if used > self.backend.known_used(scope, current):
                await self.backend.raise_used(scope, current, used)
        elif view.remaining == 0 and view.reset_at > max(now, bucket.held_until):
            # The API's window is not ours (longer, or not aligned with ours): nothing
            # fits in it until its reset, whatever our count says, so none is sent to
            # be refused. Capped at a day: a misread reset must not close a scope for good.
            self.hold_for(scope, min(view.reset_at - now, self.windows.day_length))

    async def hold(self, scope: str, headers: Mapping[str, str]) -> float:
        """The API refused for rate: close `scope` until its reset; returns seconds until then."""
        now = self.clock.now()
        window = self.windows.index(now)
        reset = _int_header(headers, "X-RateLimit-Reset")
        until = float(reset) if reset is not None and reset > now else self.windows.end(window)
        # This window is spent, whatever the local count says.
        await self.backend.raise_used(scope, window, self.buckets[scope].effective_limit)
        return self.hold_for(scope, until - now)

    def hold_for(self, scope: str, seconds: float) -> float:
        """Close `scope` for `seconds` (a 403 until its reset, a 429 Retry-After); returns them."""
        bucket = self.buckets[scope]
        bucket.held_until = max(bucket.held_until, self.clock.now() + seconds)
        log.warning("rate_limit_pause", scope=scope, seconds=round(seconds, 2))
        return seconds

    # -- answers -------------------------------------------------------------------------

    def _retry_after(self, bucket: _Bucket) -> float:
        """A fair guess of when a new request would get through: after the line ahead of it."""
        now = self.clock.now()
        windows_ahead = len(bucket.waiters) // max(1, bucket.effective_limit)
        return max(bucket.held_until - now, self.windows.until_next(now)) + (
            windows_ahead * self.windows.length
        )

    def _queue_timeout(self, bucket: _Bucket, waited: float) -> QueueTimeout:
        return QueueTimeout(
            f"no {bucket.scope} rate-limit permit within the allowed wait "
            f"(waited {waited:.1f} s; queue.max_wait or X-Proxy-Max-Wait)",
            retry_after=self._retry_after(bucket),
        )

    def _daily_limit(self) -> DailyLimit:
        wait = self.windows.until_next_day(self.clock.now())
        return DailyLimit(
            f"the day's budget of {self.cfg.per_day} API requests is spent (limits.per_day); "
            "it renews at the next day boundary (UTC midnight by the API's clock)",
            retry_after=wait,
        )

    @staticmethod
    def _loop_time(deadline: float) -> float:
        """asyncio deadlines are in loop time; ours are time.monotonic()."""
        loop = asyncio.get_running_loop()
        return loop.time() + (deadline - time.monotonic())

    # -- life cycle and status ---------------------------------------------------------------

    async def start(self) -> None:
        await self.backend.start()

    async def close(self) -> None:
        for bucket in self.buckets.values():
            if bucket.pump is not None:
                bucket.pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await bucket.pump
        await self.backend.close()

    def status(self) -> dict[str, Any]:
        return self.backend.status()

    def day_used_known(self) -> int:
        return self.backend.known_day_used(self.windows.day(self.clock.now()))

    def queue_depth(self, scope: str) -> int:
        return sum(1 for w in self.buckets[scope].waiters if not w.done())
