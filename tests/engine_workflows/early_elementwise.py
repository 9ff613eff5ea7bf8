"""Test workflow for element-wise chains submitted early: prepare -> work (array) -> double (array, element
``i`` from ``work[i]``) -> total (a gather).

Every execution appends a line to <run_dir>/executions.txt (exactly-once checks). ``gate`` holds every
``work`` element but the first until that file exists (so ``double[0]`` can run while ``work`` still
runs); ``fail`` makes that element of ``work`` fail every attempt (``work`` has one retry). ``exit_gate``
makes each ``work`` worker, its result written, wait for that file and then exit 3: a job whose elements all
succeeded but which ended badly (a failing epilogue, say), so Slurm's ``aftercorr`` on it fails.
"""

from __future__ import annotations

import atexit
import os
import time
from pathlib import Path
from typing import Annotated

from reflow import Param, Result, RunDir, Workflow

wf = Workflow("early_elementwise")


def record(run_dir: Path, label: str) -> None:
    with open(run_dir / "executions.txt", "a") as fh:
        fh.write(f"{label} pid={os.getpid()} at={time.time():.3f}\n")


def exit_badly(gate: str) -> None:
    """At the worker's exit (its result written): wait for *gate* (bounded), then end the job with code 3."""
    deadline = time.monotonic() + 600
    while not Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    os._exit(3)


@wf.job()
def prepare(run_dir: Annotated[Path, RunDir()], n: Annotated[int, Param(help="elements")] = 4) -> list[int]:
    record(run_dir, "prepare")
    return list(range(n))


@wf.array_job(retries=1)
def work(x: Annotated[int, Result(step="prepare")], run_dir: Annotated[Path, RunDir()], gate: str = "",
         fail: int = -1, exit_gate: str = "") -> int:
    record(run_dir, f"work {x}")
    if exit_gate:
        atexit.register(exit_badly, exit_gate)
    deadline = time.monotonic() + 600
    while x and gate and not Path(gate).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate} never opened")
        time.sleep(0.1)
    if x == fail:
        raise ValueError(f"element {x} always fails")
    return x * x


@wf.array_job()
def double(value: Annotated[int, Result(step="work")], run_dir: Annotated[Path, RunDir()], offset: int = 0) -> int:
    record(run_dir, f"double {value}")
    return 2 * value + offset


@wf.job()
def total(values: Annotated[list[int], Result(step="double")], run_dir: Annotated[Path, RunDir()]) -> int:
    record(run_dir, "total")
    return sum(values)


if __name__ == "__main__":
    raise SystemExit(wf.cli())
