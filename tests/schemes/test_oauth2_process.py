"""OAuth 2.0 end to end with real processes: `luxsci-proxy sandbox --oauth` and `run`.

A rotated refresh token survives a restart of the proxy process (the state file), and
the real log output of full debug-level runs holds no token and no secret.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli import PROXY, curl, env_with, free_port, stop_proxy, wait_until

CLIENT_ID = "proc-client"
CLIENT_SECRET = "proc-client-secret-Xy7Wq"
STATE_KEY = "Y2hhbmdlLW1lLXRoaXMtaXMtYS10ZXN0LWtleS0zMmI="  # 32 bytes, base64


@contextlib.contextmanager
def oauth_sandbox_process(*options: str) -> Iterator[tuple[str, str]]:
    """A real `luxsci-proxy sandbox --oauth` on a free port, with this module's client:
    its URL and the line it printed when listening. Stopped (SIGTERM) on leaving."""
    port = free_port()
    proc = subprocess.Popen(
        [
            *PROXY,
            "sandbox",
            "--oauth",
            "--port",
            str(port),
            "--client-id",
            CLIENT_ID,
            "--client-secret",
            CLIENT_SECRET,
            *options,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env_with(),
    )
    try:
        assert proc.stdout is not None
        yield f"http://127.0.0.1:{port}", proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)


@pytest.fixture
def oauth_sandbox() -> Iterator[str]:
    with oauth_sandbox_process() as (url, line):
        assert "sandbox (OAuth 2.0) listening on" in line and "/oauth/token" in line, line
        assert CLIENT_SECRET not in line
        yield url


def _ready(url: str) -> bool:
    try:
        return curl(url)[0] == 200
    except subprocess.CalledProcessError:
        return False


def run_once(config: Path, admin: int, steps: list[list[str]]) -> str:
    """Start the proxy, wait until ready, run the curl `steps` (each must answer 200),
    stop it; returns everything it wrote."""
    proc = subprocess.Popen(
        [*PROXY, "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_with(OAUTH_CLIENT_SECRET=CLIENT_SECRET, LUXSCI_PROXY_STATE_KEY=STATE_KEY),
    )
    try:
        wait_until(lambda: _ready(f"http://127.0.0.1:{admin}/readyz"))
        for step in steps:
            status, body = curl(*step)
            assert status == 200, body
    except BaseException:
        proc.kill()
        raise
    events = stop_proxy(proc)
    return "\n".join(json.dumps(e) for e in events)


def test_a_rotated_refresh_token_survives_a_restart_and_no_token_is_ever_logged(
    oauth_sandbox: str, tmp_path: Path
) -> None:
    _, body = curl("-X", "POST", f"{oauth_sandbox}/_sandbox/oauth/refresh-token")
    minted = json.loads(body)["refresh_token"]
    (tmp_path / "refresh-token").write_text(minted + "\n")
    state = tmp_path / "state" / "oauth2.state"
    port, admin = free_port(), free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f"""
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin}}}
upstream: {{url: "{oauth_sandbox}", allow_insecure: true}}
auth:
  scheme: oauth2
  token_url: {oauth_sandbox}/oauth/token
  client_id: {CLIENT_ID}
  client_secret: ${{OAUTH_CLIENT_SECRET}}
  grant: refresh_token
  refresh_token_file: {tmp_path / "refresh-token"}
  state_file: {state}
logging: {{level: debug, format: json, log_bodies: true}}
limits: {{state_file: ""}}
shutdown_timeout: 5
"""
    )
    config.chmod(0o600)
    base = f"http://127.0.0.1:{port}"
    first = run_once(
        config,
        admin,
        [
            [f"{base}/v1/things"],
            ["-X", "POST", f"{oauth_sandbox}/_sandbox/oauth/expire"],
            [f"{base}/v1/things?after=expiry"],  # a 401, a refresh, a rotation
        ],
    )
    # The second process starts from the state file: the configured token is long dead
    # (presenting it again would make the server revoke the whole line).
    second = run_once(config, admin, [[f"{base}/v1/things?after=restart"]])

    stats = json.loads(curl(f"{oauth_sandbox}/_sandbox/stats")[1])["oauth"]
    assert stats["by_grant"] == {"refresh_token": 3}
    assert stats["token_failures"] == 0 and stats["families_revoked"] == 0
    assert stats["api_unauthorized"] == 1

    names = [json.loads(line)["event"] for line in (first + "\n" + second).splitlines()]
    assert names.count("oauth2_refresh_token_saved") == 3
    assert "oauth2_refresh_token_loaded" in names

    output = first + second
    raw = state.read_bytes()
    secrets = [CLIENT_SECRET, STATE_KEY, *stats["issued_refresh_tokens"]]
    secrets += stats["issued_access_tokens"]
    assert len(secrets) == 2 + 4 + 3
    for secret in secrets:
        assert secret not in output
        assert secret.encode() not in raw
