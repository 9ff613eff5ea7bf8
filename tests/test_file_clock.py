"""A job directory's file clock: backs off while nothing happens, looks often when a result is expected (#15).

The hand-over from an upstream to its downstream starts when the daemon notices the upstream's last result.
A clock that only doubles its interval while a job starts notices a short task's end up to a backed-off
interval late; :meth:`FileClock.expect` makes it look at the moment an element should end (from its
task's measured durations, or at once) and often for a few checks, without more looking in the steady
state (a job waiting in a queue, or a long element between its start and its expected end).
"""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from reflowd.driver.policy import FileClock


def checks(clock: FileClock, until: float, result_at: float = float("inf")) -> list[float]:
    """When the clock looks, from 0 to *until*; a result appears at *result_at* (then nothing changes)."""
    out, now, seen = [], 0.0, False
    while True:
        now = max(now, clock.next_at)
        if now > until:
            return out
        out.append(round(now, 3))
        changed = not seen and now >= result_at
        seen = seen or changed
        clock.after_check(now, changed)


def test_without_an_expectation_it_backs_off_as_before() -> None:
    assert checks(FileClock(0.5, 60), 200) == [0.0, 1.0, 3.0, 7.0, 15.0, 31.0, 63.0, 123.0, 183.0]


def test_a_short_element_is_noticed_within_the_minimum_interval() -> None:
    # The daemon sees the element start at 0 (the scheduler says it runs); its worker starts an interpreter,
    # imports the workflow and runs 0.1 s of work: the result appears at 1.2 s.
    plain = FileClock(0.5, 2)
    noticed = next(t for t in checks(plain, 20, result_at=1.2) if t >= 1.2)
    assert noticed == 3.0, "backed off: 1.8 s late"
    hot = FileClock(0.5, 2)
    hot.expect(0.0)  # it just started, and its task is short (or unknown)
    noticed = next(t for t in checks(hot, 20, result_at=1.2) if t >= 1.2)
    assert noticed - 1.2 <= 0.5


def test_a_long_element_is_looked_at_when_it_should_end_and_no_more_in_between() -> None:
    expected = 545.0  # measured: this task's elements take about nine minutes
    long = FileClock(0.5, 60)
    long.expect(expected)
    assert checks(long, expected - 0.1) == checks(FileClock(0.5, 60), expected - 0.1), \
        "the same checks as without it until the expected end"
    plain, hot = FileClock(0.5, 60), FileClock(0.5, 60)
    hot.expect(expected)
    late_plain = next(t for t in checks(plain, 2000, result_at=expected + 0.2) if t >= expected + 0.2) - expected
    late_hot = next(t for t in checks(hot, 2000, result_at=expected + 0.2) if t >= expected + 0.2) - expected
    assert late_hot <= 0.7 and late_plain > 50, (late_hot, late_plain)


@given(at=st.floats(0, 5000), result_at=st.floats(0, 5000))
def test_an_expectation_costs_a_bounded_number_of_checks(at: float, result_at: float) -> None:
    """Looking often only in the window after the expected end, then backing off again from the minimum:
    a bounded number of checks more per expectation (per element start), none per unit of time."""
    base = len(checks(FileClock(0.5, 60), 6000, result_at))
    clock = FileClock(0.5, 60)
    clock.expect(at)
    assert len(checks(clock, 6000, result_at)) <= base + FileClock.HOT + math.ceil(math.log2(60 / 0.5)) + 2
