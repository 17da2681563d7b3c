"""Callbacks: where a job's end may be announced, how it is signed, and its delivery.

When a job ends, its JSON is POSTed to the URL the client gave in
`X-Proxy-Callback`, signed so the app can tell the proxy sent it:

    X-Proxy-Signature: t=<unix seconds>,sha256=<hex HMAC-SHA256(secret, "<t>." + body)>

The timestamp is signed with the body, so a captured delivery cannot be replayed
later with a fresh time; the app refuses timestamps far from its own clock (five
minutes, say) and compares the MAC in constant time. Deliveries are at least once:
an app that must not act twice remembers the job ids it has seen.

Only URLs under a `jobs.callback_allow` prefix are accepted, and the check is by
parts, not by string prefix: `https://app.internal` must not admit
`https://app.internal.evil.example/`, nor `/hooks` admit `/hooks-other`. Redirects
are not followed (they could lead anywhere).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from urllib.parse import SplitResult, urlsplit

import aiohttp

from proxy.errors import BadRequest

SIGNATURE_HEADER = "X-Proxy-Signature"
JOB_HEADER = "X-Proxy-Job"
MAX_URL = 2048


def _origin(parts: SplitResult) -> tuple[str, str, int | None]:
    port = parts.port
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), default if port is None else port


def _under(path: str, prefix: str) -> bool:
    if prefix in ("", "/"):
        return True
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")


def check_callback(url: str, allow: Sequence[str]) -> str:
    """The URL if it lies under one of `allow`, else BadRequest (before anything is stored)."""
    if not allow:
        raise BadRequest("callbacks are not enabled on this proxy (jobs.callback_allow)")
    if len(url) > MAX_URL or any(ord(c) < 0x21 or ord(c) > 0x7E for c in url):
        raise BadRequest("X-Proxy-Callback must be an absolute http(s) URL in plain ASCII")
    try:
        parts = urlsplit(url)
        origin = _origin(parts)
    except ValueError:
        raise BadRequest("X-Proxy-Callback is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest("X-Proxy-Callback must be an absolute http(s) URL")
    if parts.username is not None or parts.password is not None or parts.fragment:
        raise BadRequest("X-Proxy-Callback must not carry credentials or a fragment")
    if "/." in parts.path or "%" in parts.path or "\\" in parts.path:
        raise BadRequest("X-Proxy-Callback: write the path plainly (no dot-segments or escapes)")
    for prefix in allow:
        allowed = urlsplit(prefix)
        if _origin(allowed) == origin and _under(parts.path or "/", allowed.path):
            return url
    raise BadRequest("X-Proxy-Callback is not under any allowed prefix (jobs.callback_allow)")


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The X-Proxy-Signature value for `body` sent at `timestamp`."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},sha256={mac}"


def verify(secret: bytes, body: bytes, header: str, now: float, tolerance: float = 300) -> bool:
    """What an app does with a delivery (here for tests and as the reference)."""
    fields = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp)
    return hmac.compare_digest(expected.encode(), header.strip().encode())


class Deliverer:
    """POSTs signed job JSON; one HTTP client for all deliveries."""

    def __init__(self, secret: bytes, timeout: float) -> None:
        self.secret = secret
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def deliver(self, url: str, job_id: str, body: bytes, now: float) -> str | None:
        """None once the app answered 2xx; else why not (for the log: no URL, no body)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.secret, body, int(now)),
            JOB_HEADER: job_id,
        }
        try:
            async with self._session.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    return None
                return f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            return type(e).__name__

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
