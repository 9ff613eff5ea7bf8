"""Test workflow: four elements packed into one job; element ``slow`` outlasts the job's time limit.

Each element records itself in <run_dir>/executions.txt. The job is killed for its time limit
while ``slow`` runs: the elements before it have finished, the ones after it never start.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

from reflow import Result, RunDir, Workflow

wf = Workflow("packed_timeout")


@wf.job()
def items(n: int = 4) -> list[int]:
    return list(range(n))


@wf.array_job(pack=4, time="00:00:06", retries=1)
def work(x: Annotated[int, Result(step="items")], run_dir: Annotated[Path, RunDir()], slow: int = 2) -> int:
    with open(run_dir / "executions.txt", "a") as fh:
        fh.write(f"work {x} pid={os.getpid()}\n")
    time.sleep(60 if x == slow else 0.1)  # 60 s: well past the limit, below any test's patience
    return x


if __name__ == "__main__":
    raise SystemExit(wf.cli())
