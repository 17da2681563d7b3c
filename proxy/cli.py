"""Command line: `luxsci-proxy run | check | sandbox | demo`. No logic beyond wiring."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import os
import secrets
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import yaml

from proxy import __version__, console
from proxy.config import (
    AdminConfig,
    AuthConfig,
    Config,
    ConfigError,
    LimitsConfig,
    ListenConfig,
    LoggingConfig,
    Secret,
    UpstreamConfig,
    load,
    masked,
    validate,
)
from proxy.observe.log import Logs, route_stdlib
from proxy.service import ProxyService, make_logs

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


def _config_path(args: argparse.Namespace) -> str:
    path: str | None = args.config or os.environ.get("LUXSCI_PROXY_CONFIG")
    if not path:
        raise ConfigError(
            "--config: no config file given (use --config FILE or LUXSCI_PROXY_CONFIG)"
        )
    return path


class Signals:
    """SIGINT/SIGTERM ask to stop; SIGHUP calls `on_hangup` once set. Installed before
    start-up, so a stop requested during a slow first login is not lost."""

    def __init__(self, logs: Logs) -> None:
        self.log = logs.logger()
        self.stop = asyncio.Event()
        self.on_hangup: Callable[[], None] | None = None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._hangup)

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
    """SIGHUP: read the config file again; a bad file is refused and the old config stays."""

    def __init__(self, service: ProxyService, path: str) -> None:
        self.service = service
        self.path = path
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
                new = load(self.path)
            except ConfigError as e:
                self.log.error("config_reload_rejected", error=str(e), path=self.path)
                self.service.reload_refused()  # luxsci_proxy_config_last_reload_successful 0
                return
            restart = await self.service.reload(new)  # logging settings included
            self.log.info("config_reloaded", path=self.path, needs_restart=restart)


async def serve(
    cfg: Config,
    logs: Logs,
    announce: Callable[[ProxyService], None] | None = None,
    config_path: str | None = None,
) -> int:
    """Run until SIGINT/SIGTERM (SIGHUP reloads `config_path`); `announce` runs once listening."""
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
            await service.stop()
            return 0
        stopping.cancel()
        try:
            starting.result()
        except OSError as e:
            # Typically a port in use; say so, then leave cleanly.
            console.say(f"error: cannot start listeners: {e.strerror or e}", sys.stderr)
            await service.stop()
            return EXIT_RUNTIME
        if announce is not None:
            announce(service)
        if config_path:
            signals.on_hangup = Reloader(service, config_path)
        await signals.stop.wait()
        await service.stop()
        return 0
    finally:
        signals.remove()
        logs.flush()


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
    path = _config_path(args)
    cfg = load(path)
    logs = make_logs(cfg)
    return in_logs_context(
        logs, lambda: run_loop(serve(cfg, logs, config_path=path), cfg.event_loop)
    )


def cmd_check(args: argparse.Namespace) -> int:
    """Validate, then print the config as YAML with every secret masked. The verdict is a
    YAML comment, so the whole of stdout stays YAML (`check | yq`); warnings go to stderr."""
    path = _config_path(args)
    cfg = load(path)
    for warning in cfg.warnings:
        console.say(f"warning: {warning}", sys.stderr)
    # A reader that stops early (`check | head -1`) is not an error: the config is valid.
    if console.say(f"# {path}: OK"):
        console.say(yaml.safe_dump(masked(cfg), sort_keys=False).rstrip())
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    from proxy.sandbox import cli as sandbox_cli

    asyncio.run(sandbox_cli.serve(args))
    return 0


# The demo's logging: for people, at info.
_DEMO_LOGGING = LoggingConfig(format="console")


async def _demo(port: int, admin_port: int, token: str, secret: str, logs: Logs) -> int:
    from proxy.sandbox import SandboxConfig, start_sandbox

    sandbox = await start_sandbox(
        SandboxConfig(token=token, secret=secret), host="127.0.0.1", port=0
    )
    cfg = validate(
        Config(
            listen=ListenConfig(port=port),
            admin=AdminConfig(port=admin_port),
            # The sandbox is on this machine: never sent through an HTTPS_PROXY of the shell's.
            upstream=UpstreamConfig(url=sandbox.url, allow_insecure=True, proxy=""),
            auth=AuthConfig(scheme="luxsci", token=Secret(token), secret=Secret(secret)),
            # A throw-away integration: no day count worth keeping on disk.
            limits=LimitsConfig(state_file=""),
            logging=_DEMO_LOGGING,
        )
    )

    def banner(service: ProxyService) -> None:
        base = f"http://127.0.0.1:{service.port}"
        user = "joe@example.com"
        # Nobody reading stdout (`demo | head -3`) does not stop the demo: it keeps serving.
        console.say(
            f"""
LuxSci sandbox  {sandbox.url}   (a local simulator of the LuxSci REST API)
luxsci-proxy    {base}   (admin: http://127.0.0.1:{service.admin_port})

Your app sends plain requests; the proxy signs them. Try:
  curl -s {base}/perl/api/v2/user/{user}/profile
  curl -s -X POST {base}/perl/api/v2/account/1234/echo -d '{{"hello": "world"}}'
  curl -s -F 'json={{"subject":"hi"}};filename=json.js;type=application/json' \\
       -F 'files=@README.md' {base}/perl/api/v2/user/{user}/email/compose/secureline/send
  curl -s http://127.0.0.1:{service.admin_port}/readyz
Press Ctrl-C to stop.
"""
        )

    try:
        return await serve(cfg, logs, announce=banner)
    finally:
        await sandbox.close()


def cmd_demo(args: argparse.Namespace) -> int:
    token, secret = "demo-" + secrets.token_hex(8), secrets.token_hex(24)
    # Made before the sandbox's address is known (the config needs it), so the sandbox
    # runs in the log context too.
    logs = Logs(_DEMO_LOGGING.level, _DEMO_LOGGING.format, [secret])
    return in_logs_context(
        logs, lambda: asyncio.run(_demo(args.port, args.admin_port, token, secret, logs))
    )


def build_parser() -> argparse.ArgumentParser:
    from proxy.sandbox import cli as sandbox_cli

    parser = argparse.ArgumentParser(
        prog="luxsci-proxy",
        description="Local authenticating reverse proxy for the LuxSci REST API.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    run = verbs.add_parser("run", help="run the proxy")
    run.add_argument("--config", help="YAML config file (default: $LUXSCI_PROXY_CONFIG)")
    run.set_defaults(func=cmd_run)

    check = verbs.add_parser("check", help="validate a config file and print it, secrets masked")
    check.add_argument("--config", help="YAML config file (default: $LUXSCI_PROXY_CONFIG)")
    check.set_defaults(func=cmd_check)

    sandbox = verbs.add_parser("sandbox", help="run the built-in LuxSci API simulator")
    sandbox_cli.add_arguments(sandbox)
    sandbox.set_defaults(func=cmd_sandbox)

    demo = verbs.add_parser("demo", help="run the sandbox and the proxy wired together")
    demo.add_argument("--port", type=int, default=0, help="proxy port (default: a free one)")
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
