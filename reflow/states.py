"""The reference's ``TaskState`` and ``RunState``, mapped from reflowd's richer states.

reflowd tells apart more than the reference does (``cached`` from
``succeeded``, ``timeout`` and ``out_of_memory`` from ``failed``, ``queued``
from ``submitting``). Code written against the reference compares with these
enums; ``from_reflow`` folds a reflowd state name into them. Both are ``str``
enums, so ``"SUCCESS" == TaskState.SUCCESS`` and they serialise as plain text.
"""

from __future__ import annotations

import enum


class TaskState(str, enum.Enum):
    """Lifecycle state of a task instance, in the reference's terms."""

    PENDING = "PENDING"
    SUBMITTED = "SUBMITTED"
    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    #: Kept for code that names it; reflow reports an instance being retried as PENDING
    #: (a manual retry re-evaluates its inputs, an automatic one waits for its back-off).
    RETRYING = "RETRYING"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def terminal(cls) -> frozenset[TaskState]:
        """States that do not change without a retry."""
        return frozenset({cls.SUCCESS, cls.FAILED, cls.CANCELLED})

    @classmethod
    def active(cls) -> frozenset[TaskState]:
        """States of work still in progress."""
        return frozenset({cls.PENDING, cls.SUBMITTED, cls.RUNNING, cls.RETRYING})

    @classmethod
    def cancellable(cls) -> frozenset[TaskState]:
        """States a cancel acts on."""
        return frozenset({cls.PENDING, cls.SUBMITTED, cls.RUNNING})

    @classmethod
    def retriable(cls) -> frozenset[TaskState]:
        """States a retry acts on."""
        return frozenset({cls.FAILED, cls.CANCELLED})

    @classmethod
    def from_reflow(cls, state: str) -> TaskState:
        """Fold a reflowd instance state (``"timeout"``, ``"cached"``, ...) into the reference's states."""
        try:
            return _TASK_STATES[state]
        except KeyError:
            raise ValueError(f"unknown reflow task state {state!r} (known: {', '.join(_TASK_STATES)})") from None


class RunState(str, enum.Enum):
    """Top-level state of a run, in the reference's terms."""

    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def from_reflow(cls, state: str) -> RunState:
        """Map a reflowd run state (``running``, ``succeeded``, ``failed``, ``cancelled``)."""
        try:
            return _RUN_STATES[state]
        except KeyError:
            raise ValueError(f"unknown reflow run state {state!r} (known: {', '.join(_RUN_STATES)})") from None


#: reflowd's instance states (docs/architecture.md section 4) and what each is in the reference.
_TASK_STATES: dict[str, TaskState] = {
    "pending": TaskState.PENDING,
    "ready": TaskState.PENDING,
    "submitting": TaskState.SUBMITTED,
    "queued": TaskState.SUBMITTED,
    "running": TaskState.RUNNING,
    "succeeded": TaskState.SUCCESS,
    "cached": TaskState.SUCCESS,
    "failed": TaskState.FAILED,
    "timeout": TaskState.FAILED,
    "out_of_memory": TaskState.FAILED,
    "node_fail": TaskState.FAILED,
    "submit_failed": TaskState.FAILED,
    "upstream_failed": TaskState.FAILED,
    "cancelled": TaskState.CANCELLED,
}

_RUN_STATES: dict[str, RunState] = {
    "running": RunState.RUNNING,
    "succeeded": RunState.SUCCESS,
    "failed": RunState.FAILED,
    "cancelled": RunState.CANCELLED,
}
