"""How long a task's instances take, from what earlier instances measured (pure).

Automatic packing sizes jobs from this: the durations come from the worker's
own clock (``started_at``/``ended_at`` in its result, so scheduler and file
clock delays do not count), for succeeded instances of the same workflow,
task and version (see ``Store.task_durations``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

#: Fewer measured instances than this is no history: the task is not packed automatically.
MIN_SAMPLES = 3


@dataclass(frozen=True)
class Estimate:
    """Typical and high duration of one instance, in seconds."""

    samples: int
    mean: float
    high: float  # 95th percentile: what a job must leave room for

    def describe(self) -> str:
        return f"{self.samples} earlier instances, mean {self.mean:.3g} s, p95 {self.high:.3g} s"


def estimate(durations: Iterable[float]) -> Estimate | None:
    """The estimate from measured durations; None when there are too few to go by."""
    values = sorted(d for d in durations if d is not None and math.isfinite(d) and d >= 0)
    if len(values) < MIN_SAMPLES:
        return None
    high = values[min(len(values) - 1, math.ceil(0.95 * len(values)) - 1)]
    # A floor of 1 ms: a measured zero must not make a job of unbounded length.
    return Estimate(len(values), max(sum(values) / len(values), 0.001), max(high, 0.001))
