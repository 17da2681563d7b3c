"""Shutdown's view of the pipeline: the requests in it, not the tasks that serve them.

Each request runs inside its own cut-off scope (an `asyncio.Timeout` with no
deadline). A drain waits, up to its grace period, for the pipeline to empty;
then it moves the deadline of every request still in it to now. Each of those
ends at whatever it was waiting for (a permit, a login, the API) and answers
503 shutting_down, or, if its answer had already begun, is cut off. Which task
serves a request, and how many requests a task serves, is the HTTP server's
business, not the drain's.
"""

from __future__ import annotations

import asyncio
import contextlib


class Drain:
    def __init__(self) -> None:
        self._active: set[asyncio.Timeout] = set()
        self.draining = False
        # Set when the pipeline empties during a drain.
        self._empty: asyncio.Event | None = None

    def add(self, scope: asyncio.Timeout) -> None:
        """A request's cut-off scope, once entered (`async with asyncio.timeout(None)`)."""
        self._active.add(scope)

    def discard(self, scope: asyncio.Timeout) -> None:
        """The request is done with the pipeline (before its scope exits)."""
        self._active.discard(scope)
        if not self._active and self._empty is not None:
            self._empty.set()

    def __len__(self) -> int:
        return len(self._active)

    async def drain(self, grace: float) -> int:
        """Let requests finish for `grace` seconds, then cut off the rest; returns how many."""
        self.draining = True
        await self._until_empty(grace)
        pending = list(self._active)
        if pending:
            now = asyncio.get_running_loop().time()
            for scope in pending:
                scope.reschedule(now)
            await self._until_empty(5)
        return len(pending)

    async def _until_empty(self, seconds: float) -> None:
        if not self._active:
            return
        self._empty = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._empty.wait(), seconds)
