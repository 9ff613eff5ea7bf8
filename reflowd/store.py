"""Persistence: aiosqlite in WAL mode, one writer, group commit.

The engine never awaits a write per event: it *enqueues* row changes
synchronously and the writer task commits them together (every
``commit_interval`` seconds or ``max_batch`` changes). Repeated changes to one
row inside a batch collapse to the last one; transitions are append-only.
``flush()`` waits until everything enqueued so far is durable -- the engine
calls it before a scheduler submission, which is what makes submission
exactly-once across crashes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import structlog


from .engine.model import Instance, JobRecord, Run, TaskRun
from .engine.records import Table, dump_json

log = structlog.get_logger("reflowd.store")

SCHEMA_VERSION = 2

RUNS = Table(Run, "runs", (("runs_state", "state"), ("runs_created", "created_at")))
TASKS = Table(TaskRun, "tasks")
INSTANCES = Table(Instance, "instances", (("instances_tag", "tag"),))
JOBS = Table(JobRecord, "jobs", (("jobs_run", "run_id"),))

SCHEMA = "\n".join([
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);",
    RUNS.create(),
    TASKS.create(),
    INSTANCES.create(),
    JOBS.create(),
    """CREATE TABLE IF NOT EXISTS transitions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, task TEXT, idx INTEGER,
    from_state TEXT, to_state TEXT NOT NULL, evidence TEXT NOT NULL, at REAL NOT NULL
);
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


class StoreError(RuntimeError):
    """The state database cannot be used."""


class Store:
    """The daemon's SQLite state: runs, tasks, instances, transitions, jobs, cache."""

    def __init__(self, path: str | os.PathLike[str], *, commit_interval: float = 0.05, max_batch: int = 1000,
                 connect: Callable[..., Any] = aiosqlite.connect) -> None:
        self.path = Path(path)
        self._connect = connect  # the simulation connects inline (no thread)
        self.commit_interval = commit_interval
        self.max_batch = max_batch
        self._db: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._runs: dict[str, tuple[Any, ...]] = {}
        self._tasks: dict[tuple[str, str], tuple[Any, ...]] = {}
        self._instances: dict[tuple[str, str, int], tuple[Any, ...]] = {}
        self._transitions: list[tuple[Any, ...]] = []
        self._jobs: dict[str, tuple[Any, ...]] = {}
        self._cache: dict[str, tuple[Any, ...]] = {}
        self._run_failures: dict[str, tuple[Any, ...]] = {}
        self._pending = 0
        self._enqueued = 0
        self._committed = 0
        self._wake = anyio.Event()
        self._urgent = anyio.Event()
        self._committed_event = anyio.Event()
        self._closed = False
        self.commits = 0
        self.rows_written = 0
        self.transitions_written = 0

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if not self.path.parent.is_dir():
            await anyio.to_thread.run_sync(lambda: self.path.parent.mkdir(parents=True, exist_ok=True))
        try:
            self._db = await self._connect(self.path)
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute("PRAGMA synchronous=NORMAL")
            await self._db.execute("PRAGMA busy_timeout=10000")
            await self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            async with self._db.execute("SELECT value FROM meta WHERE key='schema_version'") as cur:
                row = await cur.fetchone()
            if row is not None and int(row[0]) > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} was written by a newer reflowd (schema {row[0]} > {SCHEMA_VERSION}); upgrade reflowd"
                )
            if row is not None and int(row[0]) == 1:
                await self._db.executescript(MIGRATE_1_TO_2)
                log.info("state database upgraded", path=str(self.path), schema=SCHEMA_VERSION)
            await self._db.executescript(SCHEMA)
            await self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            await self._db.commit()
            self._reader = await self._connect(self.path)
            self._reader.row_factory = aiosqlite.Row
            await self._reader.execute("PRAGMA busy_timeout=10000")
        except aiosqlite.DatabaseError as exc:
            raise StoreError(f"cannot open state database {self.path}: {exc}") from exc

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if self._db is not None:
                await self._commit_pending()
                await self._db.close()
            if self._reader is not None:
                await self._reader.close()

    async def run_writer(self) -> None:
        """The single writer: commit enqueued changes in groups until cancelled."""
        try:
            while True:
                await self._wake.wait()
                if self._pending < self.max_batch and not self._urgent.is_set():
                    with anyio.move_on_after(self.commit_interval):
                        await self._urgent.wait()
                await self._commit_pending()
        finally:
            with anyio.CancelScope(shield=True):
                await self._commit_pending()

    # ------------------------------------------------------------------ enqueue (synchronous)

    def _enqueued_one(self) -> None:
        self._pending += 1
        self._enqueued += 1
        self._wake.set()
        if self._pending >= self.max_batch:
            self._urgent.set()

    def put_run(self, run: Run) -> None:
        self._runs[run.id] = RUNS.row(run)
        self._enqueued_one()

    def put_task(self, run_id: str, task: TaskRun) -> None:
        self._tasks[(run_id, task.name)] = TASKS.row(task)
        self._enqueued_one()

    def put_instance(self, inst: Instance) -> None:
        self._instances[inst.key] = INSTANCES.row(inst)
        self._enqueued_one()

    def add_transition(
        self, run_id: str, task: str | None, index: int | None, old: str | None, new: str, evidence: dict[str, Any], at: float
    ) -> None:
        self._transitions.append(
            (run_id, task, None if task is None else (-1 if index is None else index), old, new, dump_json(evidence), at)
        )
        self._enqueued_one()

    def put_job(self, job: JobRecord) -> None:
        self._jobs[job.tag] = JOBS.row(job)
        self._enqueued_one()

    def fail_run_row(self, run_id: str, error: str) -> None:
        """Mark a run that cannot even be loaded as failed, with the reason (recovery)."""
        now = time.time()
        self._run_failures[run_id] = ("failed", error, now, now, run_id)
        self.add_transition(run_id, None, None, "running", "failed", {"source": "recovery", "error": error[:500]}, now)

    def put_cache(self, identity: str, output: Any, output_hash: str, workflow: str, task: str, run_id: str,
                  index: int | None) -> None:
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

    @property
    def backlog(self) -> int:
        return self._pending

    # ------------------------------------------------------------------ writing

    async def _commit_pending(self) -> None:
        if self._db is None or self._pending == 0:
            self._wake = anyio.Event() if not self._pending else self._wake
            return
        runs, tasks, instances = list(self._runs.values()), list(self._tasks.values()), list(self._instances.values())
        transitions, jobs, cache = self._transitions, list(self._jobs.values()), list(self._cache.values())
        failures = list(self._run_failures.values())
        self._runs, self._tasks, self._instances = {}, {}, {}
        self._transitions, self._jobs, self._cache, self._run_failures = [], {}, {}, {}
        generation = self._enqueued
        self._pending = 0
        self._wake = anyio.Event()
        self._urgent = anyio.Event()
        db = self._db
        with anyio.CancelScope(shield=True):
            if runs:
                await db.executemany(RUNS.insert, runs)
            if tasks:
                await db.executemany(TASKS.insert, tasks)
            if instances:
                await db.executemany(INSTANCES.insert, instances)
            if transitions:
                await db.executemany(
                    "INSERT INTO transitions (run_id, task, idx, from_state, to_state, evidence, at) "
                    "VALUES (?,?,?,?,?,?,?)",
                    transitions,
                )
            if jobs:
                await db.executemany(JOBS.insert, jobs)
            if failures:
                await db.executemany("UPDATE runs SET state=?, error=?, ended_at=?, updated_at=? WHERE id=?", failures)
            if cache:
                await db.executemany("INSERT OR REPLACE INTO cache VALUES (?,?,?,?,?,?,?,?)", cache)
            await db.commit()
        self.commits += 1
        self.transitions_written += len(transitions)
        self.rows_written += len(runs) + len(tasks) + len(instances) + len(transitions) + len(jobs) + len(cache) \
            + len(failures)
        self._committed = generation
        done, self._committed_event = self._committed_event, anyio.Event()
        done.set()

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
        async with self._r.execute("SELECT * FROM instances WHERE run_id=?", (run.id,)) as cur:
            async for r in cur:
                inst = Instance(**INSTANCES.values(r))
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

    async def cache_lookup(self, identities: Iterable[str]) -> dict[str, dict[str, Any]]:
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
            row = self._cache.get(identity)
            if row is not None:
                found[identity] = {"output": json.loads(row[1]), "output_hash": row[2], "run_id": row[5], "task": row[4]}
        return found

    async def jobs_for_runs(self, run_ids: Iterable[str]) -> list[JobRecord]:
        ids = list(run_ids)
        if not ids:
            return []
        out: list[JobRecord] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            sql = f"SELECT * FROM jobs WHERE run_id IN ({','.join('?' * len(chunk))})"
            async with self._r.execute(sql, chunk) as cur:
                async for r in cur:
                    out.append(JobRecord(**JOBS.values(r)))
        return out

    async def transitions(self, run_id: str, *, after_seq: int = 0, limit: int = 10000) -> list[dict[str, Any]]:
        sql = "SELECT * FROM transitions WHERE run_id=? AND seq>? ORDER BY seq LIMIT ?"
        async with self._r.execute(sql, (run_id, after_seq, limit)) as cur:
            rows = await cur.fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["evidence"] = json.loads(d["evidence"])
            d["index"] = None if d["idx"] is None or d["idx"] < 0 else d["idx"]
            out.append(d)
        return out
