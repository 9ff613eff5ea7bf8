"""The replay command every simulation module offers (``python -m tests.sim[.early|.packed|.buggy] SEED``):
one seed after another, what happened to each, its violations; exit status 1 when one failed."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from .quiet import quiet_logs


def replay(argv: list[str], run: Callable[[int, list[str]], Any], describe: Callable[[Any], str],
           usage: str, details: Callable[[Any], list[str]] | None = None) -> int:
    """Replay the seeds in *argv* (``-v``: the engine's logs too; other ``--flags`` are *run*'s to read)."""
    seeds = [a for a in argv if not a.startswith("-")]
    if not seeds:
        print(f"usage: {usage}", file=sys.stderr)
        return 2
    failed = 0
    with quiet_logs(verbose="-v" in argv):
        for arg in seeds:
            report = run(int(arg), argv)
            print(f"seed {report.seed}: {'ok' if report.ok else 'FAILED'}; {report.lives} lives, "
                  f"{describe(report)}")
            for line in details(report) if details is not None else []:
                print(f"  {line}")
            for v in report.violations:
                print(f"  violation: {v}")
            failed += not report.ok
    return 1 if failed else 0
