"""Where permits are counted: the Backend protocol and the in-memory backend.

A backend counts per-window permits per scope and one per-day total. The
memory backend serves one process; its day count survives restarts through a
small state file (written at most once a second, and on close), so a restart
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

log = structlog.get_logger("proxy.limits")


class Verdict(enum.Enum):
    GRANTED = "granted"
    WINDOW_FULL = "window_full"
    DAY_FULL = "day_full"


class Backend(Protocol):
    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def acquire(
        self, scope: str, window: int, limit: int, day: int, day_limit: int
    ) -> Verdict:
        """Count one permit in `scope`'s window and in the day, if both have room."""
        ...

    async def raise_used(self, scope: str, window: int, used: int) -> None:
        """The server says at least `used` permits of this window are gone."""
        ...

    def known_used(self, scope: str, window: int) -> int:
        """The window's count as this process last saw it (no I/O): raise_used is only
        worth a call when the server reports more."""
        ...

    async def day_used(self, day: int) -> int: ...

    def known_day_used(self, day: int) -> int:
        """The day's count as this process last saw it (no I/O; for the metrics gauge)."""
        ...

    def status(self) -> dict[str, Any]:
        """For /readyz: {"ok": bool, "backend": name, ...}."""
        ...


class MemoryBackend:
    name = "memory"

    def __init__(self, state_file: str | None = None, key: str = "") -> None:
        self._windows: dict[str, tuple[int, int]] = {}
        self._day = -1
        self._day_count = 0
        self._state_file = Path(state_file) if state_file else None
        self._key = key
        self._saved: tuple[int, int] | None = None
        self._flusher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._load()
        if self._state_file is not None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_every_second())

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        self._save()

    async def acquire(
        self, scope: str, window: int, limit: int, day: int, day_limit: int
    ) -> Verdict:
        return self.acquire_now(scope, window, limit, day, day_limit)

    def acquire_now(self, scope: str, window: int, limit: int, day: int, day_limit: int) -> Verdict:
        if day != self._day:
            self._day, self._day_count = day, self._loaded_count(day)
        if self._day_count >= day_limit:
            return Verdict.DAY_FULL
        current, used = self._windows.get(scope, (window, 0))
        if current != window:
            used = 0
        if used >= limit:
            return Verdict.WINDOW_FULL
        self._windows[scope] = (window, used + 1)
        self._day_count += 1
        return Verdict.GRANTED

    def known_used(self, scope: str, window: int) -> int:
        current, count = self._windows.get(scope, (window, 0))
        return count if current == window else 0

    async def raise_used(self, scope: str, window: int, used: int) -> None:
        current, count = self._windows.get(scope, (window, 0))
        if (current == window and count < used) or current < window:
            self._windows[scope] = (window, used)

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

    def _save(self) -> None:
        if self._state_file is None or self._day < 0:
            return
        state = (self._day, self._day_count)
        if state == self._saved:
            return
        text = json.dumps({"key": self._key, "day": state[0], "used": state[1]})
        try:
            self._state_file.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename: a crash never leaves a half-written file behind.
            fd, tmp = tempfile.mkstemp(dir=self._state_file.parent, prefix=".limits-")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, self._state_file)
            self._saved = state
        except OSError as e:
            log.warning("limits_state_not_saved", path=str(self._state_file), error=e.strerror)

    async def _flush_every_second(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._save()
