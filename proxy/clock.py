"""The server's clock, as learnt from its `Date` response headers.

The auth `date` must be at most 1 minute ahead of and 15 minutes behind the
server's clock, and the rate-limit windows are the server's fixed minutes, so
the proxy works on the server's time. `Date` has one-second resolution and is
truncated, and the answer left the server before we read it, so each sample
`Date - local receive time` is at most the true offset, and close to it when
the answer left just after the server's second ticked. The estimate is the
best (largest) recent sample: within a few milliseconds after a few dozen
answers, without ever running ahead of the server.

How far behind it may still be is `uncertainty`: a full second (plus) until
two answers bracket one of the server's second ticks, then the width of the
narrowest such bracket. Whatever must land inside a server-side window (the
rate limiter's permits) keeps that much distance from the window's end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime

# The API accepts a signed date this far ahead of / behind its own clock.
MAX_AHEAD = 60.0
MAX_BEHIND = 900.0
# A sample this far below the estimate means a clock was stepped: start over.
_STEP = 2.0
# Before any tick is bracketed: the Date header's resolution, plus travel time.
_UNKNOWN = 1.5


def parse_http_date(value: str) -> float | None:
    """Epoch seconds of an HTTP `Date` header, or None when it cannot be read."""
    try:
        dt = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if dt.tzinfo is None:
        return None
    return dt.timestamp()


class ServerClock:
    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self.offset = 0.0  # server time minus local time, seconds
        self.known = False
        self.uncertainty = _UNKNOWN
        # Every response in the same second has the same Date: parse each value once.
        self._last_header: str | None = None
        self._last_server = 0.0
        # Local time of the latest answer that carried the current Date value.
        self._last_seen = 0.0

    def observe(self, date_header: str | None) -> None:
        """Learn from a response's Date header (cheap when the header repeats)."""
        if date_header is None:
            return
        local = self._wall()
        if date_header == self._last_header:
            self._last_seen = local
            return
        server = parse_http_date(date_header)
        if server is None:
            return
        self._last_header = date_header
        sample = server - local
        if self.known and sample < self.offset - _STEP:  # a clock was stepped
            self.known = False
        if not self.known or sample > self.offset:
            self.offset = sample
        if self.known and server == self._last_server + 1:
            # The server's clock ticked between the previous answer and this one.
            self.uncertainty = min(self.uncertainty, local - self._last_seen)
        elif not self.known:
            self.uncertainty = _UNKNOWN
        self.known = True
        self._last_server = server
        self._last_seen = local

    def now(self) -> float:
        """Best estimate of the server's current time, epoch seconds."""
        return self._wall() + self.offset

    def in_window(self, signed_date: float) -> bool:
        """Would the server accept this signed date now?"""
        server = self.now()
        return server - MAX_BEHIND <= signed_date <= server + MAX_AHEAD


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date, RFC 9110 10.2.3),
    None if absent or bad. `now`: the server's clock, for the date form."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    when = parse_http_date(value)
    return None if when is None else max(0.0, when - now)
