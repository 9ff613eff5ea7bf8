"""A submission that failed inside the daemon before its job id was known leaves no job behind, even across
a crash.

``Driver.track_failed`` on such a submission cannot cancel by id: its sbatch may have created a job. The
job is looked up by its tag and cancelled if found; until then the instances stay SUBMITTING (their run
shows the error but stays open) and the job's row says ``failed``, so a daemon that dies before the
look-up finds them on restart and does the same. The code before failed the instances at once: the run
ended, a restart never loaded it, and the job ran on, nobody following it.

Two daemon lives on one store and one simulated cluster (tests/sim): in the first, sbatch creates the job and
then raises (an adapter bug), and every look-up by tag fails until the daemon stops.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from reflowd.engine.engine import Engine
from reflowd.engine.states import RunState, State
from reflowd.transports.base import TransportError

from .sim.cluster import Faults, SimCluster, SimScheduler
from .sim.harness import manifest, scratch_dir, wait_until
from .sim.quiet import quiet_logs
from .test_failures_requeue_restart import lives


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with quiet_logs():
        yield


@pytest.fixture
def broken_sbatch(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """sbatch of ``square`` raises once (after creating its job, unless ``before``); look-ups fail while
    ``finding`` is False."""
    state: dict[str, Any] = {"job_id": None, "before": False, "finding": False}
    submit, find = SimScheduler.submit, SimScheduler.find_tags

    async def broken(self: SimScheduler, request: Any) -> str:
        if request.task == "square" and not state.get("raised"):
            state["raised"] = True
            if state["before"]:
                raise RuntimeError("sbatch wrapper broke")
            state["job_id"] = await submit(self, request)
            state["tag"] = request.tag
            raise RuntimeError("cannot read sbatch's answer")
        return await submit(self, request)

    async def finding(self: SimScheduler, tags: Any) -> Any:
        if not state["finding"]:
            raise TransportError("look-ups fail in this life")
        return await find(self, tags)

    monkeypatch.setattr(SimScheduler, "submit", broken)
    monkeypatch.setattr(SimScheduler, "find_tags", finding)
    return state


ERROR = "internal error while submitting square: RuntimeError: cannot read sbatch's answer"


async def first_life(engine: Engine, cluster: SimCluster) -> str:
    """The submission of square fails inside the daemon; the daemon dies before it could look the tag up."""
    run = await engine.submit_run(manifest(0), {"n": 3}, "/sim/run", "sim", {})
    square = run.tasks["square"]
    await wait_until(lambda: run.error and square.expanded and not any(
        i.state in (State.PENDING, State.READY) for i in square.instances.values()), what="the error")
    assert run.error == ERROR or "sbatch wrapper broke" in run.error
    await engine.store.flush()
    return run.id


def cancelled(cluster: SimCluster, job_id: str | None) -> bool:
    """scancel went out for the whole job *job_id* (by its id, or every element's key)."""
    keys = {k for t in cluster.trace if t[1] == "cancel" for k in t[2]}
    job = cluster.jobs.get(job_id or "")
    return job is not None and (job_id in keys or all(e.key in keys for e in job.elements.values()))


def test_a_job_whose_submission_failed_before_its_id_was_known_is_cancelled_after_a_restart(
        broken_sbatch: dict[str, Any]) -> None:
    async def second_life(engine: Engine, cluster: SimCluster) -> None:
        broken_sbatch["finding"] = True
        run_id = next(iter(engine.runs), None)
        assert run_id is not None, "the run is recovered: its submission is not settled"
        run = engine.runs[run_id]
        await wait_until(lambda: cancelled(cluster, broken_sbatch["job_id"]), timeout=300,
                         what="the job to be cancelled")
        await wait_until(lambda: run.state is not RunState.RUNNING, what="the run to end")
        status = engine.status(run)
        assert status["run"]["state"] == "failed" and status["run"]["error"] == ERROR
        assert next(t for t in status["tasks"] if t["name"] == "square")["counts"] == {"failed": 3}
        assert {f["error"] for f in status["failures"] if f["task"] == "square"} == {ERROR}
        (record,) = [r for r in await engine.store.jobs_for_runs([run_id]) if r.tag == broken_sbatch["tag"]]
        assert record.job_id == broken_sbatch["job_id"]
        d = engine.drivers["sim"]
        await wait_until(lambda: not (d.tracks or d.unresolved), what="nothing followed")

    cluster = SimCluster(random.Random(5), Faults())
    with scratch_dir() as tmp:
        lives(cluster, Path(tmp) / "sim.sqlite", first_life, second_life)
    assert broken_sbatch["job_id"] is not None
    assert cluster.submissions[broken_sbatch["tag"]] == 1, "never submitted again"


def test_without_a_crash_the_job_is_cancelled_once_found_and_the_run_then_ends(broken_sbatch: dict[str, Any]) -> None:
    broken_sbatch["finding"] = True

    async def life(engine: Engine, cluster: SimCluster) -> None:
        run = await engine.submit_run(manifest(0), {"n": 3}, "/sim/run", "sim", {})
        await wait_until(lambda: run.state is not RunState.RUNNING, what="the run to end")
        assert cancelled(cluster, broken_sbatch["job_id"]), "cancelled before the run ended"
        assert engine.status(run)["run"]["error"] == ERROR
        assert all(i.state is State.FAILED and i.error == ERROR for i in run.tasks["square"].instances.values())

    cluster = SimCluster(random.Random(5), Faults())
    with scratch_dir() as tmp:
        lives(cluster, Path(tmp) / "sim.sqlite", life)


def test_a_failed_submission_that_made_no_job_fails_its_instances_after_a_restart_and_is_never_sent_again(
        broken_sbatch: dict[str, Any]) -> None:
    broken_sbatch["before"] = True

    async def second(engine: Engine, cluster: SimCluster) -> None:
        broken_sbatch["finding"] = True
        (run_id,) = [r["id"] for r in await engine.store.list_runs(limit=10)]
        run = await engine.get_run(run_id)
        await wait_until(lambda: run.state is not RunState.RUNNING, what="the run to end")
        assert run.state is RunState.FAILED
        assert run.error == "internal error while submitting square: RuntimeError: sbatch wrapper broke"
        assert {i.state for i in run.tasks["square"].instances.values()} == {State.FAILED}

    cluster = SimCluster(random.Random(5), Faults())
    with scratch_dir() as tmp:
        lives(cluster, Path(tmp) / "sim.sqlite", first_life, second)
    assert not any(j.request.task == "square" for j in cluster.jobs.values()), "nothing was sent again"


def test_a_followed_job_whose_handling_raised_is_cancelled_after_a_restart_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The job id is known (applying the scheduler's answer to square's queued job raised), but scancel does not
    get through before the daemon dies. Before, the instances failed at once and the cancel lived in memory
    only: the run ended, and the job ran on after the restart."""
    from reflowd.driver.observe import Observer

    from .test_driver_errors import once

    raised = once(monkeypatch, Observer, "apply_observations", lambda self, track, obs: track.record.task == "square"
                  and obs is not None and any(i.state is State.QUEUED for i in track.live.values()))
    scancel = {"works": False}
    cancel = SimScheduler.cancel

    async def cancelling(self: SimScheduler, keys: Any) -> None:
        if not scancel["works"]:
            raise TransportError("scancel does not get through in this life")
        await cancel(self, keys)

    monkeypatch.setattr(SimScheduler, "cancel", cancelling)
    error = "internal error while applying the scheduler's answer: RuntimeError: apply_observations broke"
    job: dict[str, Any] = {}

    async def first(engine: Engine, cluster: SimCluster) -> None:
        run = await engine.submit_run(manifest(0), {"n": 3}, "/sim/run", "sim", {})
        await wait_until(lambda: raised and run.error, what="the error")
        assert run.error == error
        (square,) = [j for j in cluster.jobs.values() if j.request.task == "square"]
        job["id"] = square.job_id
        await engine.store.flush()

    async def second(engine: Engine, cluster: SimCluster) -> None:
        scancel["works"] = True
        (run,) = engine.runs.values()
        await wait_until(lambda: cancelled(cluster, job["id"]), what="the job to be cancelled")
        await wait_until(lambda: run.state is not RunState.RUNNING, what="the run to end")
        assert run.state is RunState.FAILED and run.error == error
        assert {(i.state, i.error) for i in run.tasks["square"].instances.values()} <= {
            (State.FAILED, error), (State.SUCCEEDED, None)}, "what had not ended failed with the error"

    cluster = SimCluster(random.Random(5), Faults())
    with scratch_dir() as tmp:
        lives(cluster, Path(tmp) / "sim.sqlite", first, second)
