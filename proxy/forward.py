"""The one hot path: client request in, signed request upstream, answer back unchanged.

Small answers are read whole and sent with one write; large or unsized ones
are streamed chunk by chunk, and the fresh auth code is harvested from the
chunks as they pass, so a large download is never buffered or parsed whole.
"""

from __future__ import annotations

import re
import time
import uuid

import aiohttp
import structlog
from aiohttp import web

from proxy.clock import ServerClock
from proxy.errors import ProxyError
from proxy.inbound import Outbound, downstream_headers, read_request
from proxy.schemes import AuthScheme
from proxy.session import AuthCode
from proxy.upstream import Upstream, translate

log = structlog.get_logger("proxy.access")

# Answers up to this size (with a known length) are read whole: one write, no chunk loop.
SMALL_BODY = 64 * 1024
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def request_id(given: str | None) -> str:
    """The client's X-Request-ID when it is a sane token, else a new one."""
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


def error_response(error: ProxyError, rid: str) -> web.Response:
    headers = error.headers()
    headers["X-Request-ID"] = rid
    return web.Response(
        status=error.status, body=error.body(), headers=headers, content_type="application/json"
    )


class Forwarder:
    def __init__(
        self,
        upstream: Upstream,
        scheme: AuthScheme,
        clock: ServerClock,
        max_body: int,
    ) -> None:
        self.upstream = upstream
        self.scheme = scheme
        self.clock = clock
        self.max_body = max_body

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        rid = request_id(request.headers.get("X-Request-ID"))
        event: dict[str, object] = {"request_id": rid, "method": request.method}
        response: web.StreamResponse
        try:
            out = await read_request(request, self.max_body)
            event["path"] = out.path
            event["bytes_in"] = len(out.body)
            out.headers["X-Request-ID"] = rid
            resp, used, sent_at, attempts = await self._exchange(out)
            event["attempts"] = attempts
            event["upstream_status"] = resp.status
            try:
                response = await self._respond(request, resp, used, sent_at, rid)
            finally:
                resp.release()
        except ProxyError as e:
            event["error"] = e.reason
            event["error_message"] = e.message
            response = error_response(e, rid)
        except Exception:
            # A bug, not the client's fault: answer anyway, and leave the traceback in the log.
            log.exception("internal_error", request_id=rid)
            event["error"] = "internal_error"
            response = error_response(ProxyError("internal proxy error; see the proxy log"), rid)
        event["status"] = response.status
        body = response.body if isinstance(response, web.Response) else None
        event["bytes_out"] = len(body) if isinstance(body, bytes) else response.body_length
        event["total_ms"] = round((time.perf_counter() - started) * 1000, 2)
        log.info("request", **event)
        return response

    async def _exchange(
        self, out: Outbound
    ) -> tuple[aiohttp.ClientResponse, AuthCode | None, float, int]:
        """Send, and after a 401 log in again and send once more (at most one refresh)."""
        attempts = 0
        while True:
            attempts += 1
            used = await self.scheme.apply(out)
            sent_at = time.monotonic()
            resp = await self.upstream.request(
                out.method, out.path, out.query, out.headers, out.body
            )
            self.clock.observe(resp.headers.get("Date"))
            if resp.status == 401 and attempts == 1 and self.scheme.refreshes_on_401:
                resp.release()
                log.info("auth_retry_after_401", path=out.path)
                self.scheme.invalidate(used)
                continue
            return resp, used, sent_at, attempts

    async def _respond(
        self,
        request: web.BaseRequest,
        resp: aiohttp.ClientResponse,
        used: AuthCode | None,
        sent_at: float,
        rid: str,
    ) -> web.StreamResponse:
        headers = downstream_headers(resp.headers)
        headers["X-Request-ID"] = rid
        harvester = (
            self.scheme.harvester(used, resp.headers.get("Content-Encoding"))
            if 200 <= resp.status < 300
            else None
        )
        length = resp.content_length
        if request.method == "HEAD" or resp.status in (204, 304) or resp.status < 200:
            # No body follows; the upstream's Content-Length still describes the resource.
            if length is not None:
                headers["Content-Length"] = str(length)
            sr = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
            await sr.prepare(request)
            await sr.write_eof()
            return sr

        if length is not None and length <= SMALL_BODY:
            try:
                body = await resp.read()
            except Exception as e:
                raise translate(e, self.upstream.where) from e
            if harvester is not None:
                harvester.feed(body)
                self.scheme.harvested(used, sent_at, harvester)
            return web.Response(status=resp.status, reason=resp.reason, headers=headers, body=body)

        sr = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
        if length is not None:
            sr.content_length = length
        await sr.prepare(request)
        content = resp.content
        while True:
            try:
                chunk = await content.readany()
            except (TimeoutError, aiohttp.ClientError) as e:
                # The head is already sent: all we can do is cut the client off, so it
                # sees a truncated answer rather than a complete-looking wrong one.
                log.warning("upstream_failed_mid_body", request_id=rid, error=type(e).__name__)
                if request.transport is not None:
                    request.transport.close()
                return sr
            if not chunk:
                break
            try:
                await sr.write(chunk)
            except ConnectionResetError:
                log.info("client_disconnected_mid_body", request_id=rid)
                return sr
            if harvester is not None and not harvester.done:
                harvester.feed(chunk)
        await sr.write_eof()
        if harvester is not None:
            self.scheme.harvested(used, sent_at, harvester)
        return sr
