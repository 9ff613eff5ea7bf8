"""In-memory model of runs: a run holds tasks, a task holds instances.

These are plain mutable records owned by the engine (one event loop, so no
locks); the store persists them as rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from reflow_client.manifest import Manifest, TaskManifest

from .states import ACTIVE, IN_FLIGHT, SUCCESS, RunState, State


@dataclass
class Instance:
    """One execution unit: a singleton task, or one element of an array task."""

    run_id: str
    task: str
    index: int | None
    state: State = State.PENDING
    attempt: int = 1
    identity: str | None = None
    tag: str | None = None  # submission tag of the current attempt
    job_id: str | None = None
    job_key: str | None = None  # key in scheduler observations ("123" or "123_4")
    output: Any = None
    output_hash: str | None = None
    error: str | None = None
    traceback: str | None = None
    reason: str | None = None  # scheduler's reason (why pending, how it ended)
    not_before: float | None = None  # earliest submission time (retry back-off)
    submitted_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    updated_at: float = field(default_factory=time.time)
    host: str | None = None
    cached_from: str | None = None  # run id whose result stands in
    # Observation bookkeeping (not persisted: restarts count afresh, which is conservative).
    absent_since: float | None = None
    absent_count: int = 0
    done_seen_at: float | None = None

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.run_id, self.task, -1 if self.index is None else self.index)

    @property
    def label(self) -> str:
        return self.task if self.index is None else f"{self.task}[{self.index}]"

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def in_flight(self) -> bool:
        return self.state in IN_FLIGHT

    @property
    def ok(self) -> bool:
        return self.state in SUCCESS


@dataclass
class TaskRun:
    """A task within one run: its manifest and its instances."""

    manifest: TaskManifest
    expanded: bool = False  # arrays: elements created; singletons: always True
    size: int | None = None
    # Arrays that will never expand: UPSTREAM_FAILED (what they fan out over failed) or CANCELLED.
    blocked: State | None = None
    blocked_reason: str | None = None
    instances: dict[int | None, Instance] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def settled(self) -> bool:
        """Expanded (or blocked) and nothing active: downstream may look at its outcome."""
        if self.blocked:
            return True
        if not self.expanded:
            return False
        return not any(i.active for i in self.instances.values())

    def ordered(self) -> list[Instance]:
        if not self.manifest.is_array:
            return [self.instances[None]] if None in self.instances else []
        return [self.instances[i] for i in sorted(k for k in self.instances if k is not None)]


@dataclass
class Run:
    """One submitted workflow run."""

    id: str
    manifest: Manifest
    params: dict[str, Any]
    run_dir: str
    cluster: str
    state: RunState = RunState.RUNNING
    options: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    error: str | None = None
    cancel_requested: bool = False
    tasks: dict[str, TaskRun] = field(default_factory=dict)

    @property
    def workflow(self) -> str:
        return self.manifest.workflow

    def instances(self) -> list[Instance]:
        return [inst for t in self.tasks.values() for inst in t.instances.values()]

    def instance(self, task: str, index: int | None) -> Instance | None:
        tr = self.tasks.get(task)
        return tr.instances.get(index) if tr else None

    @property
    def active(self) -> bool:
        for t in self.tasks.values():
            if not t.expanded and not t.blocked:
                return True
            if any(i.active for i in t.instances.values()):
                return True
        return False

    def summary(self) -> dict[str, dict[str, int]]:
        """``{task: {state: count}}``; unexpanded arrays show as pending/upstream_failed."""
        out: dict[str, dict[str, int]] = {}
        for name, tr in self.tasks.items():
            counts: dict[str, int] = {}
            for inst in tr.instances.values():
                counts[inst.state.value] = counts.get(inst.state.value, 0) + 1
            if not tr.expanded:
                counts = {(tr.blocked or State.PENDING).value: 1}
            out[name] = counts
        return out
