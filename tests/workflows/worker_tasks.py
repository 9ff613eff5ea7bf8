"""Tasks for running ``python -m reflow.worker`` directly (tests/test_worker.py).

The ``__main__`` block writes a marker file: the worker must import this file
without running it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

from reflow import Result, RunDir, TaskInterrupted, Workflow

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


@wf.job()
def checkpointing(run_dir: Annotated[Path, RunDir()], seconds: float = 120.0, then: str = "raise") -> str:
    """Catches the reference's TaskInterrupted to save a checkpoint, then re-raises or returns."""
    try:  # started.txt inside the try: the test's signal may arrive right after it appears
        (run_dir / "started.txt").write_text(str(os.getpid()))
        time.sleep(seconds)
    except TaskInterrupted as exc:
        (run_dir / "checkpoint.txt").write_text(f"{exc.signame} {isinstance(exc, Exception)}")
        if then == "raise":
            raise
        if then == "note":  # the documented way to have the checkpoint noted in status
            exc.checkpoint = str(run_dir / "checkpoint.txt")
            raise
        if then == "note_and_fail":  # another exception, raised from the noted TaskInterrupted
            exc.checkpoint = str(run_dir / "checkpoint.txt")
            raise RuntimeError("gave up after saving") from exc
        if then == "return":
            return "partial"
        time.sleep(seconds)  # "continue": carry on as if nothing happened
    return "finished"


@wf.job()
def deaf_main_thread(run_dir: Annotated[Path, RunDir()], seconds: float = 120.0) -> str:
    """Sleeps with the stop signals blocked in its main thread, so the kernel hands a stop signal to another thread
    and the main thread's sleep goes on: what happens whenever a signal lands just before a blocking call starts."""
    threading.Thread(target=time.sleep, args=(seconds,), daemon=True).start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        (run_dir / "started.txt").write_text(str(os.getpid()))
        time.sleep(seconds)
    except TaskInterrupted as exc:
        (run_dir / "checkpoint.txt").write_text(exc.signame)
        time.sleep(seconds)  # and carry on regardless
    return "finished"


@wf.job()
def stops_a_forked_child(linger: float = 7.0) -> str:
    """Forks a child (as multiprocessing does) and stops it with SIGTERM: the child's signal is not the worker's."""
    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(60)
        except BaseException:
            pass
        os._exit(0)
    time.sleep(0.5)
    os.kill(pid, signal.SIGTERM)
    os.waitpid(pid, 0)
    time.sleep(linger)  # past the stop grace
    return "carried on"


@wf.job()
def run_dir_by_name(run_dir, label: str = "x") -> str:
    """No marker: a parameter called run_dir receives the run directory, as in the reference."""
    return f"{type(run_dir).__name__}:{run_dir}"


@wf.job()
def run_dir_as_text(run_dir: str) -> str:
    return f"{type(run_dir).__name__}:{run_dir}"


if __name__ == "__main__":
    Path(os.environ.get("MAIN_MARKER", "main-block-ran.txt")).write_text("the __main__ block ran\n")
    sys.exit(wf.cli())
