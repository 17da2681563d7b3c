"""The processes a benchmark compares: start them pinned, wait, read their state, stop them.

Everything here talks to real processes over loopback or /proc; the proxy is a black box run
through its CLI, so the benchmark measures what a deployment would run.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
USER_PATH = "/perl/api/v2/user/joe@example.com/profile"
# A LuxSci-shaped success answer: every success carries a fresh auth code.
AUTH_CODE = "1-1700000000-" + "ab12" * 16
BODY = '{"auth":"' + AUTH_CODE + '","success":1,"data":{"ok":1}}'
LOGIN_BODY = '{"auth":"' + AUTH_CODE + '","success":1}'
CLK_TCK = os.sysconf("SC_CLK_TCK")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: if the benchmark itself is killed (even with SIGKILL,
    when no finally runs), the kernel stops this child too, so nothing is left listening."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class Cores:
    """Where the system under test runs vs where the load (wrk, upstream nginx) runs."""

    sut: int | None
    load: int | None

    @classmethod
    def detect(cls) -> Cores:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return cls(None, None)  # one core: pinning would only serialise everything
        return cls(cpus[0], cpus[1])

    def taskset(self, core: int | None) -> list[str]:
        return ["taskset", "-c", str(core)] if core is not None else []

    def describe(self) -> str:
        if self.sut is None:
            return "not pinned (fewer than 2 CPUs available)"
        return (
            f"system under test (nginx proxy or luxsci-proxy) on CPU {self.sut}; "
            f"wrk, the upstream nginx, redis-server and the Python load generators on CPU "
            f"{self.load} (taskset)"
        )


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path
    log_path: Path
    admin_port: int = 0
    config_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid


class Procs:
    """Every process the benchmark starts, so one `finally` can stop them all."""

    def __init__(self) -> None:
        self.running: list[Service] = []
        self._files: list[IO[bytes]] = []

    def spawn(
        self,
        name: str,
        argv: list[str],
        workdir: Path,
        log_path: Path,
        port: int,
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
    ) -> Service:
        # stdout and stderr go to a file, never a pipe nobody reads: a full pipe would stall
        # the process and the benchmark would measure the stall.
        out = open(log_path, "ab")  # noqa: SIM115 - closed in stop_all
        self._files.append(out)
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            preexec_fn=_die_with_parent,
        )
        service = Service(name, proc, port, workdir, log_path)
        self.running.append(service)
        return service

    def stop(self, service: Service, timeout: float = 15.0) -> None:
        if service in self.running:
            self.running.remove(service)
        proc = service.proc
        if proc.poll() is not None:
            return
        # SIGTERM: nginx stops fast, the proxy drains (shutdown_timeout) and revokes its session.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def stop_all(self) -> None:
        for service in reversed(list(self.running)):
            try:
                self.stop(service)
            except Exception as e:  # keep stopping the others
                print(f"warning: could not stop {service.name}: {e}", file=sys.stderr)
        for f in self._files:
            f.close()
        self._files.clear()


def wait_port(service: Service, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            raise RuntimeError(f"{service.name} exited at start-up: {tail(service.log_path)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", service.port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(
        f"{service.name} did not listen within {timeout} s: {tail(service.log_path)}"
    )


def tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- nginx -------------------------------------------------------------------------------------


def _nginx_conf(workdir: Path, log: str, servers: str) -> str:
    """What every nginx here shares: one worker, many connections, long keep-alive."""
    # Temp paths inside our own prefix: the Debian build's defaults live under /var/lib/nginx.
    temp = "\n".join(
        f"    {kind}_temp_path {workdir}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""worker_processes 1;
worker_rlimit_nofile 20000;
error_log {workdir}/error.log warn;
events {{ worker_connections 20000; }}
http {{
{temp}
    {log}
    keepalive_requests 1000000;
    keepalive_timeout 300s;
{servers}
}}
"""


def nginx_upstream_conf(workdir: Path, port: int, limit: int, access_log: bool = False) -> str:
    """The stand-in for the LuxSci API: a fixed success answer with X-RateLimit-* headers.

    X-RateLimit-Reset names a window long past, so the proxy never takes the fixed
    X-RateLimit-Remaining as news about the current window (nginx cannot count); the Limit
    still caps the proxy's budget, which the limiter runs rely on.
    """
    log = (
        f"log_format win '$msec $request_method $uri $status';\n"
        f"    access_log {workdir}/access.log win;"
        if access_log
        else "access_log off;"
    )
    servers = f"""    server {{
        listen 127.0.0.1:{port} backlog=4096;
        default_type application/json;
        add_header X-RateLimit-Limit {limit} always;
        add_header X-RateLimit-Remaining {limit} always;
        add_header X-RateLimit-Reset 1700000060 always;
        location = /perl/api/v2/auth {{ return 201 '{LOGIN_BODY}'; }}
        location / {{ return 200 '{BODY}'; }}
    }}"""
    return _nginx_conf(workdir, log, servers)


def nginx_proxy_conf(workdir: Path, port: int, upstream_port: int) -> str:
    """The reference proxy hop: nginx with a keep-alive upstream pool."""
    servers = f"""    upstream api {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""
    return _nginx_conf(workdir, "access_log off;", servers)


def start_upstream(
    procs: Procs, tmp: Path, cores: Cores, limit: int = 100_000_000, access_log: bool = False
) -> Service:
    """The LuxSci stand-in, on the load core."""
    return start_nginx(
        procs,
        "upstream",
        tmp,
        cores.load,
        cores,
        lambda d, p: nginx_upstream_conf(d, p, limit=limit, access_log=access_log),
    )


def start_nginx(
    procs: Procs,
    name: str,
    tmp: Path,
    core: int | None,
    cores: Cores,
    conf_for: Callable[[Path, int], str],
) -> Service:
    """`conf_for(workdir, port)` gives the config text; nginx runs in the foreground."""
    workdir = tmp / name
    workdir.mkdir()
    # nginx workers run as `nobody` when started by root: they must be able to enter the dir.
    os.chmod(workdir, 0o755)
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(conf_for(workdir, port))
    argv = [
        *cores.taskset(core),
        nginx_binary(),
        "-p",
        f"{workdir}/",
        "-c",
        str(conf),
        "-e",
        str(workdir / "error.log"),
        "-g",
        f"daemon off; pid {workdir}/nginx.pid;",
    ]
    service = procs.spawn(name, argv, workdir, workdir / "stdout.log", port)
    service.log_path = workdir / "error.log"
    wait_port(service)
    return service


def nginx_binary() -> str:
    # /usr/sbin is not on every PATH (non-root shells), and apt puts nginx there.
    return shutil.which("nginx") or "/usr/sbin/nginx"


# -- luxsci-proxy ----------------------------------------------------------------------------


def proxy_config(
    port: int,
    admin_port: int,
    upstream_port: int,
    *,
    user_per_minute: int = 100_000_000,
    window_seconds: float = 60,
    max_connections: int = 1000,
    queue: dict[str, Any] | None = None,
    redis_url: str | None = None,
) -> dict[str, Any]:
    """The default feature set with limits that never throttle unless a run asks them to."""
    limits: dict[str, Any] = {
        "account_per_minute": 100_000_000,
        "user_per_minute": user_per_minute,
        "per_day": 1_000_000_000,
        "window_seconds": window_seconds,
        "state_file": "",
    }
    if redis_url is not None:
        limits.update(backend="redis", redis_url=redis_url, key="bench-shared")
    return {
        "listen": {"host": "127.0.0.1", "port": port, "max_connections": max_connections},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "upstream": {"url": f"http://127.0.0.1:{upstream_port}", "allow_insecure": True},
        # From the environment: a literal secret in the file draws a start-up warning, and the
        # benchmark reports every warning the proxy logs.
        "auth": {"scheme": "luxsci", "token": "${BENCH_TOKEN}", "secret": "${BENCH_SECRET}"},
        "limits": limits,
        "queue": queue or {},
        "logging": {"level": "info", "format": "json"},
        "shutdown_timeout": 5,
    }


def write_config(path: Path, cfg: dict[str, Any]) -> None:
    """Atomically, so a SIGHUP never reads half a file; 0600 since the proxy warns otherwise."""
    # Imported here: run.py installs the proxy's dependencies (PyYAML among them) only after
    # this module is loaded.
    import yaml

    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def proxy_env(tree: Path = REPO) -> dict[str, str]:
    """The environment a proxy runs in: the benchmark's secrets, and `tree`'s code."""
    env = dict(os.environ, BENCH_TOKEN="bench-token", BENCH_SECRET="bench-secret-key")
    # The working tree's code, whatever is installed in site-packages. (`-m` also puts the
    # working directory first on sys.path: the proxy runs in `tree` too.)
    env["PYTHONPATH"] = str(tree) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_proxy(
    procs: Procs,
    name: str,
    tmp: Path,
    core: int | None,
    cores: Cores,
    cfg: dict[str, Any],
    *,
    tree: Path = REPO,
    python: str = sys.executable,
) -> Service:
    """`tree`'s proxy run by `python` (sidecar.py compares two trees in one environment)."""
    workdir = tmp / name
    workdir.mkdir()
    config_path = workdir / "config.yaml"
    write_config(config_path, cfg)
    env = proxy_env(tree)
    argv = [
        *cores.taskset(core),
        python,
        "-m",
        "proxy",
        "run",
        "--config",
        str(config_path),
    ]
    service = procs.spawn(
        name, argv, workdir, workdir / "proxy.log", cfg["listen"]["port"], env, cwd=tree
    )
    service.admin_port = cfg["admin"]["port"]
    service.config_path = config_path
    wait_ready(service)
    return service


def wait_ready(service: Service, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            raise RuntimeError(f"{service.name} exited at start-up: {tail(service.log_path)}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            status, _ = admin_get(service.admin_port, "/readyz")
            if status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{service.name} not ready within {timeout} s: {tail(service.log_path)}")


def admin_get(port: int, path: str) -> tuple[int, str]:
    # http.client, not urllib: urllib would honour an http_proxy variable from the environment.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Metrics = list[tuple[str, dict[str, str], float]]


def metrics(service: Service) -> Metrics:
    """The admin endpoint's Prometheus samples as (name, labels, value)."""
    status, text = admin_get(service.admin_port, "/metrics")
    if status != 200:
        raise RuntimeError(f"{service.name} /metrics answered {status}")
    samples: Metrics = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            samples.append((m[1], dict(_LABEL.findall(m[2] or "")), float(m[3])))
    return samples


def metric_sum(samples: Metrics, name: str, **labels: str) -> float:
    return sum(
        v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())
    )


def by_label(samples: Metrics, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for n, lab, v in samples:
        if n == name:
            key = lab.get(label, "")
            out[key] = out.get(key, 0.0) + v
    return {k: v for k, v in out.items() if v}


def log_notes(service: Service) -> dict[str, int]:
    """Counts of the proxy's warning/error events (JSON log lines), e.g. {'error retry': 3}."""
    notes: Counter[str] = Counter()
    try:
        text = service.log_path.read_text(errors="replace")
    except OSError:
        return {}
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            if line.strip():
                notes["non-JSON line: " + line.strip()[:80]] += 1
            continue
        level = str(event.get("level", ""))
        if level in ("warning", "error", "critical", "exception"):
            notes[f"{level} {event.get('event', '?')}"] += 1
    return dict(notes)


def log_has_event(service: Service, name: str) -> bool:
    with contextlib.suppress(OSError):
        return f'"{name}"' in service.log_path.read_text(errors="replace")
    return False


# -- redis -------------------------------------------------------------------------------------


def start_redis(procs: Procs, tmp: Path, core: int | None, cores: Cores) -> Service:
    workdir = tmp / "redis"
    workdir.mkdir()
    port = free_port()
    argv = [
        *cores.taskset(core),
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
    ]
    service = procs.spawn("redis", argv, workdir, workdir / "redis.log", port)
    wait_port(service)
    return service


# -- /proc -------------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """pid and its children (nginx's master and worker): CPU is spent in the worker."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            # Fields after the command name, which is in parentheses and may contain spaces.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                pids.append(int(entry))
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        # After the name: state(0) ppid(1) ... utime is field 14 and stime 15 of stat(5),
        # i.e. indexes 11 and 12 here.
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def status_kb(pid: int, key: str) -> int:
    """A /proc/PID/status figure in kB, e.g. VmRSS or VmHWM."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)
