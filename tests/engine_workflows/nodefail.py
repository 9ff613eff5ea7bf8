"""Test workflow for a node failing under running jobs (tests/test_failures_slurm.py).

``fragile`` asks Slurm not to requeue it (``--no-requeue``): a node failure ends its job
NODE_FAIL, and reflow retries it. ``requeued`` keeps Slurm's default (JobRequeue=1): Slurm
puts its job back in the queue itself. Both wait for ``<run_dir>/release`` before returning,
so their first runs are still running when the node goes down; each run appends its start,
and its interruption, to ``<run_dir>/executions.txt``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

from reflow import RunDir, TaskInterrupted, Workflow

wf = Workflow("nodefail")


def record(run_dir: Path, label: str) -> None:
    with open(run_dir / "executions.txt", "a") as fh:
        fh.write(f"{label} pid={os.getpid()} job={os.environ.get('SLURM_JOB_ID', '-')}\n")


def wait_for_release(run_dir: Path, name: str) -> str:
    record(run_dir, f"{name} started")
    try:
        deadline = time.monotonic() + 900
        while not (run_dir / "release").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("nobody released the task")
            time.sleep(0.5)
    except TaskInterrupted:
        record(run_dir, f"{name} interrupted")
        raise
    return name


@wf.job(time="00:20:00", mem="100M", retries=0, no_requeue=True)
def fragile(run_dir: Annotated[Path, RunDir()]) -> str:
    return wait_for_release(run_dir, "fragile")


@wf.job(time="00:20:00", mem="100M", retries=0)
def requeued(run_dir: Annotated[Path, RunDir()]) -> str:
    return wait_for_release(run_dir, "requeued")


if __name__ == "__main__":
    raise SystemExit(wf.cli())
