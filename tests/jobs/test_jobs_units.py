"""The pure parts of durable jobs: Prefer parsing, sealing, records, callbacks, config."""

from __future__ import annotations

import base64
import dataclasses
import os
import time
from pathlib import Path

import pytest

from proxy.config import ConfigError, masked, parse
from proxy.errors import BadRequest
from proxy.jobs.callbacks import check_callback, sign, verify
from proxy.jobs.errors import UnreadableRecord
from proxy.jobs.model import StoredAnswer, StoredRequest, aad
from proxy.jobs.prefer import elements, wants_async, without_async
from proxy.jobs.seal import Sealer, key_id

KEY_A = os.urandom(32)
KEY_B = os.urandom(32)
B64_A = base64.b64encode(KEY_A).decode()
ENV = {"LUXSCI_API_TOKEN": "tok-123", "LUXSCI_API_SECRET": "s3cr3t-value", "JOBS_KEY": B64_A}
BASE = """
auth:
  token: ${LUXSCI_API_TOKEN}
  secret: ${LUXSCI_API_SECRET}
"""


# -- RFC 7240 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        ["respond-async"],
        ["Respond-Async"],
        ["wait=10, respond-async"],
        ["return=minimal", "respond-async; foo=bar"],
        ['handling=lenient, x="a,b", RESPOND-ASYNC'],
        [" ,respond-async , "],
    ],
)
def test_respond_async_is_found_among_other_preferences_and_fields(values: list[str]) -> None:
    assert wants_async(values)


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["wait=10"],
        ['x="respond-async"'],  # inside a quoted value: not a preference
        ["respond-asynchronous"],
        ["return=respond-async"],
    ],
)
def test_respond_async_must_be_a_preference_of_its_own(values: list[str]) -> None:
    assert not wants_async(values)


def test_quoted_commas_do_not_split_preferences() -> None:
    assert elements('a="x, y", b; p="q\\",r", c') == ['a="x, y"', 'b; p="q\\",r"', "c"]


def test_respond_async_is_taken_out_of_what_goes_upstream_and_nothing_else() -> None:
    lines = (
        b"Accept: */*\r\nPrefer: respond-async, wait=5\r\nPREFER: Respond-Async\r\n"
        b"Prefer: return=minimal\r\nX-Other: prefer\r\n"
    )
    assert without_async(lines) == (
        b"Accept: */*\r\nPrefer: wait=5\r\nPrefer: return=minimal\r\nX-Other: prefer\r\n"
    )
    plain = b"Accept: */*\r\n"
    assert without_async(plain) is plain


# -- sealing ----------------------------------------------------------------------------------


def test_sealed_records_open_with_any_listed_key_and_seal_with_the_first() -> None:
    old = Sealer([KEY_A])
    blob = old.seal(b"secret body", aad("j1", "request"))
    assert b"secret body" not in blob
    assert blob[1:5] == key_id(KEY_A)
    rotated = Sealer([KEY_B, KEY_A])
    assert rotated.open(blob, aad("j1", "request")) == b"secret body"
    assert rotated.seal(b"x", aad("j2", "request"))[1:5] == key_id(KEY_B)


def test_a_record_without_its_key_is_unreadable_not_a_crash() -> None:
    blob = Sealer([KEY_A]).seal(b"x", aad("j1", "request"))
    with pytest.raises(UnreadableRecord, match=f"key id {key_id(KEY_A).hex()}"):
        Sealer([KEY_B]).open(blob, aad("j1", "request"))


@pytest.mark.parametrize("where", ["other job", "other column", "flipped byte", "truncated"])
def test_a_record_moved_or_altered_does_not_open(where: str) -> None:
    sealer = Sealer([KEY_A])
    blob = sealer.seal(b"payload", aad("j1", "request"))
    label = aad("j1", "request")
    if where == "other job":
        label = aad("j2", "request")
    elif where == "other column":
        label = aad("j1", "response")
    elif where == "flipped byte":
        blob = blob[:-1] + bytes([blob[-1] ^ 1])
    else:
        blob = blob[:20]
    with pytest.raises(UnreadableRecord):
        sealer.open(blob, label)


def test_encrypt_false_stores_in_the_clear_and_still_opens_sealed_records() -> None:
    sealed = Sealer([KEY_A]).seal(b"old", aad("j", "request"))
    clear = Sealer([KEY_A], encrypt=False)
    assert clear.seal(b"new", aad("j", "request")) == b"\x00new"
    assert clear.open(sealed, aad("j", "request")) == b"old"


# -- records ----------------------------------------------------------------------------------


def test_records_keep_arbitrary_bytes_exactly() -> None:
    req = StoredRequest(
        "POST", "/p/\udcff", "a=1", b"X-Odd: \xff\xfe\r\n", b"\x00body\r\n", "d" * 64, "rid"
    )
    assert StoredRequest.decode(req.encode()) == req
    answer = StoredAnswer(299, "Fine Then", b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n", b"\xff")
    assert StoredAnswer.decode(answer.encode()) == answer


def test_a_sent_empty_query_is_kept_and_records_stored_before_read_as_without() -> None:
    req = StoredRequest("GET", "/p", "", b"", b"", "d" * 64, "rid", has_query=True)
    assert StoredRequest.decode(req.encode()) == req
    # A record written before the field existed: seven fields, nothing after them.
    fields = [b"GET", b"/p", b"", b"", b"", b"d" * 64, b"rid"]
    old = b"\x01" + b"".join(len(f).to_bytes(4, "big") + f for f in fields)
    assert StoredRequest.decode(old) == dataclasses.replace(req, has_query=False)
    # `/p?` and `/p` are different targets to an Idempotency-Key; `/p?a=1` is one.
    assert not req.same_request(StoredRequest.decode(old))
    with_query = StoredRequest("GET", "/p", "a=1", b"", b"", "d" * 64, "r2", has_query=True)
    assert with_query.same_request(dataclasses.replace(with_query, has_query=False))


@pytest.mark.parametrize("data", [b"", b"\x07", b"\x01\x00\x00\x00\x09abc", b"\x01" + b"\x00" * 3])
def test_garbled_records_are_reported_not_crashed_on(data: bytes) -> None:
    with pytest.raises(UnreadableRecord):
        StoredRequest.decode(data)


# -- callbacks --------------------------------------------------------------------------------

ALLOW = ("https://app.internal/hooks/", "http://127.0.0.1:9000/cb")


@pytest.mark.parametrize(
    "url",
    [
        "https://app.internal/hooks/jobs",
        "https://APP.internal:443/hooks/x?y=1",
        "http://127.0.0.1:9000/cb",
        "http://127.0.0.1:9000/cb/deeper",
    ],
)
def test_callbacks_under_an_allowed_prefix_pass(url: str) -> None:
    assert check_callback(url, ALLOW) == url


@pytest.mark.parametrize(
    "url",
    [
        "https://app.internal.evil.example/hooks/x",  # a string prefix would match this
        "https://app.internal/hooksx",
        "http://app.internal/hooks/x",  # other scheme
        "https://app.internal:8443/hooks/x",  # other port
        "http://127.0.0.1:9000/cbx",
        "http://127.0.0.1:9000/cb/../admin",
        "http://127.0.0.1:9000/cb/%2e%2e/admin",
        "https://user:pw@app.internal/hooks/x",
        "https://app.internal/hooks/x#frag",
        "/hooks/x",
        "ftp://app.internal/hooks/x",
        "https://app.internal/hooks/x y",
    ],
)
def test_callbacks_elsewhere_are_refused(url: str) -> None:
    with pytest.raises(BadRequest):
        check_callback(url, ALLOW)


def test_no_allow_list_means_no_callbacks() -> None:
    with pytest.raises(BadRequest, match=r"jobs\.callback_allow"):
        check_callback("https://app.internal/hooks/x", ())


def test_a_signature_verifies_once_and_only_fresh() -> None:
    secret = b"callback-secret-0123456789"
    now = time.time()
    header = sign(secret, b'{"id":"1"}', int(now))
    assert verify(secret, b'{"id":"1"}', header, now)
    assert not verify(secret, b'{"id":"2"}', header, now)  # other body
    assert not verify(b"other-secret-0123456789", b'{"id":"1"}', header, now)
    assert not verify(secret, b'{"id":"1"}', header, now + 3600)  # replayed an hour later
    assert not verify(secret, b'{"id":"1"}', "sha256=00", now)


# -- config -----------------------------------------------------------------------------------


def test_jobs_are_off_by_default_and_then_need_no_key() -> None:
    cfg = parse(BASE, ENV)
    assert not cfg.jobs.enabled
    assert cfg.jobs.path_prefix == "/_proxy/jobs"
    assert (cfg.jobs.max_age, cfg.jobs.keep_results) == (7 * 86400, 86400)


def test_enabled_jobs_without_a_key_is_an_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^jobs\.keys: .*jobs\.encrypt: false"):
        parse(BASE + "jobs: {enabled: true}\n", ENV)
    cfg = parse(BASE + "jobs: {enabled: true, encrypt: false}\n", ENV)
    assert not cfg.jobs.encrypt


def test_keys_come_from_the_environment_or_a_file_and_are_masked(tmp_path: Path) -> None:
    cfg = parse(BASE + 'jobs: {enabled: true, keys: ["${JOBS_KEY}", "${OLD:-}"]}\n', ENV)
    assert [k.get() for k in cfg.jobs.keys] == [B64_A, ""]
    keys = tmp_path / "keys"
    keys.write_text(f"{B64_A}\n\n{base64.b64encode(KEY_B).decode()}\n")
    cfg = parse(BASE + f"jobs: {{enabled: true, keys_file: {keys}}}\n", ENV)
    assert len(cfg.jobs.keys) == 2
    shown = str(masked(cfg))
    assert B64_A not in shown and "********" in shown


@pytest.mark.parametrize(
    ("jobs", "key"),
    [
        ('keys: ["not base64!"]', r"jobs\.keys\[0\]: not base64"),
        (f'keys: ["{base64.b64encode(b"short").decode()}"]', r"jobs\.keys\[0\]: .*got 5 bytes"),
        ('keys: ["${JOBS_KEY}"], path_prefix: "jobs"', r"jobs\.path_prefix"),
        ('keys: ["${JOBS_KEY}"], path_prefix: "/_proxy/jobs/"', r"jobs\.path_prefix"),
        ('keys: ["${JOBS_KEY}"], max_age: 0', r"jobs\.max_age"),
        ('keys: ["${JOBS_KEY}"], store: "mysql://localhost/0"', r"jobs\.store"),
        ('keys: ["${JOBS_KEY}"], visibility_timeout: 0', r"jobs\.visibility_timeout"),
        ('keys: ["${JOBS_KEY}"], redis_min_replicas: 1', r"jobs\.redis_min_replicas: only for"),
        (
            'keys: ["${JOBS_KEY}"], redis_min_replicas: 1, store: "redis+cluster://c1:7000"',
            r"jobs\.redis_min_replicas: not supported with a redis\+cluster",
        ),
        (
            'keys: ["${JOBS_KEY}"], redis_min_replicas: -1, store: "redis://127.0.0.1/0"',
            r"jobs\.redis_min_replicas: 0 or more",
        ),
        (
            'keys: ["${JOBS_KEY}"], redis_replica_timeout: 0, store: "redis://127.0.0.1/0"',
            r"jobs\.redis_replica_timeout",
        ),
        (
            'keys: ["${JOBS_KEY}"], callback_allow: ["https://a.example/h"]',
            r"jobs\.callback_secret",
        ),
        ('keys: ["${JOBS_KEY}"], callback_allow: ["a.example/h"]', r"jobs\.callback_allow\[0\]"),
    ],
)
def test_bad_jobs_settings_name_their_key(jobs: str, key: str) -> None:
    with pytest.raises(ConfigError, match="^" + key) as info:
        parse(BASE + f"jobs: {{enabled: true, {jobs}}}\n", ENV)
    assert B64_A not in str(info.value)


def test_a_literal_key_in_the_file_draws_a_warning() -> None:
    cfg = parse(BASE + f'jobs: {{enabled: true, keys: ["{B64_A}"]}}\n', ENV)
    assert any(w.startswith("jobs.keys:") for w in cfg.warnings)
    assert not any(B64_A in w for w in cfg.warnings)


@pytest.mark.parametrize(
    "url",
    [
        "redis://:pw@127.0.0.1:6379/0",
        "rediss://redis.example:6380/0",
        "redis+sentinel://s1:26379,s2:26379/mymaster/0",
        "redis+cluster://c1:7000,c2:7000",
        "unix:///run/redis.sock?db=0",
    ],
)
def test_a_redis_url_selects_the_redis_store(url: str) -> None:
    cfg = parse(BASE + f'jobs: {{enabled: true, keys: ["${{JOBS_KEY}}"], store: "{url}"}}\n', ENV)
    assert cfg.jobs.store == url and cfg.jobs.visibility_timeout == 60.0
