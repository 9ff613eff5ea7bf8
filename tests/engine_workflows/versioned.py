"""Two versions of one task (selected by REFLOW_TEST_VERSION) to show a version bump reruns it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from reflow import Result, RunDir, Workflow

wf = Workflow("versioned")


@wf.job(version=os.environ.get("REFLOW_TEST_VERSION", "1"))
def step(run_dir: Annotated[Path, RunDir()]) -> int:
    with open(run_dir / "runs.txt", "a") as fh:
        fh.write("ran\n")
    return 1


@wf.array_job()
def nothing(x: Annotated[int, Result(step="empty")]) -> int:
    return x


@wf.job()
def empty() -> list[int]:
    return []


@wf.job()
def gather(values: Annotated[list[int], Result(step="nothing")]) -> int:
    return len(values)
