"""reflowd driving every workload manager in the registry (tests/cluster/wlm.py) through the same tests.

Real Slurm (with and without accounting) and real Grid Engine; a system is
added to every test here by registering it there. A test that needs something
not every system has takes only the entries that have it (``envs(feature)``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from reflow_client.client import InvalidParamsError

from .cluster.fixtures_ssh import SSHServer
from .cluster.wlm import WLM, cluster_table, envs
from .support import ROOT, DaemonProcess, wait_for

EXAMPLE = ROOT / "examples" / "etl.py"
SLURMY = ROOT / "tests" / "engine_workflows" / "slurmy.py"
COUNTING = ROOT / "tests" / "engine_workflows" / "counting.py"

ALL = pytest.mark.parametrize("wlm_name", envs(), indirect=True)


def having(feature: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("wlm_name", envs(feature), indirect=True)


POLL = {"min_poll_interval": 1, "poll_interval": 2, "max_poll_interval": 10, "lost_grace": 20}


def config(wlm: WLM, options: dict[str, Any] | None = None) -> str:
    table = wlm.table(options, python=sys.executable, **POLL)
    return '[defaults]\ncluster = "hpc"\n\n' + cluster_table("hpc", table)


def start_daemon(wlm: WLM, base: Path, options: dict[str, Any] | None = None,
                 extra_env: dict[str, str] | None = None) -> DaemonProcess:
    d = DaemonProcess(base, config=config(wlm, options), env=wlm.daemon_env())
    d.start(extra_env=extra_env)
    return d


@pytest.fixture
def daemon(wlm: WLM, tmp_path: Path):
    d = start_daemon(wlm, tmp_path / "d")
    yield d
    kill(d)


def kill(d: DaemonProcess) -> None:
    if d.proc is not None and d.proc.poll() is None:
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(timeout=30)


def submit(d: DaemonProcess, workflow: Path, run_dir: Path | str, *args: str, cluster: str | None = None) -> str:
    extra = ["--cluster", cluster] if cluster else []
    out = d.cli("submit", str(workflow), "--run-dir", str(run_dir), "--no-daemon", "--json", *extra, *args,
                check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["run_id"]


def status(d: DaemonProcess, run_id: str, task: str | None = None):
    with d.client() as c:
        return c.status(run_id, task)


def wait_state(d: DaemonProcess, run_id: str, states: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
               timeout: float = 300) -> str:
    return wait_for(lambda: (s := status(d, run_id).state) in states and s, timeout=timeout, interval=0.5,
                    what=f"run {run_id} to reach {states}")


def executions(run_dir: Path) -> Counter[str]:
    path = run_dir / "executions.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return Counter(line.split(" pid=")[0] for line in lines)


def started_work(run_dir: Path, at_least: int = 1) -> bool:
    return sum(n for label, n in executions(run_dir).items() if label.startswith("work")) >= at_least


def job_of(d: DaemonProcess, run_id: str, task: str) -> str:
    return wait_for(lambda: next((i.job_id for i in status(d, run_id, task).instances or [] if i.job_id), None),
                    timeout=120, what=f"{task}'s job id")


# ---------------------------------------------------------------------- the README pipeline


def check_readme_pipeline(d: DaemonProcess, wlm: WLM, run_id: str, run_dir: Path, cluster: str) -> dict[str, Any]:
    assert wait_state(d, run_id) == "succeeded", status(d, run_id).raw
    st = status(d, run_id, "summarise")
    assert {t.name: t.counts for t in st.tasks}["summarise"] == {"succeeded": 100}
    array_ids = {i.job_id.split("_")[0] for i in st.instances or [] if i.job_id}
    assert len(array_ids) == 1, f"all 100 elements belong to one array job: {array_ids}"
    with d.client() as c:
        stats = c.stats()["clusters"][cluster]
    assert stats["calls"]["submit"] == 3, f"extract + one array batch + merge, not one per element: {stats['calls']}"
    assert json.loads((run_dir / "report.json").read_text())["summary"]["chunks"] == 100
    logs = d.cli("logs", run_id, "summarise", "--index", "7")
    assert logs.returncode == 0 and "chunk-0007.txt" in logs.stdout, logs.stdout + logs.stderr
    wlm.tags_used_once()
    return stats


@ALL
def test_readme_pipeline_fans_out_as_one_array_job(daemon: DaemonProcess, wlm: WLM, tmp_path: Path) -> None:
    run_dir = tmp_path / "etl"
    run_id = submit(daemon, EXAMPLE, run_dir, "--chunks", "100", "--rows", "200")
    stats = check_readme_pipeline(daemon, wlm, run_id, run_dir, "hpc")
    assert stats["scheduler"] == wlm.env.scheduler
    assert stats["scheduler_stats"].get("max_array_size"), "the probe's facts are shown in stats"


@having("ssh")
def test_readme_pipeline_through_ssh(wlm: WLM, sshd: SSHServer, tmp_path: Path) -> None:
    workdir = tmp_path / "remote-scratch"
    workdir.mkdir()
    table = {k: v for k, v in wlm.table(python=sys.executable, workdir=str(workdir), **POLL).items()
             if k != "scheduler"}
    d = DaemonProcess(tmp_path / "d", config='[defaults]\ncluster = "local"\n\n'
                      + sshd.config_table("remote", scheduler=wlm.env.scheduler, **table), env=wlm.daemon_env())
    d.start()
    try:
        run_id = submit(d, EXAMPLE, "etl", "--chunks", "100", "--rows", "200", cluster="remote")
        assert status(d, run_id).run.run_dir == str(workdir / "etl"), "a relative run dir goes under the workdir"
        stats = check_readme_pipeline(d, wlm, run_id, workdir / "etl", "remote")
        assert stats["transport"].startswith("ssh:") and stats["health"]["reachable"]
        transport = stats["transport_stats"]
        assert transport["connects"] == 1, "one pooled connection for the whole run"
        assert transport["sftp_ops"] > 100, "job files and results went through SFTP"
        # Commands: 3 submissions, the probe's few, and a bounded number per status query -- not one per element.
        calls = stats["calls"]
        assert transport["commands"] < 3 + 6 + 2 * calls.get("query", 0) + calls.get("find_tags", 0) + 5, transport
    finally:
        kill(d)


# ---------------------------------------------------------------------- failures


@ALL
def test_task_that_raises_is_failed_with_traceback(daemon: DaemonProcess, tmp_path: Path) -> None:
    run_id = submit(daemon, SLURMY, tmp_path / "raise", "--mode", "raise", "--n", "2")
    assert wait_state(daemon, run_id) == "failed"
    st = status(daemon, run_id)
    failure = next(f for f in st.failures if f.task == "victim")
    assert failure.state == "failed"
    assert "RuntimeError: victim raised on purpose" in (failure.error or "")
    assert "Traceback" in (failure.traceback or "")
    assert failure.job_id


@ALL
def test_failing_element_fails_alone_and_retry_reruns_only_it(daemon: DaemonProcess, wlm: WLM, tmp_path: Path) -> None:
    run_dir = tmp_path / "element"
    run_id = submit(daemon, COUNTING, run_dir, "--n", "6", "--fail-on", "3")
    assert wait_state(daemon, run_id) == "failed"
    work = {i.index: i for i in status(daemon, run_id, "work").instances or []}
    assert work[3].state == "failed" and "ValueError: bad input 3" in (work[3].error or ""), work[3]
    assert all(work[i].state == "succeeded" for i in (0, 1, 2, 4, 5))
    assert {t.name: t.counts for t in status(daemon, run_id).tasks}["total"] == {"upstream_failed": 1}
    (run_dir / "fixed").write_text("")
    daemon.cli("retry", run_id, check=True)
    assert wait_state(daemon, run_id) == "succeeded", status(daemon, run_id).raw
    counts = executions(run_dir)
    assert counts["work 3"] == 2 and counts["total"] == 1
    assert all(counts[f"work {i}"] == 1 for i in (0, 1, 2, 4, 5)), counts
    wlm.tags_used_once()


@ALL
def test_job_killed_from_outside_is_reported_cancelled(daemon: DaemonProcess, wlm: WLM, tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    run_id = submit(daemon, SLURMY, run_dir, "--mode", "sleep", "--n", "1")
    wait_for(lambda: (run_dir / "victim.pid").exists(), timeout=180, what="victim to start")
    wlm.kill_job(job_of(daemon, run_id, "victim"))
    assert wait_state(daemon, run_id) in ("failed", "cancelled")
    victim = status(daemon, run_id, "victim").instances[0]  # type: ignore[index]
    assert victim.state == "cancelled", victim
    assert wlm.env.cancelled_reason in (victim.reason or ""), victim


@ALL
def test_killed_worker_process(daemon: DaemonProcess, wlm: WLM, tmp_path: Path) -> None:
    run_dir = tmp_path / "kill"
    run_id = submit(daemon, SLURMY, run_dir, "--mode", "sleep", "--n", "1")
    pid = int(wait_for(lambda: (run_dir / "victim.pid").exists() and (run_dir / "victim.pid").read_text(),
                       timeout=180, what="victim to start"))
    os.kill(pid, signal.SIGKILL)
    assert wait_state(daemon, run_id) in ("failed", "cancelled")
    victim = status(daemon, run_id, "victim").instances[0]  # type: ignore[index]
    assert victim.state == wlm.env.worker_kill_state, victim
    assert victim.error and victim.reason != "lost", "the scheduler's own record explains the end"


@pytest.mark.slow
@having("time_limit")
def test_time_limit_exceeded_is_timeout(daemon: DaemonProcess, tmp_path: Path) -> None:
    run_id = submit(daemon, SLURMY, tmp_path / "timeout", "--mode", "sleep", "--n", "1")
    assert wait_state(daemon, run_id, timeout=400) == "failed"
    victim = status(daemon, run_id, "victim").instances[0]  # type: ignore[index]
    assert victim.state == "timeout", victim
    assert "TIMEOUT" in (victim.reason or "")


@ALL
def test_cancelled_run_stops_its_jobs(daemon: DaemonProcess, wlm: WLM, tmp_path: Path) -> None:
    run_dir = tmp_path / "cancel"
    run_id = submit(daemon, COUNTING, run_dir, "--n", "4", "--delay", "300")
    wait_for(lambda: started_work(run_dir), timeout=180, what="elements to start")
    out = daemon.cli("cancel", run_id)
    assert out.returncode == 0, out.stderr
    assert wait_state(daemon, run_id, timeout=120) == "cancelled"
    job_ids = {i.job_id.split("_")[0] for i in status(daemon, run_id, "work").instances or [] if i.job_id}
    assert job_ids
    wait_for(lambda: not wlm.live_jobs(job_ids), timeout=120, what="the cancel to end the array job")
    assert "total" not in executions(run_dir)


# ---------------------------------------------------------------------- refusals


@ALL
def test_unknown_option_is_refused_before_submission(daemon: DaemonProcess, wlm: WLM, tmp_path: Path) -> None:
    from reflow.loader import load_workflow

    wf = load_workflow(SLURMY)
    manifest = wf.describe()
    manifest["tasks"][0]["config"]["submit_options"] = {"partiton": "debug"}
    with daemon.client() as c, pytest.raises(InvalidParamsError) as info:
        c.submit(manifest, wf.resolve_parameters({}), str(tmp_path / "opt"))
    assert "partiton" in info.value.message and "partition" in info.value.message, info.value.message
    with daemon.client() as c:
        assert c.runs() == []


@ALL
def test_nonexistent_queue_is_submit_failed_with_the_schedulers_message(wlm: WLM, tmp_path: Path) -> None:
    options, fragment = wlm.env.bad_queue
    d = start_daemon(wlm, tmp_path / "d", options)
    try:
        run_id = submit(d, SLURMY, tmp_path / "noqueue", "--n", "1")
        assert wait_state(d, run_id) == "failed"
        items = status(d, run_id, "items").instances[0]  # type: ignore[index]
        assert items.state == "submit_failed" and fragment in (items.error or ""), items
    finally:
        d.stop()


@having("bad_account")
def test_invalid_account_is_submit_failed(wlm: WLM, tmp_path: Path) -> None:
    assert wlm.env.bad_account is not None
    options, fragment = wlm.env.bad_account
    d = start_daemon(wlm, tmp_path / "d", options)
    try:
        run_id = submit(d, SLURMY, tmp_path / "acct", "--n", "1")
        assert wait_state(d, run_id) == "failed"
        items = status(d, run_id, "items").instances[0]  # type: ignore[index]
        assert items.state == "submit_failed" and fragment in (items.error or "").lower(), items
    finally:
        d.stop()


@having("pending_reason")
def test_pending_job_shows_the_schedulers_reason(wlm: WLM, tmp_path: Path) -> None:
    assert wlm.env.pending_reason is not None
    options, fragments = wlm.env.pending_reason
    d = start_daemon(wlm, tmp_path / "d", options)
    try:
        run_id = submit(d, SLURMY, tmp_path / "down", "--n", "1")
        reason = wait_for(lambda: next((i.reason for i in status(d, run_id, "items").instances or []
                                        if i.state == "queued" and i.reason), None), timeout=120,
                          what="a pending reason")
        assert any(f in reason for f in fragments), reason
        assert "queued" in d.cli("status", run_id, "--task", "items").stdout
        with d.client() as c:
            assert c.cancel(run_id) >= 1
        assert wait_state(d, run_id) == "cancelled"
    finally:
        d.stop()


# ---------------------------------------------------------------------- crashes: every task exactly once


@ALL
def test_kill9_while_jobs_run_then_every_task_once(daemon: DaemonProcess, wlm: WLM, tmp_path: Path) -> None:
    run_dir = tmp_path / "crash"
    run_id = submit(daemon, COUNTING, run_dir, "--n", "20", "--delay", "2")
    wait_for(lambda: started_work(run_dir, 2), timeout=180, what="array elements to run")
    daemon.kill9()
    daemon.start()
    assert wait_state(daemon, run_id) == "succeeded"
    labels = executions(run_dir)
    assert labels["prepare"] == 1 and labels["total"] == 1
    assert [labels[f"work {i}"] for i in range(20)] == [1] * 20
    wlm.tags_used_once()


@ALL
@pytest.mark.parametrize("point", ["after_submit", "before_submit"])
def test_crash_between_submission_and_record_adopts_by_tag(wlm: WLM, tmp_path: Path, point: str) -> None:
    d = start_daemon(wlm, tmp_path / "d", extra_env={"REFLOW_FAULT_POINTS": point})
    run_dir = tmp_path / "fault"
    try:
        run_id = submit(d, COUNTING, run_dir, "--n", "3")
        assert d.proc is not None and d.proc.wait(timeout=60) == 137
        d.start()
        assert wait_state(d, run_id) == "succeeded"
        assert executions(run_dir) == Counter({"prepare": 1, "work 0": 1, "work 1": 1, "work 2": 1, "total": 1})
        if point == "after_submit":
            assert "adopted job found by tag" in d.log()
        wlm.tags_used_once()
    finally:
        d.stop()
