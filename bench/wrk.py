"""Running wrk and reading its text output (it has no machine-readable format without Lua)."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    # Latency percentiles in microseconds (wrk --latency), keyed by percentile: 50, 75, 90, 99.
    latency_us: dict[int, float]
    non_2xx: int
    socket_errors: str | None
    raw: str


def _micros(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unreadable wrk duration {text!r}")
    return float(m[1]) * _UNITS[m[2]]


def parse(raw: str) -> WrkResult:
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", raw)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", raw)
    if not done or not rps:
        raise ValueError(f"unreadable wrk output: {raw[-400:]!r}")
    latency = {
        int(p): _micros(v)
        for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", raw, flags=re.MULTILINE)
    }
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", raw)
    errors = re.search(r"Socket errors:\s+(.*)", raw)
    return WrkResult(
        requests=int(done[1]),
        seconds=_micros(done[2] + done[3]) / 1e6,
        rps=float(rps[1]),
        latency_us=latency,
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=errors[1].strip() if errors else None,
        raw=raw,
    )


def run(prefix: list[str], url: str, connections: int, seconds: int) -> WrkResult:
    """One wrk thread: with 2 cores there is no second core to give it, and one thread
    drives tens of thousands of requests per second on loopback."""
    argv = [
        *prefix,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        "5s",
        url,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse(done.stdout)
