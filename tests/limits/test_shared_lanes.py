"""Lanes are per process, the budget they share is global: three processes on Redis."""

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
APP_TOKEN = "app-token-0123456789abcdef"
BATCH_TOKEN = "batch-token-0123456789abcdef"


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    if redis_server_binary() is None:
        pytest.fail(INSTALL_HINT)
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def proxies(
    make_sandbox: MakeSandbox, redis: RedisServer, tmp_path: Path
) -> AsyncIterator[tuple[SandboxServer, list[str]]]:
    sandbox = await make_sandbox(window_seconds=WINDOW, user_per_window=LIMIT)
    procs, urls, admins = [], [], []
    for i in range(3):
        port, admin = free_port(), free_port()
        config = tmp_path / f"proxy{i}.yaml"
        config.write_text(
            f"""
listen: {{port: {port}}}
admin: {{port: {admin}}}
upstream: {{url: "{sandbox.url}", allow_insecure: true}}
auth: {{token: "${{T}}", secret: "${{S}}"}}
access:
  clients:
    - {{name: app, token: "${{APP}}", max_priority: high}}
    - {{name: batch, token: "${{BATCH}}", max_priority: low}}
limits:
  backend: redis
  redis_url: {redis.url}
  user_per_minute: {LIMIT}
  window_seconds: {WINDOW}
queue: {{max_wait: 60}}
logging: {{level: info}}
shutdown_timeout: 5
"""
        )
        env = {**os.environ, "T": TOKEN, "S": SECRET, "APP": APP_TOKEN, "BATCH": BATCH_TOKEN}
        procs.append(
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
        urls.append(f"http://127.0.0.1:{port}")
        admins.append(f"http://127.0.0.1:{admin}")
    async with aiohttp.ClientSession() as http:
        for url in admins:
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
    yield sandbox, urls
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        _, stderr = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, stderr[-2000:].decode()


async def test_three_processes_with_lanes_keep_the_shared_budget_with_no_rejection(
    proxies: tuple[SandboxServer, list[str]],
) -> None:
    sandbox, urls = proxies
    started = sandbox.sandbox.now()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def one(url: str, token: str, priority: str) -> tuple[int, float]:
            began = time.monotonic()
            headers = {"Proxy-Authorization": f"Bearer {token}", "X-Proxy-Priority": priority}
            async with http.get(url + PATH, headers=headers) as resp:
                await resp.read()
                return resp.status, time.monotonic() - began

        # Per process: 20 low requests from the batch, then 5 high ones from the app:
        # 75 in all, 5x the shared window's budget.
        lows = [one(u, BATCH_TOKEN, "low") for u in urls for _ in range(20)]
        highs = [one(u, APP_TOKEN, "high") for u in urls for _ in range(5)]
        low_results, high_results = await asyncio.gather(
            asyncio.gather(*lows), asyncio.gather(*highs)
        )
    assert [s for s, _ in low_results + high_results] == [200] * 75
    refused = [e for e in sandbox.sandbox.log if e["status"] == 403]
    assert sandbox.sandbox.stats.rate_limited == 0, refused
    served = Counter(
        int(e["ts"] // WINDOW)
        for e in sandbox.sandbox.log
        if e["scope"] == "user" and e["status"] == 200 and e["ts"] >= started
    )
    assert all(count <= LIMIT for count in served.values()), served
    # Each process served its app's high requests ahead of the batch's low ones.
    assert max(t for _, t in high_results) < max(t for _, t in low_results)
