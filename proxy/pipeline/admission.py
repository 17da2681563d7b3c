"""Who may use the proxy and what for: pure checks, no I/O.

Whoever reaches the proxy acts with the integration's full rights, so every
request passes, in order: the peer allow-list, the client token, the shape of
its target (nothing that could side-step a rule: dot-segments, encoded
slashes, malformed escapes), the method + path rules, and the protected users.
All of it happens before a permit is spent or a byte goes upstream.

Paths are matched on their decoded segments: `/perl/api/v2/%75ser/x` is the
`user` path the API will see, so it is the one the rules must see too; a
segment that decodes to `/`, `\\`, `.` or `..` is refused outright.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from proxy.config import AccessConfig
from proxy.errors import BadRequest, Forbidden
from proxy.schemes.luxsci import signing

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
USER_ROOT = ("perl", "api", "v2", "user")


def check_escapes(text: str, what: str) -> None:
    """Every % must start a two-hex-digit escape."""
    if _BAD_ESCAPE.search(text):
        raise BadRequest(f"malformed percent-encoding in the {what}")


# Anything that needs a closer look: escapes, dots, backslashes, empty segments, controls.
_SUSPECT = re.compile(r"[%\\\x00-\x1f\x7f]|/\.|//")


def path_segments(path: str) -> list[str]:
    """The decoded segments of a raw path, or BadRequest for anything that could mislead."""
    if not _SUSPECT.search(path):
        # The common case: plain segments, nothing to decode or refuse.
        segments = path.split("/")[1:]
        if segments and segments[-1] == "":
            segments.pop()
        return segments
    check_escapes(path, "path")
    raw_segments = path.split("/")[1:]
    last = len(raw_segments) - 1
    segments = []
    for i, raw in enumerate(raw_segments):
        if "\\" in raw:
            raise BadRequest("backslashes are not allowed in the path")
        data = unquote_to_bytes(raw) if "%" in raw else raw.encode()
        if b"/" in data or b"\\" in data:
            raise BadRequest("encoded slashes (%2F, %5C) are not allowed in the path")
        try:
            segment = data.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("the path does not decode to UTF-8") from None
        if segment in (".", ".."):
            raise BadRequest("dot-segments (., .., %2e%2e) are not allowed in the path")
        if _CONTROL.search(segment):
            raise BadRequest("control characters are not allowed in the path")
        if segment == "" and i != last:
            raise BadRequest("empty segments (//) are not allowed in the path")
        segments.append(segment)
    if segments and segments[-1] == "":
        segments.pop()  # a trailing slash matches like its path without
    return segments


@dataclass(frozen=True, slots=True)
class Rule:
    methods: frozenset[str]
    pattern: tuple[str, ...]

    @classmethod
    def parse(cls, methods: Sequence[str], path: str) -> Rule:
        return cls(frozenset(methods), tuple(s for s in path.split("/")[1:] if s != ""))

    def allows(self, method: str, segments: Sequence[str]) -> bool:
        if "*" not in self.methods and method not in self.methods:
            return False
        for i, want in enumerate(self.pattern):
            if want == "**":
                return True
            if i >= len(segments) or (want != "*" and want != segments[i]):
                return False
        return len(segments) == len(self.pattern)


class AccessPolicy:
    def __init__(self, cfg: AccessConfig) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in cfg.allow_clients]
        token = cfg.client_token.get() if cfg.client_token is not None else None
        self._token = f"Bearer {token}".encode() if token else None
        self.rules = [Rule.parse(r.methods, r.path) for r in cfg.rules]
        self.protected = {u.strip().lower() for u in cfg.protected_users}

    @property
    def open_to_anyone(self) -> bool:
        """No allow-list and no token: anyone who can connect may use the proxy."""
        return not self.networks and self._token is None

    def check_peer(self, remote: str | None) -> None:
        if not self.networks:
            return
        try:
            ip = ipaddress.ip_address(remote or "")
        except ValueError:
            raise Forbidden("this client is not allowed to use the proxy") from None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not any(ip in net for net in self.networks):
            raise Forbidden(f"client {ip} is not allowed to use the proxy (access.allow_clients)")

    def check_token(self, header: str | None) -> None:
        if self._token is None:
            return
        given = (header or "").encode("utf-8", "replace")
        # Constant time: the comparison must not tell how much of a guess was right.
        if not hmac.compare_digest(given, self._token):
            raise Forbidden(
                "missing or wrong client token (send Proxy-Authorization: Bearer <token>)"
            )

    def check_request(self, method: str, path: str, query: str) -> None:
        """Target shape, rules and protected users; BadRequest or Forbidden."""
        segments = path_segments(path)
        check_escapes(query, "query")
        if self.rules and not any(rule.allows(method, segments) for rule in self.rules):
            raise Forbidden(f"{method} on this path is not allowed by the proxy's access rules")
        if (
            self.protected
            and len(segments) > len(USER_ROOT)
            and tuple(segments[: len(USER_ROOT)]) == USER_ROOT
            and segments[len(USER_ROOT)].lower() in self.protected
        ):
            raise Forbidden("this user is protected: no request through the proxy may target it")


# CONNECT would make the proxy a tunnel; TRACE would have the API echo the request,
# signature cookie (a live auth code) included, back to the client.
_REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})


def check_method(method: str) -> None:
    if method in _REFUSED_METHODS:
        raise BadRequest(f"{method} is not forwarded by the proxy")


def check_target(raw_target: str) -> tuple[str, str]:
    """Only origin-form targets (`/path?query`): nothing may redirect the proxy elsewhere."""
    if not raw_target.startswith("/") or raw_target.startswith("//"):
        raise BadRequest(
            "the request target must be a path such as /perl/api/v2/...; absolute URLs, "
            "authority-form (CONNECT) and '*' targets are not accepted"
        )
    return signing.split_target(raw_target)
