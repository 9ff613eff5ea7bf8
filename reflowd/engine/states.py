"""The three state machines: task instances, tasks and runs, one table each.

Every state change in the daemon goes through :class:`~reflowd.engine.ledger.Ledger`,
which checks it against the table here; a change not in the table is a bug,
refused and logged loudly, never applied. The transition log therefore holds
only states named in these tables.
"""

from __future__ import annotations

import enum


class State(str, enum.Enum):
    """A task instance: a singleton task, or one element of an array task."""

    #: Hash as the string it equals (Enum's own hash is a Python call on the name, and breaks the
    #: rule that equal objects hash alike): every state-set and count lookup is on the hot path.
    __hash__ = str.__hash__

    PENDING = "pending"  # waiting for upstream tasks
    READY = "ready"  # inputs resolved, waiting to be submitted (or for a retry back-off)
    CACHED = "cached"  # a verified earlier result stands in (success)
    SUBMITTING = "submitting"  # recorded with a submission tag; the scheduler call may be under way
    QUEUED = "queued"  # the scheduler has the job
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the task raised, the job crashed, or the job was lost
    TIMEOUT = "timeout"
    OUT_OF_MEMORY = "out_of_memory"
    NODE_FAIL = "node_fail"
    SUBMIT_FAILED = "submit_failed"  # the scheduler refused the submission for good
    CANCELLED = "cancelled"
    UPSTREAM_FAILED = "upstream_failed"

    def __str__(self) -> str:
        return self.value


S = State

SUCCESS = frozenset({S.SUCCEEDED, S.CACHED})
FAILURE = frozenset({S.FAILED, S.TIMEOUT, S.OUT_OF_MEMORY, S.NODE_FAIL, S.SUBMIT_FAILED, S.CANCELLED, S.UPSTREAM_FAILED})
TERMINAL = SUCCESS | FAILURE
#: Submitted to a scheduler (or about to be): there is, or may be, a job.
IN_FLIGHT = frozenset({S.SUBMITTING, S.QUEUED, S.RUNNING})
#: Not terminal: the run is not over while any instance is in one of these.
ACTIVE = frozenset({S.PENDING, S.READY}) | IN_FLIGHT
#: Failures that per-task ``retries=N`` retries automatically.
AUTO_RETRIABLE = frozenset({S.FAILED, S.TIMEOUT, S.OUT_OF_MEMORY, S.NODE_FAIL})
#: Failures a client's ``retry`` resets.
MANUAL_RETRIABLE = frozenset({S.FAILED, S.TIMEOUT, S.OUT_OF_MEMORY, S.NODE_FAIL, S.SUBMIT_FAILED, S.CANCELLED})

_FINISH = {S.SUCCEEDED, S.FAILED, S.TIMEOUT, S.OUT_OF_MEMORY, S.NODE_FAIL, S.CANCELLED}

TRANSITIONS: dict[State, frozenset[State]] = {
    S.PENDING: frozenset({S.READY, S.UPSTREAM_FAILED, S.CANCELLED, S.FAILED}),
    # READY -> FAILED: inputs cannot be resolved (e.g. fan-out over a non-list).
    S.READY: frozenset({S.SUBMITTING, S.CACHED, S.CANCELLED, S.FAILED, S.PENDING}),
    # SUBMITTING -> READY: the tag was looked up and no job exists, so submit again.
    S.SUBMITTING: frozenset({S.QUEUED, S.RUNNING, S.SUBMIT_FAILED, S.READY} | _FINISH),
    # QUEUED -> READY: its packed job ended before it started (reflowd/driver/packing.py); not a failure.
    S.QUEUED: frozenset({S.RUNNING, S.READY} | _FINISH),
    # RUNNING -> QUEUED: the scheduler requeued the job (preemption, node failure with requeue).
    S.RUNNING: frozenset({S.QUEUED} | _FINISH),
    S.SUCCEEDED: frozenset({S.READY}),  # only when verification finds its outputs gone
    S.CACHED: frozenset({S.READY}),
    S.FAILED: frozenset({S.READY, S.PENDING}),
    S.TIMEOUT: frozenset({S.READY, S.PENDING}),
    S.OUT_OF_MEMORY: frozenset({S.READY, S.PENDING}),
    S.NODE_FAIL: frozenset({S.READY, S.PENDING}),
    S.SUBMIT_FAILED: frozenset({S.READY, S.PENDING}),
    S.CANCELLED: frozenset({S.READY, S.PENDING}),
    S.UPSTREAM_FAILED: frozenset({S.PENDING, S.CANCELLED}),
}


class TaskState(str, enum.Enum):
    """A task as a whole: has it got its elements, or will it never get them?

    Singletons are born EXPANDED (their one instance exists from the start).
    An array stays PENDING until its element count is known, then becomes
    EXPANDED -- or is blocked for good (UPSTREAM_FAILED, CANCELLED, FAILED)
    until a ``retry`` opens it again.
    """

    __hash__ = str.__hash__

    PENDING = "pending"
    EXPANDED = "expanded"
    UPSTREAM_FAILED = "upstream_failed"
    CANCELLED = "cancelled"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


TASK_BLOCKED = frozenset({TaskState.UPSTREAM_FAILED, TaskState.CANCELLED, TaskState.FAILED})

TASK_TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    TaskState.PENDING: frozenset({TaskState.EXPANDED} | TASK_BLOCKED),
    TaskState.EXPANDED: frozenset(),
    TaskState.UPSTREAM_FAILED: frozenset({TaskState.PENDING}),
    TaskState.CANCELLED: frozenset({TaskState.PENDING}),
    TaskState.FAILED: frozenset({TaskState.PENDING}),
}


class RunState(str, enum.Enum):
    __hash__ = str.__hash__

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


RUN_TERMINAL = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED})

RUN_TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.RUNNING: RUN_TERMINAL,
    # A finished run runs again after a retry (or after verification finds outputs gone).
    RunState.SUCCEEDED: frozenset({RunState.RUNNING}),
    RunState.FAILED: frozenset({RunState.RUNNING}),
    RunState.CANCELLED: frozenset({RunState.RUNNING}),
}


class IllegalTransition(RuntimeError):
    """A state change the table does not allow: a bug in the caller."""


def is_legal(old: State, new: State) -> bool:
    return new in TRANSITIONS[old]


def is_legal_task(old: TaskState, new: TaskState) -> bool:
    return new in TASK_TRANSITIONS[old]


def is_legal_run(old: RunState, new: RunState) -> bool:
    return new in RUN_TRANSITIONS[old]


def check_transition(old: State, new: State, what: str) -> None:
    if not is_legal(old, new):
        raise IllegalTransition(f"illegal transition {old.value} -> {new.value} for {what}")
