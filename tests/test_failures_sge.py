"""Retries by cause and queue limits on the real Grid Engine cluster (tests/cluster/sge.sh).

Grid Engine enforces a time limit to the second (``h_rt``) and memory with
``h_vmem``, so these scenarios are short: a 10 s limit, 250M of memory. Each
test holds the cluster for well under a minute or two; the scenarios of the
first run side by side on one daemon.

What Grid Engine really reports (checked here and recorded in tests/data/sge/):

* past ``h_rt``: ``failed 37 : qmaster enforced h_rt, h_cpu, or h_vmem limit``, exit 137;
* one process over ``h_vmem``: nothing from Grid Engine -- h_vmem is the process's RLIMIT_AS, the
  allocation fails, Python raises MemoryError, the job exits 1 (``failed 0``);
* the job's processes together over ``h_vmem``: the execd kills it (``failed 37``, exit 137) and
  ``maxvmem`` shows the peak, above the limit;
* ``qdel`` of a running job (or any SIGKILL from outside): ``failed 100 : assumedly after job``, exit 137.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from reflow_client.resources import parse_mem

from .cluster.wlm import WLM
from .support import DaemonProcess, wait_for
from .test_scheduler_engine import (
    VICTIMS,
    config,
    job_of,
    kill,
    manifest_of,
    status,
    submit_api,
    wait_state,
)

ENGINE_WORKFLOWS = Path(__file__).parent / "engine_workflows"
OVERTIME = ENGINE_WORKFLOWS / "overtime.py"
MEMORY = ENGINE_WORKFLOWS / "memory.py"
SLURMY = ENGINE_WORKFLOWS / "slurmy.py"

SGE = pytest.mark.parametrize("wlm_name", [pytest.param("sge", marks=pytest.mark.sge)], indirect=True)

#: A queue made for one test: its h_rt caps the time escalation (sge.sh removes it if a test dies).
CAPPED = "reflow_test_capped.q"


def qconf(*args: str, stdin: str | None = None) -> str:
    out = subprocess.run(["qconf", *args], capture_output=True, text=True, timeout=60, input=stdin)
    assert out.returncode == 0, f"qconf {' '.join(args)}: {out.stderr or out.stdout}"
    return out.stdout


def load(flag: str, name: str, text: str) -> None:
    """``qconf -Aq``/``-Mconf`` read a file (named as the object for -Mconf)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_text(text)
        qconf(flag, str(path))


def make_capped_queue(h_rt: str, h_vmem: str) -> None:
    lines = []
    for line in qconf("-sq", "all.q").splitlines():
        key = line.split(" ", 1)[0]
        lines.append({"qname": f"qname {CAPPED}", "h_rt": f"h_rt {h_rt}", "h_vmem": f"h_vmem {h_vmem}"}.get(key, line))
    if CAPPED in qconf("-sql").split():
        qconf("-dq", CAPPED)
    load("-Aq", CAPPED, "\n".join(lines) + "\n")


def remove_capped_queue() -> None:
    wait_for(lambda: CAPPED not in subprocess.run(["qstat", "-u", "*"], capture_output=True, text=True,
                                                 timeout=60).stdout, timeout=60, what=f"{CAPPED} to be empty")
    if CAPPED in qconf("-sql").split():
        qconf("-dq", CAPPED)


def set_global(key: str, value: str) -> None:
    """One key of the global configuration (``qconf -Mconf`` takes the whole of it, continuation lines joined)."""
    text = qconf("-sconf", "global").replace("\\\n", " ")
    lines = [f"{key} {value}" if line.split(" ", 1)[0] == key else line for line in text.splitlines()
             if line and not line.startswith("#")]
    load("-Mconf", "global", "\n".join(" ".join(line.split()) for line in lines) + "\n")


def category(job_id: str) -> str:
    """The resource requests Grid Engine recorded for a finished job (qacct's ``category``).

    Waited for: reflow may conclude a job from its result file before the execd has written the job's
    accounting record (the job's epilogue and clean-up still run)."""
    def recorded() -> str | None:
        out = subprocess.run(["qacct", "-j", job_id.split("_")[0]], capture_output=True, text=True, timeout=60).stdout
        return next((line.split(None, 1)[1] for line in out.splitlines() if line.startswith("category")), None)

    return wait_for(recorded, timeout=120, interval=0.5, what=f"qacct's record of job {job_id}")


def submit_with(d: DaemonProcess, workflow: Path, run_dir: Path, cluster: str | None = None,
                config_of: dict[str, dict[str, Any]] | None = None, **params: Any) -> str:
    """Submit through the client, with some tasks' configuration changed (shorter limits for Grid Engine)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest, resolved = manifest_of(workflow, **params)
    for task in manifest["tasks"]:
        task["config"].update((config_of or {}).get(task["name"], {}))
    with d.client() as c:
        return c.submit(manifest, resolved, str(run_dir), cluster=cluster).run_id


def one(d: DaemonProcess, run_id: str, task: str) -> Any:
    (inst,) = status(d, run_id, task).instances or []
    return inst


@SGE
def test_time_limit_memory_and_kills_are_told_apart_and_retried_by_their_policy(wlm: WLM, tmp_path: Path) -> None:
    """Side by side on one daemon:

    * overtime: 10 s limit, sleeps 15 s: ``timeout`` (failed 37); the retry asks 6 x the time, capped by the
      queue's h_rt (40 s, probed with ``qconf -sq``), and succeeds;
    * memory: ``hungry`` (MemoryError under h_vmem=250M) and ``greedy`` (two children past 250M together,
      killed by the execd) are ``out_of_memory``, greedy with the peak qacct saw; each retry asks 3 x the
      memory (750M) and succeeds;
    * victims: ``outside`` is qdel'ed while it runs: ``cancelled`` (qdel), never retried automatically
      although its task allows 2 retries.
    """
    make_capped_queue(h_rt="0:0:40", h_vmem="2G")
    d = DaemonProcess(tmp_path / "d", config=config(wlm, capped={"partition": CAPPED}), env=wlm.daemon_env())
    try:
        d.start()
        runs = {
            "overtime": submit_with(d, OVERTIME, tmp_path / "overtime", cluster="capped", seconds=15, config_of={
                "slow": {"time": "00:00:10", "retry_policy": {"escalate": {"time": 6}, "backoff": 1}}}),
            "memory": submit_api(d, MEMORY, tmp_path / "memory"),
            "victims": submit_with(d, VICTIMS, tmp_path / "victims", config_of={"outside": {"retries": 2}}),
        }
        wait_for(lambda: (tmp_path / "victims" / "outside.pid").exists(), timeout=120, what="outside to run")
        outside_job = job_of(d, runs["victims"], "outside")
        wlm.kill_job(outside_job)
        wait_for(lambda: one(d, runs["victims"], "outside").state in ("cancelled", "failed"), timeout=120,
                 what="the qdel to be seen")
        with d.client() as c:
            assert c.cancel(runs["victims"]) >= 1  # the other victim: not part of this test
        final = {name: wait_state(d, run_id, timeout=300) for name, run_id in runs.items()}
        assert final == {"overtime": "succeeded", "memory": "succeeded", "victims": "cancelled"} or \
            final == {"overtime": "succeeded", "memory": "succeeded", "victims": "failed"}, \
            (final, {n: status(d, r).failures for n, r in runs.items()})

        # The time limit: retried once, with the time capped by the queue's h_rt, which reached Grid Engine.
        slow = one(d, runs["overtime"], "slow")
        assert slow.state == "succeeded" and slow.attempt == 2, slow
        assert slow.resources["time"] == "00:00:40", f"10 s x 6, capped by {CAPPED}'s h_rt: {slow.resources}"
        (first,) = slow.attempts or []
        assert first["cause"]["kind"] == "time_limit" and first["counted"], first
        assert first["cause"]["text"] == "time limit reached (limit 00:00:10) on node vm", first
        assert "qmaster enforced h_rt" in first["cause"]["scheduler_reason"], first
        assert "h_rt=10" in category(first["job_id"]) and "h_rt=40" in category(slow.job_id)

        # Out of memory, both ways, retried with three times the memory.
        hungry, greedy = one(d, runs["memory"], "hungry"), one(d, runs["memory"], "greedy")
        for inst in (hungry, greedy):
            assert inst.state == "succeeded" and inst.attempt == 2 and inst.resources["mem"] == "750M", inst
            (first,) = inst.attempts or []
            assert first["state"] == "out_of_memory" and first["cause"]["kind"] == "out_of_memory", first
            assert "h_vmem=750M" in category(inst.job_id), category(inst.job_id)
        hungry_cause = hungry.attempts[0]["cause"]
        assert hungry_cause["exception"] == "MemoryError" and hungry_cause["text"] == \
            "out of memory (limit 250M): an allocation failed (MemoryError)", hungry_cause
        greedy_cause = greedy.attempts[0]["cause"]
        assert greedy_cause["source"] == "scheduler" and greedy_cause["node"] == "vm", greedy_cause
        assert parse_mem(greedy_cause["peak_mem"]) > 250, f"qacct's maxvmem passed h_vmem: {greedy_cause}"
        assert greedy_cause["text"].startswith(f"out of memory (limit 250M), peak {greedy_cause['peak_mem']}")
        assert "h_vmem" in greedy_cause["scheduler_reason"], greedy_cause

        # Killed with qdel: cancelled, with Grid Engine's account of it, and not retried.
        outside = one(d, runs["victims"], "outside")
        assert outside.state == "cancelled" and outside.attempt == 1 and not outside.attempts, outside
        assert outside.cause["kind"] == "cancelled", outside.cause
        assert "qdel" in (outside.reason or ""), (outside.reason, outside.cause)
        assert outside.job_id == outside_job
        shown = d.cli("status", runs["memory"], "--task", "greedy", "--json", check=True).stdout
        assert "out of memory (limit 250M), peak " in shown, shown  # the earlier attempt's cause, as data
        wlm.tags_used_once()
    finally:
        kill(d)
        remove_capped_queue()


def queued_tasks() -> int:
    """Jobs and array tasks Grid Engine lists (pending or running), each task counted."""
    out = subprocess.run(["qstat", "-u", "*", "-xml"], capture_output=True, text=True, timeout=60)
    count = 0
    for job in ET.fromstring(out.stdout).iter("job_list"):
        tasks = job.findtext("tasks")
        if tasks and "-" in tasks:
            first, _, rest = tasks.partition("-")
            last, _, step = rest.partition(":")
            count += len(range(int(first), int(last) + 1, int(step or 1)))
        else:
            count += 1
    return count


@SGE
def test_max_u_jobs_is_probed_and_a_fan_out_stays_under_it(wlm: WLM, tmp_path: Path) -> None:
    set_global("max_u_jobs", "4")
    try:
        d = DaemonProcess(tmp_path / "d", config=config(wlm), env=wlm.daemon_env())
        d.start()
        try:
            run_id = submit_api(d, SLURMY, tmp_path / "run", n=12, hold=1)
            most = 0
            while status(d, run_id).run.state == "running":
                most = max(most, queued_tasks())
                time.sleep(0.3)
            assert status(d, run_id).run.state == "succeeded", status(d, run_id).failures
            st = status(d, run_id, "work")
            assert all(i.state == "succeeded" and i.attempt == 1 for i in st.instances or [])
            cluster = st.cluster or {}
            assert cluster.get("max_queued") == 4, cluster  # read from qconf -sconf by the probe
            assert 0 < most <= 4, most
            assert not cluster.get("limit_refusals"), cluster
        finally:
            kill(d)
    finally:
        set_global("max_u_jobs", "0")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-n", "0"]))
