"""Which egress proxy an origin goes through: config keys, environment, NO_PROXY (pure)."""

from __future__ import annotations

import base64
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import ConfigError, Secret, UpstreamConfig, masked, parse
from proxy.egress import NoProxy, choose, secrets
from proxy.service import secrets_of

ENV = {"LUXSCI_API_TOKEN": "tok-123", "LUXSCI_API_SECRET": "s3cr3t-value"}
MINIMAL = """
auth:
  token: ${LUXSCI_API_TOKEN}
  secret: ${LUXSCI_API_SECRET}
"""


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- NO_PROXY -------------------------------------------------------------------------------------

# (NO_PROXY, host, port, bypassed): host names as urllib matches them, plus what urllib
# leaves out and curl and requests do: IP networks, [IPv6]:port, `*.` prefixes.
CASES = [
    ("example.com", "example.com", 443, True),
    ("example.com", "api.example.com", 443, True),
    ("example.com", "API.Example.COM", 443, True),
    ("example.com", "badexample.com", 443, False),
    (".example.com", "api.example.com", 443, True),
    (".example.com", "example.com", 443, True),
    ("example.com:8443", "api.example.com", 8443, True),
    ("example.com:8443", "api.example.com", 443, False),
    ("a.com, b.com  c.com", "x.c.com", 443, True),
    ("a.com,,b.com", "b.com", 443, True),
    ("*", "anything.example", 1, True),
    ("", "example.com", 443, False),
]
EXTRA_CASES = [
    ("*.example.com", "api.example.com", 443, True),
    ("example.com", "api.example.com.", 443, True),  # a fully qualified name
    ("10.0.0.0/8", "10.1.2.3", 443, True),
    ("10.0.0.0/8", "11.1.2.3", 443, False),
    ("10.0.0.0/8", "ten.example", 443, False),  # nothing is resolved
    ("192.168.1.7", "192.168.1.7", 80, True),
    ("192.168.1.7:80", "192.168.1.7", 443, False),
    ("::1", "::1", 443, True),
    ("fd00::/8", "[fd12::1]", 443, True),
    ("[::1]:8443", "::1", 8443, True),
    ("[::1]:8443", "::1", 443, False),
]


@pytest.mark.parametrize(("no_proxy", "host", "port", "bypassed"), CASES)
def test_no_proxy_host_names_match_as_urllib_matches_them(
    no_proxy: str, host: str, port: int, bypassed: bool
) -> None:
    assert NoProxy.parse(no_proxy, "NO_PROXY").bypasses(host, port) is bypassed
    # The reference: urllib's reading of the same list, for a host:port.
    names = no_proxy.replace(" ", ",").replace(",,", ",")
    reference = urllib.request.proxy_bypass_environment(f"{host}:{port}", {"no": names})
    assert bool(reference) is bypassed


@pytest.mark.parametrize(("no_proxy", "host", "port", "bypassed"), EXTRA_CASES)
def test_no_proxy_ip_networks_ports_and_wildcards(
    no_proxy: str, host: str, port: int, bypassed: bool
) -> None:
    assert NoProxy.parse(no_proxy, "NO_PROXY").bypasses(host, port) is bypassed


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "host:port", "[::1]x", "a:b:c:zz", "*."])
def test_an_unreadable_no_proxy_entry_names_the_key(entry: str) -> None:
    with pytest.raises(ConfigError, match=r"^upstream\.no_proxy: "):
        NoProxy.parse(entry, "upstream.no_proxy")


# -- choosing -------------------------------------------------------------------------------------


def up(url: str = "https://rest.luxsci.com", **settings: Any) -> UpstreamConfig:
    return UpstreamConfig(url=url, **settings)


def test_no_config_and_no_environment_means_no_proxy() -> None:
    assert choose(up(), {}) is None
    assert choose(up(), {"HTTP_PROXY": "http://p:1"}) is None  # for http:// origins only


def test_the_environment_by_the_origins_scheme_lower_case_first() -> None:
    env = {"HTTPS_PROXY": "upper:3128", "https_proxy": "http://lower:3128", "http_proxy": "h:1"}
    proxy = choose(up(), env)
    assert proxy is not None and (proxy.where, proxy.source) == ("lower:3128", "https_proxy")
    proxy = choose(up("http://api.local:8080"), env)
    assert proxy is not None and (proxy.where, proxy.source) == ("h:1", "http_proxy")
    # Set but empty, the lower-case one says "none", as urllib reads it.
    assert choose(up(), {"HTTPS_PROXY": "upper:3128", "https_proxy": ""}) is None


def test_a_proxy_without_port_is_port_80_and_ipv6_is_bracketed() -> None:
    proxy = choose(up(proxy="http://corp.example"), {})
    assert proxy is not None and proxy.where == "corp.example:80"
    proxy = choose(up(proxy="http://[fd00::1]:3128/"), {})
    assert proxy is not None and proxy.where == "[fd00::1]:3128"


def test_credentials_from_the_url_or_the_config_keys_which_win_over_the_environments() -> None:
    proxy = choose(up(proxy="http://u%20x:p%40ss@corp:3128"), {})
    assert proxy is not None and proxy.authorization == basic("u x", "p@ss")
    assert "p@ss" not in repr(proxy) and "cEBzcw" not in repr(proxy)
    keys = {"proxy_user": "svc", "proxy_password": Secret("pw")}
    proxy = choose(up(**keys), {"HTTPS_PROXY": "http://env:envpw@corp:3128"})
    assert proxy is not None and proxy.authorization == basic("svc", "pw")
    proxy = choose(up(), {"HTTPS_PROXY": "http://env:envpw@corp:3128"})
    assert proxy is not None and proxy.authorization == basic("env", "envpw")


def test_no_proxy_from_config_replaces_the_environments() -> None:
    env = {"HTTPS_PROXY": "corp:3128", "NO_PROXY": "rest.luxsci.com"}
    assert choose(up(), env) is None
    assert choose(up(no_proxy=""), env) is not None
    assert choose(up(no_proxy="luxsci.com"), {"HTTPS_PROXY": "corp:3128"}) is None
    assert choose(up(proxy="http://corp:3128", no_proxy="*"), {}) is None
    # An explicit config proxy still honours the environment's NO_PROXY, as curl's -x does.
    assert choose(up(proxy="http://corp:3128"), env) is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("socks5://corp:1080", r"must be an http:// proxy URL .*got socks5://"),
        ("https://corp:3128", r".*got https://\); TLS to the API runs inside the tunnel"),
        ("http://corp:99999", r"invalid port"),
        ("http://corp:3128/path", r"give only http://"),
        ("http://:3128", r"no host"),
    ],
)
def test_an_unusable_environment_proxy_is_a_config_error_naming_the_variable(
    value: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=r"^HTTPS_PROXY: " + message):
        parse(MINIMAL, {**ENV, "HTTPS_PROXY": value})
    # Turned off in the config, the environment is not read at all.
    parse(MINIMAL + "upstream: {proxy: ''}\n", {**ENV, "HTTPS_PROXY": value})


def test_the_token_endpoints_environment_proxy_is_checked_too() -> None:
    text = """
upstream: {allow_insecure: true, url: 'https://api.example.com'}
auth: {scheme: oauth2, token_url: 'http://idp.example.com/token', client_id: c,
       client_secret: '${S}'}
"""
    with pytest.raises(ConfigError, match=r"^HTTP_PROXY: must be an http:// proxy URL"):
        parse(text, {"S": "s", "HTTP_PROXY": "socks5://x:1"})


# -- the config keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("upstream", "message"),
    [
        ("{proxy: 'corp:3128'}", r"^upstream\.proxy: must be an http:// proxy URL .*no scheme"),
        ("{proxy: 'http://u:hunter22@corp:3128/x'}", r"^upstream\.proxy: give only"),
        (
            "{proxy: 'http://u:p@corp:3128', proxy_user: v, proxy_password: w}",
            r"^upstream\.proxy: credentials in the URL and in upstream\.proxy_user",
        ),
        ("{proxy: 'http://corp:1', proxy_password: w}", r"^upstream\.proxy_password: set upstream"),
        ("{proxy: 'http://corp:1', proxy_user: v}", r"^upstream\.proxy_user: set upstream"),
        ("{proxy: none, proxy_user: v, proxy_password: w}", r"^upstream\.proxy_user: no egress"),
        ("{no_proxy: '10.0.0.0/40'}", r"^upstream\.no_proxy: '10\.0\.0\.0/40' is neither"),
    ],
)
def test_bad_egress_keys_are_config_errors_naming_the_key(upstream: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse(MINIMAL + f"upstream: {upstream}\n", ENV)
    assert "hunter22" not in str(caught.value)


def test_proxy_password_from_a_file_masked_in_check_and_warned_about_when_literal(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "proxy_password"
    secret.write_text("file-pw-123\n")
    text = MINIMAL + "upstream: {proxy: 'http://corp:3128', proxy_user: svc, "
    cfg = parse(text + f"proxy_password_file: '{secret}'}}\n", ENV)
    assert cfg.upstream.proxy_password == Secret("file-pw-123")
    dump = masked(cfg)["upstream"]
    assert dump["proxy_password"] == "********" and dump["proxy_user"] == "svc"
    assert "file-pw-123" not in yaml.safe_dump(masked(cfg))
    assert cfg.warnings == ()
    literal = parse(text + "proxy_password: lit-pw-123}\n", ENV)
    assert any(w.startswith("upstream.proxy_password: a literal secret") for w in literal.warnings)


def test_a_password_in_the_proxy_url_is_masked_in_check() -> None:
    cfg = parse(MINIMAL + "upstream: {proxy: 'http://svc:url-pw-123@corp:3128'}\n", ENV)
    assert masked(cfg)["upstream"]["proxy"] == "http://svc:********@corp:3128"


def test_every_form_of_the_proxy_credentials_is_a_secret_for_the_logs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://envuser:env%2Fpw-1@corp:3128")
    cfg = parse(
        MINIMAL + "upstream: {proxy_user: svc, proxy_password: '${PW}'}\n",
        {**ENV, "PW": "cfg-pw-1"},
    )
    found = secrets_of(cfg)
    for value in ("cfg-pw-1", "env%2Fpw-1", "env/pw-1"):
        assert value in found
    assert basic("svc", "cfg-pw-1").split()[1] in found
    assert basic("envuser", "env/pw-1").split()[1] in found
    url = up(proxy="http://a:url%40pw@corp:1")
    assert {"url%40pw", "url@pw", basic("a", "url@pw").split()[1]} <= set(secrets(url, {}))
