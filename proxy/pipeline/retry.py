"""Which outcomes are worth another attempt, and how long to wait: pure, no I/O.

LuxSci (PROTOCOL.md's table):
- 401: log in again, once (the caller tracks "once").
- 403 with X-RateLimit-Remaining 0: the rate limit; wait for the reset, send again.
- 475 (the request reached the back end incomplete): retry, any method.
- 408, 502, 503, 504 and a connection lost or timed out after sending: retry
  only idempotent methods (a POST may have been carried out).
- a connection that was never made: retry any method (the API never saw it).
- 429 means "too many objects of that type exist": never retried.
- 500 and every other status: passed through untouched.
Bearer-key APIs: 429 *is* the rate limit (honour Retry-After, else back off);
401 is a bad key, never retried.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from proxy.clock import parse_http_date
from proxy.errors import ProxyError, UpstreamTimeout, UpstreamUnreachable
from proxy.http.client import ConnectFailed

# RFC 9110 9.2.2: repeating these has the same effect as sending them once.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_GATEWAY_STATUSES = frozenset({408, 502, 503, 504})


class Action(enum.Enum):
    DONE = "done"  # hand this answer to the client
    REAUTH = "reauth"  # log in again, then send again
    RATE_WAIT = "rate_wait"  # the rate limit: wait for the reset, then send again
    RETRY = "retry"  # back off, then send again


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str = ""
    # Seconds to wait before the next attempt, when the server said (Retry-After).
    delay: float | None = None


DONE = Decision(Action.DONE)


def after_response(
    scheme: str,
    method: str,
    status: int,
    headers: Mapping[str, str],
    rate_limited: bool,
    now: float,
) -> Decision:
    """What to do with an upstream answer; `rate_limited` is the limiter's 403 verdict."""
    if status < 400:
        return DONE
    if scheme == "luxsci":
        if status == 401:
            return Decision(Action.REAUTH, "auth_401")
        if rate_limited:
            return Decision(Action.RATE_WAIT, "rate_limited")
        if status == 475:
            return Decision(Action.RETRY, "incomplete_475")
    elif status == 429:
        return Decision(
            Action.RATE_WAIT, "rate_limited", retry_after(headers.get("Retry-After"), now)
        )
    if status in _GATEWAY_STATUSES and method in IDEMPOTENT:
        return Decision(Action.RETRY, f"status_{status}")
    return DONE


def after_error(method: str, error: ProxyError) -> Decision:
    """What to do when no answer came back."""
    if isinstance(error, ConnectFailed):
        return Decision(Action.RETRY, "connect_failed")
    if isinstance(error, UpstreamTimeout | UpstreamUnreachable) and method in IDEMPOTENT:
        return Decision(
            Action.RETRY, "timeout" if isinstance(error, UpstreamTimeout) else "connection_lost"
        )
    return DONE


def backoff(
    attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**(attempt-1))] (attempt counts from 1)."""
    ceiling: float = min(cap, base * 2.0 ** (attempt - 1))
    return rand() * ceiling


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    when = parse_http_date(value)
    return None if when is None else max(0.0, when - now)
