"""The engine: every run's DAG in memory, advanced through the state machines.

The engine owns runs, their evaluation (what can run next) and the meaning
of state changes (retries, ``on_error``, cancellation). Every change goes
through the :class:`~reflowd.engine.ledger.Ledger` (one table per state
machine). Talking to a scheduler is a cluster driver's job
(``reflowd/driver``): the engine hands each driver READY instances and
cancellations, and the driver reports back through the :class:`Host`
methods here (``transition``, ``update``, ``resolution``, ``internal_error``).

Everything runs on one event loop, so engine state needs no locks -- but any
``await`` may see the world change, so code re-checks state after awaiting.
An error while handling one run fails that run, with the error in its
status; it never stops the daemon or another run.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import anyio
import structlog

from reflow_client import codec
from reflow_client.jobfiles import log_section
from reflow_client.manifest import Manifest

from .. import world
from ..clusters import ClusterRuntime
from ..driver import Driver, DriverSettings, log_paths_for
from ..driver.early import EARLY_STATES
from ..schedulers.base import OptionError
from ..store import Store
from . import retry_policy, views
from .events import EventHub, Subscription
from .heap import Heap
from .ledger import Ledger
from .model import ON_ERROR, Instance, Run, RunOptions, TaskRun
from .records import column_fields, reset_values

from .resolve import Resolution, ResolveError, UpstreamView, identity_digest, prepare_identities, resolve
from .states import (
    ACTIVE,
    AUTO_RETRIABLE,
    FAILURE,
    IN_FLIGHT,
    MANUAL_RETRIABLE,
    RUN_TERMINAL,
    SUCCESS,
    TERMINAL,
    RunState,
    State,
    TaskState,
)
from .verify import verify_outputs

log = structlog.get_logger("reflowd.engine")

#: Instances handled between two yields to the event loop in long loops (expansion, whole-run scans):
#: a few milliseconds of work (an identity and a transition to READY are 100-200 us each on a loaded
#: machine), so clients are answered and the store's commits stay near its batch size.
YIELD_EVERY = 64
#: A cancel kills a job whole, in one loop step with its elements' CANCELLED, up to this many elements
#: (``Engine._cancel_jobs``: 4,096 transitions are about 20 ms); a bigger one goes element by element.
WHOLE_JOB_MAX = 4096
_HAS_JOB = (State.QUEUED, State.RUNNING)
#: How long a cancel request waits for its kills and packed jobs' markers to go out before it answers.
CANCEL_SEND_WAIT = 10.0
#: Python's full garbage collection walks every object the daemon holds (0.5 s and more with 10^6
#: instances, a loop stall). A large expansion moves what exists to the permanent generation
#: (``gc.freeze``), which collections skip; instances hold no reference cycles and are freed by their
#: counts. The janitor collects the frozen heap once that is cheap (``heap.Heap``): cycles left among
#: frozen objects are collected then.
#: Large containers made later (the list of instances turned READY, the driver's queue they are handed
#: to) are frozen too: one of 10^6 entries made each full collection 0.1-0.9 s during a hand-over.
#: So is what every 8,192 transitions leave behind (job tracks, their ``live`` maps, requests): at 10^5
#: queued elements those made every full collection 0.1-0.5 s, growing with the number queued.
FREEZE_AFTER = 4096
FREEZE_EVERY = 8192  # (a full collection walks what is not frozen yet: at most this many, a few ms)
#: Upstream values from which resolving a task's inputs and encoding its identity plan (pure functions
#: of immutable views) run in a worker thread: a gather of 10^5 values is 100 ms of CPU in one piece.
OFFLOAD_AT = 4096


def _values_in(views_: dict[str, UpstreamView]) -> int:
    """How many upstream values a resolution walks (a singleton's list output counts its elements)."""
    n = 0
    for v in views_.values():
        n += len(v.outputs)
        if not v.is_array and v.outputs and isinstance(v.outputs[0], (list, tuple, dict)):
            n += len(v.outputs[0])
    return n


async def _compute(big: bool, fn: Any, *args: Any) -> Any:
    """``fn(*args)``: in a worker thread when *big* (off the event loop), else right here."""
    if big:
        return await anyio.to_thread.run_sync(fn, *args)
    return fn(*args)


class EngineError(Exception):
    """A request the engine refuses; ``code`` maps to a JSON-RPC error code."""

    code = -32000

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.data = data


class UnknownRun(EngineError):
    code = -32001


class InvalidRequest(EngineError):
    code = -32602


@dataclass
class EngineSettings:
    retry_backoff: float = 5.0
    retry_backoff_max: float = 600.0
    submit_concurrency: int = 4
    keep_finished: float = 3600.0
    #: Test-only crash points, e.g. {"after_submit"}: the daemon exits hard there.
    fault_points: frozenset[str] = frozenset()


def new_run_id(workflow: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(world.now()))
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in workflow)[:40]
    return f"{safe}-{stamp}-{world.token_hex(3)}"


#: States the per-element paths test against, as module globals: an enum member looked up on its class
#: costs 100-200 ns (the metaclass's attribute lookup), a global 10; a fan-out element passes these
#: tests a few dozen times.
_PENDING, _READY, _SUCCEEDED = State.PENDING, State.READY, State.SUCCEEDED

_CLEARED = reset_values(Instance)
_PERSISTED = frozenset(column_fields(Instance))


def cleared() -> dict[str, Any]:
    """The fields a fresh attempt starts without (derived from the record's definition)."""
    return dict(_CLEARED)


class _ViewBuilder:
    """An upstream task's view, built a chunk at a time (``step`` is a few ms of work)."""

    CHUNK = 8192

    def __init__(self, tr: TaskRun) -> None:
        self.tr = tr
        self.indices: Any = range(tr.size or 0) if tr.manifest.is_array else [None]
        self.at = 0
        self.outputs: list[Any] = []
        self.hashes: list[str | None] = []
        self.ok: list[bool] = []

    def step(self) -> bool:
        """Add the next chunk; True once every instance is in."""
        instances = self.tr.instances
        outputs, hashes, ok = self.outputs, self.hashes, self.ok
        stop = min(len(self.indices), self.at + self.CHUNK)
        for i in self.indices[self.at:stop]:
            inst = instances.get(i)
            if inst is None:
                continue
            good = inst.state in SUCCESS
            outputs.append(inst.output if good else None)
            hashes.append(inst.output_hash if good else None)
            ok.append(good)
        self.at = stop
        return stop >= len(self.indices)

    def view(self) -> UpstreamView:
        tr = self.tr
        return UpstreamView(is_array=tr.manifest.is_array, outputs=self.outputs, hashes=self.hashes,
                            ok=self.ok if not tr.blocked else [False], blocked=tr.blocked is not None)


async def _checkpoint(i: int) -> None:
    if i and i % YIELD_EVERY == 0:
        await anyio.sleep(0)


class Engine:
    """Holds runs in memory and drives them to an end."""

    def __init__(self, store: Store, clusters: dict[str, ClusterRuntime], settings: EngineSettings | None = None):
        self.store = store
        self.clusters = clusters
        self.settings = settings or EngineSettings()
        self.runs: dict[str, Run] = {}
        self.events = EventHub()
        self.counters: Counter[str] = Counter()
        self.ledger = Ledger(store, self.events, self.counters)
        self.started_at = world.now()
        driver_settings = DriverSettings(submit_concurrency=self.settings.submit_concurrency,
                                         fault_points=self.settings.fault_points)
        self.drivers: dict[str, Driver] = {n: Driver(c, store, self, driver_settings) for n, c in clusters.items()}
        self._dirty: dict[str, None] = {}
        self._eval_wake = anyio.Event()
        self._evaluating: set[str] = set()
        self._resolutions: dict[tuple[str, str], Resolution] = {}
        self._changed_since_freeze = 0  # transitions since the last gc.freeze (see FREEZE_AFTER)
        self.heap = Heap()
        #: READY instances that have not been through the cache check yet, per run.
        self._to_check: dict[str, list[Instance]] = {}

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            for cluster in self.clusters.values():
                runner = getattr(cluster.scheduler, "run", None)
                if runner is not None:
                    await tg.start(runner)
            await self.recover()
            for driver in self.drivers.values():
                await tg.start(driver.run)
            tg.start_soon(self._evaluate_loop)
            tg.start_soon(self._janitor)
            task_status.started()

    async def close(self) -> None:
        for cluster in self.clusters.values():
            with anyio.CancelScope(shield=True):
                try:
                    await cluster.scheduler.aclose()
                finally:
                    await cluster.transport.aclose()

    async def recover(self) -> None:
        """Load every unfinished run and re-attach to its jobs; a run that cannot be recovered is failed.
        First the kills an earlier daemon owed (its drivers send them once started, whatever their run)."""
        for driver in self.drivers.values():
            await driver.load_owed_kills()
        runs, broken = await self.store.load_active_runs()
        if sum(len(tr.instances) for r in runs for tr in r.tasks.values()) >= FREEZE_AFTER:
            self.heap.freeze()  # (see FREEZE_AFTER)
        for run_id, why in broken:
            log.error("run cannot be recovered; marking it failed", run_id=run_id, error=why)
            self.store.fail_run_row(run_id, why)
            self.counters["unrecoverable_runs"] += 1
        for run in runs:
            self.runs[run.id] = run
            if run.cluster not in self.drivers:
                self._fail_run(run, f"cannot be recovered: cluster {run.cluster!r} is no longer configured")
        records = await self.store.jobs_for_runs([r.id for r in runs])
        adopted = 0
        for record in records:
            run = self.runs.get(record.run_id)
            driver = self.drivers.get(record.cluster)
            if run is None or driver is None or record.task not in run.tasks or run.state is not RunState.RUNNING:
                continue
            if record.state in EARLY_STATES:  # submitted early, waiting on its upstream: adopted or dropped there
                driver.early.recovered(record, run)
                continue
            insts = {i.index: i for i in run.tasks[record.task].instances.values()
                     if i.tag == record.tag and i.in_flight}
            if not insts:
                continue
            try:
                await driver.recover(record, run, insts)
            except Exception as exc:
                log.exception("cannot re-attach to a job", run_id=run.id, tag=record.tag)
                error = f"cannot re-attach to job {record.job_id or record.tag}: {type(exc).__name__}: {exc}"
                for inst in insts.values():
                    self.transition(run, inst, State.FAILED, {"source": "recovery", "error": error}, error=error)
                continue
            adopted += 1
        for run in runs:
            self._to_check[run.id] = [i for i in run.instances() if i.state is State.READY]
            self.mark_dirty(run.id)
        if runs or broken:
            log.info("recovered runs", runs=len(runs), jobs=adopted, unrecoverable=len(broken))

    # ------------------------------------------------------------------ state changes (also the driver's Host)

    def transition(self, run: Run, inst: Instance, new: State, evidence: dict[str, Any], **fields: Any) -> bool:
        """The one way an instance changes state, with what the change means for the run."""
        old, old_tag = inst.state, inst.tag
        if not self.ledger.instance(run, inst, new, evidence, fields):
            return False
        self._changed_since_freeze += 1
        if self._changed_since_freeze >= FREEZE_EVERY:
            self._changed_since_freeze = 0
            self.heap.freeze()  # (see FREEZE_AFTER: what submissions of 10^5 elements leave behind)
        driver = self.drivers.get(run.cluster)
        if old is _READY:
            inst.handed = False
            if driver is not None:
                driver.withdraw(inst)
        if old in IN_FLIGHT and (new not in IN_FLIGHT or inst.tag != old_tag) and driver is not None:
            driver.instance_left(inst, old_tag)
        if driver is not None and driver.early.watching:
            driver.early.left(run, inst, new)  # an early job it no longer waits for is dropped
        if new in TERMINAL:
            try:
                self._on_terminal(run, inst)
            except Exception as exc:
                self.internal_error(run, f"concluding {inst.label}", exc)
        if new in TERMINAL or new is _PENDING:
            self.mark_dirty(run.id)
        return True

    def update(self, inst: Instance, **fields: Any) -> None:
        """Change bookkeeping fields without a state change (e.g. a pending reason).

        Only the columns that changed are written (an ``UPDATE`` of a few columns, as a transition writes):
        a poll that moves 10^4 pending reasons must not re-encode 10^4 whole rows."""
        changed: list[str] = []
        for name, value in fields.items():
            if getattr(inst, name) != value:
                setattr(inst, name, value)
                if name in _PERSISTED:
                    changed.append(name)
        if changed:
            inst.updated_at = world.now()
            self.store.put_instance(inst, (*changed, "updated_at"))

    def internal_error(self, run: Run, where: str, exc: BaseException) -> None:
        """Something raised while handling *run*: fail the run with the error shown, keep the daemon going."""
        message = f"internal error while {where}: {type(exc).__name__}: {exc}"
        log.error("internal error; failing the run", run_id=run.id, where=where, error=message, exc_info=exc)
        self.counters["internal_errors"] += 1
        if run.error is None or not run.error.startswith("internal error"):
            self._fail_run(run, message)

    def _fail_run(self, run: Run, message: str) -> None:
        """Nothing new starts (what runs finishes); the run ends FAILED with *message* as its error."""
        run.error = message
        self.store.put_run(run)
        for tr in run.tasks.values():
            if tr.open:
                self.ledger.task(run, tr, TaskState.FAILED, {"source": "engine", "error": message[:500]},
                                 reason=message)
            for inst in list(tr.instances.values()):
                if inst.state in (State.PENDING, State.READY):
                    self.transition(run, inst, State.FAILED, {"source": "engine", "error": message[:500]},
                                    error=message)
        self.mark_dirty(run.id)

    def _on_terminal(self, run: Run, inst: Instance) -> None:
        task = run.tasks[inst.task].manifest
        succeeded = inst.state is _SUCCEEDED
        if succeeded and task.cache and inst.identity and inst.output_hash:
            self.store.put_cache(inst.identity.hex(), inst.output, inst.output_hash, run.workflow, inst.task, run.id, inst.index)
        if succeeded and inst.started_at is not None and inst.ended_at is not None:
            self.store.put_duration(run.workflow, inst.task, task.version, inst.ended_at - inst.started_at)
        if run.error:
            return  # the run is being failed for an internal error: no retries, no on_error
        if inst.state in AUTO_RETRIABLE and not run.cancel_requested:
            # Which causes are retried, how often, after how long and with what resources: retry_policy.py.
            driver = self.drivers.get(run.cluster)
            cluster = driver.cluster if driver is not None else None
            planned = retry_policy.plan(
                inst, task.config, task.retries, cluster.config.retry_policy if cluster else None,
                retry_policy.caps_from_probe(cluster.probe if cluster else None, retry_policy.queue_of(
                    cluster.config.submit_options if cluster else None, task.config.get("submit_options"))),
                self.settings.retry_backoff, self.settings.retry_backoff_max)
            if planned is not None:
                evidence, fields = planned
                delay = fields.pop("delay")
                if self.transition(run, inst, State.READY, evidence,
                                   **{**cleared(), **fields, "attempt": inst.attempt + 1,
                                      "not_before": world.now() + delay}):
                    self._hand_over(run, [inst])
                return
        if (
            inst.state in FAILURE
            and inst.state not in (State.CANCELLED, State.UPSTREAM_FAILED)
            and run.options.on_error == "stop"
        ):
            self._stop_run(run, f"on_error=stop after {inst.label} ended {inst.state.value}")

    def _stop_run(self, run: Run, why: str) -> None:
        """Cancel what has not started (including jobs still queued); let what runs finish."""
        kill: list[str] = []
        for tr in run.tasks.values():
            if tr.open:
                self.ledger.task(run, tr, TaskState.CANCELLED, {"source": "on_error", "why": why}, reason=why)
            for inst in list(tr.instances.values()):
                queued_key = inst.job_key if inst.state is State.QUEUED else None
                if inst.state in (State.PENDING, State.READY, State.QUEUED):
                    if self.transition(run, inst, State.CANCELLED, {"source": "on_error", "why": why}) and queued_key:
                        kill.append(queued_key)
        driver = self.drivers.get(run.cluster)
        if driver is not None:
            driver.cancel_jobs(kill)
        self.mark_dirty(run.id)

    def _hand_over(self, run: Run, insts: list[Instance]) -> None:
        """Give READY instances (past the cache check) to their cluster's driver, all at once: the
        driver makes one array job of what it is handed together."""
        for inst in insts:
            inst.handed = True
        if insts:
            self.drivers[run.cluster].submit(run, insts)

    async def _hand_over_paced(self, run: Run, insts: list[Instance]) -> None:
        """``_hand_over`` in slices with yields between (10^5 at once is a long step); the driver's
        submit loop is woken by the last slice, so it still forms whole arrays."""
        step = YIELD_EVERY * 16
        for start in range(0, len(insts), step):
            if start:
                await anyio.sleep(0)
            chunk = [i for i in insts[start:start + step] if i.state is _READY and not i.handed]
            for inst in chunk:
                inst.handed = True
            self.drivers[run.cluster].submit(run, chunk, wake=start + step >= len(insts))

    async def _pace(self, i: int) -> None:
        """In a long loop: yield now and then, and let the store's writer catch up when it falls behind."""
        await _checkpoint(i)
        await self.store.pace()

    def _pace_due(self, i: int) -> bool:
        """Would ``_pace(i)`` do anything (yield, or wait for the store's writer)? Loops over every element
        ask first: two coroutines made and awaited per element for nothing cost more than the check."""
        return bool(i and i % YIELD_EVERY == 0) or self.store.pace_due

    def set_run_state(self, run: Run, new: RunState, evidence: dict[str, Any]) -> None:
        self.ledger.run(run, new, evidence)

    # ------------------------------------------------------------------ evaluation

    def mark_dirty(self, run_id: str) -> None:
        self._dirty[run_id] = None
        self._eval_wake.set()

    async def _evaluate_loop(self) -> None:
        async with anyio.create_task_group() as tg:
            while True:
                await self._eval_wake.wait()
                self._eval_wake = anyio.Event()
                for run_id in list(self._dirty):
                    if run_id in self._evaluating:
                        continue
                    del self._dirty[run_id]
                    run = self.runs.get(run_id)
                    if run is not None:
                        self._evaluating.add(run_id)
                        tg.start_soon(self._evaluate_guarded, run)

    async def _evaluate_guarded(self, run: Run) -> None:
        try:
            await self.evaluate(run)
        except Exception as exc:
            self.internal_error(run, "evaluating the run", exc)
            try:
                self._maybe_finish(run)
            except Exception:
                log.exception("cannot conclude a failed run", run_id=run.id)
        finally:
            self._evaluating.discard(run.id)
            if run.id in self._dirty:
                self._eval_wake.set()

    def _view(self, tr: TaskRun) -> UpstreamView:
        builder = _ViewBuilder(tr)
        while not builder.step():
            pass
        return builder.view()

    async def _view_paced(self, tr: TaskRun) -> UpstreamView:
        """``_view``, yielding to the loop between chunks (an upstream of 10^5 elements)."""
        builder = _ViewBuilder(tr)
        while not builder.step():
            await anyio.sleep(0)
        return builder.view()

    def resolution(self, run: Run, tr: TaskRun) -> Resolution:
        """Inputs of *tr* (cached; recomputed after a restart)."""
        key = (run.id, tr.name)
        res = self._resolutions.get(key)
        if res is None:
            views_ = {d: self._view(run.tasks[d]) for d in tr.manifest.dependencies}
            res = resolve(tr.manifest, views_, run.params, run.run_dir)
            self._resolutions[key] = res
        return res

    async def evaluate(self, run: Run) -> None:
        """Move whatever can move: expand arrays, resolve inputs, check the cache, finish the run."""
        if run.state is not RunState.RUNNING:
            return
        progressed = True
        while progressed and not run.cancel_requested and not run.error:
            progressed = False
            for tr in run.tasks.values():  # manifest order is topological
                if tr.blocked or (tr.expanded and not tr.counts.get(State.PENDING)):
                    continue
                deps = [run.tasks[d] for d in tr.manifest.dependencies]
                if not all(d.settled for d in deps):
                    continue
                progressed = True
                try:
                    await self._advance_task(run, tr, deps)
                except Exception as exc:
                    self._task_failed(run, tr, exc)
                if run.cancel_requested or run.error:
                    break
        unchecked = self._to_check.pop(run.id, [])
        if unchecked:
            await self._cache_phase(run, unchecked)  # (it skips what is no longer READY or was handed over)
        self._maybe_finish(run)

    async def _advance_task(self, run: Run, tr: TaskRun, deps: list[TaskRun]) -> None:
        views_ = {d.name: await self._view_paced(d) for d in deps}
        if not all(d.settled for d in deps) or not (tr.open or tr.counts.get(State.PENDING)):
            return  # changed while the views were built (a retry, a cancel): the next evaluation sees it anew
        pending = [i for i in tr.instances.values() if i.state is State.PENDING] if tr.expanded else []
        big = _values_in(views_) >= OFFLOAD_AT
        try:
            res = await _compute(big, resolve, tr.manifest, views_, run.params, run.run_dir)
            if not all(d.settled for d in deps) or not (tr.open or tr.counts.get(State.PENDING)):
                return  # (as above: changed while the thread worked)
        except ResolveError as exc:
            if tr.open:
                self.ledger.task(run, tr, TaskState.FAILED, {"source": "resolve", "error": str(exc)}, reason=str(exc))
            for inst in pending:
                self.transition(run, inst, State.FAILED, {"source": "resolve"}, error=str(exc))
            return
        if res.blocked:
            if tr.open:
                self.ledger.task(run, tr, TaskState.UPSTREAM_FAILED, {"source": "dependencies"}, reason=res.blocked)
            for inst in pending:
                self.transition(run, inst, State.UPSTREAM_FAILED, {"source": "dependencies"}, reason=res.blocked)
            return
        self._resolutions[(run.id, tr.name)] = res
        if tr.open:
            pending = await self._expand(run, tr, res.size or 0)
        ready = self._to_check.setdefault(run.id, [])
        evidence = {"source": "dependencies"}  # (one for the task's elements: the store groups them by it)
        blocks = res.element_blocked
        never_blocked = getattr(blocks, "clear", False)  # (a fan-out's elements: asking each costs 1 us)
        for n, inst in enumerate(pending):
            if self._pace_due(n):
                await self._pace(n)
            if n and n % FREEZE_EVERY == 0:
                self.heap.freeze()  # (see FREEZE_AFTER: ``ready`` grows to 10^6 entries)
            if inst.state is not _PENDING:
                continue  # cancelled while we yielded
            blocked = blocks[inst.index] if inst.index is not None and not never_blocked else None
            if blocked:
                self.transition(run, inst, State.UPSTREAM_FAILED, {"source": "dependencies"}, reason=blocked)
                continue
            if res.plan is None:
                await _compute(big, prepare_identities, run.workflow, tr.manifest, res)
                await anyio.sleep(0)  # (a step of its own: a gather's plan encodes 10^5 upstream hashes)
                if inst.state is not _PENDING:
                    continue
            if big and inst.index is None:  # a gather's one identity hashes 10^5 upstream hashes
                identity = await _compute(big, identity_digest, run.workflow, tr.manifest, res, inst.index)
                if inst.state is not _PENDING:
                    continue
            else:
                identity = identity_digest(run.workflow, tr.manifest, res, inst.index)
            if self.transition(run, inst, _READY, evidence, identity=identity):
                ready.append(inst)

    def _task_failed(self, run: Run, tr: TaskRun, exc: Exception) -> None:
        """Resolving one task raised something unexpected: that task fails, with the error shown."""
        message = f"internal error while resolving {tr.name}: {type(exc).__name__}: {exc}"
        log.error("task failed inside the engine", run_id=run.id, task=tr.name, error=message, exc_info=exc)
        self.counters["internal_errors"] += 1
        if tr.open:
            self.ledger.task(run, tr, TaskState.FAILED, {"source": "engine", "error": message[:500]}, reason=message)
        for inst in list(tr.instances.values()):
            if inst.state in (State.PENDING, State.READY):
                self.transition(run, inst, State.FAILED, {"source": "engine"}, error=message)

    async def _expand(self, run: Run, tr: TaskRun, size: int) -> list[Instance]:
        created = []
        now = world.now()
        run_id, name = run.id, tr.name
        for i in range(size):
            if self._pace_due(i):
                await self._pace(i)
            # (the key fields by position: a keyword costs ``rare_fields``' __init__ a set intersection, 2 us)
            inst = Instance(run_id, name, i)
            inst.updated_at = now
            tr.add(inst)
            self.store.put_instance(inst)
            created.append(inst)
            if (i + 1) % FREEZE_EVERY == 0:
                self.heap.freeze()
        if size >= FREEZE_AFTER:
            self.heap.freeze()
        self.ledger.task(run, tr, TaskState.EXPANDED, {"elements": size}, size=size)
        return created

    async def _cache_phase(self, run: Run, instances: list[Instance]) -> None:
        large = len(instances) >= FREEZE_AFTER
        if large:
            self.heap.freeze()  # (see FREEZE_AFTER: the list of 10^6 READY instances, walked by every full collection)
        options = run.options
        force_tasks = set(options.force_tasks)
        lookup: list[Instance] = []
        direct: list[Instance] = []
        for n, inst in enumerate(instances):
            await _checkpoint(n)
            if inst.state is not _READY or inst.handed:
                continue  # cancelled while we yielded
            task = run.tasks[inst.task].manifest
            if options.force or inst.task in force_tasks or not task.cache or not inst.identity \
                    or inst.not_before is not None:
                direct.append(inst)
            else:
                lookup.append(inst)
        await self._hand_over_paced(run, direct)
        if large:
            self.heap.freeze()  # (the driver's queue now holds them: a dict of 10^6 entries, 0.1-0.9 s a full collection)
        if not lookup:
            return
        hits = await self.store.cache_lookup(i.identity.hex() for i in lookup if i.identity)
        verified: dict[str, str | None] = {}
        if options.verify and hits:
            verified = await self._verify_outputs(run, [(i, hits[i.identity_hex]["output"]) for i in lookup
                                                        if i.identity_hex in hits])
        missed: list[Instance] = []
        for n, inst in enumerate(lookup):
            if self._pace_due(n):
                await self._pace(n)
            if inst.state is not _READY or inst.handed:
                continue  # cancelled while we looked
            hit = hits.get(inst.identity_hex or "")
            problem = verified.get(inst.identity_hex or "") if hit else None
            if hit and problem is None:
                self.transition(
                    run, inst, State.CACHED,
                    {"source": "cache", "identity": inst.identity_hex, "from_run": hit["run_id"],
                     "verified": options.verify},
                    output=hit["output"], output_hash=hit["output_hash"], cached_from=hit["run_id"],
                )
            else:
                if hit:
                    log.info("cached result failed verification", run_id=run.id, task=inst.task, index=inst.index,
                             problem=problem)
                missed.append(inst)
        self._hand_over(run, [i for i in missed if i.state is State.READY and not i.handed])
        if large:
            self.heap.freeze()  # (as above)

    async def _verify_outputs(self, run: Run, items: list[tuple[Instance, Any]]) -> dict[str, str | None]:
        """``{identity: None (ok) | problem}``: paths must exist; custom ``verify`` runs in a worker."""
        return await verify_outputs(self.clusters[run.cluster], run, items)

    def _maybe_finish(self, run: Run) -> None:
        if run.state is not RunState.RUNNING or run.active:
            return
        if run.cancel_requested:
            self.set_run_state(run, RunState.CANCELLED, {"source": "client", "request": "cancel"})
            return
        all_ok = all(not n or s in SUCCESS for tr in run.tasks.values() for s, n in tr.counts.items()) \
            and not any(t.blocked for t in run.tasks.values())
        if all_ok and not run.error:
            self.set_run_state(run, RunState.SUCCEEDED, {"source": "engine"})
            return
        failed = [i.label for i in views.failures(run, None, 100)]
        blocked = [t.name for t in run.tasks.values() if t.blocked is TaskState.FAILED]
        if not run.error:
            run.error = f"failed: {', '.join((failed + blocked)[:10])}" if failed or blocked else "failed"
        self.set_run_state(run, RunState.FAILED, {"source": "engine", "failed": (failed + blocked)[:100],
                                                  "error": run.error[:500]})

    # ------------------------------------------------------------------ requests

    async def submit_run(
        self,
        manifest: Manifest,
        params: dict[str, Any],
        run_dir: str,
        cluster: str,
        options: dict[str, Any] | RunOptions,
    ) -> Run:
        if cluster not in self.clusters:
            known = ", ".join(sorted(self.clusters))
            raise InvalidRequest(f"unknown cluster {cluster!r} (configured: {known}); add it to the reflow config")
        rt = self.clusters[cluster]
        for task in manifest.tasks:
            merged = {**rt.config.submit_options, **task.config.get("submit_options", {})}
            try:
                rt.scheduler.validate_options(merged)
            except OptionError as exc:
                raise InvalidRequest(f"task {task.name!r}: {exc}") from None
            backend = task.config.get("backend")
            if backend and backend != rt.scheduler.kind:
                raise InvalidRequest(
                    f"task {task.name!r} asks for backend {backend!r}, but cluster {cluster!r} runs "
                    f"{rt.scheduler.kind}; submit to a cluster running {backend} (--cluster) or drop backend="
                )
        missing = [p.key for p in manifest.cli_params if p.required and p.key not in params]
        if missing:
            raise InvalidRequest(f"missing required parameter(s): {', '.join(missing)}")
        opts = options if isinstance(options, RunOptions) else RunOptions.from_dict(options)
        unknown = [t for t in opts.force_tasks if t not in {t.name for t in manifest.tasks}]
        if unknown:
            raise InvalidRequest(f"force_tasks names unknown task(s): {', '.join(unknown)}")
        if opts.on_error not in ON_ERROR:
            raise InvalidRequest(f"on_error must be one of {', '.join(ON_ERROR)}, not {opts.on_error!r}")
        now = world.now()
        run = Run(manifest=manifest, id=new_run_id(manifest.workflow), params=params, run_dir=run_dir,
                  cluster=cluster, options=opts, created_at=now, updated_at=now)
        for task in manifest.tasks:
            tr = TaskRun(manifest=task, run_id=run.id)
            run.tasks[task.name] = tr
            self.store.put_task(run.id, tr)
            if not task.is_array:
                inst = Instance(run_id=run.id, task=task.name, index=None, updated_at=now)
                tr.add(inst)
                self.store.put_instance(inst)
        self.ledger.born(run, {"source": "client", "request": "submit"})
        self.runs[run.id] = run
        await self.store.flush()
        self.counters["runs_submitted"] += 1
        log.info("run submitted", run_id=run.id, workflow=run.workflow, cluster=cluster, tasks=len(manifest.tasks))
        self.mark_dirty(run.id)
        return run

    async def get_run(self, run_id: str) -> Run:
        run = self.runs.get(run_id)
        if run is not None:
            return run
        run = await self.store.load_run(run_id)
        if run is None:
            raise UnknownRun(f"unknown run id {run_id!r}; list runs with 'reflow-client runs'")
        return run

    def _check_task(self, run: Run, task: str | None) -> None:
        if task is not None and task not in run.tasks:
            raise InvalidRequest(f"run {run.id} has no task {task!r} (tasks: {', '.join(run.tasks)})")

    async def cancel(self, run_id: str, task: str | None = None, index: int | None = None) -> int:
        run = await self.get_run(run_id)
        self._check_task(run, task)
        if index is not None:
            return await self._cancel_element(run, task, index)
        if run.state in RUN_TERMINAL:
            return 0
        self.runs.setdefault(run.id, run)
        driver = self.drivers.get(run.cluster)
        count = 0
        kill: list[str] = []
        if task is None:
            run.cancel_requested = True
            self.store.put_run(run)
        for tr in run.tasks.values():
            if task is not None and tr.name != task:
                continue
            if tr.open:
                self.ledger.task(run, tr, TaskState.CANCELLED, {"source": "client", "request": "cancel"},
                                 reason="cancelled by request")
                count += 1
            if not tr.active_count:
                continue
            if driver is not None:  # its jobs first, each killed whole
                count += await self._cancel_jobs(run, tr, driver, kill)
                if not tr.active_count:
                    continue
            for n, inst in enumerate(list(tr.instances.values())):  # then the rest, element by element
                await self._pace(n)
                if inst.state not in ACTIVE:
                    continue
                key, had_job = inst.job_key, inst.state in (State.QUEUED, State.RUNNING)
                if self.transition(run, inst, State.CANCELLED, {"source": "client", "request": "cancel"}):
                    count += 1
                    if had_job and key:
                        kill.append(key)
                        if driver is not None:
                            driver.owe_kill(key)  # (before the next await: in the commit that holds CANCELLED)
        if count:
            await self.store.flush()  # durable before the client hears it: a kill -9 right after must not undo it
        if driver is not None:
            driver.cancel_jobs(kill)
            if kill:
                await driver.cancels_sent(CANCEL_SEND_WAIT)
        self.mark_dirty(run.id)
        return count

    async def _cancel_jobs(self, run: Run, tr: TaskRun, driver: Driver, kill: list[str]) -> int:
        """Cancel *tr*'s elements in flight job by job: each job's kill is owed once, by its id, in the same
        step as its elements' CANCELLED (one commit holds both, as for an element's kill), with a yield
        between jobs. Owed and sent per element, a cancel of 10^6 elements wrote and deleted 10^6 kill
        rows and sorted and folded 10^6 keys in single loop steps (16 s, a ping waiting 1.7 s); a
        job's array tasks all belong to the task, so killing it whole kills no one else's work. A job
        with more elements than one step should take goes element by element (the caller's loop)."""
        count = 0
        evidence = {"source": "client", "request": "cancel"}
        for job_id, insts in driver.jobs_in_flight(run.id, tr.name, WHOLE_JOB_MAX):
            await anyio.lowlevel.checkpoint()
            if self.store.pace_due:
                await self.store.pace()
            insts = [i for i in insts if i.state in _HAS_JOB]
            if not insts:
                continue
            driver.owe_kill(job_id)  # (before the next await: in the commit that holds the CANCELLED below)
            kill.append(job_id)
            for inst in insts:
                if self.transition(run, inst, State.CANCELLED, evidence):
                    count += 1
        return count

    async def _cancel_element(self, run: Run, task: str | None, index: int) -> int:
        """Cancel one element of an array task; the task's other elements go on (a packed job's slice-mates
        too: the driver tells the worker, see ``driver.packing``)."""
        if task is None:
            raise InvalidRequest("cancel --index needs --task: name the array task the element belongs to")
        inst = run.tasks[task].instances.get(index)
        if inst is None:
            known = sorted(i for i in run.tasks[task].instances if i is not None)
            shown = f"{known[0]}..{known[-1]}" if known else "none yet"
            raise InvalidRequest(f"task {task!r} of run {run.id} has no element {index} (elements: {shown})")
        if run.state in RUN_TERMINAL or inst.state not in ACTIVE:
            return 0
        self.runs.setdefault(run.id, run)
        key, had_job = inst.job_key, inst.state in (State.QUEUED, State.RUNNING)
        if not self.transition(run, inst, State.CANCELLED, {"source": "client", "request": "cancel", "index": index}):
            return 0
        driver = self.drivers.get(run.cluster)
        if driver is not None and had_job and key:
            driver.owe_kill(key)  # (committed with the CANCELLED state: the flush below holds both)
        await self.store.flush()  # durable before the client hears it and before the worker is told (kill -9 safe)
        if driver is not None and had_job and key:
            driver.cancel_jobs([key])
            await driver.cancels_sent(CANCEL_SEND_WAIT)
        self.mark_dirty(run.id)
        return 1

    async def retry(self, run_id: str, task: str | None = None, verify: bool = True) -> int:
        run = await self.get_run(run_id)
        self._check_task(run, task)
        self.runs.setdefault(run.id, run)
        count = 0
        for tr in run.tasks.values():
            if task is not None and tr.name != task:
                continue
            if tr.blocked in (TaskState.FAILED, TaskState.CANCELLED):
                self.ledger.task(run, tr, TaskState.PENDING, {"source": "client", "request": "retry"})
                count += 1
            if not any(tr.counts.get(s) for s in MANUAL_RETRIABLE):
                continue
            for n, inst in enumerate(list(tr.instances.values())):
                await self._pace(n)
                if inst.state in MANUAL_RETRIABLE:
                    self.transition(
                        run, inst, State.PENDING,
                        {"source": "client", "request": "retry", "after": inst.state.value,
                         "error": (inst.error or "")[:500]},
                        **{**cleared(), "attempt": inst.attempt + 1, "not_before": None},
                    )
                    count += 1
        if count == 0:
            return 0
        # Whatever failed only because of what we retry gets another chance.
        for tr in run.tasks.values():
            if tr.blocked is TaskState.UPSTREAM_FAILED:
                self.ledger.task(run, tr, TaskState.PENDING, {"source": "client", "request": "retry (downstream)"})
            if not tr.counts.get(State.UPSTREAM_FAILED):
                continue
            for inst in list(tr.instances.values()):
                if inst.state is State.UPSTREAM_FAILED:
                    self.transition(run, inst, State.PENDING, {"source": "client", "request": "retry (downstream)"},
                                    reason=None)
        for key in [k for k in self._resolutions if k[0] == run.id]:
            del self._resolutions[key]
        if verify:
            await self._verify_succeeded(run)
        run.cancel_requested = False
        run.error = None
        self.store.put_run(run)
        if run.state is not RunState.RUNNING:
            self.set_run_state(run, RunState.RUNNING, {"source": "client", "request": "retry"})
        self.mark_dirty(run.id)
        return count

    async def _verify_succeeded(self, run: Run) -> None:
        """Before a retry: succeeded outputs whose files are gone are produced again."""
        items = [(i, i.output) for i in run.instances() if i.state in SUCCESS and codec.encoded_paths(i.output)]
        if not items:
            return
        problems = await self._verify_outputs(run, items)
        for inst, _ in items:
            problem = problems.get(inst.identity_hex or "")
            if problem and inst.state in SUCCESS:
                if self.transition(run, inst, State.READY, {"source": "verify", "problem": problem},
                                   **{**cleared(), "attempt": inst.attempt + 1}):
                    self._hand_over(run, [inst])

    # ------------------------------------------------------------------ views

    def status(self, run: Run, task: str | None = None, limit: int = 200, offset: int = 0) -> dict[str, Any]:
        self._check_task(run, task)
        out = views.status(run, task, limit, offset)
        driver = self.drivers.get(run.cluster)
        if driver is not None:
            out["cluster"] = driver.status()
        return out

    def stats(self) -> dict[str, Any]:
        states: Counter[str] = Counter()
        for run in self.runs.values():
            for tr in run.tasks.values():
                for state, n in tr.counts.items():
                    if n:
                        states[state.value] += n
        return {
            "uptime": world.now() - self.started_at,
            "runs_in_memory": len(self.runs),
            "runs_active": sum(1 for r in self.runs.values() if r.state is RunState.RUNNING),
            "instances": dict(states),
            "tracked_jobs": {n: d.tracked for n, d in self.drivers.items()},
            "store": {"backlog": self.store.backlog, "commits": self.store.commits, "rows": self.store.rows_written,
                      "transitions": self.store.transitions_written,
                      "transition_rows": self.store.transition_rows_written},  # (a group of elements: one row)
            "counters": dict(self.counters),
            "watchers": self.events.count,
            "heap": self.heap.to_dict(),
            "clusters": {n: d.status() for n, d in self.drivers.items()},
            "pid": os.getpid(),
        }

    def subscribe(self, run_id: str | None) -> Subscription:
        return self.events.subscribe(run_id)

    async def logs(self, run_id: str, task: str, index: int | None, max_bytes: int = 65536) -> dict[str, Any]:
        run = await self.get_run(run_id)
        self._check_task(run, task)
        inst = run.instance(task, index)
        if inst is None:
            hint = "pass --index N" if run.tasks[task].manifest.is_array else "omit --index"
            raise InvalidRequest(f"task {task!r} of run {run_id} has no instance {index!r} ({hint})")
        if not inst.tag:
            return {"stdout": "", "stderr": "", "note": f"{inst.label} has not been submitted (state {inst.state.value})"}
        records = [r for r in await self.store.jobs_for_runs([run.id]) if r.tag == inst.tag]
        if not records:
            return {"stdout": "", "stderr": "", "note": "no job record for this instance"}
        request = records[0].request
        out_path, err_path = log_paths_for(request, index)
        cluster = self.clusters[run.cluster]
        files = await cluster.metered.read_files([out_path, err_path], timeout=cluster.config.command_timeout)

        def tail(data: bytes | None) -> str:
            if data is None:
                return ""
            if request.slices is not None:  # a packed job's log: this element's section of it
                return (log_section(data.decode("utf-8", "replace"), index) or "")[-max_bytes:]
            return data[-max_bytes:].decode("utf-8", "replace")

        return {"stdout": tail(files[out_path]), "stderr": tail(files[err_path]), "stdout_path": out_path,
                "stderr_path": err_path}

    async def _janitor(self) -> None:
        """Drop long-finished runs from memory (the store keeps them)."""
        while True:
            await anyio.sleep(60)
            if not any(r.state is RunState.RUNNING for r in self.runs.values()):
                self.heap.tidy()  # (idle, a freeze since the last one, and the heap small: 20-50 ms at most)
            cutoff = world.now() - self.settings.keep_finished
            for run_id, run in list(self.runs.items()):
                if run.state in RUN_TERMINAL and (run.ended_at or 0) < cutoff and not run.active:
                    self.heap.owed = True  # its cycles among frozen objects: collected once that is cheap
                    del self.runs[run_id]
                    self._to_check.pop(run_id, None)
                    for key in [k for k in self._resolutions if k[0] == run_id]:
                        del self._resolutions[key]
                    driver = self.drivers.get(run.cluster)
                    if driver is not None:
                        driver.forget_run(run_id)


__all__ = ["Engine", "EngineError", "EngineSettings", "InvalidRequest", "UnknownRun", "cleared"]
