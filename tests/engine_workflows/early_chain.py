"""Test workflow for Slurm-side dependencies: prepare -> work (array) -> total (a gather).

Every execution appends a line to <run_dir>/executions.txt (exactly-once checks). ``gate`` holds each
``work`` element until that file exists (so a test can act while ``total`` waits in Slurm's queue);
``fail_once`` makes that element fail its first attempt (``work`` has one retry).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

from reflow import Param, Result, RunDir, Workflow

wf = Workflow("early_chain")


def record(run_dir: Path, label: str) -> None:
    with open(run_dir / "executions.txt", "a") as fh:
        fh.write(f"{label} pid={os.getpid()}\n")


@wf.job()
def prepare(run_dir: Annotated[Path, RunDir()], n: Annotated[int, Param(help="elements")] = 4) -> list[int]:
    record(run_dir, "prepare")
    return list(range(n))


@wf.array_job(retries=1)
def work(x: Annotated[int, Result(step="prepare")], run_dir: Annotated[Path, RunDir()], gate: str = "",
         fail_once: int = -1) -> int:
    record(run_dir, f"work {x}")
    deadline = time.monotonic() + 600
    while gate and not Path(gate).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate} never opened")
        time.sleep(0.1)
    marker = run_dir / f"failed-{x}"
    if x == fail_once and not marker.exists():
        marker.write_text("once")
        raise ValueError(f"element {x} fails its first attempt")
    return x * x


@wf.job()
def total(values: Annotated[list[int], Result(step="work")], run_dir: Annotated[Path, RunDir()]) -> int:
    record(run_dir, "total")
    return sum(values)


if __name__ == "__main__":
    raise SystemExit(wf.cli())
