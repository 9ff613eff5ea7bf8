"""Watching a cluster's jobs: two clocks, one query per cycle.

* The **file clock** (every ``result_interval``, or at once when a local
  process exits) lists each tracked job directory's ``results/`` (and
  ``started/`` while something is queued): no scheduler call, so jobs that end
  are noticed within a fraction of a second.
* The **scheduler clock** (adaptive interval, rate-limited) runs ONE status
  query for all tracked jobs of the cluster and feeds each instance's
  observation to :mod:`decide`. It tells what files cannot: pending reasons,
  kills, timeouts, out-of-memory, lost jobs.

Each cycle also retries cancellations that could not be delivered and
resolves submissions whose outcome is unknown, by their tag.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import anyio
import structlog

from reflow_client import jobfiles

from ..schedulers.base import Observation, Phase, Presence
from ..transports.base import TransportError
from . import decide
from .engine import Engine, JobTrack
from .model import Instance
from .states import FAILURE, State
from .submitter import RESOLVE_DELAY, adopt

if TYPE_CHECKING:
    from ..clusters import ClusterRuntime

log = structlog.get_logger("reflowd.observer")

IDLE_WAIT = 5.0
#: Longest a signalled worker's result waits for the scheduler to explain it.
HOLD_MAX = 30.0


def apply(engine: Engine, track: JobTrack, inst: Instance, decision: decide.Decision) -> bool:
    if decision.state is None:
        engine.update(inst, **decision.fields)
        return False
    return engine.transition(track.run, inst, decision.state, decision.evidence, **decision.fields)


async def observe_loop(engine: Engine, cluster: ClusterRuntime) -> None:
    next_query = 0.0
    name = cluster.name
    while True:
        wake = engine.observer_wake[name] = anyio.Event()
        try:
            await _deliver_cancels(engine, cluster)
            await _resolve_unresolved(engine, cluster)
            tracks = list(engine.tracks[name].values())
            if tracks:
                await check_files(engine, cluster, tracks)
                now = time.monotonic()
                due = next_query <= now or _deadline_due(tracks) or any(t.held for t in tracks)
                if due and cluster.limiter.wait_time() == 0:
                    await query(engine, cluster, [t for t in tracks if t.live()])
                    next_query = time.monotonic() + cluster.policy.interval
            _prune(engine, cluster)
        except Exception:  # an observer must survive anything a cluster throws at it
            log.exception("observer cycle failed", cluster=name)
            engine.counters["observer_errors"] += 1
        busy = engine.tracks[name] or engine.unresolved[name] or engine.pending_cancels[name]
        with anyio.move_on_after(cluster.result_interval if busy else IDLE_WAIT):
            await wake.wait()


def _deadline_due(tracks: list[JobTrack]) -> bool:
    """Poll promptly once a running job passes its time limit (to see TIMEOUT without waiting)."""
    from reflow_client.resources import parse_time

    now = time.time()
    for track in tracks:
        limit = parse_time(track.request.time) if track.request.time else None
        if limit is None:
            continue
        for inst in track.live():
            if inst.state is State.RUNNING and inst.started_at and now > inst.started_at + limit + 5:
                if not inst.absent_count and inst.done_seen_at is None:
                    return True
    return False


async def check_files(engine: Engine, cluster: ClusterRuntime, tracks: list[JobTrack]) -> None:
    timeout = cluster.config.command_timeout
    limiter = anyio.CapacityLimiter(16)

    async def one(track: JobTrack) -> None:
        async with limiter:
            live = track.live()
            if not live:
                return
            try:
                names = set(await cluster.transport.listdir(os.path.join(track.request.job_dir, "results"),
                                                             timeout=timeout))
                done = [i for i in live if f"{jobfiles.element_key(i.index)}.json" in names]
                if done:
                    await _read_results(engine, cluster, track, done)
                queued = [i for i in track.live() if i.state is State.QUEUED]
                if queued:
                    started = set(await cluster.transport.listdir(os.path.join(track.request.job_dir, "started"),
                                                                   timeout=timeout))
                    for inst in queued:
                        if f"{jobfiles.element_key(inst.index)}.json" in started and inst.state is State.QUEUED:
                            engine.transition(track.run, inst, State.RUNNING, {"source": "started_file"},
                                              started_at=time.time(), reason=None)
            except (TransportError, TimeoutError) as exc:
                log.debug("result check failed", cluster=cluster.name, tag=track.tag, error=str(exc))

    async with anyio.create_task_group() as tg:
        for track in tracks:
            tg.start_soon(one, track)


async def _read_results(engine: Engine, cluster: ClusterRuntime, track: JobTrack, insts: list[Instance]) -> list[Instance]:
    """Read and apply result files; returns the instances that had none."""
    paths = {inst.index: jobfiles.result_path(track.request.job_dir, inst.index) for inst in insts}
    data = await cluster.transport.read_files(list(paths.values()), timeout=cluster.config.command_timeout)
    missing = []
    for inst in insts:
        raw = data.get(paths[inst.index])
        if raw is None:
            missing.append(inst)
            continue
        try:
            result = jobfiles.parse_result(raw, f"result file of {inst.label}")
        except ValueError as exc:
            result = {"state": "failed", "error": f"unreadable result: {exc}"}
        if not (inst.in_flight and inst.tag == track.tag):
            continue
        obs = track.last_obs.get(inst.index)
        decision = decide.from_result(inst, result, obs)
        explained = obs is not None and obs.phase is Phase.DONE
        if decision.state is State.FAILED and result.get("signal") and not explained:
            # Killed by a signal: the scheduler knows why (time limit, cancel, preemption). Ask it first.
            since = track.held.setdefault(inst.index, (result, time.time()))[1]
            if time.time() - since < HOLD_MAX:
                continue
        track.held.pop(inst.index, None)
        apply(engine, track, inst, decision)
    return missing


async def query(engine: Engine, cluster: ClusterRuntime, tracks: list[JobTrack]) -> None:
    job_ids = sorted({t.record.job_id for t in tracks if t.record.job_id})
    if not job_ids:
        return
    await cluster.limiter.acquire()
    started = time.monotonic()
    observations: dict[str, Observation] | None
    try:
        observations = await cluster.scheduler.query(job_ids)
    except (TransportError, TimeoutError) as exc:
        log.info("status query failed; treating every job as unknown", cluster=cluster.name, error=str(exc))
        observations = None
    duration = time.monotonic() - started
    cluster.count("query", duration)
    now = time.time()
    changed = False
    concluding: dict[str, list[tuple[Instance, decide.Decision]]] = {}
    for track in tracks:
        for index, (result, since) in list(track.held.items()):
            inst = track.instances[index]
            obs = observations.get(inst.job_key or "") if observations is not None else None
            if obs is not None:
                track.last_obs[index] = obs
            if (obs is not None and obs.phase is not Phase.RUNNING) or now - since >= HOLD_MAX:
                del track.held[index]
                if inst.in_flight:
                    changed |= apply(engine, track, inst, decide.from_result(inst, result, obs))
        for inst in track.live():
            if inst.index in track.held:
                continue
            if observations is None:
                obs = Observation.unknown("query failed")
            else:
                obs = observations.get(inst.job_key or "") or Observation.absent()
            if obs.presence is Presence.UNKNOWN:
                continue
            track.last_obs[inst.index] = obs
            decision = decide.from_observation(inst, obs, now, cluster.timing)
            if decision is None:
                continue
            if decision.state in FAILURE:
                concluding.setdefault(track.tag, []).append((inst, decision))
                continue
            changed |= apply(engine, track, inst, decision)
    # Before concluding a failure from the scheduler alone, look once more for a result file.
    for tag, items in concluding.items():
        track = engine.tracks[cluster.name].get(tag)
        if track is None:
            continue
        try:
            missing = await _read_results(engine, cluster, track, [inst for inst, _ in items])
        except (TransportError, TimeoutError):
            continue  # cannot look: conclude nothing this cycle
        for inst, decision in items:
            if inst in missing and inst.in_flight:
                changed |= apply(engine, track, inst, decision)
    cluster.policy.after_query(duration, changed)


def _prune(engine: Engine, cluster: ClusterRuntime) -> None:
    tracks = engine.tracks[cluster.name]
    for tag, track in list(tracks.items()):
        if not track.live():
            del tracks[tag]
            track.record.state = "done"
            engine.store.put_job(track.record)
            if track.record.job_id:
                cluster.scheduler.forget(track.record.job_id)


async def _deliver_cancels(engine: Engine, cluster: ClusterRuntime) -> None:
    keys = engine.pending_cancels[cluster.name]
    if not keys:
        return
    batch = sorted(keys)
    cluster.limiter.spend()
    started = time.monotonic()
    try:
        await cluster.scheduler.cancel(batch)
    except (TransportError, TimeoutError) as exc:
        log.warning("cancel failed; will retry", cluster=cluster.name, jobs=len(batch), error=str(exc))
        return
    finally:
        cluster.count("cancel", time.monotonic() - started)
    keys.difference_update(batch)


async def _resolve_unresolved(engine: Engine, cluster: ClusterRuntime) -> None:
    """Decide submissions whose outcome is unknown by looking their tag up."""
    pending = engine.unresolved[cluster.name]
    now = time.time()
    due = [t for t in pending.values() if t.resolve_after <= now]
    if not due:
        return
    cluster.limiter.spend()
    started = time.monotonic()
    try:
        found = await cluster.scheduler.find_tags([t.tag for t in due])
    except (TransportError, TimeoutError) as exc:
        for track in due:
            track.resolve_after = now + min(60.0, RESOLVE_DELAY * 2 ** min(track.resolve_attempts, 4))
        log.info("cannot look submissions up yet", cluster=cluster.name, error=str(exc))
        return
    finally:
        cluster.count("find_tags", time.monotonic() - started)
    for track in due:
        jobs = found.get(track.tag, [])
        if jobs:
            if len(jobs) > 1:
                log.error("several jobs carry one tag; adopting the first, cancelling the rest",
                          tag=track.tag, jobs=[j.job_id for j in jobs])
                engine.pending_cancels[cluster.name].update(j.job_id for j in jobs[1:])
            del pending[track.tag]
            adopt(engine, cluster, track, jobs[0].job_id, {"source": "recovery", "found_by_tag": track.tag,
                                                           "job_id": jobs[0].job_id})
            await cluster.scheduler.reattach(track.request, jobs[0].job_id)
            log.info("adopted job found by tag", cluster=cluster.name, tag=track.tag, job_id=jobs[0].job_id)
            continue
        track.resolve_attempts += 1
        if track.resolve_attempts < 2:  # a job may show up late: ask once more before concluding
            track.resolve_after = now + RESOLVE_DELAY
            continue
        try:
            await _conclude_unsubmitted(engine, cluster, track)
        except (TransportError, TimeoutError):
            track.resolve_after = now + RESOLVE_DELAY
            continue
        del pending[track.tag]


async def _conclude_unsubmitted(engine: Engine, cluster: ClusterRuntime, track: JobTrack) -> None:
    """No job carries the tag: use the job directory's traces, else submit again."""
    timeout = cluster.config.command_timeout
    results = set(await cluster.transport.listdir(os.path.join(track.request.job_dir, "results"), timeout=timeout))
    started = set(await cluster.transport.listdir(os.path.join(track.request.job_dir, "started"), timeout=timeout))
    live = [i for i in track.instances.values() if i.tag == track.tag and i.state is State.SUBMITTING]
    traces = bool(results or started)
    with_result = [i for i in live if f"{jobfiles.element_key(i.index)}.json" in results]
    if with_result:
        await _read_results(engine, cluster, track, with_result)
    for inst in live:
        if inst.state is not State.SUBMITTING:
            continue
        key = f"{jobfiles.element_key(inst.index)}.json"
        if key in started:
            engine.transition(track.run, inst, State.FAILED, {"source": "recovery", "tag": track.tag,
                                                              "note": "started but its job vanished"},
                              error=f"lost: job {track.tag} started but the scheduler no longer knows it",
                              reason="lost")
        elif not traces or cluster.scheduler.can_requeue_unstarted:
            engine.transition(track.run, inst, State.READY, {"source": "recovery", "tag_not_found": track.tag},
                              tag=None, submitted_at=None)
            engine._make_ready(track.run, inst)
        else:
            engine.transition(track.run, inst, State.FAILED, {"source": "recovery", "tag": track.tag,
                                                              "note": "no trace of this element"},
                              error=f"lost: job {track.tag} vanished before this element left a trace",
                              reason="lost")
    track.record.state = "not_submitted" if not traces else "vanished"
    engine.store.put_job(track.record)
    log.info("submission resolved without a job", cluster=cluster.name, tag=track.tag, traces=traces)

