"""The retention policy: which points restic's and borg's rules keep, in UTC, and why.

Each table lists every point of a VM (its UTC creation time) with the reasons it is kept for;
a point listed with no reason is deleted.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hamal_workers.config import RetentionSection, defaults
from hamal_workers.retention import (
    RetentionPolicy,
    Verdict,
    apply_policy,
    duration_seconds,
    duration_text,
)

DAY = 86400
Reasons = tuple[str, ...]


@pytest.fixture(autouse=True)
def local_time_is_not_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # UTC+5:45: a bucket taken in local time lands in another hour, and near midnight in
    # another day, week or month, so every table below would catch it.
    monkeypatch.setenv("TZ", "HAM-05:45")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def point_id(created: float, suffix: str = "1a2b3c") -> str:
    """An id as a sync makes it: its UTC time, then a random part."""
    return f"{datetime.fromtimestamp(created, UTC):%Y%m%dT%H%M%SZ}-{suffix}"


def policy(**counts: float) -> RetentionPolicy:
    """A policy with only the rules given: every other count 0."""
    off = RetentionPolicy(keep_last=0, keep_hourly=0, keep_daily=0, keep_weekly=0, keep_monthly=0)
    return dataclasses.replace(off, **counts)


def reasons_by_time(
    times: list[str], rules: RetentionPolicy, protected: Mapping[str, str] | None = None
) -> dict[str, Reasons]:
    """{creation time as given: reasons} for points created at `times` (given newest first)."""
    points = [(point_id(utc(text)), utc(text)) for text in times]
    verdicts = apply_policy(points, rules, protected)
    by_id = {point_id(utc(text)): text for text in times}
    return {by_id[verdict.point_id]: verdict.reasons for verdict in verdicts}


# --- the rules, one table each -----------------------------------------------------------------


def test_days_without_a_point_do_not_use_up_keep_daily() -> None:
    table = {
        "2026-11-25T10:00:00": ("newest", "daily 2026-11-25"),
        "2026-11-23T10:00:00": ("daily 2026-11-23",),  # nothing on the 24th
        "2026-11-20T10:00:00": ("daily 2026-11-20",),  # nothing on the 21st and 22nd
        "2026-11-19T10:00:00": (),
    }
    assert reasons_by_time(list(table), policy(keep_daily=3)) == table


def test_the_newest_point_of_each_day_is_the_one_kept() -> None:
    table = {
        "2026-11-25T02:00:00": ("newest", "daily 2026-11-25"),
        "2026-11-25T01:00:00": (),
        "2026-11-24T20:00:00": ("daily 2026-11-24",),
        "2026-11-24T12:00:00": (),
        "2026-11-24T08:00:00": (),
    }
    assert reasons_by_time(list(table), policy(keep_daily=2)) == table


def test_the_two_sides_of_midnight_utc_are_two_days() -> None:
    table = {
        "2026-11-25T00:00:00": ("newest", "daily 2026-11-25"),
        "2026-11-24T23:59:59": ("daily 2026-11-24",),
        "2026-11-24T12:00:00": (),
    }
    assert reasons_by_time(list(table), policy(keep_daily=2)) == table


def test_keep_hourly_buckets_by_utc_hour_and_skips_hours_without_a_point() -> None:
    table = {
        "2026-11-25T17:30:00": ("newest", "hourly 2026-11-25T17"),
        "2026-11-25T15:00:00": ("hourly 2026-11-25T15",),  # nothing at 16
        "2026-11-25T14:59:59": ("hourly 2026-11-25T14",),
        "2026-11-25T14:00:00": (),
        "2026-11-25T13:10:00": (),
    }
    assert reasons_by_time(list(table), policy(keep_hourly=3)) == table


def test_an_iso_week_runs_from_monday_to_sunday() -> None:
    table = {
        "2026-11-30T00:00:00": ("newest", "weekly 2026-W49"),  # Monday
        "2026-11-29T23:59:59": ("weekly 2026-W48",),  # Sunday
        "2026-11-28T12:00:00": (),  # Saturday, the same week
        "2026-11-20T12:00:00": (),
    }
    assert reasons_by_time(list(table), policy(keep_weekly=2)) == table


def test_an_iso_week_spans_new_year_under_the_iso_year() -> None:
    # 2026-12-28 to 2027-01-03 is 2026-W53: in the calendar year, 2027-01-01 is in 2027.
    table = {
        "2027-01-04T00:00:00": ("newest", "weekly 2027-W01"),  # Monday
        "2027-01-03T23:59:59": ("weekly 2026-W53",),  # Sunday
        "2027-01-01T00:00:00": (),
        "2026-12-31T23:59:59": (),
        "2026-12-28T00:00:00": (),
        "2026-12-27T23:59:59": ("weekly 2026-W52",),
        "2026-12-20T12:00:00": (),
    }
    assert reasons_by_time(list(table), policy(keep_weekly=3)) == table


def test_the_iso_year_also_runs_ahead_of_the_calendar_year() -> None:
    # Monday 2024-12-30 begins 2025-W01.
    table = {
        "2025-01-01T12:00:00": ("newest", "weekly 2025-W01"),
        "2024-12-30T00:00:00": (),
        "2024-12-29T23:59:59": ("weekly 2024-W52",),
    }
    assert reasons_by_time(list(table), policy(keep_weekly=2)) == table


def test_keep_monthly_buckets_by_utc_month() -> None:
    table = {
        "2026-12-01T00:00:00": ("newest", "monthly 2026-12"),
        "2026-11-30T23:59:59": ("monthly 2026-11",),
        "2026-11-01T00:00:00": (),
        "2026-10-31T23:59:59": ("monthly 2026-10",),
        "2026-08-15T12:00:00": (),  # September had no point: August is not reached
    }
    assert reasons_by_time(list(table), policy(keep_monthly=3)) == table


def test_keep_last_keeps_the_newest_points() -> None:
    table = {
        "2026-11-25T18:00:00": ("newest", "last"),
        "2026-11-25T17:00:00": ("last",),
        "2026-11-25T16:00:00": ("last",),
        "2026-11-25T15:00:00": (),
    }
    assert reasons_by_time(list(table), policy(keep_last=3)) == table


def test_keep_within_counts_back_from_the_newest_point_not_from_now() -> None:
    # Years before any clock this test runs by: every point would be expired by the clock.
    table = {
        "2020-03-10T12:00:00": ("newest", "within 2d"),
        "2020-03-09T12:00:00": ("within 2d",),
        "2020-03-08T12:00:00": ("within 2d",),  # exactly 2 days before the newest
        "2020-03-08T11:59:59": (),
        "2020-03-01T12:00:00": (),
    }
    assert reasons_by_time(list(table), policy(keep_within_s=2 * DAY)) == table


def test_protected_points_are_kept_with_their_reason() -> None:
    old, newest = utc("2026-11-01T10:00:00"), utc("2026-11-25T10:00:00")
    points = [(point_id(old), old), (point_id(newest), newest)]
    protected = {
        point_id(old): "base of a running sync",
        point_id(newest): "base of run 20261125T180344Z-9f9f9f",
        "20250101T000000Z-gone00": "base of a point already deleted",
    }
    assert apply_policy(points, policy(keep_last=1), protected) == [
        Verdict(point_id(old), old, True, ("base of a running sync",)),
        Verdict(
            point_id(newest),
            newest,
            True,
            ("newest", "last", "base of run 20261125T180344Z-9f9f9f"),
        ),
    ]


def test_the_newest_point_is_kept_when_every_rule_is_off() -> None:
    table = {
        "2026-11-25T10:00:00": ("newest",),
        "2026-11-25T09:00:00": (),
    }
    assert reasons_by_time(list(table), policy()) == table


def test_every_reason_a_point_is_kept_for_is_reported() -> None:
    rules = RetentionPolicy(
        keep_last=2, keep_hourly=2, keep_daily=2, keep_weekly=2, keep_monthly=2, keep_within_s=60
    )
    newest = "2026-11-25T14:00:30"
    protected = {point_id(utc(newest)): "base of a running sync"}
    assert reasons_by_time([newest, "2026-11-25T14:00:00"], rules, protected) == {
        newest: (
            "newest",
            "last",
            "hourly 2026-11-25T14",
            "daily 2026-11-25",
            "weekly 2026-W48",
            "monthly 2026-11",
            "within 1m",
            "base of a running sync",
        ),
        "2026-11-25T14:00:00": ("last", "within 1m"),
    }


def test_points_of_the_same_second_are_ordered_by_id() -> None:
    created = utc("2026-11-25T18:03:44")
    points = [(point_id(created, "bbbbbb"), created), (point_id(created, "aaaaaa"), created)]
    verdicts = apply_policy(points, policy(keep_last=1))
    assert [(v.point_id, v.reasons) for v in verdicts] == [
        (point_id(created, "aaaaaa"), ()),
        (point_id(created, "bbbbbb"), ("newest", "last")),
    ]


def test_no_points_no_verdicts() -> None:
    assert apply_policy([], RetentionPolicy()) == []


def test_two_points_with_one_id_are_refused() -> None:
    with pytest.raises(ValueError, match="same id"):
        apply_policy([("p", 1.0), ("p", 2.0)], RetentionPolicy())


# --- the policy itself ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "text"),
    [
        (RetentionPolicy(), "last 24, 7 daily, 4 weekly"),
        (policy(keep_last=3, keep_within_s=2 * DAY), "last 3, within 2d"),
        (
            RetentionPolicy(1, 2, 3, 4, 5, keep_within_s=5400),
            "last 1, 2 hourly, 3 daily, 4 weekly, 5 monthly, within 90m",
        ),
        (policy(keep_monthly=12), "12 monthly"),
        (policy(), "newest only"),
    ],
)
def test_describe(rules: RetentionPolicy, text: str) -> None:
    assert rules.describe() == text


def test_keeps_nothing_only_when_every_rule_is_off() -> None:
    assert policy().keeps_nothing()
    names = [field.name for field in dataclasses.fields(RetentionPolicy)]
    for name in names:
        assert not dataclasses.replace(policy(), **{name: 1}).keeps_nothing(), name


@pytest.mark.parametrize("name", ["keep_last", "keep_hourly", "keep_within_s"])
def test_a_negative_rule_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        policy(**{name: -1})


def test_from_settings() -> None:
    section = RetentionSection(
        keep_last=1, keep_hourly=2, keep_daily=3, keep_weekly=4, keep_monthly=5, keep_within="12h"
    )
    assert RetentionPolicy.from_settings(section) == RetentionPolicy(1, 2, 3, 4, 5, 43200.0)
    # The policy's own defaults are those of hamal.conf.
    assert RetentionPolicy.from_settings(defaults().retention) == RetentionPolicy()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0),
        ("90", 90),
        ("90s", 90),
        ("30m", 1800),
        ("12h", 43200),
        ("7d", 7 * DAY),
        ("2w", 14 * DAY),
        ("1.5h", 5400),
        ("0.25", 0.25),
    ],
)
def test_duration_seconds(text: str, seconds: float) -> None:
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "d", "7D", "7M", "1y", "7 d", " 7d", "-1", "+1", "1e3", "1.", ".5h", "7dd", "1h30m"],
)
def test_duration_seconds_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        duration_seconds(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(90, "90s"), (5400, "90m"), (43200, "12h"), (3 * DAY, "3d"), (14 * DAY, "2w"), (0.5, "0.5s")],
)
def test_duration_text_uses_the_largest_unit_that_divides(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text


@given(st.integers(1, 10**12).map(lambda quarters: quarters / 4))
def test_duration_text_reads_back(seconds: float) -> None:
    assert duration_seconds(duration_text(seconds)) == seconds


# --- properties --------------------------------------------------------------------------------

# Two years from 2026, with ties and points minutes apart as often as months apart.
START = int(utc("2026-01-01T00:00:00"))
CREATED = st.one_of(
    st.integers(START, START + 2 * 365 * DAY),
    st.integers(START, START + 3 * DAY),
    st.sampled_from([START, START + 1, START + 3600]),
)
POINTS = st.lists(
    st.tuples(CREATED, st.text("0123456789abcdef", min_size=2, max_size=2)).map(
        lambda drawn: (point_id(drawn[0], drawn[1]), float(drawn[0]))
    ),
    max_size=40,
    unique_by=lambda point: point[0],
)
COUNT = st.one_of(st.just(0), st.integers(0, 6))
EVERY_RULE = st.builds(
    RetentionPolicy,
    keep_last=COUNT,
    keep_hourly=COUNT,
    keep_daily=COUNT,
    keep_weekly=COUNT,
    keep_monthly=COUNT,
    keep_within_s=st.one_of(st.just(0.0), st.floats(0, 400 * DAY)),
)
RULE_NAMES = [field.name for field in dataclasses.fields(RetentionPolicy)]
ONE_RULE = st.builds(
    lambda name, count: policy(**{name: count}), st.sampled_from(RULE_NAMES), COUNT
)
# One rule alone as often as all of them, and each rule often off: what one rule keeps is
# then not hidden by what the others keep.
POLICIES = st.one_of(ONE_RULE, EVERY_RULE)


def kept(verdicts: list[Verdict]) -> set[str]:
    return {verdict.point_id for verdict in verdicts if verdict.keep}


def newest_first(points: list[tuple[str, float]]) -> list[tuple[str, float]]:
    return sorted(points, key=lambda point: (point[1], point[0]), reverse=True)


@given(POINTS.filter(bool), POLICIES)
def test_the_newest_point_is_always_kept(
    points: list[tuple[str, float]], rules: RetentionPolicy
) -> None:
    newest_id = newest_first(points)[0][0]
    (verdict,) = [v for v in apply_policy(points, rules) if v.point_id == newest_id]
    assert verdict.keep and verdict.reasons[0] == "newest"


@given(POINTS, POLICIES)
def test_keep_last_keeps_at_least_the_newest_n(
    points: list[tuple[str, float]], rules: RetentionPolicy
) -> None:
    verdicts = apply_policy(points, rules)
    newest = {point_id for point_id, _ in newest_first(points)[: rules.keep_last]}
    assert newest <= kept(verdicts)
    assert len(kept(verdicts)) >= min(rules.keep_last, len(points))


@given(st.data(), POINTS, POLICIES)
def test_the_order_of_the_points_given_does_not_matter(
    data: st.DataObject, points: list[tuple[str, float]], rules: RetentionPolicy
) -> None:
    shuffled = data.draw(st.permutations(points))
    assert apply_policy(shuffled, rules) == apply_policy(points, rules)


# A point lost by growing a rule needs the other rules not to keep it too: rarer, so more tries.
@settings(max_examples=500)
@given(POINTS, POLICIES, st.sampled_from(RULE_NAMES), st.integers(1, 5))
def test_a_larger_rule_never_deletes_a_point_kept_before(
    points: list[tuple[str, float]], rules: RetentionPolicy, name: str, more: int
) -> None:
    larger = dataclasses.replace(rules, **{name: getattr(rules, name) + more})
    assert kept(apply_policy(points, rules)) <= kept(apply_policy(points, larger))


@given(POINTS, POLICIES, st.data())
def test_a_point_is_kept_exactly_when_it_has_a_reason(
    points: list[tuple[str, float]], rules: RetentionPolicy, data: st.DataObject
) -> None:
    chosen = data.draw(st.lists(st.sampled_from(points), max_size=3)) if points else []
    protected = {point_id: f"base of run {point_id}" for point_id, _ in chosen}
    for verdict in apply_policy(points, rules, protected):
        assert verdict.keep == bool(verdict.reasons)
        assert len(set(verdict.reasons)) == len(verdict.reasons)
        if verdict.point_id in protected:
            assert protected[verdict.point_id] in verdict.reasons


@given(POINTS, POLICIES)
def test_verdicts_cover_every_point_once_oldest_first(
    points: list[tuple[str, float]], rules: RetentionPolicy
) -> None:
    verdicts = apply_policy(points, rules)
    assert [(v.point_id, v.created) for v in verdicts] == newest_first(points)[::-1]
