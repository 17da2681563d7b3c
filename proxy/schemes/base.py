"""What every auth scheme is: the contract the forwarding pipeline talks to.

The pipeline knows nothing of LuxSci signatures, auth codes or Bearer keys. It
hands a scheme an `Outbound` request to put credentials on, asks it which
budget a target spends, what a failed answer means (`judge`), and lets it read
success answers as they pass (`watch`). Everything an API does differently
lives behind these few calls, so adding a scheme is one module plus its entry
in the registry (schemes/registry.py); no scheme name is compared anywhere else.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.config import AuthConfig
from proxy.http.body import Body
from proxy.target import Target


@dataclass(slots=True)
class Outbound:
    """One request as it goes upstream (before the auth scheme adds credentials)."""

    method: str
    path: str
    query: str
    # The client's end-to-end header lines, as received (filtered), then ours.
    lines: bytes
    # In memory or spooled (proxy/http/body.py); whoever made the Outbound closes it.
    body: Body
    # What is signed for the body (PROTOCOL.md body_hash; a multipart upload: its json part's).
    body_digest: str
    # The client's own cookies, minus any `signature` one; the scheme adds its own.
    cookies: str | None = None
    # The scheme's header lines (Cookie, Authorization): replaced on every attempt.
    credentials: bytes = b""
    # The client sent a `?`: it goes upstream even when the query is empty (`/p?`).
    has_query: bool = False

    def cookie_header(self, extra: str | None = None) -> str | None:
        parts = [c for c in (self.cookies, extra) if c]
        return "; ".join(parts) if parts else None


class Credential:
    """What a scheme put on one attempt, so it can tell later which answer it earned."""

    __slots__ = ()


class Action(enum.Enum):
    DONE = "done"  # hand this answer to the client
    REAUTH = "reauth"  # fresh credentials, then send again (at most once per request)
    RATE_WAIT = "rate_wait"  # the API's rate limit: wait, then send again
    RETRY = "retry"  # back off, then send again


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after an attempt; `reason` labels retries_total and the log."""

    action: Action
    reason: str = ""
    # Seconds to wait before the next attempt, when the server said (Retry-After).
    delay: float | None = None
    # RATE_WAIT: the API names its window's reset in X-RateLimit-Reset; wait for that.
    until_reset: bool = False
    # RETRY: send the next attempt on a new connection, at once (a stale kept-alive one).
    fresh_connection: bool = False


DONE = Decision(Action.DONE)


def login_reason(has_current: bool, ever_authenticated: bool, failing: bool) -> str:
    """Why a session fetches new credentials now (the `reason` of its log events): the
    current ones aged out, the first login, a retry after a failure, or a 401."""
    if has_current:
        return "expired"
    if not ever_authenticated:
        return "startup"
    if failing:
        return "retry"
    return "after_401"


class AnswerWatch(Protocol):
    """Reads a success answer on its way to the client (never holds it whole)."""

    def whole(self, body: bytes) -> None:
        """The answer's entire body, when it was small enough to be read at once."""

    def feed(self, chunk: bytes) -> None:
        """The next chunk of a streamed body."""

    def end(self) -> None:
        """The streamed body is complete."""


class AuthScheme(Protocol):
    # For the build-info metric and the startup log line only, never for decisions.
    name: str

    def budget(self, target: Target) -> str:
        """Which rate-limit budget (scope) a request to `target` spends."""
        ...

    async def apply(self, out: Outbound) -> Credential | None:
        """Set `out.credentials`; returns what was used (for `judge`, `retire`, `watch`)."""
        ...

    def judge(self, status: int, headers: Mapping[str, str], now: float) -> Decision | None:
        """This API's reading of a failed answer (status >= 400), or None for the generic
        rules (pipeline/retry.py). `now`: the server's clock, for Retry-After dates."""
        ...

    def retire(self, used: Credential | None) -> None:
        """`used` earned a REAUTH: never sign with it again."""
        ...

    def watch(
        self, used: Credential | None, sent_at: float, headers: Mapping[str, str]
    ) -> AnswerWatch | None:
        """A reader for a success answer to a request sent at `sent_at` with `used`, or None
        when this scheme learns nothing from answers."""
        ...

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Get credentials before the first request, when the scheme has any to get."""
        ...

    async def stop(self) -> None:
        """End the session server-side on shutdown, when there is one."""
        ...

    def status(self) -> dict[str, Any]:
        """The readiness check's entry: {"ok": bool, ...}."""
        ...

    def credential_age(self) -> float | None:
        """Seconds since the current credential was earned; None when it does not age."""
        ...

    def valid(self) -> bool:
        """Holds a credential it would use right now."""
        ...

    async def reconfigure(self, auth: AuthConfig) -> None:
        """A reload: new credentials take effect (the scheme itself never changes)."""
        ...
