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
