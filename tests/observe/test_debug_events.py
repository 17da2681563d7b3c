"""logging.level: debug explains decisions (waits, signing, retries, reloads), no secrets."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
from typing import Any

import aiohttp
from conftest import SECRET, TOKEN, USER, proxy_config

from proxy.config import Secret
from proxy.observe.log import Logs
from proxy.sandbox import SandboxServer
from proxy.service import ProxyService, make_logs

USER_PATH = f"/perl/api/v2/user/{USER}/profile"
ACCOUNT_PATH = "/perl/api/v2/account/9/things"
NEW_SECRET = "a-new-secret-Wq9Zk"


async def running(cfg: Any) -> tuple[ProxyService, io.StringIO]:
    stream = io.StringIO()
    service = ProxyService(cfg, logs=make_logs(cfg, stream))
    await service.start()
    return service, stream


def events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def get(http: aiohttp.ClientSession, url: str, method: str = "GET") -> int:
    async with http.request(method, url) as resp:
        await resp.read()
        return resp.status


async def test_debug_explains_waits_signing_retries_and_reloads_without_a_secret(
    sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    cfg = proxy_config(
        sandbox.url,
        # Ten a window (fewer reserve nothing at a window's end), short windows.
        limits={"user_per_minute": 10, "window_seconds": 3.0},
        retry={"max_attempts": 2, "backoff_base": 0.01, "backoff_max": 0.02},
        logging={"level": "debug", "format": "json"},
    )
    service, stream = await running(cfg)
    base = f"http://127.0.0.1:{service.port}"
    try:
        # More user requests at once than one window's budget: some wait.
        statuses = await asyncio.gather(*(get(http, base + USER_PATH) for _ in range(12)))
        assert statuses == [200] * 12
        # A POST the API answers 502: not retried, and debug says why.
        sandbox.sandbox.add_fault(status=502, json=False, times=1, path_prefix=ACCOUNT_PATH)
        assert await get(http, base + ACCOUNT_PATH, "POST") == 502
        # A GET answered 503 every time: retried up to retry.max_attempts, then why not.
        sandbox.sandbox.add_fault(status=503, json=False, times=5, path_prefix=ACCOUNT_PATH)
        assert await get(http, base + ACCOUNT_PATH) == 503
        # A reload: what changed, a secret's change named but never shown.
        new = dataclasses.replace(
            service.cfg,
            auth=dataclasses.replace(service.cfg.auth, secret=Secret(NEW_SECRET)),
            limits=dataclasses.replace(service.cfg.limits, per_day=5000),
        )
        await service.reload(new)
    finally:
        await service.stop()
    log = events(stream)

    waits = [e for e in log if e["event"] == "rate_limit_wait"]
    assert waits
    wait = waits[0]
    assert wait["level"] == "debug" and wait["request_id"]  # which request waited
    assert (wait["scope"], wait["budget"], wait["limit"]) == (
        "user",
        "limits.user_per_minute",
        10,
    )
    # The window's budget spent, or (at its very end) the next one's reserve.
    assert wait["why"] in ("window_full", "reserve_full")
    assert 0 <= wait["window_ends_in_s"] <= 3.0
    assert {e["why"] for e in waits} <= {"window_full", "reserve_full", "behind"}
    waited = [e for e in log if e["event"] == "rate_limit_waited"]
    assert len(waited) == len(waits)
    assert waited[0]["request_id"] == wait["request_id"] and 0 < waited[0]["waited_s"] <= 4

    signed = [e for e in log if e["event"] == "request_signed"]
    assert len(signed) >= 4  # every attempt says which login's code signed it
    assert {e["generation"] for e in signed} == {1}
    assert all(e["request_id"] and e["usable_for_s"] > 0 for e in signed)

    declined = {e["rule"] or e["outcome"]: e for e in log if e["event"] == "retry_not_taken"}
    assert "not idempotent" in declined[502]["why"]
    assert declined["status_503"]["why"] == "retry.max_attempts (2) reached"
    assert declined["status_503"]["request_id"]

    (changes,) = [e for e in log if e["event"] == "config_changes"]
    assert changes["changes"] == [
        "auth.secret: changed (a secret: not shown)",
        "limits.per_day: 10000000 -> 5000",
    ]

    text = stream.getvalue()
    codes = sandbox.sandbox.issued_codes
    assert codes
    for secret in (SECRET, NEW_SECRET, TOKEN, *codes, *(c.rsplit("-", 1)[1] for c in codes)):
        assert secret not in text


async def test_at_info_the_explaining_components_do_not_even_build_their_events(
    sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    cfg = proxy_config(
        sandbox.url,
        limits={"user_per_minute": 10, "window_seconds": 3.0},
        logging={"level": "info", "format": "json"},
    )
    service, stream = await running(cfg)
    flag = service.logs.debug_flag
    # One flag, shared by every component that explains, read once per decision.
    assert flag.on is False
    assert service.limiter.debug is flag and service.forwarder.attempts.debug is flag
    assert service.scheme.debug is flag  # type: ignore[attr-defined]
    base = f"http://127.0.0.1:{service.port}"
    try:
        await asyncio.gather(*(get(http, base + USER_PATH) for _ in range(12)))
        # A reload to debug turns it on for the components already running.
        await service.reload(
            dataclasses.replace(
                service.cfg, logging=dataclasses.replace(cfg.logging, level="debug")
            )
        )
        assert flag.on is True
        assert await get(http, base + USER_PATH) == 200
    finally:
        await service.stop()
    names = [e["event"] for e in events(stream)]
    first_debug = names.index("config_changes")
    assert not {"rate_limit_wait", "request_signed"} & set(names[:first_debug])
    assert "request_signed" in names[first_debug:]


def test_the_logs_flag_follows_the_level() -> None:
    logs = Logs("info", "json", stream=io.StringIO())
    assert logs.debug_flag.on is False
    logs.configure("debug", "json")
    assert logs.debug_flag.on is True
    logs.configure("warning", "console")
    assert logs.debug_flag.on is False
