"""The one hot path: client request in, signed request upstream, answer back unchanged.

A request goes through small steps, each in its own module:
admit (admission.py) → read the body (outbound.py) → attempts: permit,
credentials, send, judge (attempts.py) → answer (relay.py). This module runs
them in order, turns every ProxyError into the proxy's own answer, and writes
one access line and the request metrics per request. Shutdown (drain.py)
tracks the requests in the pipeline. Each answer the proxy makes itself is also
kept, masked, in a small ring for the admin port's status page (`recent_errors`).

Durable jobs (proxy/jobs), when enabled, hook in at two points through `Jobs`:
requests to the job endpoints are theirs before admission (they check the
client themselves), and a request that prefers `respond-async` is admitted and
read like any other, then stored as a job instead of being sent.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Protocol

import structlog

from proxy.config import Config, LoggingConfig
from proxy.errors import BadRequest, ProxyError, ShuttingDown
from proxy.http.body import Spool
from proxy.http.server import Request, error_headers, request_id
from proxy.limits import Lane
from proxy.observe.access_record import AccessRecord
from proxy.observe.log import BODY_LOG_LIMIT, Logs, body_text
from proxy.observe.metrics import Metrics
from proxy.observe.recent import RecentErrors
from proxy.pipeline.admission import APPLIED_HEADER, AccessPolicy, Admission, Admitted
from proxy.pipeline.attempts import Attempts
from proxy.pipeline.drain import Drain
from proxy.pipeline.outbound import read_request
from proxy.pipeline.relay import Relay
from proxy.schemes.base import Outbound
from proxy.target import Kind
from proxy.target import parse as parse_target

log = structlog.get_logger("proxy.access")

_SHUTTING_DOWN = "the proxy is shutting down; send the request again"
_CUT_OFF = "the proxy shut down before this request could be served; send it again"
# The answer's line saying a request was served in a lower lane than it asked for.
_APPLIED_LINES = {lane: f"{APPLIED_HEADER}: {lane.label}\r\n".encode() for lane in Lane}
# Segments of a path the proxy could not parse that the status page still shows: up to
# the API's area (/perl/api/v2/user), plain words only, never the login or what follows.
_UNPARSED_SHOWN = 5
_PLAIN_PIECE = re.compile(r"[A-Za-z0-9_.-]{1,40}")


def shown_path(raw_target: str, admitted: Admitted | None) -> str:
    """A refused request's path as the status page may show it: a user's login masked
    (whatever logging.redact_paths says), never the query string."""
    path = raw_target.partition("?")[0]
    target = admitted.target if admitted is not None else None
    if target is None:
        try:
            target = parse_target(path)
        except BadRequest:
            target = None
    # A target that names a user other than as /user/<login>/ (behind an encoded slash)
    # or one the proxy could not parse (dot-segments, bad escapes, an absolute URL that
    # may carry credentials...): only its harmless head.
    if target is not None and (target.kind is Kind.USER or not target.users):
        return target.masked_path()
    if not path.startswith("/"):
        return "[not a path]"
    pieces = path.split("/")
    shown = 1
    while shown < min(len(pieces), _UNPARSED_SHOWN) and _PLAIN_PIECE.fullmatch(pieces[shown]):
        shown += 1
    return "/".join(pieces[:shown]) + ("/…" if len(pieces) > shown else "")


class Jobs(Protocol):
    """Durable jobs as the pipeline sees them (implemented in proxy/jobs/gateway.py)."""

    def owns(self, raw_path: str) -> bool:
        """The target is a job endpoint (the proxy's own, never forwarded)."""
        ...

    def wants(self, request: Request) -> bool:
        """The request asks to become a job (Prefer: respond-async)."""
        ...

    async def serve(self, request: Request, rid: str, event: AccessRecord) -> tuple[int, int]:
        """Answer a job endpoint request; returns (status, body bytes sent)."""
        ...

    async def submit(
        self, request: Request, admitted: Admitted, out: Outbound, rid: str, event: AccessRecord
    ) -> tuple[int, int]:
        """Store an admitted, read request as a job and answer 202."""
        ...


class Forwarder:
    def __init__(
        self,
        admission: Admission,
        attempts: Attempts,
        relay: Relay,
        metrics: Metrics,
        logs: Logs,
        cfg: Config,
        spool: Spool,
        jobs: Jobs | None = None,
    ) -> None:
        self.admission = admission
        self.attempts = attempts
        self.relay = relay
        self.metrics = metrics
        # The service's logs: the access line goes there (the other events find them
        # through the context the request is served in).
        self.logs = logs
        self.drain = Drain()
        # The latest answers made by the proxy itself, for the status page.
        self.recent_errors = RecentErrors()
        self.jobs = jobs
        self.spool = spool
        # The integration's name on its access lines; None for a config without
        # `integrations:`, whose lines stay as they were.
        self.integration: str | None = None
        self.max_body = cfg.listen.max_body_bytes
        self.client_timeout = cfg.listen.client_timeout
        # Replaced whole on reload (SIGHUP), never mutated.
        self.logging: LoggingConfig = cfg.logging

    def reconfigure(self, cfg: Config) -> None:
        """Reload: settings read per request are swapped whole."""
        self.admission.queue = cfg.queue
        self.admission.policy = AccessPolicy(cfg.access, cfg.queue.max_size)
        self.attempts.retries = cfg.retry
        self.attempts.sender.inflight.resize(cfg.limits.max_inflight)
        self.relay.log_bodies = cfg.logging.log_bodies
        self.logging = cfg.logging

    @property
    def inflight_count(self) -> int:
        return self.attempts.sender.inflight.held

    @property
    def draining(self) -> bool:
        return self.drain.draining

    async def __call__(self, request: Request) -> None:
        started = time.monotonic()
        rid = request_id(request.headers.get("X-Request-ID"))
        event = AccessRecord(rid, request.method, integration=self.integration)
        # At debug, every event made while serving this request (a wait for a permit,
        # the code that signed it) carries its id; the connection's task serves one
        # request at a time, so its context holds one id at a time.
        explained = self.logs.debug_flag.on
        if explained:
            structlog.contextvars.bind_contextvars(request_id=rid)
        drain = self.drain
        drain.add(request)
        admitted: Admitted | None = None
        try:
            if drain.draining:
                # Stopping: a request on a kept-alive connection goes to another replica.
                raise ShuttingDown(_SHUTTING_DOWN, 1)
            jobs = self.jobs
            if jobs is not None and jobs.owns(request.raw_path):
                # The job endpoints are the proxy's own (the gateway checks who asks).
                status, sent = await jobs.serve(request, rid, event)
            else:
                admitted = self.admission.admit(request, started)
                status, sent = await self._forward(request, admitted, rid, event)
        except ProxyError as e:
            status, sent = self._refuse(request, e, rid, event, admitted)
        except asyncio.CancelledError:
            if not drain.cut_off(request) or request.task is None:
                # The client went away (the server cancels its handler): nothing to answer.
                drain.discard(request)
                event.error = "client_disconnected"
                event.total_time = time.monotonic() - started
                self.logs.access(event)
                if explained:
                    structlog.contextvars.unbind_contextvars("request_id")
                raise
            # The drain's grace ran out before this request was served: say so.
            request.task.uncancel()
            status, sent = self._refuse(request, ShuttingDown(_CUT_OFF, 1), rid, event, admitted)
        except Exception:
            # A bug, not the client's fault: answer anyway, and leave the traceback in the log.
            log.exception("internal_error", request_id=rid)
            error = ProxyError("internal proxy error; see the proxy log")
            status, sent = self._refuse(request, error, rid, event, admitted)
        drain.discard(request)
        event.status = status
        event.bytes_out = sent
        elapsed = event.total_time = time.monotonic() - started
        self.metrics.request(request.method, event.scope or "account", status, elapsed)
        self.logs.access(event)
        if explained:
            structlog.contextvars.unbind_contextvars("request_id")

    async def _forward(
        self, request: Request, admitted: Admitted, rid: str, event: AccessRecord
    ) -> tuple[int, int]:
        target = admitted.target
        out = await read_request(request, target, self.spool, self.max_body, self.client_timeout)
        body = out.body
        try:
            logging = self.logging
            event.path = target.masked_path() if logging.redact_paths else target.path
            event.scope = admitted.label
            lane = admitted.lane
            event.lane = lane.label
            event.client = admitted.client.name
            event.bytes_in = body.size
            if logging.log_bodies:
                # One past the limit, so the log line says it was cut.
                event.request_body = body_text(body.read(0, BODY_LOG_LIMIT + 1))
            out.lines += b"X-Request-ID: " + rid.encode() + b"\r\n"
            jobs = self.jobs
            if jobs is not None and jobs.wants(request):
                return await jobs.submit(request, admitted, out, rid, event)
            exchange = await self.attempts.run(
                out, admitted.scope, admitted.deadline, event, lane, admitted.client
            )
        finally:
            # Every outcome (answer, error, client gone, shutdown's cut-off): the body's
            # memory goes back to the global cap, its spool file is closed. No attempt
            # follows the final answer, so it goes before a long answer is relayed.
            body.close()
        event.upstream_status = exchange.resp.status
        try:
            note = _APPLIED_LINES[lane] if admitted.capped else b""
            return await self.relay(request, exchange, rid, event, note)
        finally:
            exchange.close()

    def _refuse(
        self,
        request: Request,
        error: ProxyError,
        rid: str,
        event: AccessRecord,
        admitted: Admitted | None,
    ) -> tuple[int, int]:
        """An answer the proxy makes itself: counted, logged with the request, sent."""
        event.error = error.reason
        event.error_message = error.message
        self.metrics.rejected(error.reason)
        self.recent_errors.record(
            error.status,
            error.reason,
            request.method,
            shown_path(request.raw_path, admitted),
            admitted.client.name if admitted is not None else None,
            rid,
        )
        if request.started:
            # Too late for an answer of our own: the client sees a cut-off one instead.
            request.abort()
            return error.status, 0
        headers = error_headers(error, rid)
        if admitted is not None and admitted.capped:
            # It may have waited in a lower lane than it asked for: say so here too.
            headers.append((APPLIED_HEADER, admitted.lane.label))
        return error.status, request.respond(error.status, headers, error.body())
