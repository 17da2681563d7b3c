"""The server's clock, as learnt from its `Date` response headers.

The auth `date` must be at most 1 minute ahead of and 15 minutes behind the
server's clock, so a proxy whose own clock is off must sign with the server's
time. `Date` has one-second resolution and is truncated, and the response left
the server before we read it, so `Date - local receive time` underestimates the
server's clock slightly: the safe side, since the window is wide behind and
narrow ahead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime

# The API accepts a signed date this far ahead of / behind its own clock.
MAX_AHEAD = 60.0
MAX_BEHIND = 900.0


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
        # Every response in the same second has the same Date: parse each value once.
        self._last_header: str | None = None

    def observe(self, date_header: str | None) -> None:
        """Learn from a response's Date header (cheap when the header repeats)."""
        if date_header is None or date_header == self._last_header:
            return
        self._last_header = date_header
        server = parse_http_date(date_header)
        if server is not None:
            self.offset = server - self._wall()
            self.known = True

    def now(self) -> float:
        """Best estimate of the server's current time, epoch seconds."""
        return self._wall() + self.offset

    def in_window(self, signed_date: float) -> bool:
        """Would the server accept this signed date now?"""
        server = self.now()
        return server - MAX_BEHIND <= signed_date <= server + MAX_AHEAD
