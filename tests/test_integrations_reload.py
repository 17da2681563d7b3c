"""SIGHUP changing what a running integration is built from, in a real `luxsci-proxy run`
process: its upstream, its port, its auth scheme. The integration is replaced (the old
one drains and closes, the new one starts); a new section that cannot start leaves the
old one serving and the reload says that integration was refused."""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conftest import USER
from test_cli import (
    PROXY,
    SECRET,
    TOKEN,
    curl,
    env_with,
    free_port,
    sandbox_process,
    start_proxy,
    stop_proxy,
    wait_until,
)
from test_integrations_cli import PATH, config, entry, get, listening, metrics, ready

__all__ = ["sandbox_process"]  # the fixture, used by name

CLIENT_ID = "reload-client"
CLIENT_SECRET = "reload-client-secret-8Jk2"


@contextmanager
def another_sandbox(*extra: str) -> Iterator[str]:
    """A second sandbox process (the fixture gives one), with `extra` flags."""
    port = free_port()
    args = ["--port", str(port), "--token", TOKEN, "--secret", SECRET, "--user", f"{USER}:pw"]
    proc = subprocess.Popen(
        [*PROXY, "sandbox", *args, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_with(),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert " listening on http" in line, line
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)


def stats(sandbox: str) -> dict[str, Any]:
    stats: dict[str, Any] = json.loads(curl(f"{sandbox}/_sandbox/stats")[1])
    return stats


def served(sandbox: str) -> int:
    """How many requests for PATH the sandbox answered (logins aside)."""
    return sum(1 for line in stats(sandbox)["log"] if line["target"] == PATH)


def reloaded(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "config_reloaded"]


def test_a_new_upstream_takes_new_requests_while_the_one_in_flight_finishes_on_the_old(
    sandbox_process: str, tmp_path: Path
) -> None:
    old_api = sandbox_process
    admin, a, b = free_port(), free_port(), free_port()
    path = tmp_path / "proxy.yaml"
    path.write_text(config(admin, entry("a", a, old_api), entry("b", b, old_api)))
    with another_sandbox() as new_api:
        proc = start_proxy(path)
        try:
            wait_until(lambda: ready(admin) == 200)
            # The old API holds the next request for a while: it is in flight at the reload.
            fault = json.dumps({"delay": 3, "path_prefix": PATH})
            curl("-X", "POST", "--data", fault, f"{old_api}/_sandbox/faults")
            answers: list[tuple[int, dict[str, Any]]] = []
            slow = threading.Thread(target=lambda: answers.append(get(a)))
            slow.start()
            wait_until(lambda: stats(old_api)["inflight"] == 1)

            path.write_text(config(admin, entry("a", a, new_api), entry("b", b, old_api)))
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: ready(admin, "a") != 200)  # a drains for its replacement...
            assert ready(admin) == 200  # ...a deliberate pause: the process stays ready
            slow.join(timeout=30)
            assert answers and answers[0][0] == 200  # finished, on the old API

            served_before = served(old_api)
            assert get(a)[0] == 200  # waits in the handed-over backlog if need be
            assert served(new_api) == 1
            assert get(b)[0] == 200  # b is untouched, still on the old API
            assert served(old_api) == served_before + 1
            wait_until(lambda: ready(admin, "a") == 200)
            assert "luxsci_proxy_config_last_reload_successful 1.0" in metrics(admin)
            # One integration, replaced: its counters go on under the same label.
            assert 'luxsci_proxy_requests_total{integration="a"' in metrics(admin)
        finally:
            events = stop_proxy(proc)
    names = [e["event"] for e in events]
    replacing = names.index("integration_replacing")
    slow_line = next(
        i for i, e in enumerate(events) if e["event"] == "request" and e.get("integration") == "a"
    )
    assert replacing < slow_line < names.index("integration_replaced")
    by_event = {e["event"]: e for e in events}
    assert by_event["integration_replacing"]["changed"] == ["upstream"]
    assert by_event["integration_replaced"]["cut_off"] == 0
    (done,) = reloaded(events)
    assert done["needs_restart"] == [] and "refused" not in done
    text = json.dumps(events)
    assert SECRET not in text and TOKEN not in text


def test_a_new_port_that_is_taken_is_refused_and_a_free_one_moves_the_integration(
    sandbox_process: str, tmp_path: Path
) -> None:
    admin, a, b, taken, moved = (free_port() for _ in range(5))
    path = tmp_path / "proxy.yaml"
    first, second = entry("a", a, sandbox_process), entry("b", b, sandbox_process)
    path.write_text(config(admin, first, second))
    proc = start_proxy(path)
    refused = 'luxsci_proxy_config_last_reload_refused{integration="a"} 1.0'
    try:
        wait_until(lambda: ready(admin) == 200)
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", taken))
            squatter.listen()
            path.write_text(config(admin, entry("a", taken, sandbox_process), second))
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: refused in metrics(admin))
            # The old section serves again, on its old port.
            assert get(a)[0] == 200 and get(b)[0] == 200
            wait_until(lambda: ready(admin, "a") == 200)
            assert "luxsci_proxy_config_last_reload_successful 0.0" in metrics(admin)

        path.write_text(config(admin, entry("a", moved, sandbox_process), second))
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "luxsci_proxy_config_last_reload_successful 1.0" in metrics(admin))
        assert not listening(a)
        assert get(moved)[0] == 200 and get(b)[0] == 200
        assert ready(admin, "a") == 200
        assert refused not in metrics(admin)
    finally:
        events = stop_proxy(proc)
    rejected = [e for e in events if e["event"] == "config_reload_rejected"]
    assert len(rejected) == 1 and rejected[0]["integration"] == "a"
    assert rejected[0]["error"].startswith(
        f"integrations[a].listen: cannot listen on 127.0.0.1:{taken}: "
    )
    resumed = [e for e in events if e["event"] == "integration_resumed"]
    assert len(resumed) == 1 and resumed[0]["listen"] == a
    assert [e.get("refused") for e in reloaded(events)] == [["a"], None]
    started = [e for e in events if e["event"] == "proxy_started" and e["integration"] == "a"]
    assert [e["listen"] for e in started] == [f"127.0.0.1:{a}", f"127.0.0.1:{moved}"]


def test_a_new_auth_scheme_replaces_the_integration(sandbox_process: str, tmp_path: Path) -> None:
    admin, a = free_port(), free_port()
    path = tmp_path / "proxy.yaml"
    path.write_text(config(admin, entry("a", a, sandbox_process)))
    oauth_flags = ("--oauth", "--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET)
    with another_sandbox(*oauth_flags) as oauth_api:
        oauth = f"""
  - name: a
    listen: {{host: 127.0.0.1, port: {a}}}
    upstream: {{url: "{oauth_api}", allow_insecure: true}}
    auth:
      scheme: oauth2
      token_url: "{oauth_api}/oauth/token"
      client_id: {CLIENT_ID}
      client_secret: "{CLIENT_SECRET}"
    limits: {{state_file: ""}}
"""
        proc = start_proxy(path)
        try:
            wait_until(lambda: ready(admin) == 200)
            assert 'scheme="luxsci"' in metrics(admin)
            path.write_text(config(admin, oauth))
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: 'scheme="oauth2"' in metrics(admin))
            status, _ = curl(f"http://127.0.0.1:{a}/v1/things")
            assert status == 200
            assert stats(oauth_api)["oauth"]["token_calls"] >= 1
            wait_until(lambda: ready(admin, "a") == 200)
        finally:
            events = stop_proxy(proc)
    replacing = [e for e in events if e["event"] == "integration_replacing"]
    assert replacing[0]["changed"] == ["upstream", "auth.scheme"]
    (done,) = reloaded(events)
    assert done["needs_restart"] == []
    assert CLIENT_SECRET not in json.dumps(events)


JOBS_KEY = base64.b64encode(bytes(range(32))).decode()


def test_a_replaced_integration_hands_its_jobs_store_and_queued_jobs_to_the_new_one(
    sandbox_process: str, tmp_path: Path
) -> None:
    old_api = sandbox_process
    admin, a = free_port(), free_port()
    store = tmp_path / "jobs.db"
    jobs = f'jobs: {{enabled: true, store: "{store}", keys: ["{JOBS_KEY}"], concurrency: 1}}\n'
    path = tmp_path / "proxy.yaml"

    def write(upstream: str) -> None:
        path.write_text(config(admin, entry("a", a, upstream) + "    " + jobs))
        path.chmod(0o600)

    write(old_api)
    with another_sandbox() as new_api:
        proc = start_proxy(path)
        try:
            wait_until(lambda: ready(admin) == 200)
            # The first job is held at the old API; with one at a time, the others queue.
            fault = json.dumps({"delay": 2, "path_prefix": PATH})
            curl("-X", "POST", "--data", fault, f"{old_api}/_sandbox/faults")
            ids = []
            for _ in range(3):
                status, body = curl("-H", "Prefer: respond-async", f"http://127.0.0.1:{a}{PATH}")
                assert status == 202, body
                ids.append(json.loads(body)["id"])
            wait_until(lambda: stats(old_api)["inflight"] == 1)

            write(new_api)
            proc.send_signal(signal.SIGHUP)

            def state(job: str) -> str:
                answer = curl(f"http://127.0.0.1:{a}/_proxy/jobs/{job}")[1]
                return str(json.loads(answer).get("state"))

            wait_until(lambda: all(state(job) == "succeeded" for job in ids), timeout=30)
            # The one under way finished at the old API; the queued ones ran at the new.
            assert served(old_api) == 1 and served(new_api) == 2
        finally:
            events = stop_proxy(proc)
    assert [e["event"] for e in events].count("integration_replaced") == 1
    assert not [e for e in events if e["event"] == "config_reload_rejected"]
    assert JOBS_KEY not in json.dumps(events)


def test_a_stop_signal_during_a_replacement_drains_and_closes_the_new_integration_too(
    sandbox_process: str, tmp_path: Path
) -> None:
    old_api = sandbox_process
    admin, a = free_port(), free_port()
    path = tmp_path / "proxy.yaml"
    path.write_text(config(admin, entry("a", a, old_api)))
    with another_sandbox() as new_api:
        proc = start_proxy(path)
        try:
            wait_until(lambda: ready(admin) == 200)
            # The old API holds a request: the replacement is mid-drain when SIGTERM comes.
            fault = json.dumps({"delay": 3, "path_prefix": PATH})
            curl("-X", "POST", "--data", fault, f"{old_api}/_sandbox/faults")
            answers: list[tuple[int, dict[str, Any]]] = []
            slow = threading.Thread(target=lambda: answers.append(get(a)))
            slow.start()
            wait_until(lambda: stats(old_api)["inflight"] == 1)
            path.write_text(config(admin, entry("a", a, new_api)))
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: ready(admin, "a") != 200)  # the old one is draining
            assert stats(old_api)["inflight"] == 1
        finally:
            events = stop_proxy(proc)
            slow.join(timeout=30)
        # The new integration, started by the reload after the signal, was drained and
        # closed by the shutdown: its session ended at its API.
        assert stats(new_api)["revocations"] == 1
    assert answers and answers[0][0] == 200  # finished on the old API during the drain
    assert stats(old_api)["revocations"] >= 1
    names = [e["event"] for e in events]
    assert names.index("shutdown_started") < names.index("integration_replaced")
    assert names.index("integration_replaced") < names.index("shutdown_complete")
    assert names[-1] == "shutdown_complete"
