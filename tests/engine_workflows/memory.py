"""Test workflow for out-of-memory on a cluster that enforces memory (Grid Engine's ``h_vmem``).

``hungry`` allocates ``alloc_mb`` MB in its own process: under an address-space limit
(``h_vmem`` is one, per process) the allocation fails with MemoryError.
``greedy`` starts ``children`` processes that each hold ``child_mb`` MB for a few
seconds: each stays under the per-process limit, but together they pass the
job's, and the execution daemon kills the job. Both triple their memory after
an out-of-memory and then succeed. Every execution appends a line to
``<run_dir>/executions.txt``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

from reflow import RunDir, Workflow

wf = Workflow("memory")

HOLD = "import sys, time; b = bytearray(int(sys.argv[1]) * 2**20); time.sleep(float(sys.argv[2]))"


def note(run_dir: Path, name: str) -> None:
    with open(run_dir / "executions.txt", "a") as fh:
        fh.write(f"{name} pid={os.getpid()} job={os.environ.get('JOB_ID')}\n")


@wf.job(time="00:05:00", mem="250M", retries=1, retry_policy={"escalate": {"mem": 3}, "backoff": 1})
def hungry(run_dir: Annotated[Path, RunDir()], alloc_mb: int = 400) -> int:
    note(run_dir, "hungry")
    block = bytearray(alloc_mb * 2**20)
    return len(block) // 2**20


@wf.job(time="00:05:00", mem="250M", retries=1, retry_policy={"escalate": {"mem": 3}, "backoff": 1})
def greedy(run_dir: Annotated[Path, RunDir()], child_mb: int = 150, children: int = 2, hold: float = 6.0) -> int:
    note(run_dir, "greedy")
    procs = [subprocess.Popen([sys.executable, "-c", HOLD, str(child_mb), str(hold)]) for _ in range(children)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"a child failed: {codes}")
    return children * child_mb


if __name__ == "__main__":
    raise SystemExit(wf.cli())
