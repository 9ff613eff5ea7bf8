"""Slurm-side dependencies: a downstream job submitted before its upstream ended.

When every element of a singleton task's upstream is in Slurm's queue (or done) -- a gather after an
array, a single task after a single task -- the task's job can go out at once, waiting in Slurm's
queue on ``--dependency=afterok:<upstream job ids> --kill-on-invalid-dep=yes``. Slurm starts it the
moment the upstream ends, while the daemon is still noticing; the worker resolves its inputs from the
upstream's result files (``engine/deferred.py``). The engine still holds the instance PENDING, so the
early job belongs to this module until the engine makes the instance READY:

* **adopt** (``claim`` from ``Driver.submit``, then ``adopt``): the job's recipe must still describe
  the inputs (the upstream elements succeeded in the very files it reads) and the job must be alive in
  the queue or have started; then the instance goes SUBMITTING -> QUEUED under the early job's tag,
  with no second sbatch, and is observed like any other submission;
* **drop** (anything else: a cache hit, a cancel, an upstream failure, a retry that changed the
  inputs, a recipe that no longer matches): a ``cancel/single.json`` marker first (a worker that
  starts later exits without running the task), then ``scancel``, and the instance goes out the
  normal way if it still should.

Every early job is a ``jobs`` record (states ``early_submitting``, ``early``; ``dropped`` once
dropped) written before its sbatch, so a restarted daemon finds it (``recovered``) and adopts or
drops it: never a second submission of the same instance.

Element-wise chains (an array mapped over an array, ``aftercorr``) are ``chains.py``'s: this class hands
them their hooks and runs their steps in its loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from reflow_client import jobfiles
from reflow_client.manifest import TaskManifest

from .. import world
from ..budget import Budget
from ..engine import causes, deferred
from ..engine.decide import Decision
from ..engine.model import Instance, JobRecord, Run, TaskRun
from ..engine.records import reset_values
from ..engine.states import IN_FLIGHT, SUCCESS, RunState, State
from ..schedulers.base import Phase, Presence, SubmitError, SubmitRequest
from ..schedulers.slurm_commands import dependency_options, option_flag
from ..transports.base import TransportError
from .submit import Submitter, adopt, entrypoint, new_tag

if TYPE_CHECKING:
    from .chains import ChainJobs
    from .driver import Driver
    from .track import JobTrack

log = structlog.get_logger("reflowd.early")

#: Record states of an early job the engine has not adopted (yet).
EARLY_STATES = ("early_submitting", "early")
DROPPED = "dropped"
#: An early sbatch the scheduler refused outright (nothing was queued): the normal way instead.
REFUSED = "refused"
#: Upstream elements a recipe may name: a larger gather goes out the normal way (its recipe and the
#: worker's reads would cost more than the hand-over saves).
MAX_ELEMENTS = 10_000
#: Tokens the cluster's command budget must hold for an early sbatch (it leaves one for the next poll).
SPARE_TOKENS = 2.0
#: sbatch options that say how a job depends on others: a task that sets its own keeps the normal path.
OWN_OPTIONS = ("dependency", "kill-on-invalid-dep")
#: Seconds between two looks at undecided early arrays whose run may have stopped without telling (and
#: between two tries of a drop that raised).
SWEEP = 5.0
#: Tries of a drop that raises (a bug): then it is left to the next daemon start (its record says early).
DROP_TRIES = 5


#: Seconds before an early job whose check got no answer from the cluster is checked again.
RECHECK = 5.0


class CheckLater(Exception):
    """An early job's check got no answer from the cluster: try again (never give the job up for that)."""


class EarlyJobs:
    """A cluster driver's early (dependency) submissions."""

    def __init__(self, driver: Driver) -> None:
        self.d = driver
        #: (run id, task) -> the early job's record, while the engine has not adopted or dropped it.
        self.jobs: dict[tuple[str, str], JobRecord] = {}
        self._busy: set[tuple[str, str]] = set()  # an early sbatch in progress
        self._runs: dict[str, Run] = {}  # runs whose upstream went out: look for downstream tasks
        self._claims: dict[Instance, tuple[Run, JobRecord]] = {}
        #: Claims whose check could not be made (the cluster did not answer): when to try again.
        self._recheck: dict[Instance, float] = {}
        self._drops: list[JobRecord] = []
        #: Drops that raised, tried again later: tag -> (record, tries so far, when the next is due).
        self._redrops: dict[str, tuple[JobRecord, int, float]] = {}
        self._wake = anyio.Event()
        from .chains import ChainJobs  # (chains.py builds on this module's helpers)

        #: Element-wise chains (``aftercorr``) submitted early.
        self.chains: ChainJobs = ChainJobs(self)

    @property
    def watching(self) -> bool:
        """Whether any early job waits for the engine (its hooks have something to do)."""
        return bool(self.jobs) or self.chains.active

    @property
    def settled(self) -> bool:
        """Nothing left to do: no early job waits for the engine, none is being withdrawn or to be again."""
        return not (self.jobs or self.chains.active or self._drops or self._redrops or self._claims)

    @property
    def enabled(self) -> bool:
        cluster = self.d.cluster
        return cluster.scheduler.kind == "slurm" and bool(getattr(cluster.config, "slurm_dependencies", False))

    # ------------------------------------------------------------------ hooks (synchronous)

    def upstream_submitted(self, run: Run) -> None:
        """A job of *run* has its id: a downstream task may now go out early."""
        if self.enabled and run.state is RunState.RUNNING:
            self._runs[run.id] = run
            self._wake.set()

    def claim(self, run: Run, inst: Instance) -> bool:
        """A READY instance handed to the driver: True if its early job will be adopted (or dropped) here."""
        if inst.index is not None:
            if self.chains.claim(run, inst):
                self._wake.set()
                return True
            return False
        record = self.jobs.get((run.id, inst.task))
        if record is None:
            return False
        self._claims[inst] = (run, record)
        self._wake.set()
        return True

    def left(self, run: Run, inst: Instance, new: State) -> None:
        """The engine changed *inst*'s state: an early job it no longer waits for is dropped."""
        if self.chains.active and new not in (State.PENDING, State.READY):
            self.chains.left(run, inst)
            self._wake.set()
        if new not in IN_FLIGHT and new not in SUCCESS:
            self._upstream_left(run, inst)
        key = (run.id, inst.task)
        record = self.jobs.get(key)
        if record is None or inst.index is not None or new in (State.PENDING, State.READY):
            return
        del self.jobs[key]
        self._claims.pop(inst, None)
        self._recheck.pop(inst, None)
        if new is State.SUBMITTING and inst.tag == record.tag:
            return  # adopted
        self._drop(record)

    def _upstream_left(self, run: Run, inst: Instance) -> None:
        """*inst* left flight (or success) otherwise than by succeeding -- failed, lost, retried, cancelled: an
        early job that reads it from its job's result file is withdrawn at once. Waiting for the hand-over to
        notice would be too late if the daemon gave up on an element that then ended well after all (taken
        for lost, say): Slurm would start the early job on it while the element runs again elsewhere."""
        for key, record in list(self.jobs.items()):
            tr = run.tasks.get(key[1]) if key[0] == run.id else None
            if tr is not None and inst.task in tr.manifest.dependencies:
                del self.jobs[key]
                for claimed in [i for i, (_, r) in self._claims.items() if r is record]:
                    del self._claims[claimed]
                    self._recheck.pop(claimed, None)
                    if claimed.state is State.READY and not claimed.tag:
                        self.d.submit(run, [claimed])  # (no longer claimed: the usual way)
                self._drop(record)
        if self.chains.active:
            self.chains.upstream_left(run, inst)

    def recovered(self, record: JobRecord, run: Run) -> None:
        """An early job an earlier daemon made: keep it for adoption while the instance waits, else drop it."""
        if record.request.indices is not None:  # an element-wise chain
            if self.chains.recovered(record, run):
                self._wake.set()
            else:
                self._drop(record)
            return
        tr = run.tasks.get(record.task)
        inst = tr.instances.get(None) if tr is not None else None
        if inst is not None and inst.state in (State.PENDING, State.READY) and run.state is RunState.RUNNING:
            self.jobs[(run.id, record.task)] = record
        else:
            self._drop(record)

    def made(self, record: JobRecord, run: Run) -> bool:
        """Whether *record* is one of ours: its dependency options are reflowd's, not the task's own (a task
        that sets its own never goes out early)."""
        options = record.request.options
        if "dependency" not in options or options.get("kill-on-invalid-dep") != "yes":
            return False
        tr = run.tasks.get(record.task)
        return tr is None or not sets_own_dependency(self.d, tr.manifest)

    def _drop(self, record: JobRecord) -> None:
        self.d.count("early_dropped")
        self._drops.append(record)
        self._wake.set()

    # ------------------------------------------------------------------ the loop

    async def loop(self) -> None:
        while True:
            wake = self._wake
            now = world.monotonic()
            due = min([*(due for _, _, due in self._redrops.values()), *self._recheck.values()], default=math.inf)
            with anyio.move_on_after(min(SWEEP if self.chains.active else math.inf, max(0.0, due - now))):
                await wake.wait()
            if not wake.is_set():
                self.chains.sweep()
            now = world.monotonic()
            for record, _, due in list(self._redrops.values()):
                if due <= now:
                    self._drops.append(record)
            self._wake = anyio.Event()
            runs, self._runs = self._runs, {}
            for run in runs.values():
                await self._guard(self._submit_for(run), f"submitting early for run {run.id}")
            await self._guard(self.chains.step(), "deciding early element-wise arrays")
            drops, self._drops = self._drops, []
            for record in drops:
                await self.withdraw(record)
            claims = {i: c for i, c in self._claims.items()
                      if (c[0].id, i.task) not in self._busy and self._recheck.get(i, 0.0) <= now}
            for inst in claims:
                del self._claims[inst]
                self._recheck.pop(inst, None)
            for inst, (run, record) in claims.items():
                try:
                    await self.adopt(run, inst, record)
                except Exception as exc:
                    await self._adopt_failed(run, inst, record, exc)
            if any((run.id, inst.task) in self._busy for inst, (run, _) in self._claims.items()):
                await anyio.sleep(0.05)  # waiting for an early sbatch to answer
                self._wake.set()

    async def _submit_for(self, run: Run) -> None:
        """The early submissions *run* may make now (its upstream jobs have ids)."""
        for tr, inst, upstream, job_ids in self.eligible(run):
            await self._guard(self.submit(run, tr, inst, upstream, job_ids),
                              f"submitting {tr.name} early (run {run.id})")
        if self.may_submit(run, count=False):
            for ctr, dep, values, track in self.chains.eligible(run):
                if not self.may_submit(run):
                    break
                await self._guard(self.chains.submit(run, ctr, dep, values, track),
                                  f"submitting {ctr.name} early, element-wise (run {run.id})")

    async def _guard(self, step: Any, where: str) -> None:
        """A step that concerns no instance in flight yet: an exception is shown on the cluster (``status``,
        ``stats``) and the instance goes the usual way. That is safe: the early job's record, written before
        its sbatch, is adopted by its tag or withdrawn when the instance is handed over -- never run twice."""
        try:
            await step
        except Exception as exc:
            self.shown(where, exc)

    def shown(self, where: str, exc: Exception, run: Run | None = None) -> None:
        """An unexpected exception on the early path, shown (on *run* too, failed, when given)."""
        self.d.count("early_errors")
        self.d.loop_failed(where, exc, run)

    def failed(self, run: Run, insts: Iterable[Instance], where: str, exc: Exception, record: JobRecord) -> None:
        """An exception that leaves *insts* no safe way out (their early job may run them): those still waiting
        fail with the error, and so does their run; with none waiting any more, it is shown on the cluster."""
        if fail(self.d, run, insts, where, exc, record.tag):
            self.shown(where, exc, run)
        else:
            self.shown(f"{where} (run {run.id}, tag {record.tag})", exc)

    async def _adopt_failed(self, run: Run, inst: Instance, record: JobRecord, exc: Exception) -> None:
        """Adopting *record* for *inst* raised: an error tied to the run, which fails with it (as any submission
        that raises). After the instance went out under the early job's tag, that submission failed
        (``Driver.track_failed``: the job is cancelled). Before, the instance cannot go the usual way either: the
        early job may have started it already (finding out is what raised), so it fails, and the early job is
        withdrawn."""
        d = self.d
        where = f"adopting the early job of {inst.task}"
        if inst.tag == record.tag and inst.in_flight:
            track = d.tracks.get(record.tag) or d.unresolved.get(record.tag) or d.new_track(record, run, {None: inst})
            d.count("early_errors")
            d.track_failed(track, where, exc)
            return
        self.jobs.pop((run.id, inst.task), None)
        self.failed(run, [inst], where, exc, record)
        await self.withdraw(record)

    async def withdraw(self, record: JobRecord, run: Run | None = None, insts: Iterable[Instance] = ()) -> bool:
        """:meth:`drop`, with an exception shown. The drop is tried again later (every :data:`SWEEP` seconds, at
        most :data:`DROP_TRIES` times); *insts*, which were to go the usual way, fail with the error instead (with
        their run): while their early job may still run, a second submission could run them twice."""
        try:
            await self.drop(record)
            self._redrops.pop(record.tag, None)
            return True
        except Exception as exc:
            what = "array" if record.request.indices is not None else "job"
            where = f"withdrawing the early {what} of {record.task}"
            if run is not None:
                self.failed(run, insts, where, exc, record)
            else:
                self.shown(f"{where} (run {record.run_id}, tag {record.tag})", exc)
            tries = self._redrops.get(record.tag, (record, 0, 0.0))[1] + 1
            if tries < DROP_TRIES:
                self._redrops[record.tag] = (record, tries, world.monotonic() + SWEEP)
            else:
                self._redrops.pop(record.tag, None)
                log.error("giving up withdrawing an early job (the next daemon start tries again)", tag=record.tag)
            return False

    # ------------------------------------------------------------------ early submission

    def eligible(self, run: Run) -> list[tuple[TaskRun, Instance, dict[str, tuple[bool, list[list[Any]]]], set[str]]]:
        """Singleton tasks of *run* whose upstream elements are all done or queued under a known job id."""
        d = self.d
        if not self.may_submit(run):
            return []
        out = []
        for tr in run.tasks.values():
            task = tr.manifest
            key = (run.id, tr.name)
            if task.is_array or not task.dependencies or key in self.jobs or key in self._busy:
                continue
            inst = tr.instances.get(None)
            if inst is None or inst.state is not State.PENDING or inst.tag or inst.resources:
                continue
            if not may_go_early(d, run, task):
                continue
            found = self._upstream(run, task.dependencies)
            if found is not None:
                out.append((tr, inst, *found))
        return out

    def may_submit(self, run: Run, count: bool = True) -> bool:
        """An early sbatch for *run* now? Not under a queue cap (it would not be counted), and only with a
        command token to spare (:func:`spare_token`)."""
        d = self.d
        if run.cancel_requested or run.error or run.state is not RunState.RUNNING \
                or d.queue_limit.cap(world.now()) is not None:
            return False
        if not spare_token(d.cluster.budget):
            if count:
                d.count("early_skipped_budget")
            return False
        return True

    def _upstream(self, run: Run, deps: list[str]) -> tuple[dict[str, tuple[bool, list[list[Any]]]], set[str]] | None:
        upstream: dict[str, tuple[bool, list[list[Any]]]] = {}
        job_ids: set[str] = set()
        count = 0
        for dep in deps:
            dtr = run.tasks.get(dep)
            if dtr is None or dtr.blocked or not dtr.expanded:
                return None
            indices: list[int | None] = list(range(dtr.size or 0)) if dtr.manifest.is_array else [None]
            count += len(indices)
            if count > MAX_ELEMENTS:
                return None
            elements: list[list[Any]] = []
            for i in indices:
                u = dtr.instances.get(i)
                if u is None:
                    return None
                if u.state in SUCCESS:
                    elements.append(["value", u.output, u.output_hash])
                    continue
                track = self.d.tracks.get(u.tag) if u.tag and u.state in (State.QUEUED, State.RUNNING) else None
                if track is None or not track.record.job_id:
                    return None
                elements.append(["file", jobfiles.result_path(track.request.job_dir, i)])
                job_ids.add(track.record.job_id)
            upstream[dep] = (dtr.manifest.is_array, elements)
        return (upstream, job_ids) if job_ids else None

    async def submit(self, run: Run, tr: TaskRun, inst: Instance, upstream: dict[str, tuple[bool, list[list[Any]]]],
                     job_ids: set[str]) -> None:
        d, cluster = self.d, self.d.cluster
        key = (run.id, tr.name)
        self._busy.add(key)
        try:
            tag = new_tag()
            submitter = Submitter(d)
            request = submitter.build_request(run, tr, [inst], tag)
            request = dataclasses.replace(request, options={**request.options, **dependency_options(job_ids)})
            recipe = deferred.recipe(run.workflow, tr.manifest, run.params, run.run_dir, inst.attempt, upstream)
            job = {"run_id": run.id, "workflow": run.workflow, "task": tr.name,
                   "entrypoint": entrypoint(run, cluster.remote), "run_dir": run.run_dir, "tag": tag, "kwargs": {},
                   deferred.JOB_KEY: recipe}
            if not await write_job(submitter, run, tr.name, request, job):
                return
            if inst.state is not State.PENDING or inst.attempt != recipe["attempt"] or run.state is not RunState.RUNNING:
                return  # moved on while we wrote (nothing was submitted)
            record = JobRecord(tag, run.id, tr.name, cluster.name, request, state="early_submitting",
                               submitted_at=world.now())
            d.store.put_job(record)
            self.jobs[key] = record
            job_id = await submit_early(d, record)
            if job_id is None:
                if record.state == REFUSED and self.jobs.get(key) is record:
                    del self.jobs[key]
                    if inst in self._claims:
                        del self._claims[inst]
                        d.submit(run, [inst])
                return
            if self.jobs.get(key) is not record:
                self._drop(record)  # dropped while sbatch ran: cancel it now that it has an id
        finally:
            self._busy.discard(key)
            if self._claims:
                self._wake.set()

    # ------------------------------------------------------------------ adoption

    async def adopt(self, run: Run, inst: Instance, record: JobRecord) -> None:
        d = self.d
        key = (run.id, inst.task)
        if inst.state is not State.READY or self.jobs.get(key) is not record:
            if inst.state is State.READY and not inst.tag:
                d.submit(run, [inst])
            return
        try:
            why = await self._check(run, inst, record)
        except CheckLater as exc:  # the job may have started: never give it up for want of an answer
            if inst.state is State.READY and self.jobs.get(key) is record:
                log.info("cannot check an early job yet; will try again", run_id=run.id, task=inst.task,
                         tag=record.tag, error=str(exc))
                self._claims[inst] = (run, record)
                self._recheck[inst] = world.monotonic() + RECHECK
            return
        if inst.state is not State.READY or self.jobs.get(key) is not record:
            return  # changed meanwhile (left() dropped it)
        if why is not None:
            log.info("early job not adopted; submitting the usual way", run_id=run.id, task=inst.task,
                     tag=record.tag, why=why)
            await self._give_up(run, inst, record)
            return
        del self.jobs[key]
        job_id = record.job_id or ""
        record.state = "submitting"
        d.store.put_job(record)
        now = world.now()
        if not d.host.transition(run, inst, State.SUBMITTING, {"source": "early", "tag": record.tag, "job_id": job_id},
                                 tag=record.tag, submitted_at=now, not_before=None):
            await self._give_up(run, inst, record)
            return
        track = d.new_track(record, run, {None: inst})
        d.count("early_adopted")
        if not job_id:
            resolve_by_tag(d, track)
            return
        await adopt(d, track, job_id, {"source": "scheduler", "job_id": job_id, "early": True})

    async def _check(self, run: Run, inst: Instance, record: JobRecord) -> str | None:
        """Why the early job cannot be adopted, or None. Its job id is resolved by tag if the sbatch's answer
        was lost. Raises :class:`CheckLater` if the cluster does not answer: the job may well have started
        (Slurm starts it the moment its upstream ends), and giving it up would run the task twice."""
        d, cluster = self.d, self.d.cluster
        timeout = cluster.config.command_timeout
        try:
            if not record.job_id:
                record.job_id = await self._find(record)
                if record.job_id:
                    record.state = "early"
                    d.store.put_job(record)
            job_dir = record.request.job_dir
            path = f"{job_dir}/{jobfiles.JOB_FILE}"
            raw = (await cluster.metered.read_files([path], timeout=timeout)).get(path)
            if raw is None:
                return "its job file is gone"
            recipe = load_job(raw)[deferred.JOB_KEY]
            why = self._matches(run, inst, recipe)
            if why is not None:
                return why
            withdrawn = jobfiles.cancel_path(job_dir, None)
            marks = [jobfiles.started_path(job_dir, None), jobfiles.result_path(job_dir, None)]
            seen = await cluster.metered.exists([withdrawn, *marks], timeout=timeout)
            if seen[withdrawn]:
                return "it was withdrawn (a daemon began dropping it)"
            if any(seen[m] for m in marks) or not record.job_id:
                # It started: the observer follows what it does. Or no job carries its tag (yet): a new job can
                # be invisible to look-ups for a moment, and one that ran must not be given up (the task would
                # run twice): its tag decides, as for any submission whose sbatch's answer was lost.
                return None
            answers = await cluster.scheduler.query([record.job_id])
            obs = answers.get(record.job_id)
            if obs is not None and obs.presence is Presence.PRESENT and obs.phase is not Phase.DONE:
                return None
            if any((await cluster.metered.exists(marks, timeout=timeout)).values()):
                return None  # (it started and ended between the two looks)
            state = (obs.native_state or "") if obs is not None else "unknown to Slurm"
            return f"job {record.job_id} ended without starting ({state})"
        except (TransportError, TimeoutError, OSError) as exc:
            raise CheckLater(f"{type(exc).__name__}: {exc}") from exc
        except (ValueError, KeyError, TypeError) as exc:
            return f"cannot check it: {type(exc).__name__}: {exc}"

    def _matches(self, run: Run, inst: Instance, recipe: dict[str, Any]) -> str | None:
        for dep, up in recipe["upstream"].items():
            dtr = run.tasks.get(dep)
            size = (dtr.size or 0) if dtr is not None and dtr.manifest.is_array else 1
            if dtr is None or len(up["elements"]) != size:
                return f"upstream {dep} has another number of elements"
        if set(recipe["upstream"]) != set(run.tasks[inst.task].manifest.dependencies):
            return "written for other upstream tasks"

        def current(dep: str, n: int) -> tuple[str | None, str | None] | None:
            dtr = run.tasks[dep]
            u = dtr.instances.get(n if dtr.manifest.is_array else None)
            if u is None or u.state not in SUCCESS:
                return None
            if u.state is State.SUCCEEDED and u.tag:
                return jobfiles.result_path(jobfiles.job_dir(run.run_dir, run.id, u.tag), u.index), u.output_hash
            return None, u.output_hash

        return deferred.matches(recipe, inst.attempt, current)

    async def _find(self, record: JobRecord) -> str | None:
        """The job an sbatch with an unknown answer made, by its tag (extra ones are cancelled)."""
        found = (await self.d.cluster.scheduler.find_tags([record.tag])).get(record.tag) or []
        self.d.cancel_jobs([extra.job_id for extra in found[1:]])  # (owed durably: nobody follows them)
        return found[0].job_id if found else None

    async def _give_up(self, run: Run, inst: Instance, record: JobRecord) -> None:
        """Drop the early job (its worker will not run the task) before the instance goes out the usual way."""
        self.jobs.pop((run.id, inst.task), None)
        self.d.count("early_dropped")
        if await self.withdraw(record, run, [inst]) and inst.state is State.READY and not inst.tag:
            self.d.submit(run, [inst])

    async def drop(self, record: JobRecord) -> None:
        """Withdraw an early job: the marker that stops its worker, then ``scancel``; recorded ``dropped``."""
        if record.request.indices is not None:  # an element-wise chain: a marker per element
            await self.chains.drop(record, None)
            return
        d, cluster = self.d, self.d.cluster
        timeout = cluster.config.command_timeout
        try:
            await cluster.metered.write_files({jobfiles.cancel_path(record.request.job_dir, None): b"{}"},
                                              timeout=timeout)
        except (TransportError, OSError, TimeoutError) as exc:
            log.warning("cannot mark an early job withdrawn; cancelling it", tag=record.tag, error=str(exc))
        if not record.job_id:
            try:
                record.job_id = await self._find(record)
            except (TransportError, TimeoutError) as exc:
                log.warning("cannot look an early job up by tag; its marker stops it", tag=record.tag, error=str(exc))
        if record.job_id:
            d.cancel_jobs([record.job_id])  # (owed durably: a dropped record is not recovered)
        record.state = DROPPED
        d.store.put_job(record)
        log.info("early job dropped", run_id=record.run_id, task=record.task, tag=record.tag, job_id=record.job_id)


def resolve_by_tag(d: Driver, track: JobTrack) -> None:
    """An adopted early job whose id no look-up found yet: an unresolved submission like any other, which the
    observer looks up by its tag (``Observer.resolve_unresolved``: adopted once found; after two looks, its job
    directory's traces decide)."""
    track.resolve_after = world.now()
    d.add_unresolved(track)
    d.wake()


def sets_own_dependency(d: Driver, task: TaskManifest) -> bool:
    """Does *task* (or its cluster) set sbatch's dependency options itself? Then reflowd never adds its own."""
    options = {**d.cluster.config.submit_options, **task.config.get("submit_options", {})}
    return any(option_flag(k) in OWN_OPTIONS for k in options)


def may_go_early(d: Driver, run: Run, task: TaskManifest) -> bool:
    """May *task* of *run* go out before its upstream ended (a single task or an element-wise chain)? Not when
    it sets its own dependency options, nor when it is cached and its upstream is forced: the forced
    upstream most likely makes the same outputs again, and the task will be a cache hit."""
    if task.cache and (run.options.force or set(task.dependencies) & set(run.options.force_tasks)):
        return False
    return not sets_own_dependency(d, task)


def fail(d: Driver, run: Run, insts: Iterable[Instance], where: str, exc: Exception, tag: str) -> bool:
    """*insts* that wait for a submission (PENDING, READY) fail with the error; False if none did."""
    error = f"internal error while {where}: {type(exc).__name__}: {exc}"
    waiting = [i for i in insts if i.state in (State.PENDING, State.READY)]
    for inst in waiting:
        if inst.state in (State.PENDING, State.READY):  # (failing one can stop the others: on_error=stop)
            d.host.transition(run, inst, State.FAILED, {"source": "early", "error": error[:500], "tag": tag},
                              error=error)
    return bool(waiting)


async def write_job(submitter: Submitter, run: Run, task: str, request: SubmitRequest, job: dict[str, Any]) -> bool:
    """An early job's entry point, directories and ``job.json``, written before its record exists: False
    (logged) if they cannot be, and the task goes out the usual way (nothing was submitted)."""
    cluster = submitter.d.cluster
    timeout = cluster.config.command_timeout * 2
    try:
        await submitter.stage_entrypoint(run)
        await cluster.metered.makedirs([request.log_dir, request.job_dir], timeout=timeout)
        await cluster.metered.write_files({f"{request.job_dir}/{jobfiles.JOB_FILE}": jobfiles.dumps(job)},
                                          timeout=timeout)
    except (TransportError, OSError, TimeoutError) as exc:
        log.info("cannot write an early job's files; it goes out the usual way", run_id=run.id, task=task,
                 error=str(exc))
        return False
    return True


async def submit_early(d: Driver, record: JobRecord, *counters: str) -> str | None:
    """The sbatch of an early job whose ``early_submitting`` record is written: the job id, or None.

    The record is flushed first (its tag is durable before Slurm hears of it, so a restarted daemon finds
    the job by tag); None with the record ``refused`` means nothing was queued (the caller sends its
    instances the normal way), None otherwise means the outcome is unknown and the tag will tell (``_find``).
    *counters* are counted with ``early_submitted``."""
    cluster = d.cluster
    await d.store.flush()
    d.fault("before_early_submit")
    cluster.count("submit")
    for name in ("early_submitted", *counters):
        d.count(name)
    request = record.request
    try:
        job_id = await cluster.scheduler.submit(request)
    except SubmitError as exc:
        if not exc.permanent:
            log.warning("early submission outcome unknown; its tag will tell", run_id=record.run_id, tag=record.tag,
                        error=str(exc))
            return None
        log.info("early submission refused; it goes out the usual way", run_id=record.run_id, task=record.task,
                 error=str(exc))
        record.state = REFUSED
        d.store.put_job(record)
        return None
    except (TransportError, TimeoutError) as exc:
        log.warning("early submission outcome unknown; its tag will tell", run_id=record.run_id, tag=record.tag,
                    error=str(exc) or type(exc).__name__)
        return None
    record.job_id, record.state = job_id, "early"
    d.store.put_job(record)
    log.info("submitted early", run_id=record.run_id, task=record.task, tag=record.tag, job_id=job_id,
             dependency=request.options.get("dependency"), packed=request.slices is not None)
    return job_id


def never_started(concluding: list[tuple[Instance, Decision]], started: set[str]
                  ) -> list[tuple[Instance, Decision]]:
    """What the adopted elements of an early job that ended without a result become: one that never
    started (no ``started`` marker) and that the scheduler cancelled or lost goes back to READY, its attempt
    unchanged -- no failure, and it runs once, the usual way.

    Adoption checks that the upstream elements succeeded, but an upstream job can still end badly after its
    elements wrote their results (killed, a failing epilogue): Slurm then cancels the early job for its
    dependency (``--kill-on-invalid-dep=yes``) while reflowd already holds it as the elements' submission.
    Other ends (a node that failed at boot, say) keep the scheduler's verdict, as for any job."""
    out = []
    for inst, decision in concluding:
        cause = decision.fields.get("cause") or {}
        if f"{jobfiles.element_key(inst.index)}.json" in started or not (
                decision.state is State.CANCELLED or cause.get("kind") == causes.LOST):
            out.append((inst, decision))
            continue
        evidence = {"source": "early", "note": "its early job ended before it started (its dependency failed)",
                    "job_state": decision.evidence.get("scheduler_state") or decision.evidence.get("presence"),
                    "tag": inst.tag}
        out.append((inst, Decision(State.READY, evidence, reset_values(Instance))))
    return out


def spare_token(budget: Budget) -> bool:
    """An early sbatch is charged like any command: only with a token to spare beyond the next poll, or it
    would delay the observation of the very upstream it waits for (measured: a 12-a-minute budget made
    every hand-over of the benchmark's run 2 s slower)."""
    return budget.bucket.wait_time() == 0.0 and budget.bucket.tokens >= SPARE_TOKENS


def load_job(raw: bytes) -> dict[str, Any]:
    """An early job's ``job.json`` as read back (its recipe is checked before adoption)."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("job file is not a JSON object")
    return data
