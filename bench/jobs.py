"""Durable job submissions per second on SQLite and on Redis, and what queued jobs cost
the foreground.

    python bench/jobs.py                  # ~90 s
    python bench/jobs.py --quick          # ~45 s
    python bench/jobs.py --store redis    # only the Redis figures

Three submission figures, each a job committed to disk (WAL, synchronous=FULL:
fsynced) before it counts:

1. store, one at a time: each submission waits for its own commit (one fsync each),
   what a store without group commit does;
2. store, group commit: many submitters at once, so one transaction carries all the
   submissions that arrived while the previous one was being fsynced;
3. end to end: wrk POSTs `Prefer: respond-async` requests with a 1 KiB JSON body to a
   real proxy process (`luxsci-proxy run`); every 202 is a job on disk (the count in
   the store is checked against wrk's). The runner is parked (the day's budget is
   spent) so the figure is submissions, not sends.

The same three on Redis (a redis-server the bench starts, `appendonly yes`,
`appendfsync always`: every script's effects fsynced before its reply), each
submission one Lua script; "one at a time" is one submitter, "group" 200 submitters
(Redis fsyncs once for all the replies of one event-loop turn: its own group commit).

4. foreground latency: a real proxy and a real sandbox process, both at 20 requests
   per 2-second window (a permit interval of 0.1 s); synchronous requests at random
   moments, first alone, then while 10,000 jobs wait and run in the background lane.

Goals (issue 14): >= 1,000 durable submissions per second on SQLite; the foreground
request's added latency while 10,000 jobs wait <= 1 permit interval.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import secrets
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.jobs.model import StoredRequest, aad
from proxy.jobs.redis_store import RedisStore
from proxy.jobs.seal import Sealer
from proxy.jobs.store import JobStore, NewJob, SqliteStore
from tests.redis_server import RedisServer

BODY = json.dumps({"subject": "hello", "body": "x" * 960}).encode()
GOAL = 1000.0


def _new_job(sealer: Sealer) -> NewJob:
    job_id = secrets.token_hex(16)
    now = time.time()
    request = StoredRequest("POST", "/perl/api/v2/account/1/send", "", b"", BODY, "", "rid")
    return NewJob(
        job_id,
        "",
        None,
        "POST",
        "account",
        now,
        now + 86400,
        sealer.seal(request.encode(), aad(job_id, "request")),
        None,
    )


async def store_rate(
    workdir: Path, count: int, submitters: int, redis_url: str | None = None
) -> tuple[float, int]:
    """(submissions per second, transactions) for `count` jobs from `submitters` at once;
    on Redis at `redis_url` when given (transactions: 0, not counted)."""
    store: JobStore
    if redis_url is not None:
        store = RedisStore(redis_url, f"bench-{submitters}", max_jobs=10**9)
    else:
        store = SqliteStore(workdir / f"bench-{submitters}.db", max_jobs=10**9)
    await store.open()
    sealer = Sealer([os.urandom(32)])
    per = count // submitters

    async def submitter() -> None:
        for _ in range(per):
            await store.submit(_new_job(sealer))

    started = time.perf_counter()
    await asyncio.gather(*(submitter() for _ in range(submitters)))
    elapsed = time.perf_counter() - started
    commits = store.commits if isinstance(store, SqliteStore) else 0
    await store.close()
    return per * submitters / elapsed, commits


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server(workdir: Path) -> RedisServer:
    """A redis-server as the jobs store needs it: AOF, fsynced before every reply."""
    data = workdir / "redis"
    data.mkdir()
    server = RedisServer(
        extra_args=["--appendonly", "yes", "--appendfsync", "always", "--dir", str(data)]
    )
    server.start()
    return server


async def redis_jobs(url: str) -> int:
    """Jobs the proxy stored on the Redis at `url` (not the store figures' own)."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url)
    try:
        total = 0
        async for key in client.scan_iter(match="{luxsci-proxy:jobs:*}:all"):
            if not key.startswith(b"{luxsci-proxy:jobs:bench-"):
                total += int(await client.zcard(key))
        return total
    finally:
        await client.aclose()


def end_to_end(
    workdir: Path, seconds: int, connections: int, redis_url: str | None = None
) -> tuple[float, int, int, int]:
    """(202s per second, wrk's requests, non-2xx, jobs in the store) through a real proxy;
    its store on Redis at `redis_url` when given, else SQLite."""
    port, admin, dead = free_port(), free_port(), free_port()
    db = workdir / "e2e.db"
    where = redis_url or str(db)
    config = workdir / "proxy.yaml"
    config.write_text(
        f"""
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin}}}
upstream: {{url: "http://127.0.0.1:{dead}", allow_insecure: true}}
auth: {{scheme: bearer, api_key: "${{BENCH_API_KEY}}"}}
logging: {{level: warning}}
limits: {{state_file: "", per_day: 1}}
queue: {{max_wait: 1}}
jobs: {{enabled: true, store: "{where}", keys: ["${{BENCH_JOBS_KEY}}"], max_jobs: 100000000}}
"""
    )
    config.chmod(0o600)
    env = {
        **os.environ,
        "BENCH_API_KEY": "bench-" + secrets.token_hex(8),
        "BENCH_JOBS_KEY": base64.b64encode(os.urandom(32)).decode(),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    log = (workdir / "proxy.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "--config", str(config)],
        stdout=log,
        stderr=log,
        env=env,
    )
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        script = workdir / "post.lua"
        body = BODY.decode().replace('"', '\\"')
        script.write_text(
            'wrk.method = "POST"\n'
            f'wrk.body = "{body}"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            'wrk.headers["Prefer"] = "respond-async"\n'
        )
        done = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{seconds}s",
                "-s",
                str(script),
                f"http://127.0.0.1:{port}/perl/api/v2/account/1/send",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        ).stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from wrk import parse

    result = parse(done)
    if redis_url is not None:
        stored = asyncio.run(redis_jobs(redis_url))
    else:
        with sqlite3.connect(db) as conn:
            stored = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    return result.rps, result.requests, result.non_2xx, stored


WINDOW = 2
PER_WINDOW = 20


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=out, env=env)


def _wait_port(port: int) -> None:
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


async def _sync_latencies(base: str, count: int) -> list[float]:
    """`count` synchronous requests at random moments (0.2 to 0.6 s apart), one at a time."""
    import aiohttp

    found = []
    async with aiohttp.ClientSession() as http:
        for _ in range(count):
            await asyncio.sleep(random.uniform(0.2, 0.6))
            started = time.perf_counter()
            async with http.get(base + "/perl/api/v2/account/1/fg") as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"foreground request answered {resp.status}")
            found.append(time.perf_counter() - started)
    return found


async def _submit_many(base: str, count: int) -> None:
    import aiohttp

    body = {"subject": "batch"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:

        async def one(i: int) -> None:
            async with http.post(
                f"{base}/perl/api/v2/account/1/send?n={i}",
                json=body,
                headers={"Prefer": "respond-async"},
            ) as resp:
                if resp.status != 202:
                    raise RuntimeError(f"submission answered {resp.status}")

        for start in range(0, count, 1000):
            await asyncio.gather(*(one(i) for i in range(start, min(count, start + 1000))))


def foreground(workdir: Path, count: int, jobs: int) -> tuple[list[float], list[float], int]:
    """(latencies alone, latencies with `jobs` waiting, jobs that ran meanwhile)."""
    sandbox_port, port, admin = free_port(), free_port(), free_port()
    token, secret = "bench-" + secrets.token_hex(4), secrets.token_hex(16)
    env = {
        **os.environ,
        "BENCH_TOKEN": token,
        "BENCH_SECRET": secret,
        "BENCH_JOBS_KEY": base64.b64encode(os.urandom(32)).decode(),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    rate = ["--window-seconds", str(WINDOW), "--account-per-window", str(PER_WINDOW)]
    sandbox = _spawn(
        [
            sys.executable,
            "-m",
            "proxy",
            "sandbox",
            "--port",
            str(sandbox_port),
            "--token",
            token,
            "--secret",
            secret,
            *rate,
            "--per-day",
            "10000000",
        ],
        env,
        workdir / "sandbox.log",
    )
    db = workdir / "fg.db"
    config = workdir / "fg.yaml"
    config.write_text(
        f"""
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin}}}
upstream: {{url: "http://127.0.0.1:{sandbox_port}", allow_insecure: true}}
auth: {{token: "${{BENCH_TOKEN}}", secret: "${{BENCH_SECRET}}"}}
logging: {{level: warning}}
shutdown_timeout: 2
limits: {{state_file: "", window_seconds: {WINDOW}, account_per_minute: {PER_WINDOW},
          per_day: 10000000}}
jobs: {{enabled: true, store: "{db}", keys: ["${{BENCH_JOBS_KEY}}"], max_jobs: 1000000}}
"""
    )
    config.chmod(0o600)
    proxy = None
    try:
        _wait_port(sandbox_port)
        proxy = _spawn(
            [sys.executable, "-m", "proxy", "run", "--config", str(config)],
            env,
            workdir / "fg-proxy.log",
        )
        _wait_port(port)
        base = f"http://127.0.0.1:{port}"
        alone = asyncio.run(_sync_latencies(base, count))
        asyncio.run(_submit_many(base, jobs))
        loaded = asyncio.run(_sync_latencies(base, count))
    finally:
        for proc in (proxy, sandbox):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
    with sqlite3.connect(db) as conn:
        ran = conn.execute("SELECT COUNT(*) FROM jobs WHERE state != 'queued'").fetchone()[0]
    return alone, loaded, ran


def report(
    title: str,
    serial: float,
    grouped: float,
    grouped_commits: int,
    count: int,
    e2e: tuple[float, int, int, int],
) -> None:
    rps, requests, non_2xx, stored = e2e
    print(title)
    print(f"  store, one at a time      {serial:8.0f} /s")
    per_commit = (
        f" ({grouped_commits} commits, {count / grouped_commits:.0f} jobs per commit)"
        if grouped_commits
        else ""
    )
    print(f"  store, 200 submitters     {grouped:8.0f} /s{per_commit}")
    print(
        f"  end to end (wrk -c64)     {rps:8.0f} /s  ({requests} answered, {non_2xx} not 202, "
        f"{stored} jobs stored)"
    )
    verdict = "PASS" if rps >= GOAL and stored >= requests - non_2xx else "MISS"
    print(f"  goal >= {GOAL:.0f}/s end to end: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--store", choices=("sqlite", "redis", "both"), default="both")
    args = parser.parse_args()
    count = 2000 if args.quick else 10000
    seconds = 5 if args.quick else 10
    probes = 15 if args.quick else 40
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        workdir = Path(tmp)
        if args.store in ("redis", "both"):
            server = redis_server(workdir)
            try:
                serial, _ = asyncio.run(store_rate(workdir, count // 10, 1, server.url))
                grouped, _ = asyncio.run(store_rate(workdir, count, 200, server.url))
                e2e = end_to_end(workdir, seconds, 64, server.url)
            finally:
                server.stop()
            report(
                f"durable job submissions on Redis (appendfsync always), {cores} cores",
                serial,
                grouped,
                0,
                count,
                e2e,
            )
        if args.store == "redis":
            return
        serial, _ = asyncio.run(store_rate(workdir, count // 10, 1))
        grouped, grouped_commits = asyncio.run(store_rate(workdir, count, 200))
        e2e = end_to_end(workdir, seconds, 64)
        alone, loaded, ran = foreground(workdir, probes, 10000)
    report(
        f"durable job submissions on SQLite (WAL, synchronous=FULL), {cores} cores",
        serial,
        grouped,
        grouped_commits,
        count,
        e2e,
    )
    interval = WINDOW / PER_WINDOW

    def ms(values: list[float]) -> str:
        q = statistics.quantiles(values, n=20)
        return (
            f"p50 {statistics.median(values) * 1e3:6.1f} ms, p95 {q[18] * 1e3:6.1f} ms, "
            f"max {max(values) * 1e3:6.1f} ms"
        )

    added = max(loaded) - max(alone)
    print(f"foreground requests ({len(alone)} at random moments; permit interval {interval:.2f} s)")
    print(f"  alone                     {ms(alone)}")
    print(f"  10,000 jobs waiting       {ms(loaded)}  ({ran} jobs ran meanwhile)")
    verdict = "PASS" if added <= interval else "MISS"
    print(f"  added (max - max) {added * 1e3:6.1f} ms; goal <= 1 permit interval: {verdict}")


if __name__ == "__main__":
    main()
