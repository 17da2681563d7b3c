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

Every label value known in advance (proxy-made error reasons, retry reasons, login
results, scopes) is exported at zero from the start: Prometheus's `increase()` and
`rate()` need a sample before the first event to see that event at all, so an
alert on "any daily_limit answer" would otherwise miss the first one. Statuses are
not known in advance and are not pre-filled.

Labels stay low-cardinality: methods outside the usual set become "other",
scopes are user | account | auth, statuses are numbers, lanes are high |
normal | low | background, clients are the configured names (and anonymous,
default, proxy); never a path.
"""

from __future__ import annotations

import contextlib
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy import __version__, errors

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


# Scopes: the limiter's budgets, and "auth" for requests to the log-in paths (only the
# client-facing histogram sees that one).
LIMIT_SCOPES = ("user", "account")
REQUEST_SCOPES = (*LIMIT_SCOPES, "auth")
# Why a request was sent again: the schemes' own rules (proxy/schemes/) and the generic
# ones (proxy/pipeline/retry.py). Observability may not import those layers, so the
# list lives here; tests/observe/test_metrics_known_labels.py checks it against them.
RETRY_REASONS = (
    "auth_401",
    "rate_limited",
    "incomplete_475",
    "status_408",
    "status_502",
    "status_503",
    "status_504",
    "connect_failed",
    "timeout",
    "connection_lost",
    "stale_connection",
)
# How a durable job can end (proxy/jobs/model.py TERMINAL), and what became of a failed
# callback delivery (proxy/jobs/runner.py).
JOB_END_STATES = ("cancelled", "expired", "failed", "outcome_unknown", "succeeded")
CALLBACK_RESULTS = ("gave_up", "retrying")
# What a login or revocation call came to (proxy/schemes/luxsci/session.py).
AUTH_RESULTS = ("success", "rejected", "rate_limited", "error", "revoked", "revoke_failed")


def _reject_reasons() -> tuple[str, ...]:
    """Every X-Proxy-Error reason the proxy can answer with: the leaves of the error tree,
    and ProxyError itself (internal_error). Intermediate classes (Unavailable,
    UpstreamError) are never raised as such."""
    classes = [
        c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.ProxyError)
    ]
    leaves = {
        c.reason
        for c in classes
        if c is errors.ProxyError
        or not any(sub.__module__ == errors.__name__ for sub in c.__subclasses__())
    }
    return tuple(sorted(leaves))


REJECT_REASONS = _reject_reasons()


def method_label(method: str) -> str:
    return method if method in _METHODS else "other"


@dataclass(frozen=True)
class ScopeState:
    """What the scrape reads for one scope."""

    queue_depth: int
    rate_limit_remaining: int | None
    rate_limit_limit: int | None
    # The same waiting requests, by the lane they wait in now.
    lane_depths: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class WindowState:
    """What the scrape reads for one rate window of the config (limits.windows, or the
    shorthand's three): bounded by the config, so fit for labels."""

    scope: str
    # Its length as the config writes it: 1s, 1m, 1h, 1d.
    per: str
    limit: int
    # Counted in the current window, as this process last saw it.
    used: int


@dataclass(frozen=True)
class ReloadState:
    successful: bool
    # Unix time of the last load that applied (start-up counts as one).
    success_time: float
    # Integrations whose section the last reload refused (the others applied).
    refused: tuple[str, ...] = ()


@dataclass(frozen=True)
class StateSources:
    """Callables the collector reads at scrape time (no I/O in any of them)."""

    scopes: Callable[[], dict[str, ScopeState]]
    inflight: Callable[[], int]
    daily_used: Callable[[], int]
    # Seconds since the newest auth code was earned; None without one (or scheme bearer).
    code_age: Callable[[], float | None]
    session_valid: Callable[[], bool]
    # Operator gauges; the defaults export nothing, for callers that do not know them.
    # limits.per_day as configured (the day's budget the count is measured against).
    daily_limit: Callable[[], int | None] = lambda: None
    # Every rate window's budget and count.
    windows: Callable[[], Sequence[WindowState]] = lambda: ()
    # The life of an auth code (auth.code_lifetime); None where credentials do not age.
    code_lifetime: Callable[[], float | None] = lambda: None
    # True while the Redis backend serves on its local fallback share.
    limits_fallback: Callable[[], bool] = lambda: False
    # What /readyz would answer right now.
    ready: Callable[[], bool] = lambda: True
    # queue.max_size and queue.max_wait, to judge queue_depth and queue_wait against.
    queue_max_size: Callable[[], int | None] = lambda: None
    queue_max_wait: Callable[[], float | None] = lambda: None
    # Requests waiting per client name, in all scopes.
    client_depths: Callable[[], Mapping[str, int]] = dict


@dataclass(frozen=True)
class JobsState:
    """The durable jobs as last counted (the runner counts them every few seconds: a
    scrape never waits for the store)."""

    by_state: dict[str, int]
    # Seconds since the oldest queued job was submitted; None with none queued.
    oldest_queued_age: float | None


class _JobsCollector(Collector):
    """The durable jobs of every integration that has them on."""

    def __init__(self) -> None:
        self.sources: dict[str, Callable[[], JobsState]] = {}

    def collect(self) -> Iterator[Metric]:
        if not self.sources:
            return
        jobs = GaugeMetricFamily(
            f"{PREFIX}_jobs", "Durable jobs stored, by state", labels=["integration", "state"]
        )
        oldest = GaugeMetricFamily(
            f"{PREFIX}_jobs_oldest_queued_age_seconds",
            "Age of the oldest queued job (0 with none queued)",
            labels=["integration"],
        )
        for integration, source in sorted(self.sources.items()):
            state = source()
            for name, count in sorted(state.by_state.items()):
                jobs.add_metric([integration, name], count)
            oldest.add_metric([integration], state.oldest_queued_age or 0.0)
        yield jobs
        yield oldest


def _gauge(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
    """A per-integration gauge family: its labels follow `integration`."""
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["integration", *labels])


class _StateCollector(Collector):
    """The states of every integration, read at scrape time; one family per metric, a
    series per integration (a family may be exposed only once per registry)."""

    def __init__(self) -> None:
        self.sources: dict[str, StateSources] = {}

    def collect(self) -> Iterator[Metric]:
        depth = _gauge("queue_depth", "Requests waiting for a rate-limit permit", "scope")
        remaining = _gauge(
            "rate_limit_remaining", "X-RateLimit-Remaining from the API's latest answer", "scope"
        )
        limit = _gauge(
            "rate_limit_limit", "X-RateLimit-Limit from the API's latest answer", "scope"
        )
        by_lane = _gauge(
            "queue_depth_by_lane",
            "Requests waiting for a rate-limit permit, by the lane they wait in",
            "scope",
            "lane",
        )
        by_client = _gauge(
            "queue_depth_by_client",
            "Requests waiting for a rate-limit permit, by client (all scopes)",
            "client",
        )
        inflight = _gauge("inflight_requests", "Requests in flight upstream")
        daily = _gauge(
            "daily_requests_used", "API requests counted against today's budget (limits.per_day)"
        )
        used = _gauge(
            "window_requests_used",
            "Requests counted in each rate window's current period (reserve included)",
            "scope",
            "per",
        )
        budget = _gauge(
            "window_requests_limit",
            "Each rate window's budget as configured (limits.windows, or the shorthand's)",
            "scope",
            "per",
        )
        code_age = _gauge("auth_code_age_seconds", "Age of the newest auth code in use")
        session = _gauge(
            "session_valid", "1 while the proxy holds a usable auth session (scheme bearer: always)"
        )
        for name, s in sorted(self.sources.items()):
            for scope, state in s.scopes().items():
                depth.add_metric([name, scope], state.queue_depth)
                for lane, count in state.lane_depths.items():
                    by_lane.add_metric([name, scope, lane], count)
                if state.rate_limit_remaining is not None:
                    remaining.add_metric([name, scope], state.rate_limit_remaining)
                if state.rate_limit_limit is not None:
                    limit.add_metric([name, scope], state.rate_limit_limit)
            for client, count in sorted(s.client_depths().items()):
                by_client.add_metric([name, client], count)
            inflight.add_metric([name], s.inflight())
            daily.add_metric([name], s.daily_used())
            for window in s.windows():
                used.add_metric([name, window.scope, window.per], window.used)
                budget.add_metric([name, window.scope, window.per], window.limit)
            age = s.code_age()
            if age is not None:
                code_age.add_metric([name], age)
            session.add_metric([name], 1.0 if s.session_valid() else 0.0)
        yield from (depth, by_lane, by_client, remaining, limit, inflight, daily, used, budget)
        yield code_age
        yield session
        yield from self._operator_gauges()

    def _operator_gauges(self) -> Iterator[Metric]:
        """What alerts compare against: configured budgets and the process's own health,
        so no rule has to hard-code a deployment's numbers."""
        optional: list[tuple[str, str, Callable[[StateSources], float | None]]] = [
            (
                "daily_limit",
                "The day's budget of API requests (limits.per_day)",
                lambda s: s.daily_limit(),
            ),
            (
                "auth_code_lifetime_seconds",
                "How long an auth code lives (auth.code_lifetime)",
                lambda s: s.code_lifetime(),
            ),
            (
                "queue_max_size",
                "Requests that may wait in all before queue_full (queue.max_size)",
                lambda s: s.queue_max_size(),
            ),
            (
                "queue_max_wait_seconds",
                "Longest wait for a permit before queue_timeout (queue.max_wait)",
                lambda s: s.queue_max_wait(),
            ),
            (
                "limits_fallback_active",
                "1 while Redis is unreachable and this process works alone on "
                "limits.fallback_share of every limit",
                lambda s: 1.0 if s.limits_fallback() else 0.0,
            ),
            ("ready", "1 while /readyz answers 200 for the integration", lambda s: _one(s.ready())),
        ]
        for metric, doc, read in optional:
            family = _gauge(metric, doc)
            for name, s in sorted(self.sources.items()):
                value = read(s)
                if value is not None:
                    family.add_metric([name], value)
            yield family


def _one(flag: bool) -> float:
    return 1.0 if flag else 0.0


class _ReloadCollector(Collector):
    """The last config load: the process's (start-up or SIGHUP), and which integrations'
    sections it refused."""

    def __init__(self) -> None:
        self.source: Callable[[], ReloadState | None] = lambda: None

    def collect(self) -> Iterator[Metric]:
        reload = self.source()
        successful = GaugeMetricFamily(
            f"{PREFIX}_config_last_reload_successful",
            "1 if the last config load (start-up or SIGHUP) applied whole, 0 if it was "
            "refused or an integration's section was",
        )
        success_time = GaugeMetricFamily(
            f"{PREFIX}_config_last_reload_success_timestamp_seconds",
            "Unix time of the last config load that applied",
        )
        refused = GaugeMetricFamily(
            f"{PREFIX}_config_last_reload_refused",
            "1 for each integration whose section the last reload refused (it runs as before)",
            labels=["integration"],
        )
        if reload is not None:
            successful.add_metric([], 1.0 if reload.successful else 0.0)
            success_time.add_metric([], reload.success_time)
            for name in reload.refused:
                refused.add_metric([name], 1.0)
        yield successful
        yield success_time
        yield refused


class _Counter:
    """Counts per label values; exposed as `<name>_total`."""

    def __init__(
        self, name: str, doc: str, labels: Sequence[str], known: Sequence[str] = ()
    ) -> None:
        self.name, self.doc, self.labels = name, doc, list(labels)
        # One-label counters start every known value at zero (see the module docstring).
        self.counts: dict[tuple[str, ...], int] = {(value,): 0 for value in known}

    def inc(self, *values: str) -> None:
        counts = self.counts
        counts[values] = counts.get(values, 0) + 1

    def family(self, label: str) -> Metric:
        return CounterMetricFamily(self.name, self.doc, labels=[label, *self.labels])

    def add_to(self, family: Metric, value: str) -> None:
        assert isinstance(family, CounterMetricFamily)
        for values, count in sorted(self.counts.items()):
            family.add_metric([value, *values], count)


class _Histogram:
    """A histogram per label values: [count per bucket..., sum] in one list.

    One label: its value is the key. Several: a tuple of their values is.
    """

    def __init__(
        self,
        name: str,
        doc: str,
        label: str | Sequence[str],
        buckets: Sequence[float],
        known: Sequence[str] = (),
    ) -> None:
        self.name, self.doc = name, doc
        self.labels = [label] if isinstance(label, str) else list(label)
        self.bounds = list(buckets)
        # One slot per bound, one for +Inf, one for the sum; known values start at zero.
        self.series: dict[str | tuple[str, ...], list[float]] = {v: self._empty() for v in known}

    def _empty(self) -> list[float]:
        return [0.0] * (len(self.bounds) + 2)

    def expect(self, values: Iterable[str | tuple[str, ...]]) -> None:
        """Export these label values at zero until they are first observed."""
        for value in values:
            if value not in self.series:
                self.series[value] = self._empty()

    def observe(self, value: str | tuple[str, ...], amount: float) -> None:
        series = self.series.get(value)
        if series is None:
            series = self.series[value] = self._empty()
        # `le` buckets: a value equal to a bound belongs to that bound's bucket.
        series[bisect_left(self.bounds, amount)] += 1
        series[-1] += amount

    def family(self, label: str) -> Metric:
        return HistogramMetricFamily(self.name, self.doc, labels=[label, *self.labels])

    def add_to(self, family: Metric, integration: str) -> None:
        assert isinstance(family, HistogramMetricFamily)
        labels = [*(repr(float(b)) for b in self.bounds), "+Inf"]
        for value, series in sorted(self.series.items()):
            cumulative, buckets = 0.0, []
            for le, count in zip(labels, series[:-1], strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            values = list(value) if isinstance(value, tuple) else [value]
            family.add_metric([integration, *values], buckets, series[-1])


class _EventCollector(Collector):
    """Every integration's event counts, merged into one family per metric."""

    def __init__(self) -> None:
        self.integrations: dict[str, Sequence[_Counter | _Histogram]] = {}

    def collect(self) -> Iterator[Metric]:
        if not self.integrations:
            return
        parts = sorted(self.integrations.items())
        for i, metric in enumerate(parts[0][1]):
            family = metric.family("integration")
            for name, metrics in parts:
                metrics[i].add_to(family, name)
            yield family


class ProcessMetrics:
    """The process's registry: its own families once, each integration's with an
    `integration` label (integrations come and go with reloads)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._events = _EventCollector()
        self._states = _StateCollector()
        self._jobs = _JobsCollector()
        self._reload = _ReloadCollector()
        for collector in (self._events, self._states, self._jobs, self._reload):
            self.registry.register(collector)
        self._build = Info(
            f"{PREFIX}_build",
            "Version and configuration",
            ["integration"],
            registry=self.registry,
        )
        # The standard process_* (CPU, memory, file descriptors, start time) and python_*
        # (version, garbage collector) families: what every Prometheus dashboard for a
        # process expects. The proxy has its own registry, so they are added explicitly.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def watch_reload(self, source: Callable[[], ReloadState | None]) -> None:
        self._reload.source = source

    def add(self, metrics: Metrics) -> None:
        self._events.integrations[metrics.integration] = metrics.events

    def remove(self, integration: str) -> None:
        """An integration a reload removed: its series go from /metrics."""
        self._events.integrations.pop(integration, None)
        self._states.sources.pop(integration, None)
        self._jobs.sources.pop(integration, None)
        with contextlib.suppress(KeyError):
            self._build.remove(integration)


class Metrics:
    """One integration's metrics: its events and states, in the process's registry
    (a registry of its own when none is given)."""

    def __init__(self, integration: str = "default", process: ProcessMetrics | None = None) -> None:
        self.integration = integration
        self.process = process if process is not None else ProcessMetrics()
        self.registry = self.process.registry
        self._requests = _Counter(
            f"{PREFIX}_requests", "Client requests answered", ["method", "scope", "status"]
        )
        self._request_duration = _Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Total time seen by the client",
            "scope",
            _LATENCY_BUCKETS,
            REQUEST_SCOPES,
        )
        self._upstream_duration = _Histogram(
            f"{PREFIX}_upstream_duration_seconds",
            "One attempt upstream, until the answer's head arrived",
            "scope",
            _LATENCY_BUCKETS,
            LIMIT_SCOPES,
        )
        self._queue_wait = _Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Wait for a rate-limit permit, per attempt",
            "scope",
            _WAIT_BUCKETS,
            LIMIT_SCOPES,
        )
        self._lane_wait = _Histogram(
            f"{PREFIX}_queue_wait_by_lane_seconds",
            "Wait for a rate-limit permit, per attempt, by the lane admitted to and client",
            ("lane", "client"),
            _WAIT_BUCKETS,
        )
        self._upstream_responses = _Counter(
            f"{PREFIX}_upstream_responses", "Answers from the API, by status", ["status"]
        )
        self._retries = _Counter(
            f"{PREFIX}_retries", "Requests sent again, by reason", ["reason"], RETRY_REASONS
        )
        self._rejected = _Counter(
            f"{PREFIX}_rejected",
            "Answers the proxy made itself, by X-Proxy-Error reason",
            ["reason"],
            REJECT_REASONS,
        )
        self._auth = _Counter(
            f"{PREFIX}_auth_requests", "Logins and revocations, by result", ["result"], AUTH_RESULTS
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
        self.events: Sequence[_Counter | _Histogram] = (
            self._requests,
            self._request_duration,
            self._upstream_duration,
            self._queue_wait,
            self._lane_wait,
            self._upstream_responses,
            self._retries,
            self._rejected,
            self._auth,
            self._jobs_submitted,
            self._jobs_completed,
            self._job_callback_failures,
        )
        self.process.add(self)

    def describe(self, scheme: str, backend: str) -> None:
        self.process._build.labels(self.integration).info(
            {"version": __version__, "scheme": scheme, "backend": backend}
        )

    def watch(self, sources: StateSources) -> None:
        self.process._states.sources[self.integration] = sources

    def watch_jobs(self, source: Callable[[], JobsState]) -> None:
        """Durable jobs are on: their gauges, and their counters from zero (see the module
        docstring; a proxy without jobs exports none of them)."""
        self.process._jobs.sources[self.integration] = source
        self._jobs_submitted.counts.setdefault((), 0)
        for state in JOB_END_STATES:
            self._jobs_completed.counts.setdefault((state,), 0)
        for result in CALLBACK_RESULTS:
            self._job_callback_failures.counts.setdefault((result,), 0)

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

    def expect_lane_waits(self, lanes_and_clients: Iterable[tuple[str, str]]) -> None:
        """The (lane, client) pairs requests may wait in, at zero from the start (clients
        come from the config, so they are known in advance too)."""
        self._lane_wait.expect(lanes_and_clients)

    def queue_wait(self, scope: str, seconds: float, lane: str, client: str) -> None:
        self._queue_wait.observe(scope, seconds)
        self._lane_wait.observe((lane, client), seconds)

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

    def auth_count(self, result: str) -> int:
        """Logins (token fetches, revocations) so far that came to `result` (AUTH_RESULTS)."""
        return self._auth.counts.get((result,), 0)
