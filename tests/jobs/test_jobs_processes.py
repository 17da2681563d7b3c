"""Durable jobs in real proxy processes: kill -9 mid-run, restarts, and the jobs CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from conftest import SECRET, TOKEN, USER, MakeSandbox
from jobs_helpers import ASYNC, KEY, PREFIX, TERMINAL, store_bytes

PROXY = [sys.executable, "-m", "proxy"]
CONCURRENCY = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LUXSCI_")}
    return {
        **clean,
        "LUXSCI_API_TOKEN": TOKEN,
        "LUXSCI_API_SECRET": SECRET,
        "LUXSCI_JOBS_KEY": KEY,
    }


def write_config(
    tmp_path: Path,
    upstream: str,
    extra: str = "",
    concurrency: int = CONCURRENCY,
    name: str = "proxy.yaml",
    store: str | None = None,
) -> tuple[Path, int, int]:
    port, admin = free_port(), free_port()
    text = f"""
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin}}}
upstream: {{url: "{upstream}", allow_insecure: true}}
auth: {{scheme: luxsci, token: "${{LUXSCI_API_TOKEN}}", secret: "${{LUXSCI_API_SECRET}}"}}
logging: {{level: info, format: json}}
shutdown_timeout: 5
retry: {{backoff_base: 0.01, backoff_max: 0.05}}
limits:
  state_file: ""
  window_seconds: 1
  account_per_minute: 50
  user_per_minute: 50
  per_day: 1000000
jobs:
  enabled: true
  store: "{store or tmp_path / "jobs.db"}"
  keys: ["${{LUXSCI_JOBS_KEY}}"]
  concurrency: {concurrency}
{extra}"""
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o600)
    return path, port, admin


def start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [*PROXY, "run", "--config", str(config)],
            stdout=out,
            stderr=out,
            env=env(),
        )


async def listening(port: int, proc: subprocess.Popen[bytes], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the proxy exited"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise AssertionError("the proxy did not listen")


def states(db: Path) -> Counter[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return Counter(dict(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PROXY, "jobs", *args], capture_output=True, text=True, env=env(), timeout=30
    )


async def test_jobs_survive_kill_9_three_times_and_no_post_goes_twice(
    make_sandbox: MakeSandbox, tmp_path: Path
) -> None:
    sandbox = await make_sandbox(window_seconds=1, user_per_window=100, account_per_window=100)
    state = sandbox.sandbox
    seen: list[tuple[str, str]] = []
    record = state.request_finished

    def recording(method: str, target: str, scope: str, status: int | None, *rest: Any) -> None:
        seen.append((method, target))
        record(method, target, scope, status, *rest)

    # The sandbox's own log keeps the last thousand requests; this test needs all of them.
    state.request_finished = recording  # type: ignore[method-assign]
    # Every POST takes a while at the API, so some are always in flight when the proxy dies.
    state.add_fault(method="POST", delay=0.1, times=10**6, path_prefix="/perl/api/v2/account/")
    config, port, _ = write_config(tmp_path, sandbox.url)
    db = tmp_path / "jobs.db"
    log = tmp_path / "proxy.log"
    proc = start(config, log)
    base = f"http://127.0.0.1:{port}"
    jobs: dict[str, tuple[str, str]] = {}  # id -> (method, marker)
    try:
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
                async with http.request(method, base + path, json=body, headers=ASYNC) as resp:
                    assert resp.status == 202, await resp.text()
                    jobs[(await resp.json())["id"]] = (method, marker)

            await asyncio.gather(*(one(i) for i in range(1000)))
            assert len(jobs) == 1000

            kills = 0
            started = time.monotonic()
            for threshold in (200, 450, 700):
                while sum(1 for _, t in seen if "?m=m" in t) < threshold:
                    assert time.monotonic() - started < 60, "jobs are not progressing"
                    await asyncio.sleep(0.02)
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
                kills += 1
                proc = start(config, log)
                await listening(port, proc)
            while True:
                count = states(db)
                if sum(count[s] for s in TERMINAL) == 1000:
                    break
                assert time.monotonic() - started < 90, f"not all jobs ended: {count}"
                await asyncio.sleep(0.2)

            answers: dict[str, dict[str, Any]] = {}
            for job_id in jobs:
                async with http.get(f"{base}{PREFIX}/{job_id}") as resp:
                    answers[job_id] = await resp.json()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0

    assert kills == 3
    sent = Counter(
        target.split("?m=")[1] for method, target in seen if "?m=" in target and method == "POST"
    )
    by_state = Counter(a["state"] for a in answers.values())
    unknown = [i for i, a in answers.items() if a["state"] == "outcome_unknown"]
    # Every job ended; GETs all succeeded (those in flight at a kill were sent again).
    assert set(by_state) <= {"succeeded", "outcome_unknown"}, by_state
    assert all(answers[i]["state"] == "succeeded" for i, (m, _) in jobs.items() if m == "GET")
    # No POST reached the API twice; every POST that succeeded reached it exactly once.
    assert max(sent.values()) == 1
    for job_id, (method, marker) in jobs.items():
        if method == "POST" and answers[job_id]["state"] == "succeeded":
            assert sent[marker] == 1, marker
    # outcome_unknown: only POSTs that were in flight (marked running, at most one per
    # worker per kill), each sent at most once, and each named in the log at restart.
    assert all(jobs[i][0] == "POST" for i in unknown)
    assert all(answers[i]["attempts"] == 1 for i in unknown)
    assert len(unknown) <= 3 * CONCURRENCY
    logged = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    named = {e["job_id"] for e in logged if e.get("event") == "job_outcome_unknown"}
    assert set(unknown) == named
    # The store never held a body, a marker or a user's address in clear text.
    on_disk = store_bytes(db)
    assert not [m for _, m in jobs.values() if m.encode() in on_disk]
    assert USER.encode() not in on_disk
    assert KEY not in log.read_text()


async def test_the_jobs_cli_lists_shows_cancels_retries_and_purges(
    make_sandbox: MakeSandbox, tmp_path: Path
) -> None:
    sandbox = await make_sandbox()
    # The proxy sends nothing (the sandbox delays its first POST for long): its jobs stay queued.
    config, port, _ = write_config(tmp_path, sandbox.url, "  keep_results: 3\n", concurrency=1)
    log = tmp_path / "proxy.log"
    sandbox.sandbox.add_fault(method="POST", delay=30, times=1, path_prefix="/perl/api/v2/account/")
    proc = start(config, log)
    base = f"http://127.0.0.1:{port}"
    try:
        await listening(port, proc)
        async with aiohttp.ClientSession() as http:
            ids = []
            for i in range(3):
                async with http.post(
                    f"{base}/perl/api/v2/account/1/x{i}", json={"i": i}, headers=ASYNC
                ) as resp:
                    ids.append((await resp.json())["id"])
            await asyncio.sleep(0.5)

            listed = cli("list", "--config", str(config))
            assert listed.returncode == 0, listed.stderr
            assert all(i in listed.stdout for i in ids)
            assert "/perl/api" not in listed.stdout  # no paths

            running = [i for i in ids if f"{i}  running" in listed.stdout]
            queued = [i for i in ids if f"{i}  queued" in listed.stdout]
            assert len(running) == 1 and len(queued) == 2

            shown = cli("show", queued[0], "--config", str(config))
            assert shown.returncode == 0
            assert json.loads(shown.stdout)["state"] == "queued"

            cancelled = cli("cancel", queued[0], "--config", str(config))
            assert cancelled.returncode == 0
            assert json.loads(cancelled.stdout)["state"] == "cancelled"
            # The proxy sees it at once (before keep_results, 3 s here, purges it).
            async with http.get(f"{base}{PREFIX}/{queued[0]}") as resp:
                got = await resp.json()
                assert got.get("state") == "cancelled", got
            refused = cli("cancel", running[0], "--config", str(config))
            assert refused.returncode == 1 and "running" in refused.stderr
            assert cli("retry", queued[1], "--config", str(config)).returncode == 1

    finally:
        proc.send_signal(signal.SIGKILL)  # the POST in flight: outcome unknown
        proc.wait(timeout=10)
    sandbox.sandbox.clear_faults()
    proc = start(config, log)
    try:
        await listening(port, proc)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}{PREFIX}/{running[0]}") as resp:
                assert (await resp.json())["state"] == "outcome_unknown"
            again = cli("retry", running[0], "--config", str(config))
            assert again.returncode == 0, again.stderr
            for _ in range(200):
                async with http.get(f"{base}{PREFIX}/{running[0]}") as resp:
                    if (await resp.json())["state"] == "succeeded":
                        break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the retried job did not run")
        await asyncio.sleep(3.1)  # past keep_results
        purged = cli("purge", "--config", str(config))
        assert purged.returncode == 0
        assert "purged" in purged.stdout
        assert cli("show", queued[0], "--config", str(config)).returncode == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    assert cli("keygen").stdout.strip() != ""
    assert KEY not in log.read_text()


def test_a_second_proxy_on_one_store_refuses_to_start(tmp_path: Path) -> None:
    config, port, _ = write_config(tmp_path, "http://127.0.0.1:9")
    other, _, _ = write_config(tmp_path, "http://127.0.0.1:9", name="other.yaml")
    log = tmp_path / "proxy.log"
    first = start(config, log)
    try:
        asyncio.run(listening(port, first))
        second = subprocess.run(
            [*PROXY, "run", "--config", str(other)],
            capture_output=True,
            text=True,
            env=env(),
            timeout=30,
        )
        assert second.returncode == 1
        assert "in use by another proxy process" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=20) == 0
