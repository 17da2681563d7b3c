"""The rate limiter: per-scope queues released as fast as the API's limits allow.

Each scope (user, account) has its own window budget and its own queue; both
share one day budget. A request takes a permit at once when nobody waits in its
scope and the window has room (the fast path: no task switch, no allocation),
otherwise it waits in line. One pump task per scope hands out permits, sleeping
to the next window when the current one is spent, and exits when nobody waits.
A waiter that leaves (client gone, deadline passed) is skipped and never spends
a permit.

The line has lanes (lanes.py): each permit goes to the highest lane with a
request waiting, the clients in a lane take turns, and a request that has waited
`queue.aging` seconds in its lane climbs to the one above, so nothing waits
forever. Background work (the proxy's own jobs) takes a permit only while no
other request waits in its scope, and is paced: it spends a window's budget no
faster than evenly over the window, so a request arriving at any moment finds
at most one permit interval of the window taken by it (a burst at the window's
start would leave the whole window spent). Each client may have at most its
`max_queued` requests waiting, in all scopes together.

At a window's end (the guard: the API may count a request in this window or
the next) a permit is counted in this window and reserved in the next one, up
to a tenth of the next one's budget; beyond that, permits wait for the next
window. The backend keeps the reserve, so with Redis all processes share it.

The server's rate-limit headers (X-RateLimit-* or the IETF RateLimit fields, read
by limits/headers.py) correct the local count (another client of the same
integration may be spending it too); a rate-limit 403 closes the scope until the
reset it names, and so does a spent window of the API's that is not ours.

With `limits.windows` (plan.py) a scope's permit counts in every window of the
scope and of `all`, of any length: the backend takes it in all of them at once or
in none (`Backend.take`), a spent window makes the line wait for that window's
end, and a spent window of an hour or more answers at once, as the day always
has. The shorthand keeps its own path (`Backend.acquire`, one window and the day),
unchanged, so configs that use it behave exactly as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from proxy.clock import ServerClock
from proxy.config import LimitsConfig, QueueConfig
from proxy.debugflag import DebugFlag
from proxy.errors import BudgetSpent, DailyLimit, QueueFull, QueueTimeout, Unavailable
from proxy.limits import headers as rate_headers
from proxy.limits import plan
from proxy.limits.backend import CARRY_SHARE, Backend, Verdict
from proxy.limits.lanes import AGING, PROXY_CLIENT, Client, Lane, LaneQueue, Waiter
from proxy.limits.plan import Window
from proxy.limits.windows import DAY, Period, Windows

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
    lanes: tuple[LaneQueue, ...] = field(default_factory=lambda: tuple(LaneQueue() for _ in Lane))
    # Live waiters per lane, and in all: those that left are not counted, though their
    # entries stay in the lanes until they reach a head (or nobody waits any more).
    depth: list[int] = field(default_factory=lambda: [0] * len(Lane))
    queued: int = 0
    pump: asyncio.Task[None] | None = None
    # Set to cut the pump's nap short (a reload changed the budget, or a request arrived
    # while the pump paced background work).
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # The pump naps only to pace background work: any other arrival must wake it.
    pacing: bool = False
    # limits.windows: every window a permit of this scope counts in, longest first (see
    # plan.for_scope; empty: this scope is not limited). None: the shorthand, whose window
    # and day take the backend's `acquire`.
    windows: tuple[Window, ...] | None = None
    # Position in `windows` of the one `limit` and `server_limit` are about (plan.primary).
    primary: int = 0
    # The API's limit for each window, where its headers name that window's length.
    learned: list[int | None] = field(default_factory=list)
    # Each window's budget now (limit_of, kept up to date by set_windows and observe) and
    # length, so the fast path reads them without a call per window.
    limits: list[int] = field(default_factory=list)
    lengths: tuple[float, ...] = ()
    # Scratch for each permit (window index, reserve cap per window): reused, so the fast
    # path allocates nothing of its own.
    indexes: list[int] = field(default_factory=list)
    caps: list[int] = field(default_factory=list)
    # Position of the window that refused last: the pump naps to its end, or the
    # request is answered at once when it is a long one.
    blocked: int = 0

    @property
    def effective_limit(self) -> int:
        if self.server_limit is None:
            return self.limit
        return min(self.limit, self.server_limit)

    def limit_of(self, i: int) -> int:
        """Window i's budget: the configured one, or less where the API says less."""
        assert self.windows is not None
        limit = self.windows[i].limit
        cap = self.server_limit if i == self.primary else self.learned[i]
        return limit if cap is None or cap >= limit else cap

    def refresh_limits(self) -> None:
        """`limits` anew, after a reload or the API's word changed a budget."""
        self.limits = [self.limit_of(i) for i in range(len(self.limits))]

    def set_windows(self, windows: tuple[Window, ...]) -> None:
        """Take `windows` (all of the config's) as this scope's from now on."""
        mine = plan.for_scope(windows, self.scope)
        if self.windows is None or [w.name for w in mine] != [w.name for w in self.windows]:
            # New windows (at start): nothing learnt of them yet. A reload that changes
            # budgets only keeps what the API said of each window.
            n = len(mine)
            self.learned = [None] * n
            self.indexes, self.limits, self.caps = [0] * n, [0] * n, [0] * n
            self.blocked = 0
        self.windows = mine
        self.lengths = tuple(w.period.length for w in mine)
        self.primary = plan.primary(mine, self.scope) if mine else 0
        self.limit = mine[self.primary].limit if mine else 0
        self.refresh_limits()


class RateLimiter:
    def __init__(
        self,
        limits: LimitsConfig,
        queue: QueueConfig,
        backend: Backend,
        clock: ServerClock,
        ticks: Callable[[], float] = time.monotonic,
        debug: DebugFlag | None = None,
    ) -> None:
        self.cfg = limits
        self.queue = queue
        self.backend = backend
        self.clock = clock
        # What aging is measured on: monotonic, unlike the server clock (tests move it).
        self._ticks = ticks
        # On: each wait is explained (which budget, why, how long) at debug.
        self.debug = debug if debug is not None else DebugFlag()
        self.all_windows = plan.windows_of(limits)
        self.windows = self._windows_of(limits, self.all_windows)
        self.buckets = {
            "user": _Bucket("user", limits.user_per_minute),
            "account": _Bucket("account", limits.account_per_minute),
        }
        if limits.windows:
            for bucket in self.buckets.values():
                bucket.set_windows(self.all_windows)
        self.waiting = 0
        # Requests waiting per client name, in all scopes (names: the configured ones).
        self.queued_by: dict[str, int] = {}

    @staticmethod
    def _windows_of(limits: LimitsConfig, windows: tuple[Window, ...]) -> Windows:
        """The shorthand's window and day; with limits.windows, the shortest window and a day
        at least as long as the longest (what holds are capped at)."""
        if not limits.windows:
            return Windows.of(limits.window_seconds, limits.day_seconds)
        lengths = [w.period.length for w in windows]
        return Windows.of(min(lengths), max(DAY, *lengths))

    def reconfigure(self, limits: LimitsConfig, queue: QueueConfig) -> None:
        """Reload: new budgets and queue bounds apply from the next permit on (the service
        keeps the windows themselves, their lengths and scopes, until a restart)."""
        self.cfg = limits
        self.queue = queue
        self.all_windows = plan.windows_of(limits)
        if limits.windows:
            for bucket in self.buckets.values():
                bucket.set_windows(self.all_windows)
        else:
            self.buckets["user"].limit = limits.user_per_minute
            self.buckets["account"].limit = limits.account_per_minute
        for bucket in self.buckets.values():
            # A pump asleep until the next window must look again now: a raised
            # budget may have room in this one.
            bucket.wake.set()
            if bucket.queued:
                self._ensure_pump(bucket)

    # -- taking permits ------------------------------------------------------------

    async def acquire(
        self,
        scope: str,
        deadline: float,
        front: bool = False,
        lane: Lane = Lane.NORMAL,
        client: Client | None = None,
    ) -> float:
        """Wait for a permit in `scope` until `deadline` (monotonic); returns seconds waited.

        `front`: a request that already waited (a retry) goes to the head of its client's
        line in its lane. `lane`: already capped to what the client may ask for; the
        proxy's jobs use Lane.BACKGROUND. `client`: whose share of the queue it takes;
        None for the proxy's own requests (its logins), which no client's cap bounds.
        """
        bucket = self.buckets[scope]
        # Why this request is about to wait (for the debug event): a spent window, the
        # next window's reserve, the API's word, or the line already ahead of it.
        why = "behind"
        if not bucket.queued:
            now = self.clock.now()
            if now >= bucket.held_until and (
                lane is not Lane.BACKGROUND or self._paced(bucket, now) <= 0.0
            ):
                verdict = await self._try(bucket, now)
                if verdict is Verdict.GRANTED:
                    return 0.0
                if verdict is Verdict.DAY_FULL:
                    raise self._spent(bucket)
                why = "window_full" if verdict is Verdict.WINDOW_FULL else "reserve_full"
            else:
                why = "held" if now < bucket.held_until else "paced"
        return await self._wait(bucket, deadline, front, lane, client, why)

    async def _wait(
        self,
        bucket: _Bucket,
        deadline: float,
        front: bool,
        lane: Lane,
        client: Client | None,
        why: str,
    ) -> float:
        """The slow path: wait in line for the pump to hand over a permit."""
        if self.waiting >= self.queue.max_size:
            raise QueueFull(
                f"{self.waiting} requests are already waiting for the API's rate limit "
                "(queue.max_size)",
                retry_after=self._retry_after(bucket, lane),
            )
        name = PROXY_CLIENT if client is None else client.name
        mine = self.queued_by.get(name, 0)
        if client is not None and client.max_queued is not None and mine >= client.max_queued:
            # This client's share is full; others keep theirs (and still get in line).
            raise QueueFull(
                f"{mine} requests of client {name!r} are already waiting for the API's rate "
                "limit: its share of the queue (access.clients[].max_queued)",
                retry_after=self._retry_after(bucket, lane),
            )
        started = time.monotonic()
        if deadline <= started:
            raise self._queue_timeout(bucket, 0.0, lane)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = Waiter(future, lane, name, self._ticks())
        bucket.lanes[lane].add(waiter, front)
        bucket.depth[lane] += 1
        bucket.queued += 1
        self.waiting += 1
        self.queued_by[name] = mine + 1
        if bucket.pacing and lane is not Lane.BACKGROUND:
            bucket.wake.set()  # the pump paces background work: this request goes first
        self._ensure_pump(bucket)
        if self.debug.on:
            self._explain_wait(bucket, why, front)
        try:
            async with asyncio.timeout_at(self._loop_time(deadline)):
                await future
        except TimeoutError:
            raise self._queue_timeout(bucket, time.monotonic() - started, waiter.lane) from None
        finally:
            self.waiting -= 1
            self.queued_by[name] -= 1
            if future.cancelled():
                # It left the line (deadline, client gone); the pump counted it out only
                # if it handed it a permit or an error. Its entry is skipped when reached.
                self._left(bucket, waiter.lane)
        waited = time.monotonic() - started
        if self.debug.on:
            log.debug("rate_limit_waited", scope=bucket.scope, why=why, waited_s=round(waited, 3))
        return waited

    def _explain_wait(self, bucket: _Bucket, why: str, front: bool) -> None:
        """Debug: which budget makes a request wait, and for about how long."""
        now = self.clock.now()
        fields: dict[str, Any] = {
            "scope": bucket.scope,
            "why": why,
            "budget": f"limits.{bucket.scope}_per_minute",
            "limit": bucket.effective_limit,
            "ahead": 0 if front else self.queue_depth(bucket.scope) - 1,
        }
        if bucket.server_limit is not None and bucket.server_limit < bucket.limit:
            fields["budget"] = "the API's own limit (rate-limit headers)"
        if why == "held":
            fields["budget"] = "the API's reset (a rate-limit refusal or a spent API window)"
            fields["held_for_s"] = round(bucket.held_until - now, 3)
        else:
            fields["window_ends_in_s"] = round(self.windows.until_next(now), 3)
        log.debug("rate_limit_wait", **fields)

    @staticmethod
    def _left(bucket: _Bucket, lane: Lane) -> None:
        """A live waiter is out of line."""
        bucket.depth[lane] -= 1
        bucket.queued -= 1
        if not bucket.queued:
            # Whatever entries remain belong to waiters that left: drop them now, so a
            # queue that timed out whole does not keep them until the next request.
            for queue in bucket.lanes:
                queue.drain()

    def _paced(self, bucket: _Bucket, now: float) -> float:
        """Seconds until background work may take a permit: the window's n-th permit
        (counting from 0, whoever took the others) no earlier than n permit intervals
        into the window (with limits.windows, into each of the scope's windows)."""
        if bucket.windows is not None:
            pause = 0.0
            for i, w in enumerate(bucket.windows):
                period = w.period
                window = period.index(now)
                used = self.backend.known_used(w.name, window)
                start = period.start(window) + used * period.length / bucket.limits[i]
                pause = max(pause, start - now)
            return pause
        windows = self.windows
        window = windows.index(now)
        used = self.backend.known_used(bucket.scope, window)
        start = windows.end(window) - windows.length
        return start + used * windows.length / bucket.effective_limit - now

    async def _try(self, bucket: _Bucket, now: float) -> Verdict:
        """Take a permit at server time `now` (the scope is not held) if the limits allow.

        In the guard at a window's end the API may count a request in this window or the
        next, so the backend counts a permit there in this one and reserves it in the next,
        while the next window's reserve has room (CARRY_FULL once it has none). Waiting out
        the guard instead stalled every request for up to half a second at each window's
        end, however much budget was left. `now` is read once by the caller: the fast path
        pays for one clock reading and one guard test per permit.
        """
        if bucket.windows is not None:
            return await self._try_windows(bucket, now)
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

    async def _try_windows(self, bucket: _Bucket, now: float) -> Verdict:
        """_try with limits.windows: a permit in every window of the scope, or none.

        Each window has its own guard and reserve, as the shorthand's window has. One more
        case, for windows as short as the clock is uncertain (a 1 s window, before answers
        have shown the clock the server's second ticking closely): most of the window is
        guard, so a budget too small for a tenth would hardly ever be granted, and the clock
        learns only from answers. There a permit is reserved in the next window up to half
        its budget, so the two windows share it until the clock knows better; and where even
        the next window's end is within reach of the uncertainty, nothing is granted (a
        permit is counted in two windows at most).
        DAY_FULL: a long window is spent (`bucket.blocked` says which).
        """
        windows = bucket.windows
        assert windows is not None
        if not windows:
            return Verdict.GRANTED  # no window counts this scope
        uncertainty = self.clock.uncertainty
        indexes, limits, caps = bucket.indexes, bucket.limits, bucket.caps
        for i, length in enumerate(bucket.lengths):
            window = math.floor(now / length)
            indexes[i] = window
            end = (window + 1) * length
            # The common case first: not near the window's end (guard <= 0.5 s).
            if now < end - 0.5 and now < end - uncertainty:
                caps[i] = 0
                continue
            w = windows[i]
            reach = max(w.period.guard, uncertainty)  # how late the API may count it
            if not w.carry or now < end - reach:
                caps[i] = 0
            elif now + reach >= end + length:
                caps[i] = -1  # it may be counted two windows on: it waits
            elif reach > length / 2:
                caps[i] = max(1, limits[i] // 2)
            else:
                # -1 (under CARRY_SHARE, no reserve): a reserve always spent, so
                # CARRY_FULL once the longer windows before this one have been looked at.
                caps[i] = limits[i] // CARRY_SHARE or -1
        verdict, at = await self.backend.take(windows, indexes, limits, caps)
        if verdict is Verdict.GRANTED:
            return verdict
        bucket.blocked = at
        if verdict is Verdict.WINDOW_FULL and windows[at].long:
            return Verdict.DAY_FULL
        return verdict

    def _window_end(self, bucket: _Bucket, now: float) -> float:
        """The end of the window the last refusal named (the shorthand: the scope's window)."""
        if bucket.windows:
            period = bucket.windows[bucket.blocked].period
            return period.end(period.index(now))
        return self.windows.end(self.windows.index(now))

    def _ensure_pump(self, bucket: _Bucket) -> None:
        if bucket.pump is None or bucket.pump.done():
            bucket.pump = asyncio.get_running_loop().create_task(self._pump(bucket))

    async def _pump(self, bucket: _Bucket) -> None:
        while (waiter := self._next(bucket)) is not None:
            now = self.clock.now()
            if now < bucket.held_until:
                await self._nap(bucket, bucket.held_until - now)
                continue
            if waiter.lane is Lane.BACKGROUND:
                pause = self._paced(bucket, now)
                if pause > 0:
                    bucket.pacing = True
                    try:
                        await self._nap(bucket, pause)
                    finally:
                        bucket.pacing = False
                    continue
            verdict = await self._try(bucket, now)
            if verdict is Verdict.GRANTED:
                # Whoever is first now gets it: while the backend answered, the waiter may
                # have left, or a request of a higher lane may have arrived.
                waiter = self._next(bucket)
                if waiter is not None:
                    bucket.lanes[waiter.lane].take(waiter)
                    self._left(bucket, waiter.lane)
                    waiter.future.set_result(None)
            elif verdict is Verdict.DAY_FULL:
                error = self._spent(bucket)
                for queue in bucket.lanes:
                    for gone in queue.drain():
                        if not gone.future.done():
                            self._left(bucket, gone.lane)
                            gone.future.set_exception(error)
            else:
                # WINDOW_FULL, or CARRY_FULL in the guard, which ends with the window: both
                # end with the window tried, which the backend's answer may have outlived.
                end = self._window_end(bucket, now)
                await self._nap(bucket, max(0.0, end - self.clock.now()))

    def _next(self, bucket: _Bucket) -> Waiter | None:
        """The waiter the next permit goes to: the head of the highest lane with one."""
        depth = bucket.depth
        if depth[Lane.NORMAL] or depth[Lane.LOW]:
            self._age(bucket)
        for lane, queue in enumerate(bucket.lanes):
            if depth[lane] and (waiter := queue.head()) is not None:
                return waiter
        return None

    def _age(self, bucket: _Bucket) -> None:
        """Move whoever waited `queue.aging` seconds in its lane up one lane.

        Looked at only as permits are handed out, which is the only time order matters.
        A request that climbs joins the upper lane at its tail, as a newcomer there.
        """
        ticks = self._ticks()
        threshold = ticks - self.queue.aging
        depth = bucket.depth
        for lane, upper in AGING:
            if not depth[lane]:
                continue
            aged = bucket.lanes[lane].age(threshold)
            for waiter in aged:
                waiter.lane, waiter.entered = upper, ticks
                bucket.lanes[upper].add(waiter)
            depth[lane] -= len(aged)
            depth[upper] += len(aged)

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
        if bucket.windows is not None:
            await self._observe_windows(bucket, view, now)
            return
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

    async def _observe_windows(
        self, bucket: _Bucket, view: rate_headers.RateView, now: float
    ) -> None:
        """observe() with limits.windows: the API's window is the one of ours of its length
        (the primary one when it names none); the limit it states caps that window, and,
        scaled (cap_per), the primary one as it capped the shorthand's minute."""
        windows = bucket.windows
        assert windows is not None and view.remaining is not None and view.reset_at is not None
        if not windows:
            return
        first = windows[bucket.primary]
        cap = view.cap_per(first.period.length)
        bucket.server_limit = cap if cap else None
        bucket.remaining = view.remaining
        if view.window is not None:
            for i, w in enumerate(windows):
                if i != bucket.primary and w.period.length == view.window:
                    bucket.learned[i] = view.limit or None
        bucket.refresh_limits()
        matched = await self._correct_windows(bucket, view, now)
        if not matched and view.remaining == 0 and view.reset_at > max(now, bucket.held_until):
            # A window of the API's that none of ours is: nothing fits in it until its reset.
            self.hold_for(bucket.scope, min(view.reset_at - now, self.windows.day_length))

    async def _correct_windows(
        self, bucket: _Bucket, view: rate_headers.RateView, now: float
    ) -> bool:
        """The API's word on the window of ours it is about (if any): at most `remaining`
        more fit in it. Returns whether one of ours is that window."""
        windows = bucket.windows
        assert windows is not None and view.remaining is not None and view.reset_at is not None
        matched = False
        for i, w in enumerate(windows):
            period = w.period
            if view.window is None and i != bucket.primary:
                continue  # a window it does not name is the primary one
            if view.window is not None and view.window != period.length:
                continue
            current = period.index(now)
            if abs(view.reset_at - period.end(current)) > min(_ALIGNED, period.length / 2):
                continue
            matched = True
            # At most `remaining` more fit in this window, whoever spent the rest.
            used = bucket.limits[i] - view.remaining
            if used > self.backend.known_used(w.name, current):
                await self.backend.raise_used(w.name, current, used)
        return matched

    def _primary(self, bucket: _Bucket) -> tuple[str, Period | Windows]:
        """The name of the scope's counts the API's unnamed window is, and its arithmetic."""
        if bucket.windows:
            w = bucket.windows[bucket.primary]
            return w.name, w.period
        return bucket.scope, self.windows

    async def hold(self, scope: str, headers: Mapping[str, str]) -> float:
        """The API refused for rate: close `scope` until its reset; returns seconds until then."""
        now = self.clock.now()
        bucket = self.buckets[scope]
        name, period = self._primary(bucket)
        window = period.index(now)
        reset = _int_header(headers, "X-RateLimit-Reset")
        until = float(reset) if reset is not None and reset > now else period.end(window)
        # This window is spent, whatever the local count says (a scope no window counts
        # has none to spend: the hold alone keeps its requests back).
        if bucket.windows != ():
            await self.backend.raise_used(name, window, bucket.effective_limit)
        return self.hold_for(scope, until - now)

    def hold_for(self, scope: str, seconds: float) -> float:
        """Close `scope` for `seconds` (a 403 until its reset, a 429 Retry-After); returns them."""
        bucket = self.buckets[scope]
        bucket.held_until = max(bucket.held_until, self.clock.now() + seconds)
        log.warning("rate_limit_pause", scope=scope, seconds=round(seconds, 2))
        return seconds

    # -- answers -------------------------------------------------------------------------

    def _retry_after(self, bucket: _Bucket, lane: Lane) -> float:
        """A fair guess of when a new request would get through: after the line ahead of it
        (its own lane and those above)."""
        now = self.clock.now()
        ahead = sum(bucket.depth[: lane + 1])
        windows_ahead = ahead // max(1, bucket.effective_limit)
        _, period = self._primary(bucket)
        return max(bucket.held_until - now, period.until_next(now)) + (
            windows_ahead * period.length
        )

    def _queue_timeout(self, bucket: _Bucket, waited: float, lane: Lane) -> QueueTimeout:
        return QueueTimeout(
            f"no {bucket.scope} rate-limit permit within the allowed wait "
            f"(waited {waited:.1f} s; queue.max_wait or X-Proxy-Max-Wait)",
            retry_after=self._retry_after(bucket, lane),
        )

    def _spent(self, bucket: _Bucket) -> Unavailable:
        """The answer to a request that found a long budget spent: the day (daily_limit),
        or with limits.windows the window that refused (daily_limit from a day on, else
        budget_spent), renewing at its end."""
        now = self.clock.now()
        if bucket.windows is None:
            return DailyLimit(
                f"the day's budget of {self.cfg.per_day} API requests is spent "
                "(limits.per_day); it renews at the next day boundary (UTC midnight by the "
                "API's clock)",
                retry_after=self.windows.until_next_day(now),
            )
        w = bucket.windows[bucket.blocked]
        error = DailyLimit if w.period.length >= DAY else BudgetSpent
        wait = w.period.until_next(now)
        return error(
            f"the budget of {w.limit} API requests per {w.per} is spent ({w.key}); it "
            f"renews in {math.ceil(wait)} s, at the window's end by the API's clock",
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
        """For /readyz: the backend's health, and each window's count as last seen."""
        return {**self.backend.status(), "windows": self.window_states()}

    def window_states(self) -> list[dict[str, Any]]:
        """Every window of the config: its scope, length, budget and count in the current
        window as this process last saw it (no I/O: for /readyz and the metrics)."""
        now = self.clock.now()
        states = []
        for w in self.all_windows:
            index = w.period.index(now)
            if self.cfg.windows or w.name != plan.DAY_NAME:
                used = self.backend.known_used(w.name, index)
            else:
                used = self.backend.known_day_used(index)
            states.append({"scope": w.scope, "per": w.per, "limit": w.limit, "used": used})
        return states

    def day_used_known(self) -> int:
        """The day's count (the shorthand's per_day, or an `all` window of a day; 0 without)."""
        if not self.cfg.windows:
            return self.backend.known_day_used(self.windows.day(self.clock.now()))
        day = plan.day_window(self.all_windows)
        if day is None:
            return 0
        return self.backend.known_used(day.name, day.period.index(self.clock.now()))

    def day_limit(self) -> int | None:
        """The day's budget that day_used_known counts against, None without one."""
        day = plan.day_window(self.all_windows)
        return None if day is None else day.limit

    def queue_depth(self, scope: str) -> int:
        return self.buckets[scope].queued

    def lane_depths(self, scope: str) -> dict[str, int]:
        """Requests waiting in `scope`, by the lane they wait in now."""
        depth = self.buckets[scope].depth
        return {lane.label: depth[lane] for lane in Lane}

    def client_depths(self) -> dict[str, int]:
        """Requests waiting per client, in all scopes (every client that ever waited)."""
        return dict(self.queued_by)
