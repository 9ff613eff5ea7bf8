"""Why an instance ended, as data and in the user's words (pure).

A *cause* is a small JSON-able dict with a ``kind`` (one of :data:`KINDS`)
and the facts the scheduler or the worker gave for it: the node, the exit
code and signal, who cancelled. It is built from the evidence at the moment
the instance ends (:func:`from_observation`, :func:`from_result`), kept on
the instance, and turned into text only when shown (:func:`describe`), with
the attempt's resources so that a time limit or out-of-memory names the limit.
Retry policies (``retry_policy.py``) decide on the ``kind``.
"""

from __future__ import annotations

import signal as _signal
from collections.abc import Mapping
from typing import Any

from reflowd.schedulers.base import Observation, Outcome

OUT_OF_MEMORY = "out_of_memory"
TIME_LIMIT = "time_limit"
NODE_FAIL = "node_fail"
BOOT_FAIL = "boot_fail"
PREEMPTED = "preempted"
CANCELLED = "cancelled"
DEADLINE = "deadline"
EXIT_CODE = "exit_code"
SIGNAL = "signal"
EXCEPTION = "exception"
LOST = "lost"
SUBMIT_REFUSED = "submit_refused"
UPSTREAM = "upstream_failed"
UNKNOWN = "unknown"

#: Exceptions (from the worker's result) that mean the task ran out of memory.
MEMORY_ERRORS = ("MemoryError", "_ArrayMemoryError")  # the second: numpy's, a MemoryError subclass

#: Signals a scheduler sends as a warning before the time limit (what ``JobConfig``'s ``signal`` asks for).
WARNING_SIGNALS = ("SIGUSR1", "SIGUSR2")

KINDS = (OUT_OF_MEMORY, TIME_LIMIT, NODE_FAIL, BOOT_FAIL, PREEMPTED, CANCELLED, DEADLINE, EXIT_CODE, SIGNAL,
         EXCEPTION, LOST, SUBMIT_REFUSED, UPSTREAM, UNKNOWN)

_OUTCOME_KIND = {
    Outcome.OUT_OF_MEMORY: OUT_OF_MEMORY,
    Outcome.TIMEOUT: TIME_LIMIT,
    Outcome.DEADLINE: DEADLINE,
    Outcome.NODE_FAIL: NODE_FAIL,
    Outcome.BOOT_FAIL: BOOT_FAIL,
    Outcome.PREEMPTED: PREEMPTED,
    Outcome.CANCELLED: CANCELLED,
}

#: Instance states (their values) -> the kind assumed when no evidence was kept (rows from before causes).
_STATE_KIND = {
    "timeout": TIME_LIMIT,
    "out_of_memory": OUT_OF_MEMORY,
    "node_fail": NODE_FAIL,
    "cancelled": CANCELLED,
    "submit_failed": SUBMIT_REFUSED,
    "upstream_failed": UPSTREAM,
}


def split_exit_code(raw: str | None) -> tuple[int | None, int | None]:
    """Slurm's ``EXIT:SIGNAL`` (``"1:0"``, ``"0:9"``), or a plain code: (exit code, signal), None where unknown."""
    if raw is None:
        return None, None
    text = str(raw).strip()
    code_text, _, sig_text = text.partition(":")
    try:
        code = int(code_text) if code_text else None
    except ValueError:
        code = None
    try:
        sig = int(sig_text) if sig_text else None
    except ValueError:
        sig = None
    return code, (sig or None)


def _signal_name(number: int | None) -> str | None:
    if not number:
        return None
    try:
        return _signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _cancelled_by(native: str | None, reason: str | None) -> str | None:
    for text in (native, reason):
        if text and " by " in text:
            return text.split(" by ", 1)[1].strip() or None
    return None


def _clean(value: str | None) -> str | None:
    return None if value in (None, "", "None", "(null)") else value


def from_observation(obs: Observation) -> dict[str, Any]:
    """A finished job as the scheduler reports it (no result file, or one the scheduler explains better)."""
    outcome = obs.outcome or Outcome.FAILED
    code, sig = split_exit_code(obs.exit_code)
    cause: dict[str, Any] = {"kind": _OUTCOME_KIND.get(outcome, EXIT_CODE), "source": "scheduler"}
    if outcome in (Outcome.FAILED, Outcome.COMPLETED):
        cause["kind"] = SIGNAL if sig else EXIT_CODE
    if obs.native_state:
        cause["scheduler_state"] = obs.native_state
    reason = _clean(obs.reason)
    if reason:
        cause["scheduler_reason"] = reason
    if code is not None:
        cause["exit_code"] = code
    if sig:
        cause["signal"] = _signal_name(sig)
    if _clean(obs.node):
        cause["node"] = obs.node
    if _clean(obs.peak_mem):
        cause["peak_mem"] = obs.peak_mem
    if outcome is Outcome.CANCELLED:
        by = _cancelled_by(obs.native_state, reason)
        if by:
            cause["by"] = by
    return cause


def from_result(result: Mapping[str, Any]) -> dict[str, Any]:
    """A failed result file the scheduler does not explain: the task raised, or the worker was signalled."""
    if result.get("signal") in WARNING_SIGNALS:
        # The walltime warning (the ``signal`` option, e.g. Slurm's --signal=USR1@120): the limit was near.
        cause: dict[str, Any] = {"kind": TIME_LIMIT, "source": "worker", "signal": str(result["signal"]),
                                 "warning": True}
    elif result.get("signal"):
        cause = {"kind": SIGNAL, "source": "worker", "signal": str(result["signal"])}
    if result.get("signal"):
        if result.get("checkpoint"):
            cause["checkpoint"] = result["checkpoint"]
        return cause
    error = str(result.get("error") or "")
    exc_type = error.split(":", 1)[0] if ":" in error else (error.strip() or None)
    if exc_type in MEMORY_ERRORS:
        # An allocation refused under the job's memory limit: Grid Engine's h_vmem (and PBS's pvmem,
        # ulimit -v) are an address-space rlimit, so the process gets ENOMEM, not a kill.
        return {"kind": OUT_OF_MEMORY, "source": "worker", "exception": exc_type}
    cause = {"kind": EXCEPTION, "source": "worker"}
    if exc_type and exc_type.replace(".", "").replace("_", "").isalnum():
        cause["exception"] = exc_type
    if result.get("checkpoint"):  # raised from a TaskInterrupted that noted its checkpoint
        cause["checkpoint"] = str(result["checkpoint"])
    return cause


def infer(state: str, error: str | None = None, reason: str | None = None) -> dict[str, Any] | None:
    """The best cause that an instance's state and texts allow, for instances ended without one recorded."""
    if state in ("succeeded", "cached", "pending", "ready", "submitting", "queued", "running"):
        return None
    if reason == "lost" or (error or "").startswith("lost:"):
        return {"kind": LOST}
    kind = _STATE_KIND.get(state)
    if kind is not None:
        return {"kind": kind}
    if error and not error.startswith("internal error"):
        return from_result({"error": error})
    return {"kind": UNKNOWN}


def _limit(resources: Mapping[str, Any] | None, key: str) -> str:
    value = (resources or {}).get(key)
    return f" (limit {value})" if value else ""


def describe(cause: Mapping[str, Any] | None, resources: Mapping[str, Any] | None = None) -> str | None:
    """One line in the user's words; *resources* are the attempt's (``time``, ``mem``) for the limit, and a
    checkpoint the task noted when it was stopped (``TaskInterrupted.checkpoint``) is named."""
    text = _describe_kind(cause, resources)
    if text and cause and cause.get("checkpoint"):
        text += f"; checkpoint saved: {cause['checkpoint']}"
    return text


def _describe_kind(cause: Mapping[str, Any] | None, resources: Mapping[str, Any] | None) -> str | None:
    if not cause:
        return None
    kind = cause.get("kind")
    node = f" on node {cause['node']}" if cause.get("node") else ""
    if kind == OUT_OF_MEMORY:
        peak = f", peak {cause['peak_mem']}" if cause.get("peak_mem") else ""
        refused = f": an allocation failed ({cause['exception']})" if cause.get("exception") else ""
        return f"out of memory{_limit(resources, 'mem')}{peak}{node}{refused}"
    if kind == TIME_LIMIT:
        if cause.get("warning"):
            return f"stopped at the time limit's warning ({cause.get('signal')}){_limit(resources, 'time')}{node}"
        return f"time limit reached{_limit(resources, 'time')}{node}"
    if kind == DEADLINE:
        return "the job's deadline passed before it finished"
    if kind == NODE_FAIL:
        return f"node failure{node}"
    if kind == BOOT_FAIL:
        return f"the node failed to boot{node}"
    if kind == PREEMPTED:
        return f"preempted by the scheduler{node}"
    if kind == CANCELLED:
        by = cause.get("by")
        return f"cancelled by {by}" if by else "cancelled"
    if kind == SIGNAL:
        return f"killed by {cause.get('signal') or 'a signal'}{node}"
    if kind == EXIT_CODE:
        code = cause.get("exit_code")
        return f"exited with code {code}{node}" if code is not None else f"the job failed{node}"
    if kind == EXCEPTION:
        exc = cause.get("exception")
        return f"the task raised {exc}" if exc else "the task failed"
    if kind == LOST:
        return "lost: the scheduler no longer knows the job and it left no result"
    if kind == SUBMIT_REFUSED:
        return "the scheduler refused the submission"
    if kind == UPSTREAM:
        return "an upstream task failed"
    return "ended for a reason reflow could not tell"


def view(cause: Mapping[str, Any] | None, resources: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What ``status --json`` shows: the cause's facts plus its ``text``."""
    if not cause:
        return None
    return {**cause, "text": describe(cause, resources)}
