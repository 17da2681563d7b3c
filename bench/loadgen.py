"""Light HTTP/1.1 clients on raw asyncio sockets, for loads wrk cannot make.

wrk keeps a fixed number of connections busy; the queue benchmarks need the opposite: many
connections that each wait a long time (parked requests), or requests offered at a fixed rate
whatever the answers do (overload). aiohttp's client would cost more memory and CPU than the
requests themselves, so each request is one plain socket, `Connection: close`, read to EOF.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


def request_bytes(port: int, path: str, headers: str = "") -> bytes:
    """`headers`: extra header lines, each ending with CRLF."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n{headers}\r\n"
    ).encode()


def outcome_of(raw: bytes) -> str:
    """'200', or '503 queue_full' for an answer the proxy made itself (X-Proxy-Error)."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    lines = head.split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        return "unparsable answer"
    status = parts[1]
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "x-proxy-error":
            return f"{status} {value.strip()}"
    return status


async def one_request(
    port: int, path: str, on_sent: Callable[[], None] | None = None, headers: str = ""
) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request_bytes(port, path, headers))
        await writer.drain()
        if on_sent is not None:
            on_sent()
        return outcome_of(await reader.read(-1))
    finally:
        writer.close()


async def _counted(
    port: int, path: str, on_sent: Callable[[], None] | None = None, headers: str = ""
) -> str:
    try:
        return await one_request(port, path, on_sent, headers)
    except Exception as e:  # counted like an answer: a failed request is a figure too
        return f"error {type(e).__name__}"


@dataclass
class Parked:
    """Requests sent and still waiting for their answers."""

    tasks: list[asyncio.Task[str]]
    sent: int = 0

    def answered(self) -> int:
        return sum(1 for t in self.tasks if t.done())

    def outcomes(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for t in self.tasks:
            if not t.done():
                out["unanswered"] += 1
            elif t.cancelled():
                out["cancelled"] += 1
            else:
                out[t.result()] += 1
        return out

    async def cancel(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def park(
    port: int, path: str, count: int, connect_at_once: int = 100, headers: str = ""
) -> Parked:
    """Open `count` connections, each sending one GET; returns once all requests are sent
    (or failed before they could be).

    Connections open `connect_at_once` at a time: thousands of simultaneous SYNs would
    overflow the listen backlog and the kernel's 1-s SYN retries would pace the test instead.
    """
    gate = asyncio.Semaphore(connect_at_once)
    parked = Parked([])
    settled = 0
    all_settled = asyncio.Event()

    def settle() -> None:
        nonlocal settled
        settled += 1
        gate.release()
        if settled == count:
            all_settled.set()

    async def one() -> str:
        released = False

        def sent() -> None:
            nonlocal released
            released = True
            parked.sent += 1
            settle()

        await gate.acquire()
        try:
            return await _counted(port, path, sent, headers)
        finally:
            if not released:
                settle()

    parked.tasks = [asyncio.create_task(one()) for _ in range(count)]
    await all_settled.wait()
    return parked


@dataclass
class Offered:
    """An open-loop load: what was offered, and what came back."""

    offered: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    gave_up: int = 0  # still waiting when the run ended (the client hung up)


async def offer(
    ports: list[int], path: str, rate: float, start_at: float, duration: float, grace: float = 2.0
) -> Offered:
    """Send `rate` requests per second from wall time `start_at` for `duration` seconds,
    round-robin over `ports`, whatever the answers do (open loop, like real overload)."""
    result = Offered()
    loop = asyncio.get_running_loop()
    # Wall time for the schedule (windows are on the wall clock), loop time for sleeping.
    to_loop = loop.time() - time.time()
    tasks: list[asyncio.Task[str]] = []
    total = int(rate * duration)
    i = 0
    while i < total:
        now = time.time()
        # Everything due by now goes out in one batch, so a slow tick does not lower the rate.
        while i < total and start_at + i / rate <= now:
            tasks.append(asyncio.create_task(_counted(ports[i % len(ports)], path)))
            i += 1
        if i < total:
            await asyncio.sleep(max(0.0, start_at + i / rate + to_loop - loop.time()))
    result.offered = total
    end = start_at + duration + grace
    pending = [t for t in tasks if not t.done()]
    if pending:
        await asyncio.wait(pending, timeout=max(0.0, end - time.time()))
    for t in tasks:
        if t.done():
            result.outcomes[t.result()] += 1
        else:
            t.cancel()
            result.gave_up += 1
    await asyncio.gather(*tasks, return_exceptions=True)
    return result
