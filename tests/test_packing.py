"""Packed array jobs (#15): several elements per scheduler job, each still its own instance.

The pure parts (the ``pack`` setting, slicing, estimates, log sections, sorting a dead
job's elements) are tested directly; the behaviour end to end runs one scenario set on
the local scheduler and on the registry's real Slurm and one emulated system: packed runs
give the per-element states, results, logs, retries and exactly-once executions of an
unpacked run; a packed job whose worker is killed mid-slice fails only the element it was
running, and the ones it never started run later, once; kill -9 of reflowd during a packed
run adopts the job and loses nothing.
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

from reflow_client import jobfiles
from reflow_client.pack import DEFAULT_TARGET, OFF, PackSpec, parse_pack
from reflowd.driver import packing
from reflowd.engine.durations import estimate

from .cluster.wlm import WLM, cluster_table, envs
from .support import ROOT, DaemonProcess, wait_for

COUNTING = ROOT / "tests" / "engine_workflows" / "counting.py"

# ---------------------------------------------------------------------- pure parts


def test_pack_setting_spellings_and_refusals() -> None:
    assert parse_pack(None) is None
    assert parse_pack("off") == OFF and parse_pack(1) == OFF and parse_pack(False) == OFF
    assert parse_pack(50) == PackSpec(count=50)
    assert parse_pack("15m") == PackSpec(target=900.0) and parse_pack("1h30m") == PackSpec(target=5400.0)
    assert parse_pack("00:02:00") == PackSpec(target=120.0)
    assert parse_pack("auto") == PackSpec(target=DEFAULT_TARGET) == parse_pack(True)
    for bad, says in ((0, "out of range"), ("15", "ambiguous"), ("lots", "not a packing setting"),
                      (2.5, "not a packing setting"), ("30d", "out of range")):
        with pytest.raises(ValueError, match=says):
            parse_pack(bad)


def test_job_keyword_is_checked_where_the_task_is_defined() -> None:
    from reflow import Workflow

    def one() -> int:
        return 1

    wf = Workflow("packs")
    with pytest.raises(ValueError, match="pack only applies to array tasks"):
        wf.job(pack=10)(one)
    with pytest.raises(ValueError, match="ambiguous"):
        wf.job(array=True, pack="10")(one)


def test_plan_slices_by_count_by_target_and_within_the_time_limit() -> None:
    idx = list(range(10))
    assert packing.plan(idx, OFF, None, time_limit=None) is None
    assert packing.plan([3], PackSpec(count=5), None, time_limit=None) is None
    fixed = packing.plan(idx, PackSpec(count=4), None, time_limit=None)
    assert fixed is not None and fixed.slices == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert packing.plan(idx, PackSpec(target=60), None, time_limit=None) is None, "automatic needs history"
    est = estimate([2.0] * 10)
    auto = packing.plan(idx, PackSpec(target=10), est, time_limit=None)
    assert auto is not None and [len(s) for s in auto.slices] == [5, 5]
    capped = packing.plan(idx, PackSpec(count=10), est, time_limit=8)
    assert capped is not None and max(len(s) for s in capped.slices) == 2, "half the time limit per job"
    spread = packing.plan(idx, PackSpec(count=10), None, time_limit=None, parallel=2)
    assert spread is not None and [len(s) for s in spread.slices] == [5, 5], "every free slot gets work"
    assert sorted(i for s in fixed.slices for i in s) == idx


def test_estimate_needs_a_few_samples() -> None:
    assert estimate([1.0, 2.0]) is None
    found = estimate([1.0] * 19 + [10.0])
    assert found is not None and found.samples == 20 and found.high == 1.0 and 1.0 < found.mean < 2.0


def test_log_section_cuts_one_elements_output() -> None:
    text = "".join(f"{jobfiles.section_header(i, 1)}\nelement {i} says hi\n" for i in (4, 5, 6))
    assert packing_log(text, 5) == "element 5 says hi\n"
    assert packing_log(text, 6) == "element 6 says hi\n"
    assert packing_log(text, 7) is None
    again = text + f"{jobfiles.section_header(5, 2)}\nsecond try\n"
    assert packing_log(again, 5) == "second try\n", "the latest attempt's section"


def packing_log(text: str, index: int) -> str | None:
    return jobfiles.log_section(text, index)


# ---------------------------------------------------------------------- end to end


def executions(run_dir: Path) -> Counter[str]:
    path = run_dir / "executions.txt"
    return Counter(line.split(" pid=")[0] for line in (path.read_text().splitlines() if path.exists() else []))


def pid_of(run_dir: Path, label: str) -> int | None:
    path = run_dir / "executions.txt"
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.split(" pid=")[0] == label:
            return int(line.split(" pid=")[1])
    return None


def submit(d: DaemonProcess, run_dir: Path, *args: str) -> str:
    out = d.cli("submit", str(COUNTING), "--run-dir", str(run_dir), "--no-daemon", "--json", *args, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["run_id"]


def status(d: DaemonProcess, run_id: str, task: str | None = None) -> Any:
    with d.client() as c:
        return c.status(run_id, task)


def wait_state(d: DaemonProcess, run_id: str, timeout: float = 300) -> str:
    return wait_for(lambda: (s := status(d, run_id).state) in ("succeeded", "failed", "cancelled") and s,
                    timeout=timeout, interval=0.5, what=f"run {run_id} to end")


def states(d: DaemonProcess, run_id: str) -> dict[int, str]:
    return {i.index: i.state for i in status(d, run_id, "work").instances or []}


def work_jobs(d: DaemonProcess, run_id: str) -> set[str]:
    return {i.job_id.split("_")[0] for i in status(d, run_id, "work").instances or [] if i.job_id}


def packed_scenarios(d: DaemonProcess, base: Path, worker_kill_state: str) -> None:
    """The behaviour every scheduler must show with ``pack = 4`` on its cluster."""
    # 1. Same states, results, logs and retries as unpacked; one element's exception is its own.
    same = base / "same"
    run = submit(d, same, "--n", "10", "--fail-on", "3")
    assert wait_state(d, run) == "failed"
    assert states(d, run) == {i: "failed" if i == 3 else "succeeded" for i in range(10)}
    assert len(work_jobs(d, run)) < 10, "elements shared jobs"
    failure = next(f for f in status(d, run).failures if f.task == "work")
    assert failure.index == 3 and "ValueError: bad input 3" in (failure.error or "")
    assert "Traceback" in (failure.traceback or "")
    logs = d.cli("logs", run, "work", "--index", "5")
    assert logs.returncode == 0 and "element 5 done" in logs.stdout, logs.stdout + logs.stderr
    assert "element 4 done" not in logs.stdout and "element 6 done" not in logs.stdout, logs.stdout
    (same / "fixed").write_text("")
    d.cli("retry", run, check=True)
    assert wait_state(d, run) == "succeeded"
    counts = executions(same)
    assert counts["work 3"] == 2 and all(counts[f"work {i}"] == 1 for i in range(10) if i != 3), counts
    with d.client() as c:
        total = json.dumps(c.results(run, "total"))
    assert str(sum(i * i for i in range(10))) in total, total

    # 2. A packed job whose worker is killed mid-slice. Its elements from 1 on wait for a gate, so when the
    #    test kills the worker that wrote "work 1", 0 has finished, 1 runs and 2, 3 never started, however
    #    slowly a loaded machine runs them (a 1.5 s element could be over before the kill).
    killed, crashed = base / "killed", base / "crashed"
    gate_k, gate_c = base / "gate_killed", base / "gate_crashed"
    try:
        run_k = submit(d, killed, "--n", "8", "--gate", str(gate_k), "--gate-from", "1")
        pid = wait_for(lambda: pid_of(killed, "work 1"), timeout=240, what="element 1 to start")
        os.kill(pid, signal.SIGKILL)
        gate_k.touch()
        # 3. reflowd killed with -9 while a packed job is mid-slice (0 finished, 1 held by its gate): the next
        #    daemon adopts the job, keeps 0's result and lets the slice go on once the gate opens.
        run_c = submit(d, crashed, "--n", "8", "--gate", str(gate_c), "--gate-from", "1")
        wait_for(lambda: executions(crashed)["work 1"], timeout=240, what="the crash run's element 1 to start")
        d.kill9()
        d.start()
        gate_c.touch()
        assert wait_state(d, run_c) == "succeeded", \
            (states(d, run_c), [(f.index, f.state, f.error, f.reason) for f in status(d, run_c).failures])
        assert wait_state(d, run_k) == "failed"
        killed_states = states(d, run_k)
        assert killed_states == {i: worker_kill_state if i == 1 else "succeeded" for i in range(8)}, killed_states
        assert all(n == 1 for n in executions(killed).values()) and len(executions(killed)) == 9, executions(killed)
        assert [executions(crashed)[f"work {i}"] for i in range(8)] == [1] * 8, executions(crashed)
        assert executions(crashed)["total"] == 1
    finally:  # (a worker still held would wait 10 minutes for its gate)
        gate_k.touch()
        gate_c.touch()


def local_config(pack: Any = 4) -> str:
    return '[clusters.local]\nscheduler = "local"\nmax_workers = 2\n' + (f"pack = {json.dumps(pack)}\n")


def test_packed_on_the_local_scheduler(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "d", config=local_config())
    d.start()
    try:
        packed_scenarios(d, tmp_path, "failed")
    finally:
        d.stop()


WLMS = [p for p in envs() if p.id in ("slurm-plain", "pbs-emu")]


@pytest.mark.parametrize("wlm_name", WLMS, indirect=True)
def test_packed_on_a_workload_manager(wlm: WLM, tmp_path: Path) -> None:
    table = wlm.table(python=sys.executable, pack=4, **wlm.env.poll)
    d = DaemonProcess(tmp_path / "d", config='[defaults]\ncluster = "hpc"\n\n' + cluster_table("hpc", table),
                      env=wlm.daemon_env())
    d.start()
    try:
        packed_scenarios(d, tmp_path, wlm.env.worker_kill_state)
        wlm.tags_used_once()
    finally:
        d.stop()


def test_automatic_packing_needs_history_then_packs(tmp_path: Path) -> None:
    """The default (``pack = "auto"``): a first run has no history and goes one element per job; the
    next run of the same task is packed from the durations the first one measured."""
    d = DaemonProcess(tmp_path / "d", config='[clusters.local]\nscheduler = "local"\nmax_workers = 2\n')
    d.start()
    try:
        first = submit(d, tmp_path / "first", "--n", "8")
        assert wait_state(d, first) == "succeeded"
        with d.client() as c:
            keys = {i.job_id for i in c.status(first, "work").instances or []}
        assert len(keys) == 8, f"no history: one element per job {keys}"
        second = submit(d, tmp_path / "second", "--n", "8", "--fail-on", "99")  # other inputs: no cache hits
        assert wait_state(d, second) == "succeeded"
        with d.client() as c:
            keys = {i.job_id for i in c.status(second, "work").instances or []}
        # Tiny elements: less work than a second interpreter start is worth, so one job (at most one per slot).
        assert 1 <= len(keys) <= 2, f"packed from the measured durations: {keys}"
        assert executions(tmp_path / "second")["work 5"] == 1
    finally:
        d.stop()


def test_packed_job_killed_for_its_time_limit(tmp_path: Path) -> None:
    """Elements 0 and 1 finish, 2 runs into the job's time limit (TIMEOUT, its retry runs alone and
    times out again), 3 never starts and runs later in a job of its own, once, attempt 1."""
    d = DaemonProcess(tmp_path / "d", config='[clusters.local]\nscheduler = "local"\nmax_workers = 2\n')
    d.start()
    try:
        out = d.cli("submit", str(ROOT / "tests" / "engine_workflows" / "packed_timeout.py"), "--run-dir",
                    str(tmp_path / "run"), "--no-daemon", "--json", check=True)
        run = json.loads(out.stdout.strip().splitlines()[-1])["run_id"]
        assert wait_state(d, run) == "failed"
        work = {i.index: i for i in status(d, run, "work").instances or []}
        assert {k: i.state for k, i in work.items()} == {0: "succeeded", 1: "succeeded", 2: "timeout",
                                                         3: "succeeded"}, work
        assert work[2].attempt == 2 and work[3].attempt == 1, "the never-started element was no failure"
        assert executions(tmp_path / "run") == Counter({"work 0": 1, "work 1": 1, "work 2": 2, "work 3": 1})
        assert work[0].job_id == work[1].job_id, "0 and 1 ran in one packed job"
        assert len({work[2].job_id, work[3].job_id, work[0].job_id}) == 3, "the retry and the requeued run apart"
    finally:
        d.stop()


def test_embedded_run_packs_and_runs_a_wide_tasks_elements_side_by_side(tmp_path: Path) -> None:
    """run_local uses the same packing: pack=4 with cpus=2 is one job of 4 elements per 2 CPUs, two at a
    time, each element in a process forked from the job's worker (the workflow imported once)."""
    from reflow.loader import load_workflow

    wf = load_workflow(ROOT / "tests" / "engine_workflows" / "packed_wide.py")
    result = wf.run_local(tmp_path, max_workers=2, n=8)
    assert result.ok, result.failures
    assert result.outputs["total"] == sum(x * 10 for x in range(8))
    spans = [line.split() for line in (tmp_path / "spans.txt").read_text().splitlines()]
    assert sorted(int(s[0]) for s in spans) == list(range(8)), "every element once"
    parents = Counter(s[2] for s in spans)
    assert sorted(parents.values()) == [4, 4], f"two jobs of four elements, forked from one worker each: {parents}"
    by_parent: dict[str, list[tuple[float, float]]] = {}
    for s in spans:
        by_parent.setdefault(s[2], []).append((float(s[3]), float(s[4])))
    overlapping = any(a[0] < b[1] and b[0] < a[1] for v in by_parent.values() for a in v for b in v if a != b)
    assert overlapping, "a job runs two of its elements at once"


def test_cancelling_a_packed_run(tmp_path: Path) -> None:
    """Cancel while packed jobs run: the jobs end, finished elements stay succeeded, the rest are cancelled."""
    d = DaemonProcess(tmp_path / "d", config=local_config())
    d.start()
    try:
        run = submit(d, tmp_path / "run", "--n", "8", "--delay", "3")
        wait_for(lambda: executions(tmp_path / "run")["work 1"], timeout=240, what="element 1 to start")
        with d.client() as c:
            assert c.cancel(run) >= 1
        assert wait_state(d, run) == "cancelled"
        final = states(d, run)
        assert set(final.values()) <= {"succeeded", "cancelled"} and final[1] == "cancelled", final
        assert "total" not in executions(tmp_path / "run")
        ran = executions(tmp_path / "run")
        assert all(n == 1 for n in ran.values()), ran
        assert not any(final[i] == "succeeded" and f"work {i}" not in ran for i in final), "no result without a run"
    finally:
        d.stop()


def cancel_one_element_scenario(d: DaemonProcess, base: Path, restart: bool = False) -> None:
    """Cancelling one element of a packed job, while it runs and before it starts, leaves its slice-mates alone:
    the running one stops and its job goes on with the next element, the unstarted one never runs, the rest
    finish, each once, and status shows exactly those two cancelled."""
    run_dir = base / "cancel1"
    run = submit(d, run_dir, "--n", "8", "--delay", "4")
    wait_for(lambda: pid_of(run_dir, "work 1"), timeout=240, what="element 1 to start")
    assert executions(run_dir)["work 3"] == 0, "element 3 must not have started yet (4 s elements, pack = 4)"
    with d.client() as c:
        assert c.cancel(run, "work", 1) == 1, "the running element"
        assert c.cancel(run, "work", 3) == 1, "an element of the same job that has not started"
        assert c.cancel(run, "work", 1) == 0, "cancelling it again changes nothing"
    with pytest.raises(Exception, match="needs --task"):
        with d.client() as c:
            c.cancel(run, None, 2)
    if restart:  # reflowd killed right after: the next one adopts the job and writes the markers again
        d.kill9()
        d.start()
    wait_for(lambda: all(s in ("succeeded", "cancelled") for s in states(d, run).values()) and states(d, run),
             timeout=300, interval=0.5, what="the other elements to finish")
    assert wait_state(d, run) in ("failed", "cancelled")
    final = states(d, run)
    assert final == {i: "cancelled" if i in (1, 3) else "succeeded" for i in range(8)}, final
    ran = executions(run_dir)
    assert "work 3" not in ran and "total" not in ran, ran
    assert all(n == 1 for n in ran.values()), ran
    assert pid_of(run_dir, "work 2") == pid_of(run_dir, "work 1"), "element 1's job went on with element 2"
    logs = d.cli("logs", run, "work", "--index", "1")
    assert "element 1 done" not in logs.stdout, "element 1 was stopped while it slept"
    assert "cancelled by reflowd while running" in logs.stdout + logs.stderr, logs.stdout + logs.stderr


def test_cancel_one_element_of_a_packed_job_on_the_local_scheduler(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "d", config=local_config())
    d.start()
    try:
        cancel_one_element_scenario(d, tmp_path)
        cancel_one_element_scenario(d, tmp_path / "again", restart=True)
    finally:
        d.stop()


@pytest.mark.parametrize("wlm_name", WLMS, indirect=True)
def test_cancel_one_element_of_a_packed_job_on_a_workload_manager(wlm: WLM, tmp_path: Path) -> None:
    table = wlm.table(python=sys.executable, pack=4, **wlm.env.poll)
    d = DaemonProcess(tmp_path / "d", config='[defaults]\ncluster = "hpc"\n\n' + cluster_table("hpc", table),
                      env=wlm.daemon_env())
    d.start()
    try:
        cancel_one_element_scenario(d, tmp_path)
    finally:
        d.stop()


def test_queue_cap_counts_a_packed_slice_as_one_job() -> None:
    """A per-user queue limit counts scheduler jobs: a batch that packs is cut by its slices, not its elements."""
    from reflowd.engine.model import Instance

    insts = [Instance(run_id="r", task="work", index=i) for i in range(12)]
    packed = packing.Plan([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]], 1, "pack=4")
    kept, leftover = packing.fit_groups([(insts, packed)], room=2)
    assert [p.slices for _, p in kept if p] == [[[0, 1, 2, 3], [4, 5, 6, 7]]], "two slices fit in two queue slots"
    assert [i.index for i in kept[0][0]] == list(range(8)) and [i.index for i in leftover] == [8, 9, 10, 11]
    assert packing.jobs_of(kept) == 2
    kept, leftover = packing.fit_groups([(insts[:3], None), (insts[3:], packed)], room=4)
    assert packing.jobs_of(kept) == 4 and len(kept[0][0]) == 3, "three unpacked elements, then one slice"


def queue_cap_scenario(d: DaemonProcess, base: Path) -> None:
    """``max_queued = 2`` with ``pack = 4``: 16 elements go out as 4 jobs of 4, never more than 2 jobs at a time
    (before, the cap cut batches to 2 elements, which then went out one per job: 16 jobs)."""
    run = submit(d, base / "run", "--n", "16", "--delay", "0.3")
    most = 0

    def live_jobs() -> bool:
        nonlocal most
        insts = status(d, run, "work").instances or []
        most = max(most, len({i.job_id for i in insts if i.state in ("queued", "running") and i.job_id}))
        return status(d, run).state != "running"

    wait_for(live_jobs, timeout=300, interval=0.2, what="the run to end")
    assert wait_state(d, run) == "succeeded"
    keys = {i.job_id for i in status(d, run, "work").instances or []}
    assert len(keys) == 4, f"four packed jobs of four elements: {keys}"
    assert 1 <= most <= 2, most
    assert all(executions(base / "run")[f"work {i}"] == 1 for i in range(16))


def test_queue_cap_lets_packed_jobs_through_on_the_local_scheduler(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "d", config=local_config() + "max_queued = 2\n")
    d.start()
    try:
        queue_cap_scenario(d, tmp_path)
    finally:
        d.stop()


@pytest.mark.parametrize("wlm_name", [p for p in WLMS if p.id == "slurm-plain"], indirect=True)
def test_queue_cap_lets_packed_jobs_through_on_slurm(wlm: WLM, tmp_path: Path) -> None:
    table = wlm.table(python=sys.executable, pack=4, max_queued=2, **wlm.env.poll)
    d = DaemonProcess(tmp_path / "d", config='[defaults]\ncluster = "hpc"\n\n' + cluster_table("hpc", table),
                      env=wlm.daemon_env())
    d.start()
    try:
        queue_cap_scenario(d, tmp_path)
    finally:
        d.stop()


@pytest.mark.parametrize("width", [1, 2])
def test_worker_stops_a_cancelled_running_element_and_goes_on(tmp_path: Path, width: int) -> None:
    """The packed worker itself, on job files written by hand: a cancel marker for the element it runs
    stops that element (an exception inside the task, not a kill) and the slice goes on; a marked element
    it has not started is skipped. With ``width`` 2 each element runs in a forked child with its own watch."""
    import subprocess
    import time

    from reflow_client import codec

    run_dir, job_dir = tmp_path / "run", tmp_path / "job"
    run_dir.mkdir()
    (job_dir / "inputs").mkdir(parents=True)
    job = {"run_id": "r1", "workflow": "counting", "task": "work", "entrypoint": str(COUNTING),
           "run_dir": str(run_dir), "tag": "rftest", "kwargs": {"delay": 3.0}, "slices": [[0, 1, 2, 3]],
           "width": width}
    (job_dir / jobfiles.JOB_FILE).write_bytes(jobfiles.dumps(job))
    for i in range(4):
        Path(jobfiles.inputs_path(str(job_dir), i)).write_bytes(
            jobfiles.dumps({"index": i, "identity": f"id{i}", "attempt": 1, "kwargs": {"x": codec.encode(i)}}))
    proc = subprocess.Popen([sys.executable, "-m", "reflow.worker", str(job_dir), "--packed", "--index", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
    try:
        running = 1 if width == 1 else 0
        wait_for(lambda: pid_of(run_dir, f"work {running}"), timeout=120, what=f"element {running} to start")
        t0 = time.monotonic()
        os.makedirs(job_dir / "cancel", exist_ok=True)
        Path(jobfiles.cancel_path(str(job_dir), 3)).write_bytes(b"{}")  # not started: skipped
        Path(jobfiles.cancel_path(str(job_dir), running)).write_bytes(b"{}")  # running: stopped
        wait_for(lambda: os.path.exists(jobfiles.result_path(str(job_dir), running)), timeout=60,
                 what="the cancelled element's result")
        assert time.monotonic() - t0 < 2.9, "stopped within a poll, not after its 3 s sleep"
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (out, err)
    results = {i: json.loads(Path(jobfiles.result_path(str(job_dir), i)).read_text())
               for i in range(4) if os.path.exists(jobfiles.result_path(str(job_dir), i))}
    assert sorted(results) == [0, 1, 2], "element 3 was skipped"
    assert "cancelled by reflowd while running" in results[running]["error"]
    assert all(results[i]["state"] == "succeeded" for i in results if i != running), results
    ran = executions(run_dir)
    assert "work 3" not in ran and all(ran[f"work {i}"] == 1 for i in range(3)), ran
    if width == 1:
        assert len({pid_of(run_dir, f"work {i}") for i in range(3)}) == 1, "one process ran the slice"


def test_a_cancel_survives_a_kill_9_right_after_it(tmp_path: Path) -> None:
    """A task cancel the client was told about is durable: reflowd killed with -9 at once and restarted does
    not run what was cancelled (it used to: the cancel was still in the store's write queue).

    Every element waits for a gate, so all 8 are live when the cancel comes, however loaded the machine
    (3-second elements could finish between the start and the reply). The gate opens only once the
    cancelled jobs' workers are gone: a job left running would go on to its next element then."""
    d = DaemonProcess(tmp_path / "d", config=local_config())
    d.start()
    gate = tmp_path / "gate"
    try:
        run_dir = tmp_path / "run"
        run = submit(d, run_dir, "--n", "8", "--gate", str(gate))
        wait_for(lambda: pid_of(run_dir, "work 0") or pid_of(run_dir, "work 4"), timeout=240,
                 what="a packed job to start")
        with d.client() as c:
            assert c.cancel(run, "work") == 8
        d.kill9()
        d.start()
        assert wait_state(d, run) in ("failed", "cancelled")
        assert states(d, run) == dict.fromkeys(range(8), "cancelled"), states(d, run)
        workers = {int(line.split(" pid=")[1]) for line in (run_dir / "executions.txt").read_text().splitlines()
                   if line.startswith("work ")}
        wait_for(lambda: not any(alive(p) for p in workers), timeout=120, what="the cancelled jobs' workers to stop")
        gate.touch()
        ran = executions(run_dir)
        assert "total" not in ran and all(n == 1 for n in ran.values()), ran
        assert len([k for k in ran if k.startswith("work ")]) == len(workers), \
            f"a cancelled packed job went on to its next element: {ran}"
        assert states(d, run) == dict.fromkeys(range(8), "cancelled"), states(d, run)
    finally:
        gate.touch()  # (a worker still held would wait for it for 10 minutes)
        d.stop()


def alive(pid: int) -> bool:
    """Whether process *pid* runs (a zombie waiting for its parent to reap it does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
