"""Test workflow for the shared cache: every execution appends a line to <run_dir>/executions.txt.

``make`` writes a result file and returns its path, so a deleted or rewritten
file can be shown not to be reused; ``square`` is an array of plain values.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

from reflow import Param, Result, RunDir, Workflow

wf = Workflow("shared_cache")


def record(run_dir: Path, label: str) -> None:
    with open(run_dir / "executions.txt", "a") as fh:
        fh.write(f"{label} pid={os.getpid()}\n")


@wf.job()
def make(run_dir: Annotated[Path, RunDir()], n: Annotated[int, Param(help="elements")] = 3) -> Path:
    record(run_dir, "make")
    out = run_dir / "made.txt"
    out.write_text(" ".join(str(i) for i in range(n)))
    return out


@wf.job()
def read(path: Annotated[Path, Result(step="make")], run_dir: Annotated[Path, RunDir()]) -> list[int]:
    record(run_dir, "read")
    return [int(v) for v in path.read_text().split()]


@wf.array_job()
def square(x: Annotated[int, Result(step="read")], run_dir: Annotated[Path, RunDir()],
           delay: float = 0.0) -> int:
    record(run_dir, f"square {x}")
    if delay:
        time.sleep(delay)
    return x * x


@wf.job()
def total(values: Annotated[list[int], Result(step="square")], run_dir: Annotated[Path, RunDir()]) -> int:
    record(run_dir, "total")
    return sum(values)


if __name__ == "__main__":
    raise SystemExit(wf.cli())
