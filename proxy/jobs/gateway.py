"""The jobs' HTTP side on the proxy port: submissions (202) and the job endpoints.

A submission has passed admission and been read like any request (access rules,
body checks, upload hashes: all of it), so a job is a request the proxy would have
sent. It is stored, sealed, and only then answered 202: a job acknowledged is a
job on disk. The client's own credentials are not part of it: `Authorization`,
`Cookie` and `Proxy-Authorization` never reach the outbound lines (outbound.py),
and the client's other cookies are left out of jobs too; the scheme adds the
proxy's credentials when the job is sent.

Who sees a job: the client that submitted it (`access.clients`, or the one client of
`access.client_token`, or "anonymous" when no token is configured): jobs, idempotency
keys included, are kept apart per client name.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import structlog

from proxy.config import JobsConfig
from proxy.errors import (
    BadRequest,
    IdempotencyKeyReused,
    JobMethodNotAllowed,
    JobNoResponse,
    JobNotCancellable,
    JobNotDone,
    JobNotFound,
    JobsFull,
    JobsUnavailable,
)
from proxy.http.server import Request, http_date
from proxy.jobs.callbacks import check_callback
from proxy.jobs.errors import StoreError, UnreadableRecord
from proxy.jobs.model import TERMINAL, Job, State, StoredAnswer, StoredRequest, aad
from proxy.jobs.prefer import RESPOND_ASYNC, wants_async, without_async
from proxy.jobs.seal import Sealer
from proxy.jobs.store import JobStore, NewJob
from proxy.observe.access_record import AccessRecord
from proxy.observe.metrics import Metrics
from proxy.pipeline.admission import Admission, Admitted
from proxy.schemes.base import Outbound

log = structlog.get_logger("proxy.jobs")

CALLBACK_HEADER = "X-Proxy-Callback"
IDEMPOTENCY_HEADER = "Idempotency-Key"
_JOB_ID = re.compile(r"[0-9a-f]{32}")
# Printable ASCII without spaces, as the IETF draft's sf-string keys are in practice.
_KEY = re.compile(r"[\x21-\x7e]{1,255}")
# How long a client should wait before trying again when the store cannot take a job.
_STORE_RETRY_AFTER = 5.0
_FULL_RETRY_AFTER = 60.0


def idempotency_key(value: str | None) -> str | None:
    """The key as sent (a quoted sf-string or a bare token), or BadRequest."""
    if value is None:
        return None
    key = value.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not _KEY.fullmatch(key):
        raise BadRequest(
            f"{IDEMPOTENCY_HEADER} must be 1 to 255 printable ASCII characters without spaces"
        )
    return key


def _idem_hash(owner: str, key: str) -> str:
    # Only a digest is stored: an app may put something meaningful in its keys.
    return hashlib.sha256(f"{owner}\n{key}".encode()).hexdigest()


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


class JobGateway:
    def __init__(
        self,
        cfg: JobsConfig,
        store: JobStore,
        sealer: Sealer,
        admission: Admission,
        metrics: Metrics,
        on_submit: Callable[[], None],
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.sealer = sealer
        # Read for its current policy on every request (a reload replaces the policy).
        self.admission = admission
        self.metrics = metrics
        self.on_submit = on_submit
        self.prefix = cfg.path_prefix

    # -- the Jobs protocol of the forwarder -------------------------------------------------

    def owns(self, raw_path: str) -> bool:
        prefix = self.prefix
        if not raw_path.startswith(prefix):
            return False
        rest = raw_path[len(prefix) :]
        return rest == "" or rest[0] in "/?"

    def wants(self, request: Request) -> bool:
        return "Prefer" in request.headers and wants_async(request.headers.getall("Prefer"))

    async def submit(
        self, request: Request, admitted: Admitted, out: Outbound, rid: str, event: AccessRecord
    ) -> tuple[int, int]:
        headers = request.headers
        callback = headers.get(CALLBACK_HEADER)
        if callback is not None:
            check_callback(callback, self.cfg.callback_allow)
        key = idempotency_key(headers.get(IDEMPOTENCY_HEADER))
        owner = admitted.client.name
        stored = StoredRequest(
            out.method,
            out.path,
            out.query,
            without_async(out.lines),
            # A spooled body is read back whole: a job's body is kept in the store anyway
            # (sealed), and listen.max_body_bytes bounds it.
            out.body.in_memory
            if out.body.in_memory is not None
            else out.body.read(0, out.body.size),
            out.body_digest,
            rid,
            has_query=out.has_query,
        )
        job_id = secrets.token_hex(16)
        now = time.time()
        sealer = self.sealer
        new = NewJob(
            id=job_id,
            owner=owner,
            idem=None if key is None else _idem_hash(owner, key),
            method=out.method,
            scope=admitted.scope,
            created_at=now,
            expires_at=now + self.cfg.max_age,
            request=sealer.seal(stored.encode(), aad(job_id, "request")),
            callback=None
            if callback is None
            else sealer.seal(callback.encode(), aad(job_id, "callback")),
        )
        try:
            result = await self.store.submit(new)
        except StoreError as e:
            log.error("jobs_store_failed", operation="submit", error=str(e))
            raise JobsUnavailable(
                "the job could not be stored, so it was not accepted; send it again later",
                retry_after=_STORE_RETRY_AFTER,
            ) from None
        if result.full:
            raise JobsFull(
                f"the proxy holds {self.cfg.max_jobs} jobs already (jobs.max_jobs); "
                "send it again once some have finished",
                retry_after=_FULL_RETRY_AFTER,
            )
        job = result.job
        assert job is not None
        if not result.created:
            self._check_same(job, stored)
        else:
            self.metrics.job_submitted()
            self.on_submit()
        body = _json({**job.public(), "location": self._location(job.id)})
        answer = [
            ("Content-Type", "application/json"),
            ("Date", http_date()),
            ("X-Request-ID", rid),
            ("Location", self._location(job.id)),
            ("Preference-Applied", RESPOND_ASYNC),
            ("Cache-Control", "no-store"),
        ]
        return 202, request.respond(202, answer, body)

    def _check_same(self, job: Job, stored: StoredRequest) -> None:
        """A repeated Idempotency-Key must come with the same request."""
        try:
            first = StoredRequest.decode(
                self.sealer.open(job.request or b"", aad(job.id, "request"))
            )
        except UnreadableRecord as e:
            log.error("job_record_unreadable", job_id=job.id, record="request", error=str(e))
            raise JobsUnavailable(
                "the job stored under this Idempotency-Key cannot be read; see the proxy log",
                retry_after=_STORE_RETRY_AFTER,
            ) from None
        if not first.same_request(stored):
            raise IdempotencyKeyReused(
                f"this {IDEMPOTENCY_HEADER} was used for job {job.id} with a different "
                "method, target or body; use a new key for a new request"
            )

    async def serve(self, request: Request, rid: str, event: AccessRecord) -> tuple[int, int]:
        policy = self.admission.policy
        policy.check_peer(request.remote)
        policy.identify(request.headers.get("Proxy-Authorization"))
        event.scope = "jobs"
        path = request.raw_path.partition("?")[0]
        event.path = path
        parts = path[len(self.prefix) :].strip("/").split("/")
        if not _JOB_ID.fullmatch(parts[0]) or len(parts) > 2:
            raise JobNotFound("no such job")
        job_id = parts[0]
        method = request.method
        try:
            if len(parts) == 2:
                if parts[1] != "response":
                    raise JobNotFound("no such job resource")
                if method not in ("GET", "HEAD"):
                    raise JobMethodNotAllowed("a job's response is read with GET")
                return await self._replay(request, job_id, rid)
            if method in ("GET", "HEAD"):
                job = await self._job(request, job_id)
                return self._answer(request, 200, job, rid)
            if method == "DELETE":
                return await self._cancel(request, job_id, rid)
            raise JobMethodNotAllowed("a job is read with GET and cancelled with DELETE")
        except StoreError as e:
            log.error("jobs_store_failed", operation="read", error=str(e))
            raise JobsUnavailable(
                "the job store cannot be read right now", retry_after=_STORE_RETRY_AFTER
            ) from None

    # -- the endpoints ----------------------------------------------------------------------

    def _owner(self, request: Request) -> str:
        """Whose jobs the asker may see: its client's (access.clients), by name."""
        return self.admission.policy.identify(request.headers.get("Proxy-Authorization")).name

    async def _job(self, request: Request, job_id: str, blobs: bool = False) -> Job:
        job = await self.store.get(job_id, blobs)
        # Another client's job is answered as if it did not exist: ids are not for probing.
        if job is None or job.owner != self._owner(request):
            raise JobNotFound(f"no job {job_id} (finished jobs are kept jobs.keep_results)")
        return job

    async def _cancel(self, request: Request, job_id: str, rid: str) -> tuple[int, int]:
        await self._job(request, job_id)
        job = await self.store.cancel(job_id, time.time())
        if job is None:
            raise JobNotFound(f"no job {job_id}")
        if job.state is not State.CANCELLED:
            raise JobNotCancellable(
                f"job {job_id} is {job.state.value}: only a queued job can be cancelled"
            )
        if job.finished_at is not None:
            self.metrics.job_completed(State.CANCELLED.value)
        return self._answer(request, 200, job, rid)

    async def _replay(self, request: Request, job_id: str, rid: str) -> tuple[int, int]:
        job = await self._job(request, job_id, blobs=True)
        if job.state not in TERMINAL:
            raise JobNotDone(f"job {job_id} is {job.state.value}; its answer is not in yet")
        if job.response is None:
            raise JobNoResponse(
                f"job {job_id} ended {job.state.value} without an answer from the API"
                + (f": {job.last_error}" if job.last_error else "")
            )
        try:
            answer = StoredAnswer.decode(self.sealer.open(job.response, aad(job_id, "response")))
        except UnreadableRecord as e:
            log.error("job_record_unreadable", job_id=job_id, record="response", error=str(e))
            raise JobsUnavailable(
                f"the stored answer of job {job_id} cannot be read; see the proxy log",
                retry_after=_STORE_RETRY_AFTER,
            ) from None
        headers = answer.headers + b"X-Request-ID: " + rid.encode() + b"\r\n"
        status = answer.status
        if status in (204, 304) or status < 200:
            request.respond_head(status, headers, None, reason=answer.reason)
            return status, 0
        if request.method == "HEAD":
            request.respond_head(status, headers, len(answer.body), reason=answer.reason)
            return status, 0
        return status, request.respond(status, headers, answer.body, reason=answer.reason)

    def _answer(self, request: Request, status: int, job: Job, rid: str) -> tuple[int, int]:
        headers = [
            ("Content-Type", "application/json"),
            ("Date", http_date()),
            ("X-Request-ID", rid),
            ("Cache-Control", "no-store"),
        ]
        body = _json(job.public())
        if request.method == "HEAD":
            request.respond_head(status, headers, len(body))
            return status, 0
        return status, request.respond(status, headers, body)

    def _location(self, job_id: str) -> str:
        return f"{self.prefix}/{job_id}"
