"""Named clients (access.clients) and queue.aging: parsing, checks that name the key,
and what admission makes of them (pure: no sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.config import AccessConfig, ClientConfig, ConfigError, Secret, masked, parse
from proxy.errors import BadRequest, Forbidden
from proxy.limits import Lane
from proxy.pipeline.admission import AccessPolicy, priority
from proxy.service import secrets_of

ENV = {
    "LUXSCI_API_TOKEN": "tok-123",
    "LUXSCI_API_SECRET": "s3cr3t-value",
    "APP": "app-token-0123456789",
    "BATCH": "batch-token-0123456789",
}
MINIMAL = """
auth:
  token: ${LUXSCI_API_TOKEN}
  secret: ${LUXSCI_API_SECRET}
"""
CLIENTS = """
access:
  clients:
    - {name: app, token: "${APP}", max_priority: high}
    - {name: batch, token: "${BATCH}", max_priority: low, max_queued: 50}
"""


def test_clients_parse_with_their_lanes_and_shares() -> None:
    cfg = parse(MINIMAL + CLIENTS, ENV)
    app, batch = cfg.access.clients
    assert (app.name, app.max_priority, app.max_queued) == ("app", "high", None)
    assert (batch.name, batch.max_priority, batch.max_queued) == ("batch", "low", 50)
    assert app.token == Secret(ENV["APP"])
    assert cfg.queue.aging == 10  # default


def test_a_client_token_may_come_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "app-token"
    secret.write_text(ENV["APP"] + "\n")
    text = MINIMAL + f"access:\n  clients:\n    - {{name: app, token_file: {secret}}}\n"
    (app,) = parse(text, ENV).access.clients
    assert app.token == Secret(ENV["APP"])
    with pytest.raises(ConfigError, match=r"^access\.clients\[0\]\.token_file: cannot read"):
        parse(text.replace(str(secret), str(tmp_path / "missing")), ENV)


@pytest.mark.parametrize(
    ("access", "message"),
    [
        ("clients: [{token: '${APP}'}]", r"^access\.clients\[0\]\.name: required"),
        ("clients: [{name: 'a b', token: '${APP}'}]", r"^access\.clients\[0\]\.name: required"),
        ("clients: [{name: anonymous, token: '${APP}'}]", r"^access\.clients\[0\]\.name: .*own"),
        ("clients: [{name: proxy, token: '${APP}'}]", r"^access\.clients\[0\]\.name: .*own"),
        (
            "clients: [{name: a, token: '${APP}'}, {name: a, token: '${BATCH}'}]",
            r"^access\.clients\[1\]\.name: 'a' is already",
        ),
        ("clients: [{name: a}]", r"^access\.clients\[0\]\.token: required"),
        ("clients: [{name: a, token: short}]", r"^access\.clients\[0\]\.token: use at least 16"),
        (
            "clients: [{name: a, token: '${APP}'}, {name: b, token: '${APP}'}]",
            r"^access\.clients\[1\]\.token: another client has the same token",
        ),
        (
            "clients: [{name: a, token: '${APP}', max_priority: background}]",
            r"^access\.clients\[0\]\.max_priority: must be one of high, normal, low",
        ),
        (
            "clients: [{name: a, token: '${APP}', max_queued: 0}]",
            r"^access\.clients\[0\]\.max_queued: must be at least 1",
        ),
        ("clients: [{name: a, token: '${APP}', lane: 1}]", r"^access\.clients\[0\]\.lane: unknown"),
        (
            "{client_token: '${APP}', clients: [{name: default, token: '${BATCH}'}]}",
            r"^access\.clients\[0\]\.name: 'default' is already the name of access\.client_token",
        ),
        (
            "{client_token: '${APP}', clients: [{name: a, token: '${APP}'}]}",
            r"^access\.clients\[0\]\.token: another client has the same token",
        ),
    ],
)
def test_bad_clients_name_the_key(access: str, message: str) -> None:
    body = access if access.startswith("{") else "{" + access + "}"
    with pytest.raises(ConfigError, match=message):
        parse(MINIMAL + f"access: {body}\n", ENV)


def test_queue_aging_must_be_positive() -> None:
    assert parse(MINIMAL + "queue: {aging: 2.5}", ENV).queue.aging == 2.5
    with pytest.raises(ConfigError, match=r"^queue\.aging: must be greater than 0"):
        parse(MINIMAL + "queue: {aging: 0}", ENV)


def test_client_tokens_are_masked_warned_about_and_redacted_from_logs() -> None:
    literal = MINIMAL + "access: {clients: [{name: app, token: literal-token-0123456789}]}"
    cfg = parse(literal, ENV)
    assert any(w.startswith("access.clients[0].token: a literal secret") for w in cfg.warnings)
    dumped = yaml.safe_dump(masked(cfg))
    assert "literal-token-0123456789" not in dumped
    assert masked(cfg)["access"]["clients"][0]["token"] == "********"
    assert "literal-token-0123456789" in secrets_of(cfg)
    assert not parse(MINIMAL + CLIENTS, ENV).warnings  # from the environment: no warning


def _policy(*clients: ClientConfig, max_queue: int = 1000) -> AccessPolicy:
    return AccessPolicy(AccessConfig(clients=clients), max_queue)


def test_a_token_names_its_client_and_an_unknown_one_is_refused() -> None:
    policy = _policy(
        ClientConfig(name="app", token=Secret(ENV["APP"]), max_priority="high"),
        ClientConfig(name="batch", token=Secret(ENV["BATCH"]), max_priority="low", max_queued=7),
    )
    app = policy.identify(f"Bearer {ENV['APP']}")
    assert (app.name, app.max_lane, app.max_queued) == ("app", Lane.HIGH, 500)
    batch = policy.identify(f"Bearer {ENV['BATCH']}")
    assert (batch.name, batch.max_lane, batch.max_queued) == ("batch", Lane.LOW, 7)
    for header in (None, "", f"Bearer {ENV['APP']}x", ENV["APP"], f"Basic {ENV['APP']}"):
        with pytest.raises(Forbidden):
            policy.identify(header)
    assert not policy.open_to_anyone


def test_clients_without_max_queued_share_the_queue_equally() -> None:
    clients = [ClientConfig(name=f"c{i}", token=Secret(f"token-{i}-0123456789")) for i in range(3)]
    policy = _policy(*clients, max_queue=100)
    assert [policy.identify(f"Bearer token-{i}-0123456789").max_queued for i in range(3)] == [
        34
    ] * 3


def test_without_named_clients_requests_are_anonymous_or_default_and_may_ask_any_lane() -> None:
    anonymous = AccessPolicy(AccessConfig()).identify(None)
    assert (anonymous.name, anonymous.max_lane, anonymous.max_queued) == (
        "anonymous",
        Lane.HIGH,
        None,
    )
    shorthand = AccessPolicy(AccessConfig(client_token=Secret(ENV["APP"])))
    default = shorthand.identify(f"Bearer {ENV['APP']}")
    assert (default.name, default.max_lane, default.max_queued) == ("default", Lane.HIGH, 1000)
    with pytest.raises(Forbidden):
        shorthand.identify(None)


def test_the_client_token_beside_named_clients_is_one_more_client_capped_at_normal() -> None:
    cfg = parse(
        MINIMAL + "access: {client_token: '${APP}', clients: [{name: b, token: '${BATCH}'}]}", ENV
    )
    policy = AccessPolicy(cfg.access, 1000)
    default = policy.identify(f"Bearer {ENV['APP']}")
    assert (default.name, default.max_lane, default.max_queued) == ("default", Lane.NORMAL, 500)
    named = policy.identify(f"Bearer {ENV['BATCH']}")
    assert (named.name, named.max_lane, named.max_queued) == ("b", Lane.NORMAL, 500)


def test_the_priority_header_names_a_lane_or_is_refused() -> None:
    assert priority(None) is Lane.NORMAL
    assert [priority(v) for v in ("high", "normal", "LOW", " low ")] == [
        Lane.HIGH,
        Lane.NORMAL,
        Lane.LOW,
        Lane.LOW,
    ]
    for value in ("background", "urgent", "", "1"):
        with pytest.raises(BadRequest, match="X-Proxy-Priority must be high, normal or low"):
            priority(value)
