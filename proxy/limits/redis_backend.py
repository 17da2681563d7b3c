"""The Redis backend: permits counted in Redis, so every process of one integration shares them.

Each acquisition is one Lua script, so concurrent processes can never both take
the last permit of a window, nor both the last place in a window's reserve (the
permits that the end of the window before may have put in it: a second counter
per window that comes off its limit). When Redis is unreachable the backend keeps
serving from an in-memory backend limited to `fallback_share` of each limit:
N processes on their own share then stay inside the real limits without
talking to each other. While in fallback, Redis is probed at most once a
second from within `acquire`; permits granted locally meanwhile are added to
Redis's counts when it answers again, so the day's budget stays honest.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import redis.asyncio
import structlog
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError
from redis.retry import Retry

from proxy.limits.backend import CARRY_SHARE, MemoryBackend, Verdict

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

# KEYS: day, then window counts and reserves. ARGV: window ttl ms, day ttl ms, day count,
# then a count for each window key. Adds permits granted (and reserved) during a fallback.
# Returns the day's count afterwards.
_SETTLE = """
for i = 2, #KEYS do
  redis.call('INCRBY', KEYS[i], ARGV[i + 2])
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
local day = redis.call('INCRBY', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return day
"""

_VERDICTS = {
    0: Verdict.GRANTED,
    1: Verdict.WINDOW_FULL,
    2: Verdict.DAY_FULL,
    3: Verdict.CARRY_FULL,
}


def _ttl_ms(seconds: float) -> int:
    """A little over two periods: the current one is still read near its end on a late clock."""
    return math.ceil(2 * seconds * 1000) + 1000


def redact_url(url: str) -> str:
    """The URL with its password (if any) masked, fit for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


@dataclass
class _Local:
    """Permits granted from the local share and not yet added to Redis."""

    day: int = -1
    day_count: int = 0
    # Redis key (a window count or reserve) -> (its window, count to add): only windows
    # not over yet still matter.
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)


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
        password = urlsplit(url).password
        # Both spellings: redis-py unquotes the password, an error could show either.
        self._secrets = {p for p in (password, unquote(password or "")) if p}
        # No retries of its own: a failed call goes to the local share at once,
        # and the probe is the retry. Nothing connects before the first command.
        self._client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=op_timeout,
            socket_connect_timeout=op_timeout,
            health_check_interval=30,
            retry=Retry(NoBackoff(), 0),
        )
        self._acquire_script: AsyncScript = self._client.register_script(_ACQUIRE)
        self._raise_script: AsyncScript = self._client.register_script(_RAISE)
        self._settle_script: AsyncScript = self._client.register_script(_SETTLE)
        self._memory = MemoryBackend()
        # scope -> (window, count with its reserve, next window's reserve): the shared
        # counts as the last script saw them.
        self._known: dict[str, tuple[int, int, int]] = {}
        self._known_day = (-1, 0)
        self._pending = _Local()
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
                        keys=[self._window_key(scope, window), self._carry_key(scope, window)],
                        args=[used, self._window_ttl],
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
        return True

    def _remember_local(self, scope: str, window: int, day: int, reserved: bool) -> None:
        pending = self._pending
        if day != pending.day:
            pending.day, pending.day_count = day, 0
        pending.day_count += 1
        counts = pending.counts
        for key in [k for k, (w, _) in counts.items() if w < window]:
            del counts[key]  # a window that is over: nothing left to protect in it
        self._add_pending(self._window_key(scope, window), window)
        if reserved:
            # Settled into the next window's reserve, not its count: either takes the
            # permit off that window's budget, but only the reserve also keeps the others
            # from reserving past the cap there if Redis is back before this window ends.
            self._add_pending(self._carry_key(scope, window + 1), window + 1)

    def _add_pending(self, key: str, window: int) -> None:
        _, count = self._pending.counts.get(key, (window, 0))
        self._pending.counts[key] = (window, count + 1)

    async def _settle(self) -> None:
        """Add the permits the local share granted (and reserved) to Redis's counts."""
        pending = self._pending
        if pending.day_count == 0:
            return
        counts = list(pending.counts.items())
        day, day_count = pending.day, pending.day_count
        await self._bounded(
            self._settle_script(
                keys=[self._day_key(day)] + [key for key, _ in counts],
                args=[self._window_ttl, self._day_ttl, day_count] + [n for _, (_, n) in counts],
            )
        )
        # Acquisitions that went local while the script ran stay pending.
        if pending.day == day:
            pending.day_count -= day_count
        for key, (window, count) in counts:
            now_window, now_count = pending.counts.get(key, (window, 0))
            if now_window == window:
                if now_count > count:
                    pending.counts[key] = (window, now_count - count)
                else:
                    pending.counts.pop(key, None)

    def _describe(self, error: BaseException) -> str:
        """A short reason for logs and /readyz, never with the URL's password."""
        text = str(error) or f"no answer within {self._op_timeout} s"
        text = f"{type(error).__name__}: {text}"
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text[:200]
