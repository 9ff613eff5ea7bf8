"""A pipeline written the way the reference documents it (tests/test_reference_api.py).

* ``run_dir`` is injected by name, without the RunDir marker, in ``prepare``;
* ``square`` fails for ``fail_on`` until ``<run_dir>/fixed`` exists (retry);
* ``linger`` sleeps and catches ``TaskInterrupted`` to leave a checkpoint (cancel).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

from reflow import Param, Result, RunDir, TaskInterrupted, Workflow

wf = Workflow("reference_api")


@wf.job(cpus=1, time="00:10:00", mem="1G")
def prepare(run_dir, n: Annotated[int, Param(help="how many elements")] = 3) -> list[int]:
    (Path(run_dir) / "prepare-ran").write_text(f"{type(run_dir).__name__} {run_dir}\n")
    return list(range(n))


@wf.array_job(array_parallelism=4)
def square(x: Annotated[int, Result(step="prepare")], run_dir: Annotated[Path, RunDir()], fail_on: int = -1) -> int:
    if x == fail_on and not (run_dir / "fixed").exists():
        raise ValueError(f"bad element {x}")
    return x * x


@wf.job()
def total(values: Annotated[list[int], Result(step="square")]) -> int:
    return sum(values)


@wf.job()
def linger(run_dir: Path, linger: float = 0.0) -> str:
    try:
        (run_dir / "linger-started").write_text(str(os.getpid()))
        time.sleep(linger)
    except TaskInterrupted as exc:
        (run_dir / "checkpoint").write_text(exc.signame)
        raise
    return "done"


if __name__ == "__main__":
    raise SystemExit(wf.cli())
