"""Clients that stop reading their answer cannot hold the proxy's in-flight slots (issue 12).

A client that asks for a large answer and never reads it used to keep its slot
under limits.max_inflight, and its upstream connection, for as long as it liked.
The listener's send timeout (listen.client_timeout without progress) cuts it off,
and the request's slot and upstream connection are let go.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from conftest import MakeProxy

from proxy.config import Secret

pytestmark = pytest.mark.timeout(60)

LARGE = 64 * 1024 * 1024  # more than any socket buffers hold


@pytest.fixture
async def large_upstream() -> AsyncIterator[str]:
    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/small":
            return web.json_response({"success": 1})
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = LARGE
        await response.prepare(request)
        piece = b"L" * 65536
        try:
            for _ in range(LARGE // len(piece)):
                await response.write(piece)
        except ConnectionError:
            pass
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_a_client_that_stops_reading_frees_its_in_flight_slot(
    large_upstream: str, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(
        large_upstream,
        auth={"scheme": "bearer", "api_key": Secret("k")},
        listen={"client_timeout": 0.5},
        limits={"max_inflight": 1},
        queue={"max_wait": 10},
    )
    port = proxy.service.port
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(stalled, ("127.0.0.1", port))
    try:
        await loop.sock_sendall(stalled, b"GET /large HTTP/1.1\r\nHost: p\r\n\r\n")  # never read
        forwarder = proxy.service.forwarder
        for _ in range(200):
            if forwarder.inflight_count == 1:
                break
            await asyncio.sleep(0.01)
        assert forwarder.inflight_count == 1  # the stalled client holds the only slot

        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /small HTTP/1.1\r\nHost: p\r\n\r\n")
        status_line = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        assert status_line.startswith(b"HTTP/1.1 200")
        # Served once the stalled answer was abandoned: within the timeout and some slack,
        # not after the 64 MiB were read (never) or queue.max_wait (10 s).
        assert time.monotonic() - started < 5
        assert forwarder.inflight_count == 0
    finally:
        stalled.close()
