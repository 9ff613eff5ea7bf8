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

from .emulators.environments import CANCELLED_REASON, SCHEDULERS, EmulatedScheduler
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
    shown = json.loads(daemon.cli("stats", "--json", check=True).stdout)["clusters"]["emu"]["scheduler_stats"]
    assert shown["version"] and "max_array_size" in shown, shown  # the probe, as `reflow-client stats` shows it
    assert json.loads((run_dir / "report.json").read_text())["summary"]["chunks"] == 100
    names = emulated.submissions_by_name()
    assert names and all(count == 1 for count in names.values()), names
    logs = daemon.cli("logs", run_id, "summarise", "--index", "7")
    assert logs.returncode == 0 and "chunk-0007.txt" in logs.stdout, logs.stdout + logs.stderr


def test_failures_cancels_kills_and_daemon_crashes_in_one_life(emulated: EmulatedScheduler, tmp_path: Path) -> None:
    """Several runs at once through two daemon crashes (kept in one daemon's life so the set stays quick).

    1. reflowd dies right after its first submission (before recording the job id): the next daemon
       adopts the job by its tag;
    2. meanwhile: an element raises; a job is cancelled from outside (qdel/bkill/flux cancel); a
       worker is killed with SIGKILL; a run is cancelled from the client;
    3. reflowd is killed with SIGKILL while an array runs: every task still runs exactly once.
    """
    emulated.slots = 10  # sleeping victims must not starve the array
    d = DaemonProcess(tmp_path / "d", config=emulated.config(sys.executable), env=emulated.env())
    try:
        d.start(extra_env={"REFLOW_FAULT_POINTS": "after_submit"})
        adopt_dir = tmp_path / "adopt"
        adopt = submit(d, COUNTING, adopt_dir, "--n", "3")
        assert d.proc is not None and d.proc.wait(timeout=60) == 137
        d.start()
        runs = {
            "fail": submit(d, COUNTING, tmp_path / "fail", "--n", "3", "--fail-on", "1"),
            "outside": submit(d, SLURMY, tmp_path / "outside", "--mode", "sleep", "--n", "1"),
            "kill": submit(d, SLURMY, tmp_path / "kill", "--mode", "sleep", "--n", "1"),
            "cancel": submit(d, COUNTING, tmp_path / "cancel", "--n", "2", "--delay", "120"),
            "crash": submit(d, COUNTING, tmp_path / "crash", "--n", "10", "--delay", "1"),
        }
        for name in ("outside", "kill"):
            wait_for(lambda n=name: (tmp_path / n / "victim.pid").exists(), timeout=120, what=f"{name} victim")
        wait_for(lambda: (tmp_path / "crash" / "executions.txt").exists()
                 and sum(1 for k in executions(tmp_path / "crash").elements() if k.startswith("work")) >= 2,
                 timeout=120, what="the array to run")
        d.kill9()
        d.start()
        victim_job = wait_for(lambda: next((i.job_id for i in status(d, runs["outside"], "victim").instances or []
                                            if i.job_id), None), timeout=60, what="victim's job id")
        assert ID_SHAPE[emulated.kind] in victim_job, victim_job
        result = emulated.cancel_outside(victim_job)
        assert result.returncode == 0, result.stderr
        os.kill(int((tmp_path / "kill" / "victim.pid").read_text()), signal.SIGKILL)
        wait_for(lambda: (tmp_path / "cancel" / "executions.txt").exists(), timeout=120, what="work to start")
        with d.client() as c:
            assert c.cancel(runs["cancel"]) >= 1
        final = {name: wait_state(d, run_id) for name, run_id in {**runs, "adopt": adopt}.items()}
        assert final == {"fail": "failed", "outside": "failed", "kill": "failed", "cancel": "cancelled",
                         "crash": "succeeded", "adopt": "succeeded"}, final

        work = {i.index: i.state for i in status(d, runs["fail"], "work").instances or []}
        assert work == {0: "succeeded", 1: "failed", 2: "succeeded"}, work
        failure = next(f for f in status(d, runs["fail"]).failures if f.task == "work")
        assert "ValueError: bad input 1" in (failure.error or "") + (failure.traceback or "")
        outside = status(d, runs["outside"], "victim").instances[0]  # type: ignore[index]
        assert outside.state == "cancelled" and CANCELLED_REASON[emulated.kind] in (outside.reason or ""), outside
        killed = status(d, runs["kill"], "victim").instances[0]  # type: ignore[index]
        assert killed.state == "failed" and killed.error, killed
        wait_for(emulated.all_elements_done, timeout=60, what="the scheduler to end every element")

        assert "adopted job found by tag" in d.log()
        assert executions(adopt_dir) == Counter({"prepare": 1, "work 0": 1, "work 1": 1, "work 2": 1, "total": 1})
        labels = executions(tmp_path / "crash")
        assert labels["prepare"] == 1 and labels["total"] == 1
        assert [labels[f"work {i}"] for i in range(10)] == [1] * 10, labels
        names = emulated.submissions_by_name()
        assert all(count == 1 for count in names.values()), names
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait(timeout=30)
