"""Replay one simulation scenario: ``python -m tests.sim SEED [SEED...]`` (prints what happened)."""

from __future__ import annotations

import sys

from .harness import run_seed
from .replay import replay


def main(argv: list[str]) -> int:
    return replay(argv, lambda seed, _: run_seed(seed),
                  lambda r: (f"{r.crashes} crashes, {r.runs} runs {dict(r.states)}, {r.steps} loop steps, "
                             f"{r.virtual_seconds:.0f} s simulated, {r.reloads_checked} reload(s) checked, "
                             f"{r.reloads_unverified} not"),
                  "python -m tests.sim SEED [SEED...]",
                  details=lambda r: [f"crashed while waiting at {site}" for site in sorted(r.crash_sites)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
