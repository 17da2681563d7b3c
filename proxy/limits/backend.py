"""Where permits are counted: the Backend protocol and the in-memory backend.

A backend counts per-window permits per scope and one per-day total, and the
reserve that a window's end takes from the next window (see `Backend.acquire`).
The memory backend serves one process; its day count survives restarts through
a small state file (written at most once a second, and on close), so a restart
does not forget how much of today's budget is spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

import structlog

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

    async def raise_used(self, scope: str, window: int, used: int) -> None:
        """The server says at least `used` permits of this window are gone (reserve included)."""
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

    def __init__(self, window: int) -> None:
        self.window = window
        self.used = 0  # permits granted in this window
        self.carried = 0  # reserved in this window by the end of the one before
        self.reserved = 0  # reserved in the next window by this one's end

    def move_to(self, window: int) -> None:
        # The reserve for the window that now begins still holds; any older one is over.
        self.carried = self.reserved if window == self.window + 1 else 0
        self.window, self.used, self.reserved = window, 0, 0


class MemoryBackend:
    name = "memory"

    def __init__(self, state_file: str | None = None, key: str = "") -> None:
        self._counts: dict[str, _Count] = {}
        self._day = -1
        self._day_count = 0
        self._state_file = Path(state_file) if state_file else None
        self._key = key
        self._saved: tuple[int, int] | None = None
        self._flusher: asyncio.Task[None] | None = None
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
        return Verdict.GRANTED

    def known_used(self, scope: str, window: int) -> int:
        count = self._counts.get(scope)
        if count is None:
            return 0
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
            count = self._counts[scope] = _Count(window)
        else:
            count.move_to(window)
        return count

    async def day_used(self, day: int) -> int:
        return self.known_day_used(day)

    def known_day_used(self, day: int) -> int:
        return self._day_count if day == self._day else self._loaded_count(day)

    def status(self) -> dict[str, Any]:
        return {"ok": True, "backend": self.name}

    # -- the day count across restarts ---------------------------------------------

    def _loaded_count(self, day: int) -> int:
        return self._saved[1] if self._saved is not None and self._saved[0] == day else 0

    def _load(self) -> None:
        if self._state_file is None or not self._state_file.exists():
            return
        try:
            data = json.loads(self._state_file.read_text())
            if data.get("key") == self._key:
                self._saved = (int(data["day"]), int(data["used"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("limits_state_unreadable", path=str(self._state_file), error=str(e))

    def save(self) -> None:
        """Write the day count to the state file (the flusher does, each second, and close)."""
        if self._state_file is None or self._day < 0:
            return
        state = (self._day, self._day_count)
        if state == self._saved:
            return
        text = json.dumps({"key": self._key, "day": state[0], "used": state[1]})
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
        self._saved = state
        self.not_saved.flush()

    async def _flush_every_second(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.save()
