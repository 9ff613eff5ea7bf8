"""Owed kills survive a crash: a cancelled job is killed even when the daemon dies before the kill went out.

A cancel makes the instances CANCELLED and owes the scheduler a kill of their jobs. Both are committed
together (the store's ``kills`` table, ``Driver.owe_kill``) before the client hears "cancelled"; the kill
row goes once the scheduler took the cancel. A daemon that dies in between -- or while the scheduler does
not answer -- sends the kill when it starts again (``Driver.load_owed_kills``), although the run, cancelled,
is not even reloaded.

The real engine, store and driver on the simulated cluster (tests/sim), in daemon lives on one store; a
life ends like ``kill -9`` (the loop stops dead, the store's connections die with it).
"""

from __future__ import annotations

import functools
import random
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest

from reflowd import world
from reflowd.engine.engine import Engine
from reflowd.engine.model import OwedKill
from reflowd.engine.states import RunState, State
from reflowd.store import SCHEMA_VERSION, Store
from reflowd.transports.base import TransportError

from .sim.cluster import Faults, SimCluster, SimElement
from .sim.harness import START, engine_life, manifest, scratch_dir, simulate, wait_until
from .sim.loop import Crash, VirtualLoop, abandon, deterministic_anyio
from .sim.quiet import quiet_logs
from .sim.sqlite_inline import Connector
from .support import flush_store


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with quiet_logs():
        yield


@pytest.fixture
def long_squares(monkeypatch: pytest.MonkeyPatch) -> None:
    """``square`` elements run for a day once started: only a kill ends them."""
    start = SimCluster._start

    def slow(self: SimCluster, job: Any, element: SimElement, now: float) -> None:
        start(self, job, element, now)
        if job.request.task == "square" and element.ends_at is not None:
            element.ends_at = now + 86_400.0

    monkeypatch.setattr(SimCluster, "_start", slow)


class Lives:
    """Daemon lives on one store and one simulated cluster; time goes on between them."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.cluster = SimCluster(random.Random(11), Faults())
        self.clock = START
        self.ids = random.Random(5)

    def live(self, body: Any) -> tuple[Any, bool]:
        """``await body(loop, engine, cluster)`` in one life; (its result, whether the life crashed)."""
        loop = VirtualLoop(start=self.clock)
        connector = Connector()
        world.install(world.World(now=lambda: loop.virtual, monotonic=lambda: loop.virtual,
                                  token_hex=lambda n: f"{self.ids.getrandbits(8 * n):0{2 * n}x}"))
        try:
            with deterministic_anyio():
                result = loop.run_until_complete(engine_life(self.db, self.cluster, loop,
                                                             functools.partial(body, loop), connector=connector))
            return result, False
        except Crash:
            connector.crash()  # kill -9: nothing more reaches the database
            return None, True
        finally:
            self.clock = loop.virtual + 30.0  # down for half a minute: the jobs run on meanwhile
            world.install(None)
            abandon(loop)


async def crash(loop: VirtualLoop) -> None:
    """Die like ``kill -9`` here: the loop stops before its next step."""
    loop.crash_at = loop.steps + 1
    await anyio.sleep(0)
    raise AssertionError("the life went on after its crash")


def square_elements(cluster: SimCluster) -> list[SimElement]:
    return [e for j in cluster.jobs.values() if j.request.task == "square" for e in j.elements.values()]


def cancels_of(cluster: SimCluster, key: str) -> int:
    """How many cancel commands the scheduler took that named *key*."""
    return sum(1 for entry in cluster.trace if entry[1] == "cancel" and key in entry[2])


async def _running_squares(engine: Engine, n: int = 3) -> str:
    run = await engine.submit_run(manifest(0), {"n": n}, "/sim/run", "sim", {})
    await wait_until(lambda: run.tasks["square"].counts.get(State.RUNNING) == n, what="square running")
    return run.id


@pytest.mark.parametrize("when", ["unreachable, then crash", "crash as the kill goes out", "crash right after the flush"])
def test_a_kill_owed_at_a_crash_is_sent_after_the_restart_once(long_squares: None, when: str) -> None:
    with scratch_dir() as tmp:
        lives = Lives(Path(tmp) / "kills.sqlite")
        seen: dict[str, Any] = {}

        async def first(loop: VirtualLoop, engine: Engine, cluster: SimCluster) -> None:
            # Two array jobs (the cluster takes 8 elements a job), four elements running, six queued.
            run = await engine.submit_run(manifest(0), {"n": 10}, "/sim/run", "sim", {})
            run_id = run.id
            await wait_until(lambda: run.tasks["square"].counts.get(State.RUNNING) == 4
                             and run.tasks["square"].counts.get(State.QUEUED) == 6, what="square queued and running")
            seen["run_id"] = run_id
            # A whole task's cancel kills its jobs whole: one kill owed per job (Engine._cancel_jobs).
            seen["keys"] = sorted({i.job_id for i in run.tasks["square"].instances.values()})
            assert len(seen["keys"]) == 2
            scheduler = engine.drivers["sim"].cluster.scheduler
            attempts: list[list[str]] = []

            async def unreachable(keys: Any) -> None:
                attempts.append(sorted(keys))
                raise TransportError("simulated: the controller does not answer")

            async def dies(keys: Any) -> None:
                attempts.append(sorted(keys))
                await crash(loop)

            if when == "crash right after the flush":  # before the kill is even queued: only the store has it
                def cancel_jobs(keys: Any) -> None:
                    attempts.append(sorted(keys))
                    loop.crash_at = loop.steps + 1

                engine.drivers["sim"].cancel_jobs = cancel_jobs  # type: ignore[method-assign]
            scheduler.cancel = unreachable if when.startswith("unreachable") else dies  # type: ignore[method-assign]
            async with anyio.create_task_group() as tg:
                tg.start_soon(engine.cancel, run_id)
                await wait_until(lambda: attempts, what="a kill to be tried")
                # The cancel is committed with its kills before any kill is tried.
                owed = await engine.store.owed_kills("sim")
                assert sorted(k.job_key for k in owed) == seen["keys"]
                assert all(i.state is State.CANCELLED for i in run.tasks["square"].instances.values())
                await wait_until(lambda: len(attempts) >= 3 and run.state is RunState.CANCELLED,
                                 what="failed kills and the run cancelled")
                await engine.store.flush()
                # Failed kills stay owed (and are tried again).
                assert sorted(k.job_key for k in await engine.store.owed_kills("sim")) == seen["keys"]
                assert all(sorted(a) == seen["keys"] for a in attempts)
                await crash(loop)

        _, crashed = lives.live(first)
        assert crashed
        elements = square_elements(lives.cluster)
        assert len(elements) == 10 and not any(e.cancelled for e in elements), "nothing killed them yet"
        assert not any(cancels_of(lives.cluster, k) for k in seen["keys"])

        async def second(loop: VirtualLoop, engine: Engine, cluster: SimCluster) -> tuple[list[OwedKill], Any]:
            driver = engine.drivers["sim"]
            await wait_until(lambda: all(e.cancelled for e in square_elements(cluster)) and not driver.owed,
                             what="the owed kills sent")
            await engine.store.flush()
            return await engine.store.owed_kills("sim"), dict(driver.counters), seen["run_id"] in engine.runs

        (left, counters, reloaded), crashed = lives.live(second)
        assert not crashed
        assert left == [], "the kills taken are no longer owed"
        assert counters.get("owed_kills_loaded") == 2
        if when.startswith("unreachable"):
            assert not reloaded, "a cancelled run is not reloaded: the kill went out all the same"
        assert all(e.outcome is not None and e.outcome.value == "cancelled" for e in square_elements(lives.cluster))
        assert [cancels_of(lives.cluster, k) for k in seen["keys"]] == [1, 1], "each kill taken exactly once"

        async def third(loop: VirtualLoop, engine: Engine, cluster: SimCluster) -> int:
            await anyio.sleep(30.0)
            return dict(engine.drivers["sim"].counters).get("owed_kills_loaded", 0)

        loaded, _ = lives.live(third)
        assert loaded == 0
        assert [cancels_of(lives.cluster, k) for k in seen["keys"]] == [1, 1], "nothing sent again"


@pytest.mark.parametrize("whole_run", [True, False], ids=["run cancelled", "task's elements cancelled"])
def test_a_job_whose_instances_were_cancelled_during_its_sbatch_is_found_and_killed_after_a_crash(
        long_squares: None, whole_run: bool) -> None:
    """The sbatch went through, but the daemon dies before it hears the job id -- after a cancel ended every
    instance the job was for. No instance is in flight to make the next daemon look the tag up (a cancelled
    run is not even reloaded): the look-up was owed in the cancel's commit, and the next daemon finds the
    job by its tag, kills it once, and owes nothing after."""
    with scratch_dir() as tmp:
        lives = Lives(Path(tmp) / "kills.sqlite")
        seen: dict[str, Any] = {}

        async def first(loop: VirtualLoop, engine: Engine, cluster: SimCluster) -> None:
            scheduler = engine.drivers["sim"].cluster.scheduler
            submit = scheduler.submit
            hung = anyio.Event()

            async def answer_lost(request: Any) -> str:  # sbatch runs; its answer never comes back
                if request.task != "square":
                    return await submit(request)
                cluster.submit(request, loop.virtual)
                hung.set()
                await anyio.sleep_forever()
                raise AssertionError("unreachable")

            scheduler.submit = answer_lost  # type: ignore[method-assign]
            run = await engine.submit_run(manifest(0), {"n": 3}, "/sim/run", "sim", {})
            await hung.wait()
            square = run.tasks["square"]
            assert all(i.state is State.SUBMITTING for i in square.instances.values())
            seen["tag"] = next(iter(square.instances.values())).tag
            if whole_run:
                await engine.cancel(run.id)
            else:
                for index in list(square.instances):
                    await engine.cancel(run.id, "square", index)
            assert all(i.state is State.CANCELLED for i in square.instances.values())
            await engine.store.flush()
            assert [k.job_key for k in await engine.store.owed_kills("sim")] == [f"tag:{seen['tag']}"]
            await crash(loop)

        _, crashed = lives.live(first)
        assert crashed
        elements = square_elements(lives.cluster)
        assert len(elements) == 3 and not any(e.cancelled for e in elements), "the job runs on, unobserved"

        async def second(loop: VirtualLoop, engine: Engine, cluster: SimCluster) -> Any:
            driver = engine.drivers["sim"]
            await wait_until(lambda: all(e.cancelled for e in square_elements(cluster)) and not driver.owed,
                             what="the job found by its tag and killed")
            await engine.store.flush()
            return await engine.store.owed_kills("sim"), dict(driver.counters)

        (left, counters), crashed = lives.live(second)
        assert not crashed and left == []
        assert counters.get("owed_kills_loaded") == 1
        job_id = lives.cluster.by_tag[seen["tag"]][0]
        assert cancels_of(lives.cluster, job_id) == 1
        assert sum(1 for e in lives.cluster.trace if e[1] == "find" and seen["tag"] in e[2]) == 1

        async def third(loop: VirtualLoop, engine: Engine, cluster: SimCluster) -> int:
            await anyio.sleep(30.0)
            return dict(engine.drivers["sim"].counters).get("owed_kills_loaded", 0)

        loaded, _ = lives.live(third)
        assert loaded == 0 and cancels_of(lives.cluster, job_id) == 1, "nothing owed or sent again"


def test_a_cancel_during_an_sbatch_that_then_answers_kills_the_job_by_id_and_owes_no_look_up(long_squares: None) -> None:
    async def body(engine: Engine, cluster: SimCluster) -> Any:
        scheduler = engine.drivers["sim"].cluster.scheduler
        submit = scheduler.submit
        started, answer = anyio.Event(), anyio.Event()

        async def slow(request: Any) -> str:
            if request.task == "square":
                started.set()
                await answer.wait()
            return await submit(request)

        scheduler.submit = slow  # type: ignore[method-assign]
        run = await engine.submit_run(manifest(0), {"n": 2}, "/sim/run", "sim", {})
        await started.wait()
        await engine.cancel(run.id)
        await engine.store.flush()
        owed_meanwhile = [k.job_key for k in await engine.store.owed_kills("sim")]
        answer.set()
        driver = engine.drivers["sim"]
        await wait_until(lambda: square_elements(cluster) and all(e.cancelled for e in square_elements(cluster))
                         and not driver.owed, what="the job killed by its id")
        await engine.store.flush()
        return owed_meanwhile, await engine.store.owed_kills("sim"), cluster

    owed_meanwhile, left, cluster = simulate(body)
    assert len(owed_meanwhile) == 1 and owed_meanwhile[0].startswith("tag:")
    assert left == []
    assert not any(e[1] == "find" for e in cluster.trace), "no look-up: the sbatch's answer named the job"
    assert [cancels_of(cluster, e.key) for e in square_elements(cluster)] == [1, 1], "each element killed once"


def test_a_cancel_without_a_crash_kills_once_and_owes_nothing_after(long_squares: None) -> None:
    async def body(engine: Engine, cluster: SimCluster) -> tuple[list[str], list[OwedKill]]:
        run_id = await _running_squares(engine, n=2)
        keys = sorted({i.job_id for i in engine.runs[run_id].tasks["square"].instances.values()})  # (one job)
        assert await engine.cancel(run_id) >= 2
        await wait_until(lambda: not engine.drivers["sim"].owed, what="the kills taken")
        await engine.store.flush()
        return keys, await engine.store.owed_kills("sim")

    cluster_box: dict[str, SimCluster] = {}

    async def watched(engine: Engine, cluster: SimCluster) -> Any:
        cluster_box["c"] = cluster
        return await body(engine, cluster)

    keys, left = simulate(watched)
    assert left == []
    assert [cancels_of(cluster_box["c"], k) for k in keys] == [1]
    assert all(e.cancelled for e in square_elements(cluster_box["c"]))


def test_a_cancel_kills_each_job_whole_unless_it_is_bigger_than_one_step(long_squares: None,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole run's cancel owes and sends one kill per job (``Engine._cancel_jobs``); a job with more elements
    in flight than one loop step should cancel (here 4) goes element by element, as before."""
    from reflowd.engine import engine as engine_module

    monkeypatch.setattr(engine_module, "WHOLE_JOB_MAX", 4)

    async def body(engine: Engine, cluster: SimCluster) -> Any:
        run = await engine.submit_run(manifest(0), {"n": 10}, "/sim/run", "sim", {})
        await wait_until(lambda: run.tasks["square"].counts.get(State.RUNNING) == 4
                         and run.tasks["square"].counts.get(State.QUEUED) == 6, what="square queued and running")
        assert await engine.cancel(run.id) >= 10
        await wait_until(lambda: all(e.cancelled for e in square_elements(cluster)) and not engine.drivers["sim"].owed,
                         what="the kills taken")
        return cluster

    cluster = simulate(body)
    jobs = {j.job_id: j for j in cluster.jobs.values() if j.request.task == "square"}
    (big,) = [j for j in jobs.values() if len(j.elements) == 8]
    (small,) = [j for j in jobs.values() if len(j.elements) == 2]
    assert cancels_of(cluster, small.job_id) == 1, "the small job killed whole, once"
    assert not any(cancels_of(cluster, e.key) for e in small.elements.values())
    assert cancels_of(cluster, big.job_id) == 0
    assert [cancels_of(cluster, e.key) for e in big.elements.values()] == [1] * 8, "the big one element by element"


def test_cancelling_one_element_owes_its_kill_in_the_same_commit(long_squares: None) -> None:
    """``cancel --index``: the element's CANCELLED state and its owed kill are committed together, before the
    kill is tried (here the scheduler never answers: the kill stays owed)."""
    async def body(engine: Engine, cluster: SimCluster) -> Any:
        run_id = await _running_squares(engine, n=2)
        run = engine.runs[run_id]
        inst = run.tasks["square"].instances[1]
        key = inst.job_key
        tried: list[list[str]] = []

        async def unreachable(keys: Any) -> None:
            tried.append(sorted(keys))
            raise TransportError("simulated: the controller does not answer")

        engine.drivers["sim"].cluster.scheduler.cancel = unreachable  # type: ignore[method-assign]
        assert await engine.cancel(run_id, "square", 1) == 1
        reloaded = await engine.store.load_run(run_id)
        assert reloaded is not None and reloaded.tasks["square"].instances[1].state is State.CANCELLED
        owed = await engine.store.owed_kills("sim")
        await wait_until(lambda: tried, what="the kill tried")
        return key, [k.job_key for k in owed], tried[0], inst.state

    key, owed, tried, state = simulate(body)
    assert owed == [key] and tried == [key] and state is State.CANCELLED


# ---------------------------------------------------------------------- the store's table


@pytest.mark.anyio
async def test_owed_kills_are_stored_taken_and_restored_after_a_failed_commit(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    await store.open()
    try:
        store.put_kill(OwedKill("a", "12_3", 5.0))
        store.put_kill(OwedKill("a", "13", 4.0))
        store.put_kill(OwedKill("b", "13", 6.0))
        await flush_store(store)
        assert [k.job_key for k in await store.owed_kills("a")] == ["13", "12_3"]  # oldest first
        store.drop_kill("a", "13")
        store.put_kill(OwedKill("a", "14", 7.0))
        store.drop_kill("a", "14")  # owed and taken before a commit: never written
        batch = store._take_batch()  # a commit that fails puts its changes back (the disk was full, say)
        store._restore_batch(batch)
        await flush_store(store)
        assert await store.owed_kills("a") == [OwedKill("a", "12_3", 5.0)]
        assert await store.owed_kills("b") == [OwedKill("b", "13", 6.0)]
    finally:
        await store.close()


def test_a_schema_6_database_gets_the_kills_table_and_keeps_its_runs(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"

    async def open_close(put: bool) -> list[OwedKill]:
        store = Store(path)
        await store.open()
        try:
            if put:
                store.put_kill(OwedKill("local", "rf1_0", 1.0))
                await flush_store(store)
            return await store.owed_kills("local")
        finally:
            await store.close()

    anyio.run(open_close, False)
    with sqlite3.connect(path) as db:  # as reflowd with schema 6 left it: no kills table
        db.executescript("DROP TABLE kills; INSERT INTO meta VALUES ('kept', 'yes');"
                         "UPDATE meta SET value='6' WHERE key='schema_version';")
    assert anyio.run(open_close, True) == [OwedKill("local", "rf1_0", 1.0)]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
        assert SCHEMA_VERSION == 7
        assert db.execute("SELECT value FROM meta WHERE key='kept'").fetchone() == ("yes",)


def _cancel_crashing_after(k: int) -> str:
    """A cancel during which the daemon dies *k* loop steps in, then a life that must finish it; what happened."""
    with scratch_dir() as tmp:
        lives = Lives(Path(tmp) / "kills.sqlite")
        seen: dict[str, Any] = {}

        async def first(loop: VirtualLoop, engine: Engine, cluster: SimCluster) -> None:
            run_id = await _running_squares(engine, n=2)
            seen["run_id"] = run_id
            seen["keys"] = sorted({i.job_id for i in engine.runs[run_id].tasks["square"].instances.values()})
            loop.crash_at = loop.steps + k
            await engine.cancel(run_id)
            seen["answered"] = True
            await anyio.sleep(3600.0)  # the crash comes first

        _, crashed = lives.live(first)
        assert crashed
        killed_before = sum(e.cancelled for e in square_elements(lives.cluster))

        async def second(loop: VirtualLoop, engine: Engine, cluster: SimCluster) -> tuple[bool, list[OwedKill]]:
            stored = await engine.store.load_run(seen["run_id"])
            assert stored is not None
            cancelled = all(i.state is State.CANCELLED for i in stored.tasks["square"].instances.values())
            if cancelled:
                await wait_until(lambda: all(e.cancelled for e in square_elements(cluster))
                                 and not engine.drivers["sim"].owed, what=f"the kills sent (crash at step {k})")
                await engine.store.flush()
            else:
                assert not seen.get("answered"), "a cancel the client heard of is in the store"
                await anyio.sleep(30.0)
            return cancelled, await engine.store.owed_kills("sim")

        (cancelled, left), crashed = lives.live(second)
        assert not crashed and left == []
        elements = square_elements(lives.cluster)
        if not cancelled:
            assert not any(e.cancelled for e in elements)
            return "not committed"
        assert all(e.cancelled for e in elements)
        sent = [cancels_of(lives.cluster, key) for key in seen["keys"]]
        assert all(n in (1, 2) for n in sent), sent
        once = all(n == 1 for n in sent)
        return "killed before the crash" if killed_before and once else \
            "killed after the restart" if once else "sent in both lives"


def test_a_crash_at_any_step_of_a_cancel_leaves_no_cancelled_job_running(long_squares: None) -> None:
    """The daemon dies k loop steps into a cancel, for every k until the kills went out: whenever the store
    says the instances were cancelled, the next life kills their jobs (each cancel command once per life at
    most: a kill sent just before the crash, its row not yet dropped, goes again) and owes nothing after; a
    cancel that was not committed killed nothing (the client was never told)."""
    outcomes = {k: _cancel_crashing_after(k) for k in range(1, 40)}
    assert {"not committed", "killed after the restart", "killed before the crash"} <= set(outcomes.values()), outcomes
