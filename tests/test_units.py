"""Pure pieces: header filtering, target checks, the server clock, log redaction."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.clock import ServerClock, parse_http_date
from proxy.config import AuthConfig, Secret, UpstreamConfig
from proxy.errors import BadRequest
from proxy.http.client import Upstream
from proxy.http.headers import (
    decode_headers,
    downstream_block,
    strip_cookies,
    strip_signature_cookie,
    upstream_block,
)
from proxy.limits import Windows
from proxy.observe.access_record import AccessRecord
from proxy.observe.log import Logs, route_stdlib
from proxy.pipeline.outbound import prepare_body
from proxy.schemes.luxsci.session import AuthCode, LuxSciSession
from proxy.target import parse as parse_target

CODE = "965823916111409-1426025141-b3486705691ba0bd15e31292166e3494034c748cb3fdfed0b9d456c647012763"


def test_upstream_lines_drop_hop_by_hop_connection_named_credentials_and_ours() -> None:
    given = [
        (b"Host", b"127.0.0.1:8080"),
        (b"Connection", b"close, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Expect", b"100-continue"),
        (b"Authorization", b"Bearer client"),
        (b"Cookie", b"a=1"),
        (b"X-Proxy-Max-Wait", b"3"),
        (b"Accept", b"application/json"),
        (b"X-Multi", b"1"),
        (b"x-multi", b"2"),
        (b"X-Latin", b"caf\xe9"),
        (b"Content-Type", b"application/x-www-form-urlencoded"),
    ]
    headers = CIMultiDictProxy(CIMultiDict(decode_headers(given)))
    kept = b"Accept: application/json\r\nX-Multi: 1\r\nx-multi: 2\r\nX-Latin: caf\xe9\r\n"
    assert upstream_block(given, headers) == (
        kept + b"Content-Type: application/x-www-form-urlencoded\r\n"
    )
    # The proxy sets the type itself: the client's is left out.
    assert upstream_block(given, headers, retyped=True) == kept


@pytest.mark.parametrize(
    ("connection", "also_dropped"),
    [("keep-alive", []), ("close, X-Hop", ["X-Hop"])],
)
def test_downstream_block_keeps_repeated_set_cookie_and_drops_framing(
    connection: str, also_dropped: list[str]
) -> None:
    raw = [
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"Content-Length", b"10"),
        (b"transfer-encoding", b"chunked"),
        (b"Connection", connection.encode()),
        (b"X-Hop", b"1"),
        (b"X-RateLimit-Remaining", b"59"),
        (b"X-Raw", b"caf\xc3\xa9 \xff"),
    ]
    decoded = CIMultiDictProxy(
        CIMultiDict(
            (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
            for n, v in raw
        )
    )
    block = downstream_block(raw, decoded)
    kept = [(b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")]
    kept += [] if also_dropped else [(b"X-Hop", b"1")]
    kept += [(b"X-RateLimit-Remaining", b"59"), (b"X-Raw", b"caf\xc3\xa9 \xff")]
    assert block == b"".join(n + b": " + v + b"\r\n" for n, v in kept)


@pytest.mark.parametrize(
    ("cookies", "expected"),
    [
        (["signature=a:b"], None),
        (["theme=dark; signature=a:b; lang=en"], "theme=dark; lang=en"),
        (["signature2=x", "signature = y"], "signature2=x"),
        ([], None),
        # Other spellings a server may read as the same name (issue 12, defect 3).
        (["a=b,signature=EVIL"], "a=b"),
        (["Signature=X; SIGNATURE=Y"], None),
        (['"signature"=Z; k=v'], "k=v"),
        (["a=1,2; b=3"], "a=1,2; b=3"),  # no match: kept byte for byte, comma and all
    ],
)
def test_only_the_signature_cookie_is_stripped(cookies: list[str], expected: str | None) -> None:
    assert strip_signature_cookie(cookies) == expected


def test_strip_cookies_drops_exactly_the_named_ones_and_keeps_the_order() -> None:
    header = "auth=a; theme=dark; signature=s:x; oauth=o; auth = b; lang=en"
    assert strip_cookies([header], ("auth",)) == "theme=dark; signature=s:x; oauth=o; lang=en"
    assert strip_cookies([header], ("auth", "signature")) == "theme=dark; oauth=o; lang=en"
    assert strip_cookies(["auth=a"], ("auth",)) is None


@pytest.mark.parametrize("target", ["http://x/y", "x.example:443", "*", "//x/y", ""])
def test_only_origin_form_targets_pass(target: str) -> None:
    with pytest.raises(BadRequest):
        parse_target(target)


def test_origin_form_target_is_split_raw() -> None:
    target = parse_target("/a%2Fb?c=d%20e")
    assert (target.path, target.query) == ("/a%2Fb", "c=d%20e")


@pytest.mark.parametrize(
    ("content_type", "body", "sent_type"),
    [
        (None, b' {"a": 1} ', "application/json"),
        ("application/x-www-form-urlencoded", b'{"a": 1}', "application/json"),
        ("application/x-www-form-urlencoded", b"a=1&b=2", "application/x-www-form-urlencoded"),
        (None, b"not json", None),
        ("text/plain", b'{"a": 1}', "text/plain"),
    ],
)
def test_json_bodies_get_the_json_content_type(
    content_type: str | None, body: bytes, sent_type: str | None
) -> None:
    sent, digest, new_type = prepare_body(content_type or "", body)
    assert sent == body
    assert (new_type or content_type) == sent_type
    assert len(digest) == 64


def test_empty_body_signs_an_empty_hash() -> None:
    assert prepare_body("", b"") == (b"", "", None)


def test_server_clock_learns_offset_from_date_header() -> None:
    clock = ServerClock(wall=lambda: 1_000_000.0)
    assert clock.now() == 1_000_000.0
    clock.observe("Mon, 12 Jan 1970 13:41:40 GMT")  # 1_000_000 - 300
    assert clock.offset == -300.0
    clock.observe("Mon, 12 Jan 1970 13:41:39 GMT")  # a later, worse sample: kept the best
    assert clock.offset == -300.0
    assert clock.in_window(1_000_000.0 - 300 + 60)
    assert not clock.in_window(1_000_000.0)  # our own time is 5 minutes ahead of the server
    assert clock.in_window(1_000_000.0 - 300 - 899)


def test_unreadable_date_headers_are_ignored() -> None:
    clock = ServerClock(wall=lambda: 50.0)
    for value in ("garbage", "", "Mon, 99 Foo 2020 99:99:99 GMT"):
        clock.observe(value)
    assert clock.offset == 0.0 and not clock.known
    assert parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT") == 784111777.0


@pytest.fixture
def rendered_log() -> Iterator[tuple[Logs, io.StringIO]]:
    """The real logging chain, rendering into a buffer, with stdlib records routed to it."""
    stream = io.StringIO()
    logs = Logs("debug", "json", ["the-secret-key", "pw-123456", 'q"uote\\d'], stream=stream)
    root = logging.getLogger()
    level = root.level
    handler = route_stdlib()
    yield logs, stream
    root.removeHandler(handler)
    root.setLevel(level)


def test_redaction_masks_secrets_codes_cookies_and_sensitive_keys(
    rendered_log: tuple[Logs, io.StringIO],
) -> None:
    logs, stream = rendered_log

    def log_carelessly() -> None:
        # A module-level logger, as most modules have: it logs to the context's Logs.
        logger = structlog.get_logger("careless")
        logger.info(
            "oops",
            note="key is the-secret-key",
            header=f"signature={CODE}:abcdef0123",
            bearer="Authorization: Bearer abc.def.ghi",
            password="pw-123456",
            nested={"auth": CODE, "ok": 1},
            code_in_text=f"got {CODE} back",
        )
        try:
            raise RuntimeError("failed with the-secret-key")
        except RuntimeError:
            logger.exception("boom")
        logging.getLogger("aiohttp.server").error("stdlib says pw-123456")

    logs.context().run(log_carelessly)
    # A logger bound to the Logs itself, used outside its context.
    logs.logger().info(
        "escaped", value='a q"uote\\d b', body='{"auth":"opaque-code-x","success":1}'
    )
    text = stream.getvalue()
    for leaked in (
        "the-secret-key",
        "pw-123456",
        CODE,
        "abcdef0123",
        "abc.def.ghi",
        "opaque-code-x",
    ):
        assert leaked not in text
    assert 'q\\"uote' not in text  # the JSON-escaped form of a secret is found too
    events = [json.loads(line) for line in text.splitlines()]
    assert [e["event"] for e in events] == ["oops", "boom", "stdlib says [REDACTED]", "escaped"]
    assert events[3]["body"] == '{"auth":"[REDACTED]","success":1}'
    assert events[3]["value"] == "a [REDACTED] b"
    assert events[0]["nested"] == {"auth": "[REDACTED]", "ok": 1}
    assert "RuntimeError" in events[1]["exception"]


def test_an_auth_cookie_in_a_logged_line_is_masked_whatever_the_code_looks_like(
    rendered_log: tuple[Logs, io.StringIO],
) -> None:
    # auth.auth_cookie sends `auth=<code>`; a code of another shape than the sandbox's
    # (the API does not promise one) must still never reach the log.
    logs, stream = rendered_log
    opaque = "OpaqueCode_7Kq2"

    def log_carelessly() -> None:
        logger = structlog.get_logger("careless")
        logger.debug("sent", header=f"theme=dark; auth={opaque}; signature={opaque}:ab12")
        logger.debug("sent", note=f"Cookie: auth={opaque}", path=f"/x?auth={opaque}&oauth=keep")
        logging.getLogger("aiohttp.client").warning("cookie auth=%s;x=1", opaque)

    logs.context().run(log_carelessly)
    logs.flush()
    text = stream.getvalue()
    assert opaque not in text
    events = [json.loads(line) for line in text.splitlines()]
    assert events[0]["header"] == "theme=dark; auth=[REDACTED]; signature=[REDACTED]"
    assert events[1]["note"] == "Cookie: auth=[REDACTED]"
    assert events[1]["path"] == "/x?auth=[REDACTED]&oauth=keep"  # oauth= is not ours
    assert events[2]["event"] == "cookie auth=[REDACTED];x=1"


def _session(now: list[float]) -> LuxSciSession:
    cfg = AuthConfig(token=Secret("t"), secret=Secret("s"), code_lifetime=900, refresh_margin=60)
    return LuxSciSession(cfg, Upstream(UpstreamConfig()), ServerClock(), monotonic=lambda: now[0])


async def test_session_keeps_the_newest_code_of_the_live_login() -> None:
    now = [100.0]
    session = _session(now)
    first = AuthCode("c1", obtained_at=100.0, generation=1)
    session._generation, session._current = 1, first
    session.offer("c3", first, sent_at=103.0)
    session.offer("c2", first, sent_at=102.0)  # answered later, but sent earlier: older code
    assert (await session.code()).value == "c3"


async def test_a_late_answer_cannot_revive_a_login_that_got_a_401() -> None:
    now = [100.0]
    session = _session(now)
    first = AuthCode("c1", obtained_at=100.0, generation=1)
    session._generation, session._current = 1, first
    session.invalidate(first)
    session.offer("c2", first, sent_at=101.0)  # a request sent before the revocation
    assert session._current is None


async def test_codes_past_lifetime_minus_margin_are_not_used() -> None:
    now = [100.0]
    session = _session(now)
    session._generation = 1
    session._current = AuthCode("c1", obtained_at=100.0, generation=1)
    now[0] = 100.0 + 900 - 60 - 0.001
    assert session._usable(session._current, now[0])
    now[0] = 100.0 + 900 - 60
    assert not session._usable(session._current, now[0])


def test_server_clock_keeps_the_best_sample_and_follows_a_clock_step() -> None:
    wall = [1000.5]
    clock = ServerClock(wall=lambda: wall[0])
    clock.observe("Thu, 01 Jan 1970 00:16:40 GMT")  # 1000: sample -0.5
    assert clock.offset == -0.5
    wall[0] = 1001.1
    clock.observe("Thu, 01 Jan 1970 00:16:41 GMT")  # 1001: sample -0.1, better
    assert clock.offset == pytest.approx(-0.1)
    wall[0] = 1010.0
    clock.observe("Thu, 01 Jan 1970 00:16:49 GMT")  # 1009: sample -1.0, worse: ignored
    assert clock.offset == pytest.approx(-0.1)
    wall[0] = 2000.0
    clock.observe("Thu, 01 Jan 1970 00:16:50 GMT")  # 1010: our clock jumped ~990 s ahead
    assert clock.offset == -990.0


def test_server_clock_uncertainty_narrows_once_a_tick_is_bracketed() -> None:
    wall = [1000.2]
    clock = ServerClock(wall=lambda: wall[0])
    assert clock.uncertainty >= 1.0  # nothing known yet
    clock.observe("Thu, 01 Jan 1970 00:16:40 GMT")  # 1000
    wall[0] = 1000.9
    clock.observe("Thu, 01 Jan 1970 00:16:40 GMT")  # same second, seen later
    assert clock.uncertainty >= 1.0
    wall[0] = 1001.05
    clock.observe("Thu, 01 Jan 1970 00:16:41 GMT")  # ticked between 1000.9 and 1001.05
    assert clock.uncertainty == pytest.approx(0.15)
    assert clock.offset == pytest.approx(-0.05)


def test_a_window_end_guard_is_half_a_second_or_the_clock_uncertainty() -> None:
    windows = Windows.of(60, 86400)
    assert windows.guard_start(0) == pytest.approx(59.5)
    assert windows.guard_start(0, uncertainty=1.2) == pytest.approx(58.8)
    assert windows.guard_start(1, uncertainty=0.1) == pytest.approx(119.5)
    assert Windows.of(2, 86400).guard_start(0) == pytest.approx(1.9)  # a twentieth of a short one


def test_the_access_line_masks_secrets_and_codes_in_what_the_client_sent(
    rendered_log: tuple[Logs, io.StringIO],
) -> None:
    logs, stream = rendered_log
    code = "7-1700000000-" + "ab" * 16
    record = AccessRecord(
        "r", "GET", path=f"/perl/api/v2/x/the-secret-key/{code}", error_message='q"uote\\d'
    )
    logs.access(record)
    logs.flush()
    text = stream.getvalue()
    line = json.loads(text)
    assert "the-secret-key" not in text and code not in text and "uote" not in text
    assert line["path"] == "/perl/api/v2/x/[REDACTED]/[REDACTED]"
    assert line["event"] == "request" and line["level"] == "info"


def test_the_access_line_is_written_in_its_fixed_order_and_format() -> None:
    record = AccessRecord(
        "r1",
        "POST",
        path="/caf\u00e9",
        scope="user",
        bytes_in=12,
        request_body="{}",
        attempts=2,
        queue_wait=0.0015,
        upstream_time=0.25,
        upstream_status=200,
        response_body="ok",
        error="e",
        error_message="m",
        status=201,
        bytes_out=34,
        total_time=1,
    )
    assert record.json("T") == (
        '{"request_id": "r1", "method": "POST", "path": "/caf\\u00e9", "scope": "user", '
        '"bytes_in": 12, "request_body": "{}", "attempts": 2, "queue_wait_ms": 1.50, '
        '"upstream_ms": 250.00, "upstream_status": 200, "response_body": "ok", "error": "e", '
        '"error_message": "m", "status": 201, "bytes_out": 34, "total_ms": 1000.00, '
        '"event": "request", "level": "info", "timestamp": "T"}'
    )
    assert AccessRecord("r2", "GET", total_time=0.5).fields() == {
        "request_id": "r2",
        "method": "GET",
        "total_ms": 500.0,
    }


_TEXT = st.text(st.characters(codec="utf-8"), max_size=40)
_COUNT = st.integers(min_value=0, max_value=10**12)
_SECONDS = st.floats(min_value=0, max_value=1e6, allow_nan=False)


@given(
    st.builds(
        AccessRecord,
        _TEXT,
        _TEXT,
        **{
            name: st.none() | strategy
            for names, strategy in (
                (("path", "scope", "lane", "client", "request_body", "response_body"), _TEXT),
                (("error",), _TEXT),
                (("error_message",), _TEXT),
                (("bytes_in", "attempts", "upstream_status", "status", "bytes_out"), _COUNT),
                (("queue_wait", "upstream_time", "total_time"), _SECONDS),
            )
            for name in names
        },
    )
)
def test_the_access_line_is_the_json_of_its_fields(record: AccessRecord) -> None:
    line = record.json("2026-11-23T00:00:00.000000Z")
    assert line.isascii()  # as json.dumps writes it: escapes, never raw bytes
    parsed = json.loads(line)
    assert parsed.pop("timestamp") == "2026-11-23T00:00:00.000000Z"
    assert (parsed.pop("event"), parsed.pop("level")) == ("request", "info")
    expected = record.fields()
    # Milliseconds: two decimals, as written (fields() rounds the same way).
    assert parsed == pytest.approx(expected, abs=0.0051)
    assert list(parsed) == list(expected)


def test_header_bytes_that_are_not_utf8_survive_decoding_and_encoding() -> None:
    raw = [(b"X-Plain", b"ascii"), (b"X-Latin", b"caf\xe9"), (b"X-Utf8", "ü".encode())]
    decoded = decode_headers(raw)
    assert decoded[0] == ("X-Plain", "ascii") and decoded[2] == ("X-Utf8", "ü")
    back = [
        (n.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
        for n, v in decoded
    ]
    assert back == raw
