"""Large request bodies spooled to disk, end to end: through the real proxy into the
sandbox, which verifies every signature (a spooled body hashed or sent wrongly fails
loudly), and the spool's files closed in every outcome, counted as the process's open
descriptors on the spool directory."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import USER, MakeProxy, RunningProxy, eventually, proxy_config, spool_fds

from proxy.config import ConfigError
from proxy.sandbox import SandboxServer
from proxy.service import ProxyService

PATH = "/perl/api/v2/account/42/things"
SEND = f"/perl/api/v2/user/{USER}/email/compose/secureline/send"
KiB = 1024
MiB = 1024 * KiB
SPOOLING = {"spool_threshold": 4 * KiB, "max_body_bytes": 2 * MiB}


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def big_json(size: int) -> bytes:
    """A JSON document of about `size` bytes with whitespace at both ends (trimmed before
    hashing: a spooled body must be hashed the way the API hashes it)."""
    doc = json.dumps({"note": "x" * size, "n": [1, 2, 3]}).encode()
    return b" \r\n\t" + doc + b"\n\n  "


@pytest.fixture
async def spooling(sandbox: SandboxServer, make_proxy: MakeProxy, tmp_path: Path) -> RunningProxy:
    return await make_proxy(
        sandbox.url,
        listen={**SPOOLING, "spool_dir": str(tmp_path)},
        retry={"backoff_base": 0.01, "backoff_max": 0.05},
    )


async def post_json(
    http: aiohttp.ClientSession, proxy: RunningProxy, body: Any, path: str = PATH
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    async with http.post(proxy.url + path, data=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_a_large_json_body_is_spooled_and_signed_as_the_api_hashes_it(
    spooling: RunningProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    body = big_json(200 * KiB)
    status, answer = await post_json(http, spooling, body)
    assert status == 200, answer  # the sandbox checked the signature over the trimmed body
    assert answer["data"]["json"] == json.loads(body)
    assert spool_fds(tmp_path) == [] and names(tmp_path) == []
    assert spooling.service.spool.buffered == 0


async def test_a_chunked_body_moves_to_the_spool_once_past_the_threshold(
    spooling: RunningProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    body = big_json(100 * KiB)

    async def pieces() -> AsyncIterator[bytes]:  # no Content-Length: chunked
        for i in range(0, len(body), 3000):
            yield body[i : i + 3000]

    status, answer = await post_json(http, spooling, pieces())
    assert status == 200, answer
    assert answer["data"]["json"] == json.loads(body)
    assert spool_fds(tmp_path) == []


async def test_a_retry_sends_the_spooled_body_again_from_its_start(
    spooling: RunningProxy, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    sandbox.sandbox.add_fault(status=475, times=2, path_prefix=PATH)
    body = big_json(300 * KiB)
    status, answer = await post_json(http, spooling, body)
    assert status == 200, answer
    assert answer["data"]["json"] == json.loads(body)
    sent = [e for e in sandbox.sandbox.log if e["target"] == PATH]
    assert [e["status"] for e in sent] == [475, 475, 200]


async def test_a_large_upload_is_parsed_from_its_spool_file_and_filled_in(
    spooling: RunningProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    scan = bytes(range(256)) * (1200 * KiB // 256)  # over the threshold many times
    note = b"note\r\n"
    data = aiohttp.FormData()
    payload = {"subject": "scan", "attachments": [{"name": "scan.tiff"}]}
    data.add_field("json", json.dumps(payload), filename="json.js", content_type="application/json")
    data.add_field("files", io.BytesIO(scan), filename="scan.tiff", content_type="image/tiff")
    data.add_field("files", note, filename="note.txt", content_type="text/plain")
    proxy = spooling
    async with http.post(proxy.url + SEND, data=data) as resp:
        answer = await resp.json()
    assert resp.status == 200, answer  # the sandbox verified the signature and every hash
    assert answer["data"]["attachments"] == [
        {"name": "scan.tiff", "size": len(scan), "hash": hashlib.sha256(scan).hexdigest()},
        {"name": "note.txt", "size": len(note), "hash": hashlib.sha256(note).hexdigest()},
    ]
    assert spool_fds(tmp_path) == [] and names(tmp_path) == []


async def test_a_body_over_the_global_memory_cap_spools_however_small(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await make_proxy(
        sandbox.url, listen={"spool_dir": str(tmp_path), "max_buffered_bytes": 3000}
    )
    spool = proxy.service.spool
    sandbox.sandbox.add_fault(delay=1.0, times=2, path_prefix=PATH)
    first_body, second_body = big_json(2000), big_json(2001)
    first = asyncio.create_task(post_json(http, proxy, first_body))
    await eventually(lambda: spool.buffered == len(first_body))  # held while the API is slow
    assert spool_fds(tmp_path) == []
    second = asyncio.create_task(post_json(http, proxy, second_body))
    # Far below the threshold (1 MiB), but both together would pass the cap: to the spool.
    await eventually(lambda: len(spool_fds(tmp_path)) == 1)
    assert spool.buffered == len(first_body)
    for task, body in ((first, first_body), (second, second_body)):
        status, answer = await task
        assert status == 200, answer  # never refused for the cap
        assert answer["data"]["json"] == json.loads(body)
    assert spool.buffered == 0 and spool_fds(tmp_path) == []


async def raw(port: int, data: bytes, *, close: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if close:
            return b""
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.transport.abort()


def head(length: int | None = None, path: str = PATH) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
    ).encode()


async def test_spool_files_are_closed_when_a_request_fails_on_the_way_in(
    sandbox: SandboxServer, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = await make_proxy(
        sandbox.url, listen={**SPOOLING, "spool_dir": str(tmp_path), "client_timeout": 1.0}
    )
    port = proxy.service.port
    # The client goes away mid-body.
    await raw(port, head(200 * KiB) + b"{" * (50 * KiB), close=True)
    await eventually(lambda: spool_fds(tmp_path) == [])
    # The body takes longer than client_timeout: 408.
    answer = await raw(port, head(200 * KiB) + b"[" * (50 * KiB))
    assert answer.startswith(b"HTTP/1.1 408 ")
    # Over max_body_bytes once past the threshold, chunk by chunk: 413.
    chunk = b"%x\r\n%s\r\n" % (400 * KiB, b" " * (400 * KiB))
    answer = await raw(port, head() + chunk * 6)
    assert answer.startswith(b"HTTP/1.1 413 ")
    # Invalid multipart, found only in the spooled file: 400 before the API is called.
    multipart = (
        f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {20 * KiB}\r\n"
        "Content-Type: multipart/form-data; boundary=B\r\n\r\n"
    ).encode()
    answer = await raw(port, multipart + b"--B\r\n" + b"x" * (20 * KiB - 5))
    assert answer.startswith(b"HTTP/1.1 400 ")
    await eventually(lambda: spool_fds(tmp_path) == [])
    assert names(tmp_path) == []
    assert proxy.service.spool.buffered == 0


async def test_spool_files_are_closed_when_the_api_fails_or_cannot_be_reached(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await make_proxy(
        sandbox.url,
        listen={**SPOOLING, "spool_dir": str(tmp_path)},
        retry={"backoff_base": 0.01, "backoff_max": 0.05},
    )
    sandbox.sandbox.add_fault(status=500, times=1, path_prefix=PATH)
    status, _ = await post_json(http, proxy, big_json(100 * KiB))
    assert status == 500  # the API's own answer, passed on
    assert spool_fds(tmp_path) == []
    sandbox.sandbox.add_fault(drop=True, times=10, path_prefix=PATH)
    status, _ = await post_json(http, proxy, big_json(100 * KiB))
    assert status == 502
    assert spool_fds(tmp_path) == []


async def test_spool_files_are_closed_when_shutdown_cuts_a_request_off(
    sandbox: SandboxServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    cfg = proxy_config(
        sandbox.url, listen={**SPOOLING, "spool_dir": str(tmp_path)}, shutdown_timeout=0.3
    )
    service = ProxyService(cfg)
    await service.start()
    sandbox.sandbox.add_fault(delay=5.0, times=1, path_prefix=PATH)
    url = f"http://127.0.0.1:{service.port}{PATH}"
    headers = {"Content-Type": "application/json"}
    request = asyncio.create_task(http.post(url, data=big_json(100 * KiB), headers=headers))
    await eventually(lambda: len(spool_fds(tmp_path)) == 1)
    await service.stop()
    resp = await request
    assert resp.status == 503
    assert resp.headers["X-Proxy-Error"] == "shutting_down"
    resp.release()
    assert spool_fds(tmp_path) == []


async def test_a_proxy_starts_by_removing_leftovers_in_its_spool_dir(
    sandbox: SandboxServer, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    (tmp_path / "body-from-an-older-version").write_bytes(b"x" * 1000)
    await make_proxy(sandbox.url, listen={"spool_dir": str(tmp_path)})
    assert names(tmp_path) == []


async def test_a_spool_dir_that_cannot_be_used_is_a_config_error(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("not a directory")
    cfg = proxy_config(sandbox.url, listen={"spool_dir": str(tmp_path / "file" / "spool")})
    service = ProxyService(cfg)
    with pytest.raises(ConfigError, match=r"^listen\.spool_dir: cannot use .*/file/spool"):
        await service.start()
    assert service.port == 0  # refused before any socket opened
