"""The sandbox's settings: one frozen value, built by tests, the demo or the CLI."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DEFAULT_TOKEN = "sandbox-token"
DEFAULT_SECRET = "sandbox-secret"
DEFAULT_USERS: dict[str, str] = {"joe@example.com": "joe-password"}


# Far enough for any skew experiment, near enough that dates stay printable.
MAX_CLOCK_OFFSET = 100 * 365 * 86400


def check_clock_offset(offset: float) -> float:
    offset = float(offset)
    if not math.isfinite(offset) or abs(offset) > MAX_CLOCK_OFFSET:
        raise ValueError(
            f"clock offset must be finite seconds, at most {MAX_CLOCK_OFFSET} either way"
        )
    return offset


DEFAULT_CLIENT_ID = "sandbox-client"
DEFAULT_CLIENT_SECRET = "sandbox-client-secret"
TOKEN_PATH = "/oauth/token"
RATE_HEADER_STYLES = ("x", "x-delta", "ietf", "ietf-split", "none")


@dataclass(frozen=True)
class OAuthSettings:
    """The sandbox's OAuth 2.0 mode: an authorization server at TOKEN_PATH, and an API
    that wants `Authorization: Bearer <access token>` (RFC 6749, RFC 6750) instead of
    LuxSci's signature cookie. Its rate limit is a 429 with Retry-After, as a Bearer
    API's is. Every field but the client's may be changed while running
    (POST /_sandbox/oauth/settings)."""

    client_id: str = DEFAULT_CLIENT_ID
    client_secret: str = field(default=DEFAULT_CLIENT_SECRET, repr=False)
    # Seconds an access token is valid.
    token_lifetime: float = 3600.0
    # False: answers carry no expires_in (the client must guess, then learn from a 401).
    send_expires_in: bool = True
    # What the answers call the token: anything but Bearer must be refused by a client.
    token_type: str = "Bearer"
    # Every refresh issues a new refresh token and retires the old one (RFC 6749 §6).
    rotate_refresh_tokens: bool = True
    # "any", or the one client authentication method accepted (RFC 6749 §2.3.1).
    client_auth: str = "any"
    # Scopes a client may ask for; empty: any.
    scopes: tuple[str, ...] = ()
    # Seconds the token endpoint takes to answer (to let concurrent callers pile up).
    token_delay: float = 0.0
    # How the API states its limits: x (X-RateLimit-*, reset as epoch seconds), x-delta
    # (reset as seconds from now), ietf (RateLimit + RateLimit-Policy), ietf-split
    # (RateLimit-Limit/-Remaining/-Reset), none.
    rate_headers: str = "x"
    # Retry-After on a 429: "seconds" or "date" (an HTTP-date).
    retry_after: str = "seconds"

    def __post_init__(self) -> None:
        if not self.client_id or not self.client_secret:
            raise ValueError("client_id and client_secret must not be empty")
        if not (math.isfinite(self.token_lifetime) and self.token_lifetime > 0):
            raise ValueError("token_lifetime must be a positive number of seconds")
        if self.client_auth not in ("any", "client_secret_basic", "client_secret_post"):
            raise ValueError("client_auth must be any, client_secret_basic or client_secret_post")
        if self.rate_headers not in RATE_HEADER_STYLES:
            raise ValueError(f"rate_headers must be one of {', '.join(RATE_HEADER_STYLES)}")
        if self.retry_after not in ("seconds", "date"):
            raise ValueError("retry_after must be seconds or date")
        if not (math.isfinite(self.token_delay) and 0 <= self.token_delay <= 60):
            raise ValueError("token_delay must be 0 to 60 seconds")


@dataclass(frozen=True)
class SandboxWindow:
    """One more fixed window the API enforces beside its minute and day: at most
    `requests` per `seconds` (aligned to the epoch on its clock) for the requests of
    `scope`: "user", "account" (logins included) or "all"."""

    requests: int
    seconds: float
    scope: str = "all"

    def __post_init__(self) -> None:
        if self.requests < 0:
            raise ValueError("a window's requests must not be negative")
        if not (math.isfinite(self.seconds) and self.seconds > 0):
            raise ValueError("a window's seconds must be a positive number")
        if self.scope not in ("user", "account", "all"):
            raise ValueError("a window's scope must be user, account or all")


def _default_users() -> dict[str, str]:
    return dict(DEFAULT_USERS)


@dataclass(frozen=True)
class SandboxConfig:
    """How the simulated LuxSci API behaves.

    The secret and the users' passwords are kept out of repr() so a config can
    be logged or shown in a failing test without leaking them.
    """

    token: str = DEFAULT_TOKEN
    secret: str = field(default=DEFAULT_SECRET, repr=False)
    users: dict[str, str] = field(default_factory=_default_users, repr=False)
    code_lifetime: float = 900.0
    # Added to the real time to make the server clock, to exercise client skew handling.
    clock_offset: float = 0.0
    window_seconds: int = 60
    user_per_window: int = 60
    account_per_window: int = 60
    per_day: int = 6000
    day_seconds: int = 86400
    # More windows, each enforced beside the above: a request is refused unless all of
    # its scope's have room (several periods at once, as APIs with limits per second
    # and per hour have).
    windows: tuple[SandboxWindow, ...] = ()
    # The API refuses requests addressed to any host but the integration's own.
    expected_host: str | None = None
    # Set: the OAuth 2.0 mode (see OAuthSettings) instead of LuxSci's signed requests.
    oauth: OAuthSettings | None = None

    def __post_init__(self) -> None:
        if not self.token:
            raise ValueError("token must not be empty")
        if not self.secret:
            raise ValueError("secret must not be empty")
        if not (math.isfinite(self.code_lifetime) and self.code_lifetime > 0):
            raise ValueError("code_lifetime must be a positive number of seconds")
        check_clock_offset(self.clock_offset)
        if self.window_seconds < 1 or self.day_seconds < 1:
            raise ValueError("window_seconds and day_seconds must be at least 1")
        for name in ("user_per_window", "account_per_window", "per_day"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
