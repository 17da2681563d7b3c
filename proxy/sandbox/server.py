"""Run the sandbox on a real socket (plain HTTP or TLS)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from types import TracebackType

from aiohttp import web

from proxy.sandbox.app import make_app
from proxy.sandbox.config import SandboxConfig
from proxy.sandbox.responses import CLOSING_KEY
from proxy.sandbox.state import Sandbox

# In-flight handlers get this long to finish on close; injected delays wake at once.
SHUTDOWN_TIMEOUT = 2.0
# After an early answer (417, 401 before the body was read...) aiohttp waits this long for
# the unread body before closing; its 10 s default keeps held-back bodies' sockets open.
LINGERING_TIME = 1.0

# A wildcard bind address is not something a client can connect to.
_CONNECT_HOSTS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


class SandboxServer:
    """A running sandbox: its base URL, its state, and a way to stop it."""

    def __init__(
        self, sandbox: Sandbox, app: web.Application, runner: web.AppRunner, url: str, port: int
    ) -> None:
        self.sandbox = sandbox
        self.url = url
        self.port = port
        self._app = app
        self._runner = runner

    async def close(self) -> None:
        self._app[CLOSING_KEY].set()
        await self._runner.cleanup()

    async def __aenter__(self) -> SandboxServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def base_url(host: str, port: int, tls: bool) -> str:
    host = _CONNECT_HOSTS.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}"


async def start_sandbox(
    config: SandboxConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
) -> SandboxServer:
    """Start a sandbox; port 0 picks a free port (see `.port` / `.url`)."""
    sandbox = Sandbox(config)
    app = make_app(sandbox)
    # No access log: it would only add noise to test output and the demo's console.
    runner = web.AppRunner(
        app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT, lingering_time=LINGERING_TIME
    )
    await runner.setup()
    try:
        sockets, bound_port = await _bind(host, port)
        for sock in sockets:
            await web.SockSite(runner, sock, ssl_context=ssl_context).start()
    except BaseException:
        await runner.cleanup()
        raise
    return SandboxServer(
        sandbox, app, runner, base_url(host, bound_port, ssl_context is not None), bound_port
    )


async def _bind(host: str, port: int) -> tuple[list[socket.socket], int]:
    """Bind every address of `host` on one port.

    A name like "localhost" may resolve to both 127.0.0.1 and ::1; binding each to
    port 0 separately would give two different ports and a URL that works for one
    address family only. So the first bind picks the port and the rest reuse it.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    addresses = list(dict.fromkeys((family, sockaddr) for family, _, _, _, sockaddr in infos))
    attempts = 20 if port == 0 and len(addresses) > 1 else 1
    for attempt in range(attempts):
        sockets: list[socket.socket] = []
        chosen = port
        try:
            for family, sockaddr in addresses:
                sock = socket.socket(family, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((sockaddr[0], chosen, *sockaddr[2:]))
                chosen = sock.getsockname()[1]
            return sockets, chosen
        except OSError:
            for sock in sockets:
                sock.close()
            # Only a port picked by the first bind can be taken on another address: retry.
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
