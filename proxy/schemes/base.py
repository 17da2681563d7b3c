"""What every auth scheme is: the contract the forwarding pipeline talks to.

The pipeline knows nothing of LuxSci signatures or Bearer keys: it hands the
scheme an `Outbound` request to put credentials on, and asks the scheme what an
answer means (see the scheme modules).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from proxy.schemes.luxsci.session import AuthCode
from proxy.target import Target


@dataclass(slots=True)
class Outbound:
    """One request as it goes upstream (before the auth scheme adds credentials)."""

    method: str
    path: str
    query: str
    # The client's end-to-end header lines, as received (filtered), then ours.
    lines: bytes
    body: bytes
    body_digest: str
    # The client's own cookies, minus any `signature` one; the scheme adds its own.
    cookies: str | None = None
    # The scheme's header lines (Cookie, Authorization): replaced on every attempt.
    credentials: bytes = b""

    def cookie_header(self, extra: str | None = None) -> str | None:
        parts = [c for c in (self.cookies, extra) if c]
        return "; ".join(parts) if parts else None


class AuthScheme(Protocol):
    # Whether a 401 is worth one fresh login and one retry.
    refreshes_on_401: bool
    # Whether success answers carry a fresh auth code (to be harvested from the body).
    harvests: bool

    def budget(self, target: Target) -> str:
        """Which rate-limit budget (scope) a request to `target` spends."""
        ...

    async def apply(self, out: Outbound) -> AuthCode | None:
        """Set `out.credentials`; returns what was used (for invalidate/harvest)."""
        ...

    def invalidate(self, used: AuthCode | None) -> None: ...

    def harvested(self, used: AuthCode | None, sent_at: float, code: str | None) -> None:
        """A success answer to a request sent at `sent_at` with `used` carried `code`."""
        ...
