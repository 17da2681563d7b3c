"""The OAuth 2.0 token endpoint as pure functions: a request's bytes, an answer's meaning.

RFC 6749 §4.4 (client credentials), §6 (refresh), §5.1 and §5.2 (the answers) and
§2.3.1 (client authentication). No I/O and no clock: the scheme (oauth2.py) sends what
`token_request` builds and hands the answer to `parse_token_response`; tests pin both
with the RFC's own examples.

Hand-written rather than taken from authlib: authlib's async clients ride on httpx (a
second HTTP stack beside our own client, and not a dependency of ours), and what is
hard here is not the wire format (this file) but the life around it — single-flight
refresh, rotation persisted before use, errors that name the RFC code and never a
secret — which a library leaves to its caller anyway.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote_plus

from proxy.jsonbounds import PARSE_LIMIT, nesting_within

GRANTS = ("client_credentials", "refresh_token")
CLIENT_AUTH = ("client_secret_basic", "client_secret_post")
# RFC 6749 §5.2: the errors a token endpoint answers with.
ERROR_CODES = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
    }
)
# A token answered without expires_in lives this long in our eyes (PROTOCOL.md: assume a
# short life, and a 401 refreshes it early anyway).
ASSUMED_LIFETIME = 300.0
# Error descriptions go to clients and logs: only short ones, in the RFC's character set.
MAX_DESCRIPTION = 200

# RFC 6749 §5.2 error / error_description characters: %x20-21 / %x23-5B / %x5D-7E.
_DESCRIPTION = re.compile(r"[\x20-\x21\x23-\x5b\x5d-\x7e]+")
_ERROR_CODE = re.compile(r"[a-z0-9_.-]{1,64}", re.IGNORECASE)
# A run this long of token characters, with letters and digits mixed as random strings
# have them (and words do not), may be a token or a secret echoed back: not shown.
_TOKEN_RUN = re.compile(r"[A-Za-z0-9._~+/=-]{16,}")
# What goes after "Bearer " (and into a state file): visible ASCII, no space (RFC 6749
# §A.12 VSCHAR without the space a header value could be cut at).
_VISIBLE = re.compile(r"[\x21-\x7e]+")


def form_encode(value: str) -> str:
    """application/x-www-form-urlencoded (RFC 6749 Appendix B): UTF-8, then every octet
    but unreserved ones %-escaped, and a space as "+"."""
    return quote_plus(value, safe="")


def basic_credentials(client_id: str, client_secret: str) -> str:
    """The Authorization value of client_secret_basic (RFC 6749 §2.3.1): id and secret
    are form-encoded first, then joined with ":" and base64-encoded, so a ":" or a
    non-ASCII character in either survives the trip."""
    pair = f"{form_encode(client_id)}:{form_encode(client_secret)}"
    return "Basic " + base64.b64encode(pair.encode("ascii")).decode("ascii")


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """The form body and header fields of one token request (shown by repr as its size)."""

    body: bytes = field(repr=False)
    headers: tuple[tuple[str, str], ...] = field(repr=False)


def token_request(
    grant: str,
    client_id: str,
    client_secret: str,
    client_auth: str = "client_secret_basic",
    *,
    scope: str | None = None,
    audience: str | None = None,
    refresh_token: str | None = None,
) -> TokenRequest:
    """POST body and headers for the client-credentials (§4.4.2) or refresh (§6) grant.

    `scope` and `audience` go along whenever configured: a token endpoint ignores the
    parameters it does not know (§3.2), and on a refresh `scope` may narrow the grant."""
    if grant not in GRANTS:
        raise ValueError(f"unknown grant {grant!r}")
    params: list[tuple[str, str]] = [("grant_type", grant)]
    if grant == "refresh_token":
        if not refresh_token:
            raise ValueError("the refresh_token grant needs a refresh token")
        params.append(("refresh_token", refresh_token))
    if scope:
        params.append(("scope", scope))
    if audience:
        params.append(("audience", audience))
    headers = [
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Accept", "application/json"),
    ]
    if client_auth == "client_secret_basic":
        headers.append(("Authorization", basic_credentials(client_id, client_secret)))
    elif client_auth == "client_secret_post":
        params += [("client_id", client_id), ("client_secret", client_secret)]
    else:
        raise ValueError(f"unknown client authentication {client_auth!r}")
    body = "&".join(f"{form_encode(k)}={form_encode(v)}" for k, v in params)
    return TokenRequest(body.encode("ascii"), tuple(headers))


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """A successful answer (§5.1). The tokens are kept out of repr."""

    access_token: str = field(repr=False)
    token_type: str
    # Seconds; None when the answer did not say (or said nonsense).
    expires_in: float | None
    # A new refresh token replaces the old one (§6: rotation).
    refresh_token: str | None = field(default=None, repr=False)
    scope: str | None = None

    @property
    def lifetime(self) -> float:
        return ASSUMED_LIFETIME if self.expires_in is None else self.expires_in


class TokenError(Exception):
    """The token endpoint did not give us a token. `message` names the RFC error code (and
    a short, safe description) and never a secret: it goes to clients and logs."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def parse_token_response(status: int, body: bytes, known_secrets: Iterable[str] = ()) -> TokenGrant:
    """The grant in a token endpoint's answer, or TokenError saying why there is none.

    `known_secrets` (the client secret, the refresh token sent) are never repeated in an
    error message, even when the server echoes one in its description."""
    data = _json_object(body)
    if 200 <= status < 300:
        if data is None:
            raise TokenError(f"the token endpoint answered HTTP {status} without a JSON token")
        return _grant(data)
    error = data.get("error") if data is not None else None
    if data is not None and isinstance(error, str) and 400 <= status < 500:
        code = _error_code(error)
        description = safe_description(data.get("error_description"), known_secrets)
        named = code if code is not None else "an unrecognised error"
        detail = f" ({description})" if description else ""
        raise TokenError(f"the token endpoint refused: {named}{detail} (HTTP {status})", code)
    raise TokenError(f"the token endpoint answered HTTP {status}")


def _grant(data: Mapping[str, object]) -> TokenGrant:
    access = data.get("access_token")
    if not isinstance(access, str) or not _VISIBLE.fullmatch(access):
        raise TokenError("the token endpoint's answer carries no usable access_token")
    token_type = data.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        # RFC 6750 is the only token type this proxy can present (a MAC or DPoP token
        # needs a proof per request that we do not make).
        shown = (
            repr(token_type)
            if isinstance(token_type, str) and _ERROR_CODE.fullmatch(token_type)
            else "missing or unreadable"
        )
        raise TokenError(
            f"the token endpoint issued a token_type {shown}, not Bearer: refused", "token_type"
        )
    refresh = data.get("refresh_token")
    if refresh is not None and (not isinstance(refresh, str) or not _VISIBLE.fullmatch(refresh)):
        raise TokenError("the token endpoint's answer carries an unusable refresh_token")
    scope = data.get("scope")
    return TokenGrant(
        access,
        token_type,
        _seconds(data.get("expires_in")),
        refresh or None,
        scope if isinstance(scope, str) else None,
    )


def _seconds(value: object) -> float | None:
    """expires_in: a positive number (some servers send it as a string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, int | float) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def _json_object(body: bytes) -> dict[str, object] | None:
    # A hostile or broken endpoint's nesting must not make the decoder recurse away.
    if len(body) > PARSE_LIMIT or not nesting_within(body):
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _error_code(error: str) -> str | None:
    if error in ERROR_CODES:
        return error
    # Another code (temporarily_unavailable, a vendor's own): named when shaped like one.
    if _ERROR_CODE.fullmatch(error) and not _tokenish(error):
        return error
    return None


def _tokenish(text: str) -> bool:
    return any(
        re.search(r"[0-9]", run) and re.search(r"[A-Za-z]", run) for run in _TOKEN_RUN.findall(text)
    )


def safe_description(text: object, known_secrets: Iterable[str] = ()) -> str | None:
    """An error_description fit to show: short, in the RFC's characters, naming no secret
    we know and nothing shaped like a token; else None (the error code says enough)."""
    if not isinstance(text, str) or not 0 < len(text) <= MAX_DESCRIPTION:
        return None
    if not _DESCRIPTION.fullmatch(text) or _tokenish(text):
        return None
    if any(secret and secret in text for secret in known_secrets):
        return None
    return text
