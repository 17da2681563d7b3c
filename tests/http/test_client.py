"""The upstream client (proxy/upstream.py) against raw asyncio servers over real sockets.

Each server here answers with exact bytes and records what reached it (request heads and
bodies, connections accepted, connections open at once), so every test can tell a reused
connection from a new one and see the request exactly as it went on the wire.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import eventually

from proxy.config import UpstreamConfig
from proxy.errors import UpstreamBadResponse, UpstreamTimeout, UpstreamUnreachable
from proxy.http import client as upstream_module
from proxy.http.client import ConnectFailed, StaleConnection, Upstream, UpstreamResponse
from proxy.http.headers import header_lines

MiB = 1024 * 1024

# A client that hangs should fail its test quickly, not eat the suite's 120 s default.
pytestmark = pytest.mark.timeout(30)


# -- raw servers -------------------------------------------------------------------------------


@dataclass
class Request:
    """One request as the server read it: the head's exact bytes and the body."""

    head: bytes
    body: bytes

    @property
    def request_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    @property
    def headers(self) -> list[tuple[str, str]]:
        """(lower-cased name, value) pairs, in order, duplicates kept."""
        lines = self.head.decode("latin-1").split("\r\n")[1:]
        pairs = [line.split(":", 1) for line in lines if line]
        return [(name.lower(), value.strip()) for name, value in pairs]

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name.lower()]


Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
Handler = Callable[["RawServer", Reader, Writer], Awaitable[None]]


@dataclass
class RawServer:
    """A listening socket that runs `handler` for each connection and keeps count."""

    handler: Handler
    port: int = 0
    scheme: str = "http"
    connections: int = 0  # accepted so far
    active: int = 0  # open now
    max_active: int = 0
    requests: list[Request] = field(default_factory=list)
    # Set for each connection whose handler saw the client close it (index = accept order).
    client_closed: list[asyncio.Event] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _writers: list[Writer] = field(default_factory=list)
    _index: dict[Reader, int] = field(default_factory=dict)  # connection number, from 0

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    async def start(self, tls: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._run, "127.0.0.1", 0, ssl=tls)
        self.port = self._server.sockets[0].getsockname()[1]
        self.scheme = "https" if tls else "http"

    async def _run(self, reader: Reader, writer: Writer) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        self._index[reader] = self.connections
        self.client_closed.append(asyncio.Event())
        self.connections += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Ended by close(); on 3.11 a cancelled handler task is logged as an error.
            pass
        finally:
            self.active -= 1
            self._tasks.discard(task)
            writer.close()

    async def read_request(self, reader: Reader) -> Request | None:
        """The next request on this connection, recorded; None when the client closed."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        request = Request(head, b"")
        length = request.header("content-length")
        if length:
            request.body = await reader.readexactly(int(length[0]))
        self.requests.append(request)
        return request

    async def until_closed_by_client(self, reader: Reader) -> None:
        """Stay silent, reading, until the client hangs up; then say so."""
        while await reader.read(65536):
            pass
        self.client_closed[self._index[reader]].set()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.transport.abort()  # no lingering flush of bytes nobody reads
        await self._server.wait_closed()
        # Let both ends run their connection_lost callbacks before the loop goes away.
        await asyncio.sleep(0.05)


def response(
    body: bytes = b"ok", status: str = "200 OK", headers: Sequence[tuple[str, str]] = ()
) -> bytes:
    """A keep-alive HTTP/1.1 answer with Content-Length."""
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def head_only(answer: bytes) -> bytes:
    """The head of an answer, without its body."""
    return answer.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"


def answering(*answers: bytes) -> Handler:
    """Keep-alive: request n (counted over all connections) gets answers[n]; the last repeats.

    An answer whose head says `Connection: close` is followed by closing the connection.
    """

    async def handle(server: RawServer, reader: Reader, w: Writer) -> None:
        while await server.read_request(reader) is not None:
            answer = answers[min(len(server.requests), len(answers)) - 1]
            w.write(answer)
            await w.drain()
            if b"connection: close" in head_only(answer).lower():
                return

    return handle


Serve = Callable[..., Awaitable[RawServer]]
Connect = Callable[..., Awaitable[Upstream]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[RawServer] = []

    async def start(handler: Handler, tls: ssl.SSLContext | None = None) -> RawServer:
        server = RawServer(handler)
        await server.start(tls)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def connect(serve: Serve) -> AsyncIterator[Connect]:
    """Started `Upstream`s, closed before the servers (this fixture depends on `serve`)."""
    made: list[Upstream] = []

    async def make(url: str, **cfg: Any) -> Upstream:
        settings: dict[str, Any] = {"connect_timeout": 2.0, "read_timeout": 5.0, **cfg}
        up = Upstream(UpstreamConfig(url=url, allow_insecure=True, **settings))
        await up.start()
        made.append(up)
        return up

    yield make
    for up in made:
        await up.close()


async def fetch(
    up: Upstream,
    method: str = "GET",
    path: str = "/",
    query: str = "",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> tuple[UpstreamResponse, bytes]:
    """One whole exchange: request, read the body, release."""
    async with await up.request(
        method, path, query, header_lines((headers or {}).items()), body
    ) as resp:
        return resp, await resp.read()


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- keep-alive and the request on the wire -----------------------------------------------------


async def test_sequential_requests_reuse_one_connection(serve: Serve, connect: Connect) -> None:
    server = await serve(answering(response(b"hello")))
    up = await connect(server.url)
    for _ in range(5):
        resp, body = await fetch(up)
        assert (resp.status, body) == (200, b"hello")
    assert len(server.requests) == 5
    assert server.connections == 1
    assert up.open_connections == 1


async def test_request_goes_on_the_wire_byte_for_byte(serve: Serve, connect: Connect) -> None:
    server = await serve(answering(response()))
    up = await connect(server.url)
    headers = {"X-Api-Key": "k", "Accept": "application/json"}

    await fetch(up, "GET", "/a%2Fb/@x", "q=1+2&q=%20", headers)
    await fetch(up, "POST", "/upload", "", {"Content-Type": "text/plain"}, b"hello")
    await fetch(up, "POST", "/empty", "")
    get, post, empty_post = server.requests

    assert get.request_line == b"GET /a%2Fb/@x?q=1+2&q=%20 HTTP/1.1"
    assert get.header("host") == [f"127.0.0.1:{server.port}"] == [up.where]
    assert get.header("x-api-key") == ["k"]
    assert get.header("accept") == ["application/json"]
    assert get.header("content-length") == []  # a GET without a body says nothing of one
    assert (get.body, get.head.count(b"\r\n\r\n")) == (b"", 1)

    assert post.request_line == b"POST /upload HTTP/1.1"
    assert post.header("content-length") == ["5"]
    assert post.header("content-type") == ["text/plain"]
    assert post.body == b"hello"

    assert empty_post.request_line == b"POST /empty HTTP/1.1"
    assert empty_post.header("content-length") == ["0"]
    assert server.connections == 1


# -- response framing ---------------------------------------------------------------------------

CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n"
)


async def test_chunked_body_is_read_whole_and_in_pieces_then_connection_reused(
    serve: Serve, connect: Connect
) -> None:
    server = await serve(answering(CHUNKED))
    up = await connect(server.url)

    resp, body = await fetch(up)
    assert (resp.status, resp.content_length, body) == (200, None, b"hello world")

    async with await up.request("GET", "/", "", b"", b"") as resp:
        pieces = []
        while piece := await resp.readany():
            pieces.append(piece)
        assert await resp.readany() == b""  # the end stays the end
    assert b"".join(pieces) == b"hello world"
    assert len(pieces) > 1  # readany hands out pieces as they come, not the whole body

    await fetch(up)
    assert server.connections == 1


async def test_close_delimited_body_is_read_to_eof_and_next_request_reconnects(
    serve: Serve, connect: Connect
) -> None:
    body = b"x" * 100_000 + b"end"
    server = await serve(answering(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body))
    up = await connect(server.url)

    resp, got = await fetch(up)
    assert (resp.status, resp.content_length, got) == (200, None, body)
    resp, got = await fetch(up)
    assert got == body
    assert server.connections == 2


@pytest.mark.parametrize(
    "answer",
    [
        response(b"bye", headers=[("Connection", "close")]),
        b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nbye",  # 1.0: no keep-alive unless said
    ],
    ids=["connection-close", "http-1.0"],
)
async def test_answer_that_ends_keep_alive_closes_the_connection(
    serve: Serve, connect: Connect, answer: bytes
) -> None:
    async def handle(server: RawServer, reader: Reader, w: Writer) -> None:
        await server.read_request(reader)
        w.write(answer)
        await w.drain()
        await server.until_closed_by_client(reader)  # closing is left to the client

    server = await serve(handle)
    up = await connect(server.url)
    resp, body = await fetch(up)
    assert (resp.status, body) == (200, b"bye")
    await asyncio.wait_for(server.client_closed[0].wait(), 3)
    assert up.open_connections == 0

    resp, body = await fetch(up)
    assert body == b"bye"
    assert server.connections == 2


async def test_head_answer_has_no_body_and_its_connection_is_not_reused(
    serve: Serve, connect: Connect
) -> None:
    # No body follows a HEAD answer, whatever its Content-Length says.
    server = await serve(answering(head_only(response(b"x" * 1234))))
    up = await connect(server.url)

    async with asyncio.timeout(3):  # reading the promised 1234 bytes would hang
        async with await up.request("HEAD", "/", "", b"", b"") as resp:
            assert (resp.status, resp.content_length) == (200, 1234)
            assert await resp.read() == b""
    await eventually(lambda: server.active == 0)  # the client hung up
    assert up.open_connections == 0

    async with asyncio.timeout(3):
        resp, _ = await fetch(up, "HEAD")
    assert resp.status == 200
    assert server.connections == 2


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
        # A 304 may give the resource's Content-Length; no body follows it all the same.
        b'HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\nETag: "e"\r\n\r\n',
    ],
    ids=["204", "304"],
)
async def test_bodiless_statuses_end_at_the_head_and_keep_the_connection(
    serve: Serve, connect: Connect, answer: bytes
) -> None:
    server = await serve(answering(answer, response(b"after")))
    up = await connect(server.url)

    async with asyncio.timeout(3):
        resp, body = await fetch(up)
    assert resp.status in (204, 304)
    assert body == b""
    resp, body = await fetch(up)
    assert (resp.status, body) == (200, b"after")  # the next answer parsed cleanly
    assert server.connections == 1


async def test_100_continue_before_the_answer_is_skipped(serve: Serve, connect: Connect) -> None:
    async def handle(server: RawServer, reader: Reader, w: Writer) -> None:
        while await server.read_request(reader) is not None:
            w.write(b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n")
            await w.drain()
            await asyncio.sleep(0.05)  # the interim answer arrives on its own
            w.write(response(b"final", "201 Created", [("X-Final", "yes")]))
            await w.drain()

    server = await serve(handle)
    up = await connect(server.url)
    for _ in range(2):
        resp, body = await fetch(up, "POST", body=b"data")
        assert (resp.status, resp.reason, body) == (201, "Created", b"final")
        assert resp.headers["X-Final"] == "yes"
        assert "X-Interim" not in resp.headers
    assert server.connections == 1


# -- connections that go away -------------------------------------------------------------------


async def test_idle_connection_closed_by_server_is_replaced(serve: Serve, connect: Connect) -> None:
    async def handle(server: RawServer, reader: Reader, w: Writer) -> None:
        if await server.read_request(reader) is not None:
            w.write(response(b"once"))  # keep-alive promised, then closed anyway
            await w.drain()

    server = await serve(handle)
    up = await connect(server.url)
    resp, body = await fetch(up)
    assert body == b"once"
    await eventually(lambda: up.open_connections == 0)  # the close was noticed

    resp, body = await fetch(up)
    assert (resp.status, body) == (200, b"once")
    assert server.connections == 2


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_connection_dropped_as_the_next_request_arrives(
    serve: Serve, connect: Connect, method: str
) -> None:
    """The keep-alive race: the server closes an idle connection just as a request goes
    out on it. The client says so (StaleConnection) and never resends on its own: the
    retry policy decides, and its next attempt asks for a fresh connection."""

    async def handle(server: RawServer, reader: Reader, w: Writer) -> None:
        if server.connections == 1:
            await server.read_request(reader)
            w.write(response(b"first"))
            await w.drain()
            await server.read_request(reader)  # the second request: dropped unanswered
            return
        await server.read_request(reader)
        w.write(response(b"again"))
        await w.drain()
        await server.until_closed_by_client(reader)

    server = await serve(handle)
    up = await connect(server.url)
    assert (await fetch(up))[1] == b"first"
    with pytest.raises(StaleConnection, match="without answering"):
        await fetch(up, method)
    assert server.connections == 1
    resp = await up.request(method, "/", "", b"", b"", fresh=True)
    async with resp:
        assert (resp.status, await resp.read()) == (200, b"again")
    assert server.connections == 2


async def test_idle_connections_are_closed_after_idle_timeout(
    serve: Serve, connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream_module, "IDLE_TIMEOUT", 0.2)

    async def handle(server: RawServer, reader: Reader, w: Writer) -> None:
        await server.read_request(reader)
        w.write(response())
        await w.drain()
        await server.until_closed_by_client(reader)

    server = await serve(handle)
    up = await connect(server.url)
    await fetch(up)
    assert up.open_connections == 1
    await asyncio.wait_for(server.client_closed[0].wait(), 3)
    await eventually(lambda: up.open_connections == 0)
    resp, _ = await fetch(up)
    assert resp.status == 200
    assert server.connections == 2


async def test_close_without_answer_is_unreachable(serve: Serve, connect: Connect) -> None:
    async def handle(server: RawServer, reader: Reader, w: Writer) -> None:
        await server.read_request(reader)

    server = await serve(handle)
    up = await connect(server.url)
    with pytest.raises(UpstreamUnreachable, match="closed the connection without answering"):
        await up.request("GET", "/", "", b"", b"")
    assert up.open_connections == 0


async def test_body_cut_short_is_unreachable(serve: Serve, connect: Connect) -> None:
    cut = response(b"0123456789" * 10, headers=[("Connection", "close")])[:-90]
    server = await serve(answering(cut))  # 10 bytes of 100, then the server hangs up
    up = await connect(server.url)

    async with await up.request("GET", "/", "", b"", b"") as resp:
        assert resp.content_length == 100
        with pytest.raises(UpstreamUnreachable, match="broken response body"):
            await resp.read()
    async with await up.request("GET", "/", "", b"", b"") as resp:
        with pytest.raises(UpstreamUnreachable, match="broken response body"):
            while await resp.readany():
                pass
    assert up.open_connections == 0


async def test_garbage_instead_of_http_is_a_bad_response(serve: Serve, connect: Connect) -> None:
    server = await serve(answering(b"SSH-2.0-OpenSSH_9.6\r\nthis is not HTTP\r\n\r\n"))
    up = await connect(server.url)
    with pytest.raises(UpstreamBadResponse, match="invalid HTTP response"):
        await up.request("GET", "/", "", b"", b"")
    assert up.open_connections == 0


async def test_unexpected_protocol_switch_is_a_bad_response(serve: Serve, connect: Connect) -> None:
    switch = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    server = await serve(answering(switch))
    up = await connect(server.url)
    with pytest.raises(UpstreamBadResponse, match="switched protocols"):
        await asyncio.wait_for(up.request("GET", "/", "", b"", b""), 3)


# -- timeouts -----------------------------------------------------------------------------------


async def silent(server: RawServer, reader: Reader, w: Writer) -> None:
    """Read the request, never answer."""
    await server.read_request(reader)
    await server.until_closed_by_client(reader)


async def test_no_answer_within_read_timeout(serve: Serve, connect: Connect) -> None:
    server = await serve(silent)
    up = await connect(server.url, read_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout, match="did not answer in time"):
        await up.request("GET", "/", "", b"", b"")
    assert 0.25 < time.monotonic() - started < 3
    await asyncio.wait_for(server.client_closed[0].wait(), 3)  # the connection was given up
    assert up.open_connections == 0


async def test_silence_mid_body_times_out(serve: Serve, connect: Connect) -> None:
    async def handle(server: RawServer, reader: Reader, w: Writer) -> None:
        await server.read_request(reader)
        w.write(response(b"x" * 100)[:-90])
        await w.drain()
        await server.until_closed_by_client(reader)

    server = await serve(handle)
    up = await connect(server.url, read_timeout=0.3)
    async with await up.request("GET", "/", "", b"", b"") as resp:
        assert resp.status == 200
        got = b""
        with pytest.raises(UpstreamTimeout):
            while piece := await resp.readany():
                got += piece
    assert got == b"x" * 10
    await asyncio.wait_for(server.client_closed[0].wait(), 3)


async def test_connection_refused_is_connect_failed(connect: Connect) -> None:
    up = await connect(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConnectFailed, match="cannot connect to"):
        await up.request("GET", "/", "", b"", b"")
    assert up.open_connections == 0


async def test_tls_handshake_that_never_ends_is_connect_timeout(
    serve: Serve, connect: Connect
) -> None:
    server = await serve(silent)  # plain TCP: a TLS ClientHello gets no answer
    up = await connect(server.url.replace("http:", "https:"), connect_timeout=0.3)
    with pytest.raises(ConnectFailed, match="timed out"):
        await asyncio.wait_for(up.request("GET", "/", "", b"", b""), 3)
    assert up.open_connections == 0


# -- the pool -----------------------------------------------------------------------------------


async def test_pool_size_caps_simultaneous_connections(serve: Serve, connect: Connect) -> None:
    async def slow(server: RawServer, reader: Reader, w: Writer) -> None:
        while await server.read_request(reader) is not None:
            await asyncio.sleep(0.2)
            w.write(response(b"slow"))
            await w.drain()

    server = await serve(slow)
    up = await connect(server.url, pool_size=2)
    results = await asyncio.wait_for(asyncio.gather(*(fetch(up) for _ in range(5))), 5)
    assert [(r.status, body) for r, body in results] == [(200, b"slow")] * 5
    assert server.max_active <= 2
    assert server.connections == 2  # both kept alive and reused for the other three
    assert up.open_connections == 2


async def test_cancelled_request_closes_its_connection(serve: Serve, connect: Connect) -> None:
    arrived = asyncio.Event()

    async def handle(server: RawServer, reader: Reader, w: Writer) -> None:
        if server.connections == 1:  # the first request never gets an answer
            await server.read_request(reader)
            arrived.set()
            await server.until_closed_by_client(reader)
            return
        await answering(response(b"fresh"))(server, reader, w)

    server = await serve(handle)
    up = await connect(server.url)
    task = asyncio.create_task(up.request("GET", "/slow", "", b"", b""))
    await asyncio.wait_for(arrived.wait(), 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert up.open_connections == 0
    await asyncio.wait_for(server.client_closed[0].wait(), 3)

    resp, body = await fetch(up)
    assert (resp.status, body) == (200, b"fresh")
    assert server.connections == 2


@pytest.mark.parametrize("arrived", ["all", "part"])
async def test_release_before_body_is_read_closes_connection(
    serve: Serve, connect: Connect, arrived: str
) -> None:
    body = b"y" * 1000
    first = response(body) if arrived == "all" else response(body)[:-500]
    server = await serve(answering(first, response(b"next")))
    up = await connect(server.url)

    resp = await up.request("GET", "/", "", b"", b"")
    await asyncio.sleep(0.05)  # whatever is coming has arrived
    resp.release()  # unread bytes: the connection cannot carry another exchange
    assert await resp.readany() == b""
    assert up.open_connections == 0

    resp, got = await fetch(up)
    assert got == b"next"
    assert server.connections == 2


# -- large bodies -------------------------------------------------------------------------------


async def hash_of_body(server: RawServer, reader: Reader, w: Writer) -> None:
    """Answer each request with its body's length and sha256."""
    while (request := await server.read_request(reader)) is not None:
        digest = hashlib.sha256(request.body).hexdigest()
        w.write(response(f"{len(request.body)} {digest}".encode()))
        await w.drain()


async def test_large_request_body_arrives_intact(serve: Serve, connect: Connect) -> None:
    payload = bytes(range(256)) * (3 * MiB // 256) + b"tail"
    server = await serve(hash_of_body)
    up = await connect(server.url)
    resp, body = await fetch(up, "PUT", "/big", body=payload)
    assert resp.status == 200
    assert body.decode() == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}"
    assert server.requests[0].header("content-length") == [str(len(payload))]
    _, body = await fetch(up, "POST", body=b"small")  # the connection is still in step
    assert body.decode().startswith("5 ")
    assert server.connections == 1


async def test_large_response_streams_with_a_slow_reader(serve: Serve, connect: Connect) -> None:
    payload = hashlib.sha256(b"seed").digest() * (5 * MiB // 32)

    async def handle(server: RawServer, reader: Reader, w: Writer) -> None:
        while await server.read_request(reader) is not None:
            w.write(head_only(response(payload)))
            for start in range(0, len(payload), 64 * 1024):
                w.write(payload[start : start + 64 * 1024])
                await w.drain()

    server = await serve(handle)
    # The pauses below are longer than read_timeout: a reader that stops reading makes the
    # server go quiet, which must not count as the server's silence.
    up = await connect(server.url, read_timeout=0.3)
    async with await up.request("GET", "/big", "", b"", b"") as resp:
        assert resp.content_length == len(payload)
        digest = hashlib.sha256()
        pieces = 0
        while piece := await resp.readany():
            pieces += 1
            digest.update(piece)
            if pieces in (1, 3):
                await asyncio.sleep(0.5)
    assert digest.digest() == hashlib.sha256(payload).digest()
    assert pieces > 10
    resp, body = await fetch(up)
    assert len(body) == len(payload)
    assert server.connections == 1


# -- TLS ----------------------------------------------------------------------------------------


async def test_tls_with_ca_file(
    serve: Serve, connect: Connect, server_ssl: ssl.SSLContext, ca_file: str
) -> None:
    server = await serve(answering(response(b"secure")), tls=server_ssl)
    up = await connect(server.url, ca_file=ca_file)
    for _ in range(2):
        resp, body = await fetch(up)
        assert (resp.status, body) == (200, b"secure")
    assert server.connections == 1


async def test_tls_certificate_from_unknown_ca_is_refused(
    serve: Serve, connect: Connect, server_ssl: ssl.SSLContext
) -> None:
    server = await serve(answering(response(b"secure")), tls=server_ssl)
    up = await connect(server.url)  # system trust store only: the test CA is unknown
    with pytest.raises(ConnectFailed, match="certificate") as caught:
        await up.request("GET", "/", "", b"", b"")
    assert isinstance(caught.value, UpstreamUnreachable)
    assert server.requests == []
    assert up.open_connections == 0


# -- uploads and HEAD: the edge cases the first version got wrong --------------------------


async def test_head_body_read_after_read_timeout_is_still_empty(
    serve: Serve, connect: Connect
) -> None:
    """A HEAD answer is complete at its head; reading its (empty) body later cannot time out."""
    server = await serve(answering(head_only(response(b"x" * 1234))))
    up = await connect(server.url, read_timeout=0.3)
    async with await up.request("HEAD", "/", "", b"", b"") as resp:
        await asyncio.sleep(0.6)  # the caller is busy with the head for a while
        assert await resp.read() == b""


async def test_upload_to_server_that_stops_reading_still_times_out(
    serve: Serve, connect: Connect
) -> None:
    """A server that neither reads the body nor answers must not hang the request forever."""

    async def handle(server: RawServer, reader: Reader, w: Writer) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(60)  # reads nothing more, answers nothing

    server = await serve(handle)
    up = await connect(server.url, read_timeout=0.3)
    with pytest.raises(UpstreamTimeout):
        await asyncio.wait_for(up.request("POST", "/", "", b"", b"z" * (16 * MiB)), 2)


async def test_early_answer_during_upload_is_returned(serve: Serve, connect: Connect) -> None:
    """An answer that comes before the body is taken (413, say) ends the exchange."""

    async def handle(server: RawServer, reader: Reader, w: Writer) -> None:
        await reader.readuntil(b"\r\n\r\n")
        w.write(response(b"too big", "413 Payload Too Large", [("Connection", "close")]))
        await w.drain()
        await asyncio.sleep(60)  # and reads no more of the body

    server = await serve(handle)
    up = await connect(server.url, read_timeout=0.3)
    resp = await asyncio.wait_for(up.request("POST", "/", "", b"", b"z" * (16 * MiB)), 2)
    resp.release()
    assert resp.status == 413


async def test_slow_but_steady_upload_is_not_upstream_silence(
    serve: Serve, connect: Connect
) -> None:
    """Time spent sending the body, with the server taking it, is not the server's silence."""

    async def handle(server: RawServer, reader: Reader, w: Writer) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(Request(head, b"").header("content-length")[0])
        taken = 0
        slow_until = time.monotonic() + 1.2  # a slow link for 1.2 s, then full speed
        while time.monotonic() < slow_until:
            taken += len(await reader.read(256 * 1024))
            await asyncio.sleep(0.03)
        await reader.readexactly(length - taken)  # 32 MiB: far from all of it got through
        w.write(response(b"stored"))
        await w.drain()
        await server.until_closed_by_client(reader)

    server = await serve(handle)
    up = await connect(server.url, read_timeout=0.5)
    resp, body = await asyncio.wait_for(fetch(up, "POST", body=b"u" * (32 * MiB)), 5)
    assert (resp.status, body) == (200, b"stored")


# -- one request, one answer: trailers, what follows an answer, the head cap ----------------

TRAILED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\nSet-Cookie: s=1\r\n\r\n"
)


async def test_trailers_arriving_with_the_answer_never_become_headers(
    serve: Serve, connect: Connect
) -> None:
    server = await serve(answering(TRAILED))
    up = await connect(server.url)
    for _ in range(2):
        resp, body = await fetch(up)
        assert body == b"hello"
        assert "X-Checksum" not in resp.headers
        assert "Set-Cookie" not in resp.headers
        assert [n for n, _ in resp.raw_headers] == [b"Transfer-Encoding"]
    assert server.connections == 1  # trailers are a clean end: the connection is kept


async def test_many_trailer_fields_over_the_cap_are_refused(serve: Serve, connect: Connect) -> None:
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 100) for i in range(40))  # ~4.4 KiB
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
    server = await serve(answering(answer + trailers + b"\r\n"))
    up = await connect(server.url, max_header_bytes=2048)
    async with await up.request("GET", "/", "", b"", b"") as resp:
        with pytest.raises(UpstreamBadResponse, match=r"trailers .*over 2048 bytes"):
            await resp.read()
    assert up.open_connections == 0


async def test_one_endless_trailer_field_is_refused_without_holding_it(
    serve: Serve, connect: Connect
) -> None:
    """A field httptools gathers whole before reporting it: cut off by the read count."""
    written = 0

    async def handle(server: RawServer, reader: Reader, w: Writer) -> None:
        nonlocal written
        await server.read_request(reader)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Big: ")
        for _ in range(640):  # 40 MiB, unless the client hangs up first
            w.write(b"v" * (64 * 1024))
            await w.drain()
            written += 64 * 1024

    server = await serve(handle)
    up = await connect(server.url, max_header_bytes=4096)
    async with await up.request("GET", "/", "", b"", b"") as resp:
        with pytest.raises(UpstreamBadResponse, match=r"trailers .*over 4096 bytes"):
            await resp.read()
    await eventually(lambda: server.active == 0)
    assert written < 16 * MiB  # what the socket buffers took before the client hung up


async def test_an_endless_chunk_extension_is_refused(serve: Serve, connect: Connect) -> None:
    """llhttp skips extensions without keeping them; still, bytes that never become body
    are bounded like trailers, so such an answer cannot run forever."""

    async def handle(server: RawServer, reader: Reader, w: Writer) -> None:
        await server.read_request(reader)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n5;ext=")
        for _ in range(1000):
            w.write(b"e" * (16 * 1024))
            await w.drain()

    server = await serve(handle)
    up = await connect(server.url, max_header_bytes=4096)
    async with await up.request("GET", "/", "", b"", b"") as resp:
        with pytest.raises(UpstreamBadResponse, match="chunk framing"):
            await resp.read()


async def test_two_answers_in_one_write_give_the_first_and_discard_the_connection(
    serve: Serve, connect: Connect
) -> None:
    two = response(b"first", headers=[("X-First", "1")]) + response(
        b"second", "201 Created", [("X-Second", "2")]
    )
    server = await serve(answering(two))
    up = await connect(server.url)
    resp, body = await fetch(up)
    assert (resp.status, body) == (200, b"first")
    assert resp.headers["X-First"] == "1"
    assert "X-Second" not in resp.headers
    resp, body = await fetch(up)
    assert (resp.status, body) == (200, b"first")  # never the surplus answer
    assert server.connections == 2


async def test_a_second_answer_arriving_later_discards_the_connection(
    serve: Serve, connect: Connect
) -> None:
    async def handle(server: RawServer, reader: Reader, w: Writer) -> None:
        while await server.read_request(reader) is not None:
            w.write(response(b"first"))
            await asyncio.sleep(0.05)
            w.write(response(b"second"))
            await w.drain()

    server = await serve(handle)
    up = await connect(server.url)
    async with await up.request("GET", "/", "", b"", b"") as resp:
        await asyncio.sleep(0.2)  # the surplus answer arrives while this one is held
        assert await resp.read() == b"first"
    resp, body = await fetch(up)
    assert body == b"first"
    assert server.connections == 2


async def test_junk_after_a_complete_answer_keeps_the_answer(
    serve: Serve, connect: Connect
) -> None:
    """The API carried the POST out and answered: junk after that is no reason for a 502."""
    server = await serve(answering(response(b'{"id":7}', "201 Created") + b"\x00junk\r\n"))
    up = await connect(server.url)
    resp, body = await fetch(up, "POST", body=b"{}")
    assert (resp.status, body) == (201, b'{"id":7}')
    resp, body = await fetch(up, "POST", body=b"{}")
    assert (resp.status, body) == (201, b'{"id":7}')
    assert server.connections == 2


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 204 No Content\r\n\r\nxyz",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 3\r\n\r\nxyz",
    ],
    ids=["204", "304"],
)
async def test_stray_bytes_after_a_bodiless_answer_discard_the_connection(
    serve: Serve, connect: Connect, answer: bytes
) -> None:
    server = await serve(answering(answer))
    up = await connect(server.url)
    for _ in range(2):
        async with asyncio.timeout(3):
            resp, body = await fetch(up)
        assert (resp.status in (204, 304), body) == (True, b"")
    assert server.connections == 2


async def test_bytes_after_a_head_answer_are_not_its_body(serve: Serve, connect: Connect) -> None:
    server = await serve(answering(response(b"hello")))  # a body HEAD must not have
    up = await connect(server.url)
    async with asyncio.timeout(3):
        resp, body = await fetch(up, "HEAD")
    assert (resp.status, resp.content_length, body) == (200, 5, b"")
    await eventually(lambda: server.active == 0)


async def test_interim_answers_in_the_same_write_are_skipped(
    serve: Serve, connect: Connect
) -> None:
    interim = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
    )
    server = await serve(answering(interim + response(b"final", "201 Created")))
    up = await connect(server.url)
    resp, body = await fetch(up, "POST", body=b"x")
    assert (resp.status, resp.reason, body) == (201, "Created", b"final")
    assert "Link" not in resp.headers
    await fetch(up, "POST", body=b"x")
    assert server.connections == 1


async def test_an_endless_run_of_interim_answers_is_refused(serve: Serve, connect: Connect) -> None:
    async def handle(server: RawServer, reader: Reader, w: Writer) -> None:
        await server.read_request(reader)
        for _ in range(10_000):
            w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n")
            await w.drain()

    server = await serve(handle)
    up = await connect(server.url, max_header_bytes=4096)
    with pytest.raises(UpstreamBadResponse, match="head over 4096 bytes"):
        await up.request("GET", "/", "", b"", b"")


async def test_a_huge_head_is_refused_without_reading_it_all(
    serve: Serve, connect: Connect
) -> None:
    written = 0

    async def handle(server: RawServer, reader: Reader, w: Writer) -> None:
        nonlocal written
        await server.read_request(reader)
        w.write(b"HTTP/1.1 200 OK\r\n")
        line = b"X-Filler: " + b"f" * 1000 + b"\r\n"
        for _ in range(40_000):  # 40 MB of header lines, unless the client hangs up first
            w.write(line * 64)
            await w.drain()
            written += len(line) * 64

    server = await serve(handle)
    up = await connect(server.url)
    with pytest.raises(UpstreamBadResponse, match="head over 65536 bytes"):
        await up.request("GET", "/", "", b"", b"")
    await eventually(lambda: server.active == 0)
    assert up.open_connections == 0
    assert written < 16 * MiB


@pytest.mark.parametrize("extra", [0, 1], ids=["at-the-cap", "one-over"])
async def test_head_cap_boundary(serve: Serve, connect: Connect, extra: int) -> None:
    base = response(b"", headers=[("X-Pad", "")])
    pad = 2048 - len(base) + extra
    head = response(b"", headers=[("X-Pad", "p" * pad)])
    assert len(head) == 2048 + extra
    # The body in the same write: the read is split at the cap, the body still arrives.
    answer = head.replace(b"Content-Length: 0", b"Content-Length: 4") + b"body"
    server = await serve(answering(answer))
    up = await connect(server.url, max_header_bytes=2048)
    if extra:
        with pytest.raises(UpstreamBadResponse, match="head over"):
            await fetch(up)
    else:
        resp, body = await fetch(up)
        assert (resp.status, body) == (200, b"body")


@pytest.mark.parametrize(
    "status_line",
    [b"HTTP/1.1 099 Odd", b"HTTP/1.1 600 Odd", b"HTTP/2.0 200 OK", b"HTTP/0.9 200 OK"],
)
async def test_status_lines_outside_http_1_are_bad_responses(
    serve: Serve, connect: Connect, status_line: bytes
) -> None:
    server = await serve(answering(status_line + b"\r\nContent-Length: 2\r\n\r\nok"))
    up = await connect(server.url)
    with pytest.raises(UpstreamBadResponse, match="invalid status line"):
        await up.request("GET", "/", "", b"", b"")
    assert up.open_connections == 0


async def test_transfer_encoding_wins_over_content_length_and_the_connection_goes(
    serve: Serve, connect: Connect
) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    server = await serve(answering(answer))
    up = await connect(server.url)
    for _ in range(2):
        resp, body = await fetch(up)
        assert (resp.content_length, body) == (None, b"hello")
    assert server.connections == 2


@pytest.mark.parametrize("coding", ["gzip", "gzip, chunked", "chunked, gzip", "chunked, chunked"])
async def test_transfer_codings_other_than_chunked_are_bad_responses(
    serve: Serve, connect: Connect, coding: str
) -> None:
    answer = f"HTTP/1.1 200 OK\r\nTransfer-Encoding: {coding}\r\n\r\n0\r\n\r\n".encode()
    server = await serve(answering(answer))
    up = await connect(server.url)
    with pytest.raises(UpstreamBadResponse, match="only chunked"):
        await up.request("GET", "/", "", b"", b"")


@pytest.mark.parametrize(
    "lengths",
    [["3", "4"], ["3", "3"], ["-1"], ["3, 3"], ["+3"], ["0x3"]],
    ids=["differing", "repeated", "negative", "list", "signed", "hex"],
)
async def test_invalid_content_length_is_a_bad_response(
    serve: Serve, connect: Connect, lengths: list[str]
) -> None:
    head = "".join(f"Content-Length: {n}\r\n" for n in lengths)
    server = await serve(answering(f"HTTP/1.1 200 OK\r\n{head}\r\nabcd".encode()))
    up = await connect(server.url)
    with pytest.raises(UpstreamBadResponse, match="invalid HTTP response"):
        await up.request("GET", "/", "", b"", b"")
