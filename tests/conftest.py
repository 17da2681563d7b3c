"""Shared fixtures: real sockets everywhere (sandbox, proxy, echo upstream, TLS)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from proxy.config import (
    Config,
    Secret,
    WindowConfig,
    parse_duration,
    validate,
)
from proxy.sandbox import SandboxConfig, SandboxServer, start_sandbox
from proxy.service import ProxyService

TOKEN = "test-token-0123"
SECRET = "test-secret-key-abcdef"
USER = "joe@example.com"
PASSWORD = "joe-password"


@pytest.fixture(autouse=True)
def _no_egress_proxy_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxy reads HTTPS_PROXY and the like when its config is silent: a developer's
    own must not send the tests' local traffic to a corporate proxy. Tests about egress
    set what they need."""
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="session")
def server_ssl(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    return ctx


MakeSandbox = Callable[..., Awaitable[SandboxServer]]


@pytest.fixture
async def make_sandbox(server_ssl: ssl.SSLContext) -> AsyncIterator[MakeSandbox]:
    started: list[SandboxServer] = []

    async def make(tls: bool = False, **overrides: Any) -> SandboxServer:
        # Limits high enough not to matter, unless a test is about them.
        limits = {"user_per_window": 100_000, "account_per_window": 100_000, "per_day": 10**7}
        cfg = SandboxConfig(
            token=TOKEN, secret=SECRET, users={USER: PASSWORD}, **{**limits, **overrides}
        )
        server = await start_sandbox(
            cfg,
            host="localhost" if tls else "127.0.0.1",
            port=0,
            ssl_context=server_ssl if tls else None,
        )
        started.append(server)
        return server

    yield make
    for server in started:
        await server.close()


@pytest.fixture
async def sandbox(make_sandbox: MakeSandbox) -> SandboxServer:
    return await make_sandbox()


def proxy_config(upstream_url: str, **sections: Any) -> Config:
    """A Config for tests: ephemeral ports, the test credentials, dict overrides per section."""
    defaults: dict[str, dict[str, Any]] = {
        "listen": {"port": 0},
        "admin": {"port": 0},
        "upstream": {"url": upstream_url, "allow_insecure": True},
        "auth": {"token": Secret(TOKEN), "secret": Secret(SECRET)},
        # Limits far above what tests send, and no day count kept on disk, unless a test says so.
        "limits": {
            "user_per_minute": 100_000,
            "account_per_minute": 100_000,
            "per_day": 10**7,
            "state_file": "",
        },
        "logging": {"level": "debug"},
    }
    limits = sections.get("limits")
    if isinstance(limits, dict) and limits.get("windows"):
        # Beside limits.windows only the shorthand windows a test gives hold (as in a file),
        # and windows may be written as in the file ({requests, per: "1s", scope}).
        defaults["limits"] = {
            "state_file": "",
            **{name: 0 for name in ("user_per_minute", "account_per_minute", "per_day")},
        }
        sections["limits"] = {
            **limits,
            "windows": tuple(
                w
                if isinstance(w, WindowConfig)
                else WindowConfig(
                    w["requests"], parse_duration(w["per"], "per"), w.get("scope", "all")
                )
                for w in limits["windows"]
            ),
        }
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        given = sections.pop(f.name, None)
        if (
            dataclasses.is_dataclass(f.default_factory)
            or f.name in defaults
            or isinstance(given, dict)
        ):
            section_cls = type(getattr(Config(), f.name))
            kwargs[f.name] = section_cls(**{**defaults.get(f.name, {}), **(given or {})})
        elif given is not None:
            kwargs[f.name] = given
    assert not sections, f"unknown config sections {list(sections)}"
    return validate(Config(**kwargs))


class RunningProxy:
    def __init__(self, service: ProxyService) -> None:
        self.service = service

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.service.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.service.admin_port}"


MakeProxy = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def make_proxy() -> AsyncIterator[MakeProxy]:
    running: list[ProxyService] = []

    async def make(upstream_url: str, **sections: Any) -> RunningProxy:
        service = ProxyService(proxy_config(upstream_url, **sections))
        await service.start()
        running.append(service)
        return RunningProxy(service)

    yield make
    for service in running:
        if service.port:
            await service.stop()


@pytest.fixture
async def proxy(sandbox: SandboxServer, make_proxy: MakeProxy) -> RunningProxy:
    # Sandbox first, so it is torn down last and the proxy can revoke its session.
    return await make_proxy(sandbox.url)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class EchoUpstream:
    """A plain upstream that records what reached it and echoes the request headers."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.url = ""
        # Answers to give before echoing again: (status, headers), first in first out.
        self.script: list[tuple[int, dict[str, str]]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen = {
            "method": request.method,
            "target": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body": body.decode("utf-8", "replace"),
        }
        self.requests.append(seen)
        if self.script:
            status, headers = self.script.pop(0)
            return web.json_response({"success": 0}, status=status, headers=headers)
        if request.path.startswith("/status/"):
            return web.json_response({"success": 0}, status=int(request.path.split("/")[2]))
        return web.json_response(seen, headers={"X-Upstream": "echo"})


@pytest.fixture
async def echo_upstream() -> AsyncIterator[EchoUpstream]:
    echo = EchoUpstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    echo.url = f"http://127.0.0.1:{port}"
    yield echo
    await runner.cleanup()


async def raw_exchange(port: int, data: bytes, wait: float = 5.0) -> bytes:
    """Send bytes as they are; read until the server closes or goes quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), wait):
            answer += chunk
            head, sep, body = answer.partition(b"\r\n\r\n")
            if sep:
                lengths = [
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ]
                if lengths and len(body) >= lengths[0]:
                    break
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        writer.close()
    return answer


def parse_raw(answer: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {
        k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
    }
    return int(lines[0].split()[1]), headers, json.loads(body) if body else {}


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


async def eventually(condition: Callable[[], bool], within: float = 2.0) -> None:
    """Wait for the event loop to make `condition` true (a close noticed, a callback run)."""
    for _ in range(int(within / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    assert condition()


def spool_fds(directory: Path) -> list[str]:
    """This process's descriptors open on files in `directory` (unlinked ones included:
    Linux shows them as `<dir>/#<inode> (deleted)` or `<dir>/body-... (deleted)`)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory) + "/"):
            found.append(target)
    return found
