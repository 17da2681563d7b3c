"""A proxy with something to show on its status page, and a headless Chromium to look.

Used by test_status_page_browser.py, and run as a script to make the README's
screenshot from the same scene:

    PYTHONPATH=. python3 tests/observe/status_scene.py docs/status-page.png

The scene: two apps (billing in the high lane, reports capped at low) sending to the
LuxSci sandbox, with durable jobs on; the account budget is spent, so two of reports'
requests wait in the low lane and its job waits in the background lane (billing's
job has succeeded); four requests are refused by the proxy (one of reports' that would
not wait, a protected user, an unknown app token, a dot-segment path), so the errors
table has rows.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import yarl

if __name__ == "__main__":  # run as a script: find conftest beside the tests
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import PASSWORD, SECRET, TOKEN, USER, proxy_config

from proxy.config import ClientConfig, Secret
from proxy.sandbox import SandboxConfig, SandboxServer, start_sandbox
from proxy.service import ProxyService

BILLING_TOKEN = "billing-app-token-5f1d"
REPORTS_TOKEN = "reports-app-token-9c2e"
PROTECTED = "ceo@example.com"
# A query string that must never reach the page.
QUERY_SECRET = "query-secret-77aa"
USER_LIMIT = 50
ACCOUNT_LIMIT = 4
DAY_LIMIT = 1000
BILLING_READS = 7
REPORTS_READS = ACCOUNT_LIMIT - 1  # the login at start took one account permit
REPORTS_WAITING = 2
# Durable jobs: one of billing's (sent at once), one of reports' (waits: the account
# window is spent). The store's key, base64 of 32 bytes.
JOBS_KEY = base64.b64encode(b"status-page-scene-key-0123456789").decode()


def scene_sections(state: Path) -> dict[str, Any]:
    """The scene's config sections, over conftest.proxy_config's defaults; the jobs'
    store goes in the folder `state`."""
    return {
        "jobs": {
            "enabled": True,
            "keys": (Secret(JOBS_KEY),),
            "store": str(state / "jobs.db"),
        },
        "access": {
            "clients": (
                ClientConfig("billing", Secret(BILLING_TOKEN), "high"),
                ClientConfig("reports", Secret(REPORTS_TOKEN), "low", max_queued=10),
            ),
            "protected_users": (PROTECTED,),
        },
        # An hour's window: the test's counts cannot straddle a window's end.
        "limits": {
            "user_per_minute": USER_LIMIT,
            "account_per_minute": ACCOUNT_LIMIT,
            "per_day": DAY_LIMIT,
            "state_file": "",
            "window_seconds": 3600,
        },
        "queue": {"max_wait": 300},
    }


async def scene_sandbox() -> SandboxServer:
    cfg = SandboxConfig(
        token=TOKEN,
        secret=SECRET,
        users={USER: PASSWORD},
        user_per_window=100_000,
        account_per_window=100_000,
        per_day=10**7,
    )
    return await start_sandbox(cfg, host="127.0.0.1", port=0)


def counted(by_state: Mapping[str, int]) -> dict[str, int]:
    """Jobs by state, the states with none left out."""
    return {state: n for state, n in by_state.items() if n}


def _as(token: str) -> dict[str, str]:
    return {"Proxy-Authorization": f"Bearer {token}"}


@dataclass
class Scene:
    # Requests still waiting for a permit (cancel them before stopping the proxy).
    waiting: list[asyncio.Task[int]] = field(default_factory=list)
    # (status, reason, shown path) of each refused request, oldest first.
    refused: list[tuple[int, str, str]] = field(default_factory=list)

    async def end(self) -> None:
        for task in self.waiting:
            task.cancel()
        for task in self.waiting:
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await task


async def play(http: aiohttp.ClientSession, service: ProxyService) -> Scene:
    base = f"http://127.0.0.1:{service.port}"
    scene = Scene()

    async def get(path: str, token: str, **headers: str) -> int:
        # encoded: sent as written (a dot-segment too), not normalised by the client.
        url = yarl.URL(base + path, encoded=True)
        async with http.get(url, headers={**_as(token), **headers}) as resp:
            await resp.read()
            return resp.status

    for _ in range(BILLING_READS):
        assert await get(f"/perl/api/v2/user/{USER}/profile", BILLING_TOKEN) == 200
    for _ in range(REPORTS_READS):
        assert await get("/perl/api/v2/account/9/users", REPORTS_TOKEN) == 200
    # The account window is spent: these wait in reports' lane.
    for _ in range(REPORTS_WAITING):
        scene.waiting.append(
            asyncio.create_task(
                get("/perl/api/v2/account/9/reports", REPORTS_TOKEN, **{"X-Proxy-Priority": "low"})
            )
        )
    for _ in range(200):
        if service.limiter.waiting == REPORTS_WAITING:
            break
        await asyncio.sleep(0.01)
    assert service.limiter.waiting == REPORTS_WAITING

    # Durable jobs: billing's is sent at once, reports' waits for a background permit.
    for path, token in [
        (f"/perl/api/v2/user/{USER}/profile", BILLING_TOKEN),
        ("/perl/api/v2/account/9/archive", REPORTS_TOKEN),
    ]:
        async with http.post(
            base + path, json={"n": 1}, headers={**_as(token), "Prefer": "respond-async"}
        ) as resp:
            assert resp.status == 202, await resp.text()
    jobs = service.jobs
    assert jobs is not None
    # The runner counts its jobs every 2 s; a busy machine may take several rounds.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if counted(jobs.state().by_state) == {"queued": 1, "succeeded": 1}:
            break
        await asyncio.sleep(0.05)
    assert counted(jobs.state().by_state) == {"queued": 1, "succeeded": 1}
    assert service.limiter.waiting == REPORTS_WAITING + 1

    # Admitted, then refused: reports will not wait for the spent window.
    status = await get("/perl/api/v2/account/9/export", REPORTS_TOKEN, **{"X-Proxy-Max-Wait": "0"})
    scene.refused.append((status, "queue_timeout", "/perl/api/v2/account/9/export"))
    status = await get(f"/perl/api/v2/user/{PROTECTED}/profile?key={QUERY_SECRET}", BILLING_TOKEN)
    scene.refused.append((status, "forbidden", "/perl/api/v2/user/[user]/profile"))
    status = await get("/perl/api/v2/account/9/users", "not-a-known-app-token")
    scene.refused.append((status, "forbidden", "/perl/api/v2/account/9/users"))
    status = await get(f"/perl/api/v2/user/{USER}/../admin", BILLING_TOKEN)
    scene.refused.append((status, "bad_request", "/perl/api/v2/user/…"))
    assert [s for s, _, _ in scene.refused] == [503, 403, 403, 400]
    return scene


# -- the browser --------------------------------------------------------------------------


# Seconds one run of the browser may take (it takes about one on this machine).
CHROMIUM_TIMEOUT = 90.0


def chromium_path() -> str | None:
    return shutil.which("chromium")


async def chromium(url: str, *flags: str) -> str:
    """Run headless Chromium on `url` with `flags`; its standard output."""
    exe = chromium_path()
    assert exe is not None
    with tempfile.TemporaryDirectory(prefix="status-chromium-") as profile:
        proc = await asyncio.create_subprocess_exec(
            exe,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            *flags,
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), CHROMIUM_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


async def dump_dom(url: str) -> str:
    """The page's DOM after its script ran (virtual time: its first read of status.json
    and one refresh)."""
    return await chromium(url, "--virtual-time-budget=5000", "--dump-dom")


async def screenshot(url: str, path: Path) -> None:
    await chromium(
        url,
        "--virtual-time-budget=3000",
        "--hide-scrollbars",
        f"--screenshot={path}",
        "--window-size=1200,900",
    )


class PageValues(HTMLParser):
    """The texts of every element with a data-k name (several for repeated rows), the
    body's data-rendered ("html" as served, "json" once the script drew it) and
    data-reads, and the number of error rows."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.values: dict[str, list[str]] = defaultdict(list)
        self.rendered: str | None = None
        # How many times the script has read status.json and drawn the page.
        self.reads = 0
        self.error_rows = 0
        self._key: str | None = None
        self._text: list[str] = []
        self.feed(dom)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.rendered = a.get("data-rendered")
            self.reads = int(a.get("data-reads") or 0)
        if tag == "tr" and a.get("class") == "error-row":
            self.error_rows += 1
        key = a.get("data-k")
        if key is not None:
            self._key, self._text = key, []

    def handle_data(self, data: str) -> None:
        if self._key is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if self._key is not None:
            self.values[self._key].append("".join(self._text))
            self._key = None

    def one(self, key: str) -> str:
        found = self.values.get(key, [])
        assert len(found) == 1, (key, found)
        return found[0]


async def _make_screenshot(path: Path, state: Path) -> None:
    sandbox = await scene_sandbox()
    service = ProxyService(proxy_config(sandbox.url, **scene_sections(state)))
    await service.start()
    try:
        async with aiohttp.ClientSession() as http:
            scene = await play(http, service)
            await asyncio.sleep(2)  # a code that has aged a little, an uptime above zero
            await screenshot(f"http://127.0.0.1:{service.admin_port}/", path)
            await scene.end()
    finally:
        await service.stop()
        await sandbox.close()


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/status-page.png")
    if chromium_path() is None:
        sys.exit("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="status-scene-") as state:
        asyncio.run(_make_screenshot(target, Path(state)))
    print(target)
