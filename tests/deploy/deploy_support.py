"""Helpers for the tests of what deploy/ ships: external tools, PromQL, exported names."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from conftest import MakeProxy
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Secret

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def tool(name: str) -> str:
    """The path of a command-line tool. Missing on a developer's machine: skip, saying how
    to get it. Missing in CI (CI=true): fail, since .ci/run installs it and a skip there
    would let an unchecked rule or dashboard land."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (apt-get install prometheus; .ci/run does)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)


# Grafana's variables, replaced by values PromQL accepts so that an expression parses.
def without_grafana_variables(expr: str) -> str:
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
_KEYWORDS |= {"and", "or", "unless", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects. Not a parser (promtool checks that the
    expression parses): strings, label matchers, ranges and grouping label lists are cut
    out, and what remains that is not a function, keyword or number is a metric name."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    # `sum by (le) (...)`: with the label list gone, `sum` is followed by its call.
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        name, call = match.groups()
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


async def scrape_names(http: aiohttp.ClientSession, admin_url: str) -> set[str]:
    """Every sample name on /metrics (with _bucket, _sum, _count, _total as exposed), and
    each gauge declared with no sample at the moment (queue_depth_by_client while no
    client waits): its series appear under that name once there is something to count."""
    async with http.get(admin_url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    families = list(text_string_to_metric_families(text))
    empty = {f.name for f in families if f.type == "gauge" and not f.samples}
    return {s.name for family in families for s in family.samples} | empty


async def exported_names(
    sandbox_url: str, make_proxy: MakeProxy, http: aiohttp.ClientSession, state: Path
) -> set[str]:
    """What a real LuxSci proxy exports once it has logged in and forwarded a request (some
    gauges exist only then: the API's rate-limit headers, the code's age and lifetime),
    with durable jobs on (their store in `state`), as a team that uses them runs it."""
    key = base64.b64encode(os.urandom(32)).decode()
    jobs = {"enabled": True, "keys": (Secret(key),), "store": str(state / "jobs.db")}
    proxy = await make_proxy(sandbox_url, jobs=jobs)
    async with http.get(proxy.url + "/perl/api/v2/account/1/things") as resp:
        assert resp.status == 200
    return await scrape_names(http, proxy.admin_url) | PROMETHEUS_OWN


# Series Prometheus itself makes for every target.
PROMETHEUS_OWN = {"up"}


def check_with_proxy(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`luxsci-proxy check` on a shipped config, as docs/deploy.md tells a team's CI to."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        cwd=DEPLOY.parent,
    )
