"""In-memory model of runs: a run holds tasks, a task holds instances.

These are plain mutable records owned by the engine (one event loop, so no
locks). Each dataclass is the one definition of its record: persisted fields
carry a :func:`~reflowd.engine.records.column`, from which the store derives
its tables and row conversions (see ``records.py``).

A task keeps a count of its instances per state (kept by the ledger on every
transition), so "is this task settled", "is the run active" and a run's
summary cost time per task, not per instance.
"""

from __future__ import annotations

import json
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from reflow_client.manifest import Manifest, TaskManifest

from .. import world
from ..schedulers.base import SubmitRequest
from .records import (column, derived, dump_json, enum_column, index_column, json_column, rare, rare_fields, rare_json,
                      transient)
from .states import ACTIVE, IN_FLIGHT, SUCCESS, TASK_BLOCKED, RunState, State, TaskState

ON_ERROR = ("continue", "stop")


@dataclass(frozen=True)
class RunOptions:
    """How a run treats the cache and failures (the ``options`` of ``submit``)."""

    force: bool = False  # ignore the cache for every task
    force_tasks: tuple[str, ...] = ()  # ignore the cache for these tasks
    verify: bool = False  # check cached outputs (paths, verify=) before reusing them
    on_error: str = "continue"  # "stop": cancel what has not started after the first failure

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RunOptions:
        data = data or {}
        return cls(
            force=bool(data.get("force", False)),
            force_tasks=tuple(data.get("force_tasks") or ()),
            verify=bool(data.get("verify", False)),
            on_error=str(data.get("on_error") or "continue"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"force": self.force, "force_tasks": list(self.force_tasks), "verify": self.verify,
                "on_error": self.on_error}


def _hex(digest: bytes | None) -> str | None:
    return None if digest is None else digest.hex()


def _unhex(text: str | None) -> bytes | None:
    return None if text is None else bytes.fromhex(text)


def _element_key(keys: str | Callable[[int | None], str] | None, index: int | None) -> str | None:
    """``Instance.job_key`` from what it is made of (the key, or its job's key maker) and the index."""
    return keys if keys is None or type(keys) is str else keys(index)


def _options_column() -> Any:
    return column("TEXT NOT NULL", default_factory=RunOptions, encode=lambda o: dump_json(o.to_dict()),
                  decode=lambda v: RunOptions.from_dict(json.loads(v)))


@rare_fields(
    # Fields most instances never set share one slot (``rare``, a dict of what differs from the
    # defaults): 10 fewer slots per instance, 80 bytes of each of a million held instances.
    rare("error", "TEXT", reset=True, shared=True),
    rare("traceback", "TEXT", reset=True),
    rare("not_before", "REAL"),  # earliest submission time (retry back-off)
    rare("cached_from", "TEXT", reset=True, shared=True),  # run id whose result stands in
    rare_json("cause", reset=True),  # why the attempt ended (``causes.py``), a dict
    rare_json("resources"),  # escalated {"mem", "time"} for this attempt (None: the task's)
    rare_json("attempts"),  # earlier attempts: [{"attempt", "state", "cause", ...}]
    rare("alone", "INTEGER"),  # this attempt runs unpacked: the one before died in a packed job
    # Observation bookkeeping (not persisted: restarts count afresh, which is conservative).
    rare("absent_since", reset=True),
    rare("absent_count", default=0, reset=True),
    rare("done_seen_at", reset=True),
    # The key a scheduler's answers report this instance under ("123_4"): a property over ``job_keys``.
    # (A snapshot keeps ``job_keys`` and the index: the writer makes the key off the event loop.)
    derived("job_key", "TEXT", after="job_id", reset=True, made_from=("job_keys", "index"), make=_element_key),
)
@dataclass(slots=True, eq=False)
class Instance:
    """One execution unit: a singleton task, or one element of an array task.

    Its fields are the columns below plus the rare ones above (properties over ``rare``); the
    store's table has them all (``records.Table``).
    """

    run_id: str = column("TEXT NOT NULL", key=True, shared=True)
    task: str = column("TEXT NOT NULL", key=True, shared=True)
    index: int | None = index_column()
    state: State = enum_column(State, default=State.PENDING)
    attempt: int = column("INTEGER NOT NULL", default=1)
    #: The Merkle identity (``resolve.identity_digest``) as its 32 bytes; stored and shown as hex.
    identity: bytes | None = column("TEXT", default=None, encode=_hex, decode=_unhex)
    tag: str | None = column("TEXT", default=None, reset=True, shared=True)  # submission tag of the current attempt
    job_id: str | None = column("TEXT", default=None, reset=True, shared=True)
    #: What ``job_key`` is made from: the key itself, or the job's ``packing.ElementKeys`` (shared by its
    #: instances, a key made when asked for: a million queued elements hold no million key strings).
    job_keys: str | Callable[[int | None], str] | None = transient(default=None, reset=True)
    output: Any = json_column(default=None, reset=True)
    output_hash: str | None = column("TEXT", default=None, reset=True)
    reason: str | None = column("TEXT", default=None, reset=True, shared=True)  # scheduler's reason (why pending, how it ended)
    # (``world.now`` gives a burst of changes one float object: shared when read back too)
    submitted_at: float | None = column("REAL", default=None, reset=True, shared=True)
    started_at: float | None = column("REAL", default=None, reset=True, shared=True)
    ended_at: float | None = column("REAL", default=None, reset=True, shared=True)
    updated_at: float = column("REAL NOT NULL", default_factory=world.now, shared=True)
    host: str | None = column("TEXT", default=None, reset=True, shared=True)
    observed: Any = transient(default=None, reset=True)  # the scheduler's last Observation of this instance
    handed: bool = transient(default=False)  # READY and given to the cluster's driver (past the cache check)
    #: The rare fields' values that differ from their defaults (None: all at their defaults).
    rare: dict[str, Any] | None = transient(default=None)

    if TYPE_CHECKING:  # (the rare fields, as type checkers should see them)
        error: str | None
        traceback: str | None
        not_before: float | None
        cached_from: str | None
        cause: Any
        resources: Any
        attempts: Any
        alone: int | None
        absent_since: float | None
        absent_count: int
        done_seen_at: float | None

    @property
    def job_key(self) -> str | None:
        """The key a scheduler's answers report this instance under ("123_4"; a column of its own)."""
        keys = self.job_keys
        return keys if keys is None or type(keys) is str else keys(self.index)  # type: ignore[operator]

    @job_key.setter
    def job_key(self, value: str | Callable[[int | None], str] | None) -> None:
        self.job_keys = value

    @property
    def identity_hex(self) -> str | None:
        """The identity as the cache, job files and workers spell it."""
        return None if self.identity is None else self.identity.hex()

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


class Elements(MutableMapping[int | None, Instance]):
    """A task's instances by index, as a list: 8 bytes an element where a dict entry costs 40 to 80
    (a million held instances). ``None`` is a singleton's one key. Reads like a dict; ``values()``
    and ``items()`` are lists (taken at the call), in index order."""

    __slots__ = ("_items", "_count", "_single")

    def __init__(self, items: Mapping[int | None, Instance] | None = None) -> None:
        self._items: list[Instance | None] = []
        self._count = 0
        self._single: Instance | None = None
        for key, value in (items or {}).items():
            self[key] = value

    def get(self, key: Any, default: Any = None) -> Any:
        if key is None:
            return default if self._single is None else self._single
        if type(key) is int and key >= 0:
            try:
                value = self._items[key]
            except IndexError:
                return default
            return default if value is None else value
        return default

    def __getitem__(self, key: Any) -> Instance:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value  # type: ignore[no-any-return]

    def __contains__(self, key: object) -> bool:
        return self.get(key) is not None

    def __setitem__(self, key: int | None, value: Instance) -> None:
        if key is None:
            self._single = value
            return
        if type(key) is not int or key < 0:
            raise KeyError(f"an element index is an int >= 0, not {key!r}")
        items = self._items
        if key >= len(items):
            items.extend([None] * (key + 1 - len(items)))
        if items[key] is None:
            self._count += 1
        items[key] = value

    def __delitem__(self, key: int | None) -> None:
        if key not in self:
            raise KeyError(key)
        if key is None:
            self._single = None
        else:
            self._items[key] = None
            self._count -= 1

    def __iter__(self) -> Iterator[int | None]:
        if self._single is not None:
            yield None
        for i, value in enumerate(self._items):
            if value is not None:
                yield i

    def __len__(self) -> int:
        return self._count + (self._single is not None)

    def values(self) -> list[Instance]:  # type: ignore[override]
        out = [v for v in self._items if v is not None] if self._count else []
        return [self._single, *out] if self._single is not None else out

    def items(self) -> list[tuple[int | None, Instance]]:  # type: ignore[override]
        out: list[tuple[int | None, Instance]] = [(i, v) for i, v in enumerate(self._items) if v is not None]
        return [(None, self._single), *out] if self._single is not None else out

    def __repr__(self) -> str:
        return f"Elements({len(self)} instances)"


@dataclass(eq=False)
class TaskRun:
    """A task within one run: its manifest, its own state and its instances."""

    manifest: TaskManifest
    run_id: str = column("TEXT NOT NULL", key=True, default="")
    name: str = column("TEXT NOT NULL", key=True, default="")
    #: Singletons are born EXPANDED; arrays wait in PENDING until their size is known.
    state: TaskState = enum_column(TaskState, default=TaskState.PENDING)
    size: int | None = column("INTEGER", default=None)
    reason: str | None = column("TEXT", default=None)  # why the task is blocked
    instances: Elements = field(default_factory=Elements)
    counts: Counter[State] = field(default_factory=Counter, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.instances, Elements):  # (a dict given: kept as the list it stands for)
            self.instances = Elements(self.instances)
        self.name = self.name or self.manifest.name
        if not self.manifest.is_array and self.state is TaskState.PENDING:
            self.state = TaskState.EXPANDED
        for inst in self.instances.values():
            self.counts[inst.state] += 1

    @property
    def expanded(self) -> bool:
        return self.state is TaskState.EXPANDED

    @property
    def blocked(self) -> TaskState | None:
        """The reason an array will never expand (UPSTREAM_FAILED, CANCELLED, FAILED), else None."""
        return self.state if self.state in TASK_BLOCKED else None

    @property
    def open(self) -> bool:
        """Not expanded and not blocked: the task still waits for its inputs."""
        return self.state is TaskState.PENDING

    def add(self, inst: Instance) -> None:
        self.instances[inst.index] = inst
        self.counts[inst.state] += 1

    @property
    def active_count(self) -> int:
        return sum(n for s, n in self.counts.items() if s in ACTIVE)

    @property
    def settled(self) -> bool:
        """Expanded (or blocked) and nothing active: downstream may look at its outcome."""
        if self.blocked:
            return True
        if not self.expanded:
            return False
        return self.active_count == 0

    def ordered(self) -> list[Instance]:
        if not self.manifest.is_array:
            return [self.instances[None]] if None in self.instances else []
        return [self.instances[i] for i in range(self.size or 0) if i in self.instances]


_MANIFEST_JSON: dict[int, tuple[weakref.ref[Manifest], str]] = {}


def _manifest_json(manifest: Manifest) -> str:
    """A run's manifest as stored, encoded once per manifest (a run's row is written on every state
    change; a run's manifest never changes after submission)."""
    hit = _MANIFEST_JSON.get(id(manifest))
    if hit is not None and hit[0]() is manifest:
        return hit[1]
    key = id(manifest)
    text = dump_json(manifest.to_manifest_dict())
    _MANIFEST_JSON[key] = (weakref.ref(manifest, lambda _ref: _MANIFEST_JSON.pop(key, None)), text)
    return text


@dataclass(eq=False)
class Run:
    """One submitted workflow run."""

    #: Stored manifests get only the type checks (``strict=False``): the door checked them when they were submitted.
    manifest: Manifest = column("TEXT NOT NULL", encode=lambda m: _manifest_json(m),
                                decode=lambda v: Manifest.from_dict(json.loads(v), strict=False))
    id: str = column("TEXT NOT NULL", key=True, default="")
    workflow: str = column("TEXT NOT NULL", default="")
    state: RunState = enum_column(RunState, default=RunState.RUNNING)
    cluster: str = column("TEXT NOT NULL", default="")
    run_dir: str = column("TEXT NOT NULL", default="")
    params: dict[str, Any] = json_column("TEXT NOT NULL", default_factory=dict)
    options: RunOptions = _options_column()
    created_at: float = column("REAL NOT NULL", default_factory=world.now)
    updated_at: float = column("REAL NOT NULL", default_factory=world.now)
    ended_at: float | None = column("REAL", default=None)
    error: str | None = column("TEXT", default=None)
    #: A whole-run cancel was asked for: nothing new starts, and the run ends CANCELLED.
    cancel_requested: bool = column("INTEGER NOT NULL DEFAULT 0", default=False, encode=int, decode=bool)
    tasks: dict[str, TaskRun] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workflow = self.workflow or self.manifest.workflow
        if isinstance(self.options, dict):  # convenience for callers holding the wire form
            self.options = RunOptions.from_dict(self.options)

    def instances(self) -> list[Instance]:
        return [inst for t in self.tasks.values() for inst in t.instances.values()]

    def instance(self, task: str, index: int | None) -> Instance | None:
        tr = self.tasks.get(task)
        return tr.instances.get(index) if tr else None

    @property
    def active(self) -> bool:
        return any(t.open or t.active_count for t in self.tasks.values())

    def summary(self) -> dict[str, dict[str, int]]:
        """``{task: {state: count}}``; unexpanded arrays show as pending/upstream_failed."""
        out: dict[str, dict[str, int]] = {}
        for name, tr in self.tasks.items():
            if not tr.expanded:
                out[name] = {(tr.blocked or State.PENDING).value: 1}
            else:
                out[name] = {s.value: n for s, n in tr.counts.items() if n}
        return out


def _request_to_dict(req: SubmitRequest) -> dict[str, Any]:
    return {
        "tag": req.tag, "run_id": req.run_id, "task": req.task, "job_dir": req.job_dir, "log_dir": req.log_dir,
        "workdir": req.workdir, "worker_argv": list(req.worker_argv),
        "indices": None if req.indices is None else list(req.indices), "index_offset": req.index_offset,
        "array_parallelism": req.array_parallelism, "cpus": req.cpus, "time": req.time, "mem": req.mem,
        "options": dict(req.options), "env": dict(req.env),
        **({"slices": [list(s) for s in req.slices]} if req.slices is not None else {}),
    }


def _request_from_dict(data: dict[str, Any]) -> SubmitRequest:
    return SubmitRequest(**{**data, "indices": data.get("indices"), "worker_argv": list(data["worker_argv"])})


JOB_STATES = ("submitting", "submitted", "done", "refused", "not_submitted", "vanished", "failed",
              "early_submitting", "early", "dropped")  # (failed: driver.FAILED_JOB; the last three: driver/early.py)


def _encode_request(request: SubmitRequest | dict[str, Any]) -> str:
    return dump_json(request if isinstance(request, dict) else _request_to_dict(request))


@dataclass(eq=False)
class JobRecord:
    """One submission (its tag) and the request that made it, so a restart can re-attach."""

    tag: str = column("TEXT NOT NULL", key=True)
    run_id: str = column("TEXT NOT NULL", shared=True)
    task: str = column("TEXT NOT NULL", shared=True)
    cluster: str = column("TEXT NOT NULL", shared=True)
    request: SubmitRequest = column("TEXT NOT NULL", encode=_encode_request,
                                    decode=lambda v: _request_from_dict(json.loads(v)))
    job_id: str | None = column("TEXT", default=None)
    state: str = column("TEXT NOT NULL", default="submitting")  # one of JOB_STATES
    submitted_at: float = column("REAL NOT NULL", default=0.0)


@dataclass(frozen=True)
class OwedKill:
    """A job (or array element) this daemon must still kill: recorded in the commit that made it owed (an
    instance cancelled while its job was queued or running, a job dropped or found twice) and removed once
    the scheduler took the cancel. Memory alone would lose it to a crash, and a cancelled run is not even
    reloaded: the job would run on. Each driver sends its cluster's owed kills when it starts."""

    cluster: str = column("TEXT NOT NULL", key=True)
    job_key: str = column("TEXT NOT NULL", key=True)  # a job id, or ``<job id>_<k>`` for one array task
    owed_at: float = column("REAL NOT NULL", default=0.0)
