"""Everything the simulated API remembers: sessions, codes, limits, faults, stats.

Plain Python with the clock passed in, so tests can drive it directly and the
HTTP layer (app.py) stays a thin translation of requests into these calls.
"""

from __future__ import annotations

import enum
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.sandbox.config import SandboxConfig, check_clock_offset
from proxy.sandbox.faults import FaultQueue, FaultRule
from proxy.sandbox.oauth_state import OAuthState
from proxy.sandbox.ratelimit import RateLimiter

LOG_SIZE = 1000


class CodeState(enum.Enum):
    VALID = "valid"
    UNKNOWN = "unknown"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass
class _Session:
    user: str | None
    revoked: bool = False


@dataclass
class _Code:
    session_id: str
    issued_at: float
    force_expired: bool = False


@dataclass
class SandboxStats:
    """Counters for tests and the demo; `as_dict()` is what GET /_sandbox/stats returns."""

    auth_calls: int = 0
    auth_failures: int = 0
    requests: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    rate_limited: int = 0
    revocations: int = 0
    faults_fired: int = 0
    dropped: int = 0
    issued_codes: list[str] = field(default_factory=list)
    inflight: int = 0
    max_inflight: int = 0
    log: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=LOG_SIZE))

    def as_dict(self) -> dict[str, Any]:
        return {
            "auth_calls": self.auth_calls,
            "auth_failures": self.auth_failures,
            "requests": self.requests,
            "by_status": dict(self.by_status),
            "rate_limited": self.rate_limited,
            "revocations": self.revocations,
            "faults_fired": self.faults_fired,
            "dropped": self.dropped,
            "issued_codes": list(self.issued_codes),
            "inflight": self.inflight,
            "max_inflight": self.max_inflight,
            "log": list(self.log),
        }


class Sandbox:
    """The state of one simulated LuxSci API integration."""

    def __init__(
        self, config: SandboxConfig | None = None, *, time_source: Callable[[], float] = time.time
    ) -> None:
        self.config = config or SandboxConfig()
        self._time_source = time_source
        self._clock_offset = check_clock_offset(self.config.clock_offset)
        self._sessions: dict[str, _Session] = {}
        self._codes: dict[str, _Code] = {}
        # Session ids look like LuxSci's small integers; a random start keeps two
        # sandboxes (or two runs) from handing out look-alike codes.
        self._next_session = 100 + secrets.randbelow(900)
        self.limiter = RateLimiter(self.config)
        self.faults = FaultQueue()
        self.stats = SandboxStats()
        # The OAuth 2.0 mode's authorization server, when the config asks for that mode.
        self.oauth = None if self.config.oauth is None else OAuthState(self.config.oauth, self.now)

    # -- clock ---------------------------------------------------------------

    def now(self) -> float:
        return self._time_source() + self._clock_offset

    @property
    def clock_offset(self) -> float:
        return self._clock_offset

    def set_clock_offset(self, offset: float) -> None:
        self._clock_offset = check_clock_offset(offset)

    # -- sessions and codes ---------------------------------------------------

    def start_session(self, user: str | None = None) -> str:
        """A new session and its first code."""
        session_id = str(self._next_session)
        self._next_session += 1
        self._sessions[session_id] = _Session(user=user)
        return self.issue_code(session_id)

    def issue_code(self, session_id: str) -> str:
        issued_at = self.now()
        code = f"{session_id}-{int(issued_at)}-{secrets.token_hex(20)}"
        self._codes[code] = _Code(session_id=session_id, issued_at=issued_at)
        self.stats.issued_codes.append(code)
        return code

    def check_code(self, code: str) -> tuple[CodeState, str | None]:
        """The state of a code and the session it belongs to."""
        entry = self._codes.get(code)
        if entry is None:
            return CodeState.UNKNOWN, None
        if self._sessions[entry.session_id].revoked:
            return CodeState.REVOKED, entry.session_id
        if entry.force_expired or self.now() >= entry.issued_at + self.config.code_lifetime:
            return CodeState.EXPIRED, entry.session_id
        return CodeState.VALID, entry.session_id

    def revoke_session(self, session_id: str) -> None:
        self._sessions[session_id].revoked = True

    def revoke_all(self) -> None:
        for session in self._sessions.values():
            session.revoked = True

    def expire_all(self) -> None:
        for entry in self._codes.values():
            entry.force_expired = True

    @property
    def issued_codes(self) -> list[str]:
        return list(self.stats.issued_codes)

    @property
    def log(self) -> list[dict[str, Any]]:
        return list(self.stats.log)

    # -- faults -------------------------------------------------------------------

    def add_fault(
        self, rule: FaultRule | Mapping[str, Any] | None = None, **fields: Any
    ) -> FaultRule:
        """Queue a fault: a FaultRule, a dict of its fields, or the fields as keywords."""
        if rule is None:
            rule = FaultRule.from_dict(fields)
        elif not isinstance(rule, FaultRule):
            rule = FaultRule.from_dict({**rule, **fields})
        self.faults.add(rule)
        return rule

    def clear_faults(self) -> None:
        self.faults.clear()

    def take_fault(self, method: str, raw_path: str) -> FaultRule | None:
        rule = self.faults.take(method, raw_path)
        if rule is not None:
            self.stats.faults_fired += 1
        return rule

    # -- bookkeeping ----------------------------------------------------------------

    def request_started(self) -> None:
        self.stats.inflight += 1
        self.stats.max_inflight = max(self.stats.max_inflight, self.stats.inflight)

    def request_finished(
        self,
        method: str,
        target: str,
        scope: str,
        status: int | None,
        cookies: list[str] | None = None,
    ) -> None:
        """Record one API request; status None means the connection was dropped. `cookies`:
        its Cookie header values as received, so tests can see exactly what was sent."""
        stats = self.stats
        stats.inflight -= 1
        stats.requests += 1
        if status is None:
            stats.dropped += 1
        else:
            key = str(status)
            stats.by_status[key] = stats.by_status.get(key, 0) + 1
        if scope == "auth" and method == "POST":
            stats.auth_calls += 1
            if status != 201:
                stats.auth_failures += 1
        stats.log.append(
            {
                "method": method,
                "target": target,
                "status": status or 0,
                "scope": scope,
                "ts": self.now(),
                "cookies": list(cookies or ()),
            }
        )

    def reset(self) -> None:
        """Back to a fresh start: no sessions, counters, faults or stats; the configured clock."""
        self._clock_offset = self.config.clock_offset
        self._sessions.clear()
        self._codes.clear()
        self.limiter.reset()
        self.faults.clear()
        if self.oauth is not None:
            self.oauth.reset()
        inflight = self.stats.inflight
        self.stats = SandboxStats(inflight=inflight, max_inflight=inflight)
