"""Packed jobs in the simulation: array task k of a job runs the elements of slice k one after another.

``PackedSimCluster`` runs a packed submission (``request.slices``) the way ``reflow.worker --packed``
does: for each element of its slice, in order, it skips one with a ``cancel/`` marker or a result,
writes the ``started/`` marker, runs it and writes its result at once; the array task ends after
its last element. Unpacked submissions run as in :class:`~tests.sim.cluster.SimCluster`.

One more fault: a running slice is *killed* mid-way (node failure, out of memory, a kill -9): the
elements it finished keep their results, the one it was running leaves a marker and no result, the
rest leave no trace, and the scheduler reports the array task ended with that cause.

``PackedHarness`` runs the usual seeded scenarios (lost answers, dropped jobs, daemon crashes...)
on such a cluster with ``pack = 3``, checks every invariant of :mod:`tests.sim.harness`
(an attempt never executes twice, every run ends with the right answer...) and, for every kill it
saw while the daemon followed the job (its submission resolved), failure isolation:

* the element that was running fails (a failure state, or cancelled), never goes back to READY;
* the elements never started go back to READY (or are cancelled), never fail for it;
* the killed element's next attempt runs alone (an unpacked job), also when a daemon restart came
  between (the wish is in the store, in the failure's cause: ``packing.runs_alone``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reflow_client import codec, jobfiles
from reflowd.engine.states import FAILURE, IN_FLIGHT, State
from reflowd.schedulers.base import Outcome, Phase, SubmitRequest

from .cluster import Faults, SimCluster, SimElement, SimJob, compute
from .harness import Harness, Report, run_seed, sim_runtime

#: Elements per array task of a packed job (the simulated cluster's ``pack``).
PACK = 3
#: What a killed slice's scheduler says, and the state its running element must take for it.
KILL_CAUSES = (Outcome.NODE_FAIL, Outcome.OUT_OF_MEMORY, Outcome.FAILED)


@dataclass
class PackedFaults(Faults):
    kill_slice: float = 0.0  # per tick and running slice: it is killed mid-way

    def quiet(self) -> Faults:
        return Faults(task_fails=self.task_fails)


@dataclass
class SliceRun:
    """A running array task of a packed job: where it is in its slice."""

    pending: list[int]
    current: int | None = None
    current_attempt: int = 0
    current_ends: float = 0.0
    current_result: bytes | None = None


@dataclass
class Kill:
    """A slice killed mid-way: who ran, who never started (each ``(run, task, index, attempt)``)."""

    at: float
    tag: str
    cause: Outcome
    running: tuple[str, str, int, int]
    unstarted: list[tuple[str, str, int, int]]


@dataclass
class Watch:
    """An element of a killed slice that the daemon followed under that job at the kill."""

    key: tuple[str, str, int, int]
    at: float
    started: bool  # the one the slice was running
    cause: Outcome


class PackedSimCluster(SimCluster):
    def __init__(self, rng: random.Random, faults: Faults, slots: int = 4) -> None:
        super().__init__(rng, faults, slots)
        self.slices: dict[tuple[str, int], SliceRun] = {}
        self.kills: list[Kill] = []
        #: Each execution: whether it ran in a packed job, and when.
        self.ran_packed: dict[tuple[str, str, int | None, int], tuple[bool, float]] = {}

    # ------------------------------------------------------------------ submission

    def submit(self, request: SubmitRequest, now: float) -> str:
        if request.slices is None:
            job_id = super().submit(request, now)
            return job_id
        self.submissions[request.tag] += 1
        if self.submissions[request.tag] > 1:
            self.duplicates.append(f"tag submitted twice: {request.tag}")
        n = self._next
        self._next += 1
        job_id = f"ƒ{n:03d}" if n % 2 else f"{n}.sim"
        slots: list[int | None] = list(request.indices or range(len(request.slices)))
        elements = {k: SimElement(request.element_key(job_id, k), k) for k in slots}
        late = self.rng.random() < self.faults.late_visibility
        self.jobs[job_id] = SimJob(job_id, request, elements, visible_at=now + (self.rng.random() * 2 if late else 0))
        self.by_tag.setdefault(request.tag, []).append(job_id)
        self._queued.extend((self.jobs[job_id], e) for e in elements.values())
        if self.woken is not None:
            self.woken.set()
        return job_id

    # ------------------------------------------------------------------ running slices

    def _start(self, job: SimJob, element: SimElement, now: float) -> None:
        if job.request.slices is None:
            index = element.index
            super()._start(job, element, now)
            attempt = self._attempt(job.request, index)
            if attempt is not None:
                self.ran_packed.setdefault((job.request.run_id, job.request.task, index, attempt), (False, now))
            return
        assert element.index is not None
        element.phase = Phase.RUNNING
        element.ends_at = None  # the slice ends after its last element
        self._running.append((job, element))
        self.slices[(job.job_id, element.index)] = SliceRun(list(job.request.slices[element.index]))
        self.trace.append((now, "slice", element.key))
        self._advance(job, element, now)

    def _inputs(self, req: SubmitRequest, index: int | None, slot: int | None = None) -> dict[str, Any] | None:
        """An element's inputs as the worker reads them: from its slice's file, else its own."""
        if slot is not None:
            raw = self.fs.get(jobfiles.slice_inputs_path(req.job_dir, slot))
            if raw:
                found = json.loads(raw).get("elements", {}).get(str(index))
                return found if isinstance(found, dict) else None
        raw = self.fs.get(jobfiles.inputs_path(req.job_dir, index))
        return json.loads(raw) if raw else None

    def _attempt(self, req: SubmitRequest, index: int | None, slot: int | None = None) -> int | None:
        inputs = self._inputs(req, index, slot)
        return int(inputs.get("attempt", 1)) if inputs is not None else None

    def _advance(self, job: SimJob, element: SimElement, now: float) -> None:
        """Run the slice's elements up to *now*: each ends, leaves its result, and the next starts."""
        req = job.request
        run = self.slices[(job.job_id, element.index)]  # type: ignore[index]
        while True:
            if run.current is not None:
                if run.current_ends > now:
                    return
                self.fs[jobfiles.result_path(req.job_dir, run.current)] = run.current_result or b""
                self.trace.append((run.current_ends, "end", element.key, run.current))
                run.current = None
            while run.pending:
                index = run.pending.pop(0)
                if jobfiles.cancel_path(req.job_dir, index) in self.fs or \
                        jobfiles.result_path(req.job_dir, index) in self.fs:
                    continue
                self._begin(job, run, index, element.index, now)
                break
            if run.current is None:  # nothing left: the array task ends
                element.ends_at = now
                failed = False
                for index in req.slices[element.index]:  # type: ignore[index]
                    raw = self.fs.get(jobfiles.result_path(req.job_dir, index))
                    failed = failed or (raw is not None and b'"failed"' in raw)
                element.result = b'{"state":"failed"}' if failed else None
                return

    def _begin(self, job: SimJob, run: SliceRun, index: int, slot: int | None, now: float) -> None:
        req = job.request
        shared = json.loads(self.fs.get(f"{req.job_dir}/{jobfiles.JOB_FILE}", b"{}") or b"{}")
        inputs = self._inputs(req, index, slot)
        run.current, run.current_ends = index, now + self.rng.choice([0.2, 1.0, 3.0])
        if inputs is None:  # the worker fails this element at once and goes on
            run.current_result = jobfiles.dumps({"state": "failed", "error": "no inputs"})
            return
        attempt = int(inputs.get("attempt", 1))
        run.current_attempt = attempt
        key = (req.run_id, req.task, index, attempt)
        self.trace.append((now, "start", f"{req.tag}[{index}]", attempt))
        self.executions[key] += 1
        if self.executions[key] > 1:
            self.duplicates.append(f"attempt executed twice: {key}")
        self.ran_packed.setdefault(key, (True, now))
        self.fs[jobfiles.started_path(req.job_dir, index)] = jobfiles.dumps({"host": "sim", "pid": 2})
        if self.rng.random() < self.faults.task_fails or req.task in self.faults.fail_tasks:
            run.current_result = jobfiles.dumps({"state": "failed", "error": "RuntimeError: simulated failure",
                                                 "traceback": "Traceback (simulated)", "host": "sim"})
        else:
            output = compute(req.task, {**shared.get("kwargs", {}), **inputs.get("kwargs", {})})
            self.outputs[key] = output
            run.current_result = jobfiles.dumps({"state": "succeeded", "output": output,
                                                 "output_hash": codec.value_hash(output), "host": "sim"})

    def next_due(self, now: float) -> float:
        due = super().next_due(now)
        for job, element in self._running:
            run = self.slices.get((job.job_id, element.index)) if job.request.slices is not None else None  # type: ignore[arg-type]
            if run is None or run.current is None or job.dropped or element.phase is not Phase.RUNNING:
                continue
            if getattr(self.faults, "kill_slice", 0.0):
                return now  # a kill is drawn on every tick
            due = min(due, run.current_ends)
        return due

    def tick(self, now: float) -> None:
        for job, element in list(self._running):
            if job.request.slices is None or job.dropped or element.phase is not Phase.RUNNING:
                continue
            if element.ends_at is None:
                run = self.slices[(job.job_id, element.index)]  # type: ignore[index]
                if run.current is not None and self.rng.random() < getattr(self.faults, "kill_slice", 0.0):
                    self._kill(job, element, run, now)
                    continue
                self._advance(job, element, now)
        super().tick(now)

    def _kill(self, job: SimJob, element: SimElement, run: SliceRun, now: float) -> None:
        req = job.request
        cause = self.rng.choice(KILL_CAUSES)
        assert run.current is not None
        unstarted = [(req.run_id, req.task, i, a) for i in run.pending
                     if jobfiles.cancel_path(req.job_dir, i) not in self.fs
                     and (a := self._attempt(req, i, element.index)) is not None]
        self.kills.append(Kill(now, req.tag, cause, (req.run_id, req.task, run.current, run.current_attempt),
                               unstarted))
        self.trace.append((now, "kill", element.key, cause.value))
        run.current, run.pending = None, []
        element.phase, element.outcome, element.ends_at, element.result = Phase.DONE, cause, None, None

    def _finish(self, job: SimJob, element: SimElement, now: float) -> None:
        if job.request.slices is None:
            super()._finish(job, element, now)
            return
        self.trace.append((now, "slice end", element.key))
        element.phase = Phase.DONE
        element.outcome = Outcome.FAILED if element.result is not None else Outcome.COMPLETED
        element.result = None  # every element wrote its own

    def cancel(self, keys: Collection[str]) -> None:
        super().cancel(keys)
        for (job_id, slot), run in self.slices.items():
            if self.jobs[job_id].elements[slot].phase is Phase.DONE:
                run.current, run.pending = None, []


# ---------------------------------------------------------------------- the scenario


@dataclass
class PackedReport(Report):
    kills: int = 0
    watched: int = 0
    packed_jobs: int = 0


class PackedHarness(Harness):
    """The seeded scenarios of :class:`~tests.sim.harness.Harness` on a cluster that packs and kills slices."""

    def __init__(self, seed: int, workdir: Path) -> None:
        super().__init__(seed, workdir)
        base = self.faults
        self.faults = PackedFaults(**{f: getattr(base, f) for f in base.__dataclass_fields__},
                                   kill_slice=self.rng.choice([0.0, 0.02, 0.05, 0.1]))
        self.cluster = PackedSimCluster(random.Random(self.rng.getrandbits(64)), self.faults, slots=self.cluster.slots)
        self.report = PackedReport(seed)
        self.watches: list[Watch] = []
        self._kills_seen = 0

    def _runtime(self) -> Any:
        runtime = sim_runtime(self.cluster, self._now)
        runtime.config.pack = PACK
        return runtime

    def _check_step(self) -> None:
        super()._check_step()
        cluster = self.cluster
        assert isinstance(cluster, PackedSimCluster)
        if self.engine is None:
            return
        for kill in cluster.kills[self._kills_seen:]:
            for key, started in [(kill.running, True), *((k, False) for k in kill.unstarted)]:
                run = self.engine.runs.get(key[0])
                inst = run.instance(key[1], key[2]) if run is not None else None
                # Followed under that job, its submission resolved (a job whose submission is still unknown
                # and that is never found again is concluded from its traces, as unpacked: not this check).
                if inst is not None and inst.tag == kill.tag and inst.attempt == key[3] and inst.job_id \
                        and inst.state in (State.QUEUED, State.RUNNING):
                    self.watches.append(Watch(key, self._now(), started, kill.cause))
        self._kills_seen = len(cluster.kills)

    async def _final_async(self) -> None:
        await super()._final_async()
        from reflowd.store import Store

        from .sqlite_inline import Connector, inline

        cluster = self.cluster
        assert isinstance(cluster, PackedSimCluster) and isinstance(self.report, PackedReport)
        self.report.kills = len(cluster.kills)
        self.report.watched = len(self.watches)
        self.report.packed_jobs = sum(1 for j in cluster.jobs.values() if j.request.slices is not None)
        restarts = [entry[0] for entry in cluster.trace if len(entry) > 1 and entry[1] == "life ended"]
        store = Store(self.db, connect=Connector(), offload=inline)
        await store.open()
        try:
            logs: dict[str, list[dict[str, Any]]] = {}
            for watch in self.watches:
                run_id, task, index, attempt = watch.key
                if run_id not in logs:
                    logs[run_id] = await store.transitions(run_id)
                left = _left_flight(logs[run_id], task, index, watch.at)
                label = f"{run_id}/{task}[{index}] attempt {attempt}"
                if left is None:
                    self.violation(f"{label}: in a killed slice, and never left flight")
                elif watch.started and left not in FAILURE:
                    self.violation(f"{label} was running when its packed job was killed ({watch.cause.value}) "
                                   f"and became {left}, not a failure")
                elif not watch.started and left not in (State.READY, State.CANCELLED):
                    self.violation(f"{label} never started in its killed packed job ({watch.cause.value}) "
                                   f"and became {left}, not ready again")
                if watch.started and left is not State.CANCELLED:  # a cancelled one is re-run only by the user
                    again = cluster.ran_packed.get((run_id, task, index, attempt + 1))
                    if again is not None and again[0]:
                        crossed = any(watch.at <= t <= again[1] for t in restarts)
                        self.violation(f"{label} died in a packed job; its retry ran packed again"
                                       + (" (a daemon restart came between)" if crossed else ""))
        finally:
            await store.close()


def _left_flight(log: list[dict[str, Any]], task: str, index: int, since: float) -> State | None:
    """The first state outside flight that the instance took from *since* on (None: it never left)."""
    for t in log:
        if t["task"] != task or t["index"] != index or t["at"] < since:
            continue
        if t["from_state"] in {s.value for s in IN_FLIGHT} and State(t["to_state"]) not in IN_FLIGHT:
            return State(t["to_state"])
    return None


def run_packed_seed(seed: int, workdir: Path | None = None) -> PackedReport:
    report = run_seed(seed, workdir, PackedHarness)
    assert isinstance(report, PackedReport)
    return report


@dataclass
class PackedSummary:
    reports: list[PackedReport] = field(default_factory=list)

    def line(self, seconds: float) -> str:
        r = self.reports
        return (f"packed simulation: {len(r)} scenarios in {seconds:.0f} s, {sum(x.packed_jobs for x in r)} packed "
                f"jobs, {sum(x.kills for x in r)} slices killed mid-way, {sum(x.watched for x in r)} of their "
                f"elements checked for isolation, {sum(x.crashes for x in r)} daemon crashes")


def main(argv: list[str]) -> int:
    """``python -m tests.sim.packed SEED [SEED...]``: replay packed scenarios, print what they found."""
    from .replay import replay

    return replay(argv, lambda seed, _: run_packed_seed(seed),
                  lambda r: (f"{r.runs} runs {dict(r.states)}, {r.packed_jobs} packed jobs, {r.kills} kills, "
                             f"{r.watched} elements watched"), "python -m tests.sim.packed SEED [SEED...]")


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
