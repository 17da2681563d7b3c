"""limits.windows: durations, window arithmetic, the plan, and the limiter on a clock the
test moves (so an hour and a day are real ones, and nothing depends on the machine)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from proxy.clock import ServerClock
from proxy.config import ConfigError, LimitsConfig, QueueConfig, WindowConfig, parse_duration
from proxy.errors import BudgetSpent, DailyLimit, QueueTimeout
from proxy.limits import MemoryBackend, RateLimiter, Verdict
from proxy.limits.backend import Backend
from proxy.limits.plan import Window, day_window, for_scope, primary, windows_of
from proxy.limits.windows import Period, spell

G, WF, CF = Verdict.GRANTED, Verdict.WINDOW_FULL, Verdict.CARRY_FULL
HOUR = 3600.0
T0 = 1_000 * 86400.0 + 10 * HOUR + 120.0  # a day's 10th hour, its third minute begun


# -- durations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("1s", 1),
        ("90s", 90),
        ("1m", 60),
        ("1.5h", 5400),
        ("1h", 3600),
        ("1d", 86400),
        ("7d", 604800),
        ("30", 30),  # a plain number (from ${VAR}, a string) is seconds
        (60, 60),
        (2.5, 2.5),
    ],
)
def test_a_duration_is_a_number_and_at_most_one_unit(written: object, seconds: float) -> None:
    assert parse_duration(written, "limits.windows[0].per") == seconds


@pytest.mark.parametrize(
    "written",
    ["1 m", " 1m", "1min", "1h30m", "1M", "1H", "-1s", "+1s", "1e3", ".5m", "", "s", "0s", "0",
     -5, 0, float("inf"), float("nan"), True, None, [1], "1,5s"],
)  # fmt: skip
def test_anything_else_is_an_error_naming_the_key(written: object) -> None:
    with pytest.raises(ConfigError, match=r"^limits\.windows\[2\]\.per: must be"):
        parse_duration(written, "limits.windows[2].per")


# -- window arithmetic -------------------------------------------------------------------


def test_fixed_windows_of_any_length_are_aligned_to_the_epoch() -> None:
    second, hour = Period.of(1), Period.of(HOUR)
    assert (second.guard, hour.guard) == (0.05, 0.5)  # a twentieth, at most half a second
    t = 7200.25
    assert (second.index(t), second.start(7200), second.end(7200)) == (7200, 7200, 7201)
    assert (hour.index(t), hour.start(2), hour.end(2)) == (2, 7200, 10800)
    assert hour.until_next(t) == pytest.approx(3599.75)
    assert hour.index(10800) == 3  # a window's end is the next one's start
    assert hour.guard_start(2) == pytest.approx(10799.5)
    assert hour.guard_start(2, uncertainty=1.2) == pytest.approx(10798.8)
    assert Period.of(3).guard_start(0) == pytest.approx(2.85)


@pytest.mark.parametrize(
    ("seconds", "spelt"),
    [(1, "1s"), (90, "90s"), (60, "1m"), (5400, "90m"), (3600, "1h"), (7200, "2h"),
     (86400, "1d"), (172800, "2d"), (1.5, "1.5s"), (90000, "25h")],
)  # fmt: skip
def test_a_length_is_spelt_in_its_largest_whole_unit(seconds: float, spelt: str) -> None:
    assert spell(seconds) == spelt
    assert parse_duration(spelt, "per") == seconds  # and reads back as itself


# -- the plan ----------------------------------------------------------------------------


def test_the_shorthand_stands_for_three_windows_with_the_names_they_always_had() -> None:
    user, account, day = windows_of(LimitsConfig(user_per_minute=7, window_seconds=2))
    assert (user.name, user.scope, user.limit, user.per, user.carry, user.long) == (
        "user",
        "user",
        7,
        "2s",
        True,
        False,
    )
    assert (account.name, account.scope, account.key) == (
        "account",
        "account",
        "limits.account_per_minute",
    )
    # The day: every request, no reserve at its end, answered at once when spent.
    assert (day.name, day.scope, day.limit, day.per, day.carry, day.long) == (
        "day",
        "all",
        6000,
        "1d",
        False,
        True,
    )


def explicit(
    *windows: tuple[int, float, str],
    user_per_minute: int = 0,
    account_per_minute: int = 0,
    per_day: int = 0,
) -> LimitsConfig:
    """These windows, and only the shorthand ones given (as a file that lists windows)."""
    return LimitsConfig(
        user_per_minute=user_per_minute,
        account_per_minute=account_per_minute,
        per_day=per_day,
        windows=tuple(WindowConfig(n, per, scope) for n, per, scope in windows),
        state_file="",
    )


def test_the_shorthand_windows_given_beside_a_list_hold_too() -> None:
    windows = windows_of(explicit((10, 1, "all"), user_per_minute=30, per_day=500))
    assert [(w.name, w.limit, w.per) for w in windows] == [
        ("user", 30, "1m"),
        ("day", 500, "1d"),
        ("all.1s", 10, "1s"),
    ]
    assert day_window(windows) is windows[1]


def test_listed_windows_are_named_by_scope_and_length_and_sorted_longest_first() -> None:
    windows = windows_of(explicit((10, 1, "all"), (60, 60, "user"), (1000, HOUR, "all")))
    assert [(w.name, w.long, w.carry, w.key) for w in windows] == [
        ("all.1s", False, True, "limits.windows[0]"),
        ("user.1m", False, True, "limits.windows[1]"),
        ("all.1h", True, True, "limits.windows[2]"),
    ]
    user = for_scope(windows, "user")
    assert [w.name for w in user] == ["all.1h", "user.1m", "all.1s"]
    assert [w.name for w in for_scope(windows, "account")] == ["all.1h", "all.1s"]
    # The API's headers describe the scope's own window, else the shortest.
    assert user[primary(user, "user")].name == "user.1m"
    account = for_scope(windows, "account")
    assert account[primary(account, "account")].name == "all.1s"
    assert day_window(windows) is None
    assert day_window(windows_of(explicit((5, 86400, "all")))) is not None


# -- the memory backend --------------------------------------------------------------------


def test_a_permit_is_counted_in_every_window_or_in_none() -> None:
    b = MemoryBackend()
    hour, second = windows_of(explicit((3, HOUR, "all"), (2, 1, "all")))
    pair = (hour, second)
    assert [b.take_now(pair, (2, 7200), (3, 2), (0, 0)) for _ in range(3)] == [
        (G, -1),
        (G, -1),
        (WF, 1),  # the second is full: the hour counted nothing for it
    ]
    assert (b.known_used("all.1h", 2), b.known_used("all.1s", 7200)) == (2, 2)
    assert b.take_now(pair, (2, 7201), (3, 2), (0, 0)) == (G, -1)
    assert b.take_now(pair, (2, 7202), (3, 2), (0, 0)) == (WF, 0)  # now the hour
    assert b.known_used("all.1s", 7202) == 0
    # At a window's end a permit is reserved in the next window, up to the cap; -1: no
    # reserve may be made there, so it waits.
    assert b.take_now(pair, (3, 7203), (3, 2), (0, 1)) == (G, -1)
    assert b.known_used("all.1s", 7204) == 1
    assert b.take_now(pair, (3, 7203), (3, 2), (0, 1)) == (CF, 1)
    assert b.take_now(pair, (3, 7203), (3, 2), (-1, 0)) == (CF, 0)
    assert b.known_used("all.1h", 3) == 1


# -- the limiter, on a clock the test moves -------------------------------------------------


def limiter_at(
    now: list[float],
    limits: LimitsConfig,
    backend: Backend | None = None,
    uncertainty: float = 0.0,
) -> RateLimiter:
    clock = ServerClock(wall=lambda: now[0])
    clock.known, clock.uncertainty = True, uncertainty  # as after a few Date headers
    return RateLimiter(limits, QueueConfig(), backend or MemoryBackend(), clock)


async def at_once(limiter: RateLimiter, scope: str) -> bool:
    """A permit now, or none (a deadline already past never waits in line)."""
    try:
        return await limiter.acquire(scope, time.monotonic() - 1) == 0.0
    except QueueTimeout:
        return False


async def test_a_permit_spends_in_its_scopes_windows_and_all_s_and_a_spent_hour_answers() -> None:
    now = [T0]
    limiter = limiter_at(now, explicit((3, 60, "user"), (5, HOUR, "all")))
    assert [await at_once(limiter, "user") for _ in range(4)] == [True] * 3 + [False]
    assert [await at_once(limiter, "account") for _ in range(2)] == [True] * 2  # the hour: 5
    # The hour is spent: no waiting for it (a queue is for seconds), in either scope.
    for scope in ("account", "user"):
        with pytest.raises(BudgetSpent) as spent:
            await limiter.acquire(scope, time.monotonic() + 30)
        assert spent.value.retry_after == pytest.approx(HOUR - 120)  # to the hour's end
        assert spent.value.headers()["X-Proxy-Error"] == "budget_spent"
        assert "5 API requests per 1h" in spent.value.message
        assert "limits.windows[1]" in spent.value.message
    now[0] = T0 + HOUR - 120  # the next hour
    assert await at_once(limiter, "account")
    assert [w["used"] for w in limiter.status()["windows"]] == [0, 1]


async def test_a_spent_window_of_a_day_is_the_daily_limit() -> None:
    now = [T0]
    limiter = limiter_at(now, explicit((2, 86400, "all"), (100, 60, "all")))
    assert [await at_once(limiter, "user") for _ in range(2)] == [True] * 2
    with pytest.raises(DailyLimit) as spent:
        await limiter.acquire("account", time.monotonic() + 30)
    assert spent.value.retry_after == pytest.approx(14 * HOUR - 120)
    assert limiter.day_used_known() == 2 and limiter.day_limit() == 2


async def test_a_spent_short_window_is_waited_out_in_line() -> None:
    now = [T0]
    limiter = limiter_at(now, explicit((2, 1, "all"), (100, HOUR, "all")))
    assert [await at_once(limiter, "user") for _ in range(2)] == [True] * 2
    waiting = asyncio.create_task(limiter.acquire("user", time.monotonic() + 5))
    await asyncio.sleep(0.1)
    assert not waiting.done() and limiter.queue_depth("user") == 1
    now[0] = T0 + 1  # the next second
    for bucket in limiter.buckets.values():
        bucket.wake.set()
    assert await waiting < 1.0
    await limiter.close()


async def test_each_window_keeps_its_own_reserve_at_its_own_end() -> None:
    now = [T0 + 60 - 0.2]  # the end of a minute, in the middle of the hour
    limiter = limiter_at(now, explicit((100, 60, "all"), (1000, HOUR, "all")))
    # The minute's reserve is a tenth of the next minute; the hour reserves nothing yet.
    assert [await at_once(limiter, "user") for _ in range(11)] == [True] * 10 + [False]
    minute = limiter.backend.known_used
    assert (minute("all.1m", int(T0 // 60)), minute("all.1m", int(T0 // 60) + 1)) == (10, 10)
    assert limiter.backend.known_used("all.1h", int(T0 // HOUR) + 1) == 0
    now[0] = T0 + HOUR - 120 - 0.2  # the end of a minute and of the hour
    assert [await at_once(limiter, "user") for _ in range(11)] == [True] * 10 + [False]
    assert limiter.backend.known_used("all.1h", int(T0 // HOUR) + 1) == 10  # reserved too


async def test_a_window_as_short_as_the_clock_is_unsure_shares_its_budget_with_the_next() -> None:
    # Before answers have shown the server's second ticking closely the clock may trail by
    # a second and a half: a 1 s window is guard from end to end. A tenth of 4 is no
    # reserve, but waiting out the guard would wait for ever: half the budget is reserved
    # in the next window instead, and in the last half second (where the API may count a
    # permit two windows on) nothing goes.
    now = [T0 + 0.2]
    limiter = limiter_at(now, explicit((4, 1, "all")), uncertainty=1.5)
    assert [await at_once(limiter, "user") for _ in range(3)] == [True] * 2 + [False]
    now[0] = T0 + 1.1  # the next second: 4 less the 2 reserved, again half reserved on
    assert [await at_once(limiter, "user") for _ in range(3)] == [True] * 2 + [False]
    now[0] = T0 + 2.6
    assert not await at_once(limiter, "user")
    # Once the clock knows the server's second to within a tenth, the whole budget.
    limiter.clock.uncertainty = 0.1
    now[0] = T0 + 3.0
    assert [await at_once(limiter, "user") for _ in range(5)] == [True] * 4 + [False]


async def test_the_apis_word_corrects_the_window_of_its_length() -> None:
    now = [T0]
    limiter = limiter_at(now, explicit((100, 60, "all"), (1000, HOUR, "all")))
    hour_end = (T0 // HOUR + 1) * HOUR
    await limiter.observe(
        "account",
        {
            "RateLimit": f"limit=900, remaining=10, reset={int(hour_end - T0)}",
            "RateLimit-Policy": "900;w=3600",
        },
    )
    # The hour: 900 by the API's word, 10 left, so 890 are spent whoever spent them.
    assert limiter.backend.known_used("all.1h", int(T0 // HOUR)) == 890
    assert limiter.buckets["account"].held_until == 0.0
    assert [await at_once(limiter, "account") for _ in range(10)] == [True] * 10
    with pytest.raises(BudgetSpent):
        await at_once(limiter, "account")


async def test_a_long_windows_count_survives_a_restart_and_a_short_ones_need_not(
    tmp_path: Path,
) -> None:
    state = str(tmp_path / "limits.json")
    now = [T0]
    limits = explicit((3, 60, "all"), (5, HOUR, "all"))
    first = limiter_at(now, limits, MemoryBackend(state, "k"))
    await first.start()
    assert [await at_once(first, "user") for _ in range(3)] == [True] * 3
    await first.close()
    with open(state) as f:  # noqa: ASYNC230 - a few bytes, in a test
        saved = json.load(f)
    assert saved == {"key": "k", "windows": {"all.1h": [int(T0 // HOUR), 3, 0, 0]}}

    second = limiter_at(now, limits, MemoryBackend(state, "k"))
    await second.start()
    assert second.status()["windows"][1]["used"] == 3  # before its first permit too
    now[0] = T0 + 60  # the next minute: 2 of the hour left
    assert [await at_once(second, "user") for _ in range(2)] == [True] * 2
    with pytest.raises(BudgetSpent):
        await second.acquire("account", time.monotonic() + 30)
    await second.close()
    # Another integration's file is not this one's.
    third = limiter_at(now, limits, MemoryBackend(state, "other"))
    await third.start()
    assert await at_once(third, "user")
    await third.close()


async def test_a_reload_changes_budgets_and_keeps_what_was_counted() -> None:
    now = [T0]
    limiter = limiter_at(now, explicit((3, 60, "user"), (5, HOUR, "all")))
    assert [await at_once(limiter, "user") for _ in range(3)] == [True] * 3
    limiter.reconfigure(explicit((4, 60, "user"), (5, HOUR, "all")), QueueConfig())
    assert limiter.buckets["user"].effective_limit == 4
    assert [await at_once(limiter, "user") for _ in range(2)] == [True, False]


def test_a_window_is_a_value() -> None:
    w = windows_of(explicit((5, HOUR, "all")))[0]
    assert w == Window("all.1h", "all", 5, Period.of(HOUR), True, True, "limits.windows[0]")


async def test_adding_windows_beside_the_shorthand_keeps_the_days_count(tmp_path: Path) -> None:
    state = str(tmp_path / "limits.json")
    now = [T0]
    shorthand = LimitsConfig(per_day=5, state_file=state)
    before = limiter_at(now, shorthand, MemoryBackend(state, "k"))
    await before.start()
    assert [await at_once(before, "user") for _ in range(3)] == [True] * 3
    await before.close()

    # The same day budget beside a list of windows: the day's count goes on.
    after = limiter_at(now, explicit((10, 1, "all"), per_day=5), MemoryBackend(state, "k"))
    await after.start()
    assert after.day_used_known() == 3
    now[0] = T0 + 1
    assert [await at_once(after, "account") for _ in range(2)] == [True] * 2
    with pytest.raises(DailyLimit):
        await after.acquire("account", time.monotonic() + 30)
    await after.close()
    with open(state) as f:  # noqa: ASYNC230 - a few bytes, in a test
        saved = json.load(f)
    # Written as the shorthand always wrote it, so it reads back either way.
    assert (saved["day"], saved["used"]) == (int(T0 // 86400), 5)
    back = limiter_at(now, shorthand, MemoryBackend(state, "k"))
    await back.start()
    assert back.day_used_known() == 5
    await back.close()
