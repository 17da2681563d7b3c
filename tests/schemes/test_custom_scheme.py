"""A third scheme, defined only in the tests, runs through the whole proxy unchanged."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from header_scheme import KIND, HeaderScheme
from structlog.testing import capture_logs

from proxy.config import ConfigError, parse
from proxy.schemes.registry import BUILT_IN
from proxy.service import ProxyService

SCHEMES = {**BUILT_IN, "header": KIND}


class KeyedApi:
    """Wants X-Api-Key; scripted answers first, then 200 echoing the key it saw."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.script: list[tuple[int, dict[str, str]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.keys.append(request.headers.get("X-Api-Key", ""))
        if self.script:
            status, headers = self.script.pop(0)
            return web.json_response({"success": 0}, status=status, headers=headers)
        return web.json_response({"success": 1, "path": request.path})


@pytest.fixture
async def api() -> AsyncIterator[tuple[KeyedApi, str]]:
    keyed = KeyedApi()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", keyed.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield keyed, f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


def config(url: str, key: str = "k-1") -> str:
    return f"""
listen: {{port: 0}}
admin: {{port: 0}}
upstream: {{url: "{url}", allow_insecure: true}}
auth: {{scheme: header, api_key: "{key}"}}
limits: {{state_file: "", user_per_minute: 1000, account_per_minute: 1000}}
retry: {{backoff_base: 0.01, backoff_max: 0.02}}
"""


@pytest.fixture
async def proxy(api: tuple[KeyedApi, str]) -> AsyncIterator[ProxyService]:
    service = ProxyService(parse(config(api[1]), {}, schemes=SCHEMES), schemes=SCHEMES)
    await service.start()
    yield service
    await service.stop()


async def get(service: ProxyService, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{service.port}{path}") as resp,
    ):
        return resp.status, await resp.json()


def test_its_config_section_is_checked_by_its_own_rules() -> None:
    with pytest.raises(ConfigError, match=r"^auth\.api_key: required for scheme header"):
        parse(config("https://x").replace(', api_key: "k-1"', ""), {}, schemes=SCHEMES)
    unknown = r"^auth\.scheme: must be one of luxsci, bearer, oauth2 \(got 'header'\)"
    with pytest.raises(ConfigError, match=unknown):
        parse(config("https://x"), {})  # not registered: the built-in registry refuses it


async def test_credentials_budget_and_watched_answers_are_the_schemes(
    proxy: ProxyService, api: tuple[KeyedApi, str]
) -> None:
    keyed, _ = api
    with capture_logs() as logs:
        assert await get(proxy, "/users/7/x") == (200, {"success": 1, "path": "/users/7/x"})
        await get(proxy, "/elsewhere")
    assert keyed.keys == ["k-1", "k-1"]
    # The scheme chose each request's budget.
    assert [e["scope"] for e in logs if e["event"] == "request"] == ["user", "account"]
    keyed.script.append((200, {"X-Next-Key": "k-2"}))
    await get(proxy, "/a")
    await get(proxy, "/a")
    assert keyed.keys[-1] == "k-2"  # the watched answer rotated the key


async def test_its_own_rate_limit_and_reauth_rules_drive_the_retries(
    proxy: ProxyService, api: tuple[KeyedApi, str]
) -> None:
    keyed, _ = api
    keyed.script += [(420, {"X-Calm-For": "0"}), (401, {"X-Next-Key": "k-9"})]
    assert (await get(proxy, "/a"))[0] == 200
    assert keyed.keys == ["k-1", "k-1", "k-9"]  # calm, then rotated once, then served
    scheme = proxy.scheme
    assert isinstance(scheme, HeaderScheme) and scheme.retired == [1]
    keyed.script += [(401, {}), (401, {})]
    assert (await get(proxy, "/a"))[0] == 401  # one fresh-credentials retry, no more
