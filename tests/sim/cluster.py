"""A simulated batch system, file system and worker behind the real seams.

``SimCluster`` is the world outside the daemon: jobs, their elements, a file
system holding job directories, and workers that read their inputs, write a
``started`` marker and later a result, exactly as ``reflow.worker`` does.
It outlives a daemon crash, as a real cluster does.

``SimScheduler`` (a :class:`~reflowd.schedulers.base.Scheduler`) and
``SimTransport`` (a :class:`~reflowd.transports.base.Transport`) are what
the daemon sees. Every decision that could go either way -- which element
starts next, whether an answer is lost, delayed or unknown, whether a job is
dropped or its result held back -- is drawn from one seeded generator, so a
seed replays exactly. Every scheduler call runs a (pretend) command through
the transport, so the cluster's budget charges it like a real one.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from reflow_client import codec, jobfiles
from reflowd.schedulers.base import (
    Answers,
    JobAnswer,
    Observation,
    Outcome,
    Phase,
    Presence,
    Scheduler,
    SubmitError,
    SubmitRequest,
    TaggedJob,
)
from reflowd.transports.base import CommandResult, CommandTimeout, Transport, TransportError


@dataclass
class Faults:
    """Probabilities (per call or per tick) of everything that can go wrong."""

    submit_lost_answer: float = 0.0  # the job is created, the answer never arrives
    submit_fails: float = 0.0  # the call fails before the scheduler sees it
    submit_refused: float = 0.0  # a permanent refusal
    query_fails: float = 0.0  # the whole poll fails (every job unknown)
    query_unknown: float = 0.0  # one job's answer is "unknown" (e.g. an unmapped state)
    query_delay: float = 0.0  # the answer takes a while (seconds drawn up to max_delay)
    cancel_fails: float = 0.0
    find_fails: float = 0.0
    file_fails: float = 0.0  # a file operation times out
    drop_job: float = 0.0  # per tick: a job vanishes from the scheduler
    hold_result: float = 0.0  # a finished element's result file appears late
    task_fails: float = 0.0  # the task itself raises
    late_visibility: float = 0.0  # a new job is invisible to look-ups for a moment
    max_delay: float = 3.0
    fail_tasks: tuple[str, ...] = ()  # these tasks always raise
    #: Not drawn (opt-in, so seeds replay as before): a scheduler call raises an exception no adapter should
    #: (a bug, e.g. output it cannot parse) -- a submission after its job was created, or a whole poll.
    internal_errors: float = 0.0

    @classmethod
    def draw(cls, rng: random.Random, level: float) -> Faults:
        def p(scale: float) -> float:
            return rng.choice([0.0, 0.0, scale * level, scale * level * 2])

        return cls(
            submit_lost_answer=p(0.15), submit_fails=p(0.1), submit_refused=p(0.02), query_fails=p(0.2),
            query_unknown=p(0.1), query_delay=p(0.2), cancel_fails=p(0.2), find_fails=p(0.2), file_fails=p(0.05),
            drop_job=p(0.01), hold_result=p(0.2), task_fails=p(0.1), late_visibility=p(0.3),
        )

    def quiet(self) -> Faults:
        """Answers stop going missing (the end of a scenario): what is left must settle."""
        return Faults(task_fails=self.task_fails)


@dataclass
class SimElement:
    key: str
    index: int | None
    phase: Phase = Phase.QUEUED
    outcome: Outcome | None = None
    ends_at: float | None = None
    result_at: float | None = None  # when the result file appears (may lag the end)
    result: bytes | None = None
    cancelled: bool = False


@dataclass
class SimJob:
    job_id: str
    request: SubmitRequest
    elements: dict[int | None, SimElement]
    visible_at: float
    dropped: bool = False


def compute(task: str, kwargs: dict[str, Any]) -> Any:
    """What the simulated workflow's tasks return (plain JSON values)."""
    if task == "make":
        return list(range(int(kwargs.get("n", 0))))
    if task in ("square",):
        return int(kwargs["x"]) ** 2
    if task == "bump":
        return int(kwargs["y"]) + 1
    if task == "total":
        return sum(int(v) for v in kwargs["values"])
    return None


class SimCluster:
    def __init__(self, rng: random.Random, faults: Faults, slots: int = 4) -> None:
        self.rng = rng
        self.faults = faults
        self.slots = slots
        self.fs: dict[str, bytes] = {}
        self.jobs: dict[str, SimJob] = {}
        self.by_tag: dict[str, list[str]] = {}
        self.submissions: Counter[str] = Counter()  # tag -> jobs created
        self.executions: Counter[tuple[str, str, int | None, int]] = Counter()  # (run, task, index, attempt)
        self.outputs: dict[tuple[str, str, int | None, int], Any] = {}
        #: What happened, in order (commands as the scheduler saw them, elements starting and ending):
        #: the same seed must give the same trace, in any process, after any other scenario.
        self.trace: list[tuple[Any, ...]] = []
        self.woken: anyio.Event | None = None  # set on a submission, for a clock that sleeps while idle
        self.duplicates: list[str] = []  # invariant breaches seen as they happen (a tag or attempt twice)
        self._next = 1
        # What can still move, so a tick costs what is in motion, not every job ever submitted.
        self._queued: list[tuple[SimJob, SimElement]] = []
        self._running: list[tuple[SimJob, SimElement]] = []
        self._held: list[tuple[SimJob, SimElement]] = []  # results written at result_at

    # ------------------------------------------------------------------ the cluster's own clock

    def next_due(self, now: float) -> float:
        """The earliest time at which :meth:`tick` would change something (``now`` if it might now)."""
        if self.faults.drop_job and any(not j.dropped for j in self.jobs.values()):
            return now  # a drop is drawn on every tick
        if self._queued and len(self._running) < self.slots:
            return now
        due = [e.ends_at for j, e in self._running if e.ends_at is not None and not j.dropped]
        due += [e.result_at for _, e in self._held if e.result_at is not None and e.result is not None]
        return min(due, default=float("inf"))

    def tick(self, now: float) -> None:
        """Start, finish and drop elements; make held results appear."""
        if self._held:
            held = []
            for job, element in self._held:
                if element.result is None:  # cancelled meanwhile
                    continue
                if element.result_at is not None and element.result_at <= now:
                    self.fs[jobfiles.result_path(job.request.job_dir, element.index)] = element.result
                    element.result = None
                else:
                    held.append((job, element))
            self._held = held
        running = []
        for job, element in self._running:
            if job.dropped or element.phase is not Phase.RUNNING:
                continue  # dropped jobs' running elements never end; cancelled ones are done
            if element.ends_at is not None and element.ends_at <= now:
                self._finish(job, element, now)
            else:
                running.append((job, element))
        self._running = running
        if self.faults.drop_job:
            for job in self.jobs.values():
                if not job.dropped and self.rng.random() < self.faults.drop_job:
                    job.dropped = True  # vanishes: queued elements never run, running ones leave no result
        free = self.slots - len(self._running)
        if free > 0 and self._queued:
            queued = [(j, e) for j, e in self._queued if not j.dropped and e.phase is Phase.QUEUED]
            self.rng.shuffle(queued)  # any order
            self._queued = queued[free:]
            for job, element in queued[:free]:
                self._start(job, element, now)

    def _start(self, job: SimJob, element: SimElement, now: float) -> None:
        req = job.request
        element.phase = Phase.RUNNING
        element.ends_at = now + self.rng.choice([0.2, 1.0, 3.0, 8.0])
        self._running.append((job, element))
        shared = json.loads(self.fs.get(f"{req.job_dir}/{jobfiles.JOB_FILE}", b"{}") or b"{}")
        raw_inputs = self.fs.get(jobfiles.inputs_path(req.job_dir, element.index))
        inputs = json.loads(raw_inputs) if raw_inputs else None
        if inputs is None:  # no input file: the worker fails at once (reflow.worker writes a failed result)
            element.result = jobfiles.dumps({"state": "failed", "error": "no inputs"})
            element.result_at = now
            self._held.append((job, element))
            return
        self._execute(req, element, int(inputs.get("attempt", 1)),
                      {**shared.get("kwargs", {}), **inputs.get("kwargs", {})}, now)

    def _execute(self, req: SubmitRequest, element: SimElement, attempt: int, kwargs: dict[str, Any],
                 now: float) -> None:
        """The worker runs *element*'s task (its attempt *attempt*) with *kwargs*: each execution counted
        (twice is a violation), its started file, its result (held until the element ends)."""
        key = (req.run_id, req.task, element.index, attempt)
        self.trace.append((now, "start", element.key, attempt))
        self.executions[key] += 1
        if self.executions[key] > 1:
            self.duplicates.append(f"attempt executed twice: {key}")
        self.fs[jobfiles.started_path(req.job_dir, element.index)] = jobfiles.dumps({"host": "sim", "pid": 1})
        if self.rng.random() < self.faults.task_fails or req.task in self.faults.fail_tasks:
            element.result = jobfiles.dumps({"state": "failed", "error": "RuntimeError: simulated failure",
                                             "traceback": "Traceback (simulated)"})
            return
        output = compute(req.task, kwargs)
        self.outputs[key] = output
        element.result = jobfiles.dumps({"state": "succeeded", "output": output,
                                         "output_hash": codec.value_hash(output), "host": "sim"})

    def _finish(self, job: SimJob, element: SimElement, now: float) -> None:
        self.trace.append((now, "end", element.key))
        element.phase = Phase.DONE
        failed = element.result is not None and b'"failed"' in element.result
        element.outcome = Outcome.FAILED if failed else Outcome.COMPLETED
        lag = self.rng.choice([1.0, 4.0, 12.0]) if self.rng.random() < self.faults.hold_result else 0.0
        element.result_at = now + lag
        if element.result is None:
            return  # written already (a worker that failed at once)
        if lag == 0.0:
            self.fs[jobfiles.result_path(job.request.job_dir, element.index)] = element.result
            element.result = None
        else:
            self._held.append((job, element))

    def requeue(self, job: SimJob, element: SimElement) -> None:
        """Put an element back in the queue under the same job id (Slurm's ``scontrol requeue``); it starts
        again when a slot is free. The queue is a list of what can move, so a requeue must go through here."""
        element.phase, element.outcome, element.ends_at, element.result = Phase.QUEUED, None, None, None
        self._queued.append((job, element))

    # ------------------------------------------------------------------ what the scheduler commands do

    def submit(self, request: SubmitRequest, now: float) -> str:
        if request.slices is not None:  # never run a slice number as an element index: say so at once
            raise AssertionError("the simulated cluster does not run packed jobs; its runtime sets pack=False")
        self.submissions[request.tag] += 1
        if self.submissions[request.tag] > 1:
            self.duplicates.append(f"tag submitted twice: {request.tag}")
        n = self._next
        self._next += 1
        job_id = self._new_id(n)
        indices: list[int | None] = list(request.indices) if request.indices is not None else [None]
        elements = {i: SimElement(request.element_key(job_id, i), i) for i in indices}
        late = self.rng.random() < self.faults.late_visibility
        self.jobs[job_id] = SimJob(job_id, request, elements, visible_at=now + (self.rng.random() * 2 if late else 0))
        self.by_tag.setdefault(request.tag, []).append(job_id)
        self._queued.extend((self.jobs[job_id], e) for e in elements.values())
        if self.woken is not None:
            self.woken.set()
        return job_id

    def _new_id(self, n: int) -> str:
        return f"ƒ{n:03d}" if n % 2 else f"{n}.sim"  # opaque ids: never int()

    def observe(self, job_ids: Collection[str]) -> dict[str, Observation]:
        out: dict[str, Observation] = {}
        for job_id in job_ids:
            job = self.jobs.get(job_id)
            if job is None or job.dropped:
                continue
            for element in job.elements.values():
                native = (element.outcome.value if element.outcome else element.phase.value).upper()
                out[element.key] = Observation(Presence.PRESENT, element.phase, element.outcome, native,
                                               "Priority" if element.phase is Phase.QUEUED else None)
        return out

    def find(self, tags: Collection[str], now: float) -> dict[str, list[TaggedJob]]:
        found: dict[str, list[TaggedJob]] = {t: [] for t in tags}
        for tag in tags:
            for job_id in self.by_tag.get(tag, []):
                job = self.jobs[job_id]
                if job.visible_at <= now and not job.dropped:
                    active = any(e.phase is not Phase.DONE for e in job.elements.values())
                    found[tag].append(TaggedJob(job_id, tag, active))
        return found

    def cancel(self, keys: Collection[str]) -> None:
        wanted = set(keys)
        for job in self.jobs.values():
            for element in job.elements.values():
                if (element.key in wanted or job.job_id in wanted) and element.phase is not Phase.DONE:
                    element.cancelled = True
                    element.phase = Phase.DONE
                    element.outcome = Outcome.CANCELLED
                    element.result = None


class SimTransport(Transport):
    """Commands are pretend (the scheduler does the work); files live in the cluster's dict."""

    name = "sim"

    def __init__(self, cluster: SimCluster) -> None:
        super().__init__()
        self.cluster = cluster

    def _maybe_fail(self, what: str) -> None:
        if self.cluster.rng.random() < self.cluster.faults.file_fails:
            raise CommandTimeout(f"simulated timeout in {what}")

    async def run(self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float = 30.0,
                  env: Mapping[str, str] | None = None, idempotent: bool = True) -> CommandResult:
        await anyio.sleep(0)
        return CommandResult(0, "", "")

    async def read_files(self, paths: Sequence[str], *, timeout: float = 30.0) -> dict[str, bytes | None]:
        await anyio.sleep(0)
        self._maybe_fail("read_files")
        return {p: self.cluster.fs.get(p) for p in paths}

    async def write_files(self, files: Mapping[str, bytes], *, timeout: float = 60.0, mode: int = 0o644) -> None:
        await anyio.sleep(0)
        self._maybe_fail("write_files")
        self.cluster.fs.update(files)

    async def listdir(self, path: str, *, timeout: float = 30.0) -> list[str]:
        await anyio.sleep(0)
        self._maybe_fail("listdir")
        prefix = path.rstrip("/") + "/"
        return sorted({p[len(prefix):].split("/", 1)[0] for p in self.cluster.fs if p.startswith(prefix)})

    async def exists(self, paths: Sequence[str], *, timeout: float = 30.0) -> dict[str, bool]:
        await anyio.sleep(0)
        return {p: p in self.cluster.fs for p in paths}

    async def makedirs(self, paths: Sequence[str], *, timeout: float = 30.0) -> None:
        await anyio.sleep(0)


def compacted(flat: dict[str, Observation], job_ids: Collection[str]) -> Answers:
    """A flat answer job by job: runs of consecutive array task ids with equal observations become spans
    (what Slurm prints as ``123_[0-9]``), the rest stay elements; reading it key by key gives *flat*."""
    jobs: dict[str, tuple[dict[str, Observation], list[tuple[int, int, Observation]]]] = {}
    ids = set(job_ids)
    by_job: dict[str, list[tuple[int, Observation]]] = {}
    for key, obs in flat.items():
        head, sep, tail = key.rpartition("_")
        if key in ids or not sep or head not in ids or not tail.isdigit():
            jobs.setdefault(key if key in ids else head, ({}, []))[0][key] = obs
            continue
        by_job.setdefault(head, []).append((int(tail), obs))
    for job_id, items in by_job.items():
        elements, spans = jobs.setdefault(job_id, ({}, []))
        items.sort(key=lambda item: item[0])
        start = 0
        while start < len(items):
            end = start
            while end + 1 < len(items) and items[end + 1][0] == items[end][0] + 1 and items[end + 1][1] == items[start][1]:
                end += 1
            if end > start:
                spans.append((items[start][0], items[end][0], items[start][1]))
            else:
                elements[f"{job_id}_{items[start][0]}"] = items[start][1]
            start = end + 1
    return Answers({job_id: JobAnswer(elements, tuple(spans)) for job_id, (elements, spans) in jobs.items()})


class SimScheduler(Scheduler):
    kind = "sim"
    max_array_size = 8  # small, so fan-outs are chunked

    #: Answer job by job (``Answers``: runs of elements sharing a state as spans), as Slurm's adapter does.
    compact = False

    def __init__(self, cluster: SimCluster, transport: Transport, clock: Any) -> None:
        self.cluster = cluster
        self.transport = transport
        self.clock = clock  # () -> now

    def _roll(self, p: float) -> bool:
        return self.cluster.rng.random() < p

    async def _delay(self) -> None:
        if self._roll(self.cluster.faults.query_delay):
            await anyio.sleep(self.cluster.rng.random() * self.cluster.faults.max_delay)

    async def submit(self, request: SubmitRequest) -> str:
        await self.transport.run(["sbatch", request.tag], idempotent=False)
        f = self.cluster.faults
        if self._roll(f.submit_refused):
            raise SubmitError("simulated refusal: invalid partition", permanent=True)
        if self._roll(f.submit_fails):
            raise TransportError("simulated: connection lost before sbatch ran")
        await self._delay()
        job_id = self.cluster.submit(request, self.clock())
        self.cluster.trace.append((self.clock(), "submit", request.tag, job_id))
        if f.internal_errors and self._roll(f.internal_errors):
            raise RuntimeError(f"simulated bug: cannot read the answer for job {job_id}")
        if self._roll(f.submit_lost_answer):
            raise CommandTimeout("simulated: sbatch's answer was lost")
        return job_id

    async def query(self, job_ids: Collection[str]) -> dict[str, Observation]:
        await self.transport.run(["squeue", *sorted(job_ids)])
        await self._delay()
        if self.cluster.faults.internal_errors and self._roll(self.cluster.faults.internal_errors):
            raise RuntimeError("simulated bug: squeue output not understood")
        if self._roll(self.cluster.faults.query_fails):
            raise TransportError("simulated: squeue failed")
        out = self.cluster.observe(job_ids)
        self.cluster.trace.append((self.clock(), "query", tuple(sorted(job_ids))))
        for key in list(out):
            if self._roll(self.cluster.faults.query_unknown):
                out[key] = Observation(Presence.UNKNOWN, native_state="WEIRD", detail="simulated unmapped state")
        return compacted(out, job_ids) if self.compact else out

    async def find_tags(self, tags: Collection[str]) -> dict[str, list[TaggedJob]]:
        await self.transport.run(["squeue", "--name", ",".join(sorted(tags))])
        await self._delay()
        if self._roll(self.cluster.faults.find_fails):
            raise TransportError("simulated: look-up failed")
        self.cluster.trace.append((self.clock(), "find", tuple(sorted(tags))))
        return self.cluster.find(tags, self.clock())

    async def cancel(self, job_keys: Collection[str]) -> None:
        await self.transport.run(["scancel", *sorted(job_keys)])
        if self._roll(self.cluster.faults.cancel_fails):
            raise TransportError("simulated: scancel failed")
        self.cluster.trace.append((self.clock(), "cancel", tuple(sorted(job_keys))))
        self.cluster.cancel(job_keys)

