"""Fixed rate windows on the server's clock: pure arithmetic, no I/O, no clock of its own.

The API counts requests in fixed windows (its minutes, days, or any other length),
aligned to the epoch on its clock. Our estimate of the server's clock is never
ahead of it (see clock.py) but may trail it a little, and a request still has to
travel, so one sent in the last `guard` seconds of a window may be counted in that
window or the next: `guard_start` says from when that is the case, and the limiter
then counts the permit in both. `Windows` is the shorthand's pair (its window and
its day); `Period` is one window length of any kind (limits.windows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Windows:
    length: float
    day_length: float
    guard: float

    @classmethod
    def of(cls, length: float, day_length: float) -> Windows:
        return cls(length, day_length, guard=min(0.5, length / 20))

    def index(self, t: float) -> int:
        return math.floor(t / self.length)

    def end(self, index: int) -> float:
        return (index + 1) * self.length

    def index_ending_at(self, reset: float) -> int:
        """The window whose end is `reset` (the API's X-RateLimit-Reset)."""
        return round(reset / self.length) - 1

    def guard_start(self, index: int, uncertainty: float = 0.0) -> float:
        """Server time from which a request sent in window `index` may be counted in the next.

        `uncertainty`: how far the caller's clock may trail the server's real time.
        """
        return (index + 1) * self.length - max(self.guard, uncertainty)

    def until_next(self, t: float) -> float:
        return self.end(self.index(t)) - t

    def day(self, t: float) -> int:
        return math.floor(t / self.day_length)

    def until_next_day(self, t: float) -> float:
        return (self.day(t) + 1) * self.day_length - t


# A window at least this long is a budget rather than a rate: spent, it answers at once
# (a queue is for seconds, not hours), and the memory backend keeps its count across
# restarts (a restart must not forget an hour's spending). The shorthand's day is one
# whatever its length.
LONG = 3600.0
DAY = 86400.0


@dataclass(frozen=True, slots=True)
class Period:
    """Fixed windows of one length, aligned to the epoch on the server's clock (as the
    API's minutes and days are), with the guard at each end (see the module's doc)."""

    length: float
    guard: float

    @classmethod
    def of(cls, length: float) -> Period:
        return cls(length, guard=min(0.5, length / 20))

    def index(self, t: float) -> int:
        return math.floor(t / self.length)

    def start(self, index: int) -> float:
        return index * self.length

    def end(self, index: int) -> float:
        return (index + 1) * self.length

    def guard_start(self, index: int, uncertainty: float = 0.0) -> float:
        """Server time from which a request sent in window `index` may be counted in the next."""
        return (index + 1) * self.length - max(self.guard, uncertainty)

    def until_next(self, t: float) -> float:
        return self.end(self.index(t)) - t


def spell(seconds: float) -> str:
    """A duration as the config writes it: 1s, 90s, 1m, 1h, 1d (the largest whole unit).

    Names windows in Redis keys, metrics labels and messages, so it is stable for a given
    length and never contains a character a key or label could not hold.
    """
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds:g}s"
