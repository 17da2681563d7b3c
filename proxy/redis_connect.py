"""Redis URLs for every way teams run Redis: one server, Sentinel, or a Cluster.

`parse_url` reads a URL into a `RedisTarget` (pure, so config validation and tests use
it without a socket); `connect` makes the redis.asyncio client for it. The shared limits
and the jobs store both connect through here, so both accept the same URLs:

    redis://[user:pass@]host[:6379][/db]          one server (rediss://: TLS)
    unix:///path/to/redis.sock[?db=N]             one server on a Unix socket
    redis+sentinel://[user:pass@]h1[:26379],h2[:26379]/service[/db]
                                                  the master Sentinel names (rediss+sentinel://:
                                                  TLS to the sentinels and the master)
    redis+cluster://[user:pass@]h1[:6379],h2[:6379]  a Cluster (rediss+cluster://: TLS)

The user and password in the authority are the data nodes' (the master's, the cluster's).
Sentinels with a password of their own take `?sentinel_password=` (and
`sentinel_username=`). Query parameters: `db`, `password` (wins over the authority's),
`sentinel_username`, `sentinel_password`, and with TLS `ssl_ca_certs` (a PEM file) and
`ssl_cert_reqs` (`required`, `optional`, `none`). Anything else is an error: a typo must
not pass silently.

This module imports nothing from the rest of the proxy, so any package may use it; it
imports redis-py only in `connect` (a tenth of a second), so config validation, which
parses the URL, does not pay for it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

Kind = Literal["single", "sentinel", "cluster"]

_SCHEMES: dict[str, tuple[Kind, bool]] = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "unix": ("single", False),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
_DEFAULT_PORT = {"single": 6379, "sentinel": 26379, "cluster": 6379}
_CERT_REQS = ("required", "optional", "none")
MASK = "***"


class RedisURLError(ValueError):
    """A Redis URL that cannot be used; the message says what is wrong, never a password."""


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """What a Redis URL points at. `hosts`: the server, the sentinels, or the cluster's
    seed nodes; empty for a Unix socket (`path`)."""

    kind: Kind
    hosts: tuple[tuple[str, int], ...]
    path: str | None = None
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    def __repr__(self) -> str:
        # Never the passwords: a repr ends up in tracebacks and logs.
        return (
            f"RedisTarget(kind={self.kind!r}, hosts={self.hosts!r}, path={self.path!r}, "
            f"service={self.service!r}, db={self.db}, tls={self.tls})"
        )


def parse_url(url: str) -> RedisTarget:
    """A Redis URL read into its parts; `RedisURLError` names the part that is wrong."""
    try:
        parts = urlsplit(url.strip())
    except ValueError as e:  # an unbalanced "[" in the host
        raise RedisURLError(f"not a URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        # The scheme alone: the rest of the URL may hold a password.
        got = f"{scheme}://" if scheme else "no scheme"
        raise RedisURLError(
            "must start with redis://, rediss://, unix://, redis+sentinel://, "
            f"rediss+sentinel://, redis+cluster:// or rediss+cluster:// (got {got})"
        )
    kind, tls = _SCHEMES[scheme]
    if parts.fragment:
        raise RedisURLError("a '#' fragment has no meaning in a Redis URL")
    query = _query(parts.query)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, password = _userinfo(userinfo)
    if "password" in query:
        # It wins over the authority's, as redis-py's own URLs have it.
        password = query.pop("password")
    sentinel_username = query.pop("sentinel_username", None)
    sentinel_password = query.pop("sentinel_password", None)
    if kind != "sentinel" and (sentinel_username is not None or sentinel_password is not None):
        raise RedisURLError("sentinel_username and sentinel_password need redis+sentinel://")
    ssl_ca_certs = query.pop("ssl_ca_certs", None)
    ssl_cert_reqs = query.pop("ssl_cert_reqs", None)
    if not tls and (ssl_ca_certs is not None or ssl_cert_reqs is not None):
        raise RedisURLError(f"ssl_ca_certs and ssl_cert_reqs need TLS: use {_tls_scheme(scheme)}")
    if ssl_cert_reqs is not None and ssl_cert_reqs.lower() not in _CERT_REQS:
        raise RedisURLError(
            f"ssl_cert_reqs: one of required, optional, none (got {ssl_cert_reqs!r})"
        )
    db_param = query.pop("db", None)
    if query:
        names = ", ".join(sorted(query))
        raise RedisURLError(
            f"unknown query parameter {names} (known: db, password, sentinel_username, "
            "sentinel_password, ssl_ca_certs, ssl_cert_reqs)"
        )
    common: dict[str, Any] = {
        "username": username,
        "password": password,
        "tls": tls,
        "ssl_ca_certs": ssl_ca_certs,
        "ssl_cert_reqs": ssl_cert_reqs.lower() if ssl_cert_reqs else None,
    }

    if scheme == "unix":
        if hostlist:
            raise RedisURLError(f"unix:// takes a path, no host (got {hostlist!r}): unix:///path")
        path = unquote(parts.path)
        if not path.startswith("/") or path == "/":
            raise RedisURLError("unix:// needs the socket's absolute path: unix:///path/redis.sock")
        return RedisTarget("single", (), path=path, db=_db(db_param, "?db="), **common)

    hosts = _hosts(hostlist, _DEFAULT_PORT[kind])
    segments = [unquote(s) for s in parts.path.split("/")[1:]]
    if segments and segments[-1] == "":
        segments.pop()  # a trailing slash
    if kind == "single":
        if len(hosts) > 1:
            raise RedisURLError(
                f"{scheme}:// takes one host; several are redis+sentinel:// or redis+cluster://"
            )
        if len(segments) > 1:
            raise RedisURLError("the path is the database number alone: redis://host:6379/0")
        db = _one_db(segments[0] if segments else None, db_param)
        return RedisTarget("single", hosts, db=db, **common)
    if kind == "sentinel":
        if not segments or not segments[0]:
            raise RedisURLError(
                "name the master's service after the sentinels: "
                "redis+sentinel://host1:26379,host2:26379/mymaster[/db]"
            )
        if len(segments) > 2:
            raise RedisURLError("the path is the service, then the database number: /mymaster/0")
        db = _one_db(segments[1] if len(segments) == 2 else None, db_param)
        return RedisTarget(
            "sentinel",
            hosts,
            service=segments[0],
            db=db,
            sentinel_username=sentinel_username,
            sentinel_password=sentinel_password,
            **common,
        )
    db = _one_db(segments[0] if len(segments) == 1 else None, db_param)
    if len(segments) > 1 or db != 0:
        raise RedisURLError("a Redis Cluster has database 0 only: leave the path out")
    return RedisTarget("cluster", hosts, **common)


def _tls_scheme(scheme: str) -> str:
    return "rediss" + scheme.removeprefix("redis") + "://" if scheme != "unix" else "rediss://"


def _query(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text))
    except ValueError:
        raise RedisURLError("the query is not name=value pairs joined by '&'") from None
    for name, value in pairs:
        if name in found:
            raise RedisURLError(f"query parameter {name} is given twice")
        found[name] = value
    return found


def _userinfo(text: str) -> tuple[str | None, str | None]:
    if not text:
        return None, None
    user, colon, password = text.partition(":")
    return unquote(user) or None, unquote(password) if colon else None


def _hosts(text: str, default_port: int) -> tuple[tuple[str, int], ...]:
    if not text:
        raise RedisURLError("no host: redis://host[:port]")
    hosts = []
    for item in text.split(","):
        if item.startswith("["):  # [IPv6]:port
            host, bracket, rest = item[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise RedisURLError(f"host {item!r}: an IPv6 address is written [::1]:6379")
            port_text = rest[1:] if rest else ""
        else:
            host, _, port_text = item.partition(":")
        if not host:
            raise RedisURLError(f"an empty host in {text!r}")
        if port_text or item.endswith(":"):
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise RedisURLError(f"host {item!r}: the port must be 1 to 65535")
            port = int(port_text)
        else:
            port = default_port
        hosts.append((unquote(host), port))
    return tuple(hosts)


def _db(text: str | None, where: str) -> int:
    if text is None or text == "":
        return 0
    if not text.isdigit():
        raise RedisURLError(f"the database ({where}) is a number (got {text!r})")
    return int(text)


def _one_db(path_db: str | None, query_db: str | None) -> int:
    if path_db and query_db is not None:
        raise RedisURLError("the database is given twice (in the path and as ?db=)")
    return _db(path_db, "path") if path_db else _db(query_db, "?db=")


def redact_url(url: str) -> str:
    """The URL with every password masked (the authority's, `password=` and
    `sentinel_password=`), fit for logs; the rest as written."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = len(rest)
    for stop in "/?#":
        at = rest.find(stop)
        if at != -1:
            end = min(end, at)
    netloc, tail = rest[:end], rest[end:]
    userinfo, has_user, hosts = netloc.rpartition("@")
    if has_user and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{MASK}@{hosts}"
    head, q, query = tail.partition("?")
    if q:
        query, h, fragment = query.partition("#")
        pairs = []
        for pair in query.split("&"):
            name, eq, value = pair.partition("=")
            if eq and value and unquote(name).lower().endswith("password"):
                pair = f"{name}={MASK}"
            pairs.append(pair)
        tail = head + "?" + "&".join(pairs) + h + fragment
    return f"{scheme}://{netloc}{tail}"


@functools.cache
def _sentinel_master_class() -> type[Any]:
    import redis.asyncio

    class SentinelMaster(redis.asyncio.Redis):
        """The master Sentinel names; closing it also closes the clients of the sentinels
        it asks (otherwise their connections are left open)."""

        async def aclose(self, close_connection_pool: bool | None = None) -> None:
            await super().aclose(close_connection_pool)
            pool: Any = self.connection_pool
            for sentinel in pool.sentinel_manager.sentinels:
                await sentinel.aclose()

    return SentinelMaster


def connect(url: str, *, op_timeout: float, **options: Any) -> Any:
    """A redis.asyncio client for the URL: `Redis` for one server; for Sentinel, the
    master's client, which asks the sentinels where the master is whenever it connects
    (so a failover is followed on the next reconnect); `RedisCluster` for a Cluster.
    Nothing connects before the first command. `op_timeout` bounds each connect and read;
    `options` go to the client as they are (health_check_interval, retry...)."""
    import redis.asyncio
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.sentinel import Sentinel

    target = parse_url(url)
    kwargs: dict[str, Any] = {
        "username": target.username,
        "password": target.password,
        "socket_timeout": op_timeout,
        "socket_connect_timeout": op_timeout,
        **_tls_options(target),
        **options,
    }
    if target.kind == "cluster":
        nodes = [ClusterNode(host, port) for host, port in target.hosts]
        return RedisCluster(startup_nodes=nodes, **kwargs)
    if target.kind == "sentinel":
        assert target.service is not None
        sentinel_kwargs: dict[str, Any] = {
            "username": target.sentinel_username,
            "password": target.sentinel_password,
            "socket_timeout": op_timeout,
            "socket_connect_timeout": op_timeout,
            **_tls_options(target),
        }
        sentinels = Sentinel(  # type: ignore[no-untyped-call]
            list(target.hosts), sentinel_kwargs=sentinel_kwargs
        )
        return sentinels.master_for(
            target.service, redis_class=_sentinel_master_class(), db=target.db, **kwargs
        )
    if target.path is not None:
        return redis.asyncio.Redis(unix_socket_path=target.path, db=target.db, **kwargs)
    (host, port) = target.hosts[0]
    return redis.asyncio.Redis(host=host, port=port, db=target.db, **kwargs)


def _tls_options(target: RedisTarget) -> dict[str, Any]:
    if not target.tls:
        return {}
    tls: dict[str, Any] = {"ssl": True}
    if target.ssl_ca_certs is not None:
        tls["ssl_ca_certs"] = target.ssl_ca_certs
    if target.ssl_cert_reqs is not None:
        tls["ssl_cert_reqs"] = target.ssl_cert_reqs
    return tls
