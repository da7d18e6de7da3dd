"""The release-CPU throttle sleeps its milliseconds per MB, in slices, and 0 means none."""

from __future__ import annotations

import time

from hamal_workers.engine.throttle import MB, Throttle


def test_zero_never_sleeps() -> None:
    throttle = Throttle(0)
    started = time.monotonic()
    for _ in range(1000):
        throttle.after_read(4 * MB)
    assert time.monotonic() - started < 0.05


def test_sleeps_at_least_ms_per_mb() -> None:
    throttle = Throttle(10)  # 10 ms per MB: 20 MB read -> at least 0.2 s released
    started = time.monotonic()
    for _ in range(5):
        throttle.after_read(4 * MB)
    assert time.monotonic() - started >= 0.2


def test_small_reads_accumulate_until_worth_a_sleep() -> None:
    throttle = Throttle(1)
    throttle.after_read(MB)  # 1 ms owed: below the 10 ms slice, no sleep yet
    assert throttle._owed_s > 0
    for _ in range(9):
        throttle.after_read(MB)
    assert throttle._owed_s == 0.0
