"""The LuxSci auth session: which auth code to sign with, and getting a new one.

Life of a session
- `start()` authenticates once so /readyz tells the truth from the start.
- Every success response carries a fresh code; `offer()` keeps the newest, so a
  busy proxy never authenticates again. Codes live `code_lifetime` seconds from
  when the request that earned them was *sent* (the server issued them later,
  so this errs on the safe side); a code within `refresh_margin` of that is not
  used: `code()` authenticates afresh instead. An idle proxy makes no calls.
- A 401 means the session is dead (revoked, expired or never valid):
  `invalidate()` drops every code of that login *generation*, and the next
  `code()` authenticates. Concurrent callers share one authentication call
  (single-flight: one task, awaited through `shield` so a client that goes
  away does not cancel it for the others).
- A failed authentication is remembered with the API's message: callers get it
  at once (no hammering), and a background task retries with doubling backoff.
- `revoke()` on shutdown ends the session server-side.
- Logins spend the account rate budget (the safe reading of the API's limits),
  ahead of the queue: every waiting request needs the code. A login refused
  for rate waits for the window's reset instead of counting as a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from multidict import CIMultiDictProxy

from proxy.clock import ServerClock
from proxy.config import AuthConfig
from proxy.errors import ProxyError, UpstreamAuthFailed
from proxy.http.client import Upstream
from proxy.http.headers import header_line, header_lines
from proxy.limits import Lane, RateLimiter
from proxy.observe.metrics import Metrics
from proxy.schemes.base import Credential, login_reason
from proxy.schemes.luxsci import rules, signing
from proxy.target import AUTH_PATH

_LOGIN_LINES = header_lines([("Content-Type", "application/json"), ("Accept", "application/json")])

log = structlog.get_logger("proxy.session")


@dataclass(frozen=True, slots=True)
class AuthCode(Credential):
    value: str
    # Monotonic time the request that earned this code was sent.
    obtained_at: float
    # Which login the code belongs to; a 401 kills the whole generation.
    generation: int

    def __repr__(self) -> str:  # never show the code itself
        return f"AuthCode(generation={self.generation}, obtained_at={self.obtained_at:.3f})"


def api_error_message(body: bytes, status: int) -> str:
    """The API's `error_message`, or a description of the status when there is none."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # the API's body, any shape
        data = None
    if isinstance(data, dict) and isinstance(data.get("error_message"), str):
        # Bounded: this text goes to clients and logs.
        return str(data["error_message"])[:300]
    return f"HTTP {status} without an API error message"


def _auth_result(status: int) -> str:
    """auth_requests_total's result label for one login answer."""
    if 200 <= status < 300:
        return "success"
    return "rejected" if 400 <= status < 500 else "error"


class LuxSciSession:
    def __init__(
        self,
        cfg: AuthConfig,
        upstream: Upstream,
        clock: ServerClock,
        monotonic: Callable[[], float] = time.monotonic,
        limiter: RateLimiter | None = None,
        permit_wait: float = 30.0,
        metrics: Metrics | None = None,
    ) -> None:
        assert cfg.token is not None and cfg.secret is not None
        self.cfg = cfg
        self._token = cfg.token.get()
        self._secret = cfg.secret.get()
        self._upstream = upstream
        self._clock = clock
        self._monotonic = monotonic
        self._limiter = limiter
        self._permit_wait = permit_wait
        self._metrics = metrics or Metrics()
        self._current: AuthCode | None = None
        self._generation = 0
        # Logins up to this one ended with a 401 (or a revoke): their codes are never taken back.
        self._dead_generation = 0
        self._auth_task: asyncio.Task[AuthCode] | None = None
        self._retry_task: asyncio.Task[None] | None = None
        # Failure state: the error callers get while we back off, and until when.
        self._failure: ProxyError | None = None
        self._retry_at = 0.0
        self._backoff = cfg.retry_min
        self.auth_calls = 0
        self.ever_authenticated = False

    # -- state for /readyz -------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Authenticated once, and the latest attempt did not fail."""
        return self.ever_authenticated and self._failure is None

    def status(self) -> dict[str, Any]:
        if self._failure is not None:
            return {"ok": False, "error": self._failure.message}
        if not self.ever_authenticated:
            return {"ok": False, "error": "not authenticated yet"}
        return {"ok": True}

    def code_age(self) -> float | None:
        """Seconds since the newest code was earned; None without one."""
        current = self._current
        return None if current is None else self._monotonic() - current.obtained_at

    def valid(self) -> bool:
        """Holds a code it would sign with right now."""
        return self._usable(self._current, self._monotonic())

    def age(self, code: AuthCode) -> float:
        """Seconds since the request that earned `code` was sent."""
        return self._monotonic() - code.obtained_at

    def usable_for(self, code: AuthCode, age: float) -> float:
        """Seconds `code` (this old) will still be signed with, if no newer one comes."""
        return self.cfg.code_lifetime - self.cfg.refresh_margin - age

    # -- the signer's view -------------------------------------------------------

    def cookie(self, code: str, method: str, path: str, query: str, body_digest: str) -> str:
        """The Cookie value that signs one request with `code`: `signature=<code>:<sig>`,
        preceded by `auth=<code>` with auth.auth_cookie (PROTOCOL.md: the document speaks of
        two cookies, its example sends one). Read per call: a reload may change either."""
        signed = signing.signature_cookie(self._secret, code, method, path, query, body_digest)
        if self.cfg.auth_cookie:
            return f"auth={code}; signature={signed}"
        return f"signature={signed}"

    def _usable(self, code: AuthCode | None, now: float) -> bool:
        return (
            code is not None
            and now < code.obtained_at + self.cfg.code_lifetime - self.cfg.refresh_margin
        )

    async def code(self) -> AuthCode:
        """A code fresh enough to sign with, authenticating first if needed."""
        now = self._monotonic()
        current = self._current
        if current is not None and self._usable(current, now):
            return current
        if self._failure is not None and now < self._retry_at and self._auth_task is None:
            raise self._failure
        if self._auth_task is None:
            reason = login_reason(
                current is not None, self.ever_authenticated, self._failure is not None
            )
            self._start_login(reason)
        assert self._auth_task is not None
        return await asyncio.shield(self._auth_task)

    def _start_login(self, reason: str) -> None:
        self._auth_task = asyncio.get_running_loop().create_task(self._authenticate(reason))
        self._auth_task.add_done_callback(self._auth_done)

    def offer(self, value: str, used: AuthCode, sent_at: float) -> None:
        """A success answer to a request signed with `used` (sent at `sent_at`) carried `value`."""
        if used.generation != self._generation or used.generation <= self._dead_generation:
            # A late answer from a login that has ended: its codes are dead too.
            return
        current = self._current
        if current is None or sent_at > current.obtained_at:
            self._current = AuthCode(value, sent_at, used.generation)

    def invalidate(self, used: AuthCode) -> None:
        """The API answered 401 to a request signed with `used`: its login is over."""
        self._dead_generation = max(self._dead_generation, used.generation)
        current = self._current
        if current is not None and current.generation == used.generation:
            log.info("auth_session_invalidated", generation=used.generation)
            self._current = None

    # -- authentication ----------------------------------------------------------

    def _auth_done(self, task: asyncio.Task[AuthCode]) -> None:
        self._auth_task = None
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not warn when nobody awaited it

    async def _authenticate(self, reason: str) -> AuthCode:
        try:
            code = await self._login(reason)
        except ProxyError as e:
            self._fail(e)
            raise
        self._failure = None
        self._backoff = self.cfg.retry_min
        self.ever_authenticated = True
        self._current = code
        return code

    async def _login(self, reason: str) -> AuthCode:
        """POST /auth; after a date rejection caused by our clock, once more with the server's."""
        attempt = 0
        rate_waits = 0
        while True:
            attempt += 1
            signed_date = int(self._clock.now())
            sent_at = self._monotonic()
            try:
                status, headers, body = await self._post_auth(str(signed_date))
            except ProxyError:
                self._metrics.auth("error")  # the API could not be reached
                raise
            limiter = self._limiter
            limited = limiter is not None and rules.rate_limited(status, headers)
            self._metrics.auth("rate_limited" if limited else _auth_result(status))
            if limiter is not None and limited and rate_waits < 3:
                rate_waits += 1
                attempt -= 1
                await limiter.hold("account", headers)
                continue
            if 200 <= status < 300:
                value = self._code_from(body)
                self._generation += 1
                log.info(
                    "auth_succeeded", reason=reason, generation=self._generation, attempt=attempt
                )
                return AuthCode(value, sent_at, self._generation)
            # The failure's Date header has corrected the clock; if our date was
            # the problem, the second try uses the server's time.
            if (
                attempt == 1
                and status in (400, 401, 403)
                and not self._clock.in_window(signed_date)
            ):
                log.warning(
                    "auth_clock_skew_corrected", offset_seconds=round(self._clock.offset, 1)
                )
                continue
            message = api_error_message(body, status)
            raise UpstreamAuthFailed(
                f"authentication with the API failed (HTTP {status}): {message}"
            )

    async def _post_auth(self, date: str) -> tuple[int, CIMultiDictProxy[str], bytes]:
        payload: dict[str, str] = {"token": self._token, "date": date}
        user = self.cfg.user
        password = self.cfg.password.get() if self.cfg.password is not None else None
        payload["signature"] = signing.auth_signature(
            self._secret, self._token, date, user, password
        )
        if user is not None:
            payload["user"] = user
            payload["pass"] = password or ""
        if self._limiter is not None:
            # Limiter deadlines are time.monotonic(), whatever clock this session runs on.
            # High lane, at its head: every request waiting for credentials waits for it.
            await self._limiter.acquire(
                "account", time.monotonic() + self._permit_wait, front=True, lane=Lane.HIGH
            )
        self.auth_calls += 1
        resp = await self._upstream.request(
            "POST",
            AUTH_PATH,
            "",
            _LOGIN_LINES,
            json.dumps(payload).encode(),
        )
        self._metrics.upstream_response(resp.status)
        async with resp:
            self._clock.observe(resp.headers.get("Date"))
            if self._limiter is not None:
                await self._limiter.observe("account", resp.headers)
            body = await resp.read()
        return resp.status, resp.headers, body

    @staticmethod
    def _code_from(body: bytes) -> str:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("auth"), str) or not data["auth"]:
            raise UpstreamAuthFailed("authentication answered success but carried no auth code")
        value: str = data["auth"]
        return value

    def _fail(self, error: ProxyError) -> None:
        self._failure = error
        self._current = None
        # Full jitter keeps a fleet of proxies from retrying in step.
        delay = random.uniform(self._backoff / 2, self._backoff)
        self._retry_at = self._monotonic() + delay
        log.warning(
            "auth_failed", reason=error.reason, error=error.message, retry_in_s=round(delay, 2)
        )
        self._backoff = min(self._backoff * 2, self.cfg.retry_max)
        if self._retry_task is None or self._retry_task.done():
            self._retry_task = asyncio.get_running_loop().create_task(self._retry_loop())

    async def _retry_loop(self) -> None:
        """Keep trying in the background while failed, so /readyz recovers without traffic."""
        while self._failure is not None:
            await asyncio.sleep(max(0.0, self._retry_at - self._monotonic()))
            if self._failure is None:
                return
            try:
                if self._auth_task is None:
                    self._start_login("retry")
                assert self._auth_task is not None
                await asyncio.shield(self._auth_task)
            except ProxyError:
                pass  # _fail() already scheduled the next attempt

    async def change_credentials(self, cfg: AuthConfig) -> None:
        """Reload with other credentials: end the old login, then log in with the new ones."""
        await self.revoke()
        assert cfg.token is not None and cfg.secret is not None
        self.cfg = cfg
        self._token = cfg.token.get()
        self._secret = cfg.secret.get()
        self._failure = None
        self._backoff = cfg.retry_min
        self.ever_authenticated = False
        log.info("auth_credentials_changed")
        await self.start()

    async def start(self) -> None:
        """Authenticate at start-up; a failure is not fatal (we keep trying)."""
        with contextlib.suppress(ProxyError):
            await self.code()

    async def revoke(self) -> bool:
        """DELETE /auth with the newest usable code; True when the API confirmed it."""
        if self._retry_task is not None:
            self._retry_task.cancel()
        current = self._current
        if current is None or not self._usable(current, self._monotonic()):
            return False
        cookie = self.cookie(current.value, "DELETE", AUTH_PATH, "", "")
        self._current = None
        self._dead_generation = current.generation
        try:
            resp = await asyncio.wait_for(
                self._upstream.request("DELETE", AUTH_PATH, "", header_line("Cookie", cookie), b""),
                timeout=10,
            )
            async with resp:
                await resp.read()
        except (ProxyError, TimeoutError) as e:
            log.warning("auth_revoke_failed", error=str(e))
            self._metrics.auth("revoke_failed")
            return False
        ok = 200 <= resp.status < 300
        self._metrics.auth("revoked" if ok else "revoke_failed")
        log.info("auth_revoked" if ok else "auth_revoke_failed", status=resp.status)
        return ok
