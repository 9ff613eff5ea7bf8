"""Replay one simulation scenario: ``python -m tests.sim SEED [SEED...]`` (prints what happened)."""

from __future__ import annotations

import sys

from .harness import run_seed
from .quiet import quiet_logs


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m tests.sim SEED [SEED...]", file=sys.stderr)
        return 2
    failed = 0
    with quiet_logs(verbose="-v" in argv):
        for arg in (a for a in argv if a != "-v"):
            report = run_seed(int(arg))
            status = "ok" if report.ok else "FAILED"
            print(f"seed {report.seed}: {status}; {report.lives} lives, {report.crashes} crashes, {report.runs} runs "
                  f"{dict(report.states)}, {report.steps} loop steps, {report.virtual_seconds:.0f} s simulated, "
                  f"{report.reloads_checked} reload(s) checked, {report.reloads_unverified} not")
            for site in sorted(report.crash_sites):
                print(f"  crashed while waiting at {site}")
            for v in report.violations:
                print(f"  violation: {v}")
            failed += not report.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
