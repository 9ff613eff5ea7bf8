"""reflowd driving the real Slurm test cluster through a real sshd on 127.0.0.1 (a "remote" cluster).

The README pipeline over SSH runs for every scheduler in ``tests/test_scheduler_engine.py``;
the SSH-specific faults are here. The daemon reaches Slurm only over SSH: every
sbatch/squeue/scancel is an exec channel, every job file and result goes through SFTP, and run directories live
under the cluster's ``workdir`` (the "remote" side; on this one machine it is
a directory the test can also read, to count executions).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from reflow.loader import load_workflow

from .cluster.fixtures_ssh import SSHServer
from .support import ROOT, DaemonProcess, slurm_job_names, wait_for

pytestmark = [
    pytest.mark.ssh,
    pytest.mark.slurm,
    # SSH is the subject here: one Slurm mode is enough (the Slurm tests cover both).
    pytest.mark.parametrize("slurm_cluster", ["plain"], indirect=True),
]

EXAMPLE = ROOT / "examples" / "etl.py"
COUNTING = ROOT / "tests" / "engine_workflows" / "counting.py"


def remote_config(sshd: SSHServer, workdir: Path, *, extra: str = "") -> str:
    return (
        '[defaults]\ncluster = "local"\n\n'
        + sshd.config_table(
            "remote",
            python=sys.executable,
            workdir=str(workdir),
            min_poll_interval=1,
            poll_interval=2,
            max_poll_interval=10,
            lost_grace=20,
            submit_options={"partition": "debug"},
        )
        + extra
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "remote-scratch"
    path.mkdir()
    return path


@pytest.fixture
def daemon(slurm_cluster, sshd: SSHServer, tmp_path: Path, workdir: Path):
    d = DaemonProcess(tmp_path / "d", config=remote_config(sshd, workdir))
    d.start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(timeout=30)


def submit(d: DaemonProcess, workflow: Path, run_dir: str, *args: str) -> str:
    out = d.cli("submit", str(workflow), "--cluster", "remote", "--run-dir", run_dir, "--no-daemon", "--json", *args,
                check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["run_id"]


def status(d: DaemonProcess, run_id: str, task: str | None = None):
    with d.client() as c:
        return c.status(run_id, task)


def wait_state(d: DaemonProcess, run_id: str, timeout: float = 300) -> str:
    return wait_for(lambda: (s := status(d, run_id).state) in ("succeeded", "failed", "cancelled") and s,
                    timeout=timeout, interval=0.5, what=f"run {run_id} to finish")


def executions(run_dir: Path) -> Counter[str]:
    lines = (run_dir / "executions.txt").read_text().splitlines()
    return Counter(line.split(" pid=")[0] for line in lines)


def assert_each_ran_once(run_dir: Path, n: int) -> None:
    counts = executions(run_dir)
    expected = Counter({"prepare": 1, "total": 1, **{f"work {i}": 1 for i in range(n)}})
    assert counts == expected, f"ran more or less than once: {counts - expected} / {expected - counts}"


def test_python_api_submits_to_a_named_cluster(daemon: DaemonProcess, workdir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFLOW_CONFIG", str(daemon.config_path))
    wf = load_workflow(COUNTING)
    monkeypatch.setattr(wf, "_config", None)  # the module may be cached from another test: read this config
    run = wf.submit("api", store=daemon.socket, executor="remote", n=5)
    assert run.wait(timeout=300).state == "succeeded"
    assert run.run_dir == workdir / "api"
    assert_each_ran_once(workdir / "api", 5)
    # The workflow's own CLI picks the cluster the same way.
    out = subprocess.run([sys.executable, str(COUNTING), "submit", "--cluster", "remote", "--run-dir", "cli",
                          "--no-daemon", "--wait", "--n", "3"], env=daemon.env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert_each_ran_once(workdir / "cli", 3)


def test_killed_ssh_session_mid_run(daemon: DaemonProcess, sshd: SSHServer, workdir: Path) -> None:
    run_dir = workdir / "killed"
    run_id = submit(daemon, COUNTING, "killed", "--n", "24", "--delay", "4")
    wait_for(lambda: (run_dir / "executions.txt").exists() and "work" in (run_dir / "executions.txt").read_text(),
             timeout=180, what="elements to start")
    killed = sshd.kill_connections()
    assert killed, "the daemon's connection was served by sshd processes"
    assert wait_state(daemon, run_id) == "succeeded", status(daemon, run_id).raw
    assert_each_ran_once(run_dir, 24)
    st = status(daemon, run_id)
    assert st.cluster["health"]["reconnects"] >= 1
    assert all(count == 1 for name, count in slurm_job_names(accounting=False).items() if name.startswith("rf"))


def test_sshd_down_for_30_seconds(daemon: DaemonProcess, sshd: SSHServer, workdir: Path) -> None:
    run_dir = workdir / "outage"
    run_id = submit(daemon, COUNTING, "outage", "--n", "24", "--delay", "6")
    wait_for(lambda: (run_dir / "executions.txt").exists() and "work" in (run_dir / "executions.txt").read_text(),
             timeout=180, what="elements to start")
    sshd.stop(drop_connections=True)
    down_at = time.monotonic()
    seen_unreachable = None
    text_status = ""
    try:
        while time.monotonic() - down_at < 30:
            st = status(daemon, run_id)
            assert not st.failures, f"the outage failed tasks: {st.failures}"
            assert st.state == "running"
            health = st.cluster["health"]
            if not health["reachable"] and seen_unreachable is None:
                seen_unreachable = health
                text_status = daemon.cli("status", run_id).stdout
            time.sleep(1)
    finally:
        sshd.start()
    assert seen_unreachable is not None, "status never showed the cluster unreachable during a 30 s outage"
    assert seen_unreachable["down_since"] and seen_unreachable["last_error"]
    assert "UNREACHABLE since" in text_status, text_status
    assert wait_state(daemon, run_id) == "succeeded", status(daemon, run_id).raw
    assert status(daemon, run_id).cluster["health"]["reachable"]
    assert_each_ran_once(run_dir, 24)
    assert all(count == 1 for name, count in slurm_job_names(accounting=False).items() if name.startswith("rf"))


def test_bad_host_key_and_bad_user_key_refused_at_submit(slurm_cluster, sshd: SSHServer, tmp_path: Path,
                                                         workdir: Path) -> None:
    empty_known_hosts = tmp_path / "empty_known_hosts"
    empty_known_hosts.write_text("")
    wrong_key = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong_key)], check=True)
    extra = "\n" + "\n".join(
        line if not line.startswith("known_hosts") else f'known_hosts = "{empty_known_hosts}"'
        for line in sshd.config_table("badhost", python=sys.executable, workdir=str(workdir)).splitlines()
    ) + "\n\n" + "\n".join(
        line if not line.startswith("identity_file") else f'identity_file = "{wrong_key}"'
        for line in sshd.config_table("badkey", python=sys.executable, workdir=str(workdir)).splitlines()
    ) + "\n"
    d = DaemonProcess(tmp_path / "d", config=remote_config(sshd, workdir, extra=extra))
    d.start()
    try:
        before = slurm_job_names(accounting=False)
        out = d.cli("submit", str(COUNTING), "--cluster", "badhost", "--run-dir", "h", "--no-daemon", "--n", "2")
        assert out.returncode != 0
        assert "not trusted" in out.stderr and "ssh-keyscan -p" in out.stderr and "nothing was submitted" in out.stderr, \
            out.stderr
        out = d.cli("submit", str(COUNTING), "--cluster", "badkey", "--run-dir", "k", "--no-daemon", "--n", "2")
        assert out.returncode != 0
        assert str(wrong_key) in out.stderr and "authorized_keys" in out.stderr, out.stderr
        with d.client() as c:
            assert c.runs() == [], "nothing was recorded"
            clusters = c.stats()["clusters"]
        assert not clusters["badhost"]["health"]["reachable"]
        assert not (workdir / "h").exists() and not (workdir / "k").exists()
        # Earlier tests' finished jobs may leave squeue meanwhile (MinJobAge): only a new name would be a submission.
        assert not slurm_job_names(accounting=False) - before, "nothing reached Slurm"
        assert empty_known_hosts.read_text() == "", "the host key was not accepted silently"
        # The good cluster next to them still works.
        run_id = submit(d, COUNTING, "good", "--n", "2")
        assert wait_state(d, run_id) == "succeeded"
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait(timeout=30)


def test_cancel_over_ssh_stops_the_jobs(daemon: DaemonProcess, workdir: Path) -> None:
    run_dir = workdir / "cancel"
    run_id = submit(daemon, COUNTING, "cancel", "--n", "4", "--delay", "300")
    wait_for(lambda: (run_dir / "executions.txt").exists() and "work" in (run_dir / "executions.txt").read_text(),
             timeout=180, what="elements to start")
    out = daemon.cli("cancel", run_id)
    assert out.returncode == 0, out.stderr
    assert wait_state(daemon, run_id, timeout=120) == "cancelled"
    st = status(daemon, run_id, "work")
    job_ids = {i.job_id.split("_")[0] for i in st.instances or [] if i.job_id}
    assert job_ids

    def gone() -> bool:
        out = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(sorted(job_ids))], capture_output=True,
                             text=True, timeout=60)
        return not out.stdout.strip()

    wait_for(gone, timeout=120, what="scancel (sent over SSH) to end the array job")
    assert "total" not in executions(run_dir)
