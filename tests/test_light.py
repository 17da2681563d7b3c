"""A light sidecar (issue 16): a process loads what its config needs, and an idle one sleeps.

Nothing here is timed. What is checked is which modules a `run` loads for a config (in a
fresh interpreter, so nothing this test session imported counts), and that an idle proxy
has no timer left to wake it. bench/sidecar.py measures the figures these guard: idle RSS,
the time from exec to listening, wake-ups per second.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EchoUpstream, MakeProxy, eventually, raw_exchange, repo_root

from proxy.config import Secret
from proxy.http import client as upstream_module

# Heavy, and needed only by some configs: redis (limits.backend: redis), cryptography
# (encrypted OAuth state, and the sandbox's), the sandbox (its verbs), OAuth 2.0.
OPTIONAL = (
    "redis",
    "cryptography",
    "proxy.sandbox",
    "proxy.schemes.oauth2",
    "proxy.schemes.oauth2_state",
    "proxy.limits.redis_backend",
)

# The CLI's own path for `run`: parse, load, build the service; `start` also binds (ports 0)
# and stops, for a scheme that makes no call at start (bearer).
_RUN = """
import asyncio, json, sys
from proxy import cli
args = cli.build_parser().parse_args(["run", "--config", sys.argv[1]])
cfg = cli._resolve(args)[1].config
from proxy.service import ProxyService

async def main() -> None:
    service = ProxyService(cfg)
    if sys.argv[2] == "start":
        await service.start()
        await service.stop()

asyncio.run(main())
print(json.dumps(sorted(sys.modules)))
"""

_BASE = """listen: {port: 0}
admin: {port: 0}
upstream: {url: "http://127.0.0.1:9", allow_insecure: true}
"""
_LIMITS = 'limits: {state_file: ""}\n'
_KEY = "k" * 43 + "="  # 32 bytes, base64


def _modules(tmp_path: Path, config: str, how: str) -> set[str]:
    path = tmp_path / "proxy.yaml"
    path.write_text(_BASE + config)
    path.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUXSCI_")}
    env["LUXSCI_PROXY_STATE_DIR"] = str(tmp_path / "state")
    done = subprocess.run(
        [sys.executable, "-c", _RUN, str(path), how],
        capture_output=True,
        text=True,
        cwd=repo_root(),
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout.splitlines()[-1]))


def _loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return [n for n in names if any(m == n or m.startswith(n + ".") for m in modules)]


def test_a_bearer_proxy_with_the_memory_backend_runs_without_the_optional_modules(
    tmp_path: Path,
) -> None:
    modules = _modules(tmp_path, 'auth: {scheme: bearer, api_key: "k"}\n' + _LIMITS, "start")
    assert _loaded(modules, OPTIONAL) == []
    assert _loaded(modules, ("proxy.schemes.luxsci.session",)) == []
    assert "proxy.schemes.bearer" in modules  # what it does need is there
    # The admin port's status page: loaded when first asked for.
    assert _loaded(modules, ("proxy.observe.status",)) == []
    # The config's spelling suggestions: loaded only for a mistake.
    assert _loaded(modules, ("difflib",)) == []


@pytest.mark.parametrize(
    ("config", "present", "absent"),
    [
        pytest.param(
            "auth: {scheme: luxsci, token: t, secret: s}\n",
            ("proxy.schemes.luxsci.session",),
            OPTIONAL,
            id="luxsci-memory-state-file",
        ),
        pytest.param(
            "auth: {scheme: oauth2, token_url: 'http://127.0.0.1:9/t', client_id: c, "
            "client_secret: s}\n" + _LIMITS,
            ("proxy.schemes.oauth2",),
            ("redis", "cryptography", "proxy.sandbox"),
            id="oauth2-client-credentials",
        ),
        # The other side of the two checks above: what a config does need is still loaded.
        pytest.param(
            "auth: {scheme: oauth2, token_url: 'http://127.0.0.1:9/t', client_id: c, "
            f"client_secret: s, grant: refresh_token, refresh_token: r, state_key: '{_KEY}'}}\n"
            + _LIMITS,
            ("cryptography",),
            ("redis", "proxy.sandbox"),
            id="oauth2-refresh-token-encrypted-state",
        ),
        pytest.param(
            "auth: {scheme: bearer, api_key: k}\n"
            "limits: {backend: redis, redis_url: 'redis://127.0.0.1:9/0'}\n",
            ("redis", "proxy.limits.redis_backend"),
            # Not cryptography: redis-py imports it itself.
            ("proxy.sandbox", "proxy.schemes.oauth2"),
            id="redis-backend",
        ),
    ],
)
def test_a_config_loads_what_it_needs_and_no_more(
    tmp_path: Path, config: str, present: tuple[str, ...], absent: tuple[str, ...]
) -> None:
    modules = _modules(tmp_path, config, "build")
    assert _loaded(modules, present) == list(present)
    assert _loaded(modules, absent) == []


def _live_timers(loop: asyncio.AbstractEventLoop) -> list[asyncio.TimerHandle]:
    # asyncio's loop keeps its pending timers in `_scheduled` (cancelled ones until they
    # come due): the only place to see every call_later and every sleeping task at once.
    scheduled: list[asyncio.TimerHandle] = getattr(loop, "_scheduled")  # noqa: B009
    return [h for h in scheduled if not h.cancelled()]


async def test_an_idle_proxy_has_no_timer_left_to_wake_it(
    echo_upstream: EchoUpstream,
    make_proxy: MakeProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The upstream pool closes an idle connection soon, so the test need not wait 15 s.
    monkeypatch.setattr(upstream_module, "IDLE_TIMEOUT", 0.2)
    running = await make_proxy(
        echo_upstream.url,
        auth={"scheme": "bearer", "api_key": Secret("k"), "token": None, "secret": None},
        # With a state file, as by default: the day's count is written after a request.
        limits={"state_file": str(tmp_path / "limits.json")},
    )
    request = b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert b" 200 " in (await raw_exchange(running.service.port, request))[:20]
    # Busy for a moment (the log's flush, the count's write, the pool's sweep), then no
    # timer at all: before, a 1-s state flusher and a 5-s pool sweeper ticked for ever.
    loop = asyncio.get_running_loop()
    await eventually(lambda: (tmp_path / "limits.json").exists(), within=10)
    await eventually(lambda: running.service.upstream.open_connections == 0, within=10)
    await eventually(lambda: not _live_timers(loop), within=10)
