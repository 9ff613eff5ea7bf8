"""Retries by cause and outages on the real Slurm cluster (tests/cluster/slurm.sh).

Each test is one scenario kept as short as Slurm allows: a time limit is at
least a minute, and slurmctld checks limits about every 30 s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .cluster.wlm import WLM
from .support import DaemonProcess, wait_for
from .test_scheduler_engine import kill, start_daemon, status, submit, wait_state

OVERTIME = Path(__file__).parent / "engine_workflows" / "overtime.py"

SLURM_PLAIN = pytest.mark.parametrize("wlm_name", [pytest.param("slurm-plain", marks=pytest.mark.slurm)],
                                      indirect=True)


def job_time_limit(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id.split("_")[0]], capture_output=True, text=True,
                         timeout=60).stdout
    return next(part.split("=", 1)[1] for part in out.split() if part.startswith("TimeLimit="))


@SLURM_PLAIN
def test_a_job_over_its_time_limit_is_retried_with_more_time_and_succeeds(wlm: WLM, tmp_path: Path) -> None:
    d: DaemonProcess = start_daemon(wlm, tmp_path / "d")
    try:
        run_id = submit(d, OVERTIME, tmp_path / "run")
        assert wait_state(d, run_id, timeout=600) == "succeeded"
        slow = status(d, run_id, "slow").instances[0]  # type: ignore[index]
        assert slow.state == "succeeded" and slow.attempt == 2, slow
        assert slow.resources is not None and slow.resources["time"] == "00:03:00"
        (first,) = slow.attempts or []
        assert first["cause"]["kind"] == "time_limit" and first["counted"] is True, first
        assert first["cause"]["text"].startswith("time limit reached (limit 1"), first
        assert job_time_limit(first["job_id"]) == "00:01:00"
        assert job_time_limit(slow.job_id or "") == "00:03:00"  # the escalation reached Slurm
        text = d.cli("status", run_id, "--task", "slow").stdout
        assert "succeeded" in text
        wlm.tags_used_once()
    finally:
        kill(d)


SLURMY = Path(__file__).parent / "engine_workflows" / "slurmy.py"
FAILED_STATES = {"failed", "timeout", "out_of_memory", "node_fail", "submit_failed", "cancelled", "upstream_failed"}


def slurmctld_pid() -> int | None:
    try:
        pid = int(Path("/run/slurmctld.pid").read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def stop_slurmctld() -> None:
    """Stop the test cluster's controller by its pid (the test holds the cluster lock); jobs keep running."""
    pid = slurmctld_pid()
    assert pid is not None, "slurmctld is not running"
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: slurmctld_pid() is None, timeout=60, what="slurmctld to stop")


def start_slurmctld() -> None:
    if slurmctld_pid() is None:
        subprocess.run(["slurmctld"], check=True, timeout=60)
    wait_for(lambda: subprocess.run(["scontrol", "ping"], capture_output=True, timeout=30).returncode == 0,
             timeout=120, what="slurmctld to answer")


@SLURM_PLAIN
def test_slurmctld_down_for_a_minute_mid_run_fails_nothing_and_shows_the_cluster_degraded(
        wlm: WLM, tmp_path: Path) -> None:
    d: DaemonProcess = start_daemon(wlm, tmp_path / "d")
    try:
        run_id = submit(d, SLURMY, tmp_path / "run", "--n", "100", "--hold", "1")
        wait_for(lambda: status(d, run_id).tasks[1].counts.get("succeeded", 0) >= 5, timeout=300,
                 interval=0.5, what="work under way")
        stop_slurmctld()
        health: list[str] = []
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                st = status(d, run_id)
                health.append(((st.cluster or {}).get("scheduler_health") or {}).get("state", "?"))
                failed = {s: n for t in st.tasks for s, n in t.counts.items() if s in FAILED_STATES}
                assert not failed, f"false failures while slurmctld was down: {failed}"
                if health[-1] == "degraded" and "DEGRADED since" not in d.cli("status", run_id).stdout:
                    raise AssertionError("status text does not show the degraded cluster")
                time.sleep(2)
        finally:
            start_slurmctld()
        assert "degraded" in health, health
        assert wait_state(d, run_id, timeout=600) == "succeeded", status(d, run_id).failures
        st = status(d, run_id, "work")
        assert st.raw.get("instances_total") == 100
        assert all(i.attempt == 1 for i in st.instances or []), "nothing was retried: no failure was concluded"
        assert ((st.cluster or {}).get("scheduler_health") or {}).get("state") == "ok"
        assert ((st.cluster or {}).get("scheduler_health") or {}).get("degraded_episodes", 0) >= 1
        wlm.tags_used_once()
    finally:
        start_slurmctld()
        kill(d)


@SLURM_PLAIN
def test_a_job_requeued_while_it_runs_is_followed_and_counted_once(wlm: WLM, tmp_path: Path) -> None:
    d: DaemonProcess = start_daemon(wlm, tmp_path / "d")
    try:
        run_dir = tmp_path / "run"
        run_id = submit(d, SLURMY, run_dir, "--n", "2", "--hold", "20")
        key = wait_for(lambda: next((i.job_id for i in status(d, run_id, "work").instances or []
                                     if i.state == "running" and i.index == 0), None),
                       timeout=300, interval=0.5, what="work[0] running")
        wait_for(lambda: "work 0" in (run_dir / "executions.txt").read_text()
                 if (run_dir / "executions.txt").exists() else False, timeout=120, what="work[0] to start")
        subprocess.run(["scontrol", "requeue", key], check=True, timeout=60)
        seen: set[str] = set()

        def finished() -> bool:
            st = status(d, run_id, "work")
            seen.update(i.state for i in st.instances or [] if i.index == 0)
            return st.run.state != "running"

        wait_for(finished, timeout=600, interval=0.5, what="the run to end")
        assert status(d, run_id).run.state == "succeeded", status(d, run_id).failures
        work0 = next(i for i in status(d, run_id, "work").instances or [] if i.index == 0)
        assert work0.state == "succeeded" and work0.attempt == 1 and not work0.attempts, work0
        runs = (run_dir / "executions.txt").read_text().count("work 0 ")
        assert runs == 2, "the requeued element ran again (and its first, interrupted run was not taken)"
        assert not seen & {"failed", "timeout", "cancelled", "node_fail"}, seen
        wlm.tags_used_once()
    finally:
        kill(d)


SLURM_ACCT = pytest.mark.parametrize(
    "wlm_name", [pytest.param("slurm-acct", marks=(pytest.mark.slurm, pytest.mark.slurm_accounting))], indirect=True)


def set_max_submit(value: int) -> None:
    subprocess.run(["sacctmgr", "-i", "modify", "qos", "normal", "set", f"MaxSubmitJobsPerUser={value}"],
                   check=True, capture_output=True, timeout=60)


def queued_ids() -> set[str]:
    """Elements pending or running: what MaxSubmitJobsPerUser counts (a completing job no longer does)."""
    out = subprocess.run(["squeue", "-h", "-r", "-t", "PENDING,RUNNING", "-o", "%i"], capture_output=True, text=True,
                         timeout=60)
    return set(out.stdout.split()) if out.returncode == 0 else set()


@SLURM_ACCT
def test_a_qos_limit_of_10_keeps_a_100_element_fan_out_under_it_and_nothing_fails(wlm: WLM, tmp_path: Path) -> None:
    set_max_submit(10)
    try:
        d: DaemonProcess = start_daemon(wlm, tmp_path / "d")
        try:
            before = queued_ids()  # jobs an earlier, interrupted test left behind are not this run's
            run_id = submit(d, SLURMY, tmp_path / "run", "--n", "100", "--hold", "1")
            most = 0
            while status(d, run_id).run.state == "running":
                most = max(most, len(queued_ids() - before))
                time.sleep(0.3)
            assert status(d, run_id).run.state == "succeeded", status(d, run_id).failures
            st = status(d, run_id, "work")
            assert st.raw.get("instances_total") == 100
            assert all(i.state == "succeeded" and i.attempt == 1 for i in st.instances or [])
            cluster = st.cluster or {}
            assert cluster.get("max_queued") == 10  # read from the QOS by the probe
            # An element keeps its slot until the scheduler shows its job ended (queue_limits.Lingering), not
            # just until its result file appears. The cluster tests run one at a time (one xdist group), so
            # every job squeue lists here, but for those queued before, is this run's.
            assert 0 < most <= 10, most
            assert not cluster.get("limit_refusals"), cluster
        finally:
            kill(d)
    finally:
        set_max_submit(-1)
