"""The seeded scenarios of :class:`~tests.sim.harness.Harness` on a scheduler adapter with bugs.

Now and then a submission raises after its job was created, or a poll raises, with an exception no
adapter should raise (``Faults.internal_errors``). The daemon must show each error (on the run it
concerns, or on the cluster), keep going, and still keep every invariant: nothing executed twice, no
instance left in flight that nobody follows, every run ended. Replay: ``python -m tests.sim.buggy SEED``.
"""

from __future__ import annotations

from pathlib import Path

from .harness import Harness, Report, run_seed

#: Probability that a submission or a poll raises, during the scenario's faulty first part.
BUG_RATE = 0.15


class BuggyReport(Report):
    #: Errors the driver showed (``Driver.internal_errors``), summed over the daemon's lives.
    shown: int = 0


class BuggyHarness(Harness):
    def __init__(self, seed: int, workdir: Path) -> None:
        super().__init__(seed, workdir)
        self.faults.internal_errors = BUG_RATE  # (the cluster holds the same Faults)
        self.report = BuggyReport(seed)
        self._life_shown = 0

    def _check_step(self) -> None:
        super()._check_step()
        if self.engine is not None:
            shown = getattr(self.engine.drivers["sim"], "internal_errors", 0)
            if shown < self._life_shown:  # a new life: its driver counts from 0
                self._life_shown = 0
            assert isinstance(self.report, BuggyReport)
            self.report.shown += shown - self._life_shown
            self._life_shown = shown


def run_buggy_seed(seed: int, workdir: Path | None = None) -> BuggyReport:
    report = run_seed(seed, workdir, BuggyHarness)
    assert isinstance(report, BuggyReport)
    return report


def main(argv: list[str]) -> int:
    """``python -m tests.sim.buggy SEED [SEED...]``: replay scenarios with adapter bugs, print what they found."""
    from .replay import replay

    return replay(argv, lambda seed, _: run_buggy_seed(seed),
                  lambda r: f"{r.runs} runs {dict(r.states)}, {r.shown} internal errors shown",
                  "python -m tests.sim.buggy SEED [SEED...]")


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
