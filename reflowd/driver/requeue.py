"""Following a job the scheduler requeued (``scontrol requeue``, preemption or node failure with requeue).

A requeued job is killed and started again under the same id. Its first run
may leave a result file (the worker, signalled, writes a failed result),
which the next run overwrites. So a signalled result is only *held* while the
scheduler still runs or requeues the job (never concluded from), and a result
seen before a requeue is remembered as *stale*: only a result written by a
later run (another pid or end time) is taken as the attempt's outcome.
"""

from __future__ import annotations

from typing import Any

from ..schedulers.base import Observation, Phase


def mark(result: dict[str, Any]) -> tuple[Any, ...]:
    """What tells two runs' results apart: the worker's host, pid, start and end."""
    return (result.get("host"), result.get("pid"), result.get("started_at"), result.get("ended_at"))


def still_running(obs: Observation | None) -> bool:
    """The scheduler positively says the job runs: a held result must not be concluded from yet."""
    return obs is not None and obs.phase is Phase.RUNNING


def requeued(obs: Observation | None) -> bool:
    """The scheduler shows the job queued again after it ran: the held result is from an interrupted run."""
    return obs is not None and obs.phase is Phase.QUEUED
