"""Who may use the proxy and what for: pure checks, no I/O.

Whoever reaches the proxy acts with the integration's full rights, so every
request passes, in order: the peer allow-list, the client token (which also
says which client it is), the method, the method + path rules, and the
protected users. The target's shape is settled when it is parsed
(proxy/target.py). All of it happens before a permit is spent or a byte goes
upstream. Admission also settles the request's lane: what it asks for with
X-Proxy-Priority, capped by what its client may ask for.

Rules match the target's decoded segments: `/perl/api/v2/%75ser/x` is the
`user` path the API will see, so it is the one the rules must see too.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.config import AccessConfig, QueueConfig
from proxy.errors import BadRequest, Forbidden
from proxy.http.server import Request
from proxy.limits.lanes import ASKABLE, Client, Lane
from proxy.schemes.base import AuthScheme
from proxy.target import Kind, Target
from proxy.target import parse as parse_target

MAX_WAIT_HEADER = "X-Proxy-Max-Wait"
PRIORITY_HEADER = "X-Proxy-Priority"
# On the answer when the lane served is not the one asked for (the client's cap).
APPLIED_HEADER = "X-Proxy-Priority-Applied"

# With no token configured, every request is this client. Its lane is its own affair (it
# is the only client), so it may ask for any; to cap lanes, name the apps.
ANONYMOUS = Client("anonymous", Lane.HIGH)
# access.client_token's client.
DEFAULT_CLIENT = "default"


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
    def __init__(self, cfg: AccessConfig, max_queue: int = QueueConfig.max_size) -> None:
        """`max_queue`: queue.max_size, which clients without a max_queued share equally."""
        self.networks = [ipaddress.ip_network(n, strict=False) for n in cfg.allow_clients]
        # (b"Bearer <token>", the client it names); empty: no token asked for.
        self._tokens: list[tuple[bytes, Client]] = []
        shorthand = cfg.client_token.get() if cfg.client_token is not None else ""
        count = len(cfg.clients) + bool(shorthand)
        share = -(-max_queue // max(1, count))  # rounded up
        if shorthand:
            # Alone, it orders only its own requests: any lane. Beside named clients it is
            # one of them, with a named client's default cap.
            cap = Lane.NORMAL if cfg.clients else Lane.HIGH
            self._tokens.append((_bearer(shorthand), Client(DEFAULT_CLIENT, cap, share)))
        for c in cfg.clients:
            if c.token is None:
                continue  # validation refuses such a config
            client = Client(
                c.name,
                ASKABLE[c.max_priority],
                c.max_queued if c.max_queued is not None else share,
            )
            self._tokens.append((_bearer(c.token.get()), client))
        self.rules = [Rule.parse(r.methods, r.path) for r in cfg.rules]
        self.protected = {u.strip().lower() for u in cfg.protected_users}

    @property
    def clients(self) -> list[Client]:
        """Every client a request may be (the proxy's own logins aside)."""
        return [client for _, client in self._tokens] or [ANONYMOUS]

    @property
    def open_to_anyone(self) -> bool:
        """No allow-list and no token: anyone who can connect may use the proxy."""
        return not self.networks and not self._tokens

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

    def identify(self, header: str | None) -> Client:
        """The client a Proxy-Authorization header names; Forbidden if it names none."""
        if not self._tokens:
            return ANONYMOUS
        given = (header or "").encode("utf-8", "replace")
        found = None
        for expected, client in self._tokens:
            # Constant time, and every token compared: the time taken must tell neither
            # how much of a guess was right nor which client's token it came near.
            if hmac.compare_digest(given, expected):
                found = client
        if found is None:
            raise Forbidden(
                "missing or wrong client token (send Proxy-Authorization: Bearer <token>)"
            )
        return found

    def check_request(self, method: str, target: Target) -> None:
        """The method + path rules and the protected users; Forbidden if refused."""
        segments = target.segments
        if self.rules and not any(rule.allows(method, segments) for rule in self.rules):
            raise Forbidden(f"{method} on this path is not allowed by the proxy's access rules")
        if self.protected and not self.protected.isdisjoint(target.users):
            raise Forbidden("this user is protected: no request through the proxy may target it")


# CONNECT would make the proxy a tunnel; TRACE would have the API echo the request,
# signature cookie (a live auth code) included, back to the client.
_REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})


def check_method(method: str) -> None:
    if method in _REFUSED_METHODS:
        raise BadRequest(f"{method} is not forwarded by the proxy")


def _bearer(token: str) -> bytes:
    return f"Bearer {token}".encode()


def priority(header: str | None) -> Lane:
    """The lane a client asks for (normal when it does not say)."""
    if header is None:
        return Lane.NORMAL
    lane = ASKABLE.get(header.strip().lower())
    if lane is None:
        raise BadRequest(f"{PRIORITY_HEADER} must be high, normal or low (got {header!r})")
    return lane


def max_wait(header: str | None, configured: float) -> float:
    """The client may ask to wait less than queue.max_wait, never more."""
    if header is None:
        return configured
    try:
        asked = float(header)
    except ValueError:
        asked = math.nan
    if not math.isfinite(asked) or asked < 0:
        raise BadRequest(f"{MAX_WAIT_HEADER} must be a number of seconds >= 0 (got {header!r})")
    return min(asked, configured)


@dataclass(slots=True)  # not frozen: built per request, and frozen costs a setattr per field
class Admitted:
    """A request the proxy will forward: what it targets, which budget it spends, and
    until when (monotonic) it may wait for its turn."""

    target: Target
    scope: str
    # The scope label for metrics and the access line ("auth" for log-in paths).
    label: str
    deadline: float
    client: Client
    # The lane it waits in: what it asked for, capped by what its client may ask for.
    lane: Lane
    # The cap lowered what it asked for (the answer says so in APPLIED_HEADER).
    capped: bool


class Admission:
    """The first step: who may ask, for what, and within which budget. A refused request
    costs no body read, no permit and no API call."""

    def __init__(
        self, policy: AccessPolicy, scheme: AuthScheme, queue: QueueConfig, encoded_slashes: str
    ) -> None:
        self.policy = policy
        self.scheme = scheme
        self.queue = queue
        self.encoded_slashes = encoded_slashes

    def admit(self, request: Request, started: float) -> Admitted:
        headers = request.headers
        policy = self.policy
        policy.check_peer(request.remote)
        client = policy.identify(headers.get("Proxy-Authorization"))
        check_method(request.method)
        target = parse_target(request.raw_path, self.encoded_slashes)
        policy.check_request(request.method, target)
        wait = max_wait(headers.get(MAX_WAIT_HEADER), self.queue.max_wait)
        asked = priority(headers.get(PRIORITY_HEADER))
        # Lower value, higher lane: the cap is the larger of the two.
        lane = asked if asked >= client.max_lane else client.max_lane
        scope = self.scheme.budget(target)
        label = "auth" if target.kind is Kind.AUTH else scope
        return Admitted(target, scope, label, started + wait, client, lane, lane is not asked)
