"""Packing: several array elements per scheduler job, each still its own instance.

A packed submission is one array job whose array task ``k`` runs the elements
``slices[k]`` one after another in one worker process (or ``width`` at a time
when a task that asks for several CPUs is packed by its own ``pack=``). The
job is only a vehicle: every element keeps its own inputs, result, state,
cache identity, retry count and log section. So:

* The driver moves a packed element to RUNNING only when its own ``started``
  marker appears (the scheduler only knows the job runs).
* When a packed job dies (killed, out of memory, node failure, time limit,
  lost), :func:`after_death` sorts its elements: those with a result keep
  it (the observer has read them), the ones that had started and left no
  result fail with the job's cause (and are retried *alone* if retries allow),
  the ones never started go back to READY with their attempt unchanged.
* Cancelling some elements of a packed job that others still need leaves a
  ``cancel/<key>.json`` marker instead of killing the job: the worker skips a
  marked element it has not started, and stops the one it is running when its
  marker appears (``reflow.worker``'s cancel watch) and goes on with the next.
  The element is CANCELLED in the store before the marker is written, so
  whatever its run leaves (even a success that raced the marker) is never taken
  for its outcome: it is exactly-once-safe. Only when no element of that array
  task is still wanted is the job itself cancelled -- and when that element is
  cancelled on its own (not with its run) and not seen started, its marker is
  still written first, in the same round as the ``scancel``: a job the scheduler
  starts meanwhile (an early chained task whose upstream just ended) skips it.

How elements are sliced (:func:`plan`) comes from the task's ``pack=`` (or its
cluster's), and for automatic packing from the measured durations of earlier
instances of the same task (:mod:`reflowd.engine.durations`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from reflow_client import jobfiles
from reflow_client.pack import OFF, PackSpec, parse_pack
from reflow_client.resources import parse_time

from .. import world
from ..engine.durations import Estimate, estimate
from ..engine.model import Instance, Run, TaskRun
from ..engine.records import reset_values
from ..engine.retry_policy import queue_of
from ..engine.states import State
from ..schedulers.base import SubmitRequest

if TYPE_CHECKING:
    from ..engine import decide
    from .driver import Driver
    from .track import JobTrack

log = structlog.get_logger("reflowd.packing")

#: The worker flag that makes ``--index K`` mean "run slice K".
PACKED_FLAG = "--packed"
#: Automatic packing keeps a job's predicted work within this share of the task's time limit.
LIMIT_SHARE = 0.5
#: Below this much predicted work per job, spreading elements over more jobs is not worth a start-up
#: (the local scheduler: a fork and an interpreter start).
MIN_SLOT_WORK = 2.0
#: The same floor for a batch scheduler's job: submission, scheduling, node start-up and the interpreter
#: cost a second or two on an idle test cluster and tens of seconds on a busy site, so a spread job keeps
#: at least this much work (and half its target), and packing keeps most of its win over one job per element.
MIN_BATCH_WORK = 30.0
#: Seconds a task's durations read from the stores are kept before they are read again (meanwhile the
#: driver adds each success it sees: history appears as a first run's elements succeed, with no read).
HISTORY_TTL = 120.0
#: Durations kept per task (the newest), as many as ``Store.task_durations`` reads.
KEPT = 2000


@dataclass(frozen=True)
class Plan:
    """Element indices per array task of one packed job, and how many run at once in each."""

    slices: list[list[int]]
    width: int
    why: str


def task_spec(config: dict[str, Any], cluster_pack: Any) -> tuple[PackSpec, bool]:
    """The spec a task is packed by, and whether it comes from the task's own ``pack=``.

    A task's own ``pack=`` wins. The cluster's default (automatic unless set otherwise) applies
    only to tasks asking for one CPU: a task that asks for several may use them for one element.
    """
    try:
        own = parse_pack(config.get("pack"))
    except ValueError:
        own = None  # the door refused bad values; a stored manifest of an older reflowd cannot have one
    if own is not None:
        return own, True
    if int(config.get("cpus", 1) or 1) > 1:
        return OFF, False
    try:
        return parse_pack(cluster_pack if cluster_pack is not None else "auto", "cluster pack") or OFF, False
    except ValueError:
        return OFF, False


def even_slices(indices: Sequence[int], count: int) -> list[list[int]]:
    """*indices* (in order) cut into *count* contiguous slices whose sizes differ by at most one."""
    count = max(1, min(count, len(indices)))
    size, extra = divmod(len(indices), count)
    out, at = [], 0
    for k in range(count):
        n = size + (1 if k < extra else 0)
        out.append(list(indices[at : at + n]))
        at += n
    return out


def spread(count: int, n: int, parallel: int | None, est: Estimate | None, *, width: int = 1,
           min_work: float = MIN_SLOT_WORK, blind: bool = True) -> int:
    """How many jobs to make of *n* elements that packing put into *count*, when *parallel* jobs could run
    at once: at least one per free slot, so that a fan-out does not leave slots idle, but never so many
    that a job's predicted work (``est``) falls below *min_work*. Without an estimate, spread to every
    slot only if *blind* (the local scheduler, where a job costs a fork); a batch scheduler keeps *count*."""
    if not parallel or count >= parallel or n <= count:
        return count
    if est is None:
        return max(count, min(n, parallel)) if blind else count
    worth = math.floor(n * est.mean / max(1, width) / max(min_work, 1e-9))
    return max(count, min(n, parallel, worth))


def plan(indices: Sequence[int], spec: PackSpec, est: Estimate | None, *, time_limit: float | None,
         width: int = 1, parallel: int | None = None, min_work: float = MIN_SLOT_WORK,
         blind: bool = True) -> Plan | None:
    """How to slice *indices*; None means one element per job (as without packing).

    *parallel* is how many jobs of this task could run at once, when known (the local
    scheduler's slots, a Slurm partition's): small batches are spread over that many jobs
    rather than run in fewer (:func:`spread`, with *min_work* and *blind*).
    """
    indices = sorted(indices)
    if spec.off or len(indices) < 2:
        return None
    width = max(1, width)
    if spec.count is not None:
        per_job = spec.count
        why = f"pack={spec.count}"
    else:
        if est is None or spec.target is None:
            return None  # automatic packing needs history
        per_job = max(1, math.floor(spec.target * width / est.mean))
        why = f"target {spec.target:g} s, {est.describe()}"
    if est is not None and time_limit:
        cap = max(1, math.floor(LIMIT_SHARE * time_limit * width / est.high))
        if cap < per_job:
            per_job = cap
            why += f", capped by the time limit ({time_limit:g} s)"
    if per_job < 2 and width < 2:
        return None
    per_job = max(1, per_job)
    count = math.ceil(len(indices) / per_job)
    wider = spread(count, len(indices), parallel, est, width=width, min_work=min_work, blind=blind)
    if wider > count:
        why += f", spread over {wider} jobs for {parallel} slots"
    slices = even_slices(indices, wider)
    if all(len(s) == 1 for s in slices):
        return None
    return Plan(slices, width, why)


def fit_groups(groups: list[tuple[list[Instance], Plan | None]], room: int,
               ) -> tuple[list[tuple[list[Instance], Plan | None]], list[Instance]]:
    """Cut a batch's submissions to *room* more scheduler jobs (a per-user queue limit counts jobs, and a
    packed slice is one); what does not fit waits. Returns the kept submissions and the instances left over."""
    kept: list[tuple[list[Instance], Plan | None]] = []
    leftover: list[Instance] = []
    for group, found in groups:
        if room <= 0:
            leftover.extend(group)
        elif found is None:
            kept.append((group[:room], None))
            leftover.extend(group[room:])
            room -= len(kept[-1][0])
        else:
            slices = found.slices[:room]
            chosen = {i for piece in slices for i in piece}
            kept.append(([i for i in group if i.index in chosen], Plan(slices, found.width, found.why)))
            leftover.extend(i for i in group if i.index not in chosen)
            room -= len(slices)
    return kept, leftover


def jobs_of(groups: list[tuple[list[Instance], Plan | None]]) -> int:
    """How many scheduler jobs (array elements) these submissions make."""
    return sum(len(found.slices) if found is not None else len(group) for group, found in groups)


def aligned(upstream: SubmitRequest, downstream: Plan | None) -> bool:
    """Can a chained array mirror the upstream's job (``aftercorr``: its array task ``t`` waits for the
    upstream's task ``t``)? Only if both run the same elements per array task: both unpacked, or packed
    into the very same slices. (Another packing would make a task wait for the wrong elements.)"""
    if upstream.indices is None:
        return False
    if upstream.slices is None:
        return downstream is None
    return downstream is not None and [list(p) for p in downstream.slices] == [list(p) for p in upstream.slices]


def slot_map(request: SubmitRequest) -> dict[int, int]:
    """Element index -> array task (slice number) of a packed request."""
    return {index: k for k, piece in enumerate(request.slices or ()) for index in piece}


def elements(request: SubmitRequest) -> list[int | None]:
    """Every element a request covers, packed or not."""
    if request.slices is not None:
        return [i for piece in request.slices for i in piece]
    if request.indices is None:
        return [None]
    return list(request.indices)


def array_id(request: SubmitRequest, index: int | None) -> int | None:
    """The scheduler's array task id that runs element *index* (None for a singleton)."""
    if request.indices is None or index is None:
        return None
    if request.slices is not None:
        return slot_map(request).get(index)
    return index - request.index_offset


def job_key(request: SubmitRequest, job_id: str, index: int | None, slots: dict[int, int] | None = None) -> str:
    """The key a query reports element *index* under (its slice's array task when packed)."""
    if request.slices is None or index is None:
        return request.element_key(job_id, index)
    slots = slots if slots is not None else slot_map(request)
    return request.element_key(job_id, slots[index])


class ElementKeys:
    """The keys one job's elements are reported under (:func:`job_key`), made when asked for. The job's
    instances share this one object (``Instance.job_keys``) instead of each keeping a key string."""

    __slots__ = ("request", "job_id", "slots")

    def __init__(self, request: SubmitRequest, job_id: str, slots: dict[int, int] | None = None) -> None:
        self.request = request
        self.job_id = job_id
        self.slots = slots if slots is not None or request.slices is None else slot_map(request)

    def __call__(self, index: int | None) -> str:
        return job_key(self.request, self.job_id, index, self.slots)

    def __repr__(self) -> str:
        return f"ElementKeys({self.job_id!r})"


def time_limit(request_time: str | None) -> float | None:
    try:
        limit = parse_time(request_time) if request_time else None
    except ValueError:
        return None
    return float(limit) if limit else None


# ---------------------------------------------------------------------- the driver's side


class TaskHistory:
    """A task's durations as the driver knows them: what the stores held when read, and each success since.

    Successes are counted in memory, not read back: reading a run's durations scans its instances (140 ms
    of SQLite's thread at 10^6 elements), and a fan-out whose first elements succeed asked for them at
    every batch (measured: several times a second, half a core)."""

    __slots__ = ("samples", "read_at", "read_wall", "found", "changed")

    def __init__(self, durations: list[float], read_at: float, read_wall: float) -> None:
        self.samples: deque[float] = deque(reversed(durations), maxlen=KEPT)  # (newest last)
        self.read_at = read_at  # (monotonic)
        self.read_wall = read_wall  # (wall clock, as a run's ``created_at``)
        self.found: Estimate | None = None
        self.changed = True

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)
        self.changed = True

    def estimate(self) -> Estimate | None:
        if self.changed:
            self.found, self.changed = estimate(self.samples), False
        return self.found


class Packer:
    """A driver's packing state: duration estimates, elements to run alone, cancel markers to write."""

    def __init__(self, driver: Driver) -> None:
        self.d = driver
        self._history: dict[tuple[str, str, str], TaskHistory] = {}
        self._reading: dict[tuple[str, str, str], anyio.Event] = {}  # reads under way
        #: Cancelled elements of packed jobs, by tag: markers still to write (True: even if nothing else of
        #: its array task is wanted, whose ``scancel`` it precedes).
        self.skips: dict[str, dict[int, bool]] = {}

    async def estimate(self, run: Run, tr: TaskRun) -> Estimate | None:
        key = (run.workflow, tr.name, tr.manifest.version)
        history = self._history.get(key)
        if history is not None and world.monotonic() - history.read_at < HISTORY_TTL and not (
                run.created_at > history.read_wall and history.estimate() is None):
            return history.estimate()  # (a run newer than a read that found too little reads again: another
                                       # process -- an embedded run, say -- may have measured the task since)
        reading = self._reading.get(key)
        if reading is not None:  # (batches planned together wait for one read, not one read each)
            await reading.wait()
            history = self._history.get(key)
            return history.estimate() if history is not None else None
        self._reading[key] = done = anyio.Event()
        try:
            now, wall = world.monotonic(), world.now()
            history = self._history[key] = TaskHistory(await self._read(key, tr.name), now, wall)
        finally:
            del self._reading[key]
            done.set()
        return history.estimate()

    async def _read(self, key: tuple[str, str, str], task: str) -> list[float]:
        """The task's durations in this run directory's store, else (too few to go by) the user's own cache."""
        try:
            durations = await self.d.store.task_durations(*key)
        except Exception as exc:  # history is advisory: without it, elements go one per job
            log.warning("cannot read task durations; not packing automatically", task=task, error=str(exc))
            durations = []
        cache = getattr(self.d.store, "cache", None)
        if estimate(durations) is None and cache is not None:  # no history here (a new run directory)
            try:
                durations = await cache.durations(*key) or durations
            except Exception as exc:
                log.warning("cannot read task durations from the shared cache; not packing automatically",
                            task=task, error=str(exc))
        return durations

    def known(self, workflow: str, task: str, version: str) -> Estimate | None:
        """The estimate for a task as last known (no I/O; None if it was never read or there is none)."""
        history = self._history.get((workflow, task, version))
        return history.estimate() if history is not None else None

    def learned(self, run: Run, inst: Instance) -> None:
        """An instance succeeded: its duration is history (for a task whose durations were read)."""
        tr = run.tasks.get(inst.task)
        if tr is None or inst.started_at is None or inst.ended_at is None:
            return
        history = self._history.get((run.workflow, inst.task, tr.manifest.version))
        if history is not None:
            history.add(max(0.0, inst.ended_at - inst.started_at))

    async def groups(self, run: Run, tr: TaskRun, insts: list[Instance]) -> list[tuple[list[Instance], Plan | None]]:
        """The batch as submissions: packed groups (with their plan) and unpacked ones (plan None)."""
        task = tr.manifest
        if not task.is_array or len(insts) < 2:
            return [(insts, None)]
        if task_spec(task.config, self.d.cluster.config.pack)[0].off:
            return [(insts, None)]
        alone = [i for i in insts if runs_alone(i)]
        packable = [i for i in insts if not runs_alone(i)]
        found = await self.plan_for(run, tr, [i.index for i in packable if i.index is not None])
        out: list[tuple[list[Instance], Plan | None]] = []
        if found is None:
            return [(insts, None)]
        by_index = {i.index: i for i in packable}
        limit = max(1, self.d.cluster.scheduler.max_array_size)
        for start in range(0, len(found.slices), limit):
            chunk = found.slices[start : start + limit]
            members = [by_index[i] for piece in chunk for i in piece]
            out.append((members, Plan(chunk, found.width, found.why)))
        if alone:
            out.append((alone, None))
        return out

    async def plan_for(self, run: Run, tr: TaskRun, indices: list[int]) -> Plan | None:
        """How these elements of *tr* would be sliced if they went out together now (None: one per job).
        Also asked for an array that has no instances yet (an element-wise chain submitted early)."""
        task = tr.manifest
        spec, own = task_spec(task.config, self.d.cluster.config.pack)
        if spec.off or len(indices) < 2:
            return None
        cpus = int(task.config.get("cpus", 1) or 1)
        width = cpus if own else 1
        est = await self.estimate(run, tr)
        local = getattr(self.d.cluster.scheduler, "max_workers", None) is not None
        queue = queue_of(self.d.cluster.config.submit_options, task.config.get("submit_options"))
        parallel = self.parallel(task.array_parallelism, cpus, width, queue)
        # A batch scheduler's job costs more than a fork: a spread job keeps a floor of work (half its target
        # at most), and without history the packing stands as it is.
        floor = MIN_SLOT_WORK if local else min(MIN_BATCH_WORK, (spec.target or MIN_BATCH_WORK * 2) / 2)
        return plan(indices, spec, est, time_limit=time_limit(str(task.config.get("time", "00:30:00"))), width=width,
                    parallel=parallel, min_work=floor, blind=local)

    def may_pack(self, tr: TaskRun, insts: list[Instance]) -> bool:
        """Whether this batch might go out packed (then a queue limit is applied to its slices, not elements)."""
        if not tr.manifest.is_array or len(insts) < 2:
            return False
        return not task_spec(tr.manifest.config, self.d.cluster.config.pack)[0].off

    def parallel(self, array_parallelism: int | None, cpus: int, width: int, queue: str | None = None) -> int | None:
        """How many jobs of one task could run at once, where the driver knows it: the local scheduler's
        slots, or the job slots of the task's partition as the probe read them (``queue_slots``), within
        ``array_parallelism`` and the per-user queue limit (a job over it would only wait)."""
        slots = getattr(self.d.cluster.scheduler, "max_workers", None)
        if slots is None:
            probe = self.d.cluster.probe or {}
            slots = (probe.get("queue_slots") or {}).get(queue or probe.get("default_queue") or "")
        known = None if not slots else max(1, int(slots) // max(1, min(cpus, int(slots))))
        caps = [max(1, array_parallelism // width)] if array_parallelism else []
        queued = self.d.queue_limit.cap(world.now())
        if queued:
            caps.append(queued)
        for cap in caps:
            known = cap if known is None else min(known, cap)
        return known

    # ------------------------------------------------------------------ cancelling part of a job

    def left(self, track: JobTrack, inst: Instance) -> None:
        """A packed element left flight; if it was cancelled while its job goes on, see to the job."""
        if inst.state is not State.CANCELLED or inst.index is None:
            return
        slot = track.slots.get(inst.index)
        if slot is None or track.record.job_id is None:
            self.skips.setdefault(track.tag, {})[inst.index] = False  # not submitted yet: the marker suffices
            return
        key = job_key(track.request, track.record.job_id, inst.index, track.slots)
        others = [i for i in track.slot_members(slot) if i is not inst and i.tag == track.tag and i.in_flight]
        if others:  # queued or running: its marker makes the worker skip it, or stop it and go on
            self.skips.setdefault(track.tag, {})[inst.index] = False
        elif f"{jobfiles.element_key(inst.index)}.json" in track.seen_started and not track.has_result(inst.index):
            self.d.cancel_jobs([key])  # running, the last of its slice still wanted: stop its job
        elif not track.run.cancel_requested:
            # the last of its slice still wanted, not seen started: the engine's cancel ``scancel``s the array
            # task, and this marker goes out first in that round, so a worker the scheduler starts meanwhile (an
            # early chained task whose upstream just ended) never runs the element. (A whole run's cancel needs
            # none: a marker per array task would only cost writes.)
            self.skips.setdefault(track.tag, {})[inst.index] = True
        self.d.wake()

    def recovered(self, track: JobTrack) -> None:
        """After a restart: the cancel markers of this job's cancelled elements may never have been written."""
        for inst in track.members():
            if inst.state is State.CANCELLED and inst.tag == track.tag and inst.index is not None:
                self.skips.setdefault(track.tag, {})[inst.index] = False
        if self.skips.get(track.tag):
            self.d.wake()

    def keep_job(self, key: str) -> bool:
        """A cancel for *key* would stop a packed job that still runs elements nobody cancelled."""
        job_id, _, slot = key.rpartition("_")
        if not job_id or not slot.isdigit():
            return False
        track = self.d.by_job.get(job_id)  # (an index: cancelling 10^5 elements walks no list of jobs)
        if track is not None and track.request.slices is not None:
            return any(i.in_flight and i.tag == track.tag for i in track.slot_members(int(slot)))
        return False

    def markers(self) -> tuple[dict[str, bytes], dict[str, dict[int, bool]]]:
        """Cancel markers to write now, and the skips they were made from (taken off ``skips``: a cancel that
        comes while they are written is kept for the next round; :meth:`unwritten` puts them back)."""
        taken, self.skips = self.skips, {}
        files: dict[str, bytes] = {}
        for tag, indices in taken.items():
            track = self.d.tracks.get(tag) or self.d.unresolved.get(tag)
            if track is None:
                continue
            for index, firm in indices.items():
                slot = track.slots.get(index)
                if not firm and slot is not None and track.record.job_id is not None and not any(
                        i.in_flight and i.tag == tag for i in track.slot_members(slot)):
                    continue  # nothing else left in that job: it is cancelled whole
                files[jobfiles.cancel_path(track.request.job_dir, index)] = jobfiles.dumps(
                    {"at": world.now(), "by": "reflowd"})
        return files, taken

    def unwritten(self, taken: dict[str, dict[int, bool]]) -> None:
        """Markers that could not be written: try again next round."""
        for tag, indices in taken.items():
            self.skips.setdefault(tag, {}).update(indices)


# ---------------------------------------------------------------------- when a packed job ends


def after_death(track: JobTrack, concluding: list[tuple[Instance, decide.Decision]], started: set[str],
                ) -> list[tuple[Instance, decide.Decision]]:
    """What each element of an ended packed job without a result becomes.

    *concluding* holds the scheduler's verdict for each (the job's cause); *started*
    the names in the job's ``started/`` directory. An element that started fails with
    the cause; one that never started goes back to READY -- unless nothing in its
    slice started, in which case the job died before running anything and every
    element takes the cause, as it would unpacked.
    """
    from ..engine.decide import Decision

    out = []
    for inst, decision in concluding:
        name = f"{jobfiles.element_key(inst.index)}.json"
        if name in started or inst.index is None:
            out.append((inst, decision))
            continue
        slot = track.slots.get(inst.index)
        siblings = track.request.slices[slot] if slot is not None and track.request.slices else []
        if any(f"{jobfiles.element_key(i)}.json" in started for i in siblings):
            evidence = {"source": "packing", "note": "its packed job ended before it started",
                        "job_state": decision.evidence.get("scheduler_state") or decision.evidence.get("presence"),
                        "tag": track.tag}
            out.append((inst, Decision(State.READY, evidence, reset_values(Instance))))
        else:
            out.append((inst, decision))
    return out


def died_packed(inst: Instance, decision: decide.Decision) -> decide.Decision:
    """An element that failed with its packed job's end: its next attempt (an automatic retry or the user's
    ``retry``) runs alone, unpacked. The wish goes to the store with the failure (``Instance.alone``), so it
    outlives a restart of reflowd."""
    from ..engine.decide import Decision

    return Decision(decision.state, decision.evidence, {**decision.fields, "alone": inst.attempt + 1})


def runs_alone(inst: Instance) -> bool:
    """Whether this attempt follows one that died inside a packed job."""
    return inst.alone is not None and inst.alone == inst.attempt


def running_decision(decision: decide.Decision) -> decide.Decision:
    """A packed element does not run because its job does: only its ``started`` marker says so."""
    from ..engine.decide import Decision

    keep = {k: v for k, v in decision.fields.items() if k in ("absent_since", "absent_count")}
    return Decision(None, {}, keep)


def explains(result: dict[str, Any]) -> bool:
    """Whether the job's end may explain a failed packed element's result: only the one a signal stopped
    (another element's exception is its own, even if the job later timed out)."""
    return bool(result.get("signal"))


__all__ = ["PACKED_FLAG", "ElementKeys", "Packer", "Plan", "after_death", "aligned", "array_id", "died_packed",
           "elements", "even_slices", "fit_groups", "job_key", "jobs_of", "plan", "runs_alone", "slot_map", "spread",
           "task_spec",
           "time_limit"]
