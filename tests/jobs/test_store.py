"""The SQLite store on its own: group commit, limits, idempotency, recovery, purging."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from proxy.jobs.errors import StoreError
from proxy.jobs.model import State
from proxy.jobs.store import NewJob, SqliteStore


def new(
    i: int, method: str = "POST", idem: str | None = None, at: float | None = None, size: int = 64
) -> NewJob:
    now = time.time() if at is None else at
    return NewJob(f"{i:032x}", "", idem, method, "account", now, now + 60, os.urandom(size), None)


async def test_concurrent_submissions_share_commits(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "jobs.db", max_jobs=10_000)
    await store.open()
    try:
        results = await asyncio.gather(*(store.submit(new(i)) for i in range(500)))
        assert all(r.created for r in results)
        # Each commit is an fsync; 500 submissions arriving together need only a few.
        assert store.committed_ops == 500
        assert store.commits < 50
        stats = await store.stats()
        assert stats.by_state["queued"] == 500
    finally:
        await store.close()


async def test_the_store_refuses_past_max_jobs_and_after_a_purge_takes_again(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "jobs.db", max_jobs=3)
    await store.open()
    try:
        for i in range(3):
            assert (await store.submit(new(i))).created
        assert (await store.submit(new(9))).full
        now = time.time()
        assert await store.finish(f"{0:032x}", State.SUCCEEDED, now - 10)
        assert await store.purge(now - 5) == 1
        assert (await store.submit(new(10))).created
    finally:
        await store.close()


async def test_one_key_one_job(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "jobs.db", max_jobs=100)
    await store.open()
    try:
        first, second = await asyncio.gather(
            store.submit(new(1, idem="k")), store.submit(new(2, idem="k"))
        )
        assert first.created and not second.created
        assert second.job is not None and second.job.id == f"{1:032x}"
        assert second.job.request is not None  # for the caller to compare
    finally:
        await store.close()


async def test_recovery_requeues_idempotent_and_settles_the_rest(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "jobs.db", max_jobs=100)
    await store.open()
    try:
        for i, method in enumerate(("POST", "GET", "PATCH", "PUT")):
            await store.submit(new(i, method))
            assert await store.mark_running(f"{i:032x}", time.time())
        await store.submit(new(7, "POST"))  # queued, never sent
        requeued, unknown = await store.recover(time.time())
        assert requeued == 2
        assert sorted(unknown) == [f"{0:032x}", f"{2:032x}"]
        states = {j.id: j.state for j in await store.list()}
        assert states[f"{1:032x}"] is State.QUEUED and states[f"{3:032x}"] is State.QUEUED
        assert states[f"{7:032x}"] is State.QUEUED
    finally:
        await store.close()


async def test_a_cancelled_job_cannot_be_marked_running(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "jobs.db", max_jobs=100)
    await store.open()
    try:
        await store.submit(new(1))
        job = await store.cancel(f"{1:032x}", time.time())
        assert job is not None and job.state is State.CANCELLED
        assert not await store.mark_running(f"{1:032x}", time.time())
    finally:
        await store.close()


async def test_purging_goes_in_slices_and_gets_everything(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "jobs.db", max_jobs=10_000)
    await store.open()
    try:
        old = time.time() - 100
        await asyncio.gather(*(store.submit(new(i, at=old)) for i in range(2500)))
        await asyncio.gather(
            *(store.finish(f"{i:032x}", State.SUCCEEDED, old) for i in range(2500))
        )
        commits = store.commits
        assert await store.purge(time.time()) == 2500
        assert store.commits - commits == 3  # 1000 + 1000 + 500
        assert sum((await store.stats()).by_state.values()) == 0
    finally:
        await store.close()


async def test_a_full_disk_fails_the_whole_batch_and_keeps_nothing(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "jobs.db", max_jobs=10_000)
    await store.open()
    try:
        # SQLite keeps the pages it has (max_page_count never goes below the file's size):
        # jobs that need new pages fail as on a full disk.
        await store.limit_pages(1)
        results = await asyncio.gather(
            *(store.submit(new(i, size=50_000)) for i in range(20)), return_exceptions=True
        )
        assert all(isinstance(r, StoreError) for r in results)
        assert "full" in str(results[0])
        await store.limit_pages(1_000_000)
        assert sum((await store.stats()).by_state.values()) == 0
        assert (await store.submit(new(99))).created  # and it heals
    finally:
        await store.close()


async def test_the_file_is_owner_only_and_one_process_owns_it(tmp_path: Path) -> None:
    path = tmp_path / "state" / "jobs.db"
    store = SqliteStore(path, max_jobs=10)
    await store.open()
    try:
        assert path.stat().st_mode & 0o077 == 0
        assert path.parent.stat().st_mode & 0o077 == 0
        other = SqliteStore(path, max_jobs=10)
        with pytest.raises(StoreError, match="in use by another proxy process"):
            await other.open()
        reader = SqliteStore(path, max_jobs=10, lock=False)  # the operator's CLI
        await reader.open()
        await reader.close()
    finally:
        await store.close()
