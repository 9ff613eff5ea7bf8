"""An unexpected exception inside a cluster driver's loops is shown to the user, never only logged.

Where it concerns one run (submitting its job, adopting it, forming its batch), that run fails with the
error in ``status``; where it concerns none (a step of the observe loop, a whole loop), the cluster shows
it in ``status``/``stats`` (``internal_errors``). Either way the daemon keeps serving, the loop goes on,
and the other runs are not lost.

The first tests put the real engine, store and driver against the simulated cluster (tests/sim) on
virtual time; the last one injects the fault into a real reflowd process and looks through the client.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from reflow_client.client import RunStatus
from reflow_client.render import format_status
from reflowd.driver import packing, queue_limits
from reflowd.driver.early import EarlyJobs
from reflowd.driver.observe import Observer
from reflowd.engine.engine import Engine
from reflowd.engine.states import RunState

from .sim.cluster import SimCluster
from .sim.harness import manifest, scratch_dir, simulate, wait_until
from .sim.quiet import quiet_logs
from .support import ROOT, DaemonProcess, wait_for

COUNTING = ROOT / "tests" / "engine_workflows" / "counting.py"


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with quiet_logs():
        yield


def once(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, when: Any = lambda *a, **k: True) -> list[str]:
    """Make ``owner.name`` raise RuntimeError the first time *when* holds for its arguments; returns the
    messages raised (one at most)."""
    real = getattr(owner, name)
    raised: list[str] = []

    def broken(*args: Any, **kwargs: Any) -> Any:
        if not raised and when(*args, **kwargs):
            raised.append(f"{name} broke")
            raise RuntimeError(raised[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, broken)
    return raised


async def finish(engine: Engine, n: int = 3) -> dict[str, Any]:
    run = await engine.submit_run(manifest(0), {"n": n}, "/sim/run", "sim", {})
    await wait_until(lambda: run.state is not RunState.RUNNING, timeout=3000.0, what=f"{run.id} to end")
    return engine.status(run)


async def settled(engine: Engine) -> None:
    """Nothing left followed: no track stuck behind the error."""
    d = engine.drivers["sim"]
    await wait_until(lambda: not (d.tracks or d.unresolved), what="the driver to follow nothing")


def test_an_exception_inside_adopt_fails_its_run_cancels_its_job_and_leaves_nothing_stuck(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Last session's fault: ``adopt`` raised after following the track; its instances stayed in flight."""
    raised = once(monkeypatch, packing, "ElementKeys", lambda request, *a: request.task == "square")
    cancelled: list[str] = []
    real_cancel = SimCluster.cancel
    monkeypatch.setattr(SimCluster, "cancel", lambda self, keys: (cancelled.extend(keys), real_cancel(self, keys))[1])

    async def body(engine: Engine, cluster: SimCluster) -> None:
        status = await finish(engine)
        assert raised, "the fault was injected"
        assert status["run"]["state"] == "failed"
        assert status["run"]["error"] == "internal error while submitting square: RuntimeError: ElementKeys broke"
        square = next(t for t in status["tasks"] if t["name"] == "square")
        assert square["counts"] == {"failed": 3}
        assert any("ElementKeys broke" in (f["error"] or "") for f in status["failures"])
        shown = status["cluster"]["internal_errors"]
        assert shown["count"] == 1 and shown["where"] == "submitting square" and "ElementKeys broke" in shown["error"]
        await settled(engine)
        (job,) = [j for j in cluster.jobs.values() if j.request.task == "square"]
        assert job.job_id in cancelled, "the job nobody follows any more is cancelled"
        again = await finish(engine, n=2)
        assert again["run"]["state"] == "succeeded", again["failures"]

    simulate(body)


def test_an_exception_forming_batches_fails_the_runs_it_took_and_the_queue_goes_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    raised = once(monkeypatch, queue_limits, "retries_first",
                  lambda batches: any(tr.name == "square" for _, tr, _ in batches))

    async def body(engine: Engine, cluster: SimCluster) -> None:
        status = await finish(engine)
        assert raised
        assert status["run"]["state"] == "failed"
        assert status["run"]["error"] == "internal error while forming jobs: RuntimeError: retries_first broke"
        assert not any(j.request.task == "square" for j in cluster.jobs.values()), "nothing went out for it"
        assert status["cluster"]["internal_errors"]["where"] == "forming jobs"
        assert (await finish(engine, n=2))["run"]["state"] == "succeeded"

    simulate(body)


def test_an_observer_step_that_raises_is_shown_on_the_cluster_and_the_runs_go_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    raised = once(monkeypatch, Observer, "prune", lambda self: bool(self.d.emptied))

    async def body(engine: Engine, cluster: SimCluster) -> None:
        status = await finish(engine, n=4)
        assert raised
        assert status["run"]["state"] == "succeeded", "a housekeeping step concerns no run: none is failed"
        shown = engine.stats()["clusters"]["sim"]["internal_errors"]
        assert shown["where"] == "pruning finished jobs" and shown["error"] == "RuntimeError: prune broke"
        text = format_status(RunStatus.from_dict(status), width=200)
        assert "INTERNAL ERROR at " in text and "while pruning finished jobs: RuntimeError: prune broke" in text
        await settled(engine)  # pruned by a later cycle
        later = await finish(engine, n=1)  # a run that began after the error does not show it
        assert "INTERNAL ERROR" not in format_status(RunStatus.from_dict(later), width=200)

    simulate(body)


def test_a_driver_loop_that_raises_is_shown_and_started_again(monkeypatch: pytest.MonkeyPatch) -> None:
    raised = once(monkeypatch, EarlyJobs, "loop")

    async def body(engine: Engine, cluster: SimCluster) -> None:
        d = engine.drivers["sim"]
        await wait_until(lambda: d.internal_errors, what="the loop's error to be shown")
        assert raised and d.status()["internal_errors"]["where"] == "the early-submission loop"
        assert (await finish(engine, n=2))["run"]["state"] == "succeeded"

    simulate(body)


def test_a_fault_in_a_real_daemon_fails_the_run_with_the_error_shown_and_the_daemon_keeps_serving(
        tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "d", config='[clusters.local]\nscheduler = "local"\nmax_workers = 2\n')
    d.start(extra_env={"REFLOW_FAULT_POINTS": "raise:before_adopt"})  # raises once, then never again

    def submit(run_dir: Path) -> str:
        result = d.cli("submit", str(COUNTING), "--run-dir", str(run_dir), "--no-daemon", "--json", "--n", "3",
                       check=True)
        return json.loads(result.stdout.strip().splitlines()[-1])["run_id"]

    def ended(run_id: str) -> Any:
        with d.client() as c:
            status = c.status(run_id)
        return status.state in ("succeeded", "failed", "cancelled") and status

    try:
        run_id = submit(tmp_path / "broken")
        broken = wait_for(lambda: ended(run_id), timeout=120, interval=0.2, what="the first run to end")
        assert broken.state == "failed"
        error = "internal error while submitting prepare: InjectedFault: injected fault at before_adopt"
        assert broken.run.error == error, broken.run
        assert {(f.task, f.state, f.error) for f in broken.failures} >= {("prepare", "failed", error)}, broken.failures
        assert all(f.error == error for f in broken.failures)  # (what had not started fails with the run's error)
        with d.client() as c:
            assert c.ping()
            shown = c.stats()["clusters"]["local"]["internal_errors"]
            assert shown["where"] == "submitting prepare" and "injected fault at before_adopt" in shown["error"]
            wait_for(lambda: c.stats()["tracked_jobs"]["local"] == 0, timeout=60, what="nothing followed")
        fine_id = submit(tmp_path / "fine")
        fine = wait_for(lambda: ended(fine_id), timeout=180, interval=0.2, what="the second run to end")
        assert fine.state == "succeeded", fine.failures
        assert d.proc is not None and d.proc.poll() is None, "the daemon is still up"
    finally:
        d.stop()


BUGGY_SCENARIOS = int(os.environ.get("REFLOW_SIM_BUGGY_SCENARIOS", "40"))


@pytest.mark.simulation
def test_seeded_scenarios_with_adapter_bugs_keep_every_invariant() -> None:
    """The simulation's scenarios (crashes, lost answers, ...) on an adapter that now and then raises what it
    never should, after creating a job or on a poll (tests/sim/buggy.py). Before errors were shown and tracks
    failed, such a scenario left an instance SUBMITTING for ever and its run never ended."""
    from .sim.buggy import run_buggy_seed

    with scratch_dir() as tmp:
        reports = [run_buggy_seed(seed, Path(tmp)) for seed in range(BUGGY_SCENARIOS)]
    failed = [r for r in reports if not r.ok]
    assert not failed, "\n".join(f"seed {r.seed}: {r.violations[0]}\n    replay: {sys.executable} -m tests.sim.buggy "
                                 f"{r.seed}" for r in failed[:10])
    if len(reports) >= 20:
        assert sum(r.shown for r in reports) >= len(reports) // 2, "the bugs must happen, and be shown"
