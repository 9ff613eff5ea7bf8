"""Retries by cause and outages on the real Slurm cluster (tests/cluster/slurm.sh).

Each test is one scenario kept as short as Slurm allows: a time limit is at
least a minute, and slurmctld checks limits about every 30 s.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from .cluster.wlm import WLM
from .support import DaemonProcess, wait_for
from .test_scheduler_engine import kill, start_daemon, started_work, status, submit, wait_state

OVERTIME = Path(__file__).parent / "engine_workflows" / "overtime.py"

SLURM_PLAIN = pytest.mark.parametrize("wlm_name", [pytest.param("slurm-plain", marks=pytest.mark.slurm)],
                                      indirect=True)


def job_time_limit(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id.split("_")[0]], capture_output=True, text=True,
                         timeout=60).stdout
    return next(part.split("=", 1)[1] for part in out.split() if part.startswith("TimeLimit="))


@SLURM_PLAIN
def test_a_job_over_its_time_limit_is_retried_with_more_time_and_succeeds(wlm: WLM, tmp_path: Path) -> None:
    # On the `short` partition (MaxTime=2): the policy's 3x escalation is capped by the probed partition limit.
    d: DaemonProcess = start_daemon(wlm, tmp_path / "d", {"partition": "short"})
    try:
        run_id = submit(d, OVERTIME, tmp_path / "run")
        assert wait_state(d, run_id, timeout=600) == "succeeded"
        slow = status(d, run_id, "slow").instances[0]  # type: ignore[index]
        assert slow.state == "succeeded" and slow.attempt == 2, slow
        assert slow.resources is not None and slow.resources["time"] == "00:02:00"
        (first,) = slow.attempts or []
        assert first["cause"]["kind"] == "time_limit" and first["counted"] is True, first
        assert first["cause"]["text"].startswith("time limit reached (limit 1"), first
        assert job_time_limit(first["job_id"]) == "00:01:00"
        assert job_time_limit(slow.job_id or "") == "00:02:00"  # the escalation reached Slurm
        text = d.cli("status", run_id, "--task", "slow").stdout
        assert "succeeded" in text
        wlm.tags_used_once()
    finally:
        kill(d)


@SLURM_PLAIN
def test_the_probe_reads_each_partitions_time_and_memory_caps(wlm: WLM) -> None:
    from reflowd.schedulers.slurm import SlurmScheduler
    from reflowd.transports.local import LocalTransport

    facts = anyio.run(SlurmScheduler(LocalTransport()).probe)
    partitions = facts["queue_caps"]
    assert facts["default_queue"] == "debug"
    assert partitions["short"] == {"max_time": "00:02:00", "max_mem": "1000M"}  # slurm.sh: MaxTime=2, MaxMemPerNode
    real_memory = int(subprocess.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%m"], capture_output=True,
                                     text=True, timeout=60).stdout.split()[0])
    assert partitions["debug"] == {"max_time": None, "max_mem": f"{real_memory}M"}  # MaxTime=INFINITE


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

        # reflow sees the requeue: the element is queued again (Slurm holds it ~2 min, reason BeginTime).
        wait_for(lambda: finished() or "queued" in seen, timeout=120, interval=0.5, what="work[0] queued again")
        assert "queued" in seen, seen
        # Bring its start forward, as an admin can: reflow sees a PENDING job either way, and the suite saves the wait.
        subprocess.run(["scontrol", "update", f"JobId={key}", "StartTime=now"], capture_output=True, timeout=60)
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


# ---------------------------------------------------------------------- a node going down under running jobs

NODEFAIL = Path(__file__).parent / "engine_workflows" / "nodefail.py"
NODE = socket.gethostname().split(".")[0]  # slurm.sh names the node after `hostname -s`


def node_usable() -> bool:
    out = subprocess.run(["sinfo", "-h", "-n", NODE, "-p", "debug", "-o", "%t"], capture_output=True, text=True,
                         timeout=60).stdout.strip()
    return out.rstrip("*~#!%$@^-").startswith(("idle", "mix", "alloc", "comp"))


def restore_node() -> None:
    """The node takes jobs again (the cluster is shared by the rest of the suite). With ReturnToService=2 slurmd's
    next registration brings a DOWN node back by itself; RESUME covers a cluster configured otherwise."""
    if not node_usable():
        subprocess.run(["scontrol", "update", f"NodeName={NODE}", "State=RESUME"], capture_output=True, timeout=60)
    wait_for(node_usable, timeout=120, interval=1, what=f"node {NODE} to take jobs again")


def lines(run_dir: Path, label: str) -> int:
    path = run_dir / "executions.txt"
    return sum(1 for line in path.read_text().splitlines() if line.startswith(label + " ")) if path.exists() else 0


@SLURM_PLAIN
def test_a_node_set_down_under_running_jobs_is_retried_for_free_or_followed_through_the_requeue(
        wlm: WLM, tmp_path: Path) -> None:
    """What Slurm 22.05 does (checked here): ``scontrol update State=DOWN`` kills the node's jobs at once. A job
    submitted with --no-requeue ends NODE_FAIL (reason NodeDown); one under the default JobRequeue=1 is requeued
    (PENDING, reason BeginTime, Restarts=1) and starts again later. Both workers get SIGTERM first."""
    d: DaemonProcess = start_daemon(wlm, tmp_path / "d")
    run_dir = tmp_path / "run"
    seen: dict[str, set[str]] = {"fragile": set(), "requeued": set()}

    def watch() -> Any:
        st = status(d, run_id)
        for task in seen:
            for inst in status(d, run_id, task).instances or []:
                seen[task].add(inst.state)
        return st

    try:
        run_id = submit(d, NODEFAIL, run_dir)
        wait_for(lambda: lines(run_dir, "fragile started") and lines(run_dir, "requeued started"), timeout=300,
                 interval=0.5, what="both tasks to start")
        requeued_job = status(d, run_id, "requeued").instances[0].job_id  # type: ignore[index]
        try:
            subprocess.run(["scontrol", "update", f"NodeName={NODE}", "State=DOWN", "Reason=reflow-test-node-fail"],
                           check=True, capture_output=True, timeout=60)
            wait_for(lambda: lines(run_dir, "fragile interrupted") and lines(run_dir, "requeued interrupted"),
                     timeout=120, interval=0.5, what="both first runs to be stopped by the node failure")
            (run_dir / "release").write_text("go")  # the next runs return at once
            restore_node()
            wait_for(lambda: "queued" in seen["requeued"] or watch().run.state != "running", timeout=120,
                     interval=0.5, what="the requeued job to show as queued again")
        finally:
            restore_node()
        # Slurm holds a requeued job ~2 min (BeginTime) before it may start again: bring its start forward, as an
        # admin can. It changes nothing reflow sees (the job is PENDING either way) and saves the suite the wait.
        subprocess.run(["scontrol", "update", f"JobId={requeued_job}", "StartTime=now"], capture_output=True,
                       timeout=60)
        wait_for(lambda: watch().run.state != "running", timeout=600, interval=0.5, what="the run to end")
        assert status(d, run_id).run.state == "succeeded", status(d, run_id).failures

        fragile = status(d, run_id, "fragile").instances[0]  # type: ignore[index]
        assert fragile.state == "succeeded" and fragile.attempt == 2, fragile
        (first,) = fragile.attempts or []
        assert first["state"] == "node_fail" and first["cause"]["kind"] == "node_fail", first
        assert first["counted"] is False, "a node failure must not count against retries (retries=0 here)"
        assert first["cause"]["text"].startswith("node failure"), first

        requeued = status(d, run_id, "requeued").instances[0]  # type: ignore[index]
        assert requeued.state == "succeeded" and requeued.attempt == 1 and not requeued.attempts, requeued
        assert requeued.job_id == requeued_job, "followed under the same job id through Slurm's requeue"
        assert lines(run_dir, "requeued started") == 2 and lines(run_dir, "fragile started") == 2
        assert not seen["requeued"] & FAILED_STATES, seen
        shown = json.loads(d.cli("status", run_id, "--task", "fragile", "--json").stdout)
        (row,) = shown["instances"]
        assert row["attempts"][0]["cause"]["text"].startswith("node failure"), row  # the CLI's --json says it too
        wlm.tags_used_once()
    finally:
        kill(d)


# ---------------------------------------------------------------------- slurmdbd down

def slurmdbd_pid() -> int | None:
    try:
        pid = int(Path("/run/slurmdbd.pid").read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def sacct_answers() -> bool:
    return subprocess.run(["sacct", "-n", "-X", "-S", "now-1minutes", "-o", "JobID"], capture_output=True,
                          timeout=60).returncode == 0


def stop_slurmdbd() -> None:
    pid = slurmdbd_pid()
    assert pid is not None, "slurmdbd is not running"
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: slurmdbd_pid() is None, timeout=60, what="slurmdbd to stop")


def start_slurmdbd() -> None:
    if slurmdbd_pid() is None:
        subprocess.run(["slurmdbd"], check=True, timeout=60)
    wait_for(sacct_answers, timeout=120, interval=1, what="sacct to answer again")


@SLURM_ACCT
def test_slurmdbd_down_for_a_minute_mid_run_fails_nothing_and_shows_the_accounting_degraded(
        wlm: WLM, tmp_path: Path) -> None:
    d: DaemonProcess = start_daemon(wlm, tmp_path / "d")
    try:
        run_id = submit(d, SLURMY, tmp_path / "run", "--n", "4", "--hold", "20")
        wait_for(lambda: status(d, run_id).tasks[1].counts.get("running", 0) >= 1, timeout=300, interval=0.5,
                 what="work under way")
        assert (status(d, run_id).cluster or {}).get("accounting_health", {}).get("state") == "ok"
        stop_slurmdbd()
        states: list[str] = []
        shown = {"text": False, "json": False}
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                st = status(d, run_id)
                acct = (st.cluster or {}).get("accounting_health") or {}
                states.append(acct.get("state", "?"))
                failed = {s: n for t in st.tasks for s, n in t.counts.items() if s in FAILED_STATES}
                assert not failed, f"false failures while slurmdbd was down: {failed}"
                assert ((st.cluster or {}).get("scheduler_health") or {}).get("state") == "ok", \
                    "slurmctld answers: the cluster itself is not degraded"
                if acct.get("state") == "degraded" and not (shown["text"] and shown["json"]):
                    assert acct.get("since") and acct.get("last_error") and acct.get("fallback") == "squeue", acct
                    shown["text"] |= "ACCOUNTING DEGRADED since" in d.cli("status", run_id).stdout
                    cli_json = json.loads(d.cli("status", run_id, "--json").stdout)
                    shown["json"] |= (cli_json.get("cluster") or {}).get("accounting_health", {}).get("state") \
                        == "degraded"
                time.sleep(2)
        finally:
            start_slurmdbd()
        assert "degraded" in states, states
        assert shown == {"text": True, "json": True}, shown
        assert wait_state(d, run_id, timeout=600) == "succeeded", status(d, run_id).failures
        st = status(d, run_id, "work")
        assert all(i.state == "succeeded" and i.attempt == 1 for i in st.instances or []), st.instances
        # The next poll that uses accounting ends the degraded spell; with nothing left to poll, the driver asks.
        acct = wait_for(lambda: (a := (status(d, run_id).cluster or {}).get("accounting_health") or {}).get(
            "state") == "ok" and a, timeout=120, interval=1, what="accounting to show as answering again")
        assert acct.get("degraded_episodes", 0) >= 1 and acct.get("recovered_at"), acct
        wlm.tags_used_once()
    finally:
        start_slurmdbd()
        kill(d)


COUNTING = Path(__file__).parent / "engine_workflows" / "counting.py"


def squeue_states(job_id: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                         timeout=60)
    return out.stdout.split()


@SLURM_PLAIN
def test_a_kill_owed_when_reflowd_died_is_sent_by_the_next_one(wlm: WLM, tmp_path: Path) -> None:
    """reflowd commits a cancel and dies (fault point ``before_kill``) before its scancel: the jobs run on.
    The next reflowd finds the kill owed in its store -- one for the run's array job, killed whole
    (``Engine._cancel_jobs``) -- and sends it in one scancel; nothing stays owed."""
    d: DaemonProcess = start_daemon(wlm, tmp_path / "d", extra_env={"REFLOW_FAULT_POINTS": "before_kill"})
    gate = tmp_path / "never-opened"
    job_id = ""
    try:
        run_id = submit(d, COUNTING, tmp_path / "run", "--n", "2", "--gate", str(gate))
        wait_for(lambda: started_work(tmp_path / "run", 2), timeout=300, interval=0.5, what="both elements running")
        job_id = (status(d, run_id, "work").instances or [])[0].job_id.split("_")[0]  # type: ignore[union-attr]
        d.cli("cancel", run_id)  # cut off (or answered) as reflowd dies sending the kills
        assert d.proc is not None
        d.proc.wait(timeout=120)
        assert d.proc.returncode == 137, "the fault point ends reflowd like kill -9"
        assert squeue_states(job_id) == ["RUNNING", "RUNNING"], "nothing cancelled the jobs yet"
        d.start()
        wait_for(lambda: not squeue_states(job_id), timeout=120, interval=0.5, what="the owed kills to end the jobs")
        with d.client() as c:
            hpc = wait_for(lambda: (s := c.stats()["clusters"]["hpc"])["owed_kills"] == 0 and s, timeout=60,
                           what="no kill owed")
        assert hpc["driver"]["owed_kills_loaded"] == 1, "the array job, owed whole"
        assert hpc["calls"].get("cancel") == 1, hpc["calls"]
        assert wait_state(d, run_id, ("cancelled",)) == "cancelled"
    finally:
        gate.touch()
        if job_id:
            subprocess.run(["scancel", job_id], capture_output=True, timeout=60)
        kill(d)

