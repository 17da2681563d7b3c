"""The one error tree for everything the proxy itself answers.

    ProxyError                    (status, reason)
    ├── BadRequest                400 bad_request
    ├── Forbidden                 403 forbidden
    ├── ClientTimeout             408 client_timeout
    ├── BodyTooLarge              413 body_too_large
    ├── HeadersTooLarge           431 headers_too_large
    ├── URITooLong                414 uri_too_long
    ├── TransferCodingNotSupported 501 transfer_coding_not_supported
    ├── HttpVersionNotSupported   505 http_version_not_supported
    ├── JobNotFound               404 job_not_found           (durable jobs, proxy/jobs)
    ├── JobNoResponse             404 job_no_response
    ├── JobMethodNotAllowed       405 method_not_allowed
    ├── JobNotDone                409 job_not_done
    ├── JobNotCancellable         409 job_not_cancellable
    ├── IdempotencyKeyReused      422 idempotency_key_reused
    ├── Unavailable               503, with Retry-After
    │   ├── QueueFull             503 queue_full
    │   ├── QueueTimeout          503 queue_timeout
    │   ├── DailyLimit            503 daily_limit
    │   ├── BudgetSpent           503 budget_spent
    │   ├── ShuttingDown          503 shutting_down
    │   ├── TooManyConnections    503 too_many_connections
    │   ├── JobsFull              503 jobs_full
    │   └── JobsUnavailable       503 jobs_unavailable
    │   └── SpoolUnavailable      503 spool_unavailable
    └── UpstreamError
        ├── UpstreamUnreachable   502 upstream_unreachable
        ├── UpstreamBadResponse   502 upstream_bad_response
        ├── UpstreamTimeout       504 upstream_timeout
        └── UpstreamAuthFailed    502 upstream_auth_failed

Each leaf knows its HTTP status and the `X-Proxy-Error` reason. Messages are
written for the client and the log alike, so they never carry a secret, an
auth code or a signature: build them from fixed text and non-secret values.
Third-party exceptions are translated at the boundary (`raise ... from`).
"""

from __future__ import annotations

import json
import math


class ProxyError(Exception):
    status: int = 500
    reason: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        return {"X-Proxy-Error": self.reason}

    def body(self) -> bytes:
        """LuxSci's own error shape, so legacy clients parse it like any API error."""
        return json.dumps({"success": 0, "error_message": self.message}).encode()


class BadRequest(ProxyError):
    status = 400
    reason = "bad_request"


class Forbidden(ProxyError):
    status = 403
    reason = "forbidden"


class ClientTimeout(ProxyError):
    status = 408
    reason = "client_timeout"


class BodyTooLarge(ProxyError):
    status = 413
    reason = "body_too_large"


class HeadersTooLarge(ProxyError):
    status = 431
    reason = "headers_too_large"


class URITooLong(ProxyError):
    """The request-target alone is over the line limit: RFC 9112 3 says 414, not 431."""

    status = 414
    reason = "uri_too_long"


class TransferCodingNotSupported(ProxyError):
    """A request body in a transfer coding other than chunked alone (RFC 9112 6.1)."""

    status = 501
    reason = "transfer_coding_not_supported"


class HttpVersionNotSupported(ProxyError):
    """A request line with an HTTP version other than 1.0 or 1.1 (RFC 9110 15.6.6)."""

    status = 505
    reason = "http_version_not_supported"


class Unavailable(ProxyError):
    """The request cannot be served in time; `retry_after` says when to try again."""

    status = 503
    reason = "unavailable"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        # Whole seconds, rounded up, at least 1: a client that obeys never comes back early.
        return {**super().headers(), "Retry-After": str(max(1, math.ceil(self.retry_after)))}


class QueueFull(Unavailable):
    reason = "queue_full"


class QueueTimeout(Unavailable):
    reason = "queue_timeout"


class DailyLimit(Unavailable):
    """The day's budget (limits.per_day, or a limits.windows window of a day or more)."""

    reason = "daily_limit"


class BudgetSpent(Unavailable):
    """A limits.windows window of an hour or more, under a day: spent, it is not waited for."""

    reason = "budget_spent"


class ShuttingDown(Unavailable):
    reason = "shutting_down"


class TooManyConnections(Unavailable):
    reason = "too_many_connections"


class JobsFull(Unavailable):
    """jobs.max_jobs jobs are stored: a new one is refused before anything is kept."""

    reason = "jobs_full"


class JobsUnavailable(Unavailable):
    """The job store cannot take or give jobs (disk full, unwritable, unreadable)."""

    reason = "jobs_unavailable"


# -- the job endpoints (proxy/jobs/gateway.py) ------------------------------------------------


class JobNotFound(ProxyError):
    status = 404
    reason = "job_not_found"


class JobNoResponse(ProxyError):
    """The job ended without an answer from the API (cancelled, expired, unknown, ...)."""

    status = 404
    reason = "job_no_response"


class JobMethodNotAllowed(ProxyError):
    status = 405
    reason = "method_not_allowed"


class JobNotDone(ProxyError):
    status = 409
    reason = "job_not_done"


class JobNotCancellable(ProxyError):
    status = 409
    reason = "job_not_cancellable"


class IdempotencyKeyReused(ProxyError):
    status = 422
    reason = "idempotency_key_reused"


class SpoolUnavailable(Unavailable):
    """A large request body could not be written to listen.spool_dir (full, gone)."""

    reason = "spool_unavailable"


class UpstreamError(ProxyError):
    status = 502
    reason = "upstream_error"


class UpstreamUnreachable(UpstreamError):
    status = 502
    reason = "upstream_unreachable"


class UpstreamBadResponse(UpstreamError):
    """The upstream answered, but not with HTTP/1.1 the proxy can relay (unparseable,
    a head or trailers over their cap, a framing it cannot pass on). Not retried: the
    request reached the API, and the same server is likely to answer the same way."""

    status = 502
    reason = "upstream_bad_response"


class UpstreamTimeout(UpstreamError):
    status = 504
    reason = "upstream_timeout"


class UpstreamAuthFailed(UpstreamError):
    """The API refused our credentials (or the auth call failed): not the client's fault."""

    status = 502
    reason = "upstream_auth_failed"
