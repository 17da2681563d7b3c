"""The floor: the leanest Python proxy, asyncio protocols and httptools both ways, no features.

    python bench/prototypes/raw_protocols.py LISTEN_PORT UPSTREAM_PORT

No error handling, limits or streaming: it only shows what one proxy hop costs in
Python on this machine before any feature is added (bench/floor.py).
"""

from __future__ import annotations

import asyncio
import collections
import sys

import httptools
import uvloop

HOP = frozenset({b"connection", b"host", b"content-length", b"transfer-encoding", b"keep-alive"})
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


class Collecting(asyncio.Protocol):
    """Either side: feed the parser, collect a message's headers and body."""

    parser: httptools.HttpRequestParser | httptools.HttpResponseParser

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers, self.body = [], []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)


class UpstreamConnection(Collecting):
    parser: httptools.HttpResponseParser

    def __init__(self, pool: collections.deque[UpstreamConnection]) -> None:
        super().__init__()
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.answer: asyncio.Future[Answer] | None = None

    def on_message_complete(self) -> None:
        answer, self.answer = self.answer, None
        assert answer is not None
        answer.set_result((self.parser.get_status_code(), self.headers, b"".join(self.body)))
        self.pool.append(self)


class ClientConnection(Collecting):
    parser: httptools.HttpRequestParser

    def __init__(self, upstream: int, pool: collections.deque[UpstreamConnection]) -> None:
        super().__init__()
        self.upstream = upstream
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.tasks: set[asyncio.Future[None]] = set()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        lines = [self.parser.get_method() + b" " + self.url + b" HTTP/1.1\r\n"]
        lines += [n + b": " + v + b"\r\n" for n, v in self.headers if n.lower() not in HOP]
        lines.append(b"Host: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body))
        task = asyncio.ensure_future(self.forward(b"".join(lines) + body))
        self.tasks.add(task)  # a task nobody references may be collected mid-flight
        task.add_done_callback(self.tasks.discard)

    async def forward(self, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        if self.pool:
            conn = self.pool.pop()
        else:
            _, conn = await loop.create_connection(
                lambda: UpstreamConnection(self.pool), "127.0.0.1", self.upstream
            )
        conn.answer = loop.create_future()
        conn.transport.write(request)  # type: ignore[attr-defined]
        status, headers, body = await conn.answer
        out = [b"HTTP/1.1 %d OK\r\n" % status]
        out += [n + b": " + v + b"\r\n" for n, v in headers if n.lower() not in HOP]
        out.append(b"Content-Length: %d\r\n\r\n" % len(body))
        self.transport.write(b"".join(out) + body)  # type: ignore[attr-defined]


async def main(port: int, upstream: int) -> None:
    pool: collections.deque[UpstreamConnection] = collections.deque()
    loop = asyncio.get_running_loop()
    await loop.create_server(
        lambda: ClientConnection(upstream, pool), "127.0.0.1", port, backlog=4096
    )
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
