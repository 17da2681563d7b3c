"""proxy/throttle.py: a repeated event is logged once, then summarised with a count."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.throttle import Throttled


@dataclass
class Lines:
    """A log method that keeps what it was asked to write."""

    written: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, event: str, **fields: Any) -> None:
        self.written.append({"event": event, **fields})


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Timers:
    """loop.call_later without a loop: the test decides when a timer fires."""

    due: list[tuple[float, Callable[[], None]]] = field(default_factory=list)
    cancelled: int = 0

    def __call__(self, delay: float, callback: Callable[[], None]) -> Timers:
        self.due.append((delay, callback))
        return self

    def cancel(self) -> None:
        self.cancelled += 1

    def fire(self) -> None:
        _, callback = self.due.pop(0)
        callback()


def test_a_thousand_occurrences_in_a_minute_write_one_line() -> None:
    lines, clock = Lines(), Clock()
    refused = Throttled(lines, "too_many_connections", clock=clock)
    written = [refused(limit=10) for _ in range(1000)]
    assert written == [True] + [False] * 999
    assert lines.written == [{"event": "too_many_connections", "limit": 10}]
    assert refused.pending == 999


def test_the_next_occurrence_after_the_interval_carries_the_count() -> None:
    lines, clock = Lines(), Clock()
    refused = Throttled(lines, "too_many_connections", clock=clock)
    for n in range(500):
        clock.now += 0.1  # 50 s in all: within the minute
        refused(n=n)
    clock.now += 10.2  # 60.1 s after the first line
    assert refused(n=500)
    assert lines.written == [
        {"event": "too_many_connections", "n": 0},
        {"event": "too_many_connections", "n": 500, "count": 500},
    ]
    assert refused.pending == 0


def test_at_most_one_line_a_minute_while_the_flood_lasts() -> None:
    lines, clock = Lines(), Clock()
    refused = Throttled(lines, "refused", clock=clock)
    for _ in range(6000):  # ten minutes, ten a second
        refused()
        clock.now += 0.1
    assert 10 <= len(lines.written) <= 11
    assert sum(line.get("count", 1) for line in lines.written) + refused.pending == 6000


def test_an_occurrence_after_a_quiet_minute_is_logged_alone() -> None:
    lines, clock = Lines(), Clock()
    refused = Throttled(lines, "refused", clock=clock)
    refused()
    clock.now += 3600
    refused()
    assert lines.written == [{"event": "refused"}, {"event": "refused"}]


def test_flush_writes_what_is_pending_and_starts_a_new_episode() -> None:
    lines, clock = Lines(), Clock()
    failed = Throttled(lines, "not_saved", clock=clock)
    for _ in range(3):
        failed(error="disk full")
    failed.flush()
    failed.flush()  # nothing more to say
    failed(error="again")  # at once, though within the minute: a new episode
    assert lines.written == [
        {"event": "not_saved", "error": "disk full"},
        {"event": "not_saved", "error": "disk full", "count": 2},
        {"event": "not_saved", "error": "again"},
    ]


def test_with_a_schedule_the_summary_comes_at_the_end_of_the_interval() -> None:
    lines, clock, timers = Lines(), Clock(), Timers()
    refused = Throttled(lines, "refused", clock=clock, schedule=timers)
    refused()
    clock.now += 20
    for _ in range(5):
        refused()
    assert [delay for delay, _ in timers.due] == [40.0]  # one timer, however many
    clock.now += 40
    timers.fire()
    assert lines.written == [{"event": "refused"}, {"event": "refused", "count": 5}]
    clock.now += 1
    refused()  # within a minute of the summary: held for the next one
    assert len(lines.written) == 2 and [d for d, _ in timers.due] == [59.0]
    refused.flush()
    assert timers.cancelled == 1
    assert lines.written[-1] == {"event": "refused", "count": 1}


def test_a_timer_with_nothing_pending_writes_nothing() -> None:
    lines, clock, timers = Lines(), Clock(), Timers()
    refused = Throttled(lines, "refused", clock=clock, schedule=timers)
    refused()
    refused()
    refused.flush()
    assert timers.cancelled == 1
    timers.fire()  # a timer that fired anyway, after being cancelled
    assert lines.written == [{"event": "refused"}, {"event": "refused", "count": 1}]
