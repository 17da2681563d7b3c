"""Durable jobs on one Redis shared by real proxy processes: replicas that take over a
killed one's jobs, jobs read from any replica, the jobs CLI, Redis down."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from conftest import USER, MakeSandbox
from jobs_helpers import ASYNC, KEY, PREFIX, TERMINAL, durable_redis, redis_files
from test_jobs_processes import PROXY, cli, env, listening, start, write_config

from proxy.jobs.redis_store import RedisStore
from proxy.service import limits_key
from proxy.sources import Inputs, resolve
from tests.redis_server import RedisServer

REPLICAS = 3
CONCURRENCY = 4
JOBS = 300
VISIBILITY = 2


async def by_state(url: str, name: str) -> Counter[str]:
    """The jobs' states, read from Redis as the operator's CLI does."""
    store = RedisStore(url, name, 0, runner=False)
    await store.open()
    try:
        return Counter({k: v for k, v in (await store.stats()).by_state.items() if v})
    finally:
        await store.close()


def store_name(config: Path) -> str:
    """The integration key the proxies name their Redis keys with."""
    return limits_key(resolve(Inputs(str(config)), env()).config)


async def test_three_replicas_on_one_redis_one_killed_no_post_goes_twice(
    make_sandbox: MakeSandbox, tmp_path: Path
) -> None:
    data = tmp_path / "redis"
    server = durable_redis(data)
    sandbox = await make_sandbox(window_seconds=1, user_per_window=1000, account_per_window=1000)
    state = sandbox.sandbox
    seen: list[tuple[str, str]] = []
    record = state.request_finished

    def recording(method: str, target: str, scope: str, status: int | None, *rest: Any) -> None:
        seen.append((method, target))
        record(method, target, scope, status, *rest)

    state.request_finished = recording  # type: ignore[method-assign]
    # Every POST takes a while at the API, so some are in flight when a replica dies.
    state.add_fault(method="POST", delay=0.1, times=10**6, path_prefix="/perl/api/v2/account/")
    extra = f"  visibility_timeout: {VISIBILITY}\n"
    replicas = [
        write_config(
            tmp_path, sandbox.url, extra, CONCURRENCY, name=f"proxy{n}.yaml", store=server.url
        )
        for n in range(REPLICAS)
    ]
    logs = [tmp_path / f"proxy{n}.log" for n in range(REPLICAS)]
    procs = [start(config, log) for (config, _, _), log in zip(replicas, logs, strict=True)]
    bases = [f"http://127.0.0.1:{port}" for _, port, _ in replicas]
    jobs: dict[str, tuple[str, str, int]] = {}  # id -> (method, marker, replica)
    try:
        for (_, port, _), proc in zip(replicas, procs, strict=True):
            await listening(port, proc)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as http:

            async def one(i: int) -> None:
                marker = f"m{i:04d}-{uuid.uuid4().hex[:8]}"
                if i % 2:
                    method, path, body = (
                        "POST",
                        f"/perl/api/v2/account/1/send?m={marker}",
                        {"marker": marker},
                    )
                else:
                    method, path, body = "GET", f"/perl/api/v2/user/{USER}/profile?m={marker}", None
                replica = i % REPLICAS
                async with http.request(
                    method, bases[replica] + path, json=body, headers=ASYNC
                ) as resp:
                    assert resp.status == 202, await resp.text()
                    jobs[(await resp.json())["id"]] = (method, marker, replica)

            await asyncio.gather(*(one(i) for i in range(JOBS)))
            assert len(jobs) == JOBS

            started = time.monotonic()
            while sum(1 for _, t in seen if "?m=m" in t) < JOBS // 4:
                assert time.monotonic() - started < 60, "jobs are not progressing"
                await asyncio.sleep(0.02)
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait(timeout=10)
            name = store_name(replicas[0][0])
            while True:
                count = await by_state(server.url, name)
                if sum(count[s] for s in TERMINAL) == JOBS:
                    break
                assert time.monotonic() - started < 90, f"not all jobs ended: {count}"
                await asyncio.sleep(0.2)

            # Any replica reports any job: all read from the second, whoever took them.
            answers: dict[str, dict[str, Any]] = {}
            for job_id in jobs:
                async with http.get(f"{bases[1]}{PREFIX}/{job_id}") as resp:
                    assert resp.status == 200
                    answers[job_id] = await resp.json()
            # ...and the stored answer replays from the third.
            some = next(i for i, (m, _, r) in jobs.items() if m == "GET" and r == 0)
            async with http.get(f"{bases[2]}{PREFIX}/{some}/response") as resp:
                assert resp.status == 200
    finally:
        for proc in procs[1:]:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=20) for proc in procs[1:]]
        server.stop()
    assert codes == [0] * (REPLICAS - 1)

    sent = Counter(
        target.split("?m=")[1] for method, target in seen if "?m=" in target and method == "POST"
    )
    states = Counter(a["state"] for a in answers.values())
    unknown = [i for i, a in answers.items() if a["state"] == "outcome_unknown"]
    assert set(states) <= {"succeeded", "outcome_unknown"}, states
    assert all(answers[i]["state"] == "succeeded" for i, (m, _, _) in jobs.items() if m == "GET")
    # No POST reached the API twice; every POST that succeeded reached it exactly once.
    assert max(sent.values()) == 1
    for job_id, (method, marker, _) in jobs.items():
        if method == "POST" and answers[job_id]["state"] == "succeeded":
            assert sent[marker] == 1, marker
    # outcome_unknown: only POSTs in flight at the kill (one per worker of the killed
    # replica at most), each sent once, each named by the survivor that took it over.
    assert all(jobs[i][0] == "POST" for i in unknown)
    assert all(answers[i]["attempts"] == 1 for i in unknown)
    assert len(unknown) <= CONCURRENCY
    logged = [
        json.loads(line)
        for log in logs[1:]
        # The survivors still write: a last line without its newline is not whole yet.
        for line in log.read_text().split("\n")[:-1]
        if line.startswith("{")
    ]
    named = {e["job_id"] for e in logged if e.get("event") == "job_outcome_unknown"}
    assert set(unknown) == named
    # Redis's files never held a body, a marker or a user's address in clear text.
    on_disk = redis_files(data)
    assert len(on_disk) > 10_000  # the AOF is there, and holds the jobs
    assert not [m for _, m, _ in jobs.values() if m.encode() in on_disk]
    assert USER.encode() not in on_disk
    assert all(KEY not in log.read_text() for log in logs)


async def test_the_jobs_cli_works_on_redis_and_redis_down_stores_nothing(
    make_sandbox: MakeSandbox, tmp_path: Path
) -> None:
    server = durable_redis(tmp_path / "redis")
    sandbox = await make_sandbox()
    # The first POST hangs at the API: one job stays running, the next one queued.
    sandbox.sandbox.add_fault(method="POST", delay=30, times=1, path_prefix="/perl/api/v2/account/")
    config, port, _ = write_config(tmp_path, sandbox.url, "", concurrency=1, store=server.url)
    log = tmp_path / "proxy.log"
    proc = start(config, log)
    base = f"http://127.0.0.1:{port}"
    try:
        await listening(port, proc)
        async with aiohttp.ClientSession() as http:
            ids = []
            for i in range(2):
                async with http.post(
                    f"{base}/perl/api/v2/account/1/x{i}", json={"i": i}, headers=ASYNC
                ) as resp:
                    assert resp.status == 202
                    ids.append((await resp.json())["id"])
            deadline = time.monotonic() + 20
            while (
                f"{ids[0]}  running" not in (listed := cli("list", "--config", str(config))).stdout
            ):
                assert time.monotonic() < deadline, listed.stdout + listed.stderr
                await asyncio.sleep(0.1)
            assert listed.returncode == 0
            assert f"{ids[1]}  queued" in listed.stdout
            assert "/perl/api" not in listed.stdout

            shown = cli("show", ids[1], "--config", str(config))
            assert shown.returncode == 0 and json.loads(shown.stdout)["state"] == "queued"
            cancelled = cli("cancel", ids[1], "--config", str(config))
            assert cancelled.returncode == 0, cancelled.stderr
            assert json.loads(cancelled.stdout)["state"] == "cancelled"
            async with http.get(f"{base}{PREFIX}/{ids[1]}") as resp:
                assert (await resp.json())["state"] == "cancelled"
            refused = cli("cancel", ids[0], "--config", str(config))
            assert refused.returncode == 1 and "running" in refused.stderr

            # Redis goes away: a submission is refused, nothing acknowledged.
            server.stop()
            async with http.post(
                f"{base}/perl/api/v2/account/1/down", json={"i": 9}, headers=ASYNC
            ) as resp:
                assert resp.status == 503
                assert resp.headers["X-Proxy-Error"] == "jobs_unavailable"
                assert (await resp.json())["success"] == 0
            down = cli("list", "--config", str(config))
            assert down.returncode == 1 and "jobs store redis://" in down.stderr
            back = RedisServer(port=server.port, extra_args=server.extra_args)
            back.start()
            server = back
            listed = cli("list", "--config", str(config))
            assert listed.returncode == 0
            assert len([line for line in listed.stdout.splitlines()[1:] if line]) == 2
            # And it heals.
            async with http.post(
                f"{base}/perl/api/v2/account/1/up", json={"i": 10}, headers=ASYNC
            ) as resp:
                assert resp.status == 202
            purged = cli("purge", "--all-finished", "--config", str(config))
            assert purged.returncode == 0 and "purged 1 " in purged.stdout
            assert cli("show", ids[1], "--config", str(config)).returncode == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        server.stop()
    assert code == 0
    assert KEY not in log.read_text()


def test_jobs_keygen_needs_no_store() -> None:
    out = subprocess.run(
        [*PROXY, "jobs", "keygen"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and out.stdout.strip()
