"""The engine: every run's DAG in memory, advanced through the state machine.

All state changes go through :meth:`Engine.transition` (checks the table,
stamps the time, records the evidence, persists, publishes). Evaluation
decides what can run next; the per-cluster submitter and observer
(``submitter.py``, ``observer.py``) talk to schedulers. Everything runs on
one event loop, so engine state needs no locks -- but any ``await`` may see
the world change, so code re-checks state after awaiting.
"""

from __future__ import annotations

import os
import secrets
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from reflow_client import codec
from reflow_client.manifest import Manifest

from ..clusters import ClusterRuntime
from ..schedulers.base import Observation, OptionError, SubmitRequest
from ..store import JobRecord, Store
from .events import EventHub, Subscription
from .model import Instance, Run, TaskRun
from .resolve import Resolution, ResolveError, UpstreamView, identity_for, resolve
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
    is_legal,
)

log = structlog.get_logger("reflowd.engine")


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
    #: Test-only crash points, e.g. {"after_sbatch"}: the daemon exits hard there.
    fault_points: frozenset[str] = frozenset()


@dataclass(eq=False)
class JobTrack:
    """A submission the engine follows: its request and the instances it covers."""

    record: JobRecord
    request: SubmitRequest
    run: Run
    instances: dict[int | None, Instance]
    last_obs: dict[int | None, Observation] = field(default_factory=dict)
    #: Results of workers killed by a signal, held until the scheduler says why (timeout? cancel?).
    held: dict[int | None, tuple[dict[str, Any], float]] = field(default_factory=dict)
    resolve_attempts: int = 0
    resolve_after: float = 0.0

    @property
    def tag(self) -> str:
        return self.record.tag

    def live(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.in_flight and i.tag == self.tag]


def new_run_id(workflow: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime())
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in workflow)[:40]
    return f"{safe}-{stamp}-{secrets.token_hex(3)}"


def new_tag() -> str:
    return "rf" + secrets.token_hex(8)


def request_from_dict(data: dict[str, Any]) -> SubmitRequest:
    return SubmitRequest(**{**data, "indices": data.get("indices"), "worker_argv": list(data["worker_argv"])})


def request_to_dict(req: SubmitRequest) -> dict[str, Any]:
    return {
        "tag": req.tag,
        "run_id": req.run_id,
        "task": req.task,
        "job_dir": req.job_dir,
        "log_dir": req.log_dir,
        "workdir": req.workdir,
        "worker_argv": list(req.worker_argv),
        "indices": None if req.indices is None else list(req.indices),
        "index_offset": req.index_offset,
        "array_parallelism": req.array_parallelism,
        "cpus": req.cpus,
        "time": req.time,
        "mem": req.mem,
        "options": dict(req.options),
        "env": dict(req.env),
    }


class Engine:
    """Holds runs in memory and drives them to an end."""

    def __init__(self, store: Store, clusters: dict[str, ClusterRuntime], settings: EngineSettings | None = None):
        self.store = store
        self.clusters = clusters
        self.settings = settings or EngineSettings()
        self.runs: dict[str, Run] = {}
        self.events = EventHub()
        self.counters: Counter[str] = Counter()
        self.started_at = time.time()
        self._dirty: set[str] = set()
        self._eval_wake = anyio.Event()
        self._evaluating: set[str] = set()
        self.ready: dict[str, dict[tuple[str, str, int], tuple[Run, Instance]]] = {n: {} for n in clusters}
        self.ready_wake: dict[str, anyio.Event] = {n: anyio.Event() for n in clusters}
        self.tracks: dict[str, dict[str, JobTrack]] = {n: {} for n in clusters}
        self.unresolved: dict[str, dict[str, JobTrack]] = {n: {} for n in clusters}
        self.pending_cancels: dict[str, set[str]] = {n: set() for n in clusters}
        self.observer_wake: dict[str, anyio.Event] = {n: anyio.Event() for n in clusters}
        self._resolutions: dict[tuple[str, str], Resolution] = {}
        self._checked: set[tuple[str, str, int]] = set()  # READY instances past the cache check
        self._ready_to_serve = anyio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        from .observer import observe_loop
        from .submitter import submit_loop

        async with anyio.create_task_group() as tg:
            for cluster in self.clusters.values():
                runner = getattr(cluster.scheduler, "run", None)
                if runner is not None:
                    await tg.start(runner)
                cluster.scheduler.on_change = self._waker(cluster.name)
            await self.recover()
            for cluster in self.clusters.values():
                tg.start_soon(self._probe, cluster)
                tg.start_soon(submit_loop, self, cluster)
                tg.start_soon(observe_loop, self, cluster)
            tg.start_soon(self._evaluate_loop)
            tg.start_soon(self._janitor)
            self._ready_to_serve.set()
            task_status.started()

    def _waker(self, name: str) -> Any:
        def wake() -> None:
            self.observer_wake[name].set()

        return wake

    async def _probe(self, cluster: ClusterRuntime) -> None:
        """Learn the scheduler's limits and features; a cluster unreachable at start is probed again later."""
        attempt = 0
        while True:
            try:
                with anyio.fail_after(cluster.config.command_timeout * 2):
                    cluster.probe = await cluster.scheduler.probe()
                log.info("cluster ready", cluster=cluster.name, scheduler=cluster.scheduler.kind, **cluster.probe)
                return
            except Exception as exc:  # probing is advisory; observation shows the cluster's health meanwhile
                attempt += 1
                delay = min(120.0, 5.0 * 2 ** min(attempt - 1, 5))
                log.warning("cluster probe failed; will try again", cluster=cluster.name, error=str(exc),
                            retry_in=delay)
                await anyio.sleep(delay)

    async def close(self) -> None:
        for cluster in self.clusters.values():
            with anyio.CancelScope(shield=True):
                try:
                    await cluster.scheduler.aclose()
                finally:
                    await cluster.transport.aclose()

    async def recover(self) -> None:
        """Load every unfinished run and re-attach to its jobs."""
        runs = await self.store.load_active_runs()
        for run in runs:
            self.runs[run.id] = run
        records = await self.store.jobs_for_runs([r.id for r in runs])
        adopted = 0
        for record in records:
            run = self.runs.get(record.run_id)
            cluster = self.clusters.get(record.cluster)
            if run is None or cluster is None or record.task not in run.tasks:
                continue
            insts = {i.index: i for i in run.tasks[record.task].instances.values() if i.tag == record.tag and i.in_flight}
            if not insts:
                continue
            track = JobTrack(record, request_from_dict(record.request), run, insts)
            if record.job_id is None or any(i.state is State.SUBMITTING for i in insts.values()):
                self.unresolved[cluster.name][record.tag] = track
            else:
                self.tracks[cluster.name][record.tag] = track
                await cluster.scheduler.reattach(track.request, record.job_id)
            adopted += 1
        for run in runs:
            self.mark_dirty(run.id)
        if runs:
            log.info("recovered runs", runs=len(runs), jobs=adopted)

    # ------------------------------------------------------------------ transitions

    def transition(self, run: Run, inst: Instance, new: State, evidence: dict[str, Any], **fields: Any) -> bool:
        """The one way an instance changes state. Illegal changes are refused and logged."""
        old = inst.state
        if not is_legal(old, new):
            self.counters["illegal_transitions"] += 1
            log.error(
                "illegal transition refused",
                run_id=run.id, task=inst.task, index=inst.index, old=old.value, new=new.value, evidence=evidence,
            )
            return False
        now = time.time()
        for name, value in fields.items():
            setattr(inst, name, value)
        inst.state = new
        inst.updated_at = now
        if new in TERMINAL and inst.ended_at is None:
            inst.ended_at = now
        run.updated_at = now
        self.store.put_instance(inst)
        self.store.add_transition(run.id, inst.task, inst.index, old.value, new.value, evidence, now)
        self.counters["transitions"] += 1
        self.events.publish(
            {
                "type": "transition",
                "run_id": run.id,
                "task": inst.task,
                "index": inst.index,
                "from": old.value,
                "to": new.value,
                "attempt": inst.attempt,
                "at": now,
                "reason": inst.reason,
                "error": (inst.error or "")[:500] if new in FAILURE else None,
            }
        )
        emit = log.warning if new in FAILURE and new is not State.UPSTREAM_FAILED else (
            log.info if new in TERMINAL else log.debug)
        emit("task state", run_id=run.id, task=inst.task, index=inst.index, job_id=inst.job_key or inst.job_id,
             cluster=run.cluster, old=old.value, new=new.value, attempt=inst.attempt)
        if old is State.READY:
            self._checked.discard(inst.key)
            self.ready[run.cluster].pop(inst.key, None)
        if new in TERMINAL:
            self._on_terminal(run, inst)
        if new in TERMINAL or new is State.PENDING:
            self.mark_dirty(run.id)
        return True

    def update(self, inst: Instance, **fields: Any) -> None:
        """Change bookkeeping fields without a state change (e.g. a pending reason)."""
        persist = False
        for name, value in fields.items():
            if getattr(inst, name) != value:
                setattr(inst, name, value)
                persist = persist or name in ("reason", "started_at", "host", "job_id", "job_key")
        if persist:
            inst.updated_at = time.time()
            self.store.put_instance(inst)

    def _on_terminal(self, run: Run, inst: Instance) -> None:
        task = run.tasks[inst.task].manifest
        if inst.state is State.SUCCEEDED and task.cache and inst.identity and inst.output_hash:
            self.store.put_cache(inst.identity, inst.output, inst.output_hash, run.workflow, inst.task, run.id, inst.index)
        if inst.state in AUTO_RETRIABLE and inst.attempt <= task.retries and not run.cancel_requested:
            delay = min(self.settings.retry_backoff * (2 ** (inst.attempt - 1)), self.settings.retry_backoff_max)
            previous = inst.state.value
            self.transition(
                run,
                inst,
                State.READY,
                {"source": "auto_retry", "attempt": inst.attempt + 1, "of": task.retries + 1, "after": previous,
                 "error": (inst.error or "")[:500], "delay": delay},
                attempt=inst.attempt + 1,
                not_before=time.time() + delay,
                **_cleared(),
            )
            self._make_ready(run, inst)
            return
        if (
            inst.state in FAILURE
            and inst.state not in (State.CANCELLED, State.UPSTREAM_FAILED)
            and run.options.get("on_error") == "stop"
        ):
            self._stop_run(run, f"on_error=stop after {inst.label} ended {inst.state.value}")

    def _stop_run(self, run: Run, why: str) -> None:
        """Cancel what has not started (including jobs still queued); let what runs finish."""
        for tr in run.tasks.values():
            if not tr.expanded and not tr.blocked:
                self._block(run, tr, State.CANCELLED, why)
            for inst in tr.instances.values():
                queued_key = inst.job_key if inst.state is State.QUEUED else None
                if inst.state in (State.PENDING, State.READY, State.QUEUED):
                    if self.transition(run, inst, State.CANCELLED, {"source": "on_error", "why": why}) and queued_key:
                        self.pending_cancels[run.cluster].add(queued_key)
        self.observer_wake[run.cluster].set()

    def _block(self, run: Run, tr: TaskRun, state: State, reason: str) -> None:
        tr.blocked = state
        tr.blocked_reason = reason
        self.store.put_task(run.id, tr)
        now = time.time()
        self.store.add_transition(run.id, tr.name, None, "pending", state.value, {"task_level": True, "why": reason}, now)
        self.events.publish(
            {"type": "transition", "run_id": run.id, "task": tr.name, "index": None, "from": "pending",
             "to": state.value, "at": now, "task_level": True, "reason": reason}
        )
        self.mark_dirty(run.id)

    def _make_ready(self, run: Run, inst: Instance) -> None:
        """Hand a READY instance (past the cache check) to its cluster's submitter."""
        self._checked.add(inst.key)
        self.ready[run.cluster][inst.key] = (run, inst)
        self.ready_wake[run.cluster].set()

    def set_run_state(self, run: Run, new: RunState, evidence: dict[str, Any]) -> None:
        old = run.state
        if old is new:
            return
        now = time.time()
        run.state = new
        run.updated_at = now
        run.ended_at = now if new in RUN_TERMINAL else None
        self.store.put_run(run)
        self.store.add_transition(run.id, None, None, old.value, new.value, evidence, now)
        self.events.publish({"type": "run", "run_id": run.id, "from": old.value, "to": new.value, "at": now})
        log.info("run state", run_id=run.id, workflow=run.workflow, old=old.value, new=new.value)
        if new in RUN_TERMINAL:
            self.events.end_run(run.id)

    # ------------------------------------------------------------------ evaluation

    def mark_dirty(self, run_id: str) -> None:
        self._dirty.add(run_id)
        self._eval_wake.set()

    async def _evaluate_loop(self) -> None:
        async with anyio.create_task_group() as tg:
            while True:
                await self._eval_wake.wait()
                self._eval_wake = anyio.Event()
                for run_id in list(self._dirty):
                    if run_id in self._evaluating:
                        continue
                    self._dirty.discard(run_id)
                    run = self.runs.get(run_id)
                    if run is not None:
                        self._evaluating.add(run_id)
                        tg.start_soon(self._evaluate_guarded, run)

    async def _evaluate_guarded(self, run: Run) -> None:
        try:
            await self.evaluate(run)
        except Exception:
            log.exception("evaluation failed", run_id=run.id)
            self.counters["evaluation_errors"] += 1
        finally:
            self._evaluating.discard(run.id)
            if run.id in self._dirty:
                self._eval_wake.set()

    def _view(self, tr: TaskRun) -> UpstreamView:
        insts = tr.ordered()
        return UpstreamView(
            is_array=tr.manifest.is_array,
            outputs=[i.output if i.ok else None for i in insts],
            hashes=[i.output_hash if i.ok else None for i in insts],
            ok=[i.ok for i in insts] if not tr.blocked else [False],
        )

    def resolution(self, run: Run, tr: TaskRun) -> Resolution:
        """Inputs of *tr* (cached; recomputed after a restart)."""
        key = (run.id, tr.name)
        res = self._resolutions.get(key)
        if res is None:
            views = {d: self._view(run.tasks[d]) for d in tr.manifest.dependencies}
            res = resolve(tr.manifest, views, run.params, run.run_dir)
            self._resolutions[key] = res
        return res

    async def evaluate(self, run: Run) -> None:
        """Move whatever can move: expand arrays, resolve inputs, check the cache, finish the run."""
        if run.state is not RunState.RUNNING:
            return
        progressed = True
        while progressed:
            progressed = False
            for tr in run.tasks.values():  # manifest order is topological
                if tr.blocked:
                    continue
                deps = [run.tasks[d] for d in tr.manifest.dependencies]
                if not all(d.settled for d in deps):
                    continue
                pending = [i for i in tr.instances.values() if i.state is State.PENDING]
                if tr.expanded and not pending:
                    continue
                if run.cancel_requested:
                    continue
                progressed = True
                views = {d.name: self._view(d) for d in deps}
                try:
                    res = resolve(tr.manifest, views, run.params, run.run_dir)
                except ResolveError as exc:
                    if not tr.expanded:
                        self._block(run, tr, State.FAILED, str(exc))
                    for inst in pending:
                        self.transition(run, inst, State.FAILED, {"source": "resolve"}, error=str(exc))
                    continue
                if res.blocked:
                    if not tr.expanded:
                        self._block(run, tr, State.UPSTREAM_FAILED, res.blocked)
                    for inst in pending:
                        self.transition(run, inst, State.UPSTREAM_FAILED, {"source": "dependencies"},
                                        reason=res.blocked)
                    continue
                self._resolutions[(run.id, tr.name)] = res
                if not tr.expanded:
                    pending = self._expand(run, tr, res.size or 0)
                for inst in pending:
                    blocked = res.element_blocked[inst.index] if inst.index is not None else None
                    if blocked:
                        self.transition(run, inst, State.UPSTREAM_FAILED, {"source": "dependencies"}, reason=blocked)
                        continue
                    identity = identity_for(run.workflow, tr.manifest, res, inst.index)
                    self.transition(run, inst, State.READY, {"source": "dependencies"}, identity=identity)
        unchecked = [
            i for tr in run.tasks.values() for i in tr.instances.values()
            if i.state is State.READY and i.key not in self._checked
        ]
        if unchecked:
            await self._cache_phase(run, unchecked)
        self._maybe_finish(run)

    def _expand(self, run: Run, tr: TaskRun, size: int) -> list[Instance]:
        tr.expanded = True
        tr.size = size
        self.store.put_task(run.id, tr)
        now = time.time()
        created = []
        for i in range(size):
            inst = Instance(run_id=run.id, task=tr.name, index=i)
            tr.instances[i] = inst
            self.store.put_instance(inst)
            created.append(inst)
        self.store.add_transition(run.id, tr.name, None, "pending", "expanded", {"elements": size}, now)
        self.events.publish({"type": "expanded", "run_id": run.id, "task": tr.name, "size": size, "at": now})
        return created

    async def _cache_phase(self, run: Run, instances: list[Instance]) -> None:
        options = run.options
        force_tasks = set(options.get("force_tasks") or [])
        lookup: list[Instance] = []
        for inst in instances:
            task = run.tasks[inst.task].manifest
            if options.get("force") or inst.task in force_tasks or not task.cache or not inst.identity \
                    or inst.not_before is not None:
                self._make_ready(run, inst)
            else:
                lookup.append(inst)
        if not lookup:
            return
        hits = await self.store.cache_lookup(i.identity for i in lookup if i.identity)
        verified: dict[str, str | None] = {}
        if options.get("verify") and hits:
            verified = await self._verify_outputs(run, [(i, hits[i.identity]["output"]) for i in lookup
                                                        if i.identity in hits])
        for inst in lookup:
            if inst.state is not State.READY:
                continue  # cancelled while we looked
            hit = hits.get(inst.identity or "")
            problem = verified.get(inst.identity or "") if hit else None
            if hit and problem is None:
                self.transition(
                    run, inst, State.CACHED,
                    {"source": "cache", "identity": inst.identity, "from_run": hit["run_id"],
                     "verified": bool(options.get("verify"))},
                    output=hit["output"], output_hash=hit["output_hash"], cached_from=hit["run_id"],
                )
            else:
                if hit:
                    log.info("cached result failed verification", run_id=run.id, task=inst.task, index=inst.index,
                             problem=problem)
                self._make_ready(run, inst)

    async def _verify_outputs(self, run: Run, items: list[tuple[Instance, Any]]) -> dict[str, str | None]:
        """``{identity: None (ok) | problem}``: paths must exist; custom ``verify`` runs in a worker."""
        from .verify import verify_outputs

        cluster = self.clusters[run.cluster]
        return await verify_outputs(cluster, run, items)

    def _maybe_finish(self, run: Run) -> None:
        if run.state is not RunState.RUNNING or run.active:
            return
        if run.cancel_requested:
            self.set_run_state(run, RunState.CANCELLED, {"source": "client", "request": "cancel"})
            return
        all_ok = all(i.ok for i in run.instances()) and not any(t.blocked for t in run.tasks.values())
        failed = [i.label for i in run.instances() if i.state in FAILURE and i.state is not State.UPSTREAM_FAILED]
        if all_ok:
            self.set_run_state(run, RunState.SUCCEEDED, {"source": "engine"})
        else:
            blocked = [t.name for t in run.tasks.values() if t.blocked is State.FAILED]
            run.error = f"failed: {', '.join((failed + blocked)[:10])}" if failed or blocked else "failed"
            self.set_run_state(run, RunState.FAILED, {"source": "engine", "failed": (failed + blocked)[:100]})

    # ------------------------------------------------------------------ requests

    async def submit_run(
        self,
        manifest: Manifest,
        params: dict[str, Any],
        run_dir: str,
        cluster: str,
        options: dict[str, Any],
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
        missing = [p.key for p in manifest.cli_params if p.required and p.key not in params]
        if missing:
            raise InvalidRequest(f"missing required parameter(s): {', '.join(missing)}")
        force_tasks = options.get("force_tasks") or []
        unknown = [t for t in force_tasks if t not in {t.name for t in manifest.tasks}]
        if unknown:
            raise InvalidRequest(f"force_tasks names unknown task(s): {', '.join(unknown)}")
        run = Run(
            id=new_run_id(manifest.workflow),
            manifest=manifest,
            params=params,
            run_dir=run_dir,
            cluster=cluster,
            options=options,
        )
        for task in manifest.tasks:
            tr = TaskRun(manifest=task, expanded=not task.is_array)
            run.tasks[task.name] = tr
            self.store.put_task(run.id, tr)
            if not task.is_array:
                inst = Instance(run_id=run.id, task=task.name, index=None)
                tr.instances[None] = inst
                self.store.put_instance(inst)
        self.store.put_run(run)
        self.store.add_transition(run.id, None, None, None, RunState.RUNNING.value,
                                  {"source": "client", "request": "submit"}, run.created_at)
        await self.store.flush()
        self.runs[run.id] = run
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

    async def cancel(self, run_id: str, task: str | None = None) -> int:
        run = await self.get_run(run_id)
        self._check_task(run, task)
        if run.state in RUN_TERMINAL:
            return 0
        self.runs.setdefault(run.id, run)
        count = 0
        to_kill: dict[str, set[str]] = {}
        for tr in run.tasks.values():
            if task is not None and tr.name != task:
                continue
            if not tr.expanded and not tr.blocked:
                self._block(run, tr, State.CANCELLED, "cancelled by request")
                count += 1
            for inst in tr.instances.values():
                if inst.state not in ACTIVE:
                    continue
                key, had_job = inst.job_key, inst.state in (State.QUEUED, State.RUNNING)
                if self.transition(run, inst, State.CANCELLED, {"source": "client", "request": "cancel"}):
                    count += 1
                    if had_job and key:
                        to_kill.setdefault(run.cluster, set()).add(key)
        if task is None:
            run.cancel_requested = True
        for cluster, keys in to_kill.items():
            self.pending_cancels[cluster].update(keys)
            self.observer_wake[cluster].set()
        self.mark_dirty(run.id)
        return count

    async def retry(self, run_id: str, task: str | None = None, verify: bool = True) -> int:
        run = await self.get_run(run_id)
        self._check_task(run, task)
        self.runs.setdefault(run.id, run)
        count = 0
        for tr in run.tasks.values():
            if task is not None and tr.name != task:
                continue
            if tr.blocked in (State.FAILED, State.CANCELLED):
                self._unblock(run, tr)
                count += 1
            for inst in tr.instances.values():
                if inst.state in MANUAL_RETRIABLE:
                    self.transition(
                        run, inst, State.PENDING,
                        {"source": "client", "request": "retry", "after": inst.state.value,
                         "error": (inst.error or "")[:500]},
                        attempt=inst.attempt + 1, not_before=None, **_cleared(),
                    )
                    count += 1
        if count == 0:
            return 0
        # Whatever failed only because of what we retry gets another chance.
        for tr in run.tasks.values():
            if tr.blocked is State.UPSTREAM_FAILED:
                self._unblock(run, tr)
            for inst in tr.instances.values():
                if inst.state is State.UPSTREAM_FAILED:
                    self.transition(run, inst, State.PENDING, {"source": "client", "request": "retry (downstream)"},
                                    reason=None)
        for key in [k for k in self._resolutions if k[0] == run.id]:
            del self._resolutions[key]
        if verify:
            await self._verify_succeeded(run)
        run.cancel_requested = False
        run.error = None
        if run.state is not RunState.RUNNING:
            self.set_run_state(run, RunState.RUNNING, {"source": "client", "request": "retry"})
        self.mark_dirty(run.id)
        return count

    def _unblock(self, run: Run, tr: TaskRun) -> None:
        old = tr.blocked
        tr.blocked = None
        tr.blocked_reason = None
        self.store.put_task(run.id, tr)
        self.store.add_transition(run.id, tr.name, None, old.value if old else None, "pending",
                                  {"task_level": True, "source": "client", "request": "retry"}, time.time())

    async def _verify_succeeded(self, run: Run) -> None:
        """Before a retry: succeeded outputs whose files are gone are produced again."""
        items = [(i, i.output) for i in run.instances() if i.state in SUCCESS and codec.encoded_paths(i.output)]
        if not items:
            return
        problems = await self._verify_outputs(run, items)
        for inst, _ in items:
            problem = problems.get(inst.identity or "")
            if problem and inst.state in SUCCESS:
                self.transition(run, inst, State.READY, {"source": "verify", "problem": problem},
                                attempt=inst.attempt + 1, **_cleared())
                self._make_ready(run, inst)

    # ------------------------------------------------------------------ views

    def status(self, run: Run, task: str | None = None, limit: int = 200) -> dict[str, Any]:
        self._check_task(run, task)
        tasks = []
        for tr in run.tasks.values():
            counts: Counter[str] = Counter(i.state.value for i in tr.instances.values())
            tasks.append(
                {
                    "name": tr.name,
                    "is_array": tr.manifest.is_array,
                    "expanded": tr.expanded,
                    "size": tr.size if tr.manifest.is_array else 1,
                    "blocked": tr.blocked.value if tr.blocked else None,
                    "blocked_reason": tr.blocked_reason,
                    "counts": dict(counts) if tr.expanded else {(tr.blocked or State.PENDING).value: 1},
                }
            )
        failures = [
            _instance_view(i, full=True)
            for i in run.instances()
            if i.state in FAILURE and i.state is not State.UPSTREAM_FAILED and (task is None or i.task == task)
        ][:20]
        out: dict[str, Any] = {
            "run": _run_view(run),
            "tasks": tasks,
            "summary": run.summary(),
            "failures": failures,
        }
        if task is not None:
            insts = run.tasks[task].ordered()
            out["instances"] = [_instance_view(i, full=False) for i in insts[:limit]]
            out["instances_total"] = len(insts)
        cluster = self.clusters.get(run.cluster)
        if cluster is not None:
            out["cluster"] = cluster.status()
        return out

    def stats(self) -> dict[str, Any]:
        states: Counter[str] = Counter()
        for run in self.runs.values():
            for inst in run.instances():
                states[inst.state.value] += 1
        return {
            "uptime": time.time() - self.started_at,
            "runs_in_memory": len(self.runs),
            "runs_active": sum(1 for r in self.runs.values() if r.state is RunState.RUNNING),
            "instances": dict(states),
            "tracked_jobs": {n: len(t) for n, t in self.tracks.items()},
            "store": {"backlog": self.store.backlog, "commits": self.store.commits, "rows": self.store.rows_written},
            "counters": dict(self.counters),
            "watchers": self.events.count,
            "clusters": {n: c.status() for n, c in self.clusters.items()},
            "pid": os.getpid(),
        }

    def subscribe(self, run_id: str | None) -> Subscription:
        return self.events.subscribe(run_id)

    async def logs(self, run_id: str, task: str, index: int | None, max_bytes: int = 65536) -> dict[str, Any]:
        from .submitter import log_paths_for

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
        request = request_from_dict(records[0].request)
        out_path, err_path = log_paths_for(request, index)
        cluster = self.clusters[run.cluster]
        files = await cluster.transport.read_files([out_path, err_path], timeout=cluster.config.command_timeout)
        def tail(data: bytes | None) -> str:
            if data is None:
                return ""
            return data[-max_bytes:].decode("utf-8", "replace")
        return {"stdout": tail(files[out_path]), "stderr": tail(files[err_path]), "stdout_path": out_path,
                "stderr_path": err_path}

    async def _janitor(self) -> None:
        """Drop long-finished runs from memory (the store keeps them)."""
        while True:
            await anyio.sleep(60)
            cutoff = time.time() - self.settings.keep_finished
            for run_id, run in list(self.runs.items()):
                if run.state in RUN_TERMINAL and (run.ended_at or 0) < cutoff and not run.active:
                    del self.runs[run_id]
                    for key in [k for k in self._resolutions if k[0] == run_id]:
                        del self._resolutions[key]

    def instances_where(self, states: Iterable[State]) -> list[tuple[Run, Instance]]:
        wanted = set(states)
        return [(r, i) for r in self.runs.values() for i in r.instances() if i.state in wanted]


def _cleared() -> dict[str, Any]:
    return {
        "tag": None, "job_id": None, "job_key": None, "output": None, "output_hash": None, "reason": None,
        "submitted_at": None, "started_at": None, "ended_at": None, "host": None, "error": None, "traceback": None,
        "cached_from": None, "absent_since": None, "absent_count": 0, "done_seen_at": None,
    }


def _run_view(run: Run) -> dict[str, Any]:
    return {
        "id": run.id,
        "workflow": run.workflow,
        "state": run.state.value,
        "cluster": run.cluster,
        "run_dir": run.run_dir,
        "created_at": run.created_at,
        "updated_at": run.updated_at,
        "ended_at": run.ended_at,
        "error": run.error,
        "params": run.params,
        "options": run.options,
    }


def _instance_view(inst: Instance, full: bool) -> dict[str, Any]:
    view: dict[str, Any] = {
        "task": inst.task,
        "index": inst.index,
        "state": inst.state.value,
        "attempt": inst.attempt,
        "job_id": inst.job_key or inst.job_id,
        "reason": inst.reason,
        "error": inst.error,
        "host": inst.host,
        "submitted_at": inst.submitted_at,
        "started_at": inst.started_at,
        "ended_at": inst.ended_at,
        "cached_from": inst.cached_from,
    }
    if full:
        view["traceback"] = inst.traceback
    if inst.ok:
        text = codec.canonical_json(inst.output)
        view["output"] = text if len(text) <= 200 else text[:197] + "..."
    return view


__all__ = ["Engine", "EngineError", "EngineSettings", "InvalidRequest", "JobTrack", "UnknownRun", "IN_FLIGHT"]
