"""Egress through a corporate HTTP proxy: which proxy an origin is reached through.

Which proxy: `upstream.proxy` when the config sets it (`""` or `none`: no proxy at all),
else the environment's `https_proxy` / `HTTPS_PROXY` (for an https:// origin) or
`http_proxy` / `HTTP_PROXY` (for http://), the lower-case form first, as curl and urllib
read them. `upstream.no_proxy`, else `no_proxy` / `NO_PROXY`, names the hosts reached
directly. Credentials: `user:password@` in the proxy URL, or `upstream.proxy_user` and
`upstream.proxy_password`; sent as `Proxy-Authorization: Basic` on the CONNECT request
only, never to the API (proxy/http/tunnel.py makes the tunnel).

Pure: no I/O; the environment is a parameter. Config validation uses it too, so it sits
below the HTTP layer.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from proxy.config import ConfigError, mask_url_password

if TYPE_CHECKING:
    from proxy.config import UpstreamConfig

# Config values of `upstream.proxy` that turn the proxy (and the environment's) off.
OFF = ("", "none")
# Environment variables, by the origin's scheme; the lower-case form wins when both are
# set (curl reads only lower-case http_proxy, against CGI's HTTP_PROXY header injection).
_ENV_PROXY = {"https": ("https_proxy", "HTTPS_PROXY"), "http": ("http_proxy", "HTTP_PROXY")}
_ENV_NO_PROXY = ("no_proxy", "NO_PROXY")


@dataclass(frozen=True, slots=True)
class EgressProxy:
    host: str
    port: int
    # `Basic <base64>` for Proxy-Authorization, or None: no credentials. Never shown.
    authorization: str | None = field(default=None, repr=False)
    # The setting it came from (upstream.proxy, HTTPS_PROXY...), for messages.
    source: str = "upstream.proxy"

    @property
    def where(self) -> str:
        return authority(self.host, self.port)


def authority(host: str, port: int) -> str:
    """host:port as a request target or Host value ([v6]:port)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def basic_credentials(user: str, password: str) -> str:
    """The Proxy-Authorization value (RFC 7617; UTF-8, as browsers and curl send it)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


@dataclass(frozen=True, slots=True)
class ProxyURL:
    host: str
    port: int
    user: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_proxy_url(url: str, key: str, *, scheme_optional: bool = False) -> ProxyURL:
    """An `http://[user:password@]host[:port][/]` proxy URL; ConfigError naming `key`.

    `scheme_optional`: a bare `host:port` means http:// (what the environment variables
    often hold, and what curl and urllib accept). Messages never show the password."""
    text = url.strip()
    if scheme_optional and "://" not in text:
        text = "http://" + text
    shown = mask_url_password(text)
    parts = urlsplit(text)
    if parts.scheme.lower() != "http" or "://" not in text:
        # urlsplit reads `corp:3128` as scheme corp: name what was written instead.
        scheme = f"{parts.scheme}://" if "://" in text else "no scheme"
        raise ConfigError(
            f"{key}: must be an http:// proxy URL such as http://proxy.example.com:3128 "
            f"(got {scheme}); TLS to the API runs inside the tunnel all the same"
        )
    if not parts.hostname:
        raise ConfigError(f"{key}: no host in {shown!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{key}: give only http://, credentials, host and port (got {shown!r})")
    try:
        port = parts.port or 80
    except ValueError:
        raise ConfigError(f"{key}: invalid port in {shown!r}") from None
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return ProxyURL(parts.hostname, port, user, password)


# -- NO_PROXY ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Rule:
    # A host name (matched with its subdomains), or an IP network; a port, or any (None).
    name: str | None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    port: int | None


@dataclass(frozen=True, slots=True)
class NoProxy:
    """Hosts reached directly, in the NO_PROXY syntax curl, requests and urllib share:
    comma- (or space-) separated entries; `*` alone: every host; `example.com` and
    `.example.com`: that host and its subdomains; an IP address or a CIDR network
    (matched against IP literals only: nothing is resolved); `:port` after any of
    them (`[v6]:port` for IPv6): that port only."""

    rules: tuple[_Rule, ...] = ()
    everything: bool = False

    @classmethod
    def parse(cls, text: str, key: str) -> NoProxy:
        rules = []
        for entry in re.split(r"[,\s]+", text.strip()):
            if not entry:
                continue
            if entry == "*":
                return cls((), everything=True)
            rules.append(_parse_rule(entry, key))
        return cls(tuple(rules))

    def bypasses(self, host: str, port: int) -> bool:
        if self.everything:
            return True
        host = host.strip("[]").rstrip(".").lower()
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        for rule in self.rules:
            if rule.port is not None and rule.port != port:
                continue
            if rule.network is not None:
                if address is not None and address in rule.network:
                    return True
            elif rule.name is not None and (host == rule.name or host.endswith("." + rule.name)):
                return True
        return False


def _parse_rule(entry: str, key: str) -> _Rule:
    port: int | None = None
    text = entry
    if text.startswith("["):  # [v6] or [v6]:port
        inside, _, rest = text[1:].partition("]")
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            raise ConfigError(f"{key}: cannot read {entry!r} (expected [IPv6]:port)")
        port = int(rest[1:]) if rest else None
        text = inside
    elif text.count(":") == 1:  # host:port; more colons: an IPv6 address or network
        name, _, digits = text.partition(":")
        if not digits.isdigit():
            raise ConfigError(f"{key}: cannot read {entry!r} (expected host:port)")
        text, port = name, int(digits)
    if port is not None and not 0 < port <= 65535:
        raise ConfigError(f"{key}: invalid port in {entry!r}")
    try:
        return _Rule(None, ipaddress.ip_network(text, strict=False), port)
    except ValueError:
        pass
    if "/" in text or ":" in text:
        raise ConfigError(f"{key}: {entry!r} is neither a host name nor an IP address or network")
    # `*.example.com` and `.example.com` both mean example.com and its subdomains.
    name = text.lstrip("*").lstrip(".").rstrip(".").lower()
    if not name:
        raise ConfigError(f"{key}: cannot read {entry!r}")
    return _Rule(name, None, port)


# -- choosing the proxy -----------------------------------------------------------------------


def _from_env(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    """(name, value) of the first variable set; a lower-case one set empty means "none"."""
    for name in names:
        if name in env:
            value = env[name].strip()
            return (name, value) if value else None
    return None


def choose(cfg: UpstreamConfig, env: Mapping[str, str]) -> EgressProxy | None:
    """The proxy that `cfg.url` is reached through, or None: directly. ConfigError (naming
    the key or the variable) for a setting that cannot be used."""
    origin = urlsplit(cfg.url)
    scheme = origin.scheme.lower()
    host = origin.hostname or ""
    port = origin.port or (443 if scheme == "https" else 80)
    if cfg.proxy is not None:
        if cfg.proxy.strip().lower() in OFF:
            return None
        source, value, scheme_optional = "upstream.proxy", cfg.proxy, False
    else:
        found = _from_env(env, _ENV_PROXY.get(scheme, ()))
        if found is None:
            return None
        (source, value), scheme_optional = found, True
    if cfg.no_proxy is not None:
        no_proxy = NoProxy.parse(cfg.no_proxy, "upstream.no_proxy")
    else:
        listed = _from_env(env, _ENV_NO_PROXY)
        no_proxy = NoProxy.parse(listed[1], listed[0]) if listed else NoProxy()
    url = parse_proxy_url(value, source, scheme_optional=scheme_optional)
    if no_proxy.bypasses(host, port):
        return None
    if cfg.proxy_user is not None:
        # The config's own keys win over credentials in an environment variable's URL.
        password = cfg.proxy_password.get() if cfg.proxy_password is not None else ""
        authorization = basic_credentials(cfg.proxy_user, password)
    elif url.user is not None:
        authorization = basic_credentials(url.user, url.password or "")
    else:
        authorization = None
    return EgressProxy(url.host, url.port, authorization, source)


def check(cfg: UpstreamConfig) -> None:
    """The egress keys of `cfg` on their own (the environment is checked by `choose`)."""
    if cfg.proxy_password is not None and cfg.proxy_user is None:
        raise ConfigError("upstream.proxy_password: set upstream.proxy_user with it")
    if cfg.proxy_user is not None and cfg.proxy_password is None:
        raise ConfigError(
            "upstream.proxy_user: set upstream.proxy_password (or proxy_password_file) with it"
        )
    if cfg.no_proxy is not None:
        NoProxy.parse(cfg.no_proxy, "upstream.no_proxy")
    if cfg.proxy is None:
        return
    if cfg.proxy.strip().lower() in OFF:
        if cfg.proxy_user is not None:
            raise ConfigError(
                "upstream.proxy_user: no egress proxy is used (upstream.proxy is off)"
            )
        return
    url = parse_proxy_url(cfg.proxy, "upstream.proxy")
    if url.user is not None and cfg.proxy_user is not None:
        raise ConfigError(
            "upstream.proxy: credentials in the URL and in upstream.proxy_user; give them once"
        )


def secrets(cfg: UpstreamConfig, env: Mapping[str, str]) -> list[str]:
    """What an egress proxy's credentials could show up as in a log line: each password
    as written in a URL and decoded, and each Basic credential. The environment's are
    included whatever the config says: masking too much is harmless."""
    found: list[str] = []
    if cfg.proxy_user is not None and cfg.proxy_password is not None:
        password = cfg.proxy_password.get()
        found += [password, basic_credentials(cfg.proxy_user, password).split()[1]]
    values = [cfg.proxy] if cfg.proxy is not None else []
    values += [env[name] for names in _ENV_PROXY.values() for name in names if name in env]
    for value in values:
        text = value.strip()
        parts = urlsplit(text if "://" in text else "http://" + text)
        if parts.password is None:
            continue
        password = unquote(parts.password)
        basic = basic_credentials(unquote(parts.username or ""), password)
        found += [parts.password, password, basic.split()[1]]
    return found
