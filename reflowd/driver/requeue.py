"""Following a job the scheduler requeued (``scontrol requeue``, preemption or node failure with requeue).

A requeued job is killed and started again under the same id. Its first run
may leave a result file (the worker, signalled, writes a failed result),
which the next run overwrites. So a signalled result is only *held* while the
scheduler still runs or requeues the job (never concluded from), and a result
seen before a requeue is remembered as *stale*: only a result written by a
later run (another pid or end time) is taken as the attempt's outcome. The
marks are kept beside the results (``<job dir>/stale/``), not only in
memory: a daemon restarted while the next run runs must not take the old
file, still there, for that run's result.
"""

from __future__ import annotations

import json
import os
from typing import Any

from reflow_client.jobfiles import element_key

from ..schedulers.base import Observation, Phase

#: A job directory's stale marks (one file per element), so that a restarted daemon still knows them.
STALE_DIR = "stale"


def mark(result: dict[str, Any]) -> tuple[Any, ...]:
    """What tells two runs' results apart: the worker's host, pid, start and end."""
    return (result.get("host"), result.get("pid"), result.get("started_at"), result.get("ended_at"))


def still_running(obs: Observation | None) -> bool:
    """The scheduler positively says the job runs: a held result must not be concluded from yet."""
    return obs is not None and obs.phase is Phase.RUNNING


def requeued(obs: Observation | None) -> bool:
    """The scheduler shows the job queued again after it ran: the held result is from an interrupted run."""
    return obs is not None and obs.phase is Phase.QUEUED


def stale_path(job_dir: str, index: int | None) -> str:
    return os.path.join(job_dir, STALE_DIR, f"{element_key(index)}.json")


def encode_mark(stamp: tuple[Any, ...]) -> bytes:
    return json.dumps(list(stamp)).encode()


def decode_mark(raw: bytes | None) -> tuple[Any, ...] | None:
    """A mark written by :func:`encode_mark`, or None for anything else (a torn or foreign file)."""
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        return None
    return tuple(value) if isinstance(value, list) and len(value) == 4 else None
