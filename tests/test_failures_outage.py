"""Scheduler outages: nothing is failed, the cluster shows degraded, probes back off, everything resumes.

The circuit breaker (``reflowd/driver/health.py``) on its own, then the real
engine, store and driver on the simulated cluster (tests/sim, virtual time)
while every scheduler command fails for two minutes in the middle of a run.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from reflow_client.client import RunStatus
from reflow_client.render import format_status
from reflowd.driver.health import ClusterHealth
from reflowd.engine.engine import Engine
from reflowd.engine.states import RunState

from .sim.cluster import Faults, SimCluster, SimScheduler
from .sim.harness import manifest, simulate, wait_until
from .sim.quiet import quiet_logs


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with quiet_logs():
        yield


def test_the_breaker_opens_after_repeated_failures_backs_off_and_closes_on_success() -> None:
    h = ClusterHealth(threshold=2, base=5.0, maximum=40.0)
    assert not h.failed(1000.0, 0.0, "query", "squeue: Unable to contact slurm controller")
    assert not h.degraded and h.allows(0.0)
    assert h.failed(1010.0, 10.0, "query", "timed out")
    assert h.degraded and not h.allows(14.9) and h.allows(15.0)
    h.failed(1015.0, 15.0, "submit", "timed out")
    assert h.interval() == 10.0 and not h.allows(24.0) and h.allows(25.0)
    for n in range(10):
        h.failed(1100.0 + n, 100.0 + n, "query", "down")
    assert h.interval() == 40.0  # capped: a scheduler that is down is still probed now and then
    view = h.to_dict(100.0)
    assert view["state"] == "degraded" and view["since"] == 1000.0 and view["last_error"] == "down"
    assert h.succeeded(2000.0)
    assert not h.degraded and h.allows(0.0) and h.to_dict(0.0)["state"] == "ok"
    assert h.to_dict(0.0)["degraded_episodes"] == 1 and h.to_dict(0.0)["recovered_at"] == 2000.0


def test_status_text_says_the_cluster_is_degraded_and_since_when() -> None:
    raw = {"run": {"id": "r1", "workflow": "w", "state": "running", "cluster": "hpc", "run_dir": "/x",
                   "created_at": 0.0, "updated_at": 0.0, "ended_at": None, "error": None, "params": {}, "options": {}},
           "tasks": [], "failures": [],
           "cluster": {"scheduler_health": {"state": "degraded", "since": 1_700_000_000.0, "failed_command": "query",
                                            "last_error": "squeue: error: Unable to contact slurm controller",
                                            "failures": 4, "next_probe_in": 20.0}}}
    text = format_status(RunStatus.from_dict(raw), width=200)
    assert "DEGRADED since" in text and "Unable to contact slurm controller" in text
    assert "jobs are not failed meanwhile" in text


def test_a_two_minute_scheduler_outage_fails_nothing_and_polls_rarely(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[float, str]] = []
    clock: dict[str, Any] = {}
    for name in ("query", "submit", "find_tags", "cancel"):
        real = getattr(SimScheduler, name)

        def counted(self: SimScheduler, *a: Any, _real: Any = real, _name: str = name) -> Any:
            calls.append((self.clock(), _name))
            return _real(self, *a)

        monkeypatch.setattr(SimScheduler, name, counted)

    async def body(engine: Engine, cluster: SimCluster) -> None:
        cluster.slots = 1  # slow enough that jobs are queued and running through the whole outage
        m = manifest(0)
        run = await engine.submit_run(m, {"n": 40}, "/sim/run", "sim", {})
        square = run.tasks["square"]
        await wait_until(lambda: square.expanded and square.counts.get("queued", 0) >= 20, what="jobs in the queue")
        down = Faults(query_fails=1.0, submit_fails=1.0, find_fails=1.0, cancel_fails=1.0)
        cluster.faults = down
        start = cluster_now = calls[-1][0] if calls else 0.0
        seen: list[dict[str, Any]] = []
        with anyio.move_on_after(120):
            while True:
                seen.append(engine.status(run)["cluster"]["scheduler_health"])
                await anyio.sleep(1)
        cluster.faults = Faults()
        clock["outage"] = (start, start + 120)
        await wait_until(lambda: run.state is not RunState.RUNNING, what="the run to end")
        assert run.state is RunState.SUCCEEDED, engine.status(run)["failures"]
        assert all(i.attempt == 1 for t in run.tasks.values() for i in t.instances.values()), "no false failure"
        degraded = [h for h in seen if h["state"] == "degraded"]
        assert len(degraded) > 60, "the cluster showed degraded for most of the outage"
        assert "simulated" in degraded[-1]["last_error"]
        assert engine.status(run)["cluster"]["scheduler_health"]["state"] == "ok"
        assert run.tasks["total"].instances[None].output == sum(i * i + 1 for i in range(40))
        del cluster_now

    simulate(body)
    lo, hi = clock["outage"]
    during = [c for c in calls if lo + 30 <= c[0] < hi]
    # While degraded the breaker (and the poll policy) let through a few calls a minute, never a stream.
    assert len(during) <= 20, during
