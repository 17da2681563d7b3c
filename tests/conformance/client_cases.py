"""The client side: what a client may send the proxy, and what must come of it.

Framing and smuggling (Content-Length and Transfer-Encoding in every combination and
spelling, chunk sizes, extensions, trailers, line endings), the request line and
target, Host, hop-by-hop fields, Expect, pipelining, upgrades, header syntax, and
slow or stalled clients. Every refusal that leaves the framing in doubt closes the
connection (RFC 9112 9.6 / 11.2): the next bytes cannot be trusted to start a request.

A refusal of a request that was read whole (its target, its method, its size once
all of it is in) keeps the connection: the next request can be found.

Requests go to `/c` on a Bearer-scheme proxy in front of a recording upstream; the
upstream's own Host and the proxy's credentials are added on the way, so cases look
at the fields they are about.
"""

from __future__ import annotations

import contextlib
import ssl

from .cases import AWAIT_100, Case, Limits, Seen, Step

H = "Host: conformance"
# Timeouts short enough for a suite, long enough for a loaded 2-core machine.
STALL = Limits(client_timeout=0.5)
SMALL_BODY = Limits(max_body_bytes=1000, client_timeout=5.0)
SMALL_HEAD = Limits(max_header_bytes=1024)
DEFAULT = Limits()


def req(line: str, *fields: str, body: bytes = b"") -> bytes:
    """A request as bytes: the request line and header lines as written (CRLF added)."""
    return ("\r\n".join((line, *fields)) + "\r\n\r\n").encode("latin-1") + body


def get(target: str = "/c", *fields: str) -> bytes:
    return req(f"GET {target} HTTP/1.1", H, *fields)


def post(body: bytes, *fields: str, target: str = "/c") -> bytes:
    return req(f"POST {target} HTTP/1.1", H, f"Content-Length: {len(body)}", *fields, body=body)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def chunked(
    body: bytes, *fields: str, te: str = "chunked", line: str = "POST /c HTTP/1.1"
) -> bytes:
    """A chunked request; `body` is the framed body as sent (chunks, last chunk, trailers)."""
    return req(line, H, f"Transfer-Encoding: {te}", *fields) + body


HELLO = chunk(b"hello") + b"0\r\n\r\n"


def sized(
    body: bytes,
    method: str = "POST",
    *,
    has: tuple[tuple[str, bytes], ...] = (),
    lacks: tuple[str, ...] = (),
    never: tuple[bytes, ...] = (),
) -> Seen:
    """A request arriving upstream with `body`, framed by a Content-Length, never chunked."""
    return Seen(
        method,
        "/c",
        body,
        has=(("Content-Length", str(len(body)).encode()), *has),
        lacks=("Transfer-Encoding", *lacks),
        never=never,
    )


def case(
    name: str,
    rfc: str,
    send: bytes | tuple[Step, ...],
    answers: tuple[int, ...],
    *,
    closed: bool,
    upstream: tuple[Seen, ...] | None = None,
    limits: Limits = DEFAULT,
    within: float | None = None,
    bodiless: frozenset[int] = frozenset(),
    why: str = "",
) -> Case:
    steps = (send,) if isinstance(send, bytes) else send
    return Case(name, rfc, steps, answers, closed, upstream, limits, within, bodiless, why)


def refused(
    name: str,
    rfc: str,
    send: bytes | tuple[Step, ...],
    status: int = 400,
    *,
    closed: bool = True,
    limits: Limits = DEFAULT,
    within: float | None = None,
    why: str = "",
) -> Case:
    """Answered `status`, nothing upstream; the connection closed, unless the request
    was read whole and so the next one can be (`closed=False`)."""
    return case(
        name,
        rfc,
        send,
        (status,),
        closed=closed,
        upstream=(),
        limits=limits,
        within=within,
        why=why,
    )


def tls_client_hello() -> bytes:
    """The first bytes a TLS client sends to a port that speaks plain HTTP."""
    ctx = ssl.create_default_context()
    out = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname="conformance.test")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return out.read()


def pipelined(count: int) -> Case:
    return case(
        f"pipeline-{count}-gets-in-one-write",
        "RFC 9112 9.3.2",
        b"".join(get(f"/c/{n}") for n in range(count)),
        (200,) * count,
        closed=False,
        upstream=tuple(Seen("GET", f"/c/{n}") for n in range(count)),
        why="past 64 parsed ahead the rest waits unparsed (reading paused): all answered in order",
    )


# -- Content-Length ------------------------------------------------------------------------------

CONTENT_LENGTH = [
    case(
        "cl-exact",
        "RFC 9112 6.2",
        post(b"hello"),
        (200,),
        closed=False,
        upstream=(sized(b"hello"),),
    ),
    case(
        "cl-zero", "RFC 9112 6.2", post(b""), (200,), closed=False, upstream=(Seen("POST", "/c"),)
    ),
    case(
        "cl-leading-zeros",
        "RFC 9110 8.6",
        req("POST /c HTTP/1.1", H, "Content-Length: 005", body=b"hello"),
        (200,),
        closed=False,
        upstream=(sized(b"hello"),),
    ),
    case(
        "cl-trailing-whitespace",
        "RFC 9110 5.5",
        req("POST /c HTTP/1.1", H, "Content-Length: 5 \t", body=b"hello"),
        (200,),
        closed=False,
        upstream=(sized(b"hello"),),
    ),
    refused(
        "cl-duplicate-same",
        "RFC 9112 6.3",
        req("POST /c HTTP/1.1", H, "Content-Length: 5", "Content-Length: 5", body=b"hello"),
        why="identical duplicates MAY be folded; refusing is the safer choice",
    ),
    refused(
        "cl-duplicate-different",
        "RFC 9112 6.3",
        req("POST /c HTTP/1.1", H, "Content-Length: 5", "Content-Length: 6", body=b"hello!"),
    ),
    refused(
        "cl-list", "RFC 9112 6.3", req("POST /c HTTP/1.1", H, "Content-Length: 5, 5", body=b"hello")
    ),
    refused(
        "cl-negative",
        "RFC 9110 8.6",
        req("POST /c HTTP/1.1", H, "Content-Length: -5", body=b"hello"),
    ),
    refused(
        "cl-plus-sign",
        "RFC 9110 8.6",
        req("POST /c HTTP/1.1", H, "Content-Length: +5", body=b"hello"),
    ),
    refused(
        "cl-hex", "RFC 9110 8.6", req("POST /c HTTP/1.1", H, "Content-Length: 0x5", body=b"hello")
    ),
    refused(
        "cl-empty", "RFC 9110 8.6", req("POST /c HTTP/1.1", H, "Content-Length:", body=b"hello")
    ),
    refused(
        "cl-overflow",
        "RFC 9110 8.6",
        req("POST /c HTTP/1.1", H, "Content-Length: 99999999999999999999999", body=b"hello"),
    ),
    refused(
        "cl-space-before-colon",
        "RFC 9112 5.1",
        req("POST /c HTTP/1.1", H, "Content-Length : 5", body=b"hello"),
    ),
    refused(
        "cl-over-the-body-limit",
        "RFC 9110 15.5.14",
        req("POST /c HTTP/1.1", H, "Content-Length: 2000"),
        413,
        limits=SMALL_BODY,
        within=1.0,
        why="refused on the declared length, before a byte of the body",
    ),
    case(
        "cl-body-longer-than-declared",
        "RFC 9112 6.3",
        post(b"hello") + b"GARBAGE",
        (200,),
        closed=True,
        upstream=(sized(b"hello"),),
        why="the excess starts the next request, which cannot be parsed: answer, then close",
    ),
    refused(
        "cl-body-shorter-then-stalled",
        "RFC 9112 6.3",
        req("POST /c HTTP/1.1", H, "Content-Length: 10", body=b"hello"),
        408,
        limits=STALL,
        within=STALL.client_timeout + 1.5,
    ),
]

# -- Transfer-Encoding ---------------------------------------------------------------------------

TRANSFER_ENCODING = [
    case(
        "te-chunked",
        "RFC 9112 7.1",
        chunked(HELLO),
        (200,),
        closed=False,
        upstream=(sized(b"hello"),),
    ),
    case(
        "te-chunked-upper-case",
        "RFC 9112 7",
        chunked(HELLO, te="CHUNKED"),
        (200,),
        closed=False,
        upstream=(sized(b"hello"),),
    ),
    case(
        "te-chunked-trailing-space",
        "RFC 9110 5.5",
        chunked(HELLO, te="chunked  "),
        (200,),
        closed=False,
        upstream=(sized(b"hello"),),
    ),
    refused(
        "te-chunked-trailing-tab",
        "RFC 9110 5.5",
        chunked(HELLO, te="chunked\t"),
        why="OWS, but llhttp refuses it: refusing a framing header is the safe side",
    ),
    case(
        "te-chunked-after-a-tab",
        "RFC 9112 5.1",
        req("POST /c HTTP/1.1", H, "Transfer-Encoding:\tchunked") + HELLO,
        (200,),
        closed=False,
        upstream=(sized(b"hello"),),
    ),
    refused("te-xchunked", "RFC 9112 6.3", chunked(HELLO, te="xchunked")),
    refused("te-chunkedx", "RFC 9112 6.3", chunked(HELLO, te="chunkedx")),
    refused("te-bogus", "RFC 9112 6.3", chunked(HELLO, te="bogus")),
    refused(
        "te-identity",
        "RFC 9112 6.3",
        chunked(HELLO, te="identity"),
        why="identity is no coding since RFC 7230",
    ),
    refused("te-empty", "RFC 9112 6.3", chunked(HELLO, te="")),
    refused(
        "te-gzip-then-chunked",
        "RFC 9112 6.1",
        chunked(HELLO, te="gzip, chunked"),
        501,
        why="a coding the proxy would pass on still applied, unlabelled: not implemented",
    ),
    refused("te-chunked-then-gzip", "RFC 9112 6.3", chunked(HELLO, te="chunked, gzip")),
    refused("te-chunked-twice-in-a-list", "RFC 9112 7", chunked(HELLO, te="chunked, chunked")),
    refused(
        "te-chunked-in-two-lines",
        "RFC 9112 7",
        chunked(HELLO, "Transfer-Encoding: chunked"),
    ),
    refused(
        "te-and-cl",
        "RFC 9112 6.1",
        chunked(HELLO, "Content-Length: 5"),
        why="MAY be read as chunked; refused, as a smuggling attempt",
    ),
    refused(
        "cl-and-te",
        "RFC 9112 6.1",
        req("POST /c HTTP/1.1", H, "Content-Length: 5", "Transfer-Encoding: chunked") + HELLO,
    ),
    refused("te-and-cl-zero", "RFC 9112 6.1", chunked(HELLO, "Content-Length: 0")),
    refused(
        "te-obs-fold",
        "RFC 9112 5.2",
        req("POST /c HTTP/1.1", H, "Transfer-Encoding:", " chunked") + HELLO,
    ),
    refused(
        "te-space-before-colon",
        "RFC 9112 5.1",
        req("POST /c HTTP/1.1", H, "Transfer-Encoding : chunked") + HELLO,
    ),
    refused("te-vertical-tab", "RFC 9110 5.5", chunked(HELLO, te="chunked\x0b")),
    refused(
        "te-in-http-1.0",
        "RFC 9112 6.1",
        req("POST /c HTTP/1.0", "Transfer-Encoding: chunked") + HELLO,
        why="a 1.0 message with Transfer-Encoding has faulty framing",
    ),
    case(
        "te-chunked-on-get",
        "RFC 9110 9.3.1",
        chunked(HELLO, line="GET /c HTTP/1.1"),
        (200,),
        closed=False,
        upstream=(sized(b"hello", "GET"),),
    ),
]

# -- chunk sizes and extensions ------------------------------------------------------------------

CHUNKS = [
    case(
        "chunk-size-leading-zeros",
        "RFC 9112 7.1",
        chunked(b"0005\r\nhello\r\n0000\r\n\r\n"),
        (200,),
        closed=False,
        upstream=(sized(b"hello"),),
    ),
    case(
        "chunk-size-upper-case-hex",
        "RFC 9112 7.1",
        chunked(b"A\r\n0123456789\r\n0\r\n\r\n"),
        (200,),
        closed=False,
        upstream=(sized(b"0123456789"),),
    ),
    refused(
        "chunk-size-overflow",
        "RFC 9112 7.1",
        chunked(b"fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
    ),
    refused("chunk-size-negative", "RFC 9112 7.1", chunked(b"-5\r\nhello\r\n0\r\n\r\n")),
    refused("chunk-size-0x-prefix", "RFC 9112 7.1", chunked(b"0x5\r\nhello\r\n0\r\n\r\n")),
    refused("chunk-size-then-space", "RFC 9112 7.1", chunked(b"5 \r\nhello\r\n0\r\n\r\n")),
    refused("chunk-size-garbage", "RFC 9112 7.1", chunked(b"zz\r\nhello\r\n0\r\n\r\n")),
    refused("chunk-size-missing", "RFC 9112 7.1", chunked(b"\r\nhello\r\n0\r\n\r\n")),
    refused("chunk-data-longer-than-its-size", "RFC 9112 7.1", chunked(b"3\r\nhello\r\n0\r\n\r\n")),
    refused("chunk-data-without-crlf", "RFC 9112 7.1", chunked(b"5\r\nhello0\r\n\r\n")),
    refused("chunk-bare-lf", "RFC 9112 2.2", chunked(b"5\nhello\n0\n\n")),
    case(
        "chunk-extension",
        "RFC 9112 7.1.1",
        chunked(b"5;name=value\r\nhello\r\n0;last\r\n\r\n"),
        (200,),
        closed=False,
        upstream=(sized(b"hello", never=(b"name=value",)),),
    ),
    case(
        "chunk-extension-quoted",
        "RFC 9112 7.1.1",
        chunked(b'5;a="b c;d"\r\nhello\r\n0\r\n\r\n'),
        (200,),
        closed=False,
        upstream=(sized(b"hello"),),
    ),
    refused(
        "chunk-extension-bad-character", "RFC 9112 7.1.1", chunked(b"5;a=b c\r\nhello\r\n0\r\n\r\n")
    ),
    case(
        "chunk-extension-long-but-whole",
        "RFC 9112 7.1.1",
        chunked(b"5;" + b"e" * 20_000 + b"\r\nhello\r\n0\r\n\r\n"),
        (200,),
        closed=False,
        limits=SMALL_HEAD,
        upstream=(sized(b"hello"),),
        why="skipped by the parser as it passes, nothing kept",
    ),
    refused(
        "chunk-extension-that-never-ends",
        "RFC 9112 7.1.1",
        (chunked(b"5;"), *((0.02, b"e" * 4096) * 6)),
        431,
        limits=SMALL_HEAD,
        why="bounded like a header line (max_header_bytes x 9)",
    ),
    refused(
        "chunk-size-over-the-body-limit",
        "RFC 9110 15.5.14",
        chunked(b"3e9\r\nab"),
        413,
        limits=SMALL_BODY,
        within=1.0,
        why="refused on the chunk's size line, without waiting for its data",
    ),
    refused(
        "chunk-size-over-the-limit-split-across-reads",
        "RFC 9110 15.5.14",
        (chunked(chunk(b"a" * 600) + b"1"), 0.05, b"f4\r\n"),
        413,
        limits=SMALL_BODY,
        within=1.0,
    ),
    refused(
        "chunks-over-the-body-limit-together",
        "RFC 9110 15.5.14",
        chunked(chunk(b"a" * 600) + chunk(b"b" * 600) + b"0\r\n\r\n"),
        413,
        limits=SMALL_BODY,
        closed=False,
        why="the body came whole in one read, so the next request can be found: kept",
    ),
    refused(
        "chunk-stalled-mid-data",
        "RFC 9112 9.5",
        chunked(b"5\r\nhe"),
        408,
        limits=STALL,
        within=STALL.client_timeout + 1.5,
    ),
    refused(
        "chunk-last-never-sent",
        "RFC 9112 9.5",
        chunked(chunk(b"hello")),
        408,
        limits=STALL,
        within=STALL.client_timeout + 1.5,
    ),
    case(
        "chunks-of-one-byte",
        "RFC 9112 7.1",
        chunked(b"".join(chunk(bytes([65 + n % 26])) for n in range(100)) + b"0\r\n\r\n"),
        (200,),
        closed=False,
        upstream=(sized(bytes(65 + n % 26 for n in range(100))),),
    ),
    case(
        "chunked-empty-body",
        "RFC 9112 7.1",
        chunked(b"0\r\n\r\n"),
        (200,),
        closed=False,
        upstream=(Seen("POST", "/c", lacks=("Transfer-Encoding",)),),
    ),
]

# -- trailers ------------------------------------------------------------------------------------

TRAILERS = [
    case(
        "trailer-x-forwarded-for",
        "RFC 9112 7.1.2",
        chunked(chunk(b"hello") + b"0\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"),
        (200,),
        closed=False,
        upstream=(sized(b"hello", lacks=("X-Forwarded-For",), never=(b"6.6.6.6",)),),
        why="trailers are dropped, as nginx does: never merged into the head",
    ),
    case(
        "trailer-second-content-type",
        "RFC 9110 6.5.1",
        chunked(
            chunk(b"hello") + b"0\r\nContent-Type: text/evil\r\n\r\n", "Content-Type: text/plain"
        ),
        (200,),
        closed=False,
        upstream=(sized(b"hello", has=(("Content-Type", b"text/plain"),), never=(b"text/evil",)),),
    ),
    refused(
        "trailer-content-length",
        "RFC 9110 6.5.1",
        chunked(chunk(b"hello") + b"0\r\nContent-Length: 5\r\n\r\n"),
        why="framing fields MUST NOT be trailers; llhttp refuses them, which is safe",
    ),
    refused(
        "trailer-transfer-encoding",
        "RFC 9110 6.5.1",
        chunked(chunk(b"hello") + b"0\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ),
    case(
        "trailer-host",
        "RFC 9110 6.5.1",
        chunked(chunk(b"hello") + b"0\r\nHost: evil.example\r\n\r\n"),
        (200,),
        closed=False,
        upstream=(sized(b"hello", never=(b"evil.example",)),),
    ),
    case(
        "trailer-announced",
        "RFC 9110 6.6.2",
        chunked(chunk(b"hello") + b"0\r\nX-Checksum: abc\r\n\r\n", "Trailer: X-Checksum"),
        (200,),
        closed=False,
        upstream=(sized(b"hello", lacks=("Trailer", "X-Checksum")),),
    ),
    refused(
        "trailer-obs-fold",
        "RFC 9112 5.2",
        chunked(chunk(b"hello") + b"0\r\nX-T: a\r\n b\r\n\r\n"),
    ),
    refused(
        "trailers-over-the-cap",
        "RFC 9110 6.5",
        chunked(
            chunk(b"hello")
            + b"0\r\n"
            + b"".join(b"X-T%d: %s\r\n" % (n, b"t" * 500) for n in range(40))
            + b"\r\n"
        ),
        431,
        limits=SMALL_HEAD,
        why="trailers count with the head against max_header_bytes x 8",
    ),
    refused(
        "trailer-line-that-never-ends",
        "RFC 9110 6.5",
        (chunked(chunk(b"hello") + b"0\r\nX-T: "), *((0.02, b"t" * 4096) * 6)),
        431,
        limits=SMALL_HEAD,
    ),
]

# -- the request line ----------------------------------------------------------------------------

REQUEST_LINE = [
    refused("bare-lf-request-line", "RFC 9112 2.2", b"GET /c HTTP/1.1\nHost: conformance\n\n"),
    refused("bare-lf-header-line", "RFC 9112 2.2", b"GET /c HTTP/1.1\r\nHost: conformance\n\r\n"),
    refused("bare-cr", "RFC 9112 2.2", b"GET /c HTTP/1.1\rHost: conformance\r\n\r\n"),
    case(
        "empty-line-before-the-request",
        "RFC 9112 2.2",
        b"\r\n" + get(),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c"),),
        why="SHOULD ignore at least one empty line before a request-line",
    ),
    case(
        "two-spaces-in-the-request-line",
        "RFC 9112 3",
        req("GET  /c HTTP/1.1", H),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c"),),
        why="MAY parse on whitespace-delimited words",
    ),
    refused(
        "method-lower-case",
        "RFC 9110 9.1",
        req("get /c HTTP/1.1", H),
        why="methods are case-sensitive",
    ),
    refused(
        "method-unknown",
        "RFC 9110 9.1",
        req("BREW /c HTTP/1.1", H),
        why="501 is a SHOULD; the parser knows the method set",
    ),
    refused(
        "method-trace",
        "RFC 9110 9.3.8",
        req("TRACE /c HTTP/1.1", H),
        why="the API would echo the signature cookie",
        closed=False,
    ),
    refused("method-connect", "RFC 9110 9.3.6", req("CONNECT conformance:443 HTTP/1.1", H)),
    case(
        "method-options",
        "RFC 9110 9.3.7",
        req("OPTIONS /c HTTP/1.1", H),
        (200,),
        closed=False,
        upstream=(Seen("OPTIONS", "/c"),),
    ),
    case(
        "method-delete",
        "RFC 9110 9.3.5",
        req("DELETE /c HTTP/1.1", H),
        (200,),
        closed=False,
        upstream=(Seen("DELETE", "/c"),),
    ),
    case(
        "method-put",
        "RFC 9110 9.3.4",
        req("PUT /c HTTP/1.1", H, "Content-Length: 5", body=b"hello"),
        (200,),
        closed=False,
        upstream=(sized(b"hello", "PUT"),),
    ),
    case(
        "method-patch",
        "RFC 5789 2",
        req("PATCH /c HTTP/1.1", H, "Content-Length: 5", body=b"hello"),
        (200,),
        closed=False,
        upstream=(sized(b"hello", "PATCH"),),
    ),
    case(
        "method-webdav-propfind",
        "RFC 4918 9.1",
        req("PROPFIND /c HTTP/1.1", H),
        (200,),
        closed=False,
        upstream=(Seen("PROPFIND", "/c"),),
    ),
    case(
        "method-head",
        "RFC 9110 9.3.2",
        req("HEAD /c HTTP/1.1", H),
        (200,),
        closed=False,
        upstream=(Seen("HEAD", "/c"),),
        bodiless=frozenset({0}),
    ),
    refused("version-2.0", "RFC 9110 15.6.6", req("GET /c HTTP/2.0", H), 505),
    refused(
        "version-1.2",
        "RFC 9110 15.6.6",
        req("GET /c HTTP/1.2", H),
        505,
        why="SHOULD be read as 1.1; refused clearly instead",
    ),
    refused("version-3.0", "RFC 9110 15.6.6", req("GET /c HTTP/3.0", H), 505),
    refused("http2-preface", "RFC 9113 3.4", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    case(
        "version-0.9-spelled-out",
        "RFC 9112 2.3",
        req("GET /c HTTP/0.9", H),
        (),
        closed=True,
        upstream=(),
        within=1.0,
    ),
    case(
        "http-0.9-request",
        "RFC 9112 2.3",
        b"GET /c\r\n",
        (),
        closed=True,
        upstream=(),
        within=1.0,
        why="such a client cannot read a status line: closed at once, unanswered",
    ),
    refused("version-lower-case", "RFC 9112 2.3", req("GET /c http/1.1", H)),
    refused("version-malformed", "RFC 9112 2.3", req("GET /c HTTP/1.x", H)),
    refused("version-without-dot", "RFC 9112 2.3", req("GET /c HTTP/11", H)),
    refused("version-missing", "RFC 9112 3", req("GET /c ", H)),
    refused("tls-client-hello", "RFC 9112 2.2", tls_client_hello()),
    case(
        "http-1.0-closes",
        "RFC 9112 9.3",
        req("GET /c HTTP/1.0"),
        (200,),
        closed=True,
        upstream=(Seen("GET", "/c"),),
    ),
    case(
        "http-1.0-keep-alive",
        "RFC 9112 C.2.2",
        req("GET /c HTTP/1.0", "Connection: keep-alive"),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c", lacks=("Connection",)),),
    ),
    case(
        "connection-close",
        "RFC 9112 9.6",
        get("/c", "Connection: close"),
        (200,),
        closed=True,
        upstream=(Seen("GET", "/c"),),
    ),
    case(
        "connection-keep-alive-and-close",
        "RFC 9112 9.6",
        get("/c", "Connection: keep-alive, close"),
        (200,),
        closed=True,
        upstream=(Seen("GET", "/c"),),
    ),
]

# -- the request target --------------------------------------------------------------------------

TARGET = [
    case(
        "target-with-query",
        "RFC 9112 3.2.1",
        get("/c?a=1&b=%20&c=x+y"),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c?a=1&b=%20&c=x+y"),),
    ),
    case(
        "target-with-empty-query",
        "RFC 9112 3.2.1",
        get("/c?"),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c?"),),
        why="the target goes on byte for byte: the `?` of an empty query is kept, as signed",
    ),
    case(
        "target-percent-encoding-kept",
        "RFC 9112 3.2.1",
        get("/c/a%20b/caf%C3%A9"),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c/a%20b/caf%C3%A9"),),
    ),
    refused(
        "target-absolute-form",
        "RFC 9112 3.2.2",
        get("http://conformance/c"),
        why="a reverse proxy takes origin-form only",
        closed=False,
    ),
    refused("target-authority-form", "RFC 9112 3.2.3", req("GET conformance:443 HTTP/1.1", H)),
    refused("target-asterisk-form", "RFC 9112 3.2.4", req("OPTIONS * HTTP/1.1", H), closed=False),
    refused("target-without-slash", "RFC 9112 3.2", get("c")),
    refused("target-with-fragment", "RFC 9112 3.2", get("/c#frag")),
    refused("target-with-space", "RFC 9112 3.2", get("/c d")),
    refused(
        "target-raw-utf8",
        "RFC 9112 3.2",
        "GET /café HTTP/1.1\r\nHost: conformance\r\n\r\n".encode(),
    ),
    refused(
        "target-dot-segment",
        "RFC 3986 5.2.4",
        get("/c/../x"),
        why="the API might normalise it elsewhere",
        closed=False,
    ),
    refused("target-encoded-dot-segment", "RFC 3986 5.2.4", get("/c/%2e%2E/x"), closed=False),
    refused("target-empty-segment", "RFC 3986 3.3", get("//c"), closed=False),
    refused(
        "target-over-the-line-limit", "RFC 9112 3", get("/c/" + "a" * 1100), 414, limits=SMALL_HEAD
    ),
]

# -- Host ----------------------------------------------------------------------------------------

HOST = [
    refused("host-missing", "RFC 9112 3.2", req("GET /c HTTP/1.1")),
    refused("host-twice", "RFC 9112 3.2", req("GET /c HTTP/1.1", H, "Host: other")),
    refused("host-twice-same", "RFC 9112 3.2", req("GET /c HTTP/1.1", H, H)),
    refused(
        "host-empty",
        "RFC 9112 3.2",
        req("GET /c HTTP/1.1", "Host:"),
        why="an origin-form target always has an authority",
    ),
    refused("host-with-space", "RFC 9112 3.2", req("GET /c HTTP/1.1", "Host: a b")),
    refused("host-with-slash", "RFC 9112 3.2", req("GET /c HTTP/1.1", "Host: a/b")),
    refused(
        "host-with-userinfo", "RFC 9110 4.2.4", req("GET /c HTTP/1.1", "Host: user@conformance")
    ),
    refused("host-with-two-ports", "RFC 9112 3.2", req("GET /c HTTP/1.1", "Host: a:1:2")),
    case(
        "host-with-port",
        "RFC 9112 3.2",
        req("GET /c HTTP/1.1", "Host: conformance:8080"),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c"),),
    ),
    case(
        "host-ipv6-literal",
        "RFC 3986 3.2.2",
        req("GET /c HTTP/1.1", "Host: [::1]:8080"),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c"),),
    ),
    case(
        "host-missing-in-http-1.0",
        "RFC 9112 3.2",
        req("GET /c HTTP/1.0"),
        (200,),
        closed=True,
        upstream=(Seen("GET", "/c"),),
    ),
    refused("host-twice-in-http-1.0", "RFC 9112 3.2", req("GET /c HTTP/1.0", H, H)),
    case(
        "host-replaced-upstream",
        "RFC 9110 7.2",
        req("GET /c HTTP/1.1", "Host: evil.example"),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c", never=(b"evil.example",)),),
        why="the upstream gets its own Host: the client's cannot steer it",
    ),
]

# -- hop-by-hop fields, Connection ---------------------------------------------------------------

HOP_BY_HOP = [
    case(
        "connection-names-a-field",
        "RFC 9110 7.6.1",
        get("/c", "Connection: X-Secret", "X-Secret: 1"),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c", lacks=("X-Secret", "Connection")),),
    ),
    case(
        "connection-names-two-fields",
        "RFC 9110 7.6.1",
        get("/c", "Connection: X-A, x-b", "X-A: 1", "X-B: 2", "X-C: 3"),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c", has=(("X-C", b"3"),), lacks=("X-A", "X-B")),),
    ),
    case(
        "connection-in-two-lines",
        "RFC 9110 7.6.1",
        get("/c", "Connection: X-A", "Connection: X-B", "X-A: 1", "X-B: 2"),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c", lacks=("X-A", "X-B", "Connection")),),
    ),
    case(
        "keep-alive-field",
        "RFC 9110 7.6.1",
        get("/c", "Keep-Alive: timeout=5"),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c", lacks=("Keep-Alive",)),),
    ),
    case(
        "proxy-connection-field",
        "RFC 9110 7.6.1",
        get("/c", "Proxy-Connection: keep-alive"),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c", lacks=("Proxy-Connection",)),),
    ),
    case(
        "te-trailers-field",
        "RFC 9110 10.1.4",
        get("/c", "TE: trailers"),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c", lacks=("TE",)),),
    ),
    case(
        "trailer-field-on-a-get",
        "RFC 9110 6.6.2",
        get("/c", "Trailer: X-A"),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c", lacks=("Trailer",)),),
    ),
    case(
        "proxy-authorization-field",
        "RFC 9110 11.7.2",
        get("/c", "Proxy-Authorization: Basic c2VjcmV0"),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c", lacks=("Proxy-Authorization",), never=(b"c2VjcmV0",)),),
    ),
    case(
        "client-authorization-replaced",
        "RFC 9110 11.6.2",
        get("/c", "Authorization: Basic c2VjcmV0"),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c", never=(b"c2VjcmV0",)),),
    ),
    case(
        "upgrade-field-without-connection-upgrade",
        "RFC 9110 7.8",
        get("/c", "Upgrade: websocket"),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c", lacks=("Upgrade",)),),
    ),
    case(
        "end-to-end-field-passes",
        "RFC 9110 7.6.1",
        get("/c", "X-Custom: one, two"),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c", has=(("X-Custom", b"one, two"),)),),
    ),
]

# -- Expect --------------------------------------------------------------------------------------

EXPECT = [
    case(
        "expect-100-continue",
        "RFC 9110 10.1.1",
        (
            req("POST /c HTTP/1.1", H, "Content-Length: 5", "Expect: 100-continue"),
            AWAIT_100,
            b"hello",
        ),
        (100, 200),
        closed=False,
        upstream=(sized(b"hello", lacks=("Expect",)),),
    ),
    case(
        "expect-100-continue-chunked",
        "RFC 9110 10.1.1",
        (chunked(b"", "Expect: 100-continue"), AWAIT_100, HELLO),
        (100, 200),
        closed=False,
        upstream=(sized(b"hello", lacks=("Expect",)),),
    ),
    case(
        "expect-100-continue-body-sent-anyway",
        "RFC 9110 10.1.1",
        post(b"hello", "Expect: 100-continue"),
        (200,),
        closed=False,
        upstream=(sized(b"hello", lacks=("Expect",)),),
        why="MAY omit the 100 once the content has arrived",
    ),
    refused(
        "expect-100-continue-over-the-limit",
        "RFC 9110 10.1.1",
        req("POST /c HTTP/1.1", H, "Content-Length: 2000", "Expect: 100-continue"),
        413,
        limits=SMALL_BODY,
        within=1.0,
        why="a final status instead of inviting a body that would be refused",
    ),
    case(
        "expect-100-continue-in-http-1.0",
        "RFC 9110 10.1.1",
        req("POST /c HTTP/1.0", "Content-Length: 5", "Expect: 100-continue", body=b"hello"),
        (200,),
        closed=True,
        upstream=(sized(b"hello", lacks=("Expect",)),),
        why="MUST ignore 100-continue from an HTTP/1.0 client",
    ),
    case(
        "expect-100-continue-without-body",
        "RFC 9110 10.1.1",
        get("/c", "Expect: 100-continue"),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c", lacks=("Expect",)),),
    ),
    case(
        "expect-unknown",
        "RFC 9110 10.1.1",
        post(b"hello", "Expect: x-something"),
        (200,),
        closed=False,
        upstream=(sized(b"hello", lacks=("Expect",)),),
        why="417 is a MAY; the expectation is dropped, never sent on",
    ),
]

# -- pipelining ----------------------------------------------------------------------------------

PIPELINING = [
    case(
        "pipeline-three-gets",
        "RFC 9112 9.3.2",
        get("/c/1") + get("/c/2") + get("/c/3"),
        (200, 200, 200),
        closed=False,
        upstream=(Seen("GET", "/c/1"), Seen("GET", "/c/2"), Seen("GET", "/c/3")),
    ),
    pipelined(64),
    pipelined(65),
    pipelined(66),
    pipelined(300),
    case(
        "pipeline-post-then-get",
        "RFC 9112 9.3.2",
        post(b"hello") + get("/c"),
        (200, 200),
        closed=False,
        upstream=(sized(b"hello"), Seen("GET", "/c")),
    ),
    case(
        "pipeline-chunked-then-get",
        "RFC 9112 9.3.2",
        chunked(HELLO) + get("/c"),
        (200, 200),
        closed=False,
        upstream=(sized(b"hello"), Seen("GET", "/c")),
    ),
    case(
        "pipeline-head-then-get",
        "RFC 9112 9.3.2",
        req("HEAD /c HTTP/1.1", H) + get("/c"),
        (200, 200),
        closed=False,
        upstream=(Seen("HEAD", "/c"), Seen("GET", "/c")),
        bodiless=frozenset({0}),
    ),
    case(
        "pipeline-close-in-the-middle",
        "RFC 9112 9.6",
        get("/c/1") + get("/c/2", "Connection: close") + get("/c/3"),
        (200, 200),
        closed=True,
        upstream=(Seen("GET", "/c/1"), Seen("GET", "/c/2")),
        why="nothing after a request with Connection: close is read",
    ),
    case(
        "pipeline-garbage-after-a-good-request",
        "RFC 9112 2.2",
        get("/c") + b"BREW /c HTTP/1.1\r\n\r\n",
        (200,),
        closed=True,
        upstream=(Seen("GET", "/c"),),
    ),
    case(
        "pipeline-garbage-after-two-good-requests",
        "RFC 9112 9.3.2",
        get("/c/1") + get("/c/2") + b"BREW /c HTTP/1.1\r\n\r\n",
        (200, 200),
        closed=True,
        upstream=(Seen("GET", "/c/1"), Seen("GET", "/c/2")),
        why="every request before the fault is answered, then the connection ends",
    ),
    case(
        "pipeline-head-split-across-writes",
        "RFC 9112 9.3.2",
        (get("/c/1") + b"GET /c/2 HTTP/1.1\r\nHo", 0.05, b"st: conformance\r\n\r\n"),
        (200, 200),
        closed=False,
        upstream=(Seen("GET", "/c/1"), Seen("GET", "/c/2")),
    ),
]

# -- upgrades ------------------------------------------------------------------------------------

UPGRADE = [
    case(
        "upgrade-websocket-get",
        "RFC 9110 7.8",
        get("/c", "Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13"),
        (200,),
        closed=True,
        upstream=(Seen("GET", "/c", lacks=("Upgrade", "Connection")),),
        why="MAY ignore Upgrade: served as plain HTTP/1.1, then the connection ends",
    ),
    case(
        "upgrade-post-with-a-body",
        "RFC 9110 7.8",
        post(b"abcdefg", "Connection: Upgrade", "Upgrade: websocket"),
        (200,),
        closed=True,
        upstream=(sized(b"abcdefg", lacks=("Upgrade", "Connection")),),
        why="the body is read whole and forwarded: never dropped",
    ),
    case(
        "upgrade-post-with-a-chunked-body",
        "RFC 9110 7.8",
        chunked(HELLO, "Connection: Upgrade", "Upgrade: websocket"),
        (200,),
        closed=True,
        upstream=(sized(b"hello", lacks=("Upgrade",)),),
    ),
    case(
        "upgrade-body-in-two-writes",
        "RFC 9110 7.8",
        (
            req(
                "POST /c HTTP/1.1",
                H,
                "Content-Length: 7",
                "Connection: Upgrade",
                "Upgrade: websocket",
                body=b"abc",
            ),
            0.05,
            b"defg",
        ),
        (200,),
        closed=True,
        upstream=(sized(b"abcdefg"),),
    ),
    case(
        "upgrade-h2c",
        "RFC 9110 7.8",
        get(
            "/c",
            "Connection: Upgrade, HTTP2-Settings",
            "Upgrade: h2c",
            "HTTP2-Settings: AAMAAABkAAQAAP__",
        ),
        (200,),
        closed=True,
        upstream=(Seen("GET", "/c", lacks=("Upgrade", "HTTP2-Settings")),),
    ),
    case(
        "upgrade-then-a-pipelined-request",
        "RFC 9110 7.8",
        get("/c/1", "Connection: Upgrade", "Upgrade: websocket") + get("/c/2"),
        (200,),
        closed=True,
        upstream=(Seen("GET", "/c/1"),),
        why="what follows an upgrade request would be another protocol's: dropped",
    ),
]

# -- header syntax -------------------------------------------------------------------------------

HEADER_SYNTAX = [
    refused("header-nul", "RFC 9110 5.5", get("/c", "X-A: a\x00b")),
    refused("header-control-character", "RFC 9110 5.5", get("/c", "X-A: a\x01b")),
    refused("header-del", "RFC 9110 5.5", get("/c", "X-A: a\x7fb")),
    refused("header-bare-cr-in-value", "RFC 9110 5.5", get("/c", "X-A: a\rb")),
    case(
        "header-obs-text",
        "RFC 9110 5.5",
        get("/c", "X-A: caf\xe9 \xff"),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c", has=(("X-A", b"caf\xe9 \xff"),)),),
        why="obs-text passes byte for byte",
    ),
    refused("header-name-with-space", "RFC 9110 5.1", get("/c", "Bad Name: x")),
    refused("header-without-colon", "RFC 9112 5", get("/c", "NoColon")),
    refused("header-empty-name", "RFC 9110 5.1", get("/c", ": x")),
    refused(
        "header-obs-fold", "RFC 9112 5.2", get("/c", "X-A: a", " b"), why="MAY unfold; refused"
    ),
    refused(
        "header-line-over-the-limit",
        "RFC 9110 15.5.20",
        get("/c", "X-A: " + "a" * 1100),
        431,
        limits=SMALL_HEAD,
    ),
    refused(
        "headers-over-the-limit-together",
        "RFC 9110 15.5.20",
        get("/c", *(f"X-{n:02}: " + "h" * 500 for n in range(20))),
        431,
        limits=SMALL_HEAD,
    ),
    case(
        "many-small-headers",
        "RFC 9112 5",
        get("/c", *(f"X-{n:03}: v" for n in range(100))),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c", has=(("X-099", b"v"),)),),
    ),
    case(
        "header-name-with-underscore-dropped",
        "RFC 9110 5.1",
        get("/c", "X_Forwarded_For: 6.6.6.6", "Transfer_Encoding: chunked", "X-Kept: 1"),
        (200,),
        closed=False,
        upstream=(
            Seen(
                "GET",
                "/c",
                has=(("X-Kept", b"1"),),
                lacks=("X_Forwarded_For", "Transfer_Encoding"),
                never=(b"6.6.6.6",),
            ),
        ),
        why="a CGI-style API reads `_` as `-`: such a name could smuggle a field the proxy "
        "never looked at; dropped, as nginx drops them by default",
    ),
    case(
        "header-value-whitespace-trimmed",
        "RFC 9110 5.5",
        get("/c", "X-A:   v"),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c", has=(("X-A", b"v"),)),),
    ),
]

# -- slow and stalled clients --------------------------------------------------------------------

SLOW = [
    case(
        "idle-connection",
        "RFC 9112 9.5",
        (),
        (),
        closed=True,
        upstream=(),
        limits=STALL,
        within=STALL.client_timeout + 1.5,
    ),
    case(
        "head-stalled",
        "RFC 9112 9.5",
        b"GET /c HTTP/1.1\r\nHost: confor",
        (),
        closed=True,
        upstream=(),
        limits=STALL,
        within=STALL.client_timeout + 1.5,
        why="closed without an answer, as nginx does",
    ),
    case(
        "head-trickled-past-the-timeout",
        "RFC 9112 9.5",
        (b"GET /c HTTP/1.1\r\n", *((0.15, b"X-Slow: 1\r\n") * 8)),
        (),
        closed=True,
        upstream=(),
        limits=STALL,
        why="the timeout is for the whole head, not between bytes",
    ),
    case(
        "head-dribbled-within-the-timeout",
        "RFC 9112 9.5",
        tuple(
            x
            for part in (b"GET /c HT", b"TP/1.1\r\nHo", b"st: conformance\r", b"\n\r\n")
            for x in (0.05, part)
        ),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c"),),
        limits=Limits(client_timeout=1.0),
    ),
    case(
        "body-dribbled-within-the-timeout",
        "RFC 9112 9.5",
        (req("POST /c HTTP/1.1", H, "Content-Length: 5", body=b"he"), 0.05, b"l", 0.05, b"lo"),
        (200,),
        closed=False,
        upstream=(sized(b"hello"),),
        limits=Limits(client_timeout=1.0),
    ),
    refused(
        "body-trickled-past-the-timeout",
        "RFC 9112 9.5",
        (req("POST /c HTTP/1.1", H, "Content-Length: 20", body=b"x"), *((0.1, b"x") * 9)),
        408,
        limits=STALL,
        why="the body's time limit is a total: trickling cannot hold a worker",
    ),
    case(
        "kept-alive-then-idle",
        "RFC 9112 9.5",
        get("/c"),
        (200,),
        closed=True,
        upstream=(Seen("GET", "/c"),),
        limits=STALL,
        why="an idle kept-alive connection is closed after client_timeout",
    ),
]

# -- cookies: the signature cookie is the proxy's to make ------------------------------------------

COOKIES = [
    case(
        name,
        "RFC 6265 5.4",
        get("/c", f"Cookie: {value}"),
        (200,),
        closed=False,
        upstream=(Seen("GET", "/c", never=(b"EVIL",)),),
        why="any spelling a server might read as `signature` is dropped, not only the exact one",
    )
    for name, value in (
        ("cookie-signature-after-a-comma", "a=b,signature=EVIL"),
        ("cookie-signature-in-capitals", "Signature=EVIL; SIGNATURE=EVIL2"),
        ("cookie-signature-quoted-name", '"signature"=EVIL'),
        ("cookie-signature-spaced", "theme=dark;  signature = EVIL ; lang=en"),
    )
]

CLIENT_CASES: list[Case] = [
    *CONTENT_LENGTH,
    *TRANSFER_ENCODING,
    *CHUNKS,
    *TRAILERS,
    *REQUEST_LINE,
    *TARGET,
    *HOST,
    *HOP_BY_HOP,
    *COOKIES,
    *EXPECT,
    *PIPELINING,
    *UPGRADE,
    *HEADER_SYNTAX,
    *SLOW,
]
