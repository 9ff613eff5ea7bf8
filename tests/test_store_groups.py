"""Group writes (schema 6): consecutive elements of one task making the same move at the same moment with
the same evidence are one transition row, and given identical values (or their array job's keys) one
range ``UPDATE``; what is read back is one transition per element, and what memory held.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reflowd import world
from reflowd.engine.events import EventHub
from reflowd.engine.ledger import Ledger
from reflowd.engine.model import Instance
from reflowd.engine.states import State
from reflowd.store import INSTANCES, SCHEMA_VERSION, ArrayKeys, Store, group_transitions, group_updates

from .support import flush_store
from .support import instance_rows
from .support import one_task_run
from .support import reloaded_run




def _count(path: Path, sql: str) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute(sql).fetchone()[0])


# ---------------------------------------------------------------------- the transition log

_transition = st.tuples(
    st.sampled_from(["r1", "r2"]),  # run
    st.sampled_from(["a", "b", None]),  # task (None: a run-level row)
    st.one_of(st.none(), st.integers(0, 6)),  # index (None: a singleton or run-level)
    st.sampled_from(["pending", "ready"]),
    st.sampled_from(["ready", "queued"]),
    st.sampled_from([{}, {"source": "x"}, {"source": "y"}, {"n": 1}, {"n": 1.0}]),
    st.sampled_from([1.0, 2.0]),
)


def _expected(t: tuple[Any, ...]) -> tuple[Any, ...]:
    run_id, task, index, old, new, evidence, at = t
    return run_id, task, None if task is None else index, old, new, evidence, at


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(_transition, st.integers(0, 4)), max_size=40))
def test_transitions_read_back_as_written_whatever_groups_formed(tmp_path: Path, ops: list[Any]) -> None:
    """Random logs, with runs of consecutive elements (an integer: that many more of the last transition's
    move, on the next indices, with the same evidence object or an equal copy): stored, then read back,
    one entry per transition in order."""
    logged: list[tuple[Any, ...]] = []
    for op in ops:
        if isinstance(op, int):
            if logged and logged[-1][2] is not None:
                run_id, task, index, old, new, evidence, at = logged[-1]
                for k in range(op):
                    logged.append((run_id, task, index + k + 1, old, new, evidence if k % 2 else dict(evidence), at))
        else:
            logged.append(op)
    path = tmp_path / f"log-{time.monotonic_ns()}.sqlite"

    async def go() -> list[dict[str, Any]]:
        store = Store(path)
        await store.open()
        for t in logged:
            store.add_transition(*t)
        await flush_store(store)
        assert store.transitions_written == len(logged)
        assert store.transition_rows_written == _count(path, "SELECT count(*) FROM transitions")
        read = [*await store.transitions("r1"), *await store.transitions("r2")]
        await store.close()
        return read

    read = anyio.run(go)
    want = [_expected(t) for t in logged]
    got = [(r["run_id"], r["task"], r["index"], r["from_state"], r["to_state"], r["evidence"], r["at"]) for r in read]
    assert sorted(got, key=lambda r: r[0]) == sorted(want, key=lambda r: r[0])  # (each run's own order kept)
    assert [r[0] for r in got].count("r1") == [w[0] for w in want].count("r1")
    for r in read:
        assert "idx_last" not in r


def test_consecutive_elements_with_one_move_are_one_row_and_others_are_not() -> None:
    ev = {"source": "submitter"}
    rows = group_transitions([  # (as the store keeps them pending: the index last)
        ("r", "a", "ready", "submitting", ev, 5.0, 0),
        ("r", "a", "ready", "submitting", {"source": "submitter"}, 5.0, 1),  # an equal copy
        ("r", "a", "ready", "submitting", ev, 5.0, 2),
        ("r", "a", "ready", "submitting", ev, 5.0, 4),  # not the next index
        ("r", "a", "ready", "submitting", ev, 5.5, 5),  # another moment
        ("r", "a", "ready", "submitting", {"source": "other"}, 5.5, 6),  # other evidence
        ("r", "a", "ready", "queued", {"source": "other"}, 5.5, 7),  # another move
        ("r", "b", "ready", "queued", {"source": "other"}, 5.5, 8),  # another task
        ("r", "a", "ready", "queued", {"source": "other"}, 5.5, -1),  # a singleton
        ("r", "a", "ready", "queued", {"source": "other"}, 5.5, 0),  # (never after -1: that is no index)
        ("r", None, "running", "succeeded", {}, 5.5, None),  # run level
        ("r", None, "running", "succeeded", {}, 5.5, None),
    ])
    assert [(r[2], r[-1]) for r in rows] == [(0, 2), (4, None), (5, None), (6, None), (7, None), (8, None),
                                             (-1, None), (0, None), (None, None), (None, None)]
    assert rows[0][:8] == ("r", "a", 0, "ready", "submitting", '{"source":"submitter"}', 5.0, 2)
    assert rows[-1] == ("r", None, None, "running", "succeeded", None, 5.5, None)


# ---------------------------------------------------------------------- instance rows


def test_identical_values_on_consecutive_indices_are_one_range_and_job_keys_one_pattern() -> None:
    sql, encode = INSTANCES.update(INSTANCES.mask(("state", "updated_at", "job_id", "job_key")))
    position = INSTANCES.position(INSTANCES.mask(("state", "updated_at", "job_id", "job_key")), "job_key")
    assert position is not None

    def snap(index: int, key: str | None, job: str = "7") -> tuple[Any, ...]:
        inst = Instance(run_id="r", task="a", index=index, state=State.QUEUED, job_id=job, updated_at=3.0)
        inst.job_key = key
        return INSTANCES.snapshot(inst)

    snaps = [snap(0, "7_0"), snap(1, "7_1"), snap(2, "7_2"), snap(3, "7_03"), snap(4, None), snap(5, None),
             snap(6, None, "8"), snap(8, "9_1"), snap(9, "9_2")]
    g = group_updates([encode(v) for v in snaps], snaps, position)
    assert [r[-2:] for r in g.keyed] == [(0, 2), (8, 9)]
    assert [r[position:position + 2] for r in g.keyed] == [("7_", 0), ("9_", 7)]
    assert [r[-2:] for r in g.ranges] == [(4, 5)]
    assert [r[-1] for r in g.singles] == [3, 6]  # zero-padded key; other job id
    assert [len(w) for w in g.keyed_whole] == [3, 2] and [len(w) for w in g.range_whole] == [2]


def test_equal_values_of_another_type_are_not_grouped() -> None:
    sql, encode = INSTANCES.update(INSTANCES.mask(("state", "reason")))
    a = Instance(run_id="r", task="a", index=0, reason="1")
    b = Instance(run_id="r", task="a", index=1, reason=1)  # type: ignore[arg-type]
    c = Instance(run_id="r", task="a", index=2, reason=1.0)  # type: ignore[arg-type]
    snaps = [INSTANCES.snapshot(i) for i in (a, b, c)]
    g = group_updates([encode(v) for v in snaps], snaps)
    assert not g.ranges and len(g.singles) == 3


def _ungrouped(g: Any, key: int | None) -> list[tuple[Any, ...]]:
    """The rows ``group_updates``' answer stands for, one per index, as the SQL would write them."""
    out = list(g.singles)
    for r in g.ranges:
        out.extend((*r[:-2], i) for i in range(r[-2], r[-1] + 1))
    for r in g.keyed:
        assert key is not None
        prefix, offset = r[key], r[key + 1]
        out.extend((*r[:key], prefix + str(i - offset), *r[key + 2:-2], i) for i in range(r[-2], r[-1] + 1))
    return sorted(out, key=lambda r: r[-1])


_value = st.sampled_from([None, 1, 1.0, True, "1", "x", "y"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_value, _value, st.sampled_from(["7_", "8_", None]), st.integers(0, 2), st.booleans()),
                max_size=30))
def test_grouped_updates_stand_for_exactly_the_rows_given(specs: list[tuple[Any, ...]]) -> None:
    """Whatever groups form (ranges, job-key patterns, per-element values that differ row after row: the
    column compared first), the rows they stand for are the rows given, values and types alike."""
    rows, index = [], 0
    for a, b, prefix, offset, gap in specs:
        index += 2 if gap else 1
        key = None if prefix is None else prefix + str(index - offset)
        rows.append(("queued", a, key, b, "r", "t", index))
    g = group_updates(rows, rows, 2)
    got = _ungrouped(g, 2)
    assert got == rows
    assert [tuple(map(type, r)) for r in got] == [tuple(map(type, r)) for r in rows]
    assert len(g.singles) + len(g.ranges) + len(g.keyed) <= len(rows)


@pytest.mark.anyio
async def test_an_array_taken_through_its_states_by_the_ledger_is_few_rows_and_reloads_as_memory_held(
        tmp_path: Path) -> None:
    """What the engine does with a job's elements: groups form (few transition rows, range UPDATEs), and the
    database then holds exactly what memory holds."""
    path = tmp_path / "s.sqlite"
    store = Store(path)
    await store.open()
    n = 300
    run = one_task_run(n)
    ledger = Ledger(store, EventHub(), Counter())
    store.put_run(run)
    store.put_task(run.id, run.tasks["a"])
    insts = list(run.tasks["a"].instances.values())
    for inst in insts:
        store.put_instance(inst)
    await flush_store(store)
    clock = [1000.0]
    world.install(world.World(now=lambda: clock[0]))
    try:
        for k, inst in enumerate(insts):
            ledger.instance(run, inst, State.READY, {"source": "dependencies"}, {"identity": bytes([k % 256]) * 32})
        await flush_store(store)
        clock[0] += 1
        submitted = {"source": "submitter", "tag": "t1"}
        for inst in insts:
            ledger.instance(run, inst, State.SUBMITTING, submitted, {"tag": "t1", "submitted_at": clock[0],
                                                                    "not_before": None})
        await flush_store(store)
        clock[0] += 1
        keys = ArrayKeys("55", 0)
        for inst in insts:
            ledger.instance(run, inst, State.QUEUED, {"source": "scheduler", "job_id": "55"},
                            {"job_id": "55", "job_key": keys})
        rows_before = store.transition_rows_written
        await flush_store(store)
        clock[0] += 1
        for k, inst in enumerate(insts):
            ledger.instance(run, inst, State.SUCCEEDED, {"source": "result_file", "state": "succeeded"},
                            {"output": k, "output_hash": "h", "host": "n1", "ended_at": clock[0]})
        await flush_store(store)
    finally:
        world.install(None)
    await store.close()
    assert store.transitions_written == 4 * n
    assert store.transition_rows_written <= 4 * 3, "a few rows per move (a batch may split a group)"
    assert store.transition_rows_written > rows_before
    again, log = await reloaded_run(path)
    assert instance_rows(again) == instance_rows(run)
    assert again.tasks["a"].instances[7].job_key == "55_7"
    assert len(log) == 4 * n
    assert [(t["index"], t["to_state"]) for t in log] == [(i, s) for s in ("ready", "submitting", "queued", "succeeded")
                                                          for i in range(n)]
    assert log[n]["evidence"] == submitted and log[n]["evidence"] is not log[n + 1]["evidence"]


@pytest.mark.anyio
async def test_a_range_update_that_finds_rows_missing_writes_the_group_whole(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = Store(path)
    await store.open()
    run = one_task_run(6)
    ledger = Ledger(store, EventHub(), Counter())
    insts = list(run.tasks["a"].instances.values())
    store.put_run(run)
    store.put_task(run.id, run.tasks["a"])
    for inst in insts[:2]:  # elements 2.. are never put whole: the range UPDATE misses them
        store.put_instance(inst)
    await flush_store(store)
    world.install(world.World(now=lambda: 50.0))
    try:
        for inst in insts:
            ledger.instance(run, inst, State.CANCELLED, {"source": "client"}, {})
    finally:
        world.install(None)
    await flush_store(store)
    await store.close()
    assert _count(path, "SELECT count(*) FROM instances") == 6
    again, log = await reloaded_run(path)
    assert instance_rows(again) == instance_rows(run)
    assert [t["index"] for t in log] == list(range(6))


@pytest.mark.anyio
async def test_a_refused_group_is_escaped_or_dropped_without_blocking_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = Store(path)
    await store.open()
    run = one_task_run(6)
    ledger = Ledger(store, EventHub(), Counter())
    insts = list(run.tasks["a"].instances.values())
    store.put_run(run)
    store.put_task(run.id, run.tasks["a"])
    for inst in insts:
        store.put_instance(inst)
    await flush_store(store)
    world.install(world.World(now=lambda: 60.0))
    try:
        bad = {"source": "submitter", "tag": "t\udcff"}  # lone surrogate: escaped when written row by row
        for inst in insts[:3]:
            ledger.instance(run, inst, State.READY, bad, {"reason": "r\udcff"})
        for inst in insts[3:]:
            ledger.instance(run, inst, State.READY, {"source": "ok"}, {"not_before": float(2**70)})
        store.put_cache("huge", [1], "h", "w", "a", run.id, 10**30)  # refused even escaped: dropped alone
    finally:
        world.install(None)
    await flush_store(store)
    assert store.writable
    assert store.rows_dropped == 1 and store.rows_escaped >= 2
    await store.close()
    again, log = await reloaded_run(path)
    assert [i.reason for i in again.tasks["a"].instances.values()] == ["r\\udcff"] * 3 + [None] * 3
    assert [i.state for i in again.tasks["a"].instances.values()] == [State.READY] * 6
    assert [t["evidence"]["source"] for t in log] == ["submitter"] * 3 + ["ok"] * 3


# ---------------------------------------------------------------------- upgrade and the ledger's stamp


def test_a_schema_5_database_is_upgraded_and_its_log_kept(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"

    async def open_close(put: bool) -> None:
        store = Store(path)
        await store.open()
        if put:
            for i in range(3):
                store.add_transition("r1", "a", i, "ready", "submitting", {"s": 1}, 3.0)
            await flush_store(store)
        await store.close()

    anyio.run(open_close, False)
    with sqlite3.connect(path) as db:  # the log as schema 5 kept it: no idx_last
        db.executescript(
            "DROP TABLE transitions; CREATE TABLE transitions (seq INTEGER PRIMARY KEY, run_id TEXT NOT NULL,"
            " task TEXT, idx INTEGER, from_state TEXT, to_state TEXT NOT NULL, evidence TEXT, at REAL NOT NULL);"
            "CREATE INDEX transitions_run ON transitions(run_id, seq);"
            "INSERT INTO transitions VALUES (4, 'r1', 'a', 2, 'pending', 'ready', NULL, 1.0);"
            "INSERT INTO transitions VALUES (5, 'r1', NULL, NULL, NULL, 'running', '{\"source\":\"client\"}', 0.5);"
            "UPDATE meta SET value='5' WHERE key='schema_version';")
    anyio.run(open_close, True)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION) == "7"
        rows = db.execute("SELECT seq, idx, idx_last FROM transitions ORDER BY seq").fetchall()
    assert rows == [(4, 2, None), (5, None, None), (6, 0, 2)]

    async def read() -> list[dict[str, Any]]:
        _, log = await _reloaded_log(path)
        return log

    log = anyio.run(read)
    assert [(t["seq"], t["index"], t["to_state"]) for t in log] == [
        (4, 2, "ready"), (5, None, "running"), (6, 0, "submitting"), (6, 1, "submitting"), (6, 2, "submitting")]


async def _reloaded_log(path: Path) -> tuple[None, list[dict[str, Any]]]:
    store = Store(path)
    await store.open()
    try:
        return None, await store.transitions("r1")
    finally:
        await store.close()


def test_the_ledgers_stamp_is_shared_within_a_millisecond_and_moves_on_after_it() -> None:
    """``world.now``: a burst of transitions within a millisecond gets one float (the same object, in memory
    and in the store: the group's one ``at``); a later one a new stamp, never an earlier one."""
    ticks = iter([100.0, 100.0002, 100.0009, 100.0011, 100.0015, 100.5])
    world.install(world.World(now=lambda: next(ticks)))
    try:
        stamps = [world.now() for _ in range(6)]
    finally:
        world.install(None)
    assert stamps[0] is stamps[1] is stamps[2]
    assert stamps[3] == 100.0011 and stamps[4] is stamps[3]
    assert stamps[5] == 100.5
    assert stamps == sorted(stamps)


def test_a_snapshot_keeps_the_job_key_maker_and_the_writer_makes_the_key() -> None:
    """The job key is made when the row is encoded (the writer's thread), not when the snapshot is taken on
    the event loop; the snapshot still says what the instance held when it was taken."""
    made: list[int | None] = []

    def keys(index: int | None) -> str:
        made.append(index)
        return f"9_{index}"

    inst = Instance(run_id="r", task="a", index=4)
    inst.job_key = keys
    snapshot = INSTANCES.snapshot(inst)
    assert made == []
    inst.job_key = "other"
    assert INSTANCES.encode(snapshot)[INSTANCES.names.index("job_key")] == "9_4"
    assert made == [4]
    _, encode = INSTANCES.update(INSTANCES.mask(("state", "job_key")))
    assert "9_4" in encode(snapshot) and INSTANCES.row(inst)[INSTANCES.names.index("job_key")] == "other"


_WIDTH = len(INSTANCES.names)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=2), st.text(max_size=2), st.integers(0, 3)).flatmap(  # (keys: never NULL)
    lambda key: st.lists(st.one_of(st.none(), st.integers(0, 3), st.text(max_size=2)), min_size=_WIDTH - 3,
                         max_size=_WIDTH - 3).map(lambda rest: (*key, *rest))), max_size=30))
def test_whole_rows_are_written_by_the_columns_they_set_and_say_the_same(rows: list[tuple[Any, ...]]) -> None:
    """``Table.inserts``: each row once, in a statement naming exactly its columns that are not None (the
    others are NULL through their default), whether its pattern is the previous row's or a new one."""
    written = []
    for sql, values in INSTANCES.inserts(rows):
        named = sql.split("(", 1)[1].split(")", 1)[0].split(", ")
        for taken in values:
            assert len(taken) == len(named) and None not in taken
            given_ = dict(zip(named, taken))
            written.append(tuple(given_.get(name) for name in INSTANCES.names))
    assert sorted(written, key=repr) == sorted(rows, key=repr)
