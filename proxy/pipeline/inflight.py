"""The in-flight cap: a FIFO gate whose size can change while slots are held (reload).

A request waiting for a slot keeps its deadline, as one waiting for a rate permit
does: clients that hold every slot (a stalled reader, a slow API) must not leave
the next request waiting past its queue.max_wait with no answer at all.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from proxy.errors import QueueTimeout


class Gate:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, deadline: float | None = None) -> None:
        """Take a slot, waiting in line until `deadline` (monotonic) at most."""
        if self.held < self.limit and not self._waiters:
            self.held += 1
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiters.append(future)
        when = None if deadline is None else loop.time() + (deadline - time.monotonic())
        try:
            async with asyncio.timeout_at(when):
                await future
        except (asyncio.CancelledError, TimeoutError) as e:
            if future.done() and not future.cancelled():
                # Granted in the same breath as cancelled: hand the slot on.
                self.release()
            if isinstance(e, TimeoutError):
                raise QueueTimeout(
                    f"all {self.limit} upstream slots stayed busy for the allowed wait "
                    "(limits.max_inflight; queue.max_wait or X-Proxy-Max-Wait)",
                    retry_after=1.0,
                ) from None
            raise

    def would_wait(self) -> bool:
        """Would `acquire` wait now (every slot held, or others already waiting)?"""
        return self.held >= self.limit or bool(self._waiters)

    def release(self) -> None:
        self.held -= 1
        self._wake()

    def resize(self, limit: int) -> None:
        """Takes effect at once for new slots; held slots drain down to a smaller size."""
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.held < self.limit:
            future = self._waiters.popleft()
            if not future.done():
                self.held += 1
                future.set_result(None)
