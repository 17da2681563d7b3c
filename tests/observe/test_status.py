"""The admin port's status page and /status.json: the data, its JSON, its escaping, its
headers, and that no secret reaches either (the browser's view: test_status_page_browser)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import PASSWORD, SECRET, TOKEN, USER, MakeProxy, RunningProxy, repo_root

from proxy.config import AccessRule, ClientConfig, Secret
from proxy.observe import recent, status
from proxy.observe.recent import RecentErrors
from proxy.observe.status import (
    AuthView,
    BudgetView,
    ClientView,
    DayView,
    JobsView,
    QueueView,
    StatusSources,
    snapshot,
)
from proxy.pipeline.forward import shown_path
from proxy.sandbox import SandboxServer
from tests.jobs.jobs_helpers import jobs_section, submit, until_done
from tests.observe.status_scene import PageValues, counted

USER_PATH = f"/perl/api/v2/user/{USER}/profile"
ACCOUNT_PATH = "/perl/api/v2/account/42/things"

# -- the data, from plain values -----------------------------------------------------------


def auth_view(**changes: Any) -> AuthView:
    view = AuthView(
        scheme="luxsci",
        ok=True,
        message=None,
        valid=True,
        credential_age=12.34,
        credential_lifetime=900.0,
        expires_in=None,
        logins=1,
        login_failures=0,
    )
    return replace(view, **changes)


def sources(
    *,
    auth: AuthView | None = None,
    checks: dict[str, Any] | None = None,
    jobs: JobsView | None = None,
    errors: RecentErrors | None = None,
    scrub: Callable[[str], str] = lambda text: text,
) -> StatusSources:
    found = checks if checks is not None else {"auth": {"ok": True}, "limits": {"ok": True}}
    return StatusSources(
        scheme="luxsci",
        backend="memory",
        readiness=lambda: (all(c["ok"] for c in found.values()), found),
        required=lambda: {"auth", "shutdown"},
        auth=lambda: auth or auth_view(),
        budgets=lambda: [
            BudgetView(
                scope="user",
                used=7,
                limit=50,
                configured_limit=60,
                api_limit=50,
                api_remaining=43,
                window=60.0,
                resets_in=41.26,
                held_for=-3.0,
                queued=2,
                queued_by_lane={"high": 0, "normal": 1, "low": 1, "background": 0},
            ),
            BudgetView("account", 1, 60, 60, None, None, 60.0, 41.26, 12.5, 0),
        ],
        day=lambda: DayView(used=8, limit=6000, length=86400.0, resets_in=3600.0),
        queue=lambda: QueueView(
            waiting=2,
            max_size=1000,
            max_wait=30.0,
            inflight=3,
            clients=[ClientView("app", 1, 500, "high"), ClientView("batch", 1, 20, "low")],
        ),
        jobs=lambda: jobs,
        errors=errors if errors is not None else RecentErrors(),
        uptime=lambda: 75.0,
        scrub=scrub,
    )


def test_the_snapshot_has_every_section_as_plain_json_data() -> None:
    errors = RecentErrors()
    errors.record(403, "forbidden", "GET", "/perl/api/v2/user/[user]/profile", "app", "rid-1")
    data = snapshot(sources(errors=errors))
    assert json.loads(json.dumps(data)) == data  # plain data only
    assert set(data) == {
        "proxy",
        "ready",
        "checks",
        "auth",
        "budgets",
        "day",
        "queue",
        "jobs",
        "errors",
    }
    assert data["proxy"]["scheme"] == "luxsci" and data["proxy"]["uptime_s"] == 75.0
    assert data["checks"] == [
        {"name": "auth", "ok": True, "required": True, "message": ""},
        {"name": "limits", "ok": True, "required": False, "message": ""},
    ]
    assert data["auth"]["state"] == "active"
    assert data["auth"]["credential_age_s"] == 12.3
    user, account = data["budgets"]
    assert (user["scope"], user["used"], user["limit"], user["configured_limit"]) == (
        "user",
        7,
        50,
        60,
    )
    assert (user["api_limit"], user["api_remaining"]) == (50, 43)
    assert user["resets_in_s"] == 41.3 and user["window_s"] == 60.0
    assert user["held_for_s"] == 0.0  # a hold in the past is no hold
    assert account["held_for_s"] == 12.5
    assert data["day"] == {"used": 8, "limit": 6000, "window_s": 86400.0, "resets_in_s": 3600.0}
    queue = data["queue"]
    assert queue["by_lane"] == {"high": 0, "normal": 1, "low": 1, "background": 0}
    assert queue["by_scope_lane"]["account"] == {"high": 0, "normal": 0, "low": 0, "background": 0}
    assert queue["by_client"][1] == {
        "client": "batch",
        "waiting": 1,
        "max_queued": 20,
        "max_lane": "low",
    }
    assert data["jobs"] == {"enabled": False}
    assert data["errors"]["total"] == 1
    assert data["errors"]["recent"][0]["path"] == "/perl/api/v2/user/[user]/profile"
    assert data["errors"]["recent"][0]["client"] == "app"


def test_a_check_reads_as_its_error_or_what_it_reports() -> None:
    checks = {
        "auth": {"ok": False, "error": "authentication with the API failed (HTTP 401)"},
        "limits": {"ok": True, "backend": "redis"},
        "state": {"ok": False, "error": "not writable", "dirs": ["/a", "/b"], "required": True},
    }
    data = snapshot(sources(checks=checks))
    assert data["ready"] is False
    assert data["checks"] == [
        {
            "name": "auth",
            "ok": False,
            "required": True,
            "message": "authentication with the API failed (HTTP 401)",
        },
        {"name": "limits", "ok": True, "required": False, "message": "backend: redis"},
        {"name": "state", "ok": False, "required": True, "message": "not writable"},
    ]
    ok_state = {"state": {"ok": True, "dirs": ["/a", "/b"]}}
    assert snapshot(sources(checks=ok_state))["checks"][0]["message"] == "dirs: /a, /b"


@pytest.mark.parametrize(
    ("changes", "state"),
    [
        ({}, "active"),
        ({"valid": False}, "expired"),  # idle past the code's life: the next request logs in
        ({"ok": False, "valid": False, "logins": 0, "credential_age": None}, "starting"),
        ({"ok": False, "valid": False, "message": "HTTP 401"}, "failing"),
        ({"ok": False, "logins": 0, "login_failures": 2}, "failing"),
    ],
)
def test_the_auth_state_in_a_word(changes: dict[str, Any], state: str) -> None:
    assert snapshot(sources(auth=auth_view(**changes)))["auth"]["state"] == state


def test_jobs_by_state_when_enabled() -> None:
    jobs = JobsView(ok=True, by_state={"running": 1, "queued": 4}, oldest_queued_age=62.04)
    assert snapshot(sources(jobs=jobs))["jobs"] == {
        "enabled": True,
        "ok": True,
        "by_state": {"queued": 4, "running": 1},
        "oldest_queued_age_s": 62.0,
    }


def test_every_string_goes_through_the_scrubber() -> None:
    leaked = "s3cr3t-value"
    checks = {"limits": {"ok": False, "error": f"redis://u:{leaked}@host refused"}}
    data = snapshot(sources(checks=checks, scrub=lambda text: text.replace(leaked, "[REDACTED]")))
    assert leaked not in json.dumps(data)
    assert data["checks"][0]["message"] == "redis://u:[REDACTED]@host refused"


def test_the_error_ring_keeps_the_latest_newest_first() -> None:
    ring = RecentErrors(size=20)
    for i in range(25):
        ring.record(503, "queue_full", "GET", f"/p/{i}", None, f"rid-{i}")
    latest = ring.latest()
    assert ring.total == 25
    assert [e.request_id for e in latest] == [f"rid-{i}" for i in range(24, 4, -1)]
    ring.record(400, "bad_request", "GET", "/" + "x" * 1000, None, "long")
    assert len(ring.latest()[0].path) == recent.PATH_SHOWN
    assert ring.latest()[0].path.endswith("…")


@pytest.mark.parametrize(
    ("target", "shown"),
    [
        (f"/perl/api/v2/user/{USER}/profile?key=abc", "/perl/api/v2/user/[user]/profile"),
        (f"/perl/api/v2/%75ser/{USER}/profile", "/perl/api/v2/%75ser/[user]/profile"),
        ("/perl/api/v2/account/9/users?token=abc", "/perl/api/v2/account/9/users"),
        # Not a path the proxy parses: only its plain head, never the login.
        (f"/perl/api/v2/user/{USER}/../admin", "/perl/api/v2/user/…"),
        (f"/perl/api/v2/user%2F{USER}/profile", "/perl/api/v2/…"),
        ("/perl/api/v2/user/a%zz", "/perl/api/v2/user/…"),
        ("http://someone:password@example.com/x", "[not a path]"),
    ],
)
def test_a_refused_path_is_shown_masked_and_without_its_query(target: str, shown: str) -> None:
    assert shown_path(target, None) == shown


# -- JSON and HTML ----------------------------------------------------------------------------


def hostile_data() -> dict[str, Any]:
    errors = RecentErrors()
    errors.record(400, "bad_request", "GET", '/x/"><img src=x onerror=alert(1)>', None, "r&d")
    checks = {"limits": {"ok": False, "error": "</script><script>alert(1)</script>"}}
    return snapshot(sources(checks=checks, errors=errors))


def test_the_json_escapes_markup_characters() -> None:
    data = hostile_data()
    text = status.to_json(data)
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == data


def test_the_page_escapes_what_it_shows() -> None:
    page = status.render_html(hostile_data())
    assert "<img" not in page and "<script>alert" not in page
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert page.count("<script>") == 1  # the page's own


def test_the_content_security_policy_allows_exactly_the_inline_style_and_script() -> None:
    page = status.render_html(snapshot(sources()))
    csp = status.CONTENT_SECURITY_POLICY

    def sha(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    (style,) = re.findall(r"<style>(.*?)</style>", page, re.S)
    (script,) = re.findall(r"<script>(.*?)</script>", page, re.S)
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["style-src"] == sha(style)
    assert directives["script-src"] == sha(script)
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    # No attribute the policy would block (inline style=, on*= handlers).
    assert not re.search(r"\sstyle=|\son\w+=", page)


def test_the_page_shows_the_numbers_and_reloads_without_javascript() -> None:
    errors = RecentErrors()
    errors.record(403, "forbidden", "DELETE", "/perl/api/v2/account/9/x", "app", "rid-9")
    jobs = JobsView(ok=True, by_state={"queued": 4}, oldest_queued_age=62.0)
    page = PageValues(status.render_html(snapshot(sources(errors=errors, jobs=jobs))))
    assert page.rendered == "html"
    assert page.one("budget.user.used") == "7" and page.one("budget.user.limit") == "50"
    assert page.one("budget.user.resets") == "41s"
    assert page.one("budget.user.api") == "43 left of 50"
    assert page.one("budget.account.held") == "held 12s"
    assert page.one("day.used") == "8" and page.one("day.limit") == "6000"
    assert page.one("day.resets") == "1h 00m"
    assert page.one("queue.lane.normal.user") == "1"
    assert page.one("queue.lane.low.total") == "1"
    assert page.one("queue.client.batch.waiting") == "1"
    assert page.one("auth.state") == "active" and page.one("auth.logins") == "1"
    assert page.one("auth.age") == "12s"
    assert page.one("check.auth.ok") == "ok"
    assert page.one("jobs.state.queued") == "4" and page.one("jobs.oldest") == "1m 02s"
    assert page.error_rows == 1
    assert page.one("error.method") == "DELETE" and page.one("error.client") == "app"
    text = status.render_html(snapshot(sources()))
    assert '<noscript><meta http-equiv="refresh" content="5"></noscript>' in text
    assert PageValues(text).one("jobs.enabled") == "jobs: not enabled"


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(None, "—"), (-1, "0s"), (0.9, "0s"), (59.9, "59s"), (61, "1m 01s"), (3600, "1h 00m")],
)
def test_durations_read_at_a_glance(seconds: float | None, shown: str) -> None:
    assert status.duration(seconds) == shown
    assert status.duration(90061) == "1d 01h"


def test_the_page_script_and_style_are_package_data() -> None:
    """Shipped in the wheel: the page is useless without them."""
    text = (repo_root() / "pyproject.toml").read_text()
    assert '"proxy.observe" = ["status_page.css", "status_page.js"]' in text
    for part in ("status_page.css", "status_page.js"):
        body = (repo_root() / "proxy" / "observe" / part).read_text()
        assert "</" not in body  # nothing that could end its <style> or <script> early


# -- served by a running proxy ---------------------------------------------------------------


async def fetch(http: aiohttp.ClientSession, url: str) -> tuple[aiohttp.ClientResponse, str]:
    async with http.get(url) as resp:
        return resp, await resp.text()


async def test_status_json_counts_what_the_proxy_did(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(
        sandbox.url,
        access={"rules": (AccessRule(methods=("GET",), path="/perl/api/v2/**"),)},
        limits={
            "user_per_minute": 500,
            "account_per_minute": 400,
            "per_day": 9000,
            "window_seconds": 3600,
        },
    )
    for _ in range(5):
        async with http.get(proxy.url + USER_PATH) as resp:
            assert resp.status == 200
    for _ in range(2):
        async with http.get(proxy.url + ACCOUNT_PATH) as resp:
            assert resp.status == 200
    async with http.delete(proxy.url + USER_PATH + "?secret=q1") as resp:  # not in the rules
        assert resp.status == 403
        rid = resp.headers["X-Request-ID"]

    resp, text = await fetch(http, proxy.admin_url + "/status.json")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
    assert resp.headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
    data = json.loads(text)
    budgets = {b["scope"]: b for b in data["budgets"]}
    assert budgets["user"]["used"] == 5 and budgets["user"]["limit"] == 500
    # The login took one account permit.
    assert budgets["account"]["used"] == 3 and budgets["account"]["limit"] == 400
    assert data["day"] == {**data["day"], "used": 8, "limit": 9000}
    assert data["auth"]["logins"] == 1 and data["auth"]["state"] == "active"
    assert data["ready"] is True
    (error,) = data["errors"]["recent"]
    assert error == {
        **error,
        "status": 403,
        "reason": "forbidden",
        "method": "DELETE",
        "path": "/perl/api/v2/user/[user]/profile",
        "request_id": rid,
    }
    assert data["jobs"] == {"enabled": False}
    assert_no_secret(text, sandbox)


async def test_the_page_is_served_with_its_policy_and_the_same_numbers(
    sandbox: SandboxServer, proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    for _ in range(3):
        async with http.get(proxy.url + USER_PATH) as resp:
            assert resp.status == 200
    resp, page = await fetch(http, proxy.admin_url + "/")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert resp.headers["Content-Security-Policy"] == status.CONTENT_SECURITY_POLICY
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Cache-Control"] == "no-store"
    assert "Server" not in resp.headers
    values = PageValues(page)
    assert values.one("budget.user.used") == "3"
    assert values.one("auth.scheme") == "luxsci"
    assert values.one("jobs.enabled") == "jobs: not enabled"
    assert_no_secret(page, sandbox)


async def test_jobs_by_state_once_durable_jobs_are_on(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await make_proxy(sandbox.url, jobs=jobs_section(tmp_path))
    status_code, _, body = await submit(http, proxy.url, "POST", ACCOUNT_PATH, {"n": 1})
    assert status_code == 202
    assert (await until_done(http, proxy.url, body["id"]))["state"] == "succeeded"
    for _ in range(500):  # the runner counts its jobs every 2 s
        _, text = await fetch(http, proxy.admin_url + "/status.json")
        data = json.loads(text)
        if counted(data["jobs"].get("by_state", {})) == {"succeeded": 1}:
            break
        await asyncio.sleep(0.01)
    assert data["jobs"] == {
        "enabled": True,
        "ok": True,
        # Every state, from zero.
        "by_state": {
            "cancelled": 0,
            "expired": 0,
            "failed": 0,
            "outcome_unknown": 0,
            "queued": 0,
            "running": 0,
            "succeeded": 1,
        },
        "oldest_queued_age_s": None,
    }
    jobs_check = next(c for c in data["checks"] if c["name"] == "jobs")
    assert jobs_check == {"name": "jobs", "ok": True, "required": False, "message": "queued: 0"}
    page = PageValues((await fetch(http, proxy.admin_url + "/"))[1])
    assert page.one("jobs.state.succeeded") == "1" and page.one("jobs.oldest") == "—"


async def test_app_names_and_no_app_token_on_the_page(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    app_token = "app-token-on-no-page-1234"
    proxy = await make_proxy(
        sandbox.url,
        access={"clients": (ClientConfig(name="billing", token=Secret(app_token)),)},
    )
    headers = {"Proxy-Authorization": f"Bearer {app_token}"}
    async with http.get(proxy.url + USER_PATH, headers=headers) as resp:
        assert resp.status == 200
    async with http.get(proxy.url + USER_PATH, headers={"Proxy-Authorization": "Bearer nope"}):
        pass
    for path in ("/", "/status.json"):
        _, text = await fetch(http, proxy.admin_url + path)
        assert "billing" in text
        assert app_token not in text
        assert_no_secret(text, sandbox)


def assert_no_secret(text: str, sandbox: SandboxServer) -> None:
    codes = sandbox.sandbox.issued_codes
    assert codes, "the sandbox issued codes"
    for secret in (TOKEN, SECRET, PASSWORD, USER, *codes):
        assert secret not in text
    # Nor a query string of a refused request (test_status_json_counts... sends one).
    assert "secret=q1" not in text


def test_the_readme_documents_the_json() -> None:
    readme = (repo_root() / "README.md").read_text()
    section = readme.split("## Status page", 1)[1].split("\n## ", 1)[0]
    data = snapshot(sources(jobs=JobsView(ok=True, by_state={"queued": 1}, oldest_queued_age=1.0)))
    data["errors"]["recent"] = [
        {k: None for k in ("time", "status", "reason", "method", "path", "client", "request_id")}
    ]

    def keys(value: Any) -> set[str]:
        if isinstance(value, dict):
            return {str(k) for k in value} | {k for v in value.values() for k in keys(v)}
        if isinstance(value, list):
            return {k for v in value for k in keys(v)}
        return set()

    # Lanes, scopes, job states and client names are values, documented as such.
    named = keys(data) - {"high", "normal", "low", "background", "user", "account"}
    missing = sorted(k for k in named if f"`{k}`" not in section and f'"{k}"' not in section)
    assert not missing, f"README's status page section does not explain {missing}"
