"""One integration: an API served on a listener of its own, with its own upstream pool,
auth scheme, limiter and backend, queue, retries, access clients and jobs.

ProxyService (proxy/service.py) runs one per entry of `integrations:` (one for a
config without the list) beside the process's admin port, logs and metrics registry.
Each gets a Config of its own (config.integrations_of): its sections, and the
process's admin and logging, so its components take a Config as they always did.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import socket
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from proxy import preflight
from proxy.clock import ServerClock
from proxy.config import (
    SHORTHAND_BUDGETS,
    Config,
    ConfigError,
    LimitsConfig,
    described_changes,
    differences,
    spool_dir,
    state_dir,
)
from proxy.http.body import Spool
from proxy.http.client import Upstream
from proxy.http.server import Listener
from proxy.limits import Backend, Lane, MemoryBackend, RateLimiter
from proxy.limits.plan import windows_of
from proxy.observe.log import Logs
from proxy.observe.metrics import Metrics, ProcessMetrics, ScopeState, StateSources, WindowState
from proxy.pipeline.admission import AccessPolicy, Admission
from proxy.pipeline.attempts import Attempts, Sender
from proxy.pipeline.forward import Forwarder
from proxy.pipeline.inflight import Gate
from proxy.pipeline.relay import Relay
from proxy.schemes.registry import SchemeDeps, SchemeKind

if TYPE_CHECKING:
    from proxy.jobs.durable import DurableJobs

    # The status page's module is imported when the page is first asked for.
    from proxy.observe.status import (
        AuthView,
        BudgetView,
        DayView,
        JobsView,
        QueueView,
        StatusSources,
    )


def named(cfg: Config, message: str) -> ConfigError:
    """A ConfigError naming the integration's entry when the config lists several."""
    return ConfigError(f"integrations[{cfg.integration}].{message}" if cfg.integration else message)


def limits_key(cfg: Config) -> str:
    """Names the integration's shared limits: from the token (never the secret) or the host."""
    if cfg.limits.key:
        return cfg.limits.key
    basis = cfg.auth.token.get() if cfg.auth.token is not None else cfg.upstream.url
    digest = hashlib.sha256(basis.encode()).hexdigest()[:16]
    # Listed integrations each get their own (two may share a token or a host); the one
    # integration of a config without the list keeps today's name, and with it its state.
    return f"{cfg.integration}-{digest}" if cfg.integration else digest


def state_file(cfg: Config, key: str) -> str | None:
    """Where the memory backend keeps today's count; "" in the config turns it off."""
    if cfg.limits.state_file is not None:
        return cfg.limits.state_file or None
    return str(state_dir() / f"limits-{key}.json")


def jobs_store(cfg: Config) -> str:
    """The jobs' SQLite file or Redis URL (the CLI's `jobs` verb opens the same one)."""
    from proxy.jobs.durable import store_location  # jobs are opt-in: no SQLite until asked

    return store_location(cfg.jobs, state_dir(), limits_key(cfg))


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


class StateCheck:
    """/readyz's view of the folders the proxy keeps state in (proxy/preflight.py).

    Judged at start-up, where `run` warns once, and again while a problem lasts, at
    most every RECHECK seconds (a fixed permission clears it without a restart; a
    readiness probe every second costs no more than one look in that time). A change
    either way is logged once.
    """

    RECHECK = 10.0

    def __init__(self, uses: list[preflight.StateUse], log: Any) -> None:
        self.uses = uses
        self.log = log
        self._problems: dict[str, str] = {}
        self._checked = -self.RECHECK

    def start(self) -> None:
        """Look once at start-up; run's warnings already said what is wrong."""
        self._problems = self._look()

    def _look(self) -> dict[str, str]:
        self._checked = time.monotonic()
        found = {}
        for use in self.uses:
            problem = preflight.state_problem(use.folder)
            if problem is not None:
                found[use.key] = problem
        return found

    def status(self) -> dict[str, Any]:
        if self._problems and time.monotonic() - self._checked >= self.RECHECK:
            before = self._problems
            self._problems = self._look()
            for use in self.uses:
                if use.key in before and use.key not in self._problems:
                    self.log.info("state_dir_writable", key=use.key, dir=str(use.folder))
                elif use.key in self._problems and use.key not in before:
                    finding = preflight.state_finding(use, self._problems[use.key])
                    self.log.warning(finding.event, **finding.fields)
        failing = [use for use in self.uses if use.key in self._problems]
        if not failing:
            return {"ok": True, "dirs": sorted({str(use.folder) for use in self.uses})}
        return {
            "ok": False,
            "error": "; ".join(f"{use.key}: {self._problems[use.key]}" for use in failing),
            "dirs": sorted({str(use.folder) for use in failing}),
            # Does /readyz fail for it (see preflight.StateUse.required)?
            "required": any(use.required for use in failing),
        }


def _window_shape(limits: LimitsConfig) -> tuple[bool, tuple[str, ...]]:
    """Which windows a config counts in, budgets aside (the shorthand's lengths are restart
    keys of their own): whether it lists any, and their names."""
    return bool(limits.windows), tuple(w.name for w in windows_of(limits))


def fixed_changes(old: Config, new: Config) -> list[str]:
    """The keys (unprefixed) whose change a running integration cannot apply: what its
    listener, pools, limiter backend, jobs store and scheme are built from. A listed
    integration is replaced for them (ProxyService); the one of a config without the
    list, and the admin port, need a restart."""
    fixed = [
        name
        for name in ("listen", "admin", "upstream", "jobs")
        if getattr(new, name) != getattr(old, name)
    ]
    fixed += [
        f"limits.{k}" for k in _RESTART_LIMITS if getattr(new.limits, k) != getattr(old.limits, k)
    ]
    if _window_shape(new.limits) != _window_shape(old.limits):
        # Which windows there are shapes what is counted (Redis keys, the state file,
        # the limiter's path); their budgets apply at once. A shorthand budget turned
        # to or from 0 beside limits.windows adds or drops a window too.
        fixed.append("limits.windows")
    if new.auth.scheme != old.auth.scheme:
        fixed.append("auth.scheme")
    elif new.auth.token != old.auth.token and not old.limits.key:
        # The shared limits are named after the token: the old name stays till restart.
        fixed.append("limits.key")
    return fixed


class Integration:
    """One integration's pipeline and listener (see the module docstring).

    `logs` is the process's; what the integration logs carries `integration` when the
    config lists several (its tasks run in a context that binds it: see start).
    """

    def __init__(
        self,
        cfg: Config,
        logs: Logs,
        process: ProcessMetrics,
        schemes: Mapping[str, SchemeKind],
        metrics: Metrics | None = None,
    ) -> None:
        """`metrics`: a predecessor's, when this one replaces it (its counters go on)."""
        self.cfg = cfg
        self.name = cfg.name
        self.logs = logs
        self.log = logs.logger()
        if cfg.integration:
            self.log = self.log.bind(integration=cfg.integration)
        self.clock = ServerClock()
        self.upstream = Upstream(cfg.upstream)
        if metrics is None:
            metrics = Metrics(self.name, process)
        else:
            # The predecessor's counters go on; its gauges' sources (jobs among them,
            # which this one may not have) are dropped, this one's watched below.
            process.remove(self.name)
            process.add(metrics)
        self.metrics = metrics
        self.limits_key = limits_key(cfg)
        # Follows logging.level (the Logs sets it): the components that explain their
        # decisions at debug read it once per decision.
        debug = logs.debug_flag
        self.limiter = RateLimiter(
            cfg.limits, cfg.queue, make_backend(cfg, self.limits_key), self.clock, debug=debug
        )
        # The scheme is fixed for the life of the integration (a reload cannot switch it).
        deps = SchemeDeps(
            cfg.auth,
            self.upstream,
            self.clock,
            self.limiter,
            self.metrics,
            cfg.queue.max_wait,
            redact=logs.redactor.remember,
            debug=debug,
            integration=cfg.integration,
        )
        self.schemes = schemes
        self.scheme = schemes[cfg.auth.scheme].build(deps)
        listen = cfg.listen
        self.spool = Spool(spool_dir(listen), listen.spool_threshold, listen.max_buffered_bytes)
        self.forwarder = self._pipeline(cfg)
        self.forwarder.integration = cfg.integration or None
        self.jobs = self._jobs(cfg) if cfg.jobs.enabled else None
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
            )
        )
        self.listener = Listener(
            self.forwarder,
            max_connections=listen.max_connections,
            client_timeout=listen.client_timeout,
            max_header_bytes=listen.max_header_bytes,
        )
        self.port = 0
        self.state = StateCheck(preflight.state_uses(cfg, schemes), self.log)
        # Which checks /readyz requires (limits: the shared Redis, when used).
        self._ready_needs = {"auth", "shutdown", "listen"} | (
            {"limits"}
            if cfg.limits.backend == "redis" and cfg.admin.ready_requires_redis
            else set()
        )

    def _key(self, dotted: str) -> str:
        """A key of this integration as the config names it."""
        return f"integrations[{self.name}].{dotted}" if self.cfg.integration else dotted

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
        debug = self.logs.debug_flag
        sender = Sender(
            self.upstream,
            Gate(cfg.limits.max_inflight),
            self.clock,
            self.limiter,
            self.metrics,
            debug,
        )
        return Forwarder(
            Admission(
                AccessPolicy(cfg.access, cfg.queue.max_size),
                self.scheme,
                cfg.queue,
                cfg.listen.encoded_slashes,
            ),
            Attempts(sender, self.scheme, self.limiter, self.clock, self.metrics, cfg.retry, debug),
            Relay(self.scheme, cfg.logging.log_bodies),
            self.metrics,
            self.logs,
            cfg,
            self.spool,
        )

    def _jobs(self, cfg: Config) -> DurableJobs:
        """Durable jobs: beside the pipeline, sharing its admission, sender and limiter."""
        # Imported only when enabled: the jobs bring SQLite and cryptography (AES-GCM).
        from proxy.jobs.durable import DurableJobs

        forwarder = self.forwarder
        jobs = DurableJobs(
            cfg,
            jobs_store(cfg),
            self.limits_key,
            forwarder.admission,
            forwarder.attempts.sender,
            self.scheme,
            self.limiter,
            self.clock,
            self.metrics,
        )
        forwarder.jobs = jobs.gateway
        self.metrics.watch_jobs(jobs.state)
        return jobs

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

    # -- the status page (proxy/observe/status.py) ------------------------------------------

    def status_sources(self, uptime: Callable[[], float]) -> StatusSources:
        """What the admin port's `/` and `/status.json` show of this integration: values
        read from the components (observe may not import them)."""
        from proxy.observe import status

        return status.StatusSources(
            scheme=self.scheme.name,
            backend=self.cfg.limits.backend,
            readiness=self.readiness,
            required=lambda: self._ready_needs,
            auth=self._auth_view,
            budgets=self._budget_views,
            day=self._day_view,
            queue=self._queue_view,
            jobs=self._jobs_view,
            errors=self.forwarder.recent_errors,
            uptime=uptime,
            scrub=self.logs.redactor.scrub,
        )

    def _auth_view(self) -> AuthView:
        from proxy.observe.status import AuthView

        scheme = self.scheme
        check = scheme.status()
        expires = check.get("expires_in")  # oauth2: seconds left of the current token
        count = self.metrics.auth_count
        return AuthView(
            scheme=scheme.name,
            ok=bool(check.get("ok")),
            message=check.get("error"),
            valid=scheme.valid(),
            credential_age=scheme.credential_age(),
            credential_lifetime=self._code_lifetime(),
            expires_in=float(expires) if isinstance(expires, int | float) else None,
            logins=count("success"),
            login_failures=count("rejected") + count("rate_limited") + count("error"),
        )

    def _budget_views(self) -> list[BudgetView]:
        from proxy.observe.status import BudgetView

        limiter = self.limiter
        windows = limiter.windows
        now = limiter.clock.now()
        window = windows.index(now)
        return [
            BudgetView(
                scope=scope,
                used=limiter.backend.known_used(scope, window),
                limit=bucket.effective_limit,
                configured_limit=bucket.limit,
                api_limit=bucket.server_limit,
                api_remaining=bucket.remaining,
                window=windows.length,
                resets_in=windows.until_next(now),
                held_for=bucket.held_until - now,
                queued=bucket.queued,
                queued_by_lane=limiter.lane_depths(scope),
            )
            for scope, bucket in limiter.buckets.items()
        ]

    def _day_view(self) -> DayView:
        from proxy.observe.status import DayView

        limiter = self.limiter
        return DayView(
            used=limiter.day_used_known(),
            limit=self.cfg.limits.per_day,
            length=limiter.windows.day_length,
            resets_in=limiter.windows.until_next_day(limiter.clock.now()),
        )

    def _queue_view(self) -> QueueView:
        from proxy.observe.status import ClientView, QueueView

        depths = self.limiter.client_depths()
        configured = self.forwarder.admission.policy.clients
        clients = [
            ClientView(c.name, depths.get(c.name, 0), c.max_queued, c.max_lane.label)
            for c in configured
        ]
        # Others that waited: the proxy's own logins, a client a reload removed.
        known = {c.name for c in configured}
        clients += [
            ClientView(name, waiting, None, None)
            for name, waiting in sorted(depths.items())
            if name not in known
        ]
        return QueueView(
            waiting=self.limiter.waiting,
            max_size=self.cfg.queue.max_size,
            max_wait=self.cfg.queue.max_wait,
            inflight=self.forwarder.inflight_count,
            clients=clients,
        )

    def _jobs_view(self) -> JobsView | None:
        """Durable jobs as the runner last counted them; None when jobs.enabled is off."""
        from proxy.observe.status import JobsView

        jobs = self.jobs
        if jobs is None:
            return None
        state = jobs.state()
        return JobsView(
            ok=bool(jobs.status().get("ok", True)),
            by_state=dict(state.by_state),
            oldest_queued_age=state.oldest_queued_age,
        )

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready once logged in, while no later login failed and no drain is on; with a
        Redis backend also while Redis answers (admin.ready_requires_redis), though the
        proxy keeps serving on its local share either way."""
        checks: dict[str, Any] = {
            "auth": self.scheme.status(),
            "limits": self.limiter.status(),
        }
        if self.state.uses:
            # Shown always; failing readiness only for state the operator asked to keep
            # (preflight.StateUse.required): the proxy serves either way.
            checks["state"] = self.state.status()
        if self.jobs is not None:
            # Reported, not required: without the store the proxy still serves requests.
            checks["jobs"] = self.jobs.status()
        if self.forwarder.draining:
            checks["shutdown"] = {"ok": False, "error": "draining: shutting down"}
        if not self.port:
            # The admin port opens first: until the proxy port listens, a scheme with
            # nothing to log in to (Bearer) must not look ready.
            checks["listen"] = {"ok": False, "error": "the proxy port is not listening yet"}
        ready = all(check["ok"] for name, check in checks.items() if name in self._ready_needs)
        state = checks.get("state")
        if state is not None and not state["ok"] and state["required"]:
            ready = False
        return ready, checks

    def prepare_spool(self) -> None:
        """The spool directory, before any socket opens: made private, leftovers removed."""
        spool = self.spool
        try:
            removed = spool.prepare()
        except (OSError, ValueError) as e:
            if not self.cfg.listen.spool_dir:
                # The default under the state directory, which may be unusable: the proxy
                # serves without its state (preflight warns), so bodies go to the system's
                # temp directory instead of stopping the start.
                fallback = spool_dir(self.cfg.listen, {})
                if fallback != spool.directory:
                    # Info, not a warning: state_dir_not_writable already says what is wrong.
                    self.log.info(
                        "spool_dir_fallback", unusable=str(spool.directory), using=str(fallback)
                    )
                    spool.directory = fallback
                    self.prepare_spool()
                    return
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise named(
                self.cfg,
                f"listen.spool_dir: cannot use {spool.directory} for request bodies: {reason}; "
                "give a directory this user can own (mode 0700)",
            ) from None
        if removed:
            self.log.info("spool_leftovers_removed", directory=str(spool.directory), count=removed)

    async def start(self, sock: socket.socket | None = None) -> None:
        """Open what the integration needs, then its listener (on `sock` when a
        predecessor handed its socket over), then log in."""
        self.prepare_spool()
        self.state.start()
        await self.upstream.start()
        await self.limiter.start()
        if self.jobs is not None:
            # Before the listener: no job is acknowledged before the store is open, and
            # what a previous process left running is settled before anything runs.
            await self.jobs.start()
        # Listen before the first login: requests wait for it (single flight) instead
        # of being refused, and /readyz says 503 until it has succeeded.
        self.port = await self.listener.start(self.cfg.listen.host, self.cfg.listen.port, sock)
        await self.scheme.start()

    async def reload(self, new: Config) -> list[str]:
        """Apply this integration's new sections without a restart; returns the keys that
        still need one.

        Limits, queue, retry and logging settings apply at once; new credentials end
        the old login and start a new one. The listener, the upstream, the limiter's
        backend and windows, and the auth scheme keep their old values.
        """
        old = self.cfg
        if differences(old, new):
            # Debug: old and new values, every secret (and URL password) masked.
            self.log.debug("config_changes", changes=described_changes(old, new))
        fixed = fixed_changes(old, new)
        # The admin port is the process's (ProxyService.reload says so once).
        restart = [self._key(key) for key in fixed if key != "admin" or not old.integration]
        fixed_limits: dict[str, Any] = {k: getattr(old.limits, k) for k in _RESTART_LIMITS}
        if "limits.windows" in fixed:
            fixed_limits["windows"] = old.limits.windows
            fixed_limits.update((k, getattr(old.limits, k)) for k in SHORTHAND_BUDGETS)
        auth = old.auth if "auth.scheme" in fixed else new.auth
        applied = dataclasses.replace(
            new,
            listen=old.listen,
            admin=old.admin,
            upstream=old.upstream,
            jobs=old.jobs,
            limits=dataclasses.replace(new.limits, **fixed_limits),
            auth=auth,
        )
        self.limiter.reconfigure(applied.limits, applied.queue)
        self.forwarder.reconfigure(applied)
        self._expect_lane_waits()
        if self.jobs is not None:
            self.jobs.attempts.retries = applied.retry
        self.cfg = applied
        # auth.state_file may move with a reload (oauth2); /readyz looks at the new folder.
        self.state = StateCheck(preflight.state_uses(applied, self.schemes), self.log)
        self.state.start()
        await self.scheme.reconfigure(auth)
        return restart

    def hurry(self) -> tuple[int, int, int]:
        """A second stop signal: cut off what is still in the pipeline; returns what is
        cut off (count, queued, inflight) for the process's warning."""
        self.forwarder.drain.hurry()
        return len(self.forwarder.drain), self.limiter.waiting, self.forwarder.inflight_count

    async def drain(self, grace: float) -> int:
        """Stop accepting; in-flight and queued requests (and running jobs) get `grace`
        seconds; returns how many were cut off."""
        self.listener.stop_accepting()  # no new connections; idle ones closed
        if self.jobs is not None:
            # Jobs under way get the same grace as requests; the rest stay stored.
            cut_off, _ = await asyncio.gather(
                self.forwarder.drain.drain(grace), self.jobs.stop(grace)
            )
            return cut_off
        return await self.forwarder.drain.drain(grace)

    async def close(self, hurried: asyncio.Event) -> None:
        """After the drain: the listener, the session (revoked, unless hurried), the
        limiter and the upstream pool."""
        await self.listener.close()
        await self._unless_hurried(self.scheme.stop(), hurried)
        await self.limiter.close()
        await self.upstream.close()

    # After a second stop signal, what the session's revocation still gets: a moment (it
    # is one small call, worth making), not the 10 s it may take when the API is slow.
    HURRIED_REVOKE = 0.5

    async def _unless_hurried(
        self, coro: Coroutine[Any, Any, Any], hurried_event: asyncio.Event
    ) -> None:
        """Run `coro`; after a second stop signal, for HURRIED_REVOKE seconds at most."""
        task = asyncio.ensure_future(coro)
        hurried = asyncio.ensure_future(hurried_event.wait())
        try:
            await asyncio.wait({task, hurried}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                await asyncio.wait({task}, timeout=self.HURRIED_REVOKE)
        finally:
            hurried.cancel()
        task.cancel()  # no-op when done
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if task.cancelled():
            self.log.warning("auth_not_revoked", reason="shutdown hurried by a second signal")
