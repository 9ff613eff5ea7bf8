"""reflowd driving the real Slurm test cluster (both with and without accounting)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from reflow_client.client import InvalidParamsError

from .support import ROOT, DaemonProcess, slurm_job_names, wait_for

pytestmark = pytest.mark.slurm

EXAMPLE = ROOT / "examples" / "etl.py"
SLURMY = ROOT / "tests" / "engine_workflows" / "slurmy.py"
COUNTING = ROOT / "tests" / "engine_workflows" / "counting.py"


def slurm_config(partition: str) -> str:
    return (
        "[defaults]\ncluster = \"slurm\"\n\n"
        "[clusters.slurm]\n"
        "scheduler = \"slurm\"\n"
        f"python = \"{sys.executable}\"\n"
        "min_poll_interval = 1\npoll_interval = 2\nmax_poll_interval = 10\nlost_grace = 20\n"
        f"submit_options = {{ partition = \"{partition}\" }}\n"
    )


@pytest.fixture
def daemon(slurm_cluster, tmp_path: Path):
    d = DaemonProcess(tmp_path / "d", config=slurm_config(slurm_cluster.partition))
    d.start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(timeout=30)


def submit(d: DaemonProcess, workflow: Path, run_dir: Path, *args: str) -> str:
    out = d.cli("submit", str(workflow), "--run-dir", str(run_dir), "--no-daemon", "--json", *args, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["run_id"]


def status(d: DaemonProcess, run_id: str, task: str | None = None):
    with d.client() as c:
        return c.status(run_id, task)


def wait_state(d: DaemonProcess, run_id: str, states: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
               timeout: float = 240) -> str:
    return wait_for(lambda: (s := status(d, run_id).state) in states and s, timeout=timeout, interval=0.5,
                    what=f"run {run_id} to reach {states}")


def test_pipeline_fans_out_as_one_array_job(daemon: DaemonProcess, slurm_cluster, tmp_path: Path) -> None:
    run_dir = tmp_path / "etl"
    run_id = submit(daemon, EXAMPLE, run_dir, "--chunks", "100", "--rows", "200")
    assert wait_state(daemon, run_id) == "succeeded", status(daemon, run_id).raw
    st = status(daemon, run_id, "summarise")
    assert {t.name: t.counts for t in st.tasks}["summarise"] == {"succeeded": 100}
    assert st.instances is not None
    array_ids = {i.job_id.split("_")[0] for i in st.instances if i.job_id}
    assert len(array_ids) == 1, "all 100 elements belong to one array job"
    with daemon.client() as c:
        calls = c.stats()["clusters"]["slurm"]["calls"]
    assert calls["submit"] == 3, f"extract + one array batch + merge, not one sbatch per element: {calls}"
    assert json.loads((run_dir / "report.json").read_text())["summary"]["chunks"] == 100
    names = slurm_job_names(slurm_cluster.accounting)
    assert all(count == 1 for name, count in names.items() if name.startswith("rf")), names


def test_task_that_raises_is_failed_with_traceback(daemon: DaemonProcess, tmp_path: Path) -> None:
    run_id = submit(daemon, SLURMY, tmp_path / "raise", "--mode", "raise", "--n", "2")
    assert wait_state(daemon, run_id) == "failed"
    st = status(daemon, run_id)
    failure = next(f for f in st.failures if f.task == "victim")
    assert failure.state == "failed"
    assert "RuntimeError: victim raised on purpose" in (failure.error or "")
    assert "Traceback" in (failure.traceback or "")
    assert failure.job_id and failure.job_id.isdigit()


def test_scancel_from_outside_is_reported_cancelled(daemon: DaemonProcess, tmp_path: Path) -> None:
    run_dir = tmp_path / "scancel"
    run_id = submit(daemon, SLURMY, run_dir, "--mode", "sleep", "--n", "1")
    wait_for(lambda: (run_dir / "victim.pid").exists(), timeout=120, what="victim to start")
    job = wait_for(lambda: next((i.job_id for i in status(daemon, run_id, "victim").instances or []
                                 if i.job_id), None), timeout=60, what="victim's job id")
    subprocess.run(["scancel", job], check=True, timeout=60)
    assert wait_state(daemon, run_id) in ("failed", "cancelled")
    victim = status(daemon, run_id, "victim").instances[0]  # type: ignore[index]
    assert victim.state == "cancelled", victim
    assert "CANCELLED" in (victim.reason or ""), victim


def test_killed_worker_process_is_reported_failed(daemon: DaemonProcess, tmp_path: Path) -> None:
    run_dir = tmp_path / "kill"
    run_id = submit(daemon, SLURMY, run_dir, "--mode", "sleep", "--n", "1")
    pid = int(wait_for(lambda: (run_dir / "victim.pid").exists() and (run_dir / "victim.pid").read_text(),
                       timeout=120, what="victim to start"))
    os.kill(pid, signal.SIGKILL)
    assert wait_state(daemon, run_id) == "failed"
    victim = status(daemon, run_id, "victim").instances[0]  # type: ignore[index]
    assert victim.state == "failed"
    assert victim.error and ("exit code" in victim.error or "no result" in victim.error or "failed" in victim.error)


@pytest.mark.slow
def test_time_limit_exceeded_is_timeout(daemon: DaemonProcess, tmp_path: Path) -> None:
    run_id = submit(daemon, SLURMY, tmp_path / "timeout", "--mode", "sleep", "--n", "1")
    assert wait_state(daemon, run_id, timeout=400) == "failed"
    victim = status(daemon, run_id, "victim").instances[0]  # type: ignore[index]
    assert victim.state == "timeout", victim
    assert "TIMEOUT" in (victim.reason or "")


def test_pending_on_a_down_partition_shows_slurms_reason(slurm_cluster, tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "d", config=slurm_config(slurm_cluster.bad_partition))
    d.start()
    try:
        run_id = submit(d, SLURMY, tmp_path / "down", "--n", "1")
        reason = wait_for(lambda: next((i.reason for i in status(d, run_id, "items").instances or []
                                        if i.state == "queued" and i.reason), None), timeout=120,
                          what="a pending reason")
        assert "Partition" in reason or "ReqNodeNotAvail" in reason, reason
        assert "queued" in d.cli("status", run_id, "--task", "items").stdout
        with d.client() as c:
            assert c.cancel(run_id) >= 1
        assert wait_state(d, run_id) == "cancelled"
    finally:
        d.stop()


def test_unknown_sbatch_option_is_refused_before_submission(daemon: DaemonProcess, tmp_path: Path) -> None:
    from reflow.loader import load_workflow

    wf = load_workflow(SLURMY)
    manifest = wf.describe()
    manifest["tasks"][0]["config"]["submit_options"] = {"partiton": "debug"}
    with daemon.client() as c, pytest.raises(InvalidParamsError) as info:
        c.submit(manifest, wf.resolve_parameters({}), str(tmp_path / "opt"))
    assert "partiton" in info.value.message and "partition" in info.value.message
    with daemon.client() as c:
        assert c.runs() == []


def test_nonexistent_partition_is_submit_failed_with_slurms_message(slurm_cluster, tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "d", config=slurm_config("no_such_partition"))
    d.start()
    try:
        run_id = submit(d, SLURMY, tmp_path / "nopart", "--n", "1")
        assert wait_state(d, run_id) == "failed"
        items = status(d, run_id, "items").instances[0]  # type: ignore[index]
        assert items.state == "submit_failed"
        assert "partition" in (items.error or "").lower()
    finally:
        d.stop()


def test_kill9_while_jobs_run_then_every_task_once(daemon: DaemonProcess, slurm_cluster, tmp_path: Path) -> None:
    run_dir = tmp_path / "crash"
    run_id = submit(daemon, COUNTING, run_dir, "--n", "20", "--delay", "2")
    wait_for(lambda: (run_dir / "executions.txt").exists()
             and sum(1 for line in (run_dir / "executions.txt").read_text().splitlines() if line.startswith("work"))
             >= 2, timeout=180, what="array elements to run")
    daemon.kill9()
    daemon.start()
    assert wait_state(daemon, run_id, timeout=300) == "succeeded"
    lines = (run_dir / "executions.txt").read_text().splitlines()
    labels = Counter(line.rsplit(" pid=", 1)[0] for line in lines)
    assert labels["prepare"] == 1 and labels["total"] == 1
    assert [labels[f"work {i}"] for i in range(20)] == [1] * 20
    names = slurm_job_names(slurm_cluster.accounting)
    assert all(count == 1 for name, count in names.items() if name.startswith("rf")), names


@pytest.mark.parametrize("point", ["after_submit", "before_submit"])
def test_crash_between_sbatch_and_record_adopts_by_tag(slurm_cluster, tmp_path: Path, point: str) -> None:
    d = DaemonProcess(tmp_path / "d", config=slurm_config(slurm_cluster.partition))
    d.start(extra_env={"REFLOW_FAULT_POINTS": point})
    run_dir = tmp_path / "fault"
    try:
        run_id = submit(d, COUNTING, run_dir, "--n", "3")
        assert d.proc is not None and d.proc.wait(timeout=60) == 137
        d.start()
        assert wait_state(d, run_id, timeout=300) == "succeeded"
        labels = Counter(line.rsplit(" pid=", 1)[0] for line in (run_dir / "executions.txt").read_text().splitlines())
        assert labels == Counter({"prepare": 1, "work 0": 1, "work 1": 1, "work 2": 1, "total": 1})
        log = d.log()
        if point == "after_submit":
            assert "adopted job found by tag" in log
        names = slurm_job_names(slurm_cluster.accounting)
        assert all(count == 1 for name, count in names.items() if name.startswith("rf")), names
    finally:
        d.stop()


@pytest.mark.parametrize("slurm_cluster", ["accounting"], indirect=True)
def test_invalid_account_is_submit_failed(slurm_cluster, tmp_path: Path) -> None:
    """Accounts are enforced only with accounting, so this runs in that mode only."""
    config = slurm_config(slurm_cluster.partition).replace("partition = ", "account = \"nobody_account\", partition = ")
    d = DaemonProcess(tmp_path / "d", config=config)
    d.start()
    try:
        run_id = submit(d, SLURMY, tmp_path / "acct", "--n", "1")
        assert wait_state(d, run_id) == "failed"
        items = status(d, run_id, "items").instances[0]  # type: ignore[index]
        assert items.state == "submit_failed" and "account" in (items.error or "").lower(), items
    finally:
        d.stop()
