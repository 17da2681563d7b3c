"""The sandbox enforces further windows beside its minute and day, as a stand-in API must
for "no rejection" to mean anything: a request is counted in all, or refused for free."""

from __future__ import annotations

import argparse

import pytest

from proxy.sandbox.cli import add_arguments, config_from_args
from proxy.sandbox.config import SandboxConfig, SandboxWindow
from proxy.sandbox.ratelimit import RateLimiter

T = 7200.0  # the start of an hour, a minute and a second


def limiter(*windows: SandboxWindow) -> RateLimiter:
    return RateLimiter(SandboxConfig(user_per_window=100, account_per_window=100, windows=windows))


def test_every_window_of_a_requests_scope_must_have_room() -> None:
    api = limiter(SandboxWindow(2, 1), SandboxWindow(3, 3600, "user"))
    assert [api.admit("user", T).exceeded for _ in range(3)] == [None, None, "window"]
    refused = api.admit("user", T + 0.5)
    # The answer names the window that refused: none left, renewing at its end.
    assert (refused.limit, refused.remaining, refused.reset) == (2, 0, int(T) + 1)
    assert api.admit("user", T + 1).exceeded is None  # a new second: the hour's third
    refused = api.admit("user", T + 2)
    assert (refused.exceeded, refused.limit, refused.reset) == ("window", 3, int(T) + 3600)
    # Account requests spend the "all" second only; refusals cost nothing anywhere.
    assert [api.admit("account", T + 2).exceeded for _ in range(3)] == [None, None, "window"]
    assert api.admit("user", T + 3600).exceeded is None


def test_an_admitted_request_states_its_own_minute_as_before() -> None:
    api = limiter(SandboxWindow(10, 1))
    decision = api.admit("account", T)
    assert (decision.limit, decision.remaining, decision.reset) == (100, 99, int(T) + 60)


def test_a_fired_fault_that_counts_counts_in_every_window() -> None:
    api = limiter(SandboxWindow(1, 1))
    api.charge("user", T)
    assert api.admit("account", T).exceeded == "window"


def test_the_command_line_takes_windows() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--window", "10/1s", "--window", "500/1h/user"]))
    assert config.windows == (SandboxWindow(10, 1), SandboxWindow(500, 3600, "user"))
    with pytest.raises(SystemExit):
        parser.parse_args(["--window", "10/1 h"])
