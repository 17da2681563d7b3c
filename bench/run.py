"""The proxy's cost next to nginx, its memory, and its rate limiter, all in one run on loopback.

    python bench/run.py            # full run, ~10-15 minutes
    python bench/run.py --quick    # ~2-minute smoke version (marked QUICK in the output)

Prints one table and writes docs/BENCHMARKS.md and docs/benchmarks.png. bench/README.md says
what each figure means. The proxy is run through its CLI, as a deployment would run it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import loadgen
import report
import services as svc
import wrk
from report import PARKED, Results
from services import USER_PATH, Cores, Procs

BUDGET = 300  # limiter runs: permits per window
OVERLOAD = 10  # ... offered at this multiple of the budget
WINDOWS = 3  # ... for this many whole windows
LANES_BUDGET = 100  # lanes run: permits per window, spent at each window's start by low requests
HIGH_PATH = "/perl/api/v2/user/high@example.com/profile"  # the high requests' (same budget)


@dataclass(frozen=True)
class Ctx:
    tmp: Path
    cores: Cores
    quick: bool

    @property
    def warmup_s(self) -> int:
        return 1 if self.quick else 2

    @property
    def wrk_s(self) -> int:
        return 5 if self.quick else 10

    @property
    def window_s(self) -> int:
        # 3 whole windows: 30 s in a quick run, 3 minutes (the API's real minutes) in a full one.
        return 10 if self.quick else 60

    def workdir(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir()
        os.chmod(path, 0o755)  # nginx workers (user nobody) must enter it
        return path


# -- set-up ------------------------------------------------------------------------------------


def ensure_tools() -> None:
    """A fresh machine has none of the reference tools: install them the way .ci/run does."""
    wanted = {
        "nginx": "nginx",
        "wrk": "wrk",
        "redis-server": "redis-server",
        "taskset": "util-linux",
    }
    missing = [pkg for tool, pkg in wanted.items() if not shutil.which(tool)]
    if "nginx" in missing and os.access("/usr/sbin/nginx", os.X_OK):
        missing.remove("nginx")  # installed, just not on this PATH
    if missing:
        print(f"installing: {' '.join(missing)}", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)
    python_missing = [
        m
        for m in ("aiohttp", "structlog", "prometheus_client", "redis", "yaml")
        if importlib.util.find_spec(m) is None
    ]
    if python_missing:  # the proxy's own dependencies
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "-e", str(svc.REPO)]
        subprocess.run(pip, check=True)
    if importlib.util.find_spec("matplotlib") is None:
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"]
        subprocess.run(pip, check=True)


def raise_nofile() -> None:
    """10,000 parked connections need 10,000 descriptors in the client (this process) and as
    many in the proxy (children inherit the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < PARKED + 500:
        print(f"warning: RLIMIT_NOFILE hard limit {hard} is low for {PARKED:,} connections")


def _on_sigterm(signum: int, frame: object) -> NoReturn:
    # Unwind through every `finally`, so every process started is stopped.
    print("terminated: stopping everything started", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


# -- (a) (b) (c): throughput, latency, CPU, RSS, API calls ---------------------------------------


def measure_cost(ctx: Ctx, res: Results) -> None:
    work = ctx.workdir("cost")
    cores = ctx.cores
    procs = Procs()
    try:
        upstream = svc.start_upstream(procs, work, cores)
        targets: dict[str, svc.Service] = {"direct": upstream}
        # The two proxies start independently: one failing still leaves the other's figures.
        try:
            targets["nginx"] = svc.start_nginx(
                procs,
                "nginx-proxy",
                work,
                cores.sut,
                cores,
                lambda d, p: svc.nginx_proxy_conf(d, p, upstream.port),
            )
        except Exception as e:
            res.errors["(b) nginx proxy start-up"] = f"{type(e).__name__}: {e}"
        try:
            cfg = svc.proxy_config(svc.free_port(), svc.free_port(), upstream.port)
            lux = svc.start_proxy(procs, "luxsci-proxy", work, cores.sut, cores, cfg)
            targets["luxsci"] = lux
            res.idle_rss_kb = svc.status_kb(lux.pid, "VmRSS")
        except Exception as e:
            res.errors["(c) luxsci-proxy start-up"] = f"{type(e).__name__}: {e}"
        for conns in (32, 1):
            for key, service in targets.items():
                try:
                    _wrk_system(ctx, res, key, service, conns)
                except Exception as e:
                    res.errors[f"{report.SYSTEMS[key]}, {conns} connection(s)"] = (
                        f"{type(e).__name__}: {e}"
                    )
        if "luxsci" in targets:
            _proxy_figures(res, targets["luxsci"])
        if "nginx" in res.wrk1 and "direct" in res.wrk1:
            added_b = res.wrk1["nginx"].latency_us[99] - res.wrk1["direct"].latency_us[99]
            if added_b > 1000:
                res.notes.append(
                    f"the nginx reference (b) also adds {added_b / 1000:.1f} ms at p99 with 1 "
                    "connection: on this machine any hop to the other CPU has a noisy tail, so "
                    "read (c)'s p99 against (b)'s as well as (a)'s"
                )
    finally:
        procs.stop_all()


def _wrk_system(ctx: Ctx, res: Results, key: str, service: svc.Service, conns: int) -> None:
    url = f"http://127.0.0.1:{service.port}{USER_PATH}"
    prefix = ctx.cores.taskset(ctx.cores.load)
    if conns == 1:
        res.wrk1[key] = r = wrk.run(prefix, url, 1, ctx.wrk_s)
        _wrk_notes(res, key, "1 connection", r)
        return
    wrk.run(prefix, url, conns, ctx.warmup_s)
    pids = svc.process_tree(service.pid)
    before = svc.cpu_seconds(pids)
    res.wrk32[key] = r = wrk.run(prefix, url, conns, ctx.wrk_s)
    res.cpu_us[key] = (svc.cpu_seconds(pids) - before) / r.requests * 1e6
    _wrk_notes(res, key, f"{conns} connections", r)
    print(f"   {report.SYSTEMS[key]}: {r.rps:,.0f} req/s at {conns} connections", flush=True)


def _proxy_figures(res: Results, lux: svc.Service) -> None:
    """(c)'s memory peak, its API calls per request, and whatever it answered or logged."""
    res.peak_rss_kb = svc.status_kb(lux.pid, "VmHWM")
    samples = svc.metrics(lux)
    answered = svc.metric_sum(samples, "luxsci_proxy_requests_total")
    upstream_calls = svc.metric_sum(samples, "luxsci_proxy_upstream_responses_total")
    res.api_calls = (upstream_calls, answered)
    statuses = svc.by_label(samples, "luxsci_proxy_requests_total", "status")
    if set(statuses) - {"200"}:
        res.notes.append(f"(c) answered statuses other than 200 under wrk: {statuses}")
    # wrk counts only completed requests, the proxy also the warm-ups: a sanity check only.
    sent = sum(r.requests for rs in (res.wrk32, res.wrk1) for k, r in rs.items() if k == "luxsci")
    if answered < sent:
        res.notes.append(f"(c) counted {answered:,.0f} requests, fewer than wrk's {sent:,}")
    _log_notes(res, lux)


def _wrk_notes(res: Results, key: str, what: str, r: wrk.WrkResult) -> None:
    if r.non_2xx:
        res.notes.append(f"{report.SYSTEMS[key]}, {what}: {r.non_2xx:,} non-2xx answers (wrk)")
    if r.socket_errors:
        res.notes.append(f"{report.SYSTEMS[key]}, {what}: socket errors: {r.socket_errors}")


# Warnings the benchmark's own set-up causes: a plain-http upstream is the point of a loopback run.
EXPECTED_WARNINGS = {"warning upstream_not_encrypted"}


def _log_notes(res: Results, service: svc.Service) -> None:
    for event, count in sorted(svc.log_notes(service).items()):
        if event in EXPECTED_WARNINGS:
            continue
        res.notes.append(f"{service.name} logged `{event}` x{count}")


# -- memory of parked requests -----------------------------------------------------------------


def measure_parked(ctx: Ctx, res: Results) -> None:
    work = ctx.workdir("parked")
    cores = ctx.cores
    procs = Procs()
    try:
        upstream = svc.start_upstream(procs, work, cores)
        cfg = svc.proxy_config(
            svc.free_port(),
            svc.free_port(),
            upstream.port,
            user_per_minute=1,
            window_seconds=60,
            max_connections=2 * PARKED,
            queue={"max_size": 2 * PARKED, "max_wait": 600},
        )
        lux = svc.start_proxy(procs, "luxsci-proxy-parked", work, cores.sut, cores, cfg)
        asyncio.run(_park_and_release(lux, cfg, res.parked))
        pk = res.parked
        if "note" in pk:
            res.notes.append(f"parked run: {pk['note']}")
        if pk.get("reloaded") is False:
            res.notes.append("parked run: no `config_reloaded` event in the proxy's log")
        if pk.get("first_answer_s", 0) > 2:
            res.notes.append(
                f"parked run: the first parked request was answered {pk['first_answer_s']:.1f} s "
                f"after SIGHUP raised the budget (the next rate window began "
                f"{pk['next_window_s']:.1f} s after it): the new limit took effect at the window "
                f"boundary, not at once; all were answered after {pk['release_seconds']:.1f} s"
            )
        _log_notes(res, lux)
    finally:
        procs.stop_all()


async def _park_and_release(lux: svc.Service, cfg: dict[str, Any], out: dict[str, Any]) -> None:
    first = await loadgen.one_request(lux.port, USER_PATH)
    if first != "200":
        raise RuntimeError(f"the request spending the window's only permit got {first}")
    # Baseline after one request went through, so lazily built state (the upstream pool,
    # the first code harvested) is not charged to the parked requests.
    base = svc.status_kb(lux.pid, "VmRSS")
    parked = await loadgen.park(lux.port, USER_PATH, PARKED)
    try:
        depth = 0.0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            samples = await asyncio.to_thread(svc.metrics, lux)
            depth = svc.metric_sum(samples, "luxsci_proxy_queue_depth", scope="user")
            # A new window may let one through: parked + answered is what was sent.
            if depth + parked.answered() >= PARKED:
                break
            await asyncio.sleep(0.5)
        out["depth"] = depth
        if depth + parked.answered() < PARKED:
            out["note"] = f"only {depth:,.0f} of {PARKED:,} requests ever showed as queued"
        await asyncio.sleep(1)  # let the allocator settle before reading RSS
        rss = svc.status_kb(lux.pid, "VmRSS")
        out["rss_base_kb"], out["rss_parked_kb"] = base, rss
        out["kb_per_request"] = (rss - base) / max(depth, 1)
        print(f"   {depth:,.0f} parked, {out['kb_per_request']:.2f} KiB each", flush=True)
        # Raise the budget live; the proxy reloads limits on SIGHUP.
        cfg["limits"]["user_per_minute"] = 100_000_000
        assert lux.config_path is not None
        svc.write_config(lux.config_path, cfg)
        started = time.monotonic()
        # For reading the figure: when the limiter's next window opens anyway.
        out["next_window_s"] = 60 - time.time() % 60
        os.kill(lux.pid, signal.SIGHUP)
        limit = 180  # a whole rate window and then some: answers may wait for the next one
        waiting = {t for t in parked.tasks if not t.done()}
        if waiting:
            _, waiting = await asyncio.wait(
                waiting, timeout=limit, return_when=asyncio.FIRST_COMPLETED
            )
        out["first_answer_s"] = time.monotonic() - started
        if waiting:
            await asyncio.wait(waiting, timeout=max(0.0, started + limit - time.monotonic()))
        out["release_seconds"] = time.monotonic() - started
        outcomes = parked.outcomes()
        out["outcomes"] = dict(outcomes)
        out["answered_200"] = outcomes.get("200", 0)
        out["reloaded"] = svc.log_has_event(lux, "config_reloaded")
        print(f"   after SIGHUP: {dict(outcomes)} in {out['release_seconds']:.1f} s", flush=True)
    finally:
        await parked.cancel()


# -- the rate limiter under overload -----------------------------------------------------------


def measure_limiter(ctx: Ctx, res: Results, processes: int) -> None:
    work = ctx.workdir(f"limiter-{processes}")
    cores = ctx.cores
    window = ctx.window_s
    procs = Procs()
    out: dict[str, Any] = {}
    res.limiter[processes] = out
    try:
        upstream = svc.start_upstream(procs, work, cores, limit=BUDGET, access_log=True)
        redis_url = None
        if processes > 1:
            redis = svc.start_redis(procs, work, cores.load, cores)
            redis_url = f"redis://127.0.0.1:{redis.port}/0"
        proxies = []
        for i in range(processes):
            cfg = svc.proxy_config(
                svc.free_port(),
                svc.free_port(),
                upstream.port,
                user_per_minute=BUDGET,
                window_seconds=window,
                max_connections=20_000,
                redis_url=redis_url,
            )
            proxies.append(
                svc.start_proxy(procs, f"luxsci-proxy-{i + 1}", work, cores.sut, cores, cfg)
            )
        # Start on a window boundary so the run covers exactly WINDOWS whole windows.
        now = time.time()
        start = (math.floor(now / window) + 1) * window
        if start - now < 1:
            start += window
        print(f"   offering {OVERLOAD}x the budget from the next window ({start - now:.0f} s)")
        offered = asyncio.run(
            loadgen.offer(
                [p.port for p in proxies],
                USER_PATH,
                rate=OVERLOAD * BUDGET / window,
                start_at=start,
                duration=WINDOWS * window,
            )
        )
        out["offered"] = offered.offered
        out["client"] = dict(offered.outcomes)
        out["gave_up"] = offered.gave_up
        forbidden = 0.0
        for p in proxies:
            samples = svc.metrics(p)
            forbidden += svc.metric_sum(
                samples, "luxsci_proxy_upstream_responses_total", status="403"
            )
        out["upstream_403"] = int(forbidden)
        for p in proxies:
            _log_notes(res, p)
        # Stop nginx first: its access log is complete once it has exited.
        procs.stop(upstream)
        first = round(start / window)
        counts: Counter[int] = Counter()
        for line in (upstream.workdir / "access.log").read_text().splitlines():
            stamp, method, uri, _status = line.split()
            if method == "GET" and uri.startswith("/perl/api/v2/user/"):
                counts[math.floor(float(stamp) / window)] += 1
        per_window = [counts[first + k] for k in range(WINDOWS)]
        out["per_window"] = per_window
        out["used"] = sum(per_window)
        out["allowed"] = BUDGET * WINDOWS
        out["over_budget"] = sum(max(0, c - BUDGET) for c in counts.values())
        out["utilisation_pct"] = 100.0 * out["used"] / out["allowed"]
        print(
            f"   {out['utilisation_pct']:.1f}% of the budget used, per window {per_window}, "
            f"client saw {dict(offered.outcomes)}",
            flush=True,
        )
    finally:
        procs.stop_all()


# -- lanes: a high request while 10,000 low ones wait -----------------------------------------


def measure_lanes(ctx: Ctx, res: Results) -> None:
    """10,000 low requests park on a small budget; high requests sent at different moments of
    a window must go with the next permit. The upstream's access log says what it got when."""
    work = ctx.workdir("lanes")
    cores = ctx.cores
    window = ctx.window_s
    out = res.lanes
    procs = Procs()
    try:
        upstream = svc.start_upstream(procs, work, cores, limit=LANES_BUDGET, access_log=True)
        cfg = svc.proxy_config(
            svc.free_port(),
            svc.free_port(),
            upstream.port,
            user_per_minute=LANES_BUDGET,
            window_seconds=window,
            max_connections=2 * PARKED,
            # Nothing times out or ages during the run: the lows stay low and queued.
            queue={"max_size": 2 * PARKED, "max_wait": 3600, "aging": 3600},
        )
        lux = svc.start_proxy(procs, "luxsci-proxy-lanes", work, cores.sut, cores, cfg)
        samples = 3 if ctx.quick else 5
        sent = asyncio.run(_high_among_parked(lux, window, samples, out))
        _log_notes(res, lux)
        procs.stop(upstream)  # its access log is complete once it has exited
        arrivals: list[tuple[float, str]] = []
        for line in (upstream.workdir / "access.log").read_text().splitlines():
            stamp, method, uri, _status = line.split()
            if method == "GET" and uri.startswith("/perl/api/v2/user/"):
                arrivals.append((float(stamp), uri))
        arrivals.sort()
        highs = [t for t, uri in arrivals if uri == HIGH_PATH]
        added, ahead = [], []
        for began, reached in zip(sent, highs, strict=False):
            after = [(t, uri) for t, uri in arrivals if began <= t <= reached]
            # From the first permit after it was sent (its own, when it goes first).
            added.append(reached - after[0][0])
            # Those of the same millisecond are the same burst of permits: not ahead of it.
            ahead.append(sum(1 for t, uri in after if uri != HIGH_PATH and t < reached))
        out["interval_s"] = window / LANES_BUDGET
        out["added_s"], out["lows_ahead"] = added, ahead
        print(
            f"   high request's added wait: {', '.join(f'{a * 1000:.1f} ms' for a in added)} "
            f"(permit interval {out['interval_s'] * 1000:.0f} ms); low requests reaching the "
            f"upstream a millisecond or more before it: {ahead}; whole waits "
            f"{', '.join(f'{w:.2f} s' for w in out['waits_s'])}",
            flush=True,
        )
    finally:
        procs.stop_all()


async def _high_among_parked(
    lux: svc.Service, window: float, samples: int, out: dict[str, Any]
) -> list[float]:
    """Park the lows, then send one high request per window, each at another moment of it;
    returns when each was sent (wall time)."""
    parked = await loadgen.park(lux.port, USER_PATH, PARKED, headers="X-Proxy-Priority: low\r\n")
    sent: list[float] = []
    try:
        deadline = time.monotonic() + 120
        depth = 0.0
        while time.monotonic() < deadline:
            samples_now = await asyncio.to_thread(svc.metrics, lux)
            depth = svc.metric_sum(samples_now, "luxsci_proxy_queue_depth", scope="user")
            if depth + parked.answered() >= PARKED:
                break
            await asyncio.sleep(0.5)
        out["depth"] = depth
        out["outcomes"], out["waits_s"] = [], []
        for i in range(samples):
            # (i + 0.5) / samples of the way into the next window: early, middle, late.
            now = time.time()
            at = (math.floor(now / window) + 1) * window + (i + 0.5) / samples * window
            await asyncio.sleep(at - now)
            began = time.time()
            outcome = await loadgen.one_request(
                lux.port, HIGH_PATH, headers="X-Proxy-Priority: high\r\n"
            )
            sent.append(began)
            out["waits_s"].append(time.time() - began)
            out["outcomes"].append(outcome)
    finally:
        await parked.cancel()
    return sent


# -- main --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="~2-minute smoke version")
    parser.add_argument(
        "--docs", type=Path, default=svc.REPO / "docs", help="where BENCHMARKS.md and the plot go"
    )
    parser.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    parser.add_argument(
        "--only",
        choices=["cost", "parked", "limiter1", "limiter3", "lanes"],
        action="append",
        help="run only these measurements (repeatable); docs/ is then left alone",
    )
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, _on_sigterm)
    ensure_tools()
    raise_nofile()
    cores = Cores.detect()
    info = report.machine()  # before pinning: `nproc` counts only the CPUs a process may use
    if cores.load is not None:
        # The Python load generators run in this process: keep them off the proxy's core.
        os.sched_setaffinity(0, {cores.load})
    res = Results(quick=args.quick, pinning=cores.describe())
    print(f"luxsci-proxy benchmarks{' (QUICK RUN)' if args.quick else ''}; pinning: {res.pinning}")
    tmp = Path(tempfile.mkdtemp(prefix="luxsci-bench-"))
    os.chmod(tmp, 0o755)
    ctx = Ctx(tmp, cores, args.quick)
    steps: list[tuple[str, str, Callable[[], None]]] = [
        ("cost", "throughput, latency, CPU and RSS", lambda: measure_cost(ctx, res)),
        ("parked", f"{PARKED:,} parked requests", lambda: measure_parked(ctx, res)),
        ("limiter1", "limiter, 1 process", lambda: measure_limiter(ctx, res, 1)),
        ("limiter3", "limiter, 3 processes on Redis", lambda: measure_limiter(ctx, res, 3)),
        ("lanes", f"high requests among {PARKED:,} low ones", lambda: measure_lanes(ctx, res)),
    ]
    if args.only:
        steps = [s for s in steps if s[0] in args.only]
    try:
        for _, name, step in steps:
            print(f"== {name}", flush=True)
            began = time.monotonic()
            try:
                step()
            except Exception as e:  # one failed measurement is a MISS, not the end of the run
                traceback.print_exc()
                res.errors[name] = f"{type(e).__name__}: {e}"
            print(f"   ({time.monotonic() - began:.0f} s)", flush=True)
    finally:
        if args.keep_tmp:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    res.elapsed = time.time() - res.started

    if args.only:  # a partial run must not replace the published figures
        print()
        print(report.table(res))
        for note in [*(f"{k} failed: {v}" for k, v in res.errors.items()), *res.notes]:
            print(f"- {note}")
        return 0
    args.docs.mkdir(parents=True, exist_ok=True)
    plot_name: str | None = "benchmarks.png"
    try:
        report.plot(res, args.docs / "benchmarks.png")
    except Exception as e:
        res.notes.append(f"plot failed: {type(e).__name__}: {e}")
        plot_name = None
    text = report.markdown(res, info, plot_name)
    (args.docs / "BENCHMARKS.md").write_text(text)
    print()
    print(text.split("## How measured")[0].rstrip())
    print(f"\nwrote {args.docs / 'BENCHMARKS.md'} and {args.docs / 'benchmarks.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
