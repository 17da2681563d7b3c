"""The auth schemes the proxy knows, by their `auth.scheme` name.

A scheme is a module with a `KIND`: how to check its config section and how to
build it. The service and the config look a scheme up here and nowhere else
compare its name, so adding one is its module plus one entry (tests add their
own without touching this file: `ProxyService(cfg, schemes=...)`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from proxy.clock import ServerClock
from proxy.config import AuthConfig, ConfigError, WindowConfig, mask_url_password
from proxy.debugflag import DebugFlag
from proxy.http.client import Upstream
from proxy.limits import RateLimiter
from proxy.observe.metrics import Metrics
from proxy.redis_connect import RedisURLError
from proxy.redis_connect import parse_url as parse_redis_url
from proxy.schemes.base import AuthScheme

# Each scheme's own module is imported by its check and build functions, not here: a
# process loads the one scheme its config names (oauth2 alone is ~20 ms of imports,
# and its state store needs `cryptography`; see tests/test_light.py).


def _ignore(secrets: Iterable[str]) -> None:
    pass


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
    # Credentials issued while running (OAuth tokens): the logs mask them from then on.
    redact: Callable[[Iterable[str]], None] = _ignore
    # On while logging.level is debug: the scheme explains which credential signed what.
    debug: DebugFlag = field(default_factory=DebugFlag)
    # The listed integration served ("" for the one of a config without the list).
    integration: str = ""


def _no_state(auth: AuthConfig, integration: str) -> Path | None:
    return None


@dataclass(frozen=True, slots=True)
class SchemeKind:
    name: str
    # Raises ConfigError naming the auth.* key and the fix.
    check: Callable[[AuthConfig], None]
    build: Callable[[SchemeDeps], AuthScheme]
    # The file the scheme keeps across restarts, if any, for the integration named ("" for
    # the one of a config without the list): `check` and /readyz say whether its folder
    # can be written (proxy/preflight.py); two integrations may not share one.
    state_file: Callable[[AuthConfig, str], Path | None] = _no_state
    # The budgets a limits.windows entry may name: those its scheme's `budget()` returns,
    # and "all" (every request of the integration). A scheme with one budget for its
    # whole API names only "all", so its config cannot name a budget nothing spends.
    scopes: tuple[str, ...] = ("all",)


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
    from proxy.schemes.luxsci.scheme import LuxSciScheme
    from proxy.schemes.luxsci.session import LuxSciSession

    session = LuxSciSession(
        deps.auth,
        deps.upstream,
        deps.clock,
        limiter=deps.limiter,
        permit_wait=deps.permit_wait,
        metrics=deps.metrics,
    )
    return LuxSciScheme(session, deps.debug)


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
    from proxy.schemes.bearer import BearerScheme

    return BearerScheme(check_header_value(deps.auth, "api_key"))


def _check_oauth2(auth: AuthConfig) -> None:
    from proxy.schemes.oauth2 import state_path

    if auth.auth_cookie:
        raise ConfigError(
            f"auth.auth_cookie: applies to scheme luxsci only (scheme is {auth.scheme}); "
            "remove it or set it to false"
        )
    if not auth.token_url:
        raise ConfigError(
            "auth.token_url: required for scheme oauth2 (the authorization server's token "
            "endpoint, e.g. https://auth.example.com/oauth/token)"
        )
    if not auth.client_id:
        raise ConfigError("auth.client_id: required for scheme oauth2")
    for key in ("client_id", "scope", "audience"):
        value = getattr(auth, key)
        if value is not None and _CONTROL.search(value):
            raise ConfigError(f"auth.{key}: contains a control character (a line break?)")
    if auth.client_secret is None or not auth.client_secret.get():
        raise ConfigError(
            "auth.client_secret: required for scheme oauth2 "
            "(set auth.client_secret or auth.client_secret_file)"
        )
    if not (math.isfinite(auth.refresh_margin) and auth.refresh_margin >= 0):
        raise ConfigError(f"auth.refresh_margin: must be at least 0 (got {auth.refresh_margin})")
    _check_state_store(auth)
    if auth.grant == "client_credentials":
        if auth.refresh_token is not None:
            raise ConfigError(
                "auth.refresh_token: only with auth.grant: refresh_token "
                "(the client_credentials grant needs none)"
            )
        return
    if auth.refresh_token is None or not auth.refresh_token.get():
        raise ConfigError(
            "auth.refresh_token: required with auth.grant: refresh_token "
            "(set auth.refresh_token or auth.refresh_token_file)"
        )
    if state_path(auth) is None and auth.state_store is None:
        return  # auth.state_file: "": kept in memory only, no key needed
    _check_state_key(auth)


def _check_state_store(auth: AuthConfig) -> None:
    """auth.state_store: a Redis URL, and a key to seal what goes there."""
    if auth.state_store is None:
        return
    try:
        parse_redis_url(auth.state_store)
    except RedisURLError as e:
        # The URL masked: it may hold a password.
        raise ConfigError(
            f"auth.state_store: {e} (got {mask_url_password(auth.state_store)!r})"
        ) from None
    if auth.state_key is None or not auth.state_key.get():
        # Tokens are secrets: nothing goes to Redis (its dump, its AOF) in clear.
        raise ConfigError(
            "auth.state_key: required with auth.state_store, to keep the shared tokens "
            "encrypted in Redis (set auth.state_key, auth.state_key_file or "
            "LUXSCI_PROXY_STATE_KEY; make one with: openssl rand -base64 32)"
        )
    _check_state_key(auth)


def _check_state_key(auth: AuthConfig) -> None:
    from proxy.schemes.oauth2_state import parse_keys

    if auth.state_key is None or not auth.state_key.get():
        # A rotated refresh token is a long-lived credential: never on disk in clear.
        raise ConfigError(
            "auth.state_key: required with auth.grant: refresh_token, to keep rotated refresh "
            "tokens encrypted on disk (set auth.state_key, auth.state_key_file or "
            "LUXSCI_PROXY_STATE_KEY; make one with: openssl rand -base64 32), or set "
            'auth.state_file: "" to keep them in memory only (lost on restart)'
        )
    try:
        parse_keys(auth.state_key.get())
    except ValueError as e:
        raise ConfigError(f"auth.state_key: {e}") from None


def _build_oauth2(deps: SchemeDeps) -> AuthScheme:
    from proxy.schemes.oauth2 import OAuth2Scheme, OAuth2Session, endpoint_config

    assert deps.auth.token_url is not None
    endpoint = Upstream(endpoint_config(deps.upstream.cfg, deps.auth.token_url))
    session = OAuth2Session(
        deps.auth, endpoint, deps.metrics, deps.redact, integration=deps.integration
    )
    return OAuth2Scheme(session, deps.upstream.cfg)


def _oauth2_state(auth: AuthConfig, integration: str) -> Path | None:
    # Only the refresh-token grant keeps anything: the newest rotated refresh token.
    if auth.grant != "refresh_token":
        return None
    from proxy.schemes.oauth2 import state_path  # imported only for an oauth2 config

    return state_path(auth, integration)


LUXSCI = SchemeKind("luxsci", _check_luxsci, _build_luxsci, scopes=("user", "account", "all"))
BEARER = SchemeKind("bearer", _check_bearer, _build_bearer)
OAUTH2 = SchemeKind("oauth2", _check_oauth2, _build_oauth2, _oauth2_state)

BUILT_IN: Mapping[str, SchemeKind] = MappingProxyType({k.name: k for k in (LUXSCI, BEARER, OAUTH2)})


def check(auth: AuthConfig, schemes: Mapping[str, SchemeKind] = BUILT_IN) -> None:
    """The auth section against its scheme's rules; ConfigError naming the key."""
    kind = schemes.get(auth.scheme)
    if kind is None:
        raise ConfigError(f"auth.scheme: must be one of {', '.join(schemes)} (got {auth.scheme!r})")
    kind.check(auth)


def check_scopes(
    windows: Iterable[WindowConfig], scheme: str, schemes: Mapping[str, SchemeKind] = BUILT_IN
) -> None:
    """Each limits.windows entry names a budget its scheme has; ConfigError naming the key."""
    kind = schemes[scheme]
    for i, window in enumerate(windows):
        if window.scope not in kind.scopes:
            raise ConfigError(
                f"limits.windows[{i}].scope: scheme {scheme} has the budgets "
                f"{', '.join(kind.scopes)} (got {window.scope!r})"
            )
