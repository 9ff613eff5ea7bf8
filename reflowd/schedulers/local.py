"""The ``local`` scheduler: worker processes on the daemon's own machine.

It behaves like a tiny batch system so the engine treats it like Slurm:
``submit`` queues elements and returns a job id (the submission tag), a slot
limit (``max_workers``) and ``array_parallelism`` cap what runs at once, the
task's time limit is enforced (TIMEOUT), ``cancel`` kills process groups.

Workers run in their own session, so they survive a daemon restart like real
batch jobs do -- and, like a real batch system, ``cancel`` stops one that an
earlier daemon started and this one never re-attached (a kill owed by a run
that was cancelled before a crash): each worker carries its job id and key in
its environment (``JOB_ID_ENV``, ``JOB_KEY_ENV``), where ``cancel`` finds it. After a restart ``reattach`` finds each element again: a
result file means it ended, a live process (found in /proc by its job
directory) is adopted, a ``started`` marker without a process means it
crashed, and no trace at all means it never started -- and only this daemon
starts local jobs, so it is safe to queue it again.
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from anyio.abc import Process

from reflow_client import jobfiles
from reflow_client.resources import parse_time

from .base import Observation, Outcome, Phase, Presence, Scheduler, SubmitError, SubmitRequest, TaggedJob, log_path

log = structlog.get_logger("reflowd.local")

#: Environment variables a local worker is started with: its job id and its element's key, by which
#: ``cancel`` finds a worker of a job this scheduler does not know (started before a restart).
JOB_ID_ENV = "REFLOW_LOCAL_JOB_ID"
JOB_KEY_ENV = "REFLOW_LOCAL_JOB_KEY"


@dataclass
class _Element:
    job_id: str
    index: int | None
    key: str
    request: SubmitRequest
    slots: int
    phase: Phase = Phase.QUEUED
    outcome: Outcome | None = None
    pid: int | None = None
    returncode: int | None = None
    started: float | None = None
    adopted: bool = False  # a process we did not start (after a restart): polled, not awaited
    #: An adopted process's start time (``/proc/PID/stat``): pids are recycled, and a recycled one must never
    #: be taken for our worker, still less signalled.
    pid_start: str | None = None
    cancel_requested: bool = False
    timed_out: bool = False
    process: Process | None = field(default=None, repr=False)
    #: The last answer given for this element, reused while nothing changed: a query answers every element
    #: of every tracked job, and the driver skips an answer that *is* the previous one cheaply.
    answer: Observation | None = field(default=None, repr=False)

    def observation(self) -> Observation:
        answer = self.answer
        if answer is not None and answer.phase is self.phase and answer.outcome is self.outcome and \
                answer.exit_code == (None if self.returncode is None else str(self.returncode)):
            return answer
        self.answer = Observation(
            Presence.PRESENT,
            phase=self.phase,
            outcome=self.outcome,
            native_state=(self.outcome.value if self.outcome else self.phase.value).upper(),
            reason=None,
            exit_code=None if self.returncode is None else str(self.returncode),
        )
        return self.answer


def _proc_cmdlines() -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                raw = fh.read()
        except OSError:
            continue
        if raw:
            out[int(name)] = [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]
    return out


def _find_worker(cmdlines: dict[int, list[str]], job_dir: str, index: int | None) -> int | None:
    for pid, argv in cmdlines.items():
        if job_dir in argv and "reflow.worker" in argv:
            if index is None and "--index" not in argv:
                return pid
            if index is not None and "--index" in argv:
                pos = argv.index("--index")
                if pos + 1 < len(argv) and argv[pos + 1] == str(index):
                    return pid
    return None


def _exists(path: str) -> bool:
    return os.path.exists(path)


class LocalScheduler(Scheduler):
    """Run workers as local processes with a slot limit."""

    kind = "local"
    max_array_size = 1_000_000
    can_requeue_unstarted = True

    def __init__(self, max_workers: int | None = None, *, kill_on_close: bool = False, kill_grace: float = 10.0) -> None:
        self.max_workers = max(1, max_workers or os.cpu_count() or 1)
        self.kill_on_close = kill_on_close
        self.kill_grace = kill_grace
        self.on_change: Callable[[], None] | None = None
        self._jobs: dict[str, list[_Element]] = {}
        self._queue: deque[_Element] = deque()
        self._used = 0
        self._running_per_task: dict[tuple[str, str], int] = {}
        self._wake = anyio.Event()
        self.started_total = 0

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start queued elements as slots free up; runs until cancelled."""
        async with anyio.create_task_group() as tg:
            task_status.started()
            while True:
                self._start_what_fits(tg)
                await self._wake.wait()
                self._wake = anyio.Event()

    def _notify(self) -> None:
        self._wake.set()
        if self.on_change is not None:
            self.on_change()

    def _start_what_fits(self, tg: anyio.abc.TaskGroup) -> None:
        skipped: deque[_Element] = deque()
        while self._queue:
            element = self._queue.popleft()
            if element.cancel_requested:
                continue
            cap = element.request.array_parallelism
            task_key = (element.request.run_id, element.request.task)
            if self._used + element.slots > self.max_workers and self._used > 0:
                skipped.append(element)
                break
            if cap is not None and self._running_per_task.get(task_key, 0) >= cap:
                skipped.append(element)
                continue
            self._used += element.slots
            self._running_per_task[task_key] = self._running_per_task.get(task_key, 0) + 1
            element.phase = Phase.RUNNING
            element.started = time.time()
            tg.start_soon(self._supervise, element)
        skipped.extend(self._queue)
        self._queue = skipped

    def _release(self, element: _Element) -> None:
        self._used -= element.slots
        task_key = (element.request.run_id, element.request.task)
        self._running_per_task[task_key] = max(0, self._running_per_task.get(task_key, 1) - 1)

    async def _supervise(self, element: _Element) -> None:
        req = element.request
        argv = list(req.worker_argv) + ([] if element.index is None else ["--index", str(element.index)])
        array_id = None if element.index is None else element.index - req.index_offset
        out_path = log_path(req.log_dir, req.task, req.tag, array_id, "out")
        err_path = log_path(req.log_dir, req.task, req.tag, array_id, "err")
        out_fh = err_fh = None
        try:
            limit = parse_time(req.time) if req.time else None
            env = dict(os.environ)
            env.update(req.env)
            env["PYTHONUNBUFFERED"] = "1"
            env[JOB_ID_ENV], env[JOB_KEY_ENV] = element.job_id, element.key

            def open_logs() -> tuple[Any, Any]:
                os.makedirs(req.log_dir, exist_ok=True)
                return open(out_path, "ab"), open(err_path, "ab")

            out_fh, err_fh = await anyio.to_thread.run_sync(open_logs)
            process = await anyio.open_process(
                argv, stdin=None, stdout=out_fh, stderr=err_fh, cwd=req.workdir, env=env, start_new_session=True
            )
            element.process = process
            element.pid = process.pid
            self.started_total += 1
            with anyio.move_on_after(limit if limit else float("inf")) as scope:
                await process.wait()
            if scope.cancelled_caught:
                element.timed_out = True
                log.info("local job exceeded its time limit", job=element.key, limit=req.time)
                await self._terminate(element)
            element.returncode = process.returncode
        except Exception as exc:  # one element must never take the scheduler (and the daemon) down
            log.error("cannot start local worker", job=element.key, error=f"{type(exc).__name__}: {exc}")
            element.returncode = 127
        finally:
            with anyio.CancelScope(shield=True):
                if element.returncode is None and self.kill_on_close and element.pid:
                    await self._terminate(element)
                for fh in (out_fh, err_fh):
                    if fh is not None:
                        await anyio.to_thread.run_sync(fh.close)
            if element.returncode is not None:
                element.phase = Phase.DONE
                element.outcome = self._outcome(element)
            self._release(element)
            self._notify()

    def _outcome(self, element: _Element) -> Outcome:
        if element.timed_out:
            return Outcome.TIMEOUT
        if element.cancel_requested:
            return Outcome.CANCELLED
        return Outcome.COMPLETED if element.returncode == 0 else Outcome.FAILED

    async def _terminate(self, element: _Element) -> None:
        """SIGTERM the element's process group, SIGKILL after the grace period."""
        if element.pid is None:
            return
        if element.adopted and not await anyio.to_thread.run_sync(_pid_alive, element.pid, element.pid_start):
            return  # gone; its pid may belong to somebody else by now
        try:
            os.killpg(element.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            return
        if element.process is not None:
            with anyio.move_on_after(self.kill_grace):
                await element.process.wait()
            if element.process.returncode is not None:
                return
            try:
                os.killpg(element.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            return
        await self._kill_after_grace(element.pid, element.pid_start)

    async def _kill_after_grace(self, pid: int, start: str | None) -> None:
        """A process group we did not start and already sent SIGTERM: SIGKILL once the grace period is over."""
        deadline = time.monotonic() + self.kill_grace
        while time.monotonic() < deadline and await anyio.to_thread.run_sync(_pid_alive, pid, start):
            await anyio.sleep(0.1)
        if not await anyio.to_thread.run_sync(_pid_alive, pid, start):
            return
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    async def _terminate_unknown(self, keys: set[str]) -> None:
        """Stop the workers of *keys* that belong to no job this scheduler knows: started by an earlier daemon
        and never re-attached (their run ended, cancelled, before a crash). Found by the job id and key in
        their environment; only a session leader of ours (the worker, whose group is signalled)."""
        signalled = []
        for pid, start in await anyio.to_thread.run_sync(_workers_of, keys):
            log.info("stopping a worker an earlier daemon started", pid=pid)
            try:
                os.killpg(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                continue
            signalled.append((pid, start))
        async with anyio.create_task_group() as tg:
            for pid, start in signalled:
                tg.start_soon(self._kill_after_grace, pid, start)

    # ------------------------------------------------------------------ scheduler API

    async def submit(self, request: SubmitRequest) -> str:
        try:
            if request.time:
                parse_time(request.time)
        except ValueError as exc:
            raise SubmitError(f"invalid time limit {request.time!r}: {exc}", permanent=True) from None
        job_id = request.tag
        elements = self._elements_for(job_id, request)
        self._jobs[job_id] = elements
        self._queue.extend(elements)
        self._notify()
        return job_id

    def _elements_for(self, job_id: str, request: SubmitRequest) -> list[_Element]:
        slots = max(1, min(request.cpus, self.max_workers))
        indices: list[int | None] = list(request.indices) if request.indices is not None else [None]
        return [_Element(job_id, i, request.element_key(job_id, i), request, slots) for i in indices]

    async def reattach(self, request: SubmitRequest, job_id: str) -> None:
        """Find a job's elements again after a daemon restart (see module docstring)."""
        if job_id in self._jobs:
            return
        elements = self._elements_for(job_id, request)
        cmdlines = await anyio.to_thread.run_sync(_proc_cmdlines)
        for element in elements:
            # A packed job's array task runs several elements (``request.slices``): it ended once all
            # their results are there, and it started once any of them did.
            covered = _covered(request, element.index)
            results = [jobfiles.result_path(request.job_dir, i) for i in covered]
            started = [jobfiles.started_path(request.job_dir, i) for i in covered]
            if await anyio.to_thread.run_sync(lambda paths=results: all(_exists(p) for p in paths)):
                element.phase, element.outcome = Phase.DONE, Outcome.COMPLETED
                continue
            pid = _find_worker(cmdlines, request.job_dir, element.index)
            if pid is not None:
                element.phase, element.pid, element.adopted = Phase.RUNNING, pid, True
                element.pid_start = _process_start(pid)
            elif await anyio.to_thread.run_sync(lambda paths=started: any(_exists(p) for p in paths)):
                element.phase, element.outcome = Phase.DONE, Outcome.FAILED  # started, no process, no result
            else:
                self._queue.append(element)  # never started: only we start local jobs
        self._jobs[job_id] = elements
        self._notify()

    async def query(self, job_ids: Collection[str]) -> dict[str, Observation]:
        out: dict[str, Observation] = {}
        adopted = [e for j in job_ids for e in self._jobs.get(j, []) if e.adopted and e.phase is Phase.RUNNING]
        if adopted:
            alive = await anyio.to_thread.run_sync(
                lambda: {e.pid: _pid_alive(e.pid, e.pid_start) for e in adopted if e.pid})
            for element in adopted:
                if not alive.get(element.pid):
                    element.phase, element.outcome = Phase.DONE, Outcome.COMPLETED  # exit status unknown
        for job_id in job_ids:
            for element in self._jobs.get(job_id, []):
                out[element.key] = element.observation()
        return out

    async def find_tags(self, tags: Collection[str]) -> dict[str, list[TaggedJob]]:
        found: dict[str, list[TaggedJob]] = {tag: [] for tag in tags}
        cmdlines = None
        for tag in tags:
            if tag in self._jobs:
                active = any(e.phase is not Phase.DONE for e in self._jobs[tag])
                found[tag].append(TaggedJob(job_id=tag, tag=tag, active=active))
                continue
            if cmdlines is None:
                cmdlines = await anyio.to_thread.run_sync(_proc_cmdlines)
            if any(
                "reflow.worker" in argv and any(f"/{tag}" in a for a in argv) for argv in cmdlines.values()
            ):
                found[tag].append(TaggedJob(job_id=tag, tag=tag, active=True))
        return found

    async def cancel(self, job_keys: Collection[str]) -> None:
        keys = set(job_keys)
        targets = [
            e for elements in self._jobs.values() for e in elements if e.key in keys or e.job_id in keys
        ]
        unknown = keys - {e.key for e in targets} - {e.job_id for e in targets}
        async with anyio.create_task_group() as tg:
            if unknown:
                tg.start_soon(self._terminate_unknown, unknown)
            for element in targets:
                if element.phase is Phase.DONE:
                    continue
                element.cancel_requested = True
                if element.phase is Phase.QUEUED:
                    element.phase, element.outcome = Phase.DONE, Outcome.CANCELLED
                elif element.pid is not None:
                    tg.start_soon(self._terminate, element)
                    if element.adopted:
                        element.phase, element.outcome = Phase.DONE, Outcome.CANCELLED
        self._notify()

    def forget(self, job_id: str) -> None:
        """Drop bookkeeping of a job whose every element the engine has concluded."""
        elements = self._jobs.get(job_id)
        if elements and all(e.phase is Phase.DONE for e in elements):
            del self._jobs[job_id]

    async def aclose(self) -> None:
        if self.kill_on_close:
            running = [e for els in self._jobs.values() for e in els if e.phase is Phase.RUNNING]
            with anyio.CancelScope(shield=True):
                async with anyio.create_task_group() as tg:
                    for element in running:
                        tg.start_soon(self._terminate, element)

    def stats(self) -> dict[str, Any]:
        return {
            "max_workers": self.max_workers,
            "slots_used": self._used,
            "queued": len(self._queue),
            "jobs": len(self._jobs),
            "started_total": self.started_total,
        }


def _covered(request: SubmitRequest, index: int | None) -> list[int | None]:
    """The elements array task *index* runs: itself, or its slice of a packed job."""
    if request.slices is not None and index is not None and 0 <= index < len(request.slices):
        return list(request.slices[index])
    return [index]


def _workers_of(keys: Collection[str]) -> list[tuple[int, str | None]]:
    """``(pid, start time)`` of each local worker (a session leader) whose job id or key is one of *keys*."""
    wanted = set(keys)
    out = []
    for pid, argv in _proc_cmdlines().items():
        if "reflow.worker" not in argv:
            continue
        try:
            if os.getpgid(pid) != pid:
                continue  # (a worker's child: its group goes with the worker's)
            with open(f"/proc/{pid}/environ", "rb") as fh:
                environ = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
        except OSError:
            continue  # gone, or not ours
        job_id = environ.get(JOB_ID_ENV.encode(), b"").decode("utf-8", "replace")
        key = environ.get(JOB_KEY_ENV.encode(), b"").decode("utf-8", "replace")
        if (job_id and job_id in wanted) or (key and key in wanted):
            out.append((pid, _process_start(pid)))
    return out


def _process_start(pid: int) -> str | None:
    """Field 22 of ``/proc/PID/stat``: when the process started, in clock ticks since boot."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int | None, start: str | None = None) -> bool:
    """*pid* runs (not a zombie) and, when *start* is known, is still the process that started then."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return start is None
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    if b") Z " in stat:
        return False  # a zombie is dead
    return start is None or stat.rsplit(b")", 1)[1].split()[19].decode() == start
