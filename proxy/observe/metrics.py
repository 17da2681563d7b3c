"""Prometheus metrics, prefix `luxsci_proxy_`, on the admin listener's /metrics.

Events (requests, answers, waits) are counted in plain Python numbers keyed by
their label values, and turned into metric families only when /metrics is
scraped. prometheus-client's own Counter and Histogram take a lock and walk
their buckets in Python on every observation, which made the three histograms
and two counters of each request one of the larger items of its cost; the proxy
runs on one event loop thread, so no lock is needed. prometheus-client still
does the exposition. States (queue depth, requests in flight, the API's
rate-limit headers, the day's count, the auth code's age) are read at scrape
time too, so they cost nothing per request and can never drift from the truth.

Labels stay low-cardinality: methods outside the usual set become "other",
scopes are user | account | auth, statuses are numbers; never a path.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Info
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
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


@dataclass(frozen=True)
class JobsState:
    """The durable jobs as last counted (the runner counts them every few seconds: a
    scrape never waits for the store)."""

    by_state: dict[str, int]
    # Seconds since the oldest queued job was submitted; None with none queued.
    oldest_queued_age: float | None


class _JobsCollector(Collector):
    def __init__(self, source: Callable[[], JobsState]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        state = self.source()
        jobs = GaugeMetricFamily(
            f"{PREFIX}_jobs", "Durable jobs stored, by state", labels=["state"]
        )
        for name, count in sorted(state.by_state.items()):
            jobs.add_metric([name], count)
        yield jobs
        oldest = GaugeMetricFamily(
            f"{PREFIX}_jobs_oldest_queued_age_seconds",
            "Age of the oldest queued job (0 with none queued)",
            value=state.oldest_queued_age or 0.0,
        )
        yield oldest


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


class _Counter:
    """Counts per label values; exposed as `<name>_total`."""

    def __init__(self, name: str, doc: str, labels: Sequence[str]) -> None:
        self.name, self.doc, self.labels = name, doc, list(labels)
        self.counts: dict[tuple[str, ...], int] = {}

    def inc(self, *values: str) -> None:
        counts = self.counts
        counts[values] = counts.get(values, 0) + 1

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for values, count in sorted(self.counts.items()):
            family.add_metric(list(values), count)
        return family


class _Histogram:
    """A histogram per label values: [count per bucket..., sum] in one list."""

    def __init__(self, name: str, doc: str, label: str, buckets: Sequence[float]) -> None:
        self.name, self.doc, self.label = name, doc, label
        self.bounds = list(buckets)
        self.series: dict[str, list[float]] = {}

    def observe(self, value: str, amount: float) -> None:
        series = self.series.get(value)
        if series is None:
            # One slot per bound, one for +Inf, one for the sum.
            series = self.series[value] = [0.0] * (len(self.bounds) + 2)
        # `le` buckets: a value equal to a bound belongs to that bound's bucket.
        series[bisect_left(self.bounds, amount)] += 1
        series[-1] += amount

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.doc, labels=[self.label])
        labels = [*(repr(float(b)) for b in self.bounds), "+Inf"]
        for value, series in sorted(self.series.items()):
            cumulative, buckets = 0.0, []
            for le, count in zip(labels, series[:-1], strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric([value], buckets, series[-1])
        return family


class _EventCollector(Collector):
    def __init__(self, metrics: Sequence[_Counter | _Histogram]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for metric in self.metrics:
            yield metric.family()


class Metrics:
    """Every metric of one proxy service, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._requests = _Counter(
            f"{PREFIX}_requests", "Client requests answered", ["method", "scope", "status"]
        )
        self._request_duration = _Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Total time seen by the client",
            "scope",
            _LATENCY_BUCKETS,
        )
        self._upstream_duration = _Histogram(
            f"{PREFIX}_upstream_duration_seconds",
            "One attempt upstream, until the answer's head arrived",
            "scope",
            _LATENCY_BUCKETS,
        )
        self._queue_wait = _Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Wait for a rate-limit permit, per attempt",
            "scope",
            _WAIT_BUCKETS,
        )
        self._upstream_responses = _Counter(
            f"{PREFIX}_upstream_responses", "Answers from the API, by status", ["status"]
        )
        self._retries = _Counter(f"{PREFIX}_retries", "Requests sent again, by reason", ["reason"])
        self._rejected = _Counter(
            f"{PREFIX}_rejected",
            "Answers the proxy made itself, by X-Proxy-Error reason",
            ["reason"],
        )
        self._auth = _Counter(
            f"{PREFIX}_auth_requests", "Logins and revocations, by result", ["result"]
        )
        self._jobs_submitted = _Counter(
            f"{PREFIX}_jobs_submitted", "Durable jobs accepted (202), new ones only", []
        )
        self._jobs_completed = _Counter(
            f"{PREFIX}_jobs_completed", "Durable jobs that reached an end state", ["state"]
        )
        self._job_callback_failures = _Counter(
            f"{PREFIX}_job_callback_failures",
            "Job callback deliveries that failed (each attempt; `gave_up` when the last did)",
            ["result"],
        )
        self.registry.register(
            _EventCollector(
                [
                    self._requests,
                    self._request_duration,
                    self._upstream_duration,
                    self._queue_wait,
                    self._upstream_responses,
                    self._retries,
                    self._rejected,
                    self._auth,
                    self._jobs_submitted,
                    self._jobs_completed,
                    self._job_callback_failures,
                ]
            )
        )
        self._build = Info(f"{PREFIX}_build", "Version and configuration", registry=self.registry)

    def describe(self, scheme: str, backend: str) -> None:
        self._build.info({"version": __version__, "scheme": scheme, "backend": backend})

    def watch(self, sources: StateSources) -> None:
        self.registry.register(_StateCollector(sources))

    def watch_jobs(self, source: Callable[[], JobsState]) -> None:
        self.registry.register(_JobsCollector(source))

    # -- the events ------------------------------------------------------------------

    def request(self, method: str, scope: str, status: int, seconds: float) -> None:
        self._requests.inc(method_label(method), scope, str(status))
        self._request_duration.observe(scope, seconds)

    def upstream(self, scope: str, status: int | None, seconds: float) -> None:
        self._upstream_duration.observe(scope, seconds)
        if status is not None:
            self._upstream_responses.inc(str(status))

    def upstream_response(self, status: int) -> None:
        self._upstream_responses.inc(str(status))

    def queue_wait(self, scope: str, seconds: float) -> None:
        self._queue_wait.observe(scope, seconds)

    def retry(self, reason: str) -> None:
        self._retries.inc(reason)

    def rejected(self, reason: str) -> None:
        self._rejected.inc(reason)

    def auth(self, result: str) -> None:
        self._auth.inc(result)

    def job_submitted(self) -> None:
        self._jobs_submitted.inc()

    def job_completed(self, state: str, count: int = 1) -> None:
        counts = self._jobs_completed.counts
        counts[(state,)] = counts.get((state,), 0) + count

    def job_callback_failed(self, gave_up: bool) -> None:
        self._job_callback_failures.inc("gave_up" if gave_up else "retrying")
