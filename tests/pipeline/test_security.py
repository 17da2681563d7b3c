"""Who may use the proxy, what for, and bad input of every kind, over real sockets."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import aiohttp
import pytest
from conftest import SECRET, USER, MakeProxy, RunningProxy, parse_raw, raw_exchange
from structlog.testing import capture_logs

from proxy.config import ConfigError, Secret, load, parse
from proxy.sandbox import SandboxServer

PROFILE = f"/perl/api/v2/user/{USER}/profile"
TOKEN_VALUE = "client-token-0123456789abcdef"


# -- who may use it -------------------------------------------------------------------------


async def test_peers_outside_the_allow_list_get_403_and_nothing_goes_upstream(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(sandbox.url, access={"allow_clients": ("10.0.0.0/8",)})
    before = sandbox.sandbox.stats.requests
    async with http.get(proxy.url + PROFILE) as resp:
        assert resp.status == 403
        assert resp.headers["X-Proxy-Error"] == "forbidden"
        assert "127.0.0.1" in (await resp.json())["error_message"]
    assert sandbox.sandbox.stats.requests == before
    allowed = await make_proxy(sandbox.url, access={"allow_clients": ("127.0.0.0/8", "::1/128")})
    async with http.get(allowed.url + PROFILE) as resp:
        assert resp.status == 200


async def test_the_client_token_is_required_and_never_forwarded(
    make_proxy: MakeProxy, echo_upstream, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(
        echo_upstream.url,
        auth={"scheme": "bearer", "api_key": Secret("k")},
        access={"client_token": Secret(TOKEN_VALUE)},
    )
    for headers in (
        {},
        {"Proxy-Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN_VALUE}"},
    ):
        async with http.get(proxy.url + "/x", headers=headers) as resp:
            assert resp.status == 403
            assert resp.headers["X-Proxy-Error"] == "forbidden"
    assert echo_upstream.requests == []
    async with http.get(
        proxy.url + "/x", headers={"Proxy-Authorization": f"Bearer {TOKEN_VALUE}"}
    ) as resp:
        assert resp.status == 200
    seen = json.dumps(echo_upstream.requests)
    assert TOKEN_VALUE not in seen and "proxy-authorization" not in seen.lower()


async def test_an_open_listener_draws_a_loud_warning(
    sandbox: SandboxServer, make_proxy: MakeProxy
) -> None:
    with capture_logs() as logs:
        await make_proxy(sandbox.url, listen={"host": "0.0.0.0"})
    assert any(
        e["event"] == "proxy_open_to_the_network" and e["log_level"] == "warning" for e in logs
    )
    with capture_logs() as logs:
        await make_proxy(
            sandbox.url, listen={"host": "0.0.0.0"}, access={"client_token": Secret(TOKEN_VALUE)}
        )
    assert not any(e["event"] == "proxy_open_to_the_network" for e in logs)


# -- what it may do ---------------------------------------------------------------------------

RULES = (
    {"methods": ("GET",), "path": "/perl/api/v2/user/*/profile"},
    {"methods": ("GET", "POST"), "path": "/perl/api/v2/account/42/**"},
)


@pytest.fixture
async def ruled(sandbox: SandboxServer, make_proxy: MakeProxy) -> RunningProxy:
    from proxy.config import AccessRule

    rules = tuple(AccessRule(**r) for r in RULES)
    return await make_proxy(
        sandbox.url, access={"rules": rules, "protected_users": ("CEO@example.com",)}
    )


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        ("GET", PROFILE, 200),
        ("GET", "/perl/api/v2/user/joe%40example.com/profile", 200),  # decoded before matching
        # Matched as .../user/...: forwarded; the sandbox matches raw paths and says 405.
        ("GET", "/perl/api/v2/%75ser/joe@example.com/profile", 405),
        ("POST", PROFILE, 403),  # method not allowed there
        ("GET", f"/perl/api/v2/user/{USER}/profile/extra", 403),  # '*' is one segment
        ("GET", "/perl/api/v2/account/42/anything/below", 200),
        ("DELETE", "/perl/api/v2/account/42/x", 403),
        ("GET", "/perl/api/v2/account/43/x", 403),
        ("GET", "/perl/api/v2/user/ceo@example.com/profile", 403),  # protected
        ("GET", "/perl/api/v2/user/CEO%40EXAMPLE.COM/profile", 403),  # protected, any spelling
        # Attempts to side-step a rule: refused before matching.
        ("GET", "/perl/api/v2/account/42/../43/x", 400),
        ("GET", "/perl/api/v2/account/42/%2e%2e/43/x", 400),
        ("GET", "/perl/api/v2/account/42/.%2E/43/x", 400),
        ("GET", "/perl/api/v2/account/42/a%2F..%2F..%2F43/x", 400),
        ("GET", "/perl/api/v2/account/42//x", 400),
        ("GET", "/perl/api/v2/account/42/%zz", 400),
        ("GET", "/perl/api/v2/account/42/x?q=%g1", 400),
        ("GET", "/perl/api/v2/account/42/%00x", 400),
        ("GET", "/perl/api/v2/account/42/%ff", 400),  # not UTF-8
    ],
)
async def test_rules_and_protected_users_are_enforced_before_the_api(
    ruled: RunningProxy, sandbox: SandboxServer, method: str, target: str, status: int
) -> None:
    before = sandbox.sandbox.stats.requests
    request = (
        f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    got, headers, body = parse_raw(await raw_exchange(ruled.service.port, request.encode()))
    assert got == status, body
    if status in (400, 403):
        assert headers["x-proxy-error"] == ("forbidden" if status == 403 else "bad_request")
        assert body["success"] == 0 and body["error_message"]
        assert sandbox.sandbox.stats.requests == before  # nothing went upstream


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status", "reason"),
    [
        (b"BREW /x HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
        (
            b"GET /x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
            431,
            "headers_too_large",
        ),
        # RFC 9112 3: a request-target over the limit is 414, not 431.
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
        (b"GET /x HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", 400, "bad_request"),
        (b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400, "bad_request"),
        (
            b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            400,
            "bad_request",
        ),
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            400,
            "bad_request",
        ),  # TLS to a plain port
        (b"GET x HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 400, "bad_request"),
        (b"CONNECT /perl/api/v2/account/1/x HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
        (b"TRACE /perl/api/v2/account/1/x HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    ],
)
async def test_unparseable_requests_get_our_error_shape(
    proxy: RunningProxy, sandbox: SandboxServer, request_bytes: bytes, status: int, reason: str
) -> None:
    before = sandbox.sandbox.stats.requests
    got, headers, body = parse_raw(await raw_exchange(proxy.service.port, request_bytes))
    assert (got, headers["x-proxy-error"]) == (status, reason)
    assert headers["content-type"].startswith("application/json")
    assert body["success"] == 0 and body["error_message"]
    assert b"aaaa" not in json.dumps(body).encode()  # the answer does not echo input
    assert sandbox.sandbox.stats.requests == before


@pytest.mark.parametrize(
    ("content_type", "body", "fragment"),
    [
        ("application/json", b'{"a": ', "not valid JSON"),
        ("application/json", b'{"a": "\xff"}', "not UTF-8"),
        ("multipart/form-data; boundary=B", b"--B\r\nbroken", "multipart"),
        ("multipart/form-data", b"--B\r\n", "boundary"),
    ],
)
async def test_invalid_bodies_are_refused_with_a_clear_message(
    proxy: RunningProxy,
    sandbox: SandboxServer,
    http: aiohttp.ClientSession,
    content_type: str,
    body: bytes,
    fragment: str,
) -> None:
    before = sandbox.sandbox.stats.requests
    async with http.post(
        proxy.url + "/perl/api/v2/account/1/x", data=body, headers={"Content-Type": content_type}
    ) as resp:
        assert resp.status == 400
        assert fragment.lower() in (await resp.json())["error_message"].lower()
    assert sandbox.sandbox.stats.requests == before


async def test_a_client_that_dribbles_its_body_is_cut_off(
    sandbox: SandboxServer, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(sandbox.url, listen={"client_timeout": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.service.port)
    writer.write(
        b"POST /perl/api/v2/account/1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    status, headers, _ = parse_raw(answer)
    assert status == 408 and headers["x-proxy-error"] == "client_timeout"


async def test_a_client_that_never_finishes_its_headers_is_disconnected(
    sandbox: SandboxServer, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(sandbox.url, listen={"client_timeout": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.service.port)
    writer.write(b"GET /perl/api/v2/account/1/x HTTP/1.1\r\nHost: x\r\n")  # and then nothing
    await writer.drain()
    assert await asyncio.wait_for(reader.read(4096), 5) == b""  # closed by the proxy
    writer.close()


async def test_connections_over_the_cap_are_answered_503(
    sandbox: SandboxServer, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(sandbox.url, listen={"max_connections": 2})
    held = [await asyncio.open_connection("127.0.0.1", proxy.service.port) for _ in range(2)]
    await asyncio.sleep(0.05)
    status, headers, _ = parse_raw(
        await raw_exchange(proxy.service.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    )
    assert status == 503 and headers["x-proxy-error"] == "too_many_connections"
    for _, writer in held:
        writer.close()
    await asyncio.sleep(0.05)
    status, _, _ = parse_raw(
        await raw_exchange(
            proxy.service.port,
            f"GET {PROFILE} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
        )
    )
    assert status == 200  # room again


# -- secrets --------------------------------------------------------------------------------------


def test_literal_secrets_and_world_readable_files_draw_warnings(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("auth: {token: t, secret: written-in-the-file}\n")
    os.chmod(path, 0o644)
    warnings = load(path, {}).warnings
    assert any(w.startswith("auth.secret: a literal secret") for w in warnings)
    assert any("readable by every user" in w for w in warnings)
    assert all("written-in-the-file" not in w for w in warnings)
    path.write_text("auth: {token: t, secret: '${S}'}\n")
    os.chmod(path, 0o600)
    assert load(path, {"S": "x"}).warnings == ()


def test_access_config_errors_name_the_key() -> None:
    base = "auth: {token: t, secret: s}\n"
    with pytest.raises(ConfigError, match=r"^access\.allow_clients\[1\]: not an IP network"):
        parse(base + "access: {allow_clients: [10.0.0.0/8, nonsense]}", {})
    with pytest.raises(ConfigError, match=r"^access\.rules\[0\]\.path: must start with /"):
        parse(base + "access: {rules: [{path: 'perl/**'}]}", {})
    with pytest.raises(
        ConfigError, match=r"^access\.rules\[0\]\.path: must start with / and use \*\*"
    ):
        parse(base + "access: {rules: [{path: '/**/x'}]}", {})
    with pytest.raises(ConfigError, match=r"^access\.client_token: use at least 16"):
        parse(base + "access: {client_token: short}", {})


async def test_http_upstreams_warn_and_need_allow_insecure(
    sandbox: SandboxServer, make_proxy: MakeProxy
) -> None:
    with capture_logs() as logs:
        await make_proxy(sandbox.url)
    assert any(e["event"] == "upstream_not_encrypted" for e in logs)
    with pytest.raises(ConfigError, match="allow_insecure"):
        parse(f"auth: {{token: t, secret: s}}\nupstream: {{url: '{sandbox.url}'}}", {})


def test_nothing_secret_in_error_text() -> None:
    with pytest.raises(ConfigError) as info:
        parse(f"auth: {{token: t, secret: {SECRET}, scheme: nope}}", {})
    assert SECRET not in str(info.value)


async def test_encoded_slashes_travel_as_sent_unless_the_config_refuses_them(
    sandbox: SandboxServer, make_proxy: MakeProxy
) -> None:
    target = "/perl/api/v2/account/42/files/a%2Fb%5Cc"
    request = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    keeping = await make_proxy(sandbox.url)
    before = sandbox.sandbox.stats.requests
    await raw_exchange(keeping.service.port, request)
    assert sandbox.sandbox.stats.requests == before + 1
    assert sandbox.sandbox.log[-1]["target"] == target  # byte for byte, as signed

    refusing = await make_proxy(sandbox.url, listen={"encoded_slashes": "reject"})
    before = sandbox.sandbox.stats.requests
    got, headers, body = parse_raw(await raw_exchange(refusing.service.port, request))
    assert got == 400 and headers["x-proxy-error"] == "bad_request"
    assert "encoded_slashes" in body["error_message"]
    assert sandbox.sandbox.stats.requests == before  # nothing went upstream


@pytest.mark.parametrize(
    "target",
    [
        "/perl/api/v2/user%2Fceo@example.com/profile",
        "/perl/api/v2/USER/ceo@example.com/profile",
        "/perl/api/v2/%75ser/ceo%40example.com/profile",
    ],
)
async def test_no_spelling_of_a_protected_user_reaches_the_api(
    ruled: RunningProxy, sandbox: SandboxServer, target: str
) -> None:
    before = sandbox.sandbox.stats.requests
    request = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    got, headers, _ = parse_raw(await raw_exchange(ruled.service.port, request))
    assert got == 403 and headers["x-proxy-error"] == "forbidden"
    assert sandbox.sandbox.stats.requests == before
