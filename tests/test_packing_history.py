"""The packer's duration history: the stores are read once per task and ``HISTORY_TTL``, and each success the
driver sees is added in memory -- a fan-out whose elements succeed while its batches are planned must not
scan the run's instances at every batch (at 10^6 elements that was 140 ms of SQLite a read, several a second).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from reflowd import world
from reflowd.driver import packing
from reflowd.engine.durations import MIN_SAMPLES

pytestmark = pytest.mark.anyio


class Durations:
    """A store (and optionally a shared cache) that counts its reads."""

    def __init__(self, stored: list[float], cached: list[float] | None = None) -> None:
        self.stored, self.reads = stored, 0
        self.cache = None if cached is None else SimpleNamespace(durations=self._cached(cached))

    async def task_durations(self, workflow: str, task: str, version: str) -> list[float]:
        self.reads += 1
        return list(self.stored)

    def _cached(self, cached: list[float]) -> Any:
        async def durations(workflow: str, task: str, version: str) -> list[float]:
            self.reads += 1
            return list(cached)
        return durations


def setup(store: Durations) -> tuple[packing.Packer, Any]:
    driver = SimpleNamespace(store=store, cluster=SimpleNamespace(config=SimpleNamespace(pack=None)))
    manifest = SimpleNamespace(name="work", version="1", config={}, is_array=True)
    tr = SimpleNamespace(name="work", manifest=manifest)
    run = SimpleNamespace(workflow="wf", tasks={"work": tr}, created_at=world.now() - 1)
    return packing.Packer(driver), run  # type: ignore[arg-type]


def success(seconds: float) -> Any:
    return SimpleNamespace(task="work", started_at=100.0, ended_at=100.0 + seconds)


@pytest.fixture
def clock() -> Any:
    now = [1000.0]
    world.install(world.World(monotonic=lambda: now[0], now=lambda: now[0] + 1.7e9))
    yield now
    world.install(None)


async def test_successes_make_history_without_reading_the_store_again(clock: list[float]) -> None:
    store = Durations([])
    packer, run = setup(store)
    tr = run.tasks["work"]
    assert await packer.estimate(run, tr) is None
    for n in range(MIN_SAMPLES):
        assert packer.known("wf", "work", "1") is None, n
        packer.learned(run, success(2.0))
        found = await packer.estimate(run, tr)
        assert (found is None) == (n + 1 < MIN_SAMPLES), (n, found)
    assert found is not None and found.samples == MIN_SAMPLES and found.mean == pytest.approx(2.0)
    assert packer.known("wf", "work", "1") == found
    assert store.reads == 1, "each success read the run's durations again"

    packer.learned(run, success(8.0))  # the estimate follows what succeeds
    assert (await packer.estimate(run, tr)).mean == pytest.approx(3.5)  # type: ignore[union-attr]
    assert store.reads == 1


async def test_the_stores_are_read_again_after_the_ttl(clock: list[float]) -> None:
    store = Durations([5.0] * MIN_SAMPLES)
    packer, run = setup(store)
    tr = run.tasks["work"]
    assert (await packer.estimate(run, tr)).mean == pytest.approx(5.0)  # type: ignore[union-attr]
    clock[0] += packing.HISTORY_TTL - 1
    await packer.estimate(run, tr)
    assert store.reads == 1
    store.stored = [1.0] * MIN_SAMPLES  # (another writer, or the successes committed meanwhile)
    clock[0] += 1
    assert (await packer.estimate(run, tr)).mean == pytest.approx(1.0)  # type: ignore[union-attr]
    assert store.reads == 2


async def test_too_little_history_here_takes_the_users_own_and_keeps_the_newest(clock: list[float]) -> None:
    store = Durations([9.0], cached=[3.0] * MIN_SAMPLES)
    packer, run = setup(store)
    assert (await packer.estimate(run, run.tasks["work"])).mean == pytest.approx(3.0)  # type: ignore[union-attr]
    assert store.reads == 2  # the run directory's store, then the shared cache
    for _ in range(packing.KEPT):
        packer.learned(run, success(1.0))
    found = await packer.estimate(run, run.tasks["work"])
    assert found is not None and found.samples == packing.KEPT and found.mean == pytest.approx(1.0)


async def test_a_success_of_a_task_never_estimated_or_without_times_is_not_history(clock: list[float]) -> None:
    store = Durations([])
    packer, run = setup(store)
    packer.learned(run, success(1.0))  # (never asked: the next estimate reads the stores, which hold it)
    assert packer.known("wf", "work", "1") is None
    await packer.estimate(run, run.tasks["work"])
    for _ in range(MIN_SAMPLES):
        packer.learned(run, SimpleNamespace(task="work", started_at=None, ended_at=5.0))
        packer.learned(run, SimpleNamespace(task="other", started_at=1.0, ended_at=5.0))
    assert await packer.estimate(run, run.tasks["work"]) is None


async def test_batches_planned_together_wait_for_one_read(clock: list[float]) -> None:
    store = Durations([4.0] * MIN_SAMPLES)
    release = anyio.Event()
    plain = store.task_durations

    async def slow(*key: str) -> list[float]:
        await release.wait()
        return await plain(*key)

    store.task_durations = slow  # type: ignore[method-assign]
    packer, run = setup(store)
    found: list[Any] = []

    async def plan() -> None:
        found.append(await packer.estimate(run, run.tasks["work"]))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(plan)
        await anyio.wait_all_tasks_blocked()
        release.set()
    assert store.reads == 1 and len(found) == 5
    assert all(f is not None and f.mean == pytest.approx(4.0) for f in found)


async def test_a_newer_run_reads_again_where_too_little_was_found(clock: list[float]) -> None:
    store = Durations([1.0])
    packer, run = setup(store)
    assert await packer.estimate(run, run.tasks["work"]) is None
    clock[0] += 1
    assert await packer.estimate(run, run.tasks["work"]) is None and store.reads == 1  # the same run: no read
    store.stored = [6.0] * MIN_SAMPLES  # (measured meanwhile by another process: an embedded run, say)
    newer = SimpleNamespace(workflow="wf", tasks=run.tasks, created_at=world.now())
    clock[0] += 1
    assert (await packer.estimate(newer, run.tasks["work"])).mean == pytest.approx(6.0)  # type: ignore[union-attr]
    assert store.reads == 2
    clock[0] += 1
    another = SimpleNamespace(workflow="wf", tasks=run.tasks, created_at=world.now())
    await packer.estimate(another, run.tasks["work"])
    assert store.reads == 2, "history was found: a newer run reads again only after HISTORY_TTL"
