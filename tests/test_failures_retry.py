"""Retry policies by cause: free retries for the cluster's faults, counted ones for the task's, escalation.

The pure decision (``reflowd/engine/retry_policy.py``, ``reflow_client/retry.py``)
on its own, then the real engine, store and driver on the simulated cluster
(tests/sim, virtual time), whose elements are made to end the way a real
scheduler ends them: a time limit (the worker's SIGTERM result, then the
scheduler's TIMEOUT), out of memory, a node failure.
"""

from __future__ import annotations

from typing import Any

import pytest

from reflow_client import retry
from reflow_client.config import ConfigError, load_config
from reflow_client.resources import parse_mem, parse_time
from reflowd.engine import retry_policy
from reflowd.engine.engine import Engine
from reflowd.engine.states import RunState
from reflowd.schedulers.base import Outcome

from .sim.cluster import SimCluster
from .sim.harness import manifest, simulate, wait_until
from .sim.quiet import quiet_logs


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with quiet_logs():
        yield


RES = {"cpus": 1, "mem": "4G", "time": "00:10:00"}


def decide(cause: str, attempt: int = 1, retries: int = 0, history: list[dict[str, Any]] | None = None,
           caps: dict[str, str | None] | None = None, **policy: Any) -> retry_policy.RetryDecision:
    return retry_policy.decide(retry.merge({}, retry.check(policy)), cause={"kind": cause}, attempt=attempt,
                               retries=retries, history=history or [], resources=RES, caps=caps)


def test_node_failures_and_preemption_are_retried_without_counting_task_failures_count() -> None:
    for cause in ("node_fail", "boot_fail", "preempted"):
        d = decide(cause)
        assert d.retry and not d.counted, cause
    assert not decide("exception").retry  # retries=0: a task's own failure is not retried
    d = decide("exception", retries=1)
    assert d.retry and d.counted
    # One free retry used before: a counted retry is still available (attempt 2 failed with an exception).
    history = [{"attempt": 1, "counted": False}]
    assert decide("exception", attempt=2, retries=1, history=history).retry
    assert not decide("exception", attempt=3, retries=1, history=history + [{"attempt": 2, "counted": True}]).retry
    # Free retries are capped: a node that keeps failing must end somewhere.
    many = [{"attempt": n, "counted": False} for n in range(1, 4)]
    assert not decide("node_fail", attempt=4, history=many, max_free=3).retry
    assert not decide("cancelled", retries=5).retry


def test_escalation_multiplies_and_stops_at_the_smaller_of_the_policy_and_the_cluster_limit() -> None:
    d = decide("out_of_memory", retries=2, escalate={"mem": 2})
    assert d.resources == {"mem": "8G"}
    d = decide("out_of_memory", retries=2, escalate={"mem": 2}, max_mem="6G")
    assert d.resources == {"mem": "6G"}
    d = decide("time_limit", retries=1, escalate={"time": 3}, caps={"time": "00:20:00"})
    assert d.resources == {"time": "00:20:00"}
    d = decide("time_limit", retries=1, escalate={"time": 1.5})
    assert d.resources == {"time": "00:15:00"}
    capped = retry_policy.decide(retry.merge({}, {"escalate": {"time": 2}, "max_time": "00:10:00"}),
                                 cause={"kind": "time_limit"}, attempt=1, retries=1, history=[], resources=RES)
    assert capped.retry and capped.resources is None and "at its limit" in capped.why
    assert decide("exception", retries=1, escalate={"mem": 2}).resources is None  # only OOM grows memory
    assert parse_mem(retry_policy.escalate("mem", "1500M", 2, None)[0]) == 3000


def test_backoff_grows_by_its_factor_up_to_its_maximum() -> None:
    policy = retry.merge({"backoff": 10, "backoff_factor": 3, "backoff_max": 60}, None)
    assert [retry_policy.backoff(policy, n, 5.0, 600.0) for n in (1, 2, 3)] == [10.0, 30.0, 60.0]
    assert retry_policy.backoff(retry.merge(None, None), 2, 5.0, 600.0) == 10.0  # the daemon's default, doubled


def test_a_tasks_keys_win_over_the_clusters() -> None:
    policy = retry.merge({"free": ["node_fail"], "escalate": {"mem": 2}}, {"escalate": {"time": 2}})
    assert policy.free == {"node_fail"} and dict(policy.escalate) == {"time": 2.0}


@pytest.mark.parametrize(("policy", "message"), [
    ({"escalate": {"cpus": 2}}, "'cpus' cannot be escalated"),
    ({"escalate": {"mem": 1}}, "escalate.mem: must be above 1"),
    ({"free": ["meteor"]}, "unknown cause(s) meteor"),
    ({"max_mem": "lots"}, "max_mem: invalid memory request"),
    ({"retry": 3}, "unknown key 'retry'"),
    ("node_fail", "expected a mapping"),
])
def test_a_bad_policy_is_one_clear_error(policy: Any, message: str) -> None:
    with pytest.raises(retry.RetryPolicyError, match="retry_policy") as err:
        retry.check(policy)
    assert message in str(err.value)


def test_a_bad_cluster_policy_names_the_cluster(tmp_path: Any) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[clusters.hpc]\nscheduler = "slurm"\nretry_policy = { escalate = { mem = 0.5 } }\n')
    with pytest.raises(ConfigError, match=r"clusters\.hpc\.retry_policy\.escalate\.mem: must be above 1"):
        load_config(path)
    path.write_text('[clusters.hpc]\nscheduler = "slurm"\nretry_policy = { escalate = { time = 2 } }\n')
    assert load_config(path).clusters["hpc"].retry_policy == {"escalate": {"time": 2}}


def test_a_job_config_refuses_a_bad_policy_when_the_task_is_defined() -> None:
    from reflow.flow import JobConfig

    with pytest.raises(ValueError, match="task 'x': retry_policy.escalate"):
        JobConfig(retry_policy={"escalate": {"gpus": 2}}).check("x")
    cfg = JobConfig(retry_policy={"escalate": {"mem": 2}})
    assert cfg.to_dict()["retry_policy"] == {"escalate": {"mem": 2}}
    assert "retry_policy" not in JobConfig().to_dict() and "retry_policy" not in cfg.submit_options


# ---------------------------------------------------------------------- on the simulated cluster

def fate(monkeypatch: pytest.MonkeyPatch, rule: Any) -> list[tuple[int | None, int, str, str]]:
    """Make square's elements end as ``rule(index, attempt, request)`` says (an Outcome, or None to succeed);
    returns what each attempt was given: (index, attempt, mem, time)."""
    seen: list[tuple[int | None, int, str, str]] = []
    start, finish = SimCluster._start, SimCluster._finish

    def _start(self: SimCluster, job: Any, element: Any, now: float) -> None:
        start(self, job, element, now)
        if job.request.task != "square":
            return
        attempt = max(a for (r, t, i, a) in self.executions if t == "square" and i == element.index)
        seen.append((element.index, attempt, job.request.mem, job.request.time))
        outcome = rule(element.index, attempt, job.request)
        element.fate = outcome
        if outcome is not None:
            element.result = b'{"state": "failed", "error": "interrupted by SIGTERM", "signal": "SIGTERM"}'

    def _finish(self: SimCluster, job: Any, element: Any, now: float) -> None:
        finish(self, job, element, now)
        if getattr(element, "fate", None) is not None:
            element.outcome = element.fate

    monkeypatch.setattr(SimCluster, "_start", _start)
    monkeypatch.setattr(SimCluster, "_finish", _finish)
    return seen


async def run_to_end(engine: Engine, retries: int, n: int = 3, **square: Any) -> Any:
    m = manifest(retries)
    m.tasks[1].config.update(square)
    run = await engine.submit_run(m, {"n": n}, "/sim/run", "sim", {})
    await wait_until(lambda: run.state is not RunState.RUNNING, what="the run to end")
    return run


def test_a_time_limit_is_retried_with_more_time_and_the_cache_identity_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = fate(monkeypatch, lambda i, a, req: Outcome.TIMEOUT if parse_time(req.time) < 1200 else None)

    async def body(engine: Engine, cluster: SimCluster) -> None:
        run = await run_to_end(engine, 1, retry_policy={"escalate": {"time": 2}})
        assert run.state is RunState.SUCCEEDED, engine.status(run)["failures"]
        square = run.tasks["square"]
        for inst in square.instances.values():
            assert inst.attempt == 2 and inst.resources == {"time": "00:20:00"}
            (first,) = inst.attempts
            assert first["cause"]["kind"] == "time_limit" and first["counted"] is True
            assert first["resources"]["time"] == "00:10:00"
        view = engine.status(run, "square")["instances"][0]
        assert view["resources"]["time"] == "00:20:00"
        assert view["attempts"][0]["cause"]["text"] == "time limit reached (limit 00:10:00)"
        # The same inputs again: every element is a cache hit, so escalation did not change the identity.
        again = await run_to_end(engine, 1, retry_policy={"escalate": {"time": 2}})
        assert again.state is RunState.SUCCEEDED
        assert all(i.state.value == "cached" for i in again.tasks["square"].instances.values())

    simulate(body)
    assert sorted((a, t) for _, a, _, t in seen) == [(1, "00:10:00")] * 3 + [(2, "00:20:00")] * 3


def test_out_of_memory_escalation_is_capped_and_then_counts_down_the_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = fate(monkeypatch, lambda i, a, req: Outcome.OUT_OF_MEMORY if i == 0 else None)

    async def body(engine: Engine, cluster: SimCluster) -> None:
        run = await run_to_end(engine, 2, mem="4G", retry_policy={"escalate": {"mem": 2}, "max_mem": "12G"})
        assert run.state is RunState.FAILED
        inst = run.tasks["square"].instances[0]
        assert inst.state.value == "out_of_memory" and inst.attempt == 3
        assert [a["resources"]["mem"] for a in inst.attempts] == ["4G", "8G"]
        assert inst.resources == {"mem": "12G"}
        failure = engine.status(run)["failures"][0]
        assert failure["cause"]["text"] == "out of memory (limit 12G)"

    simulate(body)
    assert sorted(m for i, _, m, _ in seen if i == 0) == ["12G", "4G", "8G"]


def test_a_node_failure_is_retried_without_using_a_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    fate(monkeypatch, lambda i, a, req: Outcome.NODE_FAIL if a == 1 and i == 1 else None)

    async def body(engine: Engine, cluster: SimCluster) -> None:
        run = await run_to_end(engine, 0)
        assert run.state is RunState.SUCCEEDED
        inst = run.tasks["square"].instances[1]
        assert inst.attempt == 2 and inst.attempts[0]["counted"] is False
        assert inst.attempts[0]["cause"]["kind"] == "node_fail"

    simulate(body)


def test_free_retries_end_at_max_free(monkeypatch: pytest.MonkeyPatch) -> None:
    fate(monkeypatch, lambda i, a, req: Outcome.PREEMPTED if i == 2 else None)

    async def body(engine: Engine, cluster: SimCluster) -> None:
        run = await run_to_end(engine, 0, retry_policy={"max_free": 2})
        assert run.state is RunState.FAILED
        inst = run.tasks["square"].instances[2]
        assert inst.attempt == 3 and [a["counted"] for a in inst.attempts] == [False, False]
        assert engine.status(run)["failures"][0]["cause"]["kind"] == "preempted"

    simulate(body)
