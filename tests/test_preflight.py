"""What run and check both say before serving: the same warnings, and the state folders."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import aiohttp
import pytest
from conftest import MakeProxy, proxy_config
from structlog.testing import capture_logs

from proxy import preflight
from proxy.config import Secret, load
from proxy.sandbox import SandboxServer
from proxy.service import ProxyService, StateCheck

STATE_KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="


def blocked_folder(tmp_path: Path) -> Path:
    """A folder that cannot be made: a file stands where its parent should be."""
    (tmp_path / "a-file").write_text("")
    return tmp_path / "a-file" / "state"


async def test_run_logs_at_start_every_warning_check_prints_and_no_other(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("auth: {token: t, secret: written-in-the-file}\n")
    path.chmod(0o644)
    literal = load(path, {}).warnings
    assert len(literal) == 2  # the literal secret, and the file others can read
    cfg = dataclasses.replace(
        proxy_config(
            sandbox.url,  # plain http
            listen={"host": "0.0.0.0"},  # open to the network, no allow-list, no token
            logging={"level": "debug", "log_bodies": True},
            limits={"state_file": str(blocked_folder(tmp_path) / "limits.json")},
        ),
        warnings=literal,
    )
    expected = preflight.findings(cfg)
    assert [f.event for f in expected] == [
        "config_warning",
        "config_warning",
        "proxy_open_to_the_network",
        "upstream_not_encrypted",
        "log_bodies_enabled",
        "state_dir_not_writable",
    ]
    service = ProxyService(cfg)
    with capture_logs() as logs:
        await service.start()
    await service.stop()
    warned = [e for e in logs if e["log_level"] == "warning" and e["event"] != "auth_failed"]
    started = next(i for i, e in enumerate(logs) if e["event"] == "proxy_started")
    assert all(logs.index(e) < started for e in warned)
    assert [{k: v for k, v in e.items() if k not in ("log_level",)} for e in warned] == [
        {"event": f.event, **f.fields} for f in expected
    ]
    # The messages check prints name the key and never a secret.
    for finding in expected:
        assert "written-in-the-file" not in finding.message
    assert expected[2].message.startswith("listen.host: 0.0.0.0 is open to the network")
    assert expected[5].message.startswith("limits.state_file: cannot keep state in")


def test_a_quiet_config_has_no_findings(tmp_path: Path) -> None:
    cfg = proxy_config("https://rest.luxsci.com", limits={"state_file": str(tmp_path / "x")})
    assert preflight.findings(cfg) == []


def test_state_problems_are_judged_without_writing_anything(tmp_path: Path) -> None:
    assert preflight.state_problem(tmp_path) is None
    # Not there yet, but it can be made: fine (and check does not make it).
    assert preflight.state_problem(tmp_path / "new" / "deeper") is None
    assert not (tmp_path / "new").exists()
    problem = preflight.state_problem(blocked_folder(tmp_path))
    assert problem == f"{tmp_path / 'a-file'} is not a directory"


def test_which_keys_keep_state_where(tmp_path: Path) -> None:
    env = {"LUXSCI_PROXY_STATE_DIR": str(tmp_path / "state")}
    url = "https://rest.luxsci.com"

    def uses(**sections: object) -> list[tuple[str, str, bool]]:
        cfg = proxy_config(url, **sections)  # type: ignore[arg-type]
        return [(u.key, str(u.folder), u.required) for u in preflight.state_uses(cfg, env=env)]

    # The default day-count file: a convenience, it does not gate readiness.
    assert uses(limits={"state_file": None}) == [
        ("limits.state_file", str(tmp_path / "state"), False)
    ]
    # One the operator named: they asked for it.
    named = tmp_path / "elsewhere" / "limits.json"
    assert uses(limits={"state_file": str(named)}) == [
        ("limits.state_file", str(named.parent), True)
    ]
    assert uses(limits={"state_file": ""}) == []
    assert uses(limits={"state_file": None, "backend": "redis"}) == []
    oauth = {
        "scheme": "oauth2",
        "token_url": "https://auth.example.com/token",
        "client_id": "app",
        "client_secret": Secret("cs-123456"),
    }
    assert uses(auth=oauth) == []  # client credentials keep nothing
    refresh = {
        **oauth,
        "grant": "refresh_token",
        "refresh_token": Secret("rt-123456"),
        "state_key": Secret(STATE_KEY),
        "state_file": str(tmp_path / "oauth" / "x.state"),
    }
    # A rotated refresh token is a credential: losing it on restart loses the integration.
    assert uses(auth=refresh) == [("auth.state_file", str(tmp_path / "oauth"), True)]


async def test_readyz_shows_the_state_folder_and_fails_only_for_state_asked_for(
    sandbox: SandboxServer,
    make_proxy: MakeProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blocked = blocked_folder(tmp_path)
    monkeypatch.setenv("LUXSCI_PROXY_STATE_DIR", str(blocked))
    # The default place: reported, not ready-gating (the proxy serves either way).
    with capture_logs() as logs:
        proxy = await make_proxy(sandbox.url, limits={"state_file": None})
    async with http.get(proxy.admin_url + "/readyz") as resp:
        body = await resp.json()
        assert resp.status == 200
    state = body["checks"]["state"]
    assert state["ok"] is False and state["required"] is False
    assert state["dirs"] == [str(blocked)]
    assert "is not a directory" in state["error"]
    said = [e for e in logs if e["event"] == "state_dir_not_writable"]
    assert len(said) == 1 and said[0]["required"] is False

    # A file the operator named in a folder that cannot be written: not ready.
    proxy = await make_proxy(sandbox.url, limits={"state_file": str(blocked / "limits.json")})
    async with http.get(proxy.admin_url + "/readyz") as resp:
        body = await resp.json()
        assert resp.status == 503
    assert body["checks"]["state"]["required"] is True
    assert body["checks"]["auth"]["ok"] is True  # only the state holds it back

    # Fixed: seen at the next look, said once.
    monkeypatch.setattr(StateCheck, "RECHECK", 0.0)
    (tmp_path / "a-file").unlink()
    blocked.mkdir(parents=True)
    with capture_logs() as logs:
        for _ in range(3):
            async with http.get(proxy.admin_url + "/readyz") as resp:
                body = await resp.json()
                assert resp.status == 200
    assert body["checks"]["state"] == {"ok": True, "dirs": [str(blocked)]}
    assert [e["event"] for e in logs if e["event"].startswith("state_dir")] == [
        "state_dir_writable"
    ]


async def test_readyz_has_no_state_entry_when_nothing_is_kept(
    sandbox: SandboxServer, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(sandbox.url)  # the tests' default: limits.state_file ""
    assert "state" not in proxy.service.readiness()[1]
