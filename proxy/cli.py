"""Command line: `luxsci-proxy run | check | jobs | sandbox | demo`. No logic beyond wiring."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import dataclasses
import os
import secrets
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from proxy import __version__, console, preflight
from proxy.config import (
    CONFIG_ENV,
    AdminConfig,
    AuthConfig,
    Config,
    ConfigError,
    IntegrationConfig,
    LimitsConfig,
    ListenConfig,
    LoggingConfig,
    Secret,
    UpstreamConfig,
    differences,
    integrations_of,
    is_redis_store,
    validate,
)
from proxy.jobs.errors import StoreError
from proxy.observe.log import Logs, route_stdlib
from proxy.service import ProxyService, jobs_store, limits_key, make_logs
from proxy.sources import Inputs, Resolved, annotated_yaml, inputs_from, resolve
from proxy.sources import add_arguments as add_config_arguments

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


def _resolve(args: argparse.Namespace) -> tuple[Inputs, Resolved]:
    """The config from every source the command line and the environment name."""
    inputs = inputs_from(args, os.environ)
    return inputs, resolve(inputs, os.environ)


class Signals:
    """SIGINT/SIGTERM ask to stop, a second one during the drain to stop at once (`hurry`);
    SIGHUP calls `on_hangup` once set. Installed before start-up, so a stop requested
    during a slow first login is not lost."""

    def __init__(self, logs: Logs) -> None:
        self.log = logs.logger()
        self.stop = asyncio.Event()
        # Set by the second stop signal: whoever is draining gives up waiting.
        self.hurry = asyncio.Event()
        self.on_hangup: Callable[[], None] | None = None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._hangup)

    def _stop(self, sig: signal.Signals) -> None:
        if self.stop.is_set():
            self.hurry.set()  # the service says what it cuts off
        self.stop.set()

    def _hangup(self) -> None:
        if self.on_hangup is not None:
            self.on_hangup()
        else:
            self.log.warning("config_reload_ignored", reason="still starting")

    def remove(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)


class Reloader:
    """SIGHUP: read every source again (the file, `*_file` secrets, the flags given at
    start); a config that does not validate is refused and the old one stays."""

    def __init__(
        self, service: ProxyService, source: str, load: Callable[[], Config] | None = None
    ) -> None:
        """`source` names the config in the events; `load` reads it again (default: the
        file `source` names, under the environment's LUXSCI_PROXY_* keys)."""
        self.service = service
        self.source = source
        self.load = load if load is not None else (lambda: resolve(Inputs(source)).config)
        self.log = service.logs.logger()
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> None:
        async with self._lock:  # one reload at a time, in signal order
            try:
                new = self.load()
            except ConfigError as e:
                self.log.error("config_reload_rejected", error=str(e), path=self.source)
                self.service.reload_refused()  # luxsci_proxy_config_last_reload_successful 0
                return
            # Key names only: what changed to what is a debug event of the service's.
            changed = differences(self.service.cfg, new)
            try:
                restart = await self.service.reload(new)  # logging settings included
            except ConfigError as e:
                self.log.error("config_reload_rejected", error=str(e), path=self.source)
                return
            names = self.service.last_reload.refused
            refused = {"refused": list(names)} if names else {}
            self.log.info(
                "config_reloaded",
                path=self.source,
                changed=changed,
                needs_restart=restart,
                **refused,
            )


async def serve(
    cfg: Config,
    logs: Logs,
    announce: Callable[[ProxyService], None] | None = None,
    reload: Callable[[], Config] | None = None,
    source: str = "",
) -> int:
    """Run until SIGINT/SIGTERM (SIGHUP: `reload`, naming `source` in its events);
    `announce` runs once listening. A second SIGINT/SIGTERM cuts the drain short."""
    signals = Signals(logs)
    service = ProxyService(cfg, logs=logs)
    try:
        starting = asyncio.create_task(service.start())
        stopping = asyncio.create_task(signals.stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # asked to stop while still starting
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await starting
            await _stop(service, signals)
            return 0
        stopping.cancel()
        try:
            starting.result()
        except OSError as e:
            # Typically a port in use; say so, then leave cleanly.
            console.say(f"error: cannot start listeners: {e.strerror or e}", sys.stderr)
            await service.stop()
            return EXIT_RUNTIME
        except StoreError as e:
            # The jobs store cannot be opened (unwritable, in use by another process).
            console.say(f"error: {e}", sys.stderr)
            await service.stop()
            return EXIT_RUNTIME
        if announce is not None:
            announce(service)
        if reload is not None:
            signals.on_hangup = Reloader(service, source, reload)
        await signals.stop.wait()
        await _stop(service, signals)
        return 0
    finally:
        signals.remove()
        logs.flush()


async def _stop(service: ProxyService, signals: Signals) -> None:
    """The drain, cut short by a second stop signal (at once if one came already)."""
    stopping = asyncio.create_task(service.stop())
    hurried = asyncio.create_task(signals.hurry.wait())
    try:
        await asyncio.wait({stopping, hurried}, return_when=asyncio.FIRST_COMPLETED)
        if not stopping.done():
            service.hurry()
        await stopping
    finally:
        hurried.cancel()


def run_loop(main: Coroutine[Any, Any, int], choice: str) -> int:
    """Run on uvloop when asked or (auto) when installed: a faster loop and transports."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                main.close()
                raise ConfigError(
                    "event_loop: uvloop is not installed (pip install 'luxsci-proxy[speed]')"
                ) from None
        else:
            result: int = uvloop.run(main)
            return result
    return asyncio.run(main)


def in_logs_context(logs: Logs, run: Callable[[], int]) -> int:
    """Run the process (its event loop) in the service's log context: every event of the
    process, third-party ones included, is rendered and redacted by `logs`."""
    route_stdlib()
    atexit.register(logs.flush)
    return logs.context().run(run)


def cmd_run(args: argparse.Namespace) -> int:
    inputs, resolved = _resolve(args)
    cfg = resolved.config
    logs = make_logs(cfg)
    source = resolved.source or "flags and environment"

    def reload() -> Config:
        # Lenient: an integration whose section is bad is refused alone (config.build).
        return resolve(inputs, os.environ, lenient=True).config

    return in_logs_context(
        logs,
        lambda: run_loop(serve(cfg, logs, reload=reload, source=source), cfg.event_loop),
    )


def cmd_check(args: argparse.Namespace) -> int:
    """Validate, then print the config as YAML with every secret masked and, after each
    key, where its value came from. The verdict and the sources are YAML comments, so
    the whole of stdout stays YAML (`check | yq`); warnings go to stderr, the same ones
    `run` logs at start-up (proxy/preflight.py)."""
    _, resolved = _resolve(args)
    for finding in preflight.findings(resolved.config):
        console.say(f"warning: {finding.message}", sys.stderr)
    source = resolved.source or "flags and environment (no config file)"
    # A reader that stops early (`check | head -1`) is not an error: the config is valid.
    if not console.say(f"# {source}: OK"):
        return 0
    for view in integrations_of(resolved.config) if resolved.config.integrations else ():
        listen = f"{view.listen.host}:{view.listen.port}"
        if not console.say(f"# integrations[{view.name}]: OK ({view.auth.scheme}, {listen})"):
            return 0
    if console.say(_SOURCES_NOTE):
        console.say(annotated_yaml(resolved))
    return 0


_SOURCES_NOTE = (
    "# after each key, where its value came from: flag:--option > env:VARIABLE > file > default"
)


def cmd_jobs(args: argparse.Namespace) -> int:
    # Imported here: the jobs package brings cryptography and SQLite, which `run` needs
    # only when jobs are enabled.
    from proxy.jobs import operator as jobs_operator
    from proxy.jobs.durable import make_store

    if args.action == "keygen":
        return jobs_operator.keygen()
    file = args.config if args.config is not None else os.environ.get(CONFIG_ENV)
    cfg = resolve(Inputs(file or None), os.environ).config
    for warning in cfg.warnings:
        console.say(f"warning: {warning}", sys.stderr)
    cfg = _integration_named(cfg, args.integration)
    location = jobs_store(cfg)
    if not is_redis_store(location) and not jobs_operator.exists(Path(location)):
        return EXIT_RUNTIME
    store = make_store(cfg.jobs, location, limits_key(cfg), runner=False)
    code: int = asyncio.run(jobs_operator.run(args, store, cfg.jobs.max_age, cfg.jobs.keep_results))
    return code


def _integration_named(cfg: Config, name: str | None) -> Config:
    """The integration whose jobs the verb reads: the one of a config without
    `integrations:`, else the one --integration names."""
    if not cfg.integrations:
        if name not in (None, cfg.name):
            raise ConfigError(f"--integration: the config has one integration, {cfg.name!r}")
        return cfg
    views = {view.name: view for view in integrations_of(cfg)}
    if name not in views:
        raise ConfigError(
            f"--integration: give one of the config's integrations: {', '.join(views)}"
        )
    return views[name]


def _jobs_options(parser: argparse.ArgumentParser) -> None:
    from proxy.jobs import operator as jobs_operator  # as for the sandbox: only when asked

    parser.add_argument(
        "--integration", metavar="NAME", help="whose jobs, when the config lists integrations"
    )
    jobs_operator.add_arguments(parser)


def cmd_sandbox(args: argparse.Namespace) -> int:
    from proxy.sandbox import cli as sandbox_cli

    asyncio.run(sandbox_cli.serve(args))
    return 0


# The demo's logging: for people, at info.
_DEMO_LOGGING = LoggingConfig(format="console")


async def _demo(port: int, admin_port: int, creds: _DemoSecrets, logs: Logs) -> int:
    from proxy.sandbox import SandboxConfig, start_sandbox
    from proxy.sandbox.config import OAuthSettings

    luxsci = await start_sandbox(
        SandboxConfig(token=creds.token, secret=creds.secret), host="127.0.0.1", port=0
    )
    oauth = await start_sandbox(
        SandboxConfig(
            oauth=OAuthSettings(client_id=creds.client_id, client_secret=creds.client_secret)
        ),
        host="127.0.0.1",
        port=0,
    )
    # The sandboxes are on this machine: never sent through an HTTPS_PROXY of the shell's.
    # Throw-away integrations: no day count or token worth keeping on disk.
    mail = IntegrationConfig(
        name="mail",
        listen=ListenConfig(port=port),
        upstream=UpstreamConfig(url=luxsci.url, allow_insecure=True, proxy=""),
        auth=AuthConfig(scheme="luxsci", token=Secret(creds.token), secret=Secret(creds.secret)),
        limits=LimitsConfig(state_file=""),
    )
    crm = IntegrationConfig(
        name="crm",
        listen=ListenConfig(port=0),
        upstream=UpstreamConfig(url=oauth.url, allow_insecure=True, proxy=""),
        auth=AuthConfig(
            scheme="oauth2",
            token_url=oauth.url + "/oauth/token",
            client_id=creds.client_id,
            client_secret=Secret(creds.client_secret),
            state_file="",
        ),
        limits=LimitsConfig(state_file=""),
    )
    cfg = validate(
        Config(admin=AdminConfig(port=admin_port), logging=_DEMO_LOGGING, integrations=(mail, crm))
    )

    def banner(service: ProxyService) -> None:
        base = f"http://127.0.0.1:{service.integrations['mail'].port}"
        api = f"http://127.0.0.1:{service.integrations['crm'].port}"
        admin = f"http://127.0.0.1:{service.admin_port}"
        user = "joe@example.com"
        # Nobody reading stdout (`demo | head -3`) does not stop the demo: it keeps serving.
        console.say(
            f"""
LuxSci sandbox     {luxsci.url}   (a local simulator of the LuxSci REST API)
OAuth 2.0 sandbox  {oauth.url}   (an API secured with OAuth 2.0 client credentials)
luxsci-proxy       integration mail: {base}   (signs LuxSci requests)
                   integration crm:  {api}   (adds an OAuth 2.0 access token)
                   admin: {admin}

Your app sends plain requests; the proxy signs them. Try:
  curl -s {base}/perl/api/v2/user/{user}/profile
  curl -s '{api}/v1/contacts?page=1'
  curl -s -X POST {base}/perl/api/v2/account/1234/echo -d '{{"hello": "world"}}'
  curl -s -X POST {api}/v1/contacts -H 'Content-Type: application/json' -d '{{"name": "Ann"}}'
  curl -s -F 'json={{"subject":"hi"}};filename=json.js;type=application/json' \\
       -F 'files=@README.md' {base}/perl/api/v2/user/{user}/email/compose/secureline/send
  curl -s {admin}/readyz
  curl -s '{admin}/readyz?integration=crm'
Press Ctrl-C to stop.
"""
        )

    try:
        return await serve(cfg, logs, announce=banner)
    finally:
        await oauth.close()
        await luxsci.close()


@dataclasses.dataclass(frozen=True)
class _DemoSecrets:
    """The demo's throw-away credentials, made fresh each run."""

    token: str = dataclasses.field(default_factory=lambda: "demo-" + secrets.token_hex(8))
    secret: str = dataclasses.field(default_factory=lambda: secrets.token_hex(24))
    client_id: str = "demo-client"
    client_secret: str = dataclasses.field(default_factory=lambda: secrets.token_hex(24))


def cmd_demo(args: argparse.Namespace) -> int:
    creds = _DemoSecrets()
    # Made before the sandboxes' addresses are known (the config needs them), so the
    # sandboxes run in the log context too.
    logs = Logs(_DEMO_LOGGING.level, _DEMO_LOGGING.format, [creds.secret, creds.client_secret])
    return in_logs_context(
        logs, lambda: asyncio.run(_demo(args.port, args.admin_port, creds, logs))
    )


class _Verb(argparse.ArgumentParser):
    """A verb's parser that may define its options only when that verb is parsed, so a
    `run` never imports what only another verb needs."""

    def __init__(
        self,
        *args: Any,
        options: Callable[[argparse.ArgumentParser], None] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(*args, **kw)
        self._options = options

    def parse_known_args(self, *args: Any, **kw: Any) -> Any:
        if self._options is not None:
            add, self._options = self._options, None
            add(self)
        return super().parse_known_args(*args, **kw)


def _sandbox_options(parser: argparse.ArgumentParser) -> None:
    # The simulator's package imports its whole app (and `cryptography`, for its OAuth
    # state): ~10 MiB and ~40 ms that `run` would otherwise pay just to build this parser.
    from proxy.sandbox import cli as sandbox_cli

    sandbox_cli.add_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="luxsci-proxy",
        description="Local authenticating reverse proxy for the LuxSci REST API.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=_Verb)

    sources_help = (
        "Each key from the highest source that sets it: flags > LUXSCI_PROXY_<SECTION>_<KEY> "
        "variables > the config file > defaults."
    )
    run = verbs.add_parser("run", help="run the proxy", description=sources_help)
    add_config_arguments(run)
    run.set_defaults(func=cmd_run)

    check = verbs.add_parser(
        "check",
        help="validate the config and print it, secrets masked, with where each value came from",
        description=sources_help,
    )
    add_config_arguments(check)
    check.set_defaults(func=cmd_check)

    jobs = verbs.add_parser(
        "jobs",
        help="list, show, cancel, retry or purge durable jobs",
        options=_jobs_options,
    )
    jobs.set_defaults(func=cmd_jobs)

    sandbox = verbs.add_parser(
        "sandbox", help="run the built-in LuxSci API simulator", options=_sandbox_options
    )
    sandbox.set_defaults(func=cmd_sandbox)

    demo = verbs.add_parser(
        "demo", help="run a LuxSci and an OAuth 2.0 sandbox and the proxy wired to both"
    )
    demo.add_argument(
        "--port", type=int, default=0, help="the LuxSci integration's port (default: a free one)"
    )
    demo.add_argument("--admin-port", type=int, default=0, help="admin port (default: a free one)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # A print that did not go through console.say: its reader went away. Not an error
        # of ours (see proxy/console.py), so no traceback, and exit 0.
        console.reader_gone()
        return 0
    finally:
        # argparse's --help and --version text may still be buffered: flush it here.
        console.flush()


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as e:
        console.say(f"config error: {e}", sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 0
    return code
