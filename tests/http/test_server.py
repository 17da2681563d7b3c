"""The proxy listener (proxy/listener.py) alone, with small handlers, over real sockets.

Clients here are raw asyncio streams that write exact bytes and parse the answers
themselves (conftest's `raw_exchange` reads one answer and hangs up, too little for
keep-alive and pipelining), plus aiohttp's client and curl where a real client matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import eventually
from multidict import CIMultiDict
from structlog.testing import capture_logs

from proxy.errors import Forbidden, ProxyError
from proxy.http import server as listener_module
from proxy.http.server import (
    HEADER_BYTES_FACTOR,
    LINGER_SECONDS,
    PIPELINE_MAX,
    Handler,
    Listener,
    Request,
    error_headers,
    request_id,
)

MiB = 1024 * 1024
MAX_HEADER = 1024  # the smallest listen.max_header_bytes the config allows
MARKER = b"SECRET-MARKER"  # put in bad input; must never come back in an answer

# A hung socket should fail its test quickly, not eat the suite's 120 s default.
pytestmark = pytest.mark.timeout(30)


# -- answers, parsed from raw bytes --------------------------------------------------------------


@dataclass
class Answer:
    status: int
    head: bytes  # the exact bytes of the status line and headers
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def read_answer(reader: asyncio.StreamReader, *, bodiless: bool = False) -> Answer:
    """One answer, framed as its head says: Content-Length, chunked, or until EOF."""
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.add(name.decode("latin-1"), value.strip().decode("latin-1"))
        if bodiless or status < 200 or status in (204, 304):
            body = b""
        elif headers.get("Transfer-Encoding") == "chunked":
            parts = []
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append(await reader.readexactly(size))
                assert await reader.readexactly(2) == b"\r\n"
            assert await reader.readuntil(b"\r\n") == b"\r\n"  # no trailers
            body = b"".join(parts)
        elif "Content-Length" in headers:
            body = await reader.readexactly(int(headers["Content-Length"]))
        else:
            body = await reader.read()  # close-delimited
    return Answer(status, head, headers, body)


def assert_error(answer: Answer, status: int, reason: str) -> dict[str, Any]:
    """The proxy's own error shape: LuxSci's JSON, the reason in X-Proxy-Error."""
    assert answer.status == status, answer.head
    assert answer.headers["X-Proxy-Error"] == reason
    assert answer.headers["Content-Type"] == "application/json"
    body: dict[str, Any] = answer.json()
    assert set(body) == {"success", "error_message"}
    assert body["success"] == 0 and isinstance(body["error_message"], str)
    return body


# -- clients -------------------------------------------------------------------------------------


@dataclass
class Client:
    """One raw connection: exact bytes out, parsed answers in."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def answer(self, *, bodiless: bool = False) -> Answer:
        return await read_answer(self.reader, bodiless=bodiless)

    async def rest(self, within: float = 3.0) -> bytes:
        """Everything until the server closes (EOF or reset); fails if it stays open."""
        data = b""
        async with asyncio.timeout(within):
            try:
                while chunk := await self.reader.read(65536):
                    data += chunk
            except ConnectionError:
                pass
        return data

    async def closed(self, within: float = 3.0) -> bool:
        """Whether the server ends the connection within `within` seconds, saying nothing more."""
        try:
            return await self.rest(within) == b""
        except TimeoutError:
            return False

    def abort(self) -> None:
        self.writer.transport.abort()


Connect = Callable[..., Awaitable[Client]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Opens clients; aborts whatever a test left open."""
    clients: list[Client] = []

    async def open_client(port: int, *, rcvbuf: int | None = None) -> Client:
        sock = socket.socket()
        if rcvbuf is not None:  # before connecting, so the receive window starts small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        client = Client(reader, writer)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        client.abort()
    await asyncio.sleep(0.05)  # let both ends run connection_lost before the loop goes


# -- the listener under test ---------------------------------------------------------------------


@dataclass
class Served:
    listener: Listener
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    started: list[Listener] = []

    async def start(handler: Handler, **limits: Any) -> Served:
        settings: dict[str, Any] = {
            "max_connections": 100,
            "client_timeout": 5.0,
            "max_header_bytes": MAX_HEADER,
            **limits,
        }
        listener = Listener(handler, **settings)
        port = await listener.start("127.0.0.1", 0)
        started.append(listener)
        return Served(listener, port)

    yield start
    for listener in started:
        await listener.close(0.5)
    await asyncio.sleep(0.05)


@pytest.fixture
def short_linger(monkeypatch: pytest.MonkeyPatch) -> float:
    """A shorter linger after early answers (read at call time), to keep the suite fast."""
    monkeypatch.setattr(listener_module, "LINGER_SECONDS", 0.5)
    return 0.5


def refuse(request: Request, error: ProxyError) -> None:
    """Answer an error the way proxy/forward.py does."""
    request.respond(error.status, error_headers(error, request_id(None)), error.body())


@dataclass
class Echo:
    """A handler that reads the body within limits and answers what it saw, as JSON."""

    max_body: int = MiB
    time_limit: float = 2.0
    seen: list[Request] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    # Seconds to wait before answering, per raw path.
    delays: dict[str, float] = field(default_factory=dict)

    async def __call__(self, request: Request) -> None:
        self.seen.append(request)
        try:
            body = await request.read_body(self.max_body, self.time_limit)
        except ProxyError as e:
            refuse(request, e)
            return
        self.bodies.append(body)
        await asyncio.sleep(self.delays.get(request.raw_path, 0))
        seen = {
            "method": request.method,
            "path": request.raw_path,
            "version": list(request.version),
            "body": body.decode("latin-1"),
        }
        request.respond(200, [("Content-Type", "application/json")], json.dumps(seen).encode())


def get(path: str = "/", *extra: str, version: str = "1.1") -> bytes:
    lines = [f"GET {path} HTTP/{version}", "Host: test", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post(path: str, body: bytes, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# -- keep-alive, pipelining, HTTP/1.0 ------------------------------------------------------------


async def test_keep_alive_answers_three_requests_in_order_on_one_connection(
    serve: Serve, connect: Connect
) -> None:
    echo = Echo()
    served = await serve(echo)
    client = await connect(served.port)
    first_conn: set[Any] = set()
    for n in range(3):
        client.send(get(f"/{n}"))
        answer = await client.answer()
        assert (answer.status, answer.json()["path"]) == (200, f"/{n}")
        assert "Connection" not in answer.headers  # HTTP/1.1: keep-alive goes without saying
        if n == 0:
            first_conn = set(served.listener.connections)
        assert set(served.listener.connections) == first_conn and len(first_conn) == 1
    assert [r.raw_path for r in echo.seen] == ["/0", "/1", "/2"]
    assert all(r.keep_alive for r in echo.seen)


async def test_pipelined_requests_in_one_write_are_answered_whole_and_in_order(
    serve: Serve, connect: Connect
) -> None:
    echo = Echo(delays={"/slow": 0.3})  # the first is slow: the others must wait their turn
    served = await serve(echo)
    client = await connect(served.port)
    client.send(get("/slow") + post("/post", b"hello pipelined body") + get("/third"))
    answers = [await client.answer() for _ in range(3)]
    assert [a.json()["path"] for a in answers] == ["/slow", "/post", "/third"]
    assert [a.json()["body"] for a in answers] == ["", "hello pipelined body", ""]
    assert all(a.status == 200 and "Connection" not in a.headers for a in answers)
    assert echo.bodies == [b"", b"hello pipelined body", b""]
    client.send(get("/after"))  # the connection is still in step
    assert (await client.answer()).json()["path"] == "/after"


async def test_http_1_0_closes_unless_keep_alive_is_asked_for(
    serve: Serve, connect: Connect
) -> None:
    served = await serve(Echo())
    plain = await connect(served.port)
    plain.send(get("/", version="1.0"))
    answer = await plain.answer()
    assert answer.json()["version"] == [1, 0]
    assert answer.headers["Connection"] == "close"
    assert await plain.closed()

    kept = await connect(served.port)
    for path in ("/1", "/2"):
        kept.send(get(path, "Connection: keep-alive", version="1.0"))
        answer = await kept.answer()
        assert answer.json()["path"] == path
        assert answer.headers["Connection"] == "keep-alive"  # 1.0 needs to be told
    assert len(served.listener.connections) == 1  # `plain` is gone, `kept` stays


async def test_connection_close_from_an_http_1_1_client_ends_the_connection(
    serve: Serve, connect: Connect
) -> None:
    served = await serve(Echo())
    client = await connect(served.port)
    client.send(get("/", "Connection: close"))
    answer = await client.answer()
    assert answer.status == 200
    assert answer.headers["Connection"] == "close"
    assert await client.closed()


# -- request bodies ------------------------------------------------------------------------------


async def test_content_length_and_chunked_bodies_arrive_whole(
    serve: Serve, connect: Connect
) -> None:
    echo = Echo()
    served = await serve(echo)
    client = await connect(served.port)
    body = os.urandom(100_000)
    client.send(post("/sized", body))
    assert (await client.answer()).status == 200

    parts = [b"first,", b"second " * 50, b"x" * 70_000, b"last"]
    client.send(b"POST /chunked HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n")
    for part in parts:  # separate writes with pauses: the handler is already waiting
        await asyncio.sleep(0.05)
        client.send(chunk(part))
    client.send(b"0\r\n\r\n")
    answer = await client.answer()
    assert answer.json()["body"].encode("latin-1") == b"".join(parts)
    assert echo.bodies == [body, b"".join(parts)]
    assert "Connection" not in answer.headers  # whole body read: keep-alive


async def test_declared_length_over_the_limit_is_refused_413_without_reading(
    serve: Serve, connect: Connect
) -> None:
    served = await serve(Echo(max_body=100))
    client = await connect(served.port)
    # Head only: the answer cannot depend on a body that never comes.
    client.send(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 101\r\n\r\n")
    answer = await client.answer()
    message = assert_error(answer, 413, "body_too_large")["error_message"]
    assert "101 bytes" in message
    assert answer.headers["Connection"] == "close"


async def test_chunked_body_over_the_limit_is_refused_413(serve: Serve, connect: Connect) -> None:
    served = await serve(Echo(max_body=100))
    client = await connect(served.port)
    client.send(b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n")
    client.send(chunk(b"a" * 60))
    await asyncio.sleep(0.05)
    client.send(chunk(b"b" * 60) + b"0\r\n\r\n")
    assert_error(await client.answer(), 413, "body_too_large")


async def test_a_body_dribbled_slower_than_the_time_limit_gets_408(
    serve: Serve, connect: Connect, short_linger: float
) -> None:
    served = await serve(Echo(time_limit=0.3))
    client = await connect(served.port)
    client.send(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n")

    async def dribble() -> None:
        for _ in range(20):
            client.send(b"x")
            await asyncio.sleep(0.1)

    dribbler = asyncio.create_task(dribble())
    try:
        started = time.monotonic()
        assert_error(await client.answer(), 408, "client_timeout")
        assert time.monotonic() - started < 1.5
    finally:
        dribbler.cancel()


async def test_expect_100_continue_invites_the_body_only_when_its_size_is_acceptable(
    serve: Serve, connect: Connect
) -> None:
    served = await serve(Echo(max_body=100))
    client = await connect(served.port)
    client.send(
        b"POST /ok HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    # Nothing of the body is sent until the invitation arrives.
    interim = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 3)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    client.send(b"hello")
    answer = await client.answer()
    assert (answer.status, answer.json()["body"]) == (200, "hello")

    big = await connect(served.port)
    big.send(
        b"POST /big HTTP/1.1\r\nHost: test\r\nContent-Length: 101\r\nExpect: 100-continue\r\n\r\n"
    )
    answer = await big.answer()  # the first thing to arrive
    assert_error(answer, 413, "body_too_large")
    big.abort()


async def curl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-v", "--max-time", "10", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_curl_with_expect_100_continue_is_invited_or_refused_by_size(
    serve: Serve, tmp_path: Path
) -> None:
    echo = Echo(max_body=10_000)
    served = await serve(echo)
    small = tmp_path / "small.bin"
    small.write_bytes(b"s" * 5_000)
    large = tmp_path / "large.bin"
    large.write_bytes(b"l" * 20_000)
    expect = ["-H", "Expect: 100-continue", "-H", "Content-Type: application/octet-stream"]

    code, out, err = await curl(*expect, "--data-binary", f"@{small}", served.url + "/small")
    assert code == 0, err
    assert "< HTTP/1.1 100 Continue" in err
    assert json.loads(out)["body"] == "s" * 5_000

    code, out, err = await curl(*expect, "--data-binary", f"@{large}", served.url + "/large")
    assert code == 0, err
    assert "100 Continue" not in err
    assert "< HTTP/1.1 413" in err
    assert json.loads(out)["success"] == 0
    assert echo.bodies == [b"s" * 5_000]  # the large body never reached the handler


async def test_an_early_answer_is_readable_while_the_body_still_arrives_then_it_closes(
    serve: Serve, connect: Connect, short_linger: float
) -> None:
    async def forbid(request: Request) -> None:
        refuse(request, Forbidden("not you"))  # without reading the body

    served = await serve(forbid)
    client = await connect(served.port)
    size = 8 * MiB
    client.send(b"PUT /upload HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % size)

    uploaded = 0

    async def upload() -> None:
        """64 KiB every 20 ms: still sending long after the linger ends."""
        nonlocal uploaded
        try:
            for _ in range(size // 65536):
                client.send(b"u" * 65536)
                await client.writer.drain()
                uploaded += 65536
                await asyncio.sleep(0.02)
        except ConnectionError:
            pass

    uploader = asyncio.create_task(upload())
    try:
        answer = await client.answer()
        answered = time.monotonic()
        assert_error(answer, 403, "forbidden")
        assert answer.headers["Connection"] == "close"
        assert await client.closed(within=short_linger + 3)
        lingered = time.monotonic() - answered
        assert short_linger * 0.5 < lingered < short_linger + 2
        assert uploaded < size // 2  # closed by the linger's end, not by the body's
    finally:
        uploader.cancel()
        await asyncio.gather(uploader, return_exceptions=True)


async def test_after_an_early_answer_the_connection_closes_once_the_body_is_in(
    serve: Serve, connect: Connect
) -> None:
    async def forbid(request: Request) -> None:
        refuse(request, Forbidden("not you"))

    served = await serve(forbid)
    client = await connect(served.port)
    client.send(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 300000\r\n\r\n")
    assert_error(await client.answer(), 403, "forbidden")
    for _ in range(3):
        await asyncio.sleep(0.05)
        client.send(b"b" * 100_000)
    sent = time.monotonic()
    assert await client.closed()
    assert time.monotonic() - sent < LINGER_SECONDS / 2  # not the whole linger


# -- streamed answers ----------------------------------------------------------------------------


def streaming(parts: list[bytes], length: int | None) -> Handler:
    async def handle(request: Request) -> None:
        request.start(200, [("Content-Type", "text/plain")], length)
        for part in parts:
            await request.write(part)
        request.end()

    return handle


async def test_an_unsized_stream_is_chunked_for_http_1_1_and_aiohttp_decodes_it(
    serve: Serve,
) -> None:
    parts = [b"alpha ", b"beta " * 1000, os.urandom(50_000), b" omega"]
    served = await serve(streaming(parts, None))
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.get(served.url + "/stream") as resp:
                assert resp.status == 200
                assert resp.headers["Transfer-Encoding"] == "chunked"
                assert "Content-Length" not in resp.headers
                assert await resp.read() == b"".join(parts)
        assert len(served.listener.connections) == 1  # kept alive after a chunked answer


async def test_an_unsized_stream_to_http_1_0_is_delimited_by_closing(
    serve: Serve, connect: Connect
) -> None:
    parts = [b"one ", b"two ", b"three"]
    served = await serve(streaming(parts, None))
    client = await connect(served.port)
    client.send(get("/", "Connection: keep-alive", version="1.0"))
    answer = await client.answer()
    assert "Transfer-Encoding" not in answer.headers and "Content-Length" not in answer.headers
    assert answer.headers["Connection"] == "close"
    assert answer.body == b"one two three"  # read until EOF


async def test_a_sized_stream_sends_content_length_and_keeps_the_connection(
    serve: Serve, connect: Connect
) -> None:
    parts = [b"0123456789", b"abcdef"]
    served = await serve(streaming(parts, 16))
    client = await connect(served.port)
    for _ in range(2):
        client.send(get())
        answer = await client.answer()
        assert answer.headers["Content-Length"] == "16"
        assert "Transfer-Encoding" not in answer.headers
        assert answer.body == b"0123456789abcdef"


async def test_a_large_stream_to_a_slow_reader_waits_for_it_and_loses_nothing(
    serve: Serve, connect: Connect
) -> None:
    size, piece = 8 * MiB, 64 * 1024
    data = os.urandom(size)
    progress = {"read": 0, "read_when_written": -1}

    async def handle(request: Request) -> None:
        request.start(200, [], size)
        for offset in range(0, size, piece):
            await request.write(data[offset : offset + piece])
        progress["read_when_written"] = progress["read"]
        request.end()

    served = await serve(handle)
    client = await connect(served.port, rcvbuf=32 * 1024)
    client.send(get())
    head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
    assert f"Content-Length: {size}".encode() in head
    digest = hashlib.sha256()
    async with asyncio.timeout(20):
        while progress["read"] < size:
            got = await client.reader.read(64 * 1024)
            assert got, "closed early"
            digest.update(got)
            progress["read"] += len(got)
            await asyncio.sleep(0.001)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    # With backpressure the writer finished only once most of it had been read; without it
    # all 8 MiB would sit in the transport's buffer before the reader had read anything.
    assert progress["read_when_written"] > 1 * MiB


async def test_head_via_respond_head_sends_the_length_but_no_body(
    serve: Serve, connect: Connect
) -> None:
    async def handle(request: Request) -> None:
        if request.method == "HEAD":
            request.respond_head(200, [("Content-Type", "text/plain")], 1234)
        elif request.raw_path == "/nothing":
            request.respond_head(204, [], None)
        else:
            request.respond(200, [], b"next")

    served = await serve(handle)
    client = await connect(served.port)
    client.send(b"HEAD / HTTP/1.1\r\nHost: test\r\n\r\n" + get("/nothing") + get("/next"))
    head = await client.answer(bodiless=True)
    assert (head.status, head.headers["Content-Length"]) == (200, "1234")
    no_content = await client.answer()
    assert no_content.status == 204 and "Content-Length" not in no_content.headers
    # Had the HEAD answer carried a body, these bytes would not start with a status line.
    assert (await client.reader.readuntil(b"\r\n")) == b"HTTP/1.1 200 OK\r\n"


# -- input it cannot parse -----------------------------------------------------------------------


def tls_client_hello() -> bytes:
    """The first bytes a TLS client sends (its server name is in the clear)."""
    ctx = ssl.create_default_context()
    tls = ctx.wrap_bio(
        ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="secret-marker.test"
    )
    with contextlib.suppress(ssl.SSLWantReadError):  # the hello is out, the rest waits
        tls.do_handshake()
    return out.read()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"BREW /SECRET-MARKER HTTP/1.1\r\nHost: x\r\n\r\n", "unknown or malformed HTTP method"),
        (b"GET / HTTP/1.1\r\nBad Header: SECRET-MARKER\r\n\r\n", "malformed header"),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"SECRET-MARKER\r\nxx\r\n0\r\n\r\n",
            "malformed body framing",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\nTransfer-Encoding: chunked"
            b"\r\n\r\nSECRET-MARKER",
            "malformed body framing",
        ),
        (tls_client_hello(), "unknown or malformed HTTP method"),
    ],
    ids=["unknown-method", "bad-header", "bad-chunk-framing", "length-and-chunked", "tls-hello"],
)
async def test_unparseable_input_gets_the_error_shape_and_the_connection_ends(
    serve: Serve, connect: Connect, short_linger: float, data: bytes, message: str
) -> None:
    served = await serve(Echo())
    client = await connect(served.port)
    client.send(data)
    answer = await client.answer()
    assert message in assert_error(answer, 400, "bad_request")["error_message"]
    assert answer.headers["Connection"] == "close"
    assert MARKER.lower() not in answer.head.lower() + answer.body.lower()
    assert await client.closed(within=short_linger + 3)


# Each header under the limit, all of them together over HEADER_BYTES_FACTOR times it.
MEDIUM_HEADERS = [
    f"X-H{n:02}: " + "m" * 490 for n in range(MAX_HEADER * HEADER_BYTES_FACTOR // 495 + 1)
]


@pytest.mark.parametrize(
    "data",
    [
        get("/" + "a" * (MAX_HEADER + 1)),
        get("/", "X-Long: " + "a" * MAX_HEADER),
        get("/", *MEDIUM_HEADERS),
    ],
    ids=["request-line", "one-header", "all-headers"],
)
async def test_heads_over_the_size_limits_get_431(
    serve: Serve, connect: Connect, data: bytes
) -> None:
    served = await serve(Echo())
    client = await connect(served.port)
    client.send(data)
    answer = await client.answer()
    if data.startswith(b"GET /aaa"):
        # RFC 9112 3: a request-target longer than the server parses is 414, not 431.
        assert_error(answer, 414, "uri_too_long")
    else:
        assert_error(answer, 431, "headers_too_large")
    assert answer.headers["Connection"] == "close"
    assert await client.closed()


async def test_a_header_that_never_ends_gets_431_before_it_grows_unbounded(
    serve: Serve, connect: Connect
) -> None:
    served = await serve(Echo())
    client = await connect(served.port)
    client.send(b"GET / HTTP/1.1\r\nX-Endless: ")
    limit = (HEADER_BYTES_FACTOR + 1) * MAX_HEADER
    answer_task = asyncio.create_task(client.answer())
    sent = 0
    while not answer_task.done() and sent < 50 * limit:
        client.send(b"e" * 1024)  # never a CRLF
        sent += 1024
        await asyncio.sleep(0.002)
    answer = await answer_task
    assert_error(answer, 431, "headers_too_large")
    assert sent < 50 * limit  # refused along the way, not after all we had to send
    assert await client.closed()


async def test_a_parse_error_after_a_good_pipelined_request_ends_after_its_answer(
    serve: Serve, connect: Connect
) -> None:
    echo = Echo(delays={"/good": 0.1})
    served = await serve(echo)
    client = await connect(served.port)
    client.send(get("/good") + b"BREW / HTTP/1.1\r\n\r\n")
    answer = await client.answer()
    assert (answer.status, answer.json()["path"]) == (200, "/good")
    assert answer.headers["Connection"] == "close"
    assert await client.closed()
    assert [r.raw_path for r in echo.seen] == ["/good"]


async def test_every_request_before_a_parse_error_is_answered_then_it_ends(
    serve: Serve, connect: Connect
) -> None:
    echo = Echo(delays={"/1": 0.1})
    served = await serve(echo)
    client = await connect(served.port)
    client.send(get("/1") + get("/2") + get("/3", "Connection: close") + get("/4"))
    answers = [await client.answer() for _ in range(3)]
    assert [a.json()["path"] for a in answers] == ["/1", "/2", "/3"]
    assert [a.headers.get("Connection") for a in answers] == [None, None, "close"]
    assert await client.closed()


async def test_an_upgrade_request_is_answered_then_the_connection_ends(
    serve: Serve, connect: Connect
) -> None:
    served = await serve(Echo())
    client = await connect(served.port)
    client.send(get("/ws", "Connection: Upgrade", "Upgrade: websocket") + get("/never"))
    answer = await client.answer()
    assert (answer.status, answer.json()["path"]) == (200, "/ws")
    assert answer.headers["Connection"] == "close"
    assert await client.closed()


# -- connection limits and timeouts --------------------------------------------------------------


async def test_connections_over_the_cap_get_503_until_one_closes(
    serve: Serve, connect: Connect
) -> None:
    served = await serve(Echo(), max_connections=2)
    listener = served.listener
    held = [await connect(served.port) for _ in range(2)]
    await eventually(lambda: len(listener.connections) == 2)

    extra = await connect(served.port)
    answer = await extra.answer()
    assert_error(answer, 503, "too_many_connections")
    assert (answer.headers["Retry-After"], answer.headers["Connection"]) == ("1", "close")
    assert await extra.closed()
    assert len(listener.connections) == 2

    held[0].abort()
    await eventually(lambda: len(listener.connections) == 1)
    again = await connect(served.port)
    again.send(get("/again"))
    assert (await again.answer()).json()["path"] == "/again"
    held[1].send(get("/held"))  # the ones within the cap were served all along
    assert (await held[1].answer()).status == 200


async def test_a_connection_that_sends_no_head_is_closed_after_client_timeout(
    serve: Serve, connect: Connect
) -> None:
    served = await serve(Echo(), client_timeout=0.3)
    silent = await connect(served.port)
    slow = await connect(served.port)
    started = time.monotonic()
    slow.send(b"GET / HTTP/1.1\r\n")  # a head that is never finished

    async def trickle() -> None:
        for _ in range(30):
            await asyncio.sleep(0.05)
            slow.send(b"X-Slow: 1\r\n")

    trickler = asyncio.create_task(trickle())
    try:
        assert await silent.closed(within=2)
        assert await slow.closed(within=2)
        assert 0.25 < time.monotonic() - started < 2
    finally:
        trickler.cancel()


async def test_an_idle_kept_alive_connection_is_closed_after_client_timeout(
    serve: Serve, connect: Connect
) -> None:
    served = await serve(Echo(), client_timeout=0.3)
    client = await connect(served.port)
    client.send(get())
    assert (await client.answer()).status == 200
    answered = time.monotonic()
    assert await client.closed(within=2)
    assert 0.25 < time.monotonic() - answered < 2


async def test_a_busy_connection_outlives_client_timeout(serve: Serve, connect: Connect) -> None:
    """Requests every 0.1 s for 4 timeouts: the lazily re-armed timer must not fire."""
    served = await serve(Echo(), client_timeout=0.3)
    client = await connect(served.port)
    conns = set()
    started = time.monotonic()
    n = 0
    while time.monotonic() - started < 1.2:
        client.send(get(f"/{n}"))
        assert (await client.answer()).json()["path"] == f"/{n}"
        conns |= served.listener.connections
        n += 1
        await asyncio.sleep(0.1)
    assert len(conns) == 1 and n >= 6


async def test_a_long_handler_is_not_cut_off_by_client_timeout(
    serve: Serve, connect: Connect
) -> None:
    served = await serve(Echo(delays={"/long": 0.8}), client_timeout=0.3)
    client = await connect(served.port)
    client.send(get("/long"))
    assert (await client.answer()).json()["path"] == "/long"
    client.send(get("/next"))
    assert (await client.answer()).json()["path"] == "/next"


# -- clients that leave, handlers that fail ------------------------------------------------------


@dataclass
class Sleeper:
    """A handler that waits (as for the rate-limit queue) and records being cancelled."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, request: Request) -> None:
        self.started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        request.respond(200, [], b"late")


async def test_a_client_that_disconnects_cancels_its_handler(
    serve: Serve, connect: Connect
) -> None:
    sleeper = Sleeper()
    served = await serve(sleeper)
    client = await connect(served.port)
    client.send(get())
    await asyncio.wait_for(sleeper.started.wait(), 2)
    # A reset, not a FIN: the server sees the connection lost without an EOF first.
    sock = client.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.abort()
    await asyncio.wait_for(sleeper.cancelled.wait(), 2)
    await eventually(lambda: not served.listener.connections)


async def test_a_client_that_half_closes_counts_as_gone(serve: Serve, connect: Connect) -> None:
    sleeper = Sleeper()
    served = await serve(sleeper)
    client = await connect(served.port)
    client.send(get())
    await asyncio.wait_for(sleeper.started.wait(), 2)
    client.writer.write_eof()  # shutdown(SHUT_WR): it can still read, but will get nothing
    await asyncio.wait_for(sleeper.cancelled.wait(), 2)
    assert await client.closed()


async def test_a_handler_that_raises_or_does_not_answer_gives_500(
    serve: Serve, connect: Connect
) -> None:
    async def handle(request: Request) -> None:
        if request.raw_path == "/raise":
            raise RuntimeError("handler bug with a secret: SECRET-MARKER")

    served = await serve(handle)
    client = await connect(served.port)
    for path in ("/raise", "/silent"):
        client.send(get(path))
        answer = await client.answer()
        body = assert_error(answer, 500, "internal_error")
        assert "SECRET-MARKER" not in body["error_message"]
    assert len(served.listener.connections) == 1  # still kept alive after both


async def test_a_handler_that_fails_mid_stream_cuts_the_connection(
    serve: Serve, connect: Connect
) -> None:
    async def handle(request: Request) -> None:
        request.start(200, [], 100)
        await request.write(b"x" * 10)
        raise RuntimeError("upstream went away")

    served = await serve(handle)
    client = await connect(served.port)
    client.send(get())
    head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 3)
    assert b"Content-Length: 100\r\n" in head
    rest = await client.rest()  # EOF (or reset) short of the declared length
    assert len(rest) < 100


# -- shutting down -------------------------------------------------------------------------------


async def test_stop_accepting_closes_idle_connections_and_lets_answers_finish(
    serve: Serve, connect: Connect
) -> None:
    gate, started = asyncio.Event(), asyncio.Event()

    async def handle(request: Request) -> None:
        if request.raw_path == "/busy":
            started.set()
            await gate.wait()
        request.respond(200, [], request.raw_path.encode())

    served = await serve(handle)
    listener = served.listener
    idle = await connect(served.port)
    idle.send(get("/idle"))
    assert (await idle.answer()).body == b"/idle"
    busy = await connect(served.port)
    busy.send(get("/busy"))
    await asyncio.wait_for(started.wait(), 2)

    listener.stop_accepting()
    assert listener.draining
    assert await idle.closed(within=1)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", served.port)
    gate.set()
    answer = await busy.answer()
    assert (answer.body, answer.headers["Connection"]) == (b"/busy", "close")
    assert await busy.closed(within=1)


async def test_close_cuts_off_what_is_still_running_after_the_grace(
    serve: Serve, connect: Connect
) -> None:
    sleeper = Sleeper()
    served = await serve(sleeper)
    idle = await connect(served.port)
    busy = await connect(served.port)
    busy.send(get())
    await asyncio.wait_for(sleeper.started.wait(), 2)
    started = time.monotonic()
    await served.listener.close(0.3)
    assert 0.25 < time.monotonic() - started < 2
    # Aborted: connection_lost (which forgets them and cancels handlers) runs next.
    await eventually(lambda: not served.listener.connections, within=1)
    assert await idle.closed(within=1)
    assert await busy.closed(within=1)
    await asyncio.wait_for(sleeper.cancelled.wait(), 1)


# -- what the handler sees -----------------------------------------------------------------------


async def test_the_request_reaches_the_handler_byte_exact(serve: Serve, connect: Connect) -> None:
    seen: list[Request] = []

    async def handle(request: Request) -> None:
        seen.append(request)
        echoed = request.headers["X-Echo"]
        body = {
            "remote": request.remote,
            "path": request.raw_path,
            "multi": request.headers.getall("X-Multi"),
        }
        request.respond(200, [("X-Echo", echoed)], json.dumps(body).encode())

    served = await serve(handle)
    client = await connect(served.port)
    client.send(
        b"GET /a%2Fb/@x?q=1+2&q=%20 HTTP/1.1\r\nHost: test\r\nX-Multi: one\r\n"
        b"X-Echo: caf\xc3\xa9 \xff!\r\nx-multi: two\r\n\r\n"
    )
    answer = await client.answer()
    assert b"\r\nX-Echo: caf\xc3\xa9 \xff!\r\n" in answer.head  # the same bytes, both ways
    assert answer.json() == {
        "remote": "127.0.0.1",
        "path": "/a%2Fb/@x?q=1+2&q=%20",
        "multi": ["one", "two"],
    }
    assert seen[0].headers["X-Echo"] == "café \udcff!"  # surrogateescape: nothing lost


# -- pipelining bounds, late parse errors, empty writes, the 503 date ------------------------------


async def test_pipelined_requests_after_a_large_body_are_not_refused_as_headers_too_large(
    serve: Serve, connect: Connect
) -> None:
    echo = Echo()
    served = await serve(echo)
    client = await connect(served.port)
    # One read: a 20 KB upload, then the start of the next head (its end comes later).
    client.send(post("/upload", b"u" * 20_000) + b"GET /second HTTP/1.1\r\nHost: test\r\n")
    await asyncio.sleep(0.1)
    client.send(b"\r\n")
    first = await client.answer()
    assert first.json()["path"] == "/upload"
    assert "Connection" not in first.headers
    assert (await client.answer()).json()["path"] == "/second"


async def test_pipelined_requests_are_not_queued_without_bound(
    serve: Serve, connect: Connect
) -> None:
    gate = asyncio.Event()

    async def handle(request: Request) -> None:
        await gate.wait()
        request.respond(200, [], b"")

    # A large head limit, so the false 431 above cannot end the flood early.
    served = await serve(handle, max_header_bytes=64 * 1024)
    client = await connect(served.port)
    tiny = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    try:
        for _ in range(20):  # 1 MiB: 58,000 requests
            client.send(tiny * (MiB // len(tiny) // 20))
            await asyncio.wait_for(client.writer.drain(), 1)
        await asyncio.sleep(0.3)
        (conn,) = served.listener.connections
        assert len(conn.pipeline) <= PIPELINE_MAX
    finally:
        gate.set()


async def test_a_parse_error_after_an_answered_request_still_gets_its_400(
    serve: Serve, connect: Connect
) -> None:
    async def handle(request: Request) -> None:
        request.respond(200, [], b"ok")
        await asyncio.sleep(0.3)  # work after answering: logging, cleanup

    served = await serve(handle, client_timeout=1.0)
    client = await connect(served.port)
    client.send(get())
    assert (await client.answer()).body == b"ok"
    client.send(b"BREW / HTTP/1.1\r\n\r\n")
    assert_error(await client.answer(), 400, "bad_request")


async def test_an_empty_write_does_not_end_a_chunked_answer(serve: Serve, connect: Connect) -> None:
    served = await serve(streaming([b"abc", b"", b"def"], None))
    client = await connect(served.port)
    client.send(get() + get())
    assert (await client.answer()).body == b"abcdef"
    assert (await client.answer()).body == b"abcdef"


async def test_the_503_over_the_cap_carries_the_current_date(
    serve: Serve, connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = "Fri, 01 Jan 2100 00:00:00 GMT"  # "now", as the listener's clock says it
    monkeypatch.setattr(listener_module, "http_date", lambda: now)
    served = await serve(Echo(), max_connections=1)
    bad = await connect(served.port)
    bad.send(b"BREW / HTTP/1.1\r\n\r\n")
    assert (await bad.answer()).headers["Date"] == now  # the listener's other own answers
    assert await bad.closed()
    await eventually(lambda: not served.listener.connections)

    held = await connect(served.port)
    await eventually(lambda: len(served.listener.connections) == 1)
    extra = await connect(served.port)
    answer = await extra.answer()
    assert_error(answer, 503, "too_many_connections")
    held.abort()
    assert answer.headers["Date"] == now


# -- issue 12: trailers, upgrades, pipelining past the bound, RFC 9112 details -----------------


@dataclass
class Recorder:
    """Reads the body (as the forwarder does), then records the head as it stands."""

    max_body: int = MiB
    time_limit: float = 2.0
    seen: list[tuple[Request, bytes]] = field(default_factory=list)

    async def __call__(self, request: Request) -> None:
        try:
            body = await request.read_body(self.max_body, self.time_limit)
        except ProxyError as e:
            refuse(request, e)
            return
        self.seen.append((request, body))
        request.respond(200, [], b"ok")


CHUNKED_WITH_TRAILERS = (
    b"POST /t HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
    + chunk(b'{"a":')
    + chunk(b"1}")
    + b"0\r\nX-Forwarded-For: 6.6.6.6\r\nContent-Type: text/evil\r\n\r\n"
)


async def test_trailer_fields_never_join_the_head(serve: Serve, connect: Connect) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    client = await connect(served.port)
    client.send(CHUNKED_WITH_TRAILERS)
    assert (await client.answer()).status == 200
    ((request, body),) = recorder.seen
    assert body == b'{"a":1}'
    names = [name.lower() for name, _ in request.raw_headers]
    assert names == [b"host", b"content-type", b"transfer-encoding"]
    assert request.headers.getall("Content-Type") == ["application/json"]
    assert "X-Forwarded-For" not in request.headers
    client.send(get("/next"))  # dropped, not refused: the connection goes on
    assert (await client.answer()).status == 200


async def test_trailers_over_the_cap_get_431(serve: Serve, connect: Connect) -> None:
    served = await serve(Recorder())
    client = await connect(served.port)
    client.send(
        b"POST /t HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
    )
    many = b"".join(b"X-T%d: %s\r\n" % (n, b"t" * 500) for n in range(40))
    client.send(many)  # 40 fields of 500 bytes: over 8 x 1024 in all, never finished
    answer = await client.answer()
    assert_error(answer, 431, "headers_too_large")
    assert await client.closed()


async def test_a_trailer_line_that_never_ends_gets_431(serve: Serve, connect: Connect) -> None:
    served = await serve(Recorder())
    client = await connect(served.port)
    client.send(b"POST /t HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: ")
    answer_task = asyncio.create_task(client.answer())
    sent = 0
    limit = (HEADER_BYTES_FACTOR + 1) * MAX_HEADER
    while not answer_task.done() and sent < 50 * limit:
        client.send(b"t" * 1024)
        sent += 1024
        await asyncio.sleep(0.002)
    assert_error(await answer_task, 431, "headers_too_large")
    assert sent < 50 * limit


@pytest.mark.parametrize(
    "body",
    [
        b"Content-Length: 7\r\n\r\nabcdefg",
        b"Transfer-Encoding: chunked\r\n\r\n" + chunk(b"abcdefg") + b"0\r\n\r\n",
    ],
    ids=["sized", "chunked"],
)
async def test_an_upgrade_request_with_a_body_reaches_the_handler_whole(
    serve: Serve, connect: Connect, body: bytes
) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    client = await connect(served.port)
    client.send(
        b"POST /ws HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n" + body
    )
    answer = await client.answer()
    assert (answer.status, answer.body) == (200, b"ok")
    ((_, received),) = recorder.seen
    assert received == b"abcdefg"
    assert answer.headers["Connection"] == "close"  # no protocol switch: the connection ends
    assert await client.closed()


async def test_an_upgrade_request_whose_body_is_slow_still_gets_it_all(
    serve: Serve, connect: Connect
) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    client = await connect(served.port)
    client.send(
        b"POST /ws HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: 7\r\n\r\nabc"
    )
    await asyncio.sleep(0.05)
    client.send(b"defg")
    assert (await client.answer()).status == 200
    assert [body for _, body in recorder.seen] == [b"abcdefg"]


@pytest.mark.parametrize(
    "count", [PIPELINE_MAX - 1, PIPELINE_MAX, PIPELINE_MAX + 1, PIPELINE_MAX + 2, 300]
)
async def test_pipelined_past_the_bound_every_request_is_answered_in_order(
    serve: Serve, connect: Connect, count: int
) -> None:
    echo = Echo()
    served = await serve(echo)
    client = await connect(served.port)
    client.send(b"".join(get(f"/{n}") for n in range(count)))
    paths = [(await client.answer()).json()["path"] for _ in range(count)]
    assert paths == [f"/{n}" for n in range(count)]
    client.send(get("/after"))
    assert (await client.answer()).json()["path"] == "/after"


async def test_the_pipeline_never_holds_more_than_its_bound(serve: Serve, connect: Connect) -> None:
    gate = asyncio.Event()
    most = 0

    async def handle(request: Request) -> None:
        nonlocal most
        (conn,) = served.listener.connections
        most = max(most, len(conn.pipeline))
        await gate.wait()
        request.respond(200, [], b"")

    served = await serve(handle)
    client = await connect(served.port)
    client.send(get("/") * 500)
    await eventually(lambda: most > 0)
    await asyncio.sleep(0.1)
    (conn,) = served.listener.connections
    assert len(conn.pipeline) == PIPELINE_MAX
    gate.set()
    for _ in range(500):
        assert (await client.answer()).status == 200
    assert most <= PIPELINE_MAX


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"GET /p#frag HTTP/1.1\r\nHost: test\r\n\r\n",
    ],
    ids=[
        "no-host",
        "two-hosts",
        "empty-host",
        "bad-host",
        "two-hosts-1.0",
        "1.0-chunked",
        "fragment",
    ],
)
async def test_requests_rfc_9112_refuses_get_400_and_the_connection_ends(
    serve: Serve, connect: Connect, data: bytes
) -> None:
    echo = Echo()
    served = await serve(echo)
    client = await connect(served.port)
    client.send(data)
    answer = await client.answer()
    assert_error(answer, 400, "bad_request")
    assert await client.closed()
    assert echo.seen == []


async def test_http_1_0_without_host_is_served(serve: Serve, connect: Connect) -> None:
    served = await serve(Echo())
    client = await connect(served.port)
    client.send(b"GET /old HTTP/1.0\r\n\r\n")
    assert (await client.answer()).json()["path"] == "/old"


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/1.2", b"HTTP/3.0"])
async def test_other_http_versions_get_505(serve: Serve, connect: Connect, version: bytes) -> None:
    echo = Echo()
    served = await serve(echo)
    client = await connect(served.port)
    client.send(b"GET / " + version + b"\r\nHost: test\r\n\r\n")
    answer = await client.answer()
    assert_error(answer, 505, "http_version_not_supported")
    assert await client.closed()
    assert echo.seen == []


async def test_http_0_9_is_closed_at_once_without_an_answer(serve: Serve, connect: Connect) -> None:
    echo = Echo()
    served = await serve(echo, client_timeout=5.0)
    client = await connect(served.port)
    client.send(b"GET /\r\n")
    started = time.monotonic()
    assert await client.closed(within=2)
    assert time.monotonic() - started < 1
    assert echo.seen == []


async def test_a_chunk_larger_than_the_body_limit_gets_413_at_once(
    serve: Serve, connect: Connect
) -> None:
    served = await serve(Echo(max_body=1000, time_limit=5.0), client_timeout=5.0)
    client = await connect(served.port)
    client.send(b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n3e9\r\nab")
    started = time.monotonic()
    assert_error(await client.answer(), 413, "body_too_large")
    assert time.monotonic() - started < 1


async def test_a_later_chunk_over_the_body_limit_gets_413_at_once(
    serve: Serve, connect: Connect
) -> None:
    served = await serve(Echo(max_body=1000, time_limit=5.0), client_timeout=5.0)
    client = await connect(served.port)
    client.send(b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n")
    client.send(chunk(b"a" * 600))
    await asyncio.sleep(0.05)
    client.send(b"00190;ext=1\r\n")  # 400 more: 1000 in all, at the limit
    await asyncio.sleep(0.05)
    client.send(b"a" * 400 + b"\r\n1")  # the next chunk's size arrives in two reads
    await asyncio.sleep(0.05)
    started = time.monotonic()
    client.send(b"\r\n")
    assert_error(await client.answer(), 413, "body_too_large")
    assert time.monotonic() - started < 1


# -- issue 12: clients that stop reading, log floods ---------------------------------------------


async def test_a_client_that_stops_reading_has_its_answer_abandoned_after_client_timeout(
    serve: Serve, connect: Connect
) -> None:
    outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    piece = b"x" * 65536

    async def handle(request: Request) -> None:
        request.start(200, [], None)
        try:
            for _ in range(4096):  # 256 MiB: far more than any socket buffer holds
                await request.write(piece)
        except ConnectionError as e:
            outcome.set_result(e)
            raise
        outcome.set_result(None)
        request.end()

    served = await serve(handle, client_timeout=0.5)
    client = await connect(served.port, rcvbuf=4096)
    client.send(get("/large"))  # and never reads
    started = time.monotonic()
    error = await asyncio.wait_for(outcome, 10)
    assert isinstance(error, ConnectionResetError)
    assert time.monotonic() - started < 5
    await eventually(lambda: not served.listener.connections)


async def test_a_client_that_reads_slowly_is_not_cut_off(serve: Serve, connect: Connect) -> None:
    size = 4 * MiB

    async def handle(request: Request) -> None:
        request.start(200, [], size)
        for _ in range(size // 65536):
            await request.write(b"y" * 65536)
        request.end()

    served = await serve(handle, client_timeout=0.5)
    client = await connect(served.port, rcvbuf=16384)
    client.send(get())
    await client.reader.readuntil(b"\r\n\r\n")
    got = 0
    async with asyncio.timeout(20):
        while got < size:  # progress every 0.2 s, each wait shorter than the timeout
            data = await client.reader.read(256 * 1024)
            assert data, "cut off"
            got += len(data)
            await asyncio.sleep(0.2 if got < MiB else 0)
    assert got == size


async def test_answers_a_client_does_not_read_do_not_pile_up(
    serve: Serve, connect: Connect
) -> None:
    big = b"z" * 60_000
    answered = 0

    async def handle(request: Request) -> None:
        nonlocal answered
        answered += 1
        request.respond(200, [], big)

    served = await serve(handle, client_timeout=0.5)
    client = await connect(served.port, rcvbuf=4096)
    for _ in range(20):  # 640 requests, 38 MB of answers, none of it read
        client.send(get() * 32)
        await asyncio.sleep(0.01)
    await eventually(lambda: not served.listener.connections, within=8)
    # The server stopped answering once the client stopped reading, and then gave up.
    assert answered < 200


async def test_refused_connections_are_logged_once_then_counted(
    serve: Serve, connect: Connect
) -> None:
    served = await serve(Echo(), max_connections=1)
    held = await connect(served.port)
    await eventually(lambda: len(served.listener.connections) == 1)
    with capture_logs() as logs:
        for _ in range(200):
            extra = await connect(served.port)
            assert_error(await extra.answer(), 503, "too_many_connections")
            extra.abort()
    refused = [e for e in logs if e["event"] == "too_many_connections"]
    assert len(refused) == 1 and "count" not in refused[0]
    assert served.listener.refused.pending == 199
    held.abort()
