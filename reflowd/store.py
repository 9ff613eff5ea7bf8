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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import structlog

from reflow_client.manifest import Manifest

from .engine.model import Instance, Run, TaskRun
from .engine.states import RunState, State

log = structlog.get_logger("reflowd.store")

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, workflow TEXT NOT NULL, state TEXT NOT NULL, cluster TEXT NOT NULL,
    run_dir TEXT NOT NULL, manifest TEXT NOT NULL, params TEXT NOT NULL, options TEXT NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, ended_at REAL, error TEXT
);
CREATE INDEX IF NOT EXISTS runs_state ON runs(state);
CREATE INDEX IF NOT EXISTS runs_created ON runs(created_at);
CREATE TABLE IF NOT EXISTS tasks (
    run_id TEXT NOT NULL, name TEXT NOT NULL, expanded INTEGER NOT NULL, size INTEGER,
    blocked TEXT, blocked_reason TEXT, PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS instances (
    run_id TEXT NOT NULL, task TEXT NOT NULL, idx INTEGER NOT NULL, state TEXT NOT NULL,
    attempt INTEGER NOT NULL, identity TEXT, tag TEXT, job_id TEXT, job_key TEXT,
    output TEXT, output_hash TEXT, error TEXT, traceback TEXT, reason TEXT, not_before REAL,
    submitted_at REAL, started_at REAL, ended_at REAL, updated_at REAL NOT NULL, host TEXT,
    cached_from TEXT, PRIMARY KEY (run_id, task, idx)
);
CREATE INDEX IF NOT EXISTS instances_tag ON instances(tag);
CREATE TABLE IF NOT EXISTS transitions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, task TEXT, idx INTEGER,
    from_state TEXT, to_state TEXT NOT NULL, evidence TEXT NOT NULL, at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS transitions_run ON transitions(run_id, seq);
CREATE TABLE IF NOT EXISTS jobs (
    tag TEXT PRIMARY KEY, run_id TEXT NOT NULL, task TEXT NOT NULL, cluster TEXT NOT NULL,
    job_id TEXT, request TEXT NOT NULL, state TEXT NOT NULL, submitted_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_run ON jobs(run_id);
CREATE TABLE IF NOT EXISTS cache (
    identity TEXT PRIMARY KEY, output TEXT NOT NULL, output_hash TEXT NOT NULL, workflow TEXT NOT NULL,
    task TEXT NOT NULL, run_id TEXT NOT NULL, idx INTEGER NOT NULL, created_at REAL NOT NULL
);
"""

_INSTANCE_COLS = (
    "run_id, task, idx, state, attempt, identity, tag, job_id, job_key, output, output_hash, error, traceback, "
    "reason, not_before, submitted_at, started_at, ended_at, updated_at, host, cached_from"
)


@dataclass
class JobRecord:
    """One submission (tag) and the request that made it, so a restart can re-attach."""

    tag: str
    run_id: str
    task: str
    cluster: str
    request: dict[str, Any]
    job_id: str | None = None
    state: str = "submitting"  # submitting, submitted, done, failed
    submitted_at: float = 0.0


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _instance_row(inst: Instance) -> tuple[Any, ...]:
    return (
        inst.run_id,
        inst.task,
        -1 if inst.index is None else inst.index,
        inst.state.value,
        inst.attempt,
        inst.identity,
        inst.tag,
        inst.job_id,
        inst.job_key,
        None if inst.output is None and inst.output_hash is None else _dump(inst.output),
        inst.output_hash,
        inst.error,
        inst.traceback,
        inst.reason,
        inst.not_before,
        inst.submitted_at,
        inst.started_at,
        inst.ended_at,
        inst.updated_at,
        inst.host,
        inst.cached_from,
    )


def _instance_from(row: aiosqlite.Row) -> Instance:
    return Instance(
        run_id=row["run_id"],
        task=row["task"],
        index=None if row["idx"] < 0 else row["idx"],
        state=State(row["state"]),
        attempt=row["attempt"],
        identity=row["identity"],
        tag=row["tag"],
        job_id=row["job_id"],
        job_key=row["job_key"],
        output=None if row["output"] is None else json.loads(row["output"]),
        output_hash=row["output_hash"],
        error=row["error"],
        traceback=row["traceback"],
        reason=row["reason"],
        not_before=row["not_before"],
        submitted_at=row["submitted_at"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        updated_at=row["updated_at"],
        host=row["host"],
        cached_from=row["cached_from"],
    )


class StoreError(RuntimeError):
    """The state database cannot be used."""


class Store:
    """The daemon's SQLite state: runs, tasks, instances, transitions, jobs, cache."""

    def __init__(self, path: str | os.PathLike[str], *, commit_interval: float = 0.05, max_batch: int = 1000) -> None:
        self.path = Path(path)
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
        self._pending = 0
        self._enqueued = 0
        self._committed = 0
        self._wake = anyio.Event()
        self._urgent = anyio.Event()
        self._committed_event = anyio.Event()
        self._closed = False
        self.commits = 0
        self.rows_written = 0

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        await anyio.to_thread.run_sync(lambda: self.path.parent.mkdir(parents=True, exist_ok=True))
        try:
            self._db = await aiosqlite.connect(self.path)
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute("PRAGMA synchronous=NORMAL")
            await self._db.execute("PRAGMA busy_timeout=10000")
            await self._db.executescript(SCHEMA)
            async with self._db.execute("SELECT value FROM meta WHERE key='schema_version'") as cur:
                row = await cur.fetchone()
            if row is None:
                await self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} was written by a newer reflowd (schema {row[0]} > {SCHEMA_VERSION}); upgrade reflowd"
                )
            await self._db.commit()
            self._reader = await aiosqlite.connect(self.path)
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
        self._runs[run.id] = (
            run.id,
            run.workflow,
            run.state.value,
            run.cluster,
            run.run_dir,
            _dump(run.manifest.to_manifest_dict()),
            _dump(run.params),
            _dump(run.options),
            run.created_at,
            run.updated_at,
            run.ended_at,
            run.error,
        )
        self._enqueued_one()

    def put_task(self, run_id: str, task: TaskRun) -> None:
        self._tasks[(run_id, task.name)] = (
            run_id,
            task.name,
            int(task.expanded),
            task.size,
            task.blocked.value if task.blocked else None,
            task.blocked_reason,
        )
        self._enqueued_one()

    def put_instance(self, inst: Instance) -> None:
        self._instances[inst.key] = _instance_row(inst)
        self._enqueued_one()

    def add_transition(
        self, run_id: str, task: str | None, index: int | None, old: str | None, new: str, evidence: dict[str, Any], at: float
    ) -> None:
        self._transitions.append(
            (run_id, task, None if task is None else (-1 if index is None else index), old, new, _dump(evidence), at)
        )
        self._enqueued_one()

    def put_job(self, job: JobRecord) -> None:
        self._jobs[job.tag] = (
            job.tag,
            job.run_id,
            job.task,
            job.cluster,
            job.job_id,
            _dump(job.request),
            job.state,
            job.submitted_at,
        )
        self._enqueued_one()

    def put_cache(self, identity: str, output: Any, output_hash: str, workflow: str, task: str, run_id: str,
                  index: int | None) -> None:
        self._cache[identity] = (
            identity,
            _dump(output),
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
        self._runs, self._tasks, self._instances = {}, {}, {}
        self._transitions, self._jobs, self._cache = [], {}, {}
        generation = self._enqueued
        self._pending = 0
        self._wake = anyio.Event()
        self._urgent = anyio.Event()
        db = self._db
        with anyio.CancelScope(shield=True):
            if runs:
                await db.executemany(f"INSERT OR REPLACE INTO runs VALUES ({','.join('?' * 12)})", runs)
            if tasks:
                await db.executemany("INSERT OR REPLACE INTO tasks VALUES (?,?,?,?,?,?)", tasks)
            if instances:
                await db.executemany(
                    f"INSERT OR REPLACE INTO instances ({_INSTANCE_COLS}) VALUES ({','.join('?' * 21)})", instances
                )
            if transitions:
                await db.executemany(
                    "INSERT INTO transitions (run_id, task, idx, from_state, to_state, evidence, at) "
                    "VALUES (?,?,?,?,?,?,?)",
                    transitions,
                )
            if jobs:
                await db.executemany("INSERT OR REPLACE INTO jobs VALUES (?,?,?,?,?,?,?,?)", jobs)
            if cache:
                await db.executemany("INSERT OR REPLACE INTO cache VALUES (?,?,?,?,?,?,?,?)", cache)
            await db.commit()
        self.commits += 1
        self.rows_written += len(runs) + len(tasks) + len(instances) + len(transitions) + len(jobs) + len(cache)
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
        manifest = Manifest.from_dict(json.loads(row["manifest"]))
        run = Run(
            id=row["id"],
            manifest=manifest,
            params=json.loads(row["params"]),
            run_dir=row["run_dir"],
            cluster=row["cluster"],
            state=RunState(row["state"]),
            options=json.loads(row["options"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            ended_at=row["ended_at"],
            error=row["error"],
        )
        for task in manifest.tasks:
            run.tasks[task.name] = TaskRun(manifest=task, expanded=not task.is_array)
        async with self._r.execute("SELECT * FROM tasks WHERE run_id=?", (run.id,)) as cur:
            async for t in cur:
                tr = run.tasks.get(t["name"])
                if tr is not None:
                    tr.expanded = bool(t["expanded"])
                    tr.size = t["size"]
                    tr.blocked = State(t["blocked"]) if t["blocked"] else None
                    tr.blocked_reason = t["blocked_reason"]
        async with self._r.execute("SELECT * FROM instances WHERE run_id=?", (run.id,)) as cur:
            async for r in cur:
                inst = _instance_from(r)
                tr = run.tasks.get(inst.task)
                if tr is not None:
                    tr.instances[inst.index] = inst
        return run

    async def load_active_runs(self) -> list[Run]:
        async with self._r.execute("SELECT * FROM runs WHERE state=? ORDER BY created_at", ("running",)) as cur:
            rows = await cur.fetchall()
        return [await self._run_from(r) for r in rows]

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
            sql = f"SELECT run_id, name, blocked FROM tasks WHERE run_id IN ({marks}) AND expanded=0"
            async with self._r.execute(sql, chunk) as cur:
                async for r in cur:
                    out[r["run_id"]][r["name"]] = {r["blocked"] or "pending": 1}
        return out

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
                    out.append(
                        JobRecord(
                            tag=r["tag"],
                            run_id=r["run_id"],
                            task=r["task"],
                            cluster=r["cluster"],
                            request=json.loads(r["request"]),
                            job_id=r["job_id"],
                            state=r["state"],
                            submitted_at=r["submitted_at"],
                        )
                    )
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
