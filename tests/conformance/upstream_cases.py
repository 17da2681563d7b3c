"""Upstream-side conformance: exact answer bytes from a fake API, what the proxy's client gets.

A case is data: the request a client sends, what the scripted upstream does on receiving
it (write these bytes, pause, close), and what the client must then get: the status (or
the proxy's own error), header fields present and absent, the body bytes, and the fate
of its connection (still in step, or cut off mid-answer so that an incomplete answer can
never pass for a complete one). A follow-up request (the probe) then shows whether the
proxy sent it on the same upstream connection: after a faulty or doubtful answer it must
not. Each case names the RFC 9110/9112 section its expectation rests on; `why` says where
the expectation is a choice among what the RFC allows.

Nothing here imports pytest or the proxy, so a bench script can play the same table
against another proxy (nginx) in front of the same scripted upstream.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from dataclasses import dataclass, field

MiB = 1 << 20

CASE_PREFIX = "/case/"
PROBE = "/upstream-probe"
AUTH_PATH = "/perl/api/v2/auth"  # LuxSci's login, answered by the scripted upstream
PROBE_BODY = b'{"success": 1, "probe": true}'
# The codes the scripted upstream hands out: at login, and inside gzip answers.
LOGIN_CODE = "CODE-LOGIN-1"
GZIP_CODE = "CODE-GZIP-2"


@dataclass(frozen=True, slots=True)
class Close:
    """A script step: the upstream closes the connection."""


CLOSE = Close()

# What the upstream does after reading the case's request: write bytes, pause (seconds), close.
Step = bytes | float | Close

# The client connection's fate after the answer.
KEPT = "kept"  # the answer was complete, and the connection serves the next request
CUT = "cut"  # the head came, then the connection ended before the body did


@dataclass(frozen=True, slots=True)
class UpstreamCase:
    name: str
    rfc: str
    script: tuple[Step, ...]
    # The status the client gets (the API's, or the proxy's own error).
    status: int
    method: str = "GET"
    # The body the client must get, whole (None: not looked at; with CUT: a prefix of it).
    body: bytes | None = None
    has: tuple[tuple[str, str], ...] = ()  # header fields that must arrive, value exact
    lacks: tuple[str, ...] = ()  # header names that must not arrive
    reason: str | None = None  # the reason phrase, where it is the point
    proxy_error: str | None = None  # X-Proxy-Error of the proxy's own answer
    fate: str = KEPT
    # Whether the probe goes out on the case's upstream connection (None: not looked at).
    reused: bool | None = True
    # Seconds to wait before the probe (a surplus answer arriving on an idle connection).
    settle: float = 0.0
    # LuxSci scheme: the auth code the probe must be signed with (harvested from the answer).
    signed_with: str | None = None
    why: str = ""


# -- the scripted upstream ------------------------------------------------------------------------


@dataclass(slots=True)
class Arrival:
    connection: int  # which upstream connection, in accept order
    method: str
    target: str
    head: bytes

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        for line in self.head.split(b"\r\n")[1:]:
            found, _, value = line.partition(b":")
            if found.strip().lower() == key:
                return value.strip().decode("latin-1")
        return None


class ScriptedUpstream:
    """Answers `/case/...` requests with the current case's script, the probe with a plain
    keep-alive 200, and LuxSci's login with a code; records every request and the
    connection it came on."""

    def __init__(self) -> None:
        self.case: UpstreamCase | None = None
        self.arrivals: list[Arrival] = []
        self.port = 0
        self._connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self._connections
        self._connections += 1
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                method, target, _ = head.split(b" ", 2)
                arrival = Arrival(index, method.decode(), target.decode(), head)
                self.arrivals.append(arrival)
                length = arrival.header("Content-Length")
                if length:
                    await reader.readexactly(int(length))
                if arrival.target.startswith(CASE_PREFIX):
                    assert self.case is not None
                    if not await _play(self.case.script, writer):
                        return
                elif arrival.target == AUTH_PATH:
                    login = json.dumps({"success": 1, "auth": LOGIN_CODE}).encode()
                    writer.write(_answer(b"200 OK", login))
                else:
                    writer.write(_answer(b"200 OK", PROBE_BODY))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


async def _play(script: tuple[Step, ...], writer: asyncio.StreamWriter) -> bool:
    """Run a script; False once it has closed the connection."""
    for step in script:
        if isinstance(step, Close):
            await writer.drain()
            writer.close()
            return False
        if isinstance(step, bytes):
            writer.write(step)
            await writer.drain()
        else:
            await asyncio.sleep(step)
    return True


def _answer(status: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        status,
        len(body),
        body,
    )


# -- the client ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    status: int | None = None
    reason: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    fate: str = ""
    reused: bool | None = None
    probe_cookie: str | None = None
    case_requests: int = 0
    problem: str = ""

    def header(self, name: str) -> str | None:
        key = name.lower()
        return next((v for n, v in self.headers if n.lower() == key), None)


class _Cut(Exception):
    """The connection ended before the whole answer arrived."""


async def _read_head(reader: asyncio.StreamReader, outcome: Outcome) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        raise _Cut from e
    lines = head[:-4].decode("latin-1").split("\r\n")
    _, status, *reason = lines[0].split(" ", 2)
    outcome.status = int(status)
    outcome.reason = reason[0] if reason else ""
    outcome.headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        outcome.headers.append((name, value.strip()))


async def _read_body(reader: asyncio.StreamReader, outcome: Outcome, head_only: bool) -> None:
    """The body by the answer's framing; what came is kept when the connection ends early."""
    status = outcome.status or 0
    if head_only or status < 200 or status in (204, 304):
        return
    try:
        if (outcome.header("Transfer-Encoding") or "").lower() == "chunked":
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                outcome.body += (await reader.readexactly(size + 2))[:-2]
            await reader.readuntil(b"\r\n")
        elif (length := outcome.header("Content-Length")) is not None:
            outcome.body = await reader.readexactly(int(length))
        else:
            while chunk := await reader.read(65536):
                outcome.body += chunk
    except asyncio.IncompleteReadError as e:
        outcome.body += e.partial
        raise _Cut from e
    except ConnectionError as e:
        raise _Cut from e


def _request(method: str, target: str) -> bytes:
    body = b'{"n": 1}' if method in ("POST", "PUT", "PATCH") else b""
    length = b"Content-Length: %d\r\n" % len(body) if body else b""
    return b"%s %s HTTP/1.1\r\nHost: conformance\r\n%s\r\n%s" % (
        method.encode(),
        target.encode(),
        length,
        body,
    )


async def run_upstream_case(port: int, case: UpstreamCase, upstream: ScriptedUpstream) -> Outcome:
    """Play `case` through the proxy on `port`, whose upstream is `upstream`."""
    upstream.case = case
    upstream.arrivals.clear()
    outcome = Outcome()
    target = CASE_PREFIX + case.name
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=4 * MiB)
    try:
        async with asyncio.timeout(15):
            writer.write(_request(case.method, target))
            try:
                await _read_head(reader, outcome)
                await _read_body(reader, outcome, case.method == "HEAD")
            except _Cut:
                outcome.fate = CUT
            await asyncio.sleep(case.settle)
            probe = _request("GET", PROBE)
            if not outcome.fate and (outcome.header("Connection") or "").lower() != "close":
                # The same client connection: an answer left half-read would show here.
                writer.write(probe)
                answer = Outcome()
                try:
                    await _read_head(reader, answer)
                    await _read_body(reader, answer, False)
                    in_step = (answer.status, answer.body) == (200, PROBE_BODY)
                except _Cut:
                    in_step = False
                outcome.fate = KEPT if in_step else "out of step"
            else:
                outcome.fate = outcome.fate or "closed"
                writer.transport.abort()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(probe)
                answer = Outcome()
                await _read_head(reader, answer)
                await _read_body(reader, answer, False)
    except (TimeoutError, _Cut) as e:
        outcome.problem = f"the exchange did not finish ({type(e).__name__})"
    finally:
        writer.transport.abort()
    cases = [a for a in upstream.arrivals if a.target == target]
    probes = [a for a in upstream.arrivals if a.target == PROBE]
    outcome.case_requests = len(cases)
    if cases and probes:
        outcome.reused = probes[0].connection == cases[0].connection
        outcome.probe_cookie = probes[0].header("Cookie")
    return outcome


# -- the verdict ----------------------------------------------------------------------------------


def verdict(case: UpstreamCase, outcome: Outcome) -> list[str]:
    """How the outcome differs from the case (empty: it conforms)."""
    problems = [outcome.problem] if outcome.problem else []
    if outcome.case_requests != 1:
        problems.append(f"the upstream got the request {outcome.case_requests} times")
    if outcome.status != case.status:
        problems.append(f"status {outcome.status}, expected {case.status}")
    if case.reason is not None and outcome.reason != case.reason:
        problems.append(f"reason {outcome.reason!r}, expected {case.reason!r}")
    error = outcome.header("X-Proxy-Error")
    if error != case.proxy_error:
        problems.append(f"X-Proxy-Error {error!r}, expected {case.proxy_error!r}")
    if case.proxy_error is not None and not _error_shape(outcome.body):
        problems.append("the proxy's answer lacks its error shape")
    if case.body is not None:
        # Cut off: whatever came must be the start of the body (its end never came).
        cut = case.fate == CUT and case.body.startswith(outcome.body)
        if not (cut or outcome.body == case.body):
            problems.append(f"body {outcome.body[:60]!r}, expected {case.body[:60]!r}")
    for name, value in case.has:
        if outcome.header(name) != value:
            problems.append(f"{name}: {outcome.header(name)!r}, expected {value!r}")
    for name in case.lacks:
        if outcome.header(name) is not None:
            problems.append(f"{name} reached the client: {outcome.header(name)!r}")
    if outcome.fate != case.fate:
        problems.append(f"client connection {outcome.fate}, expected {case.fate}")
    if case.reused is not None and outcome.reused != case.reused:
        problems.append(
            "the probe went on the same upstream connection"
            if outcome.reused
            else f"upstream connection not reused (reused={outcome.reused})"
        )
    if case.signed_with is not None:
        cookie = outcome.probe_cookie or ""
        if f"signature={case.signed_with}:" not in cookie:
            problems.append(f"the probe was not signed with {case.signed_with}")
    return problems


def _error_shape(body: bytes) -> bool:
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("success") == 0 and bool(doc.get("error_message"))


# -- the cases ------------------------------------------------------------------------------------


def _head(status: str, *fields: str) -> bytes:
    return ("\r\n".join([f"HTTP/1.1 {status}", *fields]) + "\r\n\r\n").encode()


def _sized(body: bytes, status: str = "200 OK", *fields: str) -> bytes:
    return _head(status, f"Content-Length: {len(body)}", *fields) + body


def _chunked(*chunks: bytes, trailers: bytes = b"", fields: tuple[str, ...] = ()) -> bytes:
    framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
    head = _head("200 OK", "Transfer-Encoding: chunked", *fields)
    return head + framed + b"0\r\n" + trailers + b"\r\n"


HELLO = b"hello world"
BIG = b"0123456789abcdef" * 12_500  # 200 KB: streamed to the client, not read whole
TRAILERS = b"X-Checksum: abc\r\nSet-Cookie: session=evil\r\n"
LUXSCI_ANSWER = json.dumps({"success": 1, "data": {"rows": [1, 2, 3]}, "auth": GZIP_CODE}).encode()
LUXSCI_BIG = json.dumps(
    {"success": 1, "data": [f"row {i}" for i in range(20_000)], "auth": GZIP_CODE}
).encode()
STRAY = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray"
# mtime=0: the same bytes every time they are made.
GZIP_SMALL = gzip.compress(LUXSCI_ANSWER, mtime=0)
GZIP_BIG = gzip.compress(LUXSCI_BIG, compresslevel=0, mtime=0)  # ~300 KB: streamed

BAD = "upstream_bad_response"
UNREACHABLE = "upstream_unreachable"

UPSTREAM_CASES: tuple[UpstreamCase, ...] = (
    # -- keep-alive and a clean answer
    UpstreamCase(
        "sized-answer-keeps-the-connection",
        "RFC 9112 9.3",
        (_sized(HELLO, "200 OK", "X-Api: yes"),),
        200,
        body=HELLO,
        has=(("X-Api", "yes"),),
    ),
    UpstreamCase(
        "reason-phrase-is-relayed",
        "RFC 9112 4",
        (_sized(HELLO, "200 Totally Fine"),),
        200,
        body=HELLO,
        reason="Totally Fine",
    ),
    UpstreamCase(
        "status-line-without-reason",
        "RFC 9112 4",
        (b"HTTP/1.1 200\r\nContent-Length: 11\r\n\r\n" + HELLO,),
        200,
        body=HELLO,
    ),
    UpstreamCase(
        "http-1.0-keep-alive-is-reused",
        "RFC 9112 9.3, C.2.2",
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 11\r\n\r\n" + HELLO,),
        200,
        body=HELLO,
    ),
    UpstreamCase(
        "connection-close-is-not-reused",
        "RFC 9112 9.6",
        (_sized(HELLO, "200 OK", "Connection: close"), CLOSE),
        200,
        body=HELLO,
        lacks=("Connection",),
        reused=False,
        why="Connection is hop-by-hop: the client's own connection stays open",
    ),
    UpstreamCase(
        "hop-by-hop-fields-are-not-relayed",
        "RFC 9110 7.6.1",
        (
            _sized(
                HELLO,
                "200 OK",
                "Connection: keep-alive, X-Hop",
                "X-Hop: secret",
                "Keep-Alive: timeout=5",
                "Proxy-Authenticate: Basic",
                "X-End: kept",
            ),
        ),
        200,
        body=HELLO,
        has=(("X-End", "kept"),),
        lacks=("X-Hop", "Keep-Alive", "Proxy-Authenticate"),
    ),
    # -- close-delimited bodies
    UpstreamCase(
        "close-delimited-body",
        "RFC 9112 6.3",
        (_head("200 OK", "Content-Type: text/plain") + HELLO, CLOSE),
        200,
        body=HELLO,
        reused=False,
    ),
    UpstreamCase(
        "close-delimited-http-1.0",
        "RFC 9112 6.3",
        (b"HTTP/1.0 200 OK\r\n\r\n" + HELLO, CLOSE),
        200,
        body=HELLO,
        reused=False,
    ),
    UpstreamCase(
        "close-delimited-large-body-in-pieces",
        "RFC 9112 6.3",
        (_head("200 OK") + BIG[:70_000], 0.05, BIG[70_000:], CLOSE),
        200,
        body=BIG,
        reused=False,
    ),
    # -- chunked, trailers, extensions
    UpstreamCase(
        "chunked-keeps-the-connection",
        "RFC 9112 7.1",
        (_chunked(b"hello", b" ", b"world"),),
        200,
        body=HELLO,
    ),
    UpstreamCase(
        "many-small-chunks",
        "RFC 9112 7.1",
        (_chunked(*[bytes([c]) for c in BIG[:2000]]),),
        200,
        body=BIG[:2000],
    ),
    UpstreamCase(
        "trailers-in-the-same-write-are-dropped",
        "RFC 9110 6.5.1, RFC 9112 7.1.2",
        (_chunked(b"hello", b" world", trailers=TRAILERS),),
        200,
        body=HELLO,
        lacks=("X-Checksum", "Set-Cookie"),
        why="trailers are dropped (as nginx does), never merged into the head",
    ),
    UpstreamCase(
        "trailers-in-a-later-write-are-dropped",
        "RFC 9110 6.5.1, RFC 9112 7.1.2",
        (
            _head("200 OK", "Transfer-Encoding: chunked") + b"b\r\nhello world\r\n",
            0.05,
            b"0\r\n" + TRAILERS + b"\r\n",
        ),
        200,
        body=HELLO,
        lacks=("X-Checksum", "Set-Cookie"),
    ),
    UpstreamCase(
        "announced-trailer-field-is-not-relayed",
        "RFC 9110 6.6.2",
        (_chunked(HELLO, trailers=b"X-Checksum: abc\r\n", fields=("Trailer: X-Checksum",)),),
        200,
        body=HELLO,
        lacks=("Trailer", "X-Checksum"),
        why="Trailer is hop-by-hop here: the trailers it announces are dropped",
    ),
    UpstreamCase(
        "trailers-over-the-cap-cut-the-answer",
        "RFC 9112 7.1.2",
        (
            _head("200 OK", "Transfer-Encoding: chunked") + b"2\r\nok\r\n0\r\n",
            b"X-Filler: " + b"f" * 70_000 + b"\r\n\r\n",
        ),
        200,
        body=b"ok",
        fate=CUT,
        reused=False,
        why="the head has gone out: cutting the connection is the only honest end",
    ),
    UpstreamCase(
        "chunk-extensions-are-ignored",
        "RFC 9112 7.1.1",
        (
            _head("200 OK", "Transfer-Encoding: chunked")
            + b'5;name=value;q="a;b"\r\nhello\r\n6;x\r\n world\r\n0;last\r\n\r\n',
        ),
        200,
        body=HELLO,
    ),
    UpstreamCase(
        "invalid-chunk-size-cuts-the-answer",
        "RFC 9112 7.1",
        (_head("200 OK", "Transfer-Encoding: chunked") + b"5\r\nhello\r\nzz\r\n",),
        200,
        body=b"hello",
        fate=CUT,
        reused=False,
    ),
    UpstreamCase(
        "chunk-without-its-crlf-cuts-the-answer",
        "RFC 9112 7.1",
        (_head("200 OK", "Transfer-Encoding: chunked") + b"5\r\nhelloXX0\r\n\r\n",),
        200,
        fate=CUT,
        reused=False,
    ),
    # -- 1xx before the final answer
    UpstreamCase(
        "100-continue-is-skipped",
        "RFC 9110 15.2",
        (b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n" + _sized(HELLO, "201 Created"),),
        201,
        method="POST",
        body=HELLO,
        lacks=("X-Interim",),
    ),
    UpstreamCase(
        "103-early-hints-in-its-own-write-is-skipped",
        "RFC 9110 15.2, RFC 8297",
        (b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n", 0.05, _sized(HELLO)),
        200,
        body=HELLO,
        lacks=("Link",),
        why="1xx are never relayed: the client did not ask for them and gets the final answer",
    ),
    UpstreamCase(
        "several-1xx-are-skipped",
        "RFC 9110 15.2",
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + _sized(HELLO),
        ),
        200,
        body=HELLO,
        lacks=("Link",),
    ),
    UpstreamCase(
        "endless-1xx-are-refused",
        "RFC 9110 5.4",
        (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * 3000,),
        502,
        proxy_error=BAD,
        reused=False,
        why="1xx heads count towards upstream.max_header_bytes",
    ),
    UpstreamCase(
        "unasked-101-switch-is-refused",
        "RFC 9110 7.8, 15.2.2",
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",),
        502,
        proxy_error=BAD,
        reused=False,
    ),
    # -- answers without a body
    UpstreamCase(
        "204-keeps-the-connection",
        "RFC 9110 15.3.5",
        (_head("204 No Content", "X-A: 1"),),
        204,
        body=b"",
        has=(("X-A", "1"),),
    ),
    UpstreamCase(
        "204-with-stray-bytes-is-not-reused",
        "RFC 9112 6.3",
        (_head("204 No Content") + b"stray bytes",),
        204,
        body=b"",
        reused=False,
        why="a 204 ends at its head: what follows is not its body, and the connection goes",
    ),
    UpstreamCase(
        "304-with-length-and-stray-bytes",
        "RFC 9110 8.6, 15.4.5; RFC 9112 6.3",
        (_head("304 Not Modified", "Content-Length: 5", 'ETag: "e1"') + b"stray",),
        304,
        body=b"",
        has=(("ETag", '"e1"'), ("Content-Length", "5")),
        reused=False,
    ),
    UpstreamCase(
        "head-answer-with-length-and-no-body",
        "RFC 9110 9.3.2, RFC 9112 6.3",
        (_head("200 OK", "Content-Length: 1234"),),
        200,
        method="HEAD",
        has=(("Content-Length", "1234"),),
        reused=False,
        why="the parser cannot be told a HEAD answer has no body: that connection is not reused",
    ),
    UpstreamCase(
        "head-answer-followed-by-a-body-it-must-not-have",
        "RFC 9110 9.3.2",
        (_sized(HELLO),),
        200,
        method="HEAD",
        has=(("Content-Length", "11"),),
        reused=False,
    ),
    UpstreamCase(
        "head-answer-chunked",
        "RFC 9110 9.3.2",
        (_head("200 OK", "Transfer-Encoding: chunked"),),
        200,
        method="HEAD",
        lacks=("Content-Length",),
        reused=False,
    ),
    # -- answers cut short
    UpstreamCase(
        "close-before-any-answer",
        "RFC 9110 15.6.3",
        (CLOSE,),
        502,
        proxy_error=UNREACHABLE,
        reused=False,
    ),
    UpstreamCase(
        "close-in-the-middle-of-the-head",
        "RFC 9112 8",
        (b"HTTP/1.1 200 OK\r\nContent-Len", CLOSE),
        502,
        proxy_error=UNREACHABLE,
        reused=False,
    ),
    UpstreamCase(
        "small-body-cut-short-is-a-502",
        "RFC 9112 8",
        (_head("200 OK", "Content-Length: 100") + b"only ten b", CLOSE),
        502,
        proxy_error=UNREACHABLE,
        reused=False,
        why="a small answer is read whole before its head goes out, so a 502 can still be sent",
    ),
    UpstreamCase(
        "large-body-cut-short-cuts-the-answer",
        "RFC 9112 8",
        (_head("200 OK", f"Content-Length: {len(BIG)}") + BIG[:100_000], CLOSE),
        200,
        body=BIG,
        fate=CUT,
        reused=False,
    ),
    UpstreamCase(
        "chunked-body-without-its-last-chunk-cuts-the-answer",
        "RFC 9112 7.1, 8",
        (_head("200 OK", "Transfer-Encoding: chunked") + b"5\r\nhello\r\n", CLOSE),
        200,
        body=b"hello",
        fate=CUT,
        reused=False,
    ),
    # -- more than one answer
    UpstreamCase(
        "two-answers-in-one-write-give-the-first",
        "RFC 9112 9.3",
        (_sized(HELLO, "200 OK", "X-First: 1") + _sized(b"second", "201 Created", "X-Second: 2"),),
        200,
        body=HELLO,
        has=(("X-First", "1"),),
        lacks=("X-Second",),
        reused=False,
    ),
    UpstreamCase(
        "surplus-answer-on-an-idle-connection",
        "RFC 9112 9.3",
        (_sized(HELLO), 0.05, STRAY),
        200,
        body=HELLO,
        reused=False,
        settle=0.3,
        why="bytes nobody asked for close the pooled connection before it is used again",
    ),
    UpstreamCase(
        "junk-after-a-complete-answer-keeps-the-answer",
        "RFC 9112 6.3",
        (_sized(b'{"id": 7}', "201 Created") + b"\x00\x01junk\r\n",),
        201,
        method="POST",
        body=b'{"id": 7}',
        reused=False,
        why="the API has carried the POST out: its answer stands, the connection goes",
    ),
    UpstreamCase(
        "body-longer-than-its-length",
        "RFC 9112 6.3",
        (_head("200 OK", "Content-Length: 5") + HELLO,),
        200,
        body=b"hello",
        reused=False,
    ),
    # -- heads the proxy cannot relay
    UpstreamCase(
        "head-over-the-cap",
        "RFC 9110 5.4",
        (_head("200 OK", *[f"X-Filler-{i}: {'f' * 1000}" for i in range(70)]) + HELLO,),
        502,
        proxy_error=BAD,
        reused=False,
        why="upstream.max_header_bytes (64 KiB) caps what an answer's head may hold",
    ),
    UpstreamCase(
        "endless-head",
        "RFC 9110 5.4",
        (b"HTTP/1.1 200 OK\r\n", *[b"X-Filler: " + b"f" * 1000 + b"\r\n"] * 1000),
        502,
        proxy_error=BAD,
        reused=False,
    ),
    UpstreamCase(
        "not-http-at-all",
        "RFC 9112 2.2",
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n",),
        502,
        proxy_error=BAD,
        reused=False,
    ),
    UpstreamCase(
        "status-code-not-three-digits",
        "RFC 9112 4",
        (b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",),
        502,
        proxy_error=BAD,
        reused=False,
    ),
    UpstreamCase(
        "status-code-over-599",
        "RFC 9110 15",
        (b"HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n",),
        502,
        proxy_error=BAD,
        reused=False,
    ),
    UpstreamCase(
        "http-2.0-status-line",
        "RFC 9112 2.3",
        (b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",),
        502,
        proxy_error=BAD,
        reused=False,
    ),
    UpstreamCase(
        "bare-lf-line-endings",
        "RFC 9112 2.2",
        (b"HTTP/1.1 200 OK\nContent-Length: 11\n\n" + HELLO,),
        502,
        proxy_error=BAD,
        reused=False,
        why="a recipient MAY accept a bare LF; refusing is the stricter, safe choice",
    ),
    UpstreamCase(
        "obs-fold-in-a-field",
        "RFC 9112 5.2",
        (b"HTTP/1.1 200 OK\r\nX-A: one\r\n two\r\nContent-Length: 11\r\n\r\n" + HELLO,),
        502,
        proxy_error=BAD,
        reused=False,
        why="a proxy MUST either replace obs-fold or answer 502: the latter",
    ),
    UpstreamCase(
        "space-before-the-colon",
        "RFC 9112 5.1",
        (b"HTTP/1.1 200 OK\r\nX-A : 1\r\nContent-Length: 11\r\n\r\n" + HELLO,),
        502,
        proxy_error=BAD,
        reused=False,
        why="refused rather than repaired: such an answer is never forwarded",
    ),
    # -- framing: Content-Length and Transfer-Encoding
    UpstreamCase(
        "differing-content-lengths",
        "RFC 9110 8.6, RFC 9112 6.3",
        (_head("200 OK", "Content-Length: 5", "Content-Length: 11") + HELLO,),
        502,
        proxy_error=BAD,
        reused=False,
    ),
    UpstreamCase(
        "repeated-equal-content-lengths",
        "RFC 9110 8.6",
        (_head("200 OK", "Content-Length: 11", "Content-Length: 11") + HELLO,),
        502,
        proxy_error=BAD,
        reused=False,
        why="a recipient MAY accept equal repeats; refusing is the stricter, safe choice",
    ),
    UpstreamCase(
        "content-length-list",
        "RFC 9110 8.6",
        (_head("200 OK", "Content-Length: 11, 11") + HELLO,),
        502,
        proxy_error=BAD,
        reused=False,
    ),
    UpstreamCase(
        "negative-content-length",
        "RFC 9110 8.6, RFC 9112 6.3",
        (_head("200 OK", "Content-Length: -1") + HELLO,),
        502,
        proxy_error=BAD,
        reused=False,
    ),
    UpstreamCase(
        "transfer-encoding-wins-over-content-length",
        "RFC 9112 6.3",
        (
            _head("200 OK", "Content-Length: 3", "Transfer-Encoding: chunked")
            + b"b\r\nhello world\r\n0\r\n\r\n",
        ),
        200,
        body=HELLO,
        lacks=("Content-Length",),
        reused=False,
        why="the pair may be an attack: decoded as chunked, and the connection closed after",
    ),
    UpstreamCase(
        "transfer-coding-other-than-chunked",
        "RFC 9112 6.1, 7",
        (_head("200 OK", "Transfer-Encoding: gzip") + gzip.compress(HELLO, mtime=0), CLOSE),
        502,
        proxy_error=BAD,
        reused=False,
        why="we never offer TE: a coding other than chunked cannot be relayed",
    ),
    # -- answers carrying LuxSci's next auth code
    UpstreamCase(
        "gzip-answer-carries-the-next-code",
        "RFC 9110 8.4.1.3",
        (_sized(GZIP_SMALL, "200 OK", "Content-Encoding: gzip"),),
        200,
        body=GZIP_SMALL,
        has=(("Content-Encoding", "gzip"),),
        signed_with=GZIP_CODE,
        why="relayed as sent (still compressed); the code is read on the side",
    ),
    UpstreamCase(
        "large-chunked-gzip-answer-carries-the-next-code",
        "RFC 9110 8.4.1.3, RFC 9112 7.1",
        (
            _head("200 OK", "Content-Encoding: gzip", "Transfer-Encoding: chunked")
            + b"".join(
                b"%x\r\n%s\r\n" % (len(GZIP_BIG[i : i + 30_000]), GZIP_BIG[i : i + 30_000])
                for i in range(0, len(GZIP_BIG), 30_000)
            )
            + b"0\r\n\r\n",
        ),
        200,
        body=GZIP_BIG,
        signed_with=GZIP_CODE,
    ),
)
