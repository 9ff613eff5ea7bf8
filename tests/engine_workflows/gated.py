"""Test workflow whose elements wait for a file: a run held mid-flight on purpose.

``work`` elements start, then wait (bounded) until ``gate`` exists, so a test
can change the world (fill the disk, send a signal) while jobs are running.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

from reflow import Param, Result, RunDir, Workflow

wf = Workflow("gated")


@wf.job()
def prepare(n: Annotated[int, Param(help="elements")] = 3) -> list[int]:
    return list(range(n))


@wf.array_job()
def work(x: Annotated[int, Result(step="prepare")], run_dir: Annotated[Path, RunDir()], gate: str = "") -> int:
    deadline = time.monotonic() + 600
    while gate and not Path(gate).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate} never opened")
        time.sleep(0.1)
    return x * x


@wf.job()
def total(values: Annotated[list[int], Result(step="work")]) -> int:
    return sum(values)


if __name__ == "__main__":
    raise SystemExit(wf.cli())
