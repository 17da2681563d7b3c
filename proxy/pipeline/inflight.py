"""A FIFO concurrency gate whose size can change while slots are held (config reload)."""

from __future__ import annotations

import asyncio
from collections import deque


class Gate:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.held < self.limit and not self._waiters:
            self.held += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # Granted in the same breath as cancelled: hand the slot on.
                self.release()
            raise

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
