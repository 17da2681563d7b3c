"""Wiring: build every component from one Config, start and stop them in order."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import unquote, urlsplit

from aiohttp import web

from proxy.clock import ServerClock
from proxy.config import AuthConfig, Config
from proxy.http.client import Upstream
from proxy.http.server import Listener
from proxy.limits import Backend, MemoryBackend, RateLimiter
from proxy.observe.admin import create_admin_app
from proxy.observe.log import Logs
from proxy.observe.metrics import Metrics, ScopeState, StateSources
from proxy.pipeline.admission import AccessPolicy
from proxy.pipeline.forward import Forwarder
from proxy.schemes.base import AuthScheme
from proxy.schemes.bearer import BearerScheme
from proxy.schemes.luxsci.scheme import LuxSciScheme
from proxy.schemes.luxsci.session import LuxSciSession

T = TypeVar("T")


def secrets_of(cfg: Config) -> list[str]:
    """Every secret value in the config: the logs mask them wherever they appear."""
    values = [cfg.auth.secret, cfg.auth.password, cfg.auth.api_key, cfg.auth.token]
    found = [v.get() for v in values if v is not None]
    redis_password = urlsplit(cfg.limits.redis_url).password
    if redis_password:
        found += [redis_password, unquote(redis_password)]
    return found


def make_logs(cfg: Config, stream: IO[str] | None = None) -> Logs:
    """The logging of a service with this config (stream: stderr unless given)."""
    return Logs(cfg.logging.level, cfg.logging.format, secrets_of(cfg), stream)


def limits_key(cfg: Config) -> str:
    """Names the integration's shared limits: from the token (never the secret) or the host."""
    if cfg.limits.key:
        return cfg.limits.key
    basis = cfg.auth.token.get() if cfg.auth.token is not None else cfg.upstream.url
    return hashlib.sha256(basis.encode()).hexdigest()[:16]


def state_file(cfg: Config, key: str) -> str | None:
    """Where the memory backend keeps today's count; "" in the config turns it off."""
    if cfg.limits.state_file is not None:
        return cfg.limits.state_file or None
    base = os.environ.get("LUXSCI_PROXY_STATE_DIR") or Path.home() / ".local/state/luxsci-proxy"
    return str(Path(base) / f"limits-{key}.json")


def make_backend(cfg: Config, key: str) -> Backend:
    if cfg.limits.backend == "redis":
        from proxy.limits.redis_backend import RedisBackend

        return RedisBackend(
            cfg.limits.redis_url,
            key,
            cfg.limits.window_seconds,
            cfg.limits.day_seconds,
            cfg.limits.fallback_share,
        )
    return MemoryBackend(state_file(cfg, key), key)


# Limits keys a reload cannot change: they shape state already counted.
_RESTART_LIMITS = (
    "backend",
    "redis_url",
    "key",
    "state_file",
    "window_seconds",
    "day_seconds",
    "fallback_share",
)


def _credentials(auth: AuthConfig) -> tuple[object, ...]:
    return (auth.token, auth.secret, auth.user, auth.password)


def _bound_port(runner: web.BaseRunner) -> int:
    port: int = runner.addresses[0][1]
    return port


class ProxyService:
    """The running proxy: listeners, upstream pool, auth session and its logs.

    Its events go to `logs`, made from the config unless given (the CLI makes it
    first, to run the whole event loop in its context). start, reload and stop run
    in `logs.context()`, so what the components log from them, and from every task
    and connection they start, goes there too.
    """

    def __init__(self, cfg: Config, logs: Logs | None = None) -> None:
        self.cfg = cfg
        self.logs = logs if logs is not None else make_logs(cfg)
        self.log = self.logs.logger()
        self.clock = ServerClock()
        self.upstream = Upstream(cfg.upstream)
        self.metrics = Metrics()
        self.limits_key = limits_key(cfg)
        self.limiter = RateLimiter(
            cfg.limits, cfg.queue, make_backend(cfg, self.limits_key), self.clock
        )
        self.session: LuxSciSession | None = None
        scheme: AuthScheme
        # The scheme is fixed for the life of the process (a reload cannot switch it).
        if cfg.auth.scheme == "luxsci":
            self.session = LuxSciSession(
                cfg.auth,
                self.upstream,
                self.clock,
                limiter=self.limiter,
                permit_wait=cfg.queue.max_wait,
                metrics=self.metrics,
            )
            scheme = LuxSciScheme(self.session)
        else:
            assert cfg.auth.api_key is not None
            scheme = BearerScheme(cfg.auth.api_key.get())
        self.scheme = scheme
        self.forwarder = Forwarder(
            self.upstream,
            scheme,
            cfg.auth.scheme,
            self.clock,
            self.limiter,
            cfg.limits.max_inflight,
            cfg.queue,
            cfg.retry,
            cfg.listen.max_body_bytes,
            self.metrics,
            cfg.logging,
            AccessPolicy(cfg.access),
            cfg.listen.client_timeout,
            self.logs,
        )
        self.metrics.describe(cfg.auth.scheme, cfg.limits.backend)
        self.metrics.watch(
            StateSources(
                scopes=self._scope_states,
                inflight=lambda: self.forwarder.inflight_count,
                daily_used=lambda: self.limiter.day_used_known(),
                code_age=lambda: self.session.code_age() if self.session else None,
                session_valid=lambda: self.session.valid() if self.session else True,
            )
        )
        listen = cfg.listen
        self.listener = Listener(
            self.forwarder,
            max_connections=listen.max_connections,
            client_timeout=listen.client_timeout,
            max_header_bytes=listen.max_header_bytes,
        )
        self._admin_runner = web.AppRunner(
            create_admin_app(self.readiness, self.metrics.registry),
            access_log=None,
            shutdown_timeout=5,
        )
        self.port = 0
        self.admin_port = 0
        # Which checks /readyz requires (limits: the shared Redis, when used).
        self._ready_needs = {"auth", "shutdown"} | (
            {"limits"}
            if cfg.limits.backend == "redis" and cfg.admin.ready_requires_redis
            else set()
        )

    def _scope_states(self) -> dict[str, ScopeState]:
        return {
            scope: ScopeState(
                queue_depth=self.limiter.queue_depth(scope),
                rate_limit_remaining=bucket.remaining,
                rate_limit_limit=bucket.server_limit,
            )
            for scope, bucket in self.limiter.buckets.items()
        }

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready once logged in, while no later login failed and no drain is on; with a
        Redis backend also while Redis answers (admin.ready_requires_redis), though the
        proxy keeps serving on its local share either way."""
        checks: dict[str, Any] = {
            "auth": {"ok": True, "scheme": "bearer"}
            if self.session is None
            else self.session.status(),
            "limits": self.limiter.status(),
        }
        if self.forwarder.draining:
            checks["shutdown"] = {"ok": False, "error": "draining: shutting down"}
        ready = all(check["ok"] for name, check in checks.items() if name in self._ready_needs)
        return ready, checks

    def _warn_about_exposure(self) -> None:
        cfg = self.cfg
        for warning in cfg.warnings:
            self.log.warning("config_warning", warning=warning)
        loopback = cfg.listen.host in (
            "127.0.0.1",
            "::1",
            "localhost",
        ) or cfg.listen.host.startswith("127.")
        if not loopback and AccessPolicy(cfg.access).open_to_anyone:
            self.log.warning(
                "proxy_open_to_the_network",
                listen=cfg.listen.host,
                note="anyone who can reach this port acts with the integration's full rights: "
                "set access.allow_clients and/or access.client_token, or listen on 127.0.0.1",
            )
        if cfg.upstream.url.startswith("http://"):
            self.log.warning(
                "upstream_not_encrypted",
                upstream=cfg.upstream.url,
                note="upstream.allow_insecure: credentials and data travel in the clear",
            )

    def _in_context(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """`coro` as a task of this service's log context (see the class docstring)."""
        return asyncio.get_running_loop().create_task(coro, context=self.logs.context())

    async def start(self) -> None:
        await self._in_context(self._start())

    async def _start(self) -> None:
        self._warn_about_exposure()
        if self.cfg.logging.log_bodies:
            self.log.warning(
                "log_bodies_enabled",
                note="request and response bodies go to the log; they may hold protected "
                "health information: turn logging.log_bodies off outside debugging",
            )
        await self.upstream.start()
        await self.limiter.start()
        await self._admin_runner.setup()
        admin = web.TCPSite(self._admin_runner, self.cfg.admin.host, self.cfg.admin.port)
        await admin.start()
        self.admin_port = _bound_port(self._admin_runner)
        # Listen before the first login: requests wait for it (single flight) instead
        # of being refused, and /readyz says 503 until it has succeeded.
        self.port = await self.listener.start(self.cfg.listen.host, self.cfg.listen.port)
        if self.session is not None:
            await self.session.start()
        self.log.info(
            "proxy_started",
            event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
            listen=f"{self.cfg.listen.host}:{self.port}",
            admin=f"{self.cfg.admin.host}:{self.admin_port}",
            upstream=self.cfg.upstream.url,
            scheme=self.cfg.auth.scheme,
            ready=self.readiness()[0],
        )

    async def reload(self, new: Config) -> list[str]:
        """Apply a new config without a restart; returns the keys that still need one.

        Limits, queue, retry and logging settings apply at once; new credentials end
        the old login and start a new one. Listeners, the upstream, the limiter's
        backend and windows, and the auth scheme keep their old values.
        """
        return await self._in_context(self._reload(new))

    async def _reload(self, new: Config) -> list[str]:
        # Logging first, so the reload's own events follow the new settings.
        self.logs.configure(new.logging.level, new.logging.format, secrets_of(new))
        old = self.cfg
        restart = [
            name
            for name in ("listen", "admin", "upstream")
            if getattr(new, name) != getattr(old, name)
        ]
        fixed_limits = {k: getattr(old.limits, k) for k in _RESTART_LIMITS}
        restart += [f"limits.{k}" for k, v in fixed_limits.items() if getattr(new.limits, k) != v]
        auth = new.auth
        if auth.scheme != old.auth.scheme:
            restart.append("auth.scheme")
            auth = old.auth
        elif auth.token != old.auth.token and not old.limits.key:
            # The shared limits are named after the token: the old name stays till restart.
            restart.append("limits.key")
        applied = dataclasses.replace(
            new,
            listen=old.listen,
            admin=old.admin,
            upstream=old.upstream,
            limits=dataclasses.replace(new.limits, **fixed_limits),
            auth=auth,
        )
        self.limiter.reconfigure(applied.limits, applied.queue)
        self.forwarder.reconfigure(applied)
        self.cfg = applied
        if self.session is not None:
            if _credentials(auth) != _credentials(old.auth):
                await self.session.change_credentials(auth)
            else:
                self.session.cfg = auth
        elif isinstance(self.scheme, BearerScheme) and auth.api_key is not None:
            self.scheme.set_key(auth.api_key.get())
        return restart

    async def stop(self) -> None:
        """Stop accepting; let in-flight and queued requests finish within shutdown_timeout,
        answer the rest 503; revoke the session; close everything; flush the log."""
        await self._in_context(self._stop())

    async def _stop(self) -> None:
        self.log.info("shutdown_started", timeout_s=self.cfg.shutdown_timeout)
        self.listener.stop_accepting()  # no new connections; idle ones closed
        cut_off = await self.forwarder.drain(self.cfg.shutdown_timeout)
        if cut_off:
            self.log.warning("shutdown_cut_off_requests", count=cut_off)
        await self.listener.close()
        if self.session is not None:
            await self.session.revoke()
        await self._admin_runner.cleanup()
        await self.limiter.close()
        await self.upstream.close()
        self.log.info("shutdown_complete")
        self.logs.flush()
