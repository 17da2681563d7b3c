"""The proxy listener: HTTP/1.1 on asyncio protocols with httptools' C parser.

Not aiohttp's server: its per-request objects (web.Request, web.Response, a
CIMultiDict per direction, the writer's header serialisation) cost more than
the proxy's own work on a small request (bench/ANALYSIS.md). This server does
what the proxy needs and nothing more: one request at a time per connection
(pipelined ones wait their turn, in order, at most PIPELINE_MAX of them parsed
ahead; past that the rest of a read waits unparsed, with reading paused, until
the line moves), bodies read with backpressure (large ones spooled to a file:
body.py), answers written as bytes,
and the limits a sidecar must keep:

- the request line and each header at most `max_header_bytes` (431), all
  header and trailer lines together at most HEADER_BYTES_FACTOR times that;
- at most `max_connections` open connections (more: 503 and closed; the
  warning is logged once, then summarised with a count once a minute);
- `client_timeout` for a request head, first or next, for a body, and for each
  step of writing an answer: a client that takes nothing for that long has its
  answer abandoned and the connection cut, so its handler lets go of what it
  holds (an in-flight slot, an upstream connection);
- a client that hangs up cancels its handler, so a queued request leaves the
  rate-limit queue at once.

RFC 9112 is applied where the parser (llhttp) leaves it to us: one valid Host
(HTTP/1.1 needs one), no Transfer-Encoding in HTTP/1.0 and none but chunked,
versions 1.0 and 1.1 only (505; HTTP/0.9 is closed at once, unanswered, since
it has no way to read a status line), no fragment in the target. Trailer fields
are read and dropped, never merged into the head. A request asking to upgrade
is served as a plain HTTP/1.1 request, its body read whole, and the connection
ends after its answer.

Requests it cannot parse get the proxy's JSON error shape with a fixed message
per kind of fault: the answer never echoes the client's bytes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import itertools
import os
import re
import socket
import sys
import termios
import time
from collections.abc import Awaitable, Callable, Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import cast

import httptools
import structlog
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import (
    BadRequest,
    BodyTooLarge,
    ClientTimeout,
    HeadersTooLarge,
    HttpVersionNotSupported,
    ProxyError,
    TooManyConnections,
    TransferCodingNotSupported,
    URITooLong,
)
from proxy.http.body import EMPTY, Body, Spool, SpoolWriter
from proxy.http.headers import decode_headers, header_lines
from proxy.throttle import Throttled

log = structlog.get_logger("proxy.server")

# All header lines together may be this many times listen.max_header_bytes.
HEADER_BYTES_FACTOR = 8
# Stop reading from a client while this much of its body waits for the handler.
_BODY_BUFFER_HIGH = 1 << 20
# Requests parsed but not yet answered on one connection. A read holding more leaves the
# rest unparsed (reading paused) until the line moves: back-pressure, nothing dropped.
PIPELINE_MAX = 64
# The shortest head llhttp accepts ("GET / HTTP/1.0" CRLF CRLF). Each head ends in its own
# CRLF CRLF, so a read of n bytes completes at most 1 + (n - 1) // _MIN_HEAD heads (one of
# them begun in an earlier read), and at most one more than it holds CRLF CRLFs.
_MIN_HEAD = 18
# Bytes of a chunked body's framing kept from the previous read, for a chunk-size line
# split across two reads.
_TAIL = 64
# The ioctl that reads a socket's unsent bytes (Linux's SIOCOUTQ, the same number as
# TIOCOUTQ); elsewhere only the transport's own buffer is looked at.
_SIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None) if sys.platform == "linux" else None
# After answering a request whose body has not all arrived, read (and drop) the rest
# for up to this long before closing, so the client sees the answer, not a reset.
LINGER_SECONDS = 2.0

_BODY_CUT = BadRequest("the client closed the connection before its body was complete")

# RFC 3986 host [":" port]: reg-name or IPv4 (unreserved, sub-delims, pct-encoded) or an
# IP literal in brackets. Anything else (spaces, '/', '@', a second ':') is not a Host.
_HOST = re.compile(
    r"(?:\[[0-9A-Za-z:._~!$&'()*+,;=%-]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::[0-9]*)?"
)


class _Http09(Exception):
    """An HTTP/0.9 request line (no version): such a client cannot read a status line."""


Handler = Callable[["Request"], Awaitable[None]]
# Header fields as pairs, or as ready header lines (each ending in CRLF).
Headers = Iterable[tuple[str, str]] | bytes


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


class _HttpDate:
    """The Date header for the proxy's own answers, formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._text = formatdate(second, usegmt=True)
        return self._text


http_date = _HttpDate()


def parse_error(exc: BaseException) -> ProxyError:
    """The answer to a request the parser refused; never echoes what the client sent."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        return BadRequest("unknown or malformed HTTP method")
    if isinstance(exc, httptools.HttpParserInvalidURLError):
        return BadRequest("malformed request target")
    text = str(exc).lower()
    if text == "invalid http version" or "pri/upgrade" in text:
        # A well-formed version other than 1.x (HTTP/3.0, HTTP/1.2), or HTTP/2's preface.
        return _VERSION
    if "header" in text:
        return BadRequest("malformed header")
    if any(word in text for word in ("chunk", "content-length", "transfer-encoding")):
        return BadRequest("malformed body framing (Content-Length / Transfer-Encoding)")
    if "version" in text or "method" in text:
        return BadRequest("malformed request line")
    return BadRequest("malformed HTTP request")


def answer_bytes(
    status: int,
    headers: Headers,
    body: bytes = b"",
    *,
    reason: str | None = None,
    close: bool = False,
    length: int | None = None,
    keep_alive_header: bool = False,
) -> bytes:
    """A whole answer. `length` < 0: no Content-Length (bodiless statuses)."""
    text = reason if reason is not None else _reason(status)
    # Latin-1 both ways for the reason phrase, and surrogateescape for header fields, as
    # the parsers decoded them: what the API sent passes on byte for byte.
    status_line = f"HTTP/1.1 {status} {text}\r\n".encode("latin-1", "replace")
    block = headers if isinstance(headers, bytes) else header_lines(headers)
    n = len(body) if length is None else length
    tail = f"Content-Length: {n}\r\n" if n >= 0 else ""
    if close:
        tail += "Connection: close\r\n"
    elif keep_alive_header:
        tail += "Connection: keep-alive\r\n"
    head = status_line + block + tail.encode() + b"\r\n"
    return head + body if body else head


_VERSION = HttpVersionNotSupported("only HTTP/1.1 and HTTP/1.0 are served")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


# New request IDs: 16 random hex digits per process, then a counter (32 hex digits in
# all, like uuid4().hex). Unique across processes and restarts without a system call
# per request; an ID needs to be unique, not unguessable.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


def request_id(given: str | None) -> str:
    """The client's X-Request-ID when it is a sane token, else a new one."""
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def error_headers(error: ProxyError, rid: str) -> list[tuple[str, str]]:
    """The head of an answer the proxy makes itself (the body is error.body())."""
    return [
        ("Content-Type", "application/json"),
        ("Date", http_date()),
        ("X-Request-ID", rid),
        *error.headers().items(),
    ]


def error_answer(error: ProxyError, rid: str, close: bool = False) -> bytes:
    return answer_bytes(error.status, error_headers(error, rid), error.body(), close=close)


class Request:
    """One client request: its head at once, its body on demand, its answer as bytes."""

    __slots__ = (
        "_chunked_out",
        "_conn",
        "_waiter",
        "body_complete",
        "body_error",
        "buffered",
        "chunks",
        "continue_sent",
        "finished",
        "headers",
        "keep_alive",
        "method",
        "promised",
        "raw_headers",
        "raw_path",
        "received",
        "remote",
        "started",
        "version",
    )

    def __init__(
        self,
        conn: _Connection,
        method: str,
        raw_path: str,
        version: tuple[int, int],
        headers: CIMultiDictProxy[str],
        keep_alive: bool,
        raw_headers: list[tuple[bytes, bytes]],
    ) -> None:
        self._conn = conn
        self.method = method
        self.raw_path = raw_path
        self.version = version
        self.headers = headers
        # As received: for passing headers on without encoding them again.
        self.raw_headers = raw_headers
        self.keep_alive = keep_alive
        self.remote = conn.remote
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        # Body bytes received so far, and what the client has announced: those plus the
        # size of a chunk still arriving (so a chunk over the limit is refused at once).
        self.received = 0
        self.promised = 0
        self.body_complete = False
        # Why the body cannot be had, when it cannot (the parser refused it, the client left).
        self.body_error: ProxyError | None = None
        self.continue_sent = False
        self._waiter: asyncio.Future[None] | None = None
        # The answer's head has gone out (it can no longer be replaced) / all of it has.
        self.started = False
        self.finished = False
        self._chunked_out = False

    # -- the body ---------------------------------------------------------------------------

    @property
    def content_length(self) -> int | None:
        text = self.headers.get("Content-Length")
        return int(text) if text is not None and text.isdigit() else None

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The task serving this request (its connection's), for whoever must cancel it."""
        return self._conn.task

    @property
    def body_exists(self) -> bool:
        return bool(self.chunks) or not self.body_complete

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read_body(self, max_bytes: int, time_limit: float) -> bytes:
        """The whole body in memory, at most `max_bytes` (413), within `time_limit`
        seconds (408)."""
        body = await self.receive_body(max_bytes, time_limit, None)
        assert body.in_memory is not None  # no spool: never spooled
        return body.in_memory

    async def receive_body(self, max_bytes: int, time_limit: float, spool: Spool | None) -> Body:
        """The whole body, at most `max_bytes` (413), within `time_limit` seconds (408):
        in memory, or in a spool file when `spool` says it is too large to keep (see
        proxy/http/body.py). The caller closes the Body."""
        if not self.body_exists:
            return EMPTY  # most GETs: nothing to wait for
        declared = self.content_length
        if declared is not None and declared > max_bytes:
            raise BodyTooLarge(
                f"request body of {declared} bytes is over the limit of {max_bytes} bytes "
                "(listen.max_body_bytes)"
            )
        writer: SpoolWriter | None = None
        if spool is not None and declared is not None and declared > spool.threshold:
            # Known to be large: straight to a file (opened before the body is invited,
            # so a spool that cannot take it refuses it first).
            writer = spool.writer()
        conn = self._conn
        if (
            not self.continue_sent
            and not self.body_complete
            and self.version >= (1, 1)
            and self.headers.get("Expect", "").lower() == "100-continue"
        ):
            # Only now that the size is acceptable is the body invited (not when it is
            # all here already, RFC 9110 10.1.1); the API itself never sees Expect.
            self.continue_sent = True
            conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        parts: list[bytes] = []
        total = 0
        held = 0  # bytes of the spool's global cap that `parts` holds
        try:
            # A total deadline: a client that dribbles its body cannot hold a worker.
            async with asyncio.timeout(time_limit):
                while True:
                    while self.chunks:
                        chunk = self.chunks.popleft()
                        total += len(chunk)
                        if total > max_bytes:
                            raise BodyTooLarge(
                                f"request body is over the limit of {max_bytes} bytes "
                                "(listen.max_body_bytes)"
                            )
                        if writer is not None:
                            writer.write(chunk)
                        elif spool is None:
                            parts.append(chunk)
                        elif total <= spool.threshold and spool.take(len(chunk)):
                            held += len(chunk)
                            parts.append(chunk)
                        else:
                            # Past the threshold, or past the global cap: what is in
                            # memory moves to a file, and the rest follows it there.
                            writer = spool.writer()
                            for part in parts:
                                writer.write(part)
                            parts.clear()
                            spool.give(held)
                            held = 0
                            writer.write(chunk)
                    self.buffered = 0
                    conn.resume_reading()
                    if self.chunks:
                        continue  # resuming parsed bytes held back: more of this body
                    if self.promised > max_bytes:
                        raise BodyTooLarge(
                            f"request body is over the limit of {max_bytes} bytes "
                            "(listen.max_body_bytes): a chunk of it says so"
                        )
                    if self.body_complete:
                        break
                    if self.body_error is not None:
                        raise self.body_error
                    self._waiter = asyncio.get_running_loop().create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
        except BaseException as e:
            # Refused, timed out, the client gone, the handler cancelled: the file is
            # closed (and so gone) and the memory given back, whatever happened.
            if writer is not None:
                writer.abort()
            if held and spool is not None:
                spool.give(held)
            if isinstance(e, TimeoutError):
                raise ClientTimeout(
                    f"the request body did not arrive within {time_limit:g} s "
                    "(listen.client_timeout)"
                ) from None
            raise
        if writer is not None:
            return writer.finish()
        data = b"".join(parts)  # one part (the usual small body): that very object
        return spool.memory(data, held) if spool is not None else Body(data, total)

    # -- the answer -------------------------------------------------------------------------

    def _close_after(self) -> bool:
        """Whether the connection ends with this answer."""
        conn = self._conn
        if not self.keep_alive or conn.closing or conn.server.draining:
            return True
        # An unread body is dropped while lingering, and the connection closed after it.
        return not self.body_complete or bool(self.chunks)

    def _write_head(
        self,
        status: int,
        headers: Headers,
        body: bytes,
        reason: str | None,
        length: int | None,
        close: bool,
    ) -> None:
        self._conn.write(
            answer_bytes(
                status,
                headers,
                body,
                reason=reason,
                close=close,
                length=length,
                keep_alive_header=not close and self.version < (1, 1),
            )
        )

    def respond(
        self, status: int, headers: Headers, body: bytes, *, reason: str | None = None
    ) -> int:
        """The whole answer in one write; returns the body's length."""
        close = self._close_after()
        self.started = self.finished = True
        self._write_head(status, headers, body, reason, None, close)
        self._conn.answered(self, close)
        return len(body)

    def respond_head(
        self, status: int, headers: Headers, length: int | None, *, reason: str | None = None
    ) -> None:
        """An answer without a body (HEAD, 1xx, 204, 304); `length` describes the resource."""
        close = self._close_after()
        self.started = self.finished = True
        self._write_head(status, headers, b"", reason, -1 if length is None else length, close)
        self._conn.answered(self, close)

    def start(
        self, status: int, headers: Headers, length: int | None, *, reason: str | None = None
    ) -> None:
        """Begin a streamed answer; `length` None: chunked (HTTP/1.0: until close)."""
        chunked = length is None and self.version >= (1, 1)
        close = self._close_after() or (length is None and not chunked)
        if chunked:
            headers = (
                headers + b"Transfer-Encoding: chunked\r\n"
                if isinstance(headers, bytes)
                else [*headers, ("Transfer-Encoding", "chunked")]
            )
        self._chunked_out = chunked
        self.keep_alive = not close
        self.started = True
        self._write_head(status, headers, b"", reason, -1 if length is None else length, close)

    async def write(self, chunk: bytes) -> None:
        """Part of a streamed answer; raises ConnectionResetError once the client is gone."""
        conn = self._conn
        if conn.closing:
            raise ConnectionResetError("the client closed the connection")
        if not chunk:
            return  # an empty chunk would end a chunked answer
        if self._chunked_out:
            conn.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        else:
            conn.write(chunk)
        await conn.drain()

    def end(self) -> None:
        if self._chunked_out:
            self._conn.write(b"0\r\n\r\n")
        self.finished = True
        self._conn.answered(self, not self.keep_alive)

    def abort(self) -> None:
        """Cut the connection: a streamed answer cannot be finished (the client sees it short)."""
        self.finished = True
        self._conn.abort()


def _unsent(transport: asyncio.Transport) -> int:
    """Bytes written but not yet taken by the client: the transport's buffer, and on
    Linux the socket's send queue (which the transport only refills once much of it has
    gone, so a slow reader's progress would not show in the buffer alone)."""
    unsent = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if _SIOCOUTQ is not None and sock is not None:
        with contextlib.suppress(OSError, ValueError):
            queued = fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0")
            unsent += int.from_bytes(queued, sys.byteorder)
    return unsent


class _BodyAfterUpgrade:
    """Parser callbacks for the body of a request that asked to upgrade.

    llhttp stops at the end of such a request's head (it expects another protocol
    next), so a second parser reads the body from a head made of the request's own
    framing lines. Only the body's callbacks are passed on; the made-up head's go
    nowhere (its lines arrive at on_header after the real head: dropped as trailers).
    """

    def __init__(self, conn: _Connection) -> None:
        self.on_header = conn.on_header
        self.on_body = conn.on_body
        self.on_message_complete = conn.on_message_complete
        self.on_chunk_header = conn.on_chunk_header
        self.on_chunk_complete = conn.on_chunk_complete


class _Connection(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: Listener) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.closing = False
        # Requests parsed, in order; the first is the one being answered.
        self.pipeline: collections.deque[Request] = collections.deque()
        self.task: asyncio.Task[None] | None = None
        # What the task awaits between requests.
        self._next: asyncio.Future[None] | None = None
        self._parsing: Request | None = None
        self._url = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        # Between the start of a request and the end of its head, and the bytes seen so far.
        self._in_head = True
        self._head_began = False
        self._head_received = 0
        # Bytes received but not parsed yet: the pipeline is full (reading is paused).
        self._held = b""
        # A chunked body is being parsed: its framing is watched (chunk sizes, trailers).
        self._chunked = False
        self._events = 0  # body and chunk callbacks so far: has a read made progress?
        self._framing = 0  # bytes of reads without progress since the last that had some
        self._chunk_start = 0  # body bytes before the chunk whose size line came last
        self._chunk_fresh = False  # that size line came in the read being parsed
        self._tail = b""
        self._last = False  # the request being parsed is the connection's last
        self._host: str | None = None  # the last valid Host on this connection
        self._timer: asyncio.TimerHandle | None = None
        self._idle_since: float | None = None
        self._reading_paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._lingering = False
        self._lost = False
        self._broken = False  # the parser failed: no more requests from this connection

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else None
        server = self.server
        if len(server.connections) >= server.max_connections:
            # Over the cap: an answer any client can read, then hang up. Logged once, then
            # counted: a flood of refusals must not become a flood of log lines.
            server.refused(limit=server.max_connections)
            self.closing = True
            self.transport.write(error_answer(_TOO_MANY, "-", close=True))
            self.transport.close()
            return
        server.connections.add(self)
        self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._lost = True
        self._held = b""
        self.server.connections.discard(self)
        self._stop_timer()
        for request in self.pipeline:
            request.body_error = _BODY_CUT
            request.wake()
        if self.task is not None and not self.task.done():
            # The client went away: its handler (perhaps waiting in the queue) stops.
            self.task.cancel()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        if self._held:
            # Reading is paused while bytes wait their turn; any that were already on
            # their way wait behind them.
            self._held += data
            return
        if len(data) <= _MIN_HEAD * (PIPELINE_MAX - 1 - len(self.pipeline)):
            self._parse(data)  # the usual read: too short to hold more heads than there is room for
        else:
            self._feed(data)

    def eof_received(self) -> bool:
        # A client that stops sending has gone (as aiohttp's server treats it, and as
        # HTTP clients behave): closing cancels its handler and frees its queue slot.
        return False

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- parsing ----------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        """Parse what keeps the pipeline within PIPELINE_MAX; hold the rest, unread."""
        free = PIPELINE_MAX - len(self.pipeline)
        # The usual read cannot hold that many heads; only a flood needs counting.
        if len(data) <= _MIN_HEAD * (free - 1) or data.count(b"\r\n\r\n") < free:
            self._parse(data)
            return
        while data and not self._broken:
            free = PIPELINE_MAX - len(self.pipeline)
            if free <= 0:
                self._held = data
                self.pause_reading()
                return
            # Up to (not including) the last byte of the CRLF CRLF after the `allowed`th:
            # at most `allowed` heads end inside, plus one that began before.
            allowed = free - 1 if self._in_head else free
            end = -4
            for _ in range(allowed + 1):
                end = data.find(b"\r\n\r\n", end + 4)
                if end < 0:
                    break
            if end < 0:
                self._parse(data)
                return
            self._parse(data[: end + 3])
            data = data[end + 3 :]

    def _parse(self, data: bytes) -> None:
        self._head_began = False
        events = self._events
        try:
            self.parser.feed_data(data)
            if self._in_head:
                # The parser keeps a header until its end arrives: bound what it keeps.
                # A head that began in this read counts what the callbacks saw of it (the
                # rest of the read may have been earlier requests); later reads count whole.
                if self._head_began:
                    self._head_received = len(self._url) + self._header_bytes
                else:
                    self._head_received += len(data)
                limit = self.server.max_header_bytes * (HEADER_BYTES_FACTOR + 1)
                if self._head_received > limit:
                    raise HeadersTooLarge(
                        "a header or the headers are too long (listen.max_header_bytes)"
                    )
                if self._url:
                    # "GET /" CRLF: no version came before the line's end (llhttp says
                    # 0.9 only once the next byte is in, which such a client never sends).
                    version = self.parser.get_http_version()
                    if version == "0.9" or (version == "0.0" and data.endswith(b"\n")):
                        raise _Http09
            elif self._chunked:
                self._watch_chunks(data, events)
        except httptools.HttpParserUpgrade as e:
            self._upgraded(data[e.args[0] :])
        except (httptools.HttpParserError, ProxyError, _Http09) as e:
            if self._broken:
                return  # the last request is whole; what follows it is dropped unread
            self._broken = True
            self._held = b""
            cause = e.__context__ if isinstance(e, httptools.HttpParserCallbackError) else e
            if isinstance(cause, _Http09):
                self._refuse_unparseable(None)
            else:
                self._refuse_unparseable(parse_error(cause if cause is not None else e))

    def _watch_chunks(self, data: bytes, events: int) -> None:
        """After a read of a chunked body: bound its framing, and learn the size of a
        chunk still to come, so that one over the body limit is refused at once."""
        if self._events == events:
            # No data, no chunk begun or ended: the read was a chunk extension or trailer
            # lines, which the parser keeps until their end (or skips, unbounded in time).
            self._framing += len(data)
            if self._framing > self.server.max_header_bytes * (HEADER_BYTES_FACTOR + 1):
                raise HeadersTooLarge(
                    "a chunk extension or the trailer fields are too long (listen.max_header_bytes)"
                )
        else:
            self._framing = 0
        if self._chunk_fresh:
            self._chunk_fresh = False
            request = self._parsing
            if request is not None and not self._lingering:
                size = self._chunk_size(data, request.received - self._chunk_start)
                if size is not None:
                    request.promised = self._chunk_start + size
                    request.wake()
        self._tail = data[-_TAIL:]

    def _chunk_size(self, data: bytes, arrived: int) -> int | None:
        """The size on the chunk-size line that ends `arrived` bytes before the end of
        `data` (the parser has checked its syntax; httptools does not pass it on), or
        None when the line began too long ago to be seen (then the body limit applies as
        the bytes arrive)."""
        end = len(data) - arrived - 2  # the line's CRLF
        start = data.rfind(b"\n", 0, max(end, 0)) + 1
        if start > 0:
            line = data[start:end]
        else:
            line = self._tail + data[: max(end, 0)] if end >= 0 else self._tail[:end]
            start = line.rfind(b"\n") + 1
            if start == 0:
                return None
            line = line[start:]
        try:
            return int(line.partition(b";")[0], 16)
        except ValueError:
            return None

    def _upgraded(self, rest: bytes) -> None:
        """llhttp ends the request that asks to upgrade at its head, body or not, and
        expects another protocol next. Nothing is switched here: the request is served
        as a plain one, its body read whole by a second parser fed the request's framing
        lines and `rest`, and the connection ends with its answer (what follows the body
        is dropped)."""
        request = self.pipeline[-1]
        request.keep_alive = False
        framing = [
            (name, value)
            for name, value in request.raw_headers
            if name.lower() in (b"content-length", b"transfer-encoding")
        ]
        if not framing:
            self._broken = True  # no body: what follows would be another protocol's
            return
        request.body_complete = False
        self._parsing = request
        self._last = True
        self._header_bytes = 0  # the made-up head's lines, then any trailers, count anew
        self._chunked = any(name.lower() == b"transfer-encoding" for name, _ in framing)
        self.parser = httptools.HttpRequestParser(_BodyAfterUpgrade(self))
        lines = b"".join(name + b": " + value + b"\r\n" for name, value in framing)
        self._parse(b"POST / HTTP/1.1\r\n" + lines + b"Connection: close\r\n\r\n" + rest)

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_began = True
        self._head_received = 0
        self._url = b""
        self._raw_headers = []
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.server.max_header_bytes:
            raise URITooLong("the request target is too long (listen.max_header_bytes)")

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        self._header_bytes += size
        limit = self.server.max_header_bytes
        if size > limit or self._header_bytes > limit * HEADER_BYTES_FACTOR:
            raise HeadersTooLarge("a header or the headers are too long (listen.max_header_bytes)")
        if self._in_head:
            self._raw_headers.append((name, value))
        # Otherwise a trailer field, after a chunked body: dropped (as nginx does), never
        # merged into the head, where it could pose as a header the client did not send.

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_timer()
        parser = self.parser
        headers = CIMultiDict(decode_headers(self._raw_headers))
        text = parser.get_http_version()
        if text == "1.1":
            version = (1, 1)
        elif text == "1.0":
            version = (1, 0)
        elif text == "0.9":
            raise _Http09
        else:
            raise _VERSION
        # RFC 9112's rules that llhttp leaves to its user, cheap in the usual case: the
        # Host seen last on this connection, no fragment, no Transfer-Encoding.
        hosts = headers.getall("Host", None)
        if hosts is None or len(hosts) != 1 or hosts[0] != self._host:
            self._check_host(hosts, version)
        if b"#" in self._url:
            raise BadRequest("a request target has no fragment (#)")
        self._chunked = "Transfer-Encoding" in headers
        if self._chunked:
            self._check_coding(headers, version)
        if len(self.pipeline) >= PIPELINE_MAX:
            # Unreachable: _feed parses no more heads than there is room for.
            raise BadRequest(f"more than {PIPELINE_MAX} pipelined requests at once")
        request = Request(
            self,
            parser.get_method().decode("ascii", "replace"),
            self._url.decode("utf-8", "surrogateescape"),
            version,
            CIMultiDictProxy(headers),
            parser.should_keep_alive(),
            self._raw_headers,
        )
        self._parsing = request
        self.pipeline.append(request)
        if len(self.pipeline) > 1:
            # Requests are answered one at a time: read no further ahead until this
            # one's turn.
            self.pause_reading()
        if self._next is not None:
            if not self._next.done():
                self._next.set_result(None)
        elif self.task is None:
            self.task = self.loop.create_task(self._serve())

    def _check_host(self, hosts: list[str] | None, version: tuple[int, int]) -> None:
        """One Host, and a host at that (RFC 9112 3.2); HTTP/1.0 may send none."""
        if hosts is None:
            if version >= (1, 1):
                raise BadRequest("an HTTP/1.1 request needs a Host header (RFC 9112 3.2)")
        elif len(hosts) > 1 or not _HOST.fullmatch(hosts[0].strip(" \t")):
            raise BadRequest("one Host header with a host name is needed (RFC 9112 3.2)")
        else:
            self._host = hosts[0]  # the next request on this connection sends the same

    def _check_coding(self, headers: CIMultiDict[str], version: tuple[int, int]) -> None:
        """Transfer-Encoding: chunked alone, and not in HTTP/1.0 (RFC 9112 6.1, 6.3)."""
        if version < (1, 1):
            # Its framing cannot be trusted (RFC 9112 6.1): a 1.0 server would not have
            # read it as chunked.
            raise BadRequest("Transfer-Encoding is not allowed in an HTTP/1.0 request")
        codings = [
            c.strip(" \t").lower()
            for value in headers.getall("Transfer-Encoding")
            for c in value.split(",")
        ]
        if codings != ["chunked"]:
            if codings[-1] != "chunked" or "chunked" in codings[:-1]:
                # No length can be read from it (RFC 9112 6.3): 400, and close.
                raise BadRequest("malformed body framing (Content-Length / Transfer-Encoding)")
            # Other codings under chunked (gzip, chunked) would reach the API still
            # encoded, and unlabelled: not implemented (RFC 9112 6.1), as nginx says.
            raise TransferCodingNotSupported(
                "request bodies are accepted with Transfer-Encoding: chunked alone"
            )
        self._framing = 0
        self._chunk_fresh = False
        self._tail = b""

    def on_body(self, body: bytes) -> None:
        self._events += 1
        request = self._parsing
        if request is None or self._lingering:
            return  # lingering: the answer is out; the rest is read only to be dropped
        request.chunks.append(body)
        size = len(body)
        request.buffered += size
        request.received += size
        if request.buffered > _BODY_BUFFER_HIGH:
            self.pause_reading()
        request.wake()

    def on_chunk_header(self) -> None:
        self._events += 1
        request = self._parsing
        if request is not None:
            self._chunk_start = request.received
            self._chunk_fresh = True

    def on_chunk_complete(self) -> None:
        self._events += 1
        self._chunk_fresh = False

    def on_message_complete(self) -> None:
        request = self._parsing
        self._parsing = None
        if self._chunked:
            self._chunked = False
            self._tail = b""
        if self._last:
            self._broken = True  # the connection's last request: nothing after it is read
        if request is None:
            return
        request.body_complete = True
        request.wake()
        if self._lingering:
            self._close()

    # -- serving ----------------------------------------------------------------------------

    async def _serve(self) -> None:
        """The connection's one task: answers its requests in order, then waits for more
        (one task per connection, not one per request)."""
        handler = self.server.handler
        try:
            while not self.closing:
                if not self.pipeline:
                    self._arm_timer()
                    self._next = self.loop.create_future()
                    try:
                        await self._next  # the next head, or cancelled when the client goes
                    finally:
                        self._next = None
                    continue
                request = self.pipeline[0]
                try:
                    await handler(request)
                except Exception:
                    log.exception("internal_error")
                if not request.finished:
                    if request.started:
                        self.abort()
                    else:
                        error = ProxyError("internal proxy error; see the proxy log")
                        request.respond(
                            error.status, error_headers(error, request_id(None)), error.body()
                        )
                if self.pipeline and self.pipeline[0] is request:
                    self.pipeline.popleft()
                    self.resume_reading()
                if self._write_paused and not self.closing:
                    # Answers the client has not taken yet: no next one on top of them
                    # until it does (or until client_timeout says it will not).
                    try:
                        await self.drain()
                    except ConnectionResetError:
                        break
        finally:
            self.task = None

    def answered(self, request: Request, close: bool) -> None:
        if not close:
            return
        self.closing = True
        if request.body_complete or self.transport is None:
            self._close()
            return
        # The body is still coming: read and drop it for a while, so that closing does
        # not reset the connection before the client has read the answer.
        self._lingering = True
        self.resume_reading()
        self.loop.call_later(LINGER_SECONDS, self._close)

    def _refuse_unparseable(self, error: ProxyError | None) -> None:
        """Answer a request that cannot be served, then close; None: close unanswered."""
        if error is None:
            log.info("bad_http_request", peer=self.remote, reason="http_0_9")
        elif error.status >= 500 and error.status not in (501, 505):
            log.error("internal_error", error=error.message)
        else:
            log.info("bad_http_request", peer=self.remote, reason=error.reason, error=error.message)
        if any(not request.finished for request in self.pipeline):
            # Answer what came before it first, each in turn; the connection ends with
            # the last of them (ending it with the first would drop the others unanswered).
            self.pipeline[-1].keep_alive = False
            if self._parsing is not None:
                self._parsing.body_error = error or BadRequest("malformed HTTP request")
                self._parsing.wake()
            return
        if error is not None:
            self.write(error_answer(error, request_id(None), close=True))
        self._close()

    # -- transport helpers ------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the client is behind on reading; after `client_timeout` seconds in
        which it took nothing, abandon the answer: cut the connection and raise, so the
        handler lets go of its in-flight slot and its upstream connection."""
        transport = self.transport
        while self._write_paused and not self.closing and transport is not None:
            unsent = _unsent(transport)
            self._drain = self.loop.create_future()
            try:
                async with asyncio.timeout(self.server.client_timeout):
                    await self._drain
            except TimeoutError:
                if _unsent(transport) < unsent:
                    continue  # slow, but reading: wait on
                log.info("client_stalled", peer=self.remote)
                self.abort()
                raise ConnectionResetError(
                    "the client read nothing of the answer within listen.client_timeout"
                ) from None
            finally:
                self._drain = None
        if self.closing and transport is not None and transport.is_closing():
            raise ConnectionResetError("the client closed the connection")

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if len(self.pipeline) > 1:
            return  # a request is waiting its turn: no reading ahead yet
        parsing = self._parsing
        if parsing is not None and parsing.buffered > _BODY_BUFFER_HIGH:
            return  # its body waits for the handler to take it
        if self._held:
            # Bytes held back while the pipeline was full: their turn comes first.
            held, self._held = self._held, b""
            self._feed(held)
            if self._held or len(self.pipeline) > 1 or self._broken:
                return
            parsing = self._parsing
            if parsing is not None and parsing.buffered > _BODY_BUFFER_HIGH:
                return
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    # The head timeout (listen.client_timeout) runs from the moment the connection is
    # idle. One timer per connection, re-armed only when it fires, instead of a timer
    # made and cancelled for every request: a request only moves `_idle_since`.

    def _arm_timer(self) -> None:
        self._idle_since = self.loop.time()
        if self._timer is None:
            self._timer = self.loop.call_later(self.server.client_timeout, self._idle_timeout)

    def _cancel_timer(self) -> None:
        self._idle_since = None

    def _stop_timer(self) -> None:
        self._idle_since = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle_timeout(self) -> None:
        timeout = self.server.client_timeout
        since = self._idle_since
        if since is None:  # busy with a request: look again a whole timeout later
            self._timer = self.loop.call_later(timeout, self._idle_timeout)
            return
        idle = self.loop.time() - since
        if idle < timeout:
            self._timer = self.loop.call_later(timeout - idle, self._idle_timeout)
            return
        self._timer = None
        self._close()  # no head (first or next) within listen.client_timeout

    def _close(self) -> None:
        self.closing = True
        self._stop_timer()
        transport = self.transport
        if transport is not None and not self._lost:
            transport.close()
            if transport.get_write_buffer_size():
                # close() waits for the answer to go out: a client that does not take it
                # within client_timeout must not keep the connection forever.
                self.loop.call_later(self.server.client_timeout, self._abort_unsent)

    def _abort_unsent(self) -> None:
        if not self._lost and self.transport is not None:
            self.transport.abort()

    def abort(self) -> None:
        self.closing = True
        self._stop_timer()
        if self.transport is not None:
            self.transport.abort()

    def close_if_idle(self) -> bool:
        if self.pipeline:
            return False
        self._close()
        return True


_TOO_MANY = TooManyConnections("too many connections to the proxy (listen.max_connections)", 1)


class Listener:
    """The proxy port: accepts connections and hands each request to `handler`."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_connections: int,
        client_timeout: float,
        max_header_bytes: int,
    ) -> None:
        self.handler = handler
        self.max_connections = max_connections
        self.client_timeout = client_timeout
        self.max_header_bytes = max_header_bytes
        self.connections: set[_Connection] = set()
        # Refusals over max_connections: one warning, then a count at most once a minute.
        self.refused = Throttled(
            log.warning,
            "too_many_connections",
            schedule=lambda delay, due: self.loop.call_later(delay, due),
        )
        self.draining = False
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "Listener.start() was not called"
        return self._loop

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> int:
        """Listen (on `sock` when given: a socket handed over, see handover); returns the
        bound port."""
        self._loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await self._loop.create_server(
                lambda: _Connection(self), sock=sock, backlog=4096
            )
        else:
            self._server = await self._loop.create_server(
                lambda: _Connection(self), host, port, backlog=4096, reuse_address=True
            )
        sockname = self._server.sockets[0].getsockname()
        return int(sockname[1])

    def handover(self) -> socket.socket | None:
        """A duplicate of the listening socket, for a successor on the same address: it
        keeps the port bound and its backlog queued while this listener closes, so a
        client that connects meanwhile waits instead of being refused. None when the
        listener has no socket or several (a host name that resolves to more than one)."""
        if self._server is None or len(self._server.sockets) != 1:
            return None
        bound = self._server.sockets[0]
        return socket.fromfd(bound.fileno(), bound.family, bound.type)

    def stop_accepting(self) -> None:
        """No new connections; kept-alive ones are closed once their answer is out."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close_if_idle()

    async def close(self, grace: float = 5.0) -> None:
        """Close every connection, giving answers still being written `grace` seconds."""
        self.stop_accepting()
        deadline = time.monotonic() + grace
        while self.connections and time.monotonic() < deadline:
            for conn in list(self.connections):
                conn.close_if_idle()
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        self.refused.flush()
