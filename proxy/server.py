"""The proxy listener's HTTP server: aiohttp's low-level server, with our answers to bad input.

Requests aiohttp's parser cannot read (an unknown method, an overlong header,
a malformed request line or framing) never reach a handler: aiohttp answers
them itself, in plain text that may echo the client's bytes. Here they get
the proxy's own error shape, with a fixed message per kind of fault, so every
client request gets an answer it can parse. Connections beyond
`listen.max_connections` are answered 503 and closed at once.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

import structlog
from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from proxy.errors import (
    BadRequest,
    HeadersTooLarge,
    ProxyError,
    TooManyConnections,
)
from proxy.forward import error_response, request_id

log = structlog.get_logger("proxy.server")


def parse_error(status: int, exc: BaseException | None) -> ProxyError:
    """The answer to a request aiohttp could not parse; never echoes what the client sent."""
    if isinstance(exc, http_exceptions.LineTooLong):
        return HeadersTooLarge("the request line or a header is too long (listen.max_header_bytes)")
    if isinstance(exc, http_exceptions.BadHttpMethod):
        return BadRequest("unknown or malformed HTTP method")
    if isinstance(exc, http_exceptions.InvalidURLError):
        return BadRequest("malformed request target")
    if isinstance(exc, http_exceptions.BadStatusLine):
        return BadRequest("malformed request line")
    if isinstance(exc, http_exceptions.InvalidHeader):
        return BadRequest("malformed header")
    if isinstance(exc, http_exceptions.PayloadEncodingError):
        return BadRequest("malformed body framing (Content-Length / Transfer-Encoding)")
    if isinstance(exc, http_exceptions.BadHttpMessage) or 400 <= status < 500:
        return BadRequest("malformed HTTP request")
    return ProxyError("internal proxy error; see the proxy log")


def _raw_answer(error: ProxyError) -> bytes:
    body = error.body()
    head = [
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in error.headers().items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_TOO_MANY = _raw_answer(
    TooManyConnections("too many connections to the proxy (listen.max_connections)", 1)
)


class ProxyRequestHandler(RequestHandler):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        if isinstance(manager, ProxyServer) and len(manager.connections) > manager.max_connections:
            # Over the cap: an answer any client can read, then hang up.
            log.warning("too_many_connections", limit=manager.max_connections)
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(_TOO_MANY)
            self.force_close()
            transport.close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        error = parse_error(status, exc)
        if error.status >= 500:
            log.error("internal_error", exc_info=exc)
        else:
            log.info(
                "bad_http_request", peer=request.remote, reason=error.reason, error=error.message
            )
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had begun; the connection is closed instead")
        response = error_response(error, request_id(None))
        response.force_close()
        return response


class ProxyServer(web.Server):
    def __init__(self, handler: Any, *, max_connections: int, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.max_connections = max_connections

    def __call__(self) -> RequestHandler:
        return ProxyRequestHandler(self, loop=self._loop, **self._kwargs)
