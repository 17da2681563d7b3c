"""Wiring: build every component from one Config, start and stop them in order."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import time
from collections.abc import Coroutine, Mapping
from typing import IO, Any, TypeVar
from urllib.parse import unquote

from aiohttp import web

from proxy import egress
from proxy.clock import ServerClock
from proxy.config import SHORTHAND_BUDGETS, Config, LimitsConfig, state_dir, url_passwords
from proxy.http.client import Upstream
from proxy.http.server import Listener
from proxy.limits import Backend, Lane, MemoryBackend, RateLimiter
from proxy.limits.plan import windows_of
from proxy.observe.admin import create_admin_app
from proxy.observe.log import Logs
from proxy.observe.metrics import Metrics, ReloadState, ScopeState, StateSources, WindowState
from proxy.pipeline.admission import AccessPolicy, Admission
from proxy.pipeline.attempts import Attempts, Sender
from proxy.pipeline.forward import Forwarder
from proxy.pipeline.inflight import Gate
from proxy.pipeline.relay import Relay
from proxy.schemes.registry import BUILT_IN, SchemeDeps, SchemeKind

T = TypeVar("T")


def secrets_of(cfg: Config) -> list[str]:
    """Every secret value in the config: the logs mask them wherever they appear."""
    auth = cfg.auth
    values = [
        auth.secret,
        auth.password,
        auth.api_key,
        auth.token,
        auth.client_secret,
        auth.refresh_token,
        auth.state_key,
    ]
    found = [v.get() for v in values if v is not None]
    if cfg.access.client_token is not None:
        found.append(cfg.access.client_token.get())
    found += [c.token.get() for c in cfg.access.clients if c.token is not None]
    for password in url_passwords(cfg.limits.redis_url):
        found += [password, unquote(password)]
    # The egress proxy's credentials, the environment's (HTTPS_PROXY...) included.
    return found + egress.secrets(cfg.upstream, os.environ)


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
    return str(state_dir() / f"limits-{key}.json")


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


def _window_shape(limits: LimitsConfig) -> tuple[bool, tuple[str, ...]]:
    """Which windows a config counts in, budgets aside (the shorthand's lengths are restart
    keys of their own): whether it lists any, and their names."""
    return bool(limits.windows), tuple(w.name for w in windows_of(limits))


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

    def __init__(
        self,
        cfg: Config,
        logs: Logs | None = None,
        *,
        schemes: Mapping[str, SchemeKind] = BUILT_IN,
    ) -> None:
        self.cfg = cfg
        self.logs = logs if logs is not None else make_logs(cfg)
        self.log = self.logs.logger()
        # The config this process started with is the first load that applied.
        self.last_reload = ReloadState(successful=True, success_time=time.time())
        self.clock = ServerClock()
        self.upstream = Upstream(cfg.upstream)
        self.metrics = Metrics()
        self.limits_key = limits_key(cfg)
        self.limiter = RateLimiter(
            cfg.limits, cfg.queue, make_backend(cfg, self.limits_key), self.clock
        )
        # The scheme is fixed for the life of the process (a reload cannot switch it).
        deps = SchemeDeps(
            cfg.auth,
            self.upstream,
            self.clock,
            self.limiter,
            self.metrics,
            cfg.queue.max_wait,
            redact=self.logs.redactor.remember,
        )
        self.scheme = schemes[cfg.auth.scheme].build(deps)
        self.forwarder = self._pipeline(cfg)
        self.metrics.describe(self.scheme.name, cfg.limits.backend)
        self._expect_lane_waits()
        self.metrics.watch(
            StateSources(
                scopes=self._scope_states,
                inflight=lambda: self.forwarder.inflight_count,
                daily_used=lambda: self.limiter.day_used_known(),
                code_age=self.scheme.credential_age,
                session_valid=self.scheme.valid,
                client_depths=self.limiter.client_depths,
                daily_limit=self.limiter.day_limit,
                windows=self._window_states,
                code_lifetime=self._code_lifetime,
                limits_fallback=lambda: bool(self.limiter.status().get("fallback")),
                ready=lambda: self.readiness()[0],
                queue_max_size=lambda: self.cfg.queue.max_size,
                queue_max_wait=lambda: self.cfg.queue.max_wait,
                reload=lambda: self.last_reload,
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

    def _expect_lane_waits(self) -> None:
        """Every synchronous lane each client may wait in, exported at zero from the start."""
        self.metrics.expect_lane_waits(
            (lane.label, client.name)
            for client in self.forwarder.admission.policy.clients
            for lane in (Lane.HIGH, Lane.NORMAL, Lane.LOW)
            if lane >= client.max_lane
        )

    def _pipeline(self, cfg: Config) -> Forwarder:
        """The forwarding steps, each with its few collaborators."""
        sender = Sender(
            self.upstream, Gate(cfg.limits.max_inflight), self.clock, self.limiter, self.metrics
        )
        return Forwarder(
            Admission(
                AccessPolicy(cfg.access, cfg.queue.max_size),
                self.scheme,
                cfg.queue,
                cfg.listen.encoded_slashes,
            ),
            Attempts(sender, self.scheme, self.limiter, self.clock, self.metrics, cfg.retry),
            Relay(self.scheme, cfg.logging.log_bodies),
            self.metrics,
            self.logs,
            cfg,
        )

    def _scope_states(self) -> dict[str, ScopeState]:
        return {
            scope: ScopeState(
                queue_depth=self.limiter.queue_depth(scope),
                rate_limit_remaining=bucket.remaining,
                rate_limit_limit=bucket.server_limit,
                lane_depths=self.limiter.lane_depths(scope),
            )
            for scope, bucket in self.limiter.buckets.items()
        }

    def _window_states(self) -> list[WindowState]:
        return [
            WindowState(w["scope"], w["per"], w["limit"], w["used"])
            for w in self.limiter.window_states()
        ]

    def _code_lifetime(self) -> float | None:
        """auth.code_lifetime, for the schemes whose credential ages (luxsci)."""
        if self.scheme.credential_age() is None:
            return None
        return float(self.cfg.auth.code_lifetime)

    def reload_refused(self) -> None:
        """A SIGHUP's config did not load: the old config stays, and the metrics say so."""
        self.last_reload = dataclasses.replace(self.last_reload, successful=False)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready once logged in, while no later login failed and no drain is on; with a
        Redis backend also while Redis answers (admin.ready_requires_redis), though the
        proxy keeps serving on its local share either way."""
        checks: dict[str, Any] = {
            "auth": self.scheme.status(),
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
        await self.scheme.start()
        self.log.info(
            "proxy_started",
            event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
            listen=f"{self.cfg.listen.host}:{self.port}",
            admin=f"{self.cfg.admin.host}:{self.admin_port}",
            upstream=self.cfg.upstream.url,
            # host:port only: the proxy's credentials are never logged.
            egress=self.upstream.egress.where if self.upstream.egress else None,
            scheme=self.scheme.name,
            ready=self.readiness()[0],
        )

    async def reload(self, new: Config) -> list[str]:
        """Apply a new config without a restart; returns the keys that still need one.

        Limits, queue, retry and logging settings apply at once; new credentials end
        the old login and start a new one. Listeners, the upstream, the limiter's
        backend and windows, and the auth scheme keep their old values.
        """
        try:
            restart = await self._in_context(self._reload(new))
        except BaseException:
            self.reload_refused()
            raise
        self.last_reload = ReloadState(successful=True, success_time=time.time())
        return restart

    async def _reload(self, new: Config) -> list[str]:
        # Logging first, so the reload's own events follow the new settings.
        self.logs.configure(new.logging.level, new.logging.format, secrets_of(new))
        old = self.cfg
        restart = [
            name
            for name in ("listen", "admin", "upstream")
            if getattr(new, name) != getattr(old, name)
        ]
        fixed_limits: dict[str, Any] = {k: getattr(old.limits, k) for k in _RESTART_LIMITS}
        restart += [f"limits.{k}" for k, v in fixed_limits.items() if getattr(new.limits, k) != v]
        if _window_shape(new.limits) != _window_shape(old.limits):
            # Which windows there are shapes what is counted (Redis keys, the state file,
            # the limiter's path); their budgets apply at once. A shorthand budget turned
            # to or from 0 beside limits.windows adds or drops a window too.
            restart.append("limits.windows")
            fixed_limits["windows"] = old.limits.windows
            fixed_limits.update((k, getattr(old.limits, k)) for k in SHORTHAND_BUDGETS)
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
        self._expect_lane_waits()
        self.cfg = applied
        await self.scheme.reconfigure(auth)
        return restart

    async def stop(self) -> None:
        """Stop accepting; let in-flight and queued requests finish within shutdown_timeout,
        answer the rest 503; revoke the session; close everything; flush the log."""
        await self._in_context(self._stop())

    async def _stop(self) -> None:
        self.log.info("shutdown_started", timeout_s=self.cfg.shutdown_timeout)
        self.listener.stop_accepting()  # no new connections; idle ones closed
        cut_off = await self.forwarder.drain.drain(self.cfg.shutdown_timeout)
        if cut_off:
            self.log.warning("shutdown_cut_off_requests", count=cut_off)
        await self.listener.close()
        await self.scheme.stop()
        await self._admin_runner.cleanup()
        await self.limiter.close()
        await self.upstream.close()
        self.log.info("shutdown_complete")
        self.logs.flush()
