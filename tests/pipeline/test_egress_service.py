"""The whole proxy behind a corporate egress proxy: the TLS sandbox through a CONNECT
tunnel, credentials never logged, refusals answered 502 naming the egress proxy, and the
OAuth 2.0 token endpoint reached the same way."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from conftest import (
    SECRET,
    USER,
    EchoUpstream,
    MakeProxy,
    MakeSandbox,
    RunningProxy,
    proxy_config,
)
from connect_proxy import ConnectProxy

from proxy.config import Secret
from proxy.sandbox.config import OAuthSettings
from proxy.service import ProxyService, make_logs

PROXY_USER = "svc-egress"
PROXY_PASSWORD = "egress-pw-7c1d9e"
PROFILE = f"/perl/api/v2/user/{USER}/profile"
FAST_RETRY = {"backoff_base": 0.01, "backoff_max": 0.05, "max_attempts": 3}


@pytest.fixture
async def egress() -> AsyncIterator[ConnectProxy]:
    proxy = await ConnectProxy().start()
    yield proxy
    await proxy.close()


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_the_tls_api_is_reached_through_one_tunnel_and_credentials_are_never_logged(
    make_sandbox: MakeSandbox, egress: ConnectProxy, ca_file: str, http: aiohttp.ClientSession
) -> None:
    sandbox = await make_sandbox(tls=True)
    assert sandbox.url.startswith("https://localhost:")
    stream = io.StringIO()
    cfg = proxy_config(
        sandbox.url,
        upstream={
            "url": sandbox.url,
            "ca_file": ca_file,
            "proxy": f"http://{PROXY_USER}:{PROXY_PASSWORD}@{egress.where}",
        },
        logging={"level": "debug", "log_bodies": True},
    )
    service = ProxyService(cfg, make_logs(cfg, stream))
    await service.start()
    proxy = RunningProxy(service)
    try:
        for _ in range(3):
            async with http.get(proxy.url + PROFILE) as resp:
                assert resp.status == 200, await resp.text()
        # The login and every request went through one tunnel, kept alive in the pool.
        target = sandbox.url.removeprefix("https://")
        assert egress.lines == [f"CONNECT {target} HTTP/1.1".encode()]
        assert egress.connects[0].header("proxy-authorization") == [
            "Basic " + basic(PROXY_USER, PROXY_PASSWORD)
        ]
    finally:
        await service.stop()
    text = stream.getvalue()
    events = [json.loads(line) for line in text.splitlines()]
    (started,) = [e for e in events if e["event"] == "proxy_started"]
    assert started["egress"] == egress.where
    assert sum(e["event"] == "request" for e in events) == 3
    for secret in (PROXY_PASSWORD, basic(PROXY_USER, PROXY_PASSWORD), SECRET):
        assert secret not in text


async def test_a_refusal_is_502_naming_the_egress_proxy_and_even_a_post_is_retried(
    make_proxy: MakeProxy,
    echo_upstream: EchoUpstream,
    egress: ConnectProxy,
    http: aiohttp.ClientSession,
) -> None:
    egress.refuse = 403
    proxy = await make_proxy(
        echo_upstream.url,
        upstream={"url": echo_upstream.url, "allow_insecure": True, "proxy": egress.url},
        auth={"scheme": "bearer", "api_key": Secret("k-123456")},
        retry=FAST_RETRY,
    )
    async with http.post(proxy.url + "/v1/x", json={"a": 1}) as resp:
        assert resp.status == 502
        assert resp.headers["X-Proxy-Error"] == "upstream_unreachable"
        message = (await resp.json(content_type=None))["error_message"]
    target = echo_upstream.url.removeprefix("http://")
    assert message == f"egress proxy {egress.where} refused the tunnel to {target}: 403 Forbidden"
    # The API never saw it, so a POST is retried like any method (all refused here).
    assert len(egress.connects) == 3
    assert echo_upstream.requests == []


async def test_a_post_refused_once_by_the_egress_proxy_goes_through_on_the_retry(
    make_proxy: MakeProxy,
    echo_upstream: EchoUpstream,
    egress: ConnectProxy,
    http: aiohttp.ClientSession,
) -> None:
    egress.refuse, egress.refuse_first = 502, 1
    proxy = await make_proxy(
        echo_upstream.url,
        upstream={"url": echo_upstream.url, "allow_insecure": True, "proxy": egress.url},
        auth={"scheme": "bearer", "api_key": Secret("k-123456")},
        retry=FAST_RETRY,
    )
    async with http.post(proxy.url + "/v1/x?a=1", json={"a": 1}) as resp:
        assert resp.status == 200
        echoed = await resp.json()
    assert len(egress.connects) == 2
    assert [r["method"] for r in echo_upstream.requests] == ["POST"]  # exactly once
    assert echoed["target"] == "/v1/x?a=1"


async def test_an_unreachable_egress_proxy_is_named_in_the_502(
    make_proxy: MakeProxy, echo_upstream: EchoUpstream, http: aiohttp.ClientSession
) -> None:
    egress = await ConnectProxy().start()
    where = egress.where
    await egress.close()  # nothing listens there any more
    proxy = await make_proxy(
        echo_upstream.url,
        upstream={"url": echo_upstream.url, "allow_insecure": True, "proxy": f"http://{where}"},
        auth={"scheme": "bearer", "api_key": Secret("k-123456")},
        retry={**FAST_RETRY, "max_attempts": 1},
    )
    async with http.get(proxy.url + "/v1/x") as resp:
        assert resp.status == 502
        assert resp.headers["X-Proxy-Error"] == "upstream_unreachable"
        message = (await resp.json(content_type=None))["error_message"]
    assert message.startswith(f"egress proxy {where} could not be reached")


# -- OAuth 2.0: the token endpoint goes through the egress proxy too ------------------------------


CLIENT_ID = "proxy-client"
CLIENT_SECRET = "proxy-client-secret-9f8e7d"


def oauth_auth(token_url: str) -> dict[str, Any]:
    return {
        "scheme": "oauth2",
        "token_url": token_url,
        "client_id": CLIENT_ID,
        "client_secret": Secret(CLIENT_SECRET),
        "retry_min": 0.05,
        "retry_max": 0.2,
    }


async def test_the_token_endpoint_is_reached_through_the_environments_egress_proxy(
    make_sandbox: MakeSandbox,
    make_proxy: MakeProxy,
    egress: ConnectProxy,
    ca_file: str,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sandbox = await make_sandbox(
        tls=True, oauth=OAuthSettings(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    )
    monkeypatch.setenv("HTTPS_PROXY", egress.url)
    proxy = await make_proxy(
        sandbox.url,
        upstream={"url": sandbox.url, "ca_file": ca_file},
        auth=oauth_auth(sandbox.url + "/oauth/token"),
    )
    assert sandbox.sandbox.oauth is not None
    target = sandbox.url.removeprefix("https://")
    # The token was fetched at start, before any request: through the token pool's tunnel.
    assert sandbox.sandbox.oauth.stats.token_calls == 1
    assert egress.lines == [f"CONNECT {target} HTTP/1.1".encode()]
    for _ in range(2):
        async with http.get(proxy.url + "/v1/things") as resp:
            assert resp.status == 200, await resp.text()
    # Then the API's own pool opened its tunnel, reused for the second request.
    assert egress.lines == [f"CONNECT {target} HTTP/1.1".encode()] * 2


async def test_a_token_endpoint_refused_by_the_egress_proxy_is_named_in_readyz(
    make_sandbox: MakeSandbox,
    make_proxy: MakeProxy,
    egress: ConnectProxy,
    ca_file: str,
    http: aiohttp.ClientSession,
) -> None:
    sandbox = await make_sandbox(
        tls=True, oauth=OAuthSettings(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    )
    egress.refuse = 407
    proxy = await make_proxy(
        sandbox.url,
        upstream={"url": sandbox.url, "ca_file": ca_file, "proxy": egress.url},
        auth=oauth_auth(sandbox.url + "/oauth/token"),
    )
    async with http.get(proxy.admin_url + "/readyz") as resp:
        assert resp.status == 503
        error = (await resp.json())["checks"]["auth"]["error"]
    assert f"egress proxy {egress.where} refused the tunnel" in error
    assert "407 Proxy Authentication Required" in error
    assert sandbox.sandbox.oauth is not None and sandbox.sandbox.oauth.stats.token_calls == 0
