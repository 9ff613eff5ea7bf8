"""Failures inside the engine are shown on the run that suffered them, and never stop the daemon.

Each test puts the real engine, store and cluster driver in one situation
against the simulated cluster (tests/sim) on virtual time: an evaluation that
raises, a conclusion that raises, a submission that raises, a scheduler state
nobody understands, a run the store cannot load. In each, the run concerned
ends FAILED with the error in ``status`` (or the state is shown), and another
run on the same engine still succeeds.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from reflowd.driver.submit import Submitter
from reflowd.engine import engine as engine_module
from reflowd.engine.engine import Engine
from reflowd.engine.states import RunState

from .sim.cluster import Faults, SimCluster
from .sim.harness import manifest, simulate, wait_until
from .sim.quiet import quiet_logs


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with quiet_logs():
        yield


async def _finish(engine: Engine, run_id: str) -> dict[str, Any]:
    run = engine.runs[run_id]
    await wait_until(lambda: run.state is not RunState.RUNNING, what=f"{run_id} to end")
    return engine.status(run)


async def _submit(engine: Engine, n: int = 3, retries: int = 0, **config: Any) -> str:
    m = manifest(retries)
    for task in m.tasks:
        task.config.update(config.get(task.name, {}))
    run = await engine.submit_run(m, {"n": n}, "/sim/run", "sim", {})
    return run.id


async def _healthy_run(engine: Engine) -> None:
    status = await _finish(engine, await _submit(engine, n=2))
    assert status["run"]["state"] == "succeeded", status["run"]


def test_an_evaluation_error_fails_the_run_with_the_error_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    real = engine_module.identity_digest

    def broken(workflow: str, task: Any, res: Any, index: Any) -> bytes:
        if task.name == "bump":
            raise RuntimeError("identity exploded")
        return real(workflow, task, res, index)

    async def body(engine: Engine, cluster: SimCluster) -> None:
        monkeypatch.setattr(engine_module, "identity_digest", broken)
        status = await _finish(engine, await _submit(engine))
        assert status["run"]["state"] == "failed"
        assert "internal error while resolving bump: RuntimeError: identity exploded" in status["run"]["error"] or \
            any("identity exploded" in (f["error"] or "") for f in status["failures"]), status
        bump = next(t for t in status["tasks"] if t["name"] == "bump")
        assert bump["counts"] == {"failed": 3}
        monkeypatch.setattr(engine_module, "identity_digest", real)
        await _healthy_run(engine)

    simulate(body)


def test_a_run_whose_whole_evaluation_raises_ends_failed_not_running(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(engine: Engine, cluster: SimCluster) -> None:
        async def explode(run: Any, instances: Any) -> None:
            raise KeyError("cache lookup went wrong")

        monkeypatch.setattr(engine, "_cache_phase", explode)
        status = await _finish(engine, await _submit(engine))
        assert status["run"]["state"] == "failed"
        assert status["run"]["error"].startswith("internal error while evaluating the run: KeyError")
        monkeypatch.undo()
        await _healthy_run(engine)

    simulate(body)


def test_a_conclusion_that_raises_fails_that_run_only() -> None:
    """A retries value the engine cannot read (``int("abc")``) raised inside the terminal hook."""

    async def body(engine: Engine, cluster: SimCluster) -> None:
        cluster.faults.fail_tasks = ("square",)
        status = await _finish(engine, await _submit(engine, square={"retries": "abc"}))
        assert status["run"]["state"] == "failed"
        assert "internal error while concluding square[" in status["run"]["error"], status["run"]
        assert "ValueError" in status["run"]["error"]
        cluster.faults.fail_tasks = ()
        await _healthy_run(engine)

    simulate(body)


def test_a_submission_that_raises_fails_its_instances_with_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = Submitter.build_request

    def broken(self: Submitter, run: Any, tr: Any, insts: Any, tag: str, *rest: Any) -> Any:
        if tr.name == "square":
            raise TypeError("request builder broke")
        return real(self, run, tr, insts, tag, *rest)

    async def body(engine: Engine, cluster: SimCluster) -> None:
        monkeypatch.setattr(Submitter, "build_request", broken)
        status = await _finish(engine, await _submit(engine))
        assert status["run"]["state"] == "failed"
        errors = {f["error"] for f in status["failures"]}
        assert any("internal error while submitting square: TypeError: request builder broke" in e for e in errors)
        assert status["cluster"]["driver"]["submit_errors"] >= 1
        monkeypatch.setattr(Submitter, "build_request", real)
        await _healthy_run(engine)

    simulate(body)


def test_an_unrecognised_scheduler_state_is_shown_and_changes_nothing() -> None:
    async def body(engine: Engine, cluster: SimCluster) -> None:
        run_id = await _submit(engine, n=1)
        cluster.faults.query_unknown = 1.0
        run = engine.runs[run_id]

        def shown() -> Any:
            make = run.tasks["make"].instances[None]
            return make.reason and "WEIRD" in make.reason and make

        make = await wait_until(shown, what="the state to be shown")
        assert "does not understand" in make.reason and "simulated unmapped state" in make.reason
        assert make.state.value in ("queued", "running", "succeeded")
        status = engine.status(run, "make")
        assert status["instances"][0]["reason"] == make.reason
        assert status["cluster"]["unrecognised_states"]["WEIRD"] >= 1
        cluster.faults.query_unknown = 0.0
        assert (await _finish(engine, run_id))["run"]["state"] == "succeeded"

    simulate(body)


def test_a_run_that_cannot_be_recovered_is_failed_with_the_reason(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite"

    async def first(engine: Engine, cluster: SimCluster) -> list[str]:
        cluster.faults.drop_job = 0.0
        ids = [await _submit(engine, n=20), await _submit(engine, n=20)]
        await engine.store.flush()
        return ids

    broken_id, fine_id = simulate(first, db=db)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE runs SET manifest=? WHERE id=?", (json.dumps({"version": 1, "tasks": "zzz"}), broken_id))

    async def second(engine: Engine, cluster: SimCluster) -> None:
        await engine.store.flush()
        rows = {r["id"]: r for r in await engine.store.list_runs()}
        assert rows[broken_id]["state"] == "failed"
        assert rows[broken_id]["error"].startswith("cannot be recovered: ManifestError"), rows[broken_id]
        assert engine.counters["unrecoverable_runs"] == 1
        assert (await _finish(engine, fine_id))["run"]["state"] in ("succeeded", "failed")

    simulate(second, db=db)


def test_the_local_scheduler_refuses_a_time_it_cannot_read(tmp_path: Path) -> None:
    """Before: the time was parsed inside the scheduler's own task, and the exception ended the daemon."""
    import anyio

    from reflow_client.manifest import Manifest, TaskManifest
    from reflowd.embedded import run_embedded

    m = Manifest(workflow="w", tasks=[TaskManifest(name="a", is_array=False, config={"time": "soon"}, dependencies=[])],
                 cli_params=[], entrypoint=str(tmp_path / "w.py"), python="python3", working_dir=str(tmp_path))
    result = anyio.run(lambda: run_embedded(m, {}, str(tmp_path), options={}, store_path=tmp_path / "s.sqlite"))
    assert result["run"]["state"] == "failed"
    failure = result["failures"][0]
    assert failure["state"] == "submit_failed" and "invalid time limit 'soon'" in failure["error"]


def test_faults_do_not_leak_between_tests() -> None:
    assert Faults().task_fails == 0.0


def test_a_backend_the_cluster_does_not_run_is_refused_clearly() -> None:
    """``backend=`` used to be ignored silently; now it must match the cluster's scheduler."""
    from reflowd.engine.engine import InvalidRequest

    async def body(engine: Engine, cluster: SimCluster) -> None:
        with pytest.raises(InvalidRequest, match="task 'square' asks for backend 'pbs', but cluster 'sim' runs sim"):
            await _submit(engine, square={"backend": "pbs"})
        assert engine.runs == {}, "nothing was recorded"
        status = await _finish(engine, await _submit(engine, n=2, square={"backend": "sim"}))
        assert status["run"]["state"] == "succeeded"

    simulate(body)
