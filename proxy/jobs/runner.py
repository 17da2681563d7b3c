"""Running jobs: the background lane, the retry table, the day budget, crash safety.

A dispatcher hands due jobs (oldest first) to `jobs.concurrency` workers. A
worker opens the job's sealed request and sends it through the pipeline's own
`Attempts`, the very steps a synchronous request takes (permit, credentials,
send, the scheme's judge and the retry table), with two differences:

- permits come from the limiter's background lane: a job takes one only when no
  synchronous request of its budget waits, paced through the window;
- just before each attempt goes out, the job is durably marked `running`
  (Attempts' `before_send`). A process that dies after that point leaves the job
  `running`; the next start re-queues it if its method is idempotent and ends it
  `outcome_unknown` otherwise, so a POST is never silently sent twice.

What the attempts end with decides the job: an answer the retry table calls
final settles it (`succeeded` below 400, `failed` from 400; the answer is kept
for replay); an outcome worth another try (a 503 for a GET, an unreachable API,
a rate limit, a login that fails) puts it back in line with a growing delay,
until `jobs.max_age` expires it; a spent day budget parks every job until the
next day instead of failing them; a POST whose connection was lost after
sending ends `outcome_unknown`.

Maintenance runs beside: taking over the jobs of a replica gone silent (Redis
store), expiry, purging results older than `jobs.keep_results`, and the counts
the metrics show. Callbacks are delivered
by their own loop (callbacks.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Coroutine
from typing import Any

import structlog

from proxy.clock import ServerClock
from proxy.config import JobsConfig
from proxy.errors import DailyLimit, ProxyError, Unavailable, UpstreamAuthFailed, UpstreamError
from proxy.http.body import Body
from proxy.http.client import UpstreamResponse
from proxy.http.headers import downstream_block
from proxy.jobs.callbacks import Deliverer, check_callback
from proxy.jobs.errors import StoreError, UnreadableRecord
from proxy.jobs.model import Job, State, StoredAnswer, StoredRequest, aad
from proxy.jobs.seal import Sealer
from proxy.jobs.store import JobStore
from proxy.limits import Client, Lane
from proxy.observe.access_record import AccessRecord
from proxy.observe.metrics import JobsState, Metrics
from proxy.pipeline import retry
from proxy.pipeline.attempts import Attempts, Exchange
from proxy.schemes.base import AuthScheme, Outbound

# The jobs' own identity in the limiter's lines (and its queue-wait metrics).
JOBS_CLIENT = Client("jobs", Lane.BACKGROUND)

log = structlog.get_logger("proxy.jobs")

# How long one run of a job may wait for permits before it goes back in line (so a
# worker looks again at cancellations and expiry, and other budgets get their turn).
RUN_WAIT = 300.0
# Delays before a job is tried again: doubling from RETRY_BASE up to RETRY_MAX, half
# of it jittered, so jobs that failed together do not come back together.
RETRY_BASE = 2.0
RETRY_MAX = 600.0
# A job whose request cannot be opened (its key was removed) is looked at again hourly:
# put the key back in jobs.keys and it runs.
UNREADABLE_RETRY = 3600.0
# The dispatcher looks at the store at least this often (the CLI may re-queue a job).
IDLE_POLL = 1.0
# Callback deliveries: doubling from 1 s up to 10 minutes.
CALLBACK_BASE = 1.0
CALLBACK_MAX = 600.0
STATS_SECONDS = 2.0
# Tries to record a job's end when the store fails at that moment.
_FINISH_TRIES = 5


class _Withdrawn(Exception):
    """The job stopped being queued (cancelled) between its dispatch and its send."""


def backoff(attempt: int, base: float, cap: float) -> float:
    ceiling = min(cap, base * 2.0 ** max(0, attempt - 1))
    return ceiling / 2 + random.random() * ceiling / 2


async def _read_bounded(resp: UpstreamResponse, limit: int) -> tuple[bytes, bool]:
    """The body, and whether it was all read within `limit` bytes (else it is left)."""
    parts = []
    total = 0
    while chunk := await resp.readany():
        total += len(chunk)
        if total > limit:
            return b"", False
        parts.append(chunk)
    return b"".join(parts), True


class Runner:
    def __init__(
        self,
        cfg: JobsConfig,
        store: JobStore,
        sealer: Sealer,
        attempts: Attempts,
        scheme: AuthScheme,
        clock: ServerClock,
        metrics: Metrics,
        deliverer: Deliverer | None,
        integration: str | None = None,
    ) -> None:
        self.cfg = cfg
        # On the records of job attempts, as on the proxy path's (None without
        # `integrations:`).
        self.integration = integration
        self.store = store
        self.sealer = sealer
        self.attempts = attempts
        self.scheme = scheme
        self.clock = clock
        self.metrics = metrics
        self.deliverer = deliverer
        self.capacity = cfg.concurrency * 2
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._claimed: set[str] = set()
        self._nudge = asyncio.Event()
        self._callbacks_nudge = asyncio.Event()
        self._paused_until = 0.0
        self._stopping = False
        self._loops: list[asyncio.Task[None]] = []
        self._workers: list[asyncio.Task[None]] = []
        # Workers whose job has gone out at least once in this run: only these are worth
        # waiting for at shutdown (the others have sent nothing and just stay queued).
        self._sending: set[asyncio.Task[None]] = set()
        self._stats = JobsState({}, None)
        self._store_ok = True

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Settle what a previous process left running, then start working."""
        self._recovered(*await self.store.recover(time.time()))
        await self._refresh_stats()
        self._spawn(self._dispatch())
        self._spawn(self._maintain())
        if self.deliverer is not None:
            self._spawn(self._deliver_callbacks())
        for _ in range(self.cfg.concurrency):
            self._workers.append(asyncio.get_running_loop().create_task(self._work()))

    def _recovered(self, requeued: int, unknown: list[str]) -> None:
        """Jobs a stopped process (or a replica gone silent) left: named, and counted."""
        for job_id in unknown:
            log.warning("job_outcome_unknown", job_id=job_id, reason="in flight when stopped")
        if unknown:
            self.metrics.job_completed(State.OUTCOME_UNKNOWN.value, len(unknown))
            self._callbacks_nudge.set()
        if requeued or unknown:
            log.info("jobs_recovered", requeued=requeued, outcome_unknown=len(unknown))
            self._nudge.set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._loops.append(asyncio.get_running_loop().create_task(coro))

    def wake(self) -> None:
        """A job was submitted: look for work now rather than at the next poll."""
        self._nudge.set()

    def state(self) -> JobsState:
        return self._stats

    def status(self) -> dict[str, Any]:
        return {"ok": self._store_ok, "queued": self._stats.by_state.get("queued", 0)}

    async def stop(self, grace: float) -> None:
        """Take no new job; let jobs already sent finish for `grace` seconds, then cut them
        off (a cut-off job stays `running` and is settled at the next start). Jobs that
        have sent nothing yet (waiting for a permit) stop at once and stay queued."""
        self._stopping = True
        for task in self._loops:
            task.cancel()
        for task in self._workers:
            if task not in self._sending:
                task.cancel()
        sending = [t for t in self._workers if not t.done() and t in self._sending]
        if sending:
            _, pending = await asyncio.wait(sending, timeout=grace)
            for task in pending:
                task.cancel()
        for task in [*self._loops, *self._workers]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.deliverer is not None:
            await self.deliverer.close()

    # -- the dispatcher ---------------------------------------------------------------------

    async def _sleep(self, event: asyncio.Event, seconds: float) -> None:
        """Until `event` is set or `seconds` pass. Not `asyncio.wait_for`: on Python 3.11 it
        loses a cancellation that arrives as the event is set, and the loop never ends."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, seconds)):
                await event.wait()
        event.clear()

    async def _dispatch(self) -> None:
        while True:
            now = time.time()
            if self._paused_until > now:
                await asyncio.sleep(self._paused_until - now)
                continue
            room = self.capacity - len(self._claimed)
            delay = IDLE_POLL
            if room > 0:
                try:
                    jobs = await self.store.due(now, room, tuple(self._claimed))
                    next_due = None if len(jobs) == room else await self._next_due()
                except StoreError as e:
                    self._store_failed("dispatch", e)
                    await asyncio.sleep(IDLE_POLL)
                    continue
                self._store_ok = True
                for job in jobs:
                    self._claimed.add(job.id)
                    self._queue.put_nowait(job)
                if next_due is not None:
                    delay = min(IDLE_POLL, next_due - now)
            await self._sleep(self._nudge, delay)

    async def _next_due(self) -> float | None:
        # Jobs in the workers' hands are still `queued` until sent: they do not count.
        return await self.store.next_due(tuple(self._claimed))

    # -- the workers ------------------------------------------------------------------------

    async def _work(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        while not self._stopping:
            job = await self._queue.get()
            try:
                await self._run(job)
            except Exception:
                # A bug: the job keeps whatever state the store has, and the store lets
                # it go to its crash rule (SQLite: at the next start; Redis: the take-over
                # after the visibility timeout), rather than hold it while the process
                # lives; the worker carries on.
                log.exception("job_runner_error", job_id=job.id)
                self.store.let_go(job.id)
            finally:
                self._sending.discard(me)
                self._claimed.discard(job.id)
                self._nudge.set()

    async def _run(self, job: Job) -> None:
        now = time.time()
        if job.expires_at <= now:
            await self._settle(job, State.EXPIRED, error="not done within jobs.max_age")
            return
        try:
            request = StoredRequest.decode(
                self.sealer.open(job.request or b"", aad(job.id, "request"))
            )
        except UnreadableRecord as e:
            # Reported and skipped, not failed: with its key back in jobs.keys it runs.
            log.error("job_record_unreadable", job_id=job.id, record="request", error=str(e))
            await self._requeue(job, now + UNREADABLE_RETRY, f"stored request unreadable: {e}")
            return
        out = Outbound(
            request.method,
            request.path,
            request.query,
            request.lines,
            Body(request.body, len(request.body)),
            request.body_digest,
            has_query=request.has_query,
        )
        event = AccessRecord(request.request_id, request.method, integration=self.integration)
        sent = False

        async def before_send() -> None:
            nonlocal sent
            if self._stopping:
                raise _Withdrawn  # shutting down: nothing new goes out
            if not await self.store.mark_running(job.id, time.time()):
                raise _Withdrawn
            sent = True
            task = asyncio.current_task()
            if task is not None:
                self._sending.add(task)

        try:
            exchange = await self.attempts.run(
                out,
                job.scope,
                time.monotonic() + RUN_WAIT,
                event,
                Lane.BACKGROUND,
                JOBS_CLIENT,
                before_send,
            )
        except _Withdrawn:
            log.info("job_withdrawn", job_id=job.id)
            return
        except DailyLimit as e:
            # The day's budget is spent: every job waits for the next day, none fails.
            self._paused_until = time.time() + e.retry_after
            log.info("jobs_paused_for_the_day", seconds=round(e.retry_after, 1))
            await self._requeue(job, self._paused_until, e.message)
            return
        except StoreError as e:
            self._store_failed("mark_running", e)
            self._paused_until = time.time() + IDLE_POLL
            if sent:  # a later attempt could not be marked: the job is `running` on disk
                await self._requeue(job, time.time() + IDLE_POLL, str(e))
            return
        except ProxyError as e:
            await self._after_error(job, request.method, e, sent)
            return
        await self._after_answer(job, request.method, exchange)

    async def _after_error(self, job: Job, method: str, error: ProxyError, sent: bool) -> None:
        decision = retry.after_error(method, error)
        if isinstance(error, Unavailable | UpstreamAuthFailed) or (
            decision.action is not retry.Action.DONE
        ):
            # Nothing went out, or what went out may go again: back in line.
            delay = IDLE_POLL if not sent else backoff(job.attempts + 1, RETRY_BASE, RETRY_MAX)
            await self._requeue(job, time.time() + delay, error.message)
        elif sent and isinstance(error, UpstreamError):
            # Sent, then the connection was lost or timed out: the API may have done it.
            await self._settle(job, State.OUTCOME_UNKNOWN, error=error.message)
        else:
            await self._settle(job, State.FAILED, error=error.message)

    async def _after_answer(self, job: Job, method: str, exchange: Exchange) -> None:
        resp = exchange.resp
        status = resp.status
        try:
            watch = (
                self.scheme.watch(exchange.used, exchange.sent_at, resp.headers)
                if 200 <= status < 300
                else None
            )
            try:
                body, whole = await _read_bounded(resp, self.cfg.max_response_bytes)
            except ProxyError as e:
                if method in retry.IDEMPOTENT:
                    await self._requeue(
                        job,
                        time.time() + backoff(job.attempts + 1, RETRY_BASE, RETRY_MAX),
                        e.message,
                    )
                    return
                await self._settle(
                    job, _by_status(status), status=status, error=f"answer cut off: {e.message}"
                )
                return
            if watch is not None and whole:
                watch.whole(body)
            decision = retry.after_response(
                self.scheme, method, status, resp.headers, self.clock.now()
            )
            headers = downstream_block(resp.raw_headers, resp.headers)
            reason = resp.reason
        finally:
            exchange.close()
        if decision.action is not retry.Action.DONE:
            # The attempts' caps ran out on an outcome worth another try: later, then.
            delay = backoff(job.attempts + 1, RETRY_BASE, RETRY_MAX)
            await self._requeue(job, time.time() + delay, f"the API answered {status}")
            return
        sealed = None
        error = None
        if whole:
            answer = StoredAnswer(status, reason, headers, body)
            sealed = self.sealer.seal(answer.encode(), aad(job.id, "response"))
        else:
            error = "the answer was over jobs.max_response_bytes and was not kept"
        await self._settle(job, _by_status(status), status=status, response=sealed, error=error)

    # -- store transitions ----------------------------------------------------------------

    async def _settle(
        self,
        job: Job,
        state: State,
        *,
        status: int | None = None,
        response: bytes | None = None,
        error: str | None = None,
    ) -> None:
        for attempt in range(1, _FINISH_TRIES + 1):
            try:
                done = await self.store.finish(
                    job.id, state, time.time(), status=status, response=response, error=error
                )
            except StoreError as e:
                self._store_failed("finish", e)
                if attempt == _FINISH_TRIES:
                    # It stays `running` on disk: the next start settles it by the rule.
                    log.error("job_end_not_recorded", job_id=job.id, state=state.value)
                    return
                await asyncio.sleep(backoff(attempt, 0.5, 5.0))
                continue
            break
        if not done:
            return
        self.metrics.job_completed(state.value)
        log.info(
            "job_finished",
            job_id=job.id,
            state=state.value,
            status=status,
            error=error,
        )
        self._callbacks_nudge.set()

    async def _requeue(self, job: Job, at: float, error: str | None) -> None:
        try:
            await self.store.requeue(job.id, at, error)
        except StoreError as e:
            self._store_failed("requeue", e)
            return
        log.info("job_requeued", job_id=job.id, delay_s=round(at - time.time(), 2), error=error)

    def _store_failed(self, operation: str, error: StoreError) -> None:
        self._store_ok = False
        log.error("jobs_store_failed", operation=operation, error=str(error))

    # -- maintenance --------------------------------------------------------------------------

    async def _maintain(self) -> None:
        cfg = self.cfg
        # Expiry is checked often enough for a short max_age (tests), at most every 5 s.
        every = min(5.0, max(0.2, cfg.max_age / 10))
        purge_every = min(60.0, max(1.0, cfg.keep_results / 10))
        last_purge = 0.0
        last_stats = 0.0
        while True:
            await asyncio.sleep(min(every, STATS_SECONDS))
            now = time.time()
            try:
                # Several replicas on one store: the jobs of one gone silent are taken over.
                self._recovered(*await self.store.reclaim(now))
                expired = await self.store.expire(now)
                if expired:
                    self.metrics.job_completed(State.EXPIRED.value, expired)
                    log.info("jobs_expired", count=expired)
                    self._callbacks_nudge.set()
                if now - last_purge >= purge_every:
                    last_purge = now
                    purged = await self.store.purge(now - cfg.keep_results)
                    if purged:
                        log.info("jobs_purged", count=purged)
                if now - last_stats >= STATS_SECONDS:
                    last_stats = now
                    await self._refresh_stats()
            except StoreError as e:
                self._store_failed("maintenance", e)

    async def _refresh_stats(self) -> None:
        stats = await self.store.stats()
        age = None if stats.oldest_queued is None else max(0.0, time.time() - stats.oldest_queued)
        self._stats = JobsState(stats.by_state, age)

    # -- callbacks ----------------------------------------------------------------------------

    async def _deliver_callbacks(self) -> None:
        while True:
            try:
                due = await self.store.callbacks_due(time.time(), 16)
                if due:
                    await asyncio.gather(*(self._deliver(job, n) for job, n in due))
                    continue
                upcoming = await self.store.next_callback()
            except StoreError as e:
                self._store_failed("callbacks", e)
                upcoming = None
            delay = IDLE_POLL if upcoming is None else min(IDLE_POLL, upcoming - time.time())
            await self._sleep(self._callbacks_nudge, delay)

    async def _deliver(self, job: Job, delivered_before: int) -> None:
        assert self.deliverer is not None
        attempt = delivered_before + 1
        try:
            url = self.sealer.open(job.callback or b"", aad(job.id, "callback")).decode()
            check_callback(url, self.cfg.callback_allow)
        except (UnreadableRecord, UnicodeDecodeError, ProxyError) as e:
            log.error("job_callback_unusable", job_id=job.id, error=str(e))
            self.metrics.job_callback_failed(gave_up=True)
            await self.store.callback_result(job.id, "failed", attempt, time.time())
            return
        body = json.dumps(job.public(), separators=(",", ":")).encode()
        why = await self.deliverer.deliver(url, job.id, body, time.time())
        if why is None:
            await self.store.callback_result(job.id, "delivered", attempt, time.time())
            return
        gave_up = attempt >= self.cfg.callback_max_attempts
        self.metrics.job_callback_failed(gave_up)
        log.warning(
            "job_callback_failed", job_id=job.id, attempt=attempt, error=why, gave_up=gave_up
        )
        if gave_up:
            await self.store.callback_result(job.id, "failed", attempt, time.time())
        else:
            at = time.time() + backoff(attempt, CALLBACK_BASE, CALLBACK_MAX)
            await self.store.callback_result(job.id, "pending", attempt, at)


def _by_status(status: int) -> State:
    return State.SUCCEEDED if status < 400 else State.FAILED
