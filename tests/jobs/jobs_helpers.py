"""Helpers shared by the durable-jobs tests (in-process and process-level)."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from pathlib import Path
from typing import Any

import aiohttp

from proxy.config import Secret
from tests.redis_server import INSTALL_HINT, RedisServer, redis_server_binary

PREFIX = "/_proxy/jobs"
ASYNC = {"Prefer": "respond-async"}
KEY = base64.b64encode(os.urandom(32)).decode()
TERMINAL = {"succeeded", "failed", "expired", "cancelled", "outcome_unknown"}


def jobs_section(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "keys": (Secret(KEY),),
        "store": str(tmp_path / "jobs.db"),
        **overrides,
    }


async def submit(
    http: aiohttp.ClientSession,
    base: str,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, Any]:
    """(status, headers, JSON body) of a submission."""
    async with http.request(
        method, base + path, json=body, headers={**ASYNC, **(headers or {})}
    ) as resp:
        return resp.status, resp.headers, await resp.json(content_type=None)


async def job(
    http: aiohttp.ClientSession, base: str, job_id: str, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    async with http.get(f"{base}{PREFIX}/{job_id}", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data


async def until_done(
    http: aiohttp.ClientSession,
    base: str,
    job_id: str,
    within: float = 15.0,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        data = await job(http, base, job_id, headers)
        if data["state"] in TERMINAL:
            return data
        assert time.monotonic() < deadline, f"job {job_id} still {data['state']}: {data}"
        await asyncio.sleep(0.05)


def store_bytes(db: Path) -> bytes:
    """Everything SQLite keeps of the store on disk: the file, its WAL and shared memory."""
    found = b""
    for suffix in ("", "-wal", "-shm", "-journal"):
        path = Path(f"{db}{suffix}")
        if path.exists():
            found += path.read_bytes()
    return found


def durable_redis(data_dir: Path) -> RedisServer:
    """A redis-server as the jobs store needs it: AOF, fsynced before every reply, its
    files in `data_dir`. Started; the caller stops it."""
    if redis_server_binary() is None:
        raise AssertionError(INSTALL_HINT)
    data_dir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(
        extra_args=["--appendonly", "yes", "--appendfsync", "always", "--dir", str(data_dir)]
    )
    server.start()
    return server


def redis_files(data_dir: Path) -> bytes:
    """Everything Redis keeps on disk in `data_dir` (the AOF, and any RDB)."""
    return b"".join(p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file())
