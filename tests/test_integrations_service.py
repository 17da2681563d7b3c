"""Several integrations in one process: a LuxSci one and an OAuth 2.0 one, each against
its own sandbox, under load at once, over real sockets."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import SECRET, TOKEN, USER, MakeSandbox, eventually
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Config, ConfigError, parse
from proxy.observe.log import Logs
from proxy.sandbox import SandboxServer, SandboxWindow
from proxy.sandbox.config import OAuthSettings
from proxy.service import ProxyService

CLIENT_ID = "crm-client"
CLIENT_SECRET = "crm-client-secret-5a4b3c"
LUXSCI_PATH = f"/perl/api/v2/user/{USER}/profile"
OAUTH_PATH = "/v1/things"
# Each sandbox refuses (429 / 403) past this many requests a second: the proxy's
# integration for it holds the same budget, the other integration's traffic aside.
PER_SECOND = 4
LOAD = 5 * PER_SECOND


def two_integrations(luxsci: SandboxServer, oauth: SandboxServer) -> str:
    return f"""
admin: {{port: 0}}
logging: {{level: debug}}
integrations:
  - name: mail
    listen: {{port: 0}}
    upstream: {{url: "{luxsci.url}", allow_insecure: true}}
    auth: {{token: "${{TOKEN}}", secret: "${{SECRET}}"}}
    limits:
      state_file: ""
      windows: [{{requests: {PER_SECOND}, per: 1s, scope: all}}]
    queue: {{max_wait: 60}}
  - name: crm
    listen: {{port: 0}}
    upstream: {{url: "{oauth.url}", allow_insecure: true}}
    auth:
      scheme: oauth2
      token_url: "{oauth.url}/oauth/token"
      client_id: {CLIENT_ID}
      client_secret: "${{CLIENT_SECRET}}"
    limits:
      state_file: ""
      windows: [{{requests: {PER_SECOND}, per: 1s, scope: all}}]
    queue: {{max_wait: 60}}
"""


ENV = {"TOKEN": TOKEN, "SECRET": SECRET, "CLIENT_SECRET": CLIENT_SECRET}


@pytest.fixture
async def sandboxes(make_sandbox: MakeSandbox) -> tuple[SandboxServer, SandboxServer]:
    window = (SandboxWindow(PER_SECOND, 1),)
    luxsci = await make_sandbox(windows=window)
    oauth = await make_sandbox(
        windows=window, oauth=OAuthSettings(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    )
    return luxsci, oauth


class Running:
    def __init__(self, service: ProxyService, stream: io.StringIO) -> None:
        self.service = service
        self.stream = stream

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.service.integrations[name].port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.service.admin_port}"

    def events(self) -> list[dict[str, Any]]:
        self.service.logs.flush()
        return [json.loads(line) for line in self.stream.getvalue().splitlines() if line]


@pytest.fixture
async def running(sandboxes: tuple[SandboxServer, SandboxServer]) -> AsyncIterator[Running]:
    cfg: Config = parse(two_integrations(*sandboxes), ENV)
    stream = io.StringIO()
    service = ProxyService(cfg, Logs("debug", "json", [SECRET, CLIENT_SECRET], stream))
    await service.start()
    yield Running(service, stream)
    await service.stop()


async def fetch(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_two_integrations_under_load_at_once_each_keep_their_upstream_auth_and_budget(
    sandboxes: tuple[SandboxServer, SandboxServer], running: Running
) -> None:
    luxsci, oauth = sandboxes
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        mail = [fetch(http, running.url("mail") + LUXSCI_PATH) for _ in range(LOAD)]
        crm = [fetch(http, running.url("crm") + OAUTH_PATH + "?n=1") for _ in range(LOAD)]
        answers = await asyncio.gather(*mail, *crm)
        async with http.get(running.admin + "/metrics") as resp:
            metrics = samples(await resp.text())
    mail_answers, crm_answers = answers[:LOAD], answers[LOAD:]
    assert [status for status, _ in answers] == [200] * (2 * LOAD)
    # Each to its own API, signed its own way: the LuxSci sandbox checks the signature
    # cookie, the OAuth one the Bearer token; neither saw the other's path.
    assert all(body["success"] == 1 for _, body in mail_answers)
    assert all(body["data"]["query"] == "n=1" for _, body in crm_answers)
    assert luxsci.sandbox.stats.by_status.get("200", 0) >= LOAD
    assert not [e for e in luxsci.sandbox.log if e["target"].startswith(OAUTH_PATH)]
    assert not [e for e in oauth.sandbox.log if "/perl/" in e["target"]]
    assert len([e for e in oauth.sandbox.log if e["target"].startswith(OAUTH_PATH)]) == LOAD
    assert oauth.sandbox.oauth is not None and oauth.sandbox.oauth.stats.token_calls == 1
    # Each held its own budget: neither API refused a request.
    assert luxsci.sandbox.stats.rate_limited == 0
    assert oauth.sandbox.stats.rate_limited == 0

    def requests_of(name: str) -> float:
        return sum(
            v
            for (metric, labels), v in metrics.items()
            if metric == "luxsci_proxy_requests_total" and ("integration", name) in labels
        )

    assert requests_of("mail") == LOAD and requests_of("crm") == LOAD
    build = {
        dict(labels)["integration"]: dict(labels)["scheme"]
        for (metric, labels), _ in metrics.items()
        if metric == "luxsci_proxy_build_info"
    }
    assert build == {"mail": "luxsci", "crm": "oauth2"}
    assert metrics[("luxsci_proxy_ready", frozenset({("integration", "crm")}))] == 1.0
    # The process's own families stay unlabelled, once.
    assert metrics[("luxsci_proxy_config_last_reload_successful", frozenset())] == 1.0

    events = running.events()
    access = [e for e in events if e["event"] == "request"]
    by_integration = {
        name: [e for e in access if e.get("integration") == name] for name in ("mail", "crm")
    }
    assert len(access) == 2 * LOAD
    assert {e["path"] for e in by_integration["mail"]} == {LUXSCI_PATH}
    assert {e["path"] for e in by_integration["crm"]} == {OAUTH_PATH}
    assert len(by_integration["mail"]) == len(by_integration["crm"]) == LOAD
    # Debug lines say which integration made them too.
    signed = [e for e in events if e["event"] == "request_signed"]
    assert signed and {e.get("integration") for e in signed} == {"mail"}
    started = [e for e in events if e["event"] == "proxy_started"]
    assert sorted(e["integration"] for e in started) == ["crm", "mail"]
    text = running.stream.getvalue()
    assert SECRET not in text and CLIENT_SECRET not in text


async def test_readyz_lists_each_integration_and_answers_for_one_alone(
    running: Running, http: aiohttp.ClientSession
) -> None:
    status, body = await fetch(http, running.admin + "/readyz")
    assert status == 200 and body["ready"] is True
    assert set(body["checks"]) == {"mail", "crm"}
    assert body["checks"]["crm"]["checks"]["auth"]["scheme"] == "oauth2"
    assert body["checks"]["mail"]["ready"] is True

    status, body = await fetch(http, running.admin + "/readyz?integration=crm")
    assert status == 200
    assert body["integration"] == "crm" and body["ready"] is True
    assert body["checks"]["auth"]["scheme"] == "oauth2"

    async with http.get(running.admin + "/readyz?integration=nope") as resp:
        assert resp.status == 404
        assert resp.headers["X-Proxy-Error"] == "unknown_integration"
        assert await resp.json() == {
            "success": 0,
            "error_message": "no integration named 'nope'",
        }

    # One not ready makes the whole not ready, and only that one says so alone.
    running.service.integrations["mail"].forwarder.drain.draining = True
    try:
        status, body = await fetch(http, running.admin + "/readyz")
        assert status == 503 and body["ready"] is False
        assert body["checks"]["mail"]["ready"] is False and body["checks"]["crm"]["ready"]
        assert (await fetch(http, running.admin + "/readyz?integration=crm"))[0] == 200
        assert (await fetch(http, running.admin + "/readyz?integration=mail"))[0] == 503
    finally:
        running.service.integrations["mail"].forwarder.drain.draining = False

    # None left running (a replacement whose old section could not resume either): the
    # process serves nothing, so it is not ready, whatever `all()` of no checks would say.
    kept = dict(running.service.integrations)
    running.service.integrations.clear()
    try:
        status, body = await fetch(http, running.admin + "/readyz")
        assert status == 503 and body["ready"] is False
        async with http.get(running.admin + "/", allow_redirects=False) as resp:
            assert resp.status == 404
            assert (await resp.json())["error_message"] == "no integration runs"
    finally:
        running.service.integrations.update(kept)


async def test_status_json_shows_each_integration_and_the_page_one_at_a_time(
    running: Running, http: aiohttp.ClientSession
) -> None:
    status, body = await fetch(http, running.admin + "/status.json")
    assert status == 200 and set(body["integrations"]) == {"mail", "crm"}
    assert body["integrations"]["crm"]["auth"]["scheme"] == "oauth2"
    status, body = await fetch(http, running.admin + "/status.json?integration=mail")
    assert body["integration"] == "mail" and body["auth"]["scheme"] == "luxsci"
    async with http.get(running.admin + "/", allow_redirects=False) as resp:
        assert resp.status == 302 and resp.headers["Location"] == "?integration=mail"
    async with http.get(running.admin + "/?integration=crm") as resp:
        page = await resp.text()
    assert resp.status == 200 and 'href="?integration=mail"' in page
    async with http.get(running.admin + "/status.json?integration=nope") as resp:
        assert resp.status == 404


async def test_a_reload_removes_one_after_draining_and_refuses_an_address_in_use_alone(
    sandboxes: tuple[SandboxServer, SandboxServer], running: Running
) -> None:
    luxsci, oauth = sandboxes
    service = running.service
    mail_port = service.integrations["mail"].port
    # A request in flight through crm when the reload removes it: it is served, not cut.
    oauth.sandbox.add_fault(delay=1.0, times=1, path_prefix=OAUTH_PATH)
    async with aiohttp.ClientSession() as http:
        slow = asyncio.create_task(fetch(http, running.url("crm") + OAUTH_PATH))
        await eventually(lambda: oauth.sandbox.stats.inflight == 1, within=10)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            text = two_integrations(luxsci, oauth)
            kept = text[: text.index("  - name: crm")]  # mail alone
            added = kept + (
                "  - name: extra\n"
                f"    listen: {{port: {port}}}\n"
                f'    upstream: {{url: "{luxsci.url}", allow_insecure: true}}\n'
                '    auth: {token: "${TOKEN}", secret: "${SECRET}"}\n'
                '    limits: {state_file: ""}\n'
            )
            await service.reload(parse(added, ENV))
        status, body = await slow
        assert status == 200 and body["success"] == 1  # drained, then closed
        assert set(service.integrations) == {"mail"}
        assert service.last_reload.refused == ("extra",)
        assert service.last_reload.successful is False
        status, _ = await fetch(http, f"http://127.0.0.1:{mail_port}{LUXSCI_PATH}")
        assert status == 200
        async with http.get(running.admin + "/readyz?integration=crm") as resp:
            assert resp.status == 404
    events = running.events()
    removed = [e for e in events if e["event"] == "integration_removed"]
    assert [(e["integration"], e["cut_off"]) for e in removed] == [("crm", 0)]
    rejected = [e for e in events if e["event"] == "config_reload_rejected"]
    assert [e["integration"] for e in rejected] == ["extra"]
    assert rejected[0]["error"].startswith("integrations[extra].listen: cannot listen on")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_a_host_change_on_the_same_port_replaces_the_integration(
    sandboxes: tuple[SandboxServer, SandboxServer],
) -> None:
    # 127.0.0.1 -> localhost on one port: the new listener binds what the old socket, kept
    # for a resume, still held, so the move was always refused (EADDRINUSE).
    luxsci, oauth = sandboxes
    port = _free_port()
    text = two_integrations(luxsci, oauth).replace(
        "  - name: mail\n    listen: {port: 0}",
        f"  - name: mail\n    listen: {{host: 127.0.0.1, port: {port}}}",
    )
    stream = io.StringIO()
    service = ProxyService(parse(text, ENV), Logs("info", "json", [SECRET, CLIENT_SECRET], stream))
    await service.start()
    try:
        moved = text.replace(f"host: 127.0.0.1, port: {port}", f"host: localhost, port: {port}")
        await service.reload(parse(moved, ENV))
        assert service.last_reload.refused == ()
        assert service.last_reload.successful is True
        mail = service.integrations["mail"]
        assert mail.cfg.listen.host == "localhost" and mail.port == port
        async with aiohttp.ClientSession() as http:
            status, body = await fetch(http, f"http://127.0.0.1:{port}{LUXSCI_PATH}")
        assert status == 200 and body["success"] == 1
    finally:
        await service.stop()
    events = [json.loads(line) for line in stream.getvalue().splitlines() if line]
    assert not [e for e in events if e["event"] == "config_reload_rejected"]
    assert [e["changed"] for e in events if e["event"] == "integration_replaced"] == [["listen"]]


async def test_a_second_stop_signal_cuts_short_the_drain_of_an_integration_a_reload_removes(
    sandboxes: tuple[SandboxServer, SandboxServer],
) -> None:
    luxsci, oauth = sandboxes
    text = "shutdown_timeout: 120\n" + two_integrations(luxsci, oauth)
    stream = io.StringIO()
    service = ProxyService(parse(text, ENV), Logs("info", "json", [SECRET, CLIENT_SECRET], stream))
    await service.start()
    crm = service.integrations["crm"]
    # The API holds crm's request far longer than the test waits: only a cut ends it early.
    oauth.sandbox.add_fault(delay=60.0, times=1, path_prefix=OAUTH_PATH)
    async with aiohttp.ClientSession() as http:
        slow = asyncio.create_task(fetch(http, f"http://127.0.0.1:{crm.port}{OAUTH_PATH}"))
        await eventually(lambda: oauth.sandbox.stats.inflight == 1, within=10)
        mail_only = text[: text.index("  - name: crm")]
        reload = asyncio.create_task(service.reload(parse(mail_only, ENV)))
        await eventually(lambda: crm.forwarder.draining, within=10)
        stop = asyncio.create_task(service.stop())  # the first signal: waits for the reload
        await eventually(lambda: service._stopping, within=10)
        service.hurry()  # the second: cuts off what is still in any pipeline
        status, body = await asyncio.wait_for(slow, timeout=30)
        await asyncio.wait_for(asyncio.gather(reload, stop), timeout=30)
    assert status == 503 and body["success"] == 0
    events = [json.loads(line) for line in stream.getvalue().splitlines() if line]
    removed = [e for e in events if e["event"] == "integration_removed"]
    assert [(e["integration"], e["cut_off"]) for e in removed] == [("crm", 1)]


def lenient(text: str) -> Config:
    """A reload's config (cli.cmd_run: build(..., lenient=True)): bad entries refused."""
    from proxy.config import build, file_values, read_yaml

    return build(file_values(read_yaml(text, "reload"), ENV, None), lenient=True)


async def test_a_new_entry_may_not_take_the_state_of_one_whose_section_was_refused(
    sandboxes: tuple[SandboxServer, SandboxServer], tmp_path: Path
) -> None:
    # crm keeps running on its old section when its new one is refused: a new entry naming
    # crm's day-count file would count into the file crm still writes.
    luxsci, oauth = sandboxes
    day_file = tmp_path / "crm-day.json"
    text = two_integrations(luxsci, oauth)
    crm_at = text.index("  - name: crm")
    crm = text[crm_at:].replace('state_file: ""', f'state_file: "{day_file}"')
    start = text[:crm_at] + crm
    stream = io.StringIO()
    service = ProxyService(parse(start, ENV), Logs("info", "json", [SECRET, CLIENT_SECRET], stream))
    await service.start()
    try:
        billing = (
            "  - name: billing\n"
            "    listen: {port: 0}\n"
            f'    upstream: {{url: "{luxsci.url}", allow_insecure: true}}\n'
            '    auth: {token: "${TOKEN}", secret: "${SECRET}"}\n'
            f'    limits: {{state_file: "{day_file}"}}\n'
        )
        bad_crm = crm.replace("queue: {max_wait: 60}", "queue: {max_wait: 60, max_size: 0}")
        new = lenient(text[:crm_at] + bad_crm + billing)
        assert new.refused and new.refused[0][0] == "crm"
        with pytest.raises(ConfigError, match=r"integrations\[billing\]\.limits\.state_file"):
            await service.reload(new)
        assert set(service.integrations) == {"mail", "crm"}
        assert service.integrations["crm"].cfg.limits.state_file == str(day_file)
        assert service.last_reload.successful is False
    finally:
        await service.stop()


async def test_an_integration_refused_alone_stays_flagged_through_a_reload_refused_whole(
    sandboxes: tuple[SandboxServer, SandboxServer],
) -> None:
    # README: refused{integration} stays 1 until a reload applies whole. A reload refused
    # whole changes nothing, so crm still runs its old section and must stay flagged.
    luxsci, oauth = sandboxes
    text = two_integrations(luxsci, oauth)
    stream = io.StringIO()
    service = ProxyService(parse(text, ENV), Logs("info", "json", [SECRET, CLIENT_SECRET], stream))
    await service.start()
    flagged = 'luxsci_proxy_config_last_reload_refused{integration="crm"} 1.0'

    async def scrape() -> str:
        url = f"http://127.0.0.1:{service.admin_port}/metrics"
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            return await resp.text()

    try:
        bad_crm = text.replace(
            "client_id: crm-client\n", "client_id: crm-client\n      client_auth: bogus\n"
        )
        await service.reload(lenient(bad_crm))
        assert service.last_reload.refused == ("crm",)
        assert flagged in await scrape()
        # A reload refused whole (here: switching forms), then a file that does not load.
        single = parse('admin: {port: 0}\nauth: {token: "${TOKEN}", secret: "${SECRET}"}\n', ENV)
        with pytest.raises(ConfigError, match="restart"):
            await service.reload(single)
        assert flagged in await scrape()
        service.reload_refused()
        assert flagged in await scrape()
        assert "luxsci_proxy_config_last_reload_successful 0.0" in await scrape()
        # A reload that applies whole clears it.
        await service.reload(parse(text, ENV))
        assert flagged not in await scrape()
    finally:
        await service.stop()
