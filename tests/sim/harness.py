"""One seeded scenario: the real engine, store and driver against a simulated cluster, crashing at will.

A scenario draws from its seed: how often answers are lost, delayed or
unknown, jobs dropped and results held back; which runs a client submits,
cancels and retries, and when; and how many times the daemon dies, at which
loop step. Each "life" of the daemon is the real ``Engine`` with the real
``Store`` (SQLite inline, on a file that survives the crash) and the real
cluster driver; only the scheduler, transport and clock are simulated.

Invariants are checked every simulated half second and at the end:

* no submission tag reaches the scheduler twice;
* no attempt of a task instance executes twice (exactly once unless a retry was asked for);
* no illegal transition is attempted, and the persisted transition log holds only legal ones;
* every instance in flight is followed by its cluster's driver (nothing orphaned);
* the per-task state counts match the instances;
* after a crash, the store reloads to exactly what memory held at the last commit (owed kills too);
* every kill owed at a crash (a row in the store's ``kills``) reaches the scheduler after the restart, its job
  is not left queued or running, and the final store owes none (a look-up owed by tag: the tag is looked up
  after the restart, and no job carrying it is left queued or running);
* every run terminates, and a run that succeeded has the right answer.
"""

from __future__ import annotations

import hashlib
import math
import random
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from reflow_client.config import ClusterConfig
from reflow_client.manifest import CliParamManifest, InputSource, Manifest, TaskManifest
from reflowd import world
from reflowd.budget import Budget, MeteredTransport
from reflowd.clusters import ClusterRuntime
from reflowd.driver.driver import BY_TAG
from reflowd.engine.decide import Timing
from reflowd.engine.engine import Engine, EngineSettings
from reflowd.engine.model import Run
from reflowd.engine.states import (
    IN_FLIGHT,
    RUN_TERMINAL,
    TERMINAL,
    RunState,
    State,
    TaskState,
    is_legal,
    is_legal_run,
    is_legal_task,
)
from reflowd.schedulers.base import Phase
from reflowd.store import INSTANCES, JOBS, RUNS, TASKS, Store

from .cluster import Faults, SimCluster, SimScheduler, SimTransport
from .loop import Crash, Stalled, VirtualLoop, abandon, deterministic_anyio
from .sqlite_inline import Connector, inline

START = 1_700_000_000.0
TICK = 0.5
CHECK_EVERY = 5.0  # the invariants are checked at least this often (and on every tick)
FAULTY_FOR = 150.0  # seconds of trouble; then answers stop going missing
DEADLINE = 2400.0  # every run must have ended by then
SNAPSHOT_WINDOW = 400  # loop steps before a crash within which commits are remembered in full


def replay_command(seed: int) -> str:
    return f"{sys.executable} -m tests.sim {seed}"


def manifest(retries: int) -> Manifest:
    def task(name: str, array: bool, inputs: dict[str, list[tuple[str, str]]], deps: list[str],
             params: dict[str, str] | None = None, **config: Any) -> TaskManifest:
        return TaskManifest(name=name, is_array=array, config={"version": "1", "time": "00:10:00", **config},
                            dependencies=deps, params=params or {},
                            inputs={p: [InputSource(s, m) for s, m in srcs] for p, srcs in inputs.items()})

    return Manifest(
        workflow="sim",
        tasks=[
            task("make", False, {}, [], params={"n": "n"}),
            task("square", True, {"x": [("make", "fanout")]}, ["make"], retries=retries),
            task("bump", True, {"y": [("square", "chain")]}, ["square"]),
            task("total", False, {"values": [("bump", "gather")]}, ["bump"]),
        ],
        cli_params=[CliParamManifest(key="n", name="n", flag="--n", type_repr="int", required=True)],
        entrypoint="/sim/flow.py",
        python="python3",
        working_dir="/sim",
    )


@dataclass
class Action:
    at: float
    kind: str  # submit, cancel, retry
    slot: int  # which of the client's runs
    n: int = 0
    retries: int = 0
    on_error: str = "continue"
    force: bool = False


@dataclass
class Report:
    seed: int
    lives: int = 0
    crashes: int = 0
    crash_sites: set[str] = field(default_factory=set)
    steps: int = 0
    runs: int = 0
    states: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    reloads_checked: int = 0
    reloads_unverified: int = 0
    kills_owed_at_crash: int = 0  # owed kills a restarted life found in the store (each must go out)
    virtual_seconds: float = 0.0
    #: Everything observable, in order: the cluster's trace, each life's loop steps, the final store.
    trace: list[Any] = field(default_factory=list, repr=False)

    @property
    def digest(self) -> str:
        return hashlib.sha256(repr(self.trace).encode()).hexdigest()[:16]

    @property
    def ok(self) -> bool:
        return not self.violations


class SimStore(Store):
    """The real store, telling the harness what memory held when each batch was taken for commit."""

    def __init__(self, path: Path, harness: Harness, connect: Connector) -> None:
        super().__init__(path, connect=connect, offload=inline)
        self.harness = harness

    async def _commit_pending(self) -> None:
        snapshot = self.harness.snapshot_for_commit() if self._pending else None
        if snapshot is not None:
            self.harness.committing = snapshot
        before = self.commits
        await super()._commit_pending()
        if self.commits > before:
            self.harness.committed = snapshot  # None: a commit we did not watch (far from the crash)
            self.harness.committing = None


class Harness:
    def __init__(self, seed: int, workdir: Path) -> None:
        self.seed = seed
        rng = random.Random(seed)
        self.rng = rng
        level = rng.choice([0.0, 0.5, 1.0, 1.5])
        self.faults = Faults.draw(rng, level)
        self.cluster = SimCluster(random.Random(rng.getrandbits(64)), self.faults, slots=rng.choice([2, 4, 16]))
        self.ids = random.Random(rng.getrandbits(64))
        self.plan = self._plan(rng)
        crashes = rng.choice([0, 1, 1, 2, 3])
        self.crash_points = [rng.randint(1, rng.choice([300, 1500, 6000])) for _ in range(crashes)]
        self.db = workdir / f"sim-{seed}.sqlite"
        self.report = Report(seed)
        self.clock = START
        self.loop: VirtualLoop | None = None
        self.engine: Engine | None = None
        self.done_actions: set[int] = set()
        self.client_runs: dict[int, str] = {}
        self.committed: dict[tuple[str, Any], tuple[Any, ...]] | None = None
        self.committing: dict[tuple[str, Any], tuple[Any, ...]] | None = None
        self.snapshot_from_step = 0
        #: Job keys whose kill the store owed when a life began after a crash, and when that life began.
        self.owed_after_crash: dict[str, float] = {}
        self._moved: tuple[int, ...] = ()
        self._ticks = 0

    @staticmethod
    def _plan(rng: random.Random) -> list[Action]:
        actions = []
        for slot in range(rng.choice([1, 1, 2, 3])):
            actions.append(Action(at=rng.uniform(0, 40), kind="submit", slot=slot, n=rng.choice([0, 1, 3, 7, 12, 20]),
                                  retries=rng.choice([0, 0, 1, 2]), on_error=rng.choice(["continue", "stop"]),
                                  force=rng.random() < 0.3))
            if rng.random() < 0.3:
                actions.append(Action(at=rng.uniform(5, 120), kind="cancel", slot=slot))
            if rng.random() < 0.3:
                actions.append(Action(at=rng.uniform(100, 400), kind="retry", slot=slot))
        return sorted(actions, key=lambda a: a.at)

    # ------------------------------------------------------------------ running

    def run(self) -> Report:
        world.install(world.World(now=self._now, monotonic=self._now,
                                  token_hex=lambda n: f"{self.ids.getrandbits(8 * n):0{2 * n}x}"))
        try:
            with deterministic_anyio():
                for life, crash_at in enumerate([*self.crash_points, None]):
                    self.report.lives += 1
                    crashed = self._life(life, crash_at)
                    if not crashed:
                        break
                    self.report.crashes += 1
                    self._downtime()
                self._final_checks()
        except Stalled as exc:
            self.report.violations.append(f"the simulation stalled: {exc}")
        finally:
            world.install(None)
        self.report.virtual_seconds = self.clock - START
        self.report.trace = [*self.cluster.trace, *self.report.trace]
        return self.report

    def _now(self) -> float:
        return self.loop.virtual if self.loop is not None else self.clock

    def _life(self, life: int, crash_at: int | None) -> bool:
        loop = VirtualLoop(start=self.clock)
        loop.crash_at = crash_at
        self.loop = loop
        self.snapshot_from_step = (crash_at - SNAPSHOT_WINDOW) if crash_at is not None else 1 << 62
        connector = Connector()
        try:
            loop.run_until_complete(self._main(life, connector))
            return False
        except Crash:
            self.report.crash_sites.update(_suspended_sites(loop))
            connector.crash()  # kill -9: nothing more reaches the database
            return True
        finally:
            self.report.steps += loop.steps
            self.cluster.trace.append((loop.virtual, "life ended", loop.steps))
            self.clock = loop.virtual
            self.engine = None
            self.loop = None
            abandon(loop)

    def _downtime(self) -> None:
        """The cluster goes on while the daemon is down."""
        down = self.rng.choice([0.0, 2.0, 30.0, 120.0])
        end = self.clock + down
        while self.clock < end:
            self.clock += TICK
            self.cluster.tick(self.clock)

    async def _main(self, life: int, connector: Connector) -> None:
        store = SimStore(self.db, self, connector)
        await store.open()
        if life > 0:
            await self._check_reload(store)
            for kill in await store.owed_kills("sim"):
                self.owed_after_crash.setdefault(kill.job_key, self._now())
                self.report.kills_owed_at_crash += 1
        self.committed = await db_rows(store)  # until the first commit of this life, the store holds this
        self.committing = None
        runtime = self._runtime()
        engine = Engine(store, {"sim": runtime}, EngineSettings(retry_backoff=1.0, retry_backoff_max=8.0))
        self.engine = engine
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.run_writer)
                await tg.start(engine.run)
                tg.start_soon(self._ticker)
                tg.start_soon(self._client)
                await self._until_settled(engine)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await engine.close()
                await store.close()

    def _runtime(self) -> ClusterRuntime:
        # Half the seeds answer job by job (``Answers``, spans of elements that share a state), half flat.
        return sim_runtime(self.cluster, self._now, compact=self.seed % 2 == 0)

    async def _ticker(self) -> None:
        """The cluster's clock: a tick on every TICK boundary at which something is due (at least every
        CHECK_EVERY seconds, for the invariants), so an idle stretch costs nothing."""
        while True:
            now = self._now()
            due = self.cluster.next_due(now + TICK)
            if now - START < FAULTY_FOR:
                due = min(due, START + FAULTY_FOR)
            wake = max(now + TICK, min(due, now + CHECK_EVERY))
            wake = START + math.ceil((wake - START) / TICK - 1e-9) * TICK
            self.cluster.woken = anyio.Event()
            with anyio.move_on_after(wake - now):
                await self.cluster.woken.wait()
            if self._now() < wake:  # a submission: tick at the next boundary
                await anyio.sleep(START + math.ceil((self._now() - START) / TICK + 1e-9) * TICK - self._now())
            now = self._now()
            if now - START >= FAULTY_FOR and self.cluster.faults is self.faults:
                self.cluster.faults = self.faults.quiet()
            self.cluster.tick(now)
            self._check_step()

    async def _client(self) -> None:
        assert self.engine is not None
        engine = self.engine
        for i, action in enumerate(self.plan):
            if i in self.done_actions:
                continue
            delay = START + action.at - self._now()
            if delay > 0:
                await anyio.sleep(delay)
            self.done_actions.add(i)  # a crash mid-request: the client saw an error and does not try again
            try:
                if action.kind == "submit":
                    options = {"on_error": action.on_error, "force": action.force}
                    run = await engine.submit_run(manifest(action.retries), {"n": action.n}, "/sim/run", "sim", options)
                    self.client_runs[action.slot] = run.id
                elif action.slot in self.client_runs:
                    run_id = self.client_runs[action.slot]
                    if action.kind == "cancel":
                        await engine.cancel(run_id)
                    else:
                        await engine.retry(run_id)
            except Exception as exc:  # the engine refused: that is an answer, not a violation
                if self.engine is not engine:
                    raise  # (the life died mid-request: its abandoned tasks' clean-up fails, which is no answer)
                if "store" not in str(exc):
                    self.report.violations.append(f"client {action.kind} raised {type(exc).__name__}: {exc}")

    async def _until_settled(self, engine: Engine) -> None:
        while True:
            await anyio.sleep(5.0)
            if self._now() - START > DEADLINE:
                active = [f"{r.id}:{r.state.value}:{r.summary()}" for r in engine.runs.values()
                          if r.state not in RUN_TERMINAL]
                self.report.violations.append(f"runs never finished: {active[:3]}")
                return
            if len(self.done_actions) < len(self.plan):
                continue
            if all(r.state in RUN_TERMINAL for r in engine.runs.values()) and not any(
                    d.tracks or d.unresolved or d.owed for d in engine.drivers.values()):
                return

    # ------------------------------------------------------------------ invariants

    def violation(self, text: str) -> None:
        if len(self.report.violations) < 20:
            self.report.violations.append(f"t={self._now() - START:.1f}s: {text}")

    def _check_step(self) -> None:
        engine = self.engine
        if engine is None:
            return
        if self.cluster.duplicates:
            self.violation(f"{self.cluster.duplicates[:5]}")
            self.cluster.duplicates.clear()
        if engine.counters["illegal_transitions"]:
            self.violation(f"{engine.counters['illegal_transitions']} illegal transition(s) attempted")
        # The walk below costs every instance: do it when something moved, and every few seconds anyway
        # (an orphaned instance never moves again, so it is still caught).
        c = engine.counters
        moved = (c["transitions"], c["task_transitions"], c["run_transitions"], c["runs_submitted"],
                 len(engine.runs))
        self._ticks += 1
        if moved == self._moved and self._ticks % 10:
            return
        self._moved = moved
        driver = engine.drivers["sim"]
        followed = {(id(i)) for t in [*driver.tracks.values(), *driver.unresolved.values()] for i in t.live.values()}
        for problem in driver_index_problems(driver):
            self.violation(problem)
        for run in engine.runs.values():
            for tr in run.tasks.values():
                actual = Counter(i.state for i in tr.instances.values())
                if +actual != +tr.counts:
                    self.violation(f"{run.id}/{tr.name}: counts {dict(+tr.counts)} but instances {dict(actual)}")
                for inst in tr.instances.values():
                    if inst.state in IN_FLIGHT and id(inst) not in followed:
                        self.violation(f"{run.id}/{inst.label} is {inst.state.value} (tag {inst.tag}) "
                                       "but no driver follows it")

    def snapshot_for_commit(self) -> dict[tuple[str, Any], tuple[Any, ...]] | None:
        """What memory holds now, row by row (only close to a planned crash: it costs a full walk)."""
        if self.engine is None or self.loop is None or self.loop.steps < self.snapshot_from_step:
            return None
        return memory_rows(self.engine)

    async def _check_reload(self, store: Store) -> None:
        """After a crash: the store must hold exactly what memory held at the last commit."""
        candidates = [c for c in (self.committed, self.committing) if c is not None]
        if self.committed is None:  # the last commit happened far from the crash: only the one under way is known
            self.report.reloads_unverified += 1
            return
        found = await db_rows(store)
        for snap in candidates:
            got = {k: v for k, v in found.items() if k[0] not in ("jobs", "kills") and (k[1][0] in _runs_of(snap))}
            got.update({k: found[k] for k in snap if k[0] == "jobs" and k in found})
            got.update({k: v for k, v in found.items() if k[0] == "kills"})
            if got == snap:
                self.report.reloads_checked += 1
                return
        snap = candidates[0]
        got = {k: v for k, v in found.items() if k[0] not in ("jobs", "kills") and (k[1][0] in _runs_of(snap))}
        got.update({k: v for k, v in found.items() if k[0] == "kills"})
        keys = sorted(set(snap) ^ set(k for k in got), key=str)[:3] + \
            [k for k in snap if k in got and snap[k] != got[k]][:3]
        detail = [(k, snap.get(k), got.get(k)) for k in keys]
        self.violation(f"store after the crash differs from memory at the last commit: {detail}")

    def _final_checks(self) -> None:
        loop = VirtualLoop(start=self.clock)
        self.loop = loop
        try:
            loop.run_until_complete(self._final_async())
        finally:
            self.clock = loop.virtual
            self.loop = None
            abandon(loop)

    async def _final_async(self) -> None:
        store = Store(self.db, connect=Connector(), offload=inline)
        await store.open()
        try:
            left = [k.job_key for k in await store.owed_kills("sim")]
            if left:
                self.violation(f"kills still owed at the end: {left[:5]}")
            rows = await store.list_runs(limit=1000)
            self.report.runs = len(rows)
            for row in rows:
                run = await store.load_run(row["id"])
                assert run is not None
                self.report.states[run.state.value] += 1
                self._check_final_run(run)
                self.report.trace.append(sorted(run_rows(run).items(), key=repr))
                for t in await store.transitions(run.id):
                    self._check_logged_transition(run.id, t)
                    self.report.trace.append(tuple(t.values()))
        finally:
            await store.close()
        self._check_owed_kills()
        for key, n in self.cluster.executions.items():
            if n > 1:
                self.violation(f"attempt executed {n} times: {key}")
        twice = [t for t, n in self.cluster.submissions.items() if n > 1]
        if twice:
            self.violation(f"tag(s) submitted twice: {twice}")

    def _check_owed_kills(self) -> None:
        """Every kill owed at a crash went out after the restart, and its job is not queued or running."""
        for key, since in self.owed_after_crash.items():
            if key.startswith(BY_TAG):  # a look-up owed (``Driver.owe_lookup``): the tag looked up, its jobs ended
                tag = key[len(BY_TAG):]
                if not any(e[1] == "find" and tag in e[2] and e[0] >= since for e in self.cluster.trace):
                    self.violation(f"the look-up of {tag}, owed at a crash, was never made after the restart")
                alive = [e.key for job_id in self.cluster.by_tag.get(tag, []) for e in self.cluster.jobs[job_id].elements.values()
                         if e.phase is not Phase.DONE]
                if alive:
                    self.violation(f"a look-up of {tag} was owed at a crash, but {alive[:3]} still queue or run")
                continue
            if not any(e[1] == "cancel" and key in e[2] and e[0] >= since for e in self.cluster.trace):
                self.violation(f"the kill of {key}, owed at a crash, never reached the scheduler after the restart")
            alive = [e.key for job in self.cluster.jobs.values() for e in job.elements.values()
                     if (e.key == key or job.job_id == key) and e.phase is not Phase.DONE]
            if alive:
                self.violation(f"the kill of {key} was owed at a crash, but {alive[:3]} still queue or run")

    def _check_final_run(self, run: Run) -> None:
        if run.state not in RUN_TERMINAL:
            self.violation(f"run {run.id} did not end: {run.state.value} {run.summary()}")
            return
        for inst in run.instances():
            if inst.state not in TERMINAL:
                self.violation(f"run {run.id} ended {run.state.value} with {inst.label} still {inst.state.value}")
            if inst.state is State.SUCCEEDED:
                key = (run.id, inst.task, inst.index, inst.attempt)
                if key not in self.cluster.outputs:
                    self.violation(f"{run.id}/{inst.label} succeeded in attempt {inst.attempt}, which never ran")
                elif self.cluster.outputs[key] != inst.output:
                    self.violation(f"{run.id}/{inst.label} output {inst.output!r} != {self.cluster.outputs[key]!r}")
        if run.state is RunState.SUCCEEDED:
            n = int(run.params["n"])
            total = run.tasks["total"].instances.get(None)
            want = sum(x * x + 1 for x in range(n))
            if total is None or total.output != want:
                self.violation(f"run {run.id} succeeded with total {total.output if total else None!r}, not {want}")
        attempts_ran: dict[tuple[str, int | None], int] = Counter()
        for (run_id, task, index, _attempt), _n in self.cluster.executions.items():
            if run_id == run.id:
                attempts_ran[(task, index)] += 1
        for (task, index), ran in attempts_ran.items():
            inst = run.instance(task, index)
            if inst is not None and ran > inst.attempt:
                self.violation(f"{run.id}/{inst.label} executed {ran} times in {inst.attempt} attempt(s)")

    def _check_logged_transition(self, run_id: str, t: dict[str, Any]) -> None:
        old, new = t["from_state"], t["to_state"]
        try:
            if t["task"] is None:
                ok = (old is None and new == "running") or (old is not None and is_legal_run(RunState(old), RunState(new)))
            elif t["evidence"].get("task_level"):
                ok = is_legal_task(TaskState(old), TaskState(new))
            else:
                ok = is_legal(State(old), State(new))
        except ValueError:
            ok = False
        if not ok:
            self.violation(f"{run_id}: the log holds an illegal transition {old} -> {new} ({t['task']}, {t['index']})")


def sim_runtime(cluster: SimCluster, now: Any, compact: bool = False) -> ClusterRuntime:
    """The simulated cluster as the engine's driver sees it (metered like any other).

    Packing is off: :class:`SimCluster` runs one element per array task, as the unpacked worker does; a
    packed job (array task k running the elements of slice k) is tested on the real schedulers
    (tests/test_packing.py). Left on ("auto" by default), the driver packs as soon as the store holds
    durations of a first few elements, and the simulation would misread the slices."""
    config = ClusterConfig(name="sim", scheduler="sim", poll_interval=5.0, min_poll_interval=1.0,
                           max_poll_interval=20.0, max_calls_per_minute=60.0, command_timeout=10.0, lost_grace=20.0,
                           pack=False)
    budget = Budget(config.max_calls_per_minute)
    transport = MeteredTransport(SimTransport(cluster), budget)
    scheduler = SimScheduler(cluster, transport, now)
    scheduler.compact = compact
    return ClusterRuntime(name="sim", config=config, transport=transport.inner, metered=transport,
                          scheduler=scheduler, budget=budget,
                          result_interval=2.0, timing=Timing(result_grace=10.0, lost_after=3, lost_grace=20.0))


def _runs_of(rows: dict[tuple[str, Any], tuple[Any, ...]]) -> set[str]:
    return {k[1][0] for k in rows if k[0] == "runs"}


async def db_rows(store: Store) -> dict[tuple[str, Any], tuple[Any, ...]]:
    """Every run, task, instance and job row the store holds (through the store's own loading)."""
    rows: dict[tuple[str, Any], tuple[Any, ...]] = {}
    ids = [r["id"] for r in await store.list_runs(limit=100_000)]
    for run_id in ids:
        run = await store.load_run(run_id)
        if run is not None:
            rows.update(run_rows(run))
    for job in await store.jobs_for_runs(ids):
        rows[("jobs", (job.tag,))] = JOBS.row(job)
    for kill in await store.owed_kills("sim"):
        rows[("kills", (kill.cluster, kill.job_key))] = ()
    return rows


def run_rows(run: Run) -> dict[tuple[str, Any], tuple[Any, ...]]:
    rows: dict[tuple[str, Any], tuple[Any, ...]] = {("runs", (run.id,)): RUNS.row(run)}
    for tr in run.tasks.values():
        rows[("tasks", (run.id, tr.name))] = TASKS.row(tr)
        for inst in tr.instances.values():
            rows[("instances", INSTANCES.key_of(inst))] = INSTANCES.row(inst)
    return rows


def driver_index_problems(driver: Any) -> list[str]:
    """The driver's indices over its tracks must say what a walk over every track says (they replace it)."""
    problems = []
    awake = {tag for tag, t in driver.tracks.items() if not t.waiting}
    if set(driver.awake) != awake or any(driver.awake[tag] is not driver.tracks[tag] for tag in awake & set(driver.awake)):
        problems.append(f"awake index {sorted(driver.awake)[:5]} but tracks not waiting {sorted(awake)[:5]}")
    by_job = {t.record.job_id: t for t in driver.tracks.values() if t.record.job_id}
    if driver.by_job != by_job:
        problems.append(f"job index {sorted(driver.by_job)[:5]} but tracked jobs {sorted(by_job)[:5]}")
    # What a queue limit counts: the count kept as tracks come, go and lose instances, against a walk.
    walked = sum(queued_jobs_walked(t) for t in {id(t): t for t in [*driver.unresolved.values(),
                                                                       *driver.tracks.values()]}.values())
    if driver.queued_count != walked:
        problems.append(f"queued count {driver.queued_count} but the tracks hold {walked} queued jobs")
    # Every awake track's file clock is in the heap of due clocks, at the time it says (or being checked).
    entered = {id(t) for at, _, t in driver.file_due if driver.awake.get(t.tag) is t and t.files.next_at == at}
    entered |= {id(t) for t in driver.in_check.values()}
    missing = [tag for tag, t in driver.awake.items() if id(t) not in entered]
    if missing:
        problems.append(f"awake tracks {sorted(missing)[:5]} have no file clock entry due when their clock says")
    # Every unresolved submission with a look-up to come has an entry in the heap of look-ups due, at its time
    # (or is being looked up now: taken by ``resolves_due``, given its next time or dropped once handled).
    due = {id(t) for at, _, t in getattr(driver, "resolve_due", ()) if driver.unresolved.get(t.tag) is t
           and t.resolve_after == at}
    lost = [tag for tag, t in driver.unresolved.items() if t.resolve_after != math.inf and id(t) not in due
            and t is not getattr(driver, "resolving", {}).get(tag)]
    if hasattr(driver, "resolve_due") and lost:
        problems.append(f"unresolved submissions {sorted(lost)[:5]} have no look-up due when they say")
    return problems


def queued_jobs_walked(track: Any) -> int:
    """``JobTrack.queued_jobs`` by a walk over its live elements (what the kept counts replace)."""
    if not track.slots:
        return len(track.live)
    return len({track.slots.get(i) for i in track.live})


def memory_rows(engine: Engine) -> dict[tuple[str, Any], tuple[Any, ...]]:
    rows: dict[tuple[str, Any], tuple[Any, ...]] = {}
    for run in engine.runs.values():
        rows.update(run_rows(run))
    for driver in engine.drivers.values():
        for track in [*driver.tracks.values(), *driver.unresolved.values()]:
            rows[("jobs", (track.tag,))] = JOBS.row(track.record)
        for key in driver.owed:
            rows[("kills", (driver.name, key))] = ()
    return rows


def _suspended_sites(loop: VirtualLoop) -> set[str]:
    """Where each daemon task was waiting when the process died (innermost reflowd frame)."""
    sites = set()
    for task in loop.live_tasks():
        coro: Any = task.get_coro()
        last = None
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is not None and "/reflowd/" in frame.f_code.co_filename:
                last = f"{frame.f_code.co_filename.split('/reflowd/', 1)[1]}:{frame.f_lineno} {frame.f_code.co_name}"
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        if last:
            sites.add(last)
    return sites


def scratch_dir() -> tempfile.TemporaryDirectory[str]:
    """Where the simulated store lives: memory-backed if the machine has it (a file system's syncs cost
    more than the whole simulation; a crash here is ``kill -9``, which loses nothing the OS holds)."""
    return tempfile.TemporaryDirectory(prefix="reflow-sim-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)


def run_seed(seed: int, workdir: Path | None = None, harness: Callable[[int, Path], Harness] | None = None) -> Report:
    """One scenario of *harness* (the plain ``Harness`` unless given): in *workdir*, its store removed after,
    or in a scratch directory of its own."""
    make = harness or Harness
    if workdir is not None:
        report = make(seed, workdir).run()
        for leftover in workdir.glob(f"sim-{seed}.sqlite*"):
            leftover.unlink(missing_ok=True)
        return report
    with scratch_dir() as tmp:
        return make(seed, Path(tmp)).run()


async def engine_life(path: Path, cluster: SimCluster, loop: VirtualLoop, body: Any, adjust: Any = None,
                      connector: Connector | None = None) -> Any:
    """One daemon life on *path*: a real store, engine and driver on the simulated *cluster*; ``await body(engine,
    cluster)``, then the engine and store closed as reflowd closes them. ``adjust(runtime)``, if given, changes the
    cluster's runtime (its config, its scheduler) before the engine starts. *connector*: the store's (a test that
    crashes the life kills its connections with it, ``Connector.crash``)."""
    store = Store(path, connect=connector or Connector(), offload=inline)
    await store.open()
    runtime = sim_runtime(cluster, lambda: loop.virtual)
    if adjust is not None:
        adjust(runtime)
    engine = Engine(store, {"sim": runtime}, EngineSettings(retry_backoff=1.0, retry_backoff_max=8.0))
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.run_writer)
            await tg.start(engine.run)

            async def tick() -> None:
                while True:
                    await anyio.sleep(TICK)
                    cluster.tick(loop.virtual)

            tg.start_soon(tick)
            result = await body(engine, cluster)
            tg.cancel_scope.cancel()
        return result
    finally:
        with anyio.CancelScope(shield=True):
            await engine.close()
            await store.close()


def simulate(body: Any, *, faults: Faults | None = None, seed: int = 0, workdir: Path | None = None,
             db: Path | None = None, adjust: Any = None, cluster_type: type[SimCluster] = SimCluster) -> Any:
    """Run ``await body(engine, cluster)`` against a simulated cluster on virtual time; return its result.

    For tests that want one situation, not a random scenario: the engine, store and driver are real.
    *cluster_type*: a subclass of :class:`SimCluster` (one that simulates more of a scheduler).
    """
    rng = random.Random(seed)
    cluster = cluster_type(random.Random(rng.getrandbits(64)), faults or Faults())
    ids = random.Random(rng.getrandbits(64))
    loop = VirtualLoop(start=START)
    world.install(world.World(now=lambda: loop.virtual, monotonic=lambda: loop.virtual,
                              token_hex=lambda n: f"{ids.getrandbits(8 * n):0{2 * n}x}"))
    holder = scratch_dir()
    path = db or Path(workdir or holder.name) / "sim.sqlite"

    try:
        with deterministic_anyio():
            return loop.run_until_complete(engine_life(path, cluster, loop, body, adjust))
    finally:
        world.install(None)
        abandon(loop)
        holder.cleanup()


async def wait_until(condition: Any, timeout: float = 600.0, what: str = "condition") -> Any:
    """Poll *condition* on virtual time (costs nothing real)."""
    with anyio.fail_after(timeout):
        while not (value := condition()):
            await anyio.sleep(0.5)
        return value
