"""Command line: `luxsci-proxy sandbox ...` (wired by the main CLI), `python -m proxy.sandbox`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import ssl

from proxy import console
from proxy.sandbox.config import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_SECRET,
    DEFAULT_TOKEN,
    DEFAULT_USERS,
    RATE_HEADER_STYLES,
    TOKEN_PATH,
    OAuthSettings,
    SandboxConfig,
    SandboxWindow,
)
from proxy.sandbox.server import start_sandbox

TOKEN_ENV = "LUXSCI_SANDBOX_TOKEN"
SECRET_ENV = "LUXSCI_SANDBOX_SECRET"
CLIENT_SECRET_ENV = "LUXSCI_SANDBOX_CLIENT_SECRET"


def _user(text: str) -> tuple[str, str]:
    login, sep, password = text.partition(":")
    if not sep or not login:
        raise argparse.ArgumentTypeError("expected LOGIN:PASSWORD")
    return login, password


# The stand-in reads its own durations (it shares no code with the proxy's limits).
_PER = re.compile(r"(\d+)([smhd]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _window(text: str) -> SandboxWindow:
    """REQUESTS/PER[/SCOPE]: 10/1s, 1000/1h/all, 30/1m/user."""
    parts = text.split("/")
    per = _PER.fullmatch(parts[1]) if len(parts) in (2, 3) else None
    try:
        if not parts[0].isdigit() or per is None:
            raise ValueError("expected REQUESTS/PER[/SCOPE]")
        seconds = int(per.group(1)) * _UNIT[per.group(2)]
        return SandboxWindow(int(parts[0]), seconds, parts[2] if len(parts) == 3 else "all")
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e} (e.g. 10/1s or 1000/1h/all)") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Token and secret default to None and are resolved in config_from_args, so
    # --help never shows (and parsing never freezes) a secret taken from the environment.
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    parser.add_argument("--token", help=f"API token (default: ${TOKEN_ENV} or {DEFAULT_TOKEN!r})")
    parser.add_argument("--secret", help=f"API secret key (default: ${SECRET_ENV} or a fixed one)")
    parser.add_argument(
        "--user",
        type=_user,
        action="append",
        metavar="LOGIN:PASSWORD",
        help="a user that may authenticate (repeatable; default: joe@example.com)",
    )
    parser.add_argument("--code-lifetime", type=float, default=900.0, help="seconds")
    parser.add_argument(
        "--clock-offset",
        type=float,
        default=0.0,
        help="seconds added to the real time to make the server clock",
    )
    parser.add_argument("--window-seconds", type=int, default=60)
    parser.add_argument("--user-per-window", type=int, default=60)
    parser.add_argument("--account-per-window", type=int, default=60)
    parser.add_argument("--per-day", type=int, default=6000)
    parser.add_argument("--day-seconds", type=int, default=86400)
    parser.add_argument(
        "--window",
        type=_window,
        action="append",
        metavar="REQUESTS/PER[/SCOPE]",
        help="one more window enforced beside the above, e.g. 10/1s or 1000/1h/all "
        "(scope user, account or all; repeatable)",
    )
    parser.add_argument("--expected-host", help="refuse requests whose Host differs (403)")
    parser.add_argument("--tls-cert", help="PEM certificate (chain) to serve HTTPS")
    parser.add_argument("--tls-key", help="PEM private key (default: inside --tls-cert)")
    oauth = parser.add_argument_group(
        "OAuth 2.0 mode", f"an authorization server at {TOKEN_PATH} and a Bearer-token API"
    )
    oauth.add_argument(
        "--oauth", action="store_true", help="be an OAuth 2.0 API instead of LuxSci's"
    )
    oauth.add_argument("--client-id", default=DEFAULT_CLIENT_ID, help="the client's id")
    oauth.add_argument(
        "--client-secret",
        help=f"the client's secret (default: ${CLIENT_SECRET_ENV} or a fixed one)",
    )
    oauth.add_argument(
        "--token-lifetime", type=float, default=3600.0, help="seconds an access token lives"
    )
    oauth.add_argument(
        "--rate-headers",
        choices=RATE_HEADER_STYLES,
        default="x",
        help="how the API states its limit (x: X-RateLimit-*, ietf: RateLimit, ...)",
    )


def config_from_args(args: argparse.Namespace) -> SandboxConfig:
    users = dict(args.user) if args.user else dict(DEFAULT_USERS)
    return SandboxConfig(
        token=args.token or os.environ.get(TOKEN_ENV) or DEFAULT_TOKEN,
        secret=args.secret or os.environ.get(SECRET_ENV) or DEFAULT_SECRET,
        users=users,
        code_lifetime=args.code_lifetime,
        clock_offset=args.clock_offset,
        window_seconds=args.window_seconds,
        user_per_window=args.user_per_window,
        account_per_window=args.account_per_window,
        per_day=args.per_day,
        day_seconds=args.day_seconds,
        windows=tuple(args.window or ()),
        expected_host=args.expected_host,
        oauth=_oauth_settings(args),
    )


def _oauth_settings(args: argparse.Namespace) -> OAuthSettings | None:
    if not args.oauth:
        return None
    return OAuthSettings(
        client_id=args.client_id,
        client_secret=args.client_secret
        or os.environ.get(CLIENT_SECRET_ENV)
        or DEFAULT_CLIENT_SECRET,
        token_lifetime=args.token_lifetime,
        rate_headers=args.rate_headers,
    )


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.tls_cert:
        if args.tls_key:
            raise SystemExit("--tls-key needs --tls-cert")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # as the real API demands
    context.load_cert_chain(args.tls_cert, args.tls_key)
    return context


async def serve(args: argparse.Namespace) -> None:
    """Run until SIGINT or SIGTERM, then close cleanly."""
    config = config_from_args(args)
    server = await start_sandbox(config, args.host, args.port, _ssl_context(args))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Not every platform lets asyncio handle signals; Ctrl-C still ends asyncio.run there.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    try:
        # Nobody reading stdout any more is no reason to stop serving (proxy/console.py).
        if config.oauth is not None:
            console.say(
                f"sandbox (OAuth 2.0) listening on {server.url} "
                f"(token URL {server.url}{TOKEN_PATH}, client_id={config.oauth.client_id}; "
                f"a refresh token: POST {server.url}/_sandbox/oauth/refresh-token)"
            )
        else:
            console.say(f"sandbox listening on {server.url} (token={config.token})")
        await stop.wait()
    finally:
        await server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m proxy.sandbox", description="Simulated LuxSci REST API for offline work."
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    asyncio.run(serve(args))
    return 0
