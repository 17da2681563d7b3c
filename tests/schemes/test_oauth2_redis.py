"""OAuth 2.0 tokens shared by replicas through a real Redis (`auth.state_store`).

Three real `luxsci-proxy run` processes with `grant: refresh_token` against the real
`luxsci-proxy sandbox --oauth` (which rotates refresh tokens and revokes the whole line
when a rotated one is presented again), sharing one real redis-server.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from redis_server import INSTALL_HINT, RedisServer, redis_server_binary
from test_cli import PROXY, curl, env_with, free_port, wait_until
from test_oauth2_process import CLIENT_ID, CLIENT_SECRET, STATE_KEY, oauth_sandbox_process

from proxy.schemes.oauth2_shared import SharedRecord, SharedTokens
from proxy.schemes.oauth2_state import parse_keys

REPLICAS = 3
WORKERS = 4  # concurrent clients per replica


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    if redis_server_binary() is None:
        pytest.fail(INSTALL_HINT)
    data = tmp_path / "redis"
    data.mkdir()
    # An AOF and a dump in a folder of our own: the test greps them for tokens.
    server = RedisServer(extra_args=["--dir", str(data), "--appendonly", "yes"])
    server.start()
    yield server
    server.stop()


@pytest.fixture
def oauth_sandbox() -> Iterator[str]:
    # Budgets far above the load: these tests are about tokens, not rate limits.
    budgets = ("--user-per-window", "1000000", "--account-per-window", "1000000")
    with oauth_sandbox_process(*budgets, "--per-day", "10000000") as (url, line):
        assert "listening on" in line
        yield url


class Replica:
    def __init__(self, tmp_path: Path, index: int, sandbox: str, redis_url: str) -> None:
        self.port, self.admin = free_port(), free_port()
        self.config = tmp_path / f"proxy{index}.yaml"
        self.log = tmp_path / f"proxy{index}.log"
        # Each replica its own state file, as on hosts of their own.
        self.state = tmp_path / f"state{index}" / "oauth2.state"
        self.config.write_text(
            f"""
listen: {{host: 127.0.0.1, port: {self.port}}}
admin: {{host: 127.0.0.1, port: {self.admin}}}
upstream: {{url: "{sandbox}", allow_insecure: true}}
auth:
  scheme: oauth2
  token_url: {sandbox}/oauth/token
  client_id: {CLIENT_ID}
  client_secret: ${{OAUTH_CLIENT_SECRET}}
  grant: refresh_token
  refresh_token_file: {tmp_path / "refresh-token"}
  state_file: {self.state}
  state_store: "{redis_url}"
  refresh_margin: 1
logging: {{level: debug, format: json}}
limits: {{state_file: "", account_per_minute: 1000000, user_per_minute: 1000000,
          per_day: 10000000}}
shutdown_timeout: 5
"""
        )
        self.config.chmod(0o600)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*PROXY, "run", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env_with(OAUTH_CLIENT_SECRET=CLIENT_SECRET, LUXSCI_PROXY_STATE_KEY=STATE_KEY),
            )

    def ready(self) -> bool:
        try:
            return curl(f"http://127.0.0.1:{self.admin}/readyz")[0] == 200
        except subprocess.CalledProcessError:
            return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        assert proc.wait(timeout=20) == 0

    def events(self) -> list[dict]:
        # Read while the process writes: a last line without its newline is not whole yet.
        lines = self.log.read_text().split("\n")[:-1]
        return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture
def replicas(tmp_path: Path, oauth_sandbox: str, redis: RedisServer) -> Iterator[list[Replica]]:
    _, body = curl("-X", "POST", f"{oauth_sandbox}/_sandbox/oauth/refresh-token")
    (tmp_path / "refresh-token").write_text(json.loads(body)["refresh_token"] + "\n")
    group = [Replica(tmp_path, i, oauth_sandbox, redis.url) for i in range(REPLICAS)]
    yield group
    for replica in group:
        if replica.proc is not None:
            replica.proc.kill()
            replica.proc.wait()


def start_all(group: list[Replica]) -> None:
    for replica in group:
        replica.start()
    for replica in group:
        wait_until(replica.ready)


def redis_cli(port: int, *args: str) -> bytes:
    return subprocess.run(
        ["redis-cli", "-p", str(port), *args], check=True, capture_output=True
    ).stdout


def stats(sandbox: str) -> dict:
    return json.loads(curl(f"{sandbox}/_sandbox/stats")[1])["oauth"]


class Load:
    """WORKERS clients per replica sending requests until stopped; every answer kept."""

    def __init__(self, group: list[Replica]) -> None:
        self.group = group
        self.statuses: list[int] = []
        self._stop = asyncio.Event()
        self._progress = asyncio.Condition()

    async def _client(self, http: aiohttp.ClientSession, replica: Replica, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            async with http.get(f"{replica.url}/v1/things?w={n}&i={i}") as resp:
                await resp.read()
                self.statuses.append(resp.status)
            async with self._progress:
                self._progress.notify_all()

    async def answers(self, more: int) -> None:
        """Wait until `more` further answers have come in."""
        target = len(self.statuses) + more
        async with self._progress:
            await self._progress.wait_for(lambda: len(self.statuses) >= target)

    async def run(self, http: aiohttp.ClientSession) -> list[asyncio.Task[None]]:
        return [
            asyncio.create_task(self._client(http, replica, n))
            for replica in self.group
            for n in range(WORKERS)
        ]

    async def stop(self, tasks: list[asyncio.Task[None]]) -> None:
        self._stop.set()
        await asyncio.gather(*tasks)


async def post(http: aiohttp.ClientSession, url: str, body: object = None) -> None:
    async with http.post(url, json=body if body is not None else {}) as resp:
        assert resp.status == 200, await resp.text()


def secrets_in(sandbox_stats: dict) -> list[str]:
    return [
        CLIENT_SECRET,
        STATE_KEY,
        *sandbox_stats["issued_refresh_tokens"],
        *sandbox_stats["issued_access_tokens"],
    ]


async def test_replicas_refresh_once_per_expiry_never_reuse_a_rotated_token_and_restart_from_redis(
    replicas: list[Replica], oauth_sandbox: str, redis: RedisServer, tmp_path: Path
) -> None:
    start_all(replicas)
    # One token call for all three at start: the first holds the lock, the others wait
    # for what it writes.
    assert stats(oauth_sandbox)["token_calls"] == 1

    async with aiohttp.ClientSession() as http:
        load = Load(replicas)
        tasks = await load.run(http)
        await load.answers(50)
        # Revocation of every access token, three times, under load: each is one 401 per
        # replica and must be one refresh in all.
        for expiry in range(1, 4):
            await post(http, f"{oauth_sandbox}/_sandbox/oauth/expire")
            await load.answers(80)
            assert stats(oauth_sandbox)["token_calls"] == 1 + expiry
        # Then natural expiry: 2-second tokens, refreshed from half their life.
        lifetime = 2.0
        await post(http, f"{oauth_sandbox}/_sandbox/oauth/settings", {"token_lifetime": lifetime})
        await post(http, f"{oauth_sandbox}/_sandbox/oauth/expire")
        before = stats(oauth_sandbox)["token_calls"]
        began = time.monotonic()
        while stats(oauth_sandbox)["token_calls"] < before + 6:
            await load.answers(40)
        await load.stop(tasks)
        elapsed = time.monotonic() - began

    natural = stats(oauth_sandbox)["token_calls"] - before
    # Not a timing assertion but a count: a token is fetched only once the shared one is
    # past half its life, so a second call per lifetime means a replica refreshed alone
    # (three replicas on their own would make three times as many).
    assert natural <= math.ceil(elapsed / (lifetime / 2)) + 1
    assert load.statuses and set(load.statuses) == {200}, sorted(set(load.statuses))

    # All replicas stop (a refresh may still be under way until then)...
    for replica in replicas:
        replica.stop()
    first = stats(oauth_sandbox)
    assert first["errors"] == [] and first["token_failures"] == 0
    assert first["families_revoked"] == 0
    # Every token call the server saw was one replica's, and the others took its token.
    fetched = sum(1 for r in replicas for e in r.events() if e["event"] == "auth_succeeded")
    assert fetched == first["token_calls"]
    adopted = sum(1 for r in replicas for e in r.events() if e["event"] == "oauth2_token_shared")
    assert adopted >= 2 * first["token_calls"] - 2

    # ...and restart: the configured refresh token is long rotated away (presenting it
    # would revoke the line); the newest is in Redis.
    await asyncio.to_thread(start_all, replicas)
    async with aiohttp.ClientSession() as http:
        await post(http, f"{oauth_sandbox}/_sandbox/oauth/settings", {"token_lifetime": 3600})
        await post(http, f"{oauth_sandbox}/_sandbox/oauth/expire")
        for replica in replicas:
            async with http.get(f"{replica.url}/v1/things?after=restart") as resp:
                assert resp.status == 200, await resp.text()
    after = stats(oauth_sandbox)
    assert after["errors"] == [] and after["families_revoked"] == 0
    assert after["by_grant"] == {"refresh_token": after["token_calls"]}
    for replica in replicas:
        replica.stop()

    # Nothing in clear: not in Redis's AOF or dump, the state files, or any output.
    redis_cli(redis.port, "SAVE")
    at_rest = [p for p in (tmp_path / "redis").rglob("*") if p.is_file()]
    assert any(p.name == "dump.rdb" for p in at_rest)
    assert any("appendonly" in str(p) for p in at_rest)
    at_rest += [r.state for r in replicas if r.state.exists()]
    blobs = [p.read_bytes() for p in at_rest]
    keys = redis_cli(redis.port, "--scan").decode().split()
    assert keys and all(k.startswith("luxsci-proxy:oauth:{") for k in keys), keys
    output = "".join(r.log.read_text() for r in replicas)
    for secret in secrets_in(after):
        assert secret not in output
        for blob in blobs:
            assert secret.encode() not in blob


async def test_redis_down_requests_are_served_on_the_local_path_and_readyz_says_so(
    replicas: list[Replica], oauth_sandbox: str, redis: RedisServer
) -> None:
    replica = replicas[0]
    replica.start()
    wait_until(replica.ready)
    redis.stop()
    async with aiohttp.ClientSession() as http:
        await post(http, f"{oauth_sandbox}/_sandbox/oauth/expire")
        for i in range(3):  # the first meets the 401 and refreshes without Redis
            async with http.get(f"{replica.url}/v1/things?down={i}") as resp:
                assert resp.status == 200, await resp.text()
        async with http.get(f"http://127.0.0.1:{replica.admin}/readyz") as resp:
            ready = await resp.json()
    assert resp.status == 200
    auth = json.dumps(ready)
    assert "unreachable" in auth, ready
    # Redis back: the next request makes the replica write what it fetched meanwhile.
    redis.start()
    async with aiohttp.ClientSession() as http:
        i = 0
        while "oauth2_shared_store_synced" not in [e["event"] for e in replica.events()]:
            i += 1
            async with http.get(f"{replica.url}/v1/things?back={i}") as resp:
                assert resp.status == 200, await resp.text()
        # A replica started now takes that token, and its refresh token: a refresh after
        # one more revocation presents the newest one, not the one rotated away.
        other = replicas[1]
        other.start()
        await asyncio.to_thread(wait_until, other.ready)
        await post(http, f"{oauth_sandbox}/_sandbox/oauth/expire")
        async with http.get(f"{other.url}/v1/things?other=1") as resp:
            assert resp.status == 200, await resp.text()
    replica.stop()
    other.stop()
    got = stats(oauth_sandbox)
    assert got["errors"] == [] and got["families_revoked"] == 0
    assert got["token_calls"] == 3  # the start, the refresh during the outage, the last one
    events = [e["event"] for e in replica.events()]
    assert events.count("oauth2_shared_store_unreachable") == 1
    assert "oauth2_shared_store_reachable" in events
    assert "oauth2_token_shared" in [e["event"] for e in other.events()]


async def test_the_lock_is_released_only_by_its_holder_and_records_are_sealed(
    redis: RedisServer,
) -> None:
    keys = parse_keys(STATE_KEY)
    a = SharedTokens(redis.url, keys, "https://as.example/token\nclient", "", lock_ttl=30)
    b = SharedTokens(redis.url, keys, "https://as.example/token\nclient", "", lock_ttl=30)
    other = SharedTokens(redis.url, keys, "https://as.example/token\nclient", "two", lock_ttl=30)
    try:
        held = await a.lock()
        assert held is not None
        assert await b.lock() is None
        await b.unlock("not-the-holders-value")
        assert await b.lock() is None
        await a.unlock(held)
        assert await b.lock() is not None
        assert await other.lock() is not None  # another integration: another lock

        record = SharedRecord("acc-Secret-1", 1.0, 2.0, 1.5, "ref-Secret-1", "origin")
        assert await a.write(0, record)
        assert not await b.write(0, record)  # version 0 is gone: a compare-and-set
        assert await b.read() == (1, record)
        assert await other.read() == (0, None)
        for key in redis_cli(redis.port, "--scan").split():
            assert b"Secret" not in redis_cli(redis.port, "DUMP", key.decode())
    finally:
        for store in (a, b, other):
            await store.close()


CONFIG = """
auth:
  scheme: oauth2
  token_url: https://auth.example.com/oauth/token
  client_id: app
  client_secret: ${CLIENT_SECRET}
"""
CONFIG_ENV = {"CLIENT_SECRET": "cs-123456", "KEY": STATE_KEY}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            '  state_store: "http://r:6379"\n  state_key: ${KEY}\n',
            r"^auth\.state_store: must start",
        ),
        (
            '  state_store: "redis://u:Pw-Xq9@r:6379/0?foo=1"\n  state_key: ${KEY}\n',
            r"^auth\.state_store: unknown query parameter foo .*u:\*+@r",
        ),
        (
            '  state_store: "redis://r:6379/0"\n',
            r"^auth\.state_key: required with auth\.state_store",
        ),
        (
            '  state_store: "redis://r:6379/0"\n  state_key: short\n',
            r"^auth\.state_key: each key must be 32",
        ),
    ],
)
def test_state_store_config_errors_name_the_key_and_mask_the_password(
    extra: str, message: str
) -> None:
    from proxy.config import ConfigError, parse

    with pytest.raises(ConfigError, match=message) as caught:
        parse(CONFIG + extra, CONFIG_ENV)
    assert "Pw-Xq9" not in str(caught.value)


def test_state_store_takes_every_redis_url_form() -> None:
    from proxy.config import parse

    for url in (
        "redis://:pw@127.0.0.1:6379/2",
        "unix:///run/redis.sock?db=1",
        "redis+sentinel://s1:26379,s2:26379/mymaster/0",
        "rediss+cluster://n1:6379,n2:6379",
    ):
        cfg = parse(CONFIG + f'  state_store: "{url}"\n  state_key: ${{KEY}}\n', CONFIG_ENV)
        assert cfg.auth.state_store == url
