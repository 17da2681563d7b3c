"""The job endpoints' answers of their own: leaves of the one ProxyError tree.

    ProxyError
    ├── JobNotFound               404 job_not_found
    ├── JobNoResponse             404 job_no_response
    ├── JobMethodNotAllowed       405 method_not_allowed
    ├── JobNotDone                409 job_not_done
    ├── JobNotCancellable         409 job_not_cancellable
    ├── IdempotencyKeyReused      422 idempotency_key_reused
    └── Unavailable
        ├── JobsFull              503 jobs_full
        └── JobsUnavailable       503 jobs_unavailable

They live with the feature rather than in proxy/errors.py; they are ProxyErrors
like any other, so the forwarder answers them in the same shape.
"""

from __future__ import annotations

from proxy.errors import ProxyError, Unavailable


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


class JobsFull(Unavailable):
    reason = "jobs_full"


class JobsUnavailable(Unavailable):
    """The store cannot take or give jobs (disk full, unwritable, unreadable)."""

    reason = "jobs_unavailable"


class StoreError(Exception):
    """A store operation failed for a reason of the store's own (I/O, a full disk).

    Raised by the store and turned into JobsUnavailable at the HTTP edge; the message
    names the store's file and the fault, never a record's content."""


class UnreadableRecord(Exception):
    """A stored record that cannot be opened: no key for it, tampered, or corrupt."""
