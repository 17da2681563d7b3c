"""LuxSci request signing: pure functions, no I/O, no clock.

Time and secrets are parameters so fixed vectors pin the exact output bytes
(see tests/test_signing.py). The rules are in ../shared/PROTOCOL.md:

    auth signature   = HMAC(token \\n date \\n [user \\n pass \\n])
    signature cookie = <auth_code>:HMAC(auth_code \\n METHOD \\n path \\n query \\n body_hash \\n)

HMAC is HMAC-SHA256 keyed with the integration's secret key, lower-case hex.
"""

from __future__ import annotations

import functools
import hashlib
import hmac

# What the API strips from both ends of a body before hashing it: space, tab, CR, LF.
_BODY_WHITESPACE = b" \t\r\n"


@functools.lru_cache(maxsize=4)
def _keyed(secret: str) -> hmac.HMAC:
    return hmac.new(secret.encode(), digestmod=hashlib.sha256)


def hmac_hex(secret: str, text: str) -> str:
    """HMAC-SHA256 of `text` keyed with `secret`, lower-case hex."""
    # Copying an HMAC already keyed skips what every fresh one repeats per call: the
    # key schedule and, with OpenSSL 3, looking the digest up by name.
    mac = _keyed(secret).copy()
    mac.update(text.encode())
    return mac.hexdigest()


def auth_text(token: str, date: str, user: str | None = None, password: str | None = None) -> str:
    """The text signed by an authentication request."""
    text = f"{token}\n{date}\n"
    if user is not None:
        text += f"{user}\n{password or ''}\n"
    return text


def auth_signature(
    secret: str, token: str, date: str, user: str | None = None, password: str | None = None
) -> str:
    return hmac_hex(secret, auth_text(token, date, user, password))


def body_hash(body: bytes) -> str:
    """SHA-256 hex of the trimmed body; "" when there is no body at all."""
    if not body:
        return ""
    return hashlib.sha256(body.strip(_BODY_WHITESPACE)).hexdigest()


def split_target(raw_target: str) -> tuple[str, str]:
    """Split an origin-form request target into (path, query) exactly as sent.

    The query is everything after the first '?', "" when there is none. Nothing
    is decoded or re-encoded: what is signed must be what goes on the wire.
    """
    path, _, query = raw_target.partition("?")
    return path, query


def request_text(auth_code: str, method: str, path: str, query: str, body_digest: str) -> str:
    """The text signed by an authenticated request."""
    return f"{auth_code}\n{method.upper()}\n{path}\n{query}\n{body_digest}\n"


def request_signature(
    secret: str, auth_code: str, method: str, path: str, query: str, body_digest: str
) -> str:
    return hmac_hex(secret, request_text(auth_code, method, path, query, body_digest))


def signature_cookie(
    secret: str, auth_code: str, method: str, path: str, query: str, body_digest: str
) -> str:
    """The value of the `signature` cookie: `<auth_code>:<signature_code>`."""
    sig = request_signature(secret, auth_code, method, path, query, body_digest)
    return f"{auth_code}:{sig}"


def verify(expected_hex: str, given_hex: str) -> bool:
    """Constant-time comparison of two hex digests, ignoring hex case (C# clients send upper)."""
    return hmac.compare_digest(expected_hex.lower().encode(), given_hex.lower().encode())
