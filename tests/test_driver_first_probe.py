"""The first submissions wait (bounded) for the cluster's first probe.

A per-user queue limit the probe reads (Grid Engine's ``max_u_jobs``, Slurm's ``MaxSubmitJobs``) must hold
from the first fan-out: a full run once saw 12 tasks queued under a limit of 4, because the fan-out was ready
150 ms before the probe answered. A probe that never answers must not hold submissions for ever either.

The real engine, store and driver on the simulated cluster (tests/sim), on virtual time: the probe's lateness
is exact, so each test is deterministic.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from reflowd.clusters import ClusterRuntime
from reflowd.engine.engine import Engine
from reflowd.engine.states import RunState
from reflowd.schedulers.base import Phase, SubmitRequest

from .sim.cluster import SimCluster, SimScheduler
from .sim.harness import START, manifest, simulate, wait_until
from .sim.quiet import quiet_logs

#: The simulated cluster's command timeout here: the first submissions wait at most twice this for the probe.
COMMAND_TIMEOUT = 60.0
#: Seconds the late probe takes: far longer than the run needs to reach its fan-out, within the bound.
PROBE_LATE = 90.0
CAP = 3


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with quiet_logs():
        yield


def slow_commands(runtime: ClusterRuntime) -> None:
    runtime.config.command_timeout = COMMAND_TIMEOUT


def queued(cluster: SimCluster) -> int:
    return sum(1 for j in cluster.jobs.values() if not j.dropped for e in j.elements.values()
               if e.phase is not Phase.DONE)


def watch_queue(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, int]]:
    """(when, how many elements are queued or running) after each submission the cluster takes."""
    seen: list[tuple[float, int]] = []
    real = SimCluster.submit

    def submit(self: SimCluster, request: SubmitRequest, now: float) -> str:
        job_id = real(self, request, now)
        seen.append((now - START, queued(self)))
        return job_id

    monkeypatch.setattr(SimCluster, "submit", submit)
    return seen


async def run_to_end(engine: Engine, n: int) -> None:
    run = await engine.submit_run(manifest(0), {"n": n}, "/sim/run", "sim", {})
    await wait_until(lambda: run.state is not RunState.RUNNING, timeout=2000.0, what="the run to end")
    assert run.state is RunState.SUCCEEDED, engine.status(run)["failures"]
    assert run.tasks["total"].instances[None].output == sum(i * i + 1 for i in range(n))


def test_a_queue_limit_the_probe_reads_late_holds_from_the_first_fan_out(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = watch_queue(monkeypatch)

    async def late_probe(self: SimScheduler) -> dict[str, Any]:
        await anyio.sleep(PROBE_LATE)
        return {"max_queued": CAP}

    monkeypatch.setattr(SimScheduler, "probe", late_probe)

    async def body(engine: Engine, cluster: SimCluster) -> dict[str, Any]:
        await run_to_end(engine, 12)
        return engine.drivers["sim"].status()

    status = simulate(body, adjust=slow_commands)
    assert seen, "nothing was submitted"
    assert max(n for _, n in seen) <= CAP, f"the queue passed the probed limit of {CAP}: {seen}"
    assert seen[0][0] >= PROBE_LATE, f"submitted at {seen[0][0]} s, before the probe answered at {PROBE_LATE} s"
    assert status["max_queued"] == CAP


def test_a_probe_that_never_answers_holds_submissions_only_for_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = watch_queue(monkeypatch)

    async def silent_probe(self: SimScheduler) -> dict[str, Any]:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    monkeypatch.setattr(SimScheduler, "probe", silent_probe)

    async def body(engine: Engine, cluster: SimCluster) -> None:
        await run_to_end(engine, 5)
        assert "max_queued" not in engine.drivers["sim"].status()

    simulate(body, adjust=slow_commands)
    bound = 2 * COMMAND_TIMEOUT
    assert seen and bound <= seen[0][0] < bound + 5.0, f"first submission at {seen[0][0]} s (bound {bound} s)"
