"""The store's hot write path: a state change writes the instance's changed columns and one compact
transition row; what is reloaded is what memory held, whatever mix of whole rows and changes a batch had.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path

import anyio
import pytest

from reflowd.engine.events import EventHub
from reflowd.engine.ledger import Ledger
from reflowd.engine.states import State
from reflowd.store import SCHEMA_VERSION, Store, StoreWriteError

from .support import flush_store
from .support import instance_rows
from .support import one_task_run
from .support import reloaded_run


@pytest.mark.anyio
async def test_changes_write_only_their_columns_and_reload_as_memory_held(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = Store(path)
    await store.open()
    run = one_task_run()
    ledger = Ledger(store, EventHub(), Counter())
    a, b, c = run.tasks["a"].instances.values()
    store.put_run(run)
    store.put_task(run.id, run.tasks["a"])
    for inst in (a, b, c):
        store.put_instance(inst)
    await flush_store(store)  # the rows exist: what follows are changes
    executed: list[str] = []
    assert store._db is not None
    await store._db.set_trace_callback(executed.append)
    ledger.instance(run, a, State.READY, {"source": "test"}, {"identity": b"i" * 32})
    ledger.instance(run, a, State.SUBMITTING, {}, {"tag": "t1", "submitted_at": 5.0})  # (same batch: one row)
    ledger.instance(run, b, State.READY, {"source": "test"}, {"identity": b"j" * 32})
    ledger.instance(run, b, State.FAILED, {"source": "test", "error": "x"}, {"error": "boom", "cause": {"kind": "x"}})
    await flush_store(store)
    await store._db.set_trace_callback(None)
    updates = [sql for sql in executed if sql.startswith("UPDATE instances")]
    assert len(updates) == 2, "one UPDATE per instance changed, however often it changed"
    assert not any(sql.startswith("INSERT INTO instances") for sql in executed), "no whole row for a change"
    assert all("output" not in sql and "host" not in sql for sql in updates), "only the columns that changed"
    await store.close()

    again, log = await reloaded_run(path)
    assert instance_rows(again) == instance_rows(run)
    assert [(t["index"], t["from_state"], t["to_state"]) for t in log] == [
        (0, "pending", "ready"), (0, "ready", "submitting"), (1, "pending", "ready"), (1, "ready", "failed")]
    assert log[1]["evidence"] == {} and log[3]["evidence"] == {"source": "test", "error": "x"}
    assert [t["seq"] for t in log] == sorted(t["seq"] for t in log)
    with sqlite3.connect(path) as db:  # no evidence is stored as NULL, not as '{}'
        assert db.execute("SELECT evidence FROM transitions WHERE to_state='submitting'").fetchone() == (None,)


@pytest.mark.anyio
async def test_a_new_instance_changed_before_its_first_commit_is_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = Store(path)
    await store.open()
    run = one_task_run(2)
    ledger = Ledger(store, EventHub(), Counter())
    a, b = run.tasks["a"].instances.values()
    store.put_run(run)
    store.put_task(run.id, run.tasks["a"])
    store.put_instance(a)
    ledger.instance(run, a, State.READY, {}, {"identity": b"i" * 32})  # whole + change in one batch: whole
    ledger.instance(run, b, State.READY, {}, {"identity": b"k" * 32})  # never put whole: the UPDATE finds no row
    await flush_store(store)
    await store.close()
    again, _ = await reloaded_run(path)
    assert instance_rows(again) == instance_rows(run)


@pytest.mark.anyio
async def test_a_whole_row_names_only_its_set_columns_and_one_written_again_clears_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = Store(path)
    await store.open()
    run = one_task_run(3)
    a, b, c = run.tasks["a"].instances.values()
    a.error, a.host = "boom", "node7"
    store.put_run(run)
    store.put_task(run.id, run.tasks["a"])
    executed: list[str] = []
    assert store._db is not None
    await store._db.set_trace_callback(executed.append)
    for inst in (a, b, c):
        store.put_instance(inst)
    await flush_store(store)
    inserts = [sql.split(" ON CONFLICT")[0] for sql in executed if sql.startswith("INSERT INTO instances")]
    assert len(inserts) == 3
    assert sum("error" in sql and "host" in sql for sql in inserts) == 1, "only a's row names error and host"
    assert not any("traceback" in sql for sql in inserts), "a NULL column is not bound"
    a.error = a.host = None  # written whole again: the columns it no longer sets become NULL
    b.host = "node8"
    store.put_instance(a)
    store.put_instance(b)
    await store._db.set_trace_callback(None)
    await flush_store(store)
    await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT idx, error, host FROM instances ORDER BY idx").fetchall() == [
            (0, None, None), (1, None, "node8"), (2, None, None)]
    again, _ = await reloaded_run(path)
    assert instance_rows(again) == instance_rows(run)


@pytest.mark.anyio
async def test_a_failed_commit_keeps_a_whole_row_whole_when_changes_follow(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = Store(path)
    await store.open()
    run = one_task_run(1)
    ledger = Ledger(store, EventHub(), Counter())
    (a,) = run.tasks["a"].instances.values()
    store.put_run(run)
    store.put_task(run.id, run.tasks["a"])
    store.put_instance(a)

    async def refuse(db: object, statements: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    real, store._execute_batch = store._execute_batch, refuse  # type: ignore[method-assign]
    with pytest.raises(StoreWriteError):
        await store._commit_pending()
    ledger.instance(run, a, State.READY, {}, {"identity": b"i" * 32})  # a change queued behind the failed whole row
    store._execute_batch = real  # type: ignore[method-assign]
    await store._commit_pending()
    await store.close()
    again, log = await reloaded_run(path)
    assert instance_rows(again) == instance_rows(run)
    assert [t["to_state"] for t in log] == ["ready"]


def test_a_schema_4_transition_log_is_carried_over(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"

    async def open_close(put: bool) -> None:
        store = Store(path)
        await store.open()
        if put:
            store.add_transition("r1", "a", 2, "ready", "submitting", {}, 3.0)
            await flush_store(store)
        await store.close()

    anyio.run(open_close, False)
    with sqlite3.connect(path) as db:  # the log as schema 4 kept it: AUTOINCREMENT, evidence never NULL
        db.executescript(
            "DROP TABLE transitions; CREATE TABLE transitions (seq INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL,"
            " task TEXT, idx INTEGER, from_state TEXT, to_state TEXT NOT NULL, evidence TEXT NOT NULL, at REAL NOT NULL);"
            "CREATE INDEX transitions_run ON transitions(run_id, seq);"
            "INSERT INTO transitions VALUES (7, 'r1', 'a', 2, 'pending', 'ready', '{}', 1.0);"
            "INSERT INTO transitions VALUES (9, 'r1', NULL, NULL, NULL, 'running', '{\"source\":\"client\"}', 0.5);"
            "UPDATE meta SET value='4' WHERE key='schema_version';")
    anyio.run(open_close, True)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
        sql = db.execute("SELECT sql FROM sqlite_master WHERE name='transitions'").fetchone()[0]
        assert "AUTOINCREMENT" not in sql
        assert db.execute("SELECT count(*) FROM sqlite_master WHERE name='transitions_run'").fetchone() == (1,)
        rows = db.execute("SELECT seq, to_state, evidence FROM transitions ORDER BY seq").fetchall()
    assert rows == [(7, "ready", None), (9, "running", json.dumps({"source": "client"}, separators=(",", ":"))),
                    (10, "submitting", None)], "numbers kept, the next one after them"

    async def read() -> list[dict[str, object]]:
        store = Store(path)
        await store.open()
        try:
            return await store.transitions("r1")
        finally:
            await store.close()

    log = anyio.run(read)
    assert [(t["seq"], t["index"], t["evidence"]) for t in log] == [
        (7, 2, {}), (9, None, {"source": "client"}), (10, 2, {})]


@pytest.mark.anyio
async def test_producers_are_held_back_only_at_the_backlog_bound_and_a_commit_starts_at_max_batch(
        tmp_path: Path) -> None:
    """``max_batch`` changes start a commit at once (not after ``commit_interval``); producers pacing
    themselves go on while the writer is busy, up to ``max_backlog``, and wait there until the writer
    takes the backlog -- which the next commit then holds whole."""
    store = Store(tmp_path / "s.sqlite", max_batch=10, commit_interval=3600.0)
    assert store.max_backlog == 40
    await store.open()
    run = one_task_run(100)
    insts = list(run.tasks["a"].instances.values())
    gate = anyio.Event()
    written: list[int] = []
    real = store._execute_batch

    async def slow_disk(db: object, statements: list) -> None:  # type: ignore[type-arg]
        written.append(sum(len(s.rows) for s in statements))
        await gate.wait()
        await real(db, statements)  # type: ignore[arg-type]

    store._execute_batch = slow_disk  # type: ignore[method-assign]
    async with anyio.create_task_group() as tg:
        try:
            tg.start_soon(store.run_writer)
            store.put_run(run)
            store.put_task(run.id, run.tasks["a"])
            for inst in insts[:8]:
                store.put_instance(inst)
            with anyio.fail_after(10):  # 10 changes: the writer takes them now, an hour before its interval
                while not written:
                    await anyio.sleep(0.01)
            assert written == [10]
            n = 8
            with anyio.fail_after(10):  # the writer is stuck: producers are not held back below the bound
                while True:
                    store.put_instance(insts[n])
                    n += 1
                    if store.pace_due:
                        break
                    await store.pace()
            assert store.backlog == 40
            passed = anyio.Event()

            async def producer() -> None:
                await store.pace()
                passed.set()

            tg.start_soon(producer)
            with anyio.fail_after(10):
                await anyio.wait_all_tasks_blocked()
            assert not passed.is_set()  # at the bound: held back while the writer is stuck
            gate.set()
            with anyio.fail_after(10):
                await passed.wait()
                await store.flush()
            assert written == [10, 40]  # the backlog went in one commit, not in four of max_batch
        finally:
            gate.set()  # (a failed check must not leave the writer's shielded last commit waiting)
            tg.cancel_scope.cancel()
    with anyio.fail_after(10):
        await store.close()
    again, _ = await reloaded_run(tmp_path / "s.sqlite")
    assert instance_rows(again) == {i: row for i, row in instance_rows(run).items() if i is not None and i < n}
