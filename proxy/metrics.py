"""Prometheus metrics, prefix `luxsci_proxy_`, on the admin listener's /metrics.

Counters and histograms are observed on the hot path through label children
bound once per label set (a dict hit, not prometheus-client's locked lookup).
Everything that is a state rather than an event (queue depth, requests in
flight, the API's rate-limit headers, the day's count, the auth code's age) is
read at scrape time by a collector, so it costs nothing per request and can
never drift from the truth.

Labels stay low-cardinality: methods outside the usual set become "other",
scopes are user | account | auth, statuses are numbers; never a path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy import __version__

PREFIX = "luxsci_proxy"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_WAIT_BUCKETS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def method_label(method: str) -> str:
    return method if method in _METHODS else "other"


@dataclass(frozen=True)
class ScopeState:
    """What the scrape reads for one scope."""

    queue_depth: int
    rate_limit_remaining: int | None
    rate_limit_limit: int | None


@dataclass(frozen=True)
class StateSources:
    """Callables the collector reads at scrape time (no I/O in any of them)."""

    scopes: Callable[[], dict[str, ScopeState]]
    inflight: Callable[[], int]
    daily_used: Callable[[], int]
    # Seconds since the newest auth code was earned; None without one (or scheme bearer).
    code_age: Callable[[], float | None]
    session_valid: Callable[[], bool]


class _StateCollector(Collector):
    def __init__(self, sources: StateSources) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        s = self.sources
        depth = GaugeMetricFamily(
            f"{PREFIX}_queue_depth", "Requests waiting for a rate-limit permit", labels=["scope"]
        )
        remaining = GaugeMetricFamily(
            f"{PREFIX}_rate_limit_remaining",
            "X-RateLimit-Remaining from the API's latest answer",
            labels=["scope"],
        )
        limit = GaugeMetricFamily(
            f"{PREFIX}_rate_limit_limit",
            "X-RateLimit-Limit from the API's latest answer",
            labels=["scope"],
        )
        for scope, state in s.scopes().items():
            depth.add_metric([scope], state.queue_depth)
            if state.rate_limit_remaining is not None:
                remaining.add_metric([scope], state.rate_limit_remaining)
            if state.rate_limit_limit is not None:
                limit.add_metric([scope], state.rate_limit_limit)
        yield depth
        yield remaining
        yield limit
        yield GaugeMetricFamily(
            f"{PREFIX}_inflight_requests", "Requests in flight upstream", value=s.inflight()
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_daily_requests_used",
            "API requests counted against today's budget (limits.per_day)",
            value=s.daily_used(),
        )
        age = s.code_age()
        code_age = GaugeMetricFamily(
            f"{PREFIX}_auth_code_age_seconds", "Age of the newest auth code in use"
        )
        if age is not None:
            code_age.add_metric([], age)
        yield code_age
        yield GaugeMetricFamily(
            f"{PREFIX}_session_valid",
            "1 while the proxy holds a usable auth session (scheme bearer: always)",
            value=1.0 if s.session_valid() else 0.0,
        )


class Metrics:
    """Every metric of one proxy service, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._requests = Counter(
            f"{PREFIX}_requests",
            "Client requests answered",
            ["method", "scope", "status"],
            registry=r,
        )
        self._request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Total time seen by the client",
            ["scope"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._upstream_duration = Histogram(
            f"{PREFIX}_upstream_duration_seconds",
            "One attempt upstream, until the answer's head arrived",
            ["scope"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Wait for a rate-limit permit, per attempt",
            ["scope"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self._upstream_responses = Counter(
            f"{PREFIX}_upstream_responses",
            "Answers from the API, by status",
            ["status"],
            registry=r,
        )
        self._retries = Counter(
            f"{PREFIX}_retries", "Requests sent again, by reason", ["reason"], registry=r
        )
        self._rejected = Counter(
            f"{PREFIX}_rejected",
            "Answers the proxy made itself, by X-Proxy-Error reason",
            ["reason"],
            registry=r,
        )
        self._auth = Counter(
            f"{PREFIX}_auth_requests",
            "Logins and revocations, by result",
            ["result"],
            registry=r,
        )
        self._build = Info(f"{PREFIX}_build", "Version and configuration", registry=r)
        self._children: dict[tuple[Any, ...], Any] = {}

    def describe(self, scheme: str, backend: str) -> None:
        self._build.info({"version": __version__, "scheme": scheme, "backend": backend})

    def watch(self, sources: StateSources) -> None:
        self.registry.register(_StateCollector(sources))

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- the events ------------------------------------------------------------------

    def request(self, method: str, scope: str, status: int, seconds: float) -> None:
        self._child(self._requests, method_label(method), scope, str(status)).inc()
        self._child(self._request_duration, scope).observe(seconds)

    def upstream(self, scope: str, status: int | None, seconds: float) -> None:
        self._child(self._upstream_duration, scope).observe(seconds)
        if status is not None:
            self.upstream_response(status)

    def upstream_response(self, status: int) -> None:
        self._child(self._upstream_responses, str(status)).inc()

    def queue_wait(self, scope: str, seconds: float) -> None:
        self._child(self._queue_wait, scope).observe(seconds)

    def retry(self, reason: str) -> None:
        self._child(self._retries, reason).inc()

    def rejected(self, reason: str) -> None:
        self._child(self._rejected, reason).inc()

    def auth(self, result: str) -> None:
        self._child(self._auth, result).inc()
