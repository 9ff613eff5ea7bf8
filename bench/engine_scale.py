"""reflowd's engine at scale, against a scheduler that finishes jobs as fast as they are submitted.

Usage::

    python bench/engine_scale.py                     # 10^4 and 10^5 elements
    python bench/engine_scale.py --sizes 10000,100000,1000000
    python bench/engine_scale.py --sizes 1000000 --held-only   # memory and idle CPU only

For each size N a private reflowd process (the real daemon: socket, store,
engine, cluster driver) runs a fan-out ``make -> square[N] -> total``. Its
one cluster has an *instant* scheduler: every element's result file exists
the moment its array job is submitted, so what is measured is the daemon's
own work. A thread pings the daemon every 20 ms throughout. Printed per size:

* elements per second, from submission to the run's success;
* persisted transitions per second (rows the store committed to its transition log);
* the daemon's CPU seconds per element, and its peak RSS;
* the slowest ``ping`` answered while the run went on, its 99th percentile and the share over 100 ms;
* then, with N instances *held* queued (the scheduler never starts them):
  resident memory per held instance, and the daemon's CPU per minute while
  nothing changes;
* then that held run cancelled: how long until the client hears it (every
  instance CANCELLED and its kill owed, committed), until every kill was taken,
  the ``scancel`` commands it took, and the slowest ping meanwhile.

Ratios are against the smallest size measured in the same invocation
(linear scaling means per-element figures stay flat), and against the goals
of issue #13 (1,000,000 instances held in <= 0.5 GB; <= 0.1 CPU-s/min idle;
>= 50,000 persisted transitions/s; ping <= 100 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_util import cpu_seconds  # noqa: E402
from reflow_client import codec, jobfiles  # noqa: E402
from reflow_client.client import Client, DaemonNotRunning  # noqa: E402

GOAL_BYTES_PER_HELD = 0.5e9 / 1e6
GOAL_IDLE_CPU_PER_MIN = 0.1
GOAL_TRANSITIONS_PER_S = 50_000
GOAL_PING_S = 0.1
#: The bench cluster's longest poll interval (``ClusterConfig.max_poll_interval``), reached while nothing changes,
#: and how long the held phase waits for it before it measures idle CPU anyway (it says so).
MAX_POLL = 60.0
SETTLE_MAX = 300.0


# ---------------------------------------------------------------------- inside the daemon process


def serve(socket: str, state_dir: str) -> None:
    """Run reflowd with one cluster, ``bench``, whose scheduler finishes every job at once."""
    import anyio

    from reflow_client.config import ClusterConfig, Config
    from reflowd.budget import Budget, MeteredTransport
    from reflowd.clusters import ClusterRuntime
    from reflowd.daemon import Daemon, DaemonOptions, tune_interpreter
    from reflowd.engine.decide import Timing
    from reflowd.logging import configure
    from reflowd.schedulers.base import (Answers, JobAnswer, Observation, Outcome, Phase, Presence, Scheduler,
                                         SubmitRequest, TaggedJob)
    from reflowd.transports.base import CommandResult, Transport

    class MemoryTransport(Transport):
        """Files in a dict of directories (the instant scheduler writes results straight into it)."""

        name = "memory"

        def __init__(self) -> None:
            super().__init__()
            self.dirs: dict[str, dict[str, bytes]] = {}

        def put(self, path: str, data: bytes) -> None:
            head, _, name = path.rpartition("/")
            self.dirs.setdefault(head, {})[name] = data

        async def run(self, argv: Sequence[str], **kw: Any) -> CommandResult:
            return CommandResult(0, "", "")

        async def read_files(self, paths: Sequence[str], *, timeout: float = 30.0) -> dict[str, bytes | None]:
            out = {}
            for p in paths:
                head, _, name = p.rpartition("/")
                out[p] = self.dirs.get(head, {}).get(name)
            return out

        async def write_files(self, files: Mapping[str, bytes], *, timeout: float = 60.0, mode: int = 0o644) -> None:
            for p, data in files.items():
                if "/inputs/" in p and b'"x"' in data and self.holding(p):
                    continue  # a held job's inputs are never read: the simulated cluster does not keep them
                self.put(p, data)

        def holding(self, path: str) -> bool:
            job = self.dirs.get(path.rsplit("/inputs/", 1)[0], {}).get("job.json")
            return job is not None and b'"task":"hold"' in job

        async def listdir(self, path: str, *, timeout: float = 30.0) -> list[str]:
            return list(self.dirs.get(path.rstrip("/"), {}))

        async def exists(self, paths: Sequence[str], *, timeout: float = 30.0) -> dict[str, bool]:
            return {p: (await self.read_files([p]))[p] is not None for p in paths}

        async def makedirs(self, paths: Sequence[str], *, timeout: float = 30.0) -> None:
            return None

    class InstantScheduler(Scheduler):
        kind = "instant"
        max_array_size = 1001

        def __init__(self, files: MemoryTransport, transport: Transport) -> None:
            self.files = files
            self.transport = transport
            self.jobs: dict[str, tuple[SubmitRequest, bool]] = {}
            self.spans: dict[str, list[tuple[int, int]]] = {}
            self.next = 1
            self.cancel_commands = 0

        async def probe(self) -> dict[str, Any]:
            """At the daemon's start: the worker process every job's simulated work runs in is started now,
            not inside a measured fan-out (an interpreter start and the bench's imports)."""
            await anyio.to_process.run_sync(_simulate, "", "", None, [], {})
            return {}

        async def submit(self, request: SubmitRequest) -> str:
            await self.transport.run(["sbatch"], idempotent=False)
            job_id = str(self.next)
            self.next += 1
            held = request.task == "hold"
            self.jobs[job_id] = (request, held)
            if not held:
                job = (await self.files.read_files([f"{request.job_dir}/job.json"]))[f"{request.job_dir}/job.json"]
                indices = list(request.indices) if request.indices is not None else [None]
                inputs = await self.files.read_files([jobfiles.inputs_path(request.job_dir, i) for i in indices])

                # The cluster's work, in another process, as on a real cluster. In a thread it held the daemon's
                # GIL: for one long C call each in a single task (``total`` decoding its 10^6 inputs: the slowest
                # pings at 10^6 were the bench's own cluster), and for half of what was counted as the daemon's
                # worker threads' CPU in an array (0.008 of 0.015 ms per element, decoding inputs and encoding
                # results). The loop pays the pickling of an array's inputs and results instead (0.001 ms).
                results = await anyio.to_process.run_sync(_simulate, request.task, request.job_dir, job, indices, inputs)
                for path, data in results.items():
                    self.files.put(path, data)
            return job_id

        async def query(self, job_ids: Collection[str]) -> Answers:
            """Job by job, as Slurm's ``squeue`` prints it: an array whose elements share a state is one
            line (``123_[0-999]``), i.e. one span."""
            await self.transport.run(["squeue"])
            out = Answers()
            for job_id in job_ids:
                request, held = self.jobs[job_id]
                phase = Phase.QUEUED if held else Phase.DONE
                obs = Observation(Presence.PRESENT, phase, None if held else Outcome.COMPLETED,
                                  "PENDING" if held else "COMPLETED", "Priority" if held else None)
                if request.indices is None:
                    out.jobs[job_id] = JobAnswer({job_id: obs})
                    continue
                spans = self.spans.get(job_id)
                if spans is None:  # runs of consecutive array task ids (as a real scheduler keeps them)
                    spans = self.spans[job_id] = []
                    for i in sorted(request.indices):
                        k = i - request.index_offset
                        if spans and spans[-1][1] == k - 1:
                            spans[-1] = (spans[-1][0], k)
                        else:
                            spans.append((k, k))
                out.jobs[job_id] = JobAnswer(spans=tuple((a, b, obs) for a, b in spans))
            return out

        async def find_tags(self, tags: Collection[str]) -> dict[str, list[TaggedJob]]:
            found: dict[str, list[TaggedJob]] = {t: [] for t in tags}
            for job_id, (request, _) in self.jobs.items():
                if request.tag in found:
                    found[request.tag].append(TaggedJob(job_id, request.tag, True))
            return found

        async def cancel(self, job_keys: Collection[str]) -> None:
            """As Slurm's adapter: an array's elements folded into ranges, commands within one argument's size."""
            from reflowd.schedulers.slurm_commands import render_scancel

            for argv in render_scancel(sorted(job_keys)):
                await self.transport.run(argv)
                self.cancel_commands += 1

        def stats(self) -> dict[str, Any]:
            return {"cancel_commands": self.cancel_commands}

        def forget(self, job_id: str) -> None:
            self.jobs.pop(job_id, None)
            self.spans.pop(job_id, None)

    class BenchDaemon(Daemon):
        def _build_clusters(self) -> dict[str, ClusterRuntime]:
            config = ClusterConfig(name="bench", scheduler="instant", max_calls_per_minute=6000.0, poll_interval=2.0,
                                   max_poll_interval=MAX_POLL)
            budget = Budget(config.max_calls_per_minute)
            files = MemoryTransport()
            metered = MeteredTransport(files, budget)
            return {"bench": ClusterRuntime(
                name="bench", config=config, transport=files, metered=metered,
                scheduler=InstantScheduler(files, metered), budget=budget, result_interval=0.5,
                timing=Timing(result_grace=10.0, lost_after=3, lost_grace=60.0))}

    from reflowd.driver.policy import PollPolicy

    # Reach the steady "nothing changes" poll interval after a few quiet polls, not twenty (the figure
    # measured is the steady state; how soon it is reached is the policy's business).
    PollPolicy.QUIET_STREAK = 3
    _exit_with_parent()
    tune_interpreter()  # (as reflowd's main does)
    configure("warning", json=True)
    config = Config(default_cluster="bench")
    options = DaemonOptions(socket_path=Path(socket), state_dir=Path(state_dir), config=config)
    _measure_callbacks(Path(state_dir) / "callbacks.json")
    _name_threads(Path(state_dir) / "threads.json")
    traced = os.environ.get("REFLOW_BENCH_TRACEMALLOC")
    if traced:  # debugging aid: where the held instances' memory is (lines allocating most, once they are held)
        _trace_memory(Path(state_dir) / "callbacks.pause", traced)
    collections = os.environ.get("REFLOW_BENCH_GC")
    if collections:  # debugging aid: every garbage collection over 20 ms (generation, objects walked)
        _time_collections(collections)
    if os.environ.get("REFLOW_BENCH_HEAP"):  # bench/engine_heap.py: what the frozen heap holds, on request
        _answer_heap(Path(state_dir) / "heap")
    stalls = os.environ.get("REFLOW_BENCH_STALLS")
    if stalls:  # debugging aid: where the event loop was when it stalled for more than 200 ms
        _watch_stalls(stalls)
    store_calls = os.environ.get("REFLOW_BENCH_STORE_CALLS")
    if store_calls:  # debugging aid: every call on an SQLite connection's thread over REFLOW_BENCH_STORE_MS of CPU
        _time_store_calls(store_calls)
    profile = os.environ.get("REFLOW_BENCH_PROFILE")
    if profile:
        import cProfile

        where = f"{profile}.{Path(state_dir).parent.name}"  # one profile for the fan-out, one for the held run
        cProfile.runctx("anyio.run(BenchDaemon(options).run)", globals(), locals(), where)
    else:
        anyio.run(BenchDaemon(options).run)


def _exit_with_parent() -> None:
    """A bench killed without its ``finally`` (SIGKILL) must not leave its daemon running (and writing into a
    temporary directory nobody removes)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="bench exit watch").start()


def _measure_callbacks(path: Path) -> None:
    """The longest single event-loop step, in CPU time of the loop's thread: how long a ``ping`` could
    have had to wait on an idle machine. (Wall-clock ping times on a shared, loaded machine also count
    the time the daemon was not scheduled at all.)"""
    import asyncio.events

    worst: dict[str, Any] = {"cpu_s": 0.0, "where": ""}
    longest: dict[str, float] = {}  # steps over 20 ms: the longest by where they ended
    original = asyncio.events.Handle._run
    measuring = [True]

    def suspended_at(owner: Any) -> str:
        """The innermost await of ours a task is stopped at ("" when none)."""
        coro, line = owner.get_coro(), ""
        while coro is not None and getattr(coro, "cr_frame", None) is not None:
            frame = coro.cr_frame
            if "/reflowd/" in frame.f_code.co_filename:  # (not anyio's or asyncio's)
                line = f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}"
            coro = getattr(coro, "cr_await", None)
        return line

    # With REFLOW_BENCH_STEPS, also where each long step began (costs a walk per callback: debugging only).
    starts = bool(os.environ.get("REFLOW_BENCH_STEPS"))

    def run(self: Any) -> None:
        if not measuring[0]:
            return original(self)
        owner = getattr(getattr(self, "_callback", None), "__self__", None)
        began = suspended_at(owner) if starts and hasattr(owner, "get_coro") else ""
        started, wall = time.thread_time(), time.perf_counter()
        original(self)
        bar = min(worst["cpu_s"], 0.02)
        if time.perf_counter() - wall <= bar:
            return  # (a thread's CPU time within a step is at most its wall time: the second system call is saved)
        spent = time.thread_time() - started
        if spent > bar:
            where = owner.get_name() if hasattr(owner, "get_name") else repr(self)[:300]
            if hasattr(owner, "get_coro"):  # where the step ended: the innermost await it stopped at
                line = suspended_at(owner)
                where += f" (from {began or '?'} until {line})" if starts else f" (until {line})" if line else ""
            longest[where] = max(longest.get(where, 0.0), spent)
            if spent > worst["cpu_s"]:
                worst["cpu_s"], worst["where"] = spent, where
            worst["over_20ms"] = dict(sorted(longest.items(), key=lambda kv: -kv[1])[:8])

    asyncio.events.Handle._run = run  # type: ignore[method-assign]

    def dump() -> None:
        while True:
            time.sleep(0.5)
            # While CPU is measured with nothing changing, measure nothing else: a thread's CPU clock
            # costs a system call (30 us on a loaded VM), twice per callback, and these writes cost too.
            measuring[0] = not path.with_suffix(".pause").exists()
            if not measuring[0]:
                continue
            path.write_text(json.dumps(worst))
            if path.with_suffix(".reset").exists():
                path.with_suffix(".reset").unlink()
                worst["cpu_s"], worst["where"] = 0.0, ""
                worst.pop("over_20ms", None)
                longest.clear()

    threading.Thread(target=dump, daemon=True, name="bench callbacks").start()
    idle_profile = os.environ.get("REFLOW_BENCH_IDLE_PROFILE")
    if idle_profile:  # debugging aid: a profile of the loop thread while nothing changes (the idle window)
        _profile_idle(path.with_suffix(".idle"), idle_profile)


def _trace_memory(marker: Path, out: str) -> None:
    import tracemalloc

    tracemalloc.start(2)

    def watch() -> None:
        while not marker.exists():
            time.sleep(0.2)
        stats = tracemalloc.take_snapshot().statistics("traceback")
        where = f"{out}.{marker.parent.parent.name}"
        with open(where, "w") as f:
            f.write(f"total {sum(s.size for s in stats):,} B in {sum(s.count for s in stats):,} blocks\n")
            for stat in stats[:40]:
                f.write(f"{stat.size:>14,} B {stat.count:>10,} blocks\n")
                for line in stat.traceback.format():
                    f.write(f"      {line}\n")

    threading.Thread(target=watch, daemon=True, name="bench tracemalloc").start()


def _profile_idle(marker: Path, out: str) -> None:
    import asyncio
    import cProfile

    profiler = cProfile.Profile()
    holder: dict[str, Any] = {"loop": None}  # the daemon's loop, seen from its first callback
    original = asyncio.events.Handle._run

    def run(self: Any) -> None:
        holder["loop"] = holder["loop"] or asyncio.get_running_loop()
        return original(self)

    asyncio.events.Handle._run = run  # type: ignore[method-assign]

    def watch() -> None:
        while not marker.exists():
            time.sleep(0.2)
        holder["loop"].call_soon_threadsafe(profiler.enable)
        while marker.exists():
            time.sleep(0.2)
        holder["loop"].call_soon_threadsafe(lambda: (profiler.disable(), profiler.dump_stats(out)))

    threading.Thread(target=watch, daemon=True, name="bench idle profile").start()


def _name_threads(path: Path) -> None:
    """Each thread's name by its kernel id, written every second: the measuring side reads each thread's CPU
    from ``/proc`` and names it (the loop, the store's writer and reader, the worker threads)."""

    def write() -> None:
        written: dict[int | None, str] = {}
        while True:
            names = {t.native_id: t.name for t in threading.enumerate()}
            if names != written:  # (only when threads came or went: the idle CPU measured is the daemon's)
                try:
                    path.with_suffix(".tmp").write_text(json.dumps(names))
                    path.with_suffix(".tmp").replace(path)
                    written = names
                except OSError:
                    pass  # (the state directory is made once the daemon starts)
            time.sleep(1.0)

    threading.Thread(target=write, daemon=True, name="bench thread names").start()


def threads_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of *pid* now (threads that ended are not there)."""
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = cpu_seconds(pid, int(task.name))
        except (OSError, ValueError, IndexError):
            continue  # (ended meanwhile)
    return out


def bench_own(before: dict[int, float], after: dict[int, float], names_path: Path) -> float:
    """CPU seconds the bench's own threads in the daemon (named ``bench ...``) spent between two readings:
    not the daemon's (on a VM whose timer wake-ups are dear, its half-second clocks were most of the idle figure)."""
    try:
        names = {int(k): v for k, v in json.loads(names_path.read_text()).items()}
    except (OSError, ValueError):
        return 0.0
    return sum(cpu - before.get(tid, 0.0) for tid, cpu in after.items() if names.get(tid, "").startswith("bench "))


def by_thread(before: dict[int, float], after: dict[int, float], names_path: Path, n: float) -> str:
    """The CPU each thread spent between two readings, in ms per *n* (elements, minutes), busiest first."""
    try:
        names = {int(k): v for k, v in json.loads(names_path.read_text()).items()}
    except (OSError, ValueError):
        names = {}
    spent: dict[str, float] = {}
    for tid, cpu in after.items():
        name = names.get(tid, f"thread {tid}")
        spent[name] = spent.get(name, 0.0) + cpu - before.get(tid, 0.0)
    busiest = sorted(spent.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{name} {ms * 1000 / n:.3f}" for name, ms in busiest if ms * 1000 / n >= 0.001)


def _time_collections(path: str) -> None:
    import gc

    out = open(path, "a", buffering=1)  # (one file for the bench's daemons: appended)
    out.write(f"=== daemon {os.getpid()}\n")
    started = [0.0, 0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[:] = time.perf_counter(), time.thread_time()
            return
        spent = time.perf_counter() - started[0]
        if spent > 0.02:  # (wall clock; the CPU figure is what the collection itself cost, load aside)
            cpu = time.thread_time() - started[1]
            out.write(f"{time.strftime('%H:%M:%S')} gen {info['generation']} {spent * 1000:.0f} ms (cpu {cpu * 1000:.0f}) "
                      f"collected {info['collected']} frozen {gc.get_freeze_count()} tracked {len(gc.get_objects())} "
                      f"in thread {threading.current_thread().name}\n")

    gc.callbacks.append(callback)


def _time_store_calls(path: str) -> None:
    """Each function run on aiosqlite's connection thread that took more than ``REFLOW_BENCH_STORE_MS`` of that
    thread's CPU (default 20): when, how long (CPU and wall), what (the SQL and how many rows) and which store
    method asked -- the calls that hold the GIL while the loop waits for it."""
    import functools

    import aiosqlite.core

    threshold = float(os.environ.get("REFLOW_BENCH_STORE_MS", "20")) / 1000
    out = open(path, "a", buffering=1)  # (one file for the bench's daemons: appended)
    out.write(f"=== daemon {os.getpid()}\n")
    original = aiosqlite.core.Connection._execute

    def asker() -> str:
        frame = sys._getframe(2)
        names = []
        while frame is not None and len(names) < 3:
            if "aiosqlite" not in frame.f_code.co_filename:
                names.append(f"{frame.f_code.co_qualname}:{frame.f_lineno}")
            frame = frame.f_back
        return " < ".join(names)

    def what(fn: Any, args: tuple[Any, ...]) -> str:
        name = getattr(fn, "__qualname__", repr(fn))
        sql = next((a for a in args if isinstance(a, str)), "")
        rows = next((len(a) for a in args if isinstance(a, list)), None)
        return f"{name} {sql.split(chr(10))[0][:70]!r}" + (f" rows {rows}" if rows is not None else "")

    async def _execute(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        asked = asker()

        def timed(*a: Any, **k: Any) -> Any:
            cpu, wall = time.thread_time(), time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent = time.thread_time() - cpu
                if spent > threshold:
                    out.write(f"{time.strftime('%H:%M:%S')} {spent * 1000:.0f} ms CPU "
                              f"({(time.perf_counter() - wall) * 1000:.0f} ms) {what(fn, a)} asked by {asked}\n")
        return await original(self, functools.wraps(fn)(timed), *args, **kwargs)

    aiosqlite.core.Connection._execute = _execute  # type: ignore[method-assign]


def _answer_heap(base: Path) -> None:
    """On ``heap.ask``, on the loop's thread: how many objects are frozen and how much of that is garbage
    (collected now, with the time it took), and the RSS; written to ``heap.json``."""
    import asyncio
    import gc

    holder: dict[str, Any] = {"loop": None}
    original = asyncio.events.Handle._run

    def run(self: Any) -> None:
        holder["loop"] = holder["loop"] or asyncio.get_running_loop()
        return original(self)

    asyncio.events.Handle._run = run  # type: ignore[method-assign]

    def answer() -> None:
        frozen = gc.get_freeze_count()
        started = time.thread_time()
        gc.unfreeze()
        found = gc.collect()
        spent = time.thread_time() - started
        gc.freeze()  # (as it was: what the daemon had frozen stays frozen)
        base.with_suffix(".json").write_text(json.dumps({"frozen": frozen, "garbage": found, "collect_s": spent,
                                                         "rss": rss(os.getpid())}))

    def watch() -> None:
        while True:
            time.sleep(0.2)
            if base.with_suffix(".ask").exists() and holder["loop"] is not None:
                base.with_suffix(".ask").unlink()
                holder["loop"].call_soon_threadsafe(answer)

    threading.Thread(target=watch, daemon=True, name="bench heap").start()


def _threads() -> list[int]:
    return [int(t) for t in os.listdir("/proc/self/task")]


def _thread_cpu(tid: int) -> float:
    try:
        return cpu_seconds(os.getpid(), tid)
    except OSError:
        return 0.0


def _watch_stalls(path: str) -> None:
    import traceback

    import anyio

    main = threading.get_ident()
    beat = [time.monotonic()]

    # A stall: the loop's thread spent this much CPU since the last heartbeat (CPU, not wall clock: on a
    # loaded machine a thread waiting for a core is not the loop's doing). One stack sample inside each.
    threshold = float(os.environ.get("REFLOW_BENCH_STALL_MS", "200")) / 1000
    clock = time.pthread_getcpuclockid(main)
    beat.append(time.clock_gettime(clock))

    def watch() -> None:
        with open(path, "a") as out:  # (one file for the bench's daemons: appended)
            out.write(f"=== daemon {os.getpid()}\n")
            last = seen_at = 0.0
            cpu_then: dict[int, float] = {}
            while True:
                time.sleep(threshold / 4)
                at, cpu_at = beat
                spent = time.clock_gettime(clock) - cpu_at
                if spent > threshold and at != last:
                    last = at
                    frame = sys._current_frames().get(main)
                    out.write(f"--- {time.strftime('%H:%M:%S')} loop stalled {spent * 1000:.0f} ms CPU"
                              f" ({(time.monotonic() - at) * 1000:.0f} ms)\n"
                              + "".join(traceback.format_stack(frame)[-14:]))
                    out.flush()
                waited = time.monotonic() - at
                if waited > 4 * threshold and at != last and spent < waited / 4:
                    # Late with little CPU of its own: the loop waited for the GIL or a core. Which thread ran
                    # meanwhile (CPU of each since the last heartbeat) and where each thread is now.
                    last = at
                    ran = {t: round((_thread_cpu(t) - cpu_then.get(t, 0.0)) * 1000) for t in _threads()}
                    names = {t.native_id: t.name for t in threading.enumerate()}
                    out.write(f"--- {time.strftime('%H:%M:%S')} loop waited "
                              f"{waited * 1000:.0f} ms with {spent * 1000:.0f} ms CPU; threads' CPU"
                              f" meanwhile (ms): { {names.get(t, t): ms for t, ms in ran.items() if ms} }\n")
                    for ident, frame in sys._current_frames().items():
                        if ident != threading.get_ident():
                            out.write(f"  thread {ident}:\n" + "".join(traceback.format_stack(frame)[-6:]))
                    out.flush()
                if at != seen_at:  # (a heartbeat came: the threads' CPU from here)
                    seen_at, cpu_then = at, {t: _thread_cpu(t) for t in _threads()}

    async def heartbeat() -> None:
        while True:
            beat[:] = time.monotonic(), time.clock_gettime(clock)
            await anyio.sleep(0.01)

    threading.Thread(target=watch, daemon=True, name="bench stall watch").start()
    from reflowd.engine import engine as engine_module

    original = engine_module.Engine.run

    async def run(self: Any, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat)
            await tg.start(original, self)
            task_status.started()

    engine_module.Engine.run = run  # type: ignore[method-assign]


def _simulate(task: str, job_dir: str, job: bytes | None, indices: list[int | None],
              inputs: dict[str, bytes | None]) -> dict[str, bytes]:
    """The instant cluster's work for one job (in a worker process): each element's result file."""
    shared = json.loads(job or b"{}")["kwargs"]
    out = {}
    for i in indices:
        kwargs = {**shared, **json.loads(inputs[jobfiles.inputs_path(job_dir, i)] or b"{}")["kwargs"]}
        output = _compute(task, kwargs)
        out[jobfiles.result_path(job_dir, i)] = jobfiles.dumps(
            {"state": "succeeded", "output": output, "output_hash": codec.value_hash(output)})
    return out


def _compute(task: str, kwargs: dict[str, Any]) -> Any:
    if task == "make":
        return list(range(int(kwargs["n"])))
    if task in ("square", "hold"):
        return int(kwargs["x"]) ** 2
    if task == "total":
        return sum(kwargs["values"])
    return None


# ---------------------------------------------------------------------- the measuring side


def manifest(held: bool) -> dict[str, Any]:
    array = "hold" if held else "square"

    def task(name: str, is_array: bool, deps: list[str], inputs: dict[str, list[dict[str, str]]],
             params: dict[str, str] | None = None) -> dict[str, Any]:
        return {"name": name, "is_array": is_array, "config": {"version": "1", "cache": False}, "dependencies": deps,
                "inputs": inputs, "params": params or {}}

    tasks = [task("make", False, [], {}, {"n": "n"}),
             task(array, True, ["make"], {"x": [{"step": "make", "mode": "fanout"}]})]
    if not held:
        tasks.append(task("total", False, [array], {"values": [{"step": array, "mode": "gather"}]}))
    return {"version": 1, "workflow": "bench", "tasks": tasks,
            "cli_params": [{"key": "n", "name": "n", "flag": "--n", "type_repr": "int", "required": True}],
            "entrypoint": str(ROOT / "bench" / "engine_scale.py"), "python": sys.executable, "working_dir": "/tmp"}


class Pinger(threading.Thread):
    def __init__(self, socket: Path) -> None:
        super().__init__(daemon=True)
        self.socket = socket
        self.waits: list[float] = []  # (one float a ping: 50 a second, a few MB for the longest run)
        self.stop = threading.Event()
        #: Debugging aid (REFLOW_BENCH_SLOW_PINGS): each ping over the goal, when, and how late the daemon answered.
        self.explain = bool(os.environ.get("REFLOW_BENCH_SLOW_PINGS"))

    def run(self) -> None:
        with Client(self.socket, timeout=600) as client:
            while not self.stop.is_set():
                started, sent = time.perf_counter(), time.time()
                answer = client.ping()
                wait = time.perf_counter() - started
                self.waits.append(wait)
                if wait > GOAL_PING_S and self.explain:  # was the wait in the daemon, or on the way back?
                    print(f"  (slow ping at {time.strftime('%H:%M:%S')}: {wait * 1000:.0f} ms, answered by the daemon "
                          f"{(answer['time'] - sent) * 1000:.0f} ms after it was sent)", file=sys.stderr, flush=True)
                time.sleep(0.02)

    def reset(self) -> dict[str, float]:
        """The pings since the last reset: the slowest, the 99th percentile and the share over the goal.
        (The slowest alone is one sample: on a shared 2-core machine it is often the machine's, not the loop's.)"""
        waits, self.waits = sorted(self.waits), []
        if not waits:
            return {"worst": 0.0, "p99": 0.0, "over": 0.0, "count": 0}
        return {"worst": waits[-1], "p99": waits[min(len(waits) - 1, int(len(waits) * 0.99))],
                "over": sum(w > GOAL_PING_S for w in waits) / len(waits), "count": len(waits)}


def rss(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def wait_state(client: Client, run_id: str, done: Any, timeout: float, every: float = 0.25) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.status(run_id).raw
        if done(status):
            return status
        time.sleep(every)
    raise TimeoutError(f"run {run_id} did not get there within {timeout:.0f} s: {status['summary']}")


class BenchDaemon:
    """A private bench reflowd (see ``serve``) in a temporary directory."""

    def __init__(self, base: Path) -> None:
        import subprocess

        base.mkdir(parents=True, exist_ok=True)
        self.base = base
        self.socket = base / "reflowd.sock"
        self.callbacks = base / "state" / "callbacks.json"
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(self.socket), str(base / "state")],
                                     stdout=open(base / "log", "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                with Client(self.socket, timeout=5) as c:
                    c.ping()
                return
            except (DaemonNotRunning, OSError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError((base / "log").read_text()[-2000:]) from None
                time.sleep(0.1)

    def worst_step(self) -> dict[str, Any]:
        return json.loads(self.callbacks.read_text())

    def reset_steps(self) -> None:
        self.callbacks.with_suffix(".reset").touch()
        time.sleep(1.2)

    def pause_steps(self) -> None:
        """Stop measuring loop steps (and writing them out): the daemon's own CPU is measured next."""
        self.callbacks.with_suffix(".pause").touch()
        time.sleep(1.2)

    def resume_steps(self) -> None:
        """Measure loop steps again, from nothing (after ``pause_steps``)."""
        self.callbacks.with_suffix(".pause").unlink(missing_ok=True)
        self.reset_steps()

    def stop(self) -> None:
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:  # (its directory is removed next: it must not be writing there)
            self.proc.kill()
            self.proc.wait()


def _fanout(tmp: Path, n: int) -> tuple[float, float, tuple[float, float], float, dict[str, float], dict[str, Any]]:
    """The whole fan-out ``make -> square[n] -> total``, as fast as the daemon can."""
    d = BenchDaemon(tmp / "run")
    pinger = Pinger(d.socket)
    pinger.start()
    try:
        with Client(d.socket, timeout=600) as client:
            stats0 = client.stats()
            d.reset_steps()
            cpu0, loop0 = cpu_seconds(d.proc.pid), cpu_seconds(d.proc.pid, d.proc.pid)
            threads0 = threads_cpu(d.proc.pid)
            pinger.reset()
            started = time.monotonic()
            run_id = client.submit(manifest(False), {"n": n}, str(d.base / "work"), cluster="bench").run_id
            # Asked every 20 ms (as the pings): at 10^4 the fan-out takes about a second, and asking every 250 ms
            # added 125 ms to it on average (a tenth) -- the bench's own wait, not the daemon's.
            status = wait_state(client, run_id, lambda s: s["run"]["state"] != "running", timeout=3600, every=0.02)
            elapsed = time.monotonic() - started
            assert status["run"]["state"] == "succeeded", status["run"]
            client.runs()  # (the daemon flushes its store before listing runs)
            stats1 = client.stats()
            threads1 = threads_cpu(d.proc.pid)
            cpu_run = cpu_seconds(d.proc.pid) - cpu0 - bench_own(threads0, threads1, d.callbacks.with_name("threads.json"))
            cpu_loop = cpu_seconds(d.proc.pid, d.proc.pid) - loop0  # the event loop's thread; the rest: the store's writer
            pings = pinger.reset()
            print(f"  (n={n:,}: CPU by thread during the fan-out, ms per element: "
                  f"{by_thread(threads0, threads1, d.callbacks.with_name('threads.json'), n)})",
                  file=sys.stderr)
            worst_step = d.worst_step()
            transitions = stats1["store"]["transitions"] - stats0["store"]["transitions"]
            if "transition_rows" in stats1["store"]:  # (schema 6: a group of elements is one row)
                rows = stats1["store"]["transition_rows"] - stats0["store"]["transition_rows"]
                print(f"  (n={n:,}: {transitions:,.0f} transitions persisted in {rows:,} log rows)", file=sys.stderr)
            peak = rss(d.proc.pid, "VmHWM")
    finally:
        pinger.stop.set()
        d.stop()
    return elapsed, transitions, (cpu_run, cpu_loop), peak, pings, worst_step


def store_capacity(n: int, directory: Path) -> tuple[float, float]:
    """Transitions per second the store's writer persists when fed as fast as it takes them
    (``bench/store_writer.py``: *n* instances each taken through four states by the engine's ledger).
    This is the group commit's own rate; the fan-out's rate above is bounded by the engine's work per
    element. Returns transitions per second of wall-clock time and per CPU-second of this process."""
    sys.path.insert(0, str(ROOT / "bench"))
    import store_writer

    result = store_writer.measure(n, directory)
    return result["per_s"], result["per_cpu_s"]


class _SkipIdle(Exception):
    """Idle CPU is not measured in this invocation."""


def measure(n: int, idle_seconds: float, fanout: bool = True) -> dict[str, Any]:
    nan = float("nan")
    elapsed = transitions = cpu_run = cpu_loop = peak = nan
    pings: list[dict[str, float]] = []
    worst_step: dict[str, Any] = {"cpu_s": 0.0, "where": ""}
    cancel = {"cancel_s": nan, "kills_taken_s": nan, "cancel_commands": nan, "cancel_worst_ping_ms": nan,
              "cancel_worst_step_ms": nan, "cancel_worst_step_where": ""}
    with tempfile.TemporaryDirectory(prefix="reflow-bench-") as tmp:  # (removed on Ctrl-C and SIGTERM too: main)
        capacity, capacity_cpu = store_capacity(min(n, 100_000), Path(tmp))  # 0. The store's writer alone (a rate: 10^5 will do).
        if fanout:  # 1. The whole fan-out, as fast as the daemon can.
            elapsed, transitions, (cpu_run, cpu_loop), peak, fanout_pings, worst_step = _fanout(Path(tmp), n)
            pings.append(fanout_pings)
        # 2. In a fresh daemon, N instances held queued: memory, then CPU while nothing changes.
        d = BenchDaemon(Path(tmp) / "held")
        pinger = Pinger(d.socket)
        pinger.start()
        try:
            with Client(d.socket, timeout=600) as client:
                d.reset_steps()
                before = rss(d.proc.pid)
                held_id = client.submit(manifest(True), {"n": n}, str(d.base / "work"), cluster="bench").run_id
                wait_state(client, held_id, lambda s: s["summary"].get("hold", {}).get("queued") == n, timeout=3600)
                client.runs()
                time.sleep(2.0)
                held_bytes = (rss(d.proc.pid) - before) / n
                pings.append(pinger.reset())
                held_step = d.worst_step()
                if held_step["cpu_s"] > worst_step["cpu_s"]:
                    worst_step = held_step
                pinger.stop.set()  # its own pings would be most of an idle daemon's work
                d.pause_steps()
                traced = os.environ.get("REFLOW_BENCH_TRACEMALLOC")
                if traced:  # (the daemon writes where its memory is once steps are paused)
                    for _ in range(1200):
                        if Path(f"{traced}.held").exists():
                            break
                        time.sleep(0.5)
                    time.sleep(1.0)
                try:
                    idle_cpu = _idle_cpu(client, d, n, idle_seconds)
                except _SkipIdle:
                    idle_cpu = nan
                cancel = _cancel_held(client, d, held_id)  # 3. Then the held run cancelled, as a user would.
        finally:
            pinger.stop.set()
            d.stop()
    return {
        "n": n,
        "seconds": elapsed,
        "elements_per_s": n / elapsed,
        "transitions": transitions,
        "transitions_per_s": transitions / elapsed,
        "store_transitions_per_s": capacity,
        "store_transitions_per_cpu_s": capacity_cpu,
        "cpu_per_element_ms": cpu_run / n * 1000,
        "loop_cpu_per_element_ms": cpu_loop / n * 1000,
        "peak_rss_mb": peak / 1e6,
        "worst_ping_ms": max((p["worst"] for p in pings), default=0.0) * 1000,
        "p99_ping_ms": max((p["p99"] for p in pings), default=0.0) * 1000,
        "pings_over_goal": sum(p["over"] * p["count"] for p in pings) / max(1, sum(p["count"] for p in pings)) * 100,
        "worst_step_ms": worst_step["cpu_s"] * 1000,
        "worst_step_where": worst_step["where"],
        "steps_over_20ms": worst_step.get("over_20ms", {}),
        "held_bytes_per_instance": held_bytes,
        "idle_cpu_s_per_min": idle_cpu,
        **cancel,
    }


def _idle_cpu(client: Client, d: BenchDaemon, n: int, idle_seconds: float) -> float:
    """The daemon's CPU seconds per minute while N held instances wait and nothing changes."""
    if idle_seconds <= 0:  # (--idle 0: memory and the fan-out only)
        raise _SkipIdle
    # "Nothing changes" from here: wait until the polls have slowed to their longest interval
    # (about 150 s of quiet polls with the bench's policy), at most SETTLE_MAX.
    settle_deadline = time.monotonic() + SETTLE_MAX
    while (interval := client.stats()["clusters"]["bench"]["poll_interval"]) < MAX_POLL:
        if time.monotonic() > settle_deadline:
            print(f"  (n={n:,}: idle CPU measured at a poll interval of {interval:.0f} s: the longest,"
                  f" {MAX_POLL:.0f} s, not reached within {SETTLE_MAX:.0f} s)", flush=True)
            break
        time.sleep(2.0)
    idle0, idle_threads = cpu_seconds(d.proc.pid), threads_cpu(d.proc.pid)
    d.callbacks.with_suffix(".idle").touch()  # (only REFLOW_BENCH_IDLE_PROFILE looks at it)
    time.sleep(idle_seconds)
    idle1, idle_threads1 = cpu_seconds(d.proc.pid), threads_cpu(d.proc.pid)
    names = d.callbacks.with_name("threads.json")
    idle_cpu = (idle1 - idle0 - bench_own(idle_threads, idle_threads1, names)) / idle_seconds * 60
    print(f"  (n={n:,}: CPU by thread while nothing changes, ms per minute: "
          f"{by_thread(idle_threads, idle_threads1, names, idle_seconds / 60)}; the bench's own not counted)",
          file=sys.stderr)
    d.callbacks.with_suffix(".idle").unlink()
    time.sleep(0.5)
    return idle_cpu


def _cancel_commands(client: Client) -> int:
    return int(client.stats()["clusters"]["bench"]["scheduler_stats"].get("cancel_commands", 0))


def _cancel_held(client: Client, d: BenchDaemon, run_id: str) -> dict[str, float]:
    """Cancel the held run: how long until the client hears it (every instance CANCELLED and its kill owed,
    committed), then until every kill was taken (none owed), the scheduler's cancel commands, and the
    pings meanwhile."""
    d.resume_steps()
    pinger = Pinger(d.socket)
    pinger.start()
    try:
        before = _cancel_commands(client)
        started = time.monotonic()
        client.cancel(run_id)
        heard = time.monotonic() - started
        deadline = started + 3600
        while client.stats()["clusters"]["bench"].get("owed_kills", 0) and time.monotonic() < deadline:
            time.sleep(0.02)
        drained = time.monotonic() - started
        commands = _cancel_commands(client) - before
    finally:
        pinger.stop.set()
        pinger.join()
    pings = pinger.reset()
    time.sleep(1.0)  # (the daemon writes its longest step every half second)
    step = d.worst_step()
    return {"cancel_s": heard, "kills_taken_s": drained, "cancel_commands": commands,
            "cancel_worst_ping_ms": pings["worst"] * 1000, "cancel_worst_step_ms": step["cpu_s"] * 1000,
            "cancel_worst_step_where": step["where"]}


def report(results: list[dict[str, Any]]) -> None:
    base = results[0]
    print(f"\nreflowd engine benchmark (instant scheduler; ratios against n={base['n']:.0f} in this run)")
    rows = [
        ("elements/s", "elements_per_s", "{:,.0f}", None),
        ("persisted transitions/s", "transitions_per_s", "{:,.0f}", f">= {GOAL_TRANSITIONS_PER_S:,}"),
        ("  store writer alone", "store_transitions_per_s", "{:,.0f}", f">= {GOAL_TRANSITIONS_PER_S:,}"),
        ("  per CPU-second", "store_transitions_per_cpu_s", "{:,.0f}", "(the writer alone; load-independent)"),
        ("daemon CPU per element", "cpu_per_element_ms", "{:.3f} ms", "flat (linear)"),
        ("  of it the loop thread", "loop_cpu_per_element_ms", "{:.3f} ms", "(the rest: the store's writer, file-reading threads)"),
        ("peak RSS", "peak_rss_mb", "{:,.0f} MB", None),
        ("slowest ping meanwhile", "worst_ping_ms", "{:,.0f} ms", f"<= {GOAL_PING_S * 1000:.0f} ms"),
        ("  99th percentile", "p99_ping_ms", "{:,.0f} ms", "(of the pings every 20 ms, fan-out and held phases)"),
        ("  pings over the goal", "pings_over_goal", "{:.2f} %", None),
        ("longest loop step (CPU)", "worst_step_ms", "{:,.0f} ms", "a ping's wait on an idle machine"),
        ("RSS per held instance", "held_bytes_per_instance", "{:,.0f} B", f"<= {GOAL_BYTES_PER_HELD:.0f} B"),
        ("CPU while nothing changes", "idle_cpu_s_per_min", "{:.3f} s/min", f"<= {GOAL_IDLE_CPU_PER_MIN} s/min"),
        ("cancel of the held run", "cancel_s", "{:.2f} s", "(until the client hears it: all CANCELLED, kills owed)"),
        ("  until every kill taken", "kills_taken_s", "{:.2f} s", None),
        ("  scancel commands", "cancel_commands", "{:,.0f}", "(an array's elements folded into ranges)"),
        ("  slowest ping meanwhile", "cancel_worst_ping_ms", "{:,.0f} ms", f"<= {GOAL_PING_S * 1000:.0f} ms"),
        ("  longest loop step (CPU)", "cancel_worst_step_ms", "{:,.0f} ms", None),
    ]
    header = f"  {'':28}" + "".join(f"{'n=' + format(int(r['n']), ','):>22}" for r in results) + "   goal"
    print(header)
    for label, key, fmt, goal in rows:
        cells = []
        for r in results:
            if r[key] != r[key]:  # NaN: not measured (--held-only)
                cells.append(f"{'n/a':>22}")
                continue
            cell = fmt.format(r[key])
            if r is not base and abs(base[key]) > 1e-9 and base[key] == base[key]:  # (a CPU figure of 0 is 1e-17)
                cell += f" ({r[key] / base[key]:.2f}x)"
            cells.append(f"{cell:>22}" if len(cell) < 22 else f" {cell}")
        print(f"  {label:28}" + "".join(cells) + (f"   {goal}" if goal else ""))
    for r in results:
        if r["seconds"] != r["seconds"]:
            print(f"  n={int(r['n']):,} (held only): longest step in {r['worst_step_where'][:150]}; during the cancel in "
                  f"{r['cancel_worst_step_where'][:150]}")
            continue
        print(f"  n={int(r['n']):,}: {r['seconds']:.1f} s for the fan-out, {int(r['transitions']):,} transitions persisted;"
              f" longest step in {r['worst_step_where'][:150]}; during the cancel in {r['cancel_worst_step_where'][:150]}")
        if os.environ.get("REFLOW_BENCH_STEPS"):  # debugging aid: every kind of step over 20 ms
            for where, spent in r["steps_over_20ms"].items():
                print(f"      {spent * 1000:6.0f} ms  {where[:150]}")
    print(f"  (machine load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


def _interrupt_on_termination() -> None:
    """SIGTERM and SIGHUP end the bench like Ctrl-C: its ``finally`` blocks stop the daemons and remove the
    temporary directory (1.5 GB at 10^6) instead of leaving them behind."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds to measure CPU while nothing changes (0: not measured)")
    parser.add_argument("--held-only", action="store_true",
                        help="skip the fan-out; measure memory and idle CPU with N instances held (e.g. for 10^6)")
    parser.add_argument("--serve", nargs=2, metavar=("SOCKET", "STATE_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(*args.serve)
        return 0
    _interrupt_on_termination()
    try:
        results = [measure(int(n), args.idle, fanout=not args.held_only) for n in args.sizes.split(",")]
    except KeyboardInterrupt as exc:  # (its directories are removed by now; a store thread must not keep it alive)
        print(f"interrupted ({exc or 'Ctrl-C'}); temporary files removed", file=sys.stderr, flush=True)
        os._exit(130)
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
