"""The one place that talks to the upstream API: connection pool, TLS, error translation.

Only `upstream.url` is ever contacted; callers pass the raw path and query,
which go on the wire byte-for-byte (yarl's `encoded=True` turns off its
normalising), so what the signer signed is exactly what the server sees.
aiohttp's exceptions stop here: callers only ever see ProxyError subclasses.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Mapping
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.config import UpstreamConfig
from proxy.errors import ProxyError, UpstreamTimeout, UpstreamUnreachable

# Bodies above this go out in chunks with backpressure instead of one huge write.
_CHUNKED_WRITE_ABOVE = 1 << 20
_WRITE_CHUNK = 256 * 1024


async def _chunks(body: bytes) -> AsyncIterator[memoryview]:
    view = memoryview(body)
    for start in range(0, len(view), _WRITE_CHUNK):
        yield view[start : start + _WRITE_CHUNK]


class ConnectFailed(UpstreamUnreachable):
    """The connection was never made, so the request certainly did not reach the API."""


def make_ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """System trust store plus `ca_file`; hostname checked; TLS 1.2 or newer."""
    ctx = ssl.create_default_context()
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def translate(exc: BaseException, where: str) -> ProxyError:
    """Map an aiohttp/asyncio failure to the ProxyError the client will see.

    `where` names the upstream (host:port) for the message; the exception text of
    TLS and socket errors names hosts and causes, never request data.
    """
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return ConnectFailed(
            f"TLS certificate of {where} was not accepted: {exc.certificate_error}"
        )
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        reason = exc.strerror if isinstance(exc, aiohttp.ClientConnectorError) else "timed out"
        return ConnectFailed(f"cannot connect to {where}: {reason or 'connection failed'}")
    if isinstance(exc, aiohttp.SocketTimeoutError | asyncio.TimeoutError):
        return UpstreamTimeout(f"{where} did not answer in time")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return UpstreamUnreachable(f"{where} closed the connection without answering")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamUnreachable(f"{where} sent a broken response body")
    if isinstance(exc, aiohttp.ClientResponseError):
        return UpstreamUnreachable(f"{where} sent an invalid HTTP response")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return UpstreamUnreachable(f"connection to {where} failed: {type(exc).__name__}")
    raise exc


class Upstream:
    """A keep-alive pool to `upstream.url`."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.cfg = cfg
        parts = urlsplit(cfg.url)
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port
        self.where = parts.netloc
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        ssl_ctx: ssl.SSLContext | bool = (
            make_ssl_context(self.cfg.ca_file) if self.scheme == "https" else False
        )
        connector = aiohttp.TCPConnector(
            ssl=ssl_ctx, limit=self.cfg.pool_size, limit_per_host=self.cfg.pool_size
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self.cfg.connect_timeout, sock_read=self.cfg.read_timeout
            ),
            # Bodies come back byte-for-byte as the server sent them.
            auto_decompress=False,
            # The proxy never keeps cookies: the signature cookie is made per request.
            cookie_jar=aiohttp.DummyCookieJar(),
            # Send the client's headers, not aiohttp's defaults.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            # The peer is the configured API; no redirects are followed on its behalf.
            raise_for_status=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, path: str, query: str) -> URL:
        return URL.build(
            scheme=self.scheme,
            host=self.host,
            port=self.port,
            path=path,
            query_string=query,
            encoded=True,
        )

    async def request(
        self,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str] | CIMultiDict[str],
        body: bytes,
    ) -> aiohttp.ClientResponse:
        """Send one request; returns once the response head is in. Caller releases it."""
        assert self._session is not None, "Upstream.start() was not called"
        data: bytes | AsyncIterator[memoryview] | None = body or None
        if len(body) > _CHUNKED_WRITE_ABOVE:
            # An explicit length keeps the framing identical to a plain bytes body.
            headers = CIMultiDict(headers)
            headers["Content-Length"] = str(len(body))
            data = _chunks(body)
        try:
            return await self._session.request(
                method,
                self.url(path, query),
                headers=headers,
                data=data,
                allow_redirects=False,
            )
        except Exception as e:
            raise translate(e, self.where) from e
