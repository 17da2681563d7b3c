"""Which outcomes are worth another attempt, and how long to wait: pure, no I/O.

The scheme reads a failed answer first (`AuthScheme.judge`: LuxSci's 401,
rate-limit 403 and 475; a Bearer API's 429). What no scheme claims falls to
the rules every HTTP API shares:
- 408, 502, 503, 504 and a connection lost or timed out after sending: retry
  only idempotent methods (a POST may have been carried out);
- a kept-alive connection the server dropped just as the request went out
  (StaleConnection): idempotent methods go again at once, on a new connection;
- a connection that was never made: retry any method (the API never saw it);
- an answer that is not HTTP/1.1 we can relay (UpstreamBadResponse): never
  retried, since the API has the request and the same server answers alike;
- every other status: passed through untouched.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

from proxy.errors import ProxyError, UpstreamTimeout, UpstreamUnreachable
from proxy.http.client import ConnectFailed, StaleConnection
from proxy.schemes.base import DONE, Action, AuthScheme, Decision

__all__ = ["DONE", "IDEMPOTENT", "Action", "Decision", "after_error", "after_response", "backoff"]

# RFC 9110 9.2.2: repeating these has the same effect as sending them once. The one
# definition: the upstream client never resends anything on its own.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_GATEWAY_STATUSES = frozenset({408, 502, 503, 504})
_STALE = Decision(Action.RETRY, "stale_connection", delay=0.0, fresh_connection=True)
_CONNECT = Decision(Action.RETRY, "connect_failed")
_TIMEOUT = Decision(Action.RETRY, "timeout")
_LOST = Decision(Action.RETRY, "connection_lost")


def after_response(
    scheme: AuthScheme, method: str, status: int, headers: Mapping[str, str], now: float
) -> Decision:
    """What to do with an upstream answer; `now` is the server's clock."""
    if status < 400:
        return DONE
    decision = scheme.judge(status, headers, now)
    if decision is not None:
        return decision
    if status in _GATEWAY_STATUSES and method in IDEMPOTENT:
        return Decision(Action.RETRY, f"status_{status}")
    return DONE


def after_error(method: str, error: ProxyError) -> Decision:
    """What to do when no answer came back."""
    if isinstance(error, ConnectFailed):
        return _CONNECT
    if method not in IDEMPOTENT:
        return DONE
    if isinstance(error, StaleConnection):
        return _STALE
    if isinstance(error, UpstreamTimeout):
        return _TIMEOUT
    if isinstance(error, UpstreamUnreachable):
        return _LOST
    return DONE


def backoff(
    attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**(attempt-1))] (attempt counts from 1)."""
    ceiling: float = min(cap, base * 2.0 ** (attempt - 1))
    return rand() * ceiling
