"""Test workflow for retries by cause on a real cluster: a task over its time limit, retried with more time.

``slow`` sleeps ``seconds`` (past its 1-minute limit); its retry policy triples the
time after a time limit. Every execution appends a line to ``<run_dir>/executions.txt``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

from reflow import RunDir, Workflow

wf = Workflow("overtime")


@wf.job(time="1", mem="100M", retries=1, retry_policy={"escalate": {"time": 3}, "backoff": 1})
def slow(run_dir: Annotated[Path, RunDir()], seconds: float = 95.0) -> str:
    with open(run_dir / "executions.txt", "a") as fh:
        fh.write(f"slow pid={os.getpid()} job={os.environ.get('SLURM_JOB_ID') or os.environ.get('JOB_ID')}\n")
    time.sleep(seconds)
    return "finished"


if __name__ == "__main__":
    raise SystemExit(wf.cli())
