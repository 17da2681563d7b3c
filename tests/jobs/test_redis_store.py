"""What is the Redis store's own: replicas taking over a dead one's jobs after the
visibility timeout, heartbeats, one hash tag, corrupt records, Redis dying."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio
from jobs_helpers import durable_redis
from structlog.testing import capture_logs
from test_store import jid, new

from proxy.jobs.errors import StoreError
from proxy.jobs.model import State
from proxy.jobs.redis_store import MAX_CALLS, RECLAIM_SLICE, RedisStore
from tests.redis_server import RedisServer, cluster_node, create_cluster

NAME = "test"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    started = durable_redis(tmp_path / "redis")
    yield started
    started.stop()


@pytest.fixture
async def raw(server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(server.url)
    yield client
    await client.aclose()


async def opened(server: RedisServer, visibility: float = 30.0, runner: bool = True) -> RedisStore:
    store = RedisStore(server.url, NAME, 1000, visibility_timeout=visibility, runner=runner)
    await store.open()
    return store


async def reclaimed(store: RedisStore, within: float = 20.0) -> tuple[int, list[str]]:
    """Ask until the visibility timeout has passed and something is taken over."""
    deadline = time.monotonic() + within
    while True:
        requeued, unknown = await store.reclaim(time.time())
        if requeued or unknown:
            return requeued, unknown
        assert time.monotonic() < deadline, "nothing was reclaimed"
        await asyncio.sleep(0.05)


async def test_a_dead_replicas_jobs_are_taken_over_by_the_idempotency_rule(
    server: RedisServer,
) -> None:
    # The replica that dies: no heartbeat (it is as good as killed), never acknowledges.
    dead = await opened(server, runner=False)
    other = await opened(server, visibility=0.5)
    try:
        await dead.submit(new(1, "POST"))
        await dead.submit(new(2, "GET"))
        await dead.submit(new(3, "POST"))  # taken, not sent yet
        taken = await dead.due(time.time(), 10)
        assert [j.id for j in taken] == [jid(1), jid(2), jid(3)]
        assert await dead.mark_running(jid(1), time.time())
        assert await dead.mark_running(jid(2), time.time())
        # The others see nothing to run meanwhile: every entry is the dead one's.
        assert await other.due(time.time(), 10) == []

        requeued, unknown = await reclaimed(other)
        assert requeued == 1 and unknown == [jid(1)]
        post = await other.get(jid(1))
        assert post is not None and post.state is State.OUTCOME_UNKNOWN
        assert post.attempts == 1 and "not sent again" in (post.last_error or "")
        # The GET (sent, idempotent) and the POST never sent go back in line.
        again = await other.due(time.time(), 10)
        assert sorted(j.id for j in again) == [jid(2), jid(3)]
        assert await other.mark_running(jid(3), time.time())
        # Were the first replica not dead after all, it can no longer act on them.
        assert not await dead.mark_running(jid(2), time.time())
        assert not await dead.finish(jid(1), State.SUCCEEDED, time.time(), status=200)
        assert not await dead.finish(jid(3), State.SUCCEEDED, time.time(), status=200)
        assert await other.finish(jid(3), State.SUCCEEDED, time.time(), status=200)
        # With nothing pending left, the dead replica's name leaves the group.
        deadline = time.monotonic() + 20
        while dead.consumer in await consumers(other):
            assert time.monotonic() < deadline, "the dead consumer stayed"
            await other.reclaim(time.time())
            await asyncio.sleep(0.05)
        assert other.consumer in await consumers(other)
    finally:
        await dead.close()
        await other.close()


async def test_an_idle_entry_behind_more_fresh_ones_than_one_scan_looks_at_is_found(
    server: RedisServer, raw: redis.asyncio.Redis
) -> None:
    # XAUTOCLAIM looks at ten times COUNT pending entries per call: an idle one behind more
    # fresh ones than that is found only by following the cursor it returns.
    fresh = RECLAIM_SLICE * 10 + 50
    dead = RedisStore(server.url, NAME, 2 * fresh, runner=False)
    await dead.open()
    other = await opened(server, visibility=0.5)
    try:
        await asyncio.gather(*(dead.submit(new(i, "GET")) for i in range(fresh)))
        await dead.submit(new(fresh, "POST"))
        taken: list[str] = []
        while len(taken) < fresh + 1:
            got = await dead.due(time.time(), fresh + 1 - len(taken))
            assert got, "jobs went missing"
            taken += [j.id for j in got]
        assert await dead.mark_running(jid(fresh), time.time())
        stream, group = f"{{luxsci-proxy:jobs:{NAME}}}:stream", "runners"
        pending = await raw.xpending_range(stream, group, "-", "+", fresh + 1)
        last = pending[-1]["message_id"]
        # Wait until the last entry is idle past the timeout, then keep every other fresh.
        while True:
            (entry,) = await raw.xpending_range(stream, group, last, last, 1)
            if entry["time_since_delivered"] >= 600:
                break
            await asyncio.sleep(0.05)
        await raw.xclaim(
            stream, group, dead.consumer, 0, [p["message_id"] for p in pending[:-1]], justid=True
        )
        requeued, unknown = await other.reclaim(time.time())
        assert (requeued, unknown) == (0, [jid(fresh)])
    finally:
        await dead.close()
        await other.close()


async def consumers(store: RedisStore) -> set[str]:
    client = redis.asyncio.Redis.from_url(store.url)
    try:
        found = await client.xinfo_consumers(f"{{luxsci-proxy:jobs:{NAME}}}:stream", "runners")
        return {c["name"].decode() for c in found}
    finally:
        await client.aclose()


async def test_a_live_replica_keeps_a_long_attempt_past_the_visibility_timeout(
    server: RedisServer,
) -> None:
    visibility = 0.4
    busy = await opened(server, visibility=visibility)
    other = await opened(server, visibility=visibility)
    try:
        await busy.submit(new(1, "POST"))
        [job] = await busy.due(time.time(), 10)
        assert await busy.mark_running(job.id, time.time())
        # The attempt lasts five visibility timeouts; the heartbeat keeps it.
        until = time.monotonic() + 5 * visibility
        while time.monotonic() < until:
            assert await other.reclaim(time.time()) == (0, [])
            await asyncio.sleep(visibility / 4)
        assert await busy.finish(job.id, State.SUCCEEDED, time.time(), status=200)
        done = await other.get(job.id)
        assert done is not None and done.state is State.SUCCEEDED
    finally:
        await busy.close()
        await other.close()


async def test_a_stopping_replica_hands_its_unsent_jobs_back_at_once(server: RedisServer) -> None:
    leaving = await opened(server)
    other = await opened(server)
    try:
        await leaving.submit(new(1, "POST"))
        await leaving.submit(new(2, "POST"))
        assert len(await leaving.due(time.time(), 10)) == 2
        assert await leaving.mark_running(jid(1), time.time())  # cut off mid-attempt
        await leaving.close()
        # Not after the visibility timeout (30 s here): now.
        assert [j.id for j in await other.due(time.time(), 10)] == [jid(2)]
        running = await other.get(jid(1))
        assert running is not None and running.state is State.RUNNING
    finally:
        await leaving.close()
        await other.close()


async def test_every_key_carries_the_one_hash_tag(
    server: RedisServer, raw: redis.asyncio.Redis
) -> None:
    store = await opened(server)
    try:
        await store.submit(new(1, "GET", idem="k", callback=b"c"))
        await store.submit(new(2, "GET"))
        await store.due(time.time(), 1)
        await store.requeue(jid(1), time.time() + 60, "later")
        await store.cancel(jid(2), time.time())
        keys = [k.decode() for k in await raw.keys("*")]
        assert len(keys) >= 8
        assert all(k.startswith("{luxsci-proxy:jobs:test}:") for k in keys), keys
    finally:
        await store.close()


async def test_a_corrupt_record_is_reported_by_id_and_skipped(
    server: RedisServer, raw: redis.asyncio.Redis
) -> None:
    store = await opened(server)
    try:
        await store.submit(new(1, "GET"))
        await store.submit(new(2, "GET"))
        await raw.hset(f"{{luxsci-proxy:jobs:{NAME}}}:job:{jid(1)}", "created_at", "garbage")
        with capture_logs() as logs:
            due = await store.due(time.time(), 10)
            listed = await store.list()
            got = await store.get(jid(1))
        assert [j.id for j in due] == [jid(2)]
        assert [j.id for j in listed] == [jid(2)]
        assert got is None
        bad = [e for e in logs if e["event"] == "job_record_unreadable"]
        assert bad and all(e["job_id"] == jid(1) for e in bad)
        # Its transitions still run: an operator can cancel it, and it can be purged.
        await store.cancel(jid(1), time.time() - 10)
        assert await store.purge(time.time()) == 1
        assert await raw.exists(f"{{luxsci-proxy:jobs:{NAME}}}:job:{jid(1)}") == 0
    finally:
        await store.close()


async def test_acknowledged_jobs_survive_kill_9_of_redis(tmp_path: Path) -> None:
    data = tmp_path / "redis"
    server = durable_redis(data)
    store = await opened(server)
    try:
        results = await asyncio.gather(*(store.submit(new(i, "POST")) for i in range(200)))
        assert all(r.created for r in results)
        server.kill()
        with pytest.raises(StoreError):
            await store.submit(new(999))
    finally:
        await store.close()
        server.stop()
    again = RedisServer(port=server.port, extra_args=server.extra_args)
    again.start()
    store = await opened(again)
    try:
        stats = await store.stats()
        assert stats.by_state["queued"] == 200
        assert await store.get(jid(999)) is None
        assert len(await store.due(time.time(), 500)) == 200
    finally:
        await store.close()
        again.stop()


async def test_redis_down_is_a_store_error_naming_no_password(tmp_path: Path) -> None:
    server = durable_redis(tmp_path / "redis")
    port = server.port
    server.stop()
    store = RedisStore(f"redis://:s3cret-pw@127.0.0.1:{port}/0", NAME, 10)
    with pytest.raises(StoreError) as info:
        await store.open()
    assert "s3cret-pw" not in str(info.value)
    assert "jobs store redis://:***@127.0.0.1" in str(info.value)
    with pytest.raises(StoreError):
        await store.submit(new(1))
    await store.close()


async def test_a_key_naming_an_unreadable_job_is_a_store_error_not_a_second_job(
    server: RedisServer, raw: redis.asyncio.Redis
) -> None:
    store = await opened(server)
    try:
        await store.submit(new(1, "POST", idem="k"))
        await raw.hset(f"{{luxsci-proxy:jobs:{NAME}}}:job:{jid(1)}", "state", "nonsense")
        with capture_logs() as logs, pytest.raises(StoreError, match="unreadable"):
            await store.submit(new(2, "POST", idem="k"))
        assert any(e.get("job_id") == jid(1) for e in logs)
        assert await store.get(jid(2)) is None
    finally:
        await store.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[RedisServer]]:
    nodes = [cluster_node(str(tmp_path)) for _ in range(3)]
    try:
        for node in nodes:
            node.start()
        create_cluster(nodes)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


async def test_the_store_runs_on_a_redis_cluster_every_script_in_one_slot(
    cluster: list[RedisServer],
) -> None:
    url = f"redis+cluster://127.0.0.1:{cluster[0].port},127.0.0.1:{cluster[1].port}"
    dead = RedisStore(url, NAME, 100, runner=False)
    other = RedisStore(url, NAME, 100, visibility_timeout=0.5)
    await dead.open()
    await other.open()
    try:
        assert (await dead.submit(new(1, "POST", idem="k", callback=b"c"))).created
        assert not (await dead.submit(new(2, "POST", idem="k"))).created
        await dead.submit(new(3, "GET"))
        taken = await dead.due(time.time(), 10)
        assert [j.id for j in taken] == [jid(1), jid(3)]
        assert await dead.mark_running(jid(1), time.time())
        assert await dead.mark_running(jid(3), time.time())
        # No CROSSSLOT anywhere: the take-over, the settling, the counts, the lists.
        assert await reclaimed(other) == (1, [jid(1)])
        [again] = await other.due(time.time(), 10)
        assert again.id == jid(3) and await other.mark_running(jid(3), time.time())
        assert await other.requeue(jid(3), time.time() + 60, "later")
        assert await other.expire(time.time()) == 0
        assert len(await other.callbacks_due(time.time(), 10)) == 1
        stats = await other.stats()
        assert stats.by_state["outcome_unknown"] == 1 and stats.by_state["queued"] == 1
        assert {j.id for j in await other.list()} == {jid(1), jid(3)}
        assert await other.purge(time.time() + 1) == 1
    finally:
        await dead.close()
        await other.close()


async def test_a_job_whose_end_cannot_be_recorded_is_let_go_for_the_take_over(
    server: RedisServer,
) -> None:
    """Redis gone as a job ends (a failover): the replica stops keeping the job fresh, so
    the others take it over after the visibility timeout instead of never."""
    store = await opened(server, visibility=0.5)
    try:
        await store.submit(new(1, "POST"))
        await store.submit(new(2, "GET"))
        assert [j.id for j in await store.due(time.time(), 10)] == [jid(1), jid(2)]
        assert await store.mark_running(jid(1), time.time())
        server.stop()
        with pytest.raises(StoreError):
            await store.finish(jid(1), State.SUCCEEDED, time.time(), status=200)
        with pytest.raises(StoreError):
            await store.mark_running(jid(2), time.time())
        assert store.held() == {}
    finally:
        await store.close()
    back = RedisServer(port=server.port, extra_args=server.extra_args)
    back.start()
    other = await opened(back, visibility=0.5)
    try:
        requeued, unknown = await reclaimed(other)
        # The POST sent, its end unknown: not sent again. The GET never went out (it was
        # still queued): back in line, not counted as re-queued from running.
        assert unknown == [jid(1)] and requeued == 0
        again = await other.due(time.time(), 10)
        assert [j.id for j in again] == [jid(2)]
    finally:
        await other.close()
        back.stop()


async def test_min_replicas_refuses_a_submission_no_replica_confirms(
    server: RedisServer, tmp_path: Path
) -> None:
    lonely = RedisStore(server.url, NAME, 1000, min_replicas=1, replica_timeout=0.1)
    await lonely.open()
    try:
        with pytest.raises(StoreError, match="0 of 1 replicas confirmed"):
            await lonely.submit(new(1, "POST", idem="k1"))
        # Answered 503, so withdrawn: no job runs beside the client's retry, and the key
        # is free for it.
        assert await lonely.get(jid(1)) is None
        assert await lonely.list() == []
        assert (await lonely.stats()).by_state.get("queued", 0) == 0
        replica = durable_redis(tmp_path / "replica")
        try:
            rc = redis.asyncio.Redis(port=replica.port)
            try:
                await rc.replicaof("127.0.0.1", server.port)
                deadline = time.monotonic() + 20
                while (await rc.info("replication")).get("master_link_status") != "up":
                    assert time.monotonic() < deadline, "the replica never synced"
                    await asyncio.sleep(0.05)
            finally:
                await rc.aclose()
            submitted = await lonely.submit(new(2, "POST", idem="k1"))
            assert submitted.created and submitted.job is not None
            assert [j.id for j in await lonely.due(time.time(), 10)] == [jid(2)]
            assert await lonely.mark_running(jid(2), time.time())
        finally:
            replica.stop()
    finally:
        await lonely.close()


async def test_a_job_taken_over_while_in_this_replicas_hands_is_not_handed_to_it_twice(
    server: RedisServer, raw: redis.asyncio.Redis
) -> None:
    """The heartbeat lost past the visibility timeout (Redis away that long) while a job
    waits in this replica's queue: the take-over puts it back in line, and this replica may
    read it again. The runner passes the jobs in its hands as `skip`; returning one of them
    again made two workers send it (both marks pass: the holder is this replica)."""
    # No heartbeat: as if every one had failed while Redis was away.
    store = await opened(server, visibility=0.3, runner=False)
    try:
        await store.submit(new(1, "POST"))
        [job] = await store.due(time.time(), 10)
        key = f"{{luxsci-proxy:jobs:{NAME}}}:job:{job.id}"
        first = await raw.hget(key, "entry")
        deadline = time.monotonic() + 20
        while await raw.hget(key, "entry") == first:
            assert time.monotonic() < deadline, "the job was never taken over"
            await store.reclaim(time.time())
            await asyncio.sleep(0.05)
        # Back in line, and this replica reads it again while its first copy is still in
        # hand: not handed out a second time, but put back in line, so the first copy's
        # mark fails (nothing is sent by it).
        assert await store.due(time.time(), 10, skip=(job.id,)) == []
        assert not await store.mark_running(job.id, time.time())
        # Out of the runner's hands, it is taken once and sent once.
        [again] = await store.due(time.time(), 10, skip=())
        assert again.id == job.id and store.held() == {job.id: await raw.hget(key, "entry")}
        assert await store.mark_running(job.id, time.time())
    finally:
        await store.close()


async def test_a_running_mark_no_replica_confirms_puts_the_unsent_job_back_in_line(
    server: RedisServer,
) -> None:
    """With jobs.redis_min_replicas, a mark the replicas do not confirm stops the send,
    but the master has the job `running`: left so, the take-over ended a POST that never
    went out `outcome_unknown` (an operator's `jobs retry` to get it sent at all)."""
    plain = await opened(server, visibility=0.3)
    lonely = RedisStore(
        server.url, NAME, 1000, visibility_timeout=0.3, min_replicas=1, replica_timeout=0.1
    )
    await lonely.open()
    try:
        await plain.submit(new(1, "POST"))
        [job] = await lonely.due(time.time(), 10)
        with pytest.raises(StoreError, match="0 of 1 replicas confirmed"):
            await lonely.mark_running(job.id, time.time())
        assert lonely.held() == {}
        after = await plain.get(job.id)
        assert after is not None and after.state is State.QUEUED and after.attempts == 0
        # Back in line at once for any replica, not after the visibility timeout.
        assert [j.id for j in await plain.due(time.time(), 10)] == [job.id]
        assert await plain.mark_running(job.id, time.time())
    finally:
        await lonely.close()
        await plain.close()


async def test_a_replica_timeout_longer_than_a_calls_timeout_is_waited_for_whole(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """jobs.redis_replica_timeout past the store's per-call socket timeout: the socket gave
    up first, so WAIT was cut short (the key silently capped) and the shortfall came back
    as a lost connection instead of as not confirmed."""
    # The call timeout made short, so the test need not wait the real one out.
    monkeypatch.setattr("proxy.jobs.redis_store.OP_TIMEOUT", 0.2)
    lonely = RedisStore(server.url, NAME, 1000, min_replicas=1, replica_timeout=0.6)
    await lonely.open()
    try:
        with pytest.raises(StoreError, match=r"0 of 1 replicas confirmed the write within 0\.6 s"):
            await lonely.submit(new(1, "POST"))
    finally:
        await lonely.close()


async def test_the_heartbeat_does_not_wait_behind_a_burst_of_slow_calls(
    server: RedisServer, tmp_path: Path
) -> None:
    """The heartbeat queued for the store's call slots behind every submission: with the
    replicas lagging (each call then takes jobs.redis_replica_timeout), a burst of
    submissions held it back past the visibility timeout, and another replica took over
    a job this live one was sending (a POST ended `outcome_unknown`, a GET sent twice)."""
    visibility = 1.5
    busy = RedisStore(
        server.url, NAME, 1000, visibility_timeout=visibility, min_replicas=1, replica_timeout=1.0
    )
    await busy.open()
    other = await opened(server, visibility=visibility)
    replica = durable_redis(tmp_path / "replica")
    master = redis.asyncio.Redis(port=server.port)
    rc = redis.asyncio.Redis(port=replica.port)
    try:
        await rc.replicaof("127.0.0.1", server.port)
        deadline = time.monotonic() + 20
        while (await rc.info("replication")).get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica never synced"
            await asyncio.sleep(0.05)
        await busy.submit(new(1, "POST"))
        [job] = await busy.due(time.time(), 10)
        assert await busy.mark_running(job.id, time.time())
        # The replica gone: from now on every replicated call waits the replica timeout.
        await rc.replicaof("NO", "ONE")
        while (await master.info("replication")).get("connected_slaves") != 0:
            assert time.monotonic() < deadline, "the master still counts the replica"
            await asyncio.sleep(0.05)
        # Five rounds of every call slot, one replica timeout each: past three visibility
        # timeouts in all.
        burst = [
            asyncio.ensure_future(busy.submit(new(100 + i, "POST"))) for i in range(5 * MAX_CALLS)
        ]
        while not all(f.done() for f in burst):
            assert await other.reclaim(time.time()) == (0, [])
            await asyncio.sleep(0.1)
        results = await asyncio.gather(*burst, return_exceptions=True)
        assert all(isinstance(r, StoreError) for r in results)
        still = await other.get(job.id)
        assert still is not None and still.state is State.RUNNING
        assert await busy.finish(job.id, State.SUCCEEDED, time.time(), status=200)
    finally:
        await rc.aclose()
        await master.aclose()
        await busy.close()
        await other.close()
        replica.stop()
