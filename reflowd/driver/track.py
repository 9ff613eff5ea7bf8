"""A submission the driver follows: its record, and the instances still in flight under its tag."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from reflow_client.jobfiles import element_key

from ..engine.model import Instance, JobRecord, Run
from ..schedulers.base import SubmitRequest
from .policy import FileClock


@dataclass(eq=False)
class JobTrack:
    record: JobRecord
    run: Run
    #: Instances in flight under this tag, by index; the driver removes one the moment it leaves.
    live: dict[int | None, Instance]
    files: FileClock
    #: Results of workers killed by a signal, held until the scheduler says why (timeout? cancel?).
    held: dict[int | None, tuple[dict[str, Any], float]] = field(default_factory=dict)
    #: Result and started files already acted on (names in the job directory).
    seen_results: set[str] = field(default_factory=set)
    seen_started: set[str] = field(default_factory=set)
    #: Results of runs the scheduler requeued since (``requeue.mark``): never taken for the attempt's outcome.
    stale: dict[int | None, tuple[Any, ...]] = field(default_factory=dict)
    #: False for a submission an earlier daemon made: its stale marks are read from the job directory first.
    stale_loaded: bool = True
    resolve_attempts: int = 0
    resolve_after: float = 0.0
    #: Packed submissions: element index -> the array task (slice) that runs it.
    slots: dict[int, int] = field(default_factory=dict)
    #: The scheduler's last answer for this job (a ``JobAnswer``) when it changed nothing for any live
    #: instance, with how many were live and whether something ran: an equal answer is skipped whole.
    quiet_answer: Any = None
    quiet_live: int = -1
    quiet_active: bool = False
    #: How many elements the submission covers (``packing.elements``), counted once.
    element_count: int = -1
    #: Something raised while handling it (``Driver.track_failed``): its instances were failed (or, its job id
    #: unknown, fail once its tag is looked up), with ``error``.
    failed: bool = False
    error: str | None = None
    #: Packed: live elements per array task (slot), so that what a queue limit counts of it is known without
    #: a walk over its elements (``queued_jobs``); kept by :meth:`leave`.
    slot_live: dict[int | None, int] = field(default_factory=dict)
    #: Counted in its driver's ``queued_count`` (it is in the driver's ``tracks`` or ``unresolved``).
    counted: bool = False

    def __post_init__(self) -> None:
        for k, piece in enumerate(self.record.request.slices or ()):
            for index in piece:
                self.slots[index] = k
        if self.slots:
            for index in self.live:
                slot = self.slots.get(index)  # type: ignore[arg-type]
                self.slot_live[slot] = self.slot_live.get(slot, 0) + 1

    def leave(self, index: int | None) -> int:
        """*index* is no longer in flight here: how many fewer jobs a queue limit counts of this submission."""
        if self.live.pop(index, None) is None:
            return 0
        if not self.slots:
            return 1
        slot = self.slots.get(index)  # type: ignore[arg-type]
        left = self.slot_live.get(slot, 0) - 1
        if left > 0:
            self.slot_live[slot] = left
            return 0
        self.slot_live.pop(slot, None)
        return 1

    @property
    def waiting(self) -> bool:
        """The scheduler's unchanged answer says none of the job's elements has started: no result can be
        there to find, so its files are not looked at (``Driver.awake`` holds the tracks where this is false)."""
        return self.quiet_answer is not None and not self.quiet_active

    @property
    def packed(self) -> bool:
        return self.record.request.slices is not None

    def slot_members(self, slot: int) -> list[Instance]:
        """The instances a packed job's array task *slot* runs (whatever their state)."""
        slices = self.request.slices or ()
        if not 0 <= slot < len(slices):
            return []
        tr = self.run.tasks[self.record.task]
        return [tr.instances[i] for i in slices[slot] if i in tr.instances]

    def queued_jobs(self) -> int:
        """What a per-user queue limit counts of this submission: its live elements, or, packed, the array
        tasks (slices) that still run one of them -- the scheduler sees one job per slice."""
        return len(self.slot_live) if self.slots else len(self.live)

    def slot_busy(self, index: int | None) -> bool:
        """Packed: another element of *index*'s slice is still live (its array task is still counted)."""
        slot = self.slots.get(index) if index is not None else None
        return slot is not None and self.slot_live.get(slot, 0) > (1 if index in self.live else 0)

    def has_result(self, index: int | None) -> bool:
        return f"{element_key(index)}.json" in self.seen_results

    @property
    def tag(self) -> str:
        return self.record.tag

    @property
    def request(self) -> SubmitRequest:
        return self.record.request

    def members(self) -> list[Instance]:
        """Every instance this submission covers (in flight or not)."""
        tr = self.run.tasks[self.record.task]
        if self.request.slices is not None:
            return [tr.instances[i] for piece in self.request.slices for i in piece if i in tr.instances]
        indices = self.request.indices
        if indices is None:
            return [tr.instances[None]] if None in tr.instances else []
        return [tr.instances[i] for i in indices if i in tr.instances]


def index_of(name: str) -> int | None | bool:
    """The element index a job-directory file name stands for (``False`` if it names none)."""
    if not name.endswith(".json"):
        return False
    stem = name[:-5]
    if stem == "single":
        return None
    return int(stem) if stem.isdigit() else False
