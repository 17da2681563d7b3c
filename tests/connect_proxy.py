"""A tiny corporate egress proxy for tests: CONNECT only, over real sockets.

It records each CONNECT head as it arrived (request line, Proxy-Authorization), can
refuse with any status, and otherwise opens the tunnel and passes bytes both ways
untouched. `routes` maps a CONNECT target to the address really dialled, so a test can
name an API host that resolves nowhere (`api.example.test`): only the proxy "resolves" it,
as a corporate proxy does for hosts the sidecar's own DNS cannot see.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Connect:
    """One CONNECT request as the proxy read it."""

    head: bytes

    @property
    def line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    def header(self, name: str) -> list[str]:
        lines = self.head.decode("latin-1").split("\r\n")[1:]
        pairs = [line.split(":", 1) for line in lines if ":" in line]
        return [value.strip() for key, value in pairs if key.strip().lower() == name.lower()]


@dataclass
class ConnectProxy:
    # Answer every CONNECT with this status instead of opening the tunnel (407, 403, 502...);
    # `refuse_first` refuses only that many, then tunnels.
    refuse: int | None = None
    refuse_first: int | None = None
    # Answer nothing at all, or close at once without a word.
    silent: bool = False
    hang_up: bool = False
    routes: dict[str, tuple[str, int]] = field(default_factory=dict)
    connects: list[Connect] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def where(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def lines(self) -> list[bytes]:
        return [c.line for c in self.connects]

    async def start(self) -> ConnectProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        try:
            await self._tunnel(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            # Cancelled by close(): asyncio's server would log a cancelled handler as an error.
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    def _refusal(self) -> int | None:
        if self.refuse_first is not None:
            return self.refuse if len(self.connects) <= self.refuse_first else None
        return self.refuse

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.hang_up:
            return
        head = (await reader.readuntil(b"\r\n\r\n"))[:-4]
        self.connects.append(Connect(head))
        if self.silent:
            await reader.read()  # until the client gives up
            return
        refusal = self._refusal()
        if refusal is not None:
            extra = b'Proxy-Authenticate: Basic realm="corp"\r\n' if refusal == 407 else b""
            # A reason phrase of its own: the proxy's text must never reach a message.
            head = b"HTTP/1.1 %d Go-Away-Text\r\n%sContent-Length: 0\r\n\r\n"
            writer.write(head % (refusal, extra))
            await writer.drain()
            return
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ")
        assert method == "CONNECT"
        host, _, port = target.rpartition(":")
        address = self.routes.get(target, (host.strip("[]"), int(port)))
        try:
            far_reader, far_writer = await asyncio.open_connection(*address)
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        self._writers.append(far_writer)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await asyncio.gather(_pipe(reader, far_writer), _pipe(far_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
