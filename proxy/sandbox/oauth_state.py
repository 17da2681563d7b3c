"""The OAuth 2.0 mode's memory: tokens issued, injected errors, settings and counters.

Plain Python with the clock passed in, like state.py, so tests can drive it directly;
oauth.py translates HTTP requests into these calls. The token endpoint's rules (RFC
6749) live here, written independently of the proxy's client (proxy/schemes/
oauth2_token.py), so the two check each other:
- POST, `application/x-www-form-urlencoded`, no parameter twice (§3.2);
- client authentication (§2.3.1) by HTTP Basic over the *form-encoded* id and secret,
  or by `client_id` + `client_secret` in the body, never both; which one was used is
  recorded, so tests see what a client sent;
- grants `client_credentials` (§4.4) and `refresh_token` (§6); a refresh rotates the
  refresh token, and presenting a rotated one again is taken as theft: the whole line
  is revoked (as Auth0, Okta and others do), so a client that loses a rotation finds out;
- errors as §5.2 says, and any of them can be injected.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from proxy.sandbox.config import OAuthSettings

_SETTABLE = {
    "token_lifetime",
    "send_expires_in",
    "token_type",
    "rotate_refresh_tokens",
    "client_auth",
    "scopes",
    "token_delay",
    "rate_headers",
    "retry_after",
}


@dataclass(frozen=True)
class Answer:
    """What the token endpoint says: status, JSON payload (None: a bare text body), headers."""

    status: int
    payload: dict[str, Any] | None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Access:
    issued_at: float
    lifetime: float
    family: int
    revoked: bool = False


@dataclass
class _Refresh:
    family: int
    # Replaced by a rotation: presenting it again revokes the family.
    rotated: bool = False
    revoked: bool = False


@dataclass
class _Injected:
    error: str | None
    status: int
    description: str | None
    times: int
    retry_after: int | None


@dataclass
class OAuthStats:
    token_calls: int = 0
    token_failures: int = 0
    by_grant: dict[str, int] = field(default_factory=dict)
    # The client authentication method of each token call, in order.
    client_auth: list[str] = field(default_factory=list)
    # The scope and audience parameters each token call carried ("" when absent).
    scopes: list[str] = field(default_factory=list)
    audiences: list[str] = field(default_factory=list)
    issued_access_tokens: list[str] = field(default_factory=list)
    issued_refresh_tokens: list[str] = field(default_factory=list)
    # §5.2 error codes answered, injected or not, in order.
    errors: list[str] = field(default_factory=list)
    api_unauthorized: int = 0
    rate_limited: int = 0
    families_revoked: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class OAuthState:
    """The authorization server's memory; `now` is the sandbox's clock."""

    def __init__(self, settings: OAuthSettings, now: Callable[[], float]) -> None:
        self.settings = settings
        self._initial = settings
        self._now = now
        self._access: dict[str, _Access] = {}
        self._refresh: dict[str, _Refresh] = {}
        self._families = 0
        self._injected: list[_Injected] = []
        self.stats = OAuthStats()

    def reset(self) -> None:
        self.settings = self._initial
        self._access.clear()
        self._refresh.clear()
        self._injected.clear()
        self.stats = OAuthStats()

    # -- tokens -----------------------------------------------------------------------------

    def mint_refresh_token(self) -> str:
        """A refresh token of a new line, as if a user had just authorized the client."""
        self._families += 1
        return self._new_refresh(self._families)

    def _new_refresh(self, family: int) -> str:
        token = "sbx-rt-" + secrets.token_urlsafe(24)
        self._refresh[token] = _Refresh(family)
        self.stats.issued_refresh_tokens.append(token)
        return token

    def _new_access(self, family: int) -> str:
        token = "sbx-at-" + secrets.token_urlsafe(24)
        self._access[token] = _Access(self._now(), self.settings.token_lifetime, family)
        self.stats.issued_access_tokens.append(token)
        return token

    def check_access(self, authorization: str | None) -> str | None:
        """None when `authorization` carries a valid Bearer token; "" when there is none
        (RFC 6750 §3.1: the challenge then names no error); else what is wrong."""
        if authorization is None:
            return ""
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return "Malformed Authorization header."
        entry = self._access.get(token)
        if entry is None:
            return "Unknown access token."
        if entry.revoked:
            return "The access token was revoked."
        if self._now() >= entry.issued_at + entry.lifetime:
            return "The access token expired."
        return None

    def revoke(self, access: bool = True, refresh: bool = True) -> None:
        if access:
            for entry in self._access.values():
                entry.revoked = True
        if refresh:
            for state in self._refresh.values():
                state.revoked = True

    def expire(self) -> None:
        for entry in self._access.values():
            entry.lifetime = 0.0

    def _revoke_family(self, family: int) -> None:
        self.stats.families_revoked += 1
        for state in self._refresh.values():
            if state.family == family:
                state.revoked = True
        for entry in self._access.values():
            if entry.family == family:
                entry.revoked = True

    # -- injection and settings ---------------------------------------------------------------

    def inject(self, data: Any) -> None:
        """Answer the next `times` token calls with `error` (a §5.2 code, or any other) and
        `status` (default 400, 401 for invalid_client), or with a bare `status` (a 503)."""
        fields = {"error", "status", "description", "times", "retry_after"}
        if not isinstance(data, dict) or set(data) - fields:
            raise ValueError(f"expected an object with some of: {', '.join(sorted(fields))}")
        error = data.get("error")
        status = data.get("status")
        if error is not None and not isinstance(error, str):
            raise ValueError("error must be a string")
        if status is None:
            if error is None:
                raise ValueError("an injected answer needs an error or a status")
            status = 401 if error == "invalid_client" else 400
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise ValueError("status must be 400 to 599")
        times = data.get("times", 1)
        if isinstance(times, bool) or not isinstance(times, int) or times < 1:
            raise ValueError("times must be a positive integer")
        description = data.get("description")
        if description is not None and not isinstance(description, str):
            raise ValueError("description must be a string")
        retry_after = data.get("retry_after")
        if retry_after is not None and (
            isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 0
        ):
            raise ValueError("retry_after must be whole seconds")
        self._injected.append(_Injected(error, status, description, times, retry_after))

    def _take_injected(self) -> _Injected | None:
        for rule in self._injected:
            if rule.times > 0:
                rule.times -= 1
                return rule
        return None

    def update(self, data: Any) -> None:
        if not isinstance(data, dict) or set(data) - _SETTABLE:
            raise ValueError(f"settable: {', '.join(sorted(_SETTABLE))}")
        values = dict(data)
        if "scopes" in values:
            values["scopes"] = tuple(values["scopes"] or ())
        # OAuthSettings validates them; the client's identity stays as configured.
        self.settings = dataclasses.replace(self.settings, **values)

    # -- the token endpoint ---------------------------------------------------------------------

    def token(
        self, method: str, content_type: str, authorization: str | None, body: bytes
    ) -> Answer:
        """One call of the token endpoint."""
        self.stats.token_calls += 1
        answer = self._token(method, content_type, authorization, body)
        if answer.status != 200:
            self.stats.token_failures += 1
            if answer.payload is not None:
                self.stats.errors.append(str(answer.payload.get("error")))
        return answer

    def _token(
        self, method: str, content_type: str, authorization: str | None, body: bytes
    ) -> Answer:
        if method != "POST":
            return _error(400, "invalid_request", "The token endpoint takes POST only.")
        injected = self._take_injected()
        if injected is not None:
            return _injected_answer(injected)
        if content_type != "application/x-www-form-urlencoded":
            return _error(400, "invalid_request", "Send application/x-www-form-urlencoded.")
        form = _form(body)
        if form is None:
            return _error(400, "invalid_request", "Malformed or repeated parameters.")
        refused = self._authenticate(authorization, form)
        if refused is not None:
            return refused
        grant = form.get("grant_type", "")
        self.stats.by_grant[grant] = self.stats.by_grant.get(grant, 0) + 1
        self.stats.scopes.append(form.get("scope", ""))
        self.stats.audiences.append(form.get("audience", ""))
        if not grant:
            return _error(400, "invalid_request", "grant_type is missing.")
        scope = form.get("scope")
        allowed = self.settings.scopes
        if scope and allowed and not set(scope.split()) <= set(allowed):
            return _error(400, "invalid_scope", "The scope asked for is not allowed.")
        if grant == "client_credentials":
            self._families += 1
            return self._issue(self._families, refresh=None, scope=scope)
        if grant == "refresh_token":
            return self._refresh_grant(form.get("refresh_token"), scope)
        return _error(400, "unsupported_grant_type", "Only client_credentials and refresh_token.")

    def _authenticate(self, authorization: str | None, form: dict[str, str]) -> Answer | None:
        """None when the client authenticated (RFC 6749 §2.3.1), else the refusal."""
        settings = self.settings
        body_id, body_secret = form.get("client_id"), form.get("client_secret")
        if authorization is not None:
            if body_secret is not None:
                return _error(
                    400, "invalid_request", "Use one client authentication method, not two."
                )
            method = "client_secret_basic"
            client_id, secret = _basic(authorization) or ("", "")
        elif body_id is not None and body_secret is not None:
            method = "client_secret_post"
            client_id, secret = body_id, body_secret
        else:
            return _error(401, "invalid_client", "No client authentication.")
        self.stats.client_auth.append(method)
        # Every comparison runs, so timing does not tell which part was wrong.
        ok = hmac.compare_digest(client_id.encode(), settings.client_id.encode())
        ok &= hmac.compare_digest(secret.encode(), settings.client_secret.encode())
        ok &= settings.client_auth in ("any", method)
        if ok:
            return None
        if method == "client_secret_basic":
            refusal = _error(401, "invalid_client", "Client authentication failed.")
            refusal.headers["WWW-Authenticate"] = 'Basic realm="sandbox"'
            return refusal
        return _error(400, "invalid_client", "Client authentication failed.")

    def _refresh_grant(self, token: str | None, scope: str | None) -> Answer:
        if not token:
            return _error(400, "invalid_request", "refresh_token is missing.")
        state = self._refresh.get(token)
        if state is None or state.revoked:
            return _error(400, "invalid_grant", "The refresh token is invalid or revoked.")
        if state.rotated:
            # A rotated token presented again: someone holds a copy. End the whole line.
            self._revoke_family(state.family)
            return _error(400, "invalid_grant", "The refresh token was already used.")
        refresh = None
        if self.settings.rotate_refresh_tokens:
            state.rotated = True
            refresh = self._new_refresh(state.family)
        return self._issue(state.family, refresh=refresh, scope=scope)

    def _issue(self, family: int, refresh: str | None, scope: str | None) -> Answer:
        settings = self.settings
        payload: dict[str, Any] = {
            "access_token": self._new_access(family),
            "token_type": settings.token_type,
        }
        if settings.send_expires_in:
            lifetime = settings.token_lifetime
            payload["expires_in"] = int(lifetime) if lifetime == int(lifetime) else lifetime
        if refresh is not None:
            payload["refresh_token"] = refresh
        if scope:
            payload["scope"] = scope
        return Answer(200, payload, _no_store())


def _injected_answer(rule: _Injected) -> Answer:
    headers = {"Retry-After": str(rule.retry_after)} if rule.retry_after is not None else {}
    if rule.error is None:
        return Answer(rule.status, None, headers)
    answer = _error(rule.status, rule.error, rule.description)
    answer.headers.update(headers)
    return answer


def _form(body: bytes) -> dict[str, str] | None:
    try:
        pairs = parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        return None
    form = dict(pairs)
    return form if len(form) == len(pairs) else None  # a parameter given twice


def _basic(header: str) -> tuple[str, str] | None:
    """client_secret_basic: base64 of the form-encoded id, ":", the form-encoded secret."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("ascii")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return unquote_plus(user), unquote_plus(password)


def _error(status: int, error: str, description: str | None) -> Answer:
    payload = {"error": error}
    if description:
        payload["error_description"] = description
    return Answer(status, payload, _no_store())


def _no_store() -> dict[str, str]:
    # RFC 6749 §5.1: token answers must not be cached.
    return {"Cache-Control": "no-store", "Pragma": "no-cache"}


def encode_answer(answer: Answer) -> bytes:
    if answer.payload is None:
        return b"unavailable"
    return json.dumps(answer.payload).encode()
