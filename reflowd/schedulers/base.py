"""The scheduler seam: what every batch-system adapter offers the engine.

An adapter is pure functions (render a submission, parse a query) plus a thin
async layer that runs them through a :class:`~reflowd.transports.base.Transport`.
The engine speaks only the types here: a :class:`SubmitRequest` goes in, a job
id comes out; a set of job ids goes in, one :class:`Observation` per job (or
array element) comes out. An observation is *present* (with a state), *absent*
(the scheduler positively does not know the job) or *unknown* (the query
failed; nothing may be concluded from it).
"""

from __future__ import annotations

import abc
import enum
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class Phase(str, enum.Enum):
    """Where a job is in its life, as far as the engine cares."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


class Outcome(str, enum.Enum):
    """How a finished job ended (scheduler's view)."""

    COMPLETED = "completed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    OUT_OF_MEMORY = "out_of_memory"
    NODE_FAIL = "node_fail"
    CANCELLED = "cancelled"
    PREEMPTED = "preempted"
    BOOT_FAIL = "boot_fail"
    DEADLINE = "deadline"


class Presence(str, enum.Enum):
    PRESENT = "present"
    ABSENT = "absent"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Observation:
    """One job (or array element) as one scheduler query saw it."""

    presence: Presence
    phase: Phase | None = None
    outcome: Outcome | None = None
    native_state: str | None = None
    reason: str | None = None
    exit_code: str | None = None
    detail: str | None = None
    #: Where the job ran, and its peak memory, where the scheduler reports them (shown in a failure's cause).
    node: str | None = None
    peak_mem: str | None = None

    @classmethod
    def absent(cls) -> Observation:
        return cls(Presence.ABSENT)

    @classmethod
    def unknown(cls, detail: str) -> Observation:
        return cls(Presence.UNKNOWN, detail=detail)


_SIZE = re.compile(r"\s*([\d.]+)\s*([KMGT]?B?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "M": 1024 ** 2, "MB": 1024 ** 2, "G": 1024 ** 3,
               "GB": 1024 ** 3, "T": 1024 ** 4, "TB": 1024 ** 4}


def size_bytes(text: str | None) -> float | None:
    """A memory size as schedulers print it (``379.027MB``, ``2097152K``, ``4400kb``, ``1.5G``) in bytes."""
    match = _SIZE.match(text or "")
    if not match:
        return None
    return float(match.group(1)) * _SIZE_UNITS.get(match.group(2).upper(), 1)


def size_text(nbytes: float | None) -> str | None:
    """Bytes as a short size for a cause (``379M``, ``12.5G``); None when not measured (0 or unknown)."""
    if not nbytes:
        return None
    mb = nbytes / 1024 ** 2
    return f"{mb / 1024:.1f}G" if mb >= 10 * 1024 else f"{mb:.0f}M" if mb >= 1 else f"{nbytes / 1024:.0f}K"


@dataclass(frozen=True)
class JobAnswer:
    """What one status query saw of one job, compactly.

    ``elements`` holds observations by key (the job id for a plain job, ``<id>_<k>``
    for array elements); ``spans`` holds runs of array task ids ``first..last`` that
    share one observation (Slurm prints a pending array as one line ``123_[0-999]``).
    A key in neither is absent. Two equal answers for a job mean nothing changed
    there, which the driver checks without looking at each element.
    """

    elements: Mapping[str, Observation] = field(default_factory=dict)
    spans: tuple[tuple[int, int, Observation], ...] = ()

    def get(self, key: str, job_id: str) -> Observation | None:
        found = self.elements.get(key)
        if found is not None or not self.spans:
            return found
        head, sep, tail = key.rpartition("_")
        if not sep or head != job_id or not tail.isdigit():
            return None
        k = int(tail)
        for first, last, obs in self.spans:
            if first <= k <= last:
                return obs
        return None

    def keys(self, job_id: str) -> Iterator[str]:
        yield from self.elements
        for first, last, _ in self.spans:
            for k in range(first, last + 1):
                key = f"{job_id}_{k}"
                if key not in self.elements:
                    yield key


class Answers(Mapping[str, Observation]):
    """A status query's answer, job by job (:class:`JobAnswer`): what ``Scheduler.query`` may return
    instead of a flat dict. It reads like the flat dict (``get``, ``in``, iteration expand spans on
    demand), and :meth:`job` lets the driver compare a whole job's answer at once: an idle array of
    10^5 queued elements then costs a poll time per job, not per element."""

    def __init__(self, jobs: dict[str, JobAnswer] | None = None) -> None:
        self.jobs: dict[str, JobAnswer] = jobs if jobs is not None else {}

    def job(self, job_id: str) -> JobAnswer | None:
        return self.jobs.get(job_id)

    def _job_of(self, key: str) -> str:
        if key in self.jobs:
            return key
        return key.rpartition("_")[0]

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        job_id = self._job_of(key)
        answer = self.jobs.get(job_id)
        found = answer.get(key, job_id) if answer is not None else None
        return default if found is None else found

    def __getitem__(self, key: str) -> Observation:
        found = self.get(key)
        if found is None:
            raise KeyError(key)
        return found  # type: ignore[no-any-return]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def __iter__(self) -> Iterator[str]:
        for job_id, answer in self.jobs.items():
            yield from answer.keys(job_id)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"Answers({self.jobs!r})"


@dataclass(frozen=True)
class SubmitRequest:
    """One submission: a singleton job, or one array job covering *indices*.

    ``indices`` are element indices of the task; the scheduler sees
    ``index - index_offset`` as its array task id so that chunks of a large
    fan-out stay below the site's ``MaxArraySize``.

    A *packed* submission (``slices`` set) runs several elements per array
    task: the scheduler sees one array task per slice (``indices`` are then
    the slice numbers ``0..k-1``), and array task ``k`` runs the elements
    ``slices[k]`` one after another (see ``reflowd/driver/packing.py``).
    Adapters need not know: they render ``indices`` as always.
    """

    tag: str
    run_id: str
    task: str
    job_dir: str
    log_dir: str
    workdir: str
    worker_argv: Sequence[str]
    indices: Sequence[int] | None = None
    index_offset: int = 0
    array_parallelism: int | None = None
    cpus: int = 1
    time: str = "00:30:00"
    mem: str = "4G"
    options: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    #: Element indices run by each array task of a packed submission (None: one element per array task).
    slices: Sequence[Sequence[int]] | None = None

    @property
    def is_array(self) -> bool:
        return self.indices is not None

    @property
    def job_name(self) -> str:
        """The name the scheduler shows; carries the tag so a restart can find the job."""
        return self.tag

    def element_key(self, job_id: str, index: int | None) -> str:
        """The key under which a query reports one element of this submission."""
        if index is None or not self.is_array:
            return job_id
        return f"{job_id}_{index - self.index_offset}"


class SubmitError(Exception):
    """The scheduler refused a submission.

    ``permanent`` means retrying the same request cannot help (bad partition,
    invalid option); otherwise (timeout, controller busy) the outcome is
    unknown and the submission tag must be checked before trying again.
    """

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent

    @classmethod
    def from_output(cls, command: str, returncode: int, message: str, transient: Collection[str]) -> SubmitError:
        """A submit command that failed: permanent (the same request would be refused again) unless its
        message says the controller did not answer (one of *transient*, lower case): then the job may or
        may not exist, and the tag decides."""
        if not message:
            return cls(f"{command} exited {returncode} without a message", permanent=False)
        return cls(message, permanent=not any(p in message.lower() for p in transient))


class OptionError(ValueError):
    """A submit option the scheduler does not know or cannot take."""


@dataclass(frozen=True)
class TaggedJob:
    """A job found by its submission tag."""

    job_id: str
    tag: str
    active: bool


class Scheduler(abc.ABC):
    """A batch system reached through a transport."""

    #: "local", "slurm", ...
    kind: str = "scheduler"
    #: Largest array task id + 1 the scheduler accepts (Slurm's MaxArraySize).
    max_array_size: int = 1001
    #: True when an element with no trace (no process, no started marker, no result)
    #: provably never started and never will, so it may be queued again (local only).
    can_requeue_unstarted: bool = False
    #: Called by schedulers that learn about changes by themselves (local process exits).
    on_change: Callable[[], None] | None = None
    #: Called by schedulers whose accounting can fail on its own (Slurm's slurmdbd behind sacct) after each
    #: use of it: with None when it answered, else with the error (the adapter fell back to the controller).
    on_accounting: Callable[[str | None], None] | None = None

    async def probe(self) -> dict[str, Any]:
        """Learn site facts (array size limit, accounting) once at start."""
        return {}

    async def check_accounting(self) -> None:
        """Ask the accounting (reported through ``on_accounting``) whether it answers again: the driver calls this
        while accounting is degraded and no poll would ask it. Nothing to do for most schedulers."""

    def validate_options(self, options: Mapping[str, Any]) -> None:
        """Raise OptionError naming an option this scheduler cannot take."""

    @abc.abstractmethod
    async def submit(self, request: SubmitRequest) -> str:
        """Submit; return the job id (the array's master id for arrays). Raises SubmitError."""

    @abc.abstractmethod
    async def query(self, job_ids: Collection[str]) -> Mapping[str, Observation]:
        """One status query for many jobs; keys are job ids or ``<id>_<k>`` array elements.

        A flat dict, or :class:`Answers` (job by job, arrays sharing a state in spans), which
        lets the driver skip a job whose answer has not changed without walking its elements.

        Every element of every array job asked about must be answered for:
        a key that is missing from the result means *absent* only when the
        query succeeded; a failed query answers UNKNOWN for every key.
        """

    @abc.abstractmethod
    async def find_tags(self, tags: Collection[str]) -> dict[str, list[TaggedJob]]:
        """Jobs carrying each submission tag (empty list: none). Raises TransportError if unknown."""

    @abc.abstractmethod
    async def cancel(self, job_keys: Collection[str]) -> None:
        """Cancel whole jobs or single array elements (``<id>_<k>``)."""

    async def reattach(self, request: SubmitRequest, job_id: str) -> None:
        """After a daemon restart, pick up a job submitted by an earlier daemon (default: nothing to do)."""

    def forget(self, job_id: str) -> None:
        """The engine has concluded every element of *job_id*; drop any bookkeeping."""

    def stats(self) -> dict[str, Any]:
        return {}

    async def aclose(self) -> None:
        """Stop background work; idempotent."""


#: Characters of job keys in one cancel command: an SSH command reaches the remote shell as one argument,
#: which Linux caps at 128 KiB ("Argument list too long": a cancel of 12,000 array elements key by key).
COMMAND_CHARS = 60_000


def command_chunks(words: Sequence[str], limit: int = COMMAND_CHARS) -> list[list[str]]:
    """*words* cut into runs of at most *limit* characters (with a space each), in order; a longer word alone."""
    chunks: list[list[str]] = []
    chunk: list[str] = []
    size = 0
    for word in words:
        if chunk and size + len(word) + 1 > limit:
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(word)
        size += len(word) + 1
    if chunk:
        chunks.append(chunk)
    return chunks


def index_runs(indices: Iterable[int]) -> list[tuple[int, int]]:
    """``[0, 1, 2, 5, 7, 8]`` -> ``[(0, 2), (5, 5), (7, 8)]``: runs of consecutive indices, ascending.

    The one range folder the adapters share (Slurm's ``--array`` and ``scancel``, PBS's ``qdel``, LSF's
    ``bkill``): a cancel of 10^4 array elements is then a few words, not 10^4.
    """
    runs: list[tuple[int, int]] = []
    for i in sorted(set(indices)):
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def compress_indices(indices: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``0-2,5,7-8`` (Slurm's --array syntax, LSF's index_list)."""
    runs = index_runs(indices)
    if not runs:
        raise ValueError("an array needs at least one index")
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def cancel_targets(targets: Iterable[tuple[str, int | None]]) -> tuple[list[str], dict[str, set[int]]]:
    """(whole jobs, sorted; {array job: element positions}) from ``(job id, position or None)`` targets.

    A job cancelled whole takes its elements with it, so its positions are dropped: one word, not two.
    """
    whole: set[str] = set()
    elements: dict[str, set[int]] = {}
    for job_id, position in targets:
        if position is None:
            whole.add(job_id)
        else:
            elements.setdefault(job_id, set()).add(position)
    return sorted(whole), {job: found for job, found in sorted(elements.items()) if job not in whole}


def log_path(log_dir: str, task: str, tag: str, array_task_id: int | str | None, stream: str) -> str:
    """Where a job's stdout/stderr goes; ``array_task_id`` may be a scheduler pattern like ``%a``."""
    if array_task_id is None:
        return f"{log_dir}/{task}.{tag}.{stream}"
    return f"{log_dir}/{task}.{tag}.{array_task_id}.{stream}"

