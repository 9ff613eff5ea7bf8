"""Test workflow for the Slurm cluster: failures, time limits, outside kills, bad partitions.

``mode`` selects the behaviour of ``victim``; every execution appends a line
to ``<run_dir>/executions.txt`` (exactly-once checks).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

from reflow import Result, RunDir, Workflow

wf = Workflow("slurmy")


def record(run_dir: Path, label: str) -> None:
    with open(run_dir / "executions.txt", "a") as fh:
        fh.write(f"{label} pid={os.getpid()} job={os.environ.get('SLURM_JOB_ID', '-')}\n")


@wf.job(time="00:05:00", mem="100M")
def items(run_dir: Annotated[Path, RunDir()], n: int = 4) -> list[int]:
    record(run_dir, "items")
    return list(range(n))


@wf.array_job(time="00:05:00", mem="100M")
def work(x: Annotated[int, Result(step="items")], run_dir: Annotated[Path, RunDir()], hold: float = 0.0) -> int:
    record(run_dir, f"work {x}")
    if hold:
        time.sleep(hold)
    return x * 2


@wf.job(time="1", mem="100M")
def victim(values: Annotated[list[int], Result(step="work")], run_dir: Annotated[Path, RunDir()],
           mode: str = "ok") -> int:
    """ok: returns; raise: raises; sleep: sleeps past its 1-minute limit or until killed."""
    record(run_dir, "victim")
    (run_dir / "victim.pid").write_text(str(os.getpid()))
    if mode == "raise":
        raise RuntimeError("victim raised on purpose")
    if mode == "sleep":
        time.sleep(600)
    return sum(values)


if __name__ == "__main__":
    raise SystemExit(wf.cli())
