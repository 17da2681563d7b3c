"""What a job is: its states, its public JSON, and its stored records as bytes. Pure.

A job's request and answer are kept as records (below) sealed by seal.py; the
rest of a job (state, times, counts, method, budget) is plain, since the
runner, the operator's CLI and the metrics read it without a key. Nothing plain
holds a body, a path (a path names a user) or a credential.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from proxy.jobs.errors import UnreadableRecord


class State(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    # Sent, but the answer was never recorded (a crash, a connection lost after
    # sending) and the method is not idempotent: it may or may not have been carried out.
    OUTCOME_UNKNOWN = "outcome_unknown"


TERMINAL = frozenset(
    {State.SUCCEEDED, State.FAILED, State.EXPIRED, State.CANCELLED, State.OUTCOME_UNKNOWN}
)


def iso(t: float | None) -> str | None:
    """Epoch seconds as RFC 3339 UTC with milliseconds (`2024-05-01T12:00:00.000Z`)."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Job:
    """One stored job as the store hands it out (the sealed records not opened)."""

    id: str
    owner: str
    method: str
    scope: str
    state: State
    created_at: float
    expires_at: float
    next_attempt_at: float
    finished_at: float | None
    attempts: int
    last_error: str | None
    response_status: int | None
    callback_state: str | None
    request: bytes | None = None
    response: bytes | None = None
    callback: bytes | None = None

    def public(self) -> dict[str, Any]:
        """The job as clients see it (GET, the 202, callbacks): no body, no path."""
        return {
            "id": self.id,
            "state": self.state.value,
            "created_at": iso(self.created_at),
            "attempts": self.attempts,
            "next_attempt_at": iso(self.next_attempt_at) if self.state is State.QUEUED else None,
            "last_error": self.last_error,
            "response_status": self.response_status,
        }


# -- records ------------------------------------------------------------------------------
#
# A record is a version byte, then length-prefixed fields (4-byte big-endian lengths).
# Bytes, not JSON: header lines and bodies are arbitrary bytes and go back byte for byte.

_VERSION = 1
_LEN = struct.Struct(">I")


def _pack(fields: list[bytes]) -> bytes:
    return bytes([_VERSION]) + b"".join(_LEN.pack(len(f)) + f for f in fields)


def _unpack(data: bytes, count: int, added: int = 0) -> list[bytes]:
    """`count` fields, then up to `added` fields newer versions of the record appended
    (absent from records stored before them: read as b"")."""
    if not data or data[0] != _VERSION:
        raise UnreadableRecord("unknown record version")
    fields = []
    at = 1
    for i in range(count + added):
        if i >= count and at == len(data):
            fields.append(b"")
            continue
        if at + 4 > len(data):
            raise UnreadableRecord("truncated record")
        (n,) = _LEN.unpack_from(data, at)
        at += 4
        if at + n > len(data):
            raise UnreadableRecord("truncated record")
        fields.append(data[at : at + n])
        at += n
    if at != len(data):
        raise UnreadableRecord("trailing bytes in record")
    return fields


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _bytes(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class StoredRequest:
    """The outbound request as it will go upstream, before credentials (never stored)."""

    method: str
    path: str
    query: str
    lines: bytes
    body: bytes
    body_digest: str
    request_id: str
    # The client sent a `?` (forwarded even with nothing after it, as the proxy path
    # does). Appended to the record: one stored before it reads as False.
    has_query: bool = False

    def encode(self) -> bytes:
        return _pack(
            [
                _bytes(self.method),
                _bytes(self.path),
                _bytes(self.query),
                self.lines,
                self.body,
                _bytes(self.body_digest),
                _bytes(self.request_id),
                b"1" if self.has_query else b"",
            ]
        )

    @classmethod
    def decode(cls, data: bytes) -> StoredRequest:
        m, p, q, lines, body, digest, rid, has_query = _unpack(data, 7, added=1)
        return cls(
            _text(m),
            _text(p),
            _text(q),
            lines,
            body,
            _text(digest),
            _text(rid),
            has_query=has_query == b"1",
        )

    def same_request(self, other: StoredRequest) -> bool:
        """Same method, target and body: what an Idempotency-Key promises."""
        return (
            self.method == other.method
            and self.path == other.path
            and self.query == other.query
            and (self.has_query or bool(self.query)) == (other.has_query or bool(other.query))
            and self.body == other.body
        )


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    """The API's answer: status, reason, end-to-end header lines as received, body."""

    status: int
    reason: str
    headers: bytes
    body: bytes

    def encode(self) -> bytes:
        return _pack([str(self.status).encode(), _bytes(self.reason), self.headers, self.body])

    @classmethod
    def decode(cls, data: bytes) -> StoredAnswer:
        status, reason, headers, body = _unpack(data, 4)
        try:
            code = int(status)
        except ValueError:
            raise UnreadableRecord("bad status in record") from None
        return cls(code, _text(reason), headers, body)


def aad(job_id: str, field: str) -> bytes:
    """Associated data binding a sealed record to its job and column."""
    return f"{job_id}/{field}".encode()
