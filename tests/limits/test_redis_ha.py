"""The shared limits on Redis run highly available: every script's keys in one Cluster slot,
a real three-node Cluster, and real sentinels failing a master over mid-run."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from conftest import USER, MakeProxy, MakeSandbox, RunningProxy
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis_server import (
    INSTALL_HINT,
    SENTINEL_HINT,
    RedisSentinel,
    RedisServer,
    cluster_node,
    create_cluster,
    free_port,
    redis_sentinel_binary,
    redis_server_binary,
)
from structlog.testing import capture_logs

from proxy.config import LimitsConfig, WindowConfig
from proxy.limits.backend import Verdict
from proxy.limits.plan import Window, windows_of
from proxy.limits.redis_backend import RedisBackend
from proxy.sandbox import SandboxServer

G, WF = Verdict.GRANTED, Verdict.WINDOW_FULL
SERVICE = "mymaster"
PATH = f"/perl/api/v2/user/{USER}/profile"


def plan(*windows: tuple[int, float, str]) -> tuple[Window, ...]:
    return windows_of(
        LimitsConfig(
            user_per_minute=0,
            account_per_minute=0,
            per_day=0,
            windows=tuple(WindowConfig(n, per, scope) for n, per, scope in windows),
        )
    )


HOUR, SECOND = plan((70, 3600, "all"), (50, 1, "all"))


# -- every script's keys in one slot -----------------------------------------------------


class Recorder:
    """Stands in for a registered script: records the keys of each call."""

    def __init__(self, calls: list[tuple[str, list[str]]], name: str, answer: Any) -> None:
        self.calls, self.name, self.answer = calls, name, answer

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        self.calls.append((self.name, list(keys)))
        return self.answer(keys) if callable(self.answer) else self.answer


class Unreachable:
    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        raise RedisConnectionError("down")


class FakeClient:
    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        pass


async def test_every_script_is_called_with_keys_of_one_hash_slot() -> None:
    """A Cluster runs a script only when all its keys are in one slot (else CROSSSLOT):
    each of the four scripts, called every way the backend calls it, gets keys that all
    carry the integration's one hash tag."""
    backend = RedisBackend("redis://127.0.0.1:1/0", "integration-7", 60.0, 86400.0, 0.5)
    real_client = backend._client
    backend._client = FakeClient()
    calls: list[tuple[str, list[str]]] = []
    backend._acquire_script = Recorder(calls, "acquire", [0, 1, 1, 1])
    backend._raise_script = Recorder(calls, "raise", 3)
    backend._settle_script = Recorder(calls, "settle", 0)
    backend._take_script = Recorder(calls, "take", lambda keys: [0] + [1, 0] * (len(keys) // 3))
    try:
        assert await backend.acquire("user", 5, 10, 0, 100, carry_cap=2) is G
        assert await backend.take((HOUR, SECOND), (2, 7200), (70, 50), (0, 5)) == (G, -1)
        await backend.raise_used("user", 5, 3)
        await backend.raise_used(SECOND.name, 7200, 3)
        # Redis lost: permits from the local share, settled when it answers again.
        backend._acquire_script = Unreachable()
        backend._take_script = Unreachable()
        assert await backend.acquire("user", 5, 10, 0, 100) is WF  # the window it was lost in
        assert await backend.acquire("user", 6, 10, 0, 100, carry_cap=4) is G
        assert await backend.take((HOUR, SECOND), (2, 7201), (70, 50), (0, 0)) == (WF, 1)
        assert await backend.take((HOUR, SECOND), (2, 7202), (70, 50), (0, 8)) == (G, -1)
        backend._last_probe = 0.0
        await backend.acquire("user", 6, 10, 0, 100)  # probes, settles
    finally:
        await real_client.aclose()
    names = [name for name, _ in calls]
    assert {"acquire", "take", "raise", "settle"} <= set(names), names
    settle_keys = next(keys for name, keys in calls if name == "settle")
    assert len(settle_keys) >= 5  # day, windows and reserves of both kinds
    slots = {key_slot(key.encode()) for _, keys in calls for key in keys}
    assert slots == {key_slot(b"integration-7")}
    assert all("{integration-7}" in key for _, keys in calls for key in keys)


async def test_no_password_of_a_sentinel_url_reaches_the_logs_or_readyz() -> None:
    """No sentinel answers: the backend falls back and says so, masking both passwords."""
    dead = [free_port(), free_port()]
    url = (
        f"redis+sentinel://app:master-pw%2F1@127.0.0.1:{dead[0]},127.0.0.1:{dead[1]}/{SERVICE}"
        "?sentinel_password=sentinel-pw-2"
    )
    backend = RedisBackend(url, "k", 60.0, 86400.0, 0.25)
    with capture_logs() as logs:
        await backend.start()
        await backend.close()
    status = backend.status()
    assert status["ok"] is False and status["fallback"] is True
    warning = next(e for e in logs if e["event"] == "limits_redis_unavailable")
    assert warning["redis"] == (
        f"redis+sentinel://app:***@127.0.0.1:{dead[0]},127.0.0.1:{dead[1]}/{SERVICE}"
        "?sentinel_password=***"
    )
    shown = repr(logs) + repr(status)
    for secret in ("master-pw", "sentinel-pw-2"):
        assert secret not in shown


# -- a real Cluster ----------------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[RedisServer]]:
    if redis_server_binary() is None:
        pytest.fail(INSTALL_HINT)
    nodes = [cluster_node(str(tmp_path)) for _ in range(3)]
    try:
        for node in nodes:
            node.start()
        create_cluster(nodes)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


async def test_two_backends_share_one_budget_on_a_redis_cluster(
    cluster: list[RedisServer],
) -> None:
    # Two of the three nodes as seeds: the client learns the third from them.
    url = f"redis+cluster://127.0.0.1:{cluster[0].port},127.0.0.1:{cluster[1].port}"
    backends = [RedisBackend(url, "shared", 60.0, 86400.0, 0.25, op_timeout=5.0) for _ in "ab"]
    for b in backends:
        await b.start()
    try:
        assert all(b.status() == {"ok": True, "backend": "redis"} for b in backends)
        verdicts = await asyncio.gather(
            *(backends[i % 2].acquire("user", 9, 12, 0, 1000, carry_cap=0) for i in range(30))
        )
        assert Counter(verdicts) == {G: 12, WF: 18}
        taken = await asyncio.gather(
            *(backends[i % 2].take((HOUR, SECOND), (4, 9000), (70, 20), (0, 0)) for i in range(30))
        )
        assert Counter(v for v, _ in taken) == {G: 20, WF: 10}
        await backends[0].raise_used("user", 9, 15)
        assert await backends[1].day_used(0) == 12
        # No fallback: every script ran on the cluster, none raised CROSSSLOT.
        assert all(b.status()["ok"] for b in backends)
        raw = RedisCluster(host="127.0.0.1", port=cluster[2].port)
        try:
            assert int(await raw.get("luxsci-proxy:{shared}:w:user:9")) == 15
            owner = raw.get_node_from_key("luxsci-proxy:{shared}:w:user:9")
            assert owner is not None and owner.port in {n.port for n in cluster}
        finally:
            await raw.aclose()
    finally:
        for b in backends:
            await b.close()


# -- Sentinel, and a failover mid-run --------------------------------------------------------


@dataclass
class Sentineled:
    master: RedisServer
    replica: RedisServer
    sentinels: list[RedisSentinel]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"


async def until(check: Any, what: str, within: float = 20.0) -> None:
    """Poll `check` (an async predicate) until it holds: waiting on an event we cannot
    subscribe to."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def master_port(sentinel: RedisSentinel) -> int | None:
    client = redis.asyncio.Redis(port=sentinel.port)
    try:
        addr = await client.execute_command("SENTINEL", "get-master-addr-by-name", SERVICE)
        return int(addr[1]) if addr else None
    finally:
        await client.aclose()


@pytest.fixture
async def sentineled(tmp_path: Path) -> AsyncIterator[Sentineled]:
    if redis_server_binary() is None:
        pytest.fail(INSTALL_HINT)
    if redis_sentinel_binary() is None:
        pytest.fail(SENTINEL_HINT)
    # Their own folder: a replica writes the master's snapshot to its working directory.
    for name in ("master", "replica"):
        (tmp_path / name).mkdir()
    master = RedisServer(extra_args=["--dir", str(tmp_path / "master")])
    replica = RedisServer(
        extra_args=[
            "--dir",
            str(tmp_path / "replica"),
            "--replicaof",
            "127.0.0.1",
            str(master.port),
        ]
    )
    sentinels = [RedisSentinel(master.port, str(tmp_path)) for _ in range(3)]
    group = Sentineled(master, replica, sentinels)
    try:
        master.start()
        replica.start()
        for s in sentinels:
            s.start()

        async def ready() -> bool:
            # The replica in sync, and each sentinel knows it and both other sentinels,
            # or a failover could not be agreed on.
            client = redis.asyncio.Redis(port=replica.port)
            try:
                info = await client.info("replication")
            finally:
                await client.aclose()
            if info.get("master_link_status") != "up":
                return False
            for s in sentinels:
                client = redis.asyncio.Redis(port=s.port)
                try:
                    others = await client.sentinel_sentinels(SERVICE)
                    replicas = await client.sentinel_slaves(SERVICE)
                finally:
                    await client.aclose()
                if len(others) < 2 or not any(
                    r["port"] == replica.port and not r["is_sdown"] for r in replicas
                ):
                    return False
            return True

        await until(ready, "the sentinels to know the replica and each other")
        yield group
    finally:
        for s in sentinels:
            s.stop()
        replica.stop()
        master.stop()


WINDOW = 2
LIMIT = 10


async def burst(proxies: list[RunningProxy], count: int) -> list[int]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:

        async def one(url: str) -> int:
            async with http.get(url + PATH) as resp:
                await resp.read()
                return resp.status

        return await asyncio.gather(*(one(proxies[i % len(proxies)].url) for i in range(count)))


def served(sandbox: SandboxServer) -> list[dict[str, Any]]:
    return [e for e in sandbox.sandbox.log if e["scope"] == "user" and e["status"] == 200]


async def test_the_proxies_follow_a_sentinel_failover_mid_run_and_the_budget_holds(
    make_sandbox: MakeSandbox, sentineled: Sentineled, make_proxy: MakeProxy
) -> None:
    sandbox = await make_sandbox(window_seconds=WINDOW, user_per_window=LIMIT)
    limits = {
        "backend": "redis",
        "redis_url": sentineled.url,
        "user_per_minute": LIMIT,
        "window_seconds": WINDOW,
        "fallback_share": 0.4,
    }
    proxies = [await make_proxy(sandbox.url, limits=limits, queue={"max_wait": 60}) for _ in "ab"]
    key = proxies[0].service.limits_key
    assert await burst(proxies, 4) == [200] * 4

    # kill -9 the master while a burst is under way.
    running = asyncio.ensure_future(burst(proxies, 2 * LIMIT))
    before = len(served(sandbox))

    async def some_served() -> bool:
        return len(served(sandbox)) >= before + 3

    await until(some_served, "the burst to start")
    sentineled.master.kill()

    async def failed_over() -> bool:
        ports = [await master_port(s) for s in sentineled.sentinels]
        return ports.count(sentineled.replica.port) >= 2

    await until(failed_over, "the sentinels to promote the replica")

    async def back_on_redis() -> bool:
        return all(p.service.limiter.status()["ok"] for p in proxies)

    await until(back_on_redis, "the proxies to use the new master")
    assert await running == [200] * (2 * LIMIT)

    new_master = redis.asyncio.Redis(port=sentineled.replica.port)
    try:
        assert (await new_master.info("replication"))["role"] == "master"
        day_keys = [k async for k in new_master.scan_iter(match=f"luxsci-proxy:{{{key}}}:d:*")]
        assert len(day_keys) == 1

        async def day_count() -> int:
            return int(await new_master.get(day_keys[0]) or 0)

        counted = await day_count()
        assert await burst(proxies, 6) == [200] * 6
        # Every permit of the last burst was counted on the new master.
        assert await day_count() == counted + 6
    finally:
        await new_master.aclose()

    assert all(p.service.limiter.status()["ok"] for p in proxies)
    # The API never refused one, and no window of it served more than its limit.
    assert sandbox.sandbox.stats.rate_limited == 0
    per_window = Counter(int(e["ts"] // WINDOW) for e in served(sandbox))
    assert max(per_window.values()) <= LIMIT, per_window
