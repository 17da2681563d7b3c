"""Forwarding rules through the real proxy, over real sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import (
    USER,
    EchoUpstream,
    MakeProxy,
    MakeSandbox,
    RunningProxy,
    parse_raw,
    raw_exchange,
)
from yarl import URL

from proxy.config import Secret
from proxy.sandbox import SandboxServer


@pytest.mark.parametrize(
    "target",
    [
        f"/perl/api/v2/user/{USER}/profile",
        "/perl/api/v2/user/joe%40example.com/profile",
        # An encoded slash travels as sent, in the query and in a path segment.
        "/perl/api/v2/account/42/files?name=a%2Fb%3D",
        "/perl/api/v2/account/42/files/a%2Fb%5Cc",
        "/perl/api/v2/account/42/search?q=a+b&r=%20&r=&flag",
        "/perl/api/v2/account/42/x?k=%c3%a9&K=%C3%A9",
    ],
)
async def test_raw_paths_and_queries_are_signed_and_sent_byte_for_byte(
    sandbox: SandboxServer, proxy: RunningProxy, http: aiohttp.ClientSession, target: str
) -> None:
    async with http.get(URL(proxy.url + target, encoded=True)) as resp:
        body = await resp.json()
        assert resp.status == 200, body  # the sandbox checked the signature over the raw target
    assert sandbox.sandbox.log[-1]["target"] == target
    path, _, query = target.partition("?")
    assert (body["data"]["path"], body["data"]["query"]) == (path, query)


async def test_an_empty_query_keeps_its_question_mark_on_the_way_upstream(
    sandbox: SandboxServer, proxy: RunningProxy
) -> None:
    target = "/perl/api/v2/account/42/things?"
    request = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    status, _, body = parse_raw(await raw_exchange(proxy.service.port, request))
    assert status == 200, body  # signed over the query "", as the API reads `/things?`
    assert sandbox.sandbox.log[-1]["target"] == target  # byte for byte, "?" and all
    assert (body["data"]["path"], body["data"]["query"]) == (target[:-1], "")


async def test_json_body_with_surrounding_whitespace_and_no_content_type_is_accepted(
    proxy: RunningProxy, sandbox: SandboxServer
) -> None:
    raw = b'\r\n  {"name": "x"}  \n'
    request = (
        b"POST /perl/api/v2/account/42/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw)
    )
    status, _, body = parse_raw(await raw_exchange(proxy.service.port, request))
    assert status == 200, body
    assert body["data"]["json"] == {"name": "x"}


async def test_curl_posting_a_large_json_file_with_expect_100_continue_works(
    proxy: RunningProxy, sandbox: SandboxServer, tmp_path: Path
) -> None:
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"items": ["x" * 100] * 20000}))  # ~2 MB: curl sends Expect
    # The proxy runs in this event loop: curl must not block it.
    curl = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "-v",
        "-d",
        f"@{big}",
        f"{proxy.url}/perl/api/v2/account/42/import",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(curl.communicate(), 30)
    assert b"Expect: 100-continue" in stderr  # curl really asked
    body = json.loads(stdout)
    # The sandbox answers 417 to any Expect header: success proves it was not forwarded, and
    # curl's form content type was corrected to the JSON type the API requires.
    assert body["success"] == 1, body
    assert len(body["data"]["json"]["items"]) == 20000


async def test_hop_by_hop_headers_and_client_credentials_never_go_upstream(
    make_proxy: MakeProxy, echo_upstream: EchoUpstream, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(echo_upstream.url, auth={"scheme": "bearer", "api_key": Secret("k-1")})
    headers = {
        "Authorization": "Basic Y2xpZW50OnNlY3JldA==",
        "Cookie": "signature=forged:deadbeef; theme=dark",
        "Connection": "keep-alive, X-Private",
        "X-Private": "hop",
        "Proxy-Authorization": "Basic eA==",
        "TE": "trailers",
        "X-App": "kept",
    }
    async with http.get(proxy.url + "/v1/things?x=1", headers=headers) as resp:
        assert resp.status == 200
    seen = {k.lower(): v for k, v in echo_upstream.requests[-1]["headers"]}
    assert seen["authorization"] == "Bearer k-1"
    assert seen["cookie"] == "theme=dark"
    assert seen["x-app"] == "kept"
    for name in ("x-private", "proxy-authorization", "te", "expect"):
        assert name not in seen
    assert seen["host"] == URL(echo_upstream.url).raw_authority
    assert echo_upstream.requests[-1]["target"] == "/v1/things?x=1"


async def test_header_names_with_an_underscore_never_go_upstream(
    make_proxy: MakeProxy, echo_upstream: EchoUpstream
) -> None:
    # A CGI-style API reads X_Forwarded_For as X-Forwarded-For (both HTTP_X_FORWARDED_FOR).
    proxy = await make_proxy(echo_upstream.url, auth={"scheme": "bearer", "api_key": Secret("k-1")})
    await raw_exchange(
        proxy.service.port,
        b"GET /v1/things HTTP/1.1\r\nHost: x\r\nX_Forwarded_For: 6.6.6.6\r\n"
        b"Transfer_Encoding: chunked\r\nProxy_Authorization: Basic eA==\r\nX-Kept: 1\r\n"
        b"Connection: close\r\n\r\n",
    )
    seen = echo_upstream.requests[-1]["headers"]
    names = [k.lower() for k, _ in seen]
    assert "x-kept" in names
    assert not [n for n in names if "_" in n]
    assert "6.6.6.6" not in json.dumps(seen)


async def test_client_header_bytes_go_upstream_unchanged_with_ours_added_once(
    make_proxy: MakeProxy, echo_upstream: EchoUpstream
) -> None:
    proxy = await make_proxy(echo_upstream.url, auth={"scheme": "bearer", "api_key": Secret("k-1")})
    await raw_exchange(
        proxy.service.port,
        b"POST /v1/things HTTP/1.1\r\nHost: x\r\nX-Latin: caf\xe9\r\nX-Multi: one\r\n"
        b"x-multi: two\r\nX-Proxy-Max-Wait: 5\r\nX-Request-ID: req-42\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 8\r\n"
        b'Connection: close\r\n\r\n{"a": 1}',
    )
    seen = echo_upstream.requests[-1]["headers"]
    names = [k.lower() for k, _ in seen]
    assert ["X-Latin", "caf\udce9"] in seen  # the same bytes (aiohttp decodes them so)
    assert [v for k, v in seen if k.lower() == "x-multi"] == ["one", "two"]
    assert not [n for n in names if n.startswith("x-proxy-")]
    # The form type was corrected for the JSON body: one Content-Type, the right one.
    assert [v for k, v in seen if k.lower() == "content-type"] == ["application/json"]
    assert [v for k, v in seen if k.lower() == "x-request-id"] == ["req-42"]
    assert names.count("authorization") == 1 and names.count("content-length") == 1


async def test_bearer_401_is_passed_through_without_retry(
    make_proxy: MakeProxy, echo_upstream: EchoUpstream, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(echo_upstream.url, auth={"scheme": "bearer", "api_key": Secret("k")})
    async with http.get(proxy.url + "/status/401") as resp:
        assert resp.status == 401
    assert len(echo_upstream.requests) == 1


async def test_status_headers_and_large_body_come_back_unchanged(
    sandbox: SandboxServer, proxy: RunningProxy
) -> None:
    target = "/perl/api/v2/account/7/big?_bytes=200000"

    async def fetch(port: int) -> tuple[int, dict[str, str], bytes]:
        request = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        data = await raw_exchange(port, request)
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        return int(lines[0].split()[1]), headers, body

    status, headers, body = await fetch(proxy.service.port)
    assert status == 200
    doc = json.loads(body)
    assert doc["success"] == 1 and len(doc["data"]["filler"]) >= 200000
    # Keys in LuxSci's order, escapes untouched: the bytes are the sandbox's own.
    assert body.rstrip().endswith(b'"auth":"' + doc["auth"].encode() + b'"}')
    for name in (
        "content-type",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "date",
    ):
        assert name in headers
    assert headers["content-length"] == str(len(body))
    assert "x-request-id" in headers


async def test_the_escaped_raw_body_is_not_rewritten(
    proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    async with http.get(proxy.url + f"/perl/api/v2/user/{USER}/profile") as resp:
        raw = await resp.read()
    assert b"de\\u0073cription" in raw
    assert "description" in json.loads(raw)["data"]


async def test_head_keeps_the_upstream_content_length(
    proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    async with http.head(proxy.url + f"/perl/api/v2/user/{USER}/profile") as resp:
        assert resp.status == 200
        assert int(resp.headers["Content-Length"]) > 0
        assert await resp.read() == b""


async def test_request_id_is_kept_when_given_and_generated_when_not(
    proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    async with http.get(proxy.url + "/nope", headers={"X-Request-ID": "abc-123"}) as resp:
        assert resp.headers["X-Request-ID"] == "abc-123"
    async with http.get(proxy.url + "/nope") as resp:
        assert len(resp.headers["X-Request-ID"]) == 32
    for bad in ("bad id", "x" * 200, "<script>"):
        async with http.get(proxy.url + "/nope", headers={"X-Request-ID": bad}) as resp:
            assert len(resp.headers["X-Request-ID"]) == 32


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET http://other.example/perl/api/v2/auth HTTP/1.1",
        b"GET https://rest.luxsci.com/perl/api/v2/user/x/profile HTTP/1.1",
        b"CONNECT other.example:443 HTTP/1.1",
        b"OPTIONS * HTTP/1.1",
        b"GET //other.example/x HTTP/1.1",
    ],
)
async def test_non_origin_form_targets_get_400_and_nothing_goes_upstream(
    proxy: RunningProxy, sandbox: SandboxServer, request_line: bytes
) -> None:
    before = sandbox.sandbox.stats.requests
    data = await raw_exchange(
        proxy.service.port, request_line + b"\r\nHost: other.example\r\nConnection: close\r\n\r\n"
    )
    status, headers, body = parse_raw(data)
    assert status == 400
    assert headers["x-proxy-error"] == "bad_request"
    assert body["success"] == 0
    assert "target" in body["error_message"] or "CONNECT" in body["error_message"]
    assert sandbox.sandbox.stats.requests == before


async def test_body_over_the_limit_gets_413_before_reaching_the_api(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(sandbox.url, listen={"max_body_bytes": 1000})
    before = sandbox.sandbox.stats.requests
    async with http.post(
        proxy.url + "/perl/api/v2/account/1/x", data=b"{" + b" " * 2000 + b"}"
    ) as resp:
        assert resp.status == 413
        assert resp.headers["X-Proxy-Error"] == "body_too_large"
        assert "1000" in (await resp.json())["error_message"]

    async def chunked():  # no Content-Length: the limit is enforced while reading
        for _ in range(10):
            yield b"x" * 500

    async with http.post(proxy.url + "/perl/api/v2/account/1/x", data=chunked()) as resp:
        assert resp.status == 413
    assert sandbox.sandbox.stats.requests == before


async def test_expect_with_an_oversized_body_is_refused_without_100_continue(
    sandbox: SandboxServer, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(sandbox.url, listen={"max_body_bytes": 1000})
    data = await raw_exchange(
        proxy.service.port,
        b"POST /perl/api/v2/account/1/x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 5000\r\n\r\n",
    )
    assert data.startswith(b"HTTP/1.1 413")
    assert b"100 Continue" not in data


async def test_unreachable_upstream_gives_502_within_seconds(
    make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy = await make_proxy(f"http://127.0.0.1:{port}", auth={"retry_min": 0.05, "retry_max": 0.1})
    await asyncio.sleep(0.1)  # past the first backoff, so this request tries to connect again
    started = time.monotonic()
    async with http.get(proxy.url + "/perl/api/v2/account/1/x") as resp:
        body = await resp.json()
        assert resp.status == 502
        assert resp.headers["X-Proxy-Error"] == "upstream_unreachable"
        assert f"127.0.0.1:{port}" in body["error_message"]
    assert time.monotonic() - started < 5


async def test_bearer_upstream_down_gives_502(
    make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy = await make_proxy(
        f"http://127.0.0.1:{port}", auth={"scheme": "bearer", "api_key": Secret("k")}
    )
    async with http.get(proxy.url + "/x") as resp:
        assert resp.status == 502
        assert resp.headers["X-Proxy-Error"] == "upstream_unreachable"


async def test_slow_upstream_gives_504(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(sandbox.url, upstream={"read_timeout": 0.3})
    # Slow on every attempt: a GET is retried (see test_retries.py), then the client gets 504.
    sandbox.sandbox.add_fault(delay=2.0, times=10, path_prefix="/perl/api/v2/account/")
    async with http.get(proxy.url + "/perl/api/v2/account/1/slow") as resp:
        assert resp.status == 504
        assert resp.headers["X-Proxy-Error"] == "upstream_timeout"
        assert (await resp.json())["success"] == 0


async def test_dropped_upstream_connection_gives_502(
    sandbox: SandboxServer, proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    # aiohttp retries an idempotent request once on a fresh connection when a reused
    # keep-alive connection drops (the usual stale-connection case), so drop every try.
    # Retried too (a GET): so drop every attempt.
    sandbox.sandbox.add_fault(drop=True, times=50, path_prefix="/perl/api/v2/account/")
    async with http.get(proxy.url + "/perl/api/v2/account/1/x") as resp:
        assert resp.status == 502
        assert resp.headers["X-Proxy-Error"] == "upstream_unreachable"


@pytest.mark.parametrize("status", [400, 404, 409, 429, 500, 501])
async def test_api_errors_pass_through_unchanged(
    sandbox: SandboxServer, proxy: RunningProxy, http: aiohttp.ClientSession, status: int
) -> None:
    sandbox.sandbox.add_fault(status=status, times=10, path_prefix="/perl/api/v2/account/")
    async with http.get(proxy.url + "/perl/api/v2/account/1/x") as resp:
        assert resp.status == status
        assert "X-Proxy-Error" not in resp.headers


async def test_tls_upstream_verified_with_the_configured_ca(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession, ca_file: str
) -> None:
    sandbox = await make_sandbox(tls=True)
    assert sandbox.url.startswith("https://localhost:")
    proxy = await make_proxy(sandbox.url, upstream={"ca_file": ca_file, "allow_insecure": False})
    async with http.get(proxy.url + f"/perl/api/v2/user/{USER}/profile") as resp:
        assert resp.status == 200


async def test_tls_upstream_with_an_unknown_ca_is_refused(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    sandbox = await make_sandbox(tls=True)
    proxy = await make_proxy(sandbox.url, upstream={"allow_insecure": False})
    assert sandbox.sandbox.stats.requests == 0  # the handshake failed: nothing was sent
    async with http.get(proxy.url + f"/perl/api/v2/user/{USER}/profile") as resp:
        body = await resp.json()
        assert resp.status == 502
        assert "certificate" in body["error_message"]
