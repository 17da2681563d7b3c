"""deploy/compose/: the Compose file against the compose-spec schema, and its proxy config."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from deploy_support import DEPLOY, check_with_proxy, run

COMPOSE = DEPLOY / "compose"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    return loaded


def check_schema(path: Path) -> tuple[int, str]:
    # The schema ships inside check-jsonschema (vendored): nothing is fetched.
    result = run(
        sys.executable,
        "-m",
        "check_jsonschema",
        "--builtin-schema",
        "vendor.compose-spec",
        str(path),
    )
    return result.returncode, result.stdout + result.stderr


def test_the_compose_file_matches_the_compose_spec() -> None:
    code, output = check_schema(COMPOSE / "compose.yaml")
    assert code == 0, output


def test_the_schema_check_catches_a_mistake(tmp_path: Path) -> None:
    broken = compose()
    broken["services"]["luxsci-proxy"]["stop_grace_periode"] = "45s"
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    code, output = check_schema(path)
    assert code != 0 and "stop_grace_periode" in output


def test_the_proxy_port_is_never_published() -> None:
    proxy = compose()["services"]["luxsci-proxy"]
    assert "ports" not in proxy
    assert proxy["read_only"] is True and proxy["cap_drop"] == ["ALL"]


def test_the_stop_grace_period_covers_the_drain() -> None:
    config = yaml.safe_load((COMPOSE / "luxsci-proxy.yaml").read_text())
    grace = compose()["services"]["luxsci-proxy"]["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) >= config["shutdown_timeout"] + 15


def test_the_mounted_config_passes_luxsci_proxy_check(tmp_path: Path) -> None:
    mounts = compose()["services"]["luxsci-proxy"]["volumes"]
    source = next(m.split(":")[0] for m in mounts if "/etc/luxsci-proxy/config.yaml" in m)
    assert (COMPOSE / source).is_file()
    config = tmp_path / "config.yaml"
    config.write_text((COMPOSE / source).read_text())
    config.chmod(0o600)
    env = {"LUXSCI_API_TOKEN": "t", "LUXSCI_API_SECRET": "s"}
    assert set(env) <= set((COMPOSE / "luxsci.env.example").read_text().replace("=", "\n").split())
    result = check_with_proxy(config, env)
    assert result.returncode == 0, result.stderr
    # Listening on the project network without an allow-list would draw a loud warning.
    assert "open_to_the_network" not in result.stderr
    assert yaml.safe_load(result.stdout)["access"]["allow_clients"]
