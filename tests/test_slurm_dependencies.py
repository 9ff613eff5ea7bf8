"""Slurm-side dependencies on the real Slurm cluster (tests/cluster/slurm.sh): a gather submitted while
its upstream array runs, waiting in Slurm's queue on ``afterok``, resolving its inputs from the
upstream's result files, adopted by the engine with no second sbatch -- or dropped (cancelled) when the
engine has no use for it: a cache hit, a run cancel, an upstream element retried. And a daemon killed
with SIGKILL while the early job waits finds it again on restart.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from .cluster.wlm import WLM, cluster_table
from .support import DaemonProcess, wait_for
from .test_scheduler_engine import EXAMPLE, check_readme_pipeline, kill, manifest_of, status, wait_state
from .test_scheduler_engine import submit as submit_cli

CHAIN = Path(__file__).parent / "engine_workflows" / "early_chain.py"

SLURM_PLAIN = pytest.mark.parametrize("wlm_name", [pytest.param("slurm-plain", marks=pytest.mark.slurm)],
                                      indirect=True)


def start(wlm: WLM, base: Path, dependencies: bool = True) -> DaemonProcess:
    # (a generous command budget: an early sbatch waits for a spare token, and the runs here go at once)
    table = wlm.table(None, python=sys.executable, **wlm.env.poll, slurm_dependencies=dependencies,
                      max_calls_per_minute=600)
    d = DaemonProcess(base, config='[defaults]\ncluster = "hpc"\n\n' + cluster_table("hpc", table),
                      env=wlm.daemon_env())
    return d.start()


def submit(d: DaemonProcess, run_dir: Path, options: dict[str, Any] | None = None, **params: Any) -> str:
    run_dir.mkdir(parents=True, exist_ok=True)
    with d.client() as c:
        return c.submit(*manifest_of(CHAIN, **params), str(run_dir), options=options).run_id


def executions(run_dir: Path) -> Counter[str]:
    path = run_dir / "executions.txt"
    return Counter(line.split(" pid=")[0] for line in (path.read_text().splitlines() if path.exists() else []))


def job_dirs(run_dir: Path, run_id: str, task: str) -> list[tuple[str, bool]]:
    """(tag, submitted early?) of every job directory the daemon made for *task*: one per sbatch."""
    out = []
    for path in sorted((run_dir / ".reflow" / run_id / "jobs").glob("*/job.json")):
        job = json.loads(path.read_text())
        if job["task"] == task:
            out.append((path.parent.name, "deferred" in job))
    return out


def job_named(tag: str) -> tuple[str, str] | None:
    """(job id, state) of the Slurm job named *tag*."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "--name", tag, "-o", "%i %T"], capture_output=True,
                         text=True, timeout=60).stdout.split()
    return (out[0], out[1]) if out else None


def early_waiting(run_dir: Path, run_id: str) -> tuple[str, str] | None:
    """The early ``total`` job once Slurm holds it pending on its dependency: (tag, job id)."""
    early = [tag for tag, deferred in job_dirs(run_dir, run_id, "total") if deferred]
    found = job_named(early[0]) if early else None
    return (early[0], found[0]) if found and found[1] == "PENDING" else None


def driver_counters(d: DaemonProcess) -> dict[str, int]:
    with d.client() as c:
        return c.stats()["clusters"]["hpc"].get("driver", {})


def states(d: DaemonProcess, run_id: str) -> dict[str, dict[str, int]]:
    return {t.name: t.counts for t in status(d, run_id).tasks}


@SLURM_PLAIN
def test_a_gather_waits_in_slurms_queue_and_is_adopted_cached_cancelled_or_dropped_for_a_retry(
        wlm: WLM, tmp_path: Path) -> None:
    d = start(wlm, tmp_path / "d")
    gate = tmp_path / "gate"
    try:
        plain = submit(d, tmp_path / "plain", n=6)
        cancel = submit(d, tmp_path / "cancel", n=2, gate=str(gate))
        retry = submit(d, tmp_path / "retry", n=4, fail_once=2)

        # adopted: the early job is the one that ran, and nothing else was submitted for total
        assert wait_state(d, plain) == "succeeded", status(d, plain).raw
        assert states(d, plain) == {"prepare": {"succeeded": 1}, "work": {"succeeded": 6}, "total": {"succeeded": 1}}
        total = status(d, plain, "total").instances[0]  # type: ignore[index]
        assert int(total.output) == 0 + 1 + 4 + 9 + 16 + 25
        dirs = job_dirs(tmp_path / "plain", plain, "total")
        assert len(dirs) == 1 and dirs[0][1], f"one sbatch for total, the early one: {dirs}"
        # (the run's result is read as soon as the worker writes it: Slurm may show the job RUNNING a moment more)
        wait_for(lambda: job_named(dirs[0][0]) == (total.job_id, "COMPLETED"), timeout=60,
                 what=f"total's early job {total.job_id} to complete: {job_named(dirs[0][0])}")
        assert executions(tmp_path / "plain")["total"] == 1

        # cancelled with its run while it waits in the queue: scancel, and the task never runs
        tag, job_id = wait_for_early(d, lambda: early_waiting(tmp_path / "cancel", cancel), cancel,
                                     what="the cancel run's early job to wait on its dependency")
        with d.client() as c:
            c.cancel(cancel)
        assert wait_state(d, cancel) == "cancelled"
        assert states(d, cancel)["total"] == {"cancelled": 1}
        wait_for(lambda: (job_named(tag) or ("", ""))[1] == "CANCELLED", timeout=60,
                 what=f"early job {job_id} to be cancelled")

        # an upstream element that fails once: its early job is withdrawn (or Slurm kills it: invalid dependency),
        # the element is retried, and total goes out once more -- early again on the retried element's job, or
        # the usual way after it, as the timing falls: either way one job ran it, and each element ran once per
        # attempt
        assert wait_state(d, retry) == "succeeded", status(d, retry).raw
        assert int(status(d, retry, "total").instances[0].output) == 0 + 1 + 4 + 9  # type: ignore[index]
        assert executions(tmp_path / "retry") == {"prepare": 1, "work 0": 1, "work 1": 1, "work 2": 2, "work 3": 1,
                                                  "total": 1}
        dirs = job_dirs(tmp_path / "retry", retry, "total")

        def job_states() -> dict[str, str]:
            return {tag: (job_named(tag) or ("", ""))[1] for tag, _ in dirs}

        wait_for(lambda: sorted(job_states().values()) == ["CANCELLED", "COMPLETED"], timeout=60,  # withdrawn, one ran
                 what=f"one of total's jobs withdrawn and one completed: {dirs}")
        ended = job_states()
        assert all(deferred for tag, deferred in dirs if ended[tag] == "CANCELLED"), (dirs, ended)
        retry_early = sum(deferred for tag, deferred in dirs if ended[tag] == "COMPLETED")  # (went early again)

        # a cache hit: the upstream ran again (its cache entries gone) with the same outputs; the early job
        # (held in the queue here, so that it cannot start first) is cancelled and total is cached
        with sqlite3.connect(d.state_dir / "cache.sqlite", timeout=30) as db:
            db.execute("DELETE FROM cache WHERE task = 'work'")
        again = submit(d, tmp_path / "plain", n=6)
        tag, job_id = wait_for_early(d, lambda: early_waiting(tmp_path / "plain", again), again,
                                     what="the second run's early job")
        subprocess.run(["scontrol", "hold", job_id], check=True, timeout=60)
        assert wait_state(d, again) == "succeeded", status(d, again).raw
        assert states(d, again) == {"prepare": {"cached": 1}, "work": {"succeeded": 6}, "total": {"cached": 1}}
        wait_for(lambda: (job_named(tag) or ("", ""))[1] == "CANCELLED", timeout=60,
                 what=f"early job {job_id} to be cancelled")
        assert executions(tmp_path / "plain")["total"] == 1
        counters = driver_counters(d)
        assert counters["early_adopted"] == 1 + retry_early, counters
        assert counters["early_submitted"] == 4 + retry_early, counters
        wlm.tags_used_once()
    finally:
        gate.touch()
        kill(d)


@SLURM_PLAIN
def test_a_daemon_killed_while_the_early_job_waits_adopts_it_on_restart_and_submits_nothing_twice(
        wlm: WLM, tmp_path: Path) -> None:
    d = start(wlm, tmp_path / "d")
    gate = tmp_path / "gate"
    run_dir = tmp_path / "run"
    try:
        run_id = submit(d, run_dir, n=3, gate=str(gate))
        tag, job_id = wait_for_early(d, lambda: early_waiting(run_dir, run_id), run_id,
                                     what="the early job to wait on its dependency")
        kill(d)
        gate.touch()  # the upstream ends while no daemon runs: Slurm starts the early job by itself
        d.start()
        assert wait_state(d, run_id) == "succeeded", status(d, run_id).raw
        total = status(d, run_id, "total").instances[0]  # type: ignore[index]
        assert int(total.output) == 0 + 1 + 4 and total.job_id == job_id
        assert job_dirs(run_dir, run_id, "total") == [(tag, True)]
        assert executions(run_dir) == {"prepare": 1, "work 0": 1, "work 1": 1, "work 2": 1, "total": 1}
        with d.client() as c:
            assert c.stats()["clusters"]["hpc"]["calls"].get("submit", 0) == 0, "the restarted daemon submitted"
        wlm.tags_used_once()
    finally:
        gate.touch()
        kill(d)


@SLURM_PLAIN
def test_the_readme_pipeline_with_its_merge_submitted_early_gives_the_same_results(wlm: WLM, tmp_path: Path) -> None:
    d = start(wlm, tmp_path / "d")
    try:
        run_dir = tmp_path / "etl"
        run_id = submit_cli(d, EXAMPLE, run_dir, "--chunks", "100", "--rows", "200")
        check_readme_pipeline(d, wlm, run_id, run_dir, "hpc")  # results, 3 sbatch calls, logs, tags used once
        assert [deferred for _, deferred in job_dirs(run_dir, run_id, "merge")] == [True]
        assert driver_counters(d)["early_adopted"] == 1
        logs = d.cli("logs", run_id, "merge")
        assert logs.returncode == 0, logs.stdout + logs.stderr
    finally:
        kill(d)


# ---------------------------------------------------------------------- element-wise chains (aftercorr)

ELEMENTWISE = Path(__file__).parent / "engine_workflows" / "early_elementwise.py"


def submit_elementwise(d: DaemonProcess, run_dir: Path, pack: int | str = "off", **params: Any) -> str:
    """A run of the element-wise chain, ``work`` and ``double`` packed by *pack* -- never automatically: a run
    planned once another run's ``work`` has history but its ``double`` has none yet would pack ``work`` alone,
    and the chain, unaligned, goes out the usual way (seen in CI under load: no early array for 120 s)."""
    manifest, resolved = manifest_of(ELEMENTWISE, **params)
    for task in manifest["tasks"]:
        if task["name"] in ("work", "double"):
            task["config"]["pack"] = pack
    run_dir.mkdir(parents=True, exist_ok=True)
    with d.client() as c:
        return c.submit(manifest, resolved, str(run_dir), options=None).run_id


def early_double(run_dir: Path, run_id: str) -> tuple[str, str] | None:
    """The early ``double`` array once Slurm has it: (tag, job id)."""
    early = [tag for tag, deferred in job_dirs(run_dir, run_id, "double") if deferred]
    found = job_named(early[0]) if early else None
    return (early[0], found[0].split("_")[0]) if found else None


def wait_for_early(d: DaemonProcess, probe: Any, run_id: str, what: str) -> Any:
    """``wait_for(probe)``; on a timeout the failure also says what the daemon did about *run_id*'s early
    jobs (its driver counters and log lines), so a failure in CI can be told apart from a slow cluster."""
    try:
        return wait_for(probe, timeout=120, what=what)
    except AssertionError as exc:
        lines = [line for line in d.log_path.read_text(errors="replace").splitlines()
                 if run_id in line or '"reflowd.early"' in line or "early" in line]
        try:
            counters: Any = driver_counters(d)
        except Exception as err:  # (the daemon may be what failed)
            counters = f"unreadable: {err}"
        raise AssertionError(f"{exc}\ndriver counters: {counters}\ndaemon log about it (last 40):\n"
                             + "\n".join(lines[-40:])) from None


def outputs(d: DaemonProcess, run_id: str, task: str) -> dict[int, int]:
    return {i.index: int(i.output) for i in status(d, run_id, task).instances  # type: ignore[union-attr]
            if i.output is not None}


@SLURM_PLAIN
def test_an_elementwise_chain_waits_on_aftercorr_runs_each_element_once_and_skips_a_failed_upstream_element(
        wlm: WLM, tmp_path: Path) -> None:
    d = start(wlm, tmp_path / "d")
    gate = tmp_path / "gate"
    try:
        plain = submit_elementwise(d, tmp_path / "plain", n=4, gate=str(gate))
        # the other two are gated as well until their early array is in Slurm's queue: an upstream that ends (or
        # fails) before the driver's chain step looks at it leaves nothing to submit early (then it goes the
        # usual way, correctly, but this test is about the early way)
        packed = submit_elementwise(d, tmp_path / "packed", pack=2, n=6, gate=str(tmp_path / "gate_packed"))
        failing = submit_elementwise(d, tmp_path / "failing", n=4, fail=2, gate=str(tmp_path / "gate_failing"))
        for name, run_id in (("packed", packed), ("failing", failing)):
            wait_for_early(d, lambda: early_double(tmp_path / name, run_id), run_id,  # noqa: B023 (called at once)
                           what=f"the {name} run's early double array in Slurm's queue")
            (tmp_path / f"gate_{name}").touch()

        # double[0] runs on Slurm's own aftercorr while work[1..3] are still held by the gate
        wait_for(lambda: executions(tmp_path / "plain")["double 0"] == 1, timeout=120,
                 what="double[0] to run while work still runs")
        assert states(d, plain)["work"].get("succeeded", 0) <= 1  # the others wait for the gate
        gate.touch()
        assert wait_state(d, plain) == "succeeded", status(d, plain).raw
        assert outputs(d, plain, "double") == {0: 0, 1: 2, 2: 8, 3: 18}
        assert int(status(d, plain, "total").instances[0].output) == 28  # type: ignore[index]
        assert executions(tmp_path / "plain") == {"prepare": 1, "work 0": 1, "work 1": 1, "work 2": 1, "work 3": 1,
                                                  "double 0": 1, "double 1": 1, "double 4": 1, "double 9": 1,
                                                  "total": 1}
        dirs = job_dirs(tmp_path / "plain", plain, "double")
        assert len(dirs) == 1 and dirs[0][1], f"one sbatch for double, the early one: {dirs}"

        # packed alike (2 elements per array task on both sides): mirrored slice by slice
        assert wait_state(d, packed) == "succeeded", status(d, packed).raw
        assert outputs(d, packed, "double") == {i: 2 * i * i for i in range(6)}
        dirs = job_dirs(tmp_path / "packed", packed, "double")
        assert len(dirs) == 1 and dirs[0][1], dirs
        job = json.loads((tmp_path / "packed" / ".reflow" / packed / "jobs" / dirs[0][0] / "job.json").read_text())
        assert job["slices"] == [[0, 1], [2, 3], [4, 5]]
        assert set(executions(tmp_path / "packed").values()) == {1}

        # work[2] fails both attempts: Slurm cancels double's array task 2 (invalid dependency); the others run once
        assert wait_state(d, failing) == "failed"
        assert states(d, failing)["double"] == {"succeeded": 3, "upstream_failed": 1}
        assert outputs(d, failing, "double") == {0: 0, 1: 2, 3: 18}
        assert executions(tmp_path / "failing") == {"prepare": 1, "work 0": 1, "work 1": 1, "work 2": 2, "work 3": 1,
                                                    "double 0": 1, "double 1": 1, "double 9": 1}
        assert all(deferred for _, deferred in job_dirs(tmp_path / "failing", failing, "double"))
        counters = driver_counters(d)
        assert counters.get("chain_submitted", 0) >= 3 and counters.get("chain_unaligned", 0) == 0, counters
        wlm.tags_used_once()
    finally:
        for name in ("gate", "gate_packed", "gate_failing"):
            (tmp_path / name).touch()
        kill(d)


@SLURM_PLAIN
def test_a_daemon_killed_mid_chain_adopts_the_early_array_on_restart(wlm: WLM, tmp_path: Path) -> None:
    d = start(wlm, tmp_path / "d")
    gate = tmp_path / "gate"
    run_dir = tmp_path / "run"
    try:
        run_id = submit_elementwise(d, run_dir, n=3, gate=str(gate))
        tag, job_id = wait_for_early(d, lambda: early_double(run_dir, run_id), run_id,
                                     what="the early double array in Slurm's queue")
        kill(d)
        gate.touch()  # work ends while no daemon runs: Slurm starts double's tasks by itself
        d.start()
        assert wait_state(d, run_id) == "succeeded", status(d, run_id).raw
        assert outputs(d, run_id, "double") == {0: 0, 1: 2, 2: 8}
        assert {i.job_id.split("_")[0] for i in status(d, run_id, "double").instances} == {job_id}  # type: ignore[union-attr]
        assert job_dirs(run_dir, run_id, "double") == [(tag, True)]
        assert executions(run_dir) == {"prepare": 1, "work 0": 1, "work 1": 1, "work 2": 1, "double 0": 1,
                                       "double 1": 1, "double 4": 1, "total": 1}
        wlm.tags_used_once()
    finally:
        gate.touch()
        kill(d)


@SLURM_PLAIN
def test_an_adopted_early_task_slurm_cancels_for_an_upstream_job_that_ended_badly_runs_the_usual_way(
        wlm: WLM, tmp_path: Path) -> None:
    """work's elements all succeed (their results read), then each work job exits 3 (``exit_gate``): Slurm
    cancels double's tasks waiting on ``aftercorr`` (``--kill-on-invalid-dep``) although reflowd has already
    adopted them. None of them started: each element goes back to ready, runs once the usual way, and the run
    succeeds."""
    d = start(wlm, tmp_path / "d")
    exit_gate = tmp_path / "exit_gate"
    run_dir = tmp_path / "run"
    try:
        run_id = submit_elementwise(d, run_dir, n=3, exit_gate=str(exit_gate))
        tag, job_id = wait_for_early(d, lambda: early_double(run_dir, run_id), run_id,
                                     what="the early double array in Slurm's queue")
        # work succeeded (results read) while its jobs still run; double adopted its early array
        wait_for(lambda: states(d, run_id).get("work") == {"succeeded": 3}
                 and states(d, run_id).get("double") == {"queued": 3}, timeout=120,
                 what="work succeeded and double's early tasks adopted")
        assert {i.job_id.split("_")[0] for i in status(d, run_id, "double").instances} == {job_id}  # type: ignore[union-attr]
        exit_gate.touch()
        assert wait_state(d, run_id) == "succeeded", status(d, run_id).raw
        assert outputs(d, run_id, "double") == {0: 0, 1: 2, 2: 8}
        assert executions(run_dir) == {"prepare": 1, "work 0": 1, "work 1": 1, "work 2": 1, "double 0": 1,
                                       "double 1": 1, "double 4": 1, "total": 1}
        double = status(d, run_id, "double").instances
        assert all(i.attempt == 1 for i in double), "no failure counted"  # type: ignore[union-attr]
        assert job_id not in {i.job_id.split("_")[0] for i in double}, "they ran in jobs of their own"  # type: ignore[union-attr]
        assert driver_counters(d).get("early_requeued") == 3, driver_counters(d)
        wlm.tags_used_once()
    finally:
        exit_gate.touch()
        kill(d)
