"""The user's one result cache, shared by the daemon and embedded runs.

A task instance whose Merkle identity already has a verified result must not
run again, whether it was started by ``python pipeline.py run`` (embedded) or
by ``reflow-client submit`` (the daemon). Both therefore open the same SQLite
file, ``<state dir>/cache.sqlite``, apart from their own state databases: the
daemon's ``reflowd.sqlite`` holds its runs and is the daemon's alone, while
this file is written by whichever process produced a result.

Sharing is SQLite's job: WAL on a local filesystem (rollback journal on a
network one, where WAL's shared memory does not work across hosts), a long
busy timeout, and short ``BEGIN IMMEDIATE`` transactions from a group-commit
writer, so a daemon and any number of embedded runs can read and write at
once without corrupting the file or losing entries.

An entry is reused only if it still holds: every absolute path in the result
that was visible when it was recorded must still exist with the same size and
modification time (``files``). A deleted or rewritten output file makes the
entry a miss and the task runs again. The cache is disposable: a damaged file
is moved aside (loudly) and started afresh, never a reason to refuse a run.

The same file keeps the measured durations of succeeded instances (the newest
``DURATIONS_KEPT`` per workflow, task and version, of the ``DURATION_VERSIONS_KEPT``
newest versions of each task), so that automatic packing
has history in a brand-new run directory too (``reflowd/driver/packing.py``).
They are advisory: a duration that cannot be written or read is dropped with a
warning and never holds up a result or a run. The table was added without
changing ``CACHE_SCHEMA``: older reflows open the file and ignore it, and files
of older versions get it on their first open here.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import structlog

from reflow_client import codec

from .engine.records import dump_json

log = structlog.get_logger("reflowd.cache")

CACHE_FILE = "cache.sqlite"
CACHE_SCHEMA = 1

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS cache (
    identity TEXT PRIMARY KEY, output TEXT NOT NULL, output_hash TEXT NOT NULL, files TEXT,
    workflow TEXT NOT NULL, task TEXT NOT NULL, run_id TEXT NOT NULL, idx INTEGER NOT NULL,
    created_at REAL NOT NULL, origin TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS adopted (
    database_id TEXT PRIMARY KEY, path TEXT NOT NULL, entries INTEGER NOT NULL, at REAL NOT NULL
);
INSERT OR IGNORE INTO meta VALUES ('cache_schema', '{CACHE_SCHEMA}');
"""

INSERT = "INSERT OR REPLACE INTO cache VALUES (?,?,?,?,?,?,?,?,?,?)"

#: Measured durations, one row per succeeded instance. Created apart from ``SCHEMA`` (and failing
#: alone): a damaged or foreign ``durations`` table must not make the result cache unusable.
DURATIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS durations (
    workflow TEXT NOT NULL, task TEXT NOT NULL, version TEXT NOT NULL, seconds REAL NOT NULL, at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS durations_by_task ON durations (workflow, task, version, at);
"""

#: Durations kept per (workflow, task, version): the newest ones; older rows are deleted as new ones come.
DURATIONS_KEPT = 200

#: Versions of one task whose durations are kept: a task edited many times must not grow the file for ever.
DURATION_VERSIONS_KEPT = 3

#: Durations waiting to be written, at most (a cache that cannot be written must not grow memory).
DURATIONS_PENDING_MAX = 10_000

DurationKey = tuple[str, str, str]

PRUNE_VERSIONS = ("DELETE FROM durations WHERE workflow=? AND task=? AND version NOT IN (SELECT version FROM durations "
                  "WHERE workflow=? AND task=? GROUP BY version ORDER BY MAX(at) DESC LIMIT ?)")

#: Filesystems on which SQLite's WAL (shared memory beside the file) is unsafe across hosts.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "smbfs", "ceph", "fuse.sshfs", "glusterfs",
    "fuse.glusterfs", "panfs", "pvfs2", "orangefs", "afs", "9p",
})

#: A recorded file: ``[size, mtime_ns]``; a directory: ``[-1, -1]``; ``None``: not visible when recorded.
Fingerprint = list[int] | None


class CacheError(RuntimeError):
    """The cache database cannot be used."""


def cache_path(state_dir: str | os.PathLike[str]) -> Path:
    """Where the user's cache lives: beside the daemon's state database."""
    return Path(state_dir) / CACHE_FILE


# ---------------------------------------------------------------------- pure parts


def filesystem_type(path: str, mountinfo: str) -> str:
    """The filesystem type of the longest mount point containing *path* (``/proc/self/mountinfo`` text)."""
    best, kind = "", ""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        mount = fields[4].replace("\\040", " ")
        inside = path == mount or path.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, right.split()[0]
    return kind


def journal_mode_for(fs_type: str) -> str:
    return "TRUNCATE" if fs_type in NETWORK_FILESYSTEMS else "WAL"


def fingerprint(path: str) -> Fingerprint:
    """What a file looks like now (``None`` when it cannot be seen from here)."""
    if not os.path.isabs(path):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode):
        return [-1, -1]
    return [st.st_size, st.st_mtime_ns]


def fingerprints(output: Any) -> dict[str, Fingerprint]:
    return {p: fingerprint(p) for p in codec.encoded_paths(output)}


def problem_with(files: dict[str, Fingerprint]) -> str | None:
    """Why a recorded result no longer holds (``None``: it does)."""
    for path, recorded in sorted(files.items()):
        if recorded is None:
            continue  # not visible where it was recorded (a remote path): nothing to compare
        now = fingerprint(path)
        if now is None:
            return f"output file {path} is missing"
        if recorded[0] >= 0 and now != recorded:
            return f"output file {path} changed after the result was recorded"
    return None


# ---------------------------------------------------------------------- the store


class CacheStore:
    """The shared cache: ``put`` (synchronous, batched) and ``lookup`` (verified hits only)."""

    def __init__(self, path: str | os.PathLike[str], *, origin: str, commit_interval: float = 0.2,
                 busy_timeout: float = 30.0, retry_max: float = 5.0, close_timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.origin = origin  # "daemon" or "embedded": who recorded an entry (for diagnostics)
        self.commit_interval = commit_interval
        self.busy_timeout = busy_timeout
        self.retry_max = retry_max
        self.close_timeout = close_timeout
        self.journal_mode = "WAL"
        self.write_error: str | None = None
        self.rejected = 0  # entries found but not reused (their files are gone or changed)
        self.fingerprinted = 0  # entries whose files were fingerprinted as they were put (before their commit)
        self._db: aiosqlite.Connection | None = None
        self._pending: dict[str, tuple[Any, ...]] = {}
        self._writing: dict[str, tuple[Any, ...]] = {}
        self._wake = anyio.Event()
        self._unprinted: list[str] = []  # entries put with file paths whose files are not fingerprinted yet
        self._put = anyio.Event()
        self._lock = anyio.Lock()
        self._durations: list[tuple[str, str, str, float, float]] = []
        self.durations_error: str | None = None  # why durations cannot be kept here (None: they can)

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        await anyio.to_thread.run_sync(lambda: self.path.parent.mkdir(parents=True, exist_ok=True))
        try:
            mountinfo = await anyio.to_thread.run_sync(_read_mountinfo)
            self.journal_mode = journal_mode_for(filesystem_type(str(self.path.parent.resolve()), mountinfo))
            self._db = await self._connect()
        except sqlite3.DatabaseError as exc:
            await self._drop_connection()
            if isinstance(exc, sqlite3.OperationalError) and "disk image" not in str(exc):
                raise CacheError(f"cannot open the result cache {self.path}: {exc}") from exc
            aside = await anyio.to_thread.run_sync(_move_aside, self.path)
            log.error("the result cache was damaged; moved aside and started afresh (results will be computed again)",
                      path=str(self.path), moved_to=str(aside), error=str(exc))
            self._db = await self._connect()

    async def _connect(self) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        try:
            await db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            async with db.execute("PRAGMA quick_check(3)") as cur:
                problems = [str(r[0]) for r in await cur.fetchall()]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError(f"database disk image fails its integrity check: {'; '.join(problems)}")
            async with db.execute(f"PRAGMA journal_mode={self.journal_mode}") as cur:
                await cur.fetchall()
            # NORMAL is safe with WAL; a rollback journal needs FULL not to risk corruption at a power cut
            await db.execute(f"PRAGMA synchronous={'NORMAL' if self.journal_mode == 'WAL' else 'FULL'}")
            await db.executescript("BEGIN IMMEDIATE;" + SCHEMA + "COMMIT;")
            async with db.execute("SELECT value FROM meta WHERE key='cache_schema'") as cur:
                row = await cur.fetchone()
            if row is not None and str(row[0]).isdigit() and int(row[0]) > CACHE_SCHEMA:
                raise CacheError(f"the result cache {self.path} was written by a newer reflow "
                                 f"(cache schema {row[0]} > {CACHE_SCHEMA}); upgrade reflow")
            await self._create_durations(db)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await db.close()
            raise
        return db

    async def _create_durations(self, db: aiosqlite.Connection) -> None:
        self.durations_error = None
        try:
            await db.executescript("BEGIN IMMEDIATE;" + DURATIONS_SCHEMA + "COMMIT;")
            async with db.execute("SELECT workflow, task, version, seconds, at FROM durations LIMIT 0") as cur:
                await cur.fetchall()
        except sqlite3.Error as exc:
            with anyio.CancelScope(shield=True):
                try:
                    await db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            self.durations_error = str(exc)
            log.warning("cannot keep task durations in the result cache; automatic packing goes by each run "
                        "directory's own history", path=str(self.path), error=str(exc))

    async def _drop_connection(self) -> None:
        if self._db is not None:
            with anyio.CancelScope(shield=True):
                try:
                    await self._db.close()
                except (sqlite3.Error, ValueError):
                    pass
            self._db = None

    async def close(self) -> None:
        """Commit what is pending (retrying for ``close_timeout`` s), then close."""
        with anyio.CancelScope(shield=True):
            deadline = time.monotonic() + self.close_timeout
            delay = 0.1
            while (self._pending or self._durations) and self._db is not None:
                try:
                    await self.commit()
                except CacheError as exc:
                    if time.monotonic() + delay > deadline:
                        log.error("result cache entries lost at shutdown (their tasks will run again)",
                                  entries=len(self._pending), error=str(exc))
                        break
                    await anyio.sleep(delay)
                    delay = min(delay * 2, self.retry_max)
            await self._drop_connection()

    async def run_writer(self) -> None:
        """Commit pending entries in groups until cancelled; a failed commit keeps them and retries."""
        failures = 0
        while True:
            await self._wake.wait()
            await self._settle()
            try:
                await self.commit()
                failures = 0
            except CacheError as exc:
                failures += 1
                if failures == 1:
                    log.error("cannot write the result cache; keeping entries and retrying", error=str(exc))
                await anyio.sleep(min(0.1 * 2 ** min(failures, 10), self.retry_max))

    async def _settle(self) -> None:
        """Wait out the commit interval, fingerprinting the files of each entry as it is put: the files as the
        task left them, not as they are up to ``commit_interval`` later (a file rewritten meanwhile -- the user
        editing it once the run is reported done -- would be recorded as the task's, and reused)."""
        deadline = anyio.current_time() + self.commit_interval
        while True:
            self._put = anyio.Event()
            await self._fingerprint_new()
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                return
            with anyio.move_on_after(remaining):
                await self._put.wait()

    async def _fingerprint_new(self) -> None:
        identities, self._unprinted = self._unprinted, []
        rows = [row for i in identities if (row := self._pending.get(i)) is not None and row[3] is None]
        if not rows:
            return
        printed = await anyio.to_thread.run_sync(_with_fingerprints, rows)
        for old, new in zip(rows, printed):
            if self._pending.get(old[0]) is old:  # (not put again meanwhile)
                self._pending[old[0]] = new
                self.fingerprinted += 1

    def health(self) -> dict[str, Any]:
        """For ``stats``: where the cache is, how it is shared, whether it can be written."""
        return {"path": str(self.path), "journal_mode": self.journal_mode, "pending": len(self._pending),
                "rejected": self.rejected, "fingerprinted": self.fingerprinted, "error": self.write_error,
                **({"durations_error": self.durations_error} if self.durations_error else {})}

    # ------------------------------------------------------------------ writing

    def put(self, identity: str, output: Any, output_hash: str, workflow: str, task: str, run_id: str,
            index: int | None) -> None:
        """Record a verified result (committed by the writer; visible to ``lookup`` at once)."""
        text = dump_json(output)
        self._pending[identity] = (identity, text, output_hash, None, workflow, task, run_id,
                                   -1 if index is None else index, time.time(), self.origin)
        if '"path"' in text:  # (the encoded text cannot hold a path otherwise)
            self._unprinted.append(identity)
            self._put.set()
        self._wake.set()

    def record_duration(self, workflow: str, task: str, version: str, seconds: float) -> None:
        """Keep how long a succeeded instance took (committed by the writer, with the results)."""
        if self.durations_error is not None or not (seconds >= 0 and seconds != float("inf")):
            return
        if len(self._durations) >= DURATIONS_PENDING_MAX:
            del self._durations[: len(self._durations) // 2]  # unwritable for long: keep the newest
        self._durations.append((workflow, task, str(version), float(seconds), time.time()))
        self._wake.set()

    async def durations(self, workflow: str, task: str, version: str, *, limit: int = DURATIONS_KEPT) -> list[float]:
        """The newest measured durations of *task* (seconds), from any run of this user, newest first."""
        key = (workflow, task, str(version))
        out = [row[3] for row in reversed(self._durations) if row[:3] == key][:limit]
        if self._db is None or self.durations_error is not None or len(out) >= limit:
            return out
        sql = ("SELECT seconds FROM durations WHERE workflow=? AND task=? AND version=? "
               "ORDER BY at DESC, rowid DESC LIMIT ?")
        try:
            async with self._db.execute(sql, (*key, limit - len(out))) as cur:
                out.extend(float(r[0]) for r in await cur.fetchall())
        except (sqlite3.Error, ValueError, TypeError) as exc:
            raise CacheError(f"cannot read task durations from {self.path}: {exc}") from exc
        return out

    async def commit(self) -> int:
        """Write everything pending in one transaction; the number of entries written."""
        async with self._lock:
            if self._durations and self._db is not None:
                await self._commit_durations()
            if not self._pending or self._db is None:
                self._wake = anyio.Event() if not self._pending else self._wake
                return 0
            batch, self._pending = self._pending, {}
            self._wake = anyio.Event()
            self._writing = batch
            try:
                rows = await anyio.to_thread.run_sync(_with_fingerprints, list(batch.values()))
                with anyio.CancelScope(shield=True):
                    async with self._transaction():
                        await self._db.executemany(INSERT, rows)
            except BaseException as exc:
                # not written (failed, or cancelled while fingerprinting): keep the batch for close()
                self._pending = {**batch, **self._pending}
                self._wake.set()
                if not isinstance(exc, (sqlite3.Error, ValueError, OverflowError)):
                    raise
                self.write_error = str(exc)
                raise CacheError(f"cannot write the result cache {self.path}: {exc}") from exc
            finally:
                self._writing = {}
            self.write_error = None
            return len(rows)

    async def _commit_durations(self) -> None:
        """Write pending durations and trim each task's to the newest ``DURATIONS_KEPT`` (a failure drops them)."""
        assert self._db is not None
        batch, self._durations = self._durations, []
        keys = sorted({row[:3] for row in batch})
        prune = ("DELETE FROM durations WHERE workflow=? AND task=? AND version=? AND rowid NOT IN (SELECT rowid "
                 "FROM durations WHERE workflow=? AND task=? AND version=? ORDER BY at DESC, rowid DESC LIMIT ?)")
        try:
            with anyio.CancelScope(shield=True):
                async with self._transaction():
                    await self._db.executemany("INSERT INTO durations VALUES (?,?,?,?,?)", batch)
                    await self._db.executemany(prune, [(*k, *k, DURATIONS_KEPT) for k in keys])
                    await self._db.executemany(PRUNE_VERSIONS, [(*k[:2], *k[:2], DURATION_VERSIONS_KEPT)
                                                                for k in sorted({k[:2] for k in keys})])
        except (sqlite3.Error, ValueError, OverflowError) as exc:
            log.warning("cannot write task durations to the result cache; dropped (they only size packed jobs)",
                        durations=len(batch), error=str(exc))

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        """``BEGIN IMMEDIATE`` .. ``COMMIT``, rolled back (shielded) on any error or cancellation."""
        assert self._db is not None
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            await self._db.execute("COMMIT")
        except BaseException:
            with anyio.CancelScope(shield=True):
                try:
                    await self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise

    # ------------------------------------------------------------------ reading

    async def lookup(self, identities: Iterable[str]) -> dict[str, dict[str, Any]]:
        """``{identity: {output, output_hash, run_id, task}}`` for entries whose results still hold."""
        ids = list(dict.fromkeys(identities))
        rows: dict[str, tuple[Any, ...]] = {}
        if self._db is None:
            raise CacheError("the result cache is not open")
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            sql = f"SELECT * FROM cache WHERE identity IN ({','.join('?' * len(chunk))})"
            try:
                async with self._db.execute(sql, chunk) as cur:
                    for r in await cur.fetchall():
                        rows[r[0]] = tuple(r)
            except sqlite3.Error as exc:
                log.error("cannot read the result cache; treating it as empty for now", error=str(exc))
                rows = {}
                break
        checks = {i: json.loads(r[3]) for i, r in rows.items() if r[3]}
        problems = await anyio.to_thread.run_sync(_problems, checks) if checks else {}
        found: dict[str, dict[str, Any]] = {}
        for identity, r in rows.items():
            problem = problems.get(identity)
            if problem is not None:
                self.rejected += 1
                log.info("cached result not reused", identity=identity, task=r[5], from_run=r[6], problem=problem)
                continue
            found[identity] = {"output": json.loads(r[1]), "output_hash": r[2], "run_id": r[6], "task": r[5]}
        for identity in ids:  # produced here and not yet committed: just made, nothing to check
            row = self._pending.get(identity) or self._writing.get(identity)
            if row is not None:
                found[identity] = {"output": json.loads(row[1]), "output_hash": row[2], "run_id": row[6],
                                   "task": row[5]}
        return found

    # ------------------------------------------------------------------ old per-database caches

    async def adopt(self, database: str | os.PathLike[str]) -> int:
        """Copy the entries of an older reflow's per-database cache table (once per database); how many."""
        async with self._lock:
            if self._db is None:
                raise CacheError("the result cache is not open")
            database_id = await anyio.to_thread.run_sync(_legacy_id, Path(database))
            if database_id is None:
                return 0
            async with self._db.execute("SELECT 1 FROM adopted WHERE database_id=?", (database_id,)) as cur:
                if await cur.fetchone() is not None:
                    return 0
            legacy = await anyio.to_thread.run_sync(_legacy_rows, Path(database))
            rows = await anyio.to_thread.run_sync(_with_fingerprints, legacy)
            async with self._transaction():
                await self._db.executemany(INSERT.replace("OR REPLACE", "OR IGNORE"), rows)
                await self._db.execute("INSERT OR IGNORE INTO adopted VALUES (?,?,?,?)",
                                       (database_id, str(database), len(rows), time.time()))
        if rows:
            log.info("moved cached results into the shared cache", source=str(database), entries=len(rows),
                     cache=str(self.path))
        return len(rows)


async def open_cache(cache: CacheStore, *, adopt: str | os.PathLike[str] | None = None) -> None:
    """Open *cache*, taking over the entries of the older per-database cache in *adopt* (the first time)."""
    await cache.open()
    if adopt is not None:
        try:
            await cache.adopt(adopt)
        except (sqlite3.Error, OSError) as exc:
            log.warning("cannot move old cached results into the shared cache", source=str(adopt), error=str(exc))


# ---------------------------------------------------------------------- blocking helpers (worker threads)


def _read_mountinfo() -> str:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
    for suffix in ("", "-wal", "-shm", "-journal"):
        part = path.with_name(path.name + suffix)
        if part.exists():
            part.rename(aside.with_name(aside.name + suffix))
    return aside


def _with_fingerprints(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Record what each result's files look like now, just after the task made them."""
    out = []
    for row in rows:
        if row[3] is not None or '"path"' not in row[1]:  # fingerprinted already, or the text cannot hold a path
            out.append(row)
            continue
        files = fingerprints(json.loads(row[1]))
        out.append((*row[:3], json.dumps(files) if files else None, *row[4:]))
    return out


def _problems(checks: dict[str, dict[str, Fingerprint]]) -> dict[str, str | None]:
    return {identity: problem_with(files) for identity, files in checks.items()}


def _read_only(database: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)


def _legacy_id(database: Path) -> str | None:
    """The id of a reflow state database that has its own cache table (None: no such database)."""
    if not database.exists():
        return None
    try:
        conn = _read_only(database)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not {"meta", "cache"} <= tables:
                return None
            row = conn.execute("SELECT value FROM meta WHERE key='database_id'").fetchone()
            return None if row is None else str(row[0])
        finally:
            conn.close()
    except sqlite3.Error as exc:
        log.warning("cannot read the old cache of a state database", database=str(database), error=str(exc))
        return None


def _legacy_rows(database: Path) -> list[tuple[Any, ...]]:
    conn = _read_only(database)
    try:
        return [(identity, output, output_hash, None, workflow, task, run_id, idx, created_at, "adopted")
                for identity, output, output_hash, workflow, task, run_id, idx, created_at
                in conn.execute("SELECT identity, output, output_hash, workflow, task, run_id, idx, created_at "
                                "FROM cache")]
    finally:
        conn.close()
