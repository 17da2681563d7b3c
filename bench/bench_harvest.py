"""Throughput of CodeHarvester on ~5 MB bodies with the code last (prints figures only).

python bench/bench_harvest.py
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.schemes.luxsci.harvest import CodeHarvester

CHUNK = 64 * 1024
SIZE = 5 * 1024 * 1024
CODE = "a1b2c3d4e5f6"


def long_string_body() -> bytes:
    blob = base64.b64encode(os.urandom(SIZE * 3 // 4)).decode()
    return json.dumps({"success": 1, "data": blob, "auth": CODE}).encode()


def small_objects_body() -> bytes:
    row = {"id": 12345, "name": "user@example.com", "flag": True, "tags": ["a", "b"]}
    rows = [dict(row, id=i) for i in range(SIZE // len(json.dumps(row)))]
    return json.dumps({"success": 1, "data": rows, "auth": CODE}).encode()


def escaped_text_body() -> bytes:
    text = 'line with "quotes" and \\ backslash\n' * (SIZE // 40)
    return json.dumps({"success": 1, "data": text, "auth": CODE}).encode()


def measure(name: str, body: bytes, encoding: str | None = None, plain_size: int = 0) -> None:
    """MB/s of the body as it arrives; for a compressed body also of the decoded JSON."""
    chunks = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        harvester = CodeHarvester(encoding)
        for chunk in chunks:
            harvester.feed(chunk)
        best = min(best, time.perf_counter() - start)
        assert harvester.result() == CODE, harvester.result()
    line = f"{name:<28} {len(body) / 1e6:6.2f} MB  {len(body) / 1e6 / best:9.1f} MB/s"
    if plain_size:
        line += f"  ({plain_size / 1e6 / best:.1f} MB/s of decoded JSON)"
    print(line)


def main() -> None:
    long_body, small_body, text_body = long_string_body(), small_objects_body(), escaped_text_body()
    measure("long string value", long_body)
    measure("many small objects", small_body)
    measure("text with many escapes", text_body)
    measure("many small objects, gzip", gzip.compress(small_body), "gzip", len(small_body))


if __name__ == "__main__":
    main()
