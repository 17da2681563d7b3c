"""The status page in a real browser: headless Chromium (Debian's `chromium`) loads the
admin port's `/` while the proxy serves the scene of status_scene.py (durable jobs on),
its script reads /status.json and draws the page, and the test reads the numbers off
the drawn page.

Without chromium: skipped on a developer's machine (saying how to get it), failed in CI
(CI=true), where .ci/run installs it and a skip would let a broken page land.
"""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import pytest
from conftest import PASSWORD, SECRET, TOKEN, USER, MakeProxy, MakeSandbox

from tests.observe.status_scene import (
    ACCOUNT_LIMIT,
    BILLING_READS,
    BILLING_TOKEN,
    DAY_LIMIT,
    PROTECTED,
    QUERY_SECRET,
    REPORTS_READS,
    REPORTS_TOKEN,
    REPORTS_WAITING,
    USER_LIMIT,
    PageValues,
    chromium_path,
    dump_dom,
    play,
    scene_sections,
)

# What does not move with the clock: the same on the page as served and as redrawn.
STEADY = [
    "budget.user.used",
    "budget.user.limit",
    "budget.account.used",
    "budget.account.limit",
    "budget.account.queued",
    "day.used",
    "day.limit",
    "queue.waiting",
    "queue.lane.low.account",
    "queue.lane.low.total",
    "queue.client.billing.waiting",
    "queue.client.reports.waiting",
    "auth.scheme",
    "auth.state",
    "auth.logins",
    "auth.failures",
    "check.auth.ok",
    "check.limits.ok",
    "jobs.state.queued",
    "jobs.state.succeeded",
    "queue.lane.background.account",
    "errors.total",
    "error.status",
    "error.reason",
    "error.method",
    "error.path",
    "error.client",
    "error.request_id",
]


def need_chromium() -> None:
    if chromium_path() is None:
        reason = "chromium is not installed (apt-get install chromium; .ci/run does)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)
        pytest.skip(reason)


async def test_a_browser_shows_the_numbers_of_what_the_proxy_did(
    make_sandbox: MakeSandbox,
    make_proxy: MakeProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    need_chromium()
    sandbox = await make_sandbox()
    proxy = await make_proxy(sandbox.url, **scene_sections(tmp_path))
    service = proxy.service
    scene = await play(http, service)
    try:
        drawn = await dump_dom(proxy.admin_url + "/")
        # The API saying to hold off the user budget: drawn by the script too.
        service.limiter.hold_for("user", 90)
        redrawn = PageValues(await dump_dom(proxy.admin_url + "/"))
        # As served: what a browser without JavaScript shows (and reloads every 5 s).
        async with http.get(proxy.admin_url + "/") as resp:
            served = await resp.text()
    finally:
        await scene.end()

    page = PageValues(drawn)
    # The script ran under the page's Content-Security-Policy, read status.json, drew
    # every section, and read it again on its timer (virtual time: 5 s, every 3 s).
    assert page.rendered == "json"
    assert page.reads >= 2
    # Billing's reads and its job.
    assert page.one("budget.user.used") == str(BILLING_READS + 1)
    assert page.one("budget.user.limit") == str(USER_LIMIT)
    # The login at start took one account permit; the window is spent.
    assert page.one("budget.account.used") == str(REPORTS_READS + 1) == str(ACCOUNT_LIMIT)
    # Reports' requests and its job wait for the next account window.
    assert page.one("budget.account.queued") == str(REPORTS_WAITING + 1)
    assert page.one("day.used") == str(BILLING_READS + 1 + REPORTS_READS + 1)
    assert page.one("day.limit") == str(DAY_LIMIT)
    assert page.one("queue.lane.low.account") == str(REPORTS_WAITING)
    assert page.one("queue.client.reports.waiting") == str(REPORTS_WAITING)
    assert page.one("queue.client.billing.waiting") == "0"
    assert page.one("auth.state") == "active" and page.one("auth.logins") == "1"
    assert page.one("check.auth.ok") == "ok"
    # Jobs by state: reports' waits in the background lane, as the proxy's client "jobs".
    assert page.one("jobs.state.queued") == "1" and page.one("jobs.state.succeeded") == "1"
    assert page.one("jobs.ok") == "store ok"
    assert page.one("queue.lane.background.account") == "1"
    assert page.one("queue.client.jobs.waiting") == "1"
    assert page.one("check.jobs.ok") == "ok"
    # The refused requests, newest first, masked.
    assert page.error_rows == len(scene.refused) == 4
    newest_first = scene.refused[::-1]
    assert page.values["error.status"] == [str(s) for s, _, _ in newest_first]
    assert page.values["error.reason"] == [r for _, r, _ in newest_first]
    assert page.values["error.path"] == [p for _, _, p in newest_first]
    assert page.values["error.method"] == ["GET"] * 4
    # The app once admitted; refused before that, none.
    assert page.values["error.client"] == ["—", "—", "—", "reports"]
    assert page.one("errors.total") == "4"

    assert redrawn.rendered == "json"
    assert redrawn.one("budget.user.held").startswith("held 1m ")
    assert redrawn.one("budget.account.held") == "no"

    # Without JavaScript the page as served says the same.
    plain = PageValues(served)
    assert plain.rendered == "html"
    for key in STEADY:
        assert plain.values[key] == page.values[key], key

    # Nothing secret on the page: no credential, code, app token, login or query string.
    codes = sandbox.sandbox.issued_codes
    assert codes
    for dom in (drawn, served):
        for secret in (TOKEN, SECRET, PASSWORD, BILLING_TOKEN, REPORTS_TOKEN, *codes):
            assert secret not in dom
        for private in (USER, PROTECTED, QUERY_SECRET):
            assert private not in dom
