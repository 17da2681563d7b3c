"""Which windows a permit counts in: the config's limits as the limiter and backends see them.

The shorthand keys stand for three windows: the user budget and the account budget
per `window_seconds`, and every request per `day_seconds`; `limits.windows` adds any
others (any length, any budget the scheme names), and beside it a shorthand budget
of 0 is no window. The shorthand's windows keep the names their counts have always
had in Redis and in the state file (`user`, `account`, `day`), so processes of an
older version share them during a rolling upgrade, and a config that adds windows
keeps the day's count; windows from the list are named by scope and length
(`all.1h`), which config validation keeps unique.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.config import LimitsConfig
from proxy.limits.windows import DAY, LONG, Period, spell

# The budget every request spends, whatever its own scope.
ALL = "all"
# The shorthand's day: its counts are the backends' day count (Redis `d:<day>`, the state
# file's "day"), whichever way a permit is taken.
DAY_NAME = "day"


@dataclass(frozen=True, slots=True)
class Window:
    # The backends' name for its counts (a Redis key part, a state file entry).
    name: str
    # The budget it counts: "user", "account", or ALL.
    scope: str
    limit: int
    period: Period
    # At its end a permit is also reserved in the next window (the API may count it
    # there). The shorthand's day never did, and keeps not doing so.
    carry: bool
    # A budget rather than a rate (an hour or more, or the shorthand's day): spent, the
    # request is answered at once; the memory backend keeps its count across restarts.
    long: bool
    # The config key that states it, for messages.
    key: str

    @property
    def per(self) -> str:
        """Its length as the config writes it (1s, 1m, 1h, 1d): a label value."""
        return spell(self.period.length)


def windows_of(limits: LimitsConfig) -> tuple[Window, ...]:
    """Every window of the config: the shorthand's (those with a budget), then the list's."""
    rate = Period.of(limits.window_seconds)
    shorthand = (
        Window("user", "user", limits.user_per_minute, rate, True, False, "limits.user_per_minute"),
        Window(
            "account",
            "account",
            limits.account_per_minute,
            rate,
            True,
            False,
            "limits.account_per_minute",
        ),
        Window(
            DAY_NAME,
            ALL,
            limits.per_day,
            Period.of(limits.day_seconds),
            False,
            True,
            "limits.per_day",
        ),
    )
    listed = tuple(
        Window(
            f"{w.scope}.{spell(w.per)}",
            w.scope,
            w.requests,
            Period.of(w.per),
            True,
            w.per >= LONG,
            f"limits.windows[{i}]",
        )
        for i, w in enumerate(limits.windows)
    )
    return tuple(w for w in shorthand if w.limit > 0) + listed


def for_scope(windows: tuple[Window, ...], scope: str) -> tuple[Window, ...]:
    """The windows a permit of `scope` counts in, longest first: a spent budget is found
    before a spent rate (the request is answered rather than queued), and a pump that
    finds several windows spent naps to the latest end at once."""
    mine = [w for w in windows if w.scope in (scope, ALL)]
    return tuple(sorted(mine, key=lambda w: (-w.period.length, w.name)))


def primary(windows: tuple[Window, ...], scope: str) -> int:
    """The position in `windows` (for_scope's order) of the window the API's rate-limit
    headers describe: the scope's own shortest, else the shortest of all. The limit the
    API states caps it (RateLimiter.observe), as it capped the shorthand's minute."""
    own = [i for i, w in enumerate(windows) if w.scope == scope]
    candidates = own or list(range(len(windows)))
    return min(candidates, key=lambda i: windows[i].period.length)


def day_window(windows: tuple[Window, ...]) -> Window | None:
    """The budget the daily gauges report: the shorthand's day, or an `all` window of a day."""
    for w in windows:
        if w.name == DAY_NAME or (w.scope == ALL and w.period.length == DAY):
            return w
    return None
