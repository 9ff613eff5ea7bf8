"""An unexpected exception on the early (Slurm-dependency) path is shown to the user, never only logged.

An early job is an optimisation: where its step fails before any instance went out under it, the instance
goes the usual way (the early job's record keeps it from running twice: it is adopted by its tag, or
withdrawn), and the error is shown on the cluster (``internal_errors`` in ``status``/``stats``). Where the
instance already went out under the early job (adopted), the error is tied to that submission: the instance
and its run fail with the error, and the job is cancelled -- as for any submission (``Driver.track_failed``).
Where the early job cannot be withdrawn, its instance cannot safely go the usual way either (both could
run): it fails with the error, and the withdrawal is tried again.

The real engine, store and driver against the simulated cluster as Slurm with dependencies
(``tests/sim/early.py``), on virtual time; the faults are injected by making one call raise once.
"""

from __future__ import annotations

from typing import Any

import pytest

from reflowd.driver import chains, early
from reflowd.driver.chains import ChainJobs
from reflowd.driver.early import EarlyJobs
from reflowd.engine.engine import Engine
from reflowd.engine.states import RunState

from .sim.cluster import SimCluster, SimScheduler
from .sim.early import DependentCluster, slurm_like
from .sim.harness import manifest, simulate, wait_until
from .sim.quiet import quiet_logs
from .test_driver_errors import once


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with quiet_logs():
        yield


def total(n: int) -> int:
    return sum(x * x + 1 for x in range(n))


async def finish(engine: Engine, n: int = 3, timeout: float = 3000.0) -> dict[str, Any]:
    run = await engine.submit_run(manifest(0), {"n": n}, "/sim/run", "sim", {})
    await wait_until(lambda: run.state is not RunState.RUNNING, timeout=timeout, what=f"{run.id} to end")
    return engine.status(run)


async def settled(engine: Engine) -> None:
    d = engine.drivers["sim"]
    await wait_until(lambda: not (d.tracks or d.unresolved) and d.early.settled,
                     what="the driver to follow nothing")


def early_jobs(cluster: SimCluster, task: str) -> list[Any]:
    return [j for j in cluster.jobs.values() if j.request.task == task and "dependency" in j.request.options]


def run_early(body: Any) -> None:
    simulate(body, adjust=slurm_like, cluster_type=DependentCluster)


def shown(engine: Engine) -> dict[str, Any]:
    return engine.stats()["clusters"]["sim"].get("internal_errors") or {}


def test_the_simulated_slurm_runs_a_workflow_with_early_jobs_adopted() -> None:
    """(The setting of the tests below: the gather and the element-wise chain go out early and are adopted.)"""
    async def body(engine: Engine, cluster: DependentCluster) -> None:
        status = await finish(engine, n=4)
        assert status["run"]["state"] == "succeeded", status["failures"]
        counters = engine.drivers["sim"].counters
        assert counters.get("early_adopted") == 2 and counters.get("chain_adopted_elements") == 4, counters
        assert len(early_jobs(cluster, "total")) == 1 and len(early_jobs(cluster, "bump")) == 1
        assert not shown(engine) and not cluster.duplicates

    run_early(body)


def test_an_early_sbatch_that_raises_after_its_job_exists_is_shown_and_the_job_adopted_by_its_tag(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An adapter bug: the early job of ``total`` is created, then reading sbatch's answer raises. The code
    before this change only logged it."""
    real = SimScheduler.submit
    raised: list[str] = []

    async def submit(self: SimScheduler, request: Any) -> str:
        job_id = await real(self, request)
        if not raised and request.task == "total":
            raised.append(job_id)
            raise RuntimeError("cannot read sbatch's answer")
        return job_id

    monkeypatch.setattr(SimScheduler, "submit", submit)

    async def body(engine: Engine, cluster: DependentCluster) -> None:
        status = await finish(engine)
        assert raised, "the fault was injected"
        assert status["run"]["state"] == "succeeded", status["failures"]
        assert engine.runs[status["run"]["id"]].tasks["total"].instances[None].output == total(3)
        error = shown(engine)
        assert error["where"].startswith("submitting total early") and status["run"]["id"] in error["where"]
        assert error["error"] == "RuntimeError: cannot read sbatch's answer"
        (job,) = early_jobs(cluster, "total")
        assert job.job_id == raised[0] and engine.runs[status["run"]["id"]].tasks["total"].instances[None].job_id \
            == job.job_id, "the early job was found by its tag and adopted"
        assert not cluster.duplicates and sum(1 for k in cluster.executions if k[1] == "total") == 1

    run_early(body)


def test_an_early_job_whose_check_raises_fails_its_run_and_is_withdrawn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether the early job has started is what the check finds out: when it raises, the instance cannot go the
    usual way (it could run twice), so it fails with the error, as any submission that raises; the early job is
    withdrawn. The code before this change only logged the error and sent the instance out again."""
    raised = once(monkeypatch, EarlyJobs, "_check")

    async def body(engine: Engine, cluster: DependentCluster) -> None:
        status = await finish(engine)
        assert raised
        assert status["run"]["state"] == "failed"
        error = "internal error while adopting the early job of total: RuntimeError: _check broke"
        assert status["run"]["error"] == error
        assert [f["error"] for f in status["failures"] if f["task"] == "total"] == [error]
        assert shown(engine)["where"] == "adopting the early job of total"
        await settled(engine)
        (job,) = early_jobs(cluster, "total")
        assert withdrawn(cluster, job)
        assert sum(n for k, n in cluster.executions.items() if k[1] == "total") <= 1, "never run twice"
        assert (await finish(engine, n=2))["run"]["state"] == "succeeded"

    run_early(body)


def withdrawn(cluster: SimCluster, job: Any) -> bool:
    """The daemon withdrew *job*: its cancel markers written, and scancel sent for it."""
    from reflow_client import jobfiles

    marked = all(jobfiles.cancel_path(job.request.job_dir, i) in cluster.fs for i in job.elements)
    keys = {k for t in cluster.trace if t[1] == "cancel" for k in t[2]}
    return marked and (job.job_id in keys or all(e.key in keys for e in job.elements.values()))


def test_an_exception_adopting_an_early_job_fails_its_run_cancels_the_job_and_leaves_nothing_stuck(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``adopt`` raises after the instance went SUBMITTING under the early job's tag: before this change the
    early job was dropped and the instance left SUBMITTING for ever (its run never ended)."""
    raised = once(monkeypatch, early, "adopt", lambda d, track, *a: track.record.task == "total")

    async def body(engine: Engine, cluster: DependentCluster) -> None:
        status = await finish(engine)
        assert raised
        assert status["run"]["state"] == "failed"
        error = "internal error while adopting the early job of total: RuntimeError: adopt broke"
        assert status["run"]["error"] == error
        (failure,) = [f for f in status["failures"] if f["task"] == "total"]
        assert failure["error"] == error
        assert shown(engine)["where"] == "adopting the early job of total"
        await settled(engine)
        (job,) = early_jobs(cluster, "total")
        keys = {k for t in cluster.trace if t[1] == "cancel" for k in t[2]}
        assert job.job_id in keys, "the job nobody follows is cancelled"
        assert (await finish(engine, n=2))["run"]["state"] == "succeeded"

    run_early(body)


def test_an_early_job_that_cannot_be_withdrawn_fails_its_instance_and_is_withdrawn_later(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``_check`` finds a reason not to adopt, then withdrawing the early job raises: the instance must not go
    out the usual way while the early job may still run it."""
    monkeypatch.setattr(EarlyJobs, "_check", lambda self, *a: _async("the test says no"))
    raised = once(monkeypatch, EarlyJobs, "drop")

    async def body(engine: Engine, cluster: DependentCluster) -> None:
        status = await finish(engine)
        assert raised
        assert status["run"]["state"] == "failed"
        assert status["run"]["error"] == "internal error while withdrawing the early job of total: RuntimeError: drop broke"
        await settled(engine)
        (job,) = early_jobs(cluster, "total")
        assert withdrawn(cluster, job), "withdrawn by the retry"
        assert engine.drivers["sim"].counters["early_errors"] == 1
        records = await engine.store.jobs_for_runs([status["run"]["id"]])
        assert [r.state for r in records if r.tag == job.request.tag] == ["dropped"]

    run_early(body)


async def _async(value: Any) -> Any:
    return value


def test_a_chained_array_whose_check_raises_fails_its_elements_and_is_withdrawn(
        monkeypatch: pytest.MonkeyPatch) -> None:
    raised = once(monkeypatch, ChainJobs, "_adoptable")

    async def body(engine: Engine, cluster: DependentCluster) -> None:
        status = await finish(engine)
        assert raised
        assert status["run"]["state"] == "failed"
        error = "internal error while adopting the early array of bump: RuntimeError: _adoptable broke"
        assert status["run"]["error"] == error
        assert next(t for t in status["tasks"] if t["name"] == "bump")["counts"] == {"failed": 3}
        assert shown(engine)["where"] == "adopting the early array of bump"
        await settled(engine)
        (job,) = early_jobs(cluster, "bump")
        assert withdrawn(cluster, job)
        assert all(cluster.executions[k] == 1 for k in cluster.executions if k[1] == "bump")

    run_early(body)


def test_an_exception_adopting_a_chained_array_fails_its_run_and_cancels_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before this change the adopted elements stayed SUBMITTING, followed by nobody: the run never ended."""
    raised = once(monkeypatch, chains, "adopt", lambda d, track, *a: track.record.task == "bump")

    async def body(engine: Engine, cluster: DependentCluster) -> None:
        status = await finish(engine)
        assert raised
        assert status["run"]["state"] == "failed"
        error = "internal error while adopting the early array of bump: RuntimeError: adopt broke"
        assert status["run"]["error"] == error
        bump = next(t for t in status["tasks"] if t["name"] == "bump")
        assert bump["counts"] == {"failed": 3}
        await settled(engine)
        (job,) = early_jobs(cluster, "bump")
        assert all(e.phase.value == "done" for e in job.elements.values())
        assert (await finish(engine, n=2))["run"]["state"] == "succeeded"

    run_early(body)
