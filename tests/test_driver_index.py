"""The driver's indices over its tracks, and the engine's heap policy (issue #13: work follows change).

The observer no longer walks every track each cycle: ``Driver.awake`` holds the tracks whose files
it looks at and ``Driver.by_job`` finds a job's track. Whatever happens, they must say what a walk
over every track says (the simulation checks the same after each of its steps:
``tests/sim/harness.driver_index_problems``).
"""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from reflow_client.config import ClusterConfig
from reflowd.budget import Budget
from reflowd.driver.driver import Driver
from reflowd.driver.policy import FileClock
from reflowd.driver.track import JobTrack
from reflowd.engine.heap import Heap
from tests.sim.harness import driver_index_problems


def driver() -> Driver:
    config = ClusterConfig(name="c", scheduler="instant")
    cluster = SimpleNamespace(name="c", config=config, scheduler=SimpleNamespace(), budget=Budget(60.0),
                              result_interval=0.5)
    return Driver(cluster, store=None, host=None)  # type: ignore[arg-type]  # (the indices touch neither)


def track(tag: str, job_id: str | None) -> JobTrack:
    record = SimpleNamespace(tag=tag, job_id=job_id, request=SimpleNamespace(slices=None))
    return JobTrack(record, run=None, live={}, files=FileClock(0.5, 60.0))  # type: ignore[arg-type]


def made_track(d: Driver, tag: str, job_id: str | None, size: int, packed: bool) -> JobTrack:
    """A track as the driver makes it (its file clock tells the driver when it moves), with *size* live
    elements; packed: two per array task."""
    slices = [list(range(k, min(k + 2, size))) for k in range(0, size, 2)] if packed else None
    record = SimpleNamespace(tag=tag, job_id=job_id, request=SimpleNamespace(slices=slices))
    return d.new_track(record, None, {i: SimpleNamespace(index=i) for i in range(size)})  # type: ignore[arg-type]


operation = st.tuples(st.sampled_from(["follow", "quiet", "unquiet", "unfollow"]), st.integers(0, 5),
                      st.booleans(), st.sampled_from([None, "same", "other"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(operation, max_size=40))
def test_the_indices_say_what_a_walk_over_every_track_says(ops: list[tuple[str, int, bool, Any]]) -> None:
    d = driver()
    made: dict[str, JobTrack] = {}
    for kind, k, active, answer in ops:
        tag = f"t{k}"
        if kind == "follow":
            made[tag] = track(tag, f"{100 + k}" if k % 3 else None)
            d.follow(made[tag])
        elif kind == "unfollow":
            d.unfollow(tag)
        elif tag in made:
            if kind == "quiet":
                d.quiet(made[tag], None if answer is None else ("answer", answer), 0, active)
            else:
                d.unquiet(made[tag])
        assert driver_index_problems(d) == [], (kind, tag)
    # What the file clock looks at: exactly the tracks not waiting in a queue.
    assert set(d.awake) == {tag for tag, t in d.tracks.items() if not t.waiting}


change = st.tuples(st.sampled_from(["follow", "unresolved", "resolved", "unfollow", "leave", "quiet", "unquiet",
                                    "hurry", "check", "expect", "due"]),
                   st.integers(0, 4), st.integers(0, 5), st.booleans(), st.floats(0.0, 100.0))


@settings(max_examples=300, deadline=None)
@given(st.lists(change, max_size=60))
# (found in a suite run: a quiet track whose tag another, followed track holds took that one out of the index)
@example([("follow", 0, 0, False, 0.0), ("unresolved", 0, 0, True, 0.0), ("quiet", 0, 0, False, 0.0)])
def test_the_kept_queue_count_and_due_file_clocks_say_what_a_walk_says(
        ops: list[tuple[str, int, int, bool, float]]) -> None:
    """``Driver.queued_count`` (what a queue limit counts) and ``Driver.file_due`` (which file clocks are due)
    replace walks over every track in each submit round and observer cycle: after any sequence of what
    happens to tracks, they must say what the walks say."""
    d = driver()
    made: dict[str, JobTrack] = {}
    now = 0.0
    for kind, k, n, flag, when in ops:
        tag = f"t{k}"
        t = made.get(tag)
        if kind in ("follow", "unresolved") and (t is None or flag):
            t = made[tag] = made_track(d, tag, f"{100 + k}" if kind == "follow" else None, n, packed=flag)
        if t is None:
            continue
        if kind == "follow":
            d.follow(t)
        elif kind == "unresolved":
            d.add_unresolved(t)
        elif kind == "resolved":
            d.drop_unresolved(tag)
        elif kind == "unfollow":
            d.unfollow(tag)
        elif kind == "leave" and t.live:
            d.left_track(t, sorted(t.live)[n % len(t.live)])  # type: ignore[type-var]
        elif kind == "quiet":
            d.quiet(t, ("answer", n), len(t.live), flag)
        elif kind == "unquiet":
            d.unquiet(t)
        elif kind == "hurry":
            t.files.hurry()
        elif kind == "check":
            now += when
            t.files.after_check(now, flag)
        elif kind == "expect":
            t.files.expect(now + when)
        elif kind == "due":
            now += when
            expected = {tag for tag, x in d.awake.items() if x.files.due(now)}
            earliest = min((x.files.next_at for x in d.awake.values()), default=float("inf"))
            assert d.next_file_check() == earliest
            due = d.files_due(now)
            assert sorted(x.tag for x in due) == sorted(expected)
            for x in due:  # (as the observer's file check does: each clock moves on, unless the check is cut short)
                if not flag:
                    x.files.after_check(now, False)
            d.files_checked(due)
            assert not d.in_check
        assert driver_index_problems(d) == [], (kind, tag)
        assert d.queued_elements() == d.queued_count
    assert len(d.file_due) <= 2 * len(d.awake) + 64 + 1, "stale entries are dropped"


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_garbage_frozen_with_the_heap_is_collected_by_a_tidy() -> None:
    heap = Heap()
    gc.collect()
    garbage = Cycle()
    dead = weakref.ref(garbage)
    del garbage  # (a cycle: only a collection frees it)
    try:
        heap.freeze()
        assert heap.owed and heap.freezes == 1
        gc.collect()
        assert dead() is not None  # frozen: Python's own collections skip it
        assert heap.tidy(small=10**9) and dead() is None
    finally:
        gc.unfreeze()


def test_what_dies_frozen_is_collected_once_the_heap_is_small() -> None:
    heap = Heap()
    alive = Cycle()
    dead = weakref.ref(alive)
    try:
        heap.freeze()
        del alive  # garbage now, but frozen: no collection of Python's own finds it
        gc.collect()
        assert dead() is not None
        assert not heap.tidy(small=0)  # a large frozen heap is not walked (that would be the stall freezing avoids)
        assert dead() is not None and heap.owed
        assert heap.tidy(small=10**9)
        assert dead() is None
        assert not heap.owed and heap.last_found >= 1 and gc.get_freeze_count() == 0
        assert not heap.tidy(small=10**9)  # nothing froze since: nothing owed
        assert heap.to_dict()["tidies"] == 1
    finally:
        gc.unfreeze()


def test_elements_starting_together_share_one_time_limit_deadline(monkeypatch: Any) -> None:
    """10^4 elements of one job starting within a few seconds: a couple of deadline entries, not 10^4;
    the poll after the limit still comes (at most ``DEADLINE_STEP`` late), for that job only while tracked."""
    from reflowd import world
    from reflowd.driver import driver as driver_module

    d = driver()
    t = made_track(d, "t1", "1", 0, packed=False)
    t.record.request.time = "00:10:00"
    d.follow(t)
    for i in range(10_000):
        d.add_deadline(t, SimpleNamespace(started_at=1000.0 + i * 0.0004))  # type: ignore[arg-type]
    assert 1 <= len(d.deadlines) <= 2 and d.deadline_entries == set(d.deadlines)
    last = 1000.0 + 600 + 5.0 + 4.0
    monkeypatch.setattr(world, "now", lambda: 1000.0 + 600)
    assert not d.deadline_due()
    monkeypatch.setattr(world, "now", lambda: last + driver_module.DEADLINE_STEP)
    assert d.deadline_due()
    assert not d.deadlines and not d.deadline_entries
    d.add_deadline(t, SimpleNamespace(started_at=2000.0))  # type: ignore[arg-type]
    d.unfollow("t1")
    monkeypatch.setattr(world, "now", lambda: 3000.0)
    assert not d.deadline_due()  # (its job is no longer tracked: nothing to poll for)
