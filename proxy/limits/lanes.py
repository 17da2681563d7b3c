"""Lanes and clients: who waits for a permit, and in which order they are served.

Within one budget, a permit goes to the highest lane with a request waiting;
inside a lane, the clients with requests waiting take turns, and each client's
own requests go first in, first out. So urgent work overtakes bulk work, and an
app that floods a lane still leaves every other app in it every other permit.
`background` (the jobs the proxy runs itself) comes last, never ages, and is
paced besides (see RateLimiter): it only uses what synchronous work leaves.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from dataclasses import dataclass


class Lane(enum.IntEnum):
    """Lower value, served first."""

    HIGH = 0
    NORMAL = 1
    LOW = 2
    BACKGROUND = 3

    @property
    def label(self) -> str:
        """The name in headers, config, metrics and the access line."""
        return _LABELS[self]


_LABELS = ("high", "normal", "low", "background")

# What a client may ask for with X-Proxy-Priority (background is the proxy's own jobs').
ASKABLE = {"high": Lane.HIGH, "normal": Lane.NORMAL, "low": Lane.LOW}

# (lane, the lane above it) for the lanes a waiting request climbs out of as it ages;
# normal first, so a request climbs one lane per `queue.aging` seconds, not two at once.
# Background never ages: it must never take a permit while synchronous work waits.
AGING = ((Lane.NORMAL, Lane.HIGH), (Lane.LOW, Lane.NORMAL))


@dataclass(frozen=True, slots=True)
class Client:
    """One identity that sends requests: built once from the config, never per request.

    `name` is a metrics label and is written in access lines, so it comes from the
    config only (a bounded set). `max_queued`: how many of its requests may wait at
    once, in all budgets together; None, only queue.max_size bounds them.
    """

    name: str
    max_lane: Lane = Lane.NORMAL
    max_queued: int | None = None


# Requests the proxy makes for itself (its logins): not any client's.
PROXY_CLIENT = "proxy"


class Waiter:
    """One request in line: allocated only when a request cannot have a permit at once."""

    __slots__ = ("client", "entered", "future", "lane")

    def __init__(self, future: asyncio.Future[None], lane: Lane, client: str, entered: float):
        self.future = future
        self.lane = lane
        self.client = client
        # When it entered its current lane (the limiter's ticks): aging is measured from it.
        self.entered = entered


class LaneQueue:
    """One lane of one budget: a FIFO line per client, and the clients' turns.

    A client is in `turns` exactly while its line holds entries (waiters that left are
    dropped lazily, as they reach the head), so picking the next waiter and handing
    the turn on are O(1); aging looks at the head of each client's line, and clients
    are few (the configured ones).
    """

    __slots__ = ("lines", "turns")

    def __init__(self) -> None:
        self.lines: dict[str, deque[Waiter]] = {}
        self.turns: deque[str] = deque()

    def add(self, waiter: Waiter, front: bool = False) -> None:
        line = self.lines.get(waiter.client)
        if line is None:
            line = self.lines[waiter.client] = deque()
        if not line:
            if front:
                self.turns.appendleft(waiter.client)
            else:
                self.turns.append(waiter.client)
        if front:
            # Keep each line ordered by `entered`, so its head is its oldest: a request
            # put back at the head counts as old as the one it goes before.
            if line:
                waiter.entered = min(waiter.entered, line[0].entered)
            line.appendleft(waiter)
        else:
            line.append(waiter)

    def head(self) -> Waiter | None:
        """The waiter whose turn it is (waiters that left are dropped on the way)."""
        turns, lines = self.turns, self.lines
        while turns:
            line = lines[turns[0]]
            while line and line[0].future.done():
                line.popleft()
            if line:
                return line[0]
            turns.popleft()
        return None

    def take(self, waiter: Waiter) -> None:
        """Remove `waiter`, the head returned just before; the next client's turn comes."""
        turns = self.turns
        line = self.lines[turns[0]]
        line.popleft()
        turns.popleft()
        if line:
            turns.append(waiter.client)

    def drain(self) -> list[Waiter]:
        """Every entry, in no particular order, leaving the lane empty."""
        out = [w for line in self.lines.values() for w in line]
        for line in self.lines.values():
            line.clear()
        self.turns.clear()
        return out

    def age(self, threshold: float) -> list[Waiter]:
        """Take out the live waiters that entered at or before `threshold`, oldest first."""
        aged: list[Waiter] = []
        emptied = False
        for line in self.lines.values():
            if not line or line[0].entered > threshold:
                continue
            while line and line[0].entered <= threshold:
                waiter = line.popleft()
                if not waiter.future.done():
                    aged.append(waiter)
            if not line:
                emptied = True
        if emptied:
            lines = self.lines
            self.turns = deque(c for c in self.turns if lines[c])
        aged.sort(key=_entered)
        return aged


def _entered(waiter: Waiter) -> float:
    return waiter.entered
