"""Several integrations in a real `luxsci-proxy run` process: SIGHUP adds one that then
serves, refuses one bad section while the others apply and keep serving, and removes
one (its listener closes); `check` says each integration's verdict."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

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

__all__ = ["sandbox_process"]  # the fixture, used by name

PATH = f"/perl/api/v2/user/{USER}/profile"


def entry(name: str, port: int, upstream: str, limits: str = 'state_file: ""') -> str:
    return f"""
  - name: {name}
    listen: {{host: 127.0.0.1, port: {port}}}
    upstream: {{url: "{upstream}", allow_insecure: true}}
    auth: {{token: "${{LUXSCI_API_TOKEN}}", secret: "${{LUXSCI_API_SECRET}}"}}
    limits: {{{limits}}}
"""


def config(admin: int, *entries: str) -> str:
    return (
        f"admin: {{host: 127.0.0.1, port: {admin}}}\n"
        "logging: {level: info, format: json}\nshutdown_timeout: 5\n"
        "integrations:" + "".join(entries)
    )


def ready(admin: int, name: str | None = None) -> int:
    query = f"?integration={name}" if name else ""
    try:
        return curl(f"http://127.0.0.1:{admin}/readyz{query}")[0]
    except subprocess.CalledProcessError:
        return 0  # not listening yet


def metrics(admin: int) -> str:
    return curl(f"http://127.0.0.1:{admin}/metrics")[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def get(port: int) -> tuple[int, dict]:
    status, body = curl(f"http://127.0.0.1:{port}{PATH}")
    return status, json.loads(body)


def test_sighup_adds_refuses_alone_and_removes_integrations(
    sandbox_process: str, tmp_path: Path
) -> None:
    admin, a, b, c = (free_port() for _ in range(4))
    path = tmp_path / "proxy.yaml"
    first, second = entry("a", a, sandbox_process), entry("b", b, sandbox_process)
    path.write_text(config(admin, first, second))
    proc = start_proxy(path)
    try:
        wait_until(lambda: ready(admin) == 200)
        assert get(a)[0] == 200 and get(b)[0] == 200

        # A third integration: started while the others serve; then it serves too.
        third = entry("c", c, sandbox_process)
        path.write_text(config(admin, first, second, third))
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: ready(admin, "c") == 200)
        assert get(c)[0] == 200 and get(a)[0] == 200 and get(b)[0] == 200
        assert ready(admin) == 200

        # b's section is bad: refused alone, b runs as it was; a's change applies.
        bad_b = entry("b", b, sandbox_process, 'state_file: "", per_dya: 5')
        spent_a = entry("a", a, sandbox_process, 'state_file: "", per_day: 1')
        path.write_text(config(admin, spent_a, bad_b, third))
        proc.send_signal(signal.SIGHUP)
        refused = 'luxsci_proxy_config_last_reload_refused{integration="b"} 1.0'
        wait_until(lambda: refused in metrics(admin))
        status, body = get(a)
        assert status == 503 and "budget of 1" in body["error_message"]  # a's new day budget
        assert get(b)[0] == 200 and get(c)[0] == 200
        assert "luxsci_proxy_config_last_reload_successful 0.0" in metrics(admin)

        # c is left out: its listener closes; the others keep serving.
        path.write_text(config(admin, first, second))
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: not listening(c))
        assert ready(admin, "c") == 404
        assert get(a)[0] == 200 and get(b)[0] == 200
        assert 'integration="c"' not in metrics(admin)
        assert "luxsci_proxy_config_last_reload_successful 1.0" in metrics(admin)
    finally:
        events = stop_proxy(proc)
    by_event = {e["event"]: e for e in events}
    assert by_event["integration_added"]["integration"] == "c"
    assert by_event["integration_removed"]["integration"] == "c"
    rejected = [e for e in events if e["event"] == "config_reload_rejected"]
    assert len(rejected) == 1 and rejected[0]["integration"] == "b"
    assert rejected[0]["error"].startswith("integrations[1].limits.per_dya: unknown key")
    reloaded = [e for e in events if e["event"] == "config_reloaded"]
    assert [e.get("refused") for e in reloaded] == [None, ["b"], None]
    text = json.dumps(events)
    assert SECRET not in text and TOKEN not in text


def test_check_says_each_integrations_verdict_and_names_the_bad_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "proxy.yaml"
    upstream = "http://127.0.0.1:9"
    path.write_text(config(9100, entry("mail", 8081, upstream), entry("crm", 8082, upstream)))
    env = env_with(LUXSCI_API_TOKEN=TOKEN, LUXSCI_API_SECRET=SECRET)
    result = subprocess.run(
        [*PROXY, "check", "--config", str(path)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1:3] == [
        "# integrations[mail]: OK (luxsci, 127.0.0.1:8081)",
        "# integrations[crm]: OK (luxsci, 127.0.0.1:8082)",
    ]
    assert SECRET not in result.stdout and "********" in result.stdout
    assert "listen:" not in lines[3:5]  # the list's form: no top-level sections printed

    path.write_text(config(9100, entry("mail", 8081, upstream), entry("crm", 8081, upstream)))
    result = subprocess.run(
        [*PROXY, "check", "--config", str(path)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "config error: integrations[crm].listen.port: 127.0.0.1:8081 is "
        "integrations[mail]'s address already"
    )


def test_the_jobs_verb_reads_the_store_of_the_integration_named(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    upstream = "http://127.0.0.1:9"
    path.write_text(config(9100, entry("mail", 8081, upstream), entry("crm", 8082, upstream)))
    env = env_with(
        LUXSCI_API_TOKEN=TOKEN, LUXSCI_API_SECRET=SECRET, LUXSCI_PROXY_STATE_DIR=str(tmp_path)
    )

    def jobs(*args: str) -> subprocess.CompletedProcess[str]:
        command = [*PROXY, "jobs", *args, "list", "--config", str(path)]
        return subprocess.run(command, capture_output=True, text=True, env=env)

    result = jobs()
    assert result.returncode == 2
    assert "--integration: give one of the config's integrations: mail, crm" in result.stderr
    result = jobs("--integration", "crm")
    assert result.returncode == 1  # no store yet: but the one named after crm
    assert f"no jobs store at {tmp_path}/jobs-crm-" in result.stderr
