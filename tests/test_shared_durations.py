"""Automatic packing from the user's shared history (issue #15): task durations kept in the per-user
cache (``<state dir>/cache.sqlite``), so a run in a brand-new run directory packs from earlier runs,
and a damaged, foreign or absent durations table never fails a run."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

import anyio
import pytest

from reflow.loader import load_workflow
from reflowd.cache_store import CACHE_FILE, DURATION_VERSIONS_KEPT, DURATIONS_KEPT, CacheStore

from .support import ROOT

COUNTING = ROOT / "tests" / "engine_workflows" / "counting.py"


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user of their own: empty configuration, state directory under tmp_path."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("REFLOW_CONFIG", raising=False)
    monkeypatch.delenv("REFLOW_STATE_DIR", raising=False)
    return tmp_path / "state"


def run(run_dir: Path, **params: object) -> Counter[str]:
    """``run_local`` of the counting workflow; how many elements of ``work`` each job (array element) ran."""
    wf = load_workflow(COUNTING)
    result = wf.run_local(run_dir, max_workers=2, **params)
    assert result.ok, result.failures
    with sqlite3.connect(run_dir / ".reflow" / "local.sqlite") as db:
        jobs = [r[0] for r in db.execute("SELECT job_key FROM instances WHERE task='work'")]
    assert len(jobs) == params["n"] and None not in jobs
    return Counter(jobs)


def shared_cache(state: Path) -> Path:
    found = list(state.rglob(CACHE_FILE))
    assert len(found) == 1, found
    return found[0]


def test_a_new_run_directory_packs_from_the_first_runs_durations(state: Path, tmp_path: Path) -> None:
    first = run(tmp_path / "first", n=8)
    assert len(first) == 8, f"no history anywhere: one element per job {first}"
    with sqlite3.connect(shared_cache(state)) as db:
        kept = db.execute("SELECT workflow, task, version, COUNT(*) FROM durations GROUP BY 1, 2, 3").fetchall()
    assert ("counting", "work", "1", 8) in kept, kept
    second = run(tmp_path / "second", n=8, fail_on=99)  # other inputs: no cache hits, every element runs
    assert len(second) < 8 and sum(second.values()) == 8, f"packed from the shared history: {second}"


def test_an_old_cache_file_opens_and_a_foreign_durations_table_fails_nothing(state: Path, tmp_path: Path) -> None:
    # 1. A cache.sqlite of the version before durations (schema 1, no such table): opened, the table added.
    path = tmp_path / "old" / CACHE_FILE
    path.parent.mkdir()
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
            CREATE TABLE cache (identity TEXT PRIMARY KEY, output TEXT NOT NULL, output_hash TEXT NOT NULL,
                files TEXT, workflow TEXT NOT NULL, task TEXT NOT NULL, run_id TEXT NOT NULL, idx INTEGER NOT NULL,
                created_at REAL NOT NULL, origin TEXT NOT NULL);
            INSERT INTO meta VALUES ('cache_schema', '1');
            INSERT INTO cache VALUES ('id1', '1', 'h', NULL, 'w', 't', 'r', 0, 0, 'daemon');""")

    async def keep_some() -> tuple[dict, list[float]]:
        cache = CacheStore(path, origin="embedded")
        await cache.open()
        try:
            for i in range(DURATIONS_KEPT + 20):
                cache.record_duration("w", "t", "1", float(i))
            await cache.commit()
            return await cache.lookup(["id1"]), await cache.durations("w", "t", "1", limit=5)
        finally:
            await cache.close()

    hits, newest = anyio.run(keep_some)
    assert set(hits) == {"id1"}, "the old entries are still there"
    assert newest == [float(i) for i in range(DURATIONS_KEPT + 19, DURATIONS_KEPT + 14, -1)]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM durations").fetchone()[0] == DURATIONS_KEPT, "bounded"

    # 2. The user's cache has a durations table of another shape: runs succeed, results are still cached.
    cache = state / "reflow" / CACHE_FILE
    cache.parent.mkdir(parents=True)
    with sqlite3.connect(cache) as db:
        db.execute("CREATE TABLE durations (something_else TEXT)")
    first = run(tmp_path / "a", n=4)
    assert len(first) == 4
    assert shared_cache(state) == cache, "the cache was not moved aside for it"
    with sqlite3.connect(cache) as db:
        assert db.execute("SELECT COUNT(*) FROM cache WHERE task='work'").fetchone()[0] == 4, "results kept"
    # Again in the same directory (the run directory is part of each result's identity here).
    assert load_workflow(COUNTING).run_local(tmp_path / "a", max_workers=2, n=4).ok
    assert (tmp_path / "a" / "executions.txt").read_text().count("work") == 4, "the cached results were reused"


def test_only_the_newest_versions_of_a_task_keep_their_durations(tmp_path: Path) -> None:
    """A task edited again and again (a new ``version`` each time) must not grow the shared file for ever."""
    async def versions() -> dict[str, list[float]]:
        cache = CacheStore(tmp_path / CACHE_FILE, origin="embedded")
        await cache.open()
        try:
            for version in range(1, 7):
                cache.record_duration("w", "t", str(version), float(version))
                cache.record_duration("w", "other", "1", float(version))
                await cache.commit()  # one commit per version: they are written at different times
            return {v: await cache.durations("w", "t", v) for v in map(str, range(1, 7))}
        finally:
            await cache.close()

    kept = anyio.run(versions)
    newest = [str(v) for v in range(6, 6 - DURATION_VERSIONS_KEPT, -1)]
    assert {v for v, seconds in kept.items() if seconds} == set(newest)
    with sqlite3.connect(tmp_path / CACHE_FILE) as db:
        assert db.execute("SELECT COUNT(*) FROM durations WHERE task='other'").fetchone()[0] == 6, \
            "another task's single version keeps all its rows"


def test_a_damaged_cache_file_fails_no_run(state: Path, tmp_path: Path) -> None:
    cache = state / "reflow" / CACHE_FILE
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"this is not a database" * 100)
    assert len(run(tmp_path / "r", n=4)) == 4
    assert list(cache.parent.glob(CACHE_FILE + ".damaged-*")), "moved aside"
