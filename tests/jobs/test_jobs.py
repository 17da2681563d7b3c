"""Durable jobs in a real proxy, on real sockets, with the store on disk."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import (
    USER,
    EchoUpstream,
    MakeProxy,
    MakeSandbox,
    RunningProxy,
    parse_raw,
    raw_exchange,
)
from jobs_helpers import (
    ASYNC,
    KEY,
    PREFIX,
    durable_redis,
    job,
    jobs_section,
    store_bytes,
    submit,
    until_done,
)
from structlog.testing import capture_logs

import proxy.jobs.runner as runner_module
from proxy.config import AccessRule, Secret
from proxy.jobs.callbacks import verify
from proxy.jobs.model import StoredRequest, aad
from proxy.jobs.seal import Sealer
from proxy.jobs.store import NewJob, SqliteStore
from proxy.sandbox import SandboxServer

ECHO = "/perl/api/v2/account/42/echo"
USER_PATH = f"/perl/api/v2/user/{USER}/profile"
FAST = {"backoff_base": 0.01, "backoff_max": 0.05}
BEARER = {
    "scheme": "bearer",
    "api_key": Secret("bearer-key-0123456789"),
    "token": None,
    "secret": None,
}


def sent_to_sandbox(sandbox: SandboxServer, method: str, marker: str) -> int:
    return sum(1 for e in sandbox.sandbox.log if e["method"] == method and marker in e["target"])


async def jobs_proxy(make_proxy: MakeProxy, url: str, tmp_path: Path, **over: Any) -> RunningProxy:
    sections: dict[str, Any] = {"retry": FAST}
    jobs = over.pop("jobs", {})
    sections.update(over)
    return await make_proxy(url, jobs=jobs_section(tmp_path, **jobs), **sections)


@pytest.fixture(params=["sqlite", "redis"])
def store_at(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The jobs section's store for tests both stores must pass: the default SQLite file,
    or a redis-server of the test's own (AOF, fsynced before every reply)."""
    if request.param == "sqlite":
        yield {}
        return
    server = durable_redis(tmp_path / "redis")
    try:
        yield {"store": server.url}
    finally:
        server.stop()


async def metrics(proxy: RunningProxy) -> str:
    async with aiohttp.ClientSession() as http, http.get(proxy.admin_url + "/metrics") as resp:
        return await resp.text()


# -- submission and the endpoints ---------------------------------------------------------------


async def test_a_request_preferring_async_is_stored_answered_202_then_run_once(
    store_at: dict[str, Any],
    sandbox: SandboxServer,
    make_proxy: MakeProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    proxy = await jobs_proxy(make_proxy, sandbox.url, tmp_path, jobs=store_at)
    marker = uuid.uuid4().hex
    status, headers, body = await submit(
        http,
        proxy.url,
        "POST",
        f"{ECHO}?m={marker}",
        {"note": marker},
        {"Prefer": "wait=5, Respond-Async"},
    )
    assert status == 202
    assert headers["Preference-Applied"] == "respond-async"
    assert headers["Location"] == f"{PREFIX}/{body['id']}"
    assert headers["Cache-Control"] == "no-store"
    assert body["state"] == "queued" and body["attempts"] == 0
    assert set(body) >= {
        "id",
        "state",
        "created_at",
        "attempts",
        "next_attempt_at",
        "last_error",
        "response_status",
    }
    done = await until_done(http, proxy.url, body["id"])
    assert (done["state"], done["response_status"], done["attempts"]) == ("succeeded", 200, 1)
    assert done["next_attempt_at"] is None
    async with http.get(f"{proxy.url}{headers['Location']}/response") as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert answer["data"]["json"] == {"note": marker}
    assert sent_to_sandbox(sandbox, "POST", marker) == 1
    text = await metrics(proxy)
    assert 'luxsci_proxy_jobs_submitted_total{integration="default"} 1.0' in text
    assert 'luxsci_proxy_jobs_completed_total{integration="default",state="succeeded"} 1.0' in text


async def test_without_the_preference_nothing_changes(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await jobs_proxy(make_proxy, sandbox.url, tmp_path)
    async with http.post(proxy.url + ECHO, json={"a": 1}, headers={"Prefer": "wait=1"}) as resp:
        assert resp.status == 200
        assert "Preference-Applied" not in resp.headers
    assert proxy.service.jobs is not None
    stats = await proxy.service.jobs.store.stats()
    assert sum(stats.by_state.values()) == 0


async def test_with_jobs_off_the_preference_is_ignored_and_the_request_served(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(sandbox.url)
    async with http.post(proxy.url + ECHO, json={"a": 1}, headers=ASYNC) as resp:
        assert resp.status == 200
    async with http.get(f"{proxy.url}{PREFIX}/{'0' * 32}") as resp:
        assert resp.status == 404  # forwarded to the API, which has no such path
        assert "X-Proxy-Error" not in resp.headers


async def test_the_stored_answer_is_replayed_byte_for_byte(
    make_proxy: MakeProxy, tmp_path: Path
) -> None:
    async def odd(request: web.Request) -> web.Response:
        return web.Response(
            status=299,
            reason="Fine Then",
            body=b'\x00{"x": "\xff"}\r\n',
            headers={"X-Odd-Case": "Value  with  spaces", "Set-Cookie": "a=1"},
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", odd)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        proxy = await jobs_proxy(make_proxy, url, tmp_path, auth=BEARER)
        direct = await raw_exchange(
            proxy.service.port, b"GET /v1/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        async with aiohttp.ClientSession() as http:
            status, _, body = await submit(http, proxy.url, "GET", "/v1/x")
            assert status == 202
            done = await until_done(http, proxy.url, body["id"])
        assert done["response_status"] == 299
        replay = await raw_exchange(
            proxy.service.port,
            f"GET {PREFIX}/{body['id']}/response HTTP/1.1\r\nHost: x\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
    finally:
        await runner.cleanup()

    def without_volatile(answer: bytes) -> tuple[bytes, list[bytes], bytes]:
        head, _, payload = answer.partition(b"\r\n\r\n")
        status_line, *lines = head.split(b"\r\n")
        keep = [ln for ln in lines if not ln.lower().startswith((b"date:", b"x-request-id:"))]
        return status_line, keep, payload

    # The same bytes a synchronous request gets: status line (with its reason), the
    # end-to-end headers in order and case, the body.
    assert without_volatile(replay) == without_volatile(direct)
    assert replay.startswith(b"HTTP/1.1 299 Fine Then\r\n")
    assert b"X-Odd-Case: Value  with  spaces\r\n" in replay


async def test_what_goes_upstream_has_no_respond_async_and_no_client_credentials(
    echo_upstream: EchoUpstream, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await jobs_proxy(make_proxy, echo_upstream.url, tmp_path, auth=BEARER)
    status, _, body = await submit(
        http,
        proxy.url,
        "POST",
        "/v1/things",
        {"a": 1},
        {
            "Prefer": "respond-async, wait=5",
            "Authorization": "Bearer the-clients-own",
            "Cookie": "session=client-cookie",
            "Idempotency-Key": "k-1",
        },
    )
    assert status == 202
    await until_done(http, proxy.url, body["id"])
    (seen,) = echo_upstream.requests
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["prefer"] == "wait=5"
    assert headers["authorization"] == "Bearer bearer-key-0123456789"
    assert "cookie" not in headers
    assert headers["idempotency-key"] == "k-1"  # end to end: the API may use it too
    assert seen["body"] == '{"a": 1}'


async def test_a_job_keeps_an_empty_querys_question_mark_as_the_proxy_path_does(
    store_at: dict[str, Any],
    sandbox: SandboxServer,
    make_proxy: MakeProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    proxy = await jobs_proxy(make_proxy, sandbox.url, tmp_path, jobs=store_at)
    sent = []
    # Raw bytes: an HTTP client library may drop a `?` with nothing after it.
    for target in (f"{ECHO}?", ECHO, f"{ECHO}?a=1"):
        request = (
            f"GET {target} HTTP/1.1\r\nHost: x\r\nPrefer: respond-async\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        status, _, body = parse_raw(await raw_exchange(proxy.service.port, request))
        assert status == 202, body
        done = await until_done(http, proxy.url, body["id"])
        # The sandbox checked the signature over the target it got (query "" or none).
        assert done["state"] == "succeeded" and done["response_status"] == 200
        sent.append(sandbox.sandbox.log[-1]["target"])
    assert sent == [f"{ECHO}?", ECHO, f"{ECHO}?a=1"]


async def test_unknown_jobs_are_404_and_other_methods_405(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await jobs_proxy(make_proxy, sandbox.url, tmp_path)
    for path in (
        f"{PREFIX}/{'a' * 32}",
        f"{PREFIX}/{'a' * 32}/response",
        f"{PREFIX}/nope",
        PREFIX,
        f"{PREFIX}/{'a' * 32}/other",
    ):
        async with http.get(proxy.url + path) as resp:
            assert resp.status == 404, path
            assert resp.headers["X-Proxy-Error"] == "job_not_found"
            assert (await resp.json())["success"] == 0
    _, _, body = await submit(http, proxy.url, "GET", USER_PATH)
    async with http.put(f"{proxy.url}{PREFIX}/{body['id']}") as resp:
        assert resp.status == 405
    assert sandbox.sandbox.stats.requests <= 2  # the login and the job: no endpoint forwarded


async def test_a_queued_job_can_be_cancelled_a_running_one_not(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await jobs_proxy(make_proxy, sandbox.url, tmp_path, jobs={"concurrency": 1})
    sandbox.sandbox.add_fault(delay=1.5, times=1, path_prefix="/perl/api/v2/account/1/")
    _, _, slow = await submit(http, proxy.url, "POST", "/perl/api/v2/account/1/slow", {"a": 1})
    _, _, behind = await submit(http, proxy.url, "POST", "/perl/api/v2/account/2/next", {"b": 2})
    for _ in range(100):
        if (await job(http, proxy.url, slow["id"]))["state"] == "running":
            break
        await asyncio.sleep(0.02)
    async with http.delete(f"{proxy.url}{PREFIX}/{slow['id']}") as resp:
        assert resp.status == 409
        assert resp.headers["X-Proxy-Error"] == "job_not_cancellable"
    async with http.get(f"{proxy.url}{PREFIX}/{slow['id']}/response") as resp:
        assert resp.status == 409
        assert resp.headers["X-Proxy-Error"] == "job_not_done"
    async with http.delete(f"{proxy.url}{PREFIX}/{behind['id']}") as resp:
        assert resp.status == 200
        assert (await resp.json())["state"] == "cancelled"
    async with http.get(f"{proxy.url}{PREFIX}/{behind['id']}/response") as resp:
        assert resp.status == 404
        assert resp.headers["X-Proxy-Error"] == "job_no_response"
    assert (await until_done(http, proxy.url, slow["id"]))["state"] == "succeeded"
    await asyncio.sleep(0.3)
    assert sent_to_sandbox(sandbox, "POST", "/account/2/") == 0  # never sent


# -- admission, validation and faults -------------------------------------------------------


async def test_submissions_pass_admission_and_body_checks_before_anything_is_stored(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    token = "client-token-0123456789"
    proxy = await jobs_proxy(
        make_proxy,
        sandbox.url,
        tmp_path,
        access={
            "client_token": Secret(token),
            "rules": (AccessRule(("GET", "POST"), "/perl/api/v2/account/**"),),
            "protected_users": ("ceo@example.com",),
        },
    )
    auth = {"Proxy-Authorization": f"Bearer {token}"}
    status, _, _ = await submit(http, proxy.url, "POST", ECHO, {"a": 1})
    assert status == 403  # no client token
    status, _, _ = await submit(http, proxy.url, "DELETE", ECHO, None, auth)
    assert status == 403  # not allowed by the rules
    async with http.post(
        proxy.url + ECHO,
        data=b"{not json",
        headers={**ASYNC, **auth, "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 400
    status, _, body = await submit(http, proxy.url, "POST", ECHO, {"a": 1}, auth)
    assert status == 202
    # The endpoints need the token too.
    async with http.get(f"{proxy.url}{PREFIX}/{body['id']}") as resp:
        assert resp.status == 403
    assert (await until_done(http, proxy.url, body["id"], headers=auth))["state"] == "succeeded"
    assert proxy.service.jobs is not None
    stats = await proxy.service.jobs.store.stats()
    assert sum(stats.by_state.values()) == 1


async def test_a_full_store_answers_503_jobs_full_with_retry_after(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await jobs_proxy(make_proxy, sandbox.url, tmp_path, jobs={"max_jobs": 2})
    for _ in range(2):
        assert (await submit(http, proxy.url, "GET", USER_PATH))[0] == 202
    status, headers, body = await submit(http, proxy.url, "GET", USER_PATH)
    assert status == 503
    assert headers["X-Proxy-Error"] == "jobs_full"
    assert int(headers["Retry-After"]) >= 1
    assert body["success"] == 0


async def test_a_store_that_cannot_write_acknowledges_nothing(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await jobs_proxy(make_proxy, sandbox.url, tmp_path)
    jobs = proxy.service.jobs
    assert jobs is not None
    status, _, first = await submit(http, proxy.url, "GET", USER_PATH)
    assert status == 202
    await until_done(http, proxy.url, first["id"])
    # As on a full disk: SQLite answers SQLITE_FULL to every write that needs a page.
    await jobs.store.limit_pages(1)
    big = {"pad": "x" * 200_000}
    with capture_logs() as logs:
        status, headers, _ = await submit(http, proxy.url, "POST", ECHO, big)
    assert status == 503
    assert headers["X-Proxy-Error"] == "jobs_unavailable"
    assert "Retry-After" in headers
    assert any(e["event"] == "jobs_store_failed" for e in logs)
    # Reads still work, and nothing of the refused job was kept.
    assert (await job(http, proxy.url, first["id"]))["state"] == "succeeded"
    await jobs.store.limit_pages(1_000_000)
    stats = await jobs.store.stats()
    assert sum(stats.by_state.values()) == 1


# -- idempotency keys -------------------------------------------------------------------------


async def test_an_idempotency_key_gives_the_same_job_back_and_sends_once(
    store_at: dict[str, Any],
    sandbox: SandboxServer,
    make_proxy: MakeProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    proxy = await jobs_proxy(make_proxy, sandbox.url, tmp_path, jobs=store_at)
    marker = uuid.uuid4().hex
    path = f"{ECHO}?m={marker}"
    key = {"Idempotency-Key": '"order-77"'}
    first = await submit(http, proxy.url, "POST", path, {"n": 1}, key)
    again = await submit(http, proxy.url, "POST", path, {"n": 1}, key)
    assert first[0] == again[0] == 202
    assert first[2]["id"] == again[2]["id"]
    await until_done(http, proxy.url, first[2]["id"])
    after = await submit(http, proxy.url, "POST", path, {"n": 1}, key)
    assert after[2]["id"] == first[2]["id"] and after[2]["state"] == "succeeded"
    for method, other_path, body in (
        ("POST", path, {"n": 2}),
        ("POST", ECHO + "?m=other", {"n": 1}),
        ("PUT", path, {"n": 1}),
    ):
        status, headers, answer = await submit(http, proxy.url, method, other_path, body, key)
        assert status == 422, (method, other_path, body)
        assert headers["X-Proxy-Error"] == "idempotency_key_reused"
        assert first[2]["id"] in answer["error_message"]
    other = await submit(http, proxy.url, "POST", path, {"n": 1}, {"Idempotency-Key": "order-78"})
    assert other[2]["id"] != first[2]["id"]
    await until_done(http, proxy.url, other[2]["id"])
    assert sent_to_sandbox(sandbox, "POST", marker) == 2


async def test_concurrent_submissions_with_one_key_make_one_job(
    store_at: dict[str, Any],
    sandbox: SandboxServer,
    make_proxy: MakeProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    proxy = await jobs_proxy(make_proxy, sandbox.url, tmp_path, jobs=store_at)
    answers = await asyncio.gather(
        *(
            submit(http, proxy.url, "POST", ECHO, {"n": 1}, {"Idempotency-Key": "same"})
            for _ in range(20)
        )
    )
    assert {a[0] for a in answers} == {202}
    assert len({a[2]["id"] for a in answers}) == 1


async def test_a_malformed_idempotency_key_is_400(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await jobs_proxy(make_proxy, sandbox.url, tmp_path)
    status, _, _ = await submit(http, proxy.url, "POST", ECHO, {}, {"Idempotency-Key": "a b"})
    assert status == 400


# -- callbacks --------------------------------------------------------------------------------


class Receiver:
    """A local app receiving callbacks: it verifies every signature it gets."""

    def __init__(self, secret: bytes, fail_first: int = 0) -> None:
        self.secret = secret
        self.fail_first = fail_first
        self.got: list[dict[str, Any]] = []
        self.verified: list[bool] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.verified.append(
            verify(self.secret, body, request.headers.get("X-Proxy-Signature", ""), time.time())
        )
        self.got.append(json.loads(body))
        if self.fail_first:
            self.fail_first -= 1
            return web.Response(status=500)
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver(b"callback-secret-0123456789", fail_first=1)
    app = web.Application()
    app.router.add_post("/hooks/{tail:.*}", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield rec
    await runner.cleanup()


async def test_a_finished_job_is_posted_signed_to_its_callback_and_retried(
    sandbox: SandboxServer,
    make_proxy: MakeProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    receiver: Receiver,
) -> None:
    secret = receiver.secret.decode()
    proxy = await jobs_proxy(
        make_proxy,
        sandbox.url,
        tmp_path,
        jobs={"callback_allow": (receiver.url + "/hooks/",), "callback_secret": Secret(secret)},
    )
    with capture_logs() as logs:
        status, _, body = await submit(
            http,
            proxy.url,
            "POST",
            ECHO,
            {"a": 1},
            {"X-Proxy-Callback": receiver.url + "/hooks/job-done"},
        )
        assert status == 202
        for _ in range(400):
            if len(receiver.got) >= 2:
                break
            await asyncio.sleep(0.01)
    # The first delivery was refused (500), the second taken: both signed and verified.
    assert receiver.verified == [True, True]
    assert [g["id"] for g in receiver.got] == [body["id"]] * 2
    assert receiver.got[-1]["state"] == "succeeded"
    assert receiver.got[-1]["response_status"] == 200
    assert any(e["event"] == "job_callback_failed" for e in logs)
    assert (
        'luxsci_proxy_job_callback_failures_total{integration="default",result="retrying"} 1.0'
        in await metrics(proxy)
    )
    assert secret not in repr(logs)


async def test_a_callback_outside_the_allow_list_is_400_before_anything_is_stored(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await jobs_proxy(
        make_proxy,
        sandbox.url,
        tmp_path,
        jobs={
            "callback_allow": ("http://127.0.0.1:9/hooks/",),
            "callback_secret": Secret("callback-secret-0123456789"),
        },
    )
    for url in ("http://127.0.0.1:9/other", "http://127.0.0.1.evil.example:9/hooks/x"):
        status, headers, _ = await submit(
            http, proxy.url, "POST", ECHO, {"a": 1}, {"X-Proxy-Callback": url}
        )
        assert status == 400
        assert headers["X-Proxy-Error"] == "bad_request"
    assert proxy.service.jobs is not None
    stats = await proxy.service.jobs.store.stats()
    assert sum(stats.by_state.values()) == 0


# -- running: retries, expiry, the day's budget, the lane ----------------------------------------


async def test_a_job_that_cannot_reach_the_api_expires_after_max_age(
    make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await jobs_proxy(
        make_proxy, "http://127.0.0.1:9", tmp_path, auth=BEARER, jobs={"max_age": 1.0}
    )
    status, _, body = await submit(http, proxy.url, "POST", "/v1/send", {"a": 1})
    assert status == 202
    done = await until_done(http, proxy.url, body["id"], within=10)
    assert done["state"] == "expired"
    assert done["attempts"] >= 1
    assert "max_age" in done["last_error"]


async def test_a_lost_connection_after_sending_a_post_is_outcome_unknown_not_resent(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await jobs_proxy(make_proxy, sandbox.url, tmp_path)
    sandbox.sandbox.add_fault(drop=True, times=1, path_prefix="/perl/api/v2/account/5/")
    _, _, body = await submit(http, proxy.url, "POST", "/perl/api/v2/account/5/x", {"a": 1})
    done = await until_done(http, proxy.url, body["id"])
    assert done["state"] == "outcome_unknown"
    assert sent_to_sandbox(sandbox, "POST", "/account/5/") == 1


async def test_an_idempotent_job_is_retried_later_until_it_succeeds(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await jobs_proxy(make_proxy, sandbox.url, tmp_path, retry={**FAST, "max_attempts": 2})
    # Three 503s: the first run's two attempts, then one more run later.
    sandbox.sandbox.add_fault(status=503, json=False, times=3, path_prefix="/perl/api/v2/user/")
    _, _, body = await submit(http, proxy.url, "GET", USER_PATH)
    done = await until_done(http, proxy.url, body["id"], within=20)
    assert (done["state"], done["response_status"], done["attempts"]) == ("succeeded", 200, 4)


async def test_a_post_answered_500_fails_with_the_answer_kept(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await jobs_proxy(make_proxy, sandbox.url, tmp_path)
    sandbox.sandbox.add_fault(status=500, times=1, path_prefix="/perl/api/v2/account/9/")
    _, _, body = await submit(http, proxy.url, "POST", "/perl/api/v2/account/9/x", {"a": 1})
    done = await until_done(http, proxy.url, body["id"])
    assert (done["state"], done["response_status"]) == ("failed", 500)
    async with http.get(f"{proxy.url}{PREFIX}/{body['id']}/response") as resp:
        assert resp.status == 500
        assert (await resp.json())["success"] == 0


async def _at_start_of_a_day(day: float) -> None:
    """Sleep until a day has just begun (so the test is not cut by a turn of the day)."""
    into = time.time() % day
    if into > 0.3:
        await asyncio.sleep(day - into + 0.01)


async def test_a_spent_day_budget_makes_jobs_wait_for_the_next_day_not_fail(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    day = 4.0
    sandbox = await make_sandbox(window_seconds=1, day_seconds=4)
    limits = {"per_day": 3, "window_seconds": 1.0, "day_seconds": day}
    proxy = await jobs_proxy(make_proxy, sandbox.url, tmp_path, limits=limits)
    await _at_start_of_a_day(day)
    while True:  # spend today's budget (the login counts too)
        async with http.get(proxy.url + USER_PATH) as resp:
            if resp.status == 503:
                assert resp.headers["X-Proxy-Error"] == "daily_limit"
                break
    submitted = time.time()
    _, _, body = await submit(http, proxy.url, "GET", USER_PATH)
    await asyncio.sleep(0.5)
    waiting = await job(http, proxy.url, body["id"])
    assert waiting["state"] == "queued"
    assert "budget" in waiting["last_error"]
    text = ""
    for _ in range(40):  # the counts behind the gauges are taken every 2 s
        text = await metrics(proxy)
        if 'luxsci_proxy_jobs{integration="default",state="queued"} 1.0' in text:
            break
        await asyncio.sleep(0.1)
    assert 'luxsci_proxy_jobs{integration="default",state="queued"} 1.0' in text
    age = [ln for ln in text.splitlines() if ln.startswith("luxsci_proxy_jobs_oldest_queued")]
    assert float(age[0].split()[-1]) > 0
    ready, checks = proxy.service.readiness()
    assert ready  # the jobs are reported, never required
    assert checks["jobs"] == {"ok": True, "queued": 1}
    done = await until_done(http, proxy.url, body["id"], within=3 * day)
    assert done["state"] == "succeeded"
    assert time.time() - submitted > 1.0  # it waited for the day to turn


async def test_a_job_that_waits_for_the_day_past_its_max_age_expires(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    day = 30.0
    sandbox = await make_sandbox(window_seconds=1, day_seconds=30)
    limits = {"per_day": 2, "window_seconds": 1.0, "day_seconds": day}
    proxy = await jobs_proxy(
        make_proxy, sandbox.url, tmp_path, limits=limits, jobs={"max_age": 1.5}
    )
    while True:
        async with http.get(proxy.url + USER_PATH) as resp:
            if resp.status == 503:
                break
    _, _, body = await submit(http, proxy.url, "GET", USER_PATH)
    done = await until_done(http, proxy.url, body["id"], within=10)
    assert done["state"] == "expired"


async def test_queued_jobs_delay_a_synchronous_request_by_one_permit_at_most(
    make_sandbox: MakeSandbox, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # Two permits per 3-second window: ten queued jobs would hold the line for 15 s.
    sandbox = await make_sandbox(window_seconds=3, account_per_window=2)
    limits = {"account_per_minute": 2, "window_seconds": 3.0}
    proxy = await jobs_proxy(
        make_proxy,
        sandbox.url,
        tmp_path,
        limits=limits,
        jobs={"concurrency": 4},
        shutdown_timeout=1.0,
    )
    for i in range(10):
        await submit(http, proxy.url, "POST", f"/perl/api/v2/account/7/j{i}", {"i": i})
    await asyncio.sleep(0.5)
    waits = []
    for _ in range(2):
        started = time.monotonic()
        async with http.get(proxy.url + "/perl/api/v2/account/7/sync") as resp:
            assert resp.status == 200
        waits.append(time.monotonic() - started)
    # The jobs leave the window's last permit to synchronous requests: the first one is
    # served at once; the next finds it spent and waits for the next window, where it
    # goes before every job (at worst behind the one already in line).
    assert waits[0] < 0.5, waits
    assert max(waits) < 3.5, waits
    assert sent_to_sandbox(sandbox, "POST", "/account/7/j") < 10


# -- crash safety, records at rest ------------------------------------------------------------


async def _seed(
    path: Path, jobs: list[tuple[str, str, str]], running: bool, sealer: Sealer
) -> None:
    """Jobs as a dead process would have left them: (id, method, path)."""
    store = SqliteStore(path, 1000)
    await store.open()
    now = time.time()
    for job_id, method, target in jobs:
        request = StoredRequest(method, target, "", b"", b"", "", "rid-" + job_id)
        await store.submit(
            NewJob(
                job_id,
                "anonymous",  # the client of a proxy with no client tokens
                None,
                method,
                "account" if "/account/" in target else "user",
                now,
                now + 3600,
                sealer.seal(request.encode(), aad(job_id, "request")),
                None,
            )
        )
        if running:
            assert await store.mark_running(job_id, now)
    await store.close()


async def test_jobs_left_running_are_settled_by_method_at_start(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    post_id, get_id = "a" * 32, "b" * 32
    await _seed(
        tmp_path / "jobs.db",
        [(post_id, "POST", "/perl/api/v2/account/3/crash"), (get_id, "GET", USER_PATH)],
        running=True,
        sealer=Sealer([base64.b64decode(KEY)]),
    )
    with capture_logs() as logs:
        proxy = await jobs_proxy(make_proxy, sandbox.url, tmp_path)
        unknown = await until_done(http, proxy.url, post_id)
        again = await until_done(http, proxy.url, get_id)
    assert unknown["state"] == "outcome_unknown"
    assert "jobs retry" in unknown["last_error"]
    assert (again["state"], again["attempts"]) == ("succeeded", 2)
    assert sent_to_sandbox(sandbox, "POST", "/account/3/") == 0
    assert [e["job_id"] for e in logs if e["event"] == "job_outcome_unknown"] == [post_id]


async def test_an_unreadable_record_is_reported_by_id_and_skipped(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    lost = "c" * 32
    await _seed(
        tmp_path / "jobs.db",
        [(lost, "GET", USER_PATH)],
        running=False,
        sealer=Sealer([os.urandom(32)]),  # a key the proxy does not have
    )
    with capture_logs() as logs:
        proxy = await jobs_proxy(make_proxy, sandbox.url, tmp_path)
        _, _, fine = await submit(http, proxy.url, "GET", USER_PATH)
        assert (await until_done(http, proxy.url, fine["id"]))["state"] == "succeeded"
        await asyncio.sleep(0.2)
    skipped = await job(http, proxy.url, lost)
    assert skipped["state"] == "queued"
    assert "not among jobs.keys" in skipped["last_error"]
    assert any(e["event"] == "job_record_unreadable" and e["job_id"] == lost for e in logs)


async def test_bodies_paths_and_keys_never_reach_the_disk_or_the_log_in_clear(
    sandbox: SandboxServer, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    marker = "PHI-" + uuid.uuid4().hex
    secret = "callback-secret-" + uuid.uuid4().hex
    with capture_logs() as logs:
        proxy = await jobs_proxy(
            make_proxy,
            sandbox.url,
            tmp_path,
            jobs={"callback_allow": ("http://127.0.0.1:9/h/",), "callback_secret": Secret(secret)},
        )
        ids = []
        for i in range(20):
            _, _, body = await submit(
                http,
                proxy.url,
                "POST",
                f"/perl/api/v2/user/{USER}/note",
                {"diagnosis": f"{marker}-{i}"},
                {"X-Proxy-Callback": f"http://127.0.0.1:9/h/{marker}"},
            )
            ids.append(body["id"])
        for job_id in ids:
            await until_done(http, proxy.url, job_id)
        on_disk = store_bytes(tmp_path / "jobs.db")
    # The answers (the sandbox echoes the body) are sealed too.
    assert marker.encode() not in on_disk
    assert USER.encode() not in on_disk
    assert b"diagnosis" not in on_disk
    logged = repr(logs)
    assert marker not in logged
    assert KEY not in logged and secret not in logged


async def test_a_reload_keeps_the_jobs_section_and_says_it_needs_a_restart(
    sandbox: SandboxServer, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = await jobs_proxy(make_proxy, sandbox.url, tmp_path)
    service = proxy.service
    changed = dataclasses.replace(
        service.cfg,
        jobs=dataclasses.replace(service.cfg.jobs, max_age=5.0),
        retry=dataclasses.replace(service.cfg.retry, max_attempts=2),
    )
    assert "jobs" in await service.reload(changed)
    assert service.cfg.jobs.max_age == 7 * 86400
    assert service.jobs is not None
    assert service.jobs.attempts.retries.max_attempts == 2  # retry settings apply to jobs too


async def test_a_job_a_worker_drops_on_a_bug_is_taken_over_not_held_for_ever(
    sandbox: SandboxServer,
    make_proxy: MakeProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On Redis a held job is kept fresh by the heartbeat: one a worker dropped on an
    # unexpected error would stay `queued` in this replica's hands while it lives.
    real = runner_module.Outbound
    bugs = []

    def buggy(*args: Any, **kwargs: Any) -> Any:
        if not bugs:
            bugs.append(1)
            raise RuntimeError("a bug in the runner")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_module, "Outbound", buggy)
    server = durable_redis(tmp_path / "redis")
    try:
        jobs = {"store": server.url, "visibility_timeout": 0.5}
        with capture_logs() as logs:
            proxy = await jobs_proxy(make_proxy, sandbox.url, tmp_path, jobs=jobs)
            _, _, body = await submit(http, proxy.url, "GET", USER_PATH)
            done = await until_done(http, proxy.url, body["id"], within=30)
        assert bugs == [1]
        assert any(e["event"] == "job_runner_error" and e["job_id"] == body["id"] for e in logs)
        # Taken over (it was never sent: back in line) and run once, after the bug.
        assert (done["state"], done["response_status"]) == ("succeeded", 200)
    finally:
        server.stop()
