"""Three proxy processes share one integration's limits through a real Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import SECRET, TOKEN, USER, MakeSandbox
from redis_server import INSTALL_HINT, RedisServer, free_port, redis_server_binary

from proxy.sandbox import SandboxServer

WINDOW = 2
LIMIT = 15
PATH = f"/perl/api/v2/user/{USER}/profile"


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    if redis_server_binary() is None:
        pytest.fail(INSTALL_HINT)
    server = RedisServer()
    server.start()
    yield server
    server.stop()


class Proxies:
    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []
        self.urls: list[str] = []
        self.admin: list[str] = []


@pytest.fixture
async def proxies(
    make_sandbox: MakeSandbox, redis: RedisServer, tmp_path: Path
) -> AsyncIterator[tuple[SandboxServer, Proxies]]:
    sandbox = await make_sandbox(window_seconds=WINDOW, user_per_window=LIMIT)
    group = Proxies()
    for i in range(3):
        port, admin = free_port(), free_port()
        config = tmp_path / f"proxy{i}.yaml"
        config.write_text(
            f"""
listen: {{port: {port}}}
admin: {{port: {admin}}}
upstream: {{url: "{sandbox.url}", allow_insecure: true}}
auth: {{token: "${{T}}", secret: "${{S}}"}}
limits:
  backend: redis
  redis_url: {redis.url}
  user_per_minute: {LIMIT}
  window_seconds: {WINDOW}
  fallback_share: 0.2
logging: {{level: info}}
shutdown_timeout: 5
"""
        )
        env = {**os.environ, "T": TOKEN, "S": SECRET}
        group.procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy",
                "run",
                "--config",
                str(config),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
            )
        )
        group.urls.append(f"http://127.0.0.1:{port}")
        group.admin.append(f"http://127.0.0.1:{admin}")
    async with aiohttp.ClientSession() as http:
        for url in group.admin:
            for _ in range(200):
                try:
                    async with http.get(url + "/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"proxy at {url} never became ready")
    yield sandbox, group
    for proc in group.procs:
        proc.send_signal(signal.SIGTERM)
    for proc in group.procs:
        _, stderr = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, stderr[-2000:].decode()


async def burst(urls: list[str], per_proxy: int) -> list[int]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:

        async def one(url: str) -> int:
            async with http.get(url + PATH) as resp:
                await resp.read()
                return resp.status

        return await asyncio.gather(*(one(u) for u in urls for _ in range(per_proxy)))


def served_per_window(sandbox: SandboxServer, since: float) -> Counter[int]:
    return Counter(
        int(e["ts"] // WINDOW)
        for e in sandbox.sandbox.log
        if e["scope"] == "user" and e["status"] == 200 and e["ts"] >= since
    )


async def test_three_processes_share_one_limit_with_no_rejection_at_85_percent(
    proxies: tuple[SandboxServer, Proxies],
) -> None:
    sandbox, group = proxies
    started = sandbox.sandbox.now()
    statuses = await burst(group.urls, per_proxy=25)  # 75 requests: 5x the window's limit
    assert statuses == [200] * 75
    refused = [e for e in sandbox.sandbox.log if e["status"] == 403]
    assert sandbox.sandbox.stats.rate_limited == 0, refused
    per_window = served_per_window(sandbox, started)
    windows = sorted(per_window)
    assert all(per_window[w] <= LIMIT for w in windows)
    # Full windows between the first and the last ran at >= 85% of the shared limit. One
    # may fall short when the machine stalls this process (it hosts the sandbox and the
    # clients) for a window: seen once in a full CI run on 2 loaded cores, 15, 15, 15, 15,
    # 1, 14. A limiter that underuses the budget falls short in every window.
    inner = windows[1:-1]
    assert len(inner) >= 2, per_window
    short = [w for w in inner if per_window[w] < 0.85 * LIMIT]
    assert len(short) <= 1, per_window


async def test_the_proxies_keep_answering_when_redis_dies_and_recover_when_it_returns(
    proxies: tuple[SandboxServer, Proxies], redis: RedisServer
) -> None:
    sandbox, group = proxies
    assert await burst(group.urls, per_proxy=3) == [200] * 9
    redis.stop()
    # Each process now serves alone on its 20% share (3 per window): 9 of the 15 in all.
    statuses = await burst(group.urls, per_proxy=5)
    assert statuses == [200] * 15
    assert sandbox.sandbox.stats.rate_limited == 0
    async with aiohttp.ClientSession() as http, http.get(group.admin[0] + "/readyz") as resp:
        detail = await resp.json()
        assert resp.status == 503  # admin.ready_requires_redis (the default)
        assert detail["checks"]["limits"]["ok"] is False
        assert detail["checks"]["limits"].get("fallback") is True
    redis.restart()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        await burst(group.urls[:1], per_proxy=1)  # recovery is probed on use
        async with aiohttp.ClientSession() as http, http.get(group.admin[0] + "/readyz") as resp:
            if (await resp.json())["checks"]["limits"]["ok"]:
                break
        await asyncio.sleep(0.3)
    else:
        raise AssertionError("the proxy never went back to Redis")
