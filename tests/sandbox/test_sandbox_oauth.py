"""The sandbox's OAuth 2.0 mode, over real sockets: as strict as RFC 6749 and RFC 6750.

Requests are built by hand here (not with the proxy's token client), so a mistake
shared by the proxy and the sandbox would show.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import pytest

from proxy.sandbox import SandboxConfig, SandboxServer, start_sandbox
from proxy.sandbox import cli as sandbox_cli
from proxy.sandbox.config import OAuthSettings

ID, SECRET = "client-1", "secret-1"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
BASIC = {**FORM, "Authorization": "Basic " + base64.b64encode(f"{ID}:{SECRET}".encode()).decode()}

Start = Callable[..., Awaitable[SandboxServer]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    servers: list[SandboxServer] = []

    async def _start(sandbox: dict[str, Any] | None = None, **settings: Any) -> SandboxServer:
        oauth = OAuthSettings(client_id=ID, client_secret=SECRET, **settings)
        server = await start_sandbox(SandboxConfig(oauth=oauth, **(sandbox or {})), port=0)
        servers.append(server)
        return server

    yield _start
    for server in servers:
        await server.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    client: aiohttp.ClientSession, url: str, body: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], Any]:
    async with client.post(url, data=body.encode(), headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.json(content_type=None)


async def token(
    client: aiohttp.ClientSession,
    server: SandboxServer,
    body: str = "grant_type=client_credentials",
) -> tuple[int, dict[str, str], Any]:
    return await post(client, server.url + "/oauth/token", body, BASIC)


async def api(
    client: aiohttp.ClientSession, server: SandboxServer, access: str | None
) -> tuple[int, dict[str, str], Any]:
    headers = {"Authorization": f"Bearer {access}"} if access else {}
    async with client.get(server.url + "/v1/things", headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def test_client_credentials_answer_is_rfc_6749_5_1(
    start: Start, client: aiohttp.ClientSession
) -> None:
    server = await start(token_lifetime=120)
    status, headers, body = await token(client, server)
    assert status == 200
    assert headers["Cache-Control"] == "no-store" and headers["Pragma"] == "no-cache"
    assert body["token_type"] == "Bearer" and body["expires_in"] == 120
    assert "refresh_token" not in body  # §4.4.3: none for client credentials
    status, _, answer = await api(client, server, body["access_token"])
    assert status == 200 and answer["data"]["path"] == "/v1/things"


async def test_basic_credentials_are_form_decoded_and_post_credentials_work_too(
    start: Start, client: aiohttp.ClientSession
) -> None:
    server = await start()
    assert server.sandbox.oauth is not None
    server.sandbox.oauth.settings = OAuthSettings(client_id="a:b ü", client_secret="p+w/=")
    encoded = base64.b64encode(b"a%3Ab+%C3%BC:p%2Bw%2F%3D").decode()
    headers = {**FORM, "Authorization": f"Basic {encoded}"}
    status, _, _ = await post(
        client, server.url + "/oauth/token", "grant_type=client_credentials", headers
    )
    assert status == 200
    # The same pair not form-encoded: the ":" in the id splits it, so it is refused.
    raw = base64.b64encode("a:b ü:p+w/=".encode()).decode()
    status, headers_out, body = await post(
        client,
        server.url + "/oauth/token",
        "grant_type=client_credentials",
        {**FORM, "Authorization": f"Basic {raw}"},
    )
    assert (status, body["error"]) == (401, "invalid_client")
    assert headers_out["WWW-Authenticate"].startswith("Basic")
    status, _, _ = await post(
        client,
        server.url + "/oauth/token",
        "grant_type=client_credentials&client_id=a%3Ab+%C3%BC&client_secret=p%2Bw%2F%3D",
        FORM,
    )
    assert status == 200
    assert server.sandbox.oauth.stats.client_auth == [
        "client_secret_basic",
        "client_secret_basic",
        "client_secret_post",
    ]


@pytest.mark.parametrize(
    ("body", "headers", "status", "error"),
    [
        ("grant_type=client_credentials", {}, 400, "invalid_request"),  # not a form
        ("grant_type=client_credentials&grant_type=x", BASIC, 400, "invalid_request"),
        ("scope=a", BASIC, 400, "invalid_request"),  # no grant_type
        ("grant_type=client_credentials", FORM, 401, "invalid_client"),  # no client auth
        (
            f"grant_type=client_credentials&client_id={ID}&client_secret={SECRET}",
            BASIC,
            400,
            "invalid_request",  # two methods at once
        ),
        (
            f"grant_type=client_credentials&client_id={ID}&client_secret=no",
            FORM,
            400,
            "invalid_client",
        ),
        ("grant_type=password&username=a&password=b", BASIC, 400, "unsupported_grant_type"),
        ("grant_type=refresh_token&refresh_token=nope", BASIC, 400, "invalid_grant"),
        ("grant_type=refresh_token", BASIC, 400, "invalid_request"),
        ("grant_type=client_credentials&scope=admin", BASIC, 400, "invalid_scope"),
    ],
)
async def test_token_errors_follow_rfc_6749_5_2(
    body: str,
    headers: dict[str, str],
    status: int,
    error: str,
    start: Start,
    client: aiohttp.ClientSession,
) -> None:
    server = await start(scopes=("read", "write"))
    answer = await post(client, server.url + "/oauth/token", body, headers)
    assert (answer[0], answer[2]["error"]) == (status, error)
    assert answer[1]["Cache-Control"] == "no-store"


async def test_refresh_rotates_and_a_reused_token_revokes_the_whole_line(
    start: Start, client: aiohttp.ClientSession
) -> None:
    server = await start()
    oauth = server.sandbox.oauth
    assert oauth is not None
    first = oauth.mint_refresh_token()
    status, _, body = await token(client, server, f"grant_type=refresh_token&refresh_token={first}")
    assert status == 200 and body["refresh_token"] != first
    second, access = body["refresh_token"], body["access_token"]
    # The rotated-away token again: theft, as far as the server can tell.
    status, _, body = await token(client, server, f"grant_type=refresh_token&refresh_token={first}")
    assert (status, body["error"]) == (400, "invalid_grant")
    assert oauth.stats.families_revoked == 1
    status, _, body = await token(
        client, server, f"grant_type=refresh_token&refresh_token={second}"
    )
    assert (status, body["error"]) == (400, "invalid_grant")  # the newest one died with it
    assert (await api(client, server, access))[0] == 401


async def test_without_rotation_the_refresh_token_stays(
    start: Start, client: aiohttp.ClientSession
) -> None:
    server = await start(rotate_refresh_tokens=False)
    assert server.sandbox.oauth is not None
    refresh = server.sandbox.oauth.mint_refresh_token()
    for _ in range(2):
        status, _, body = await token(
            client, server, f"grant_type=refresh_token&refresh_token={refresh}"
        )
        assert status == 200 and "refresh_token" not in body


async def test_the_api_wants_a_valid_bearer_token_and_says_why_not(
    start: Start, client: aiohttp.ClientSession
) -> None:
    server = await start(token_lifetime=0.3)
    status, headers, _ = await api(client, server, None)
    # RFC 6750 §3.1: no credentials, no error code in the challenge.
    assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="sandbox"'
    status, headers, _ = await api(client, server, "made-up")
    assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]
    access = (await token(client, server))[2]["access_token"]
    assert (await api(client, server, access))[0] == 200
    await asyncio.sleep(0.35)
    status, headers, _ = await api(client, server, access)
    assert status == 401 and "expired" in headers["WWW-Authenticate"]
    assert server.sandbox.oauth is not None
    assert server.sandbox.oauth.stats.api_unauthorized == 3


async def test_controls_revoke_expire_inject_and_change_settings(
    start: Start, client: aiohttp.ClientSession
) -> None:
    server = await start()
    base = server.url + "/_sandbox/oauth"
    async with client.post(base + "/refresh-token") as resp:
        refresh = (await resp.json())["refresh_token"]
    access = (await token(client, server))[2]["access_token"]
    async with client.post(base + "/expire"):
        pass
    assert (await api(client, server, access))[0] == 401
    async with client.post(base + "/revoke", json={"access": False}):
        pass
    body = (await token(client, server, f"grant_type=refresh_token&refresh_token={refresh}"))[2]
    assert body["error"] == "invalid_grant"
    async with client.post(base + "/error", json={"error": "invalid_scope", "times": 2}) as resp:
        assert resp.status == 200
    for _ in range(2):
        assert (await token(client, server))[2]["error"] == "invalid_scope"
    assert (await token(client, server))[0] == 200
    async with client.post(base + "/error", json={"status": 503, "retry_after": 7}) as resp:
        assert resp.status == 200
    async with client.post(
        server.url + "/oauth/token", data="grant_type=client_credentials", headers=BASIC
    ) as resp:
        assert (resp.status, resp.headers["Retry-After"]) == (503, "7")
    async with client.post(
        base + "/settings", json={"token_type": "mac", "send_expires_in": False}
    ) as resp:
        settings = (await resp.json())["settings"]
        assert settings["token_type"] == "mac" and "client_secret" not in settings
    body = (await token(client, server))[2]
    assert body["token_type"] == "mac" and "expires_in" not in body
    async with client.post(base + "/settings", json={"token_lifetime": -1}) as resp:
        assert resp.status == 400
    async with client.post(base + "/error", json={"times": 0, "error": "x"}) as resp:
        assert resp.status == 400
    async with client.get(server.url + "/_sandbox/stats") as resp:
        stats = (await resp.json())["oauth"]
    assert stats["errors"][:3] == ["invalid_grant", "invalid_scope", "invalid_scope"]
    assert stats["issued_refresh_tokens"] == [refresh]


async def test_controls_say_so_when_not_in_oauth_mode(client: aiohttp.ClientSession) -> None:
    server = await start_sandbox(SandboxConfig(), port=0)
    try:
        async with client.post(server.url + "/_sandbox/oauth/expire") as resp:
            assert resp.status == 404
    finally:
        await server.close()


@pytest.mark.parametrize(
    ("style", "names"),
    [
        ("x", {"X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"}),
        ("x-delta", {"X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"}),
        ("ietf", {"RateLimit", "RateLimit-Policy"}),
        ("ietf-split", {"RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"}),
        ("none", set()),
    ],
)
async def test_the_limit_in_each_header_dialect_and_a_429_past_it(
    style: str, names: set[str], start: Start, client: aiohttp.ClientSession
) -> None:
    server = await start({"window_seconds": 60, "account_per_window": 2}, rate_headers=style)
    access = (await token(client, server))[2]["access_token"]
    answers = [await api(client, server, access) for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 429]
    headers = answers[1][1]
    stated = {name for name in headers if "ratelimit" in name.lower()}
    assert stated == names
    if style == "ietf":
        assert headers["RateLimit-Policy"] == "2;w=60"
        assert headers["RateLimit"].startswith("limit=2, remaining=0, reset=")
    if style == "x-delta":
        assert 0 < int(headers["X-RateLimit-Reset"]) <= 60
    if style == "x":
        assert int(headers["X-RateLimit-Reset"]) % 60 == 0
    assert 1 <= int(answers[2][1]["Retry-After"]) <= 60


async def test_retry_after_as_an_http_date(start: Start, client: aiohttp.ClientSession) -> None:
    server = await start({"window_seconds": 60, "account_per_window": 1}, retry_after="date")
    access = (await token(client, server))[2]["access_token"]
    await api(client, server, access)
    status, headers, _ = await api(client, server, access)
    assert status == 429
    when = parsedate_to_datetime(headers["Retry-After"]).timestamp()
    assert when % 60 == 0 and 0 < when - server.sandbox.now() <= 61


def test_cli_oauth_flags() -> None:
    parser = argparse.ArgumentParser()
    sandbox_cli.add_arguments(parser)
    config = sandbox_cli.config_from_args(
        parser.parse_args(["--oauth", "--client-id", "c", "--token-lifetime", "5"])
    )
    assert config.oauth is not None
    assert (config.oauth.client_id, config.oauth.token_lifetime) == ("c", 5.0)
    assert sandbox_cli.config_from_args(parser.parse_args([])).oauth is None
    assert json.dumps(repr(config.oauth)).count("client_secret") == 0
