"""OAuth 2.0 through the real proxy and the sandbox's OAuth mode, over real sockets."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import MakeProxy, MakeSandbox, RunningProxy

from proxy.config import Secret
from proxy.sandbox import SandboxServer
from proxy.sandbox.config import OAuthSettings
from proxy.schemes.oauth2 import OAuth2Scheme
from proxy.schemes.oauth2_state import TokenStore, parse_keys
from proxy.schemes.oauth2_token import ERROR_CODES

CLIENT_ID = "proxy-client"
CLIENT_SECRET = "proxy-client-secret-9f8e7d"
STATE_KEY = base64.b64encode(bytes(range(32))).decode()
OTHER_KEY = base64.b64encode(bytes(range(1, 33))).decode()
PATH = "/v1/things"


async def oauth_sandbox(make_sandbox: MakeSandbox, **settings: Any) -> SandboxServer:
    return await make_sandbox(
        oauth=OAuthSettings(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, **settings)
    )


def oauth_auth(sandbox: SandboxServer, **overrides: Any) -> dict[str, Any]:
    """The auth section of a client-credentials integration against `sandbox`."""
    return {
        "scheme": "oauth2",
        "token_url": sandbox.url + "/oauth/token",
        "client_id": CLIENT_ID,
        "client_secret": Secret(CLIENT_SECRET),
        # Quick background retries after a token failure, so recovery is seen in a test.
        "retry_min": 0.05,
        "retry_max": 0.2,
        **overrides,
    }


def refresh_auth(sandbox: SandboxServer, state_file: Path, **overrides: Any) -> dict[str, Any]:
    """A refresh-token integration starting from a refresh token the sandbox just minted."""
    settings: dict[str, Any] = {
        "grant": "refresh_token",
        "refresh_token": Secret(mint(sandbox)),
        "state_key": Secret(STATE_KEY),
        "state_file": str(state_file),
    }
    return oauth_auth(sandbox, **{**settings, **overrides})


def mint(sandbox: SandboxServer) -> str:
    assert sandbox.sandbox.oauth is not None
    return sandbox.sandbox.oauth.mint_refresh_token()


def files_in(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir()]


def oauth_stats(sandbox: SandboxServer) -> Any:
    assert sandbox.sandbox.oauth is not None
    return sandbox.sandbox.oauth.stats


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str], Any]:
    async with http.get(url) as resp:
        return resp.status, dict(resp.headers), await resp.json(content_type=None)


async def readyz(http: aiohttp.ClientSession, proxy: RunningProxy) -> tuple[int, Any]:
    status, _, body = await get(http, proxy.admin_url + "/readyz")
    return status, body


async def test_a_token_at_start_makes_readyz_true_and_every_request_carries_it(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await oauth_sandbox(make_sandbox)
    proxy = await make_proxy(sandbox.url, auth=oauth_auth(sandbox))
    assert oauth_stats(sandbox).token_calls == 1  # before any request
    status, ready = await readyz(http, proxy)
    assert status == 200, ready
    auth = ready["checks"]["auth"]
    assert auth["ok"] is True and auth["scheme"] == "oauth2" and 3500 < auth["expires_in"] <= 3600
    for _ in range(3):
        status, _, body = await get(http, proxy.url + PATH + "?a=1")
        assert status == 200, body
        assert body["data"]["query"] == "a=1"
    stats = oauth_stats(sandbox)
    assert stats.token_calls == 1 and stats.by_grant == {"client_credentials": 1}
    assert stats.api_unauthorized == 0


async def test_a_client_authorization_header_never_goes_upstream(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await oauth_sandbox(make_sandbox)
    proxy = await make_proxy(sandbox.url, auth=oauth_auth(sandbox))
    async with http.get(proxy.url + PATH, headers={"Authorization": "Bearer forged"}) as resp:
        assert resp.status == 200  # the proxy's token, not the client's


async def test_expiry_and_refresh_while_busy_no_request_fails(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await oauth_sandbox(make_sandbox, token_lifetime=1.0)
    proxy = await make_proxy(sandbox.url, auth=oauth_auth(sandbox, refresh_margin=0.5))
    deadline = time.monotonic() + 3.5  # three and a half token lifetimes
    results: list[int] = []

    async def worker() -> None:
        while time.monotonic() < deadline:
            status, _, _ = await get(http, proxy.url + PATH)
            results.append(status)
            await asyncio.sleep(0.02)

    await asyncio.gather(*(worker() for _ in range(4)))
    assert len(results) > 40
    assert set(results) == {200}
    stats = oauth_stats(sandbox)
    # Each token was replaced in the background before it ran out: none was ever refused.
    assert stats.api_unauthorized == 0
    assert 4 <= stats.token_calls <= 9


async def test_fifty_concurrent_requests_share_one_refresh(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    # A slow token endpoint, so every request is waiting while the one refresh runs.
    sandbox = await oauth_sandbox(make_sandbox, token_delay=0.3)
    proxy = await make_proxy(sandbox.url, auth=oauth_auth(sandbox))
    assert oauth_stats(sandbox).token_calls == 1
    assert sandbox.sandbox.oauth is not None
    sandbox.sandbox.oauth.revoke(access=True, refresh=False)  # every request now gets a 401

    results = await asyncio.gather(*(get(http, proxy.url + PATH) for _ in range(50)))
    assert [status for status, _, _ in results] == [200] * 50
    assert oauth_stats(sandbox).token_calls == 2  # one refresh for all fifty


async def test_without_expires_in_a_short_life_is_assumed_and_a_401_refreshes_early(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await oauth_sandbox(make_sandbox, token_lifetime=0.5, send_expires_in=False)
    proxy = await make_proxy(sandbox.url, auth=oauth_auth(sandbox))
    _, ready = await readyz(http, proxy)
    assert 290 <= ready["checks"]["auth"]["expires_in"] <= 300  # ASSUMED_LIFETIME
    await asyncio.sleep(0.6)  # the server's half-second token has run out
    status, _, _ = await get(http, proxy.url + PATH)
    assert status == 200
    stats = oauth_stats(sandbox)
    assert stats.api_unauthorized == 1 and stats.token_calls == 2  # one 401, one refresh


async def test_one_refresh_and_one_retry_then_a_second_401_is_the_clients(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await oauth_sandbox(make_sandbox)
    proxy = await make_proxy(sandbox.url, auth=oauth_auth(sandbox))
    sandbox.sandbox.add_fault(status=401, times=2, path_prefix=PATH)
    status, _, _ = await get(http, proxy.url + PATH)
    assert status == 401
    assert oauth_stats(sandbox).token_calls == 2  # start-up, and the one refresh


@pytest.mark.parametrize("client_auth", ["client_secret_basic", "client_secret_post"])
async def test_client_authentication_as_the_sandbox_sees_it(
    client_auth: str, make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    # An id and a secret with the characters §2.3.1's form-encoding exists for.
    client_id, secret = "app:id+ü 1", "s3cr%t:with/=+ spaces"
    sandbox = await make_sandbox(
        oauth=OAuthSettings(client_id=client_id, client_secret=secret, client_auth=client_auth)
    )
    auth = oauth_auth(
        sandbox,
        client_id=client_id,
        client_secret=Secret(secret),
        client_auth=client_auth,
        scope="read write",
        audience="https://api.example.com/",
    )
    proxy = await make_proxy(sandbox.url, auth=auth)
    assert (await get(http, proxy.url + PATH))[0] == 200
    stats = oauth_stats(sandbox)
    assert stats.client_auth == [client_auth] and stats.token_failures == 0
    assert stats.scopes == ["read write"] and stats.audiences == ["https://api.example.com/"]


async def test_the_other_client_authentication_is_refused_as_invalid_client(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await oauth_sandbox(make_sandbox, client_auth="client_secret_post")
    proxy = await make_proxy(sandbox.url, auth=oauth_auth(sandbox))  # basic by default
    status, headers, body = await get(http, proxy.url + PATH)
    assert status == 502 and headers["X-Proxy-Error"] == "upstream_auth_failed"
    assert "invalid_client" in body["error_message"]
    assert oauth_stats(sandbox).client_auth[0] == "client_secret_basic"


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
async def test_each_rfc_error_makes_the_proxy_not_ready_and_is_named_then_it_recovers(
    code: str, make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await oauth_sandbox(make_sandbox)
    assert sandbox.sandbox.oauth is not None
    sandbox.sandbox.oauth.inject({"error": code, "description": "Sandbox says no.", "times": 3})
    proxy = await make_proxy(sandbox.url, auth=oauth_auth(sandbox, retry_min=0.3, retry_max=0.3))
    status, ready = await readyz(http, proxy)
    assert status == 503
    error = ready["checks"]["auth"]["error"]
    assert f"refused: {code} (Sandbox says no.)" in error
    status, headers, body = await get(http, proxy.url + PATH)
    assert status == 502 and headers["X-Proxy-Error"] == "upstream_auth_failed"
    assert code in body["error_message"] and CLIENT_SECRET not in body["error_message"]
    # Not an API call per request: the failure is remembered while the proxy backs off.
    calls = oauth_stats(sandbox).token_calls
    assert calls <= 2
    # The background retries get through once the server stops refusing.
    for _ in range(60):
        if (await readyz(http, proxy))[0] == 200:
            break
        await asyncio.sleep(0.1)
    assert (await readyz(http, proxy))[0] == 200
    assert (await get(http, proxy.url + PATH))[0] == 200


async def test_a_non_bearer_token_type_is_refused(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await oauth_sandbox(make_sandbox, token_type="mac")
    proxy = await make_proxy(sandbox.url, auth=oauth_auth(sandbox))
    status, ready = await readyz(http, proxy)
    assert status == 503 and "token_type 'mac', not Bearer" in ready["checks"]["auth"]["error"]
    status, _, body = await get(http, proxy.url + PATH)
    assert status == 502 and "not Bearer" in body["error_message"]
    assert oauth_stats(sandbox).api_unauthorized == 0  # never sent to the API


async def test_lower_case_bearer_is_a_bearer_token(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await oauth_sandbox(make_sandbox, token_type="bearer")
    proxy = await make_proxy(sandbox.url, auth=oauth_auth(sandbox))
    assert (await get(http, proxy.url + PATH))[0] == 200


async def test_an_unreachable_token_endpoint_is_named_and_not_ready(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await oauth_sandbox(make_sandbox)
    proxy = await make_proxy(
        sandbox.url, auth=oauth_auth(sandbox, token_url="http://127.0.0.1:9/oauth/token")
    )
    status, ready = await readyz(http, proxy)
    assert status == 503 and "token endpoint: cannot connect" in ready["checks"]["auth"]["error"]
    status, headers, _ = await get(http, proxy.url + PATH)
    assert status == 502 and headers["X-Proxy-Error"] == "upstream_auth_failed"


# -- the refresh-token grant -----------------------------------------------------------------


async def test_a_revoked_refresh_token_makes_the_proxy_not_ready_naming_invalid_grant(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    sandbox = await oauth_sandbox(make_sandbox)
    proxy = await make_proxy(sandbox.url, auth=refresh_auth(sandbox, tmp_path / "state"))
    assert (await get(http, proxy.url + PATH))[0] == 200
    assert sandbox.sandbox.oauth is not None
    sandbox.sandbox.oauth.revoke()  # access and refresh tokens: a person must act now

    status, headers, body = await get(http, proxy.url + PATH)
    assert status == 502 and headers["X-Proxy-Error"] == "upstream_auth_failed"
    assert "invalid_grant" in body["error_message"]
    status, ready = await readyz(http, proxy)
    assert status == 503 and "invalid_grant" in ready["checks"]["auth"]["error"]
    for text in (body["error_message"], ready["checks"]["auth"]["error"]):
        assert CLIENT_SECRET not in text
        for token in oauth_stats(sandbox).issued_refresh_tokens:
            assert token not in text


async def test_rotation_is_persisted_encrypted_and_a_new_service_starts_from_the_newest(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    sandbox = await oauth_sandbox(make_sandbox)
    state = tmp_path / "state" / "oauth2.state"
    auth = refresh_auth(sandbox, state)
    first = await make_proxy(sandbox.url, auth=auth)
    assert (await get(http, first.url + PATH))[0] == 200
    assert sandbox.sandbox.oauth is not None
    sandbox.sandbox.oauth.expire()  # the next request gets a 401, then a refresh: a rotation
    assert (await get(http, first.url + PATH))[0] == 200
    await first.service.stop()

    stats = oauth_stats(sandbox)
    minted, *rotated = stats.issued_refresh_tokens
    assert len(rotated) == 2  # start-up and after the 401: each refresh rotated it
    raw = state.read_bytes()
    for token in [*stats.issued_refresh_tokens, *stats.issued_access_tokens, CLIENT_SECRET]:
        assert token.encode() not in raw
    stored = TokenStore(state, parse_keys(STATE_KEY), f"{auth['token_url']}\n{CLIENT_ID}").load()
    assert stored is not None and stored.refresh_token == rotated[-1]

    # The config still names the minted token, long rotated away: presenting it would
    # make the sandbox revoke the whole line. The new service starts from the file.
    second = await make_proxy(sandbox.url, auth=auth)
    assert (await readyz(http, second))[0] == 200
    assert (await get(http, second.url + PATH))[0] == 200
    assert stats.families_revoked == 0 and stats.token_failures == 0
    assert minted not in [t for t in stats.issued_refresh_tokens[1:]]


async def test_a_new_refresh_token_in_the_config_wins_over_the_saved_line(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    sandbox = await oauth_sandbox(make_sandbox)
    state = tmp_path / "oauth2.state"
    first = await make_proxy(sandbox.url, auth=refresh_auth(sandbox, state))
    await first.service.stop()
    assert sandbox.sandbox.oauth is not None
    sandbox.sandbox.oauth.revoke()  # that line is dead; an operator issues a new token
    second = await make_proxy(sandbox.url, auth=refresh_auth(sandbox, state))
    assert (await readyz(http, second))[0] == 200


async def test_a_state_file_that_does_not_decrypt_blocks_every_token_call(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    sandbox = await oauth_sandbox(make_sandbox)
    state = tmp_path / "oauth2.state"
    first = await make_proxy(sandbox.url, auth=refresh_auth(sandbox, state))
    await first.service.stop()
    calls = oauth_stats(sandbox).token_calls
    proxy = await make_proxy(
        sandbox.url, auth=refresh_auth(sandbox, state, state_key=Secret(OTHER_KEY))
    )
    status, ready = await readyz(http, proxy)
    assert status == 503 and "auth.state_key" in ready["checks"]["auth"]["error"]
    status, headers, _ = await get(http, proxy.url + PATH)
    assert status == 502 and headers["X-Proxy-Error"] == "upstream_auth_failed"
    # No guess with the configured token, which the server may have rotated away.
    assert oauth_stats(sandbox).token_calls == calls


async def test_memory_only_state_needs_no_key_and_writes_no_file(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    sandbox = await oauth_sandbox(make_sandbox)
    auth = {**refresh_auth(sandbox, tmp_path / "unused"), "state_file": "", "state_key": None}
    proxy = await make_proxy(sandbox.url, auth=auth)
    assert (await get(http, proxy.url + PATH))[0] == 200
    assert files_in(tmp_path) == []


async def test_a_reload_that_changes_the_scope_fetches_a_new_token_margins_do_not(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await oauth_sandbox(make_sandbox)
    proxy = await make_proxy(sandbox.url, auth=oauth_auth(sandbox))
    service = proxy.service
    scheme = service.scheme
    assert isinstance(scheme, OAuth2Scheme)
    same = dataclasses.replace(service.cfg.auth, refresh_margin=5.0)
    await scheme.reconfigure(same)
    assert oauth_stats(sandbox).token_calls == 1  # margins apply at once, same token
    other = dataclasses.replace(service.cfg.auth, scope="read")
    await scheme.reconfigure(other)
    assert oauth_stats(sandbox).token_calls == 2 and oauth_stats(sandbox).scopes[-1] == "read"
    assert (await get(http, proxy.url + PATH))[0] == 200


async def test_a_reload_keeps_the_rotated_refresh_token_of_the_same_line(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    sandbox = await oauth_sandbox(make_sandbox)
    # In memory only: no file to fall back on, the rotated token must survive in memory.
    auth = {**refresh_auth(sandbox, tmp_path / "unused"), "state_file": "", "state_key": None}
    proxy = await make_proxy(sandbox.url, auth=auth)
    scheme = proxy.service.scheme
    assert isinstance(scheme, OAuth2Scheme)
    await scheme.reconfigure(dataclasses.replace(proxy.service.cfg.auth, scope="read"))
    stats = oauth_stats(sandbox)
    assert stats.token_calls == 2 and stats.token_failures == 0 and stats.families_revoked == 0
    assert (await get(http, proxy.url + PATH))[0] == 200
