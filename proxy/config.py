"""One validated configuration: the YAML file's format, and its checks.

Values may also come from the environment and the command line (proxy/sources.py
layers them over the file); this module reads the file and validates the whole.
Everything is checked before any socket opens; a problem raises ConfigError
whose message starts with the dotted key (``auth.secret: ...``) and says the fix.
``${VAR}`` and ``${VAR:-default}`` are expanded from the environment in every
string value (after YAML parsing, so a variable can never inject YAML).
Secrets may instead come from files (``secret_file: /run/secrets/x``), the way
container platforms mount them. Secret values are wrapped in `Secret`, whose
repr never shows them, so a config object can be logged or printed safely.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import ipaddress
import json
import math
import os
import re
import stat
import tempfile
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import SplitResult, unquote_plus, urlsplit

import yaml

from proxy.redis_connect import RedisURLError
from proxy.redis_connect import parse_url as parse_redis_url

if TYPE_CHECKING:
    from proxy.schemes.registry import SchemeKind


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key."""


class Secret:
    """A secret string that never shows itself in repr/str (logs, tracebacks, `check`)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


# A key whose empty string means something ("" = off), rather than "not set".
KEEP_EMPTY: Mapping[str, bool] = types.MappingProxyType({"keep_empty": True})
# A field the loader fills in, not a key of the file (Config.warnings).
DERIVED: Mapping[str, bool] = types.MappingProxyType({"derived": True})


def key_fields(cls: type[Any]) -> list[dataclasses.Field[Any]]:
    """The fields of a config dataclass that are keys of the file, in declaration order:
    what the file, the environment and the command line may set, and `check` prints."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("derived")]


def file_keys(section: str) -> tuple[str, ...]:
    """The keys of `section` that may be given as `<key>_file` (a path to the value)."""
    return _FILE_KEYS.get(section, ())


@dataclass(frozen=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # Client bodies are read whole (they are signed, and replayed on retry), so cap them.
    max_body_bytes: int = 25 * 1024 * 1024
    # Bodies over this many bytes go to an unlinked file in spool_dir instead of memory.
    spool_threshold: int = 1024 * 1024
    # Where; default: $LUXSCI_PROXY_STATE_DIR/spool, else <temp dir>/luxsci-proxy-<uid>.
    spool_dir: str | None = None
    # Request bodies held in memory by all requests together; one past it spools instead.
    max_buffered_bytes: int = 64 * 1024 * 1024
    # The request line and each header line; longer -> 431.
    max_header_bytes: int = 8190
    # Connections open at once; more are answered 503 and closed.
    max_connections: int = 1000
    # Seconds a client may take to send a request head, or stay idle between
    # requests, or go quiet while sending a body (slow clients cannot hold a worker).
    client_timeout: float = 30.0
    # %2F / %5C inside a path segment: "keep" forwards them byte for byte (as Envoy does
    # by default); "reject" answers 400. Rules match segments split at literal '/'.
    encoded_slashes: Literal["keep", "reject"] = "keep"


@dataclass(frozen=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 9100
    # With limits.backend redis, /readyz fails while Redis is unreachable (the proxy
    # still serves, on its fallback share). false: report it, stay ready.
    ready_requires_redis: bool = True


@dataclass(frozen=True)
class UpstreamConfig:
    url: str = "https://rest.luxsci.com"
    ca_file: str | None = None
    # Plain http:// upstreams are for the sandbox and tests only.
    allow_insecure: bool = False
    connect_timeout: float = 5.0
    # Longest silence from the upstream (waiting for the response head or the next body bytes).
    read_timeout: float = 60.0
    pool_size: int = 100
    # The most an answer's head may take: status line and header lines, 1xx interim heads
    # included; also the cap on its trailer section. Past it: 502 upstream_bad_response.
    max_header_bytes: int = 64 * 1024
    # An HTTP proxy every connection goes through, as a CONNECT tunnel (the OAuth token
    # endpoint's too): http://[user:password@]host:port. null: the environment's
    # https_proxy / HTTPS_PROXY (http_proxy for an http:// url); "" or none: no proxy.
    proxy: str | None = field(default=None, metadata=KEEP_EMPTY)
    # Credentials for the proxy (Proxy-Authorization: Basic), instead of in the URL.
    proxy_user: str | None = None
    proxy_password: Secret | None = None
    # Hosts reached without the proxy, in NO_PROXY's syntax; null: $no_proxy / $NO_PROXY.
    no_proxy: str | None = field(default=None, metadata=KEEP_EMPTY)


@dataclass(frozen=True)
class AuthConfig:
    # A name in proxy/schemes/registry.py (luxsci, bearer, oauth2).
    scheme: str = "luxsci"
    token: Secret | None = None
    secret: Secret | None = None
    user: str | None = None
    password: Secret | None = None
    api_key: Secret | None = None
    # Scheme luxsci: also send `auth=<auth_code>` beside `signature=<auth_code>:<sig>`. The
    # API document speaks of two cookies; its example and the public PHP client send only
    # the signature one (see PROTOCOL.md), so that stays the default.
    auth_cookie: bool = False
    # How long the API honours an auth code, and how long before that we stop using one
    # (oauth2: how long before an access token expires a new one is fetched).
    code_lifetime: float = 900.0
    refresh_margin: float = 60.0
    # Backoff between authentication attempts after a failure (seconds, doubling to the max).
    retry_min: float = 1.0
    retry_max: float = 60.0
    # Scheme oauth2 (RFC 6749): the authorization server's token endpoint and our client.
    token_url: str | None = None
    client_id: str | None = None
    client_secret: Secret | None = None
    scope: str | None = None
    # Sent with token requests when set (an extension some servers need, e.g. Auth0).
    audience: str | None = None
    grant: Literal["client_credentials", "refresh_token"] = "client_credentials"
    # grant refresh_token: the one to start from (a rotated one replaces it, see state_file).
    refresh_token: Secret | None = None
    client_auth: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    # AES-256-GCM key(s) for the rotated refresh token on disk (LUXSCI_PROXY_STATE_KEY).
    state_key: Secret | None = None
    # Where the rotated refresh token is kept; default in the state directory; "" = memory only.
    state_file: str | None = field(default=None, metadata=KEEP_EMPTY)
    # A Redis URL (any form proxy/redis_connect.py reads): the replicas of the integration
    # share the access token and the newest refresh token there (sealed with state_key).
    state_store: str | None = None


@dataclass(frozen=True)
class AccessRule:
    # Methods allowed ("*": any) on paths matching `path`: literal segments,
    # "*" for exactly one segment, "**" (last only) for any rest.
    methods: tuple[str, ...] = ("*",)
    path: str = "/**"


@dataclass(frozen=True)
class ClientConfig:
    # The app's name in metrics and access lines (letters, digits, "_", "-", ".").
    name: str = ""
    # It sends `Proxy-Authorization: Bearer <token>` (or give token_file).
    token: Secret | None = None
    # The highest lane it may ask for with X-Proxy-Priority; asking more is served here.
    max_priority: Literal["high", "normal", "low"] = "normal"
    # Its requests waiting at once, in all; more -> 503 queue_full for it alone.
    # Unset: an equal share of queue.max_size among the configured clients.
    max_queued: int | None = None


@dataclass(frozen=True)
class AccessConfig:
    # Peers (CIDR) that may use the proxy; empty: any peer that can connect.
    allow_clients: tuple[str, ...] = ()
    # When set, clients must send `Proxy-Authorization: Bearer <token>`: one client,
    # named "default" (beside any in `clients`).
    client_token: Secret | None = None
    # Named apps, each with its own token, highest lane and share of the queue.
    clients: tuple[ClientConfig, ...] = ()
    # Allow-list of method + path rules; empty: every request may pass.
    rules: tuple[AccessRule, ...] = ()
    # User logins/ids no request may target (as the API's own protected users).
    protected_users: tuple[str, ...] = ()


@dataclass(frozen=True)
class WindowConfig:
    """One rate window: at most `requests` in each fixed `per`-second window of the API's
    clock, counted for every request of `scope` (a budget the auth scheme names)."""

    requests: int = 0
    # Seconds: written 1s, 30s, 1m, 1h, 1d or as a number (parse_duration).
    per: float = field(default=0.0, metadata={"duration": True})
    # luxsci: user, account or all; the other schemes: all (every request).
    scope: str = "all"


# The budgets that were the only way to state limits before limits.windows; each is the
# shorthand for one window (LimitsConfig.windows's comment).
SHORTHAND_BUDGETS = ("account_per_minute", "user_per_minute", "per_day")
# Windows per config at most: each is a metrics label value and a key in every permit's script.
MAX_WINDOWS = 16


@dataclass(frozen=True)
class LimitsConfig:
    # Requests NOT under /perl/api/v2/user/ (auth calls included; for scheme bearer: all).
    account_per_minute: int = 60
    # Requests under /perl/api/v2/user/.
    user_per_minute: int = 60
    per_day: int = 6000
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Share of each limit one process may use alone while Redis is unreachable.
    fallback_share: float = 0.25
    # Where the memory backend keeps today's count across restarts ("" = do not keep it).
    state_file: str | None = field(default=None, metadata=KEEP_EMPTY)
    # Requests in flight upstream at once, whatever the rate.
    max_inflight: int = 64
    # The API's fixed windows; shorter only for tests.
    window_seconds: float = 60.0
    day_seconds: float = 86400.0
    # Name the shared limits are kept under (default: derived from the token, never the secret).
    key: str | None = None
    # Windows of any length and budget, beside the shorthand's three: user_per_minute per
    # window_seconds (scope user), account_per_minute per window_seconds (scope account),
    # per_day per day_seconds (scope all); every one of them holds. A file that lists
    # windows has only the shorthand windows it writes: parse() makes a budget it leaves
    # out 0, no such window, so no default hides beside the list (in code, say 0 too).
    windows: tuple[WindowConfig, ...] = ()


@dataclass(frozen=True)
class QueueConfig:
    # Requests waiting for a permit, in all; more -> 503 queue_full.
    max_size: int = 1000
    # Seconds a request may wait for a permit; longer -> 503 queue_timeout.
    max_wait: float = 30.0
    # Seconds of waiting after which a request moves up one lane (low -> normal -> high),
    # so no lane starves; background never moves.
    aging: float = 10.0


@dataclass(frozen=True)
class RetryConfig:
    # Attempts per request in all (the first one included); a 401 re-login is extra.
    max_attempts: int = 4
    # Seconds from the first attempt after which no retry starts.
    max_time: float = 30.0
    # Exponential backoff with full jitter: random(0, min(backoff_max, backoff_base * 2**n)).
    backoff_base: float = 0.25
    backoff_max: float = 8.0


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"
    # Debugging only: bodies may hold protected health information.
    log_bodies: bool = False
    # Mask the user segment of /perl/api/v2/user/<login>/... in logged paths.
    redact_paths: bool = False


@dataclass(frozen=True)
class JobsConfig:
    # Durable jobs (`Prefer: respond-async`): off unless asked for. Off, the header is
    # ignored (RFC 7240 lets a server ignore a preference) and the request is served as usual.
    enabled: bool = False
    # Where jobs are kept: "" = jobs-<limits key>.db in the state directory
    # ($LUXSCI_PROXY_STATE_DIR or ~/.local/state/luxsci-proxy); a SQLite file's path; or,
    # for several replicas, a Redis URL (redis://, rediss://, redis+sentinel://,
    # redis+cluster://, unix://).
    store: str = ""
    # Redis store: a replica silent this long (seconds) is taken for dead, and the jobs
    # it held are taken over by the others (a live one keeps its jobs fresh meanwhile).
    visibility_timeout: float = 60.0
    # Redis store: a submission is acknowledged (202) only once this many replicas have
    # it (WAIT), so a failover cannot lose it; 0 trusts the master alone (replication is
    # asynchronous: a failover may lose the last acknowledged jobs). Not with a Cluster.
    redis_min_replicas: int = 0
    # Seconds a submission waits for those replicas before 503 jobs_unavailable.
    redis_replica_timeout: float = 1.0
    # Job endpoints on the proxy port: GET <prefix>/<id>, GET <prefix>/<id>/response, DELETE.
    path_prefix: str = "/_proxy/jobs"
    # Stored requests and answers hold message bodies (often health information): they are
    # sealed with AES-GCM. Turning this off must be said explicitly.
    encrypt: bool = True
    # Base64 AES keys (16, 24 or 32 bytes): the first seals, every one opens (rotation).
    keys: tuple[Secret, ...] = ()
    # A job not finished this many seconds after it was submitted expires.
    max_age: float = 7 * 86400.0
    # Finished jobs (and their answers, and their idempotency keys) are kept this long.
    keep_results: float = 86400.0
    # Jobs stored in all (finished ones included); more -> 503 jobs_full.
    max_jobs: int = 100_000
    # Jobs run at once (each still takes a rate-limit permit per attempt).
    concurrency: int = 4
    # Largest answer kept for replay; a larger one is recorded without its body.
    max_response_bytes: int = 25 * 1024 * 1024
    # URL prefixes an X-Proxy-Callback may point under; empty: callbacks are refused (400).
    callback_allow: tuple[str, ...] = ()
    # HMAC-SHA256 key for X-Proxy-Signature on callbacks (required with callback_allow).
    callback_secret: Secret | None = None
    callback_timeout: float = 10.0
    # Deliveries of one callback before giving up (backoff doubles from 1 s up to 10 min).
    callback_max_attempts: int = 10


# The one integration of a config without `integrations:`.
DEFAULT_INTEGRATION = "default"
_INTEGRATION_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


@dataclass(frozen=True)
class IntegrationConfig:
    """One entry of `integrations:`: an API the process serves on a port of its own."""

    name: str = ""
    listen: ListenConfig = field(default_factory=ListenConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)


# The sections each integration has its own of (`integrations:` entries); the others
# (admin, logging, shutdown_timeout, event_loop) belong to the process.
INTEGRATION_SECTIONS = tuple(f.name for f in fields(IntegrationConfig) if f.name != "name")


@dataclass(frozen=True)
class Config:
    listen: ListenConfig = field(default_factory=ListenConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    # Seconds to let in-flight requests finish after SIGTERM/SIGINT.
    shutdown_timeout: float = 30.0
    # auto: uvloop when installed (the `speed` extra), else asyncio's own loop.
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    # Several APIs from one process; empty: the sections above are the one integration.
    integrations: tuple[IntegrationConfig, ...] = ()
    # Things worth a warning at start-up (literal secrets, a world-readable file).
    warnings: tuple[str, ...] = field(default=(), compare=False, metadata=DERIVED)
    # One integration's view (integrations_of): its name; "" for a config without
    # `integrations:`, whose state files keep the names they had before the list existed.
    integration: str = field(default="", compare=False, metadata=DERIVED)
    # Entries a reload could not apply (build(..., lenient=True)): name -> the error.
    refused: tuple[tuple[str, str], ...] = field(default=(), compare=False, metadata=DERIVED)

    @property
    def name(self) -> str:
        """The integration's name as metrics, logs and /readyz show it."""
        return self.integration or DEFAULT_INTEGRATION


def integrations_of(cfg: Config) -> list[Config]:
    """Each integration as a whole Config of its own: its sections, the process's others.

    The components take a Config as before; a config without `integrations:` is its
    own single integration, unchanged.
    """
    if not cfg.integrations:
        return [cfg]
    return [
        dataclasses.replace(
            cfg,
            integrations=(),
            refused=(),
            integration=entry.name,
            **{section: getattr(entry, section) for section in INTEGRATION_SECTIONS},
        )
        for entry in cfg.integrations
    ]


# Keys that may be given as `<key>_file` instead (a path whose content is the value); the
# sections of list entries are named without their index.
_FILE_KEYS = {
    "auth": (
        "token",
        "secret",
        "password",
        "api_key",
        "client_secret",
        "refresh_token",
        "state_key",
    ),
    "access": ("client_token",),
    "upstream": ("proxy_password",),
    "access.clients": ("token",),
    "jobs": ("callback_secret", "keys"),
}
# Of those, the lists: their file holds one value per line (blank lines ignored).
_LIST_FILE_KEYS = {"jobs": ("keys",)}
# Values that belong in the environment or a file, never written in the config itself.
_SECRET_KEYS = (
    "auth.secret",
    "auth.password",
    "auth.api_key",
    "auth.client_secret",
    "auth.refresh_token",
    "auth.state_key",
    "access.client_token",
    "upstream.proxy_password",
    "jobs.callback_secret",
    "jobs.keys",
)
_INDEX = re.compile(r"\[\d+\]")
_ENTRY = re.compile(r"^integrations\[[^\]]*\]\.")
# auth.state_key when the config gives none (nor a state_key_file).
STATE_KEY_ENV = "LUXSCI_PROXY_STATE_KEY"
STATE_DIR_ENV = "LUXSCI_PROXY_STATE_DIR"
# The config file, when --config does not name one.
CONFIG_ENV = "LUXSCI_PROXY_CONFIG"

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: str, env: Mapping[str, str], key: str) -> str:
    """Expand ${VAR} and ${VAR:-default}; a missing VAR without default is an error."""

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"{key}: environment variable {name} is not set (and has no :-default)")

    return _VAR.sub(sub, value)


def _expand_all(node: Any, env: Mapping[str, str], key: str) -> Any:
    if isinstance(node, str):
        return expand_env(node, env, key)
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if not isinstance(k, str):
                raise ConfigError(f"{key or '<top>'}: keys must be strings, got {k!r}")
            out[k] = _expand_all(v, env, f"{key}.{k}" if key else k)
        return out
    if isinstance(node, list):
        return [_expand_all(v, env, f"{key}[{i}]") for i, v in enumerate(node)]
    return node


def _section_of(name: str) -> str:
    """The section a key path names, without list indexes or its integration entry:
    `integrations[1].access.clients[0]` -> `access.clients`."""
    return _INDEX.sub("", _ENTRY.sub("", name))


def _read_secret_files(section: dict[str, Any], name: str) -> None:
    for key in _FILE_KEYS.get(_section_of(name), ()):
        file_key = f"{key}_file"
        if file_key not in section:
            continue
        path = section.pop(file_key)
        if path is None:
            continue
        if section.get(key) not in (None, "", []):
            raise ConfigError(
                f"{name}.{file_key}: give either {name}.{key} or {file_key}, not both"
            )
        try:
            text = Path(str(path)).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{name}.{file_key}: cannot read {path}: {e.strerror}") from None
        if key in _LIST_FILE_KEYS.get(_section_of(name), ()):
            section[key] = [line.strip() for line in text.splitlines() if line.strip()]
        else:
            # Mounted secrets usually end with a newline that is not part of the secret.
            section[key] = text.rstrip("\r\n")


def _coerce(value: Any, tp: Any, key: str, keep_empty: bool = False) -> Any:
    """Convert a YAML value (or an env-expanded string) to the field's declared type.
    An empty string is "not set" (`${VAR:-}`), unless `keep_empty` (see KEEP_EMPTY)."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item,) = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if value is None:
            return ()
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be a list")
        if isinstance(item, type) and dataclasses.is_dataclass(item):
            return tuple(_build(item, v, f"{key}[{i}]") for i, v in enumerate(value))
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None or (value == "" and not keep_empty):
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: a value is required")
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        # Any case (`level: INFO`, as other tools write levels); the canonical spelling kept.
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice).lower() == value.lower()):
                return choice
        raise ConfigError(f"{key}: must be one of {', '.join(choices)} (got {value!r})")
    if tp is Secret:
        if not isinstance(value, str | int):
            raise ConfigError(f"{key}: must be a string")
        return Secret(str(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{key}: must be true or false (got {value!r})")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: must be a number (got {value!r})")
        try:
            number = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: must be a number (got {value!r})") from None
        if tp is int and isinstance(value, float) and value != number:
            raise ConfigError(f"{key}: must be a whole number (got {value!r})")
        return number
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{key}: must be a string (got {value!r})")
        return str(value)
    raise AssertionError(f"unsupported config type {tp!r}")  # pragma: no cover


def _build(cls: type[Any], data: Any, key: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: must be a mapping of keys to values")
    data = dict(data)
    _read_secret_files(data, key)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in key_fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        expected = ", ".join(names)
        where = f"{key}.{unknown[0]}" if key else unknown[0]
        raise ConfigError(f"{where}: unknown key (expected one of: {expected})")
    kwargs = {}
    for f in key_fields(cls):
        name = f.name
        if name not in data:
            continue
        sub = f"{key}.{name}" if key else name
        tp = hints[name]
        if f.metadata.get("duration"):
            kwargs[name] = parse_duration(data[name], sub)
        elif dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], sub)  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(data[name], tp, sub, bool(f.metadata.get("keep_empty")))
    return cls(**kwargs)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any, key: str) -> float:
    """Seconds from `1s`, `90s`, `1m`, `1.5h`, `1d`, or a plain number of seconds.

    Strict: one number and at most one unit, nothing around them (`1 m`, `1min`, `1h30m`,
    `1M`, `-1s` are errors naming the key), since a misread window would shape every
    request. Positive and finite; how short a window may be is validate's concern.
    """
    expected = "a duration such as 1s, 30s, 1m, 1h, 1d, or a number of seconds"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{key}: must be {expected} (got {value!r})")
    if isinstance(value, str):
        m = _DURATION.fullmatch(value)
        if m is None:
            raise ConfigError(f"{key}: must be {expected} (got {value!r})")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        seconds = float(value)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{key}: must be a positive {expected[2:]} (got {value!r})")
    return seconds


def _check_port(value: int, key: str) -> None:
    if not 0 <= value <= 65535:
        raise ConfigError(f"{key}: must be a TCP port 0-65535 (got {value})")


def _check_positive(value: float, key: str) -> None:
    if value <= 0:
        raise ConfigError(f"{key}: must be greater than 0 (got {value})")


def validate(cfg: Config, schemes: Mapping[str, SchemeKind] | None = None) -> Config:
    """Checks that span keys or need more than a type; returns cfg unchanged. With
    `integrations:`, an entry's error names it: `integrations[crm].auth.scheme: ...`."""
    _validate_process(cfg)
    if not cfg.integrations:
        return validate_integration(cfg, schemes)
    check_integrations(cfg.integrations)
    for view in integrations_of(cfg):
        validate_integration(view, schemes)
    return cfg


def _validate_process(cfg: Config) -> None:
    """The keys of the process, whatever integrations it serves."""
    _check_port(cfg.admin.port, "admin.port")
    _check_positive(cfg.shutdown_timeout, "shutdown_timeout")


def _named(cfg: Config, error: ConfigError) -> ConfigError:
    """An integration's error, naming its entry when the config lists several."""
    if not cfg.integration:
        return error
    return ConfigError(f"integrations[{cfg.integration}].{error}")


def validate_integration(cfg: Config, schemes: Mapping[str, SchemeKind] | None = None) -> Config:
    """One integration's sections (integrations_of's view); returns cfg unchanged."""
    try:
        _validate_integration(cfg, schemes)
    except ConfigError as e:
        raise _named(cfg, e) from None
    return cfg


# Keys naming where an integration keeps state: two entries giving the same one would
# count, store or rotate into each other's.
_STATE_KEYS = ("limits.key", "limits.state_file", "jobs.store", "auth.state_file")


def _check_name(name: str, index: int) -> None:
    if not _INTEGRATION_NAME.fullmatch(name):
        raise ConfigError(
            f"integrations[{index}].name: required, a short name of a-z, 0-9, _ and - "
            f"starting with a letter or digit (got {name!r})"
        )


def check_integrations(entries: Sequence[IntegrationConfig]) -> None:
    """What the entries of `integrations:` may not share: a name, an address, state."""
    names: set[str] = set()
    addresses: dict[tuple[str, int], str] = {}
    state: dict[tuple[str, str], str] = {}
    for i, entry in enumerate(entries):
        _check_name(entry.name, i)
        if entry.name in names:
            raise ConfigError(f"integrations[{i}].name: {entry.name!r} is given twice")
        names.add(entry.name)
        address = (entry.listen.host, entry.listen.port)
        if entry.listen.port and address in addresses:
            raise ConfigError(
                f"integrations[{entry.name}].listen.port: {address[0]}:{address[1]} is "
                f"integrations[{addresses[address]}]'s address already"
            )
        addresses[address] = entry.name
        for dotted in _STATE_KEYS:
            section, key = dotted.split(".")
            value = getattr(getattr(entry, section), key)
            if not value or (dotted == "jobs.store" and is_redis_store(value)):
                # A Redis jobs store names its keys after each integration's limits key
                # (proxy/jobs/durable.py): one server holds several apart.
                continue
            other = state.setdefault((dotted, value), entry.name)
            if other != entry.name:
                raise ConfigError(
                    f"integrations[{entry.name}].{dotted}: integrations[{other}] uses "
                    f"{value!r} already; give each integration its own"
                )


def check_scheme_state(
    views: Sequence[Config], schemes: Mapping[str, SchemeKind] | None = None
) -> None:
    """Where each integration's scheme keeps state, its default place included: an entry
    naming another's default file would rotate its tokens into that one's."""
    from proxy.schemes.registry import BUILT_IN

    kinds = BUILT_IN if schemes is None else schemes
    owners: dict[str, str] = {}
    for view in views:
        kind = kinds.get(view.auth.scheme)
        path = kind.state_file(view.auth, view.integration) if kind is not None else None
        if path is None:
            continue
        other = owners.setdefault(os.path.abspath(path), view.name)
        if other != view.name:
            raise ConfigError(
                f"integrations[{view.name}].auth.state_file: {path} is integrations[{other}]'s "
                "state file already; give each integration its own"
            )


def _validate_integration(cfg: Config, schemes: Mapping[str, SchemeKind] | None) -> None:
    _check_port(cfg.listen.port, "listen.port")
    _check_positive(cfg.listen.max_body_bytes, "listen.max_body_bytes")
    _check_positive(cfg.listen.spool_threshold, "listen.spool_threshold")
    _check_positive(cfg.listen.max_buffered_bytes, "listen.max_buffered_bytes")
    _check_positive(cfg.upstream.connect_timeout, "upstream.connect_timeout")
    _check_positive(cfg.upstream.read_timeout, "upstream.read_timeout")
    _check_positive(cfg.upstream.pool_size, "upstream.pool_size")
    if cfg.listen.max_header_bytes < 1024:
        raise ConfigError("listen.max_header_bytes: must be at least 1024")
    if cfg.upstream.max_header_bytes < 1024:
        raise ConfigError("upstream.max_header_bytes: must be at least 1024")
    _check_positive(cfg.listen.max_connections, "listen.max_connections")
    _check_positive(cfg.listen.client_timeout, "listen.client_timeout")
    _validate_access(cfg.access)

    up = _check_url(
        cfg.upstream.url,
        "upstream.url",
        cfg.upstream.allow_insecure,
        " such as https://rest.luxsci.com",
    )
    if up.path not in ("", "/") or up.query:
        raise ConfigError(
            "upstream.url: give only scheme, host and port (no path, query or credentials); "
            "request paths come from the client"
        )
    if cfg.upstream.ca_file is not None and not Path(cfg.upstream.ca_file).is_file():
        raise ConfigError(f"upstream.ca_file: no such file {cfg.upstream.ca_file!r}")
    # Imported here, not at the top: it is built on this module.
    from proxy import egress

    egress.check(cfg.upstream)

    auth = cfg.auth
    # The scheme's own rules live with the scheme (imported here, not at the top: the
    # schemes are built on this module).
    from proxy.schemes import registry

    known = registry.BUILT_IN if schemes is None else schemes
    registry.check(auth, known)
    if auth.token_url is not None:
        # Another host than the API's, maybe, but the same rules: it is sent our secret.
        _check_url(auth.token_url, "auth.token_url", cfg.upstream.allow_insecure)
    lim = cfg.limits
    _check_positive(lim.max_inflight, "limits.max_inflight")
    for name in SHORTHAND_BUDGETS:
        if not lim.windows:
            _check_positive(getattr(lim, name), f"limits.{name}")
        elif getattr(lim, name) < 0:
            # Beside limits.windows, 0 is no such window (what leaving it out says).
            raise ConfigError(f"limits.{name}: must be 0 (no such window) or more")
    _check_positive(lim.window_seconds, "limits.window_seconds")
    if lim.day_seconds < lim.window_seconds:
        raise ConfigError("limits.day_seconds: must be at least limits.window_seconds")
    _validate_windows(lim)
    registry.check_scopes(lim.windows, auth.scheme, known)
    if not 0 < lim.fallback_share <= 1:
        raise ConfigError(f"limits.fallback_share: must be in (0, 1] (got {lim.fallback_share})")
    if lim.backend == "redis":
        try:
            parse_redis_url(lim.redis_url)
        except RedisURLError as e:
            # The URL masked: it may hold a password.
            raise ConfigError(
                f"limits.redis_url: {e} (got {mask_url_password(lim.redis_url)!r})"
            ) from None
    _check_positive(cfg.queue.max_size, "queue.max_size")
    _check_positive(cfg.queue.max_wait, "queue.max_wait")
    _check_positive(cfg.queue.aging, "queue.aging")
    _check_positive(cfg.retry.max_attempts, "retry.max_attempts")
    _check_positive(cfg.retry.max_time, "retry.max_time")
    _check_positive(cfg.retry.backoff_base, "retry.backoff_base")
    if cfg.retry.backoff_max < cfg.retry.backoff_base:
        raise ConfigError("retry.backoff_max: must be at least retry.backoff_base")
    _check_positive(auth.retry_min, "auth.retry_min")
    if auth.retry_max < auth.retry_min:
        raise ConfigError("auth.retry_max: must be at least auth.retry_min")
    if cfg.jobs.enabled:
        _validate_jobs(cfg.jobs)


# AES-128, -192 and -256.
_AES_KEY_SIZES = (16, 24, 32)


def aes_key(secret: Secret, key: str) -> bytes:
    """The bytes of one base64 AES key; the message names the key, never its value."""
    try:
        raw = base64.b64decode(secret.get().strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{key}: not base64 (make one with: luxsci-proxy jobs keygen)") from None
    if len(raw) not in _AES_KEY_SIZES:
        raise ConfigError(f"{key}: an AES key is 16, 24 or 32 bytes (got {len(raw)} bytes)")
    return raw


def jobs_keys(jobs: JobsConfig) -> list[bytes]:
    """The AES keys, the sealing one first. Empty entries are skipped, so a rotation can
    list `${OLD_KEY:-}` before the old key is gone everywhere."""
    return [
        aes_key(secret, f"jobs.keys[{i}]")
        for i, secret in enumerate(jobs.keys)
        if secret.get().strip()
    ]


REDIS_STORES = (
    "redis://",
    "rediss://",
    "unix://",
    "redis+sentinel://",
    "rediss+sentinel://",
    "redis+cluster://",
    "rediss+cluster://",
)


def is_redis_store(store: str) -> bool:
    """jobs.store names a Redis server (else a SQLite file, or the default one)."""
    return store.startswith(REDIS_STORES)


def _validate_jobs(jobs: JobsConfig) -> None:
    # Keys are checked even with encrypt: false: they may still open older records.
    if not jobs_keys(jobs) and jobs.encrypt:
        raise ConfigError(
            "jobs.keys: stored jobs hold request bodies and are encrypted: give one or more "
            "base64 AES keys (jobs.keys from ${VAR}, or jobs.keys_file; make one with "
            "`luxsci-proxy jobs keygen`), or set jobs.encrypt: false to store them in the clear"
        )
    prefix = jobs.path_prefix
    if (
        not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", prefix)
        or "/./" in prefix + "/"
        or ("/../" in prefix + "/")
    ):
        raise ConfigError(
            f"jobs.path_prefix: a path such as /_proxy/jobs: plain segments, no trailing "
            f"slash (got {prefix!r})"
        )
    if "://" in jobs.store and not is_redis_store(jobs.store):
        raise ConfigError(
            'jobs.store: a SQLite file\'s path, "", or a Redis URL (redis://, rediss://, '
            f"redis+sentinel://, redis+cluster://, unix://); got {urlsplit(jobs.store).scheme}://"
        )
    if is_redis_store(jobs.store):
        try:
            parse_redis_url(jobs.store)
        except RedisURLError as e:
            # The URL masked: it may hold a password.
            raise ConfigError(f"jobs.store: {e} (got {mask_url_password(jobs.store)!r})") from None
    if jobs.redis_min_replicas < 0:
        raise ConfigError(
            f"jobs.redis_min_replicas: 0 or more replicas (got {jobs.redis_min_replicas})"
        )
    if jobs.redis_min_replicas and not is_redis_store(jobs.store):
        raise ConfigError(
            "jobs.redis_min_replicas: only for a Redis jobs.store (SQLite commits to its own "
            "disk); remove it or set jobs.store to a Redis URL"
        )
    if jobs.redis_min_replicas and parse_redis_url(jobs.store).kind == "cluster":
        # WAIT counts the replicas of the node a connection is on; a Cluster client does
        # not send it to the node holding the jobs' slot.
        raise ConfigError(
            "jobs.redis_min_replicas: not supported with a redis+cluster:// store; use one "
            "server or Sentinel, or set it to 0"
        )
    for name in (
        "max_age",
        "keep_results",
        "max_jobs",
        "concurrency",
        "max_response_bytes",
        "visibility_timeout",
        "redis_replica_timeout",
    ):
        _check_positive(getattr(jobs, name), f"jobs.{name}")
    _check_positive(jobs.callback_timeout, "jobs.callback_timeout")
    _check_positive(jobs.callback_max_attempts, "jobs.callback_max_attempts")
    for i, url in enumerate(jobs.callback_allow):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"jobs.callback_allow[{i}]: an http:// or https:// URL prefix such as "
                f"https://app.internal/hooks/ (got {url!r})"
            )
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ConfigError(
                f"jobs.callback_allow[{i}]: scheme, host, port and path only (got {url!r})"
            )
    if jobs.callback_allow and (jobs.callback_secret is None or not jobs.callback_secret.get()):
        raise ConfigError(
            "jobs.callback_secret: callbacks are signed (X-Proxy-Signature): set it (from "
            "${VAR} or jobs.callback_secret_file) when jobs.callback_allow is set"
        )
    if jobs.callback_secret is not None and len(jobs.callback_secret.get()) < 16:
        raise ConfigError("jobs.callback_secret: use at least 16 characters")


def _validate_windows(lim: LimitsConfig) -> None:
    """limits.windows on its own (its scopes are the scheme's to judge: registry)."""
    if not lim.windows:
        return
    if len(lim.windows) > MAX_WINDOWS:
        raise ConfigError(f"limits.windows: at most {MAX_WINDOWS} windows")
    # The shorthand's windows beside the list (a budget of 0 is none).
    seen: dict[tuple[str, float], str] = {}
    for name, scope, per in (
        ("user_per_minute", "user", lim.window_seconds),
        ("account_per_minute", "account", lim.window_seconds),
        ("per_day", "all", lim.day_seconds),
    ):
        if getattr(lim, name):
            seen[(scope, per)] = f"limits.{name}"
    for i, window in enumerate(lim.windows):
        key = f"limits.windows[{i}]"
        if window.requests < 1:
            raise ConfigError(
                f"{key}.requests: required, the most requests a window may hold (at least 1)"
            )
        if window.per == 0:
            raise ConfigError(f"{key}.per: required, the window's length such as 1s, 1m, 1h")
        if window.per < 1:
            # The API's clock is learnt from Date headers, to the second: a shorter window
            # cannot be placed on it.
            raise ConfigError(
                f"{key}.per: must be at least 1s (the API's clock is known to the second)"
            )
        if window.per > 366 * 86400:
            raise ConfigError(f"{key}.per: must be at most 366d")
        earlier = seen.setdefault((window.scope, window.per), key)
        if earlier != key:
            raise ConfigError(
                f"{key}: the same scope and per as {earlier}; "
                "give each window once, with the smaller of the two budgets"
            )


def _check_url(url: str, key: str, allow_insecure: bool, example: str = "") -> SplitResult:
    """An http(s) URL credentials may be sent to: https unless allowed, no credentials of
    its own (they would sit in the config unmasked), no fragment, a valid port."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"{key}: must be an https:// URL{example} (got {url!r})")
    if parts.scheme == "http" and not allow_insecure:
        raise ConfigError(
            f"{key}: plain http:// sends credentials in the clear; use https:// "
            "or set upstream.allow_insecure: true (sandbox and tests only)"
        )
    if parts.fragment or parts.username or parts.password:
        raise ConfigError(f"{key}: no credentials or #fragment in the URL")
    try:
        parts.port  # noqa: B018 - urlsplit validates the port lazily
    except ValueError:
        raise ConfigError(f"{key}: invalid port in {url!r}") from None
    return parts


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where state that outlives the process is kept: $LUXSCI_PROXY_STATE_DIR, else
    ~/.local/state/luxsci-proxy (the XDG state directory's habit)."""
    base = (os.environ if env is None else env).get(STATE_DIR_ENV)
    return Path(base) if base else Path.home() / ".local/state/luxsci-proxy"


def spool_dir(listen: ListenConfig, env: Mapping[str, str] | None = None) -> Path:
    """Where large request bodies are spooled: listen.spool_dir, else `spool` in
    $LUXSCI_PROXY_STATE_DIR (a container's one writable place), else a directory of this
    user's own in the system's temp directory ($TMPDIR)."""
    if listen.spool_dir:
        return Path(listen.spool_dir)
    base = (os.environ if env is None else env).get(STATE_DIR_ENV)
    if base:
        return Path(base) / "spool"
    return Path(tempfile.gettempdir()) / f"luxsci-proxy-{os.geteuid()}"


def _validate_access(access: AccessConfig) -> None:
    for i, net in enumerate(access.allow_clients):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(
                f"access.allow_clients[{i}]: not an IP network such as 10.0.0.0/8 (got {net!r})"
            ) from None
    if access.client_token is not None and len(access.client_token.get()) < 16:
        raise ConfigError("access.client_token: use at least 16 characters")
    _validate_clients(access)
    for i, rule in enumerate(access.rules):
        key = f"access.rules[{i}]"
        if not rule.methods or not all(_METHOD.fullmatch(m) for m in rule.methods):
            raise ConfigError(f'{key}.methods: HTTP methods in upper case, or "*" for any')
        segments = rule.path.split("/")
        if not rule.path.startswith("/") or "**" in segments[:-1]:
            raise ConfigError(
                f"{key}.path: must start with / and use ** only as the last segment "
                f"(got {rule.path!r})"
            )
        if any(s in (".", "..") or "%" in s for s in segments):
            raise ConfigError(f"{key}.path: write segments plainly: no ., .. or %-escapes")
    if any(not u.strip() for u in access.protected_users):
        raise ConfigError("access.protected_users: entries must not be empty")


_METHOD = re.compile(r"\*|[A-Z]+")
# Client names become metric label values and access-line fields: short and plain.
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Names the proxy gives itself: requests with no identity, its own logins, its jobs.
_RESERVED_CLIENTS = ("anonymous", "proxy", "jobs")


def _validate_clients(access: AccessConfig) -> None:
    names: set[str] = set()
    tokens: set[str] = set()
    if access.client_token is not None:
        # The shorthand's client: one more, beside any named ones.
        names.add("default")
        tokens.add(access.client_token.get())
    for i, client in enumerate(access.clients):
        key = f"access.clients[{i}]"
        if not _CLIENT_NAME.fullmatch(client.name):
            raise ConfigError(
                f"{key}.name: required; up to 64 letters, digits, _ . - (got {client.name!r})"
            )
        if client.name in _RESERVED_CLIENTS:
            raise ConfigError(f"{key}.name: {client.name!r} is the proxy's own; pick another")
        if client.name in names:
            taken = "access.client_token's client" if client.name == "default" else "a client"
            raise ConfigError(f"{key}.name: {client.name!r} is already the name of {taken}")
        names.add(client.name)
        token = client.token.get() if client.token is not None else ""
        if not token:
            raise ConfigError(f"{key}.token: required (set {key}.token or token_file)")
        if len(token) < 16:
            raise ConfigError(f"{key}.token: use at least 16 characters")
        if token in tokens:
            raise ConfigError(f"{key}.token: another client has the same token")
        tokens.add(token)
        if client.max_queued is not None and client.max_queued < 1:
            raise ConfigError(f"{key}.max_queued: must be at least 1 (got {client.max_queued})")


def literal_secrets(raw: dict[str, Any], prefix: str = "") -> list[str]:
    """Secret keys written into the file itself rather than taken from ${VAR} or a file."""
    found = []
    entries = raw.get("integrations")
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        if isinstance(entry, dict):
            found += literal_secrets(entry, f"integrations[{i}].")
    given: list[tuple[str, str, Any]] = []
    for dotted in _SECRET_KEYS:
        section, key = dotted.split(".")
        value = (raw.get(section) or {}).get(key) if isinstance(raw.get(section), dict) else None
        given.append((dotted, key, value))
    access = raw.get("access")
    clients = access.get("clients") if isinstance(access, dict) else None
    for i, client in enumerate(clients if isinstance(clients, list) else []):
        if isinstance(client, dict):
            given.append((f"access.clients[{i}].token", "token", client.get("token")))
    for dotted, key, value in given:
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str | int) and str(v) and "${" not in str(v) for v in values):
            found.append(
                f"{prefix}{dotted}: a literal secret in the config file; take it from the "
                f"environment (${{VAR}}) or a file ({key}_file) instead"
            )
    return found


class _StrictLoader(yaml.SafeLoader):
    """safe_load's loader, but a key given twice in one mapping is an error: PyYAML keeps
    the last one silently, so `port: 8080` further down a long file would undo an edit."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` may be overridden: that is what merging is for
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:
                continue  # an unhashable key: the constructor below says so
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first given at line {first.start_mark.line + 1})",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep)


def read_yaml(text: str, source: str) -> dict[str, Any]:
    """The file's mapping of sections, as written (before `${VAR}` expansion)."""
    try:
        # A SafeLoader subclass: only plain data, never Python objects.
        raw = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        # The parser's own words: "mapping values are not allowed here", "found duplicate...".
        reason = e.problem or e.context or "unreadable"
        raise ConfigError(f"{source}: not valid YAML{where}: {reason}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    if "warnings" in raw:
        raise ConfigError("warnings: unknown key")
    return raw


def _relative_to(node: Any, base: Path) -> Any:
    """Every `*_file` path in the file relative to the file's own folder, as a config file's
    neighbours are named (the working directory of a service is rarely the config's)."""
    if isinstance(node, list):  # entries of a list of sections (their own *_file keys)
        return [_relative_to(item, base) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if isinstance(k, str) and k.endswith("_file") and isinstance(v, str) and v:
            out[k] = str(base / Path(v).expanduser())  # an absolute v stays as it is
        else:
            out[k] = _relative_to(v, base)
    return out


def file_values(
    raw: dict[str, Any], env: Mapping[str, str], base_dir: Path | None = None
) -> dict[str, Any]:
    """The file's values as `_build` takes them: `${VAR}` expanded, `*_file` paths resolved
    against `base_dir` (the file's folder; None: the working directory, as for stdin)."""
    expanded: dict[str, Any] = _expand_all(raw, env, "")
    return expanded if base_dir is None else _relative_to(expanded, base_dir)


def state_key_from_env(data: dict[str, Any], env: Mapping[str, str]) -> bool:
    """auth.state_key from LUXSCI_PROXY_STATE_KEY when none is given; True when it was."""
    if STATE_KEY_ENV not in env:
        return False
    entries = data.get("integrations")
    if isinstance(entries, list) and entries:
        # Each integration's auth: the top level has none beside the list.
        found = [state_key_from_env(e, env) for e in entries if isinstance(e, dict)]
        return any(found)
    auth = data.setdefault("auth", {})
    if not isinstance(auth, dict):
        return False  # `auth: 5`: _build names the key
    if auth.get("state_key") not in (None, "") or auth.get("state_key_file") is not None:
        return False
    # The state key may live in the environment without being named in the file.
    auth["state_key"] = env[STATE_KEY_ENV]
    return True


def _window_defaults(sections: dict[str, Any]) -> None:
    limits = sections.get("limits")
    if isinstance(limits, dict) and limits.get("windows"):
        # Beside a list of windows, the shorthand's are only those given: a default (60 a
        # minute, 6000 a day) must not cap, unseen, an API the list describes.
        for name in SHORTHAND_BUDGETS:
            limits.setdefault(name, 0)


def build(
    data: dict[str, Any],
    schemes: Mapping[str, SchemeKind] | None = None,
    lenient: bool = False,
) -> Config:
    """A validated Config from sections of plain values (whatever their source).

    `lenient` (a reload): an entry of `integrations:` that does not build or validate
    is left out and named in `refused`, so the others still apply; what spans the list
    (names, addresses, shared state) and the process's own keys are never lenient.
    """
    if data.get("integrations") in (None, ""):
        data.pop("integrations", None)
        _window_defaults(data)
        return validate(_build(Config, data, ""), schemes)
    entries = data["integrations"]
    if not isinstance(entries, list) or not entries:
        raise ConfigError(
            "integrations: must be a list of integrations, each a mapping with a name "
            "(leave the key out for one integration)"
        )
    beside = [name for name in INTEGRATION_SECTIONS if name in data]
    if beside:
        raise ConfigError(
            f"{beside[0]}: a section of each integration, not of the process, when "
            f"integrations: is given; move it into the entries (integrations[N].{beside[0]})"
        )
    process: Config = _build(Config, {k: v for k, v in data.items() if k != "integrations"}, "")
    _validate_process(process)
    built: list[IntegrationConfig] = []
    refused: list[tuple[str, str]] = []
    for i, item in enumerate(entries):
        try:
            if isinstance(item, dict):
                _window_defaults(item)
            entry: IntegrationConfig = _build(IntegrationConfig, item, f"integrations[{i}]")
            _check_name(entry.name, i)  # before an error names the entry by it
            (view,) = integrations_of(dataclasses.replace(process, integrations=(entry,)))
            validate_integration(view, schemes)
        except ConfigError as e:
            name = item.get("name") if isinstance(item, dict) else None
            if not lenient or not isinstance(name, str) or not _INTEGRATION_NAME.fullmatch(name):
                raise
            refused.append((name, str(e)))
            continue
        built.append(entry)
    if not built:
        raise ConfigError(refused[0][1])
    check_integrations(built)
    listed = dataclasses.replace(process, integrations=tuple(built))
    check_scheme_state(integrations_of(listed), schemes)
    return dataclasses.replace(listed, refused=tuple(refused))


def parse(
    text: str,
    env: Mapping[str, str] | None = None,
    source: str = "config",
    schemes: Mapping[str, SchemeKind] | None = None,
    base_dir: Path | None = None,
) -> Config:
    """Parse and validate YAML text (`schemes`: the auth schemes known; default built-in;
    `base_dir`: the folder `*_file` paths are relative to, default the working directory)."""
    raw = read_yaml(text, source)
    env = os.environ if env is None else env
    data = file_values(raw, env, base_dir)
    state_key_from_env(data, env)
    cfg = build(data, schemes)
    check_egress_env(cfg, env)
    return dataclasses.replace(cfg, warnings=tuple(literal_secrets(raw)))


def check_egress_env(cfg: Config, env: Mapping[str, str]) -> None:
    """The egress proxy of each origin the proxy calls, as its pool will choose it: a bad
    HTTPS_PROXY (read when upstream.proxy is not set) stops start-up like a bad key."""
    from proxy import egress

    for view in integrations_of(cfg):
        origins = [view.upstream.url] + ([view.auth.token_url] if view.auth.token_url else [])
        try:
            for url in origins:
                egress.choose(dataclasses.replace(view.upstream, url=url), env)
        except ConfigError as e:
            raise _named(view, e) from None


def read_text(path: str | os.PathLike[str]) -> str:
    """The config file's text; ConfigError naming the file when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the config file is not UTF-8 text") from None


def readable_warning(path: str | os.PathLike[str], cfg: Config) -> Config:
    """Warn that others can read the file, when that matters: it holds a literal secret
    (a file of `${VAR}`s and `*_file`s gives away nothing; chmod advice on it is noise)."""
    if not any(": a literal secret" in w for w in cfg.warnings):
        return cfg
    with contextlib.suppress(OSError):
        mode = Path(path).stat().st_mode
        if mode & stat.S_IROTH:
            readable = (
                f"{path}: readable by every user of this machine (mode {stat.filemode(mode)}) "
                "and holds a literal secret; chmod o-r it"
            )
            return dataclasses.replace(cfg, warnings=(*cfg.warnings, readable))
    return cfg


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """The config file alone (plus its `${VAR}`s); proxy/sources.py adds the environment's
    LUXSCI_PROXY_* keys and the command line's."""
    cfg = parse(read_text(path), env, source=str(path), base_dir=Path(path).parent)
    return readable_warning(path, cfg)


# Query parameters redis-py (and most URL-configured clients) read as a password.
# sentinel_password: the sentinels' own, in a redis+sentinel:// URL (proxy/redis_connect.py).
_URL_PASSWORD_PARAMS = frozenset({"password", "pass", "passwd", "pwd", "sentinel_password"})
MASK = "********"


def _password_params(query: str) -> list[str]:
    """The raw (still percent-encoded) values of password parameters in a query string."""
    found = []
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if unquote_plus(name).lower() in _URL_PASSWORD_PARAMS and value:
            found.append(value)
    return found


def url_passwords(url: str) -> list[str]:
    """The passwords a URL carries, as written (percent-encoded): in its authority, and as a
    `password=` query parameter (redis-py takes either)."""
    parts = urlsplit(url)
    found = [parts.password] if parts.password else []
    return found + _password_params(parts.query)


def mask_url_password(url: str) -> str:
    """redis://user:pw@host/0?password=pw -> redis://user:********@host/0?password=********
    (the rest of the URL as written; URLs without a password unchanged)."""
    parts = urlsplit(url)
    if parts.password:
        user = parts.username or ""
        host = parts.netloc.rsplit("@", 1)[1]
        # The authority is the first place its text occurs (right after the scheme).
        url = url.replace(parts.netloc, f"{user}:{MASK}@{host}", 1)
    if _password_params(parts.query):
        query = "&".join(
            f"{name}={MASK}"
            if unquote_plus(name).lower() in _URL_PASSWORD_PARAMS and value
            else pair
            for pair in parts.query.split("&")
            for name, _, value in [pair.partition("=")]
        )
        # The first "?" starts the query.
        url = url.replace("?" + parts.query, "?" + query, 1)
    return url


def masked(cfg: Config) -> dict[str, Any]:
    """The config as plain data (mappings, lists, scalars: what `yaml.safe_dump` takes) with
    every secret masked, for `check`. `warnings` are not a key of the file: left out."""

    def walk(obj: Any) -> Any:
        if isinstance(obj, Secret):
            return MASK
        if isinstance(obj, str) and "://" in obj:
            return mask_url_password(obj)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {f.name: walk(getattr(obj, f.name)) for f in key_fields(type(obj))}
        if isinstance(obj, tuple | list):
            return [walk(item) for item in obj]
        if obj is None or isinstance(obj, str | int | float | bool):
            return obj
        # A new config type must be taught here, never printed by its repr.
        raise TypeError(f"masked(): no plain form for {type(obj).__name__}")

    result: dict[str, Any] = walk(cfg)
    # One form or the other: the sections of the one integration, or the list (the
    # top level's sections are unused defaults beside it).
    if cfg.integrations:
        for section in INTEGRATION_SECTIONS:
            del result[section]
    else:
        del result["integrations"]
    return result


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two configs (or sections)."""
    found = []
    for f in key_fields(type(old)):
        a, b = getattr(old, f.name), getattr(new, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(a) and not isinstance(a, type) and type(a) is type(b):
            found += differences(a, b, key + ".")
        elif a != b:
            found.append(key)
    return found


def described_changes(old: Config, new: Config) -> list[str]:
    """Each changed key as `key: old -> new`, secrets (and URL passwords) never shown:
    a change that the masked forms cannot show is said to be one, and no more."""
    shown_old, shown_new = masked(old), masked(new)
    described = []
    for key in differences(old, new):
        before, after = _at(shown_old, key), _at(shown_new, key)
        if before == after:
            described.append(f"{key}: changed (a secret: not shown)")
        else:
            described.append(f"{key}: {json.dumps(before)} -> {json.dumps(after)}")
    return described


def _at(plain: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        plain = plain[name]
    return plain
