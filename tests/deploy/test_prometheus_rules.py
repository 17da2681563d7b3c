"""deploy/prometheus/alerts.yaml: valid, unit-tested by promtool, written by the team's rules."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import yaml
from conftest import MakeProxy
from deploy_support import DEPLOY, exported_names, promql_metric_names, run, tool

from proxy.sandbox import SandboxServer

RULES = DEPLOY / "prometheus" / "alerts.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts.test.yaml"


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promql_metric_names_finds_selectors_only() -> None:
    expr = (
        'sum by (le, scope) (rate(a_bucket{job=~"$job", x="by(b)"}[5m])) '
        "/ ignoring (scope) group_left b_total * 0.5 and on (instance) c offset 5m > bool 1e3"
    )
    assert promql_metric_names(expr) == {"a_bucket", "b_total", "c"}


def test_the_rules_pass_promtool_check() -> None:
    result = run(tool("promtool"), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_the_rules_pass_their_unit_tests() -> None:
    result = run(tool("promtool"), "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def target(series: str) -> dict[str, str]:
    """The target labels (job, instance) of an input series."""
    labels = dict(re.findall(r'(\w+)="([^"]*)"', series))
    return {k: v for k, v in labels.items() if k in ("job", "instance")}


def test_every_rule_has_a_test_where_it_fires_and_one_where_it_stays_quiet() -> None:
    """promtool passes a rule that no test mentions: make sure each one is shown firing,
    and shown quiet (an empty expectation, or a target of the input that the expected
    alerts leave out: a healthy replica, an idle proxy, another job)."""
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        targets = [target(s["series"]) for s in case["input_series"]]
        for check in case["alert_rule_test"]:
            expected = [e["exp_labels"] for e in check["exp_alerts"]]
            if expected:
                fires.add(check["alertname"])

            def named(t: dict[str, str], expected: list[dict[str, str]] = expected) -> bool:
                return any(all(e.get(k, v) == v for k, v in t.items()) for e in expected)

            if not all(named(t) for t in targets):
                quiet.add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fires == set(), "rules never shown firing"
    assert names - quiet == set(), "rules never shown staying quiet"


def test_every_rule_has_a_severity_a_duration_and_words_for_the_reader() -> None:
    for rule in alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"LuxSci[A-Z]\w+", name), name
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert set(rule["annotations"]) >= {"summary", "description"}, name
        assert len(rule["annotations"]["description"]) > 80, name


def test_no_rule_hard_codes_a_budget() -> None:
    """Budgets come from the proxy's gauges (daily_limit, queue_max_size...): the only
    numbers in the expressions are ratios, small counts and the length of a day."""
    for rule in alert_rules():
        expr = re.sub(r"\[[^\]]*\]", "", rule["expr"])  # range durations
        expr = re.sub(r'"[^"]*"', "", expr)  # label values such as status="5.."
        numbers = {float(n) for n in re.findall(r"(?<![\w.])\d+(?:\.\d+)?", expr)}
        assert {n for n in numbers if n > 2 and n != 86400} == set(), rule["alert"]


async def test_the_rules_use_only_metrics_the_proxy_exports(
    sandbox: SandboxServer,
    make_proxy: MakeProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    exported = await exported_names(sandbox.url, make_proxy, http, tmp_path)
    for rule in alert_rules():
        used = promql_metric_names(rule["expr"])
        assert used, rule["alert"]
        assert used <= exported, (rule["alert"], used - exported)
