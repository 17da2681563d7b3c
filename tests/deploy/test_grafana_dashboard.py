"""deploy/grafana/luxsci-proxy.json: every expression parses and reads only what the proxy
exports, and the panels cover what an operator looks for."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from conftest import MakeProxy
from deploy_support import (
    DEPLOY,
    exported_names,
    promql_metric_names,
    run,
    tool,
    without_grafana_variables,
)
from prometheus_client.parser import text_string_to_metric_families

from proxy.sandbox import SandboxServer

DASHBOARD = DEPLOY / "grafana" / "luxsci-proxy.json"


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def all_panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside a collapsed row


def expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in all_panels()
        for target in panel.get("targets", [])
    ]


def variable_queries() -> list[str]:
    """The template variables' label_values(metric{...}, label) queries."""
    return [v["definition"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]


def docs_queries() -> list[tuple[str, str]]:
    """The "Useful queries" of docs/deploy.md, one per line, comments cut off."""
    text = (DEPLOY.parent / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```promql\n(.*?)```", text, re.DOTALL)
    assert blocks
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [("docs/deploy.md", line) for line in lines if line]


def promtool_parses(exprs: list[tuple[str, str]], tmp_path: Path) -> None:
    """promtool has no offline `parse`, so each expression becomes a recording rule and
    `promtool check rules` parses them all (Grafana's variables replaced first)."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": without_grafana_variables(expr)}
                    for i, (_, expr) in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = run(tool("promtool"), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_every_expression_parses(tmp_path: Path) -> None:
    assert len(expressions()) >= 30
    promtool_parses(expressions(), tmp_path)


def test_the_queries_in_the_deploy_guide_parse(tmp_path: Path) -> None:
    promtool_parses(docs_queries(), tmp_path)


def test_a_broken_expression_would_be_caught(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "r", "expr": "sum(("}]}]})
    )
    assert run(tool("promtool"), "check", "rules", str(path)).returncode != 0


async def test_every_expression_uses_only_metrics_the_proxy_exports(
    sandbox: SandboxServer,
    make_proxy: MakeProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    exported = await exported_names(sandbox.url, make_proxy, http, tmp_path)
    for title, expr in expressions() + docs_queries():
        used = promql_metric_names(without_grafana_variables(expr))
        assert used, title
        assert used <= exported, (title, used - exported)
    for query in variable_queries():
        metric = re.fullmatch(r"label_values\((\w+)(\{.*\})?, \w+\)", query)
        assert metric is not None and metric[1] in exported, query


def test_every_query_is_scoped_by_the_job_and_instance_variables() -> None:
    for title, expr in expressions():
        selectors = re.findall(r"\b(\w+)\{([^}]*)\}", expr)
        assert selectors, title
        for metric, matchers in selectors:
            scoped = 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers
            assert scoped, (title, metric)


# The proxy's families that belong to the process, not to one integration: no
# `integration` label, so the integration variable cannot filter them.
PROCESS_WIDE = {
    "luxsci_proxy_config_last_reload_successful",
    "luxsci_proxy_config_last_reload_success_timestamp_seconds",
}


def per_integration(metric: str) -> bool:
    return metric.startswith("luxsci_proxy_") and metric not in PROCESS_WIDE


def test_every_per_integration_query_filters_on_the_integration_variable() -> None:
    chosen = 'integration=~"$integration"'
    for title, expr in expressions():
        for metric, matchers in re.findall(r"\b(\w+)\{([^}]*)\}", expr):
            assert (chosen in matchers) == per_integration(metric), (title, metric)
    variable = next(v for v in dashboard()["templating"]["list"] if v["name"] == "integration")
    assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*"
    assert variable["definition"].startswith("label_values(luxsci_proxy_build_info{")


def test_time_series_of_integrations_name_the_integration_in_their_legend() -> None:
    for panel in all_panels():
        if panel["type"] != "timeseries":
            continue
        for target in panel.get("targets", []):
            metrics = promql_metric_names(without_grafana_variables(target["expr"]))
            if any(per_integration(m) for m in metrics):
                assert "{{integration}}" in target["legendFormat"], panel["title"]


async def test_the_process_wide_families_carry_no_integration_label_and_the_others_do(
    sandbox: SandboxServer,
    make_proxy: MakeProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """What PROCESS_WIDE says, checked against a real proxy's /metrics."""
    proxy = await make_proxy(sandbox.url)
    async with http.get(proxy.url + "/perl/api/v2/account/1/things") as resp:
        assert resp.status == 200
    async with http.get(proxy.admin_url + "/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("luxsci_proxy_"):
                labelled = "integration" in sample.labels
                assert labelled == per_integration(sample.name), sample.name


def test_the_panels_cover_traffic_latency_budgets_queue_auth_and_jobs() -> None:
    rows = [p["title"] for p in dashboard()["panels"] if p["type"] == "row"]
    for needed in ["Traffic", "Latency", "Budgets", "Queue", "Auth", "Jobs"]:
        assert needed in rows
    used = set().union(*(promql_metric_names(e) for _, e in expressions()))
    # Every luxsci_proxy family has a panel (histograms through their buckets or count).
    families = {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in used}
    for family in [
        "luxsci_proxy_requests",
        "luxsci_proxy_request_duration_seconds",
        "luxsci_proxy_upstream_duration_seconds",
        "luxsci_proxy_queue_wait_seconds",
        "luxsci_proxy_queue_depth",
        "luxsci_proxy_rejected",
        "luxsci_proxy_retries",
        "luxsci_proxy_upstream_responses",
        "luxsci_proxy_auth_requests",
        "luxsci_proxy_daily_requests_used",
        "luxsci_proxy_daily_limit",
        "luxsci_proxy_window_requests_used",
        "luxsci_proxy_window_requests_limit",
        "luxsci_proxy_rate_limit_remaining",
        "luxsci_proxy_rate_limit_limit",
        "luxsci_proxy_session_valid",
        "luxsci_proxy_auth_code_age_seconds",
        "luxsci_proxy_limits_fallback_active",
        "luxsci_proxy_ready",
        "luxsci_proxy_config_last_reload_successful",
        "luxsci_proxy_inflight_requests",
        "luxsci_proxy_jobs",
        "luxsci_proxy_jobs_oldest_queued_age_seconds",
        "luxsci_proxy_jobs_submitted",
        "luxsci_proxy_jobs_completed",
        "luxsci_proxy_job_callback_failures",
    ]:
        assert family in families, family


# Exported but not drawn: the version is a label set, not a series to plot.
NOT_DRAWN = {"luxsci_proxy_build"}


def _family(name: str) -> str:
    return re.sub(r"_(bucket|sum|count|total|created|info)$", "", name)


async def test_every_family_the_proxy_exports_has_a_panel(
    sandbox: SandboxServer,
    make_proxy: MakeProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A gauge added to the proxy (a new budget, a new queue view) fails here until the
    dashboard draws it."""
    exported = await exported_names(sandbox.url, make_proxy, http, tmp_path)
    drawn = {
        _family(name)
        for _, expr in expressions()
        for name in promql_metric_names(without_grafana_variables(expr))
    }
    ours = {_family(name) for name in exported if name.startswith("luxsci_proxy_")}
    assert ours - drawn - NOT_DRAWN == set()


def test_the_layout_has_unique_ids_and_no_overlapping_panels() -> None:
    panels = list(all_panels())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, p["title"]
        cells |= mine
    assert dashboard()["uid"] == "luxsci-proxy"
