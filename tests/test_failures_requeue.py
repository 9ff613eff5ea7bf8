"""A job the scheduler requeues is followed through its restarts, and its interrupted run's result is never
taken for the attempt's outcome.

The real engine, store and driver on the simulated cluster (tests/sim, virtual
time). The simulated scheduler requeues one element as Slurm's ``scontrol
requeue`` does: the running worker is signalled (and writes a failed result
naming the signal), the job is queued again under the same id, starts again
and overwrites the result. Either the observer sees it queued in between, or
(a quick restart) only sees it running again for longer than results are held.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from reflow_client import jobfiles
from reflowd.engine.engine import Engine
from reflowd.engine.states import RunState, State

from .sim.cluster import SimCluster
from .sim.harness import manifest, simulate, wait_until
from .sim.quiet import quiet_logs


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with quiet_logs():
        yield


def requeue_once(monkeypatch: pytest.MonkeyPatch, index: int, queued_for: float, second_run: float) -> dict[str, Any]:
    info: dict[str, Any] = {"requeued_at": None, "starts": 0}
    start, finish = SimCluster._start, SimCluster._finish

    def _start(self: SimCluster, job: Any, element: Any, now: float) -> None:
        if job.request.task == "square" and element.index == index and info["requeued_at"] is not None:
            if now - info["requeued_at"] < queued_for:
                self.requeue(job, element)  # still waiting in the queue after the requeue
                return
        start(self, job, element, now)
        if job.request.task == "square" and element.index == index:
            info["starts"] += 1
            element.ends_at = now + (30.0 if info["starts"] == 1 else second_run)

    def _finish(self: SimCluster, job: Any, element: Any, now: float) -> None:
        if job.request.task == "square" and element.index == index and info["starts"] == 1:
            # scontrol requeue: the worker is signalled and writes its failed result; the job is queued again.
            self.fs[jobfiles.result_path(job.request.job_dir, element.index)] = json.dumps(
                {"state": "failed", "error": "interrupted by SIGTERM", "signal": "SIGTERM", "host": "sim",
                 "pid": 100, "started_at": now - 30, "ended_at": now}).encode()
            self.requeue(job, element)
            info["requeued_at"] = now
            info["starts"] = 1.5
            return
        finish(self, job, element, now)

    monkeypatch.setattr(SimCluster, "_start", _start)
    monkeypatch.setattr(SimCluster, "_finish", _finish)
    return info


@pytest.mark.parametrize(("queued_for", "second_run"), [(20.0, 5.0), (0.0, 90.0)],
                         ids=["seen-queued", "restarted-at-once"])
def test_a_requeued_job_is_followed_and_its_attempt_counted_once(monkeypatch: pytest.MonkeyPatch, queued_for: float,
                                                                  second_run: float) -> None:
    info = requeue_once(monkeypatch, 1, queued_for, second_run)
    changes: list[tuple[str, str]] = []
    real = Engine.transition

    def transition(self: Engine, run: Any, inst: Any, new: State, evidence: dict[str, Any], **fields: Any) -> bool:
        if inst.task == "square" and inst.index == 1:
            changes.append((inst.state.value, new.value))
        return real(self, run, inst, new, evidence, **fields)

    monkeypatch.setattr(Engine, "transition", transition)

    async def body(engine: Engine, cluster: SimCluster) -> None:
        run = await engine.submit_run(manifest(0), {"n": 4}, "/sim/run", "sim", {})
        await wait_until(lambda: run.state is not RunState.RUNNING, what="the run to end")
        assert run.state is RunState.SUCCEEDED, [(f["error"], f["reason"], f.get("cause")) for f in engine.status(run)["failures"]]
        inst = run.tasks["square"].instances[1]
        assert inst.attempt == 1 and inst.output == 1 and not inst.attempts
        assert run.tasks["total"].instances[None].output == sum(i * i + 1 for i in range(4))

    simulate(body)
    assert info["starts"] == 2.5, "the element ran twice: once interrupted by the requeue, once to the end"
    assert not any(new in ("failed", "timeout", "cancelled") for _, new in changes), changes
    if queued_for:
        assert ("running", "queued") in changes, changes  # the requeue was seen and followed
