"""Shutdown's view of the pipeline: the requests in it.

A drain waits, up to its grace period, for the pipeline to empty; then it cuts
off every request still in it: each one's handler is interrupted wherever it
waits (a permit, a login, the API) and answers 503 shutting_down, or, if its
answer had already begun, is cut off. The server says which task serves a
request (`Request.task`); the drain keeps no view of connections.

Interrupting is a cancellation of that task, marked as ours: the handler asks
`cut_off(request)` to tell it from a client that went away, and resumes. (A
per-request asyncio.timeout scope did the same with no marking, but cost 2 µs
per request, a fiftieth of the whole proxy's CPU: bench/ANALYSIS.md.)
"""

from __future__ import annotations

import asyncio
import contextlib

from proxy.http.server import Request


class Drain:
    def __init__(self) -> None:
        self._active: set[Request] = set()
        self._cut: set[Request] = set()
        self.draining = False
        # Set when the pipeline empties during a drain.
        self._empty: asyncio.Event | None = None

    def add(self, request: Request) -> None:
        self._active.add(request)

    def discard(self, request: Request) -> None:
        """The request is done with the pipeline."""
        self._active.discard(request)
        self._cut.discard(request)
        if not self._active and self._empty is not None:
            self._empty.set()

    def cut_off(self, request: Request) -> bool:
        """Was this request interrupted by the drain (not by its client leaving)?"""
        return request in self._cut

    def __len__(self) -> int:
        return len(self._active)

    async def drain(self, grace: float) -> int:
        """Let requests finish for `grace` seconds, then cut off the rest; returns how many."""
        self.draining = True
        await self._until_empty(grace)
        pending = list(self._active)
        for request in pending:
            task = request.task
            if task is not None:
                self._cut.add(request)
                task.cancel()
        if pending:
            await self._until_empty(5)
        return len(pending)

    async def _until_empty(self, seconds: float) -> None:
        if not self._active:
            return
        self._empty = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._empty.wait(), seconds)
