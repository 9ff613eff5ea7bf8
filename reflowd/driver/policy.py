"""When a driver asks its scheduler next, and when it looks at a job's files next."""

from __future__ import annotations

from collections.abc import Callable


class PollPolicy:
    """The scheduler clock: short after a submission or a change, growing while nothing happens,
    long when the scheduler answers slowly."""

    #: Quiet polls at the base interval before the interval keeps growing toward the maximum.
    QUIET_STREAK = 20

    def __init__(self, minimum: float, base: float, maximum: float) -> None:
        self.minimum = minimum
        self.base = max(base, minimum)
        self.maximum = max(maximum, self.base)
        self.interval = self.minimum
        self.quiet = 0

    def after_query(self, duration: float, changed: bool) -> None:
        """*duration*: what the poll cost, the scheduler's answer and the daemon's work on it together.

        Polling takes at most a tenth of the time: a slow controller, or an answer about very many
        jobs, spaces the polls out in proportion.
        """
        self.quiet = 0 if changed else self.quiet + 1
        if changed:
            interval = self.minimum
        elif self.quiet < self.QUIET_STREAK:
            interval = min(self.base, self.interval * 1.5)
        else:  # nothing has changed for a long while (jobs waiting in a queue): poll rarely
            interval = min(self.maximum, self.interval * 1.5)
        self.interval = min(self.maximum, max(interval, duration * 10))

    def after_submit(self) -> None:
        self.interval = self.minimum
        self.quiet = 0


class FileClock:
    """One job directory's file clock: every ``minimum`` seconds while things happen, doubling
    (up to ``maximum``) while nothing does, so idle jobs cost little.

    When a result is likely soon (a job was just submitted, an element just started, or one started a
    typical duration ago: :meth:`expect`), the clock looks then and stays at ``minimum`` for ``HOT`` more
    checks before it backs off again: a short upstream's end is noticed within ``minimum`` instead of
    after a backed-off interval, at the price of a few listings per submission and element start (none
    per unit of time, none while a job waits in a queue)."""

    #: Checks at the minimum interval after the moment a result is expected.
    HOT = 6

    def __init__(self, minimum: float, maximum: float) -> None:
        self.minimum = minimum
        self.maximum = max(maximum, minimum)
        self.interval = minimum
        self.next_at = 0.0
        #: The window (monotonic) in which a result is expected: checks stay at the minimum interval.
        self.hot_from = self.hot_until = float("-inf")
        #: Told the new ``next_at`` after every change (the driver keeps its due clocks in a heap).
        self.on_change: Callable[[float], None] | None = None

    def _moved(self) -> None:
        if self.on_change is not None:
            self.on_change(self.next_at)

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def after_check(self, now: float, changed: bool) -> None:
        hot = self.hot_from <= now < self.hot_until
        self.interval = self.minimum if changed or hot else min(self.maximum, self.interval * 2)
        self.next_at = now + self.interval
        if not hot and self.hot_from <= now:
            self.hot_from = self.hot_until = float("-inf")  # the window is over (an expected one stays)
        elif self.hot_from > now:
            self.next_at = min(self.next_at, self.hot_from)
        self._moved()

    def hurry(self) -> None:
        self.interval = self.minimum
        self.next_at = 0.0
        self._moved()

    def expect(self, at: float) -> None:
        """A result is likely from *at* (monotonic) on: look then, and often for a little while. A later
        expectation moves the window (one element's start in a packed slice follows the other's end)."""
        self.hot_from, self.hot_until = at, at + self.HOT * self.minimum
        self.next_at = min(self.next_at, at)
        self._moved()
