"""The LuxSci sandbox, over real sockets: it must be as strict as the real API.

Each test would fail if the behaviour it names broke. Signing goes through
proxy.signing, so the sandbox and the proxy agree on the protocol's text.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import re
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yarl

from proxy.sandbox import Sandbox, SandboxConfig, SandboxServer, start_sandbox
from proxy.sandbox import cli as sandbox_cli
from proxy.schemes.luxsci import signing

TOKEN = "sb-test-token"
SECRET = "sb-test-secret"
USER = "joe@example.com"
PASSWORD = "joe-password"
AUTH = "/perl/api/v2/auth"
PROFILE = "/perl/api/v2/user/joe%40example.com/profile"
REPO_ROOT = Path(__file__).resolve().parents[2]
CODE_RE = re.compile(r"^(\d+)-(\d+)-[0-9a-f]{40}$")

Start = Callable[..., Awaitable[SandboxServer]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    servers: list[SandboxServer] = []

    async def _start(
        ssl_context: ssl.SSLContext | None = None, host: str = "127.0.0.1", **overrides: Any
    ) -> SandboxServer:
        config = SandboxConfig(
            **{"token": TOKEN, "secret": SECRET, "users": {USER: PASSWORD}, **overrides}
        )
        server = await start_sandbox(config, host=host, port=0, ssl_context=ssl_context)
        servers.append(server)
        return server

    yield _start
    for server in servers:
        await server.close()


@pytest.fixture
async def sb(start: Start) -> SandboxServer:
    return await start()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# -- helpers ----------------------------------------------------------------------


class Reply:
    def __init__(self, status: int, headers: Any, raw: bytes) -> None:
        self.status = status
        self.headers = headers
        self.raw = raw

    @property
    def json(self) -> Any:
        return json.loads(self.raw)

    @property
    def remaining(self) -> int:
        return int(self.headers["X-RateLimit-Remaining"])


def auth_payload(
    date: str | int,
    *,
    token: str = TOKEN,
    secret: str = SECRET,
    user: str | None = None,
    password: str | None = None,
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "token": token,
        "date": date,
        "signature": signing.auth_signature(secret, token, str(date), user, password),
    }
    if user is not None:
        payload.update(user=user, **{"pass": password})
    return payload


async def send(
    client: aiohttp.ClientSession,
    server: SandboxServer,
    method: str,
    target: str,
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> Reply:
    """Send `target` byte-exact (no re-encoding by the client)."""
    url = yarl.URL(server.url + target, encoded=True)
    async with client.request(method, url, data=body or None, headers=headers, **kwargs) as resp:
        return Reply(resp.status, resp.headers, await resp.read())


async def post_auth(
    client: aiohttp.ClientSession, server: SandboxServer, payload: dict[str, Any]
) -> Reply:
    body = json.dumps(payload).encode()
    return await send(
        client, server, "POST", AUTH, body=body, headers={"Content-Type": "application/json"}
    )


async def authenticate(client: aiohttp.ClientSession, server: SandboxServer) -> str:
    reply = await post_auth(client, server, auth_payload(str(int(server.sandbox.now()))))
    assert reply.status == 201, reply.raw
    return str(reply.json["auth"])


def cookie(
    code: str, method: str, target: str, digest: str = "", *, upper: bool = False
) -> dict[str, str]:
    path, query = signing.split_target(target)
    value = signing.signature_cookie(SECRET, code, method, path, query, digest)
    if upper:
        code_part, sig = value.rsplit(":", 1)
        value = f"{code_part}:{sig.upper()}"
    return {"Cookie": f"theme=dark; signature={value}; lang=en"}


async def signed(
    client: aiohttp.ClientSession,
    server: SandboxServer,
    method: str,
    target: str,
    code: str,
    body: bytes = b"",
    *,
    sign_target: str | None = None,
    content_type: str = "application/json",
) -> Reply:
    headers = cookie(code, method, sign_target or target, signing.body_hash(body))
    if body:
        headers["Content-Type"] = content_type
    return await send(client, server, method, target, body=body, headers=headers)


async def raw_exchange(server: SandboxServer, request: bytes) -> bytes:
    """Write bytes on a fresh socket and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(request)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(), timeout=5)
        except ConnectionResetError:
            return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def align_clock(sandbox: Sandbox, window: int) -> None:
    """Put the server clock 1 s into a fresh window, so a test never straddles two."""
    real = time.time()
    target = math.ceil(real / window) * window + 1
    sandbox.set_clock_offset(target - real)


def multipart(boundary: str, json_part: bytes, files: list[tuple[str, bytes]]) -> bytes:
    crlf = b"\r\n"
    out = [
        f"--{boundary}".encode(),
        b'Content-Disposition: form-data; name="json"; filename="json.js"',
        b"Content-Type: application/json",
        b"",
        json_part,
    ]
    for name, data in files:
        out += [
            f"--{boundary}".encode(),
            f'Content-Disposition: form-data; name="files"; filename="{name}"'.encode(),
            b"Content-Type: application/octet-stream",
            b"",
            data,
        ]
    out.append(f"--{boundary}--".encode())
    return crlf.join(out) + crlf


# -- authentication -------------------------------------------------------------------


async def test_auth_success_returns_201_and_a_code(
    sb: SandboxServer, client: aiohttp.ClientSession
) -> None:
    now = int(sb.sandbox.now())
    reply = await post_auth(client, sb, auth_payload(str(now)))
    assert reply.status == 201
    assert reply.headers["Content-Type"] == "application/json"
    body = reply.json
    assert body["success"] == 1
    match = CODE_RE.match(body["auth"])
    assert match is not None
    assert abs(int(match.group(2)) - now) <= 2
    assert sb.sandbox.issued_codes == [body["auth"]]
    for header in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "Date"):
        assert header in reply.headers


async def test_auth_with_user_and_password(
    sb: SandboxServer, client: aiohttp.ClientSession
) -> None:
    date = str(int(sb.sandbox.now()))
    ok = await post_auth(client, sb, auth_payload(date, user=USER, password=PASSWORD))
    assert ok.status == 201
    wrong = await post_auth(client, sb, auth_payload(date, user=USER, password="nope"))
    assert wrong.status == 401
    assert wrong.json == {"success": 0, "error_message": "Invalid authentication credentials."}
    stranger = await post_auth(client, sb, auth_payload(date, user="x@example.com", password="p"))
    assert stranger.status == 401


async def test_auth_rejects_bad_signature_and_token(
    sb: SandboxServer, client: aiohttp.ClientSession
) -> None:
    date = str(int(sb.sandbox.now()))
    bad_sig = auth_payload(date, secret="not-the-secret")
    bad_token = auth_payload(date, token="other-token")
    tampered = {**auth_payload(date), "date": str(int(date) - 1)}
    for payload in (bad_sig, bad_token, tampered):
        reply = await post_auth(client, sb, payload)
        assert reply.status == 401, payload
        assert reply.json["success"] == 0


async def test_auth_date_window_and_formats(
    sb: SandboxServer, client: aiohttp.ClientSession
) -> None:
    now = int(sb.sandbox.now())
    ahead = await post_auth(client, sb, auth_payload(str(now + 120)))
    assert ahead.status == 401
    assert "clock" in ahead.json["error_message"]
    assert (await post_auth(client, sb, auth_payload(str(now - 600)))).status == 201
    assert (await post_auth(client, sb, auth_payload(str(now - 1000)))).status == 401
    assert (await post_auth(client, sb, auth_payload(now))).status == 201  # a JSON number
    rfc = formatdate(now, usegmt=True)
    assert (await post_auth(client, sb, auth_payload(rfc))).status == 201
    iso = time.strftime("%Y-%m-%d %H:%M:%S +0000", time.gmtime(now))
    assert (await post_auth(client, sb, auth_payload(iso))).status == 201
    assert (await post_auth(client, sb, auth_payload("yesterday"))).status == 401


async def test_auth_requires_json_content_type(
    sb: SandboxServer, client: aiohttp.ClientSession
) -> None:
    body = json.dumps(auth_payload(str(int(sb.sandbox.now())))).encode()
    reply = await send(client, sb, "POST", AUTH, body=body, headers={"Content-Type": "text/plain"})
    assert reply.status == 400
    garbage = await send(
        client, sb, "POST", AUTH, body=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert garbage.status == 400
    assert garbage.json["success"] == 0


async def test_clock_offset_moves_date_header_and_accepted_window(
    start: Start, client: aiohttp.ClientSession
) -> None:
    server = await start(clock_offset=3600)
    reply = await post_auth(client, server, auth_payload(str(int(time.time()))))
    assert reply.status == 401  # an hour behind the server clock
    server_time = parsedate_to_datetime(reply.headers["Date"]).timestamp()
    assert abs(server_time - (time.time() + 3600)) < 3
    # A client that corrects its skew from the Date header gets in.
    assert (await post_auth(client, server, auth_payload(str(int(server_time))))).status == 201
    server.sandbox.set_clock_offset(0)
    stats = await send(client, server, "GET", "/_sandbox/stats")
    assert abs(parsedate_to_datetime(stats.headers["Date"]).timestamp() - time.time()) < 3


# -- signed requests ------------------------------------------------------------------


async def test_signature_covers_raw_path_and_query(
    sb: SandboxServer, client: aiohttp.ClientSession
) -> None:
    code = await authenticate(client, sb)
    target = "/perl/api/v2/user/joe%40example.com/files/a%2Fb@c?x=1+2&y=%20z&x=3"
    reply = await signed(client, sb, "GET", target, code)
    assert reply.status == 200, reply.raw
    data = reply.json["data"]
    assert data["path"] == "/perl/api/v2/user/joe%40example.com/files/a%2Fb@c"
    assert data["query"] == "x=1+2&y=%20z&x=3"
    assert data["target"] == "joe%40example.com"
    assert data["scope"] == "user"
    # Signed over a differently encoded (but "equivalent") target: refused.
    decoded_path = "/perl/api/v2/user/joe@example.com/files/a%2Fb@c?x=1+2&y=%20z&x=3"
    other_query = "/perl/api/v2/user/joe%40example.com/files/a%2Fb@c?x=1%202&y=+z&x=3"
    for sign_target in (decoded_path, other_query):
        bad = await signed(client, sb, "GET", target, code, sign_target=sign_target)
        assert bad.status == 401
        assert bad.json["error_message"] == "Invalid request signature."


async def test_body_hash_is_over_the_trimmed_body(
    sb: SandboxServer, client: aiohttp.ClientSession
) -> None:
    code = await authenticate(client, sb)
    target = "/perl/api/v2/account/1234/things"
    body = b' \r\n\t{"name": "x"}\n\n  '
    reply = await signed(client, sb, "POST", target, code, body)
    assert reply.status == 200, reply.raw
    assert reply.json["data"]["json"] == {"name": "x"}
    untrimmed = hashlib.sha256(body).hexdigest()
    headers = {**cookie(code, "POST", target, untrimmed), "Content-Type": "application/json"}
    assert (await send(client, sb, "POST", target, body=body, headers=headers)).status == 401


async def test_upper_case_hex_signature_is_accepted(
    sb: SandboxServer, client: aiohttp.ClientSession
) -> None:
    code = await authenticate(client, sb)
    reply = await send(client, sb, "GET", PROFILE, headers=cookie(code, "GET", PROFILE, upper=True))
    assert reply.status == 200


async def test_cookie_problems_are_401(sb: SandboxServer, client: aiohttp.ClientSession) -> None:
    code = await authenticate(client, sb)
    missing = await send(client, sb, "GET", PROFILE)
    assert missing.status == 401
    assert missing.json["success"] == 0
    unknown = "1-1-" + "0" * 40
    assert (await signed(client, sb, "GET", PROFILE, unknown)).status == 401
    malformed = await send(client, sb, "GET", PROFILE, headers={"Cookie": f"signature={code}"})
    assert malformed.status == 401


async def test_json_body_rules(sb: SandboxServer, client: aiohttp.ClientSession) -> None:
    code = await authenticate(client, sb)
    target = "/perl/api/v2/account/1234/things"
    wrong_type = await signed(
        client, sb, "POST", target, code, b'{"a":1}', content_type="text/plain"
    )
    assert wrong_type.status == 400
    not_json = await signed(client, sb, "POST", target, code, b"{a:1}")
    assert not_json.status == 400
    assert "JSON" in not_json.json["error_message"]


async def test_unknown_endpoint_is_405_after_the_signature_check(
    sb: SandboxServer, client: aiohttp.ClientSession
) -> None:
    code = await authenticate(client, sb)
    target = "/perl/api/v2/nothing/here"
    unsigned = await send(client, sb, "GET", target)
    assert unsigned.status == 401
    reply = await signed(client, sb, "GET", target, code)
    assert reply.status == 405
    assert reply.json == {"success": 0, "error_message": "no such endpoint"}


async def test_codes_roll_and_every_success_carries_a_new_one(
    sb: SandboxServer, client: aiohttp.ClientSession
) -> None:
    first = await authenticate(client, sb)
    reply = await signed(client, sb, "GET", PROFILE, first)
    second = reply.json["auth"]
    assert second != first
    assert second.split("-")[0] == first.split("-")[0]  # same session
    third = (await signed(client, sb, "GET", PROFILE, second)).json["auth"]
    assert sb.sandbox.issued_codes == [first, second, third]


async def test_expired_code_is_401(start: Start, client: aiohttp.ClientSession) -> None:
    server = await start(code_lifetime=5)
    code = await authenticate(client, server)
    assert (await signed(client, server, "GET", PROFILE, code)).status == 200
    server.sandbox.set_clock_offset(6)
    expired = await signed(client, server, "GET", PROFILE, code)
    assert expired.status == 401
    assert "expired" in expired.json["error_message"]
    # /_sandbox/expire does it without waiting, for the newest code too.
    fresh = await authenticate(client, server)
    await send(client, server, "POST", "/_sandbox/expire")
    assert (await signed(client, server, "GET", PROFILE, fresh)).status == 401


async def test_delete_auth_revokes_the_whole_session(
    sb: SandboxServer, client: aiohttp.ClientSession
) -> None:
    first = await authenticate(client, sb)
    second = (await signed(client, sb, "GET", PROFILE, first)).json["auth"]
    other_session = await authenticate(client, sb)
    reply = await signed(client, sb, "DELETE", AUTH, second)
    assert reply.status == 200
    assert reply.json == {"success": 1, "comment": "Authentication session revoked."}
    for code in (first, second):
        refused = await signed(client, sb, "GET", PROFILE, code)
        assert refused.status == 401
        assert "revoked" in refused.json["error_message"]
    assert (await signed(client, sb, "GET", PROFILE, other_session)).status == 200
    assert sb.sandbox.stats.revocations == 1


async def test_expect_header_is_417(sb: SandboxServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", sb.port)
    try:
        writer.write(
            f"POST {PROFILE} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: 2\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        # The body is held back, as a client waiting for "100 Continue" would.
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        assert head.startswith(b"HTTP/1.1 417 "), head
        length = re.search(rb"Content-Length: (\d+)", head, re.I)
        assert length is not None
        body = await reader.readexactly(int(length[1]))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert json.loads(body)["success"] == 0
    assert sb.sandbox.stats.by_status == {"417": 1}


# -- uploads -------------------------------------------------------------------------


async def test_multipart_upload_checks_attachment_hashes(
    sb: SandboxServer, client: aiohttp.ClientSession
) -> None:
    code = await authenticate(client, sb)
    target = "/perl/api/v2/user/joe%40example.com/email/compose/secureline/send"
    files = [("a.txt", b"File Content!!"), ("b.bin", bytes(range(256)) * 3)]
    boundary = "-----------------LUXSCI-363789.496459765---"

    async def upload(attachments: list[dict[str, str]], parts: list[tuple[str, bytes]]) -> Reply:
        json_part = json.dumps({"subject": "hi", "attachments": attachments}).encode()
        body = multipart(boundary, json_part, parts)
        headers = {
            **cookie(code, "POST", target, signing.body_hash(json_part)),
            "Content-Type": f'multipart/form-data; boundary="{boundary}"',
        }
        return await send(client, sb, "POST", target, body=body, headers=headers)

    good = [{"name": n, "hash": hashlib.sha256(d).hexdigest()} for n, d in files]
    reply = await upload(good, files)
    assert reply.status == 200, reply.raw
    assert reply.json["data"]["attachments"] == [
        {"name": n, "size": len(d), "hash": hashlib.sha256(d).hexdigest()} for n, d in files
    ]
    assert reply.json["data"]["json"]["subject"] == "hi"

    wrong_hash = [good[0], {"name": "b.bin", "hash": "0" * 64}]
    bad = await upload(wrong_hash, files)
    assert bad.status == 400
    assert "b.bin" in bad.json["error_message"]
    assert (await upload(good[:1], files)).status == 400  # a file not listed
    assert (await upload(good, files[:1])).status == 400  # a listed file missing
    duplicate = await upload(good[:1], [files[0], files[0]])
    assert duplicate.status == 400
    assert "two files" in duplicate.json["error_message"]


async def test_multipart_signature_is_over_the_json_part(
    sb: SandboxServer, client: aiohttp.ClientSession
) -> None:
    code = await authenticate(client, sb)
    target = "/perl/api/v2/account/1234/upload"
    json_part = b'{"attachments":[]}'
    body = multipart("XyZ", json_part, [])
    content_type = "multipart/form-data; boundary=XyZ"
    over_body = {
        **cookie(code, "POST", target, signing.body_hash(body)),
        "Content-Type": content_type,
    }
    assert (await send(client, sb, "POST", target, body=body, headers=over_body)).status == 401
    no_json = multipart("XyZ", b"", []).replace(b'name="json"', b'name="other"')
    headers = {**cookie(code, "POST", target, ""), "Content-Type": content_type}
    reply = await send(client, sb, "POST", target, body=no_json, headers=headers)
    assert reply.status == 400


# -- rate limits ---------------------------------------------------------------------


async def test_user_window_limit_headers_and_reset(
    start: Start, client: aiohttp.ClientSession
) -> None:
    server = await start(user_per_window=3, account_per_window=10)
    align_clock(server.sandbox, 60)
    code = await authenticate(client, server)
    replies = []
    for _ in range(3):
        reply = await signed(client, server, "GET", PROFILE, code)
        assert reply.status == 200
        code = reply.json["auth"]
        replies.append(reply)
    assert [r.remaining for r in replies] == [2, 1, 0]
    window_end = math.floor(server.sandbox.now() / 60) * 60 + 60
    assert {int(r.headers["X-RateLimit-Reset"]) for r in replies} == {window_end}
    assert replies[0].headers["X-RateLimit-Limit"] == "3"
    refused = await signed(client, server, "GET", PROFILE, code)
    assert refused.status == 403
    assert refused.remaining == 0
    assert "Rate limit" in refused.json["error_message"]
    # The account bucket is separate: auth still works.
    assert (
        await post_auth(client, server, auth_payload(str(int(server.sandbox.now()))))
    ).status == 201
    server.sandbox.set_clock_offset(server.sandbox.clock_offset + 60)
    again = await signed(client, server, "GET", PROFILE, code)
    assert again.status == 200
    assert again.remaining == 2
    assert server.sandbox.stats.rate_limited == 1


async def test_window_resets_in_real_time(start: Start, client: aiohttp.ClientSession) -> None:
    server = await start(account_per_window=1, window_seconds=1)
    # Start right after a window boundary so both calls land in the same second.
    await asyncio.sleep(math.ceil(time.time()) - time.time() + 0.02)
    payload = auth_payload(str(int(server.sandbox.now())))
    assert (await post_auth(client, server, payload)).status == 201
    assert (await post_auth(client, server, payload)).status == 403
    await asyncio.sleep(math.ceil(time.time()) - time.time() + 0.02)
    assert (await post_auth(client, server, payload)).status == 201


async def test_auth_counts_against_the_account_bucket(
    start: Start, client: aiohttp.ClientSession
) -> None:
    server = await start(account_per_window=2, user_per_window=5)
    align_clock(server.sandbox, 60)
    payload = auth_payload(str(int(server.sandbox.now())))
    first = await post_auth(client, server, payload)
    assert first.remaining == 1
    assert (await post_auth(client, server, {**payload, "signature": "bad"})).status == 401
    refused = await post_auth(client, server, payload)  # failures count too
    assert refused.status == 403
    assert refused.remaining == 0
    reply = await signed(client, server, "GET", PROFILE, first.json["auth"])
    assert reply.status == 200
    assert reply.headers["X-RateLimit-Limit"] == "5"


async def test_day_limit(start: Start, client: aiohttp.ClientSession) -> None:
    server = await start(per_day=3)
    align_clock(server.sandbox, 86400)
    code = await authenticate(client, server)
    for _ in range(2):
        reply = await signed(client, server, "GET", PROFILE, code)
        assert reply.status == 200
        code = reply.json["auth"]
    refused = await signed(client, server, "GET", PROFILE, code)
    assert refused.status == 403
    assert "daily" in refused.json["error_message"]
    server.sandbox.set_clock_offset(server.sandbox.clock_offset + 86400)
    code = await authenticate(client, server)  # a new day
    assert (await signed(client, server, "GET", PROFILE, code)).status == 200


# -- faults --------------------------------------------------------------------------


async def test_fault_475_once_then_success(
    sb: SandboxServer, client: aiohttp.ClientSession
) -> None:
    code = await authenticate(client, sb)
    sb.sandbox.add_fault(status=475)
    first = await signed(client, sb, "GET", PROFILE, code)
    assert first.status == 475
    assert first.json["success"] == 0
    assert "X-RateLimit-Remaining" in first.headers
    assert (await signed(client, sb, "GET", PROFILE, code)).status == 200


async def test_fault_503_without_json(sb: SandboxServer, client: aiohttp.ClientSession) -> None:
    sb.sandbox.add_fault({"status": 503, "json": False})
    reply = await send(client, sb, "GET", PROFILE)
    assert reply.status == 503
    assert not reply.headers["Content-Type"].startswith("application/json")
    with pytest.raises(ValueError):
        json.loads(reply.raw)


async def test_fault_matches_method_and_path_prefix(
    sb: SandboxServer, client: aiohttp.ClientSession
) -> None:
    code = await authenticate(client, sb)
    sb.sandbox.add_fault(status=429, method="POST", path_prefix="/perl/api/v2/account/", times=2)
    assert (await signed(client, sb, "GET", "/perl/api/v2/account/1/x", code)).status == 200
    assert (await signed(client, sb, "POST", PROFILE, code, b"{}")).status == 200
    for _ in range(2):
        reply = await signed(client, sb, "POST", "/perl/api/v2/account/1/x", code, b"{}")
        assert reply.status == 429
        assert reply.json == {"success": 0, "error_message": "Too many objects"}
    assert (await signed(client, sb, "POST", "/perl/api/v2/account/1/x", code, b"{}")).status == 200


async def test_fault_that_does_not_count_against_the_limit(
    sb: SandboxServer, client: aiohttp.ClientSession
) -> None:
    align_clock(sb.sandbox, 60)
    sb.sandbox.add_fault(status=500, counts_against_limit=False)
    assert (await send(client, sb, "GET", PROFILE)).remaining == 60
    sb.sandbox.add_fault(status=500)
    assert (await send(client, sb, "GET", PROFILE)).remaining == 59


async def test_fault_drop_closes_the_connection(
    sb: SandboxServer, client: aiohttp.ClientSession
) -> None:
    sb.sandbox.add_fault(drop=True)
    response = await raw_exchange(sb, f"GET {PROFILE} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    assert response == b""
    # aiohttp's client retries an idempotent request once after a disconnect: use POST.
    sb.sandbox.add_fault(drop=True)
    with pytest.raises(aiohttp.ClientConnectionError):
        await send(client, sb, "POST", PROFILE, body=b"{}")
    assert sb.sandbox.stats.dropped == 2


async def test_fault_delay(sb: SandboxServer, client: aiohttp.ClientSession) -> None:
    code = await authenticate(client, sb)
    sb.sandbox.add_fault(delay=0.3)
    began = time.monotonic()
    assert (await signed(client, sb, "GET", PROFILE, code)).status == 200
    assert time.monotonic() - began >= 0.3
    sb.sandbox.add_fault(delay=0.5, status=408)
    with pytest.raises(TimeoutError):
        await send(client, sb, "GET", PROFILE, timeout=aiohttp.ClientTimeout(total=0.1))


async def test_max_inflight_counts_concurrent_requests(
    sb: SandboxServer, client: aiohttp.ClientSession
) -> None:
    sb.sandbox.add_fault(delay=0.2, status=503, times=3)
    replies = await asyncio.gather(*(send(client, sb, "GET", PROFILE) for _ in range(3)))
    assert [r.status for r in replies] == [503, 503, 503]
    assert sb.sandbox.stats.max_inflight == 3


# -- host, escapes, big bodies ---------------------------------------------------------


async def test_expected_host(start: Start, client: aiohttp.ClientSession) -> None:
    server = await start(expected_host="rest.example.test")
    payload = auth_payload(str(int(server.sandbox.now())))
    wrong = await post_auth(client, server, payload)
    assert wrong.status == 403
    assert wrong.json["success"] == 0
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", "Host": "REST.example.test:443"}
    assert (await send(client, server, "POST", AUTH, body=body, headers=headers)).status == 201


async def test_profile_uses_u0073_escapes(sb: SandboxServer, client: aiohttp.ClientSession) -> None:
    code = await authenticate(client, sb)
    reply = await signed(client, sb, "GET", PROFILE, code)
    assert b'"de\\u0073cription"' in reply.raw
    assert b"description" not in reply.raw
    data = reply.json["data"]
    assert "description" in data
    assert data["login"] == USER
    assert data["name"] == "Joe Example"


async def test_big_response_puts_auth_last(
    sb: SandboxServer, client: aiohttp.ClientSession
) -> None:
    code = await authenticate(client, sb)
    big = await signed(client, sb, "GET", "/perl/api/v2/account/1/report?_bytes=300000", code)
    assert big.status == 200
    assert len(big.raw) >= 300000
    assert list(big.json) == ["success", "data", "auth"]
    assert re.search(rb'"auth":"[^"]+"\}$', big.raw)
    target = "/perl/api/v2/account/1/report?_bytes=1000&_auth_position=first"
    first = await signed(client, sb, "GET", target, big.json["auth"])
    assert next(iter(first.json)) == "auth"
    bad = await signed(client, sb, "GET", "/perl/api/v2/account/1/r?_bytes=lots", code)
    assert bad.status == 400


# -- controls and stats -------------------------------------------------------------------


async def test_control_endpoints_over_http(
    sb: SandboxServer, client: aiohttp.ClientSession
) -> None:
    code = await authenticate(client, sb)
    rules = [{"status": 500}, {"status": 502, "json": False, "path_prefix": "/perl/api/v2/user/"}]
    added = await send(client, sb, "POST", "/_sandbox/faults", body=json.dumps(rules).encode())
    assert added.json["added"] == 2
    listed = await send(client, sb, "GET", "/_sandbox/faults")
    assert [f["status"] for f in listed.json["faults"]] == [500, 502]
    assert (await send(client, sb, "DELETE", "/_sandbox/faults")).status == 200
    assert (await signed(client, sb, "GET", PROFILE, code)).status == 200
    invalid = await send(client, sb, "POST", "/_sandbox/faults", body=b'{"status": "x"}')
    assert invalid.status == 400

    assert (await send(client, sb, "POST", "/_sandbox/revoke")).status == 200
    assert (await signed(client, sb, "GET", PROFILE, code)).status == 401

    clock = await send(client, sb, "POST", "/_sandbox/clock", body=b'{"offset": 120}')
    assert clock.json["offset"] == 120
    assert sb.sandbox.clock_offset == 120

    assert (await send(client, sb, "POST", "/_sandbox/reset")).status == 200
    stats = (await send(client, sb, "GET", "/_sandbox/stats")).json
    assert stats["requests"] == 0
    assert stats["issued_codes"] == []
    assert sb.sandbox.clock_offset == 0


async def test_stats_count_auth_calls_and_statuses(
    sb: SandboxServer, client: aiohttp.ClientSession
) -> None:
    code = await authenticate(client, sb)
    await post_auth(client, sb, auth_payload("1"))
    await signed(client, sb, "GET", PROFILE, code)
    stats = (await send(client, sb, "GET", "/_sandbox/stats")).json
    assert stats["auth_calls"] == 2
    assert stats["auth_failures"] == 1
    assert stats["requests"] == 3
    assert stats["by_status"] == {"201": 1, "401": 1, "200": 1}
    assert len(stats["issued_codes"]) == 2
    assert [(e["method"], e["target"], e["status"]) for e in stats["log"]] == [
        ("POST", AUTH, 201),
        ("POST", AUTH, 401),
        ("GET", PROFILE, 200),
    ]
    assert stats["log"][2]["scope"] == "user"


async def test_every_response_has_the_server_date(
    start: Start, client: aiohttp.ClientSession
) -> None:
    server = await start(clock_offset=-7200)
    for target in (PROFILE, "/_sandbox/stats", "/elsewhere"):
        reply = await send(client, server, "GET", target)
        stamped = parsedate_to_datetime(reply.headers["Date"]).timestamp()
        assert abs(stamped - (time.time() - 7200)) < 3, target


# -- TLS and CLI -------------------------------------------------------------------------


async def test_tls(start: Start) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    # "localhost" may name both 127.0.0.1 and ::1: the URL must work whichever is tried.
    server = await start(ssl_context=server_ctx, host="localhost")
    assert server.url == f"https://localhost:{server.port}"
    connector = aiohttp.TCPConnector(ssl=client_ctx)
    async with aiohttp.ClientSession(connector=connector) as tls_client:
        code = await authenticate(tls_client, server)
        assert (await signed(tls_client, server, "GET", PROFILE, code)).status == 200


def test_cli_config_from_args(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    sandbox_cli.add_arguments(parser)
    monkeypatch.setenv("LUXSCI_SANDBOX_SECRET", "from-env")
    args = parser.parse_args(
        ["--user", "a@x.test:pw:with:colons", "--user", "b@x.test:pw2", "--window-seconds", "2"]
    )
    config = sandbox_cli.config_from_args(args)
    assert config.secret == "from-env"
    assert config.token == "sandbox-token"
    assert config.users == {"a@x.test": "pw:with:colons", "b@x.test": "pw2"}
    assert config.window_seconds == 2
    assert "from-env" not in repr(config)
    assert "from-env" not in parser.format_help()
    default = sandbox_cli.config_from_args(parser.parse_args([]))
    assert default.users == {"joe@example.com": "joe-password"}


async def test_cli_serve_prints_url_and_stops_on_sigterm() -> None:
    env = {**os.environ, "LUXSCI_SANDBOX_SECRET": "very-secret-value"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.sandbox",
        "--port",
        "0",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), timeout=10)).decode()
    match = re.fullmatch(
        r"sandbox listening on (http://127\.0\.0\.1:\d+) \(token=sandbox-token\)\n", line
    )
    assert match is not None, line
    async with (
        aiohttp.ClientSession() as session,
        session.get(match[1] + "/_sandbox/stats") as resp,
    ):
        assert resp.status == 200
    process.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(process.communicate(), timeout=10)
    assert process.returncode == 0, err
    assert b"very-secret-value" not in line.encode() + out + err
