"""The last step: the API's answer to the client, unchanged.

Small answers (a known length up to SMALL_BODY) are read whole and sent with
one write; large or unsized ones are streamed chunk by chunk. The scheme may
watch a success answer as it passes (LuxSci takes the fresh auth code from
it), so a large download is never buffered or parsed whole.
"""

from __future__ import annotations

import structlog

from proxy.errors import ProxyError
from proxy.http.headers import downstream_block
from proxy.http.server import Request
from proxy.observe.access_record import AccessRecord
from proxy.observe.log import body_text
from proxy.pipeline.attempts import Exchange
from proxy.schemes.base import AnswerWatch, AuthScheme

log = structlog.get_logger("proxy.access")

# Answers up to this size (with a known length) are read whole: one write, no chunk loop.
SMALL_BODY = 64 * 1024


class Relay:
    def __init__(self, scheme: AuthScheme, log_bodies: bool) -> None:
        self.scheme = scheme
        # Replaced on reload (SIGHUP).
        self.log_bodies = log_bodies

    async def __call__(
        self,
        request: Request,
        exchange: Exchange,
        rid: str,
        event: AccessRecord,
        note: bytes = b"",
    ) -> tuple[int, int]:
        """Hand the answer to the client; returns (status, body bytes sent).

        `note`: header lines of the proxy's own to add (the lane applied).
        """
        resp = exchange.resp
        status = resp.status
        headers = downstream_block(resp.raw_headers, resp.headers)
        headers += b"X-Request-ID: " + rid.encode() + b"\r\n" + note
        length = resp.content_length
        if request.method == "HEAD" or status in (204, 304) or status < 200:
            # No body follows; the upstream's Content-Length still describes the resource.
            request.respond_head(status, headers, length, reason=resp.reason)
            return status, 0
        watch = (
            self.scheme.watch(exchange.used, exchange.sent_at, resp.headers)
            if 200 <= status < 300
            else None
        )
        if length is not None and length <= SMALL_BODY:
            body = await resp.read()
            if watch is not None:
                watch.whole(body)
            if self.log_bodies:
                event.response_body = body_text(body)
            return status, request.respond(status, headers, body, reason=resp.reason)
        request.start(status, headers, length, reason=resp.reason)
        return status, await _stream(request, exchange, watch, rid)


async def _stream(request: Request, exchange: Exchange, watch: AnswerWatch | None, rid: str) -> int:
    """The body chunk by chunk, after the head; returns the bytes sent."""
    resp = exchange.resp
    sent = 0
    while True:
        try:
            chunk = await resp.readany()
        except ProxyError as e:
            # The head is already sent: all we can do is cut the client off, so it
            # sees a truncated answer rather than a complete-looking wrong one.
            log.warning("upstream_failed_mid_body", request_id=rid, error=e.reason)
            request.abort()
            return sent
        if not chunk:
            break
        try:
            await request.write(chunk)
        except ConnectionResetError:
            log.info("client_disconnected_mid_body", request_id=rid)
            return sent
        sent += len(chunk)
        if watch is not None:
            watch.feed(chunk)
    request.end()
    if watch is not None:
        watch.end()
    return sent
