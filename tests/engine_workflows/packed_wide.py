"""Test workflow: a packed array task asking for two CPUs runs two of its elements at once per job."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

from reflow import Result, RunDir, Workflow

wf = Workflow("packed_wide")


@wf.job()
def items(n: int = 8) -> list[int]:
    return list(range(n))


@wf.array_job(pack=4, cpus=2)
def work(x: Annotated[int, Result(step="items")], run_dir: Annotated[Path, RunDir()]) -> int:
    start = time.time()
    time.sleep(0.5)
    with open(run_dir / "spans.txt", "a") as fh:
        fh.write(f"{x} {os.getpid()} {os.getppid()} {start} {time.time()}\n")
    return x * 10


@wf.job()
def total(values: Annotated[list[int], Result(step="work")]) -> int:
    return sum(values)
