"""Helpers for tests that drive a real reflowd process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from reflow_client.client import Client, DaemonNotRunning

if TYPE_CHECKING:
    from reflowd.engine.model import Run
    from reflowd.schedulers.base import Observation, Scheduler
    from reflowd.store import Store

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


def wait_for(condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> T:
    """Poll *condition* until it returns something truthy; fail with *what* after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last value: {last!r})")


class DaemonProcess:
    """A reflowd subprocess on a private socket and state directory."""

    def __init__(self, base: Path, *, config: str = "", env: dict[str, str] | None = None,
                 socket: Path | None = None) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.socket = socket or base / "run" / "reflowd.sock"
        self.state_dir = base / "state"
        self.config_path = base / "config.toml"
        self.config_path.write_text(config)
        self.log_path = base / "reflowd.log"
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            REFLOW_SOCKET=str(self.socket),
            REFLOW_STATE_DIR=str(self.state_dir),
            REFLOW_CONFIG=str(self.config_path),
            REFLOW_LOG_LEVEL="debug",
        )
        env.update(self.extra_env)
        return env

    def start(self, *, extra_env: dict[str, str] | None = None, wait: bool = True,
              preexec: Callable[[], Any] | None = None) -> DaemonProcess:
        env = self.env
        env.update(extra_env or {})
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reflowd", "--log-format", "json", "--retry-backoff", "0.5"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=preexec,
        )
        log.close()
        if wait:
            wait_for(self.answers, timeout=30, what=f"reflowd to answer on {self.socket} (log: {self.log_path})")
        return self

    def answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"reflowd exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            with Client(self.socket, timeout=5) as client:
                client.ping()
            return True
        except (DaemonNotRunning, OSError):
            return False

    def client(self, timeout: float = 30.0) -> Client:
        client = Client(self.socket, timeout=timeout)
        client.connect()
        return client

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def cli(self, *args: str, timeout: float = 120.0, check: bool = False) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "reflow_client.cli", *args], env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"reflow-client {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n"
                                 f"{result.stderr}")
        return result


def count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def slurm_job_names(accounting: bool) -> Counter[str]:
    """Every job name Slurm still knows (squeue keeps finished jobs for MinJobAge; sacct for ever)."""
    names: Counter[str] = Counter()
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%j"], capture_output=True, text=True, timeout=60)
    seen_ids = set()
    for line in out.stdout.splitlines():
        job_id, _, name = line.partition("|")
        master = job_id.split("_")[0]
        if master not in seen_ids:
            seen_ids.add(master)
            names[name] += 1
    if accounting:
        names = Counter()
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,JobName", "-S", "now-1days"],
                             capture_output=True, text=True, timeout=60)
        masters: dict[str, str] = {}
        for line in out.stdout.splitlines():
            job_id, _, name = line.partition("|")
            masters.setdefault(job_id.split("_")[0], name)
        names.update(masters.values())
    return names


def open_and_close_store(path: Path) -> None:
    """Open the store at *path* (creating it with the current schema, or upgrading it) and close it."""
    import anyio

    from reflowd.store import Store

    async def main() -> None:
        store = Store(path)
        await store.open()
        await store.close()

    anyio.run(main)


def one_task_run(size: int | None = 3, *, cluster: str = "local", run_id: str = "r1") -> Run:
    """A run (id *run_id*) of workflow ``w`` with one task ``a`` and no upstream: an array of *size* PENDING
    instances (indices 0..size-1), or, *size* None, a single instance -- rows for store and engine tests."""
    from reflow_client.manifest import Manifest, TaskManifest
    from reflowd.engine.model import Instance, Run, TaskRun

    task = TaskManifest(name="a", is_array=size is not None, config={}, dependencies=[])
    manifest = Manifest(workflow="w", tasks=[task], cli_params=[], entrypoint="/x.py", python="python", working_dir="/")
    run = Run(id=run_id, manifest=manifest, params={}, run_dir="/tmp", cluster=cluster)
    tr = TaskRun(manifest=task, run_id=run_id, size=size)
    for i in range(size) if size is not None else [None]:
        tr.add(Instance(run_id=run_id, task="a", index=i))
    run.tasks["a"] = tr
    return run


# ---------------------------------------------------------------------------- store tests


def instance_rows(run: Run) -> dict[int | None, tuple[object, ...]]:
    """Task ``a``'s instances as the store writes them (``INSTANCES.row``), by index: what memory holds."""
    from reflowd.store import INSTANCES

    return {inst.index: INSTANCES.row(inst) for inst in run.tasks["a"].instances.values()}


async def flush_store(store: Store) -> None:
    """Commit what is queued, with the writer running as the daemon runs it."""
    import anyio

    async with anyio.create_task_group() as tg:
        tg.start_soon(store.run_writer)
        with anyio.fail_after(60):
            await store.flush()
        tg.cancel_scope.cancel()


async def reloaded_run(path: Path, run_id: str = "r1") -> tuple[Run, list[dict[str, Any]]]:
    """Run *run_id* and its transition log as a fresh store reads them back from *path*."""
    from reflowd.store import Store

    store = Store(path)
    await store.open()
    try:
        run = await store.load_run(run_id)
        assert run is not None
        return run, await store.transitions(run_id)
    finally:
        await store.close()


def json_values(max_leaves: int = 12, *, width: int = 4, text: int = 8) -> Any:
    """A hypothesis strategy for any JSON value (finite numbers), nested lists and objects of up to *width*
    items and *max_leaves* leaves."""
    from hypothesis import strategies as st

    return st.recursive(
        st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.text(max_size=text)
        | st.floats(allow_nan=False, allow_infinity=False),
        lambda inner: st.lists(inner, max_size=width) | st.dictionaries(st.text(max_size=width + 1), inner, max_size=width),
        max_leaves=max_leaves,
    )


async def until_done(scheduler: Scheduler, job_id: str, keys: list[str], timeout: float = 60) -> dict[str, Observation]:
    """Ask *scheduler* about *job_id* until every one of *keys* is done (an emulated or real scheduler's
    answer, not a sleep standing for it); its last answer."""
    import anyio

    from reflowd.schedulers.base import Phase

    deadline = time.monotonic() + timeout
    while True:
        got = await scheduler.query([job_id])
        if all(k in got and got[k].phase is Phase.DONE for k in keys):
            return got
        assert time.monotonic() < deadline, f"not done in {timeout} s: {got}"
        await anyio.sleep(0.3)
