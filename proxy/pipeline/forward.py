"""The one hot path: client request in, signed request upstream, answer back unchanged.

Per attempt: a rate-limit permit (waiting in line if need be), credentials, a
slot under the in-flight cap, then the request. The answer decides what comes
next (retry.py): hand it to the client, log in again once, wait for the rate
window, or back off and try again, within the attempt and time caps.

Small answers are read whole and sent with one write; large or unsized ones
are streamed chunk by chunk, and the fresh auth code is harvested from the
chunks as they pass, so a large download is never buffered or parsed whole.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import structlog

from proxy.clock import ServerClock
from proxy.config import Config, LoggingConfig, QueueConfig, RetryConfig
from proxy.errors import BadRequest, ProxyError, ShuttingDown
from proxy.http.client import Upstream, UpstreamResponse
from proxy.http.headers import downstream_block
from proxy.http.server import Request, error_headers, request_id
from proxy.limits import RateLimiter, scope_of
from proxy.observe.access_record import AccessRecord
from proxy.observe.log import Logs, body_text, mask_user
from proxy.observe.metrics import Metrics
from proxy.pipeline import retry
from proxy.pipeline.admission import AccessPolicy, check_method, check_target
from proxy.pipeline.inflight import Gate
from proxy.pipeline.outbound import read_request
from proxy.schemes.base import AuthScheme, Outbound
from proxy.schemes.luxsci.harvest import CodeHarvester, code_in_body
from proxy.schemes.luxsci.session import AUTH_PATH, AuthCode

log = structlog.get_logger("proxy.access")

# Answers up to this size (with a known length) are read whole: one write, no chunk loop.
SMALL_BODY = 64 * 1024
MAX_WAIT_HEADER = "X-Proxy-Max-Wait"


def max_wait(header: str | None, configured: float) -> float:
    """The client may ask to wait less than queue.max_wait, never more."""
    if header is None:
        return configured
    try:
        asked = float(header)
    except ValueError:
        asked = math.nan
    if not math.isfinite(asked) or asked < 0:
        raise BadRequest(f"{MAX_WAIT_HEADER} must be a number of seconds >= 0 (got {header!r})")
    return min(asked, configured)


@dataclass(slots=True)
class Exchange:
    """The outcome of the attempts for one request."""

    resp: UpstreamResponse
    used: AuthCode | None
    sent_at: float
    attempts: int
    queue_wait: float


class Forwarder:
    def __init__(
        self,
        upstream: Upstream,
        scheme: AuthScheme,
        scheme_name: str,
        clock: ServerClock,
        limiter: RateLimiter,
        max_inflight: int,
        queue: QueueConfig,
        retries: RetryConfig,
        max_body: int,
        metrics: Metrics,
        logging: LoggingConfig,
        policy: AccessPolicy,
        client_timeout: float,
        logs: Logs,
    ) -> None:
        self.upstream = upstream
        self.scheme = scheme
        self.scheme_name = scheme_name
        self.clock = clock
        self.limiter = limiter
        self.inflight = Gate(max_inflight)
        self.queue = queue
        self.retries = retries
        self.max_body = max_body
        self.metrics = metrics
        self.policy = policy
        self.client_timeout = client_timeout
        # The service's logs: the access line goes there (the other events find them
        # through the context the request is served in).
        self.logs = logs
        # Replaced whole on reload (SIGHUP), never mutated.
        self.logging = logging
        # Handler tasks still working, so a shutdown can wait for them (or cut them off).
        self._active: set[asyncio.Task[object]] = set()
        self.draining = False
        self._cut_off = False

    def reconfigure(self, cfg: Config) -> None:
        """Reload: settings read per request are swapped whole."""
        self.queue = cfg.queue
        self.retries = cfg.retry
        self.logging = cfg.logging
        self.inflight.resize(cfg.limits.max_inflight)
        self.policy = AccessPolicy(cfg.access)

    @property
    def inflight_count(self) -> int:
        return self.inflight.held

    async def drain(self, grace: float) -> int:
        """Let requests finish for `grace` seconds, then answer the rest 503; returns how many."""
        self.draining = True
        pending: set[asyncio.Task[object]] = set()
        if self._active:
            _, pending = await asyncio.wait(set(self._active), timeout=grace)
        if pending:
            self._cut_off = True
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=5)
        return len(pending)

    async def __call__(self, request: Request) -> None:
        task = request.task
        assert task is not None
        self._active.add(task)
        try:
            await self._handle(request, task)
        finally:
            self._active.discard(task)

    async def _handle(self, request: Request, task: asyncio.Task[object]) -> None:
        started = time.monotonic()
        headers = request.headers
        rid = request_id(headers.get("X-Request-ID"))
        event = AccessRecord(rid, request.method)
        # Until the target is read: the account budget is what non-user requests spend.
        label_scope = "account"
        try:
            if self.draining:
                # Stopping: a request on a kept-alive connection goes to another replica.
                raise ShuttingDown("the proxy is shutting down; send the request again", 1)
            # Who and what first: a refused request costs no body read, permit or API call.
            self.policy.check_peer(request.remote)
            self.policy.check_token(headers.get("Proxy-Authorization"))
            check_method(request.method)
            path, query = check_target(request.raw_path)
            self.policy.check_request(request.method, path, query)
            wait = max_wait(headers.get(MAX_WAIT_HEADER), self.queue.max_wait)
            out = await read_request(request, path, query, self.max_body, self.client_timeout)
            scope = scope_of(out.path, self.scheme_name)
            label_scope = "auth" if out.path.startswith(AUTH_PATH) else scope
            event.path = mask_user(out.path) if self.logging.redact_paths else out.path
            event.scope = label_scope
            event.bytes_in = len(out.body)
            if self.logging.log_bodies:
                event.request_body = body_text(out.body)
            out.lines += b"X-Request-ID: " + rid.encode() + b"\r\n"
            exchange = await self._exchange(out, scope, started + wait, event)
            event.upstream_status = exchange.resp.status
            try:
                status, sent = await self._respond(request, exchange, rid, event)
            finally:
                exchange.resp.release()
                self.inflight.release()
        except ProxyError as e:
            status, sent = self._refuse(request, e, rid, event)
        except asyncio.CancelledError:
            if not self._cut_off or request.started:
                # The client went away (its connection cancels the handler): nothing left
                # to answer.
                event.error = "client_disconnected"
                event.total_time = time.monotonic() - started
                self.logs.access(event)
                raise
            # Shutdown's deadline passed before this request was served: say so.
            task.uncancel()
            status, sent = self._refuse(
                request,
                ShuttingDown(
                    "the proxy shut down before this request could be served; send it again", 1
                ),
                rid,
                event,
            )
        except Exception:
            # A bug, not the client's fault: answer anyway, and leave the traceback in the log.
            log.exception("internal_error", request_id=rid)
            status, sent = self._refuse(
                request, ProxyError("internal proxy error; see the proxy log"), rid, event
            )
        event.status = status
        event.bytes_out = sent
        elapsed = event.total_time = time.monotonic() - started
        self.metrics.request(request.method, label_scope, status, elapsed)
        self.logs.access(event)

    def _refuse(
        self, request: Request, error: ProxyError, rid: str, event: AccessRecord
    ) -> tuple[int, int]:
        """An answer the proxy makes itself: counted, logged with the request, sent."""
        event.error = error.reason
        event.error_message = error.message
        self.metrics.rejected(error.reason)
        if request.started:
            # Too late for an answer of our own: the client sees a cut-off one instead.
            request.abort()
            return error.status, 0
        return error.status, request.respond(error.status, error_headers(error, rid), error.body())

    def _note_retry(
        self,
        event: AccessRecord,
        decision: retry.Decision,
        attempt: int,
        delay: float,
        status: int | None = None,
    ) -> None:
        self.metrics.retry(decision.reason)
        log.info(
            "retry",
            request_id=event.request_id,
            reason=decision.reason,
            status=status,
            attempt=attempt,
            delay_s=round(delay, 3),
        )

    async def _exchange(
        self, out: Outbound, scope: str, deadline: float, event: AccessRecord
    ) -> Exchange:
        """Attempt until an answer is final; returns holding an in-flight slot (caller frees it)."""
        cfg = self.retries
        first = time.monotonic()
        attempts = 0
        reauthenticated = False
        queue_wait = 0.0
        front = False  # once a request has waited its turn, it keeps its place at the head
        while True:
            waited = await self.limiter.acquire(scope, deadline, front)
            self.metrics.queue_wait(scope, waited)
            queue_wait += waited
            front = True
            attempts += 1
            event.attempts = attempts
            event.queue_wait = queue_wait
            used = await self.scheme.apply(out)
            await self.inflight.acquire()
            sent_at = time.monotonic()
            try:
                resp = await self.upstream.request(
                    out.method, out.path, out.query, out.lines + out.credentials, out.body
                )
            except ProxyError as e:
                self.inflight.release()
                self.metrics.upstream(scope, None, time.monotonic() - sent_at)
                decision = retry.after_error(out.method, e)
                delay = self._retry_delay(decision, attempts - reauthenticated, first)
                if delay is None:
                    raise
                self._note_retry(event, decision, attempts, delay)
                await asyncio.sleep(delay)
                continue
            except BaseException:
                self.inflight.release()
                raise
            upstream_s = time.monotonic() - sent_at
            event.upstream_time = upstream_s
            self.metrics.upstream(scope, resp.status, upstream_s)
            self.clock.observe(resp.headers.get("Date"))
            await self.limiter.observe(scope, resp.headers)
            decision = retry.after_response(
                self.scheme_name,
                out.method,
                resp.status,
                resp.headers,
                self.limiter.is_rate_limited(resp.status, resp.headers),
                self.clock.now(),
            )
            if decision.action is retry.Action.DONE:
                return Exchange(resp, used, sent_at, attempts, queue_wait)
            if decision.action is retry.Action.REAUTH:
                if reauthenticated or not self.scheme.refreshes_on_401:
                    return Exchange(resp, used, sent_at, attempts, queue_wait)
                reauthenticated = True
                log.info("auth_retry_after_401", request_id=event.request_id)
                self.scheme.invalidate(used)
                delay = 0.0
            elif decision.action is retry.Action.RATE_WAIT:
                pause = await self._rate_pause(scope, resp, decision)
                counted = attempts - reauthenticated
                if counted >= cfg.max_attempts or time.monotonic() + pause > deadline:
                    # It cannot wait for the reset: the API's own answer says why.
                    return Exchange(resp, used, sent_at, attempts, queue_wait)
                delay = 0.0  # the held bucket makes the next acquire wait for the reset
            else:
                maybe = self._retry_delay(decision, attempts - reauthenticated, first)
                if maybe is None:
                    return Exchange(resp, used, sent_at, attempts, queue_wait)
                delay = maybe
            resp.release()
            self.inflight.release()
            self._note_retry(event, decision, attempts, delay, resp.status)
            if delay:
                await asyncio.sleep(delay)

    async def _rate_pause(
        self, scope: str, resp: UpstreamResponse, decision: retry.Decision
    ) -> float:
        if decision.delay is not None:  # the server said how long (Retry-After)
            return self.limiter.hold_for(scope, decision.delay)
        if self.scheme_name == "luxsci":
            return await self.limiter.hold(scope, resp.headers)
        # A 429 with no Retry-After: back off like any retry.
        return self.limiter.hold_for(
            scope, retry.backoff(2, self.retries.backoff_base, self.retries.backoff_max)
        )

    def _retry_delay(self, decision: retry.Decision, attempts: int, first: float) -> float | None:
        """The backoff before another attempt, or None when the caps say stop.

        `attempts` excludes the one re-login retry, which the cap does not count.
        """
        if decision.action is retry.Action.DONE or attempts >= self.retries.max_attempts:
            return None
        delay = retry.backoff(attempts, self.retries.backoff_base, self.retries.backoff_max)
        if time.monotonic() + delay - first > self.retries.max_time:
            return None
        return delay

    async def _respond(
        self, request: Request, exchange: Exchange, rid: str, event: AccessRecord
    ) -> tuple[int, int]:
        """Hand the API's answer to the client; returns (status, body bytes sent)."""
        resp = exchange.resp
        status = resp.status
        headers = downstream_block(resp.raw_headers, resp.headers)
        headers += b"X-Request-ID: " + rid.encode() + b"\r\n"
        harvest = self.scheme.harvests and 200 <= status < 300
        length = resp.content_length
        if request.method == "HEAD" or status in (204, 304) or status < 200:
            # No body follows; the upstream's Content-Length still describes the resource.
            request.respond_head(status, headers, length, reason=resp.reason)
            return status, 0

        if length is not None and length <= SMALL_BODY:
            body = await resp.read()
            if harvest:
                code = code_in_body(body, resp.headers.get("Content-Encoding"))
                self.scheme.harvested(exchange.used, exchange.sent_at, code)
            if self.logging.log_bodies:
                event.response_body = body_text(body)
            return status, request.respond(status, headers, body, reason=resp.reason)

        harvester = CodeHarvester(resp.headers.get("Content-Encoding")) if harvest else None
        request.start(status, headers, length, reason=resp.reason)
        sent = 0
        while True:
            try:
                chunk = await resp.readany()
            except ProxyError as e:
                # The head is already sent: all we can do is cut the client off, so it
                # sees a truncated answer rather than a complete-looking wrong one.
                log.warning("upstream_failed_mid_body", request_id=rid, error=e.reason)
                request.abort()
                return status, sent
            if not chunk:
                break
            try:
                await request.write(chunk)
            except ConnectionResetError:
                log.info("client_disconnected_mid_body", request_id=rid)
                return status, sent
            sent += len(chunk)
            if harvester is not None and not harvester.done:
                harvester.feed(chunk)
        request.end()
        if harvester is not None:
            self.scheme.harvested(exchange.used, exchange.sent_at, harvester.result())
        return status, sent
