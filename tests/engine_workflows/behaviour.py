"""Test workflow exercising engine behaviour: cache, verify, retries, time limits, parallelism.

Every execution appends ``<task> <index> <start> <end> <pid>`` to
``<run_dir>/log.txt`` so tests can count runs and measure concurrency.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

from reflow import Result, RunDir, Workflow

wf = Workflow("behaviour")


def record(run_dir: Path, task: str, index: object, start: float) -> None:
    with open(run_dir / "log.txt", "a") as fh:
        fh.write(f"{task} {index} {start:.6f} {time.time():.6f} {os.getpid()}\n")


def verify_marker(output: object) -> bool:
    """A custom verify callable: records the process it runs in."""
    run_dir = Path(os.environ.get("BEHAVIOUR_VERIFY_DIR", "/nonexistent"))
    if run_dir.is_dir():
        with open(run_dir / "verify.txt", "a") as fh:
            fh.write(f"{os.getpid()}\n")
    return not (run_dir / "reject").exists()


@wf.job(verify=verify_marker)
def source(run_dir: Annotated[Path, RunDir()], n: int = 6, mode: str = "ok") -> list[int]:
    start = time.time()
    (run_dir / "source-output.txt").write_text("data\n")
    record(run_dir, "source", None, start)
    return list(range(n))


@wf.array_job(array_parallelism=2)
def capped(x: Annotated[int, Result(step="source")], run_dir: Annotated[Path, RunDir()], hold: float = 0.4) -> int:
    start = time.time()
    time.sleep(hold)
    record(run_dir, "capped", x, start)
    return x + 100


@wf.job()
def files(run_dir: Annotated[Path, RunDir()], mode: str = "ok") -> Path:
    start = time.time()
    path = run_dir / "made.txt"
    path.write_text("made\n")
    record(run_dir, "files", None, start)
    return path


@wf.job(retries=2)
def flaky(run_dir: Annotated[Path, RunDir()], mode: str = "ok") -> str:
    """Fails on its first attempts when mode == 'flaky' (counts attempts in a file)."""
    start = time.time()
    record(run_dir, "flaky", None, start)
    counter = run_dir / "flaky-attempts"
    attempts = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(attempts))
    if mode == "flaky" and attempts < 3:
        raise RuntimeError(f"flaky failure {attempts}")
    if mode == "broken":
        raise RuntimeError("always broken")
    return f"ok after {attempts}"


@wf.job(time="0:06")  # the ok path must fit a worker's start on a loaded machine (2 s did not)
def slow(run_dir: Annotated[Path, RunDir()], mode: str = "ok") -> str:
    start = time.time()
    record(run_dir, "slow", None, start)
    if mode == "timeout":
        time.sleep(120)
    return "fast enough"


@wf.job(cache=False)
def uncached(values: Annotated[list[int], Result(step="capped")], run_dir: Annotated[Path, RunDir()]) -> int:
    start = time.time()
    record(run_dir, "uncached", None, start)
    return sum(values)


@wf.job()
def final(total: Annotated[int, Result(step="uncached")], made: Annotated[Path, Result(step="files")],
          run_dir: Annotated[Path, RunDir()]) -> str:
    start = time.time()
    record(run_dir, "final", None, start)
    return f"{total}:{made.name}"


@wf.job()
def boom(mode: str = "ok") -> str:
    """Fails at once (no retries) when mode == 'boom'."""
    if mode == "boom":
        raise RuntimeError("boom")
    return "no boom"
