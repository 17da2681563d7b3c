"""auth.auth_cookie: the exact Cookie header that reaches the API, over real sockets.

PROTOCOL.md: the API document speaks of "two cookies, one for your authentication code and
one for a request HMAC signature"; its example and the public PHP client send only
`signature=<auth_code>:<sig>`. The default sends that one; auth_cookie adds `auth=<auth_code>`.
The expected values are computed here from the protocol's text, not with the proxy's code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import io
import json

import aiohttp
from conftest import SECRET, USER, MakeProxy, RunningProxy, proxy_config

from proxy.sandbox import SandboxServer
from proxy.service import ProxyService, make_logs

PROFILE = f"/perl/api/v2/user/{USER}/profile"
ECHO = "/perl/api/v2/account/42/echo"


def signature(code: str, method: str, path: str, query: str = "", body: bytes = b"") -> str:
    trimmed = body.strip(b" \t\r\n")
    body_hash = hashlib.sha256(trimmed).hexdigest() if trimmed else ""
    text = f"{code}\n{method}\n{path}\n{query}\n{body_hash}\n"
    return hmac.new(SECRET.encode(), text.encode(), hashlib.sha256).hexdigest()


def cookies_sent(sandbox: SandboxServer, method: str, target: str) -> list[list[str]]:
    """The Cookie header values of every request the API got for `method target`."""
    return [
        e["cookies"] for e in sandbox.sandbox.log if e["method"] == method and e["target"] == target
    ]


async def get(
    http: aiohttp.ClientSession, proxy: RunningProxy, path: str, cookie: str | None = None
) -> int:
    headers = {"Cookie": cookie} if cookie else {}
    async with http.get(proxy.url + path, headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_by_default_only_the_signature_cookie_is_sent(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(sandbox.url)
    code = sandbox.sandbox.issued_codes[-1]  # the login's: the newest code is the one used
    assert await get(http, proxy, PROFILE) == 200
    assert cookies_sent(sandbox, "GET", PROFILE) == [
        [f"signature={code}:{signature(code, 'GET', PROFILE)}"]
    ]


async def test_by_default_the_clients_other_cookies_are_kept_as_today(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(sandbox.url)
    code = sandbox.sandbox.issued_codes[-1]
    client = "theme=dark; auth=client-own; signature=forged:deadbeef"
    assert await get(http, proxy, PROFILE, cookie=client) == 200
    sig = signature(code, "GET", PROFILE)
    assert cookies_sent(sandbox, "GET", PROFILE) == [
        [f"theme=dark; auth=client-own; signature={code}:{sig}"]
    ]


async def test_auth_cookie_sends_the_code_beside_the_signature_in_one_header(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(sandbox.url, auth={"auth_cookie": True})
    first = sandbox.sandbox.issued_codes[-1]
    assert await get(http, proxy, PROFILE) == 200
    # The answer carried a new code: the next request uses it, in both cookies.
    second = sandbox.sandbox.issued_codes[-1]
    assert second != first
    body = b' {"hello": "world"}\n'
    async with http.post(
        proxy.url + ECHO + "?x=%20y", data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 200, await resp.text()
    assert cookies_sent(sandbox, "GET", PROFILE) == [
        [f"auth={first}; signature={first}:{signature(first, 'GET', PROFILE)}"]
    ]
    sig = signature(second, "POST", ECHO, "x=%20y", body)
    assert cookies_sent(sandbox, "POST", ECHO + "?x=%20y") == [
        [f"auth={second}; signature={second}:{sig}"]
    ]


async def test_auth_cookie_drops_the_clients_own_auth_and_signature_cookies(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(sandbox.url, auth={"auth_cookie": True})
    code = sandbox.sandbox.issued_codes[-1]
    client = "theme=dark; auth=client-own; signature=forged:deadbeef; auth2=kept; lang=en"
    assert await get(http, proxy, PROFILE, cookie=client) == 200
    sig = signature(code, "GET", PROFILE)
    assert cookies_sent(sandbox, "GET", PROFILE) == [
        [f"theme=dark; auth2=kept; lang=en; auth={code}; signature={code}:{sig}"]
    ]


async def test_auth_cookie_goes_with_the_retry_after_a_401_and_with_the_revoke(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(sandbox.url, auth={"auth_cookie": True})
    dead = sandbox.sandbox.issued_codes[-1]
    sandbox.sandbox.revoke_all()
    client = "auth=client-own; theme=dark"
    assert await get(http, proxy, PROFILE, cookie=client) == 200  # 401, login, retried
    fresh = sandbox.sandbox.issued_codes[-2]  # the new login's (the answer issued the last)
    assert cookies_sent(sandbox, "GET", PROFILE) == [
        [f"theme=dark; auth={dead}; signature={dead}:{signature(dead, 'GET', PROFILE)}"],
        [f"theme=dark; auth={fresh}; signature={fresh}:{signature(fresh, 'GET', PROFILE)}"],
    ]

    newest = sandbox.sandbox.issued_codes[-1]
    await proxy.service.stop()  # revokes the session: DELETE /auth, signed, both cookies
    sig = signature(newest, "DELETE", "/perl/api/v2/auth")
    assert cookies_sent(sandbox, "DELETE", "/perl/api/v2/auth") == [
        [f"auth={newest}; signature={newest}:{sig}"]
    ]
    assert sandbox.sandbox.stats.revocations == 1


async def test_revoke_sends_only_the_signature_cookie_by_default(
    sandbox: SandboxServer, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(sandbox.url)
    code = sandbox.sandbox.issued_codes[-1]
    await proxy.service.stop()
    sig = signature(code, "DELETE", "/perl/api/v2/auth")
    assert cookies_sent(sandbox, "DELETE", "/perl/api/v2/auth") == [[f"signature={code}:{sig}"]]


async def test_auth_cookie_is_reloaded_without_a_restart_or_a_new_login(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(sandbox.url)
    service = proxy.service
    on = dataclasses.replace(service.cfg.auth, auth_cookie=True)
    assert await service.reload(dataclasses.replace(service.cfg, auth=on)) == []
    code = sandbox.sandbox.issued_codes[-1]
    assert await get(http, proxy, PROFILE) == 200
    off = dataclasses.replace(service.cfg.auth, auth_cookie=False)
    assert await service.reload(dataclasses.replace(service.cfg, auth=off)) == []
    newer = sandbox.sandbox.issued_codes[-1]
    assert await get(http, proxy, PROFILE) == 200
    assert cookies_sent(sandbox, "GET", PROFILE) == [
        [f"auth={code}; signature={code}:{signature(code, 'GET', PROFILE)}"],
        [f"signature={newer}:{signature(newer, 'GET', PROFILE)}"],
    ]
    assert sandbox.sandbox.stats.auth_calls == 1  # same credentials: the login was kept


async def test_no_auth_code_reaches_the_log_with_auth_cookie_on(
    sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    stream = io.StringIO()
    cfg = proxy_config(
        sandbox.url, auth={"auth_cookie": True}, logging={"level": "debug", "log_bodies": True}
    )
    service = ProxyService(cfg, make_logs(cfg, stream))
    await service.start()
    proxy = RunningProxy(service)
    try:
        assert await get(http, proxy, PROFILE, cookie="auth=client-own-code; theme=dark") == 200
        sandbox.sandbox.revoke_all()
        assert await get(http, proxy, PROFILE) == 200  # a 401, a login and a retry
    finally:
        await service.stop()
    text = stream.getvalue()
    events = [json.loads(line) for line in text.splitlines()]
    assert "request" in [e["event"] for e in events] and "auth_revoked" in [
        e["event"] for e in events
    ]
    codes = sandbox.sandbox.issued_codes
    assert len(codes) >= 4
    for code in codes:
        assert code not in text
        assert code.rsplit("-", 1)[1] not in text
    assert "client-own-code" not in text
    assert SECRET not in text
