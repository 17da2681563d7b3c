"""The conformance cases (tests/conformance) against nginx and luxsci-proxy, side by side.

    python bench/conformance.py               # every case; writes docs/CONFORMANCE.md
    python bench/conformance.py --quick       # every third case; leaves docs/ alone
    python bench/conformance.py --only chunk  # cases whose name contains "chunk"; same

Both sides of the suite, the same tables the tests assert: the client side (raw bytes from a
client, a recording upstream behind the server) and the upstream side (a plain request, a
scripted upstream answering it with exact bytes). Each case is played against:

- nginx (the system's, `nginx -V`) as a plain reverse proxy: `proxy_pass` to the case's
  upstream, `proxy_http_version 1.1`, a keep-alive upstream pool, defaults otherwise except
  the limits a case declares (`client_header_timeout`, `client_body_timeout`, `send_timeout`
  and `keepalive_timeout` for its client timeout, `client_max_body_size`, and
  `large_client_header_buffers 8 <max_header_bytes>`); one nginx per set of limits;
- luxsci-proxy, the real CLI process (bench/services.py), Bearer scheme (no login; the two
  upstream cases about LuxSci's auth code run the LuxSci scheme), with the same limits.

Cases run concurrently in lanes, each lane a server port with an upstream of its own and
each case on its own connection; the limits stay per group. Prints one table (expected,
nginx, proxy, match or differ) and writes it to docs/CONFORMANCE.md with the nginx version,
the counts and, for every difference, the explanation kept in bench/conformance_notes.py.
Every process started is stopped, even when the run fails.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import conformance_notes as notes
import services as svc
from services import Cores, Procs, Service

from proxy.http.server import LINGER_SECONDS
from tests.conformance.cases import Case, Limits, RecordingUpstream, run_case
from tests.conformance.cases import Outcome as ClientOutcome
from tests.conformance.cases import verdict as client_verdict
from tests.conformance.client_cases import CLIENT_CASES
from tests.conformance.upstream_cases import (
    UPSTREAM_CASES,
    ScriptedUpstream,
    UpstreamCase,
    run_upstream_case,
)
from tests.conformance.upstream_cases import Outcome as UpstreamOutcome
from tests.conformance.upstream_cases import verdict as upstream_verdict

DOC = svc.REPO / "docs" / "CONFORMANCE.md"
NO_PIN = Cores(None, None)  # correctness, not speed: nothing is pinned
# After an answer that ends the connection: the proxy reads (and drops) an unfinished body
# for LINGER_SECONDS before it closes; nginx half-closes at once and lingers on its side.
# The slack tells such a close from a connection kept until the idle timeout.
CLOSE_WITHIN = {"nginx": 1.0, "proxy": LINGER_SECONDS + 1.0}
# No case may hold a lane longer than this, whatever the server does.
CASE_TIMEOUT = 60.0
SERVERS = ("nginx", "proxy")

T = TypeVar("T", Case, UpstreamCase)
R = TypeVar("R")


async def together(*coros: Coroutine[Any, Any, R]) -> list[R]:
    """Like gather, but when cancelled (or when one fails) it waits until every one has
    finished: each stops what it started in its `finally`, while the loop still runs."""
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(c) for c in coros]
    return [t.result() for t in tasks]


# -- one case's outcome, as a cell of the table ---------------------------------------------------


@dataclass
class Cell:
    summary: str  # what happened, in the terms of the expectation: "400 closed"
    problems: list[str] = field(default_factory=list)  # how it misses the expectation
    timing: str = ""  # what was measured, for --verbose

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        return f"{self.summary} {'✓' if self.ok else '✗'}"


@dataclass
class Row:
    side: str  # "client" or "upstream"
    name: str
    rfc: str
    expected: str
    cells: dict[str, Cell] = field(default_factory=dict)

    @property
    def match(self) -> bool:
        """Both meet the expectation, or both miss it the same way."""
        a, b = (self.cells.get(s) for s in SERVERS)
        if a is None or b is None:
            return False
        if a.ok and b.ok:
            return True
        return a.summary == b.summary and _fuzzy(a.problems) == _fuzzy(b.problems)


def _fuzzy(problems: list[str]) -> list[str]:
    """Problems with their measured numbers blurred: 2.31 s and 2.35 s are the same miss."""
    return [re.sub(r"\d+\.\d+", "#", p) for p in problems]


def _statuses(codes: Sequence[int]) -> str:
    if not codes:
        return "—"
    parts = []
    for code, run in itertools.groupby(codes):
        n = len(list(run))
        parts.append(f"{code} x{n}" if n > 1 else str(code))
    return "+".join(parts)


def client_expected(case: Case) -> str:
    return f"{_statuses(case.answers)} {'closed' if case.closed else 'kept'}"


def client_summary(outcome: ClientOutcome) -> str:
    statuses = _statuses([a.status for a in outcome.answers])
    if outcome.problem:
        return f"{statuses} hung"
    return f"{statuses} {'closed' if outcome.closed else 'kept'}"


def _reuse(reused: bool | None) -> str:
    return {True: ", reused", False: ", new conn", None: ""}[reused]


def upstream_expected(case: UpstreamCase) -> str:
    return f"{case.status} {case.fate}{_reuse(case.reused)}"


def upstream_summary(outcome: UpstreamOutcome) -> str:
    if outcome.problem:
        return f"{outcome.status or '—'} hung"
    return f"{outcome.status or '—'} {outcome.fate}{_reuse(outcome.reused)}"


# -- the servers ----------------------------------------------------------------------------------


def nginx_conf(
    workdir: Path, ports: list[int], upstream_ports: list[int], limits: Limits | None
) -> str:
    """nginx as a plain reverse proxy: one server per lane, each with its own upstream pool."""
    temp = "\n".join(
        f"    {kind}_temp_path {workdir}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    settings = ""
    if limits is not None:
        # The proxy's client_timeout bounds a head, a body, a write to the client and an idle
        # kept-alive connection: nginx has one directive for each.
        timeout = f"{round(limits.client_timeout * 1000)}ms"
        settings = f"""    client_header_timeout {timeout};
    client_body_timeout {timeout};
    send_timeout {timeout};
    keepalive_timeout {timeout};
    client_max_body_size {limits.max_body_bytes};
    large_client_header_buffers 8 {limits.max_header_bytes};
"""
    servers = "".join(
        f"""    upstream lane{n} {{
        server 127.0.0.1:{upstream_port};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://lane{n};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""
        for n, (port, upstream_port) in enumerate(zip(ports, upstream_ports, strict=True))
    )
    return f"""worker_processes 1;
error_log {workdir}/error.log info;
events {{}}
http {{
{temp}
    access_log off;
{settings}{servers}}}
"""


def proxy_conf(upstream_port: int, limits: Limits | None, scheme: str) -> dict[str, Any]:
    cfg = svc.proxy_config(svc.free_port(), svc.free_port(), upstream_port)
    # Straight to the local upstream, whatever HTTP_PROXY / HTTPS_PROXY the environment names.
    cfg["upstream"]["proxy"] = ""
    if scheme == "bearer":
        # From the environment, as the token is: a literal key in the file draws a warning.
        cfg["auth"] = {"scheme": "bearer", "api_key": "${BENCH_SECRET}"}
    if limits is not None:
        cfg["listen"].update(
            client_timeout=limits.client_timeout,
            max_body_bytes=limits.max_body_bytes,
            max_header_bytes=limits.max_header_bytes,
        )
    else:  # the upstream side: one attempt per request, each case one exchange upstream
        cfg["retry"] = {"max_attempts": 1}
    return cfg


@dataclass
class Lane:
    port: int
    upstream: Any  # RecordingUpstream or ScriptedUpstream: each lane has its own


class Run:
    """What one run has started (processes, upstreams) and what it found.

    Processes are spawned from the event loop's thread and only waited for in others:
    bench/services.py has the kernel kill a child when the thread that spawned it ends
    (PR_SET_PDEATHSIG), and the executor's threads end before this process does. Each
    is added to its group's list before the wait, so that the group stops it whatever
    happens next.
    """

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs = Procs()
        self.proxies: list[Service] = []
        self.nginxes: list[Service] = []
        self.terminated = False  # by SIGTERM
        self._names: Counter[str] = Counter()

    def _workdir(self, name: str) -> tuple[str, Path]:
        self._names[name] += 1
        unique = f"{name}-{self._names[name]}"
        workdir = self.tmp / unique
        workdir.mkdir()
        os.chmod(workdir, 0o755)  # nginx workers run as nobody when started by root
        return unique, workdir

    async def start_nginx(
        self, name: str, upstreams: list[Any], limits: Limits | None, group: list[Service]
    ) -> Service:
        """One nginx, a server for each upstream (as svc.start_nginx, waited for apart)."""
        unique, workdir = self._workdir(name)
        ports = [svc.free_port() for _ in upstreams]
        conf = workdir / "nginx.conf"
        conf.write_text(nginx_conf(workdir, ports, [u.port for u in upstreams], limits))
        argv = [
            svc.nginx_binary(),
            "-p",
            f"{workdir}/",
            "-c",
            str(conf),
            "-e",
            str(workdir / "error.log"),
            "-g",
            f"daemon off; pid {workdir}/nginx.pid;",
        ]
        service = self.procs.spawn(unique, argv, workdir, workdir / "stdout.log", ports[0])
        service.log_path = workdir / "error.log"
        service.extra["ports"] = ports
        group.append(service)
        self.nginxes.append(service)
        await asyncio.to_thread(svc.wait_port, service)
        return service

    async def start_proxy(
        self,
        name: str,
        upstream_port: int,
        limits: Limits | None,
        scheme: str,
        group: list[Service],
    ) -> Service:
        """The proxy's CLI (as svc.start_proxy, waited for apart)."""
        unique, workdir = self._workdir(name)
        cfg = proxy_conf(upstream_port, limits, scheme)
        config_path = workdir / "config.yaml"
        svc.write_config(config_path, cfg)
        env = dict(os.environ, BENCH_TOKEN="bench-token", BENCH_SECRET="bench-secret-key")
        env["PYTHONPATH"] = str(svc.REPO) + os.pathsep + env.get("PYTHONPATH", "")
        argv = [sys.executable, "-m", "proxy", "run", "--config", str(config_path)]
        port = cfg["listen"]["port"]
        service = self.procs.spawn(unique, argv, workdir, workdir / "proxy.log", port, env)
        service.admin_port = cfg["admin"]["port"]
        service.config_path = config_path
        group.append(service)
        self.proxies.append(service)
        await asyncio.to_thread(svc.wait_ready, service)
        # /readyz can say 200 a moment before the proxy port listens (the admin port opens
        # first, and the Bearer scheme is ready at once): wait for the port itself too.
        await asyncio.to_thread(svc.wait_port, service)
        return service

    async def stop(self, services: list[Service]) -> None:
        """Stopped while this loop still serves the upstreams (a LuxSci proxy revokes its
        session on the way out), all at once."""
        await asyncio.gather(
            *(asyncio.to_thread(self.procs.stop, s) for s in services), return_exceptions=True
        )


async def _lanes(
    items: list[T], lanes: list[Lane], play: Callable[[T, Lane], Awaitable[Cell]]
) -> dict[str, Cell]:
    """Each lane plays one case at a time, taking the next from a shared list."""
    queue = list(items)
    cells: dict[str, Cell] = {}

    async def worker(lane: Lane) -> None:
        while queue:
            item = queue.pop(0)
            try:
                async with asyncio.timeout(CASE_TIMEOUT):
                    cells[item.name] = await play(item, lane)
            except Exception as e:
                cells[item.name] = Cell("error", [f"the harness failed: {type(e).__name__}: {e}"])

    await together(*(worker(lane) for lane in lanes))
    return cells


def _not_run(items: Sequence[Case | UpstreamCase], error: BaseException) -> dict[str, Cell]:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    why = f"the server did not start: {type(error).__name__}: {error}"
    return {item.name: Cell("not run", [why]) for item in items}


# -- the client side ------------------------------------------------------------------------------


async def play_client(server: str, case: Case, lane: Lane) -> Cell:
    outcome = await run_case(lane.port, case, lane.upstream)
    # nginx's own error pages are HTML: the proxy's error shape is the proxy's alone.
    problems = client_verdict(
        case, outcome, close_within=CLOSE_WITHIN[server], proxy_errors=server == "proxy"
    )
    timing = f"answered {outcome.elapsed:.2f} s after the last step" if outcome.answers else ""
    if outcome.closed:
        timing += f", closed {outcome.closed_after:.2f} s after that"
    return Cell(client_summary(outcome), problems, timing.lstrip(", "))


async def client_group(
    run: Run, limits: Limits, cases: list[Case], lanes: int
) -> dict[str, dict[str, Cell]]:
    """One nginx with `lanes` servers, `lanes` proxies, all with these limits."""
    uppers = {s: [RecordingUpstream() for _ in range(lanes)] for s in SERVERS}
    for upstream in itertools.chain(*uppers.values()):
        await upstream.start()
    started: list[Service] = []
    try:
        tag = f"{limits.client_timeout:g}s-{limits.max_body_bytes}b-{limits.max_header_bytes}h"

        async def nginx_side() -> dict[str, Cell]:
            try:
                nginx = await run.start_nginx(
                    f"nginx-client-{tag}", uppers["nginx"], limits, started
                )
            except Exception as e:
                return _not_run(cases, e)
            ports = nginx.extra["ports"]
            lane_list = [Lane(p, u) for p, u in zip(ports, uppers["nginx"], strict=True)]
            return await _lanes(cases, lane_list, lambda c, ln: play_client("nginx", c, ln))

        async def proxy_side() -> dict[str, Cell]:
            try:
                proxies = await together(
                    *(
                        run.start_proxy(f"proxy-client-{tag}", u.port, limits, "bearer", started)
                        for u in uppers["proxy"]
                    )
                )
            except Exception as e:
                return _not_run(cases, e)
            lane_list = [Lane(p.port, u) for p, u in zip(proxies, uppers["proxy"], strict=True)]
            return await _lanes(cases, lane_list, lambda c, ln: play_client("proxy", c, ln))

        nginx_cells, proxy_cells = await together(nginx_side(), proxy_side())
        return {"nginx": nginx_cells, "proxy": proxy_cells}
    finally:
        await run.stop(started)
        for upstream in itertools.chain(*uppers.values()):
            await upstream.close()


async def client_side(run: Run, cases: list[Case], lanes: int) -> dict[str, dict[str, Cell]]:
    groups: dict[Limits, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.limits, []).append(case)
    biggest = max((len(g) for g in groups.values()), default=1)
    # Lanes in proportion to a group's size: the big default group gets them all.
    jobs = [
        client_group(run, limits, group, max(1, math.ceil(lanes * len(group) / biggest)))
        for limits, group in groups.items()
    ]
    cells: dict[str, dict[str, Cell]] = {s: {} for s in SERVERS}
    for found in await together(*jobs):
        for server in SERVERS:
            cells[server].update(found[server])
    return cells


# -- the upstream side ----------------------------------------------------------------------------


async def play_upstream(server: str, case: UpstreamCase, lane: Lane) -> Cell:
    outcome = await run_upstream_case(lane.port, case, lane.upstream)
    if server == "nginx":
        # What only the proxy can do is not asked of nginx: its own error answers (the
        # X-Proxy-Error header and body), and signing the next request with LuxSci's code.
        case = dataclasses.replace(case, proxy_error=None, signed_with=None)
    problems = upstream_verdict(case, outcome)
    if outcome.problem and outcome.status is None:
        # Nothing came: the verdict's list of everything missing says no more than that.
        problems = [f"no answer: {outcome.problem}"]
    return Cell(upstream_summary(outcome), problems)


async def upstream_side(
    run: Run, cases: list[UpstreamCase], lanes: int
) -> dict[str, dict[str, Cell]]:
    if not cases:
        return {s: {} for s in SERVERS}
    signed = [c for c in cases if c.signed_with]
    plain = [c for c in cases if not c.signed_with]
    n_nginx, n_bearer = min(lanes, len(cases)) or 1, min(lanes, len(plain)) or 1
    n_luxsci = 1 if signed else 0
    uppers = [ScriptedUpstream() for _ in range(n_nginx + n_bearer + n_luxsci)]
    for upstream in uppers:
        await upstream.start()
    for_nginx, for_bearer = uppers[:n_nginx], uppers[n_nginx : n_nginx + n_bearer]
    for_luxsci = uppers[n_nginx + n_bearer :]
    started: list[Service] = []
    try:

        async def nginx_side() -> dict[str, Cell]:
            try:
                nginx = await run.start_nginx("nginx-upstream", for_nginx, None, started)
            except Exception as e:
                return _not_run(cases, e)
            lane_list = [Lane(p, u) for p, u in zip(nginx.extra["ports"], for_nginx, strict=True)]
            return await _lanes(cases, lane_list, lambda c, ln: play_upstream("nginx", c, ln))

        async def proxy_side(scheme: str, items: list[UpstreamCase], ups: list[Any]):
            if not items:
                return {}
            try:
                proxies = await together(
                    *(
                        run.start_proxy(f"proxy-upstream-{scheme}", u.port, None, scheme, started)
                        for u in ups
                    )
                )
            except Exception as e:
                return _not_run(items, e)
            lane_list = [Lane(p.port, u) for p, u in zip(proxies, ups, strict=True)]
            return await _lanes(items, lane_list, lambda c, ln: play_upstream("proxy", c, ln))

        nginx_cells, bearer_cells, luxsci_cells = await together(
            nginx_side(),
            proxy_side("bearer", plain, for_bearer),
            proxy_side("luxsci", signed, for_luxsci),
        )
        return {"nginx": nginx_cells, "proxy": {**bearer_cells, **luxsci_cells}}
    finally:
        await run.stop(started)
        for upstream in uppers:
            await upstream.close()


# -- the run --------------------------------------------------------------------------------------


async def play_all(
    run: Run, client: list[Case], upstream: list[UpstreamCase], lanes: int
) -> list[Row]:
    """Both sides at once; rows in the tables' order."""
    # SIGTERM cancels the run, as Ctrl-C does: every group stops what it started while the
    # loop still serves the upstreams, then the run ends.
    task = asyncio.current_task()
    assert task is not None

    def terminate() -> None:
        run.terminated = True
        task.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, terminate)
    client_cells, upstream_cells = await together(
        client_side(run, client, lanes), upstream_side(run, upstream, lanes)
    )
    rows = []
    for c in client:
        cells = {s: client_cells[s][c.name] for s in SERVERS}
        rows.append(Row("client", c.name, c.rfc, client_expected(c), cells))
    for u in upstream:
        cells = {s: upstream_cells[s][u.name] for s in SERVERS}
        rows.append(Row("upstream", u.name, u.rfc, upstream_expected(u), cells))
    return rows


# A warning every proxy here logs once by design: the bench's upstreams speak plain HTTP.
EXPECTED_EVENTS = {"warning upstream_not_encrypted"}
# Warnings some cases are meant to cause.
EXPLAINED = {
    "warning upstream_failed_mid_body": "expected: the upstream cases that break an answer "
    "off after its head has gone out",
}


def log_findings(run: Run) -> list[str]:
    """What the servers logged that deserves a look: the proxy's warnings and errors (its
    refusals of bad requests are info), any traceback; nginx's alerts and worse."""
    events: Counter[str] = Counter()
    tracebacks = 0
    for service in run.proxies:
        for event, count in svc.log_notes(service).items():
            if event not in EXPECTED_EVENTS:
                events[event] += count
        tracebacks += _read(service.log_path).count("Traceback")
    found = [
        f"luxsci-proxy logged `{event}` x{count}"
        + (f" ({EXPLAINED[event]})" if event in EXPLAINED else "")
        for event, count in sorted(events.items())
    ]
    if tracebacks:
        found.append(f"luxsci-proxy logged {tracebacks} traceback(s)")
    levels: Counter[str] = Counter()
    for service in run.nginxes:
        levels.update(re.findall(r"\[(alert|crit|emerg)\]", _read(service.log_path)))
    found += [f"nginx logged [{level}] x{count}" for level, count in sorted(levels.items())]
    return found


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# -- the report -----------------------------------------------------------------------------------


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def table(rows: list[Row]) -> str:
    lines = [
        "| side | case | RFC | expected | nginx | luxsci-proxy | |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        nginx, proxy = (r.cells[s].text() for s in SERVERS)
        lines.append(
            f"| {r.side} | `{r.name}` | {r.rfc} | {_md(r.expected)} | {_md(nginx)} | "
            f"{_md(proxy)} | {'match' if r.match else '**differ**'} |"
        )
    return "\n".join(lines)


def counts(rows: list[Row]) -> str:
    lines = [
        "| side | cases | match | differ | nginx meets the expectation | luxsci-proxy meets it |",
        "|---|---|---|---|---|---|",
    ]
    for side in ("client", "upstream", None):
        these = [r for r in rows if side is None or r.side == side]
        if not these:
            continue
        matching = sum(r.match for r in these)
        met = [sum(r.cells[s].ok for r in these) for s in SERVERS]
        label = side or "**all**"
        lines.append(
            f"| {label} | {len(these)} | {matching} | {len(these) - matching} | "
            f"{met[0]} | {met[1]} |"
        )
    return "\n".join(lines)


def details(rows: list[Row]) -> str:
    """Every miss, server by server, in the verdict's own words."""
    out = []
    for r in rows:
        for server in SERVERS:
            cell = r.cells[server]
            if not cell.ok:
                label = "nginx" if server == "nginx" else "luxsci-proxy"
                out.append(f"- `{r.name}`, {label}: " + _md("; ".join(cell.problems)))
    return "\n".join(out) or "(none)"


def explanations(rows: list[Row]) -> tuple[str, list[str]]:
    """The themes that explain this run's differences, and the differences none explains."""
    differing = {r.name for r in rows if not r.match}
    covered: set[str] = set()
    parts = []
    for theme in notes.THEMES:
        here = [name for name in theme.cases if name in differing]
        covered.update(theme.cases)
        if not here:
            continue
        names = ", ".join(f"`{n}`" for n in here)
        parts.append(
            f"### {theme.title}\n\n*{theme.ruling[0].upper()}{theme.ruling[1:]}:* {names}\n\n"
            f"{theme.text.strip()}\n"
        )
    return "\n".join(parts), sorted(differing - covered)


def rulings(rows: list[Row]) -> str:
    """How many differences each ruling covers, by side."""
    ruling_of = {name: t.ruling for t in notes.THEMES for name in t.cases}
    lines = ["| the differences | client | upstream | all |", "|---|---|---|---|"]
    for ruling in (*notes.RULINGS, None):
        found = [r for r in rows if not r.match and ruling_of.get(r.name) == ruling]
        if ruling is None and not found:
            continue
        n = [sum(r.side == side for r in found) for side in ("client", "upstream")]
        label = ruling or "not explained yet"
        lines.append(f"| {label} | {n[0]} | {n[1]} | {len(found)} |")
    return "\n".join(lines)


def nginx_version() -> str:
    """`nginx/1.22.1`, with the distribution's package version when dpkg knows it."""
    done = subprocess.run([svc.nginx_binary(), "-v"], capture_output=True, text=True, check=False)
    version = (done.stderr or done.stdout).strip().removeprefix("nginx version: ")
    if shutil.which("dpkg-query"):
        package = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "nginx"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        if package:
            version += f" (Debian package {package})"
    return version


def git_commit() -> str:
    done = subprocess.run(
        ["git", "-C", str(svc.REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "unknown"


def markdown(rows: list[Row], elapsed: float, findings: list[str]) -> str:
    explained, unexplained = explanations(rows)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    missing = "\n".join(f"- `{n}`" for n in unexplained)
    unexplained_text = (
        f"\n### Not explained yet\n\nThese cases differ and bench/conformance_notes.py has no "
        f"explanation for them:\n\n{missing}\n"
        if unexplained
        else ""
    )
    found = "\n".join(f"- {f}" for f in findings) or (
        "- the proxies logged no warning, error or traceback (beyond `upstream_not_encrypted`, "
        "once each: the upstreams here speak plain HTTP); nginx no alert"
    )
    return f"""# HTTP/1.1 conformance: luxsci-proxy next to nginx

The conformance suite's cases ([`tests/conformance/`](../tests/conformance/)), each a raw
exchange with an expected outcome and the RFC section it rests on, played against nginx as a
plain reverse proxy and against luxsci-proxy, side by side, by
[`bench/conformance.py`](../bench/conformance.py). The test suite asserts the proxy's column;
this page shows where the reference differs, and why.

- Run: {when}, commit `{git_commit()}`, {elapsed:.0f} s
- nginx: {nginx_version()}, Python {platform.python_version()},
  {platform.system()} {platform.release()}

{counts(rows)}

## How the cases run

{notes.HOW.strip()}

## The differences

{notes.INTRO.strip()}

{rulings(rows)}

{explained}{unexplained_text}
## Every case

{notes.LEGEND.strip()}

{table(rows)}

## Where a server misses the expectation

{details(rows)}

## Notes from this run

{found}

Regenerate with `python bench/conformance.py` (about a minute; `--quick` runs every third case
and leaves this file alone).
"""


# -- main -----------------------------------------------------------------------------------------


def _on_sigterm(signum: int, frame: object) -> NoReturn:
    # Outside the event loop (inside, it cancels the run): unwind through every `finally`.
    print("terminated: stopping everything started", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="every third case; docs/ untouched")
    parser.add_argument("--only", help="cases whose name contains this; docs/ untouched")
    parser.add_argument("--lanes", type=int, default=3, help="concurrent cases per server")
    parser.add_argument("--doc", type=Path, default=DOC, help="where the report goes")
    parser.add_argument("--verbose", action="store_true", help="print each case's timing")
    parser.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    args = parser.parse_args()

    client, upstream = list(CLIENT_CASES), list(UPSTREAM_CASES)
    if args.quick:
        client, upstream = client[::3], upstream[::3]
    if args.only:
        client = [c for c in client if args.only in c.name]
        upstream = [u for u in upstream if args.only in u.name]
    partial = args.quick or bool(args.only)

    signal.signal(signal.SIGTERM, _on_sigterm)
    if not shutil.which(svc.nginx_binary()):
        print("nginx is not installed (apt-get install nginx)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="luxsci-conformance-"))
    os.chmod(tmp, 0o755)  # nginx workers (user nobody) must enter it
    run = Run(tmp)
    print(
        f"conformance{' (QUICK RUN)' if args.quick else ''}: {len(client)} client-side and "
        f"{len(upstream)} upstream-side cases, nginx {nginx_version()} and luxsci-proxy, "
        f"{args.lanes} lanes",
        flush=True,
    )
    began = time.monotonic()
    try:
        rows = asyncio.run(play_all(run, client, upstream, args.lanes))
        findings = log_findings(run)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: everything started is stopped", file=sys.stderr)
        return 128 + (signal.SIGTERM if run.terminated else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, _on_sigterm)  # the loop's handler went with it
        run.procs.stop_all()  # what an interrupted run left; normally nothing
        if args.keep_tmp:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - began

    print()
    if args.verbose:
        for r in rows:
            for server in SERVERS:
                cell = r.cells[server]
                print(f"{r.name:55} {server:6} {cell.text():28} {cell.timing}")
    print(table(rows))
    print()
    print(counts(rows))
    print()
    print(rulings(rows))
    print()
    print("Misses:")
    print(details(rows))
    _, unexplained = explanations(rows)
    if unexplained:
        print("\nDiffering, with no explanation in bench/conformance_notes.py:")
        print("\n".join(f"- {n}" for n in unexplained))
    if findings:
        print("\nNotes:\n" + "\n".join(f"- {f}" for f in findings))
    print(f"\n({elapsed:.0f} s)")
    if partial:
        print(f"partial run: {args.doc} left alone")
        return 0
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(markdown(rows, elapsed, findings))
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
