"""End to end: the real CLI configured by flags, LUXSCI_PROXY_* variables and stdin; the
warnings run and check share; a second stop signal during the drain."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import yaml
from conftest import USER
from test_cli import (
    PROXY,
    SECRET,
    TOKEN,
    _status,
    curl,
    env_with,
    free_port,
    sandbox_process,  # noqa: F401 - the fixture
    stop_proxy,
    wait_until,
)

PROFILE = f"/perl/api/v2/user/{USER}/profile"


def secret_files(tmp_path: Path) -> Path:
    path = tmp_path / "api-secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


def check(
    *args: str, env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PROXY, "check", *args], capture_output=True, text=True, timeout=30, env=env, input=stdin
    )


def source_of(stdout: str, key: str) -> tuple[str, str]:
    """`check`'s value and source comment for `section.key`, read from its lines."""
    section, name = key.split(".")
    lines = stdout.splitlines()
    start = lines.index(f"{section}:")
    for line in lines[start + 1 :]:
        if line.startswith(f"  {name}:"):
            value, _, origin = line.partition("  # ")
            return value.split(":", 1)[1].strip(), origin.strip()
    raise AssertionError(f"{key} not in the output")


def test_run_and_check_from_flags_and_environment_alone(
    sandbox_process: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    port, admin = free_port(), free_port()
    argv = [
        "--upstream",
        sandbox_process,
        "--allow-insecure",
        "--listen",
        f"127.0.0.1:{port}",
        "--admin",
        f"127.0.0.1:{admin}",
        "--log-level",
        "DEBUG",
        "--auth-secret-file",
        str(secret_files(tmp_path)),
        "--set",
        "limits.state_file=",
    ]
    env = env_with(LUXSCI_PROXY_AUTH_TOKEN=TOKEN, LUXSCI_PROXY_QUEUE_MAX_WAIT="7")
    result = check(*argv, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# flags and environment (no config file): OK\n")
    printed = yaml.safe_load(result.stdout)
    assert printed["listen"]["port"] == port and printed["auth"]["secret"] == "********"
    assert source_of(result.stdout, "listen.port") == (str(port), "flag:--listen")
    assert source_of(result.stdout, "auth.secret") == ("'********'", "flag:--auth-secret-file")
    assert source_of(result.stdout, "auth.token") == ("'********'", "env:LUXSCI_PROXY_AUTH_TOKEN")
    assert source_of(result.stdout, "queue.max_wait") == ("7.0", "env:LUXSCI_PROXY_QUEUE_MAX_WAIT")
    assert source_of(result.stdout, "retry.max_attempts") == ("4", "default")
    assert source_of(result.stdout, "logging.level") == ("debug", "flag:--log-level")

    proc = subprocess.Popen(
        [*PROXY, "run", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        wait_until(lambda: _status(f"http://127.0.0.1:{admin}/readyz") == 200)
        assert curl(f"http://127.0.0.1:{port}{PROFILE}")[0] == 200
    finally:
        events = stop_proxy(proc)
    assert "request_signed" in [e["event"] for e in events]  # debug, from the flag
    output = result.stdout + result.stderr + json.dumps(events)
    codes = json.loads(curl(f"{sandbox_process}/_sandbox/stats")[1])["issued_codes"]
    assert codes
    for secret in (SECRET, TOKEN, *codes):
        assert secret not in output


def test_flags_beat_variables_which_beat_the_file(
    sandbox_process: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    file_port, env_port, flag_port, admin = free_port(), free_port(), free_port(), free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f"""
listen: {{port: {file_port}, max_connections: 50}}
admin: {{port: {admin}}}
upstream: {{url: "{sandbox_process}", allow_insecure: true}}
auth: {{token: "${{LUXSCI_API_TOKEN}}", secret_file: api-secret}}
queue: {{max_wait: 3}}
limits: {{state_file: ""}}
"""
    )
    secret_files(tmp_path)  # next to the config: *_file paths are relative to its folder
    env = env_with(
        LUXSCI_API_TOKEN=TOKEN,
        LUXSCI_PROXY_LISTEN_PORT=str(env_port),
        LUXSCI_PROXY_QUEUE_MAX_WAIT="4",
    )
    argv = ["--config", str(config), "--listen", str(flag_port)]
    result = subprocess.run(
        [*PROXY, "check", *argv], capture_output=True, text=True, timeout=30, env=env, cwd="/"
    )
    assert result.returncode == 0, result.stderr
    assert source_of(result.stdout, "listen.port") == (str(flag_port), "flag:--listen")
    assert source_of(result.stdout, "queue.max_wait") == ("4.0", "env:LUXSCI_PROXY_QUEUE_MAX_WAIT")
    assert source_of(result.stdout, "listen.max_connections") == ("50", "file")
    assert source_of(result.stdout, "auth.secret") == ("'********'", "file:secret_file")
    assert source_of(result.stdout, "auth.token") == ("'********'", "file:${LUXSCI_API_TOKEN}")

    proc = subprocess.Popen(
        [*PROXY, "run", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd="/",
    )
    try:
        wait_until(lambda: _status(f"http://127.0.0.1:{admin}/readyz") == 200)
        assert curl(f"http://127.0.0.1:{flag_port}{PROFILE}")[0] == 200
        for unused in (file_port, env_port):
            assert _status(f"http://127.0.0.1:{unused}{PROFILE}") == 0  # nobody listens
    finally:
        events = stop_proxy(proc)
    (started,) = [e for e in events if e["event"] == "proxy_started"]
    assert started["listen"] == f"127.0.0.1:{flag_port}"


def test_the_config_from_standard_input(
    sandbox_process: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    port, admin = free_port(), free_port()
    text = f"""
listen: {{port: {port}}}
admin: {{port: {admin}}}
upstream: {{url: "{sandbox_process}", allow_insecure: true}}
auth: {{token: "${{LUXSCI_API_TOKEN}}", secret: "${{LUXSCI_API_SECRET}}"}}
logging: {{level: INFO}}
limits: {{state_file: ""}}
"""
    env = env_with(LUXSCI_API_TOKEN=TOKEN, LUXSCI_API_SECRET=SECRET)
    result = check("--config", "-", env=env, stdin=text)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# <stdin>: OK\n")
    assert source_of(result.stdout, "logging.level") == ("info", "file")

    piped = tmp_path / "piped.yaml"
    piped.write_text(text)
    with piped.open() as stdin:
        proc = subprocess.Popen(
            [*PROXY, "run", "--config", "-"],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    try:
        wait_until(lambda: _status(f"http://127.0.0.1:{admin}/readyz") == 200)
        assert curl(f"http://127.0.0.1:{port}{PROFILE}")[0] == 200
        # SIGHUP applies the same text again (standard input is read once).
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert curl(f"http://127.0.0.1:{port}{PROFILE}")[0] == 200
    finally:
        events = stop_proxy(proc)
    (reloaded,) = [e for e in events if e["event"] == "config_reloaded"]
    assert reloaded["path"] == "<stdin>" and reloaded["changed"] == []


def test_run_and_check_give_the_same_warnings_and_an_unknown_variable_is_one(
    sandbox_process: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    port, admin = free_port(), free_port()
    (tmp_path / "a-file").write_text("")
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f"""
listen: {{host: 0.0.0.0, port: {port}}}
admin: {{port: {admin}}}
upstream: {{url: "{sandbox_process}", allow_insecure: true}}
auth: {{token: "{TOKEN}", secret: "{SECRET}"}}
logging: {{log_bodies: true}}
"""
    )
    config.chmod(0o644)
    env = env_with(
        LUXSCI_PROXY_LISTEN_PROT="1",
        LUXSCI_PROXY_STATE_DIR=str(tmp_path / "a-file" / "state"),
    )
    result = check("--config", str(config), env=env)
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]

    proc = subprocess.Popen(
        [*PROXY, "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_until(lambda: _status(f"http://127.0.0.1:{admin}/readyz") == 200)
    finally:
        events = stop_proxy(proc)
    started = [e["event"] for e in events].index("proxy_started")
    at_start = [e for e in events[:started] if e["level"] == "warning"]
    assert [e["event"] for e in at_start] == [
        "config_warning",  # auth.secret written in the file
        "config_warning",  # ... and the file is readable by others
        "config_warning",  # LUXSCI_PROXY_LISTEN_PROT
        "proxy_open_to_the_network",
        "upstream_not_encrypted",
        "log_bodies_enabled",
        "state_dir_not_writable",
    ]
    assert len(warned) == len(at_start)
    for line, event in zip(warned, at_start, strict=True):
        if event["event"] == "config_warning":
            assert line == f"warning: {event['warning']}"
    assert "LUXSCI_PROXY_LISTEN_PROT: not a setting" in result.stderr
    assert "did you mean LUXSCI_PROXY_LISTEN_PORT?" in result.stderr
    assert "listen.host: 0.0.0.0 is open to the network" in result.stderr
    assert "upstream.url: http://" in result.stderr
    assert "logging.log_bodies:" in result.stderr
    assert "limits.state_file: cannot keep state in" in result.stderr
    for text in (result.stdout, result.stderr, json.dumps(events)):
        assert SECRET not in text


def test_a_second_sigterm_during_the_drain_stops_at_once_and_says_what_it_cut_off(
    sandbox_process: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    port, admin = free_port(), free_port()
    proc = subprocess.Popen(
        [
            *PROXY,
            "run",
            "--upstream",
            sandbox_process,
            "--allow-insecure",
            "--listen",
            str(port),
            "--admin",
            str(admin),
            # One user request a minute: the second waits in the queue for the next window.
            "--set",
            "limits.user_per_minute=1",
            "--set",
            "limits.state_file=",
            "--set",
            "shutdown_timeout=60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_with(LUXSCI_PROXY_AUTH_TOKEN=TOKEN, LUXSCI_PROXY_AUTH_SECRET=SECRET),
    )
    try:
        wait_until(lambda: _status(f"http://127.0.0.1:{admin}/readyz") == 200)
        assert curl(f"http://127.0.0.1:{port}{PROFILE}")[0] == 200
        held = subprocess.Popen(
            ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", f"http://127.0.0.1:{port}{PROFILE}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        metrics = f"http://127.0.0.1:{admin}/metrics"
        wait_until(
            lambda: (
                'luxsci_proxy_queue_depth{integration="default",scope="user"} 1.0'
                in curl(metrics)[1]
            )
        )
        proc.send_signal(signal.SIGTERM)  # drains: up to 60 s for the queued request
        wait_until(lambda: _status(f"http://127.0.0.1:{admin}/readyz") == 503)
        time.sleep(0.3)
        assert proc.poll() is None  # still draining
        second = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
        took = time.monotonic() - second
        answer, _ = held.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert took < 2, took
    assert proc.returncode == 0, stderr[-2000:]
    body, _, status = answer.rpartition("\n")
    assert status == "503" and "shut down" in json.loads(body)["error_message"]
    events = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    (hurried,) = [e for e in events if e["event"] == "shutdown_hurried"]
    assert (hurried["count"], hurried["queued"], hurried["inflight"]) == (1, 1, 0)
    assert hurried["level"] == "warning"
    (cut,) = [e for e in events if e["event"] == "shutdown_cut_off_requests"]
    assert cut["count"] == 1 and cut["hurried"] is True
    assert events[-1]["event"] == "shutdown_complete"
