"""Is the cluster's scheduler answering? A circuit breaker over its commands.

While the scheduler does not answer (the controller restarting, commands
timing out), nothing may be concluded from it: observations are *unknown*,
no instance is failed, and submissions wait. The driver records every
scheduler call's outcome here. After ``threshold`` failures in a row the
cluster is *degraded* (shown in ``status`` with the last error and since
when), and calls are let through only once per breaker interval, which
doubles with each further failure up to ``maximum``: a scheduler that is down
is probed rarely instead of hammered. The first success closes the breaker
and everything resumes at full rate.
"""

from __future__ import annotations

from typing import Any


class ClusterHealth:
    def __init__(self, threshold: int = 2, base: float = 5.0, maximum: float = 120.0) -> None:
        self.threshold = max(1, threshold)
        self.base = base
        self.maximum = max(maximum, base)
        self.failures = 0  # consecutive failed scheduler calls
        self.since: float | None = None  # wall time of the first failure of the current streak
        self.last_error: str | None = None
        self.last_what: str | None = None
        self.next_probe_at = 0.0  # monotonic time before which a degraded scheduler is not called
        self.episodes = 0  # how often the cluster became degraded (shown in status)
        self.recovered_at: float | None = None

    @property
    def degraded(self) -> bool:
        return self.failures >= self.threshold

    def interval(self) -> float:
        """The breaker's current probe interval (0 while healthy)."""
        if not self.degraded:
            return 0.0
        return float(min(self.maximum, self.base * 2 ** (self.failures - self.threshold)))

    def allows(self, monotonic: float) -> bool:
        """May a scheduler call go out now? Always while healthy; once per interval while degraded."""
        return not self.degraded or monotonic >= self.next_probe_at

    def failed(self, now: float, monotonic: float, what: str, error: str) -> bool:
        """A scheduler call failed without an answer; True when this made the cluster degraded."""
        was = self.degraded
        self.failures += 1
        if self.since is None:
            self.since = now
        self.last_error = error
        self.last_what = what
        if self.degraded:
            self.next_probe_at = monotonic + self.interval()
        if self.degraded and not was:
            self.episodes += 1
            return True
        return False

    def succeeded(self, now: float) -> bool:
        """A scheduler call answered; True when this ended a degraded spell."""
        was = self.degraded
        self.failures = 0
        self.since = None
        self.next_probe_at = 0.0
        if was:
            self.recovered_at = now
        return was

    def to_dict(self, monotonic: float) -> dict[str, Any]:
        out: dict[str, Any] = {"state": "degraded" if self.degraded else "ok"}
        if self.degraded:
            out.update(since=self.since, last_error=self.last_error, failed_command=self.last_what,
                       failures=self.failures, next_probe_in=round(max(0.0, self.next_probe_at - monotonic), 1))
        elif self.failures:
            out.update(failures=self.failures, last_error=self.last_error)
        if self.episodes:
            out.update(degraded_episodes=self.episodes, recovered_at=self.recovered_at)
        return out


class AccountingHealth:
    """Is the scheduler's accounting (Slurm's slurmdbd behind ``sacct``) answering?

    Accounting can fail while the controller still answers. reflow then asks the
    controller instead (``squeue`` still lists what it keeps in memory), so
    nothing stops, but what it sees is less (finished jobs leave ``squeue`` after
    ``MinJobAge``, nodes and peaks are unknown). ``status`` says so: since when,
    the last error, and what stands in. The first answer from accounting ends it.
    """

    def __init__(self) -> None:
        self.since: float | None = None  # wall time of the first failure of the current spell
        self.last_error: str | None = None
        self.failures = 0
        self.episodes = 0
        self.recovered_at: float | None = None
        self.fallback: str | None = None

    @property
    def degraded(self) -> bool:
        return self.since is not None

    def failed(self, now: float, error: str, fallback: str | None = None) -> bool:
        """Accounting did not answer; True when this started a degraded spell."""
        self.failures += 1
        self.last_error = error
        self.fallback = fallback
        if self.since is None:
            self.since = now
            self.episodes += 1
            return True
        return False

    def succeeded(self, now: float) -> bool:
        """Accounting answered; True when this ended a degraded spell."""
        was = self.degraded
        self.since = None
        self.failures = 0
        if was:
            self.recovered_at = now
        return was

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": "degraded" if self.degraded else "ok"}
        if self.degraded:
            out.update(since=self.since, last_error=self.last_error, failures=self.failures, fallback=self.fallback)
        if self.episodes:
            out.update(degraded_episodes=self.episodes, recovered_at=self.recovered_at)
        return out
