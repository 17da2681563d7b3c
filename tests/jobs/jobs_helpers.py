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
