"""The words of docs/CONFORMANCE.md: how the cases run, and why nginx and the proxy differ.

bench/conformance.py shows a theme when at least one of its cases differs in the run, and
lists every differing case that no theme names, so a new difference cannot go unexplained.
Each theme carries one ruling: who the RFCs side with, for every case it names.
"""

from __future__ import annotations

from dataclasses import dataclass

# Rulings, in the order the report counts them.
PROXY = "the RFC sides with the proxy"
STRICTER = "both allowed; the proxy is stricter"
CHOICE = "both allowed; a different choice"
NGINX = "the RFC sides with nginx"
RULINGS = (PROXY, STRICTER, CHOICE, NGINX)


@dataclass(frozen=True)
class Theme:
    title: str
    ruling: str
    cases: tuple[str, ...]
    text: str


HOW = """
**Client side** ([`client_cases.py`](../tests/conformance/client_cases.py)): the case's bytes
go to the server over a raw socket, with pauses where timing is the point; behind the server a
recording upstream answers 200 to everything. The verdict compares the statuses of the answers,
the connection afterwards (closed soon after them, or still serving a further request), what
reached the upstream byte for byte, and the timing where the case names one.

**Upstream side** ([`upstream_cases.py`](../tests/conformance/upstream_cases.py)): a plain
request goes to the server, and a scripted upstream answers it with the case's exact bytes
(pauses, a close). The verdict compares the status, header fields and body the client gets, its
connection's fate, and whether the server's next request went out on the same upstream
connection (after a doubtful answer it must not).

**nginx**, the distribution's build, as a plain reverse proxy: one process per set of limits,
with one `server` per lane, each in front of its own upstream:

```nginx
upstream lane0 { server 127.0.0.1:UPSTREAM; keepalive 16; }
server {
    listen 127.0.0.1:PORT;
    location / {
        proxy_pass http://lane0;
        proxy_http_version 1.1;
        proxy_set_header Connection "";    # what the keep-alive pool needs
    }
}
```

Defaults otherwise, except what a case's limits set: `client_header_timeout`,
`client_body_timeout`, `send_timeout` and `keepalive_timeout` to its client timeout (the
proxy's `listen.client_timeout` bounds a head, a body, a stalled reader and an idle
kept-alive connection alike), `client_max_body_size` to its body limit, and
`large_client_header_buffers 8 <max_header_bytes>` (a line at most that long, the whole head at
most eight times that, as the proxy counts). The upstream side runs nginx's defaults throughout.

**luxsci-proxy**, the real CLI process (`python -m proxy run`, started by
`bench/services.py`), with the Bearer scheme so that no login is needed and the same
`listen.client_timeout`, `max_body_bytes` and `max_header_bytes`. On the upstream side it
makes one attempt per request (`retry.max_attempts: 1`), so that each case is one exchange,
and the two cases about LuxSci's auth code run the LuxSci scheme.

Two checks are the proxy's alone and are not asked of nginx: the shape of its own error answers
(`X-Proxy-Error` and a JSON body) and signing the next request with the auth code an answer
carried. When a case expects the connection closed, a close within 1 s of the last answer counts
for nginx (which half-closes at once) and within 3 s for the proxy: after answering a request
whose body has not all arrived, it reads and drops what still comes for 2 s before it closes,
so that the client reads the answer instead of a reset. (The test suite shortens that linger to
tell it from the 2-s idle timeout; the CLI's own is kept here.)

Cases run concurrently in lanes, each lane a port with an upstream of its own and each case on
its own connection; each set of limits is one nginx (a server per lane) and a proxy per lane.
"""

LEGEND = """
**expected**, and what each server did, is on the client side the statuses of the answers in
order (`100+200`; `200 x300`; `—` for none) and the connection afterwards: `kept` (it serves a
further request) or `closed`; on the upstream side the status the client got, its connection
(`kept`; `cut`: the head came and the connection ended before the body did; `hung`: nothing
within 15 s) and whether the server's next request reused the upstream connection. ✓: the
server meets the whole expectation (what reached the upstream, header fields, body and timing
included); ✗: it misses it, as listed under the table. **match**: both meet it, or both miss it
the same way.
"""

INTRO = """
The expectations are the proxy's: each rests on an RFC section, and where the RFCs leave a
choice the case table says which one the proxy makes and why. A case nginx misses is therefore
a difference, not necessarily a fault of nginx. Each group below says who the RFCs side with;
where the proxy is stricter, why that is safe for a sidecar, whose only client is the app
beside it and whose only upstream is the API it signs requests for. Sections are RFC 9110
(semantics) and RFC 9112 (HTTP/1.1) unless named otherwise.
"""

THEMES: tuple[Theme, ...] = (
    # -- the RFC sides with the proxy -------------------------------------------------------------
    Theme(
        "Fields named in Connection reach the next hop through nginx",
        PROXY,
        (
            "connection-names-a-field",
            "connection-names-two-fields",
            "connection-in-two-lines",
            "proxy-connection-field",
            "upgrade-h2c",
            "hop-by-hop-fields-are-not-relayed",
        ),
        """
A proxy or gateway MUST remove every field the `Connection` field names before forwarding
(9110 7.6.1), and SHOULD NOT forward `Proxy-Connection`. nginx replaces `Connection` and drops
its fixed list (`Keep-Alive`, `TE`, `Upgrade`, ...), but forwards whatever else the client named
as hop-by-hop: `X-Secret`, `X-A`, `HTTP2-Settings`, `Proxy-Connection`; on the way back it
relays the upstream's `X-Hop` and `Proxy-Authenticate`. The proxy removes them both ways. For a
sidecar this is the difference between a field the app meant for the proxy alone and one the
API acts on.
""",
    ),
    Theme(
        "Request targets and Host values that are not valid, forwarded by nginx",
        PROXY,
        ("target-with-fragment", "target-raw-utf8", "host-with-userinfo", "host-with-two-ports"),
        """
A server MUST answer 400 to a request whose `Host` is not a valid `uri-host [":" port]` (9112
3.2): `user@conformance` and `a:1:2` are not. A request-target with `#frag` or raw UTF-8 bytes
is not a valid origin-form (9112 3.2, RFC 3986), and an invalid request-line SHOULD get a 400
(9112 3). nginx accepts all four and forwards the target byte for byte, fragment and raw bytes
included. The proxy refuses them: it signs the raw path and query exactly as sent, so a target
the API might decode or truncate differently from the signed bytes is refused before it costs a
permit or confuses the API's own parsing.
""",
    ),
    Theme(
        "Control characters in field values, forwarded by nginx",
        PROXY,
        ("header-control-character", "header-del"),
        """
Field values with control characters other than tab are invalid (9110 5.5); a recipient MAY
keep them only "within a safe context", which a field forwarded to another HTTP parser is not.
nginx forwards `\\x01` and `\\x7f` to the upstream as they came; the proxy answers 400, as it
does (and nginx does) for NUL and a bare CR.
""",
    ),
    Theme(
        "Malformed lines nginx repairs or skips",
        PROXY,
        ("header-without-colon", "chunk-size-then-space", "chunk-extension-bad-character"),
        """
A server that receives octets not matching the message grammar SHOULD answer 400 and close
(9112 2.2). nginx drops a header line without a colon (`ignore_invalid_headers`, on by default)
and serves the request without it; it reads a chunk size followed by a space (`5 `) and a chunk
extension with a bare space in its value as if they were well formed. The proxy refuses all
three. For a sidecar, a silently dropped field or a guessed chunk boundary means the API
executes something other than what the app sent; a 400 shows the fault where it is. (nginx
forwards a body it has read whole, with a Content-Length of its own, so its guesses do not
carry ambiguous framing to the next hop; the proxy does the same.)
""",
    ),
    Theme(
        "Whitespace nginx does not trim",
        PROXY,
        ("cl-trailing-whitespace", "te-chunked-after-a-tab"),
        """
Whitespace around a field value (spaces and tabs, `OWS`) is not part of it (9110 5.5, 9112
5.1): `Content-Length: 5 <tab>` is 5 and `Transfer-Encoding:<tab>chunked` is chunked. nginx
answers the first with 400 and the second with 501; the proxy serves both. nginx is the
stricter here, and wrong.
""",
    ),
    Theme(
        "Transfer codings that cannot frame a request: 400, where nginx says 501",
        PROXY,
        (
            "te-xchunked",
            "te-chunkedx",
            "te-bogus",
            "te-identity",
            "te-empty",
            "te-chunked-then-gzip",
            "te-chunked-twice-in-a-list",
            "te-vertical-tab",
        ),
        """
Both refuse and close, and nothing reaches the upstream; only the status differs. When a
request's `Transfer-Encoding` does not end in `chunked`, its length cannot be determined and the
server MUST answer 400 and close (9112 6.3): the proxy does. nginx answers 501, the SHOULD for a
coding it does not know (9112 6.1), which the MUST outranks here. `chunked, chunked` does end
in chunked, but a sender MUST NOT apply chunked twice (9112 7), so its framing is in doubt all
the same. (`gzip, chunked`, a known coding the proxy would have to pass on still applied, gets
501 from both.)
""",
    ),
    Theme(
        "Interim (1xx) answers from the upstream",
        PROXY,
        (
            "100-continue-is-skipped",
            "103-early-hints-in-its-own-write-is-skipped",
            "several-1xx-are-skipped",
            "endless-1xx-are-refused",
            "unasked-101-switch-is-refused",
        ),
        """
A client MUST be able to parse 1xx answers before the final one (9110 15.2). nginx 1.22 does
not skip an interim answer from its upstream: after a `100`, a lone `103` or an unasked `101`
its client gets nothing until the upstream closes or `proxy_read_timeout` (60 s) runs out (the
harness gives up after 15 s); with many `103`s it relays the first as if it were the final
answer, and the rest as its body. The proxy skips interim answers, caps their heads with
`upstream.max_header_bytes` (an endless run of them is a 502), and refuses a switch to another
protocol nobody asked for (9110 7.8: a server MUST NOT switch unasked). It relays no 1xx: as a
gateway it is the origin server to its client (9110 3.7), which never asked for one.
""",
    ),
    Theme(
        "Answers with invalid framing, relayed by nginx",
        PROXY,
        (
            "differing-content-lengths",
            "negative-content-length",
            "content-length-list",
            "status-code-over-599",
            "http-2.0-status-line",
            "not-http-at-all",
            "status-code-not-three-digits",
            "transfer-coding-other-than-chunked",
        ),
        """
A proxy that receives an answer with an invalid `Content-Length` MUST close the upstream
connection, discard the answer and send 502 (9112 6.3). nginx 1.22 relays `Content-Length: 5`
plus `Content-Length: 11` using the last and keeps the connection; after a negative length, or
`11, 11` (which a recipient MAY reject or read as 11, 9110 8.6: nginx does neither), its client
gets nothing (the upstream keeps its connection open; the harness gives up after 15 s). It takes
bytes that are not a status line (`SSH-2.0-...`, `HTTP/1.1 2000`) for an HTTP/0.9 answer
("upstream sent no valid HTTP/1.0 header"), to be relayed when the upstream closes, and
meanwhile its client gets nothing; it relays status 600 (invalid; a client SHOULD treat it as a
5xx, 9110 15) and an `HTTP/2.0` status line as if it were HTTP/1.1. With
`Transfer-Encoding: gzip` it drops the coding's label and re-chunks the compressed bytes, so the
client gets a gzip stream posing as the body. The proxy answers each with 502
`upstream_bad_response` and never reuses that connection. For a sidecar, a clear 502 is what an
app can handle; a guessed reading of an answer the API (or something between) garbled hands the
app a wrong body, and a reused connection after one is how response desynchronisation starts.
""",
    ),
    # -- both allowed; the proxy is stricter ------------------------------------------------------
    Theme(
        "The client's own signature cookie, in any spelling",
        STRICTER,
        (
            "cookie-signature-after-a-comma",
            "cookie-signature-in-capitals",
            "cookie-signature-quoted-name",
            "cookie-signature-spaced",
        ),
        """
nginx passes every `Cookie` on as sent, as a plain proxy should: it knows nothing of the API's
`signature` cookie. The proxy makes that cookie itself (the auth code and the request's HMAC),
so a client's own must never reach the API, in whatever spelling a server might read as the
same name: after a comma (`a=b,signature=EVIL`, the old cookie syntax), in capitals, quoted,
with spaces. The case expects none of them upstream (RFC 6265 5.4 describes the header; which
names are the proxy's is its own rule), hence nginx's ✗; an item naming no such cookie goes on
byte for byte.
""",
    ),
    Theme(
        "Bare LF line endings",
        STRICTER,
        ("bare-lf-request-line", "bare-lf-header-line", "chunk-bare-lf", "bare-lf-line-endings"),
        """
A recipient MAY accept a bare LF as a line ending (9112 2.2); nginx does, in requests, chunked
bodies and answers. The proxy refuses them: 400 to the client, 502 for an answer. Parsers that
disagree on line endings are a classic route to request smuggling; no HTTP library sends bare
LFs, so refusing them costs a conforming app nothing and leaves no line ending to interpret.
""",
    ),
    Theme(
        "Trailer fields: framing fields, folding, size",
        STRICTER,
        (
            "trailer-content-length",
            "trailer-transfer-encoding",
            "trailer-obs-fold",
            "trailers-over-the-cap",
            "trailer-line-that-never-ends",
            "chunk-extension-that-never-ends",
            "trailers-over-the-cap-cut-the-answer",
        ),
        """
Both drop trailer fields, so none of these reaches the next hop through either. A sender MUST
NOT put framing fields in trailers (9110 6.5.1) and obs-fold is obsolete (9112 5.2); nginx
ignores the trailers' contents, the proxy (llhttp) refuses such a request with 400. nginx
reads through trailers and chunk extensions of any length, and closes only when the client
stops sending for `client_body_timeout`; the proxy caps them
(`listen.max_header_bytes` x 8 for trailers, x 9 for a chunk extension) and answers 431 at
once. On the upstream side nginx reads an answer's 70 KB trailer through and reuses the
connection; the proxy cuts the answer (its body was complete, but its end was not seen within
`upstream.max_header_bytes`) and drops that connection. Bounded work per request is what lets a
sidecar promise a flat memory profile.
""",
    ),
    Theme(
        "Path segments the API might resolve differently",
        STRICTER,
        ("target-dot-segment", "target-encoded-dot-segment", "target-empty-segment"),
        """
nginx forwards `/c/../x`, `/c/%2e%2E/x` and `//c` byte for byte (`proxy_pass` without a URI
passes the target as sent); the RFCs let a server normalise such paths or not (RFC 3986 5.2.4,
6.2.2). The proxy refuses them (400, the connection kept): its access rules and protected users
match path segments, and an API that resolved `..` or collapsed `//` after the proxy had
checked the path could be reached at a path no rule saw.
""",
    ),
    Theme(
        "HTTP/0.9 requests",
        STRICTER,
        ("http-0.9-request", "version-missing"),
        """
nginx serves `GET /c` (and `GET /c ` with no version) as HTTP/0.9: it forwards the request and
answers with the bare body, no status line. No RFC asks a server to support HTTP/0.9, which has
no header fields: no Host, no credentials, no framing. The proxy closes such a connection
unanswered (the client could not read a status line) or answers 400, and forwards nothing.
""",
    ),
    Theme(
        "A request body's limits and timeouts",
        STRICTER,
        (
            "cl-body-shorter-then-stalled",
            "chunk-stalled-mid-data",
            "chunk-last-never-sent",
            "body-trickled-past-the-timeout",
            "chunk-size-over-the-limit-split-across-reads",
            "cl-over-the-body-limit",
            "expect-100-continue-over-the-limit",
        ),
        """
When a body stalls, nginx closes the connection without an answer; the proxy sends `408` with
`Connection: close` (9110 15.5.9), so the app knows why. `client_body_timeout` runs
between two reads, so a client trickling a byte at a time holds an nginx connection as long as
it likes; the proxy's `client_timeout` bounds the whole body, so a slow client cannot hold an
in-flight slot and an upstream connection. nginx checks a chunk's size against
`client_max_body_size` when the size line comes in one read (`chunk-size-over-the-body-limit`
matches), but with the line split across two reads it did not refuse: it waited for the
chunk's data and timed out without an answer; the proxy answers 413 at once either way. After
a 413 on a declared length, nginx keeps the connection to read and drop the announced body,
until its body timeout (5 s here); the proxy lingers 2 s, then closes. Both are allowed; the
proxy bounds every body in time and size, and always says so.
""",
    ),
    Theme(
        "Equal repeated lengths, and both framings at once",
        STRICTER,
        ("repeated-equal-content-lengths", "transfer-encoding-wins-over-content-length"),
        """
A recipient MAY accept `Content-Length: 11` twice as one length (9110 8.6); nginx does and keeps
the connection; the proxy answers 502. An answer with both `Transfer-Encoding: chunked` and a
`Content-Length` is read as chunked by both (9112 6.3), which also says such a message "ought to
be handled as an error": nginx then reuses the connection, the proxy drops it. Answers from the
API never repeat their length or carry both; one that does is a fault or an attack somewhere
between, and a connection that carried one is not trusted again.
""",
    ),
    Theme(
        "Upgrade requests, and what follows a request that cannot be read",
        STRICTER,
        (
            "upgrade-websocket-get",
            "upgrade-post-with-a-body",
            "upgrade-post-with-a-chunked-body",
            "upgrade-body-in-two-writes",
            "upgrade-then-a-pipelined-request",
            "cl-body-longer-than-declared",
            "pipeline-garbage-after-a-good-request",
            "pipeline-garbage-after-two-good-requests",
        ),
        """
A server MAY ignore `Upgrade` (9110 7.8). Both serve these requests as plain HTTP/1.1 with
their bodies; nginx then keeps the connection (and answers a request pipelined behind an
upgrade request), the proxy ends it after the answer: a client that asked to switch protocols
may send bytes of the other protocol next, and those must never be read as a request. When
bytes that cannot start a request follow good ones, nginx answers them with its own 400 (or,
for `GARBAGE` without a line end, waits for the rest of the line until its idle timeout); the
proxy answers the good requests in order and closes. Neither forwards the bytes.
""",
    ),
    Theme(
        "Announced trailers that never come",
        STRICTER,
        ("trailer-announced", "trailer-field-on-a-get", "announced-trailer-field-is-not-relayed"),
        """
`Trailer` announces the trailer fields that will follow a chunked body (9110 6.6.2). Both drop
the trailers; nginx still forwards the `Trailer` field (to the upstream, and on answers to the
client), announcing fields that never come. The proxy drops it with them.
""",
    ),
    # -- both allowed; a different choice ---------------------------------------------------------
    Theme(
        "Different refusals",
        CHOICE,
        (
            "method-trace",
            "target-asterisk-form",
            "http2-preface",
            "version-without-dot",
            "version-0.9-spelled-out",
            "te-chunked-trailing-tab",
            "chunks-over-the-body-limit-together",
            "header-line-over-the-limit",
            "headers-over-the-limit-together",
        ),
        """
Both refuse; the status or the connection's fate differs. `TRACE`: nginx 405, the proxy 400 (a
TRACE would echo the signature cookie back). `OPTIONS *`, and a body over the limit that came
whole: both refuse, nginx closes, the proxy keeps the connection (the request was read whole,
so the next one can be found). The HTTP/2 preface: nginx 400, the proxy 505; `HTTP/11`: nginx
505, the proxy 400. `HTTP/0.9` spelled out: nginx answers 400, the proxy closes unanswered (such
a client cannot read a status line). `Transfer-Encoding: chunked<tab>` is valid (trailing
`OWS`), yet both refuse it: nginx 501, the proxy 400 (llhttp does not trim a tab there); no
client sends it. A header line, or a head, over the limit: nginx 400 ("Request Header Or Cookie
Too Large"), the proxy 431 (Request Header Fields Too Large, RFC 6585 5), the code made for it.
""",
    ),
    Theme(
        "Expect: 100-continue when the body is already there",
        CHOICE,
        ("expect-100-continue-body-sent-anyway", "expect-100-continue-without-body"),
        """
A server MAY omit the `100 (Continue)` once the body has arrived, or when there is none (9110
10.1.1). nginx sends it anyway, then the final answer; the proxy sends the final answer only.
The case table expects the one answer, hence nginx's ✗; both are right.
""",
    ),
    Theme(
        "Upstream connections: reuse after HEAD and HTTP/1.0",
        CHOICE,
        (
            "head-answer-with-length-and-no-body",
            "head-answer-followed-by-a-body-it-must-not-have",
            "head-answer-chunked",
            "http-1.0-keep-alive-is-reused",
        ),
        """
An answer to HEAD ends with its head whatever its length fields say (9112 6.3). nginx knows its
request was a HEAD and reuses the connection, which is right and cheaper; the proxy's upstream
client does not tell its parser, so it never reuses a connection after a HEAD: one new
connection per HEAD, and no chance of reading a body that should not be there as the next
answer. (With `head-answer-followed-by-a-body-it-must-not-have` the stray body came in the same
read as the head, so nginx dropped it with that read and its next answer was right; arriving
later, it would be read as the start of the next answer.) nginx does not keep HTTP/1.0
upstream connections even with `Connection: keep-alive`; the proxy does (9112 C.2.2). Neither
choice affects what the client gets.
""",
    ),
    Theme(
        "Upstream answers cut short",
        CHOICE,
        (
            "invalid-chunk-size-cuts-the-answer",
            "chunk-without-its-crlf-cuts-the-answer",
            "small-body-cut-short-is-a-502",
        ),
        """
When an answer's body breaks off or turns invalid, both let the client see it is incomplete.
nginx, which had not yet sent the head of a broken chunked answer, closes the client connection
with no answer at all; the proxy has sent the head and the valid chunks and cuts the connection
before the end. For a small answer whose body stops short, nginx sends the head with
`Content-Length: 100`, ten bytes and a close; the proxy reads small answers whole before
answering, so it can still say 502.
""",
    ),
    Theme(
        "An idempotent request resent after a dead kept-alive connection",
        CHOICE,
        ("close-before-any-answer", "close-in-the-middle-of-the-head"),
        """
nginx sent the GET again on a new connection when the kept-alive one closed before a complete
head, as a client may for an idempotent request (9110 9.2.2); the second attempt met the same
script. These cases run the proxy with `retry.max_attempts: 1` to see one exchange; with its
defaults it resends an idempotent request after such a close too (README, Retries).
""",
    ),
    Theme(
        "Credentials",
        CHOICE,
        ("proxy-authorization-field", "client-authorization-replaced"),
        """
Not a matter of conformance but of what a sidecar is for. nginx, a plain proxy, forwards the
client's `Authorization` and `Proxy-Authorization` (a proxy MAY relay the latter, 9110 11.7.2).
The proxy replaces `Authorization` with the API's credentials and consumes
`Proxy-Authorization`, which carries its own `access.client_token`: forwarding it would hand
the app's token for the proxy to the API.
""",
    ),
    Theme(
        "Connection: keep-alive on nginx's answers",
        CHOICE,
        ("connection-close-is-not-reused",),
        """
The upstream's `Connection: close` is hop-by-hop and neither relays it. nginx adds its own
`Connection: keep-alive` to every answer on a kept-alive client connection; the proxy sends no
`Connection` field unless it closes. The case expects none, hence nginx's ✗; both are right.
""",
    ),
    # -- the RFC sides with nginx -----------------------------------------------------------------
    Theme(
        "Where nginx follows the RFC and the proxy does not",
        NGINX,
        ("target-absolute-form", "version-1.2", "method-unknown"),
        """
- **Absolute-form** (`GET http://conformance/c`): a server MUST accept it (9112 3.2.2); nginx
  does and sends the request to its upstream, ignoring the authority. The proxy answers 400 on
  purpose: an app that uses the sidecar as a forward proxy (`HTTP_PROXY`) would otherwise have
  requests meant for other hosts executed against the API with the integration's credentials.
- **HTTP/1.2**: a recipient SHOULD treat a higher minor version as the highest it implements
  (9110 2.5); nginx serves it as 1.1, the proxy answers 505. No HTTP/1.2 exists, so nothing
  real is turned away; the refusal is deliberate and visible.
- **An unknown method** (`BREW`): nginx forwards any method token, as a proxy may; an origin
  server SHOULD answer 501 (9110 9.1). The proxy answers 400, because its parser (llhttp) knows
  a fixed method set (all the standard, WebDAV and other registered ones): the API has no use
  for others, but 501 would be the better status.

(A request-target over the limit was a fourth: the proxy answered 431 where RFC 9112 3 says
414. This run found it; the proxy now answers `414 uri_too_long`, as nginx does.)
""",
    ),
)
