"""A requeue's stale result stays stale across a daemon restart.

When a running job is requeued, its interrupted run may have left a result file (the worker, signalled, writes a
failed result) which only the next run overwrites. reflow remembers that result as *stale* (``requeue.py``). Here
the daemon restarts while the job's next run is running: the restarted daemon finds the old file still there, and
when the next run ends its result is a few seconds late (a shared file system's lag). A daemon that forgot the
stale mark concludes from the old result and fails the element; the mark, kept in the job directory, prevents it.

The real engine, store and driver on the simulated cluster (tests/sim), in two lives on one store.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from reflow_client import jobfiles
from reflowd import world
from reflowd.engine.engine import Engine
from reflowd.engine.states import RunState, State

from .sim.cluster import Faults, SimCluster
from .sim.harness import START, engine_life, manifest, scratch_dir, wait_until
from .sim.loop import VirtualLoop, abandon, deterministic_anyio
from .sim.quiet import quiet_logs


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with quiet_logs():
        yield


def lives(cluster: SimCluster, db: Path, *bodies: Any) -> list[Any]:
    """Run ``await body(engine, cluster)`` in one daemon life each, on one store and one cluster (time goes on)."""
    results = []
    clock = START
    ids = random.Random(7)
    for body in bodies:
        loop = VirtualLoop(start=clock)
        world.install(world.World(now=lambda loop=loop: loop.virtual, monotonic=lambda loop=loop: loop.virtual,
                                  token_hex=lambda n: f"{ids.getrandbits(8 * n):0{2 * n}x}"))
        try:
            with deterministic_anyio():
                results.append(loop.run_until_complete(engine_life(db, cluster, loop, body)))
        finally:
            clock = loop.virtual + 5.0  # the daemon is down for a moment
            world.install(None)
            abandon(loop)
    return results


def test_a_requeued_runs_stale_result_is_never_taken_after_a_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    index = 1
    info: dict[str, Any] = {"starts": 0, "requeued_at": None}
    start, finish = SimCluster._start, SimCluster._finish

    def _start(self: SimCluster, job: Any, element: Any, now: float) -> None:
        mine = job.request.task == "square" and element.index == index
        if mine and info["requeued_at"] is not None and now - info["requeued_at"] < 20.0:
            self.requeue(job, element)  # still waiting in the queue after the requeue
            return
        start(self, job, element, now)
        if mine:
            info["starts"] += 1
            element.ends_at = now + (30.0 if info["starts"] == 1 else 60.0)

    def _finish(self: SimCluster, job: Any, element: Any, now: float) -> None:
        if job.request.task == "square" and element.index == index:
            if info["starts"] == 1:  # scontrol requeue: the signalled worker leaves its result; queued again
                self.fs[jobfiles.result_path(job.request.job_dir, element.index)] = json.dumps(
                    {"state": "failed", "error": "interrupted by SIGTERM", "signal": "SIGTERM", "host": "sim",
                     "pid": 100, "started_at": now - 30, "ended_at": now}).encode()
                self.requeue(job, element)
                info["requeued_at"] = now
                return
            # The next run ends; its result shows up 5 s late (the job is already DONE by then).
            finish(self, job, element, now)
            if element.result is None:  # written at once: hold it back instead
                path = jobfiles.result_path(job.request.job_dir, element.index)
                element.result = self.fs.pop(path)
            element.result_at = now + 5.0
            if (job, element) not in self._held:
                self._held.append((job, element))
            return
        finish(self, job, element, now)

    monkeypatch.setattr(SimCluster, "_start", _start)
    monkeypatch.setattr(SimCluster, "_finish", _finish)
    seen: list[tuple[str, str]] = []
    real = Engine.transition

    def transition(self: Engine, run: Any, inst: Any, new: State, evidence: dict[str, Any], **fields: Any) -> bool:
        if inst.task == "square" and inst.index == index:
            seen.append((inst.state.value, new.value))
        return real(self, run, inst, new, evidence, **fields)

    monkeypatch.setattr(Engine, "transition", transition)

    async def first(engine: Engine, cluster: SimCluster) -> str:
        run = await engine.submit_run(manifest(0), {"n": 4}, "/sim/run", "sim", {})
        # The requeue is seen (running -> queued), then the next run starts: the daemon stops there.
        await wait_until(lambda: ("running", "queued") in seen and info["starts"] == 2
                         and run.tasks["square"].instances[index].state is State.RUNNING, what="the next run")
        return run.id

    async def second(engine: Engine, cluster: SimCluster) -> None:
        run = next(r for r in engine.runs.values())
        await wait_until(lambda: run.state is not RunState.RUNNING, what="the run to end")
        assert run.state is RunState.SUCCEEDED, [(f["error"], f.get("cause")) for f in engine.status(run)["failures"]]
        inst = run.tasks["square"].instances[index]
        assert inst.attempt == 1 and inst.output == 1 and not inst.attempts

    cluster = SimCluster(random.Random(3), Faults())
    with scratch_dir() as tmp:
        lives(cluster, Path(tmp) / "sim.sqlite", first, second)
    assert info["starts"] == 2
    assert not any(new in ("failed", "timeout", "cancelled") for _, new in seen), seen
