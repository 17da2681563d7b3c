"""The job stores on their own: the contract both keep (SQLite and Redis, one test run
against each), then what is SQLite's own (group commit, the file, recovery at start)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from jobs_helpers import durable_redis

from proxy.jobs.errors import StoreError
from proxy.jobs.model import State
from proxy.jobs.redis_store import RedisStore
from proxy.jobs.store import JobStore, NewJob, SqliteStore
from tests.redis_server import RedisServer

MakeStore = Callable[..., Awaitable[JobStore]]


def new(
    i: int,
    method: str = "POST",
    idem: str | None = None,
    at: float | None = None,
    size: int = 64,
    callback: bytes | None = None,
    max_age: float = 60,
) -> NewJob:
    now = time.time() if at is None else at
    return NewJob(
        f"{i:032x}", "", idem, method, "account", now, now + max_age, os.urandom(size), callback
    )


def jid(i: int) -> str:
    return f"{i:032x}"


@pytest.fixture(params=["sqlite", "redis"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeStore]:
    """Opened stores of one kind, closed (and their Redis stopped) after the test."""
    server: RedisServer | None = None
    made: list[JobStore] = []

    async def make(max_jobs: int = 100) -> JobStore:
        nonlocal server
        store: JobStore
        if request.param == "sqlite":
            store = SqliteStore(tmp_path / "jobs.db", max_jobs=max_jobs, lock=not made)
        else:
            if server is None:
                server = durable_redis(tmp_path / "redis")
            store = RedisStore(server.url, "test", max_jobs, visibility_timeout=30)
        await store.open()
        made.append(store)
        return store

    try:
        yield make
    finally:
        for store in made:
            await store.close()
        if server is not None:
            server.stop()


async def test_a_job_runs_through_and_its_answer_is_kept(make_store: MakeStore) -> None:
    store = await make_store()
    assert (await store.submit(new(1, "GET", callback=b"sealed-url"))).created
    due = await store.due(time.time(), 10)
    assert [j.id for j in due] == [jid(1)]
    assert due[0].request is not None and due[0].callback == b"sealed-url"
    assert await store.mark_running(jid(1), time.time())
    running = await store.get(jid(1))
    assert running is not None and running.state is State.RUNNING and running.attempts == 1
    assert await store.finish(jid(1), State.SUCCEEDED, time.time(), status=200, response=b"r")
    assert not await store.finish(jid(1), State.FAILED, time.time())  # settled once only
    done = await store.get(jid(1), blobs=True)
    assert done is not None and done.state is State.SUCCEEDED
    assert done.response_status == 200 and done.response == b"r"
    assert done.finished_at is not None
    stats = await store.stats()
    assert stats.by_state["succeeded"] == 1 and stats.by_state["queued"] == 0
    assert stats.oldest_queued is None
    # Its callback is due now, once delivered no longer.
    [(job, deliveries)] = await store.callbacks_due(time.time(), 10)
    assert job.id == jid(1) and deliveries == 0 and job.callback == b"sealed-url"
    await store.callback_result(jid(1), "delivered", 1, time.time())
    assert await store.callbacks_due(time.time() + 3600, 10) == []
    assert await store.due(time.time(), 10) == []


async def test_a_requeued_job_comes_back_when_due_and_not_before(make_store: MakeStore) -> None:
    store = await make_store()
    await store.submit(new(1, "GET"))
    [job] = await store.due(time.time(), 10)
    assert await store.mark_running(job.id, time.time())
    at = time.time() + 30
    assert await store.requeue(job.id, at, "the API answered 503")
    queued = await store.get(job.id)
    assert queued is not None and queued.state is State.QUEUED
    assert queued.last_error == "the API answered 503"
    assert await store.due(time.time(), 10) == []
    assert await store.next_due() == pytest.approx(at)
    [again] = await store.due(at + 0.01, 10)
    assert again.id == job.id and again.attempts == 1


async def test_queued_jobs_expire_and_running_ones_do_not(make_store: MakeStore) -> None:
    store = await make_store()
    old = time.time() - 100
    await store.submit(new(1, "GET", at=old, max_age=10))
    await store.submit(new(2, "GET", at=old, max_age=10))
    await store.submit(new(3, "GET"))
    [first, *_] = await store.due(time.time(), 1)
    assert await store.mark_running(first.id, time.time())
    assert await store.expire(time.time()) == 1
    states = {j.id: j.state for j in await store.list()}
    assert states == {jid(1): State.RUNNING, jid(2): State.EXPIRED, jid(3): State.QUEUED}
    # Expired before it was taken: it never runs.
    assert [j.id for j in await store.due(time.time(), 10)] == [jid(3)]


async def test_an_operator_retry_puts_an_unknown_job_back_in_line(make_store: MakeStore) -> None:
    store = await make_store()
    await store.submit(new(1, "POST"))
    [job] = await store.due(time.time(), 10)
    assert await store.mark_running(job.id, time.time())
    assert await store.finish(job.id, State.OUTCOME_UNKNOWN, time.time(), error="lost")
    assert await store.retry(jid(9), time.time(), 60) is None
    again = await store.retry(job.id, time.time(), 60)
    assert again is not None and again.state is State.QUEUED and again.finished_at is None
    assert [j.id for j in await store.due(time.time(), 10)] == [job.id]
    queued = await store.list(State.QUEUED)
    assert [j.id for j in queued] == [job.id]


async def test_lists_are_newest_first_and_by_state(make_store: MakeStore) -> None:
    store = await make_store()
    for i in range(5):
        await store.submit(new(i, at=time.time() + i * 0.001))
    await store.cancel(jid(2), time.time())
    assert [j.id for j in await store.list(limit=3)] == [jid(4), jid(3), jid(2)]
    assert [j.id for j in await store.list(State.CANCELLED)] == [jid(2)]
    stats = await store.stats()
    assert stats.by_state["queued"] == 4 and stats.by_state["cancelled"] == 1
    assert stats.oldest_queued is not None


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
    make_store: MakeStore,
) -> None:
    store = await make_store(max_jobs=3)
    for i in range(3):
        assert (await store.submit(new(i))).created
    assert (await store.submit(new(9))).full
    now = time.time()
    assert await store.finish(f"{0:032x}", State.SUCCEEDED, now - 10)
    assert await store.purge(now - 5) == 1
    assert (await store.submit(new(10))).created


async def test_one_key_one_job(make_store: MakeStore) -> None:
    store = await make_store()
    first, second = await asyncio.gather(
        store.submit(new(1, idem="k")), store.submit(new(2, idem="k"))
    )
    assert first.created and not second.created
    assert second.job is not None and second.job.id == f"{1:032x}"
    assert second.job.request is not None  # for the caller to compare
    # Purged, the key is free again.
    assert await store.finish(jid(1), State.SUCCEEDED, time.time() - 10)
    assert await store.purge(time.time()) == 1
    assert (await store.submit(new(3, idem="k"))).created


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


async def test_a_cancelled_job_cannot_be_marked_running(make_store: MakeStore) -> None:
    store = await make_store()
    await store.submit(new(1))
    taken = await store.due(time.time(), 10)  # in a worker's hands, waiting for a permit
    assert [j.id for j in taken] == [jid(1)]
    # The operator's CLI, beside the running proxy.
    operator = await make_store()
    job = await operator.cancel(f"{1:032x}", time.time())
    assert job is not None and job.state is State.CANCELLED
    assert not await store.mark_running(f"{1:032x}", time.time())
    assert await operator.cancel(jid(7), time.time()) is None


async def test_purging_goes_in_slices_and_gets_everything(make_store: MakeStore) -> None:
    store = await make_store(max_jobs=10_000)
    old = time.time() - 100
    await asyncio.gather(*(store.submit(new(i, at=old)) for i in range(2500)))
    await asyncio.gather(*(store.finish(f"{i:032x}", State.SUCCEEDED, old) for i in range(2500)))
    commits = store.commits if isinstance(store, SqliteStore) else 0
    assert await store.purge(time.time()) == 2500
    if isinstance(store, SqliteStore):
        assert store.commits - commits == 3  # 1000 + 1000 + 500
    assert sum((await store.stats()).by_state.values()) == 0
    assert await store.list() == []


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
