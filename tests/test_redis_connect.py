"""Redis URLs (proxy/redis_connect.py): every form parsed, every mistake named, every
password kept out of messages, logs and `check`."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, mask_url_password, parse
from proxy.redis_connect import RedisTarget, RedisURLError, connect, parse_url, redact_url
from proxy.service import secrets_of
from tests.test_config import ENV, MINIMAL

PASSWORD = "s3cr%40t-pw"  # percent-encoded "s3cr@t-pw"
SENTINEL_PASSWORD = "sentinel-pw-77"


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("redis://127.0.0.1", RedisTarget("single", (("127.0.0.1", 6379),))),
        ("redis://redis.internal:6380/3", RedisTarget("single", (("redis.internal", 6380),), db=3)),
        ("redis://h/", RedisTarget("single", (("h", 6379),))),
        (
            f"redis://app:{PASSWORD}@h:6379/0",
            RedisTarget("single", (("h", 6379),), username="app", password="s3cr@t-pw"),
        ),
        ("redis://:pw@h", RedisTarget("single", (("h", 6379),), password="pw")),
        ("redis://h?db=2&password=pw", RedisTarget("single", (("h", 6379),), db=2, password="pw")),
        # ?password= wins over the authority's, as redis-py has it.
        (
            "redis://u:a@h?password=b",
            RedisTarget("single", (("h", 6379),), username="u", password="b"),
        ),
        ("redis://[::1]:7000/1", RedisTarget("single", (("::1", 7000),), db=1)),
        ("rediss://h:6380", RedisTarget("single", (("h", 6380),), tls=True)),
        (
            "rediss://h?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=Optional",
            RedisTarget(
                "single",
                (("h", 6379),),
                tls=True,
                ssl_ca_certs="/etc/ca.pem",
                ssl_cert_reqs="optional",
            ),
        ),
        ("unix:///run/redis.sock", RedisTarget("single", (), path="/run/redis.sock")),
        (
            "unix:///run/redis.sock?db=4&password=pw",
            RedisTarget("single", (), path="/run/redis.sock", db=4, password="pw"),
        ),
        (
            "redis+sentinel://s1,s2:26380,[::1]/mymaster",
            RedisTarget(
                "sentinel", (("s1", 26379), ("s2", 26380), ("::1", 26379)), service="mymaster"
            ),
        ),
        (
            f"redis+sentinel://app:{PASSWORD}@s1:26379,s2:26379/cache/2"
            f"?sentinel_password={SENTINEL_PASSWORD}&sentinel_username=watch",
            RedisTarget(
                "sentinel",
                (("s1", 26379), ("s2", 26379)),
                service="cache",
                db=2,
                username="app",
                password="s3cr@t-pw",
                sentinel_username="watch",
                sentinel_password=SENTINEL_PASSWORD,
            ),
        ),
        (
            "rediss+sentinel://s1/mymaster/",
            RedisTarget("sentinel", (("s1", 26379),), service="mymaster", tls=True),
        ),
        (
            "redis+cluster://n1:7000,n2:7001,n3",
            RedisTarget("cluster", (("n1", 7000), ("n2", 7001), ("n3", 6379))),
        ),
        (
            "rediss+cluster://:pw@n1:7000/0",
            RedisTarget("cluster", (("n1", 7000),), password="pw", tls=True),
        ),
        ("REDIS://H:1", RedisTarget("single", (("H", 1),))),
    ],
)
def test_every_url_form_is_read_into_its_target(url: str, target: RedisTarget) -> None:
    assert parse_url(url) == target


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://h", r"must start with redis://.* \(got http://\)"),
        ("h:6379", r"must start with redis://"),
        ("redis://", r"no host"),
        ("redis://h:0", r"host 'h:0': the port must be 1 to 65535"),
        ("redis://h:65536", r"the port must be 1 to 65535"),
        ("redis://h:abc", r"host 'h:abc': the port"),
        ("redis://h:", r"the port must be"),
        ("redis://[::1", r"not a URL"),
        ("redis://[::1]x", r"an IPv6 address is written \[::1\]:6379"),
        ("redis://h1,h2", r"takes one host; several are redis\+sentinel:// or redis\+cluster://"),
        ("redis://h1,,h2", r"an empty host"),
        ("redis://h/zero", r"the database \(path\) is a number \(got 'zero'\)"),
        ("redis://h/0/1", r"the path is the database number alone"),
        ("redis://h/1?db=2", r"the database is given twice"),
        ("redis://h?db=x", r"the database \(\?db=\) is a number"),
        ("redis://h#frag", r"fragment"),
        ("redis://h?socket_timeout=1", r"unknown query parameter socket_timeout \(known: db, "),
        ("redis://h?db=1&db=2", r"query parameter db is given twice"),
        ("redis://h?sentinel_password=x", r"need redis\+sentinel://"),
        ("redis://h?ssl_ca_certs=/ca.pem", r"need TLS: use rediss://"),
        ("redis+cluster://h?ssl_cert_reqs=none", r"need TLS: use rediss\+cluster://"),
        ("rediss://h?ssl_cert_reqs=maybe", r"ssl_cert_reqs: one of required, optional, none"),
        ("unix://host/run/redis.sock", r"unix:// takes a path, no host"),
        ("unix://", r"needs the socket's absolute path"),
        ("redis+sentinel://s1,s2", r"name the master's service after the sentinels"),
        ("redis+sentinel://s1/", r"name the master's service"),
        ("redis+sentinel://s1/m/0/1", r"the service, then the database number"),
        ("redis+cluster://n1,n2/1", r"database 0 only"),
        ("redis+cluster://n1?db=3", r"database 0 only"),
    ],
)
def test_each_mistake_is_named(url: str, message: str) -> None:
    with pytest.raises(RedisURLError, match=message):
        parse_url(url)


@pytest.mark.parametrize(
    "url",
    [
        f"ftp://app:{PASSWORD}@h",
        f"redis://app:{PASSWORD}@h1,h2",
        f"redis://app:{PASSWORD}@h:99999",
        f"redis+sentinel://:{PASSWORD}@s1?sentinel_password={SENTINEL_PASSWORD}",
        f"redis+cluster://:{PASSWORD}@n1/4?password={PASSWORD}",
        f"redis://h?pwd={PASSWORD}",
    ],
)
def test_no_error_shows_a_password(url: str) -> None:
    with pytest.raises(RedisURLError) as caught:
        parse_url(url)
    for secret in (PASSWORD, "s3cr@t-pw", SENTINEL_PASSWORD):
        assert secret not in str(caught.value)


def test_a_target_repr_shows_no_password() -> None:
    target = parse_url(f"redis+sentinel://u:{PASSWORD}@s1/m?sentinel_password={SENTINEL_PASSWORD}")
    assert "s3cr@t-pw" not in repr(target) and SENTINEL_PASSWORD not in repr(target)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://u:p%40ss@h:6379/0", "redis://u:***@h:6379/0"),
        ("redis://:pw@h/1", "redis://:***@h/1"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("redis://u@h/0", "redis://u@h/0"),
        ("unix:///run/r.sock?db=1&password=pw", "unix:///run/r.sock?db=1&password=***"),
        (
            "redis+sentinel://u:pw@s1:26379,s2/m/0?sentinel_password=sp&sentinel_username=w",
            "redis+sentinel://u:***@s1:26379,s2/m/0?sentinel_password=***&sentinel_username=w",
        ),
        ("rediss+cluster://:pw@n1,n2?password=pw", "rediss+cluster://:***@n1,n2?password=***"),
        ("redis://u:p@w@h", "redis://u:***@h"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url_masks_every_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


SENTINEL_URL = (
    f"redis+sentinel://app:{PASSWORD}@s1:26379,s2:26379/mymaster/0"
    f"?sentinel_password={SENTINEL_PASSWORD}"
)


def test_secrets_of_collects_the_master_and_the_sentinel_passwords() -> None:
    cfg = parse(MINIMAL + f"limits: {{backend: redis, redis_url: '{SENTINEL_URL}'}}", ENV)
    found = secrets_of(cfg)
    assert {PASSWORD, "s3cr@t-pw", SENTINEL_PASSWORD} <= set(found)
    cfg = parse(
        MINIMAL + f"limits: {{backend: redis, redis_url: 'rediss+cluster://:{PASSWORD}@n1,n2'}}",
        ENV,
    )
    assert {PASSWORD, "s3cr@t-pw"} <= set(secrets_of(cfg))


def test_check_masks_the_sentinel_password() -> None:
    assert mask_url_password(SENTINEL_URL) == (
        "redis+sentinel://app:********@s1:26379,s2:26379/mymaster/0?sentinel_password=********"
    )


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:6379/0",
        "unix:///run/redis.sock",
        "rediss://h",
        "redis+sentinel://s1,s2,s3/mymaster/1",
        "rediss+cluster://n1,n2",
    ],
)
def test_config_takes_every_form(url: str) -> None:
    cfg = parse(MINIMAL + f"limits: {{backend: redis, redis_url: '{url}'}}", ENV)
    assert cfg.limits.redis_url == url


def test_a_config_error_names_the_key_and_the_problem_without_the_password() -> None:
    url = f"redis+sentinel://app:{PASSWORD}@s1,s2?sentinel_password={SENTINEL_PASSWORD}"
    with pytest.raises(ConfigError) as caught:
        parse(MINIMAL + f"limits: {{backend: redis, redis_url: '{url}'}}", ENV)
    message = str(caught.value)
    assert message.startswith("limits.redis_url: name the master's service after the sentinels")
    assert "app:********@s1,s2" in message
    assert PASSWORD not in message and SENTINEL_PASSWORD not in message


async def test_connect_makes_the_client_for_each_kind() -> None:
    """Nothing connects before the first command, so no server is needed to look."""
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    single = connect("redis://u:pw@h:6380/2", op_timeout=0.25)
    kwargs = single.connection_pool.connection_kwargs
    assert isinstance(single, Redis)
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("h", 6380, 2)
    assert (kwargs["username"], kwargs["password"]) == ("u", "pw")
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.25
    await single.aclose()

    sock = connect("unix:///run/r.sock?db=1", op_timeout=1, health_check_interval=30)
    kwargs = sock.connection_pool.connection_kwargs
    assert (kwargs["path"], kwargs["db"], kwargs["health_check_interval"]) == (
        "/run/r.sock",
        1,
        30,
    )
    await sock.aclose()

    master = connect(
        f"rediss+sentinel://u:pw@s1:1,s2:2/cache/3?sentinel_password={SENTINEL_PASSWORD}",
        op_timeout=0.5,
    )
    assert isinstance(master, Redis)
    pool = master.connection_pool
    assert pool.service_name == "cache"
    assert pool.connection_kwargs["db"] == 3
    assert pool.connection_kwargs["password"] == "pw"
    assert "SSL" in pool.connection_class.__name__
    sentinels = pool.sentinel_manager.sentinels
    assert [
        (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
        for s in sentinels
    ] == [("s1", 1), ("s2", 2)]
    assert {s.connection_pool.connection_kwargs["password"] for s in sentinels} == {
        SENTINEL_PASSWORD
    }
    await master.aclose()

    cluster = connect("redis+cluster://:pw@n1:7000,n2:7001", op_timeout=0.5)
    assert isinstance(cluster, RedisCluster)
    assert sorted(cluster.nodes_manager.startup_nodes) == ["n1:7000", "n2:7001"]
    assert cluster.nodes_manager.connection_kwargs["password"] == "pw"
    await cluster.aclose()


def test_secrets_of_collects_the_jobs_store_passwords() -> None:
    cfg = parse(
        MINIMAL + f"jobs: {{enabled: true, encrypt: false, store: '{SENTINEL_URL}'}}",
        ENV,
    )
    assert {PASSWORD, "s3cr@t-pw", SENTINEL_PASSWORD} <= set(secrets_of(cfg))


def test_secrets_of_collects_the_oauth_state_store_passwords() -> None:
    key = "A" * 43 + "="
    cfg = parse(
        """
upstream: {url: "https://api.example.com"}
auth:
  scheme: oauth2
  token_url: https://auth.example.com/token
  client_id: app
  client_secret: client-secret-value
"""
        + f"  state_store: '{SENTINEL_URL}'\n  state_key: '{key}'\n",
        ENV,
    )
    assert {PASSWORD, "s3cr@t-pw", SENTINEL_PASSWORD} <= set(secrets_of(cfg))
