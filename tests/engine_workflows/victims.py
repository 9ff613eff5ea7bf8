"""Test workflow: two independent jobs that sleep until they are killed.

``outside`` is meant to be killed through the scheduler (scancel, qdel, bkill,
flux cancel), ``worker`` by killing its worker process. Each writes its pid to
``<run_dir>/<task>.pid`` once it runs, and appends a line to
``<run_dir>/executions.txt`` (exactly-once checks).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

from reflow import RunDir, Workflow

wf = Workflow("victims")


def sleep_until_killed(run_dir: Path, name: str) -> None:
    with open(run_dir / "executions.txt", "a") as fh:
        fh.write(f"{name} pid={os.getpid()}\n")
    (run_dir / f"{name}.pid").write_text(str(os.getpid()))
    time.sleep(280)  # below the time limit: a test that fails leaves nothing running for long


@wf.job(time="00:05:00", mem="100M")
def outside(run_dir: Annotated[Path, RunDir()]) -> None:
    sleep_until_killed(run_dir, "outside")


@wf.job(time="00:05:00", mem="100M")
def worker(run_dir: Annotated[Path, RunDir()]) -> None:
    sleep_until_killed(run_dir, "worker")


if __name__ == "__main__":
    raise SystemExit(wf.cli())
