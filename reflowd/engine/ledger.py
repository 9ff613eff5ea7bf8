"""The one way any state changes: check the table, stamp the time, record the evidence.

Three functions, one per state machine (instances, tasks, runs). Each refuses
a change its table does not allow (counted and logged at error level, never
applied), sets the new state and fields, enqueues the row and one transition
row for the store, keeps the task's per-state counts, and publishes an event
for ``watch`` clients. What a change *means* (retries, dirty marking, the
cluster driver's bookkeeping) is the engine's business, not the ledger's.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Protocol

import structlog

from .. import world
from .events import EventHub
from .model import Instance, Run, TaskRun
from .states import (
    FAILURE,
    RUN_TERMINAL,
    TERMINAL,
    RunState,
    State,
    TaskState,
    is_legal,
    is_legal_run,
    is_legal_task,
)

log = structlog.get_logger("reflowd.ledger")


_DEBUG_BY_WRAPPER: dict[type, bool] = {}
#: How often the log level is looked at again (structlog's ``get_config`` builds a dict: 1.4 us, as much
#: as a fifth of a transition): a changed level is seen within this many seconds (of ``world.now``).
DEBUG_RECHECK_S = 1.0
_debug_checked: list[Any] = [float("-inf"), False]  # (when, the answer)


def _debugging(now: float) -> bool:
    """Would a debug line be written? (Building one costs more than the rest of a transition.)"""
    checked = _debug_checked
    if -DEBUG_RECHECK_S < now - checked[0] < DEBUG_RECHECK_S:
        return checked[1]  # type: ignore[no-any-return]
    wrapper = structlog.get_config()["wrapper_class"]
    enabled = _DEBUG_BY_WRAPPER.get(wrapper)
    if enabled is None:
        check = getattr(wrapper, "is_enabled_for", None)
        try:
            enabled = bool(check(None, logging.DEBUG)) if check is not None else True
        except Exception:  # a wrapper class that cannot tell without an instance: assume it writes
            enabled = True
        _DEBUG_BY_WRAPPER[wrapper] = enabled
    checked[0], checked[1] = now, enabled
    return enabled


#: The fields every instance transition changes (and the store then writes: ``Store.put_instance``).
_CHANGED = ("state", "updated_at")
_CHANGED_ENDED = ("state", "updated_at", "ended_at")
#: The fields changed, by the names of the fields a caller set: ``(not ending, ending)``. One tuple object
#: per set of names (callers pass the same few), so the store finds its columns by the tuple's identity.
_CHANGED_BY: dict[tuple[str, ...], tuple[tuple[str, ...], tuple[str, ...]]] = {(): (_CHANGED, _CHANGED_ENDED)}


class Recorder(Protocol):
    """What the ledger needs of a store: enqueue rows (synchronously)."""

    def put_instance(self, inst: Instance, changed: tuple[str, ...] | None = None) -> None: ...

    def change_instance(self, inst: Instance, changed: tuple[str, ...], old: str, new: str, evidence: dict[str, Any],
                        at: float) -> None:
        """``put_instance(inst, changed)`` and ``add_transition`` for its change, in one call."""

    def put_task(self, run_id: str, task: TaskRun) -> None: ...

    def put_run(self, run: Run) -> None: ...

    def add_transition(self, run_id: str, task: str | None, index: int | None, old: str | None, new: str,
                       evidence: dict[str, Any], at: float) -> None: ...


class Ledger:
    def __init__(self, store: Recorder, events: EventHub, counters: Counter[str]) -> None:
        self.store = store
        self.events = events
        self.counters = counters

    def _illegal(self, what: str, old: str | None, new: str, evidence: dict[str, Any], **where: Any) -> bool:
        self.counters["illegal_transitions"] += 1
        log.error("illegal transition refused", what=what, old=old, new=new, evidence=evidence, **where)
        return False

    def instance(self, run: Run, inst: Instance, new: State, evidence: dict[str, Any], fields: dict[str, Any]) -> bool:
        old = inst.state
        if not is_legal(old, new):
            return self._illegal("instance", old.value, new.value, evidence, run_id=run.id, task=inst.task,
                                 index=inst.index)
        now = world.now()
        for name, value in fields.items():
            setattr(inst, name, value)
        inst.state = new
        inst.updated_at = now
        names = tuple(fields)
        both = _CHANGED_BY.get(names)
        if both is None:
            both = ((*_CHANGED, *names), (*_CHANGED_ENDED, *names))
            if len(_CHANGED_BY) < 512:  # (bounded, should callers ever vary their names without end)
                _CHANGED_BY[names] = both
        if new in TERMINAL and inst.ended_at is None:
            inst.ended_at = now
            changed = both[1]
        else:
            changed = both[0]
        tr = run.tasks.get(inst.task)
        if tr is not None:
            tr.counts[old] -= 1
            tr.counts[new] += 1
        # Only these columns are written (an UPDATE, not the whole row), and the transition (str enums: as text).
        self.store.change_instance(inst, changed, old, new, evidence, now)
        self.counters["transitions"] += 1
        if self.events.wants(run.id):
            self.events.publish({
                "type": "transition",
                "run_id": run.id,
                "task": inst.task,
                "index": inst.index,
                "from": old.value,
                "to": new.value,
                "attempt": inst.attempt,
                "at": now,
                "reason": inst.reason,
                "error": (inst.error or "")[:500] if new in FAILURE else None,
            })
        # Debug level (a line per transition is too dear at 10^5 elements); failures are worth a warning.
        loud = new in FAILURE and new is not State.UPSTREAM_FAILED and new is not State.CANCELLED
        checked = _debug_checked  # (``_debugging``'s answer while it holds, without the call)
        if loud or (checked[1] if -DEBUG_RECHECK_S < now - checked[0] < DEBUG_RECHECK_S else _debugging(now)):
            (log.warning if loud else log.debug)(
                "task state", run_id=run.id, task=inst.task, index=inst.index, job_id=inst.job_key or inst.job_id,
                cluster=run.cluster, old=old.value, new=new.value, attempt=inst.attempt)
        return True

    def task(self, run: Run, tr: TaskRun, new: TaskState, evidence: dict[str, Any], *, size: int | None = None,
             reason: str | None = None) -> bool:
        old = tr.state
        if not is_legal_task(old, new):
            return self._illegal("task", old.value, new.value, evidence, run_id=run.id, task=tr.name)
        now = world.now()
        tr.state = new
        tr.reason = reason
        if size is not None:
            tr.size = size
        self.store.put_task(run.id, tr)
        self.store.add_transition(run.id, tr.name, None, old.value, new.value, {"task_level": True, **evidence}, now)
        self.counters["task_transitions"] += 1
        if new is TaskState.EXPANDED:
            self.events.publish({"type": "expanded", "run_id": run.id, "task": tr.name, "size": tr.size, "at": now})
        else:
            self.events.publish({"type": "transition", "run_id": run.id, "task": tr.name, "index": None,
                                 "from": old.value, "to": new.value, "at": now, "task_level": True, "reason": reason})
        log.debug("task-level state", run_id=run.id, task=tr.name, old=old.value, new=new.value, reason=reason)
        return True

    def run(self, run: Run, new: RunState, evidence: dict[str, Any]) -> bool:
        old = run.state
        if old is new:
            return False
        if not is_legal_run(old, new):
            return self._illegal("run", old.value, new.value, evidence, run_id=run.id)
        now = world.now()
        run.state = new
        run.updated_at = now
        run.ended_at = now if new in RUN_TERMINAL else None
        self.store.put_run(run)
        self.store.add_transition(run.id, None, None, old.value, new.value, evidence, now)
        self.counters["run_transitions"] += 1
        self.events.publish({"type": "run", "run_id": run.id, "from": old.value, "to": new.value, "at": now})
        log.info("run state", run_id=run.id, workflow=run.workflow, old=old.value, new=new.value)
        if new in RUN_TERMINAL:
            self.events.end_run(run.id)
        return True

    def born(self, run: Run, evidence: dict[str, Any]) -> None:
        """A new run: its first row and the transition into RUNNING (from nothing)."""
        self.store.put_run(run)
        self.store.add_transition(run.id, None, None, None, run.state.value, evidence, run.created_at)
