"""The proxy as a sidecar: idle memory, start-up, import profile, idle wake-ups, per-request
cost, each next to the code before the light-sidecar work (issue 16), all in one run.

    python bench/sidecar.py                # ~4 minutes
    python bench/sidecar.py --quick        # ~1.5 minutes: fewer repetitions, 10-s idle window
    python bench/sidecar.py --before REV   # another reference than BASELINE
    python bench/sidecar.py --no-doc       # print only; docs/BENCHMARKS.md is left alone

Both trees (this one, and --before checked out in a temporary git worktree) run with one
Python: a virtualenv holding only the proxy's runtime dependencies (pyproject's
`dependencies` and its `speed` extra, as the Dockerfile installs them), made once and kept
in the temp directory. A development environment has more, and it shows: pytest's tools
bring `rich`, which structlog imports whenever it is installed (~6 MiB). `--python` runs
another interpreter instead. Each tree's bytecode is compiled first, as a wheel install
does: with PYTHONDONTWRITEBYTECODE set (as here) every start would otherwise compile every
module of the tree.

What is measured, per tree (the proxy pinned to one core, as in run.py):
- idle RSS: VmRSS of `luxsci-proxy run` (memory backend, the day count kept in a state
  file as by default) once ready and after 5 requests; median of --reps starts;
- exec to listening: from Popen to the first accepted connection on the proxy port, scheme
  bearer (no login); median of --starts, the trees taking turns; and the CPU time the
  process used until then and the time it waited for a CPU that another process had
  (/proc/PID/task/*/schedstat): on a busy machine the wall time is mostly the sum of both;
- the import profile of that start-up (`python -X importtime`): self times summed by
  package and the slowest modules, medians of --profiles runs. A self time also holds
  any garbage collection that ran during that import;
- idle wake-ups: times any of the process's threads was scheduled onto a CPU
  (/proc/PID/task/*/schedstat), over --idle seconds after the requests, both trees idling
  side by side;
- per-request cost: wrk -c32 in interleaved rounds against the nginx proxy and both trees
  (run.py's full-feature config): CPU per request and requests/s, as ratios of nginx.

Figures are printed and written to docs/BENCHMARKS.md between the sidecar markers, followed
by bench/SIDECAR.md (hand-written: what moved, what is left and why).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import docblock
import services as svc
import wrk
from services import USER_PATH, Cores, Procs

DOC = svc.REPO / "docs" / "BENCHMARKS.md"
# Hand-written: what moved and what is left; follows the figures in the block.
ANALYSIS = Path(__file__).with_name("SIDECAR.md")
# The last commit before the light-sidecar work: main when branch `light` began.
BASELINE = "5b4d679"
MIB = 1024.0
# Issue 16's targets.
RSS_TARGET_MIB = 36.0
LISTEN_TARGET_S = 0.4
WAKEUPS_TARGET = 1.0
# Interleaved medians of the same code differ by a few percent here: a ratio counts as
# worse only beyond this.
COST_TOLERANCE = 0.05
ACCOUNT_PATH = "/perl/api/v2/account/42/things"


@dataclass
class Tree:
    label: str  # "before" or "after"
    path: Path
    rev: str
    rss: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    listen_s: list[float] = field(default_factory=list)
    listen_cpu_s: list[float] = field(default_factory=list)
    listen_waited_s: list[float] = field(default_factory=list)
    import_ms: list[float] = field(default_factory=list)
    modules: list[int] = field(default_factory=list)
    by_package: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    by_module: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    wakeups_per_s: float | None = None
    cpu_us: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)


@dataclass
class Run:
    python: str
    quick: bool
    cores: Cores
    trees: list[Tree]
    started: float = field(default_factory=time.time)
    load: str = ""
    interpreter_s: list[float] = field(default_factory=list)
    nginx_cpu_us: list[float] = field(default_factory=list)
    nginx_rps: list[float] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


# -- environment ---------------------------------------------------------------------------


def runtime_python(tmp_root: Path) -> str:
    """A virtualenv with the proxy's runtime dependencies and nothing else (made once)."""
    project = tomllib.loads((svc.REPO / "pyproject.toml").read_text())["project"]
    wanted = sorted([*project["dependencies"], *project["optional-dependencies"]["speed"]])
    tag = hashlib.sha256(("\n".join([sys.version, *wanted])).encode()).hexdigest()[:12]
    venv = tmp_root / f"luxsci-sidecar-venv-{tag}"
    python = venv / "bin" / "python"
    if not (venv / "ready").exists():
        print(f"making the runtime virtualenv {venv} ({len(wanted)} requirements)", flush=True)
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, *wanted], check=True)
        (venv / "ready").write_text("\n".join(wanted) + "\n")
    return str(python)


@contextlib.contextmanager
def checkout(rev: str, where: Path) -> Iterator[Path]:
    """`rev` in a temporary git worktree, removed afterwards."""
    subprocess.run(
        ["git", "-C", str(svc.REPO), "worktree", "add", "--detach", "--quiet", str(where), rev],
        check=True,
    )
    try:
        yield where
    finally:
        subprocess.run(
            ["git", "-C", str(svc.REPO), "worktree", "remove", "--force", str(where)],
            check=False,
        )


def describe(rev: str) -> str:
    short = subprocess.run(
        ["git", "-C", str(svc.REPO), "rev-parse", "--short", rev],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return short


def dirty() -> bool:
    out = subprocess.run(
        ["git", "-C", str(svc.REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return bool(out.strip())


def compile_tree(python: str, tree: Path) -> None:
    subprocess.run([python, "-m", "compileall", "-q", str(tree / "proxy")], check=True)


# -- /proc -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sched:
    cpu_s: float  # time on a CPU
    waited_s: float  # time ready to run, waiting for a CPU another process had
    runs: int  # times scheduled onto a CPU: each wake-up is one


def schedstat(pid: int) -> Sched:
    """/proc/PID/task/*/schedstat, summed over the process's live threads."""
    cpu_ns = waited_ns = runs = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            on_cpu, waited, slices = (int(x) for x in (task / "schedstat").read_text().split())
            cpu_ns += on_cpu
            waited_ns += waited
            runs += slices
    return Sched(cpu_ns / 1e9, waited_ns / 1e9, runs)


# -- configs -----------------------------------------------------------------------------------


def config(scheme: str, upstream_port: int, workdir: Path) -> dict[str, Any]:
    """run.py's config with the memory backend's state file on, as by default."""
    cfg = svc.proxy_config(svc.free_port(), svc.free_port(), upstream_port)
    cfg["limits"]["state_file"] = str(workdir / "limits.json")
    if scheme == "bearer":
        cfg["auth"] = {"scheme": "bearer", "api_key": "${BENCH_TOKEN}"}
    return cfg


def get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def some_requests(service: svc.Service) -> None:
    for path in (USER_PATH, ACCOUNT_PATH) * 2 + (USER_PATH,):
        status = get(service.port, path)
        if status != 200:
            raise RuntimeError(f"{service.name} answered {status} to {path}")


# -- measurements --------------------------------------------------------------------------------


def measure_rss(run: Run, tmp: Path, upstream: svc.Service, reps: int) -> None:
    procs = Procs()
    try:
        for i in range(reps):
            for scheme in ("luxsci", "bearer"):
                for tree in run.trees:
                    name = f"rss-{tree.label}-{scheme}-{i}"
                    workdir = tmp / f"{name}-state"
                    workdir.mkdir()
                    cfg = config(scheme, upstream.port, workdir)
                    lux = svc.start_proxy(
                        procs, name, tmp, run.cores.sut, run.cores, cfg,
                        tree=tree.path, python=run.python,
                    )  # fmt: skip
                    some_requests(lux)
                    time.sleep(1)  # the log's flush and the count's write are done
                    tree.rss[scheme].append(svc.status_kb(lux.pid, "VmRSS") / MIB)
                    procs.stop(lux)
        for tree in run.trees:
            print(f"   {tree.label}: idle RSS {fmt_dict(tree.rss, ' MiB')}", flush=True)
    finally:
        procs.stop_all()


def _until_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the proxy exited with {proc.returncode} at start-up")
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.002)
    raise RuntimeError(f"not listening within {timeout} s")


def _start_once(
    run: Run, tree: Tree, cfg_path: Path, port: int, log: Path, importtime: bool = False
) -> subprocess.Popen[bytes]:
    argv = [*run.cores.taskset(run.cores.sut), run.python]
    if importtime:
        argv += ["-X", "importtime"]
    argv += ["-m", "proxy", "run", "--config", str(cfg_path)]
    with log.open("wb") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=out,
            cwd=tree.path,
            env=svc.proxy_env(tree.path),
            preexec_fn=svc._die_with_parent,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def measure_startup(run: Run, tmp: Path, upstream: svc.Service, starts: int) -> None:
    """Exec to listening (bearer: no login), the trees taking turns; and the interpreter alone."""
    paths: dict[str, tuple[Path, int]] = {}
    for tree in run.trees:
        workdir = tmp / f"start-{tree.label}"
        workdir.mkdir()
        cfg = config("bearer", upstream.port, workdir)
        svc.write_config(workdir / "config.yaml", cfg)
        paths[tree.label] = (workdir / "config.yaml", cfg["listen"]["port"])
    for i in range(starts + 1):  # the first round warms the page cache, and is not counted
        bare = [*run.cores.taskset(run.cores.sut), run.python, "-c", "pass"]
        began = time.perf_counter()
        subprocess.run(bare, check=True)
        if i:
            run.interpreter_s.append(time.perf_counter() - began)
        for tree in run.trees:
            cfg_path, port = paths[tree.label]
            began = time.perf_counter()
            proc = _start_once(run, tree, cfg_path, port, cfg_path.with_suffix(".log"))
            try:
                _until_listening(port, proc)
                wall = time.perf_counter() - began
                sched = schedstat(proc.pid)
            finally:
                _stop(proc)
            if i:
                tree.listen_s.append(wall)
                tree.listen_cpu_s.append(sched.cpu_s)
                tree.listen_waited_s.append(sched.waited_s)
    for tree in run.trees:
        print(
            f"   {tree.label}: exec to listening {med(tree.listen_s):.3f} s "
            f"(CPU {med(tree.listen_cpu_s):.3f} s)",
            flush=True,
        )


def measure_imports(run: Run, tmp: Path, upstream: svc.Service, profiles: int) -> None:
    """`-X importtime` of a `run` until it listens: what the start-up imported, and for how long."""
    for tree in run.trees:
        workdir = tmp / f"imports-{tree.label}"
        workdir.mkdir()
        cfg = config("bearer", upstream.port, workdir)
        cfg_path = workdir / "config.yaml"
        svc.write_config(cfg_path, cfg)
        for i in range(profiles):
            log = workdir / f"importtime-{i}.log"
            proc = _start_once(run, tree, cfg_path, cfg["listen"]["port"], log, importtime=True)
            try:
                _until_listening(cfg["listen"]["port"], proc)
            finally:
                _stop(proc)
            _, packages, modules = parse_importtime(log.read_text(errors="replace"))
            tree.import_ms.append(sum(packages.values()))
            tree.modules.append(len(modules))
            for name, ms in packages.items():
                tree.by_package[name].append(ms)
            for name, ms in modules.items():
                tree.by_module[name].append(ms)
        print(
            f"   {tree.label}: imports {med(tree.import_ms):.0f} ms, "
            f"{med(tree.modules):.0f} modules",
            flush=True,
        )


def parse_importtime(text: str) -> tuple[float, dict[str, float], dict[str, float]]:
    """(total ms, self ms by top-level package, self ms by module) of -X importtime lines."""
    packages: dict[str, float] = defaultdict(float)
    modules: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, _cumulative, name = line[len("import time:") :].split("|")
        name = name.strip()
        modules[name] = int(own) / 1000
        packages[name.split(".")[0]] += int(own) / 1000
    return sum(packages.values()), dict(packages), modules


def measure_wakeups(run: Run, tmp: Path, upstream: svc.Service, seconds: float) -> None:
    """Both trees idle side by side; count how often their threads got a CPU."""
    procs = Procs()
    try:
        running = []
        for tree in run.trees:
            name = f"idle-{tree.label}"
            workdir = tmp / f"{name}-state"
            workdir.mkdir()
            cfg = config("luxsci", upstream.port, workdir)
            lux = svc.start_proxy(
                procs, name, tmp, run.cores.sut, run.cores, cfg, tree=tree.path, python=run.python
            )
            some_requests(lux)
            running.append((tree, lux))
        time.sleep(2)  # the requests' own aftermath (log flush, the count's write)
        before = {tree.label: schedstat(lux.pid).runs for tree, lux in running}
        time.sleep(seconds)
        for tree, lux in running:
            tree.wakeups_per_s = (schedstat(lux.pid).runs - before[tree.label]) / seconds
            print(f"   {tree.label}: {tree.wakeups_per_s:.2f} wake-ups/s idle", flush=True)
    finally:
        procs.stop_all()


def measure_cost(run: Run, tmp: Path, upstream: svc.Service, rounds: int, seconds: int) -> None:
    """floor.py's comparison, with both trees: CPU per request and requests/s as x nginx."""
    procs = Procs()
    cores = run.cores
    try:
        systems: dict[str, svc.Service] = {
            "nginx": svc.start_nginx(
                procs,
                "nginx-proxy",
                tmp,
                cores.sut,
                cores,
                lambda d, p: svc.nginx_proxy_conf(d, p, upstream.port),
            )
        }
        for tree in run.trees:
            cfg = svc.proxy_config(svc.free_port(), svc.free_port(), upstream.port)
            systems[tree.label] = svc.start_proxy(
                procs, f"cost-{tree.label}", tmp, cores.sut, cores, cfg,
                tree=tree.path, python=run.python,
            )  # fmt: skip
        load = cores.taskset(cores.load)
        trees = {tree.label: tree for tree in run.trees}
        for i in range(rounds):
            for name, service in systems.items():
                url = f"http://127.0.0.1:{service.port}{USER_PATH}"
                if i == 0:
                    wrk.run(load, url, 32, 1)  # warm-up: connections, the login
                pids = svc.process_tree(service.pid)
                cpu_before = svc.cpu_seconds(pids)
                result = wrk.run(load, url, 32, seconds)
                cpu_us = (svc.cpu_seconds(pids) - cpu_before) / result.requests * 1e6
                if result.non_2xx or result.socket_errors:
                    run.errors[f"wrk {name}"] = f"{result.non_2xx} non-2xx, {result.socket_errors}"
                if name == "nginx":
                    run.nginx_cpu_us.append(cpu_us)
                    run.nginx_rps.append(result.rps)
                else:
                    trees[name].cpu_us.append(cpu_us)
                    trees[name].rps.append(result.rps)
        for tree in run.trees:
            print(
                f"   {tree.label}: {med(tree.cpu_us):.0f} µs/request "
                f"({med(tree.cpu_us) / med(run.nginx_cpu_us):.1f}x nginx), "
                f"{med(tree.rps):,.0f} requests/s "
                f"({med(tree.rps) / med(run.nginx_rps):.3f}x nginx)",
                flush=True,
            )
    finally:
        procs.stop_all()


# -- report ----------------------------------------------------------------------------------


def med(values: list[float] | list[int]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def fmt_dict(d: dict[str, list[float]], unit: str) -> str:
    return ", ".join(f"{k} {med(v):.1f}{unit}" for k, v in d.items())


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("PASS" if ok else "MISS")


def report(run: Run, took: float) -> str:
    before, after = run.trees
    lines: list[str] = []
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(run.started))
    quick = " **QUICK RUN** (`--quick`): fewer repetitions, a 10-s idle window."
    quick = quick if run.quick else ""
    lines += [
        "## A light sidecar (bench/sidecar.py)",
        "",
        f"Generated by `python bench/sidecar.py` on {when} (took {took / 60:.1f} min).{quick} "
        f"One run: **before** is `{before.rev}` (the code before issue 16's light-sidecar "
        f"work), **after** is `{after.rev}`. Both run on the same interpreter, "
        f"{run_environment(run)}; load average at the start: {run.load}. "
        "See the docstring of `bench/sidecar.py` for how each figure is taken.",
        "",
        "| figure | before | after | target |  |",
        "|---|---|---|---|---|",
    ]

    def row(name: str, b: str, a: str, target: str = "", ok: bool | None = None) -> None:
        lines.append(f"| {name} | {b} | {a} | {target} | {verdict(ok)} |")

    for scheme in ("luxsci", "bearer"):
        b, a = med(before.rss[scheme]), med(after.rss[scheme])
        row(
            f"idle RSS, scheme {scheme}, memory backend (median of {len(after.rss[scheme])})",
            f"{b:.1f} MiB",
            f"{a:.1f} MiB ({a - b:+.1f})",
            f"≤ {RSS_TARGET_MIB:.0f} MiB",
            a <= RSS_TARGET_MIB if a == a else None,
        )
    b, a = med(before.listen_s), med(after.listen_s)
    row(
        f"exec to listening, scheme bearer (median of {len(after.listen_s)})",
        f"{b:.3f} s",
        f"{a:.3f} s",
        f"≤ {LISTEN_TARGET_S} s",
        a <= LISTEN_TARGET_S if a == a else None,
    )
    row(
        "… CPU time the process used until listening",
        f"{med(before.listen_cpu_s):.3f} s",
        f"{med(after.listen_cpu_s):.3f} s",
    )
    row(
        "… time it was ready to run but another process had the CPU",
        f"{med(before.listen_waited_s):.3f} s",
        f"{med(after.listen_waited_s):.3f} s",
    )
    bare = f"{med(run.interpreter_s):.3f} s"
    row("… of which the interpreter alone (`python -c pass`, wall)", bare, bare)
    row(
        f"import time of that start-up (sum of self times, median of {len(after.import_ms)})",
        f"{med(before.import_ms):.0f} ms",
        f"{med(after.import_ms):.0f} ms",
    )
    row("modules that start-up imports", f"{med(before.modules):.0f}", f"{med(after.modules):.0f}")
    if before.wakeups_per_s is not None and after.wakeups_per_s is not None:
        row(
            "idle wake-ups per second (scheme luxsci, state file on)",
            f"{before.wakeups_per_s:.2f}",
            f"{after.wakeups_per_s:.2f}",
            f"≤ {WAKEUPS_TARGET:.0f}",
            after.wakeups_per_s <= WAKEUPS_TARGET,
        )
    if run.nginx_cpu_us and before.cpu_us and after.cpu_us:
        ref_cpu, ref_rps = med(run.nginx_cpu_us), med(run.nginx_rps)
        cb, ca = med(before.cpu_us) / ref_cpu, med(after.cpu_us) / ref_cpu
        rb, ra = med(before.rps) / ref_rps, med(after.rps) / ref_rps
        rounds = len(after.cpu_us)
        row(
            f"CPU per request, x nginx proxy (wrk -c32, median of {rounds} rounds)",
            f"{cb:.2f}x ({med(before.cpu_us):.0f} µs)",
            f"{ca:.2f}x ({med(after.cpu_us):.0f} µs)",
            "no worse",
            ca <= cb * (1 + COST_TOLERANCE),
        )
        row(
            "requests/s, x nginx proxy",
            f"{rb:.3f}x ({med(before.rps):,.0f})",
            f"{ra:.3f}x ({med(after.rps):,.0f})",
            "no worse",
            ra >= rb * (1 - COST_TOLERANCE),
        )
        lines += [
            "",
            f"The nginx proxy in the same rounds: {ref_cpu:.0f} µs per request, "
            f'{ref_rps:,.0f} requests/s. "No worse" allows {COST_TOLERANCE:.0%}: interleaved '
            "medians of the same code differ by that much on this machine.",
        ]
    lines += ["", *import_tables(before, after)]
    if run.errors:
        lines += ["", "Notes from this run:", ""]
        lines += [f"- {k}: {v}" for k, v in run.errors.items()]
    if ANALYSIS.exists():
        lines += ["", ANALYSIS.read_text().rstrip()]
    return "\n".join(lines) + "\n"


def import_tables(before: Tree, after: Tree, top: int = 12) -> list[str]:
    def medians(d: dict[str, list[float]]) -> dict[str, float]:
        return {k: med(v) for k, v in d.items()}

    pb, pa = medians(before.by_package), medians(after.by_package)
    names = sorted(set(pb) | set(pa), key=lambda n: -max(pb.get(n, 0), pa.get(n, 0)))[:top]
    out = [
        "Import time of the start-up by package (`-X importtime`, sum of self times, median ms):",
        "",
        "| package | before | after |",
        "|---|---|---|",
    ]
    out += [f"| {n} | {pb.get(n, 0):.1f} | {pa.get(n, 0):.1f} |" for n in names]
    ma = medians(after.by_module)
    slowest = sorted(ma.items(), key=lambda kv: -kv[1])[:top]
    out += [
        "",
        "Slowest modules to import, after (median self ms): "
        + ", ".join(f"`{n}` {ms:.1f}" for n, ms in slowest)
        + ".",
    ]
    return out


def run_environment(run: Run) -> str:
    versions = subprocess.run(
        [
            run.python,
            "-c",
            "import importlib.metadata as m, platform; print(platform.python_version(), "
            "*(f'{d} {m.version(d)}' for d in ('aiohttp', 'uvloop', 'structlog')), sep=', ')",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    has_rich = (
        subprocess.run(
            [run.python, "-c", "import rich"], capture_output=True, check=False
        ).returncode
        == 0
    )
    kind = "this Python" if has_rich else "a virtualenv with the runtime dependencies only"
    return f"{kind} (Python {versions}; `rich` {'present' if has_rich else 'absent'})"


# -- main --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--before", default=BASELINE, help=f"reference (default {BASELINE})")
    parser.add_argument("--python", help="interpreter (default: a runtime-only virtualenv)")
    parser.add_argument("--no-doc", action="store_true", help="print only")
    args = parser.parse_args()
    reps, starts, profiles, idle, rounds, secs = (
        (2, 5, 3, 10.0, 2, 3) if args.quick else (3, 11, 5, 30.0, 3, 4)
    )
    began = time.monotonic()
    tmp_root = Path(tempfile.gettempdir())
    python = args.python or runtime_python(tmp_root)
    cores = Cores.detect()
    if cores.load is not None:
        os.sched_setaffinity(0, {cores.load})  # the benchmark itself off the proxy's core
    procs = Procs()
    with (
        tempfile.TemporaryDirectory(prefix="luxsci-sidecar-") as tmp_name,
        checkout(args.before, Path(tmp_name) / "before") as before_path,
    ):
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o755)  # nginx's workers (nobody) enter it
        after_rev = describe("HEAD") + (" with uncommitted changes" if dirty() else "")
        trees = [
            Tree("before", before_path, describe(args.before)),
            Tree("after", svc.REPO, after_rev),
        ]
        run = Run(python, args.quick, cores, trees, load=f"{os.getloadavg()[0]:.1f}")
        print(f"before {trees[0].rev}, after {trees[1].rev}; python {python}", flush=True)
        for tree in trees:
            compile_tree(python, tree.path)
        steps: list[tuple[str, Callable[[svc.Service], None]]] = [
            ("idle RSS", lambda up: measure_rss(run, tmp, up, reps)),
            ("exec to listening", lambda up: measure_startup(run, tmp, up, starts)),
            ("import profile", lambda up: measure_imports(run, tmp, up, profiles)),
            ("idle wake-ups", lambda up: measure_wakeups(run, tmp, up, idle)),
            ("per-request cost", lambda up: measure_cost(run, tmp, up, rounds, secs)),
        ]
        try:
            upstream = svc.start_upstream(procs, tmp, cores)
            for name, step in steps:
                print(f"== {name}", flush=True)
                try:
                    step(upstream)
                except Exception as e:  # one failed measurement is a note, not the end
                    run.errors[name] = f"{type(e).__name__}: {e}"
                    print(f"   failed: {run.errors[name]}", flush=True)
        finally:
            procs.stop_all()
    text = report(run, time.monotonic() - began)
    print()
    print(text)
    if not args.no_doc:
        docblock.write_block(DOC, "sidecar", text)
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
