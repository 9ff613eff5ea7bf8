"""Test workflow: one element of ``work`` will not stop when cancelled (it swallows every exception).

Every execution appends one line to <run_dir>/executions.txt (as in counting.py). Element ``stubborn``
sleeps in a loop that catches ``BaseException`` -- what a packed worker's cancel (an exception raised
inside the task) cannot stop -- for at most ``hold`` seconds; the others sleep ``delay`` seconds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

from reflow import Result, RunDir, Workflow

wf = Workflow("stubborn")


def record(run_dir: Path, label: str) -> None:
    with open(run_dir / "executions.txt", "a") as fh:
        fh.write(f"{label} pid={os.getpid()}\n")


@wf.job()
def prepare(run_dir: Annotated[Path, RunDir()], n: int = 8, delay: float = 1.0, stubborn: int = 1,
            hold: float = 300.0) -> list[int]:
    return list(range(n))


@wf.array_job()
def work(x: Annotated[int, Result(step="prepare")], run_dir: Annotated[Path, RunDir()], delay: float = 1.0,
         stubborn: int = 1, hold: float = 300.0) -> int:
    record(run_dir, f"work {x}")
    if x != stubborn:
        time.sleep(delay)
        return x
    deadline = time.monotonic() + hold  # a bound, so that a broken worker cannot leave it behind for ever
    while time.monotonic() < deadline:
        try:
            time.sleep(0.2)
        except BaseException as exc:  # noqa: BLE001 -- the point: a task that will not stop
            record(run_dir, f"swallowed {type(exc).__name__}")
    return x


if __name__ == "__main__":
    raise SystemExit(wf.cli())
