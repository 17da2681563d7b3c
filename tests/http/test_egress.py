"""The upstream client through an egress proxy: CONNECT tunnels, TLS inside, refusals named.

A tiny CONNECT proxy (tests/connect_proxy.py) stands in for the corporate one, and raw
asyncio servers for the API, so every test sees the CONNECT request and the API's
request exactly as they went on the wire.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trustme
from connect_proxy import ConnectProxy

from proxy.config import Secret, UpstreamConfig
from proxy.errors import UpstreamUnreachable
from proxy.http.client import ConnectFailed, Upstream

pytestmark = pytest.mark.timeout(30)

API_HOST = "api.example.test"  # resolves nowhere: only the egress proxy can reach it


class Api:
    """An HTTP/1.1 server answering each request with its own request line and headers,
    recording the heads, the connections, and the TLS server name each client asked for."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.connections = 0
        self.server_names: list[str | None] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self, tls: ssl.SSLContext | None = None) -> Api:
        if tls is not None:
            tls.sni_callback = lambda sock, name, ctx: self.server_names.append(name)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                self.heads.append(head)
                body = head.split(b"\r\n", 1)[0]
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def header(self, index: int, name: str) -> list[str]:
        lines = self.heads[index].decode("latin-1").split("\r\n")[1:]
        pairs = [line.split(":", 1) for line in lines if ":" in line]
        return [v.strip() for k, v in pairs if k.strip().lower() == name.lower()]


def tls_for(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


Made = Callable[..., Awaitable[Any]]


@pytest.fixture
async def started() -> AsyncIterator[Made]:
    """Start APIs, proxies and upstream pools; close them in reverse order at the end."""
    closers: list[Callable[[], Awaitable[None]]] = []

    async def start(thing: Any, *args: Any) -> Any:
        await thing.start(*args)
        closers.append(thing.close)
        return thing

    yield start
    for close in reversed(closers):
        await close()


def upstream(url: str, env: dict[str, str] | None = None, **settings: Any) -> Upstream:
    defaults: dict[str, Any] = {"connect_timeout": 2.0, "read_timeout": 5.0}
    cfg = UpstreamConfig(url=url, allow_insecure=True, **{**defaults, **settings})
    return Upstream(cfg, env={} if env is None else env)


async def get(up: Upstream, path: str = "/", query: str = "") -> tuple[int, bytes]:
    async with await up.request("GET", path, query, b"", b"") as resp:
        return resp.status, await resp.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the tunnel ---------------------------------------------------------------------------------


async def test_an_https_api_is_reached_through_a_connect_tunnel_verified_for_its_own_name(
    started: Made, ca: trustme.CA, ca_file: str
) -> None:
    api = await started(Api(), tls_for(ca, API_HOST))
    target = f"{API_HOST}:{api.port}"
    egress = await started(ConnectProxy(routes={target: ("127.0.0.1", api.port)}))
    up = await started(upstream(f"https://{target}", proxy=egress.url, ca_file=ca_file))

    assert await get(up, "/a%2Fb/@x", "q=1+2") == (200, b"GET /a%2Fb/@x?q=1+2 HTTP/1.1")
    assert egress.lines == [f"CONNECT {target} HTTP/1.1".encode()]
    (connect,) = egress.connects
    assert connect.header("host") == [target]
    assert connect.header("proxy-authorization") == []  # none configured
    # Inside the tunnel: the request as it would go directly, TLS for the API's own name.
    assert api.header(0, "host") == [target]
    assert api.server_names == [API_HOST]


async def test_a_certificate_for_another_name_is_refused_inside_the_tunnel(
    started: Made, ca: trustme.CA, ca_file: str
) -> None:
    # The proxy delivers the tunnel to a server whose certificate names someone else:
    # what the proxy says it reached counts for nothing, the certificate for everything.
    api = await started(Api(), tls_for(ca, "localhost", "127.0.0.1"))
    target = f"{API_HOST}:{api.port}"
    egress = await started(ConnectProxy(routes={target: ("127.0.0.1", api.port)}))
    up = await started(upstream(f"https://{target}", proxy=egress.url, ca_file=ca_file))

    with pytest.raises(ConnectFailed, match=r"TLS certificate of .* was not accepted") as caught:
        await up.request("GET", "/", "", b"", b"")
    assert f"through egress proxy {egress.where}" in caught.value.message
    assert api.heads == []
    assert up.open_connections == 0


async def test_one_tunnel_carries_many_requests(
    started: Made, ca: trustme.CA, ca_file: str
) -> None:
    api = await started(Api(), tls_for(ca, "localhost"))
    egress = await started(ConnectProxy())
    up = await started(upstream(f"https://localhost:{api.port}", proxy=egress.url, ca_file=ca_file))
    for i in range(5):
        assert await get(up, f"/{i}") == (200, f"GET /{i} HTTP/1.1".encode())
    assert len(egress.connects) == 1
    assert api.connections == 1


async def test_concurrent_requests_open_a_tunnel_each_then_reuse_them(
    started: Made, ca: trustme.CA, ca_file: str
) -> None:
    api = await started(Api(), tls_for(ca, "localhost"))
    egress = await started(ConnectProxy())
    up = await started(
        upstream(f"https://localhost:{api.port}", proxy=egress.url, ca_file=ca_file, pool_size=3)
    )
    for _ in range(3):
        results = await asyncio.gather(*(get(up) for _ in range(3)))
        assert [status for status, _ in results] == [200] * 3
    assert len(egress.connects) == api.connections <= 3


async def test_a_plain_http_api_is_tunnelled_too_its_request_byte_for_byte(
    started: Made,
) -> None:
    api = await started(Api())
    egress = await started(ConnectProxy())
    up = await started(upstream(f"http://127.0.0.1:{api.port}", proxy=egress.url))

    status, body = await get(up, "/perl/api/v2/user/joe%40example.com/x", "a=%2F&b")
    assert (status, body) == (200, b"GET /perl/api/v2/user/joe%40example.com/x?a=%2F&b HTTP/1.1")
    assert egress.lines == [f"CONNECT 127.0.0.1:{api.port} HTTP/1.1".encode()]
    # Origin-form, the API's own Host: the proxy is invisible to the API.
    assert api.header(0, "host") == [f"127.0.0.1:{api.port}"]


# -- credentials --------------------------------------------------------------------------------


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("proxy_url", "settings", "expected"),
    [
        ("http://corp%40user:p%3Ass@{where}", {}, basic("corp@user", "p:ss")),
        (
            "http://{where}",
            {"proxy_user": "svc", "proxy_password": Secret("pw-1")},
            basic("svc", "pw-1"),
        ),
    ],
    ids=["in-the-url", "config-keys"],
)
async def test_proxy_credentials_go_on_the_connect_only(
    started: Made, proxy_url: str, settings: dict[str, Any], expected: str
) -> None:
    api = await started(Api())
    egress = await started(ConnectProxy())
    up = await started(
        upstream(
            f"http://127.0.0.1:{api.port}", proxy=proxy_url.format(where=egress.where), **settings
        )
    )
    assert (await get(up))[0] == 200
    assert egress.connects[0].header("proxy-authorization") == [expected]
    assert api.header(0, "proxy-authorization") == []


# -- refusals and failures ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "says"),
    [
        (407, "refused the tunnel to {target}: 407 Proxy Authentication Required (no credentials"),
        (403, "refused the tunnel to {target}: 403 Forbidden"),
        (502, "could not open a tunnel to {target}: 502 Bad Gateway"),
    ],
)
async def test_a_refusal_names_the_egress_proxy_and_its_status(
    started: Made, status: int, says: str
) -> None:
    api = await started(Api())
    egress = await started(ConnectProxy(refuse=status))
    up = await started(upstream(f"http://127.0.0.1:{api.port}", proxy=egress.url))

    with pytest.raises(ConnectFailed) as caught:
        await up.request("POST", "/", "", b"", b"x")
    error = caught.value
    assert isinstance(error, UpstreamUnreachable)
    assert (error.status, error.reason) == (502, "upstream_unreachable")
    target = f"127.0.0.1:{api.port}"
    assert error.message.startswith(f"egress proxy {egress.where} ")
    assert says.format(target=target) in error.message
    assert "Go-Away-Text" not in error.message  # the proxy's own reason text is not echoed
    assert api.connections == 0
    assert up.open_connections == 0


async def test_a_407_with_credentials_says_they_were_refused(started: Made) -> None:
    egress = await started(ConnectProxy(refuse=407))
    up = await started(
        upstream(
            "https://api.example.test",
            proxy=egress.url,
            proxy_user="svc",
            proxy_password=Secret("wrong-pw"),
        )
    )
    with pytest.raises(ConnectFailed, match=r"407 Proxy Authentication Required \(the credentials"):
        await up.request("GET", "/", "", b"", b"")


async def test_an_egress_proxy_that_cannot_be_reached_is_named(started: Made) -> None:
    port = free_port()
    up = await started(upstream("https://api.example.test", proxy=f"http://127.0.0.1:{port}"))
    with pytest.raises(
        ConnectFailed,
        match=rf"^egress proxy 127\.0\.0\.1:{port} could not be reached \(for api\.example\.test\)",
    ):
        await up.request("GET", "/", "", b"", b"")
    assert up.open_connections == 0


async def test_an_egress_proxy_that_never_answers_connect_times_out_named(started: Made) -> None:
    egress = await started(ConnectProxy(silent=True))
    up = await started(upstream("https://api.example.test", proxy=egress.url, connect_timeout=0.3))
    with pytest.raises(
        ConnectFailed,
        match=rf"^egress proxy {egress.where} did not answer CONNECT api\.example\.test:443: "
        "timed out$",
    ):
        await up.request("GET", "/", "", b"", b"")
    assert up.open_connections == 0


async def test_an_egress_proxy_that_hangs_up_is_named(started: Made) -> None:
    egress = await started(ConnectProxy(hang_up=True))
    up = await started(upstream("https://api.example.test", proxy=egress.url))
    with pytest.raises(ConnectFailed, match=f"egress proxy {egress.where} closed the connection"):
        await up.request("GET", "/", "", b"", b"")


# -- which proxy: config, environment, NO_PROXY ----------------------------------------------------


async def test_the_environment_proxy_is_used_when_the_config_is_silent(
    started: Made, ca: trustme.CA, ca_file: str
) -> None:
    api = await started(Api(), tls_for(ca, "localhost"))
    egress = await started(ConnectProxy())
    env = {"HTTPS_PROXY": egress.where}  # no scheme: http:// is understood, as curl does
    up = await started(upstream(f"https://localhost:{api.port}", env, ca_file=ca_file))
    assert up.egress is not None and up.egress.source == "HTTPS_PROXY"
    assert (await get(up))[0] == 200
    assert egress.lines == [f"CONNECT localhost:{api.port} HTTP/1.1".encode()]


async def test_http_proxy_serves_plain_http_origins_and_lower_case_wins(started: Made) -> None:
    api = await started(Api())
    egress = await started(ConnectProxy())
    env = {
        "http_proxy": egress.url,
        "HTTP_PROXY": f"http://127.0.0.1:{free_port()}",
        "HTTPS_PROXY": f"http://127.0.0.1:{free_port()}",  # for https:// origins only
    }
    up = await started(upstream(f"http://127.0.0.1:{api.port}", env))
    assert (await get(up))[0] == 200
    assert len(egress.connects) == 1


@pytest.mark.parametrize(
    "no_proxy", ["localhost", ".localhost", "*", "127.0.0.1", "foo, 127.0.0.0/8", "{port_entry}"]
)
async def test_no_proxy_sends_the_request_directly(
    started: Made, ca: trustme.CA, ca_file: str, no_proxy: str
) -> None:
    api = await started(Api(), tls_for(ca, "localhost", "127.0.0.1"))
    egress = await started(ConnectProxy())
    host = "127.0.0.1" if "127" in no_proxy else "localhost"
    env = {
        "HTTPS_PROXY": egress.url,
        "NO_PROXY": no_proxy.format(port_entry=f"localhost:{api.port}"),
    }
    up = await started(upstream(f"https://{host}:{api.port}", env, ca_file=ca_file))
    assert up.egress is None
    assert (await get(up))[0] == 200
    assert egress.connects == []
    assert api.connections == 1


async def test_no_proxy_for_another_port_or_host_still_uses_the_proxy(started: Made) -> None:
    api = await started(Api())
    egress = await started(ConnectProxy())
    env = {
        "http_proxy": egress.url,
        "no_proxy": f"127.0.0.1:{free_port()}, example.com, 10.0.0.0/8",
    }
    up = await started(upstream(f"http://127.0.0.1:{api.port}", env))
    assert (await get(up))[0] == 200
    assert len(egress.connects) == 1


@pytest.mark.parametrize("off", ["", "none", "None"])
async def test_config_proxy_off_ignores_the_environment(started: Made, off: str) -> None:
    api = await started(Api())
    env = {"http_proxy": f"http://127.0.0.1:{free_port()}"}  # would fail: nothing listens
    up = await started(upstream(f"http://127.0.0.1:{api.port}", env, proxy=off))
    assert up.egress is None
    assert (await get(up))[0] == 200


async def test_config_proxy_wins_over_the_environment_and_config_no_proxy_over_no_proxy(
    started: Made,
) -> None:
    api = await started(Api())
    egress = await started(ConnectProxy())
    env = {"http_proxy": f"http://127.0.0.1:{free_port()}", "no_proxy": "127.0.0.1"}
    up = await started(upstream(f"http://127.0.0.1:{api.port}", env, proxy=egress.url, no_proxy=""))
    assert (await get(up))[0] == 200
    assert len(egress.connects) == 1


# -- uvloop ---------------------------------------------------------------------------------------


async def _first_failure(up: Upstream) -> str:
    await up.start()
    try:
        await up.request("GET", "/", "", b"", b"")
    except ConnectFailed as e:
        return e.message
    finally:
        await up.close()
    return ""


def test_the_tls_tunnel_works_on_uvloop_too(ca: trustme.CA, ca_file: str) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> tuple[int, list[bytes], list[tuple[int, bytes]], int, str, str]:
        api = await Api().start(tls_for(ca, API_HOST))
        impostor = await Api().start(tls_for(ca, "localhost"))
        target = f"{API_HOST}:{api.port}"
        elsewhere = f"{API_HOST}:{impostor.port}"
        egress = await ConnectProxy(
            routes={target: ("127.0.0.1", api.port), elsewhere: ("127.0.0.1", impostor.port)}
        ).start()
        up = upstream(f"https://{target}", proxy=egress.url, ca_file=ca_file)
        await up.start()
        try:
            results = [await get(up, f"/{i}") for i in range(3)]
            # Verification for the API's own name, and a refusal, on uvloop as on asyncio.
            mismatch = await _first_failure(
                upstream(f"https://{elsewhere}", proxy=egress.url, ca_file=ca_file)
            )
            egress.refuse = 403
            refused = await _first_failure(
                upstream(f"https://{target}", proxy=egress.url, ca_file=ca_file)
            )
        finally:
            await up.close()
            await egress.close()
            await impostor.close()
            await api.close()
        return api.port, egress.lines, results, api.connections, mismatch, refused

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert "uvloop" in type(runner.get_loop()).__module__
        port, lines, results, connections, mismatch, refused = runner.run(scenario())
    assert results == [(200, f"GET /{i} HTTP/1.1".encode()) for i in range(3)]
    assert lines[0] == lines[2] == f"CONNECT {API_HOST}:{port} HTTP/1.1".encode()
    assert len(lines) == 3  # one tunnel for three requests, the impostor's, the refused one
    assert connections == 1
    assert "TLS certificate of" in mismatch and f"not valid for '{API_HOST}'" in mismatch
    assert "refused the tunnel" in refused and "403 Forbidden" in refused
