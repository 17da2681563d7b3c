"""Wiring: build every component from one Config, start and stop them in order.

The process owns the admin port, the logs, the metrics registry and the drain; each
integration (proxy/integration.py) owns its listener and everything behind it.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import os
import socket
import time
from collections.abc import Coroutine, Mapping
from typing import IO, TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote

import structlog
from aiohttp import web

from proxy import egress, preflight
from proxy.config import (
    INTEGRATION_SECTIONS,
    Config,
    ConfigError,
    IntegrationConfig,
    check_integrations,
    check_scheme_state,
    integrations_of,
    url_passwords,
)
from proxy.integration import (
    Integration,
    StateCheck,
    fixed_changes,
    jobs_store,
    limits_key,
    make_backend,
    state_file,
)
from proxy.observe.admin import create_admin_app
from proxy.observe.log import Logs
from proxy.observe.metrics import ProcessMetrics, ReloadState
from proxy.schemes.registry import BUILT_IN, SchemeKind

# What other modules (the CLI, tests) take from here; they live with the integration.
__all__ = [
    "ProxyService",
    "StateCheck",
    "jobs_store",
    "limits_key",
    "make_backend",
    "make_logs",
    "secrets_of",
    "state_file",
]

if TYPE_CHECKING:
    from proxy.clock import ServerClock
    from proxy.http.body import Spool
    from proxy.http.client import Upstream
    from proxy.http.server import Listener
    from proxy.jobs.durable import DurableJobs
    from proxy.limits import RateLimiter
    from proxy.observe.metrics import Metrics
    from proxy.pipeline.forward import Forwarder
    from proxy.schemes.base import AuthScheme

T = TypeVar("T")


def secrets_of(cfg: Config) -> list[str]:
    """Every secret value in the config, every integration's: the logs mask them wherever
    they appear."""
    if cfg.integrations:
        return [s for view in integrations_of(cfg) for s in secrets_of(view)]
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
    # Every Redis URL's passwords: the shared limits', the jobs store's, the OAuth tokens'.
    for url in (cfg.limits.redis_url, cfg.jobs.store, auth.state_store):
        for password in url_passwords(url or ""):
            found += [password, unquote(password)]
    # The jobs' sealing keys and the callbacks' signing secret.
    found += [key.get() for key in cfg.jobs.keys if key.get()]
    if cfg.jobs.callback_secret is not None:
        found.append(cfg.jobs.callback_secret.get())
    # The egress proxy's credentials, the environment's (HTTPS_PROXY...) included.
    return found + egress.secrets(cfg.upstream, os.environ)


def make_logs(cfg: Config, stream: IO[str] | None = None) -> Logs:
    """The logging of a service with this config (stream: stderr unless given)."""
    return Logs(cfg.logging.level, cfg.logging.format, secrets_of(cfg), stream)


def _bound_port(runner: web.BaseRunner) -> int:
    port: int = runner.addresses[0][1]
    return port


class ProxyService:
    """The running proxy: its integrations, the admin port and the logs.

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
        self.process_metrics = ProcessMetrics()
        self.process_metrics.watch_reload(lambda: self.last_reload)
        self.schemes = schemes
        self.integrations: dict[str, Integration] = {
            view.name: Integration(view, self.logs, self.process_metrics, schemes)
            for view in integrations_of(cfg)
        }
        self._born = time.monotonic()
        self._admin_runner = web.AppRunner(
            create_admin_app(
                self.readiness,
                self.process_metrics.registry,
                self.status,
                integration_readiness=self.integration_readiness,
            ),
            access_log=None,
            shutdown_timeout=5,
        )
        self.admin_port = 0
        self._hurried = asyncio.Event()
        self._started = False
        # Held by a reload while it changes the integrations (a replacement retires one
        # and starts another), and by the stop: the drain starts on the integrations
        # the reload leaves, never on a list it is still changing.
        self._changing = asyncio.Lock()
        self._stopping = False
        # Integrations a reload removed, while they drain: out of the list (readiness,
        # status), still within reach of a second stop signal.
        self._retiring: set[Integration] = set()
        # Integrations a reload is replacing (old one draining, new one not started yet).
        self._replacing: set[str] = set()

    # -- the one integration of a config without `integrations:` (and the first of a list):
    # what callers of a single-integration service read.

    @property
    def first(self) -> Integration:
        return next(iter(self.integrations.values()))

    @property
    def port(self) -> int:
        return self.first.port

    @property
    def limiter(self) -> RateLimiter:
        return self.first.limiter

    @property
    def scheme(self) -> AuthScheme:
        return self.first.scheme

    @property
    def forwarder(self) -> Forwarder:
        return self.first.forwarder

    @property
    def jobs(self) -> DurableJobs | None:
        return self.first.jobs

    @property
    def spool(self) -> Spool:
        return self.first.spool

    @property
    def upstream(self) -> Upstream:
        return self.first.upstream

    @property
    def clock(self) -> ServerClock:
        return self.first.clock

    @property
    def metrics(self) -> Metrics:
        return self.first.metrics

    @property
    def limits_key(self) -> str:
        return self.first.limits_key

    @property
    def state(self) -> StateCheck:
        return self.first.state

    @property
    def listener(self) -> Listener:
        return self.first.listener

    # -- the admin port -----------------------------------------------------------------

    def status(self, integration: str | None = None) -> dict[str, Any] | None:
        """What the admin port's `/` and `/status.json` show, as plain JSON data, every
        string masked by the log redactor: the one integration's (a config without
        `integrations:`), the one named, or (None, with the list) an overview of each;
        None for a name there is no integration of."""
        from proxy.observe import status

        def uptime() -> float:
            return time.monotonic() - self._born

        listed = bool(self.cfg.integrations)
        if integration is not None or not listed:
            found = self.integrations.get(integration or self.first.name)
            if found is None:
                return None
            data = status.snapshot(found.status_sources(uptime))
            if listed:
                data["integration"] = found.name
                data["integrations"] = list(self.integrations)
            return data
        every = {
            name: status.snapshot(i.status_sources(uptime)) for name, i in self.integrations.items()
        }
        return {"ready": all(d["ready"] for d in every.values()), "integrations": every}

    def reload_refused(self) -> None:
        """A SIGHUP's config did not load, or was refused whole: nothing changed, and the
        metrics say so. Integrations an earlier reload refused alone still run their old
        sections: they stay flagged until a reload applies whole."""
        self.last_reload = dataclasses.replace(self.last_reload, successful=False)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when every integration is. Without `integrations:`, the one integration's
        checks as they always were; with it, each integration's under its name."""
        if not self.cfg.integrations:
            return self.first.readiness()
        checks: dict[str, Any] = {}
        # None left (a failed replacement whose old section could not resume either):
        # nothing serves, so not ready.
        ready = bool(self.integrations)
        for name, integration in self.integrations.items():
            ok, its = integration.readiness()
            if name in self._replacing:
                # A deliberate pause of one integration (its clients wait in the listen
                # backlog) must not make the whole process unready: an orchestrator would
                # take every integration out of service for it. It says so on its own.
                checks[name] = {"ready": False, "replacing": True, "checks": its}
                continue
            checks[name] = {"ready": ok, "checks": its}
            ready = ready and ok
        return ready, checks

    def integration_readiness(self, name: str) -> tuple[bool, dict[str, Any]] | None:
        """/readyz?integration=NAME: that one alone; None for a name there is none of."""
        integration = self.integrations.get(name)
        return None if integration is None else integration.readiness()

    # -- start, reload, stop --------------------------------------------------------------

    def _in_context(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """`coro` as a task of this service's log context (see the class docstring)."""
        return asyncio.get_running_loop().create_task(coro, context=self.logs.context())

    def _integration_context(self, integration: Integration) -> contextvars.Context:
        """The context an integration's tasks and connections run in: the service's,
        binding `integration` for every event when the config lists several."""
        context = self.logs.context()
        if integration.cfg.integration:
            context.run(structlog.contextvars.bind_contextvars, integration=integration.name)
        return context

    async def _start_integration(
        self, integration: Integration, sock: socket.socket | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        start = integration.start(sock)
        await loop.create_task(start, context=self._integration_context(integration))

    async def start(self) -> None:
        await self._in_context(self._start())

    async def _start(self) -> None:
        # The warnings `check` prints too: one list for both (proxy/preflight.py).
        for finding in preflight.findings(self.cfg, self.schemes):
            self.log.warning(finding.event, **finding.fields)
        for integration in self.integrations.values():
            integration.prepare_spool()
        await self._admin_runner.setup()
        admin = web.TCPSite(self._admin_runner, self.cfg.admin.host, self.cfg.admin.port)
        await admin.start()
        self.admin_port = _bound_port(self._admin_runner)
        for integration in self.integrations.values():
            await self._start_integration(integration)
            self._started_event(integration)

    def _started_event(self, integration: Integration) -> None:
        cfg = integration.cfg
        fields: dict[str, Any] = {"integration": integration.name} if cfg.integration else {}
        self.log.info(
            "proxy_started",
            **fields,
            event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
            listen=f"{cfg.listen.host}:{integration.port}",
            admin=f"{self.cfg.admin.host}:{self.admin_port}",
            upstream=cfg.upstream.url,
            # host:port only: the proxy's credentials are never logged.
            egress=integration.upstream.egress.where if integration.upstream.egress else None,
            scheme=integration.scheme.name,
            ready=integration.readiness()[0],
        )

    async def reload(self, new: Config) -> list[str]:
        """Apply a new config without a restart; returns the keys that still need one.

        Each integration applies its own sections (Integration.reload); integrations
        the new config adds are started, those it leaves out drained and closed. An
        entry the reload refused (new.refused) stays exactly as it was.
        """
        try:
            restart, refused = await self._in_context(self._reload_once(new))
        except BaseException:
            self.reload_refused()
            raise
        self.last_reload = ReloadState(
            successful=not refused, success_time=time.time(), refused=tuple(refused)
        )
        return restart

    async def _reload_once(self, new: Config) -> tuple[list[str], list[str]]:
        async with self._changing:
            if self._stopping:
                raise ConfigError("the proxy is stopping: the reload is not applied")
            return await self._reload(new)

    async def _reload(self, new: Config) -> tuple[list[str], list[str]]:
        """The keys that need a restart, and the integrations refused."""
        old = self.cfg
        if bool(new.integrations) != bool(old.integrations):
            raise ConfigError(
                "integrations: a reload cannot turn a config without integrations: into "
                "one with it, or back (the one integration's state would move); restart"
            )
        if new.refused:
            self._check_beside_refused(new)
        # Logging first, so the reload's own events follow the new settings.
        self.logs.configure(new.logging.level, new.logging.format, secrets_of(new))
        if not new.integrations:
            restart = await self.first.reload(new)
            self.cfg = self.first.cfg
            return restart, []
        return await self._reload_listed(old, new)

    def _check_beside_refused(self, new: Config) -> None:
        """The entries a reload applies, checked beside the refused ones that keep running
        as they were (config.build checked them only among themselves): no address or
        state of a running integration may go to another."""
        kept = [
            _entry(self.integrations[name].cfg)
            for name, _ in new.refused
            if name in self.integrations
        ]
        # The running ones first: an error names the new entry that would take their own.
        entries = (*kept, *new.integrations)
        check_integrations(entries)
        views = integrations_of(dataclasses.replace(new, integrations=entries))
        check_scheme_state(views, self.schemes)

    async def _reload_listed(self, old: Config, new: Config) -> tuple[list[str], list[str]]:
        restart = ["admin"] if new.admin != old.admin else []
        refused = dict(new.refused)
        for name, why in refused.items():
            self.log.error("config_reload_rejected", integration=name, error=why)
        views = {view.name: view for view in integrations_of(new)}
        # Removed first: a new integration may take a removed one's address.
        for name in [n for n in self.integrations if n not in views and n not in refused]:
            await self._remove(name)
        for name, view in views.items():
            current = self.integrations.get(name)
            view = dataclasses.replace(view, admin=old.admin)
            error: str | None = None
            if current is None:
                try:
                    await self._add(view)
                except Exception as e:
                    # Its port is taken (or the like): refused like a bad section, the
                    # others applied all the same.
                    error = _start_error(view, e)
            elif changed := [k for k in fixed_changes(current.cfg, view) if k != "admin"]:
                error = await self._replace(current, view, changed)
            else:
                restart += await current.reload(view)
            if error is not None:
                self.log.error("config_reload_rejected", integration=name, error=error)
                refused[name] = error
        # The config now in force: every applied entry, and each refused one as it was.
        entries = [self.integrations[name].cfg for name in self.integrations]
        self.cfg = dataclasses.replace(
            new,
            admin=old.admin,
            integrations=tuple(_entry(view) for view in entries),
            refused=(),
        )
        return restart, list(refused)

    async def _add(self, view: Config) -> None:
        """A new integration: started while the others serve."""
        try:
            integration = await self._launch(view)
        except BaseException:
            self.process_metrics.remove(view.name)
            raise
        self.integrations[view.name] = integration
        self._started_event(integration)
        self.log.info("integration_added", integration=view.name, listen=integration.port)

    async def _launch(
        self, view: Config, metrics: Metrics | None = None, handed: socket.socket | None = None
    ) -> Integration:
        """An integration built from `view` and started (on a duplicate of `handed`, a
        predecessor's listening socket, when given); one that cannot start is closed
        again, releasing whatever it opened (its jobs store's lock among them)."""
        integration = Integration(view, self.logs, self.process_metrics, self.schemes, metrics)
        # A duplicate: a failed start closes its listener's socket, and `handed` must
        # stay open for whoever starts next.
        sock = handed.dup() if handed is not None else None
        try:
            await self._start_integration(integration, sock)
        except BaseException:
            await integration.drain(0)
            await integration.close(self._hurried)
            if sock is not None:
                sock.close()
            raise
        return integration

    async def _replace(self, old: Integration, view: Config, changed: list[str]) -> str | None:
        """A listed integration whose listener, upstream, jobs, limiter backend or scheme
        changes: the old one is retired, then one built from `view` starts. Returns None,
        or why the new one could not start (then the old config starts again instead).

        Retired first, whole (stops accepting, drains, closes), because the two would
        otherwise share what has one owner: the jobs store's lock, the day count's state
        file, a refresh token that rotates. On the same address the old listener's socket
        is handed over, so clients that connect during the drain wait in its backlog
        rather than being refused; the same socket lets the old config resume there.
        """
        name = old.name
        self.log.info("integration_replacing", integration=name, changed=changed)
        handed = old.listener.handover()
        self._replacing.add(name)
        try:
            cut_off = await old.drain(self.cfg.shutdown_timeout)
            await old.close(self._hurried)
            same = _address(view) == _address(old.cfg)
            if not same and handed is not None and view.listen.port == old.port:
                # The same port on another host (127.0.0.1 -> 0.0.0.0, or -> localhost):
                # the old socket, kept for a resume, would hold the port the new one binds.
                # Released first; a resume then binds the old address afresh.
                handed.close()
                handed = None
            try:
                new = await self._launch(view, old.metrics, handed if same else None)
            except Exception as e:
                error = _start_error(view, e)
                await self._resume(old, handed)
                return error
        finally:
            self._replacing.discard(name)
            if handed is not None:
                handed.close()
        self.integrations[name] = new
        self._started_event(new)
        self.log.info("integration_replaced", integration=name, changed=changed, cut_off=cut_off)
        return None

    async def _resume(self, old: Integration, handed: socket.socket | None) -> None:
        """The new section could not start: the old config serves again, on its old
        socket when it was handed over. Should even that fail, the integration is gone
        (and said so) rather than left half open."""
        name = old.name
        try:
            resumed = await self._launch(old.cfg, old.metrics, handed)
        except Exception as e:
            del self.integrations[name]
            self.process_metrics.remove(name)
            self.log.error("integration_lost", integration=name, error=_start_error(old.cfg, e))
            return
        self.integrations[name] = resumed
        self.log.warning("integration_resumed", integration=name, listen=resumed.port)

    async def _remove(self, name: str) -> None:
        """An integration the new config leaves out: it stops accepting, its in-flight
        requests get shutdown_timeout to finish, then it closes."""
        integration = self.integrations.pop(name)
        self._retiring.add(integration)
        if self._hurried.is_set():
            integration.hurry()  # removed after the second signal: no grace either
        try:
            cut_off = await integration.drain(self.cfg.shutdown_timeout)
            await integration.close(self._hurried)
        finally:
            self._retiring.discard(integration)
        self.process_metrics.remove(name)
        self.log.info("integration_removed", integration=name, cut_off=cut_off)

    async def stop(self) -> None:
        """Stop accepting; let in-flight and queued requests finish within shutdown_timeout,
        answer the rest 503; revoke the sessions; close everything; flush the log."""
        await self._in_context(self._stop())

    def hurry(self) -> None:
        """A second stop signal: end the drain now, cutting off whatever is still in the
        pipelines (each request answered 503 shutting_down), and give up the sessions'
        revocation if it has to wait for the API (the code expires on its own)."""
        if self._hurried.is_set():
            return
        self._hurried.set()
        count = queued = inflight = 0
        for integration in [*self.integrations.values(), *self._retiring]:
            c, q, i = integration.hurry()
            count, queued, inflight = count + c, queued + q, inflight + i
        self.log.warning("shutdown_hurried", count=count, queued=queued, inflight=inflight)

    async def _stop(self) -> None:
        self.log.info("shutdown_started", timeout_s=self.cfg.shutdown_timeout)
        self._stopping = True
        grace = self.cfg.shutdown_timeout
        # A reload under way finishes first (its own drain of a replaced integration is
        # cut short by `hurry` like this one): an integration it starts is drained too.
        async with self._changing:
            integrations = list(self.integrations.values())
        if self._hurried.is_set():
            for integration in integrations:
                integration.hurry()  # started after the second signal: no grace either
        cut_off = sum(await asyncio.gather(*(i.drain(grace) for i in integrations)))
        if cut_off:
            self.log.warning(
                "shutdown_cut_off_requests", count=cut_off, hurried=self._hurried.is_set()
            )
        for integration in integrations:
            await integration.close(self._hurried)
        await self._admin_runner.cleanup()
        self.log.info("shutdown_complete")
        self.logs.flush()


def _address(view: Config) -> tuple[str, int]:
    return view.listen.host, view.listen.port


def _start_error(view: Config, e: Exception) -> str:
    """Why an integration could not start, naming its entry (never a secret: the
    messages name keys, addresses and files)."""
    if isinstance(e, OSError):
        where = f"{view.listen.host}:{view.listen.port}"
        return f"integrations[{view.name}].listen: cannot listen on {where}: {e.strerror or e}"
    text = str(e)
    prefix = f"integrations[{view.name}]"
    return text if text.startswith(prefix) else f"{prefix}: cannot start: {text}"


def _entry(view: Config) -> IntegrationConfig:
    """An integration's view as its entry of `integrations:` again."""
    sections = {section: getattr(view, section) for section in INTEGRATION_SECTIONS}
    return IntegrationConfig(name=view.name, **sections)
