"""JSON the proxy reads itself stays bounded: nesting depth, size parsed, memory.

Behaviour only (status, what reaches the upstream, memory within a generous bound); how
long the event loop is blocked is measured by bench/json_bounds.py, not asserted here.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from conftest import MakeProxy, parse_raw, raw_exchange

from proxy.config import Secret
from proxy.errors import BadRequest
from proxy.jsonbounds import MAX_DEPTH, PARSE_LIMIT, SCAN_LIMIT, nesting_within
from proxy.pipeline.outbound import prepare_body
from proxy.schemes.luxsci import multipart
from proxy.schemes.luxsci.harvest import code_in_body

MiB = 1024 * 1024
JSON_TYPE = "application/json"
FORM_TYPE = "application/x-www-form-urlencoded"

# The shape: 20 MiB of small objects, the most objects per byte json.loads can make.
BIG_ARRAY = b"[" + b"{}," * (20 * MiB // 3) + b"{}]"


def nested(depth: int, opener: bytes = b"[", closer: bytes = b"]") -> bytes:
    return opener * depth + closer * depth


# -- the depth scan -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "within"),
    [
        (nested(MAX_DEPTH), True),
        (nested(MAX_DEPTH + 1), False),
        (b'{"a":' * MAX_DEPTH + b"1" + b"}" * MAX_DEPTH, True),
        (b'{"a":' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1), False),
        (b"[" + b"[1],{}," * 10_000 + b"[]]", True),  # many brackets, shallow
        (b'["' + b"[" * 10_000 + b'"]', True),  # brackets inside a string do not nest
        (b'["\\"' + b"[" * 10_000 + b'\\\\"]', True),  # nor behind escaped quotes
        (b"[" * 100_000, False),  # never closed: as deep as it opens
        (b"]" * 100_000, True),  # a parser stops at the first, at no depth
        (b"[" * (MAX_DEPTH // 2) + nested(MAX_DEPTH // 2) + b"[" * 1000, False),
    ],
    ids=[
        "at-the-limit",
        "one-over",
        "objects-at-the-limit",
        "objects-one-over",
        "wide",
        "in-a-string",
        "escaped-quotes",
        "unclosed",
        "stray-closers",
        "unbalanced-over",
    ],
)
def test_nesting_scan_counts_brackets_outside_strings(doc: bytes, within: bool) -> None:
    assert nesting_within(doc) is within


# -- request bodies -----------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["", FORM_TYPE, JSON_TYPE])
@pytest.mark.parametrize(
    "doc",
    [nested(100_000), b"[" * 100_000, b'{"a":' * 40_000 + b"1" + b"}" * 40_000],
    ids=["100k-deep", "100k-unclosed", "objects-40k-deep"],
)
def test_deeply_nested_json_is_a_400_never_a_recursion_error(content_type: str, doc: bytes) -> None:
    assert len(doc) <= SCAN_LIMIT  # small enough to be looked at: the bound is what stops it
    with pytest.raises(BadRequest, match=f"deeper than {MAX_DEPTH} levels"):
        prepare_body(content_type, doc)


def test_json_at_the_depth_limit_passes() -> None:
    doc = nested(MAX_DEPTH)
    assert prepare_body("", doc)[2] == JSON_TYPE
    assert prepare_body(JSON_TYPE, doc)[0] == doc


def test_a_deeply_nested_multipart_json_part_is_a_400() -> None:
    body = (
        b'--B\r\nContent-Disposition: form-data; name="json"; filename="json.js"\r\n'
        b"Content-Type: application/json\r\n\r\n"
        + b'{"a":' * 50_000
        + b"1"
        + b"}" * 50_000
        + b"\r\n--B--\r\n"
    )
    with pytest.raises(BadRequest, match=f"nests deeper than {MAX_DEPTH} levels"):
        multipart.prepare_upload(body, "B")


def test_a_large_untyped_json_body_is_retyped_without_being_parsed() -> None:
    tracemalloc.start()
    try:
        sent, digest, new_type = prepare_body("", BIG_ARRAY)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (sent is BIG_ARRAY, new_type) == (True, JSON_TYPE)
    assert digest == hashlib.sha256(BIG_ARRAY.strip()).hexdigest()
    # Parsing it took 605 MB; even one copy of the body would be 20 MiB.
    assert peak < 2 * MiB


@pytest.mark.parametrize(
    ("body", "new_type"),
    [
        (b"  \r\n" + BIG_ARRAY + b"\n ", JSON_TYPE),
        (b'{"items": [' + b"1," * (PARSE_LIMIT) + b"1]}", JSON_TYPE),
        (BIG_ARRAY[:-1], None),  # not closed: not sent as JSON
        (b"[" + BIG_ARRAY + b"}", None),  # the wrong closer
        (b"a=" + BIG_ARRAY, None),  # a form after all
    ],
    ids=["padded", "object", "unclosed", "mismatched", "form"],
)
def test_large_untyped_bodies_are_judged_by_their_ends(body: bytes, new_type: str | None) -> None:
    assert len(body) > PARSE_LIMIT
    sent, _, got_type = prepare_body("", body)
    assert (sent is body, got_type) == (True, new_type)


def test_a_large_json_body_goes_on_unchecked() -> None:
    """Over the parse limit the API judges the body: the proxy neither parses nor refuses it."""
    broken = BIG_ARRAY[:-1] + b",]"
    assert prepare_body(JSON_TYPE, broken) == (broken, hashlib.sha256(broken).hexdigest(), None)


@pytest.mark.parametrize("content_type", ["", JSON_TYPE])
def test_nesting_past_the_scan_limit_goes_on_unexamined(content_type: str) -> None:
    """Never parsed, so it cannot recurse: the API judges it."""
    doc = nested(SCAN_LIMIT)
    sent, _, new_type = prepare_body(content_type, doc)
    assert sent is doc
    assert (new_type or content_type) == JSON_TYPE


def test_medium_json_bodies_are_scanned_but_not_parsed() -> None:
    medium = b"[" + b"1," * PARSE_LIMIT + b"1,]"  # invalid, but over the parse limit
    assert PARSE_LIMIT < len(medium) <= SCAN_LIMIT
    assert prepare_body(JSON_TYPE, medium)[0] is medium
    with pytest.raises(BadRequest, match="deeper than"):
        prepare_body(JSON_TYPE, medium[:-1] + nested(MAX_DEPTH + 1) + b"]")


def test_small_json_bodies_are_still_checked() -> None:
    with pytest.raises(BadRequest, match="not valid JSON"):
        prepare_body(JSON_TYPE, b'{"a": ')
    assert prepare_body("", b'[{"a": 1}, [2]]')[2] == JSON_TYPE
    assert prepare_body("", b"[not json]")[2] is None


# -- upstream answers ---------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", [None, "gzip"])
def test_a_deeply_nested_answer_yields_no_code_and_no_error(encoding: str | None) -> None:
    body = b'{"a":' + b"[" * 30_000 + b"]" * 30_000 + b',"auth":"CODE-9"}'
    sent = gzip.compress(body) if encoding else body
    assert code_in_body(sent, encoding) == "CODE-9"
    assert code_in_body(b"[" * 60_000, None) is None


# -- through the proxy --------------------------------------------------------------------------


@dataclass
class Seen:
    head: bytes
    length: int
    digest: str


@dataclass
class Recorder:
    """A raw upstream that reads each request whole, keeps its head and a hash of its body."""

    port: int = 0
    seen: list[Seen] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                digest = hashlib.sha256()
                left = length
                while left:
                    chunk = await reader.read(min(left, 1 << 20))
                    if not chunk:
                        return
                    digest.update(chunk)
                    left -= len(chunk)
                self.seen.append(Seen(head, length, digest.hexdigest()))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder()
    server = await asyncio.start_server(rec.handle, "127.0.0.1", 0)
    rec.port = server.sockets[0].getsockname()[1]
    yield rec
    server.close()
    await server.wait_closed()


def post(body: bytes, content_type: str | None = None) -> bytes:
    typed = b"Content-Type: %s\r\n" % content_type.encode() if content_type else b""
    return (
        b"POST /v1/import HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%sContent-Length: %d\r\n\r\n"
        % (typed, len(body))
        + body
    )


@pytest.mark.timeout(60)
async def test_a_20_mib_untyped_json_body_reaches_the_api_unparsed(
    make_proxy: MakeProxy, recorder: Recorder
) -> None:
    proxy = await make_proxy(
        f"http://127.0.0.1:{recorder.port}",
        auth={"scheme": "bearer", "api_key": Secret("k")},
        listen={"max_body_bytes": 32 * MiB},
    )
    tracemalloc.start()
    try:
        answer = await raw_exchange(proxy.service.port, post(BIG_ARRAY), wait=30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert answer.startswith(b"HTTP/1.1 200")
    (seen,) = recorder.seen
    assert (seen.length, seen.digest) == (len(BIG_ARRAY), hashlib.sha256(BIG_ARRAY).hexdigest())
    assert b"\r\nContent-Type: application/json\r\n" in seen.head
    # Everything in this process: client, proxy and upstream buffers. Parsing alone took 605 MB.
    assert peak < 200 * MiB


@pytest.mark.parametrize("content_type", [None, JSON_TYPE])
async def test_deep_nesting_through_the_proxy_is_a_400(
    make_proxy: MakeProxy, recorder: Recorder, content_type: str | None
) -> None:
    proxy = await make_proxy(
        f"http://127.0.0.1:{recorder.port}", auth={"scheme": "bearer", "api_key": Secret("k")}
    )
    answer = await raw_exchange(proxy.service.port, post(nested(100_000), content_type))
    status, headers, body = parse_raw(answer)
    assert (status, headers["x-proxy-error"]) == (400, "bad_request")
    assert f"deeper than {MAX_DEPTH}" in body["error_message"]
    assert recorder.seen == []
    assert json.dumps(body)  # our error shape, whole
