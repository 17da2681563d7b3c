"""The conformance harness: what a case is, a recording upstream, a raw client, a verdict.

A case is data: the exact bytes a client sends (with pauses where timing is the
point), the answers it must get, whether the connection is then kept or closed,
what must (and must not) reach the upstream, and the RFC 9110/9112 section it
rests on. `run_case` plays one against any HTTP/1.1 server on a port (the proxy,
or nginx in front of the same recording upstream) and `verdict` lists how the
outcome differs from the case. Nothing here imports pytest or the proxy, so that
bench/conformance.py can run the same tables side by side with nginx.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

MiB = 1 << 20

# The path of the request that checks a connection is still in step after a case.
PROBE = "/conformance-probe"


@dataclass(frozen=True, slots=True)
class Limits:
    """The server settings a case needs (the proxy's listen.*; for nginx: the
    client_*_timeout, client_max_body_size and large_client_header_buffers)."""

    client_timeout: float = 2.0
    max_body_bytes: int = MiB
    max_header_bytes: int = 8190


@dataclass(frozen=True, slots=True)
class Await100:
    """A step: read the interim 100 (Continue) answer before sending on."""


AWAIT_100 = Await100()

# What a client does, in order: send bytes, pause for a number of seconds, or wait for 100.
Step = bytes | float | Await100


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as it must arrive upstream."""

    method: str
    target: str
    body: bytes = b""
    # Header fields that must arrive as given (name in any case, value byte for byte).
    has: tuple[tuple[str, bytes], ...] = ()
    # Header names that must not arrive.
    lacks: tuple[str, ...] = ()
    # Bytes that must appear nowhere in what arrives (a smuggled value, a trailer).
    never: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    rfc: str  # the section the expected outcome rests on, e.g. "RFC 9112 6.3"
    send: tuple[Step, ...]
    # Statuses of the answers, in order, 1xx included; () when none may come.
    answers: tuple[int, ...]
    # After the answers: True, the server closes (and sends nothing more); False, the
    # connection stays in step and answers a further request.
    closed: bool
    # What reaches the upstream, in order; None: not looked at; (): nothing may.
    upstream: tuple[Seen, ...] | None = None
    limits: Limits = Limits()
    # Seconds from the last step to the last answer (or the close, when none is due).
    within: float | None = None
    # Indexes of answers that carry no body although their head gives a length (HEAD).
    bodiless: frozenset[int] = frozenset()
    why: str = ""  # where the expectation is a choice among what the RFC allows

    @property
    def deadline(self) -> float:
        """How long the whole exchange may take before it counts as hung."""
        return self.limits.client_timeout * 2 + 5


# -- the recording upstream ----------------------------------------------------------------------


@dataclass(slots=True)
class Arrived:
    """A request exactly as it arrived upstream."""

    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw: bytes  # the head as received, then the body as received (chunked or not)

    def values(self, name: str) -> list[bytes]:
        key = name.lower().encode()
        return [v for n, v in self.headers if n.lower() == key]


class RecordingUpstream:
    """A plain HTTP/1.1 origin: records each request as it arrives, answers 200 with a
    small JSON body (a HEAD gets the head alone), keeps connections alive."""

    def __init__(self) -> None:
        self.arrived: list[Arrived] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, host: str = "127.0.0.1") -> int:
        self._server = await asyncio.start_server(self._serve, host, 0, limit=4 * MiB)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:  # each sees its connection end, and returns
            await asyncio.wait(self._tasks, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                arrived = await _read_request(reader)
                if arrived is None:
                    return
                self.arrived.append(arrived)
                body = json.dumps({"success": 1, "seen": len(self.arrived)}).encode()
                head = (
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body)
                )
                writer.write(head if arrived.method == "HEAD" else head + body)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            writer.transport.abort()


async def _read_request(reader: asyncio.StreamReader) -> Arrived | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head[:-4].split(b"\r\n")
    method, target, _ = lines[0].split(b" ", 2)
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name, value.strip(b" \t")))
    arrived = Arrived(method.decode("latin-1"), target.decode("latin-1"), headers, b"", head)
    lengths = arrived.values("Content-Length")
    if b"chunked" in b",".join(arrived.values("Transfer-Encoding")).lower():
        parts, raw = [], b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            raw += size_line
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                    raw += line  # trailer fields: kept in `raw`, so a case can see them
                raw += line
                break
            data = await reader.readexactly(size + 2)
            raw += data
            parts.append(data[:-2])
        arrived.body = b"".join(parts)
        arrived.raw += raw
    elif lengths:
        arrived.body = await reader.readexactly(int(lengths[0]))
        arrived.raw += arrived.body
    return arrived


# -- the raw client ------------------------------------------------------------------------------


@dataclass(slots=True)
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        key = name.lower()
        return next((v for n, v in self.headers if n.lower() == key), None)


class _Closed(Exception):
    """The server closed before a whole answer arrived."""


async def _read_answer(reader: asyncio.StreamReader, bodiless: bool) -> Answer:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        raise _Closed from e
    lines = head[:-4].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name, value.strip()))
    answer = Answer(status, headers, b"")
    if bodiless or status < 200 or status in (204, 304):
        return answer
    try:
        if (answer.header("Transfer-Encoding") or "").lower() == "chunked":
            parts = []
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append((await reader.readexactly(size + 2))[:-2])
            await reader.readuntil(b"\r\n")
            answer.body = b"".join(parts)
        elif (length := answer.header("Content-Length")) is not None:
            answer.body = await reader.readexactly(int(length))
        else:
            answer.body = await reader.read()  # until the close
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        raise _Closed from e
    return answer


@dataclass(slots=True)
class Outcome:
    answers: list[Answer] = field(default_factory=list)
    closed: bool = False
    extra: bytes = b""  # bytes after the expected answers, before the close
    elapsed: float = 0.0  # from the last step to the last answer (or to the close)
    closed_after: float = 0.0  # from the last answer (or the last step) to the close
    arrived: list[Arrived] = field(default_factory=list)
    problem: str = ""  # the exchange itself went wrong (hung)


PROBE_REQUEST = b"GET " + PROBE.encode() + b" HTTP/1.1\r\nHost: conformance\r\n\r\n"


async def run_case(port: int, case: Case, upstream: RecordingUpstream) -> Outcome:
    """Play `case` against the server on `port`, whose upstream is `upstream`.

    Answers are read as they come, while the steps are still being sent (as a real
    client does): a server that answers early and closes must not have its answer
    lost to the reset that unread data causes.
    """
    upstream.arrived.clear()
    outcome = Outcome()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=4 * MiB)
    answered = asyncio.Event()
    times: list[float] = []  # when each answer was in
    closed_at: list[float] = []

    async def read_answers() -> None:
        try:
            while len(outcome.answers) < len(case.answers):
                index = len(outcome.answers)
                outcome.answers.append(await _read_answer(reader, index in case.bodiless))
                times.append(time.monotonic())
                answered.set()
        except _Closed:
            closed_at.append(time.monotonic())
        finally:
            answered.set()

    reading = asyncio.create_task(read_answers())
    last_step = time.monotonic()
    try:
        async with asyncio.timeout(case.deadline):
            for step in case.send:
                if isinstance(step, bytes):
                    writer.write(step)
                    try:
                        await writer.drain()
                    except ConnectionError:
                        break  # the server closed: what it said is read all the same
                elif isinstance(step, float | int):
                    await asyncio.sleep(step)
                else:  # wait for the next answer (the interim 100) before going on
                    count = len(outcome.answers)
                    while len(outcome.answers) == count and not reading.done():
                        answered.clear()
                        await answered.wait()
            last_step = time.monotonic()
            await reading
            if not closed_at:
                if case.closed:
                    outcome.extra = await _rest(reader)
                    closed_at.append(time.monotonic())
                elif not await _probe(reader, writer):
                    closed_at.append(time.monotonic())
    except TimeoutError:
        outcome.problem = f"no outcome within {case.deadline:g} s"
    finally:
        reading.cancel()
        writer.transport.abort()
    outcome.closed = bool(closed_at)
    last_answer = times[-1] if times else last_step
    if times:
        outcome.elapsed = max(0.0, times[-1] - last_step)
    elif closed_at:
        outcome.elapsed = max(0.0, closed_at[0] - last_step)
    if closed_at:
        outcome.closed_after = max(0.0, closed_at[0] - last_answer)
    outcome.arrived = [a for a in upstream.arrived if a.target != PROBE]
    return outcome


async def _rest(reader: asyncio.StreamReader) -> bytes:
    """What arrives until the server closes."""
    data = b""
    try:
        while chunk := await reader.read(65536):
            data += chunk
    except ConnectionError:
        pass
    return data


async def _probe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Whether the connection still serves a request."""
    try:
        writer.write(PROBE_REQUEST)
        answer = await _read_answer(reader, False)
    except (_Closed, ConnectionError):
        return False
    return answer.status == 200


# -- the verdict ---------------------------------------------------------------------------------


def verdict(
    case: Case, outcome: Outcome, *, close_within: float, proxy_errors: bool = True
) -> list[str]:
    """How the outcome differs from the case (empty: it conforms).

    `close_within`: seconds from the last answer to the close, when the case expects
    one (the server's linger after an answer, and some slack): a server that keeps
    the connection until its idle timeout has not closed it. `proxy_errors`: the
    server's own error answers must have the proxy's shape (off for nginx).
    """
    problems = [outcome.problem] if outcome.problem else []
    statuses = tuple(a.status for a in outcome.answers)
    if statuses != case.answers:
        problems.append(f"answers {statuses}, expected {case.answers}")
    if outcome.closed != case.closed:
        problems.append("closed" if outcome.closed else "kept open (expected closed)")
    elif case.closed and outcome.closed_after > close_within:
        problems.append(f"closed only {outcome.closed_after:.2f} s after the last answer")
    if case.closed and outcome.extra:
        problems.append(f"bytes after the answers: {outcome.extra[:80]!r}")
    if case.within is not None and outcome.elapsed > case.within:
        problems.append(f"took {outcome.elapsed:.2f} s, expected within {case.within:g} s")
    if proxy_errors:
        for answer in outcome.answers:
            if answer.status >= 400 and not _proxy_error(answer):
                problems.append(f"{answer.status} without the proxy's error shape")
    if case.upstream is not None:
        problems += _compare_upstream(case.upstream, outcome.arrived)
    return problems


def _proxy_error(answer: Answer) -> bool:
    if not answer.header("X-Proxy-Error"):
        return False
    try:
        doc = json.loads(answer.body)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("success") == 0 and bool(doc.get("error_message"))


def _compare_upstream(expected: tuple[Seen, ...], arrived: list[Arrived]) -> list[str]:
    if len(arrived) != len(expected):
        got = [f"{a.method} {a.target}" for a in arrived]
        return [f"upstream got {len(arrived)} requests {got[:5]}, expected {len(expected)}"]
    problems = []
    for n, (seen, got) in enumerate(zip(expected, arrived, strict=True)):
        where = f"upstream request {n}"
        if (got.method, got.target) != (seen.method, seen.target):
            problems.append(
                f"{where}: {got.method} {got.target}, expected {seen.method} {seen.target}"
            )
        if got.body != seen.body:
            problems.append(f"{where}: body {got.body[:60]!r}, expected {seen.body[:60]!r}")
        for name, value in seen.has:
            if got.values(name) != [value]:
                problems.append(f"{where}: {name} {got.values(name)}, expected [{value!r}]")
        for name in seen.lacks:
            if got.values(name):
                problems.append(f"{where}: has {name}: {got.values(name)}")
        for needle in seen.never:
            if needle.lower() in got.raw.lower():
                problems.append(f"{where}: carries {needle!r}")
    return problems
