"""Log a repeated event once, then summarise it with a count at most once per interval.

A condition that recurs (connections refused over the cap, a state file that
cannot be written) would otherwise write a line per occurrence: a flood that
buries everything else and costs I/O exactly when the process is under stress.

At the top of the package, not in proxy.observe, so that every layer may use it
(limits must not import observe). It knows nothing of structlog: it calls the
log method it is given.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["Throttled"]


class _Handle(Protocol):
    def cancel(self) -> None: ...


# loop.call_later, or anything shaped like it.
Schedule = Callable[[float, Callable[[], None]], _Handle]


class Throttled:
    """One kind of event. An occurrence is logged at once when no line for it was
    written in the last `interval` seconds; otherwise it is counted, and a line with
    `count` (the occurrences it stands for) follows at most once per interval.

    A line without `count` is one occurrence; a summary always carries it. The
    summary is written when the event recurs after the interval, at the interval's
    end when the owner gives a `schedule` (loop.call_later), and by `flush()` (the
    condition ended, or the process stops), so no count is lost. The owner makes
    one per event and keeps it: no module state. Tests pass `clock` and no
    `schedule`, and never sleep.
    """

    __slots__ = (
        "_clock",
        "_event",
        "_fields",
        "_interval",
        "_log",
        "_pending",
        "_quiet_until",
        "_schedule",
        "_timer",
    )

    def __init__(
        self,
        log: Callable[..., Any],
        event: str,
        *,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        schedule: Schedule | None = None,
    ) -> None:
        self._log = log
        self._event = event
        self._interval = interval
        self._clock = clock
        self._schedule = schedule
        self._timer: _Handle | None = None
        # Occurrences not yet in a line, and the fields of the latest of them (one dict,
        # replaced, never accumulated: the memory stays the same however long the flood).
        self._pending = 0
        self._fields: dict[str, Any] = {}
        self._quiet_until = -math.inf

    @property
    def pending(self) -> int:
        """Occurrences counted but not yet written."""
        return self._pending

    def __call__(self, **fields: Any) -> bool:
        """One occurrence; returns whether a line was written for it."""
        now = self._clock()
        self._pending += 1
        if now < self._quiet_until:
            self._fields = fields
            if self._schedule is not None and self._timer is None:
                self._timer = self._schedule(self._quiet_until - now, self._due)
            return False
        # Nothing held back since the last line: a line of its own, without a count.
        self._write(fields, summary=self._pending > 1)
        self._quiet_until = now + self._interval
        return True

    def flush(self) -> None:
        """Write what is pending now (the condition is over, or the owner stops)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            self._write(self._fields, summary=True)
        self._quiet_until = -math.inf

    def _due(self) -> None:
        self._timer = None
        if self._pending:
            self._write(self._fields, summary=True)
            self._quiet_until = self._clock() + self._interval

    def _write(self, fields: dict[str, Any], *, summary: bool) -> None:
        count = self._pending
        self._pending = 0
        self._fields = {}
        if summary:
            self._log(self._event, **fields, count=count)
        else:
            self._log(self._event, **fields)
