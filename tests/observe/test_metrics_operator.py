"""What operators alert on: known label sets exported at zero, the gauges the shipped alert
rules divide by, the process collectors, and an admin port that names no server software."""

from __future__ import annotations

import ast
import asyncio
import re
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import pytest
from conftest import SECRET, TOKEN, MakeProxy, RunningProxy, repo_root
from prometheus_client.parser import text_string_to_metric_families

from proxy import cli, errors
from proxy.config import Secret
from proxy.observe import metrics
from proxy.pipeline import retry
from proxy.service import ProxyService
from tests.redis_server import free_port

P = "luxsci_proxy_"


def _without_default(labels: dict[str, str]) -> frozenset:
    """A sample's labels, less `integration="default"`: every per-integration family
    carries it for the one integration of a config without `integrations:`."""
    assert labels.get("integration", "default") == "default"
    return frozenset((k, v) for k, v in labels.items() if k != "integration")


async def scrape(
    http: aiohttp.ClientSession, proxy: RunningProxy
) -> dict[tuple[str, frozenset], float]:
    async with http.get(proxy.admin_url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        (s.name, _without_default(s.labels)): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def series(samples: dict, name: str, label: str) -> dict[str, float]:
    return {dict(labels)[label]: v for (n, labels), v in samples.items() if n == name}


async def test_every_known_label_value_is_exported_at_zero_before_its_first_event(
    echo_upstream, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    # Bearer against an echo upstream: no login, no request, so every counter is untouched.
    proxy = await make_proxy(echo_upstream.url, auth={"scheme": "bearer", "api_key": Secret("k")})
    s = await scrape(http, proxy)
    assert series(s, P + "rejected_total", "reason") == dict.fromkeys(metrics.REJECT_REASONS, 0)
    assert series(s, P + "retries_total", "reason") == dict.fromkeys(metrics.RETRY_REASONS, 0)
    assert series(s, P + "auth_requests_total", "result") == dict.fromkeys(metrics.AUTH_RESULTS, 0)
    for name, scopes in [
        ("request_duration_seconds_count", {"user", "account", "auth"}),
        ("upstream_duration_seconds_count", {"user", "account"}),
        ("queue_wait_seconds_count", {"user", "account"}),
    ]:
        assert series(s, P + name, "scope") == dict.fromkeys(scopes, 0), name
    # Statuses are open-ended: nothing is invented for them.
    assert series(s, P + "requests_total", "status") == {}
    assert series(s, P + "upstream_responses_total", "status") == {}


async def test_a_first_event_adds_to_its_zero_series(
    proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    async with http.get(proxy.url + "/perl/api/v2/x", headers={"X-Proxy-Max-Wait": "no"}) as r:
        assert r.status == 400
    s = await scrape(http, proxy)
    rejected = series(s, P + "rejected_total", "reason")
    assert rejected["bad_request"] == 1
    assert sum(rejected.values()) == 1


def string_constants(nodes: Sequence[ast.AST]) -> set[str]:
    return {
        n.value
        for node in nodes
        for n in ast.walk(node)
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def retry_reasons_in_code() -> set[str]:
    """The reason of every Decision the schemes and the generic retry rules can build."""
    root = repo_root() / "proxy"
    found: set[str] = set()
    for path in [root / "pipeline" / "retry.py", *sorted((root / "schemes").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "Decision"
                and len(node.args) >= 2
            ):
                reason = node.args[1]
                if isinstance(reason, ast.Constant):
                    found.add(reason.value)
                else:  # f"status_{status}": one per gateway status
                    assert ast.unparse(reason) == "f'status_{status}'", path
                    found |= {f"status_{s}" for s in retry._GATEWAY_STATUSES}
    return found


def auth_results_in_code() -> set[str]:
    """Every result a scheme counts: the literals in its `...metrics.auth(...)` calls, and
    those returned by a module function called there (luxsci's _auth_result, which maps a
    login's status to one)."""
    found: set[str] = set()
    for path in sorted((repo_root() / "proxy" / "schemes").rglob("*.py")):
        tree = ast.parse(path.read_text())
        functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "auth"
                and ast.unparse(node.func.value).endswith("metrics")
            ):
                continue
            found |= string_constants(node.args)
            for call in ast.walk(node.args[0]):
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Name):
                    returns = ast.walk(functions[call.func.id])
                    found |= string_constants([r for r in returns if isinstance(r, ast.Return)])
    assert found, "no metrics.auth(...) call found: has the session moved?"
    return found


def test_the_known_label_values_match_what_the_code_can_produce() -> None:
    """The lists in proxy/observe/metrics.py cannot import the layers they describe (the
    import contracts): this keeps them in step when a scheme or retry rule adds one."""
    assert retry_reasons_in_code() == set(metrics.RETRY_REASONS)
    assert auth_results_in_code() == set(metrics.AUTH_RESULTS)

    # Every reason the README documents as an X-Proxy-Error, and no other.
    readme = (repo_root() / "README.md").read_text()
    table = readme.split("## Errors the proxy itself produces")[1].split("## Endpoints")[0]
    documented = set(re.findall(r"^\| \d{3} \| `(\w+)` \|", table, re.MULTILINE))
    assert documented == set(metrics.REJECT_REASONS)
    assert errors.ProxyError.reason in metrics.REJECT_REASONS


async def test_operator_gauges_carry_the_configured_budgets(
    sandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(
        sandbox.url,
        limits={"per_day": 1234},
        queue={"max_size": 77, "max_wait": 12.5},
        auth={"code_lifetime": 600, "refresh_margin": 30},
    )
    async with http.get(proxy.url + "/perl/api/v2/account/1/x") as resp:
        assert resp.status == 200
    s = await scrape(http, proxy)
    assert s[(P + "daily_limit", frozenset())] == 1234
    assert s[(P + "daily_requests_used", frozenset())] == 2  # the login and the request
    assert s[(P + "queue_max_size", frozenset())] == 77
    assert s[(P + "queue_max_wait_seconds", frozenset())] == 12.5
    assert s[(P + "auth_code_lifetime_seconds", frozenset())] == 600
    assert s[(P + "limits_fallback_active", frozenset())] == 0
    assert s[(P + "ready", frozenset())] == 1
    # The standard process and Python families, from prometheus_client's collectors.
    assert s[("process_resident_memory_bytes", frozenset())] > 0
    assert s[("process_start_time_seconds", frozenset())] <= time.time()
    assert ("python_gc_collections_total", frozenset({("generation", "0")})) in s
    assert any(name == "python_info" for name, _ in s)


async def test_bearer_has_no_code_lifetime(
    echo_upstream, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(echo_upstream.url, auth={"scheme": "bearer", "api_key": Secret("k")})
    s = await scrape(http, proxy)
    assert (P + "auth_code_lifetime_seconds", frozenset()) not in s
    assert s[(P + "ready", frozenset())] == 1


async def test_redis_fallback_shows_as_a_gauge_and_readiness_follows(
    sandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    # Nothing listens on that port: the backend starts on its local share at once.
    proxy = await make_proxy(
        sandbox.url,
        limits={"backend": "redis", "redis_url": f"redis://127.0.0.1:{free_port()}/0"},
        # The first login waits for the next window's local share: keep the wait short.
        queue={"max_wait": 0.5},
    )
    s = await scrape(http, proxy)
    assert s[(P + "limits_fallback_active", frozenset())] == 1
    assert s[(P + "ready", frozenset())] == 0  # admin.ready_requires_redis defaults to true


def write_config(path: Path, upstream: str, per_day: int) -> None:
    path.write_text(
        f"""
listen: {{port: 0}}
admin: {{port: 0}}
upstream: {{url: "{upstream}", allow_insecure: true}}
auth: {{token: "{TOKEN}", secret: "{SECRET}"}}
limits: {{per_day: {per_day}, state_file: ""}}
"""
    )
    path.chmod(0o600)


async def test_reload_success_and_refusal_are_exported(
    sandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    started = time.time()
    proxy = await make_proxy(sandbox.url)
    service: ProxyService = proxy.service
    s = await scrape(http, proxy)
    assert s[(P + "config_last_reload_successful", frozenset())] == 1
    first = s[(P + "config_last_reload_success_timestamp_seconds", frozenset())]
    assert started - 1 <= first <= time.time()

    path = tmp_path / "config.yaml"
    reloader = cli.Reloader(service, str(path))
    path.write_text("limits: {per_day: [not a number]}\n")
    await reloader.reload()
    s = await scrape(http, proxy)
    assert s[(P + "config_last_reload_successful", frozenset())] == 0
    # The time is that of the last load that applied: a refusal leaves it.
    assert s[(P + "config_last_reload_success_timestamp_seconds", frozenset())] == first

    write_config(path, sandbox.url, per_day=4321)
    await asyncio.sleep(0.01)
    await reloader.reload()
    s = await scrape(http, proxy)
    assert s[(P + "config_last_reload_successful", frozenset())] == 1
    assert s[(P + "config_last_reload_success_timestamp_seconds", frozenset())] > first
    assert s[(P + "daily_limit", frozenset())] == 4321


@pytest.mark.parametrize(
    "path", ["/", "/status.json", "/healthz", "/readyz", "/metrics", "/nowhere"]
)
async def test_the_admin_port_names_no_server_software(
    proxy: RunningProxy, http: aiohttp.ClientSession, path: str
) -> None:
    async with http.get(proxy.admin_url + path) as resp:
        await resp.read()
        assert resp.status in (200, 404)
        assert "Server" not in resp.headers
        assert not any("aiohttp" in v or "Python" in v for v in resp.headers.values())
    async with http.post(proxy.admin_url + path) as resp:  # 405 / 404: aiohttp's own answers
        assert resp.status in (404, 405)
        assert "Server" not in resp.headers
