"""Per-user queue limits: never more queued than the cap, and a refusal for a limit waits instead of failing.

The real engine, store and driver on the simulated cluster (tests/sim,
virtual time); the refusal is Slurm's own text for ``MaxSubmitJobsPerUser``.
"""

from __future__ import annotations

from typing import Any

import pytest

from reflowd.driver import queue_limits
from reflowd.engine.engine import Engine
from reflowd.engine.states import RunState
from reflowd.schedulers.base import Phase, SubmitError, SubmitRequest

from .sim.cluster import SimCluster
from .sim.harness import manifest, simulate, wait_until
from .sim.quiet import quiet_logs

SLURM_REFUSAL = ("sbatch: error: QOSMaxSubmitJobPerUserLimit\nsbatch: error: Batch job submission failed: "
                 "Job violates accounting/QOS policy (job submit limit, user's size and/or time limits)")


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with quiet_logs():
        yield


def queued(cluster: SimCluster) -> int:
    return sum(1 for j in cluster.jobs.values() if not j.dropped for e in j.elements.values()
               if e.phase is not Phase.DONE)


def watch_queue(monkeypatch: pytest.MonkeyPatch, limit: int | None = None) -> list[int]:
    """Record the queue's size after each submission; with *limit*, refuse (as Slurm's controller does, one
    submission at a time) what would pass it."""
    sizes: list[int] = []
    real = SimCluster.submit

    def submit(self: SimCluster, request: SubmitRequest, now: float) -> str:
        n = len(request.indices) if request.indices is not None else 1
        if limit is not None and queued(self) + n > limit:
            raise SubmitError(SLURM_REFUSAL, permanent=True)
        job_id = real(self, request, now)
        sizes.append(queued(self))
        return job_id

    monkeypatch.setattr(SimCluster, "submit", submit)
    return sizes


def test_refusals_for_a_limit_are_recognised_on_every_system() -> None:
    assert queue_limits.is_limit_refusal(SLURM_REFUSAL)
    assert queue_limits.is_limit_refusal("Unable to run job: job rejected: Only 10 jobs are allowed per user.")
    assert queue_limits.is_limit_refusal("qsub: would exceed queue generic's per-user limit")
    assert not queue_limits.is_limit_refusal("sbatch: error: invalid partition specified: nope")
    limit = queue_limits.QueueLimit(configured=10)
    limit.probed = 8
    assert limit.cap(0.0) == 8 and limit.room(0.0, 5) == 3
    until = limit.refused(100.0, 4, SLURM_REFUSAL)
    assert limit.cap(100.0) == 4 and limit.cap(until) == 8  # a learnt limit holds for a while, then is tried again


def test_a_configured_cap_keeps_the_queue_under_it_and_every_element_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = watch_queue(monkeypatch)

    async def body(engine: Engine, cluster: SimCluster) -> None:
        engine.drivers["sim"].queue_limit.configured = 5
        run = await engine.submit_run(manifest(0), {"n": 30}, "/sim/run", "sim", {})
        await wait_until(lambda: run.state is not RunState.RUNNING, what="the run to end")
        assert run.state is RunState.SUCCEEDED
        assert run.tasks["total"].instances[None].output == sum(i * i + 1 for i in range(30))
        assert engine.status(run)["cluster"]["max_queued"] == 5

    simulate(body)
    assert sizes and max(sizes) <= 5, sizes


def test_a_submission_refused_for_a_limit_waits_and_is_retried_never_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = watch_queue(monkeypatch, limit=10)

    async def body(engine: Engine, cluster: SimCluster) -> None:
        cluster.slots = 2
        run = await engine.submit_run(manifest(0), {"n": 40}, "/sim/run", "sim", {})
        await wait_until(lambda: run.state is not RunState.RUNNING, what="the run to end")
        assert run.state is RunState.SUCCEEDED, engine.status(run)["failures"]
        assert all(i.attempt == 1 for t in run.tasks.values() for i in t.instances.values())
        view = engine.status(run)["cluster"]
        assert view["limit_refusals"] >= 1 and "QOSMaxSubmitJobPerUserLimit" in view["last_limit_refusal"]

    simulate(body)
    assert max(sizes) <= 10


def test_the_slurm_probe_reads_the_smallest_submit_limit_of_the_association_and_its_qos() -> None:
    from reflowd.schedulers import slurm_commands as sc

    assoc = "root|||normal,high\n"
    qos = "normal|10|\nhigh||50\nother|2|\n"
    assert sc.parse_queue_limit(assoc, qos) == 10
    assert sc.parse_queue_limit("root|5||normal\n", qos) == 5
    assert sc.parse_queue_limit("root|||normal\n", "normal||\n") is None
    assert sc.render_assoc_limits("ann")[:5] == ["sacctmgr", "-n", "-P", "show", "assoc"]


def test_an_element_done_here_holds_its_queue_slot_until_the_scheduler_ends_it() -> None:
    """A worker writes its result while its job still runs (then completes): the site still counts it."""
    from reflowd.schedulers.base import Observation, Presence

    held = queue_limits.Lingering()
    held.add("7_1", "7", 100.0)
    held.add("7_2", "7", 100.0)
    held.add("8", "8", 100.0)
    assert len(held) == 3 and held.job_ids() == {"7", "8"}
    running = Observation(Presence.PRESENT, Phase.RUNNING)
    assert not held.observed(None, 101.0) and len(held) == 3  # a failed query shows nothing
    assert held.observed({"7_1": running, "7_2": Observation(Presence.PRESENT, Phase.DONE), "8": running}, 102.0)
    assert set(held.keys) == {"7_1", "8"}
    assert held.observed({"8": running}, 103.0) and set(held.keys) == {"8"}  # 7_1 is gone from the queue
    assert not held.observed({"8": running}, 104.0)
    assert held.observed(None, 100.0 + queue_limits.LINGER_MAX) and len(held) == 0  # bounded, never for ever


@pytest.mark.parametrize("cap", [1, 4])
def test_retried_elements_stay_under_the_cap_go_out_first_and_never_deadlock(monkeypatch: pytest.MonkeyPatch,
                                                                            cap: int) -> None:
    """Elements that fail their first attempt are retried under the cap: the retry takes the next free slot (before
    elements never submitted yet), the failed attempt's job still counts until the scheduler ends it, and with a cap
    of 1 the retry waits for its own earlier job to leave the queue instead of blocking for ever."""
    import json as _json

    from reflow_client import jobfiles

    failing = {1, 2, 5}
    order: list[tuple[int | None, int]] = []  # (index, attempt) of each square element submitted, in order
    sizes = watch_queue(monkeypatch)
    start, submit = SimCluster._start, SimCluster.submit

    def _start(self: SimCluster, job: Any, element: Any, now: float) -> None:
        start(self, job, element, now)
        raw = self.fs.get(jobfiles.inputs_path(job.request.job_dir, element.index))
        attempt = _json.loads(raw).get("attempt", 1) if raw else 1
        if job.request.task == "square" and element.index in failing and attempt == 1 and element.result:
            element.result = jobfiles.dumps({"state": "failed", "error": "RuntimeError: first attempt fails"})

    def _submit(self: SimCluster, request: SubmitRequest, now: float) -> str:
        if request.task == "square":
            for index in request.indices or [None]:
                raw = self.fs.get(jobfiles.inputs_path(request.job_dir, index))
                order.append((index, _json.loads(raw).get("attempt", 1) if raw else 1))
        return submit(self, request, now)

    monkeypatch.setattr(SimCluster, "_start", _start)
    monkeypatch.setattr(SimCluster, "submit", _submit)

    async def body(engine: Engine, cluster: SimCluster) -> None:
        engine.drivers["sim"].queue_limit.configured = cap
        run = await engine.submit_run(manifest(1), {"n": 12}, "/sim/run", "sim", {})
        await wait_until(lambda: run.state is not RunState.RUNNING, timeout=3000, what="the run to end")
        assert run.state is RunState.SUCCEEDED, engine.status(run)["failures"]
        square = run.tasks["square"].instances
        assert {i for i, inst in square.items() if inst.attempt == 2} == failing
        assert run.tasks["total"].instances[None].output == sum(i * i + 1 for i in range(12))

    simulate(body)
    assert sizes and max(sizes) <= cap, sizes
    retried_at = [order.index((i, 2)) for i in sorted(failing)]
    last_fresh = max(n for n, (_, attempt) in enumerate(order) if attempt == 1)
    assert min(retried_at) < last_fresh, f"retries waited behind every fresh element: {order}"


def test_batches_with_retries_go_first_under_a_cap() -> None:
    from types import SimpleNamespace as Inst

    fresh = ("run", "square", [Inst(attempt=1), Inst(attempt=1)])
    escalated = ("run", "square", [Inst(attempt=2)])  # its own batch: one submission has one size
    other = ("run", "bump", [Inst(attempt=1)])
    mixed = ("run", "bump", [Inst(attempt=1), Inst(attempt=3)])
    assert queue_limits.retries_first([fresh, other, escalated, mixed]) == [escalated, mixed, fresh, other]
    assert queue_limits.retries_first([]) == []
