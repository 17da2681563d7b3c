"""Turning one run's figures into the table, docs/BENCHMARKS.md and docs/benchmarks.png."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services import REPO, nginx_binary
from wrk import WrkResult

SYSTEMS = {"direct": "(a) direct", "nginx": "(b) nginx proxy", "luxsci": "(c) luxsci-proxy"}
PARKED = 10_000


@dataclass
class Results:
    quick: bool
    pinning: str
    started: float = field(default_factory=time.time)
    elapsed: float = 0.0
    wrk32: dict[str, WrkResult] = field(default_factory=dict)
    wrk1: dict[str, WrkResult] = field(default_factory=dict)
    cpu_us: dict[str, float] = field(default_factory=dict)
    idle_rss_kb: int | None = None
    peak_rss_kb: int | None = None
    # (upstream answers incl. the start-up login, client requests answered) of (c).
    api_calls: tuple[float, float] | None = None
    parked: dict[str, Any] = field(default_factory=dict)
    # Number of proxy processes -> figures of that limiter run.
    limiter: dict[int, dict[str, Any]] = field(default_factory=dict)
    # The lanes run: high requests sent while PARKED low ones wait.
    lanes: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# -- formatting --------------------------------------------------------------------------------


def _us(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 1000:
        return f"{value / 1000:.2f} ms"
    return f"{value:.0f} µs"


def _num(value: float | None, digits: int = 0, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{unit}"


def _verdict(ok: bool | None) -> str:
    return "PASS" if ok else "MISS"


def _pct(rs: dict[str, WrkResult], key: str, p: int) -> float | None:
    r = rs.get(key)
    return r.latency_us.get(p) if r else None


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


Row = tuple[str, str, str, str, str, str]


def rows(r: Results) -> list[Row]:
    """One table: figure | (a) | (b) | (c) | target | verdict."""
    out: list[Row] = []
    rps = {k: v.rps for k, v in r.wrk32.items()}
    ratio = rps["luxsci"] / rps["nginx"] if "luxsci" in rps and rps.get("nginx") else None
    out.append(
        (
            "requests/s, 32 connections",
            _num(rps.get("direct")),
            _num(rps.get("nginx")),
            _num(rps.get("luxsci")) + (f" ({ratio:.3f}x (b))" if ratio is not None else ""),
            "(c) ≥ 0.12x (b)",
            _verdict(ratio is not None and ratio >= 0.12),
        )
    )
    for conns, rs in ((1, r.wrk1), (32, r.wrk32)):
        for p in (50, 99):
            out.append(
                (
                    f"latency p{p}, {conns} connection{'s' if conns > 1 else ''}",
                    _us(_pct(rs, "direct", p)),
                    _us(_pct(rs, "nginx", p)),
                    _us(_pct(rs, "luxsci", p)),
                    "",
                    "",
                )
            )
    for p, limit in ((50, 250.0), (99, 1000.0)):
        direct = _pct(r.wrk1, "direct", p)
        added_b = _diff(_pct(r.wrk1, "nginx", p), direct)
        added_c = _diff(_pct(r.wrk1, "luxsci", p), direct)
        out.append(
            (
                f"added latency p{p}, 1 connection (vs (a))",
                "—",
                _us(added_b),
                _us(added_c),
                f"(c) ≤ {_us(limit)}",
                _verdict(added_c is not None and added_c <= limit),
            )
        )
    cpu_c = r.cpu_us.get("luxsci")
    out.append(
        (
            "CPU time per request, 32 connections",
            _us(r.cpu_us.get("direct")) + " (upstream nginx)" if "direct" in r.cpu_us else "n/a",
            _us(r.cpu_us.get("nginx")),
            _us(cpu_c),
            "(c) ≤ 150 µs",
            _verdict(cpu_c is not None and cpu_c <= 150),
        )
    )
    idle = r.idle_rss_kb / 1024 if r.idle_rss_kb is not None else None
    out.append(
        (
            "RSS idle after start-up",
            "",
            "",
            _num(idle, 1, " MiB"),
            "≤ 50 MiB",
            _verdict(idle is not None and idle <= 50),
        )
    )
    peak = r.peak_rss_kb / 1024 if r.peak_rss_kb is not None else None
    out.append(("RSS peak (VmHWM) after the wrk runs", "", "", _num(peak, 1, " MiB"), "", ""))
    pk = r.parked
    per = pk.get("kb_per_request")
    out.append(
        (
            f"RSS per request parked in the queue ({PARKED:,} parked)",
            "",
            "",
            _num(per, 2, " KiB") + (f" (depth {pk['depth']:,.0f})" if "depth" in pk else ""),
            "≤ 12 KiB",
            _verdict(per is not None and per <= 12),
        )
    )
    ok200 = pk.get("answered_200")
    after = pk.get("release_seconds")
    first = pk.get("first_answer_s")
    out.append(
        (
            "parked requests answered 200 after the budget was raised (SIGHUP)",
            "",
            "",
            f"{_num(ok200)} / {PARKED:,}"
            + (
                f" (first after {first:.1f} s, all after {after:.1f} s)"
                if after is not None and first is not None
                else ""
            ),
            f"all {PARKED:,}",
            _verdict(ok200 == PARKED),
        )
    )
    for n, goal in ((1, 98.0), (3, 95.0)):
        lim = r.limiter.get(n, {})
        util = lim.get("utilisation_pct")
        over = lim.get("over_budget")
        forbidden = lim.get("upstream_403")
        label = "1 process" if n == 1 else f"{n} processes sharing Redis"
        value = "n/a"
        if util is not None:
            value = (
                f"{util:.1f}% ({lim['used']}/{lim['allowed']}; per window "
                f"{'/'.join(str(c) for c in lim['per_window'])}); "
                f"{over} over budget, {forbidden} upstream 403"
            )
        out.append(
            (
                f"limiter use under 10x overload, {label}",
                "",
                "",
                value,
                f"≥ {goal:.0f}%, 0 rejections",
                _verdict(util is not None and util >= goal and over == 0 and forbidden == 0),
            )
        )
        if lim.get("client"):
            shown = ", ".join(f"{k}: {v:,}" for k, v in sorted(lim["client"].items()))
            out.append(
                (
                    f"… client answers ({label}, {lim['offered']:,} offered; "
                    "200s include the window after the run)",
                    "",
                    "",
                    shown
                    + (
                        f"; still queued at the end (client hung up): {lim['gave_up']:,}"
                        if lim["gave_up"]
                        else ""
                    ),
                    "503s expected",
                    "",
                )
            )
    ln = r.lanes
    added, interval = ln.get("added_s"), ln.get("interval_s")
    ok = None
    value = "n/a"
    if added and interval is not None:
        worst = max(added)
        ok = worst <= interval and all(o == "200" for o in ln.get("outcomes", []))
        value = (
            f"{worst * 1000:.1f} ms at most over {len(added)} (each: "
            f"{', '.join(f'{a * 1000:.1f}' for a in added)} ms; low ones a millisecond or "
            "more ahead: "
            f"{ln.get('lows_ahead')}; whole waits, to the next window: "
            f"{', '.join(f'{w:.2f}' for w in ln.get('waits_s', []))} s)"
        )
    out.append(
        (
            f"added wait of a high request, {PARKED:,} low ones queued (lanes)",
            "",
            "",
            value,
            "≤ 1 permit interval" + (f" ({interval * 1000:.0f} ms)" if interval else ""),
            _verdict(ok),
        )
    )
    calls = None
    if r.api_calls is not None and r.api_calls[1]:
        calls = r.api_calls[0] / r.api_calls[1]
    out.append(
        (
            "API calls per client request (wrk runs of (c))",
            "",
            "",
            f"{calls:.5f} ({r.api_calls[0]:,.0f} / {r.api_calls[1]:,.0f})"
            if calls is not None and r.api_calls is not None
            else "n/a",
            "≤ 1.001",
            _verdict(calls is not None and calls <= 1.001),
        )
    )
    return out


def table(r: Results) -> str:
    header = ("figure", *SYSTEMS.values(), "target", "")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows(r)]
    return "\n".join(lines)


def verdicts(r: Results) -> tuple[int, int]:
    marks = [row[5] for row in rows(r) if row[5]]
    return marks.count("PASS"), marks.count("MISS")


# -- machine and versions ----------------------------------------------------------------------


def _cmd(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError as e:
        return f"unavailable ({e.strerror})"
    return (done.stdout + done.stderr).strip().splitlines()[0] if done.stdout + done.stderr else ""


def _dist(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        model = found[1].strip() if found else model
    except OSError:
        pass
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proxy_version = subprocess.run(
        [sys.executable, "-m", "proxy", "--version"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        check=False,
    ).stdout.strip()
    return {
        "uname -srm": _cmd(["uname", "-srm"]),
        "nproc": _cmd(["nproc"]),
        "CPU": model,
        "python": platform.python_version(),
        "aiohttp": _dist("aiohttp"),
        "uvloop": _dist("uvloop"),
        "httptools": _dist("httptools"),
        "nginx": _cmd([nginx_binary(), "-v"]).replace("nginx version: ", ""),
        "wrk": " ".join(_cmd(["wrk", "-v"]).split()[:2]),
        "redis-server": _cmd(["redis-server", "--version"]),
        "luxsci-proxy": proxy_version or "unknown",
    }


# -- writing -----------------------------------------------------------------------------------


def markdown(r: Results, info: dict[str, str], plot_name: str | None) -> str:
    passed, missed = verdicts(r)
    date = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(r.started))
    parts = ["# Benchmarks", ""]
    if r.quick:
        parts += [
            "> **QUICK RUN** (`python bench/run.py --quick`): 5-s wrk runs, 10-s rate windows and "
            "30-s overload runs. Indicative only; `python bench/run.py` is the full run.",
            "",
        ]
    parts += [
        f"Generated by `python bench/run.py{' --quick' if r.quick else ''}` on {date} "
        f"(took {r.elapsed / 60:.1f} min). All figures come from this one run, so ratios "
        "between columns hold even on a noisy machine. See `bench/README.md` for how to read them.",
        "",
        "## Machine",
        "",
        *(f"- {k}: `{v}`" for k, v in info.items()),
        f"- pinning: {r.pinning}",
        "",
        "## Results",
        "",
        f"**{passed} PASS, {missed} MISS.**",
        "",
        table(r),
        "",
    ]
    if plot_name:
        parts += [f"![latency and throughput]({plot_name})", ""]
    if r.errors or r.notes:
        parts += ["## Notes from this run", ""]
        parts += [f"- **{k} failed**: {v}" for k, v in r.errors.items()]
        parts += [f"- {n}" for n in r.notes]
        parts += [""]
    if ANALYSIS.exists():  # hand-written: the profile and the reasons behind any MISS
        parts += [ANALYSIS.read_text().rstrip(), ""]
    parts += [HOW_MEASURED]
    return "\n".join(parts)


ANALYSIS = Path(__file__).with_name("ANALYSIS.md")


HOW_MEASURED = """## How measured

- **Upstream**: nginx (1 worker) answers every path with a fixed LuxSci-shaped success body
  and `X-RateLimit-Limit/Remaining/Reset` headers; `POST /perl/api/v2/auth` answers 201 with a
  code. Its Limit is huge except in the limiter runs, where it equals the budget.
- **(a) direct**: wrk → upstream. **(b) nginx proxy**: wrk → nginx (`proxy_pass`, keep-alive
  pool of 64) → upstream. **(c) luxsci-proxy**: wrk → one proxy process (scheme `luxsci`, JSON
  access log at level info to a file, metrics on, limits too high to throttle) → upstream.
  Requests go to `/perl/api/v2/user/joe@example.com/profile`.
- **Throughput and latency**: `wrk -t1 -c32 --latency` after a warm-up, then `-c1`; p50/p99
  as wrk reports them. Added latency = p(c) - p(a) and p(b) - p(a) at 1 connection.
- **CPU per request**: utime+stime from `/proc/PID/stat` of the system under test (nginx:
  master and worker) around the 32-connection run, divided by wrk's request count.
- **RSS**: VmRSS after start-up (login done, no traffic); VmHWM after all wrk runs.
- **Parked requests**: a proxy with `user_per_minute: 1` spends its permit on one request, then
  10,000 raw asyncio connections each send one GET; once `luxsci_proxy_queue_depth` shows them
  all waiting, (VmRSS - VmRSS before they arrived) / 10,000. The config is then rewritten
  with a huge budget and the proxy gets SIGHUP; every parked request must get a 200.
- **Limiter**: budget 300 per window (60 s; 10 s with `--quick`), the upstream's Limit equal
  to it, an open-loop client offering 10x the budget for 3 whole windows (started on a window
  boundary). Permits used are counted by the upstream itself (its access log, `$msec` per
  request, bucketed into the windows): used ÷ (budget x windows). Requests beyond the budget
  in any window would have been 403s from the real API ("over budget"). The proxy's own 503s
  (`queue_full`, `queue_timeout`) are expected under 10x overload and listed separately. The
  Redis run shares one budget between three proxy processes, the load round-robin over them.
- **Lanes**: a budget of 100 per window (60 s; 10 s with `--quick`), 10,000 requests with
  `X-Proxy-Priority: low` parked in the queue, then one `X-Proxy-Priority: high` request per
  window, each at another moment of it. The upstream's access log says when each request
  reached it: the added wait is the high request's arrival less the first arrival after it was
  sent (its own, when it went first), against one permit interval (window ÷ budget).
- **API calls per client request**: (c)'s `luxsci_proxy_upstream_responses_total` (every API
  answer, the start-up login included) ÷ `luxsci_proxy_requests_total` over its wrk runs.
"""


def plot(r: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt

    fig, (lat, thr) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    groups = [("p50, 1 conn", r.wrk1, 50), ("p99, 1 conn", r.wrk1, 99)]
    groups += [("p50, 32 conns", r.wrk32, 50), ("p99, 32 conns", r.wrk32, 99)]
    width = 0.8 / len(SYSTEMS)
    for i, (key, label) in enumerate(SYSTEMS.items()):
        xs = [g + (i - 1) * width for g in range(len(groups))]
        values = [(_pct(rs, key, p) or 0.0) for _, rs, p in groups]
        bars = lat.bar(xs, values, width, label=label)
        lat.bar_label(bars, labels=[_us(v) if v else "" for v in values], fontsize=7, rotation=90)
    lat.set_xticks(range(len(groups)), [g[0] for g in groups])
    lat.set_yscale("log")
    tallest = max((_pct(rs, k, p) or 1.0) for _, rs, p in groups for k in SYSTEMS)
    lat.set_ylim(top=tallest * 6)  # room for the rotated value labels above the bars
    lat.set_ylabel("latency (µs, log scale)")
    lat.set_title("Latency percentiles (wrk --latency)")
    lat.legend(fontsize=8, loc="upper left")
    names = list(SYSTEMS.values())
    values = [r.wrk32[k].rps if k in r.wrk32 else 0.0 for k in SYSTEMS]
    bars = thr.bar(names, values, color=["C0", "C1", "C2"])
    thr.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    thr.set_ylabel("requests/s")
    thr.set_ylim(top=max([*values, 1.0]) * 1.12)
    thr.set_title("Throughput, 32 connections")
    thr.tick_params(axis="x", labelsize=8)
    title = "luxsci-proxy vs nginx on loopback" + (" (QUICK RUN)" if r.quick else "")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
