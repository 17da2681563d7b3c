"""End to end: the real `luxsci-proxy` processes, driven with curl."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import USER, repo_root

SECRET = "e2e-secret-Zq8w3VvX"
TOKEN = "e2e-token-77"
PROXY = [sys.executable, "-m", "proxy"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def curl(*args: str) -> tuple[int, str]:
    """Run curl; returns (HTTP status, body)."""
    out = subprocess.run(
        ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    body, _, status = out.rpartition("\n")
    return int(status), body


def wait_until(check: callable, timeout: float = 15.0) -> None:  # type: ignore[valid-type]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def env_with(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUXSCI_")}
    return {**env, **extra}


@pytest.fixture
def sandbox_process() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            *PROXY,
            "sandbox",
            "--port",
            str(port),
            "--token",
            TOKEN,
            "--secret",
            SECRET,
            "--user",
            f"{USER}:joe-pass",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_with(),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "sandbox listening on" in line, line + (proc.stderr.read() if proc.stderr else "")
    assert SECRET not in line
    yield f"http://127.0.0.1:{port}"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=10)


def write_config(tmp_path: Path, upstream: str, extra: str = "") -> tuple[Path, int, int]:
    port, admin = free_port(), free_port()
    text = f"""
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin}}}
upstream: {{url: "{upstream}", allow_insecure: true}}
auth:
  scheme: luxsci
  token: ${{LUXSCI_API_TOKEN}}
  secret: ${{LUXSCI_API_SECRET}}
logging: {{level: debug, format: json}}
shutdown_timeout: 5
limits: {{state_file: ""}}
"""
    path = tmp_path / "proxy.yaml"
    path.write_text(text + extra)
    return path, port, admin


def start_proxy(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*PROXY, "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_with(LUXSCI_API_TOKEN=TOKEN, LUXSCI_API_SECRET=SECRET),
    )


def stop_proxy(proc: subprocess.Popen[str]) -> list[dict]:
    """SIGTERM, expect exit 0; returns the JSON log events it wrote."""
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr[-2000:]
    return [json.loads(line) for line in stderr.splitlines() if line.strip()]


def test_run_serves_curl_end_to_end_and_shuts_down_cleanly_without_leaking_secrets(
    sandbox_process: str, tmp_path: Path
) -> None:
    config, port, admin = write_config(tmp_path, sandbox_process)
    proc = subprocess.Popen(
        [*PROXY, "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_with(LUXSCI_API_TOKEN=TOKEN, LUXSCI_API_SECRET=SECRET),
    )
    try:
        wait_until(lambda: _status(f"http://127.0.0.1:{admin}/readyz") == 200)
        base = f"http://127.0.0.1:{port}"

        status, body = curl(f"{base}/perl/api/v2/user/{USER}/profile")
        assert status == 200 and json.loads(body)["data"]["login"] == USER

        status, body = curl("-d", '{"hello": "world"}', f"{base}/perl/api/v2/account/9/echo")
        assert status == 200 and json.loads(body)["data"]["json"] == {"hello": "world"}

        attachment = tmp_path / "note.txt"
        attachment.write_bytes(b"file content\r\n--not-a-boundary\r\n")
        status, body = curl(
            "-F",
            'json={"subject":"hi"};filename=json.js;type=application/json',
            "-F",
            f"files=@{attachment}",
            f"{base}/perl/api/v2/user/{USER}/email/compose/secureline/send",
        )
        assert status == 200, body
        assert json.loads(body)["data"]["attachments"][0]["name"] == "note.txt"

        status, body = curl("-H", "X-Request-ID: e2e-1", f"{base}/nowhere")
        assert status == 404  # the API's own answer, passed through
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr[-2000:]

    stats = json.loads(curl(f"{sandbox_process}/_sandbox/stats")[1])
    assert stats["revocations"] == 1  # the session was revoked on SIGTERM

    events = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    # One access event per request, ours: no aiohttp access line with the raw path and query.
    assert not [e for e in events if e.get("logger") == "aiohttp.access"]
    names = [e["event"] for e in events]
    assert "proxy_started" in names and "shutdown_complete" in names
    access = [e for e in events if e["event"] == "request"]
    assert len(access) == 4
    assert {e["status"] for e in access} == {200, 404}

    # The real log output of a full debug-level run holds no secret and no auth code.
    output = stdout + stderr
    assert SECRET not in output
    assert TOKEN not in output
    assert stats["issued_codes"], "the sandbox issued codes"
    for code in stats["issued_codes"]:
        assert code not in output
        assert code.rsplit("-", 1)[1] not in output


def _status(url: str) -> int:
    try:
        return curl(url)[0]
    except subprocess.CalledProcessError:
        return 0


def test_check_accepts_a_good_config_and_masks_secrets(tmp_path: Path) -> None:
    config, _, _ = write_config(tmp_path, "https://rest.luxsci.com")
    result = subprocess.run(
        [*PROXY, "check", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env_with(LUXSCI_API_TOKEN=TOKEN, LUXSCI_API_SECRET=SECRET),
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert SECRET not in result.stdout + result.stderr
    assert "secret: '********'" in result.stdout


def test_check_config_from_environment_variable(tmp_path: Path) -> None:
    config, _, _ = write_config(tmp_path, "https://rest.luxsci.com")
    result = subprocess.run(
        [*PROXY, "check"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env_with(LUXSCI_PROXY_CONFIG=str(config), LUXSCI_API_TOKEN="t", LUXSCI_API_SECRET="s"),
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("edit", "env", "expected"),
    [
        (
            ("port: ", "prot: "),
            {"LUXSCI_API_TOKEN": "t", "LUXSCI_API_SECRET": "s"},
            r"listen\.prot: unknown key",
        ),
        (
            ("", ""),
            {"LUXSCI_API_TOKEN": "t"},
            r"auth\.secret: environment variable LUXSCI_API_SECRET",
        ),
    ],
)
def test_check_rejects_a_bad_config_with_one_line_naming_the_key(
    tmp_path: Path, edit: tuple[str, str], env: dict[str, str], expected: str
) -> None:
    config, _, _ = write_config(tmp_path, "https://rest.luxsci.com")
    config.write_text(config.read_text().replace(*edit, 1) if edit[0] else config.read_text())
    result = subprocess.run(
        [*PROXY, "check", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env_with(**env),
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(expected, lines[0]), result.stderr


def test_run_with_a_port_in_use_fails_with_a_clear_message(
    sandbox_process: str, tmp_path: Path
) -> None:
    config, port, _ = write_config(tmp_path, sandbox_process)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        result = subprocess.run(
            [*PROXY, "run", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            env=env_with(LUXSCI_API_TOKEN=TOKEN, LUXSCI_API_SECRET=SECRET),
        )
    assert result.returncode == 1
    assert "cannot start listeners" in result.stderr


def test_demo_prints_curl_lines_that_work() -> None:
    proc = subprocess.Popen(
        [*PROXY, "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_with(),
        cwd=repo_root(),
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C" in line:
                break
        commands = [line.strip() for line in lines if line.strip().startswith("curl ")]
        assert len(commands) >= 3
        answers = []
        for command in commands[:2]:
            out = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=30)
            answers.append(json.loads(out.stdout))
            assert answers[-1]["success"] == 1, out.stdout
        # A LuxSci integration and an OAuth 2.0 one, side by side.
        assert answers[0]["data"]["scope"] == "user"
        assert answers[1]["data"]["path"] == "/v1/contacts"
        assert any("readyz?integration=crm" in command for command in commands)
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr[-2000:]


def test_version_and_help() -> None:
    result = subprocess.run([*PROXY, "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.startswith("luxsci-proxy ")
    result = subprocess.run([*PROXY, "--help"], capture_output=True, text=True, timeout=30)
    for verb in ("run", "check", "sandbox", "demo"):
        assert verb in result.stdout


def test_sighup_reloads_the_config_and_keeps_the_old_one_when_the_new_is_bad(
    sandbox_process: str, tmp_path: Path
) -> None:
    config, port, admin = write_config(tmp_path, sandbox_process)
    original = config.read_text()
    proc = start_proxy(config)
    account = f"http://127.0.0.1:{port}/perl/api/v2/account/9/things"
    try:
        wait_until(lambda: _status(f"http://127.0.0.1:{admin}/readyz") == 200)
        assert curl(account)[0] == 200  # day so far: the login and this request

        config.write_text(
            original.replace('limits: {state_file: ""}', 'limits: {state_file: "", per_day: 2}')
        )
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: curl(account)[0] == 503)  # the new day budget is spent
        status, body = curl(account)
        assert json.loads(body)["error_message"].startswith("the day's budget of 2")

        # A typo: refused. (In the one limits section: a second would be a duplicate key.)
        config.write_text(
            original.replace('limits: {state_file: ""}', 'limits: {state_file: "", per_dya: 5}')
        )
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        status, body = curl(account)  # still serving, on the last good config
        assert status == 503 and "budget of 2" in json.loads(body)["error_message"]
    finally:
        events = stop_proxy(proc)
    reloaded = [e for e in events if e["event"] == "config_reloaded"]
    rejected = [e for e in events if e["event"] == "config_reload_rejected"]
    assert len(reloaded) == 1 and reloaded[0]["needs_restart"] == []
    assert len(rejected) == 1 and "per_dya" in rejected[0]["error"]
    assert rejected[0]["level"] == "error"


def test_log_bodies_is_opt_in_warned_about_and_still_hides_codes(
    sandbox_process: str, tmp_path: Path
) -> None:
    config, port, admin = write_config(tmp_path, sandbox_process)
    config.write_text(
        config.read_text().replace("format: json}", "format: json, log_bodies: true}")
    )
    proc = start_proxy(config)
    try:
        wait_until(lambda: _status(f"http://127.0.0.1:{admin}/readyz") == 200)
        status, _ = curl(
            "-d", '{"hello": "world"}', f"http://127.0.0.1:{port}/perl/api/v2/account/9/echo"
        )
        assert status == 200
    finally:
        events = stop_proxy(proc)
    assert any(e["event"] == "log_bodies_enabled" and e["level"] == "warning" for e in events)
    (access,) = [e for e in events if e["event"] == "request"]
    assert '"hello": "world"' in access["request_body"]
    assert '"auth":"[REDACTED]"' in access["response_body"]
    codes = json.loads(curl(f"{sandbox_process}/_sandbox/stats")[1])["issued_codes"]
    text = json.dumps(events)
    assert codes and not any(code in text for code in codes)
    assert SECRET not in text


def test_sigterm_during_a_slow_first_login_still_exits_cleanly(
    sandbox_process: str, tmp_path: Path
) -> None:
    # The API takes 20 s to answer the login: the proxy is still starting.
    fault = '{"delay": 20, "path_prefix": "/perl/api/v2/auth"}'
    assert curl("-X", "POST", "-d", fault, f"{sandbox_process}/_sandbox/faults")[0] == 200
    config, _, admin = write_config(tmp_path, sandbox_process)
    proc = start_proxy(config)
    wait_until(lambda: _status(f"http://127.0.0.1:{admin}/healthz") == 200)
    assert _status(f"http://127.0.0.1:{admin}/readyz") == 503  # not logged in yet
    started = time.monotonic()
    events = stop_proxy(proc)  # SIGTERM; asserts exit code 0
    assert time.monotonic() - started < 10
    assert "shutdown_complete" in [e["event"] for e in events]


# -- check prints every config run accepts; output to a reader that goes away ----------

REDIS_PASSWORD = "r3dis-Pw-9Kq"
USER_PASSWORD = "user-Pw-4Hx7"
API_KEY = "api-key-Lm2Tq8Zr"
CLIENT_TOKEN = "client-token-Vb6Yn3Wd0"
PORTAL_TOKEN = "portal-token-Qe5Rt1Xs"
JOBS_KEYS = (
    "q0h2Lq2bS0mQ0t3Y1p4tC9m8qk2wYV1g0Xk0lU5b7fE=",
    "3v1Qy8H2mZ0rN6dW9cB4kT7sL5aP1xE3gJ0uR2oI8yM=",
)
CALLBACK_SECRET = "callback-secret-Hq3Zr8Lm"
OAUTH_CLIENT_SECRET = "oauth-client-secret-Qw7Er"
OAUTH_REFRESH_TOKEN = "oauth-refresh-token-Ty8Ui"
STATE_KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
PROXY_PASSWORD = "egress-proxy-Pw-5Gh2"
ALL_SECRETS = (
    SECRET,
    TOKEN,
    REDIS_PASSWORD,
    USER_PASSWORD,
    API_KEY,
    CLIENT_TOKEN,
    *JOBS_KEYS,
    CALLBACK_SECRET,
    OAUTH_CLIENT_SECRET,
    OAUTH_REFRESH_TOKEN,
    STATE_KEY,
    PROXY_PASSWORD,
    PORTAL_TOKEN,
)
FULL_CONFIG_ENV = {
    "TEST_API_KEY": API_KEY,
    "TEST_CLIENT_TOKEN": CLIENT_TOKEN,
    "TEST_CLIENT_SECRET": OAUTH_CLIENT_SECRET,
    "TEST_STATE_KEY": STATE_KEY,
}


def write_full_config(tmp_path: Path) -> Path:
    """A config that sets every key of every section (secrets from the environment and a
    file, as they should come; a URL password and a query password in the Redis URL)."""
    password_file = tmp_path / "password"
    password_file.write_text(USER_PASSWORD + "\n")
    keys_file = tmp_path / "jobs-keys"
    keys_file.write_text("\n".join(JOBS_KEYS) + "\n")
    callback_file = tmp_path / "callback-secret"
    callback_file.write_text(CALLBACK_SECRET + "\n")
    refresh_file = tmp_path / "refresh-token"
    refresh_file.write_text(OAUTH_REFRESH_TOKEN + "\n")
    portal_file = tmp_path / "portal-token"
    portal_file.write_text(PORTAL_TOKEN + "\n")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("-----BEGIN CERTIFICATE-----\n")  # check reads no further than its name
    proxy_password_file = tmp_path / "proxy-password"
    proxy_password_file.write_text(PROXY_PASSWORD + "\n")
    path = tmp_path / "full.yaml"
    path.write_text(
        f"""
listen:
  host: 127.0.0.1
  port: 18080
  max_body_bytes: 1048576
  spool_threshold: 65536
  spool_dir: {tmp_path / "spool"}
  max_buffered_bytes: 8388608
  max_header_bytes: 4096
  max_connections: 50
  client_timeout: 12.5
  encoded_slashes: reject
admin: {{host: 127.0.0.1, port: 19100, ready_requires_redis: false}}
upstream:
  url: https://rest.example.com:8443
  ca_file: {ca_file}
  allow_insecure: false
  connect_timeout: 3
  read_timeout: 40
  pool_size: 10
  max_header_bytes: 32768
  proxy: http://proxy.internal:3128
  proxy_user: svc-egress
  proxy_password_file: {proxy_password_file}
  no_proxy: .internal, 10.0.0.0/8
auth:
  scheme: luxsci
  token: ${{LUXSCI_API_TOKEN}}
  secret: ${{LUXSCI_API_SECRET}}
  user: {USER}
  password_file: {password_file}
  api_key: ${{TEST_API_KEY}}
  auth_cookie: true
  code_lifetime: 600
  refresh_margin: 30
  retry_min: 2
  retry_max: 20
  token_url: https://auth.example.com/oauth/token
  client_id: luxsci-proxy
  client_secret: ${{TEST_CLIENT_SECRET}}
  scope: read write
  audience: https://api.example.com/
  grant: refresh_token
  refresh_token_file: {refresh_file}
  client_auth: client_secret_post
  state_key: ${{TEST_STATE_KEY}}
  state_file: {tmp_path}/oauth2.state
  state_store: redis+sentinel://:{REDIS_PASSWORD}@s1,s2/tokens?sentinel_password={REDIS_PASSWORD}
access:
  allow_clients: [127.0.0.1/32, 10.1.2.0/24]
  client_token: ${{TEST_CLIENT_TOKEN}}
  clients:
    - {{name: portal, token_file: {portal_file}, max_priority: high, max_queued: 10}}
  rules:
    - {{methods: [GET, POST], path: /perl/api/v2/user/*/profile}}
    - {{methods: ["*"], path: /perl/api/v2/account/**}}
  protected_users: [ceo@example.com]
limits:
  account_per_minute: 30
  user_per_minute: 40
  per_day: 5000
  backend: redis
  redis_url: redis://app:{REDIS_PASSWORD}@redis.internal:6379/0?password={REDIS_PASSWORD}
  fallback_share: 0.5
  state_file: ""
  max_inflight: 8
  window_seconds: 60
  day_seconds: 86400
  key: shared-limits
  windows:
    - {{requests: 10, per: 1s}}
    - {{requests: 1000, per: 1h, scope: user}}
queue: {{max_size: 100, max_wait: 10, aging: 5}}
retry: {{max_attempts: 3, max_time: 20, backoff_base: 0.5, backoff_max: 4}}
logging: {{level: debug, format: console, log_bodies: true, redact_paths: true}}
jobs:
  enabled: true
  store: redis://app:{REDIS_PASSWORD}@redis.internal:6379/1
  visibility_timeout: 30
  redis_min_replicas: 1
  redis_replica_timeout: 0.5
  path_prefix: /_jobs
  encrypt: true
  keys_file: {keys_file}
  max_age: 3600
  keep_results: 600
  max_jobs: 500
  concurrency: 2
  max_response_bytes: 1048576
  callback_allow: [https://app.internal/hooks/]
  callback_secret_file: {callback_file}
  callback_timeout: 5
  callback_max_attempts: 3
shutdown_timeout: 15
event_loop: asyncio
"""
    )
    path.chmod(0o600)
    return path


def _config_keys() -> dict[str, set[str]]:
    """Every key of the config file format, per section ("" for the top level)."""
    import dataclasses

    from proxy.config import Config, key_fields

    keys: dict[str, set[str]] = {"": set()}
    for f in key_fields(Config):  # warnings & co. are not keys of the file
        if f.name == "integrations":
            # The file's other form (the sections per integration): its own tests check
            # `check` on it (tests/test_integrations_cli.py).
            continue
        keys[""].add(f.name)
        section = getattr(Config(), f.name)
        if dataclasses.is_dataclass(section):
            keys[f.name] = {g.name for g in dataclasses.fields(section)}
    return keys


def test_check_prints_a_config_with_every_key_set_as_yaml_without_any_secret(
    tmp_path: Path,
) -> None:
    import yaml

    config = write_full_config(tmp_path)
    written = yaml.safe_load(config.read_text())
    # The file above must keep up with the config format: every key of every section set.
    expected = _config_keys()
    assert set(written) == expected[""]
    for section, names in expected.items():
        if section:
            given = {k if k in names else k.removesuffix("_file") for k in written[section]}
            assert given == names, f"{section}: not set in the test config: {names - given}"

    result = subprocess.run(
        [*PROXY, "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env_with(
            LUXSCI_API_TOKEN=TOKEN,
            LUXSCI_API_SECRET=SECRET,
            **FULL_CONFIG_ENV,
        ),
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    output = result.stdout + result.stderr
    for secret in ALL_SECRETS:
        assert secret not in output
    printed = yaml.safe_load(result.stdout)  # the whole of stdout is YAML
    assert set(printed) == expected[""]
    for section, names in expected.items():
        if section:
            assert set(printed[section]) == names, section
    for key in (
        "token",
        "secret",
        "password",
        "api_key",
        "client_secret",
        "refresh_token",
        "state_key",
    ):
        assert printed["auth"][key] == "********"
    assert printed["auth"]["client_id"] == "luxsci-proxy"
    assert printed["auth"]["grant"] == "refresh_token"
    assert printed["auth"]["user"] == USER
    assert printed["auth"]["auth_cookie"] is True
    assert printed["limits"]["windows"] == [
        {"requests": 10, "per": 1.0, "scope": "all"},
        {"requests": 1000, "per": 3600.0, "scope": "user"},
    ]
    assert printed["access"]["client_token"] == "********"
    assert printed["access"]["clients"] == [
        {"name": "portal", "token": "********", "max_priority": "high", "max_queued": 10}
    ]
    assert printed["access"]["rules"] == [
        {"methods": ["GET", "POST"], "path": "/perl/api/v2/user/*/profile"},
        {"methods": ["*"], "path": "/perl/api/v2/account/**"},
    ]
    assert printed["access"]["allow_clients"] == ["127.0.0.1/32", "10.1.2.0/24"]
    assert printed["access"]["protected_users"] == ["ceo@example.com"]
    assert printed["limits"]["redis_url"] == (
        "redis://app:********@redis.internal:6379/0?password=********"
    )
    assert printed["limits"]["backend"] == "redis"
    assert printed["auth"]["state_store"] == (
        "redis+sentinel://:********@s1,s2/tokens?sentinel_password=********"
    )
    assert printed["listen"]["client_timeout"] == 12.5
    assert printed["shutdown_timeout"] == 15
    assert printed["event_loop"] == "asyncio"
    assert printed["upstream"]["ca_file"] == str(tmp_path / "ca.pem")
    assert printed["jobs"]["keys"] == ["********", "********"]
    assert printed["jobs"]["callback_secret"] == "********"
    assert printed["jobs"]["callback_allow"] == ["https://app.internal/hooks/"]
    assert printed["upstream"]["proxy"] == "http://proxy.internal:3128"
    assert printed["upstream"]["proxy_user"] == "svc-egress"
    assert printed["upstream"]["proxy_password"] == "********"
    assert printed["upstream"]["no_proxy"] == ".internal, 10.0.0.0/8"


def _closed_pipe() -> int:
    """The write end of a pipe whose reader is already gone: every write fails (EPIPE)."""
    read, write = os.pipe()
    os.close(read)
    return write


def _assert_quiet(stderr: str) -> None:
    for sign in ("Traceback", "BrokenPipe", "Exception ignored", "Errno 32"):
        assert sign not in stderr, stderr


@pytest.mark.parametrize(
    "args",
    [["check"], ["--version"], ["--help"], ["check", "--help"]],
    ids=["check", "version", "help", "check-help"],
)
def test_output_to_a_reader_that_went_away_ends_quietly(tmp_path: Path, args: list[str]) -> None:
    config, _, _ = write_config(tmp_path, "https://rest.luxsci.com")
    config.write_text(config.read_text() + "access: {rules: [{methods: [GET], path: /**}]}\n")
    stdout = _closed_pipe()
    try:
        result = subprocess.run(
            [*PROXY, *args],
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
            env=env_with(
                LUXSCI_PROXY_CONFIG=str(config), LUXSCI_API_TOKEN=TOKEN, LUXSCI_API_SECRET=SECRET
            ),
        )
    finally:
        os.close(stdout)
    _assert_quiet(result.stderr)
    assert result.returncode == 0, result.stderr


def test_check_piped_into_head_prints_the_verdict_and_exits_0(tmp_path: Path) -> None:
    config = write_full_config(tmp_path)
    command = f"{shlex.join([*PROXY, 'check', '--config', str(config)])} | head -1"
    result = subprocess.run(
        ["bash", "-c", command + '; echo "exit=${PIPESTATUS[0]}"'],
        capture_output=True,
        text=True,
        timeout=30,
        env=env_with(
            LUXSCI_API_TOKEN=TOKEN,
            LUXSCI_API_SECRET=SECRET,
            **FULL_CONFIG_ENV,
        ),
    )
    first, exit_line = result.stdout.splitlines()
    assert first == f"# {config}: OK"
    assert exit_line == "exit=0"
    _assert_quiet(result.stderr)


@pytest.mark.parametrize("verb", ["demo", "sandbox"])
def test_servers_whose_stdout_reader_went_away_keep_serving_and_stop_cleanly(
    verb: str,
) -> None:
    port, admin = free_port(), free_port()
    args = ["demo", "--port", str(port), "--admin-port", str(admin)]
    ready = f"http://127.0.0.1:{admin}/readyz"
    if verb == "sandbox":
        args = ["sandbox", "--port", str(port)]
        ready = f"http://127.0.0.1:{port}/_sandbox/stats"
    stdout = _closed_pipe()
    try:
        proc = subprocess.Popen(
            [*PROXY, *args], stdout=stdout, stderr=subprocess.PIPE, text=True, env=env_with()
        )
    finally:
        os.close(stdout)
    try:
        wait_until(lambda: _status(ready) == 200)
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
    _assert_quiet(stderr)
    assert proc.returncode == 0, stderr[-2000:]


def test_auth_cookie_run_sends_both_cookies_and_logs_no_code(
    sandbox_process: str, tmp_path: Path
) -> None:
    config, port, admin = write_config(tmp_path, sandbox_process)
    config.write_text(
        config.read_text().replace("scheme: luxsci", "scheme: luxsci\n  auth_cookie: true")
    )
    proc = start_proxy(config)
    try:
        wait_until(lambda: _status(f"http://127.0.0.1:{admin}/readyz") == 200)
        status, _ = curl(
            "-b", "auth=client-own; theme=dark", f"http://127.0.0.1:{port}/perl/api/v2/account/9/x"
        )
        assert status == 200
    finally:
        events = stop_proxy(proc)
    stats = json.loads(curl(f"{sandbox_process}/_sandbox/stats")[1])
    sent = {(e["method"], e["target"]): e["cookies"] for e in stats["log"]}
    # The login's code signs the request; the code that answer carried signs the revoke.
    code, newer = stats["issued_codes"]
    (get,) = sent[("GET", "/perl/api/v2/account/9/x")]
    assert re.fullmatch(rf"theme=dark; auth={code}; signature={code}:[0-9a-f]{{64}}", get)
    (revoke,) = sent[("DELETE", "/perl/api/v2/auth")]
    assert re.fullmatch(rf"auth={newer}; signature={newer}:[0-9a-f]{{64}}", revoke)
    assert stats["revocations"] == 1
    text = json.dumps(events)
    assert "request" in [e["event"] for e in events]
    for issued in stats["issued_codes"]:
        assert issued not in text
    assert SECRET not in text and TOKEN not in text
