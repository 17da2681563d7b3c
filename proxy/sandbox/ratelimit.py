"""Fixed-window rate limits, aligned to the server clock like LuxSci's minutes.

Two per-window buckets ("user" for /perl/api/v2/user/..., "account" for the
rest, auth included) and one per-day counter shared by both; and any further
windows the config lists (SandboxWindow), each for one bucket or for all. A
request is counted in every one of them or refused by the first without room,
costing nothing: the stand-in judges a client's shaping by the API's own rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from proxy.sandbox.config import SandboxConfig, SandboxWindow

Bucket = Literal["user", "account"]


@dataclass(frozen=True)
class RateDecision:
    """What the X-RateLimit-* headers say, and whether the request was refused."""

    limit: int
    remaining: int
    reset: int
    # "window" or "day" when the request was refused, None when admitted (or only peeked).
    exceeded: str | None = None

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset),
        }


class _Counter:
    """A count that starts over whenever the window index changes."""

    def __init__(self) -> None:
        self.index = -1
        self.count = 0

    def current(self, index: int) -> int:
        if index != self.index:
            self.index, self.count = index, 0
        return self.count


class RateLimiter:
    def __init__(self, config: SandboxConfig) -> None:
        self._config = config
        self._windows: dict[Bucket, _Counter] = {}
        self._day = _Counter()
        self._extra: list[tuple[SandboxWindow, _Counter]] = []
        self.reset()

    def reset(self) -> None:
        self._windows = {"user": _Counter(), "account": _Counter()}
        self._day = _Counter()
        self._extra = [(w, _Counter()) for w in self._config.windows]

    def _more(self, bucket: Bucket, now: float) -> list[tuple[SandboxWindow, _Counter, int]]:
        """The further windows a request of `bucket` counts in, each with its index now."""
        return [
            (w, counter, math.floor(now / w.seconds))
            for w, counter in self._extra
            if w.scope in (bucket, "all")
        ]

    def _limit(self, bucket: Bucket) -> int:
        if bucket == "user":
            return self._config.user_per_window
        return self._config.account_per_window

    def _indexes(self, now: float) -> tuple[int, int]:
        return (
            math.floor(now / self._config.window_seconds),
            math.floor(now / self._config.day_seconds),
        )

    def _decision(self, bucket: Bucket, index: int, exceeded: str | None = None) -> RateDecision:
        limit = self._limit(bucket)
        used = self._windows[bucket].current(index)
        return RateDecision(
            limit=limit,
            remaining=max(0, limit - used),
            reset=(index + 1) * self._config.window_seconds,
            exceeded=exceeded,
        )

    def peek(self, bucket: Bucket, now: float) -> RateDecision:
        """Header values for a response that does not count (e.g. 417)."""
        return self._decision(bucket, self._indexes(now)[0])

    def admit(self, bucket: Bucket, now: float) -> RateDecision:
        """Count the request if both limits allow it; a refused request costs nothing."""
        index, day = self._indexes(now)
        window = self._windows[bucket]
        if self._day.current(day) >= self._config.per_day:
            return self._decision(bucket, index, exceeded="day")
        if window.current(index) >= self._limit(bucket):
            return self._decision(bucket, index, exceeded="window")
        more = self._more(bucket, now)
        for w, counter, at in more:
            if counter.current(at) >= w.requests:
                # The headers name the window that refused, as an API with several does.
                return RateDecision(
                    limit=w.requests,
                    remaining=0,
                    reset=math.ceil((at + 1) * w.seconds),
                    exceeded="window",
                )
        window.count += 1
        self._day.count += 1
        for _, counter, _ in more:
            counter.count += 1
        return self._decision(bucket, index)

    def charge(self, bucket: Bucket, now: float) -> RateDecision:
        """Count a request that is answered regardless of the limits (a fired fault)."""
        index, day = self._indexes(now)
        self._windows[bucket].current(index)
        self._day.current(day)
        self._windows[bucket].count += 1
        self._day.count += 1
        for _, counter, at in self._more(bucket, now):
            counter.current(at)
            counter.count += 1
        return self._decision(bucket, index)
