"""Retries by cause on the emulated PBS, LSF and Flux (tests/emulators/, which follow their manuals).

The same policies as on real Slurm and Grid Engine (tests/test_failures_slurm.py, test_failures_sge.py):

* a job past its time limit ends ``timeout`` (each system's own words: PBS's walltime kill, Flux's
  ``timeout`` exception) and its retry asks ``escalate.time`` times the time, which reaches the
  scheduler's job record, and succeeds. LSF is left out: its ``-W`` counts whole minutes, so the
  scenario would hold a test for minutes (its TERM_RUNLIMIT is covered on recorded outputs);
* a job killed from outside (qdel, bkill, flux cancel) is ``cancelled`` and never retried
  automatically, although its task allows retries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .cluster.wlm import WLM
from .test_failures_sge import OVERTIME, one, submit_with
from .test_scheduler_engine import VICTIMS, job_of, kill, start_daemon, status, wait_state
from .support import wait_for


def emulated(*kinds: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("wlm_name", [f"{k}-emu" for k in kinds], indirect=True)


def walltime_of(wlm: WLM, job_id: str) -> float | None:
    """The time limit the emulated scheduler holds for a job (its own record, not reflow's)."""
    value = wlm.handle.meta(job_id).get("walltime")
    return None if value is None else float(value)


@emulated("pbs", "flux")
def test_a_time_limit_is_retried_with_more_time_and_succeeds(wlm: WLM, tmp_path: Path) -> None:
    d = start_daemon(wlm, tmp_path / "d")
    try:
        run_id = submit_with(d, OVERTIME, tmp_path / "run", seconds=6, config_of={
            "slow": {"time": "00:00:03", "retry_policy": {"escalate": {"time": 4}, "backoff": 0.5}}})
        assert wait_state(d, run_id, timeout=120) == "succeeded", status(d, run_id).failures
        slow = one(d, run_id, "slow")
        assert slow.state == "succeeded" and slow.attempt == 2 and slow.resources["time"] == "00:00:12", slow
        (first,) = slow.attempts or []
        assert first["state"] == "timeout" and first["cause"]["kind"] == "time_limit" and first["counted"], first
        assert first["cause"]["text"].startswith("time limit reached (limit 00:00:03)"), first
        assert walltime_of(wlm, first["job_id"]) == 3 and walltime_of(wlm, slow.job_id) == 12
        assert (tmp_path / "run" / "executions.txt").read_text().count("slow ") == 2
    finally:
        kill(d)


@emulated("pbs", "lsf", "flux")
def test_a_job_killed_from_outside_is_cancelled_and_not_retried(wlm: WLM, tmp_path: Path) -> None:
    d = start_daemon(wlm, tmp_path / "d")
    try:
        run_id = submit_with(d, VICTIMS, tmp_path / "run", config_of={"outside": {"retries": 2}})
        wait_for(lambda: (tmp_path / "run" / "outside.pid").exists(), timeout=60, what="outside to run")
        wlm.kill_job(job_of(d, run_id, "outside"))
        outside: Any = wait_for(lambda: (i := one(d, run_id, "outside")).state in ("cancelled", "failed") and i, timeout=60,
                                what="the kill to be seen")
        with d.client() as c:
            c.cancel(run_id)
        wait_state(d, run_id, timeout=60)
        outside = one(d, run_id, "outside")
        assert outside.state == "cancelled" and outside.attempt == 1 and not outside.attempts, outside
        assert outside.cause["kind"] == "cancelled", outside.cause
        assert wlm.env.cancelled_reason in (outside.reason or ""), outside
    finally:
        kill(d)
