"""Soak: mixed traffic against one proxy process for a long time; does it stay flat?

    python bench/soak.py            # 30 minutes
    python bench/soak.py --quick    # 2 minutes, marked QUICK RUN

The mix, all at once, on loopback (the upstream is nginx, the proxy is the real CLI):
- normal requests from 8 keep-alive clients;
- uploads of 4 MiB (octet-stream, so the proxy signs them without parsing);
- downloads of 8 MiB, streamed;
- slow readers: a download read at 16 KiB every half second, then dropped;
- clients that vanish: one that closes right after its request, one mid-upload;
- pipelined bursts: 32 GETs in one write, every answer read back in order.

VmRSS is sampled every 10 s. Targets (issue 12): after the warm-up (the first fifth of the run)
RSS grows by at most 5 MB; every request is answered or its client is gone; no traceback in the
log. Then two one-off checks on the same process: 16 concurrent 20 MiB uploads raise peak RSS by
at most 100 MB (VmHWM, reset through /proc/PID/clear_refs first), and with 64 clients stalled on
large answers a normal request is still answered (not left hanging past its queue deadline).

Figures are printed and written to docs/BENCHMARKS.md between the soak markers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import services as svc

DOC = svc.REPO / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"
PATH = "/perl/api/v2/account/42/things"
BIG = "/perl/api/v2/account/42/big"
MIB = 1024 * 1024


def upstream_conf(workdir: Path, port: int) -> str:
    """The LuxSci stand-in, plus an 8 MiB download and room for uploads."""
    big = workdir / "big.json"
    big.write_bytes(b'{"success":1,"data":"' + b"x" * (8 * MIB) + b'"}')
    servers = f"""    server {{
        listen 127.0.0.1:{port} backlog=4096;
        default_type application/json;
        client_max_body_size 64m;
        add_header X-RateLimit-Limit 100000000 always;
        add_header X-RateLimit-Remaining 100000000 always;
        add_header X-RateLimit-Reset 1700000060 always;
        location = /perl/api/v2/auth {{ return 201 '{svc.LOGIN_BODY}'; }}
        location = {BIG} {{ alias {big}; }}
        location / {{ return 200 '{svc.BODY}'; }}
    }}"""
    return svc._nginx_conf(workdir, "access_log off;", servers)


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)

    def add(self, kind: str, outcome: str) -> None:
        self.outcomes[f"{kind}:{outcome}"] += 1


def head_of(data: bytes) -> int:
    """The status of an HTTP answer's first line, or 0."""
    try:
        return int(data.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


async def exchange(port: int, raw: bytes, read_all: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await reader.read() if read_all else await reader.read(65536)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def get(path: str, close: bool = False) -> bytes:
    tail = b"Connection: close\r\n" if close else b""
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + tail + b"\r\n"


async def normal_client(port: int, until: float, tally: Tally) -> None:
    """Keep-alive GETs, one at a time."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.monotonic() < until:
            writer.write(get(PATH))
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            tally.add("normal", str(head_of(head)))
    except (OSError, asyncio.IncompleteReadError) as e:
        tally.add("normal", type(e).__name__)
    finally:
        writer.close()


async def uploader(port: int, until: float, tally: Tally, size: int = 4 * MIB) -> None:
    body = b"u" * size
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n"
    ).encode()
    while time.monotonic() < until:
        try:
            tally.add("upload", str(head_of(await exchange(port, head + body))))
        except OSError as e:
            tally.add("upload", type(e).__name__)


async def downloader(port: int, until: float, tally: Tally) -> None:
    while time.monotonic() < until:
        try:
            answer = await exchange(port, get(BIG, close=True))
            ok = head_of(answer) == 200 and len(answer) > 8 * MIB
            tally.add("download", "200" if ok else f"short:{head_of(answer)}")
        except OSError as e:
            tally.add("download", type(e).__name__)


async def slow_reader(port: int, until: float, tally: Tally) -> None:
    while time.monotonic() < until:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(get(BIG, close=True))
            for _ in range(10):  # 5 s at 32 KiB/s, then the client is gone
                if not await reader.read(16 * 1024):
                    break
                await asyncio.sleep(0.5)
            writer.close()
            tally.add("slow_reader", "gone")
        except OSError as e:
            tally.add("slow_reader", type(e).__name__)


async def vanishing(port: int, until: float, tally: Tally) -> None:
    while time.monotonic() < until:
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(get(PATH))
            writer.close()  # gone before the answer
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {MIB}\r\n\r\n".encode()
                + b"v" * 1000
            )
            await writer.drain()
            writer.close()  # gone mid-upload
            tally.add("vanishing", "gone")
        await asyncio.sleep(0.2)


async def pipeliner(port: int, until: float, tally: Tally, depth: int = 32) -> None:
    burst = get(PATH) * (depth - 1) + get(PATH, close=True)
    while time.monotonic() < until:
        try:
            answer = await exchange(port, burst)
            answered = answer.count(b"HTTP/1.1 200 ")
            tally.add("pipelined", "200" if answered == depth else f"only_{answered}")
        except OSError as e:
            tally.add("pipelined", type(e).__name__)
        await asyncio.sleep(0.1)


async def sample_rss(
    pid: int, until: float, every: float, samples: list[tuple[float, int]]
) -> None:
    start = time.monotonic()
    while True:
        samples.append((time.monotonic() - start, svc.status_kb(pid, "VmRSS")))
        if time.monotonic() + every > until:
            return
        await asyncio.sleep(every)


async def mixed(port: int, pid: int, seconds: float) -> tuple[Tally, list[tuple[float, int]]]:
    tally, samples = Tally(), []
    until = time.monotonic() + seconds
    jobs = [normal_client(port, until, tally) for _ in range(8)]
    jobs += [uploader(port, until, tally), downloader(port, until, tally)]
    jobs += [slow_reader(port, until, tally), vanishing(port, until, tally)]
    jobs += [pipeliner(port, until, tally), sample_rss(pid, until, 10.0, samples)]
    await asyncio.gather(*jobs)
    samples.append((seconds, svc.status_kb(pid, "VmRSS")))
    return tally, samples


def reset_peak(pid: int) -> None:
    """VmHWM := VmRSS (Linux 4.0+), so the next peak is this test's alone."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


async def big_uploads(port: int, pid: int) -> tuple[int, Counter[str]]:
    """16 concurrent 20 MiB uploads: the growth of peak RSS (kB) over the RSS before."""
    reset_peak(pid)
    before = svc.status_kb(pid, "VmRSS")
    size = 20 * MIB
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n"
    ).encode()
    answers = await asyncio.gather(*(exchange(port, head + b"b" * size) for _ in range(16)))
    return svc.status_kb(pid, "VmHWM") - before, Counter(str(head_of(a)) for a in answers)


async def stalled_readers(port: int) -> tuple[int, float]:
    """64 clients that ask for 8 MiB and never read; then one normal request."""
    socks = []
    for _ in range(64):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(get(BIG))
        socks.append(sock)
    await asyncio.sleep(2)  # let them fill every buffer on the way
    started = time.monotonic()
    try:
        answer = await asyncio.wait_for(exchange(port, get(PATH, close=True)), 60)
        status = head_of(answer)
    except TimeoutError:
        status = 0
    waited = time.monotonic() - started
    for sock in socks:
        sock.close()
    return status, waited


def tracebacks(log: Path) -> int:
    return log.read_text(errors="replace").count("Traceback")


def report(args: argparse.Namespace, results: dict[str, object]) -> str:
    samples: list[tuple[float, int]] = results["samples"]  # type: ignore[assignment]
    warm = [kb for t, kb in samples if t >= args.seconds / 5] or [samples[-1][1]]
    growth_mb = (warm[-1] - warm[0]) / 1024
    tally: Tally = results["tally"]  # type: ignore[assignment]
    unanswered = {
        k: v for k, v in tally.outcomes.items() if not (k.endswith(":200") or k.endswith(":gone"))
    }
    hwm_mb = results["upload_hwm_kb"] / 1024  # type: ignore[operator]
    status, waited = results["stalled"]  # type: ignore[misc]
    rows = [
        ("RSS growth after warm-up", f"{growth_mb:+.1f} MB", "<= 5 MB", growth_mb <= 5),
        (
            "requests not answered (client still there)",
            str(sum(unanswered.values())),
            "0",
            not unanswered,
        ),
        ("tracebacks in the log", str(results["tracebacks"]), "0", results["tracebacks"] == 0),
        ("peak RSS rise, 16 x 20 MiB uploads", f"{hwm_mb:.1f} MB", "<= 100 MB", hwm_mb <= 100),
        (
            "normal request with 64 stalled readers",
            f"{status} after {waited:.2f} s",
            "answered within its queue deadline",
            status != 0 and waited < 30,
        ),
    ]
    lines = [
        f"Soak: {args.seconds:.0f} s of mixed traffic"
        + (" (QUICK RUN)" if args.quick else "")
        + f", {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "| figure | measured | target | |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {'PASS' if ok else 'MISS'} |" for a, b, c, ok in rows),
        "",
        "Outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.outcomes.items())),
        "",
        "RSS samples (s, MiB): " + ", ".join(f"{t:.0f} {kb / 1024:.1f}" for t, kb in samples),
        "",
        f"16 x 20 MiB uploads answered: {dict(results['upload_status'])}",  # type: ignore[call-overload]
    ]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = DOC.read_text() if DOC.exists() else ""
    block = f"{BEGIN}\n## Soak (bench/soak.py)\n\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        doc = doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END) :]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(doc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="2 minutes instead of 30")
    parser.add_argument("--no-doc", action="store_true", help="print only")
    parser.add_argument("--seconds", type=float, help="the mixed phase's length (a smoke run)")
    args = parser.parse_args()
    args.seconds = args.seconds or (120.0 if args.quick else 1800.0)
    procs, cores = svc.Procs(), svc.Cores.detect()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp_name:
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o755)  # nginx's workers (nobody) serve the download from inside it
        try:
            upstream = svc.start_nginx(procs, "upstream", tmp, cores.load, cores, upstream_conf)
            cfg = svc.proxy_config(svc.free_port(), svc.free_port(), upstream.port)
            cfg["listen"].update(max_body_bytes=32 * MIB, client_timeout=5)
            cfg["queue"] = {"max_wait": 10}
            lux = svc.start_proxy(procs, "proxy", tmp, cores.sut, cores, cfg)
            tally, samples = asyncio.run(mixed(lux.port, lux.pid, args.seconds))
            hwm, upload_status = asyncio.run(big_uploads(lux.port, lux.pid))
            stalled = asyncio.run(stalled_readers(lux.port))
            results: dict[str, object] = {
                "tally": tally,
                "samples": samples,
                "upload_hwm_kb": hwm,
                "upload_status": upload_status,
                "stalled": stalled,
                "tracebacks": tracebacks(lux.log_path),
            }
        finally:
            procs.stop_all()
    text = report(args, results)
    print(text)
    if not args.no_doc:
        write_doc(text)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    os._exit(130)
