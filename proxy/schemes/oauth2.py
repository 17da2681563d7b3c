"""OAuth 2.0 APIs (RFC 6749, RFC 6750): a short-lived Bearer access token, refreshed.

Life of a token
- `start()` fetches one so /readyz tells the truth from the start.
- A token is used until `expires_in` runs out, counted from when the request that
  earned it was *sent* (the server issued it later: this errs on the safe side). From
  `auth.refresh_margin` seconds before that (at most half its life), the first request
  starts a refresh in the background and every request keeps using the current token
  until the new one is in, so a busy proxy never waits for a refresh. An idle proxy makes
  no calls; the next request fetches a token first. No `expires_in`: assume
  ASSUMED_LIFETIME seconds, and a 401 ends it early anyway.
- A 401 from the API ends that token: `retire()` drops it, and the request is sent once
  more with a new one (the pipeline's single REAUTH).
- Every fetch is single-flight: one task, awaited through `shield` so a client that goes
  away does not cancel it for the others; 50 requests that need a token share one call.
- A failure (a §5.2 error, a non-Bearer token_type, an unreachable endpoint) is
  remembered with its message: callers get `502 upstream_auth_failed` at once while
  the current token, if any, has run out, and a background task retries with doubling,
  jittered backoff (`auth.retry_min` to `auth.retry_max`) so /readyz recovers alone.
- grant refresh_token: a rotated refresh token (§6) is written to the state file
  (oauth2_state.py, encrypted) before its access token is used; a restart starts from
  the newest one.
- `auth.state_store` (Redis): the replicas of one integration share the access token
  and the newest refresh token (oauth2_shared.py). A fetch reads Redis first and uses a
  token another replica got; only the holder of the Redis lock calls the token endpoint,
  the others poll Redis for what it writes. Redis unreachable: the local path above,
  said once in the log and in /readyz; Redis is asked again after SHARED_RETRY seconds.

The token endpoint gets a small pool of its own (our HTTP client, TLS verified with
`upstream.ca_file` like the API): it may be another host, and a busy API pool must
never make a refresh wait for a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import structlog

from proxy.clock import retry_after
from proxy.config import AuthConfig, UpstreamConfig, state_dir, url_passwords
from proxy.errors import ProxyError, UpstreamAuthFailed
from proxy.http.client import Upstream
from proxy.http.headers import header_line, header_lines
from proxy.jsonbounds import PARSE_LIMIT
from proxy.observe.metrics import Metrics
from proxy.schemes.base import (
    Action,
    AnswerWatch,
    Credential,
    Decision,
    Outbound,
    login_reason,
)
from proxy.schemes.bearer import judge_rate_limit
from proxy.schemes.oauth2_shared import SharedRecord, SharedStoreUnavailable, SharedTokens
from proxy.schemes.oauth2_state import (
    StateUnreadable,
    StoredToken,
    TokenStore,
    fingerprint,
    parse_keys,
)
from proxy.schemes.oauth2_token import TokenError, TokenGrant, parse_token_response, token_request
from proxy.target import Target

log = structlog.get_logger("proxy.oauth2")

REAUTH = Decision(Action.REAUTH, "auth_401")
# A token answer is a few hundred bytes; more than this is not a token endpoint talking
# (and is more than the proxy parses on its event loop).
MAX_TOKEN_ANSWER = PARSE_LIMIT
# The token endpoint's pool: one call at a time (single flight), one spare.
_POOL_SIZE = 2
# After Redis failed, how long the local path is used without asking it again: a
# refresh during an outage should not wait for a timeout every time.
SHARED_RETRY = 5.0
# Polling Redis for the token another replica is fetching: first and longest pause.
_POLL_MIN = 0.02
_POLL_MAX = 0.25


@dataclass(frozen=True, slots=True)
class AccessToken(Credential):
    value: str = field(repr=False)
    # Monotonic times: the request that earned it went out; it expires; a refresh is due.
    obtained_at: float
    expires_at: float
    refresh_at: float
    generation: int


def endpoint_config(upstream: UpstreamConfig, token_url: str) -> UpstreamConfig:
    """The token endpoint's pool: its own origin, the API's TLS trust and timeouts."""
    parts = urlsplit(token_url)
    return dataclasses.replace(
        upstream, url=f"{parts.scheme}://{parts.netloc}", pool_size=_POOL_SIZE
    )


def state_path(auth: AuthConfig, integration: str = "") -> Path | None:
    """Where a rotated refresh token is kept: auth.state_file, else a file in the state
    directory named after the token URL and client id, and the integration when the
    config lists several (two may use one client); None when kept in memory only."""
    if auth.state_file is not None:
        return Path(auth.state_file) if auth.state_file else None
    assert auth.token_url is not None and auth.client_id is not None
    digest = fingerprint(_binding(auth))[:16]
    # The one integration of a config without the list keeps today's name, and its state.
    return state_dir() / (
        f"oauth2-{integration}-{digest}.state" if integration else f"oauth2-{digest}.state"
    )


def _binding(auth: AuthConfig) -> str:
    """What a state file belongs to: a file of another integration must not be used."""
    return f"{auth.token_url}\n{auth.client_id}"


def token_store(auth: AuthConfig, integration: str = "") -> TokenStore | None:
    """The store of rotated refresh tokens, or None (grant client_credentials, or "")."""
    if auth.grant != "refresh_token":
        return None
    path = state_path(auth, integration)
    if path is None:
        return None
    assert auth.state_key is not None  # the config check demands one
    return TokenStore(path, parse_keys(auth.state_key.get()), _binding(auth))


def shared_tokens(
    auth: AuthConfig, upstream: UpstreamConfig, integration: str = ""
) -> SharedTokens | None:
    """The Redis store the replicas share, or None (no auth.state_store). The lock outlives
    the longest token call a holder can make, so no second replica refreshes meanwhile."""
    if not auth.state_store:
        return None
    assert auth.state_key is not None  # the config check demands one
    return SharedTokens(
        auth.state_store,
        parse_keys(auth.state_key.get()),
        _binding(auth),
        integration,
        lock_ttl=upstream.connect_timeout + upstream.read_timeout + 5.0,
    )


def _ignore(secrets: Iterable[str]) -> None:
    pass


class OAuth2Session:
    """Which access token to send, and getting a new one."""

    def __init__(
        self,
        cfg: AuthConfig,
        endpoint: Upstream,
        metrics: Metrics | None = None,
        redact: Callable[[Iterable[str]], None] = _ignore,
        monotonic: Callable[[], float] = time.monotonic,
        integration: str = "",
    ) -> None:
        # The listed integration it serves ("" for the one of a config without the
        # list): part of the state file's default name.
        self.integration = integration
        self._endpoint = endpoint
        self._metrics = metrics or Metrics()
        self._redact = redact
        self._monotonic = monotonic
        self._current: AccessToken | None = None
        self._generation = 0
        self._task: asyncio.Task[AccessToken] | None = None
        self._retry_task: asyncio.Task[None] | None = None
        self._failure: ProxyError | None = None
        self._retry_at = 0.0
        # Seconds the token endpoint asked us to wait (Retry-After) in its latest refusal.
        self._retry_hint: float | None = None
        # Counts reloads that changed the token settings: a fetch begun before one is stale.
        self._epoch = 0
        # Set while the state file cannot be used: no token call may be made (see _load).
        self._blocked: ProxyError | None = None
        # The rotated refresh token could not be written (the disk refused).
        self._unsaved: str | None = None
        self.token_calls = 0
        self.ever_authenticated = False
        self._refresh_token: str | None = None
        self._origin = ""
        # The shared store (auth.state_store): None when not configured.
        self._shared: SharedTokens | None = None
        # Why the shared store is not used now (None: it is), and when to ask it again.
        self._shared_error: str | None = None
        self._shared_retry_at = 0.0
        # The record version this process last read or wrote, and whether it holds
        # tokens fetched on the local path that Redis has not seen (an outage).
        self._shared_version = 0
        self._unsynced = False
        # The access token the API last refused: a shared one equal to it is no use.
        self._rejected: str | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._configure(cfg)

    def _configure(self, cfg: AuthConfig) -> None:
        assert cfg.token_url is not None and cfg.client_id is not None
        assert cfg.client_secret is not None
        self.cfg = cfg
        parts = urlsplit(cfg.token_url)
        self._path, self._query = parts.path or "/", parts.query
        self._store = token_store(cfg, self.integration)
        configured = cfg.refresh_token.get() if cfg.refresh_token is not None else None
        # Which configured refresh token the one we hold descends from.
        origin = fingerprint(configured) if configured else ""
        if cfg.grant != "refresh_token":
            self._refresh_token = None
        elif origin != self._origin or self._refresh_token is None:
            self._refresh_token = configured
        # Else a reload named the same refresh token: keep the newest of its line, rotated
        # since (the configured one may be dead by now).
        self._origin = origin
        self._backoff = cfg.retry_min
        self._blocked = None
        self._shared = shared_tokens(cfg, self._endpoint.cfg, self.integration)
        self._shared_error = None
        self._unsynced = False
        if cfg.state_store:
            self._redact([p for w in url_passwords(cfg.state_store) for p in (w, unquote(w))])

    # -- state for /readyz and the metrics ------------------------------------------------

    def status(self) -> dict[str, Any]:
        state: dict[str, Any] = {"scheme": "oauth2", "grant": self.cfg.grant}
        if self._unsaved is not None:
            state["state_file"] = self._unsaved
        if self._shared is not None:
            state["state_store"] = (
                "ok"
                if self._shared_error is None
                else f"unreachable ({self._shared_error}): tokens are fetched by this process alone"
            )
        failure = self._blocked or self._failure
        if failure is not None:
            return {"ok": False, "error": failure.message, **state}
        if not self.ever_authenticated:
            return {"ok": False, "error": "no access token yet", **state}
        current = self._current
        if current is not None:
            state["expires_in"] = max(0, round(current.expires_at - self._monotonic()))
        return {"ok": True, **state}

    def token_age(self) -> float | None:
        current = self._current
        return None if current is None else self._monotonic() - current.obtained_at

    def valid(self) -> bool:
        current = self._current
        return current is not None and self._monotonic() < current.expires_at

    # -- the scheme's view ----------------------------------------------------------------

    async def token(self) -> AccessToken:
        """An access token to send now, fetching one first when there is none."""
        now = self._monotonic()
        current = self._current
        if self._unsynced and now >= self._shared_retry_at and self._sync_task is None:
            # Tokens fetched during an outage: Redis must have them before another replica
            # refreshes with the refresh token they replaced.
            self._sync_task = asyncio.get_running_loop().create_task(self._sync())
        if current is not None and now < current.expires_at:
            if now >= current.refresh_at and self._task is None and self._failure is None:
                # Due for a refresh: fetch the next one while this one still serves.
                self._start("expiring")
            return current
        if self._blocked is not None:
            raise self._blocked
        if self._failure is not None and now < self._retry_at and self._task is None:
            raise self._failure
        if self._task is None:
            reason = login_reason(
                current is not None, self.ever_authenticated, self._failure is not None
            )
            self._start(reason)
        assert self._task is not None
        return await asyncio.shield(self._task)

    def invalidate(self, used: AccessToken) -> None:
        """The API answered 401 to `used`: never send it again."""
        current = self._current
        self._rejected = used.value
        if current is not None and current.generation == used.generation:
            log.info("oauth2_token_rejected", generation=used.generation)
            self._current = None

    # -- fetching -------------------------------------------------------------------------

    def _start(self, reason: str) -> None:
        self._task = asyncio.get_running_loop().create_task(self._refresh(reason))
        self._task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[AccessToken]) -> None:
        self._task = None
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not warn when nobody awaited it

    async def _obtain(self, reason: str) -> AccessToken:
        """A new token: through the shared store when there is one and it answers, else
        from the token endpoint directly."""
        shared = self._shared
        if shared is None or (
            self._shared_error is not None and self._monotonic() < self._shared_retry_at
        ):
            return await self._fetch_local(reason)
        try:
            return await self._from_shared(shared, reason)
        except SharedStoreUnavailable as e:
            self._shared_down(e)
            return await self._fetch_local(reason)

    async def _sync(self) -> None:
        """Give Redis the tokens fetched here while it was unreachable, if it answers."""
        shared = self._shared
        try:
            if shared is not None and self._task is None:
                version, record = await shared.read()
                self._shared_up()
                await self._reconcile(shared, version, record)
        except SharedStoreUnavailable as e:
            self._shared_down(e)
        finally:
            self._sync_task = None

    async def _fetch_local(self, reason: str) -> AccessToken:
        token = await self._fetch(reason)
        if self._shared is not None:
            self._unsynced = True  # Redis must learn it when it answers again
        return token

    async def _from_shared(self, shared: SharedTokens, reason: str) -> AccessToken:
        """Single flight across replicas: use the shared token if it will do, else take
        the lock and fetch, else wait for the holder's. SharedStoreUnavailable when Redis
        fails before a token call was made."""
        deadline = self._monotonic() + shared.lock_ttl + 1.0
        pause = _POLL_MIN
        while True:
            version, record = await shared.read()
            self._shared_up()
            record = await self._reconcile(shared, version, record)
            if self._usable(record, reason):
                assert record is not None
                return await self._adopt(record, reason)
            holder = await shared.lock()
            if holder is not None:
                try:
                    return await self._fetch_shared(shared, reason)
                finally:
                    # Expires on its own if this fails.
                    with contextlib.suppress(SharedStoreUnavailable):
                        await shared.unlock(holder)
            if self._monotonic() >= deadline:
                raise UpstreamAuthFailed(
                    "OAuth 2.0: another replica holds the token lock and wrote no new token "
                    f"in {round(shared.lock_ttl)} s"
                )
            # Another replica is fetching: what it writes is ours too.
            await asyncio.sleep(random.uniform(pause / 2, pause))
            pause = min(pause * 2, _POLL_MAX)

    async def _fetch_shared(self, shared: SharedTokens, reason: str) -> AccessToken:
        """As the lock's holder: look once more (the token may have come in between), then
        call the token endpoint with the newest refresh token and write the answer."""
        version, record = await shared.read()
        record = await self._reconcile(shared, version, record)
        if self._usable(record, reason):
            assert record is not None
            return await self._adopt(record, reason)
        if record is not None and record.refresh_token is not None:
            await self._take_refresh_token(record.refresh_token)
        token = await self._fetch(reason)
        try:
            written = await shared.write(version, self._record(token))
        except SharedStoreUnavailable as e:
            # The token is good: serve with it, and give it to Redis when it answers.
            self._shared_down(e)
            self._unsynced = True
            return token
        if written:
            self._shared_version = version + 1
        else:
            # Only after the lock ran out under a very slow call: the newer record stays.
            log.warning("oauth2_shared_write_lost", generation=token.generation)
        return token

    async def _reconcile(
        self, shared: SharedTokens, version: int, record: SharedRecord | None
    ) -> SharedRecord | None:
        """The record, once tokens fetched here during an outage are in Redis (if nobody
        wrote meanwhile: then the newest is theirs); None when it is not of our line."""
        if self._unsynced:
            current = self._current
            if version == self._shared_version and current is not None:
                mine = self._record(current)
                written = await shared.write(version, mine)
                self._unsynced = False
                if written:
                    self._shared_version = version + 1
                    log.info("oauth2_shared_store_synced", generation=current.generation)
                    return mine
                version, record = await shared.read()
            self._unsynced = False
        self._shared_version = version
        if record is not None and record.origin != self._origin:
            # The config names another refresh token than the record descends from (an
            # operator issued a new one): that one rules, as with the state file.
            return None
        return record

    def _usable(self, record: SharedRecord | None, reason: str) -> bool:
        if record is None or record.access_token == self._rejected:
            return False
        now = time.time()
        if reason == "expiring":
            # Due for a refresh: only a token newer than ours (another replica refreshed).
            return now < record.refresh_at
        return now < record.expires_at - 1.0

    async def _adopt(self, record: SharedRecord, reason: str) -> AccessToken:
        """Use the token another replica fetched, and its line's newest refresh token."""
        if record.refresh_token is not None:
            await self._take_refresh_token(record.refresh_token)
        self._redact([record.access_token])
        wall, mono = time.time(), self._monotonic()
        self._generation += 1
        log.info(
            "oauth2_token_shared",
            reason=reason,
            generation=self._generation,
            expires_in=round(record.expires_at - wall),
        )
        return AccessToken(
            record.access_token,
            mono - (wall - record.obtained_at),
            mono + (record.expires_at - wall),
            mono + (record.refresh_at - wall),
            self._generation,
        )

    async def _take_refresh_token(self, new: str) -> None:
        """The shared line's newest refresh token becomes ours (kept in the state file too,
        for a restart while Redis is down)."""
        if self.cfg.grant != "refresh_token" or new == self._refresh_token:
            return
        self._redact([new])
        self._refresh_token = new
        await self._save(new, self._origin)

    def _record(self, token: AccessToken) -> SharedRecord:
        wall, mono = time.time(), self._monotonic()
        return SharedRecord(
            token.value,
            wall - (mono - token.obtained_at),
            wall + (token.expires_at - mono),
            wall + (token.refresh_at - mono),
            self._refresh_token if self.cfg.grant == "refresh_token" else None,
            self._origin,
        )

    def _shared_down(self, error: SharedStoreUnavailable) -> None:
        self._shared_retry_at = self._monotonic() + SHARED_RETRY
        if self._shared_error is None:
            log.warning(
                "oauth2_shared_store_unreachable",
                error=str(error),
                note="tokens are fetched by this process alone until it answers",
            )
        self._shared_error = str(error)

    def _shared_up(self) -> None:
        if self._shared_error is not None:
            log.info("oauth2_shared_store_reachable")
            self._shared_error = None

    async def _refresh(self, reason: str) -> AccessToken:
        epoch = self._epoch
        try:
            token = await self._obtain(reason)
        except ProxyError as e:
            if epoch == self._epoch:
                self._fail(e)
            raise
        if epoch == self._epoch:  # not a call a reload has made obsolete meanwhile
            self._failure = None
            self._backoff = self.cfg.retry_min
            self.ever_authenticated = True
            self._current = token
        return token

    async def _fetch(self, reason: str) -> AccessToken:
        cfg = self.cfg
        assert cfg.client_id is not None and cfg.client_secret is not None
        used_refresh = self._refresh_token
        origin = self._origin
        request = token_request(
            cfg.grant,
            cfg.client_id,
            cfg.client_secret.get(),
            cfg.client_auth,
            scope=cfg.scope,
            audience=cfg.audience,
            refresh_token=used_refresh,
        )
        sent_at = self._monotonic()
        self.token_calls += 1
        self._retry_hint = None
        status, hint, body = await self._post(header_lines(request.headers), request.body)
        known = [cfg.client_secret.get(), *([used_refresh] if used_refresh else [])]
        try:
            grant = parse_token_response(status, body, known)
        except TokenError as e:
            self._metrics.auth("rejected" if 400 <= status < 500 else "error")
            self._retry_hint = hint
            raise UpstreamAuthFailed(f"OAuth 2.0: {e.message}") from None
        self._metrics.auth("success")
        self._redact([grant.access_token, *([grant.refresh_token] if grant.refresh_token else [])])
        rotated = await self._keep_refresh_token(grant, used_refresh, origin)
        lifetime = grant.lifetime
        # Refresh early by the margin, but never in the first half of a token's life: a
        # server that issues 30-second tokens must not be asked for one per request.
        margin = min(cfg.refresh_margin, lifetime / 2)
        self._generation += 1
        log.info(
            "auth_succeeded",
            reason=reason,
            generation=self._generation,
            expires_in=round(lifetime),
            assumed_lifetime=grant.expires_in is None,
            rotated=rotated,
        )
        return AccessToken(
            grant.access_token,
            sent_at,
            sent_at + lifetime,
            sent_at + lifetime - margin,
            self._generation,
        )

    async def _post(self, lines: bytes, body: bytes) -> tuple[int, float | None, bytes]:
        """POST to the token endpoint: (status, Retry-After seconds, body). Always on a new
        connection: the calls are minutes apart, and a kept-alive one the server has
        dropped meanwhile would fail a refresh that cannot simply be sent again."""
        try:
            resp = await self._endpoint.request(
                "POST", self._path, self._query, lines, body, fresh=True
            )
            async with resp:
                chunks: list[bytes] = []
                size = 0
                while chunk := await resp.readany():
                    size += len(chunk)
                    if size > MAX_TOKEN_ANSWER:
                        raise UpstreamAuthFailed(
                            f"OAuth 2.0: the token endpoint's answer is over {MAX_TOKEN_ANSWER} "
                            "bytes: not a token"
                        )
                    chunks.append(chunk)
        except UpstreamAuthFailed:
            self._metrics.auth("error")
            raise
        except ProxyError as e:
            self._metrics.auth("error")
            raise UpstreamAuthFailed(f"OAuth 2.0: token endpoint: {e.message}") from e
        hint = retry_after(resp.headers.get("Retry-After"), time.time())
        return resp.status, hint, b"".join(chunks)

    async def _keep_refresh_token(self, grant: TokenGrant, used: str | None, origin: str) -> bool:
        """A rotated refresh token replaces the one used, on disk first; True if rotated."""
        new = grant.refresh_token
        if self.cfg.grant != "refresh_token" or not new or new == used:
            return False
        if origin != self._origin:
            return False  # a reload named another refresh token meanwhile: that one rules
        self._refresh_token = new
        await self._save(new, origin)
        return True

    async def _save(self, new: str, origin: str) -> None:
        store = self._store
        if store is None:
            return
        try:
            await asyncio.to_thread(store.save, new, origin)
        except OSError as e:
            # Serve on: the token is good in memory. But a restart would start from a
            # dead one, so say so loudly and in /readyz.
            self._unsaved = f"the rotated refresh token could not be saved: {e.strerror}"
            log.error("oauth2_state_not_saved", path=str(store.path), error=e.strerror)
        else:
            self._unsaved = None
            log.info("oauth2_refresh_token_saved", path=str(store.path))

    def _fail(self, error: ProxyError) -> None:
        self._failure = error
        delay = random.uniform(self._backoff / 2, self._backoff)
        hint = self._retry_hint
        if hint is not None:  # the endpoint said when to come back (429, 503)
            delay = max(delay, min(hint, self.cfg.retry_max))
        self._retry_at = self._monotonic() + delay
        log.warning(
            "auth_failed", reason=error.reason, error=error.message, retry_in_s=round(delay, 2)
        )
        self._backoff = min(self._backoff * 2, self.cfg.retry_max)
        if self._retry_task is None or self._retry_task.done():
            self._retry_task = asyncio.get_running_loop().create_task(self._retry_loop())

    async def _retry_loop(self) -> None:
        """Keep trying in the background while failed, so /readyz recovers without traffic."""
        while self._failure is not None and self._blocked is None:
            await asyncio.sleep(max(0.0, self._retry_at - self._monotonic()))
            if self._failure is None or self._blocked is not None:
                return
            try:
                if self._task is None:
                    self._start("retry")
                assert self._task is not None
                await asyncio.shield(self._task)
            except ProxyError:
                pass  # _fail() already scheduled the next attempt

    # -- life cycle -----------------------------------------------------------------------

    def _load(self) -> None:
        """Start from the newest refresh token: the state file's, when it descends from the
        configured one. A file that exists but cannot be read blocks every token call:
        falling back to the configured token could present one the server has already
        rotated away, which many servers punish by revoking the whole line."""
        store = self._store
        if store is None:
            if self.cfg.grant == "refresh_token":
                log.warning(
                    "oauth2_state_in_memory_only",
                    note="auth.state_file is empty: a rotated refresh token is lost on restart",
                )
            return
        try:
            stored: StoredToken | None = store.load()
        except StateUnreadable as e:
            self._blocked = UpstreamAuthFailed(
                f"OAuth 2.0 state: {e}; fix auth.state_key, or remove the file to start over "
                "from auth.refresh_token"
            )
            log.error("oauth2_state_unreadable", path=str(store.path), error=str(e))
            return
        if stored is None:
            return
        if stored.origin == self._origin:
            self._refresh_token = stored.refresh_token
            self._redact([stored.refresh_token])
            log.info("oauth2_refresh_token_loaded", path=str(store.path))
        else:
            log.info(
                "oauth2_state_superseded",
                path=str(store.path),
                note="auth.refresh_token names another refresh token than the saved one "
                "descends from: the configured one is used",
            )

    async def start(self) -> None:
        """Fetch a token at start-up; a failure is not fatal (we keep trying)."""
        await self._endpoint.start()
        self._load()
        with contextlib.suppress(ProxyError):
            await self.token()

    async def stop(self) -> None:
        if self._retry_task is not None:
            self._retry_task.cancel()
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ProxyError):
                await task
        await self._endpoint.close()
        if self._shared is not None:
            await self._shared.close()

    async def change(self, cfg: AuthConfig, endpoint: Upstream | None) -> None:
        """A reload with other token settings: forget the old token, fetch a new one."""
        if self._retry_task is not None:
            self._retry_task.cancel()
        old = self._endpoint
        if endpoint is not None:
            await endpoint.start()
            self._endpoint = endpoint
        self._epoch += 1
        shared = self._shared
        self._configure(cfg)
        if shared is not None:
            await shared.close()
        self._current = None
        self._failure = None
        self.ever_authenticated = False
        log.info("auth_credentials_changed")
        if endpoint is not None:
            await old.close()
        self._load()
        with contextlib.suppress(ProxyError):
            await self.token()


class OAuth2Scheme:
    name = "oauth2"

    def __init__(self, session: OAuth2Session, upstream: UpstreamConfig) -> None:
        self.session = session
        self._upstream = upstream

    def budget(self, target: Target) -> str:
        return "account"  # one budget for the whole API

    async def apply(self, out: Outbound) -> AccessToken:
        token = await self.session.token()
        line = header_line("Authorization", f"Bearer {token.value}")
        cookies = out.cookie_header()
        out.credentials = line + header_line("Cookie", cookies) if cookies else line
        return token

    def judge(self, status: int, headers: Mapping[str, str], now: float) -> Decision | None:
        if status == 401:
            # RFC 6750 §3.1: invalid_token (expired, revoked) is what a 401 means here;
            # one new token and one more try, whatever the challenge's wording.
            return REAUTH
        return judge_rate_limit(status, headers, now)

    def retire(self, used: Credential | None) -> None:
        if isinstance(used, AccessToken):
            self.session.invalidate(used)

    def watch(
        self, used: Credential | None, sent_at: float, headers: Mapping[str, str]
    ) -> AnswerWatch | None:
        return None

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.session.start()

    async def stop(self) -> None:
        await self.session.stop()

    def status(self) -> dict[str, Any]:
        return self.session.status()

    def credential_age(self) -> float | None:
        return self.session.token_age()

    def valid(self) -> bool:
        return self.session.valid()

    async def reconfigure(self, auth: AuthConfig) -> None:
        old = self.session.cfg
        if _token_settings(auth) == _token_settings(old):
            self.session.cfg = auth  # margins and backoff: at once, same token
            return
        endpoint = None
        if auth.token_url != old.token_url:
            assert auth.token_url is not None
            endpoint = Upstream(endpoint_config(self._upstream, auth.token_url))
        await self.session.change(auth, endpoint)


def _token_settings(auth: AuthConfig) -> tuple[object, ...]:
    """What a token depends on: a change means the current one may no longer be ours."""
    return (
        auth.token_url,
        auth.client_id,
        auth.client_secret,
        auth.scope,
        auth.audience,
        auth.grant,
        auth.refresh_token,
        auth.client_auth,
        auth.state_key,
        auth.state_file,
        auth.state_store,
    )
