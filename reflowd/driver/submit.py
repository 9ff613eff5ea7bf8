"""Submitting READY instances to a cluster, exactly once.

The submit loop groups READY instances into batches (one array job per
ready task, chunked to the scheduler's array size limit; one job per
singleton) and submits each batch:

1. write the job files (job.json, inputs) through the transport;
2. record the instances as SUBMITTING with a fresh tag, and **flush** the store;
3. call the scheduler (the tag is the job's name);
4. record the job id (QUEUED).

A crash between 2 and 4 leaves SUBMITTING records whose tag the observer
resolves on restart: adopt the job if the scheduler knows the tag, submit
again if it provably does not. A failed or timed-out scheduler call is
treated the same way -- its outcome is unknown, so the tag decides.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import structlog

from reflow_client import jobfiles
from reflow_client.resources import format_mem

from .. import world
from ..steps import run_steps
from ..engine.model import Instance, JobRecord, Run, TaskRun
from ..engine.resolve import ResolveError
from ..engine.states import FAILURE, State
from ..schedulers.base import SubmitError, SubmitRequest, log_path
from ..transports.base import TransportError
from . import queue_limits
from . import packing
from .track import JobTrack

if TYPE_CHECKING:
    from .driver import Driver

log = structlog.get_logger("reflowd.submitter")

#: Seconds before job files that could not be written are tried again.
WRITE_RETRY = 10.0
#: Instances moved between two yields to the event loop (a batch can be a whole local array).
YIELD_EVERY = 128
#: READY instances formed into jobs per round of the submit loop (at least one array of the scheduler's
#: largest size, so arrays go out whole), and between two yields while forming them.
TAKE_ELEMENTS = 4096
FORM_YIELD_EVERY = 1024
#: Seconds before a submit round whose bookkeeping raised is tried again.
ROUND_RETRY = 5.0


def new_tag() -> str:
    return "rf" + world.token_hex(8)


def log_paths_for(request: SubmitRequest, index: int | None) -> tuple[str, str]:
    """An element's stdout/stderr files (in a packed job, its array task's: the element has a section there)."""
    array_id = packing.array_id(request, index)
    return (
        log_path(request.log_dir, request.task, request.tag, array_id, "out"),
        log_path(request.log_dir, request.task, request.tag, array_id, "err"),
    )


def chunk_indices(indices: list[int], max_array_size: int) -> list[list[int]]:
    """Split sorted element indices so each chunk's ``index - offset`` stays below the limit."""
    chunks: list[list[int]] = []
    for index in sorted(indices):
        if chunks and index - chunks[-1][0] < max_array_size and len(chunks[-1]) < max_array_size:
            chunks[-1].append(index)
        else:
            chunks.append([index])
    return chunks


def entrypoint(run: Run, remote: bool) -> str:
    """The workflow file workers import: the user's own, or its copy on a remote cluster."""
    if not remote:
        return run.manifest.entrypoint
    return os.path.join(jobfiles.run_files_dir(run.run_dir, run.id), "workflow", os.path.basename(run.manifest.entrypoint))


class Submitter:
    def __init__(self, driver: Driver) -> None:
        self.d = driver
        self.cluster = driver.cluster
        self.host = driver.host
        #: READY instances were left for the next round of the loop (``form_batches`` takes a slice).
        self.more = False

    async def form_batches(self, now: float) -> tuple[list[tuple[Run, TaskRun, list[Instance]]], float | None]:
        """Batches to submit now (taken off the queue), and when the next back-off expires."""
        # A slice of a 10^5 hand-over at a time, formed with yields between, so no step runs long.
        taken, next_due = self.d.take_ready(now, max(TAKE_ELEMENTS, self.cluster.scheduler.max_array_size))
        self.more = bool(self.d.ready)  # left for the next round (unless a queue limit holds it back, below)
        try:
            return await self.batches_of(taken, now), next_due
        except Exception as exc:  # what was taken off the queue would be lost: fail it, with its runs
            self.taken_failed(taken, exc)
            return [], next_due

    def taken_failed(self, taken: dict[Instance, Run], exc: Exception) -> None:
        """Forming jobs raised: the instances taken off the queue fail with the error, and so do their runs."""
        self.d.count("submit_errors")
        runs = {run.id: run for run in taken.values()}
        for inst, run in taken.items():
            if inst.state is State.READY:
                error = f"internal error while forming jobs: {type(exc).__name__}: {exc}"
                self.host.transition(run, inst, State.FAILED, {"source": "submitter", "error": error[:500]},
                                     error=error)
        for run in runs.values():
            self.d.loop_failed("forming jobs", exc, run)
        if not runs:
            self.d.loop_failed("forming jobs", exc)

    async def batches_of(self, taken: dict[Instance, Run], now: float) -> list[tuple[Run, TaskRun, list[Instance]]]:
        """*taken* (READY instances off the queue) formed into batches; what a queue limit holds back goes back.
        (Each is checked READY again when its batch goes out: one cancelled while this yields is left out there.)"""
        groups: dict[tuple[str, str, str], list[Instance]] = defaultdict(list)
        runs: dict[str, Run] = {}
        for n, (inst, run) in enumerate(taken.items()):
            if n and n % FORM_YIELD_EVERY == 0:
                await anyio.lowlevel.checkpoint()
            if inst.state is not State.READY:
                continue
            # Escalated retries (more memory or time) go out as their own job: one request has one size.
            groups[(run.id, inst.task, repr(sorted(inst.resources.items())) if inst.resources else "")].append(inst)
            runs[run.id] = run
        batches = []
        for (run_id, task, _), insts in groups.items():
            run = runs[run_id]
            tr = run.tasks[task]
            if not tr.manifest.is_array:
                batches.extend((run, tr, [inst]) for inst in insts)
                continue
            by_index = {i.index: i for i in insts if i.index is not None}
            for chunk in chunk_indices(list(by_index), max(1, self.cluster.scheduler.max_array_size)):
                await anyio.lowlevel.checkpoint()
                batches.append((run, tr, [by_index[i] for i in chunk]))
        batches = queue_limits.retries_first(batches)  # under a queue cap, a retry takes the next free slot

        room = self.d.queue_limit.room(now, self.d.queued_elements())
        if room is not None:  # a per-user queue limit: what does not fit waits (instance_left wakes us)
            # A batch that may go out packed is cut later, by its slices (submit_batch), not by its elements.
            batches, leftover = fit_batches(batches, room, whole=self.d.packer.may_pack)
            self.more = self.more and not leftover
            for run, _, insts in leftover:
                for inst in insts:
                    self.d.ready[inst] = run
        return batches

    async def loop(self) -> None:
        limiter = anyio.CapacityLimiter(self.d.settings.submit_concurrency)
        with anyio.move_on_after(self.cluster.config.command_timeout * 2):  # the probe's own bound
            await self.d.first_probe.wait()  # (a fan-out ready at once went out before a probed queue limit was known)
        async with anyio.create_task_group() as tg:
            while True:
                wake = self.d.ready_wake = anyio.Event()
                wait = self.d.health.next_probe_at - world.monotonic()
                if not self.d.health.allows(world.monotonic()):  # the scheduler is not answering: wait
                    with anyio.move_on_after(wait):
                        await wake.wait()
                    continue
                now = world.now()
                try:
                    batches, next_due = await self.form_batches(now)
                except Exception as exc:  # the queue's own bookkeeping raised: show it, try again in a while
                    self.d.loop_failed("the submit loop", exc)
                    batches, next_due, self.more = [], now + ROUND_RETRY, False
                for run, tr, insts in batches:
                    self.d.submitting += len(insts)  # counted toward a queue limit until the batch is tracked
                    tg.start_soon(self.guarded_batch, run, tr, insts, limiter)
                timeout = max(0.0, next_due - now) if next_due is not None else float("inf")
                if self.more:
                    timeout = 0.0  # more READY than one round forms: the next round, after a yield
                with anyio.move_on_after(timeout):
                    await wake.wait()
                await anyio.sleep(0)  # let a burst of hand-overs gather into one batch

    async def guarded_batch(self, run: Run, tr: TaskRun, insts: list[Instance], limiter: anyio.CapacityLimiter) -> None:
        """One batch; whatever it raises fails that batch's run, never the daemon."""
        async with limiter:
            try:
                await self.submit_batch(run, tr, insts, reserved=len(insts))
            except Exception as exc:
                log.exception("submission failed inside the daemon", run_id=run.id, task=tr.name, cluster=self.d.name)
                self.d.count("submit_errors")
                error = f"internal error while submitting {tr.name}: {type(exc).__name__}: {exc}"
                for inst in insts:
                    if inst.state is State.READY:
                        self.host.transition(run, inst, State.FAILED, {"source": "submitter", "error": error},
                                             error=error)
                self.host.internal_error(run, f"submitting {tr.name}", exc)
            finally:
                self.d.submitting -= len(insts)

    def build_request(self, run: Run, tr: TaskRun, insts: list[Instance], tag: str,
                      plan: packing.Plan | None = None, *, indices: list[int] | None = None) -> SubmitRequest:
        """The submission of *insts* (or, for an array that has no instances yet, of its *indices*)."""
        cluster = self.cluster
        task = tr.manifest
        job_dir = jobfiles.job_dir(run.run_dir, run.id, tag)
        if indices is None:
            indices = None if not task.is_array else [i.index for i in insts if i.index is not None]
        offset = 0
        if indices and max(indices) >= cluster.scheduler.max_array_size:
            offset = min(indices)
        worker_argv = [cluster.python_for(run.manifest.python), "-m", "reflow.worker", job_dir]
        parallelism = task.array_parallelism
        slices = None
        if plan is not None:  # the scheduler sees one array task per slice
            slices = [list(piece) for piece in plan.slices]
            indices, offset = list(range(len(slices))), 0
            worker_argv.append(packing.PACKED_FLAG)
            if parallelism:  # array_parallelism counts elements: a slice runs `width` at a time
                parallelism = max(1, parallelism // plan.width)
        options: dict[str, Any] = {**cluster.config.submit_options, **task.config.get("submit_options", {})}
        escalated = insts[0].resources or {} if insts else {}  # a batch shares its resources (form_batches)
        env = {
            **cluster.config.env,
            "REFLOW_RUN_ID": run.id,
            "REFLOW_TASK": task.name,
            "PYTHONUNBUFFERED": "1",
        }
        return SubmitRequest(
            tag=tag,
            run_id=run.id,
            task=task.name,
            job_dir=job_dir,
            log_dir=jobfiles.log_dir(run.run_dir),
            workdir=run.run_dir,
            worker_argv=worker_argv,
            indices=indices,
            index_offset=offset,
            array_parallelism=parallelism,
            cpus=int(task.config.get("cpus", 1)),
            time=str(escalated.get("time") or task.config.get("time", "00:30:00")),
            mem=format_mem(str(escalated.get("mem") or task.config.get("mem", "4G"))),
            options=options,
            env=env,
            slices=slices,
        )

    async def job_files(self, run: Run, tr: TaskRun, insts: list[Instance], request: SubmitRequest,
                        plan: packing.Plan | None = None) -> dict[str, bytes]:
        """The job's files (a thousand inputs files for an array: formed with yields between, ~15 us each)."""
        res = self.host.resolution(run, tr)
        job: dict[str, Any] = {
            "run_id": run.id,
            "workflow": run.workflow,
            "task": tr.name,
            "entrypoint": entrypoint(run, self.cluster.remote),
            "run_dir": run.run_dir,
            "tag": request.tag,
            "kwargs": res.shared,
        }
        if request.slices is not None:
            job["slices"] = [list(piece) for piece in request.slices]
            job["width"] = plan.width if plan is not None else 1
        files = {os.path.join(request.job_dir, jobfiles.JOB_FILE): await run_steps(jobfiles.dumps_steps(job))}

        def inputs(inst: Instance) -> dict[str, Any]:
            element = res.elements[inst.index] if inst.index is not None else {}
            return {"index": inst.index, "identity": inst.identity_hex, "attempt": inst.attempt, "kwargs": element}

        if request.slices is not None:  # one inputs file per slice, not per element (jobfiles.slice_inputs_path)
            by_index = {inst.index: inst for inst in insts}
            for slot, piece in enumerate(request.slices):
                if slot and slot % (YIELD_EVERY // 8) == 0:
                    await anyio.lowlevel.checkpoint()
                files[jobfiles.slice_inputs_path(request.job_dir, slot)] = jobfiles.dumps(
                    {"elements": {str(i): inputs(by_index[i]) for i in piece if i in by_index}})
            return files
        for n, inst in enumerate(insts):
            if n and n % YIELD_EVERY == 0:
                await anyio.lowlevel.checkpoint()
            files[jobfiles.inputs_path(request.job_dir, inst.index)] = jobfiles.dumps(inputs(inst))
        return files

    async def stage_entrypoint(self, run: Run) -> None:
        """Copy the workflow file to the cluster once per run (remote clusters only)."""
        if not self.cluster.remote or run.id in self.d.staged:
            return
        source = run.manifest.entrypoint
        data = await anyio.to_thread.run_sync(lambda: open(source, "rb").read())
        await self.cluster.metered.write_files({entrypoint(run, True): data},
                                                 timeout=self.cluster.config.command_timeout * 2)
        self.d.staged.add(run.id)

    async def submit_batch(self, run: Run, tr: TaskRun, insts: list[Instance], reserved: int = 0) -> None:
        """Submit a batch: one job, or several when packing splits it (``packing.Packer.groups``).

        Under a per-user queue limit the batch holds *reserved* queue slots (its elements, counted by the
        submit loop); once packing has decided, it holds as many as it makes jobs, and what does not fit waits."""
        insts = [i for i in insts if i.state is State.READY]
        if not insts:
            return
        groups = await self.d.packer.groups(run, tr, insts)
        cap = self.d.queue_limit.cap(world.now())
        if cap is None:
            for group, plan in groups:
                await self.submit_job(run, tr, group, plan)
            return
        groups, leftover = packing.fit_groups(groups, max(0, cap - (self.d.queued_elements() - reserved)))
        delta = packing.jobs_of(groups) - reserved
        self.d.submitting += delta
        for inst in leftover:
            self.d.ready[inst] = run  # waits for room (instance_left wakes the submit loop)
        try:
            for group, plan in groups:
                await self.submit_job(run, tr, group, plan)
        finally:
            self.d.submitting -= delta

    async def submit_job(self, run: Run, tr: TaskRun, insts: list[Instance], plan: packing.Plan | None) -> None:
        d, cluster, host = self.d, self.cluster, self.host
        insts = [i for i in insts if i.state is State.READY]
        if not insts:
            return
        if plan is not None:  # elements cancelled meanwhile leave their slices
            ready = {i.index for i in insts}
            slices = [kept for piece in plan.slices if (kept := [i for i in piece if i in ready])]
            plan = packing.Plan(slices, plan.width, plan.why) if any(len(p) > 1 for p in slices) else None
        tag = new_tag()
        try:
            request = self.build_request(run, tr, insts, tag, plan)
            files = await self.job_files(run, tr, insts, request, plan)
        except ResolveError as exc:
            for inst in insts:
                host.transition(run, inst, State.FAILED, {"source": "resolve"}, error=str(exc))
            return
        timeout = cluster.config.command_timeout * 2
        try:
            await self.stage_entrypoint(run)
            await cluster.metered.makedirs([request.log_dir, request.job_dir], timeout=timeout)
            await cluster.metered.write_files(files, timeout=timeout)
        except (TransportError, OSError, TimeoutError) as exc:
            log.warning("cannot write job files; will try again", run_id=run.id, task=tr.name, cluster=d.name,
                        error=str(exc))
            retry_at = world.now() + WRITE_RETRY
            again = [i for i in insts if i.state is State.READY]
            for inst in again:
                host.update(inst, not_before=retry_at)
            d.submit(run, again)
            return
        insts = [i for i in insts if i.state is State.READY]  # cancellations while we wrote files
        if not insts:
            return
        if request.slices is not None and len(insts) < len(packing.elements(request)):
            ready = {i.index for i in insts}  # the worker must skip the cancelled ones
            gone = [i for i in packing.elements(request) if i not in ready]
            try:
                await cluster.metered.write_files({jobfiles.cancel_path(request.job_dir, i): b"{}" for i in gone},
                                                  timeout=timeout)
            except (TransportError, OSError, TimeoutError):
                for inst in insts:  # as for job files that cannot be written: try again later, anew
                    if inst.state is State.READY:
                        host.update(inst, not_before=world.now() + WRITE_RETRY)
                        d.submit(run, [inst])
                return
            insts = [i for i in insts if i.state is State.READY]
            if not insts:
                return
        record = JobRecord(tag, run.id, tr.name, cluster.name, request, state="submitting", submitted_at=world.now())
        try:
            await self.send(run, tr, insts, record, plan)
        except Exception as exc:  # past this point instances may be in flight: fail them (and the job) by their tag
            d.count("submit_errors")
            track = d.unresolved.get(tag) or d.tracks.get(tag) or d.new_track(
                record, run, {i.index: i for i in insts if i.in_flight and i.tag == tag})
            d.track_failed(track, f"submitting {tr.name}", exc)

    async def send(self, run: Run, tr: TaskRun, insts: list[Instance], record: JobRecord,
                   plan: packing.Plan | None) -> None:
        """Record the instances as SUBMITTING under the job's tag, call the scheduler, adopt the job."""
        d, cluster, host = self.d, self.cluster, self.host
        request, tag, now = record.request, record.tag, record.submitted_at
        d.store.put_job(record)
        evidence: dict[str, Any] = {"source": "submitter", "tag": tag, "elements": len(insts)}
        if request.slices is not None:
            evidence.update(packed=len(request.slices), why=plan.why if plan else None)
            d.count("packed_jobs")
            d.count("packed_elements", len(insts))
        for n, inst in enumerate(insts):
            if n and n % YIELD_EVERY == 0:
                await anyio.sleep(0)
            if d.store.pace_due:  # (asked first: a coroutine per element for nothing costs more)
                await d.store.pace()
            if inst.state is State.READY:  # (a cancel may come while we yield)
                host.transition(run, inst, State.SUBMITTING, evidence, tag=tag, submitted_at=now, not_before=None)
        track = d.new_track(record, run, {i.index: i for i in insts if i.state is State.SUBMITTING and i.tag == tag})
        track.resolve_after = float("inf")  # (looked up by tag only once its sbatch's outcome is unknown)
        d.add_unresolved(track)  # until the scheduler answers: a crash or a cancel finds it here
        await d.store.flush()
        d.fault("before_submit")
        cluster.count("submit")
        try:
            job_id = await cluster.scheduler.submit(request)
        except SubmitError as exc:
            if queue_limits.is_limit_refusal(str(exc)):
                d.drop_unresolved(tag)
                wait_for_room(d, run, track, str(exc))
                return
            if not exc.permanent:
                d.scheduler_failed("submit", str(exc))
            if exc.permanent:
                d.drop_unresolved(tag)
                log.warning("submission refused", run_id=run.id, task=tr.name, cluster=d.name, error=str(exc))
                for inst in list(track.live.values()):
                    host.transition(run, inst, State.SUBMIT_FAILED, {"source": "scheduler", "error": str(exc)},
                                    error=f"the scheduler refused the job: {exc}")
                record.state = "refused"
                d.store.put_job(record)
                return
            unresolved(d, track, str(exc))
            return
        except (TransportError, TimeoutError) as exc:
            d.scheduler_failed("submit", str(exc) or type(exc).__name__)
            unresolved(d, track, str(exc) or type(exc).__name__)
            return
        d.scheduler_answered()
        d.fault("after_submit")
        d.drop_unresolved(tag)
        d.fault("before_adopt")
        await adopt(d, track, job_id, {"source": "scheduler", "job_id": job_id})
        d.policy.after_submit()


def fit_batches(batches: list[tuple[Run, TaskRun, list[Instance]]], room: int,
                whole: Callable[[TaskRun, list[Instance]], bool] | None = None,
                ) -> tuple[list[tuple[Run, TaskRun, list[Instance]]], list[tuple[Run, TaskRun, list[Instance]]]]:
    """Split *batches* into what fits in *room* more queued jobs and what must wait.

    A batch for which *whole* says yes (it may go out packed) is kept whole while there is any room:
    how many jobs it makes is known only once it is packed, and it is cut then."""
    kept, leftover = [], []
    for run, tr, insts in batches:
        if room <= 0:
            leftover.append((run, tr, insts))
        elif whole is not None and whole(tr, insts):
            kept.append((run, tr, insts))
            room -= 1
        elif len(insts) > room:
            kept.append((run, tr, insts[:room]))
            leftover.append((run, tr, insts[room:]))
            room = 0
        else:
            kept.append((run, tr, insts))
            room -= len(insts)
    return kept, leftover


def wait_for_room(d: Driver, run: Run, track: JobTrack, error: str) -> None:
    """The scheduler refused the batch for a per-user limit: no job exists, so its instances wait (READY)
    until the queue has room, and the limit holds what was queued when it said no."""
    queued = d.queued_elements() - track.queued_jobs()
    until = d.queue_limit.refused(world.now(), queued, error)
    log.info("submission refused for a queue limit; waiting", cluster=d.name, tag=track.tag, queued=queued,
             error=error)
    again = []
    for inst in list(track.live.values()):
        if d.host.transition(run, inst, State.READY, {"source": "scheduler", "refused_for_limit": error[:300],
                                                      "queued": queued},
                             tag=None, submitted_at=None, not_before=until,
                             reason=f"waiting for room in the queue (the scheduler said: {error[:200]})"):
            again.append(inst)
    track.record.state = "refused"
    d.store.put_job(track.record)
    d.submit(run, again)


def unresolved(d: Driver, track: JobTrack, error: str) -> None:
    log.warning("submission outcome unknown; will resolve by tag", run_id=track.run.id, task=track.request.task,
                tag=track.tag, cluster=d.name, error=error)
    track.resolve_after = world.now() + d.settings.resolve_delay
    d.add_unresolved(track)
    d.wake()


async def adopt(d: Driver, track: JobTrack, job_id: str, evidence: dict[str, Any]) -> None:
    """The scheduler has job *job_id* for this track: record it and start observing.

    An element whose instance ended before its job was known (cancelled, or failed by an error while
    submitting it) is cancelled: nothing will read what it would do."""
    track.record.job_id = job_id
    track.record.state = "submitted"
    d.store.put_job(track.record)
    d.follow(track)
    keys = packing.ElementKeys(track.request, job_id, track.slots)  # (one for the job's instances)
    for n, inst in enumerate(track.members()):
        if n and n % YIELD_EVERY == 0:
            await anyio.sleep(0)
        if d.store.pace_due:
            await d.store.pace()
        if inst.tag != track.tag:
            continue
        if inst.state is State.SUBMITTING:
            d.host.transition(track.run, inst, State.QUEUED, evidence, job_id=job_id, job_key=keys)
        elif inst.state in FAILURE:
            # Cancelled (or failed) while the submission was under way: nothing follows it after a restart,
            # so the kill is owed durably, with the job's row (a packed job running others: ``cancel_jobs``).
            d.cancel_jobs([keys(inst.index)])
    if not track.live:
        d.emptied[track.tag] = None
    d.lookup_settled(track.tag)  # (the kills its cancelled elements need are owed by id by now)
    d.query_due = True
    d.wake()
    d.early.upstream_submitted(track.run)  # a downstream task may now wait in the queue on this job
