"""The one place that talks to the upstream API: a keep-alive HTTP/1.1 pool, TLS, errors.

A small client on asyncio protocols and httptools' C parser, not aiohttp's
`ClientSession`: the proxy needs none of a general client's per-request work
(URL objects, cookie jar, redirects, trace hooks, automatic headers), and on
the hot path that work cost more than everything else the proxy does (bench/
ANALYSIS.md: ~140 µs of ~230 µs per request for a bare aiohttp proxy).

Only `upstream.url` is ever contacted (through a CONNECT tunnel when an egress proxy
is configured: tunnel.py). Callers pass the raw path and query,
which go on the wire byte-for-byte, so what the signer signed is exactly what
the server sees. Callers only ever see ProxyError subclasses.

One request gets one answer, framed by RFC 9112 and nothing else: 1xx interim
answers are skipped; the head (1xx heads included) and the trailer section are
capped at `upstream.max_header_bytes`; trailers are dropped, never merged into
the head; whatever follows the end of the answer (a second answer, junk, bytes
after a 204) is never parsed as part of it, and the connection is discarded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import ssl
from collections.abc import Mapping
from types import TracebackType
from typing import cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import UpstreamConfig
from proxy.egress import choose as choose_egress
from proxy.errors import ProxyError, UpstreamBadResponse, UpstreamTimeout, UpstreamUnreachable
from proxy.http import tunnel
from proxy.http.body import Body
from proxy.http.headers import decode_headers

# Request bodies go out in pieces this size, each after the socket buffer has drained.
_WRITE_CHUNK = 256 * 1024
# Stop reading from the socket while this much body waits for the caller (backpressure).
_BUFFER_HIGH = 256 * 1024
# A pooled connection unused this long is closed rather than risked: servers drop idle
# keep-alive connections, and one dropped just as a request goes out is a failed request.
IDLE_TIMEOUT = 15.0
# Requests that carry a body by their nature: these send `Content-Length: 0` when empty.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class _Stop(Exception):
    """Raised in a parser callback to stop httptools mid-buffer: what follows is not this
    exchange's to parse (a second answer; bytes after the head of a HEAD answer)."""


class ConnectFailed(UpstreamUnreachable):
    """The connection was never made, so the request certainly did not reach the API."""


class StaleConnection(UpstreamUnreachable):
    """A kept-alive connection closed with not a byte of answer: most likely the server
    dropped it as idle just as the request went out. Whether to send the request again
    (on a fresh connection) is the retry policy's call, counted like any attempt: the
    client never resends on its own."""


def make_ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """System trust store plus `ca_file`; hostname checked; TLS 1.2 or newer."""
    ctx = ssl.create_default_context()
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def request_head(method: str, target: str, host: str, lines: bytes, length: int) -> bytes:
    """The request line and headers (`lines`: header lines as bytes). `length` < 0: no
    Content-Length header."""
    # The target was decoded from the client's bytes (surrogateescape): the same bytes
    # go on, so what was signed is what the server sees.
    start = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n".encode("utf-8", "surrogateescape")
    if length < 0:
        return start + lines + b"\r\n"
    return b"%s%sContent-Length: %d\r\n\r\n" % (start, lines, length)


class UpstreamResponse:
    """One response: the head at once, the body read whole or chunk by chunk.

    `release()` (or leaving `async with`) hands the connection back to the pool when
    the body was read to its end, and closes it otherwise.
    """

    __slots__ = ("_conn", "content_length", "headers", "raw_headers", "reason", "status")

    def __init__(
        self,
        conn: _Connection,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        content_length: int | None,
        raw_headers: list[tuple[bytes, bytes]],
    ) -> None:
        self._conn: _Connection | None = conn
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content_length = content_length
        # As received: for passing headers on without decoding and encoding them again.
        self.raw_headers = raw_headers

    async def readany(self) -> bytes:
        """The next piece of the body; b"" at its end."""
        conn = self._conn
        if conn is None:
            return b""
        return await conn.next_chunk()

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finish()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class _Connection(asyncio.Protocol):
    """One connection to the upstream, serving one request at a time."""

    def __init__(self, pool: Upstream) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        # RFC 9112 6.3: Transfer-Encoding overrides Content-Length. llhttp refuses the pair
        # outright; this lets it frame such an answer by Transfer-Encoding, and the
        # connection is then not reused (on_headers_complete).
        self.parser.set_dangerous_leniencies(lenient_chunked_length=True)
        self.max_head = pool.cfg.max_header_bytes
        self.closed = False
        self.idle_since = 0.0
        # Exchanges completed on this connection, and when the current request went out.
        self.served = 0
        self._sent_at = 0.0
        # The request under way.
        self._head: asyncio.Future[UpstreamResponse] | None = None
        self._head_only = False
        # The answer's head is still to come, and what it (with any 1xx heads) has taken.
        self._in_head = False
        self._head_bytes = 0
        # Bytes of reads in a row that carried no body data: the trailer section, or chunk
        # framing. httptools gathers a trailer field whole before it reports it, so this
        # bounds one endless field; _trailer_bytes sums the fields it reports.
        self._quiet = 0
        self._trailer_bytes = 0
        # The framing was doubtful (Transfer-Encoding with Content-Length, or in HTTP/1.0):
        # the answer is read as Transfer-Encoding says, and the connection never reused.
        self._no_reuse = False
        self._reason = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._body_waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._keep_alive = False
        self._eof_body = False
        # The answer came before the whole request body was sent.
        self._body_unsent = False
        self._error: ProxyError | None = None
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None
        # An answer (head or body) is awaited: silence counts against the read timeout.
        self._expecting = False
        self._drain: asyncio.Future[None] | None = None
        self._paused = False
        self._reading_paused = False

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._head is None or self._complete:
            # Bytes nobody asked for, or after the end of the answer (a second answer, junk,
            # a body after a 204): the connection's state is unknown, so it is never reused.
            # An answer already complete stands; its body is buffered.
            self.close()
            return
        self._last_data = self.loop.time()
        try:
            if self._in_head:
                if len(data) > self.max_head - self._head_bytes:
                    self._feed_past_cap(data)
                    return
                self._head_bytes += len(data)
                self.parser.feed_data(data)
                return
            buffered = self._buffered
            self.parser.feed_data(data)
            if self._buffered != buffered:
                self._quiet = 0
            else:
                self._quiet += len(data)
                if self._quiet > self.max_head:
                    raise self._trailers_too_large()
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamBadResponse(f"{self.pool.where} switched protocols unasked"))
        except httptools.HttpParserError as e:
            self._parse_error(e)
        except ProxyError as e:
            self._fail(e)

    def _feed_past_cap(self, data: bytes) -> None:
        """A read that takes the answer past the head's cap: the head must end within it.
        Fed in two parts (views, no copies), so the parser never holds more of a head."""
        room = self.max_head - self._head_bytes
        view = memoryview(data)
        self._head_bytes = self.max_head
        self.parser.feed_data(view[:room])
        if self._in_head:
            raise UpstreamBadResponse(
                f"{self.pool.where} sent an answer head over {self.max_head} bytes "
                "(upstream.max_header_bytes)"
            )
        if self._complete:
            self.close()  # a whole bodiless answer, then more: see data_received
            return
        self.parser.feed_data(view[room:])

    def _trailers_too_large(self) -> UpstreamBadResponse:
        return UpstreamBadResponse(
            f"{self.pool.where} sent trailers (or chunk framing) over {self.max_head} bytes "
            "(upstream.max_header_bytes)"
        )

    def _parse_error(self, error: httptools.HttpParserError) -> None:
        if self._complete:
            # The answer ended before what the parser stopped at (a second answer, junk):
            # the answer stands, the connection goes.
            self.close()
            return
        cause = error.__context__  # what a callback of ours raised, if one did
        if isinstance(cause, ProxyError):
            self._fail(cause)
        else:
            self._fail(
                UpstreamBadResponse(f"{self.pool.where} sent an invalid HTTP response ({error})")
            )

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self._head is not None and not self._head.done():
            message = f"{self.pool.where} closed the connection without answering"
            silent = self._last_data == self._sent_at
            self._fail(
                StaleConnection(message) if self.served and silent else UpstreamUnreachable(message)
            )
        elif not self._complete and self._eof_body and self._error is None:
            # A body delimited by the end of the connection has just ended.
            self._complete = True
            self._wake()
        elif not self._complete:
            self._fail(UpstreamUnreachable(f"{self.pool.where} sent a broken response body"))
        self._wake_writer()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        # The server is taking the body: a slow upload is progress, not silence.
        self._last_data = self.loop.time()
        self._wake_writer()

    def _wake_writer(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            # A second answer to one request, in the same read: never merged into the
            # first (RFC 9112 9.3: answers arrive in request order, one each).
            raise _Stop

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:
            self._raw_headers.append((name, value))
        else:
            # httptools reports trailer fields as headers. They are counted and dropped,
            # never merged into the head (RFC 9110 6.5.1, RFC 9112 7.1.2; nginx drops them).
            self._trailer_bytes += len(name) + len(value) + 4
            if self._trailer_bytes > self.max_head:
                raise self._trailers_too_large()

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            # 1xx interim answers (100 Continue, 103 Early Hints; we never ask for them)
            # are skipped. Their bytes count towards the head's cap, so an endless run of
            # them is refused like an endless head.
            self._raw_headers = []
            self._reason = b""
            return
        version = self.parser.get_http_version()
        if status > 599 or status < 100 or version[:2] != "1.":
            # RFC 9110 15: three digits, 100-599; llhttp also takes HTTP/0.9 and 2.0 lines.
            raise UpstreamBadResponse(
                f"{self.pool.where} sent an invalid status line (HTTP/{version} {status})"
            )
        self._in_head = False
        headers = CIMultiDict(decode_headers(self._raw_headers))
        length_text = headers.get("Content-Length")
        has_body = status not in (204, 304) and not self._head_only
        coded = "Transfer-Encoding" in headers
        if coded:
            codings = headers.getall("Transfer-Encoding")
            if has_body and (len(codings) != 1 or codings[0].lower() != "chunked"):
                self._check_transfer_coding(codings)
            # RFC 9112 6.1, 6.3: Transfer-Encoding wins over Content-Length; the pair, or
            # Transfer-Encoding in HTTP/1.0, is faulty framing: close after this answer.
            length = None
            self._no_reuse = length_text is not None or version == "1.0"
        else:
            length = int(length_text) if length_text is not None and length_text.isdigit() else None
        self._eof_body = length is None and not coded and has_body
        response = UpstreamResponse(
            self,
            status,
            self._reason.decode("latin-1"),
            CIMultiDictProxy(headers),
            length,
            self._raw_headers,
        )
        if self._head_only:
            self._complete = True
            self._expecting = False
        # An answer before the whole body was sent (say 413) ends the upload.
        self._wake_writer()
        head = self._head
        if head is not None and not head.done():
            head.set_result(response)
        if self._head_only:
            # The parser cannot be told a HEAD answer has no body: it is stopped here, and
            # the connection is never reused (what follows the head is not a body).
            raise _Stop

    def _check_transfer_coding(self, values: list[str]) -> None:
        """Only `chunked` can be relayed: TE is hop-by-hop, and we never offer other codings."""
        codings = [c.strip().lower() for value in values for c in value.split(",") if c.strip()]
        if codings != ["chunked"]:
            raise UpstreamBadResponse(
                f"{self.pool.where} sent Transfer-Encoding {', '.join(codings)!r}: "
                "only chunked can be relayed"
            )

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > _BUFFER_HIGH and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        self._wake()

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() < 200:
            return
        self._complete = True
        # Asked now: the parser forgets the answer's framing once the message is over.
        self._keep_alive = self.parser.should_keep_alive() and not self._no_reuse
        self._expecting = False
        self._wake()

    # -- the exchange -----------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: ProxyError) -> None:
        if self._error is None:
            self._error = error
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        self._wake()
        self.close()

    def close(self) -> None:
        self.closed = True
        self._stop_timer()
        self._wake_writer()
        if self.transport is not None:
            # abort, not close: close would first flush what is still buffered, and a
            # server that has stopped reading would keep this connection alive forever.
            self.transport.abort()

    # The read timeout. One timer per connection, re-armed only when it fires, rather
    # than one made and cancelled per request: an exchange only sets `_expecting`.

    def _arm_timer(self) -> None:
        self._expecting = True
        if self._timer is None:
            self._timer = self.loop.call_later(self.pool.read_timeout, self._check_silence)

    def _check_silence(self) -> None:
        """The longest silence while an answer is awaited."""
        if not self._expecting:
            self._timer = None  # nothing awaited: the next exchange arms it again
            return
        timeout = self.pool.read_timeout
        if self._reading_paused:
            # Silence of our own making: the caller has not taken what is buffered yet.
            self._last_data = self.loop.time()
        idle = self.loop.time() - self._last_data
        if idle >= timeout:
            self._timer = None
            self._fail(UpstreamTimeout(f"{self.pool.where} did not answer in time"))
        else:
            self._timer = self.loop.call_later(timeout - idle, self._check_silence)

    def _stop_timer(self) -> None:
        self._expecting = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def exchange(self, head: bytes, body: bytes | Body, head_only: bool) -> UpstreamResponse:
        transport = self.transport
        assert transport is not None
        self._head = self.loop.create_future()
        self._head_only = head_only
        self._in_head = True
        self._head_bytes = 0
        self._quiet = 0
        self._trailer_bytes = 0
        self._no_reuse = False
        self._reason = b""
        self._raw_headers = []
        self._body.clear()
        self._buffered = 0
        self._complete = False
        self._keep_alive = False
        self._eof_body = False
        self._body_unsent = False
        self._last_data = self._sent_at = self.loop.time()
        self._arm_timer()
        # A body in memory (nearly all of them) that is small goes out with the head.
        data = body.in_memory if isinstance(body, Body) else body
        try:
            if data is not None and len(data) <= _WRITE_CHUNK:
                transport.write(head + data if data else head)
            else:
                transport.write(head)
                await self._write_body(body)
            return await self._head
        except BaseException:
            # Cancelled, or failed: the connection is mid-exchange and cannot be reused.
            self.close()
            self.pool.forget(self)
            raise

    async def _write_body(self, body: bytes | Body) -> None:
        transport = self.transport
        assert transport is not None
        head = self._head
        assert head is not None
        # From the start every time: a retry sends the same body again (a spooled one is
        # read from its file, a piece at a time, as the socket takes it).
        if isinstance(body, Body):
            pieces = body.pieces(_WRITE_CHUNK)
        else:
            view = memoryview(body)
            pieces = (view[i : i + _WRITE_CHUNK] for i in range(0, len(view), _WRITE_CHUNK))
        for piece in pieces:
            if self.closed:
                return  # the head future holds the error, and the caller raises it
            if head.done():
                # Answered early: the rest is never sent, and the connection cannot be reused.
                self._body_unsent = True
                return
            transport.write(piece)
            if self._paused:
                self._drain = self.loop.create_future()
                try:
                    await self._drain
                finally:
                    self._drain = None

    async def next_chunk(self) -> bytes:
        while True:
            if self._body:
                chunk = self._body.popleft()
                self._buffered -= len(chunk)
                if self._reading_paused and self._buffered <= _BUFFER_HIGH // 2:
                    self._reading_paused = False
                    self.transport.resume_reading()  # type: ignore[union-attr]
                return chunk
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            self._body_waiter = self.loop.create_future()
            try:
                await self._body_waiter
            finally:
                self._body_waiter = None

    def finish(self) -> None:
        """The caller is done with the response: back to the pool, or closed."""
        self._expecting = False
        self._head = None
        done = self._complete and not self._body and self._error is None
        reusable = (
            not self.closed and not self._head_only and not self._body_unsent and self._keep_alive
        )
        if done and reusable:
            self.pool.put_back(self)
        else:
            self.close()
            self.pool.forget(self)


class Upstream:
    """A keep-alive pool to `upstream.url`, at most `upstream.pool_size` connections.

    `env`: where HTTPS_PROXY and the like are read when the config does not say
    (default: the process environment)."""

    def __init__(self, cfg: UpstreamConfig, env: Mapping[str, str] | None = None) -> None:
        self.cfg = cfg
        # The egress proxy this origin is reached through, or None: directly. A pool has one
        # origin, so its connections are all tunnels to it, and reusing one reuses a tunnel.
        self.egress = choose_egress(cfg, os.environ if env is None else env)
        parts = urlsplit(cfg.url)
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.scheme == "https" else 80)
        self.where = parts.netloc
        # The Host header: the port only when it is not the scheme's default.
        self.host_header = parts.netloc.rpartition("@")[2]
        self.read_timeout = cfg.read_timeout
        self._ssl: ssl.SSLContext | None = None
        self._idle: collections.deque[_Connection] = collections.deque()
        self._open: set[_Connection] = set()
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "Upstream.start() was not called"
        return self._loop

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.scheme == "https":
            self._ssl = make_ssl_context(self.cfg.ca_file)
        # No sweeper yet: put_back starts it once there is an idle connection to close.

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()
        # Let the transports run their close callbacks before the loop goes away.
        await asyncio.sleep(0)

    @property
    def open_connections(self) -> int:
        return len(self._open)

    # -- pool bookkeeping (called by connections) ------------------------------------------

    def put_back(self, conn: _Connection) -> None:
        conn.served += 1
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(IDLE_TIMEOUT, self._sweep)
        self._wake_one()

    def forget(self, conn: _Connection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            self._wake_one()
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    def _wake_one(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        limit = self.loop.time() - IDLE_TIMEOUT
        while self._idle and self._idle[0].idle_since < limit:
            conn = self._idle.popleft()
            conn.close()
        # Again when the oldest idle connection is due (sweeps at least IDLE_TIMEOUT / 3
        # apart), and not at all once none is idle: an idle proxy has no timer to wake it.
        self._sweeper = None
        if self._idle:
            due = self._idle[0].idle_since + IDLE_TIMEOUT - self.loop.time()
            self._sweeper = self.loop.call_later(max(IDLE_TIMEOUT / 3, due), self._sweep)

    # -- requests ---------------------------------------------------------------------------

    def _reuse(self) -> _Connection | None:
        """An idle kept-alive connection, if there is one still open."""
        while self._idle:
            # Most recently used first: the warmest, least likely to have been dropped.
            conn = self._idle.pop()
            if not conn.closed and not conn.transport.is_closing():  # type: ignore[union-attr]
                return conn
        return None

    async def _connection(self, fresh: bool = False) -> _Connection:
        while True:
            conn = None if fresh else self._reuse()
            if conn is not None:
                return conn
            if fresh and self._idle and len(self._open) >= self.cfg.pool_size:
                oldest = self._idle.popleft()  # make room: the oldest idle one goes
                oldest.close()
                self.forget(oldest)
                continue
            if len(self._open) < self.cfg.pool_size:
                return await self._connect()
            waiter = self.loop.create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass the turn on
                raise

    async def _connect(self) -> _Connection:
        conn = _Connection(self)
        self._open.add(conn)
        try:
            if self.egress is not None:
                await tunnel.dial(
                    self.loop,
                    self.egress,
                    self.host,
                    self.port,
                    self.where,
                    self._ssl,
                    conn,
                    self.cfg.connect_timeout,
                    self.cfg.max_header_bytes,
                )
            else:
                async with asyncio.timeout(self.cfg.connect_timeout):
                    await self.loop.create_connection(
                        lambda: conn,
                        self.host,
                        self.port,
                        ssl=self._ssl,
                        server_hostname=self.host if self._ssl is not None else None,
                    )
        except BaseException as e:
            self.forget(conn)
            if isinstance(e, tunnel.TunnelFailed):
                # The tunnel never carried a byte of the request: a connection never made.
                raise ConnectFailed(e.message) from e
            if isinstance(e, ssl.SSLCertVerificationError):
                raise ConnectFailed(
                    f"TLS certificate of {self.where} was not accepted: {e.verify_message}"
                ) from e
            if isinstance(e, TimeoutError):
                raise ConnectFailed(f"cannot connect to {self.where}: timed out") from e
            if isinstance(e, OSError):
                reason = e.strerror or type(e).__name__
                raise ConnectFailed(f"cannot connect to {self.where}: {reason}") from e
            raise
        return conn

    async def request(
        self,
        method: str,
        path: str,
        query: str,
        lines: bytes,
        body: bytes | Body,
        fresh: bool = False,
        has_query: bool = False,
    ) -> UpstreamResponse:
        """Send one request; returns once the response head is in. Caller releases it.

        `lines`: the header lines, `Name: value\\r\\n` each (Host and Content-Length
        are added here). `fresh`: on a new connection, not a kept-alive one (the attempt
        after a StaleConnection). `has_query`: the client sent a `?`, so one goes on even
        with an empty query (`/p?` stays `/p?`: the target as signed, byte for byte)."""
        target = f"{path}?{query}" if query or has_query else path
        size = body.size if isinstance(body, Body) else len(body)
        length = size if size or method in _BODY_METHODS else -1
        head = request_head(method, target, self.host_header, lines, length)
        return await self._send(head, body, method == "HEAD", fresh)

    async def _send(
        self, head: bytes, body: bytes | Body, head_only: bool, fresh: bool = False
    ) -> UpstreamResponse:
        # A kept-alive connection is the usual case: taken without a coroutine of its own.
        conn = None if fresh else self._reuse()
        if conn is None:
            conn = await self._connection(fresh)
        try:
            return await conn.exchange(head, body, head_only)
        except ProxyError:
            raise
        except (OSError, ssl.SSLError) as e:
            raise UpstreamUnreachable(
                f"connection to {self.where} failed: {type(e).__name__}"
            ) from e
