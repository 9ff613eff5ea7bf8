"""Submitting READY instances to a cluster, exactly once.

Per cluster, one loop groups READY instances into batches (one array job per
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
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from reflow_client import jobfiles
from reflow_client.resources import format_mem

from ..schedulers.base import SubmitError, SubmitRequest, log_path
from ..store import JobRecord
from ..transports.base import TransportError
from .engine import Engine, JobTrack, new_tag, request_to_dict
from .model import Instance, Run, TaskRun
from .resolve import ResolveError
from .states import State

if TYPE_CHECKING:
    from ..clusters import ClusterRuntime

log = structlog.get_logger("reflowd.submitter")

#: Seconds before an unknown submission outcome is looked up by tag.
RESOLVE_DELAY = 5.0


def fault(engine: Engine, point: str) -> None:
    """Test-only crash point: die like ``kill -9`` exactly here."""
    if point in engine.settings.fault_points:
        log.warning("fault point reached, exiting hard", point=point)
        os._exit(137)


def log_paths_for(request: SubmitRequest, index: int | None) -> tuple[str, str]:
    array_id = None if request.indices is None or index is None else index - request.index_offset
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


def form_batches(engine: Engine, cluster: ClusterRuntime, now: float) -> tuple[list[tuple[Run, TaskRun, list[Instance]]], float | None]:
    """Batches to submit now, and when the next back-off expires (if any)."""
    groups: dict[tuple[str, str], list[Instance]] = defaultdict(list)
    runs: dict[str, Run] = {}
    next_due: float | None = None
    ready = engine.ready[cluster.name]
    for key, (run, inst) in list(ready.items()):
        if inst.state is not State.READY:
            del ready[key]
            continue
        if inst.not_before is not None and inst.not_before > now:
            next_due = inst.not_before if next_due is None else min(next_due, inst.not_before)
            continue
        groups[(run.id, inst.task)].append(inst)
        runs[run.id] = run
    batches = []
    for (run_id, task), insts in groups.items():
        run = runs[run_id]
        tr = run.tasks[task]
        if not tr.manifest.is_array:
            batches.extend((run, tr, [inst]) for inst in insts)
            continue
        by_index = {i.index: i for i in insts if i.index is not None}
        for chunk in chunk_indices(list(by_index), max(1, cluster.scheduler.max_array_size)):
            batches.append((run, tr, [by_index[i] for i in chunk]))
    return batches, next_due


async def submit_loop(engine: Engine, cluster: ClusterRuntime) -> None:
    limiter = anyio.CapacityLimiter(engine.settings.submit_concurrency)
    async with anyio.create_task_group() as tg:
        while True:
            wake = engine.ready_wake[cluster.name] = anyio.Event()
            now = time.time()
            batches, next_due = form_batches(engine, cluster, now)
            for run, tr, insts in batches:
                for inst in insts:
                    engine.ready[cluster.name].pop(inst.key, None)
                tg.start_soon(submit_batch, engine, cluster, run, tr, insts, limiter)
            timeout = max(0.0, next_due - now) if next_due is not None else float("inf")
            with anyio.move_on_after(timeout):
                await wake.wait()


def _entrypoint(run: Run, cluster: ClusterRuntime) -> str:
    if not cluster.remote:
        return run.manifest.entrypoint
    return os.path.join(jobfiles.run_files_dir(run.run_dir, run.id), "workflow", os.path.basename(run.manifest.entrypoint))


async def _stage_entrypoint(engine: Engine, run: Run, cluster: ClusterRuntime) -> None:
    """Copy the workflow file to the cluster once per run (remote clusters only)."""
    if not cluster.remote or run.options.get("_staged"):
        return
    source = run.manifest.entrypoint
    data = await anyio.to_thread.run_sync(lambda: open(source, "rb").read())
    await cluster.transport.write_files({_entrypoint(run, cluster): data}, timeout=cluster.config.command_timeout * 2)
    run.options["_staged"] = True


def build_request(engine: Engine, cluster: ClusterRuntime, run: Run, tr: TaskRun, insts: list[Instance], tag: str) -> SubmitRequest:
    task = tr.manifest
    job_dir = jobfiles.job_dir(run.run_dir, run.id, tag)
    indices = None if not task.is_array else [i.index for i in insts if i.index is not None]
    offset = 0
    if indices and max(indices) >= cluster.scheduler.max_array_size:
        offset = min(indices)
    options: dict[str, Any] = {**cluster.config.submit_options, **task.config.get("submit_options", {})}
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
        worker_argv=[cluster.python_for(run.manifest.python), "-m", "reflow.worker", job_dir],
        indices=indices,
        index_offset=offset,
        array_parallelism=task.array_parallelism,
        cpus=int(task.config.get("cpus", 1)),
        time=str(task.config.get("time", "00:30:00")),
        mem=format_mem(str(task.config.get("mem", "4G"))),
        options=options,
        env=env,
    )


def job_files(engine: Engine, cluster: ClusterRuntime, run: Run, tr: TaskRun, insts: list[Instance],
              request: SubmitRequest) -> dict[str, bytes]:
    res = engine.resolution(run, tr)
    files = {
        os.path.join(request.job_dir, jobfiles.JOB_FILE): jobfiles.dumps(
            {
                "run_id": run.id,
                "workflow": run.workflow,
                "task": tr.name,
                "entrypoint": _entrypoint(run, cluster),
                "run_dir": run.run_dir,
                "tag": request.tag,
                "kwargs": res.shared,
            }
        )
    }
    for inst in insts:
        element = res.elements[inst.index] if inst.index is not None else {}
        files[jobfiles.inputs_path(request.job_dir, inst.index)] = jobfiles.dumps(
            {"index": inst.index, "identity": inst.identity, "attempt": inst.attempt, "kwargs": element}
        )
    return files


async def submit_batch(
    engine: Engine,
    cluster: ClusterRuntime,
    run: Run,
    tr: TaskRun,
    insts: list[Instance],
    limiter: anyio.CapacityLimiter,
) -> None:
    async with limiter:
        insts = [i for i in insts if i.state is State.READY]
        if not insts:
            return
        tag = new_tag()
        try:
            request = build_request(engine, cluster, run, tr, insts, tag)
            files = job_files(engine, cluster, run, tr, insts, request)
        except ResolveError as exc:
            for inst in insts:
                engine.transition(run, inst, State.FAILED, {"source": "resolve"}, error=str(exc))
            return
        timeout = cluster.config.command_timeout * 2
        try:
            await _stage_entrypoint(engine, run, cluster)
            await cluster.transport.makedirs([request.log_dir, request.job_dir], timeout=timeout)
            await cluster.transport.write_files(files, timeout=timeout)
        except (TransportError, OSError, TimeoutError) as exc:
            log.warning("cannot write job files; will try again", run_id=run.id, task=tr.name, cluster=cluster.name,
                        error=str(exc))
            retry_at = time.time() + 10.0
            for inst in insts:
                if inst.state is State.READY:
                    inst.not_before = retry_at
                    engine._make_ready(run, inst)
            return
        insts = [i for i in insts if i.state is State.READY]  # cancellations while we wrote files
        if not insts:
            return
        now = time.time()
        record = JobRecord(tag, run.id, tr.name, cluster.name, request_to_dict(request), state="submitting",
                           submitted_at=now)
        engine.store.put_job(record)
        for inst in insts:
            engine.transition(run, inst, State.SUBMITTING, {"source": "submitter", "tag": tag,
                                                            "elements": len(insts)},
                              tag=tag, submitted_at=now, not_before=None)
        track = JobTrack(record, request, run, {i.index: i for i in insts})
        await engine.store.flush()
        fault(engine, "before_submit")
        started = time.monotonic()
        try:
            job_id = await cluster.scheduler.submit(request)
        except SubmitError as exc:
            cluster.count("submit", time.monotonic() - started)
            if exc.permanent:
                log.warning("submission refused", run_id=run.id, task=tr.name, cluster=cluster.name, error=str(exc))
                for inst in track.live():
                    engine.transition(run, inst, State.SUBMIT_FAILED, {"source": "scheduler", "error": str(exc)},
                                      error=f"the scheduler refused the job: {exc}")
                record.state = "refused"
                engine.store.put_job(record)
                return
            _unresolved(engine, cluster, track, str(exc))
            return
        except (TransportError, TimeoutError) as exc:
            cluster.count("submit", time.monotonic() - started)
            _unresolved(engine, cluster, track, str(exc))
            return
        cluster.count("submit", time.monotonic() - started)
        fault(engine, "after_submit")
        adopt(engine, cluster, track, job_id, {"source": "scheduler", "job_id": job_id})
        cluster.policy.after_submit()


def _unresolved(engine: Engine, cluster: ClusterRuntime, track: JobTrack, error: str) -> None:
    log.warning("submission outcome unknown; will resolve by tag", run_id=track.run.id, task=track.request.task,
                tag=track.tag, cluster=cluster.name, error=error)
    track.resolve_after = time.time() + RESOLVE_DELAY
    engine.unresolved[cluster.name][track.tag] = track
    engine.observer_wake[cluster.name].set()


def adopt(engine: Engine, cluster: ClusterRuntime, track: JobTrack, job_id: str, evidence: dict[str, Any]) -> None:
    """The scheduler has job *job_id* for this track: record it and start observing."""
    track.record.job_id = job_id
    track.record.state = "submitted"
    engine.store.put_job(track.record)
    for inst in track.instances.values():
        key = track.request.element_key(job_id, inst.index)
        if inst.state is State.SUBMITTING and inst.tag == track.tag:
            engine.transition(track.run, inst, State.QUEUED, evidence, job_id=job_id, job_key=key)
        elif inst.state is State.CANCELLED and inst.tag == track.tag:
            engine.pending_cancels[cluster.name].add(key)  # cancelled while the submission was under way
    engine.tracks[cluster.name][track.tag] = track
    engine.observer_wake[cluster.name].set()
