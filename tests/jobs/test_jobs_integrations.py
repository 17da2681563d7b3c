"""Durable jobs in a process with several integrations: each job's attempts say which
integration made them, as the proxy path's access lines do."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import aiohttp
from conftest import SECRET, TOKEN, USER, MakeSandbox
from jobs_helpers import KEY, durable_redis, submit, until_done

from proxy.config import parse
from proxy.observe.access_record import AccessRecord
from proxy.observe.log import Logs
from proxy.service import ProxyService

NAMES = ("mail", "bulk")


def config(upstream: str, tmp_path: Path, store: str | None = None) -> str:
    sections = "".join(
        f"""
  - name: {name}
    listen: {{port: 0}}
    upstream: {{url: "{upstream}", allow_insecure: true}}
    auth: {{token: "${{TOKEN}}", secret: "${{SECRET}}"}}
    limits: {{state_file: ""}}
    retry: {{backoff_base: 0.01, backoff_max: 0.05}}
    jobs: {{enabled: true, keys: ["${{JOBS_KEY}}"], store: "{store or f"{tmp_path / name}.db"}"}}
"""
        for name in NAMES
    )
    return f"admin: {{port: 0}}\nlogging: {{level: info}}\nintegrations:{sections}"


async def test_a_jobs_attempts_carry_the_integration_that_runs_it(
    make_sandbox: MakeSandbox, tmp_path: Path
) -> None:
    sandbox = await make_sandbox()
    cfg = parse(config(sandbox.url, tmp_path), {"TOKEN": TOKEN, "SECRET": SECRET, "JOBS_KEY": KEY})
    stream = io.StringIO()
    service = ProxyService(cfg, Logs("info", "json", [SECRET, KEY], stream))
    await service.start()
    records: dict[str, list[AccessRecord]] = {name: [] for name in NAMES}
    try:
        for name in NAMES:
            jobs = service.integrations[name].jobs
            assert jobs is not None
            run = jobs.attempts.run

            async def recording(*args: Any, _run: Any = run, _name: str = name) -> Any:
                records[_name].append(args[3])  # the attempt's access record
                return await _run(*args)

            jobs.attempts.run = recording  # type: ignore[method-assign]
        ids = {}
        async with aiohttp.ClientSession() as http:
            for name in NAMES:
                path = f"/perl/api/v2/user/{USER}/profile?from={name}"
                # The first attempt is refused: the job's attempts log a `retry`.
                sandbox.sandbox.add_fault(status=503, times=1, path_prefix="/perl/api/v2/user/")
                base = f"http://127.0.0.1:{service.integrations[name].port}"
                status, _, body = await submit(http, base, "GET", path)
                assert status == 202, body
                ids[name] = body["id"]
                done = await until_done(http, base, body["id"])
                assert done["state"] == "succeeded" and done["attempts"] == 2
    finally:
        await service.stop()
    assert {name: [r.integration for r in rs] for name, rs in records.items()} == {
        "mail": ["mail"],
        "bulk": ["bulk"],
    }
    assert all(r.attempts == 2 for rs in records.values() for r in rs)
    events = [json.loads(line) for line in stream.getvalue().splitlines() if line]
    for name in NAMES:
        (request_id,) = {r.request_id for r in records[name]}
        retries = [e for e in events if e["event"] == "retry" and e["request_id"] == request_id]
        finished = [e for e in events if e.get("job_id") == ids[name]]
        assert retries and {e.get("integration") for e in retries} == {name}
        assert finished and {e.get("integration") for e in finished} == {name}


async def test_integrations_keep_their_jobs_apart_on_one_redis_server(
    make_sandbox: MakeSandbox, tmp_path: Path
) -> None:
    # The Redis store names its keys after each integration: one server (a Cluster has no
    # other database to give each) holds both integrations' jobs, each seeing its own.
    sandbox = await make_sandbox()
    redis = durable_redis(tmp_path / "redis")
    try:
        text = config(sandbox.url, tmp_path, store=redis.url)
        cfg = parse(text, {"TOKEN": TOKEN, "SECRET": SECRET, "JOBS_KEY": KEY})
        service = ProxyService(cfg, Logs("info", "json", [SECRET, KEY], io.StringIO()))
        await service.start()
        try:
            bases = {name: f"http://127.0.0.1:{service.integrations[name].port}" for name in NAMES}
            ids = {}
            async with aiohttp.ClientSession() as http:
                for name in NAMES:
                    path = f"/perl/api/v2/user/{USER}/profile?from={name}"
                    status, _, body = await submit(http, bases[name], "GET", path)
                    assert status == 202, body
                    ids[name] = body["id"]
                    done = await until_done(http, bases[name], body["id"])
                    assert done["state"] == "succeeded"
                # Each integration finds its own job and not the other's.
                mail, bulk = NAMES
                for name, other in ((mail, bulk), (bulk, mail)):
                    own = f"{bases[name]}/_proxy/jobs/{ids[name]}"
                    theirs = f"{bases[name]}/_proxy/jobs/{ids[other]}"
                    async with http.get(own) as resp:
                        assert resp.status == 200
                    async with http.get(theirs) as resp:
                        assert resp.status == 404
        finally:
            await service.stop()
    finally:
        redis.stop()
