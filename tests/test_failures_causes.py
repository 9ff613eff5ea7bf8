"""Why each failed instance ended: causes built from the scheduler's and the worker's evidence, and shown.

Pure functions (``reflowd/engine/causes.py``, ``decide.py``, ``views.py``,
``reflow_client/render.py``) on hand-made observations and result files in
the formats the adapters produce (Slurm's ``EXIT:SIGNAL`` exit codes,
``CANCELLED by UID``), then the stored schema upgrade that keeps them.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from reflow_client.client import InstanceStatus
from reflow_client.render import failure_lines, instance_lines
from reflowd.engine import causes, decide, views
from reflowd.engine.model import Instance
from reflowd.engine.states import State
from reflowd.schedulers import slurm_commands as sc
from reflowd.schedulers.base import Observation, Outcome, Phase, Presence
from reflowd.store import INSTANCES, SCHEMA_VERSION

from .support import open_and_close_store


def done(outcome: Outcome, native: str, reason: str | None = None, exit_code: str | None = None,
         node: str | None = None) -> Observation:
    return Observation(Presence.PRESENT, Phase.DONE, outcome, native, reason, exit_code, node=node)


def inst(state: State = State.RUNNING, **kw: object) -> Instance:
    i = Instance(run_id="r", task="t", index=3, state=state, job_key="42_3", **kw)  # type: ignore[arg-type]
    return i


@pytest.mark.parametrize(("obs", "kind", "text"), [
    (done(Outcome.TIMEOUT, "TIMEOUT", exit_code="0:0", node="n1"), "time_limit",
     "time limit reached (limit 00:01:00) on node n1"),
    (done(Outcome.OUT_OF_MEMORY, "OUT_OF_MEMORY", exit_code="0:125"), "out_of_memory", "out of memory (limit 2G)"),
    (done(Outcome.NODE_FAIL, "NODE_FAIL", node="c7"), "node_fail", "node failure on node c7"),
    (done(Outcome.BOOT_FAIL, "BOOT_FAIL"), "boot_fail", "the node failed to boot"),
    (done(Outcome.PREEMPTED, "PREEMPTED"), "preempted", "preempted by the scheduler"),
    (done(Outcome.CANCELLED, "CANCELLED by 1000"), "cancelled", "cancelled by 1000"),
    (done(Outcome.FAILED, "FAILED", "NonZeroExitCode", "3:0"), "exit_code", "exited with code 3"),
    (done(Outcome.FAILED, "FAILED", exit_code="0:9"), "signal", "killed by SIGKILL"),
])
def test_a_finished_job_without_result_gets_the_schedulers_cause(obs: Observation, kind: str, text: str) -> None:
    decision = decide.from_observation(inst(), obs, 1000.0, decide.Timing(result_grace=0.0))
    assert decision is not None and decision.state is not None
    cause = decision.fields["cause"]
    assert cause["kind"] == kind
    assert causes.describe(cause, {"time": "00:01:00", "mem": "2G"}) == text


def test_a_signalled_result_explained_by_the_scheduler_is_a_time_limit_with_the_checkpoint_kept() -> None:
    result = {"state": "failed", "error": "interrupted by SIGTERM", "signal": "SIGTERM", "checkpoint": "ckpt/3.pkl"}
    decision = decide.from_result(inst(), result, done(Outcome.TIMEOUT, "TIMEOUT"))
    assert decision.state is State.TIMEOUT
    assert decision.fields["cause"]["kind"] == "time_limit"
    assert decision.fields["cause"]["checkpoint"] == "ckpt/3.pkl"


def test_a_task_exception_and_an_unexplained_signal_are_told_apart() -> None:
    raised = decide.from_result(inst(), {"state": "failed", "error": "ValueError: bad input"}, None)
    assert raised.fields["cause"] == {"kind": "exception", "source": "worker", "exception": "ValueError"}
    assert causes.describe(raised.fields["cause"]) == "the task raised ValueError"
    killed = decide.from_result(inst(), {"state": "failed", "error": "interrupted", "signal": "SIGTERM"}, None)
    assert killed.state is State.FAILED and causes.describe(killed.fields["cause"]) == "killed by SIGTERM"


def test_a_lost_job_says_so() -> None:
    i = inst(State.QUEUED)
    timing = decide.Timing(lost_after=1, lost_grace=0.0)
    decision = decide.from_observation(i, Observation.absent(), 100.0, timing)
    assert decision is not None and decision.state is State.FAILED
    assert decision.fields["cause"]["kind"] == "lost"


def test_instances_without_a_recorded_cause_get_one_from_their_state() -> None:
    assert causes.infer("timeout") == {"kind": "time_limit"}
    assert causes.infer("failed", "lost: the scheduler no longer knows job 4") == {"kind": "lost"}
    assert causes.infer("failed", "KeyError: 'x'")["exception"] == "KeyError"  # type: ignore[index]
    assert causes.infer("succeeded") is None
    assert causes.split_exit_code("0:15") == (0, 15) and causes.split_exit_code("2") == (2, None)


def test_status_shows_the_cause_with_the_attempts_limit_and_earlier_attempts() -> None:
    i = inst(State.TIMEOUT, attempt=2, cause={"kind": "time_limit", "source": "scheduler"},
             resources={"time": "00:02:00"},
             attempts=[{"attempt": 1, "state": "timeout", "cause": {"kind": "time_limit"},
                        "resources": {"cpus": 1, "mem": "1G", "time": "00:01:00"}, "counted": True, "job_id": "41"}])
    view = views.instance_view(i, full=True, config={"time": "00:01:00", "mem": "1G", "cpus": 1})
    assert view["resources"] == {"cpus": 1, "mem": "1G", "time": "00:02:00"}
    assert view["cause"]["text"] == "time limit reached (limit 00:02:00)"
    assert view["attempts"][0]["cause"]["text"] == "time limit reached (limit 00:01:00)"
    lines = failure_lines(InstanceStatus(**view))
    assert "    cause: time limit reached (limit 00:02:00)" in lines
    assert any("earlier attempt 1: time limit reached (limit 00:01:00) [mem 1G, time 00:01:00]" in line
               for line in lines), lines
    assert "time limit reached" in instance_lines([InstanceStatus(**view)])[0]
    ok = views.instance_view(inst(State.SUCCEEDED), full=False, config={})
    assert "cause" not in ok and "attempts" not in ok


def test_status_of_a_task_shows_why_a_succeeded_instance_took_more_than_one_attempt() -> None:
    earlier = [{"attempt": n, "state": "failed", "cause": {"kind": "node_fail", "node": "c7"}, "resources": {},
                "counted": False, "job_id": str(40 + n)} for n in range(1, 6)]
    i = inst(State.SUCCEEDED, attempt=6, attempts=earlier)
    lines = instance_lines([InstanceStatus(**views.instance_view(i, full=True, config={}))])
    assert "succeeded" in lines[0] and "attempt=6" in lines[0]
    assert [line.split(":")[0].strip() for line in lines[1:4]] == [
        "earlier attempt 3", "earlier attempt 4", "earlier attempt 5"]
    assert all("not counted against retries" in line for line in lines[1:4]), lines
    assert lines[4].strip() == "... and 2 earlier attempt(s) (--json lists all)"
    assert len(instance_lines([InstanceStatus(**views.instance_view(inst(State.SUCCEEDED), full=True, config={}))])) == 1


def test_sacct_lines_carry_the_node_of_a_finished_job() -> None:
    out = sc.parse_sacct("42_3|rfab|NODE_FAIL|0:0|None|c7\n42_4|rfab|RUNNING|0:0|None|c8\n43|rfcd|FAILED|1:0|None|None assigned\n")
    assert out["42_3"].node == "c7" and out["42_3"].outcome is Outcome.NODE_FAIL
    assert out["42_4"].node is None  # only a finished job's node is kept (a running one changes nothing)
    assert out["43"].node is None
    assert "NodeList" in sc.SACCT_FIELDS


def test_a_schema_2_database_is_upgraded_keeping_its_instances(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"

    open_and_close_store(path)
    # Make it look like a schema-2 database: no cause/resources/attempts columns.
    with sqlite3.connect(path) as db:
        cols = [r[1] for r in db.execute("PRAGMA table_info(instances)")]
        keep = [c for c in cols if c not in ("cause", "resources", "attempts", "alone")]
        db.executescript(
            f"CREATE TABLE old AS SELECT {', '.join(keep)} FROM instances; DROP TABLE instances; "
            f"ALTER TABLE old RENAME TO instances; UPDATE meta SET value='2' WHERE key='schema_version';"
            f"INSERT INTO instances (run_id, task, idx, state, attempt, updated_at) VALUES ('r', 't', -1, 'failed', 1, 0);"
        )
    open_and_close_store(path)
    with sqlite3.connect(path) as db:
        cols = {r[1] for r in db.execute("PRAGMA table_info(instances)")}
        assert {"cause", "resources", "attempts"} <= cols
        assert set(INSTANCES.names) <= cols
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
        assert db.execute("SELECT count(*) FROM instances").fetchone()[0] == 1


def test_the_walltime_warning_signal_is_a_time_limit_cause_so_escalation_applies() -> None:
    result = {"state": "failed", "error": "interrupted by SIGUSR1", "signal": "SIGUSR1"}
    decision = decide.from_result(inst(), result, done(Outcome.FAILED, "FAILED", exit_code="138:0"))
    assert decision.state is State.FAILED
    cause = decision.fields["cause"]
    assert cause["kind"] == "time_limit" and cause["warning"] is True
    assert causes.describe(cause, {"time": "01:00:00"}) == \
        "stopped at the time limit's warning (SIGUSR1) (limit 01:00:00)"


def test_a_memory_error_in_the_task_is_out_of_memory_so_memory_escalation_applies() -> None:
    """Grid Engine's h_vmem (an address-space rlimit) makes an allocation fail instead of killing the job."""
    inst_ = inst()
    d = decide.from_result(inst_, {"state": "failed", "error": "MemoryError: ", "traceback": "..."},
                           done(Outcome.FAILED, "finished", "exit status 1", "1"))
    assert d.state is State.OUT_OF_MEMORY
    assert d.fields["cause"] == {"kind": "out_of_memory", "source": "worker", "exception": "MemoryError"}
    assert causes.describe(d.fields["cause"], {"mem": "250M"}) == \
        "out of memory (limit 250M): an allocation failed (MemoryError)"
    assert causes.from_result({"error": "MemoryError"})["kind"] == "out_of_memory"
    assert causes.from_result({"error": "ValueError: MemoryError"})["kind"] == "exception"


def test_the_queues_own_limits_cap_escalation() -> None:
    from reflowd.engine.retry_policy import caps_from_probe, queue_of

    probe = {"max_time": "2-00:00:00", "max_mem": None,
             "queue_caps": {"short.q": {"max_time": "00:00:40", "max_mem": "1024M"}}}
    assert caps_from_probe(probe, "short.q") == {"time": "00:00:40", "mem": "1024M"}
    assert caps_from_probe(probe, "other.q") == {"time": "2-00:00:00", "mem": None}
    assert caps_from_probe(probe) == {"time": "2-00:00:00", "mem": None}
    assert queue_of({"partition": "all.q"}, {"queue": "short.q"}) == "short.q"
    assert queue_of({"partition": "all.q"}, None) == "all.q" and queue_of(None, {}) is None
