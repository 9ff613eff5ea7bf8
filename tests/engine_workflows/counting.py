"""Test workflow: every task execution appends one line to <run_dir>/executions.txt.

The line count proves how often each task really ran (exactly-once checks).
``fail_on`` makes one element raise until a file ``fixed`` exists in the run
directory; ``delay`` keeps elements running long enough to interrupt them. ``gate`` holds every element
from ``gate_from`` on (after its line is written) until that file exists: a test that must catch an
element running waits on the line, not on a duration a loaded machine may not honour.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

from reflow import Param, Result, RunDir, Workflow

wf = Workflow("counting")


def record(run_dir: Path, label: str) -> None:
    with open(run_dir / "executions.txt", "a") as fh:
        fh.write(f"{label} pid={os.getpid()}\n")


@wf.job()
def prepare(run_dir: Annotated[Path, RunDir()], n: Annotated[int, Param(help="elements")] = 50,
            delay: float = 0.0, fail_on: int = -1) -> list[int]:
    record(run_dir, "prepare")
    return list(range(n))


@wf.array_job()
def work(x: Annotated[int, Result(step="prepare")], run_dir: Annotated[Path, RunDir()], delay: float = 0.0,
         fail_on: int = -1, gate: str = "", gate_from: int = 0) -> int:
    record(run_dir, f"work {x}")
    deadline = time.monotonic() + 600
    while gate and x >= gate_from and not Path(gate).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate} never opened")
        time.sleep(0.05)
    if delay:
        time.sleep(delay)
    if x == fail_on and not (run_dir / "fixed").exists():
        raise ValueError(f"bad input {x}")
    print(f"element {x} done")
    return x * x


@wf.job()
def total(values: Annotated[list[int], Result(step="work")], run_dir: Annotated[Path, RunDir()]) -> int:
    record(run_dir, "total")
    return sum(values)


if __name__ == "__main__":
    raise SystemExit(wf.cli())
