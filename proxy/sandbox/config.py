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
    # The API refuses requests addressed to any host but the integration's own.
    expected_host: str | None = None

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
