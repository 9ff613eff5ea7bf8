"""reflowd end to end on emulated PBS, LSF and Flux (tests/emulators/): one behavioural set, parametrised.

The emulators implement each system's documented commands and formats on
local processes, so these tests drive the real adapters through render,
submit, query, parse, results, cancel, restart and adoption by tag.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from .emulators.environments import SCHEDULERS, EmulatedScheduler
from .support import ROOT, DaemonProcess, wait_for

EXAMPLE = ROOT / "examples" / "etl.py"
SLURMY = ROOT / "tests" / "engine_workflows" / "slurmy.py"
COUNTING = ROOT / "tests" / "engine_workflows" / "counting.py"

#: What a job id looks like on each system (nothing in reflow may assume integers).
ID_SHAPE = {"pbs": ".emuserver", "lsf": "", "flux": "ƒ"}


@pytest.fixture(params=SCHEDULERS)
def emulated(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EmulatedScheduler]:
    emu = EmulatedScheduler(request.param, tmp_path / "wlm")
    yield emu
    emu.close()


@pytest.fixture
def daemon(emulated: EmulatedScheduler, tmp_path: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path / "d", config=emulated.config(sys.executable), env=emulated.env())
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


def wait_state(d: DaemonProcess, run_id: str, timeout: float = 180) -> str:
    final = ("succeeded", "failed", "cancelled")
    return wait_for(lambda: (s := status(d, run_id).state) in final and s, timeout=timeout, interval=0.3,
                    what=f"run {run_id} to finish")


def executions(run_dir: Path) -> Counter[str]:
    lines = (run_dir / "executions.txt").read_text().splitlines()
    return Counter(line.rsplit(" pid=", 1)[0] for line in lines)


def test_pipeline_fans_out_100_as_one_array_and_gathers(daemon: DaemonProcess, emulated: EmulatedScheduler,
                                                        tmp_path: Path) -> None:
    run_dir = tmp_path / "etl"
    run_id = submit(daemon, EXAMPLE, run_dir, "--chunks", "100", "--rows", "20")
    assert wait_state(daemon, run_id, timeout=240) == "succeeded", status(daemon, run_id).raw
    st = status(daemon, run_id, "summarise")
    assert {t.name: t.counts for t in st.tasks}["summarise"] == {"succeeded": 100}
    assert st.instances is not None
    assert all(ID_SHAPE[emulated.kind] in (i.job_id or "") for i in st.instances), st.instances[0]
    with daemon.client() as c:
        stats = c.stats()["clusters"]["emu"]
    assert stats["calls"]["submit"] == 3, f"extract + one array submission + merge: {stats['calls']}"
    assert stats["scheduler_stats"]["max_array_size"] >= 100
    assert json.loads((run_dir / "report.json").read_text())["summary"]["chunks"] == 100
    names = emulated.submissions_by_name()
    assert names and all(count == 1 for count in names.values()), names
    assert (run_dir / "logs").is_dir() and any((run_dir / "logs").glob("summarise.*.99.out"))


def test_failing_element_is_failed_with_its_traceback(daemon: DaemonProcess, tmp_path: Path) -> None:
    run_dir = tmp_path / "fail"
    run_id = submit(daemon, COUNTING, run_dir, "--n", "3", "--fail-on", "1")
    assert wait_state(daemon, run_id) == "failed"
    work = status(daemon, run_id, "work")
    states = {i.index: i.state for i in work.instances or []}
    assert states == {0: "succeeded", 1: "failed", 2: "succeeded"}, states
    failure = next(f for f in status(daemon, run_id).failures if f.task == "work")
    assert "ValueError: bad input 1" in (failure.error or "") + (failure.traceback or "")


def test_cancel_from_outside_is_reported_cancelled(daemon: DaemonProcess, emulated: EmulatedScheduler,
                                                   tmp_path: Path) -> None:
    run_dir = tmp_path / "outside"
    run_id = submit(daemon, SLURMY, run_dir, "--mode", "sleep", "--n", "1")
    wait_for(lambda: (run_dir / "victim.pid").exists(), timeout=120, what="victim to start")
    job = wait_for(lambda: next((i.job_id for i in status(daemon, run_id, "victim").instances or []
                                 if i.job_id), None), timeout=60, what="victim's job id")
    result = emulated.cancel_outside(job)
    assert result.returncode == 0, result.stderr
    assert wait_state(daemon, run_id) in ("failed", "cancelled")
    victim = status(daemon, run_id, "victim").instances[0]  # type: ignore[index]
    assert victim.state == "cancelled", victim


def test_cancel_from_the_client_reaches_the_scheduler(daemon: DaemonProcess, emulated: EmulatedScheduler,
                                                      tmp_path: Path) -> None:
    run_dir = tmp_path / "cancel"
    run_id = submit(daemon, COUNTING, run_dir, "--n", "6", "--delay", "60")
    wait_for(lambda: (run_dir / "executions.txt").exists()
             and any(k.startswith("work") for k in executions(run_dir)), timeout=120, what="work to start")
    with daemon.client() as c:
        assert c.cancel(run_id) >= 1
    assert wait_state(daemon, run_id) == "cancelled"
    wait_for(emulated.all_elements_done, timeout=60, what="the scheduler to end every element")


def test_killed_job_is_failed(daemon: DaemonProcess, tmp_path: Path) -> None:
    run_dir = tmp_path / "kill"
    run_id = submit(daemon, SLURMY, run_dir, "--mode", "sleep", "--n", "1")
    pid = int(wait_for(lambda: (run_dir / "victim.pid").exists() and (run_dir / "victim.pid").read_text(),
                       timeout=120, what="victim to start"))
    os.kill(pid, signal.SIGKILL)
    assert wait_state(daemon, run_id) == "failed"
    victim = status(daemon, run_id, "victim").instances[0]  # type: ignore[index]
    assert victim.state == "failed" and victim.error, victim


def test_kill9_of_the_daemon_mid_run_runs_every_task_once(daemon: DaemonProcess, emulated: EmulatedScheduler,
                                                          tmp_path: Path) -> None:
    run_dir = tmp_path / "crash"
    run_id = submit(daemon, COUNTING, run_dir, "--n", "12", "--delay", "1")
    wait_for(lambda: (run_dir / "executions.txt").exists()
             and sum(1 for k in executions(run_dir).elements() if k.startswith("work")) >= 2,
             timeout=120, what="array elements to run")
    daemon.kill9()
    daemon.start()
    assert wait_state(daemon, run_id) == "succeeded"
    labels = executions(run_dir)
    assert labels["prepare"] == 1 and labels["total"] == 1
    assert [labels[f"work {i}"] for i in range(12)] == [1] * 12
    names = emulated.submissions_by_name()
    assert all(count == 1 for count in names.values()), names


def test_crash_right_after_submission_adopts_the_job_by_its_tag(emulated: EmulatedScheduler, tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "d", config=emulated.config(sys.executable), env=emulated.env())
    d.start(extra_env={"REFLOW_FAULT_POINTS": "after_submit"})
    run_dir = tmp_path / "fault"
    try:
        run_id = submit(d, COUNTING, run_dir, "--n", "3")
        assert d.proc is not None and d.proc.wait(timeout=60) == 137
        d.start()
        assert wait_state(d, run_id) == "succeeded"
        assert executions(run_dir) == Counter({"prepare": 1, "work 0": 1, "work 1": 1, "work 2": 1, "total": 1})
        assert "adopted job found by tag" in d.log()
        assert all(count == 1 for count in emulated.submissions_by_name().values())
    finally:
        d.stop()
