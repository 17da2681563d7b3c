"""The CONNECT tunnel through an egress proxy (RFC 9110 9.3.6), TLS inside it.

Every origin, https:// and plain http:// alike, is reached through a tunnel, never by
handing the proxy an absolute-form request. A tunnel keeps the proxy's answers apart from
the API's: a refusal (407, 403, 502) comes before a byte of the request was sent, so it
can be named and retried for any method, where an absolute-form request would get the
proxy's 403 or 502 back as if the API had answered it. The request inside goes on
exactly as it would directly (origin-form target, the API's Host), so what was signed is
what the API sees. TLS runs inside the tunnel, with SNI and certificate verification for
the API's own host name: the proxy only ever sees ciphertext. The API's name is resolved
by the proxy, never here.

Which proxy, and the credentials it gets: proxy/egress.py.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from http import HTTPStatus
from typing import cast

from proxy.egress import EgressProxy, authority

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: .*)?")


class TunnelFailed(Exception):
    """The tunnel to the origin was not made; the message names what failed. The API
    never saw the request (the caller makes this a ConnectFailed)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def connect_request(target: str, authorization: str | None) -> bytes:
    """`CONNECT host:port` with the Host header RFC 9112 3.2.3 asks for."""
    lines = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    if authorization is not None:
        lines += f"Proxy-Authorization: {authorization}\r\n"
    return (lines + "\r\n").encode("latin-1")


class _Opener(asyncio.Protocol):
    """Reads the proxy's answer to CONNECT: its head, and nothing after it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, proxy: str, max_head: int) -> None:
        # The head, and whether bytes came after it.
        self.reply: asyncio.Future[tuple[bytes, bool]] = loop.create_future()
        self._proxy = proxy
        self._max_head = max_head
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.reply.done():
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > self._max_head:
                self.reply.set_exception(
                    TunnelFailed(
                        f"egress proxy {self._proxy} sent an answer to CONNECT over "
                        f"{self._max_head} bytes (upstream.max_header_bytes)"
                    )
                )
            return
        # Nothing more is read until the tunnel has its real protocol (TLS, or HTTP).
        assert self.transport is not None
        self.transport.pause_reading()
        self.reply.set_result((bytes(self._buffer[:end]), len(self._buffer) > end + 4))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.reply.done():
            self.reply.set_exception(
                TunnelFailed(
                    f"egress proxy {self._proxy} closed the connection without answering CONNECT"
                )
            )


def _phrase(status: int) -> str:
    # The standard phrase, never the proxy's own text: it goes to clients and logs.
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def _refusal(proxy: EgressProxy, target: str, status: int) -> str:
    if status >= 500:
        return f"egress proxy {proxy.where} could not open a tunnel to {target}: {_phrase(status)}"
    message = f"egress proxy {proxy.where} refused the tunnel to {target}: {_phrase(status)}"
    if status == 407:
        message += (
            " (the credentials were refused)"
            if proxy.authorization is not None
            else " (no credentials were sent: set upstream.proxy_user and proxy_password, "
            "or user:password@ in the proxy URL)"
        )
    return message


async def dial(
    loop: asyncio.AbstractEventLoop,
    proxy: EgressProxy,
    host: str,
    port: int,
    where: str,
    tls: ssl.SSLContext | None,
    protocol: asyncio.Protocol,
    connect_timeout: float,
    max_head: int,
) -> None:
    """Connect `protocol` to host:port through `proxy` within `connect_timeout` seconds: a CONNECT
    tunnel, TLS inside it when `tls` (SNI and certificate checked for `host`). On success
    `protocol.connection_made` has been called with the transport to use; any failure is
    a TunnelFailed saying which step failed."""
    target = authority(host, port)
    via = f"through egress proxy {proxy.where}"
    # What a timeout or a socket error interrupted (a timeout cancels wherever it is).
    failed = f"egress proxy {proxy.where} could not be reached (for {where})"
    raw: asyncio.Transport | None = None
    opener = _Opener(loop, proxy.where, max_head)
    try:
        async with asyncio.timeout(connect_timeout):
            raw, _ = await loop.create_connection(lambda: opener, proxy.host, proxy.port)
            failed = f"egress proxy {proxy.where} did not answer CONNECT {target}"
            raw.write(connect_request(target, proxy.authorization))
            head, more = await opener.reply
            match = _STATUS_LINE.fullmatch(head.split(b"\r\n", 1)[0])
            if match is None:
                raise TunnelFailed(f"egress proxy {proxy.where} sent an invalid answer to CONNECT")
            status = int(match.group(1))
            if not 200 <= status < 300:  # RFC 9110 9.3.6: any 2xx opens the tunnel
                raise TunnelFailed(_refusal(proxy, target, status))
            if more:
                # Bytes from the far end before our first one: no HTTP server speaks first.
                raise TunnelFailed(f"egress proxy {proxy.where} sent data ahead of the tunnel")
            failed = f"cannot connect to {where} {via}"
            if tls is not None:
                transport = await loop.start_tls(raw, protocol, tls, server_hostname=host)
                assert transport is not None
            else:
                raw.set_protocol(protocol)
                raw.resume_reading()
                transport = raw
    except BaseException as e:
        # Nobody waits for the answer any more: the abort below must not leave an
        # exception in it that nobody retrieves.
        opener.reply.cancel()
        if raw is not None:
            raw.abort()
        if isinstance(e, TunnelFailed):
            raise
        if isinstance(e, ssl.SSLCertVerificationError):
            raise TunnelFailed(
                f"TLS certificate of {where} was not accepted: {e.verify_message} ({via})"
            ) from e
        if isinstance(e, TimeoutError):
            raise TunnelFailed(f"{failed}: timed out") from e
        if isinstance(e, OSError):  # ssl.SSLError included
            raise TunnelFailed(f"{failed}: {e.strerror or type(e).__name__}") from e
        raise
    protocol.connection_made(transport)
