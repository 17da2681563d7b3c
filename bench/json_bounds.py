"""What one JSON request body costs the proxy: peak RSS growth and the longest event-loop stall.

python bench/json_bounds.py

Each case runs in a fresh process (so ru_maxrss, a high-water mark, is the case's own): a
raw upstream, the proxy (bearer scheme, no login) and a raw client share one event loop, with
a ticker task that notes the longest gap between its wake-ups while one request goes through.
Bodies are sent in pieces, so the client never holds a large one whole; each case sends
its request ROUNDS times after a warm-up request. Figures only; tests/pipeline/
test_json_bounds.py asserts the behaviour. The issue's target: no stall above ~20 ms.
"""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MiB = 1024 * 1024
# Requests per case: the minimum stall is the work's own, the median shows a busy machine.
ROUNDS = 5


def _chains(size: int, depth: int) -> bytes:
    """Worst shape for the parser, and among the worst for the nesting scan: many lists
    nested `depth` deep, side by side."""
    chain = b"[" * depth + b"]" * depth
    return b"[" + b",".join([chain] * (size // (len(chain) + 1))) + b"]"


def _valleys(size: int, depth: int) -> bytes:
    """Worst shape for the scan's valley passes: `]]]...[[[` over and over."""
    unit = b"]" * depth + b"[" * depth
    return b"[" * depth + unit * (size // len(unit) - 1) + b"]" * depth


def _cases() -> dict[str, tuple[list[bytes], str | None]]:
    """Bodies as pieces (one 20 MiB body never exists whole in the client), and the type."""
    from proxy.jsonbounds import MAX_DEPTH, PARSE_LIMIT, SCAN_LIMIT

    objects = b"{}," * (64 * 1024 // 3)  # one piece, sent 320 times for 20 MiB
    big = [b"[", *[objects] * 320, b"{}]"]
    return {
        "20 MiB [{},...] untyped": (big, None),
        "20 MiB [{},...] application/json": (big, "application/json"),
        "64 KiB [{},...] untyped (parsed)": (
            [b"[" + b"{}," * (PARSE_LIMIT // 3 - 1) + b"{}]"],
            None,
        ),
        f"64 KiB lists {MAX_DEPTH - 1} deep (scanned, parsed)": (
            [_chains(PARSE_LIMIT - 16, MAX_DEPTH - 1)],
            "application/json",
        ),
        f"256 KiB lists {MAX_DEPTH - 1} deep (scanned)": (
            [_chains(SCAN_LIMIT - 16, MAX_DEPTH - 1)],
            "application/json",
        ),
        "256 KiB valleys 100 deep (scanned)": ([_valleys(SCAN_LIMIT, 100)], "application/json"),
        "200 KB nested 100k deep (refused)": ([b"[" * 100_000 + b"]" * 100_000], None),
    }


async def _upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            while length:
                length -= len(await reader.read(min(length, MiB)))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _run_case(name: str) -> dict[str, float | int | str]:
    from proxy.config import (
        AdminConfig,
        AuthConfig,
        Config,
        LimitsConfig,
        ListenConfig,
        LoggingConfig,
        Secret,
        UpstreamConfig,
        validate,
    )
    from proxy.service import ProxyService

    pieces, content_type = _cases()[name]
    upstream = await asyncio.start_server(_upstream, "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]
    cfg = validate(
        Config(
            listen=ListenConfig(port=0, max_body_bytes=32 * MiB),
            admin=AdminConfig(port=0),
            upstream=UpstreamConfig(url=f"http://127.0.0.1:{port}", allow_insecure=True),
            auth=AuthConfig(scheme="bearer", api_key=Secret("k")),
            limits=LimitsConfig(account_per_minute=10**6, per_day=10**9, state_file=""),
            logging=LoggingConfig(level="warning"),
        )
    )
    service = ProxyService(cfg)
    await service.start()
    typed = f"Content-Type: {content_type}\r\n".encode() if content_type else b""
    request = (
        b"POST /v1/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%sContent-Length: %d\r\n\r\n"
        % (typed, sum(len(p) for p in pieces))
    )
    # One small request first: a fresh process's first request pays for lazy set-up.
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    writer.write(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    await reader.readuntil(b"{}")
    writer.close()
    await asyncio.sleep(0.2)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    stalls: list[float] = []
    answer = b""
    for _ in range(ROUNDS):
        stall, answer = await _one_request(service.port, request, pieces)
        stalls.append(stall)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    await service.stop()
    upstream.close()
    stalls.sort()
    return {
        "case": name,
        "status": answer.split(b" ", 2)[1].decode() if answer else "none",
        "rss_growth_mb": round((peak - baseline) / 1024, 1),
        "stall_min_ms": round(stalls[0] * 1000, 1),
        "stall_median_ms": round(stalls[len(stalls) // 2] * 1000, 1),
    }


async def _one_request(port: int, request: bytes, pieces: list[bytes]) -> tuple[float, bytes]:
    """(the longest gap between the ticker's wake-ups while it ran, the answer)."""
    longest = 0.0
    running = True

    async def ticker() -> None:
        nonlocal longest
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            longest = max(longest, now - last)
            last = now

    tick = asyncio.create_task(ticker())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    for piece in pieces:
        writer.write(piece)
        await writer.drain()
    answer = await reader.read()
    writer.close()
    running = False
    await tick
    return longest, answer


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--case":
        print(json.dumps(asyncio.run(_run_case(sys.argv[2]))))
        return
    root = Path(__file__).resolve().parent.parent
    print(
        f"{'case':<48} {'status':>6} {'peak RSS +MB':>13} {'stall min ms':>13} "
        f"{'stall median ms':>16}"
    )
    for name in _cases():
        out = subprocess.run(
            [sys.executable, __file__, "--case", name],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(
            f"{row['case']:<48} {row['status']:>6} {row['rss_growth_mb']:>13} "
            f"{row['stall_min_ms']:>13} {row['stall_median_ms']:>16}"
        )


if __name__ == "__main__":
    main()
