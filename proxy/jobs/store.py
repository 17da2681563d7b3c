"""The embedded job store: one SQLite file (WAL), commits on disk before any 202.

Durability: `journal_mode=WAL` with `synchronous=FULL`, so a commit returns only
once the WAL is fsynced: a job acknowledged is a job on disk, whatever happens
to the process next (kill -9 included).

Throughput: an fsync per submission would cap submissions at the disk's fsync
rate. So writes go through one writer thread with *group commit*: every
operation that arrives while a transaction is being committed waits for the
next one, and that next transaction carries them all. Many concurrent
submissions, one fsync. Each operation still sees the effects of those before it.

Reads (a client polling its job, the runner looking for due jobs) use a second
connection in a second thread: WAL readers never wait for the writer's fsync.

One process owns a store at a time (an exclusive lock on `<file>.lock`): the
owner re-queues or settles the jobs it finds `running` at start, which would be
wrong if another live process were running them. The operator's CLI does not
take the lock; it changes jobs with conditional updates the owner respects.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from proxy.jobs.errors import StoreError
from proxy.jobs.model import TERMINAL, Job, State
from proxy.pipeline.retry import IDEMPOTENT

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    idem TEXT,
    method TEXT NOT NULL,
    scope TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    response_status INTEGER,
    callback_state TEXT,
    callback_attempts INTEGER NOT NULL DEFAULT 0,
    callback_next_at REAL,
    request BLOB NOT NULL,
    response BLOB,
    callback BLOB
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs (owner, idem) WHERE idem IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_callbacks ON jobs (callback_next_at)
    WHERE callback_state = 'pending';
"""

_COLUMNS = (
    "id, owner, method, scope, state, created_at, expires_at, next_attempt_at, finished_at, "
    "attempts, last_error, response_status, callback_state"
)
_TERMINAL_SQL = ", ".join(f"'{s.value}'" for s in sorted(TERMINAL))
_IDEMPOTENT_SQL = ", ".join(f"'{m}'" for m in sorted(IDEMPOTENT))
# SQLite's default busy handler gives up at once; the operator's CLI may hold the write
# lock for a moment while the proxy runs.
_BUSY_MS = 5000


def _job(row: Sequence[Any], blobs: Sequence[Any] = ()) -> Job:
    request, response, callback = [*blobs, None, None, None][:3]
    return Job(
        id=row[0],
        owner=row[1],
        method=row[2],
        scope=row[3],
        state=State(row[4]),
        created_at=row[5],
        expires_at=row[6],
        next_attempt_at=row[7],
        finished_at=row[8],
        attempts=row[9],
        last_error=row[10],
        response_status=row[11],
        callback_state=row[12],
        request=request,
        response=response,
        callback=callback,
    )


@dataclass(frozen=True, slots=True)
class NewJob:
    id: str
    owner: str
    # SHA-256 of the client's Idempotency-Key (the key itself is never stored), or None.
    idem: str | None
    method: str
    scope: str
    created_at: float
    expires_at: float
    request: bytes  # sealed StoredRequest
    callback: bytes | None  # sealed callback URL


@dataclass(frozen=True, slots=True)
class Submitted:
    job: Job | None
    # False: the idempotency key named an existing job, returned instead (its request
    # blob included, for the caller to compare).
    created: bool
    full: bool = False


@dataclass(frozen=True, slots=True)
class Stats:
    by_state: dict[str, int]
    oldest_queued: float | None  # created_at of the oldest queued job


class JobStore(Protocol):
    """What the gateway, the runner and the operator's CLI need of a job store.

    Every transition is conditional on the state it leaves (a job moves only from the
    state the caller saw), so two parties (the proxy and the CLI, or replicas) never
    both act on one job. SqliteStore serves one process; RedisStore (redis_store.py)
    serves several replicas with the same calls.
    """

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def submit(self, new: NewJob) -> Submitted: ...
    async def mark_running(self, job_id: str, now: float) -> bool: ...
    async def finish(
        self,
        job_id: str,
        state: State,
        now: float,
        *,
        status: int | None = None,
        response: bytes | None = None,
        error: str | None = None,
    ) -> bool: ...
    async def requeue(self, job_id: str, at: float, error: str | None) -> bool: ...
    async def recover(self, now: float) -> tuple[int, list[str]]: ...
    async def reclaim(self, now: float) -> tuple[int, list[str]]: ...
    def let_go(self, job_id: str) -> None: ...
    async def expire(self, now: float) -> int: ...
    async def purge(self, before: float, states: frozenset[State] = TERMINAL) -> int: ...
    async def cancel(self, job_id: str, now: float) -> Job | None: ...
    async def retry(self, job_id: str, now: float, max_age: float) -> Job | None: ...
    async def get(self, job_id: str, blobs: bool = False) -> Job | None: ...
    async def due(self, now: float, limit: int, skip: Sequence[str] = ()) -> list[Job]: ...
    async def next_due(self, skip: Sequence[str] = ()) -> float | None: ...
    async def callbacks_due(self, now: float, limit: int) -> list[tuple[Job, int]]: ...
    async def next_callback(self) -> float | None: ...
    async def callback_result(self, job_id: str, state: str, attempts: int, at: float) -> None: ...
    async def stats(self) -> Stats: ...
    async def list(self, state: State | None = None, limit: int = 100) -> list[Job]: ...


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: transactions are begun and committed here, explicitly.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {_BUSY_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    # FULL: the WAL is fsynced at every commit, so a commit is on the disk when it returns
    # (NORMAL would let the last commits vanish in a power loss).
    conn.execute("PRAGMA synchronous = FULL")
    return conn


class SqliteStore:
    def __init__(self, path: str | os.PathLike[str], max_jobs: int, lock: bool = True) -> None:
        self.path = Path(path)
        self.max_jobs = max_jobs
        self._lock_wanted = lock
        self._lock_fd: int | None = None
        self._writer_pool = ThreadPoolExecutor(1, thread_name_prefix="jobs-writer")
        self._reader_pool = ThreadPoolExecutor(1, thread_name_prefix="jobs-reader")
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        # Rows in the table, kept by the writer thread only (max_jobs is checked there).
        self._rows = 0
        # Group commit: operations waiting for the next transaction, and whether one runs.
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        # Transactions committed, and operations they carried (group commit at work).
        self.commits = 0
        self.committed_ops = 0

    # -- life cycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Create the file if need be (owner-only), take the lock, prepare the schema."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._writer_pool, self._open_writer)
            await loop.run_in_executor(self._reader_pool, self._open_reader)
        except StoreError:
            await self.close()
            raise
        except (OSError, sqlite3.Error) as e:
            await self.close()
            raise StoreError(f"jobs store {self.path}: cannot open: {_why(e)}") from None

    def _open_writer(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._lock_wanted:
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise StoreError(
                    f"jobs store {self.path}: in use by another proxy process "
                    "(one process per store)"
                ) from None
            self._lock_fd = fd
        # Owner-only from the first byte: the file will hold (sealed) message bodies.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        conn = _connect(self.path)
        conn.executescript(_SCHEMA)
        self._rows = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        self._writer = conn

    def _open_reader(self) -> None:
        self._reader = _connect(self.path)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            with contextlib.suppress(BaseException):
                await self._flusher
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer_pool, self._close_writer)
        await loop.run_in_executor(self._reader_pool, self._close_reader)
        self._writer_pool.shutdown(wait=True)
        self._reader_pool.shutdown(wait=True)

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    # -- the writer: group commit ---------------------------------------------------------

    async def _write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run `op` in the next transaction; returns once that transaction is on disk."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            ops = [op for op, _ in batch]
            try:
                results = await loop.run_in_executor(self._writer_pool, self._commit, ops)
            except BaseException as e:
                error: BaseException = e
                if isinstance(e, sqlite3.Error | OSError):
                    error = StoreError(f"jobs store {self.path}: {_why(e)}")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                if not isinstance(e, Exception):
                    raise
                continue
            self.commits += 1
            self.committed_ops += len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    def _commit(self, ops: list[Callable[[sqlite3.Connection], Any]]) -> list[Any]:
        """One transaction for the whole batch (in the writer thread)."""
        conn = self._writer
        if conn is None:
            raise sqlite3.OperationalError("the store is closed")
        rows = self._rows
        conn.execute("BEGIN IMMEDIATE")
        try:
            results = [op(conn) for op in ops]
            conn.execute("COMMIT")
        except BaseException:
            self._rows = rows  # nothing of the batch happened
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    # -- reads ----------------------------------------------------------------------------

    async def _read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            if self._reader is None:
                raise sqlite3.OperationalError("the store is closed")
            return op(self._reader)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._reader_pool, run)
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"jobs store {self.path}: {_why(e)}") from None

    # -- submission -----------------------------------------------------------------------

    async def submit(self, new: NewJob) -> Submitted:
        def op(conn: sqlite3.Connection) -> Submitted:
            if new.idem is not None:
                existing = _by_idem(conn, new.owner, new.idem)
                if existing is not None:
                    return Submitted(existing, created=False)
            if self._rows >= self.max_jobs:
                return Submitted(None, created=False, full=True)
            conn.execute(
                "INSERT INTO jobs (id, owner, idem, method, scope, state, created_at, "
                "expires_at, next_attempt_at, request, callback) "
                "VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
                (
                    new.id,
                    new.owner,
                    new.idem,
                    new.method,
                    new.scope,
                    new.created_at,
                    new.expires_at,
                    new.created_at,
                    new.request,
                    new.callback,
                ),
            )
            self._rows += 1
            job = _get(conn, new.id, blobs=False)
            assert job is not None
            return Submitted(job, created=True)

        return await self._write(op)

    # -- the runner's transitions ---------------------------------------------------------

    async def mark_running(self, job_id: str, now: float) -> bool:
        """Durably `running`, one more attempt, before a request goes out; False when the
        job is no longer queued or running (cancelled meanwhile): then it must not go."""

        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, "
                "next_attempt_at = ? WHERE id = ? AND state IN ('queued', 'running')",
                (now, job_id),
            )
            return cur.rowcount == 1

        return await self._write(op)

    async def finish(
        self,
        job_id: str,
        state: State,
        now: float,
        *,
        status: int | None = None,
        response: bytes | None = None,
        error: str | None = None,
    ) -> bool:
        """Settle a job that is not settled yet; its callback (if any) becomes due."""

        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, response_status = ?, "
                "response = ?, last_error = ?, "
                "callback_state = CASE WHEN callback IS NULL THEN NULL ELSE 'pending' END, "
                "callback_attempts = 0, callback_next_at = ? "
                f"WHERE id = ? AND state NOT IN ({_TERMINAL_SQL})",
                (state.value, now, status, response, error, now, job_id),
            )
            return cur.rowcount == 1

        return await self._write(op)

    async def requeue(self, job_id: str, at: float, error: str | None) -> bool:
        """Back in line (not before `at`), after an attempt that may be repeated."""

        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE jobs SET state = 'queued', next_attempt_at = ?, last_error = ? "
                "WHERE id = ? AND state IN ('queued', 'running')",
                (at, error, job_id),
            )
            return cur.rowcount == 1

        return await self._write(op)

    async def recover(self, now: float) -> tuple[int, list[str]]:
        """At start: jobs left `running` by a process that died. Idempotent methods go back
        in line; the others end `outcome_unknown` (never sent twice). Returns (how many
        were re-queued, the ids that ended unknown)."""

        def op(conn: sqlite3.Connection) -> tuple[int, list[str]]:
            unknown = [
                row[0]
                for row in conn.execute(
                    "SELECT id FROM jobs WHERE state = 'running' "
                    f"AND method NOT IN ({_IDEMPOTENT_SQL})"
                )
            ]
            conn.execute(
                "UPDATE jobs SET state = 'outcome_unknown', finished_at = ?, last_error = ?, "
                "callback_state = CASE WHEN callback IS NULL THEN NULL ELSE 'pending' END, "
                "callback_attempts = 0, callback_next_at = ? "
                f"WHERE state = 'running' AND method NOT IN ({_IDEMPOTENT_SQL})",
                (now, _UNKNOWN_AFTER_CRASH, now),
            )
            cur = conn.execute(
                "UPDATE jobs SET state = 'queued', next_attempt_at = ? "
                f"WHERE state = 'running' AND method IN ({_IDEMPOTENT_SQL})",
                (now,),
            )
            return cur.rowcount, unknown

        return await self._write(op)

    async def reclaim(self, now: float) -> tuple[int, list[str]]:
        """While running: nothing to take over, this process is the store's one owner
        (what a dead one left was settled by `recover` at start)."""
        return 0, []

    def let_go(self, job_id: str) -> None:
        """Nothing held here: a job a worker dropped keeps its state, and one left
        `running` is settled by `recover` at the next start."""

    async def expire(self, now: float) -> int:
        """Queued jobs past their expiry end `expired`; returns how many."""

        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE jobs SET state = 'expired', finished_at = ?, "
                "last_error = 'not done within jobs.max_age', "
                "callback_state = CASE WHEN callback IS NULL THEN NULL ELSE 'pending' END, "
                "callback_attempts = 0, callback_next_at = ? "
                "WHERE state = 'queued' AND expires_at <= ?",
                (now, now, now),
            )
            return cur.rowcount

        return await self._write(op)

    async def purge(self, before: float, states: frozenset[State] = TERMINAL) -> int:
        """Delete jobs in `states` finished before `before`; returns how many. In slices of
        PURGE_SLICE rows, one transaction each: a day's worth of results must not hold
        the writer (and every submission behind it) for seconds."""
        names = ", ".join(f"'{s.value}'" for s in sorted(states))

        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs "
                f"WHERE state IN ({names}) AND finished_at < ? LIMIT {PURGE_SLICE})",
                (before,),
            )
            # Recounted here: the operator's CLI may have deleted rows meanwhile too.
            self._rows = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
            return cur.rowcount

        total = 0
        while (deleted := await self._write(op)) > 0:
            total += deleted
            if deleted < PURGE_SLICE:
                break
        return total

    # -- clients and operators ------------------------------------------------------------

    async def cancel(self, job_id: str, now: float) -> Job | None:
        """Cancel a queued job; returns the job as it now stands (None: no such job)."""

        def op(conn: sqlite3.Connection) -> Job | None:
            conn.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?, "
                "last_error = 'cancelled before it ran', "
                "callback_state = CASE WHEN callback IS NULL THEN NULL ELSE 'pending' END, "
                "callback_attempts = 0, callback_next_at = ? "
                "WHERE id = ? AND state = 'queued'",
                (now, now, job_id),
            )
            return _get(conn, job_id, blobs=False)

        return await self._write(op)

    async def retry(self, job_id: str, now: float, max_age: float) -> Job | None:
        """An operator's choice: an outcome_unknown or failed job goes back in line, with
        a new max_age from now. Returns the job as it now stands."""

        def op(conn: sqlite3.Connection) -> Job | None:
            conn.execute(
                "UPDATE jobs SET state = 'queued', next_attempt_at = ?, expires_at = ?, "
                "finished_at = NULL, response_status = NULL, response = NULL, "
                "callback_state = NULL, callback_attempts = 0, callback_next_at = NULL, "
                "last_error = 'sent again by an operator (jobs retry)' "
                "WHERE id = ? AND state IN ('outcome_unknown', 'failed')",
                (now, now + max_age, job_id),
            )
            return _get(conn, job_id, blobs=False)

        return await self._write(op)

    async def get(self, job_id: str, blobs: bool = False) -> Job | None:
        return await self._read(lambda conn: _get(conn, job_id, blobs))

    async def due(self, now: float, limit: int, skip: Sequence[str] = ()) -> list[Job]:
        """Queued jobs whose time has come, oldest first (request and callback blobs
        included), minus those in `skip` (already in the runner's hands)."""
        marks = ", ".join("?" * len(skip))
        not_in = f"AND id NOT IN ({marks}) " if skip else ""

        def op(conn: sqlite3.Connection) -> list[Job]:
            rows = conn.execute(
                f"SELECT {_COLUMNS}, request, NULL, callback FROM jobs "
                f"WHERE state = 'queued' AND next_attempt_at <= ? {not_in}"
                "ORDER BY next_attempt_at, seq LIMIT ?",
                (now, *skip, limit),
            ).fetchall()
            return [_job(r[:13], r[13:]) for r in rows]

        return await self._read(op)

    async def next_due(self, skip: Sequence[str] = ()) -> float | None:
        """When the next queued job is due, minus those in `skip` (already in the
        runner's hands: still queued until sent). None: none queued."""
        marks = ", ".join("?" * len(skip))
        not_in = f"AND id NOT IN ({marks})" if skip else ""

        def op(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                f"SELECT MIN(next_attempt_at) FROM jobs WHERE state = 'queued' {not_in}",
                tuple(skip),
            ).fetchone()
            value: float | None = row[0]
            return value

        return await self._read(op)

    async def callbacks_due(self, now: float, limit: int) -> list[tuple[Job, int]]:
        """Settled jobs whose callback is due: (job with its callback blob, deliveries so far)."""

        def op(conn: sqlite3.Connection) -> list[tuple[Job, int]]:
            rows = conn.execute(
                f"SELECT {_COLUMNS}, callback_attempts, callback FROM jobs "
                "WHERE callback_state = 'pending' AND callback_next_at <= ? "
                "ORDER BY callback_next_at LIMIT ?",
                (now, limit),
            ).fetchall()
            return [(_job(r[:13], (None, None, r[14])), r[13]) for r in rows]

        return await self._read(op)

    async def next_callback(self) -> float | None:
        def op(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT MIN(callback_next_at) FROM jobs WHERE callback_state = 'pending'"
            ).fetchone()
            value: float | None = row[0]
            return value

        return await self._read(op)

    async def callback_result(self, job_id: str, state: str, attempts: int, at: float) -> None:
        """After a delivery: `delivered`, `failed` (given up) or `pending` again at `at`."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE jobs SET callback_state = ?, callback_attempts = ?, "
                "callback_next_at = ? WHERE id = ? AND callback_state = 'pending'",
                (state, attempts, at, job_id),
            )

        await self._write(op)

    async def stats(self) -> Stats:
        def op(conn: sqlite3.Connection) -> Stats:
            counts = dict(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"))
            oldest = conn.execute(
                "SELECT MIN(created_at) FROM jobs WHERE state = 'queued'"
            ).fetchone()[0]
            return Stats({s.value: counts.get(s.value, 0) for s in State}, oldest)

        return await self._read(op)

    async def list(self, state: State | None = None, limit: int = 100) -> list[Job]:
        def op(conn: sqlite3.Connection) -> list[Job]:
            where, args = ("WHERE state = ? ", (state.value,)) if state is not None else ("", ())
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM jobs {where}ORDER BY seq DESC LIMIT ?", (*args, limit)
            ).fetchall()
            return [_job(r) for r in rows]

        return await self._read(op)

    # -- tests and fault drills -----------------------------------------------------------

    async def limit_pages(self, pages: int) -> None:
        """Cap the file at `pages` pages (SQLite's max_page_count): past it every write
        fails as on a full disk (SQLITE_FULL). For fault tests and drills."""

        def run() -> None:
            assert self._writer is not None
            self._writer.execute(f"PRAGMA max_page_count = {int(pages)}")

        await asyncio.get_running_loop().run_in_executor(self._writer_pool, run)


PURGE_SLICE = 1000

_UNKNOWN_AFTER_CRASH = (
    "the proxy stopped while this request was in flight; it may or may not have been "
    "carried out, so it is not sent again (luxsci-proxy jobs retry sends it again)"
)


def _get(conn: sqlite3.Connection, job_id: str, blobs: bool) -> Job | None:
    if blobs:
        row = conn.execute(
            f"SELECT {_COLUMNS}, request, response, callback FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        return None if row is None else _job(row[:13], row[13:])
    row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return None if row is None else _job(row)


def _by_idem(conn: sqlite3.Connection, owner: str, idem: str) -> Job | None:
    row = conn.execute(
        f"SELECT {_COLUMNS}, request FROM jobs WHERE owner = ? AND idem = ?", (owner, idem)
    ).fetchone()
    return None if row is None else _job(row[:13], row[13:])


def _why(e: BaseException) -> str:
    """A store fault in words: SQLite's and the OS's messages name the fault, never data."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
