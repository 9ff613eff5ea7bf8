"""Tasks for running a packed slice of ``python -m reflow.worker`` directly (tests/test_worker_packed.py)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Annotated

from reflow import Result, RunDir, Workflow

wf = Workflow("packed_worker_tasks")


@wf.job()
def xs() -> list[int]:
    """The list both array tasks fan out over (the tests write each element's inputs themselves)."""
    return [0, 1]


@wf.array_job()
def tidy(x: Annotated[int, Result(step="xs")]) -> dict[str, object]:
    """Each element must start as a fresh worker would: no variable or directory left by the one before."""
    seen = {"leak": os.environ.get("REFLOW_TEST_LEAK"), "cwd": os.getcwd()}
    os.environ["REFLOW_TEST_LEAK"] = str(x)
    os.environ.pop("REFLOW_TEST_KEEP", None)
    os.chdir("/")
    return seen


@wf.array_job()
def deaf(run_dir: Annotated[Path, RunDir()], x: Annotated[int, Result(step="xs")]) -> int:
    """Element 0 makes SIGTERM harmless and returns; element 1 sleeps until stopped."""
    if x == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return 0
    (run_dir / f"started-{x}.txt").write_text(str(os.getpid()))
    time.sleep(120)
    return x
