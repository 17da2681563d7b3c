"""The Redis backend: permits counted in Redis, so every process of one integration shares them.

Each acquisition is one Lua script, so concurrent processes can never both take
the last permit of a window, nor both the last place in a window's reserve (the
permits that the end of the window before may have put in it: a second counter
per window that comes off its limit). The shorthand's windows use `_ACQUIRE`, its
keys unchanged; `limits.windows` use `_TAKE`, one script over every window of the
permit's scope, so a permit is counted in all of them or in none. Every key starts
with the prefix `luxsci-proxy:{<key>}`, one hash tag: in a Redis Cluster all of an
integration's keys live in one slot, as a script's keys must.

When Redis is unreachable the backend keeps serving from an in-memory backend
limited to `fallback_share` of each limit: N processes on their own share then stay
inside the real limits without talking to each other. While in fallback, Redis is
probed at most once a second from within `acquire` (and `take`); permits granted
locally meanwhile are added to Redis's counts when it answers again, so the day's
budget (and every long window's) stays honest.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import structlog
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError
from redis.retry import Retry

from proxy.limits.backend import CARRY_SHARE, MemoryBackend, Verdict
from proxy.limits.plan import DAY_NAME, Window
from proxy.redis_connect import connect, parse_url, redact_url

__all__ = ["RedisBackend", "redact_url"]

log = structlog.get_logger("proxy.limits")

T = TypeVar("T")

# Any Redis error, not only connection ones: a limiter that raises fails the
# request, while a local share keeps it within the limits. asyncio's
# TimeoutError is an OSError.
_UNAVAILABLE = (RedisError, OSError)

PROBE_INTERVAL = 1.0
# How often an idle process checks that Redis still answers, so /readyz is
# right even without traffic.
WATCH_INTERVAL = 5.0

# KEYS: window, the window's reserve, day, the next window's reserve.
# ARGV: window limit, day limit, window ttl ms, day ttl ms, carry cap (0: not at the
# window's end; else the permit is also reserved in the next window, if its reserve is
# under the cap). Returns {verdict, window count with its reserve, day count, next
# window's reserve} afterwards: verdict 0 granted, 1 window full, 2 day full, 3 reserve
# full (_VERDICTS). The next window's reserve expires like a window count: it is read
# until that window ends, less than two windows after it is made.
_ACQUIRE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
used = used + tonumber(redis.call('GET', KEYS[2]) or '0')
local day = tonumber(redis.call('GET', KEYS[3]) or '0')
local reserved = tonumber(redis.call('GET', KEYS[4]) or '0')
local cap = tonumber(ARGV[5])
if day >= tonumber(ARGV[2]) then return {2, used, day, reserved} end
if used >= tonumber(ARGV[1]) then return {1, used, day, reserved} end
if cap > 0 then
  if reserved >= cap then return {3, used, day, reserved} end
  reserved = redis.call('INCR', KEYS[4])
  redis.call('PEXPIRE', KEYS[4], ARGV[3])
end
redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
day = redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
return {0, used + 1, day, reserved}
"""

# KEYS: for each window, three: its count, its reserve (made by the end of the window
# before), the next window's reserve. ARGV: for each window, three: its limit, its keys'
# ttl ms, its carry cap (as _ACQUIRE's; under 0: no reserve may be made, so the window's
# end refuses as reserve full). Every window is checked before any is counted,
# in the order given, so a permit is counted in all of them or in none. Returns
# {0, count with its reserve, next window's reserve, ... for each window} afterwards when
# granted, else {verdict, position (from 0) of the window that refused, its count, its
# next window's reserve}: verdict 1 window full, 3 reserve full (_VERDICTS).
_TAKE = """
local values = redis.call('MGET', unpack(KEYS))
local n = #KEYS / 3
local used, reserved = {}, {}
for i = 1, n do
  local k = 3 * i - 2
  local u = tonumber(values[k] or '0') + tonumber(values[k + 1] or '0')
  local r = tonumber(values[k + 2] or '0')
  if u >= tonumber(ARGV[k]) then return {1, i - 1, u, r} end
  local cap = tonumber(ARGV[k + 2])
  if cap ~= 0 and r >= cap then return {3, i - 1, u, r} end
  used[i], reserved[i] = u + 1, r
end
local out = {0}
for i = 1, n do
  local k = 3 * i - 2
  if tonumber(ARGV[k + 2]) > 0 then
    reserved[i] = redis.call('INCR', KEYS[k + 2])
    redis.call('PEXPIRE', KEYS[k + 2], ARGV[k + 1])
  end
  redis.call('INCR', KEYS[k])
  redis.call('PEXPIRE', KEYS[k], ARGV[k + 1])
  out[2 * i] = used[i]
  out[2 * i + 1] = reserved[i]
end
return out
"""

# KEYS: window, the window's reserve. ARGV: used (as the API counts it: reserve
# included), window ttl ms. Returns the window's count with its reserve afterwards.
_RAISE = """
local used = tonumber(ARGV[1])
local carried = tonumber(redis.call('GET', KEYS[2]) or '0')
local current = tonumber(redis.call('GET', KEYS[1]) or '0') + carried
if used > current then
  redis.call('SET', KEYS[1], used - carried, 'PX', ARGV[2])
  return used
end
return current
"""

# KEYS: counts (days, windows, reserves). ARGV: for each key, the count to add, then its
# ttl ms. Adds the permits granted (and reserved) during a fallback.
_SETTLE = """
for i = 1, #KEYS do
  redis.call('INCRBY', KEYS[i], ARGV[2 * i - 1])
  redis.call('PEXPIRE', KEYS[i], ARGV[2 * i])
end
return 0
"""

_VERDICTS = {
    0: Verdict.GRANTED,
    1: Verdict.WINDOW_FULL,
    2: Verdict.DAY_FULL,
    3: Verdict.CARRY_FULL,
}
_TAKEN = (Verdict.GRANTED, -1)


def _ttl_ms(seconds: float) -> int:
    """A little over two periods: the current one is still read near its end on a late clock."""
    return math.ceil(2 * seconds * 1000) + 1000


@dataclass(frozen=True, slots=True)
class _Pending:
    """Permits granted from the local share and not yet added to one Redis key."""

    # What the key counts (a window's name, or the day) and which of its windows.
    series: str
    window: int
    count: int
    ttl_ms: int


class RedisBackend:
    name = "redis"

    def __init__(
        self,
        url: str,
        key: str,
        window_seconds: float,
        day_seconds: float,
        fallback_share: float,
        op_timeout: float = 0.5,
        watch_interval: float = WATCH_INTERVAL,
    ) -> None:
        self._url = url
        self._prefix = f"luxsci-proxy:{{{key}}}"
        self._window_ttl = _ttl_ms(window_seconds)
        self._day_ttl = _ttl_ms(day_seconds)
        self._share = fallback_share
        self._op_timeout = op_timeout
        self._watch_interval = watch_interval
        target = parse_url(url)
        # Both spellings: the URL holds them percent-encoded, an error could show either.
        self._secrets = {
            p
            for password in (target.password, target.sentinel_password)
            if password
            for p in (password, quote(password, safe=""), unquote(password))
        }
        # No retries of its own: a failed call goes to the local share at once, and the
        # probe is the retry (with Sentinel, the probe's new connection asks the sentinels
        # where the master is now). Nothing connects before the first command.
        self._client: Any = connect(
            url,
            op_timeout=op_timeout,
            health_check_interval=30,
            retry=Retry(NoBackoff(), 0),
        )
        self._acquire_script: AsyncScript = self._client.register_script(_ACQUIRE)
        self._raise_script: AsyncScript = self._client.register_script(_RAISE)
        self._settle_script: AsyncScript = self._client.register_script(_SETTLE)
        self._take_script: AsyncScript = self._client.register_script(_TAKE)
        self._memory = MemoryBackend()
        # scope -> (window, count with its reserve, next window's reserve): the shared
        # counts as the last script saw them.
        self._known: dict[str, tuple[int, int, int]] = {}
        self._known_day = (-1, 0)
        # limits.windows: each window's keys' ttl by its name (the shorthand's: _window_ttl).
        self._ttls: dict[str, int] = {}
        # Redis key -> permits the local share granted (and reserved) there meanwhile:
        # only windows not over yet still matter.
        self._pending: dict[str, _Pending] = {}
        # Why Redis is not used now (None: it is), and when it was last asked.
        self._down: str | None = None
        self._down_since = 0.0
        self._last_probe = 0.0
        # The window in which Redis was lost: how much of it the others spent is
        # unknown, so the local share starts only with the next one...
        self._outage_window: int | None = None
        # ...less what they may have reserved in that one if it was lost at the window's
        # end (see acquire).
        self._outage_at_end = False
        # The same for limits.windows, per window name (lengths differ): (the window in
        # which the loss was noticed, whether at its end).
        self._outages: dict[str, tuple[int, bool]] = {}
        self._watchdog: asyncio.Task[None] | None = None

    # -- life cycle ------------------------------------------------------------------

    async def start(self) -> None:
        await self._memory.start()
        try:
            await self._bounded(self._client.ping())
        except _UNAVAILABLE as e:
            self._fall_back(e)
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        if self._watchdog is not None:
            # Cancel until it has ended: on Python 3.11, asyncio.wait_for (around redis-py's
            # socket writes) drops a cancellation that lands as the write completes, and the
            # watchdog then went on probing for ever, so a shutdown never ended.
            while not self._watchdog.done():
                self._watchdog.cancel()
                await asyncio.wait({self._watchdog}, timeout=0.1)
        await self._client.aclose()
        await self._memory.close()

    async def _watch(self) -> None:
        """Notice an outage, or the end of one, when no request does."""
        while True:
            if self._down is None:
                await asyncio.sleep(self._watch_interval)
                if self._down is None:
                    try:
                        await self._bounded(self._client.ping())
                    except _UNAVAILABLE as e:
                        self._fall_back(e)
            else:
                await asyncio.sleep(PROBE_INTERVAL)
                await self._recovered()

    # -- counting --------------------------------------------------------------------

    async def acquire(
        self,
        scope: str,
        window: int,
        limit: int,
        day: int,
        day_limit: int,
        carry_cap: int = 0,
    ) -> Verdict:
        if self._down is None or await self._recovered():
            try:
                code, used, day_count, reserved = await self._bounded(
                    self._acquire_script(
                        keys=[
                            self._window_key(scope, window),
                            self._carry_key(scope, window),
                            self._day_key(day),
                            self._carry_key(scope, window + 1),
                        ],
                        args=[limit, day_limit, self._window_ttl, self._day_ttl, carry_cap],
                    )
                )
                self._known[scope] = (window, int(used), int(reserved))
                self._known_day = (day, int(day_count))
                return _VERDICTS[int(code)]
            except _UNAVAILABLE as e:
                self._fall_back(e)
        if self._outage_window is None:
            self._outage_window = window
            # Noticed at the window's end, the outage may have begun after the others
            # reserved up to a tenth of the next window in Redis, where this process can no
            # longer read it: the local shares leave that much of the next window alone.
            # Noticed earlier, it began before anyone could reserve.
            self._outage_at_end = carry_cap > 0
        if window <= self._outage_window:
            return Verdict.WINDOW_FULL
        if window == self._outage_window + 1 and self._outage_at_end:
            limit -= limit // CARRY_SHARE
        # Each process reserves within its share of the reserve, as it counts within its
        # share of the window.
        local_cap = math.floor(carry_cap * self._share)
        if carry_cap and not local_cap:
            return Verdict.CARRY_FULL
        verdict = self._memory.acquire_now(
            scope, window, self._local(limit), day, self._local(day_limit), local_cap
        )
        if verdict is Verdict.GRANTED:
            self._remember_local(scope, window, day, reserved=local_cap > 0)
        return verdict

    async def take(
        self,
        windows: Sequence[Window],
        indexes: Sequence[int],
        limits: Sequence[int],
        caps: Sequence[int],
    ) -> tuple[Verdict, int]:
        if self._down is None or await self._recovered():
            keys: list[str] = []
            args: list[int] = []
            for i, w in enumerate(windows):
                index = indexes[i]
                keys += (
                    self._count_key(w.name, index),
                    self._carry_key(w.name, index),
                    self._carry_key(w.name, index + 1),
                )
                ttl = self._ttls[w.name] = _ttl_ms(w.period.length)
                args += (limits[i], ttl, caps[i])
            try:
                out = await self._bounded(self._take_script(keys=keys, args=args))
            except _UNAVAILABLE as e:
                self._fall_back(e)
            else:
                code = int(out[0])
                if code:
                    at = int(out[1])
                    self._known[windows[at].name] = (indexes[at], int(out[2]), int(out[3]))
                    return _VERDICTS[code], at
                for i, w in enumerate(windows):
                    self._known[w.name] = (indexes[i], int(out[2 * i + 1]), int(out[2 * i + 2]))
                return _TAKEN
        return self._take_locally(windows, indexes, limits, caps)

    def _take_locally(
        self,
        windows: Sequence[Window],
        indexes: Sequence[int],
        limits: Sequence[int],
        caps: Sequence[int],
    ) -> tuple[Verdict, int]:
        """`take` on this process's share while Redis is unreachable (as `acquire` does:
        a long window, like the day, gets its share from the start; a shorter one none in
        the window the loss was noticed in, since the others may have spent it)."""
        local_limits = [0] * len(windows)
        local_caps = [0] * len(windows)
        for i, w in enumerate(windows):
            limit = limits[i]
            if not w.long:
                first, at_end = self._outages.setdefault(w.name, (indexes[i], caps[i] != 0))
                if indexes[i] <= first:
                    limit = 0  # refused as full, once the longer windows have had their say
                elif indexes[i] == first + 1 and at_end:
                    limit -= limit // CARRY_SHARE
            local_limits[i] = self._local(limit) if limit else 0
            # Each process reserves within its share of the reserve, as it counts within
            # its share of the window; a share too small for one is a reserve always spent.
            local_caps[i] = math.floor(caps[i] * self._share) if caps[i] > 0 else caps[i]
            if caps[i] > 0 and not local_caps[i]:
                local_caps[i] = -1
        verdict, at = self._memory.take_now(windows, indexes, local_limits, local_caps)
        if verdict is Verdict.GRANTED:
            for i, w in enumerate(windows):
                ttl = _ttl_ms(w.period.length)
                self._forget_over(w.name, indexes[i])
                self._add_pending(self._count_key(w.name, indexes[i]), w.name, indexes[i], ttl)
                if local_caps[i] > 0:
                    self._add_pending(
                        self._carry_key(w.name, indexes[i] + 1), w.name, indexes[i] + 1, ttl
                    )
        return verdict, at

    def known_used(self, scope: str, window: int) -> int:
        if self._down is not None:
            return self._memory.known_used(scope, window)
        known = self._known.get(scope)
        if known is None:
            return 0
        known_window, count, reserved = known
        if known_window == window:
            return count
        # A window not begun when the script last ran: what was reserved in it then.
        return reserved if window == known_window + 1 else 0

    def known_day_used(self, day: int) -> int:
        known_day, count = self._known_day
        shared = count if known_day == day else 0
        if self._down is not None:
            # Redis's count as last seen, plus what the local share granted since.
            return shared + self._memory.known_day_used(day)
        return shared

    async def raise_used(self, scope: str, window: int, used: int) -> None:
        if self._down is None:
            try:
                count = await self._bounded(
                    self._raise_script(
                        keys=[self._count_key(scope, window), self._carry_key(scope, window)],
                        args=[used, self._ttls.get(scope, self._window_ttl)],
                    )
                )
                known = self._known.get(scope)
                reserved = known[2] if known is not None and known[0] == window else 0
                self._known[scope] = (window, int(count), reserved)
                return
            except _UNAVAILABLE as e:
                self._fall_back(e)
        await self._memory.raise_used(scope, window, used)

    async def day_used(self, day: int) -> int:
        if self._down is None:
            try:
                value = await self._bounded(self._client.get(self._day_key(day)))
                return int(value or 0)
            except _UNAVAILABLE as e:
                self._fall_back(e)
        return await self._memory.day_used(day)

    def status(self) -> dict[str, Any]:
        if self._down is None:
            return {"ok": True, "backend": self.name}
        return {"ok": False, "backend": self.name, "fallback": True, "error": self._down}

    # -- keys and shares ---------------------------------------------------------------

    def _window_key(self, scope: str, window: int) -> str:
        return f"{self._prefix}:w:{scope}:{window}"

    def _count_key(self, name: str, window: int) -> str:
        """A window's count; the shorthand's day is the day's count, whichever way a
        permit is taken (a config that adds limits.windows keeps today's count)."""
        return self._day_key(window) if name == DAY_NAME else self._window_key(name, window)

    def _carry_key(self, scope: str, window: int) -> str:
        """The reserve in `window`: permits granted at the end of the window before."""
        return f"{self._prefix}:c:{scope}:{window}"

    def _day_key(self, day: int) -> str:
        return f"{self._prefix}:d:{day}"

    def _local(self, limit: int) -> int:
        return max(1, math.floor(limit * self._share))

    # -- fallback and recovery -----------------------------------------------------------

    async def _bounded(self, call: Awaitable[T]) -> T:
        # The socket timeouts bound each read and connect; this bounds the whole call.
        async with asyncio.timeout(self._op_timeout):
            return await call

    def _fall_back(self, error: BaseException) -> None:
        self._last_probe = time.monotonic()
        if self._down is not None:
            return
        self._down = self._describe(error)
        self._down_since = self._last_probe
        log.warning(
            "limits_redis_unavailable",
            error=self._down,
            redis=redact_url(self._url),
            fallback_share=self._share,
        )

    async def _recovered(self) -> bool:
        """At most once a second: is Redis back? Everyone else goes straight to the local share."""
        now = time.monotonic()
        if now - self._last_probe < PROBE_INTERVAL:
            return False
        self._last_probe = now
        try:
            await self._bounded(self._client.ping())
            await self._settle()
        except _UNAVAILABLE as e:
            self._down = self._describe(e)
            return False
        log.info(
            "limits_redis_recovered",
            redis=redact_url(self._url),
            after_seconds=round(time.monotonic() - self._down_since, 1),
        )
        self._down = None
        self._outage_window = None
        self._outage_at_end = False
        self._outages.clear()
        return True

    def _remember_local(self, scope: str, window: int, day: int, reserved: bool) -> None:
        self._forget_over("day", day)
        self._forget_over(scope, window)
        self._add_pending(self._day_key(day), "day", day, self._day_ttl)
        self._add_pending(self._window_key(scope, window), scope, window, self._window_ttl)
        if reserved:
            # Settled into the next window's reserve, not its count: either takes the
            # permit off that window's budget, but only the reserve also keeps the others
            # from reserving past the cap there if Redis is back before this window ends.
            key = self._carry_key(scope, window + 1)
            self._add_pending(key, scope, window + 1, self._window_ttl)

    def _forget_over(self, series: str, window: int) -> None:
        """Drop what is pending for `series`'s windows before `window`: they are over,
        nothing is left to protect in them."""
        pending = self._pending
        for key in [k for k, p in pending.items() if p.series == series and p.window < window]:
            del pending[key]

    def _add_pending(self, key: str, series: str, window: int, ttl_ms: int) -> None:
        earlier = self._pending.get(key)
        count = 1 if earlier is None else earlier.count + 1
        self._pending[key] = _Pending(series, window, count, ttl_ms)

    async def _settle(self) -> None:
        """Add the permits the local share granted (and reserved) to Redis's counts."""
        if not self._pending:
            return
        settling = list(self._pending.items())
        args: list[int] = []
        for _, p in settling:
            args += (p.count, p.ttl_ms)
        await self._bounded(self._settle_script(keys=[k for k, _ in settling], args=args))
        # Acquisitions that went local while the script ran stay pending.
        for key, p in settling:
            now = self._pending.get(key)
            if now is not None and now.window == p.window:
                if now.count > p.count:
                    self._pending[key] = _Pending(p.series, p.window, now.count - p.count, p.ttl_ms)
                else:
                    del self._pending[key]

    def _describe(self, error: BaseException) -> str:
        """A short reason for logs and /readyz, never with the URL's password."""
        text = str(error) or f"no answer within {self._op_timeout} s"
        text = f"{type(error).__name__}: {text}"
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text[:200]
