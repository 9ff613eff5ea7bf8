"""The shared cache's group commit never drops entries it took off the pending list.

A full CI run once lost an embedded run's last results (``square`` and ``total``): the run ended and
cancelled the writer while it fingerprinted a batch in a worker thread; the batch was neither
written nor pending, so ``close()`` had nothing left to write and the next run executed them again.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest

import reflowd.cache_store as cache_store
from reflowd.cache_store import CacheStore


def stored(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT task FROM cache")}


def test_a_commit_cancelled_before_its_thread_starts_keeps_its_batch_for_close(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``to_thread.run_sync`` checkpoints before it starts its thread: a cancel lands there, after the swap."""
    real_run_sync = anyio.to_thread.run_sync

    async def main() -> tuple[set[str], int]:
        cache = CacheStore(tmp_path / "cache.sqlite", origin="test", commit_interval=0.0)
        await cache.open()
        cache.put("id-square", 4, "h1", "wf", "square", "run-1", 2)
        cache.put("id-total", 5, "h2", "wf", "total", "run-1", None)
        with anyio.CancelScope() as scope:

            async def cancelled_at_the_checkpoint(func: Any, *args: Any, **kwargs: Any) -> Any:
                scope.cancel()  # the run ends (its task group is cancelled) just as the writer commits
                await anyio.sleep(0)
                return func(*args)

            monkeypatch.setattr(anyio.to_thread, "run_sync", cancelled_at_the_checkpoint)
            await cache.commit()
        monkeypatch.setattr(anyio.to_thread, "run_sync", real_run_sync)
        assert scope.cancelled_caught
        pending = cache.health()["pending"]
        await cache.close()
        return stored(tmp_path / "cache.sqlite"), pending

    written, pending = anyio.run(main)
    assert pending == 2, "the interrupted batch went back to pending"
    assert written == {"square", "total"}, "close() wrote what the cancelled commit had taken"


def test_a_failed_write_rolls_back_and_keeps_the_batch(tmp_path: Path) -> None:
    async def main() -> tuple[set[str], int, str | None]:
        cache = CacheStore(tmp_path / "cache.sqlite", origin="test", commit_interval=0.0)
        await cache.open()
        cache.put("id-a", 1, "h", "wf", "a", "run-1", None)
        blocker = sqlite3.connect(tmp_path / "cache.sqlite", timeout=0)
        blocker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        cache.busy_timeout = 0.0
        assert cache._db is not None
        await cache._db.execute("PRAGMA busy_timeout=0")
        with pytest.raises(cache_store.CacheError, match="cannot write the result cache"):
            await cache.commit()
        pending, error = cache.health()["pending"], cache.health()["error"]
        blocker.rollback()
        blocker.close()
        assert await cache.commit() == 1, "the kept entry is written once the lock is free"
        await cache.close()
        return stored(tmp_path / "cache.sqlite"), pending, error

    written, pending, error = anyio.run(main)
    assert pending == 1 and error is not None and "locked" in error
    assert written == {"a"}


def test_result_files_are_fingerprinted_as_the_task_left_them_not_at_the_commit(tmp_path: Path) -> None:
    """A file rewritten between the put and the commit (up to ``commit_interval`` later: the user editing it
    once the run is reported done) is not recorded as the task's: CI once reused such a file."""
    from reflow_client import codec

    made = tmp_path / "made.txt"
    made.write_text("0 1 2")
    output = {codec.TAG: "path", "value": str(made)}

    async def main() -> dict[str, Any]:
        cache = CacheStore(tmp_path / "cache.sqlite", origin="test", commit_interval=3600.0)
        await cache.open()
        async with anyio.create_task_group() as tg:
            tg.start_soon(cache.run_writer)
            cache.put("id-make", output, "h", "wf", "make", "run-1", None)
            with anyio.fail_after(30):  # (the writer fingerprints at once, then waits out the commit interval)
                while cache.health()["fingerprinted"] < 1:
                    await anyio.sleep(0.01)
            made.write_text("0 1 2 and some more")  # rewritten behind reflow's back before the commit
            await cache.commit()
            tg.cancel_scope.cancel()
        stale = await cache.lookup(["id-make"])
        await cache.close()
        return stale

    assert anyio.run(main) == {}, "the rewritten file was recorded as the task's and its result reused"
