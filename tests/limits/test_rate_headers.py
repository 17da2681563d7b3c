"""The rate-limit header reader: fixed vectors for every dialect, and how the limiter uses it."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.clock import ServerClock
from proxy.config import LimitsConfig, QueueConfig
from proxy.limits import MemoryBackend, RateLimiter
from proxy.limits.headers import RateView, read, reset_time

NOW = 1_700_000_010.0  # server time, 30 s into a minute


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # LuxSci's: the reset is the window's end, epoch seconds.
        (
            {
                "X-RateLimit-Limit": "60",
                "X-RateLimit-Remaining": "7",
                "X-RateLimit-Reset": "1700000040",
            },
            RateView(60, 7, 1_700_000_040.0, None),
        ),
        # The same dialect with the reset as seconds from now (GitLab-style APIs differ).
        (
            {"X-RateLimit-Limit": "100", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "12"},
            RateView(100, 0, NOW + 12, None),
        ),
        # Epoch milliseconds.
        (
            {
                "X-RateLimit-Limit": "5",
                "X-RateLimit-Remaining": "1",
                "X-RateLimit-Reset": "1700000040500",
            },
            RateView(5, 1, 1_700_000_040.5, None),
        ),
        # A limit followed by its policy names the window.
        (
            {
                "X-RateLimit-Limit": "100, 100;w=3600",
                "X-RateLimit-Remaining": "3",
                "X-RateLimit-Reset": "60",
            },
            RateView(100, 3, NOW + 60, 3600.0),
        ),
        # The IETF draft's dictionary form, with its policy.
        (
            {"RateLimit": "limit=100, remaining=50, reset=30", "RateLimit-Policy": "100;w=60"},
            RateView(100, 50, NOW + 30, 60.0),
        ),
        # Several policies: the window of the one whose quota is the limit.
        (
            {
                "RateLimit": "limit=1000, remaining=999, reset=3000",
                "RateLimit-Policy": "10;w=1, 1000;w=3600",
            },
            RateView(1000, 999, NOW + 3000, 3600.0),
        ),
        # No policy: the window is unknown.
        ({"RateLimit": "limit=10, remaining=2, reset=1.5"}, RateView(10, 2, NOW + 1.5, None)),
        # The draft's later, named form: the policy with the fewest left binds.
        (
            {
                "RateLimit": '"burst";r=40;t=20, "daily";r=5;t=5000',
                "RateLimit-Policy": '"burst";q=100;w=60, "daily";q=1000;w=86400',
            },
            RateView(1000, 5, NOW + 5000, 86400.0),
        ),
        # The draft's first revisions: three fields, the reset in seconds.
        (
            {
                "RateLimit-Limit": "10, 10;w=1, 50;w=60",
                "RateLimit-Remaining": "4",
                "RateLimit-Reset": "1",
            },
            RateView(10, 4, NOW + 1, 1.0),
        ),
        (
            {
                "RateLimit-Limit": "50",
                "RateLimit-Remaining": "4",
                "RateLimit-Reset": "9",
                "RateLimit-Policy": "50;w=60",
            },
            RateView(50, 4, NOW + 9, 60.0),
        ),
        # The IETF fields win over X-RateLimit-* on the same answer.
        (
            {
                "RateLimit": "limit=20, remaining=19, reset=5",
                "X-RateLimit-Limit": "60",
                "X-RateLimit-Remaining": "60",
                "X-RateLimit-Reset": "1700000040",
            },
            RateView(20, 19, NOW + 5, None),
        ),
        # Partial and unreadable values: what can be read is kept, the rest is None.
        ({"X-RateLimit-Remaining": "3"}, RateView(None, 3, None, None)),
        (
            {"X-RateLimit-Limit": "-1", "X-RateLimit-Remaining": "x", "X-RateLimit-Reset": "1e999"},
            None,
        ),
        ({"RateLimit": "garbage", "X-RateLimit-Remaining": "2"}, RateView(None, 2, None, None)),
        ({"Content-Type": "application/json"}, None),
    ],
)
def test_every_dialect_reads_to_one_view(
    headers: dict[str, str], expected: RateView | None
) -> None:
    assert read(CIMultiDict(headers), NOW) == expected


def test_a_reset_is_told_apart_by_size() -> None:
    assert reset_time(30, NOW) == NOW + 30
    assert reset_time(86400 * 365 * 30, NOW) == NOW + 86400 * 365 * 30  # 30 years: still a delay
    assert reset_time(1_000_000_000, NOW) == 1_000_000_000  # September 2001: a date
    assert reset_time(1_700_000_040_000, NOW) == 1_700_000_040.0  # milliseconds


def test_the_cap_a_window_can_hold() -> None:
    assert RateView(100, window=3600.0).cap_per(60) == 100  # an hour's quota bounds any minute
    assert RateView(100).cap_per(60) == 100  # unnamed: taken as ours
    assert RateView(10, window=1.0).cap_per(60) == 600  # 10/s: at most 60 seconds' worth
    assert RateView(10, window=45.0).cap_per(60) == 20  # a minute overlaps two such windows


def test_an_oversized_field_is_not_read() -> None:
    assert read(CIMultiDict({"RateLimit": "limit=1, " + "x=1, " * 400}), NOW) is None


class _Clock(ServerClock):
    def __init__(self, now: float) -> None:
        super().__init__(wall=lambda: now)
        self.uncertainty = 0.0


def _limiter(now: float, per_minute: int = 60) -> RateLimiter:
    return RateLimiter(
        LimitsConfig(account_per_minute=per_minute, user_per_minute=per_minute),
        QueueConfig(),
        MemoryBackend(None, "k"),
        _Clock(now),
    )


async def test_the_limiter_learns_a_lower_limit_and_the_count_of_its_own_window() -> None:
    limiter = _limiter(NOW, per_minute=100)
    await limiter.observe(
        "account",
        CIMultiDict(
            {"RateLimit": "limit=10, remaining=4, reset=30", "RateLimit-Policy": "10;w=60"}
        ),
    )
    bucket = limiter.buckets["account"]
    assert (bucket.server_limit, bucket.remaining, bucket.effective_limit) == (10, 4, 10)
    # Six of the ten are spent (by others too): the count says so.
    assert limiter.backend.known_used("account", limiter.windows.index(NOW)) == 6
    assert bucket.held_until == 0.0


async def test_a_spent_window_longer_than_ours_closes_the_scope_until_its_reset() -> None:
    limiter = _limiter(NOW)
    await limiter.observe(
        "account",
        CIMultiDict(
            {
                "X-RateLimit-Limit": "1000, 1000;w=3600",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": "1200",
            }
        ),
    )
    bucket = limiter.buckets["account"]
    assert bucket.held_until == pytest.approx(NOW + 1200)
    assert bucket.server_limit == 1000 and bucket.effective_limit == 60
    # Not counted into our minute: that window is the API's hour, not ours.
    assert limiter.backend.known_used("account", limiter.windows.index(NOW)) == 0


async def test_luxsci_headers_correct_the_count_as_before() -> None:
    limiter = _limiter(NOW)
    end = (limiter.windows.index(NOW) + 1) * 60
    await limiter.observe(
        "user",
        CIMultiDict(
            {"X-RateLimit-Limit": "60", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(end)}
        ),
    )
    assert limiter.backend.known_used("user", limiter.windows.index(NOW)) == 60
    assert limiter.buckets["user"].held_until == 0.0  # the count alone makes permits wait


async def test_a_window_of_our_length_that_resets_elsewhere_is_held_not_counted() -> None:
    # A 60 s window of the API's that renews in 1 s, while ours has 30 s to go.
    limiter = _limiter(NOW)
    await limiter.observe(
        "account",
        CIMultiDict({"RateLimit": "limit=5, remaining=0, reset=1", "RateLimit-Policy": "5;w=60"}),
    )
    assert limiter.backend.known_used("account", limiter.windows.index(NOW)) == 0
    assert limiter.buckets["account"].held_until == pytest.approx(NOW + 1)
