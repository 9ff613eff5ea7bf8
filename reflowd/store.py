"""Persistence: aiosqlite in WAL mode, one writer, group commit.

The engine never awaits a write per event: it *enqueues* row changes
synchronously and the writer task commits them together (every
``commit_interval`` seconds, at once when ``max_batch`` changes wait). Producers
in long loops are held back (``pace``) only when ``max_backlog`` changes wait:
while the writer commits one batch the next keeps filling, so a writer slower
than its producers writes fewer, larger commits instead of stalling them at
every ``max_batch``. Repeated changes to one
row inside a batch collapse to the last one; transitions are append-only.
``flush()`` waits until everything enqueued so far is durable -- the engine
calls it before a scheduler submission, which is what makes submission
exactly-once across crashes.
"""

from __future__ import annotations

import json
import operator
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import aiosqlite
import anyio
import structlog

from reflow_client.jobfiles import write_bytes_atomic

from . import world
from .engine.model import Instance, JobRecord, OwedKill, Run, TaskRun
from .engine.records import Table, dump_json

if TYPE_CHECKING:
    from .cache_store import CacheStore

log = structlog.get_logger("reflowd.store")

SCHEMA_VERSION = 7

RUNS = Table(Run, "runs", (("runs_state", "state"), ("runs_created", "created_at")))
TASKS = Table(TaskRun, "tasks")
INSTANCES = Table(Instance, "instances", upsert=True)  # the hot table: update in place, no secondary index
JOBS = Table(JobRecord, "jobs", (("jobs_run", "run_id"),))
KILLS = Table(OwedKill, "kills")  # owed kills: a few rows at a time, gone once the scheduler took them

#: The transition log: append-only, so the rowid ``seq`` (max + 1 for each row; nothing is ever deleted)
#: orders it without AUTOINCREMENT's extra write per row; evidence is NULL when there is none (read as {}).
#: A row with ``idx_last`` stands for a group: elements ``idx`` to ``idx_last`` of one task made the same
#: move at the same moment with the same evidence, in that order (``_Batch._transition_rows``; read back
#: one transition per element by ``Store.transitions``). NULL: one transition.
TRANSITIONS_TABLE = """CREATE TABLE IF NOT EXISTS transitions (
    seq INTEGER PRIMARY KEY, run_id TEXT NOT NULL, task TEXT, idx INTEGER,
    from_state TEXT, to_state TEXT NOT NULL, evidence TEXT, at REAL NOT NULL, idx_last INTEGER
);"""
#: The log as schema 5 made it (``MIGRATE_4_TO_5`` builds it; ``MIGRATE_5_TO_6`` then adds ``idx_last``).
TRANSITIONS_TABLE_5 = """CREATE TABLE IF NOT EXISTS transitions (
    seq INTEGER PRIMARY KEY, run_id TEXT NOT NULL, task TEXT, idx INTEGER,
    from_state TEXT, to_state TEXT NOT NULL, evidence TEXT, at REAL NOT NULL
);"""
INSERT_TRANSITION = ("INSERT INTO transitions (run_id, task, idx, from_state, to_state, evidence, at, idx_last) "
                     "VALUES (?,?,?,?,?,?,?,?)")

SCHEMA = "\n".join([
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);",
    RUNS.create(),
    TASKS.create(),
    INSTANCES.create(),
    JOBS.create(),
    KILLS.create(),  # (schema 7: an older database gets it here, empty: nothing was owed durably then)
    "DROP INDEX IF EXISTS instances_tag;",  # schema 1 had it; nothing looks instances up by tag
    TRANSITIONS_TABLE + """
CREATE INDEX IF NOT EXISTS transitions_run ON transitions(run_id, seq);
CREATE TABLE IF NOT EXISTS cache (
    identity TEXT PRIMARY KEY, output TEXT NOT NULL, output_hash TEXT NOT NULL, workflow TEXT NOT NULL,
    task TEXT NOT NULL, run_id TEXT NOT NULL, idx INTEGER NOT NULL, created_at REAL NOT NULL
);""",
])

#: Schema 1 -> 2: a task's state is one column (it was ``expanded`` + ``blocked``); runs remember a cancel.
MIGRATE_1_TO_2 = """
ALTER TABLE tasks RENAME TO tasks_v1;
""" + TASKS.create() + """
INSERT INTO tasks (run_id, name, state, size, reason)
    SELECT run_id, name, CASE WHEN blocked IS NOT NULL THEN blocked WHEN expanded THEN 'expanded' ELSE 'pending' END,
           size, blocked_reason FROM tasks_v1;
DROP TABLE tasks_v1;
ALTER TABLE runs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
"""

#: Schema 2 -> 3: an instance keeps why its attempt ended, its escalated resources and its earlier attempts.
MIGRATE_2_TO_3 = """
ALTER TABLE instances ADD COLUMN cause TEXT;
ALTER TABLE instances ADD COLUMN resources TEXT;
ALTER TABLE instances ADD COLUMN attempts TEXT;
"""

#: Schema 3 -> 4: an instance whose attempt died inside a packed job remembers that its next attempt runs alone.
MIGRATE_3_TO_4 = """
ALTER TABLE instances ADD COLUMN alone INTEGER;
"""


#: Schema 4 -> 5: the transition log loses AUTOINCREMENT (a write to ``sqlite_sequence`` per row) and
#: stores no evidence as NULL. Copied in ``seq`` order with the same numbers.
MIGRATE_4_TO_5 = """
DROP INDEX IF EXISTS transitions_run;
ALTER TABLE transitions RENAME TO transitions_v4;
""" + TRANSITIONS_TABLE_5 + """
INSERT INTO transitions (seq, run_id, task, idx, from_state, to_state, evidence, at)
    SELECT seq, run_id, task, idx, from_state, to_state, NULLIF(evidence, '{}'), at FROM transitions_v4 ORDER BY seq;
DROP TABLE transitions_v4;
"""

#: Schema 5 -> 6: a transition row can stand for a group of elements (``idx_last``; NULL: one element).
MIGRATE_5_TO_6 = """
ALTER TABLE transitions ADD COLUMN idx_last INTEGER;
"""

#: Schema 6 -> 7: owed kills (``KILLS``); ``SCHEMA`` creates the table, so there is nothing to move.

#: ``put_instance`` without a list of changed fields: the whole row (an upsert).
WHOLE_ROW = -1

_instance_key = operator.attrgetter("run_id", "task", "index")  # (pending changes by row; index None: singleton)
_snapshot = INSTANCES.snapshot


class ArrayKeys:
    """The job keys ``<job id>_<index - offset>`` of a reloaded array job's elements, made when asked for
    (``Instance.job_keys``; a fresh run's instances share ``packing.ElementKeys`` the same way)."""

    __slots__ = ("job_id", "offset")

    def __init__(self, job_id: str, offset: int) -> None:
        self.job_id = job_id
        self.offset = offset

    def __call__(self, index: int | None) -> str:
        return self.job_id if index is None else f"{self.job_id}_{index - self.offset}"

    def __repr__(self) -> str:
        return f"ArrayKeys({self.job_id!r}, {self.offset})"


def shared_job_key(key: str, job_id: str | None, index: int | None, memo: dict[Any, Any],
                   keys: dict[tuple[str, int], ArrayKeys]) -> str | ArrayKeys:
    """A stored job key as a reloaded instance keeps it: one ``ArrayKeys`` per job (and offset) when the
    key is its array element's ``<job id>_<n>``, else the key string (equal ones shared through *memo*)."""
    if job_id is not None and index is not None and key.startswith(job_id) and key[len(job_id):len(job_id) + 1] == "_":
        tail = key[len(job_id) + 1:]
        if tail.isdigit():
            offset = index - int(tail)
            made = keys.get((job_id, offset))
            if made is None:
                made = keys[(job_id, offset)] = ArrayKeys(job_id, offset)
            if made(index) == key:  # (not, say, a zero-padded number)
                return made
    return memo.setdefault(key, key)  # type: ignore[no-any-return]


class StoreError(RuntimeError):
    """The state database cannot be used."""


class StoreWriteError(StoreError):
    """A batch could not be committed (disk full, I/O error, ...); it is kept and tried again."""


#: Errors that say something about one row's data, not about the disk: retrying cannot help.
_DATA_ERRORS = (UnicodeEncodeError, OverflowError, sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError)


def _is_data_error(exc: BaseException) -> bool:
    if isinstance(exc, _DATA_ERRORS):
        return True
    return isinstance(exc, sqlite3.ProgrammingError) and str(exc).startswith("Error binding parameter")


def describe_write_error(exc: BaseException, path: Path) -> str:
    """One line naming the condition and the fix."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith("SQLITE_FULL"):
        return (f"disk full: the state database {path} cannot grow; free space (or quota) on its filesystem, "
                "and reflowd commits everything it holds")
    if name.startswith("SQLITE_CORRUPT") or name.startswith("SQLITE_NOTADB"):
        return f"state database {path} is damaged ({exc}); stop reflowd and restore it from a backup"
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return f"state database {path} is busy ({exc}); another process holds it"
    return f"store unwritable: cannot write the state database {path} ({exc})"


def _escape_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


class _Statement(NamedTuple):
    """One statement of a commit and its rows; ``whole``: for an instance ``UPDATE``, for each row the
    snapshot it stands for (*grouped*: the list of a group's), to write as whole rows should a row be
    missing (it never should: every instance is put whole first)."""

    sql: str
    rows: list[tuple[Any, ...]]
    whole: list[Any] | None = None
    grouped: bool = False

    def snapshots(self, i: int) -> list[tuple[Any, ...]]:
        """The snapshots row *i* stands for."""
        assert self.whole is not None
        return self.whole[i] if self.grouped else [self.whole[i]]  # type: ignore[no-any-return]

    def all_snapshots(self) -> list[tuple[Any, ...]]:
        assert self.whole is not None
        return [v for group in self.whole for v in group] if self.grouped else self.whole


def _types(row: tuple[Any, ...]) -> tuple[type, ...]:
    """Equal values must also be of one type to be written as one (``1 == 1.0 == True``, but SQLite keeps
    them apart in a TEXT column)."""
    return tuple(map(type, row))


def _key_pattern(key: Any, index: int) -> tuple[str, int] | None:
    """``(prefix, offset)`` when *key* is ``prefix + str(index - offset)`` (an array element's job key,
    "123_4"), else None."""
    if type(key) is not str:
        return None
    digits = len(key) - len(key.rstrip("0123456789"))
    if not digits:
        return None
    tail = key[-digits:]
    number = int(tail)
    if str(number) != tail:  # (zero-padded: SQL would not write it back so)
        return None
    return key[:-digits], index - number


class Grouped(NamedTuple):
    """``group_updates``' answer: rows by statement, with the snapshots each row stands for."""

    singles: list[tuple[Any, ...]]
    single_whole: list[tuple[Any, ...]]  # (a snapshot each)
    ranges: list[tuple[Any, ...]]  # (values..., run_id, task, first index, last index)
    range_whole: list[list[tuple[Any, ...]]]
    keyed: list[tuple[Any, ...]]  # as ranges, the key column's value given as (prefix, offset)
    keyed_whole: list[list[tuple[Any, ...]]]


def group_updates(rows: list[tuple[Any, ...]], snapshots: list[tuple[Any, ...]], key: int | None = None) -> Grouped:
    """Instance ``UPDATE`` rows (``Table.update``'s: the values set, then run id, task, index) grouped:
    consecutive rows of one task setting identical values on consecutive indices become one row for a
    range ``UPDATE`` (``Table.update_range``); so do rows that differ only in the job key (column *key* of
    the row, if set) when each is the same prefix followed by its index less one offset ("123_0",
    "123_1", ...: an array job's elements), written as ``prefix || (idx - offset)``."""
    out = Grouped([], [], [], [], [], [])
    n = len(rows)
    i = 0
    head: tuple[Any, ...] = ()
    #: A column that differed between the last two rows that could not be grouped: the next pair is
    #: compared on it first, without slicing either row (rows that set per-element values, an identity
    #: or an output, differ there row after row). Only ever rejects, so any column will do.
    probe = 0
    while i < n:
        row = rows[i]
        last = row[-1]
        j = i + 1
        if last >= 0:
            types = None
            while j < n:
                nxt = rows[j]
                if nxt[-1] != last + 1 or nxt[probe] != row[probe]:
                    break
                if types is None:
                    head = row[:-1]
                    types = tuple(map(type, head))
                same = nxt[:-1]
                if same != head:
                    probe = next((c for c, (a, b) in enumerate(zip(same, head)) if a != b), 0)
                    break
                if tuple(map(type, same)) != types:  # (see ``_types``)
                    break
                last += 1
                j += 1
            if j == i + 1 and key is not None and j < n:
                pattern = _key_pattern(row[key], last)
                if pattern is not None:
                    prefix, offset = pattern
                    before, after = row[:key], row[key + 1:-1]
                    row_types = tuple(map(type, row))  # (the key column's is str in every row compared)
                    while j < n:
                        nxt = rows[j]
                        if nxt[-1] != last + 1 or nxt[key] != prefix + str(last + 1 - offset):
                            break
                        if nxt[:key] != before or nxt[key + 1:-1] != after or tuple(map(type, nxt)) != row_types:
                            break
                        last += 1
                        j += 1
                    if j - i > 1:
                        out.keyed.append((*before, prefix, offset, *after, row[-1], last))
                        out.keyed_whole.append(snapshots[i:j])
                        i = j
                        continue
        if j - i > 1:
            out.ranges.append((*head, row[-1], last))
            out.range_whole.append(snapshots[i:j])
        else:
            out.singles.append(row)
            out.single_whole.append(snapshots[i])
        i = j
    return out


def group_transitions(transitions: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Transition rows from pending transitions (``(run_id, task, from, to, evidence, at, idx)``: the index
    last, so the rest compares as one tuple), evidence as JSON text (NULL when empty), each row ending with
    ``idx_last``: consecutive transitions of one run's task from one state to one state at one moment with
    equal evidence (the same dict, or an equal one: the engine makes one per element where it decides per
    element), on consecutive element indices, become one row for the group (``idx_last`` its last index;
    NULL for a row of one). A loop, not a call per transition: this runs once per transition."""
    texts: dict[int, str | None] = {}  # one evidence dict is often shared by a whole array's transitions
    rows: list[tuple[Any, ...]] = []
    append = rows.append
    head: tuple[Any, ...] | None = None  # the open row's transition without its index
    first = last = -10  # its first and last index (-10: the open row cannot grow)

    def row() -> tuple[Any, ...]:
        assert head is not None
        run_id, task, old, new, ev, at = head
        if not ev:
            text = None
        elif type(ev) is str:
            text = ev
        else:
            text = texts.get(id(ev))  # (the batch holds every evidence dict: ids are not reused meanwhile)
            if text is None:
                text = texts[id(ev)] = dump_json(ev)
        return (run_id, task, first, old, new, text, at, None if last == first or last == -10 else last)

    for t in transitions:
        idx = t[6]
        if idx == last + 1:
            same = t[:6]
            if same == head:
                last = idx
                continue
        if head is not None:
            append(row())
        head = t[:6]
        first = idx
        last = idx if idx is not None and idx >= 0 else -10
    if head is not None:
        append(row())
    return rows


@dataclass
class _Batch:
    """Changes taken out of the queue for one commit; put back whole if the commit fails.

    Taken on the event loop as snapshots (each record's field values, ``Table.snapshot``: cheap);
    ``encode`` turns them into SQLite rows (JSON and all) in the writer's thread, off the loop.
    """

    runs: dict[str, tuple[Any, ...]]
    tasks: dict[tuple[str, str], tuple[Any, ...]]
    instances: dict[tuple[str, str, int | None], tuple[int, tuple[Any, ...]]]  # (columns changed, snapshot)
    transitions: list[tuple[Any, ...]]  # (run_id, task, from, to, evidence, at, idx); evidence a dict or its text
    jobs: dict[str, tuple[Any, ...]]
    cache: dict[str, tuple[Any, ...]]
    count: int
    generation: int
    failures: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # runs that could not be recovered
    kills: dict[tuple[str, str], tuple[Any, ...] | None] = field(default_factory=dict)  # None: taken, delete it
    encoded: list[_Statement] | None = None
    transition_rows: int = 0  # rows of the transitions table (a group is one)

    @property
    def rows(self) -> int:
        return (len(self.runs) + len(self.tasks) + len(self.instances) + len(self.transitions) + len(self.jobs)
                + len(self.cache) + len(self.failures) + len(self.kills))

    def encode(self) -> None:
        """The statements and their rows, encoded (in a worker thread: pure CPU, no shared state changed).

        Instance changes of one set of columns are one ``UPDATE`` by key each, or one by a range of
        indices for consecutive elements given identical values (``group_updates``); transitions are
        grouped likewise (``group_transitions``)."""
        whole: list[tuple[Any, ...]] = []
        changed: dict[int, list[tuple[Any, ...]]] = {}  # by the set of columns changed: one UPDATE each
        for mask, snapshot in self.instances.values():
            if mask == WHOLE_ROW:
                whole.append(INSTANCES.encode(snapshot))
            else:
                changed.setdefault(mask, []).append(snapshot)
        inserts = [_Statement(sql, rows) for sql, rows in INSTANCES.inserts(whole)]  # (NULL columns not named)
        updates = []
        for mask, snapshots in changed.items():
            sql, encode = INSTANCES.update(mask)
            key = INSTANCES.position(mask, "job_key")
            g = group_updates([encode(v) for v in snapshots], snapshots, key)
            if g.singles:
                updates.append(_Statement(sql, g.singles, g.single_whole))
            if g.ranges:
                updates.append(_Statement(INSTANCES.update_range(mask), g.ranges, g.range_whole, True))
            if g.keyed:
                updates.append(_Statement(INSTANCES.update_range(mask, "job_key"), g.keyed, g.keyed_whole, True))
        transitions = group_transitions(self.transitions)
        self.transition_rows = len(transitions)
        self.encoded = [
            _Statement(RUNS.insert, [RUNS.encode(v) for v in self.runs.values()]),
            _Statement(TASKS.insert, [TASKS.encode(v) for v in self.tasks.values()]),
            *inserts,
            *updates,
            _Statement(INSERT_TRANSITION, transitions),
            _Statement(JOBS.insert, [JOBS.encode(v) for v in self.jobs.values()]),
            _Statement("INSERT OR REPLACE INTO cache VALUES (?,?,?,?,?,?,?,?)", list(self.cache.values())),
            _Statement("UPDATE runs SET state=?, error=?, ended_at=?, updated_at=? WHERE id=?",
                       list(self.failures.values())),
            _Statement(KILLS.insert, [KILLS.encode(v) for v in self.kills.values() if v is not None]),
            _Statement(KILLS.delete, [key for key, v in self.kills.items() if v is None]),
        ]

    def statements(self) -> list[_Statement]:
        if self.encoded is None:
            self.encode()
        assert self.encoded is not None
        return self.encoded


# ---------------------------------------------------------------------- integrity at start

SQLITE_HEADER = b"SQLite format 3\x00"


def marker_path(db: Path) -> Path:
    """A small file beside the database saying one existed here: an empty or missing database is then
    damage to report, not a first start."""
    return db.with_name(db.name + ".marker")


def damaged(path: Path, problem: str) -> StoreError:
    marker = marker_path(path)
    return StoreError(
        f"state database {path} {problem}. reflowd will not start over it (that would forget every run and orphan "
        f"running jobs). Restore it from a backup, or salvage what is readable with "
        f"'sqlite3 {path} .recover | sqlite3 {path}.recovered' and move that into place; to start afresh instead "
        f"(every run forgotten), move {path}, {path}-wal and {marker} aside."
    )


def check_file(path: Path) -> None:
    """What can be told before SQLite opens the file: missing, empty, not SQLite, cut short."""
    wal = path.with_name(path.name + "-wal")
    try:
        size: int | None = path.stat().st_size
    except FileNotFoundError:
        size = None
    wal_size = wal.stat().st_size if wal.exists() else 0
    if marker_path(path).exists():
        if size is None:
            raise damaged(path, f"is missing, but a database with runs was there before ({marker_path(path)})")
        if size == 0 and wal_size == 0:
            raise damaged(path, f"is empty (0 bytes), but a database with runs was there before ({marker_path(path)})")
    if not size:
        return
    with open(path, "rb") as fh:
        head = fh.read(100)
    if not head.startswith(SQLITE_HEADER):
        raise damaged(path, "is not an SQLite database (its header is wrong)")
    if len(head) < 100:
        raise damaged(path, f"is cut short ({size} bytes, not even a whole header)")
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        raise damaged(path, f"has a damaged header (page size {page_size})")
    pages = int.from_bytes(head[28:32], "big")
    header_valid = head[92:96] == head[24:28]
    if wal_size == 0 and (size % page_size or (header_valid and pages * page_size > size)):
        raise damaged(path, f"is cut short ({size} bytes, but its header says {pages} pages of {page_size} bytes)")


def write_marker(path: Path, database_id: str) -> None:
    marker = marker_path(path)
    try:
        current = json.loads(marker.read_text()) if marker.exists() else {}
    except (OSError, ValueError):
        current = {}
    if isinstance(current, dict) and current.get("database_id") == database_id:
        return
    if current:
        log.warning("state database id changed (restored from elsewhere?); updating the marker", marker=str(marker))
    try:
        write_bytes_atomic(str(marker), json.dumps({"database_id": database_id, "database": path.name}).encode(),
                           0o600)
    except OSError as exc:
        log.warning("cannot write the database marker", marker=str(marker), error=str(exc))


class Store:
    """The daemon's SQLite state: runs, tasks, instances, transitions, jobs, cache."""

    def __init__(self, path: str | os.PathLike[str], *, commit_interval: float = 0.05, max_batch: int = 1000,
                 max_backlog: int | None = None,
                 retry_initial: float = 0.1, retry_max: float = 5.0, close_timeout: float = 5.0,
                 connect: Callable[..., Any] = aiosqlite.connect,
                 offload: Callable[..., Awaitable[Any]] = anyio.to_thread.run_sync,
                 cache: CacheStore | None = None) -> None:
        self.path = Path(path)
        #: The user's shared result cache (daemon and embedded runs); None: this database's own cache table.
        self.cache = cache
        self._connect = connect  # the simulation connects inline (no thread)
        self._offload = offload  # blocking file work at open: a worker thread (inline in the simulation)
        self.commit_interval = commit_interval
        self.max_batch = max_batch
        #: Changes waiting before producers are held back (``pace``); also what one commit holds at most,
        #: give or take what producers enqueue without pacing. A commit's own cost (the hops to the writer's
        #: threads, the WAL append) is the same for 10 rows or 4,000: a 10^5 fan-out committed every 1,000
        #: changes was paced by it (about 110,000 changes a second on our 2-core VM; 4x: about 150,000).
        self.max_backlog = max_backlog if max_backlog is not None else 4 * max_batch
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.close_timeout = close_timeout
        #: Set while commits fail (disk full, I/O error): what is wrong, since when, how often it failed.
        self.write_error: str | None = None
        self.write_error_since: float | None = None
        self.write_failures = 0
        self.write_errors_total = 0
        self.rows_escaped = 0
        self.rows_dropped = 0
        self._writing_cache: dict[str, tuple[Any, ...]] = {}
        self._db: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        # Pending changes hold the records themselves (or snapshots put back after a failed commit): a
        # record changed many times before a commit is read once, when the batch is taken.
        self._runs: dict[str, Run | tuple[Any, ...]] = {}
        self._tasks: dict[tuple[str, str], TaskRun | tuple[Any, ...]] = {}
        self._instances: dict[tuple[str, str, int | None], tuple[int, tuple[Any, ...]]] = {}  # (columns, snapshot)
        self._transitions: list[tuple[Any, ...]] = []  # evidence still a dict until the batch is taken
        self._jobs: dict[str, JobRecord | tuple[Any, ...]] = {}
        self._cache: dict[str, tuple[Any, ...]] = {}
        self._run_failures: dict[str, tuple[Any, ...]] = {}
        self._kills: dict[tuple[str, str], tuple[Any, ...] | None] = {}  # (cluster, job key): row, or None to delete
        self._pending = 0
        self._enqueued = 0
        self._committed = 0
        self._masks: dict[int, tuple[tuple[str, ...], int]] = {}  # ``change_instance``: columns by names
        self._wake = anyio.Event()
        self._urgent = anyio.Event()
        self._committed_event = anyio.Event()
        self._taken = anyio.Event()  # set each time the writer takes a batch (producers pace on it)
        self._writer_running = False
        self._closed = False
        self.commits = 0
        self.rows_written = 0
        self.transitions_written = 0  # transitions, each element of a group counted
        self.transition_rows_written = 0  # rows of the transition log (a group is one)

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Open (or create) the database, refusing a damaged one: never start empty over lost runs."""
        if not self.path.parent.is_dir():
            await self._offload(lambda: self.path.parent.mkdir(parents=True, exist_ok=True))
        await self._offload(check_file, self.path)
        try:
            self._db = await self._connect(self.path)
            await self._db.execute("PRAGMA busy_timeout=10000")
            version = await self._check_contents(self._db)
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute("PRAGMA synchronous=NORMAL")
            if version is not None and version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} was written by a newer reflowd (schema {version} > {SCHEMA_VERSION}); upgrade reflowd"
                )
            # One transaction: a daemon killed during its first start must not leave a database that
            # has reflow's tables but no schema version (the next start would call it damaged).
            await self._db.executescript(
                "BEGIN;\n"
                + (MIGRATE_1_TO_2 if version == 1 else "")
                + (MIGRATE_2_TO_3 if version in (1, 2) else "")
                + (MIGRATE_3_TO_4 if version in (1, 2, 3) else "")
                + (MIGRATE_4_TO_5 if version in (1, 2, 3, 4) else "")
                + (MIGRATE_5_TO_6 if version in (1, 2, 3, 4, 5) else "")
                + SCHEMA
                + f"\nINSERT OR REPLACE INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}');"
                + f"\nINSERT OR IGNORE INTO meta VALUES ('database_id', '{os.urandom(8).hex()}');\nCOMMIT;"
            )
            if version is not None and version < SCHEMA_VERSION:
                log.info("state database upgraded", path=str(self.path), schema=SCHEMA_VERSION)
            async with self._db.execute("SELECT value FROM meta WHERE key='database_id'") as cur:
                database_id = str((await cur.fetchone())[0])
            await self._db.commit()
            self._reader = await self._connect(self.path)
            self._reader.row_factory = aiosqlite.Row
            await self._reader.execute("PRAGMA busy_timeout=10000")
        except (sqlite3.DatabaseError, ValueError) as exc:
            await self._abandon()
            if isinstance(exc, sqlite3.OperationalError) and not str(exc).startswith("database disk image"):
                raise StoreError(f"cannot open state database {self.path}: {exc}") from exc
            raise damaged(self.path, f"cannot be read ({exc})") from exc
        except BaseException:
            await self._abandon()
            raise
        await self._offload(write_marker, self.path, database_id)

    async def _abandon(self) -> None:
        for conn in (self._db, self._reader):
            if conn is not None:
                with anyio.CancelScope(shield=True):
                    try:
                        await conn.close()
                    except (sqlite3.Error, ValueError):
                        pass
        self._db = self._reader = None

    async def _check_contents(self, db: aiosqlite.Connection) -> int | None:
        """SQLite's quick_check, and reflow's own tables where a database existed before; the schema version."""
        async with db.execute("PRAGMA quick_check(5)") as cur:
            problems = [str(r[0]) for r in await cur.fetchall()]
        if problems != ["ok"]:
            detail = "; ".join(" ".join(p.split()) for p in problems)
            raise damaged(self.path, f"fails SQLite's integrity check ({detail[:300]})")
        async with db.execute("SELECT name FROM sqlite_master WHERE type='table'") as cur:
            tables = {str(r[0]) for r in await cur.fetchall()}
        if tables and "meta" not in tables:
            raise damaged(self.path, f"is an SQLite database but not reflow's (tables: {', '.join(sorted(tables))[:200]})")
        if not tables and marker_path(self.path).exists():
            raise damaged(self.path, f"is empty, but a database with runs was there before ({marker_path(self.path)})")
        if "meta" in tables:
            async with db.execute("SELECT value FROM meta WHERE key='schema_version'") as cur:
                row = await cur.fetchone()
            if row is None or not str(row[0]).isdigit():
                raise damaged(self.path, f"has no valid schema version (got {None if row is None else row[0]!r})")
            return int(row[0])
        return None


    async def close(self) -> None:
        if self._closed:
            return
        with anyio.CancelScope(shield=True):
            if self._db is not None:
                await self._final_commit()
            self._closed = True
            done, self._committed_event = self._committed_event, anyio.Event()
            done.set()  # wake flush() callers: they see the store closed
            if self._db is not None:
                await self._db.close()
            if self._reader is not None:
                await self._reader.close()

    async def _final_commit(self) -> None:
        """Commit what is left, retrying for up to ``close_timeout`` s; then say loudly what could not be kept."""
        deadline = time.monotonic() + self.close_timeout
        delay = self.retry_initial
        while True:
            try:
                await self._commit_pending()
                return
            except StoreWriteError as exc:
                self._note_failure(exc)
                if time.monotonic() + delay > deadline:
                    log.error("changes lost at shutdown: the state database cannot be written",
                              changes=self._pending, error=str(exc))
                    return
                await anyio.sleep(delay)
                delay = min(delay * 2, self.retry_max)

    async def run_writer(self) -> None:
        """The single writer: commit enqueued changes in groups until cancelled.

        A failed commit keeps its batch and is tried again with back-off, so a
        full disk delays durability (and, through ``flush``, new submissions)
        but never loses a change or stops the daemon.
        """
        self._writer_running = True
        try:
            while True:
                await self._wake.wait()
                if self._pending < self.max_batch and not self._urgent.is_set():
                    with anyio.move_on_after(self.commit_interval):
                        await self._urgent.wait()
                try:
                    await self._commit_pending()
                except StoreWriteError as exc:
                    await anyio.sleep(self._note_failure(exc))
        finally:
            self._writer_running = False
            self._taken.set()  # nobody waits for a writer that is gone
            with anyio.CancelScope(shield=True):
                try:
                    await self._commit_pending()
                except StoreWriteError:
                    pass  # close() tries again for a while and reports what it cannot keep

    def _note_failure(self, exc: StoreWriteError) -> float:
        """Record a failed commit; the delay before the next attempt."""
        self.write_failures += 1
        self.write_errors_total += 1
        if self.write_error is None:
            self.write_error_since = time.time()
            log.error("cannot write the state database; keeping changes in memory and retrying", error=str(exc),
                      backlog=self._pending)
        elif self.write_failures % 20 == 0:
            log.warning("still cannot write the state database", error=str(exc), backlog=self._pending,
                        failures=self.write_failures, since=self.write_error_since)
        self.write_error = str(exc)
        return min(self.retry_initial * 2 ** min(self.write_failures - 1, 30), self.retry_max)

    def _note_success(self) -> None:
        if self.write_error is not None:
            log.warning("state database writable again; everything held is committed",
                        failures=self.write_failures, down_for=time.time() - (self.write_error_since or time.time()))
        self.write_error = None
        self.write_error_since = None
        self.write_failures = 0

    @property
    def writable(self) -> bool:
        """False while commits fail: new submissions are refused, reads go on."""
        return self.write_error is None

    def health(self) -> dict[str, Any]:
        return {
            "writable": self.writable,
            "error": self.write_error,
            "since": self.write_error_since,
            "failures": self.write_failures,
            "write_errors": self.write_errors_total,
            "backlog": self._pending,
            "rows_escaped": self.rows_escaped,
            "rows_dropped": self.rows_dropped,
            **({"cache": self.cache.health()} if self.cache is not None else {}),
        }

    # ------------------------------------------------------------------ enqueue (synchronous)

    def _enqueued_one(self) -> None:
        pending = self._pending = self._pending + 1
        self._enqueued += 1
        if pending == 1:  # (the writer's events are renewed only when a batch is taken: pending 0)
            self._wake.set()
        elif pending == self.max_batch:
            self._urgent.set()

    def put_run(self, run: Run) -> None:
        self._runs[run.id] = run
        self._enqueued_one()

    def put_task(self, run_id: str, task: TaskRun) -> None:
        self._tasks[(run_id, task.name)] = task
        self._enqueued_one()

    def put_instance(self, inst: Instance, changed: tuple[str, ...] | None = None) -> None:
        """Enqueue *inst*'s row: whole (a new instance, or *changed* not given), or only the columns of the
        fields named in *changed* (a state change: ``Ledger.instance``), an ``UPDATE`` of a few columns.

        The snapshot is taken now (its field values: a C attribute getter, no encoding): taking a batch of
        10^4 changed instances is then no work for the loop. Every change of an instance is followed by
        this call, so the latest snapshot is what memory holds; changes to one instance before a commit
        collapse to one row with the union of their columns.
        """
        key = _instance_key(inst)
        mask = WHOLE_ROW if changed is None else INSTANCES.mask(changed)
        if mask != WHOLE_ROW:
            earlier = self._instances.get(key)
            if earlier is not None:
                mask = WHOLE_ROW if earlier[0] == WHOLE_ROW else mask | earlier[0]
        self._instances[key] = (mask, INSTANCES.snapshot(inst))
        self._enqueued_one()

    def change_instance(self, inst: Instance, changed: tuple[str, ...], old: str, new: str, evidence: dict[str, Any],
                        at: float) -> None:
        """``put_instance(inst, changed)`` and ``add_transition`` of its state change, in one call: the
        ledger's hot path (a transition of every element of every array), where each call counts."""
        run_id, task, index = inst.run_id, inst.task, inst.index
        key = (run_id, task, index)
        known = self._masks.get(id(changed))  # (by identity: the ledger passes one tuple per set of names)
        if known is not None and known[0] is changed:
            mask = known[1]
        else:
            mask = INSTANCES.mask(changed)
            if len(self._masks) < 1024:  # (the tuple is kept with its mask, so its id is not reused meanwhile)
                self._masks[id(changed)] = (changed, mask)
        earlier = self._instances.get(key)
        if earlier is not None:
            mask = WHOLE_ROW if earlier[0] == WHOLE_ROW else mask | earlier[0]
        self._instances[key] = (mask, _snapshot(inst))
        self._transitions.append((run_id, task, old, new, evidence, at, -1 if index is None else index))
        self._enqueued += 2
        pending = self._pending = self._pending + 2
        if pending == 2:  # (as ``_enqueued_one``: the writer's events are renewed when a batch is taken)
            self._wake.set()
        elif self.max_batch <= pending < self.max_batch + 2:
            self._urgent.set()

    def add_transition(
        self, run_id: str, task: str | None, index: int | None, old: str | None, new: str, evidence: dict[str, Any], at: float
    ) -> None:
        self._transitions.append((run_id, task, old, new, evidence, at,
                                  None if task is None else (-1 if index is None else index)))
        self._enqueued_one()

    def put_job(self, job: JobRecord) -> None:
        self._jobs[job.tag] = job
        self._enqueued_one()

    def put_kill(self, kill: OwedKill) -> None:
        """A kill now owed: committed with (or before) whatever else is enqueued now -- the state change that
        made it owed -- so no crash can keep the change and lose the kill."""
        self._kills[(kill.cluster, kill.job_key)] = KILLS.snapshot(kill)
        self._enqueued_one()

    def drop_kill(self, cluster: str, job_key: str) -> None:
        """The scheduler took the kill (or no longer knows the job): no longer owed."""
        self._kills[(cluster, job_key)] = None
        self._enqueued_one()

    def fail_run_row(self, run_id: str, error: str) -> None:
        """Mark a run that cannot even be loaded as failed, with the reason (recovery)."""
        now = world.now()
        self._run_failures[run_id] = ("failed", error, now, now, run_id)
        self.add_transition(run_id, None, None, "running", "failed", {"source": "recovery", "error": error[:500]}, now)

    def put_duration(self, workflow: str, task: str, version: str, seconds: float) -> None:
        """A succeeded instance's duration, for the user's shared history (this store's own is its instances)."""
        if self.cache is not None:
            self.cache.record_duration(workflow, task, version, seconds)

    def put_cache(self, identity: str, output: Any, output_hash: str, workflow: str, task: str, run_id: str,
                  index: int | None) -> None:
        if self.cache is not None:
            self.cache.put(identity, output, output_hash, workflow, task, run_id, index)
            return
        self._cache[identity] = (
            identity,
            dump_json(output),
            output_hash,
            workflow,
            task,
            run_id,
            -1 if index is None else index,
            time.time(),
        )
        self._enqueued_one()

    async def flush(self) -> None:
        """Return once everything enqueued before this call is committed."""
        target = self._enqueued
        while self._committed < target:
            if self._closed:
                raise StoreError("the store is closed")
            self._urgent.set()
            self._wake.set()
            event = self._committed_event
            await event.wait()

    async def pace(self) -> None:
        """For producers in long loops: once ``max_backlog`` changes wait, wait until the writer has taken them.

        Producing and writing overlap (the writer commits one batch while the next fills), commits stay
        within ``max_backlog`` changes, and nothing in memory grows without bound. While the store cannot
        be written, producers are not held back.
        """
        if self._pending >= self.max_backlog and self._writer_running and self.writable and not self._closed:
            self._urgent.set()
            self._wake.set()
            await self._taken.wait()

    @property
    def backlog(self) -> int:
        return self._pending

    @property
    def pace_due(self) -> bool:
        """Would :meth:`pace` wait now? (Loops over every element ask first: cheaper than the call.)"""
        return self._pending >= self.max_backlog

    # ------------------------------------------------------------------ writing

    def _take_batch(self) -> _Batch:
        """Everything pending, as snapshots taken now: the rows are what memory holds at this moment
        (encoding them is left to the writer's thread, ``_Batch.encode``)."""
        taken, self._taken = self._taken, anyio.Event()
        taken.set()
        batch = _Batch(
            {k: RUNS.snapshot(v) if isinstance(v, Run) else v for k, v in self._runs.items()},
            {k: TASKS.snapshot(v) if isinstance(v, TaskRun) else v for k, v in self._tasks.items()},
            self._instances,  # (snapshots already: ``put_instance``)
            self._transitions,
            {k: JOBS.snapshot(v) if isinstance(v, JobRecord) else v for k, v in self._jobs.items()},
            self._cache, self._pending, self._enqueued, self._run_failures, self._kills)
        self._runs, self._tasks, self._instances = {}, {}, {}
        self._transitions, self._jobs, self._cache, self._run_failures, self._kills = [], {}, {}, {}, {}
        self._pending = 0
        self._wake = anyio.Event()
        self._urgent = anyio.Event()
        return batch

    def _restore_batch(self, batch: _Batch) -> None:
        """Put a failed batch back in front of what was enqueued meanwhile (the newer version of a row wins)."""
        self._runs = {**batch.runs, **self._runs}
        self._tasks = {**batch.tasks, **self._tasks}
        instances = dict(batch.instances)
        for key, (mask, snapshot) in self._instances.items():  # (a whole row still to write stays whole)
            earlier = instances.get(key)
            if earlier is not None and mask != WHOLE_ROW:
                mask = WHOLE_ROW if earlier[0] == WHOLE_ROW else mask | earlier[0]
            instances[key] = (mask, snapshot)
        self._instances = instances
        self._transitions = batch.transitions + self._transitions
        self._jobs = {**batch.jobs, **self._jobs}
        self._run_failures = {**batch.failures, **self._run_failures}
        self._kills = {**batch.kills, **self._kills}
        self._cache = {**batch.cache, **self._cache}
        self._pending += batch.count
        self._wake.set()

    async def _commit_pending(self) -> None:
        """Commit everything enqueued; on failure keep it all queued and raise StoreWriteError."""
        if self._db is None or self._pending == 0:
            self._wake = anyio.Event() if not self._pending else self._wake
            return
        batch = self._take_batch()
        self._writing_cache = batch.cache
        try:
            with anyio.CancelScope(shield=True):
                await self._offload(batch.encode)
                written = await self._write(self._db, batch)
        except (sqlite3.Error, ValueError, OverflowError, TypeError) as exc:  # (TypeError: a value JSON cannot encode)
            self._restore_batch(batch)
            raise StoreWriteError(describe_write_error(exc, self.path)) from exc
        except Exception as exc:  # a bug encoding a change: keep the batch and show it, never end the writer
            self._restore_batch(batch)
            log.exception("internal error while writing the state database", path=str(self.path))
            raise StoreWriteError(f"internal error writing the state database {self.path} "
                                  f"({type(exc).__name__}: {exc}); changes are kept in memory; please report this"
                                  ) from exc
        finally:
            self._writing_cache = {}
        self._note_success()
        self.commits += 1
        self.transitions_written += len(batch.transitions)
        self.transition_rows_written += batch.transition_rows
        self.rows_written += written
        self._committed = batch.generation
        done, self._committed_event = self._committed_event, anyio.Event()
        done.set()

    async def _write(self, db: aiosqlite.Connection, batch: _Batch) -> int:
        """One transaction for the batch. A row whose data SQLite refuses never blocks the others."""
        try:
            await self._execute_batch(db, batch.statements())
            return batch.rows
        except sqlite3.Error as exc:
            await self._rollback(db)
            if not _is_data_error(exc):
                raise
            error: BaseException = exc
        except (UnicodeEncodeError, OverflowError) as exc:
            await self._rollback(db)
            error = exc
        log.error("a change could not be stored as it was; writing row by row", error=str(error))
        return await self._write_rows(db, batch)

    async def _execute_batch(self, db: aiosqlite.Connection, statements: list[_Statement]) -> None:
        for statement in statements:
            sql, rows, whole, grouped = statement
            if rows:
                cursor = await db.executemany(sql, rows)
                if whole is not None:
                    expected = sum(map(len, whole)) if grouped else len(rows)  # (a range row stands for several)
                    if cursor.rowcount != expected:
                        log.error("instance rows missing for a change; writing them whole",
                                  missing=expected - cursor.rowcount)
                        await db.executemany(INSTANCES.insert, [INSTANCES.encode(v) for v in statement.all_snapshots()])
        await db.commit()

    async def _write_rows(self, db: aiosqlite.Connection, batch: _Batch) -> int:
        """Escape undecodable text (Linux paths arrive as lone surrogates); drop, loudly, a row still refused."""
        written = 0
        try:
            for statement in batch.statements():
                sql, rows, whole, _ = statement
                for i, row in enumerate(rows):
                    clean = tuple(_escape_surrogates(v) for v in row)
                    try:
                        cursor = await db.execute(sql, clean)
                        if whole is not None and cursor.rowcount != len(statement.snapshots(i)):  # (see _execute_batch)
                            await db.executemany(INSTANCES.insert, [tuple(_escape_surrogates(v) for v in
                                                                          INSTANCES.encode(snapshot))
                                                                    for snapshot in statement.snapshots(i)])
                    except (sqlite3.Error, UnicodeEncodeError, OverflowError) as exc:
                        if not _is_data_error(exc):
                            raise
                        self.rows_dropped += 1
                        log.error("a change cannot be stored and is dropped", statement=sql.split("(")[0].strip(),
                                  key=repr(row[:3])[:200], error=str(exc))
                        continue
                    written += 1
                    if clean != row:
                        self.rows_escaped += 1
            await db.commit()
        except BaseException:
            await self._rollback(db)
            raise
        return written

    @staticmethod
    async def _rollback(db: aiosqlite.Connection) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await db.rollback()
            except (sqlite3.Error, ValueError):
                pass

    # ------------------------------------------------------------------ reading

    @property
    def _r(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StoreError("the store is not open")
        return self._reader

    async def _run_from(self, row: aiosqlite.Row) -> Run:
        run = Run(**RUNS.values(row))
        for task in run.manifest.tasks:
            run.tasks[task.name] = TaskRun(manifest=task, run_id=run.id)
        async with self._r.execute("SELECT * FROM tasks WHERE run_id=?", (run.id,)) as cur:
            async for t in cur:
                values = TASKS.values(t)
                tr = run.tasks.get(values["name"])
                if tr is not None:
                    tr.state, tr.size, tr.reason = values["state"], values["size"], values["reason"]
        # Equal strings read back as one object (names, tags, job ids; ``Column.shared``) and array job
        # keys made when asked (``ArrayKeys``), as in a run made in memory: a reloaded run is no bigger.
        memo: dict[Any, Any] = {run.id: run.id, **{name: name for name in run.tasks}}
        keys: dict[tuple[str, int], ArrayKeys] = {}
        async with self._r.execute("SELECT * FROM instances WHERE run_id=?", (run.id,)) as cur:
            async for r in cur:
                values = INSTANCES.values(r, memo)
                key = values["job_key"]
                if key is not None:
                    values["job_key"] = shared_job_key(key, values["job_id"], values["index"], memo, keys)
                inst = Instance(**values)
                tr = run.tasks.get(inst.task)
                if tr is not None:
                    tr.add(inst)
        return run

    async def load_active_runs(self) -> tuple[list[Run], list[tuple[str, str]]]:
        """Runs still running, and ``(run id, why)`` for those that cannot be loaded."""
        async with self._r.execute("SELECT * FROM runs WHERE state=? ORDER BY created_at", ("running",)) as cur:
            rows = await cur.fetchall()
        runs, broken = [], []
        for r in rows:
            try:
                runs.append(await self._run_from(r))
            except Exception as exc:  # a damaged row must not stop every other run from recovering
                broken.append((r["id"], f"cannot be recovered: {type(exc).__name__}: {exc}"))
        return runs, broken

    async def load_run(self, run_id: str) -> Run | None:
        async with self._r.execute("SELECT * FROM runs WHERE id=?", (run_id,)) as cur:
            row = await cur.fetchone()
        return None if row is None else await self._run_from(row)

    async def list_runs(
        self,
        *,
        workflow: str | None = None,
        states: Iterable[str] | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        where, args = [], []
        if workflow:
            where.append("workflow=?")
            args.append(workflow)
        states = list(states or [])
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args.extend(states)
        if since is not None:
            where.append("created_at>=?")
            args.append(since)
        if until is not None:
            where.append("created_at<=?")
            args.append(until)
        sql = "SELECT id, workflow, state, cluster, run_dir, created_at, updated_at, ended_at, error FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC LIMIT ?"
        args.append(limit)
        async with self._r.execute(sql, args) as cur:
            return [dict(r) for r in await cur.fetchall()]

    async def run_ids_with_prefix(self, prefix: str, *, workflow: str | None = None, limit: int = 20) -> list[str]:
        """Run ids starting with *prefix*, newest first (for prefix look-ups by clients)."""
        sql = "SELECT id FROM runs WHERE id >= ? AND id < ?"
        args: list[Any] = [prefix, prefix + "\U0010ffff"]
        if workflow:
            sql += " AND workflow=?"
            args.append(workflow)
        sql += " ORDER BY created_at DESC LIMIT ?"
        args.append(limit)
        async with self._r.execute(sql, args) as cur:
            return [r["id"] for r in await cur.fetchall()]

    async def run_summaries(self, run_ids: Iterable[str]) -> dict[str, dict[str, dict[str, int]]]:
        """``{run_id: {task: {state: count}}}`` from the stored rows (as ``Run.summary`` for loaded runs)."""
        ids = list(run_ids)
        out: dict[str, dict[str, dict[str, int]]] = {i: {} for i in ids}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT run_id, task, state, COUNT(*) AS n FROM instances WHERE run_id IN ({marks}) GROUP BY run_id, task, state"
            async with self._r.execute(sql, chunk) as cur:
                async for r in cur:
                    out[r["run_id"]].setdefault(r["task"], {})[r["state"]] = r["n"]
            sql = f"SELECT run_id, name, state FROM tasks WHERE run_id IN ({marks}) AND state != 'expanded'"
            async with self._r.execute(sql, chunk) as cur:
                async for r in cur:
                    out[r["run_id"]][r["name"]] = {r["state"]: 1}
        return out

    async def cache_lookup(self, identities: Iterable[str]) -> dict[str, dict[str, Any]]:
        if self.cache is not None:
            return await self.cache.lookup(identities)
        ids = list(dict.fromkeys(identities))
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            sql = f"SELECT * FROM cache WHERE identity IN ({','.join('?' * len(chunk))})"
            async with self._r.execute(sql, chunk) as cur:
                async for r in cur:
                    found[r["identity"]] = {
                        "output": json.loads(r["output"]),
                        "output_hash": r["output_hash"],
                        "run_id": r["run_id"],
                        "task": r["task"],
                    }
        for identity in ids:  # not yet committed entries
            row = self._cache.get(identity) or self._writing_cache.get(identity)
            if row is not None:
                found[identity] = {"output": json.loads(row[1]), "output_hash": row[2], "run_id": row[5], "task": row[4]}
        return found

    async def task_durations(self, workflow: str, task: str, version: str, *, runs: int = 20,
                             limit: int = 2000) -> list[float]:
        """Seconds each succeeded instance of *task* took in the newest *runs* runs of *workflow* at *version*.

        For automatic packing (``reflowd/driver/packing.py``); the version is read from each run's
        manifest, so a changed task does not inherit its old timings.
        """
        sql = "SELECT id, manifest FROM runs WHERE workflow=? ORDER BY created_at DESC LIMIT ?"
        async with self._r.execute(sql, (workflow, runs * 3)) as cur:
            rows = await cur.fetchall()
        wanted: list[str] = []
        for row in rows:
            try:
                tasks = json.loads(row["manifest"]).get("tasks", [])
                config = next((t.get("config") or {} for t in tasks if t.get("name") == task), None)
            except (ValueError, AttributeError, TypeError):
                continue
            if config is not None and str(config.get("version", "1")) == str(version):
                wanted.append(row["id"])
            if len(wanted) >= runs:
                break
        out: list[float] = []
        for run_id in wanted:
            sql = ("SELECT ended_at - started_at AS d FROM instances WHERE run_id=? AND task=? AND state='succeeded' "
                   "AND started_at IS NOT NULL AND ended_at IS NOT NULL LIMIT ?")
            async with self._r.execute(sql, (run_id, task, limit - len(out))) as cur:
                out.extend(float(r["d"]) for r in await cur.fetchall())
            if len(out) >= limit:
                break
        return out

    async def owed_kills(self, cluster: str) -> list[OwedKill]:
        """*cluster*'s committed owed kills, oldest first (read when its driver starts, before it owes any)."""
        async with self._r.execute("SELECT * FROM kills WHERE cluster=? ORDER BY owed_at, job_key", (cluster,)) as cur:
            return [OwedKill(**KILLS.values(r)) for r in await cur.fetchall()]

    async def jobs_for_runs(self, run_ids: Iterable[str]) -> list[JobRecord]:
        ids = list(run_ids)
        if not ids:
            return []
        out: list[JobRecord] = []
        memo: dict[Any, Any] = {}  # (a run's jobs share their run id, task names and cluster: ``Column.shared``)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            sql = f"SELECT * FROM jobs WHERE run_id IN ({','.join('?' * len(chunk))})"
            async with self._r.execute(sql, chunk) as cur:
                async for r in cur:
                    out.append(JobRecord(**JOBS.values(r, memo)))
        return out

    async def transitions(self, run_id: str, *, after_seq: int = 0, limit: int = 10000) -> list[dict[str, Any]]:
        """The run's transition log after *after_seq*, one entry per transition: a group's row (``idx_last``)
        comes out as one entry per element, each with the row's ``seq``. *limit* counts rows, so a group is
        never split between two pages (page on with the last ``seq`` seen)."""
        sql = ("SELECT seq, run_id, task, idx, from_state, to_state, evidence, at, idx_last FROM transitions "
               "WHERE run_id=? AND seq>? ORDER BY seq LIMIT ?")
        async with self._r.execute(sql, (run_id, after_seq, limit)) as cur:
            rows = await cur.fetchall()
        out = []
        for r in rows:
            d = dict(r)
            last = d.pop("idx_last")
            evidence = d["evidence"]
            d["evidence"] = {} if evidence is None else json.loads(evidence)
            d["index"] = None if d["idx"] is None or d["idx"] < 0 else d["idx"]
            out.append(d)
            if last is not None:
                for index in range(d["idx"] + 1, last + 1):
                    out.append({**d, "idx": index, "index": index,
                                "evidence": {} if evidence is None else json.loads(evidence)})
        return out
