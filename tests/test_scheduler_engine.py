"""reflowd driving every workload manager in the registry (tests/cluster/wlm.py) through the same tests.

Real Slurm (with and without accounting) and real Grid Engine, emulated PBS,
LSF and Flux (tests/emulators/); a system is added to every test here by
registering it there. A test that needs something not every system has takes
only the entries that have it (``envs(feature)``). Daemon starts, serial
submissions and crash recoveries are what costs time on every system, so the
crash, failure, cancel and refusal scenarios run side by side in one test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
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
VICTIMS = ROOT / "tests" / "engine_workflows" / "victims.py"

ALL = pytest.mark.parametrize("wlm_name", envs(), indirect=True)


def having(feature: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("wlm_name", envs(feature), indirect=True)


def config(wlm: WLM, options: dict[str, Any] | None = None, **more_clusters: dict[str, Any]) -> str:
    """``hpc`` (the default) with *options* in its submit_options, and one more cluster per keyword."""
    tables = {"hpc": options, **more_clusters}
    return '[defaults]\ncluster = "hpc"\n\n' + "\n".join(
        cluster_table(name, wlm.table(opts, python=sys.executable, **wlm.env.poll)) for name, opts in tables.items())


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
    """Submit with ``reflow-client submit``, as a user does."""
    extra = ["--cluster", cluster] if cluster else []
    out = d.cli("submit", str(workflow), "--run-dir", str(run_dir), "--no-daemon", "--json", *extra, *args,
                check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["run_id"]


def manifest_of(workflow: Path, submit_options: dict[str, Any] | None = None,
                **params: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A workflow's manifest (with *submit_options* on every task, as a decorator's) and resolved parameters."""
    from reflow.loader import load_workflow

    wf = load_workflow(workflow)
    manifest = wf.describe()
    for task in manifest["tasks"]:
        task["config"]["submit_options"] = {**task["config"].get("submit_options", {}), **(submit_options or {})}
    return manifest, wf.resolve_parameters(params)


def submit_api(d: DaemonProcess, workflow: Path, run_dir: Path, *, cluster: str | None = None,
               **params: Any) -> str:
    """Submit through the client library (what ``reflow-client submit`` sends, without a CLI process each)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with d.client() as c:
        return c.submit(*manifest_of(workflow, **params), str(run_dir), cluster=cluster).run_id


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


def interleave(scenarios: dict[str, list[tuple[str, Callable[[], object], Callable[[], None]]]],
               timeout: float = 300) -> None:
    """Advance several scenarios at once: each one's next action runs as soon as its condition holds.

    A scenario is a list of ``(what, condition, action)`` steps; the wait is bounded, never a sleep
    standing in for a condition.
    """
    steps = {name: list(todo) for name, todo in scenarios.items()}
    deadline = time.monotonic() + timeout
    while any(steps.values()):
        ready = [todo for todo in steps.values() if todo and todo[0][1]()]
        for todo in ready:
            todo.pop(0)[2]()
        if not ready:
            waiting = "; ".join(f"{name}: {todo[0][0]}" for name, todo in steps.items() if todo)
            assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {waiting}"
            time.sleep(0.2)


def instance(d: DaemonProcess, run_id: str, task: str, index: int | None = None) -> Any:
    return next(i for i in status(d, run_id, task).instances or [] if i.index == index)


# ---------------------------------------------------------------------- the README pipeline


def check_readme_pipeline(d: DaemonProcess, wlm: WLM, run_id: str, run_dir: Path, cluster: str) -> dict[str, Any]:
    assert wait_state(d, run_id) == "succeeded", status(d, run_id).raw
    st = status(d, run_id, "summarise")
    assert {t.name: t.counts for t in st.tasks}["summarise"] == {"succeeded": 100}
    array_ids = {i.job_id.split("_")[0] for i in st.instances or [] if i.job_id}
    assert len(array_ids) == 1, f"all 100 elements belong to one array job: {array_ids}"
    assert all(re.fullmatch(wlm.env.job_id, i.job_id or "") for i in st.instances or []), st.instances[0]
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
    shown = json.loads(daemon.cli("stats", "--json", check=True).stdout)["clusters"]["hpc"]["scheduler_stats"]
    assert shown.get("max_array_size", 0) >= 100, f"the probe's facts, as `reflow-client stats` shows them: {shown}"


@pytest.mark.ssh
@having("ssh")
def test_readme_pipeline_through_ssh(wlm: WLM, sshd: SSHServer, tmp_path: Path) -> None:
    workdir = tmp_path / "remote-scratch"
    workdir.mkdir()
    table = {k: v for k, v in wlm.table(python=sys.executable, workdir=str(workdir), **wlm.env.poll).items()
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


# ---------------------------------------------------------------------- crashes, failures, kills, cancels, refusals


@ALL
def test_crashes_failures_kills_cancels_and_refusals_side_by_side(wlm: WLM, tmp_path: Path) -> None:
    """Two daemons on the same scheduler at once, so that the set stays quick on every system.

    The crashing one takes a run through three crashes of reflowd:

    1. it dies right after the scheduler accepted ``prepare``, before recording the job id;
    2. the next reflowd finds that job by its tag and adopts it, then dies right before submitting
       the ``work`` array (its intent recorded, nothing sent);
    3. the next one finds no job under that tag and submits the array, and is killed with SIGKILL
       while the array runs; the last one finishes: every task ran once, every tag names one job.

    The steady one meanwhile:

    * element: one array element raises: it fails alone, with its traceback; ``retry`` reruns only it;
    * cancel: a run cancelled from the client ends its jobs;
    * victims: a job killed from outside (scancel, qdel, bkill, flux cancel) is cancelled, with the
      scheduler's reason; a job whose worker process is killed is concluded from the scheduler's
      record (never "lost");
    * refusals: a misspelt submit option is refused before anything is submitted; a queue the
      scheduler does not know makes the first job submit_failed, with the scheduler's message;
    * timeout (systems with ``time_limit``): a job past its 1-minute limit ends as "timeout", with the
      scheduler's TIMEOUT.
    """
    bad_queue, bad_queue_says = wlm.env.bad_queue
    crashing = DaemonProcess(tmp_path / "crashing", config=config(wlm), env=wlm.daemon_env())
    steady = DaemonProcess(tmp_path / "steady", config=config(wlm, noqueue=bad_queue), env=wlm.daemon_env())
    crash_dir = tmp_path / "crash"
    try:
        crashing.start(extra_env={"REFLOW_FAULT_POINTS": "after_submit"})
        crash = submit(crashing, COUNTING, crash_dir, "--n", "12", "--delay", "2")
        steady.start()
        with steady.client() as c, pytest.raises(InvalidParamsError) as info:
            c.submit(*manifest_of(SLURMY, submit_options={"partiton": "debug"}), str(tmp_path / "misspelt"))
        assert "partiton" in info.value.message and "partition" in info.value.message, info.value.message
        with steady.client() as c:
            assert c.runs() == [], "the refused run was not even recorded"
        # A job past its time limit takes the scheduler a minute or two to end: it runs meanwhile, on systems
        # that enforce the limit, rather than in a test (and a daemon) of its own.
        timed = submit(steady, SLURMY, tmp_path / "timeout", "--mode", "sleep", "--n", "1") \
            if wlm.env.has("time_limit") else None
        runs = {
            "element": submit_api(steady, COUNTING, tmp_path / "element", n=6, fail_on=3),
            "cancel": submit_api(steady, COUNTING, tmp_path / "cancel", n=2, delay=300),
            "victims": submit_api(steady, VICTIMS, tmp_path / "victims"),
            "noqueue": submit_api(steady, SLURMY, tmp_path / "noqueue", cluster="noqueue", n=1),
        }

        cancel_job: list[str] = []

        def died(d: DaemonProcess) -> bool:
            assert d.proc is not None
            return d.proc.poll() is not None

        def restart(d: DaemonProcess, after: str, fault: str | None = None) -> None:
            assert d.proc is not None and d.proc.returncode == 137, f"reflowd should have died {after}"
            # With a fault point set, the new reflowd may reach it (and exit 137) before it ever answers a
            # ping: the next step waits for that death, so do not wait for an answer here.
            d.start(extra_env={"REFLOW_FAULT_POINTS": fault} if fault else None, wait=fault is None)

        def adopted_then_restart() -> None:
            assert "adopted job found by tag" in crashing.log()
            assert executions(crash_dir) == Counter({"prepare": 1})
            restart(crashing, "right before submitting the work array")

        def kill9_and_restart() -> None:
            crashing.kill9()
            crashing.start()

        def cancel_known() -> bool:
            ids = [i.job_id for i in status(steady, runs["cancel"], "work").instances or [] if i.job_id]
            cancel_job[:] = [ids[0].split("_")[0]] if ids and started_work(tmp_path / "cancel") else []
            return bool(cancel_job)

        def cancel_run() -> None:
            with steady.client() as c:
                assert c.cancel(runs["cancel"]) >= 1

        def victims_run() -> bool:
            return all((tmp_path / "victims" / f"{n}.pid").exists() for n in ("outside", "worker"))

        def kill_victims() -> None:
            wlm.kill_job(job_of(steady, runs["victims"], "outside"))
            os.kill(int((tmp_path / "victims" / "worker.pid").read_text()), signal.SIGKILL)

        def element_failed_then_retry() -> None:
            work = {i.index: i.state for i in status(steady, runs["element"], "work").instances or []}
            assert work == {0: "succeeded", 1: "succeeded", 2: "succeeded", 3: "failed", 4: "succeeded",
                            5: "succeeded"}, work
            assert {t.name: t.counts for t in status(steady, runs["element"]).tasks}["total"] == \
                {"upstream_failed": 1}
            failure = next(f for f in status(steady, runs["element"]).failures if f.task == "work")
            assert failure.index == 3 and failure.job_id and "ValueError: bad input 3" in (failure.error or ""), \
                failure
            assert "Traceback" in (failure.traceback or ""), failure
            (tmp_path / "element" / "fixed").write_text("")
            steady.cli("retry", runs["element"], check=True)

        interleave({
            "crashing": [
                ("reflowd to die after a submission", lambda: died(crashing),
                 lambda: restart(crashing, "right after submitting prepare", "before_submit")),
                ("reflowd to die before a submission", lambda: died(crashing), adopted_then_restart),
                ("the crash run's array to run", lambda: started_work(crash_dir, 2), kill9_and_restart),
            ],
            "victims": [("both victims to run", victims_run, kill_victims)],
            "cancel": [("the cancelled run's elements to run", cancel_known, cancel_run)],
            "element": [("the element run to fail", lambda: status(steady, runs["element"]).state == "failed",
                         element_failed_then_retry)],
        })

        final = {name: wait_state(steady, run_id) for name, run_id in runs.items()}
        final["crash"] = wait_state(crashing, crash)
        assert final == {"element": "succeeded", "cancel": "cancelled", "victims": "failed", "noqueue": "failed",
                         "crash": "succeeded"}, final

        labels = executions(crash_dir)
        assert labels["prepare"] == 1 and labels["total"] == 1
        assert [labels[f"work {i}"] for i in range(12)] == [1] * 12, labels
        counts = executions(tmp_path / "element")
        assert counts["work 3"] == 2 and counts["total"] == 1, "the retry reran only the failed element"
        assert all(counts[f"work {i}"] == 1 for i in (0, 1, 2, 4, 5)), counts

        wait_for(lambda: not wlm.live_jobs(set(cancel_job)), timeout=120, what="the cancel to end the array job")
        assert "total" not in executions(tmp_path / "cancel")

        outside = instance(steady, runs["victims"], "outside")
        assert outside.state == "cancelled" and wlm.env.cancelled_reason in (outside.reason or ""), outside
        assert re.fullmatch(wlm.env.job_id, outside.job_id or ""), outside.job_id
        worker = instance(steady, runs["victims"], "worker")
        assert worker.state == wlm.env.worker_kill_state, worker
        assert worker.error and worker.reason != "lost", "the scheduler's own record explains the end"

        items = instance(steady, runs["noqueue"], "items")
        assert items.state == "submit_failed" and bad_queue_says in (items.error or ""), items

        if timed is not None:  # the time limit: exceeded is "timeout", with the scheduler's TIMEOUT
            assert wait_state(steady, timed, timeout=400) == "failed"
            victim = instance(steady, timed, "victim")
            assert victim.state == "timeout", victim
            assert "TIMEOUT" in (victim.reason or "")
        wlm.tags_used_once()
    finally:
        kill(crashing)
        kill(steady)


# ---------------------------------------------------------------------- what only some systems have


# ---------------------------------------------------------------------- refusals


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
