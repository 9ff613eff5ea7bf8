"""What one observation means for one in-flight instance (pure).

Two sources of evidence: the worker's result file (positive evidence of how
the task ended) and a scheduler observation (present with a state / absent /
unknown). Rules:

* A result file decides, except that a scheduler's TIMEOUT, OUT_OF_MEMORY,
  NODE_FAIL, CANCELLED or PREEMPTED explains a *failed* result better (the
  worker only saw a signal).
* UNKNOWN never changes anything.
* A finished job without a result file is given ``result_grace`` seconds for
  the file to appear (shared file systems lag) before it is concluded.
* ABSENT without a result file becomes FAILED (``lost``) only after
  ``lost_after`` consecutive successful queries *and* ``lost_grace`` seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from reflowd.schedulers.base import Observation, Outcome, Phase, Presence

from . import causes
from .model import Instance
from .states import State

_OUTCOME_STATE = {
    Outcome.COMPLETED: State.FAILED,  # completed but no result: the worker never wrote one
    Outcome.FAILED: State.FAILED,
    Outcome.TIMEOUT: State.TIMEOUT,
    Outcome.DEADLINE: State.TIMEOUT,
    Outcome.OUT_OF_MEMORY: State.OUT_OF_MEMORY,
    Outcome.NODE_FAIL: State.NODE_FAIL,
    Outcome.BOOT_FAIL: State.NODE_FAIL,
    Outcome.CANCELLED: State.CANCELLED,
    Outcome.PREEMPTED: State.FAILED,
}

#: Scheduler outcomes that explain a failed result better than the worker's own message.
_EXPLAINING = {
    Outcome.TIMEOUT,
    Outcome.DEADLINE,
    Outcome.OUT_OF_MEMORY,
    Outcome.NODE_FAIL,
    Outcome.BOOT_FAIL,
    Outcome.CANCELLED,
    Outcome.PREEMPTED,
}


#: Members the per-element paths test against, as module globals (an enum member looked up on its class
#: costs 100-200 ns, a global 10; a poll decides for every element whose answer changed).
_UNKNOWN, _ABSENT = Presence.UNKNOWN, Presence.ABSENT
_QUEUED, _RUNNING = Phase.QUEUED, Phase.RUNNING
_COMPLETED, _FAILED_OUTCOME = Outcome.COMPLETED, Outcome.FAILED
_SUCCEEDED = State.SUCCEEDED

#: The evidence of a result file that says the element succeeded (shared: never changed once given).
_SUCCEEDED_EVIDENCE: dict[str, Any] = {"source": "result_file", "state": "succeeded"}


@dataclass(frozen=True)
class Timing:
    result_grace: float = 10.0
    lost_after: int = 3
    lost_grace: float = 60.0


@dataclass
class Decision:
    """A state change (``state``) and/or field updates, with the evidence for it."""

    state: State | None
    evidence: dict[str, Any]
    fields: dict[str, Any] = field(default_factory=dict)


def from_result(inst: Instance, result: dict[str, Any], obs: Observation | None) -> Decision:
    """The instance ended and wrote *result*."""
    fields: dict[str, Any] = {
        "ended_at": result.get("ended_at"),
        "host": result.get("host"),
        # The worker's own clock for both ends: a duration from one clock (automatic packing sizes
        # jobs from these), not the daemon's moment of noticing the start.
        "started_at": result.get("started_at") or inst.started_at,
    }
    claimed = result.get("state")
    # Every element that succeeded shares one evidence dict (nothing changes evidence once given): the
    # store's writer then groups a job's consecutive successes by identity, without comparing dicts.
    evidence: dict[str, Any] = (
        _SUCCEEDED_EVIDENCE if claimed == "succeeded" else {"source": "result_file", "state": claimed})
    if result.get("resolved_inputs") and inst.identity and result.get("identity") != inst.identity_hex:
        # A job that resolved its own inputs (Slurm-side dependencies) saw other inputs than the engine's.
        error = (f"the job resolved inputs of identity {str(result.get('identity'))[:16]}, the engine's are "
                 f"{inst.identity.hex()[:16]}: its output is not kept")
        fields.update(error=error, traceback=None, cause=causes.from_result({"error": error}))
        return Decision(State.FAILED, {**evidence, "identity_mismatch": True}, fields)
    if claimed == "succeeded":
        fields.update(output=result.get("output"), output_hash=result.get("output_hash"), error=None, traceback=None)
        return Decision(_SUCCEEDED, evidence, fields)
    fields.update(error=result.get("error"), traceback=result.get("traceback"))
    state = State.FAILED
    if obs is not None and obs.presence is Presence.PRESENT and obs.outcome in _EXPLAINING:
        state = _OUTCOME_STATE[obs.outcome]
        evidence.update(scheduler_state=obs.native_state, scheduler_reason=obs.reason)
        fields["reason"] = _describe(obs)
        fields["cause"] = causes.from_observation(obs)
        if result.get("checkpoint"):
            fields["cause"]["checkpoint"] = result["checkpoint"]
    else:
        fields["cause"] = causes.from_result(result)
        if fields["cause"]["kind"] == causes.OUT_OF_MEMORY:
            state = State.OUT_OF_MEMORY  # the task's MemoryError under the job's memory limit
        if result.get("signal"):
            fields["reason"] = f"worker received {result['signal']}"
    return Decision(state, evidence, fields)


def _describe(obs: Observation) -> str:
    parts = [obs.native_state or (obs.outcome.value if obs.outcome else "")]
    if obs.reason and obs.reason not in ("None", "(null)"):
        parts.append(f"reason {obs.reason}")
    if obs.exit_code and obs.exit_code not in ("0", "0:0"):
        parts.append(f"exit code {obs.exit_code}")
    return ", ".join(p for p in parts if p)


def from_observation(inst: Instance, obs: Observation, now: float, timing: Timing) -> Decision | None:
    """The scheduler's view, when no result file has been seen for *inst*."""
    presence = obs.presence
    if presence is _UNKNOWN:
        return None
    if presence is _ABSENT:
        if inst.state is State.SUBMITTING:
            return None
        since = inst.absent_since if inst.absent_since is not None else now
        count = inst.absent_count + 1
        if count >= timing.lost_after and now - since >= timing.lost_grace:
            return Decision(
                State.FAILED,
                {"source": "scheduler", "presence": "absent", "queries": count, "since": since},
                {
                    "error": f"lost: the scheduler no longer knows job {inst.job_key} and it left no result file",
                    "reason": "lost",
                    "cause": {"kind": causes.LOST, "source": "scheduler"},
                    "ended_at": now,
                    "absent_since": None,
                    "absent_count": 0,
                },
            )
        return Decision(None, {}, {"absent_since": since, "absent_count": count})
    # Present.
    reset: dict[str, Any] = {"absent_since": None, "absent_count": 0}
    evidence = {"source": "scheduler", "scheduler_state": obs.native_state, "scheduler_reason": obs.reason}
    phase = obs.phase
    if phase is _QUEUED:
        if inst.state is State.RUNNING:
            return Decision(State.QUEUED, {**evidence, "note": "requeued"}, {**reset, "reason": obs.reason})
        if inst.reason != obs.reason or inst.absent_count:
            return Decision(None, evidence, {**reset, "reason": obs.reason})
        return None
    if phase is _RUNNING:
        if inst.state in (State.QUEUED, State.SUBMITTING):
            return Decision(State.RUNNING, evidence, {**reset, "reason": None, "started_at": inst.started_at or now})
        if inst.absent_count:
            return Decision(None, evidence, reset)
        return None
    # Done, and no result file (yet).
    outcome = obs.outcome or _FAILED_OUTCOME
    seen = inst.done_seen_at
    if seen is None:
        seen = now
    if outcome is _COMPLETED or outcome is _FAILED_OUTCOME:
        if now - seen < timing.result_grace:
            return Decision(None, {}, {**reset, "done_seen_at": seen})
    state = _OUTCOME_STATE[outcome]
    if outcome is Outcome.COMPLETED:
        error = f"job {inst.job_key} completed but left no result file (was the worker's output lost?)"
    elif outcome is Outcome.FAILED:
        error = f"job {inst.job_key} failed ({_describe(obs)}) before the worker could write a result"
    else:
        error = f"job {inst.job_key} ended: {_describe(obs)}"
    return Decision(
        state,
        {**evidence, "outcome": outcome.value, "exit_code": obs.exit_code},
        {**reset, "error": error, "reason": _describe(obs), "cause": causes.from_observation(obs), "ended_at": now,
         "done_seen_at": None},
    )
