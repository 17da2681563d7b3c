"""File uploads through the proxy: the sandbox checks hashes with aiohttp's own multipart reader."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import aiohttp
import pytest
from conftest import USER, MakeProxy, RunningProxy

from proxy.sandbox import SandboxServer

SEND = f"/perl/api/v2/user/{USER}/email/compose/secureline/send"
REPORT = b"%PDF-1.4 binary \x00\xff\r\n--boundary-lookalike\r\n" * 100
NOTE = b"plain note\n"


@pytest.fixture(params=["in_memory", "spooled"])
async def proxy(
    request: pytest.FixtureRequest, sandbox: SandboxServer, make_proxy: MakeProxy, tmp_path: Path
) -> RunningProxy:
    """Every upload both ways: in memory, and spooled (parsed from a mapping of its file,
    the filled-in body written to another file)."""
    if request.param == "in_memory":
        return await make_proxy(sandbox.url)
    return await make_proxy(sandbox.url, listen={"spool_threshold": 64, "spool_dir": str(tmp_path)})


def form(payload: dict | None, files: dict[str, bytes]) -> aiohttp.FormData:
    data = aiohttp.FormData()
    if payload is not None:
        data.add_field(
            "json", json.dumps(payload), filename="json.js", content_type="application/json"
        )
    for name, content in files.items():
        data.add_field("files", content, filename=name, content_type="application/octet-stream")
    return data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def post(
    http: aiohttp.ClientSession, proxy: RunningProxy, data: object
) -> tuple[int, dict, dict]:
    async with http.post(proxy.url + SEND, data=data) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def test_upload_without_attachments_gets_the_hashes_filled_in(
    proxy: RunningProxy, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    status, _, body = await post(
        http, proxy, form({"subject": "labs"}, {"report.pdf": REPORT, "note.txt": NOTE})
    )
    assert status == 200, body
    got = {a["name"]: a["hash"] for a in body["data"]["attachments"]}
    assert got == {"report.pdf": sha(REPORT), "note.txt": sha(NOTE)}
    assert body["data"]["json"]["subject"] == "labs"


async def test_upload_with_correct_hashes_is_forwarded_unchanged(
    proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    payload = {"subject": "x", "attachments": [{"name": "note.txt", "hash": sha(NOTE).upper()}]}
    status, _, body = await post(http, proxy, form(payload, {"note.txt": NOTE}))
    assert status == 200, body
    assert body["data"]["json"]["attachments"][0]["hash"] == sha(NOTE).upper()


async def test_upload_with_a_missing_hash_entry_gets_it_filled(
    proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    payload = {"attachments": [{"name": "note.txt"}]}
    status, _, body = await post(http, proxy, form(payload, {"note.txt": NOTE}))
    assert status == 200, body
    assert body["data"]["json"]["attachments"] == [{"name": "note.txt", "hash": sha(NOTE)}]


async def test_a_legacy_app_can_post_only_files(
    proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    status, _, body = await post(http, proxy, form(None, {"note.txt": NOTE}))
    assert status == 200, body
    assert body["data"]["attachments"][0]["hash"] == sha(NOTE)


async def test_a_wrong_hash_is_answered_400_by_the_proxy_without_calling_the_api(
    proxy: RunningProxy, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    before = sandbox.sandbox.stats.requests
    payload = {"attachments": [{"name": "note.txt", "hash": "0" * 64}]}
    status, headers, body = await post(http, proxy, form(payload, {"note.txt": NOTE}))
    assert status == 400
    assert headers["X-Proxy-Error"] == "bad_request"
    assert "note.txt" in body["error_message"] and body["success"] == 0
    assert sandbox.sandbox.stats.requests == before


async def test_malformed_multipart_is_answered_400_without_calling_the_api(
    proxy: RunningProxy, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    before = sandbox.sandbox.stats.requests
    broken = b'--XYZ\r\nContent-Disposition: form-data; name="json"\r\n\r\n{}\r\n'  # never closed
    async with http.post(
        proxy.url + SEND, data=broken, headers={"Content-Type": "multipart/form-data; boundary=XYZ"}
    ) as resp:
        assert resp.status == 400
        assert resp.headers["X-Proxy-Error"] == "bad_request"
    assert sandbox.sandbox.stats.requests == before


async def test_duplicate_file_names_are_refused(
    proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    data = aiohttp.FormData()
    data.add_field("json", "{}", filename="json.js", content_type="application/json")
    data.add_field("files", b"a", filename="same.txt")
    data.add_field("files", b"b", filename="same.txt")
    status, _, body = await post(http, proxy, data)
    assert status == 400
    assert "same.txt" in body["error_message"]
