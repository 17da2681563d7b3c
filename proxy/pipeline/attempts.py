"""Attempts: permit → credentials → send → judge, until an answer is final.

Each attempt takes a rate-limit permit (waiting in line if need be), lets the
scheme put credentials on the request, takes an in-flight slot and sends. The
answer (or the error) decides what comes next (retry.py and the scheme's
`judge`): hand it to the client, get fresh credentials once, wait for the rate
window, or back off and try again, within the attempt and time caps. Every
attempt is counted: in the access line, and each retry in retries_total.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import structlog

from proxy.clock import ServerClock
from proxy.config import RetryConfig
from proxy.debugflag import DebugFlag
from proxy.errors import ProxyError
from proxy.http.client import Upstream, UpstreamResponse
from proxy.limits import Client, Lane, RateLimiter
from proxy.limits.lanes import PROXY_CLIENT
from proxy.observe.access_record import AccessRecord
from proxy.observe.metrics import Metrics
from proxy.pipeline import retry
from proxy.pipeline.inflight import Gate
from proxy.schemes.base import AuthScheme, Credential, Outbound

log = structlog.get_logger("proxy.access")


class PermitSource(Protocol):
    """What attempts need of the rate limiter (RateLimiter; a test double in tests)."""

    async def acquire(
        self,
        scope: str,
        deadline: float,
        front: bool = False,
        lane: Lane = Lane.NORMAL,
        client: Client | None = None,
    ) -> float: ...

    async def hold(self, scope: str, headers: Mapping[str, str]) -> float: ...

    def hold_for(self, scope: str, seconds: float) -> float: ...


# Called right before an attempt goes out (after its permit and credentials); raising
# stops the attempt unsent.
BeforeSend = Callable[[], Awaitable[None]]


@dataclass(slots=True)
class Exchange:
    """The final answer for one request, holding an in-flight slot until `close()`."""

    resp: UpstreamResponse
    used: Credential | None
    sent_at: float
    inflight: Gate

    def close(self) -> None:
        self.resp.release()
        self.inflight.release()


class Sender:
    """One attempt on the wire: an in-flight slot, the request, and what its answer says
    about the API's clock and limits."""

    def __init__(
        self,
        upstream: Upstream,
        inflight: Gate,
        clock: ServerClock,
        limiter: RateLimiter,
        metrics: Metrics,
        debug: DebugFlag | None = None,
    ) -> None:
        self.upstream = upstream
        self.inflight = inflight
        self.clock = clock
        self.limiter = limiter
        self.metrics = metrics
        self.debug = debug if debug is not None else DebugFlag()

    async def send(
        self, out: Outbound, scope: str, deadline: float, fresh: bool
    ) -> tuple[UpstreamResponse, float]:
        """The answer's head and when the request went out; the slot stays held."""
        if self.debug.on and self.inflight.would_wait():
            waiting = time.monotonic()
            await self.inflight.acquire(deadline)
            log.debug(
                "inflight_waited",
                budget="limits.max_inflight",
                limit=self.inflight.limit,
                waited_s=round(time.monotonic() - waiting, 3),
            )
        else:
            await self.inflight.acquire(deadline)
        sent_at = time.monotonic()
        try:
            resp = await self.upstream.request(
                out.method, out.path, out.query, out.lines + out.credentials, out.body, fresh
            )
        except ProxyError:
            self.inflight.release()
            self.metrics.upstream(scope, None, time.monotonic() - sent_at)
            raise
        except BaseException:
            self.inflight.release()
            raise
        self.metrics.upstream(scope, resp.status, time.monotonic() - sent_at)
        self.clock.observe(resp.headers.get("Date"))
        await self.limiter.observe(scope, resp.headers)
        return resp, sent_at


@dataclass(slots=True)
class _Progress:
    """Where one request's attempts stand."""

    first: float
    attempts: int = 0
    # The one fresh-credentials retry, which the attempt cap does not count.
    reauthenticated: bool = False
    queue_wait: float = 0.0
    fresh: bool = False

    @property
    def counted(self) -> int:
        return self.attempts - self.reauthenticated


class Attempts:
    def __init__(
        self,
        sender: Sender,
        scheme: AuthScheme,
        limiter: PermitSource,
        clock: ServerClock,
        metrics: Metrics,
        retries: RetryConfig,
        debug: DebugFlag | None = None,
    ) -> None:
        self.sender = sender
        self.scheme = scheme
        self.limiter = limiter
        self.clock = clock
        self.metrics = metrics
        # Replaced whole on reload (SIGHUP), never mutated.
        self.retries = retries
        # On: an answer that is not retried says why not (the `retry` event says why).
        self.debug = debug if debug is not None else DebugFlag()

    async def run(
        self,
        out: Outbound,
        scope: str,
        deadline: float,
        event: AccessRecord,
        lane: Lane = Lane.NORMAL,
        client: Client | None = None,
        before_send: BeforeSend | None = None,
    ) -> Exchange:
        """Attempt until an answer is final; the Exchange holds an in-flight slot.

        `lane` and `client`: where each attempt waits for its permit (the limiter's
        acquire); the proxy's jobs pass Lane.BACKGROUND. `before_send`: awaited before
        each attempt goes out (a durable job is marked `running` there, so a crash can
        never leave it sent but looking unsent).
        """
        progress = _Progress(time.monotonic())
        name = client.name if client is not None else PROXY_CLIENT
        while True:
            # Once a request has waited its turn, a retry keeps its place at the head.
            waited = await self.limiter.acquire(
                scope, deadline, progress.attempts > 0, lane, client
            )
            self.metrics.queue_wait(scope, waited, lane.label, name)
            progress.queue_wait += waited
            progress.attempts += 1
            event.attempts = progress.attempts
            event.queue_wait = progress.queue_wait
            used = await self.scheme.apply(out)
            if before_send is not None:
                await before_send()
            fresh, progress.fresh = progress.fresh, False
            try:
                resp, sent_at = await self.sender.send(out, scope, deadline, fresh)
            except ProxyError as e:
                decision = retry.after_error(out.method, e)
                delay = self._backoff(decision, progress)
                if delay is None:
                    if self.debug.on:
                        self._explain(event, decision, progress, out.method, e.reason, deadline)
                    raise
                await self._pause(event, decision, progress, delay, None)
                continue
            event.upstream_time = time.monotonic() - sent_at
            if resp.status < 400:  # the common case, without the rules' calls
                return Exchange(resp, used, sent_at, self.sender.inflight)
            decision = retry.after_response(
                self.scheme, out.method, resp.status, resp.headers, self.clock.now()
            )
            delay = await self._next(decision, progress, resp, scope, deadline, used)
            if delay is None:
                if self.debug.on:
                    self._explain(event, decision, progress, out.method, resp.status, deadline)
                return Exchange(resp, used, sent_at, self.sender.inflight)
            resp.release()
            self.sender.inflight.release()
            await self._pause(event, decision, progress, delay, resp.status)

    async def _next(
        self,
        decision: retry.Decision,
        progress: _Progress,
        resp: UpstreamResponse,
        scope: str,
        deadline: float,
        used: Credential | None,
    ) -> float | None:
        """Seconds before the next attempt, or None: this answer is the client's."""
        action = decision.action
        if action is retry.Action.DONE:
            return None
        if action is retry.Action.REAUTH:
            if progress.reauthenticated:
                return None
            progress.reauthenticated = True
            self.scheme.retire(used)
            return 0.0
        if action is retry.Action.RATE_WAIT:
            pause = await self._rate_pause(scope, resp, decision)
            if progress.counted >= self.retries.max_attempts or time.monotonic() + pause > deadline:
                return None  # it cannot wait for the reset: the API's own answer says why
            return 0.0  # the held budget makes the next permit wait for the reset
        return self._backoff(decision, progress)

    async def _rate_pause(
        self, scope: str, resp: UpstreamResponse, decision: retry.Decision
    ) -> float:
        if decision.delay is not None:  # the server said how long (Retry-After)
            return self.limiter.hold_for(scope, decision.delay)
        if decision.until_reset:
            return await self.limiter.hold(scope, resp.headers)
        # Refused for rate with no word on how long: back off like any retry.
        cfg = self.retries
        return self.limiter.hold_for(scope, retry.backoff(2, cfg.backoff_base, cfg.backoff_max))

    def _backoff(self, decision: retry.Decision, progress: _Progress) -> float | None:
        """The pause before another attempt, or None when the caps say stop."""
        cfg = self.retries
        if decision.action is retry.Action.DONE or progress.counted >= cfg.max_attempts:
            return None
        if decision.delay is not None:
            delay = decision.delay
        else:
            delay = retry.backoff(progress.counted, cfg.backoff_base, cfg.backoff_max)
        if time.monotonic() + delay - progress.first > cfg.max_time:
            return None
        progress.fresh = decision.fresh_connection
        return delay

    def _explain(
        self,
        event: AccessRecord,
        decision: retry.Decision,
        progress: _Progress,
        method: str,
        outcome: int | str,
        deadline: float,
    ) -> None:
        """Debug: why a failed attempt's outcome goes to the client without another try."""
        cfg = self.retries
        action = decision.action
        if action is retry.Action.DONE:
            # Lost connections, timeouts and gateway statuses: retried for idempotent methods.
            gateway = isinstance(outcome, str) or outcome in (408, 502, 503, 504)
            if gateway and method not in retry.IDEMPOTENT:
                why = (
                    f"no retry rule sends {method} again after this outcome "
                    "(it is not idempotent: the API may have carried it out)"
                )
            else:
                why = "no retry rule covers this outcome"
        elif action is retry.Action.REAUTH:
            why = "a second 401, after a fresh login, is the API's answer"
        elif progress.counted >= cfg.max_attempts:
            why = f"retry.max_attempts ({cfg.max_attempts}) reached"
        elif action is retry.Action.RATE_WAIT:
            why = "the API's reset comes after the request's deadline (queue.max_wait)"
        else:
            why = f"another try would end past retry.max_time ({cfg.max_time} s)"
        log.debug(
            "retry_not_taken",
            request_id=event.request_id,
            attempt=progress.attempts,
            outcome=outcome,
            rule=decision.reason,
            why=why,
            deadline_in_s=round(deadline - time.monotonic(), 3),
        )

    async def _pause(
        self,
        event: AccessRecord,
        decision: retry.Decision,
        progress: _Progress,
        delay: float,
        status: int | None,
    ) -> None:
        self.metrics.retry(decision.reason)
        log.info(
            "retry",
            request_id=event.request_id,
            reason=decision.reason,
            status=status,
            attempt=progress.attempts,
            delay_s=round(delay, 3),
        )
        if delay:
            await asyncio.sleep(delay)
