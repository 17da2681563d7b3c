"""Logging: every service's events go to its own Logs, with its own settings."""

from __future__ import annotations

import dataclasses
import io
import json
import re

import aiohttp
import pytest
import structlog
from conftest import USER, proxy_config

from proxy.config import Secret
from proxy.observe.log import Logs
from proxy.sandbox import SandboxServer
from proxy.service import ProxyService, make_logs

USER_PATH = f"/perl/api/v2/user/{USER}/profile"
WRONG_SECRET = "not-the-secret-of-this-integration"
# structlog's console line: timestamp, [level], event, then key=value pairs.
CONSOLE_LINE = re.compile(r"^\S+Z \[(\w+)\s*\] (\S+)")


def console_events(text: str) -> list[tuple[str, str]]:
    """(level, event) of each console line; fails on a line of another format."""
    found = []
    for line in text.splitlines():
        match = CONSOLE_LINE.match(line)
        assert match is not None, line
        found.append((match[1], match[2]))
    return found


async def get(http: aiohttp.ClientSession, service: ProxyService) -> int:
    async with http.get(f"http://127.0.0.1:{service.port}{USER_PATH}") as resp:
        await resp.read()
        return resp.status


async def test_two_services_in_one_process_log_to_their_own_streams_with_their_own_settings(
    sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    json_out, console_out = io.StringIO(), io.StringIO()
    cfg_a = proxy_config(
        sandbox.url, logging={"level": "info", "format": "json", "redact_paths": True}
    )
    # B's secret is wrong: its logins fail, which its session reports at warning.
    cfg_b = proxy_config(
        sandbox.url,
        auth={"secret": Secret(WRONG_SECRET)},
        logging={"level": "warning", "format": "console"},
    )
    a = ProxyService(cfg_a, make_logs(cfg_a, json_out))
    b = ProxyService(cfg_b, make_logs(cfg_b, console_out))
    try:
        await a.start()
        await b.start()
        # Interleaved, the two serving at once.
        assert [await get(http, s) for s in (a, b, a)] == [200, 502, 200]
        console_before_reload = console_out.getvalue()

        # A reload of B's logging reaches B's loggers already in use, and only B's.
        info = dataclasses.replace(cfg_b.logging, level="info")
        await b.reload(dataclasses.replace(cfg_b, logging=info))
        assert await get(http, b) == 502
    finally:
        for service in (a, b):
            if service.port:
                await service.stop()

    # A: JSON at info, user paths masked; its session's events (a module-level logger)
    # included, none of B's.
    events = [json.loads(line) for line in json_out.getvalue().splitlines()]
    names = [e["event"] for e in events]
    for name in ("upstream_not_encrypted", "auth_succeeded", "proxy_started"):
        assert name in names, name
    assert "auth_failed" not in names
    access = [e for e in events if e["event"] == "request"]
    assert [e["status"] for e in access] == [200, 200]
    assert {e["path"] for e in access} == {"/perl/api/v2/user/[user]/profile"}
    assert USER not in json_out.getvalue()

    # B: console at warning until the reload; its session's failures, none of A's events.
    before = console_events(console_before_reload)
    assert ("warning", "upstream_not_encrypted") in before
    assert ("warning", "auth_failed") in before
    assert {level for level, _ in before} == {"warning"}  # no info event, no access line
    after = console_events(console_out.getvalue()[len(console_before_reload) :])
    assert ("info", "request") in after  # the access line, now at info and as console text
    assert ("info", "shutdown_complete") in after  # from a logger cached before the reload
    assert "auth_succeeded" not in console_out.getvalue()
    for text in (json_out.getvalue(), console_out.getvalue()):
        assert WRONG_SECRET not in text


def test_a_reload_changes_level_and_format_for_loggers_already_in_use() -> None:
    stream = io.StringIO()
    logs = Logs("warning", "json", stream=stream)
    bound = logs.logger()
    module_level = structlog.get_logger("somewhere")
    context = logs.context()
    bound.info("dropped")
    context.run(module_level.info, "dropped_too")
    bound.warning("kept")
    context.run(module_level.warning, "kept_too")

    logs.configure("info", "console")
    bound.info("now_kept")
    context.run(module_level.info, "now_kept_too")

    first, second, *rest = stream.getvalue().splitlines()
    assert [json.loads(line)["event"] for line in (first, second)] == ["kept", "kept_too"]
    assert console_events("\n".join(rest)) == [("info", "now_kept"), ("info", "now_kept_too")]


def test_an_event_outside_every_service_goes_to_stderr_as_json(
    capsys: pytest.CaptureFixture[str],
) -> None:
    structlog.get_logger("nowhere").warning("lonely", note="Bearer abc.def")
    (line,) = capsys.readouterr().err.splitlines()
    event = json.loads(line)
    assert (event["event"], event["level"]) == ("lonely", "warning")
    assert event["note"] == "Bearer [REDACTED]"
