"""limits.windows in the config file: parsed strictly, each error naming its key."""

from __future__ import annotations

import pytest
import yaml

from proxy.config import ConfigError, WindowConfig, masked, parse
from proxy.limits.plan import windows_of

ENV = {"LUXSCI_API_TOKEN": "tok-123", "LUXSCI_API_SECRET": "s3cr3t-value", "KEY": "k" * 20}
LUXSCI = """
auth:
  token: ${LUXSCI_API_TOKEN}
  secret: ${LUXSCI_API_SECRET}
"""
BEARER = """
auth:
  scheme: bearer
  api_key: ${KEY}
"""


def windows(*lines: str, base: str = LUXSCI, extra: str = "") -> str:
    return base + "limits:\n" + extra + "  windows:\n" + "".join(f"    - {x}\n" for x in lines)


def test_windows_are_read_with_their_durations() -> None:
    cfg = parse(
        windows(
            "{requests: 10, per: 1s}",
            "{requests: 100, per: 1m, scope: user}",
            "{requests: 5000, per: 1h, scope: account}",
            "{requests: 20000, per: '${DAY:-86400}', scope: all}",
        ),
        ENV,
    )
    assert cfg.limits.windows == (
        WindowConfig(10, 1.0, "all"),  # scope all when not said
        WindowConfig(100, 60.0, "user"),
        WindowConfig(5000, 3600.0, "account"),
        WindowConfig(20000, 86400.0, "all"),
    )
    # `check` prints them back as keys of the file (per in seconds, which reads back).
    printed = yaml.safe_load(yaml.safe_dump(masked(cfg)))["limits"]["windows"]
    assert printed[2] == {"requests": 5000, "per": 3600.0, "scope": "account"}
    again = parse(LUXSCI + yaml.safe_dump({"limits": {"windows": printed}}), ENV)
    assert again.limits.windows == cfg.limits.windows


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ("{requests: 10, per: 1 min}", r"^limits\.windows\[1\]\.per: must be a duration"),
        ("{requests: 10, per: 1h30m}", r"^limits\.windows\[1\]\.per: must be a duration"),
        ("{requests: 10, per: -1s}", r"^limits\.windows\[1\]\.per: must be a duration"),
        ("{requests: 10, per: 0}", r"^limits\.windows\[1\]\.per: must be a positive"),
        ("{requests: 10, per: yes}", r"^limits\.windows\[1\]\.per: must be a duration"),
        ("{requests: 10, per: 0.5s}", r"^limits\.windows\[1\]\.per: must be at least 1s"),
        ("{requests: 10, per: 400d}", r"^limits\.windows\[1\]\.per: must be at most 366d"),
        ("{requests: 10}", r"^limits\.windows\[1\]\.per: required"),
        ("{per: 1m}", r"^limits\.windows\[1\]\.requests: required"),
        ("{requests: 0, per: 1m}", r"^limits\.windows\[1\]\.requests: required"),
        ("{requests: 1.5, per: 1m}", r"^limits\.windows\[1\]\.requests: must be a whole"),
        ("{requests: 10, per: 1m, scope: users}", r"^limits\.windows\[1\]\.scope: scheme luxsci"),
        ("{requests: 10, per: 1m, size: 3}", r"^limits\.windows\[1\]\.size: unknown key"),
        ("{requests: 10, per: 60, scope: all}", r"^limits\.windows\[1\]: the same scope and per"),
    ],
)
def test_a_bad_window_is_an_error_naming_its_key(entry: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse(windows("{requests: 5, per: 1m}", entry), ENV)


def test_a_scope_must_be_one_the_scheme_has() -> None:
    # LuxSci counts user and account requests apart; a Bearer API has one budget: all.
    assert parse(windows("{requests: 5, per: 1m, scope: account}"), ENV).limits.windows
    parse(windows("{requests: 5, per: 1m, scope: all}", base=BEARER), ENV)
    with pytest.raises(
        ConfigError,
        match=r"^limits\.windows\[0\]\.scope: scheme bearer has the budgets all \(got 'user'\)",
    ):
        parse(windows("{requests: 5, per: 1m, scope: user}", base=BEARER), ENV)


def test_beside_windows_only_the_shorthand_written_holds() -> None:
    # Left out, a shorthand budget is 0: no window (its default would cap, unseen, an API
    # the list describes); written, it adds its window to the list's.
    cfg = parse(windows("{requests: 5, per: 1s}"), ENV)
    assert (cfg.limits.user_per_minute, cfg.limits.account_per_minute, cfg.limits.per_day) == (
        0,
        0,
        0,
    )
    assert [w.name for w in windows_of(cfg.limits)] == ["all.1s"]
    cfg = parse(windows("{requests: 5, per: 1s}", extra="  per_day: 100\n"), ENV)
    assert [(w.name, w.limit) for w in windows_of(cfg.limits)] == [("day", 100), ("all.1s", 5)]
    # Without windows the shorthand is as it was: its defaults, and 0 is no budget at all.
    assert [w.limit for w in windows_of(parse(LUXSCI, ENV).limits)] == [60, 60, 6000]
    with pytest.raises(ConfigError, match=r"^limits\.per_day: must be greater than 0"):
        parse(LUXSCI + "limits: {per_day: 0}\n", ENV)
    with pytest.raises(ConfigError, match=r"^limits\.per_day: must be 0 \(no such window\)"):
        parse(windows("{requests: 5, per: 1s}", extra="  per_day: -1\n"), ENV)


def test_a_window_the_shorthand_already_states_is_an_error_naming_both() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^limits\.windows\[0\]: the same scope and per as limits\.user_per_minute",
    ):
        parse(windows("{requests: 5, per: 1m, scope: user}", extra="  user_per_minute: 9\n"), ENV)
    # Another length is another window.
    assert parse(
        windows("{requests: 5, per: 1h, scope: user}", extra="  user_per_minute: 9\n"), ENV
    )


def test_at_most_sixteen_windows() -> None:
    many = [f"{{requests: 5, per: {n}s}}" for n in range(1, 18)]
    with pytest.raises(ConfigError, match=r"^limits\.windows: at most 16"):
        parse(windows(*many), ENV)


def test_windows_config_keeps_the_other_limits_keys() -> None:
    cfg = parse(
        windows("{requests: 5, per: 1m}", extra="  backend: redis\n  max_inflight: 3\n"), ENV
    )
    assert (cfg.limits.backend, cfg.limits.max_inflight) == ("redis", 3)
