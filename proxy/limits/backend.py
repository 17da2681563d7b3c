"""Where permits are counted: the Backend protocol and the in-memory backend.

A backend counts permits per window, and the reserve that a window's end takes
from the next window (see `Backend.acquire`). The shorthand's windows (one per
scope, and the day) take `acquire`: one call, the counts and Redis keys they have
always had. `limits.windows` take `take`: a permit counted in every window of its
scope at once, or in none. The memory backend serves one process; its day count,
and the count of every window of an hour or more, survive restarts through a
small state file (written at most once a second, and on close), so a restart does
not forget how much of a long budget is spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import structlog

from proxy.limits.plan import DAY_NAME, Window
from proxy.throttle import Throttled

log = structlog.get_logger("proxy.limits")

# A window's end may reserve up to 1/CARRY_SHARE of the next window's budget (the limiter
# sets each permit's cap; see Backend.acquire): a burst that arrives at a window's end must
# not take the next one's whole budget. Budgets under CARRY_SHARE reserve nothing.
CARRY_SHARE = 10


class Verdict(enum.Enum):
    GRANTED = "granted"
    WINDOW_FULL = "window_full"
    DAY_FULL = "day_full"
    # The window has room, but at its end a permit also needs a place in the next window's
    # reserve, and that is spent: the permit waits for the next window, like WINDOW_FULL.
    CARRY_FULL = "carry_full"


class Backend(Protocol):
    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def acquire(
        self,
        scope: str,
        window: int,
        limit: int,
        day: int,
        day_limit: int,
        carry_cap: int = 0,
    ) -> Verdict:
        """Count one permit in `scope`'s window and in the day, if both have room.

        `limit` is the window's whole budget; what the end of the window before reserved
        in this one comes off it. `carry_cap` > 0: the permit is taken at the window's end
        (the guard), where the API may count it in this window or the next, so it is also
        reserved in `window + 1`, if fewer than `carry_cap` are reserved there already
        (else CARRY_FULL). 0: not at a window's end; the caller never takes a permit there
        without a reserve.
        """
        ...

    async def take(
        self,
        windows: Sequence[Window],
        indexes: Sequence[int],
        limits: Sequence[int],
        caps: Sequence[int],
    ) -> tuple[Verdict, int]:
        """Count one permit in every one of `windows` (window `indexes[i]` of each) if all
        have room, atomically: all counted, or none.

        `limits[i]` and `caps[i]` are as `acquire`'s `limit` and `carry_cap`, per window;
        a cap under 0 is a window's end where no reserve may be made: CARRY_FULL there.
        Returns (GRANTED, -1), or the first window in `windows`'s order that refused:
        (WINDOW_FULL, i), or (CARRY_FULL, i) when its reserve in the next window is spent.
        """
        ...

    async def raise_used(self, scope: str, window: int, used: int) -> None:
        """The server says at least `used` permits of this window are gone (reserve included).
        `scope` names the counts: the shorthand's scope, or a Window's name."""
        ...

    def known_used(self, scope: str, window: int) -> int:
        """The window's count, its reserve included, as this process last saw it (no I/O):
        raise_used is only worth a call when the server reports more."""
        ...

    async def day_used(self, day: int) -> int: ...

    def known_day_used(self, day: int) -> int:
        """The day's count as this process last saw it (no I/O; for the metrics gauge)."""
        ...

    def status(self) -> dict[str, Any]:
        """For /readyz: {"ok": bool, "backend": name, ...}."""
        ...


class _Count:
    """One scope's counts in its latest window: mutated in place, nothing allocated per permit."""

    __slots__ = ("carried", "reserved", "used", "window")

    def __init__(self, window: int, used: int = 0, carried: int = 0, reserved: int = 0) -> None:
        self.window = window
        self.used = used  # permits granted in this window
        self.carried = carried  # reserved in this window by the end of the one before
        self.reserved = reserved  # reserved in the next window by this one's end

    def as_saved(self) -> tuple[int, int, int, int]:
        return (self.window, self.used, self.carried, self.reserved)

    def move_to(self, window: int) -> None:
        # The reserve for the window that now begins still holds; any older one is over.
        self.carried = self.reserved if window == self.window + 1 else 0
        self.window, self.used, self.reserved = window, 0, 0


_TAKEN = (Verdict.GRANTED, -1)


class MemoryBackend:
    name = "memory"

    def __init__(self, state_file: str | None = None, key: str = "") -> None:
        self._counts: dict[str, _Count] = {}
        self._day = -1
        self._day_count = 0
        self._state_file = Path(state_file) if state_file else None
        self._key = key
        self._saved: tuple[int, int] | None = None
        # Long windows (Window.long) by name: their counts go to the state file. Filled
        # as they are first used; a restart finds their counts in `_saved_windows`.
        self._long: set[str] = set()
        # name -> (window, used, carried, reserved), as last read from or written to the file.
        self._saved_windows: dict[str, tuple[int, int, int, int]] = {}
        self._flusher: asyncio.Task[None] | None = None
        # Set when the day count changes: the flusher waits for it, so an idle process
        # has no timer at all (it used to wake every second to find nothing to write).
        self._changed = asyncio.Event()
        # A file that cannot be written fails every second: one warning, then a count
        # once a minute, and the last count when it can be written again.
        self.not_saved = Throttled(log.warning, "limits_state_not_saved")

    async def start(self) -> None:
        self._load()
        if self._state_file is not None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_every_second())

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        self.save()

    async def acquire(
        self,
        scope: str,
        window: int,
        limit: int,
        day: int,
        day_limit: int,
        carry_cap: int = 0,
    ) -> Verdict:
        return self.acquire_now(scope, window, limit, day, day_limit, carry_cap)

    def acquire_now(
        self,
        scope: str,
        window: int,
        limit: int,
        day: int,
        day_limit: int,
        carry_cap: int = 0,
    ) -> Verdict:
        if day != self._day:
            self._day, self._day_count = day, self._loaded_count(day)
            self._changed.set()
        if self._day_count >= day_limit:
            return Verdict.DAY_FULL
        count = self._counts.get(scope)
        if count is None or count.window != window:
            count = self._count_at(scope, window)
        if count.used + count.carried >= limit:
            return Verdict.WINDOW_FULL
        if carry_cap:
            if count.reserved >= carry_cap:
                return Verdict.CARRY_FULL
            count.reserved += 1
        count.used += 1
        self._day_count += 1
        self._changed.set()
        return Verdict.GRANTED

    async def take(
        self,
        windows: Sequence[Window],
        indexes: Sequence[int],
        limits: Sequence[int],
        caps: Sequence[int],
    ) -> tuple[Verdict, int]:
        return self.take_now(windows, indexes, limits, caps)

    def take_now(
        self,
        windows: Sequence[Window],
        indexes: Sequence[int],
        limits: Sequence[int],
        caps: Sequence[int],
    ) -> tuple[Verdict, int]:
        """Backend.take: every window checked first, then every one counted (one process,
        no await in between, so nothing else can count between the two)."""
        counts = self._counts
        for i, w in enumerate(windows):
            count = counts.get(w.name)
            if count is None or count.window != indexes[i]:
                if w.long:
                    self._long.add(w.name)  # its counts go to the state file
                count = self._count_at(w.name, indexes[i])
            if count.used + count.carried >= limits[i]:
                return Verdict.WINDOW_FULL, i
            if caps[i] and count.reserved >= caps[i]:
                return Verdict.CARRY_FULL, i
        for i, w in enumerate(windows):
            count = counts[w.name]
            count.used += 1
            if caps[i] > 0:
                count.reserved += 1
        if self._long:
            self._changed.set()  # the flusher saves the long windows a second later
        return _TAKEN

    def known_used(self, scope: str, window: int) -> int:
        count = self._counts.get(scope)
        if count is None:
            # Not used since a restart: what the state file kept of it, if anything.
            saved = self._saved_of(scope)
            if saved is not None and saved[0] == window:
                return saved[1] + saved[2]
            return saved[3] if saved is not None and saved[0] + 1 == window else 0
        if count.window == window:
            return count.used + count.carried
        # A window not begun yet: what the current one's end reserved in it.
        return count.reserved if window == count.window + 1 else 0

    async def raise_used(self, scope: str, window: int, used: int) -> None:
        count = self._counts.get(scope)
        if count is not None and window < count.window:
            return  # a window already over
        if count is None or count.window != window:
            count = self._count_at(scope, window)
        # `used` is what the API counted in the window, the reserve included.
        count.used = max(count.used, used - count.carried)

    def _count_at(self, scope: str, window: int) -> _Count:
        count = self._counts.get(scope)
        if count is None:
            count = self._counts[scope] = self._restored(scope, window)
        else:
            count.move_to(window)
        return count

    def _restored(self, name: str, window: int) -> _Count:
        """A long window's counts as the state file kept them, on its first use after a
        restart (the file holds nothing else)."""
        saved = self._saved_of(name)
        if saved is None:
            return _Count(window)
        if saved[0] == window:
            return _Count(*saved)
        # The window after the one kept: only what that one reserved in it holds.
        return _Count(window, carried=saved[3] if saved[0] + 1 == window else 0)

    async def day_used(self, day: int) -> int:
        return self.known_day_used(day)

    def known_day_used(self, day: int) -> int:
        return self._day_count if day == self._day else self._loaded_count(day)

    def status(self) -> dict[str, Any]:
        return {"ok": True, "backend": self.name}

    # -- the day count (and long windows') across restarts ------------------------

    def _saved_of(self, name: str) -> tuple[int, int, int, int] | None:
        """What the state file keeps of a window: (window, used, carried, reserved). The
        shorthand's day is kept as it always was, whichever way its permits are taken."""
        if name != DAY_NAME:
            return self._saved_windows.get(name)
        return None if self._saved is None else (self._saved[0], self._saved[1], 0, 0)

    def _loaded_count(self, day: int) -> int:
        return self._saved[1] if self._saved is not None and self._saved[0] == day else 0

    def _load(self) -> None:
        if self._state_file is None or not self._state_file.exists():
            return
        try:
            data = json.loads(self._state_file.read_text())
            if data.get("key") != self._key:
                return
            if "day" in data:  # the shorthand's day (a windows config has none)
                self._saved = (int(data["day"]), int(data["used"]))
            windows = data.get("windows", {})
            self._saved_windows = {
                str(name): (int(w), int(used), int(carried), int(reserved))
                for name, (w, used, carried, reserved) in windows.items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("limits_state_unreadable", path=str(self._state_file), error=str(e))

    def save(self) -> None:
        """Write the day count and the long windows' counts to the state file (the flusher
        does, a second after a change, and close)."""
        if self._state_file is None:
            return
        day: tuple[int, int] | None = None
        if self._day >= 0:
            day = (self._day, self._day_count)
        elif DAY_NAME in self._long:  # the shorthand's day, beside limits.windows
            count = self._counts[DAY_NAME]
            day = (count.window, count.used + count.carried)
        # Those not used since the restart keep what the file had of them.
        windows = dict(self._saved_windows)
        windows.update(
            (name, self._counts[name].as_saved()) for name in sorted(self._long) if name != DAY_NAME
        )
        if day is None and not windows:
            return
        if day == self._saved and windows == self._saved_windows:
            return
        data: dict[str, Any] = {"key": self._key}
        if day is not None:
            # The shorthand's day as it always was written, so an older version reads it.
            data.update(day=day[0], used=day[1])
        if windows:
            data["windows"] = windows
        text = json.dumps(data)
        tmp = None
        try:
            self._state_file.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename: a crash never leaves a half-written file behind.
            fd, tmp = tempfile.mkstemp(dir=self._state_file.parent, prefix=".limits-")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, self._state_file)
        except OSError as e:
            if tmp is not None:  # a full disk: do not leave one more file a second
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            self.not_saved(path=str(self._state_file), error=e.strerror)
            return
        self._saved = day
        self._saved_windows = windows
        self.not_saved.flush()

    async def _flush_every_second(self) -> None:
        """At most one write a second, and only after a change (a write that failed is
        tried again with the next change, and at close)."""
        while True:
            await self._changed.wait()
            await asyncio.sleep(1.0)
            self._changed.clear()
            self.save()
