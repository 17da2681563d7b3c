"""The auth schemes the proxy knows, by their `auth.scheme` name.

A scheme is a module with a `KIND`: how to check its config section and how to
build it. The service and the config look a scheme up here and nowhere else
compare its name, so adding one is its module plus one entry (tests add their
own without touching this file: `ProxyService(cfg, schemes=...)`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from proxy.clock import ServerClock
from proxy.config import AuthConfig, ConfigError
from proxy.http.client import Upstream
from proxy.limits import RateLimiter
from proxy.observe.metrics import Metrics
from proxy.schemes.base import AuthScheme
from proxy.schemes.bearer import BearerScheme
from proxy.schemes.luxsci.scheme import LuxSciScheme
from proxy.schemes.luxsci.session import LuxSciSession


@dataclass(frozen=True, slots=True)
class SchemeDeps:
    """What a scheme may use: built once by the service."""

    auth: AuthConfig
    upstream: Upstream
    clock: ServerClock
    limiter: RateLimiter
    metrics: Metrics
    # How long a login may wait for a rate permit (queue.max_wait).
    permit_wait: float


@dataclass(frozen=True, slots=True)
class SchemeKind:
    name: str
    # Raises ConfigError naming the auth.* key and the fix.
    check: Callable[[AuthConfig], None]
    build: Callable[[SchemeDeps], AuthScheme]


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_luxsci(auth: AuthConfig) -> None:
    for name in ("token", "secret"):
        value = getattr(auth, name)
        if value is None or not value.get():
            raise ConfigError(
                f"auth.{name}: required for scheme luxsci (set auth.{name} or auth.{name}_file)"
            )
    if (auth.user is None) != (auth.password is None):
        raise ConfigError("auth.password: auth.user and auth.password go together")
    if auth.code_lifetime <= 0:
        raise ConfigError(f"auth.code_lifetime: must be positive (got {auth.code_lifetime})")
    if not 0 <= auth.refresh_margin < auth.code_lifetime:
        raise ConfigError(
            "auth.refresh_margin: must be at least 0 and less than auth.code_lifetime"
        )


def _build_luxsci(deps: SchemeDeps) -> AuthScheme:
    session = LuxSciSession(
        deps.auth,
        deps.upstream,
        deps.clock,
        limiter=deps.limiter,
        permit_wait=deps.permit_wait,
        metrics=deps.metrics,
    )
    return LuxSciScheme(session)


def check_header_value(auth: AuthConfig, key: str) -> str:
    """A secret that goes into a header line as it is: present, one line of visible text."""
    secret = getattr(auth, key)
    if secret is None or not secret.get():
        raise ConfigError(
            f"auth.{key}: required for scheme {auth.scheme} (set auth.{key} or auth.{key}_file)"
        )
    value: str = secret.get()
    if _CONTROL.search(value):
        # A line break would split the request.
        raise ConfigError(
            f"auth.{key}: contains a control character (a line break?); "
            "an API key is one line of visible characters"
        )
    return value


def _check_bearer(auth: AuthConfig) -> None:
    if auth.auth_cookie:
        # An error rather than a warning: a luxsci-only key in a bearer config means the
        # file is not the one its author thinks it is, and unknown keys are errors too.
        raise ConfigError(
            f"auth.auth_cookie: applies to scheme luxsci only (scheme is {auth.scheme}); "
            "remove it or set it to false"
        )
    check_header_value(auth, "api_key")


def _build_bearer(deps: SchemeDeps) -> AuthScheme:
    return BearerScheme(check_header_value(deps.auth, "api_key"))


LUXSCI = SchemeKind("luxsci", _check_luxsci, _build_luxsci)
BEARER = SchemeKind("bearer", _check_bearer, _build_bearer)

BUILT_IN: Mapping[str, SchemeKind] = MappingProxyType({k.name: k for k in (LUXSCI, BEARER)})


def check(auth: AuthConfig, schemes: Mapping[str, SchemeKind] = BUILT_IN) -> None:
    """The auth section against its scheme's rules; ConfigError naming the key."""
    kind = schemes.get(auth.scheme)
    if kind is None:
        raise ConfigError(f"auth.scheme: must be one of {', '.join(schemes)} (got {auth.scheme!r})")
    kind.check(auth)
