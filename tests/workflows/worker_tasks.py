"""Tasks for running ``python -m reflow.worker`` directly (tests/test_worker.py).

The ``__main__`` block writes a marker file: the worker must import this file
without running it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

from reflow import Result, RunDir, Workflow

wf = Workflow("worker_tasks")


@wf.job()
def add(a: int, b: int = 1) -> int:
    return a + b


@wf.job()
def boom(message: str = "kaboom") -> int:
    raise RuntimeError(message)


@wf.job()
def sleepy(run_dir: Annotated[Path, RunDir()], seconds: float = 120.0) -> str:
    (run_dir / "started.txt").write_text(str(os.getpid()))
    time.sleep(seconds)
    return "woke up"


@wf.job()
def stubborn(run_dir: Annotated[Path, RunDir()], seconds: float = 120.0) -> str:
    """Swallows every Exception: the worker's interrupt must still get through."""
    (run_dir / "started.txt").write_text(str(os.getpid()))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(seconds)
        except Exception:
            pass
    return "never"


@wf.job()
def unencodable() -> object:
    return object()


@wf.job()
def where(run_dir: Annotated[Path, RunDir()]) -> Path:
    return run_dir


@wf.array_job()
def scale(x: Annotated[int, Result(step="source")], factor: int = 10) -> int:
    return x * factor


@wf.job()
def source() -> list[int]:
    return [1, 2, 3]


def positive(output: int) -> bool:
    if output == 13:
        raise ValueError("unlucky output")
    return output > 0


@wf.job(verify=positive)
def checked(value: int = 1) -> int:
    return value


@wf.job()
def quits(code: int = 3) -> int:
    sys.exit(code)


if __name__ == "__main__":
    Path(os.environ.get("MAIN_MARKER", "main-block-ran.txt")).write_text("the __main__ block ran\n")
    sys.exit(wf.cli())
