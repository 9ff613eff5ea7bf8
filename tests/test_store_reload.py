"""What a restart reads back: records whose repeated values are shared, as in a run made in memory (a
reloaded run must not need more memory than the fresh one did), and the encoding the writer relies on.
"""

from __future__ import annotations

import gc
import json
import logging
import tracemalloc
from pathlib import Path

import anyio
import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from reflow_client.manifest import Manifest, TaskManifest
from reflowd.engine import ledger
from reflowd.engine.model import Instance, JobRecord, Run, TaskRun
from reflowd.engine.records import dump_json
from reflowd.engine.states import State
from reflowd.schedulers.base import SubmitRequest
from reflowd.store import ArrayKeys, Store, shared_job_key

N = 3000


class _Keys:
    """A fresh run's shared job keys (the driver's ``packing.ElementKeys``, as far as memory goes)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id

    def __call__(self, index: int | None) -> str:
        return f"{self.job_id}_{index}"


def _fresh_run() -> Run:
    """A run as the engine leaves it: 3 jobs of 1000 elements, each job's strings made once and shared."""
    task = TaskManifest(name="square", is_array=True, config={}, dependencies=[])
    manifest = Manifest(workflow="w", tasks=[task], cli_params=[], entrypoint="/x.py", python="python",
                        working_dir="/")
    run = Run(id="run-0123456789abcdef", manifest=manifest, params={}, run_dir="/tmp", cluster="local")
    tr = TaskRun(manifest=task, run_id=run.id, size=N)
    run.tasks[tr.name] = tr
    for job in range(N // 1000):
        tag, job_id, reason = f"reflow-{job:08d}-square", str(4000 + job), "Resources"
        submitted = 1000.0 + job  # (one ``world.now`` float per submission burst)
        keys = _Keys(job_id)
        for i in range(job * 1000, (job + 1) * 1000):
            tr.add(Instance(run_id=run.id, task=tr.name, index=i, state=State.QUEUED, tag=tag, job_id=job_id,
                            job_key=keys, reason=reason, identity=i.to_bytes(32, "big"), submitted_at=submitted,
                            updated_at=submitted))
    return run


async def _store_and_reload(path: Path, run: Run) -> Run:
    store = Store(path)
    await store.open()
    store.put_run(run)
    for tr in run.tasks.values():
        store.put_task(run.id, tr)
        for inst in tr.instances.values():
            store.put_instance(inst)
    async with anyio.create_task_group() as tg:
        tg.start_soon(store.run_writer)
        with anyio.fail_after(60):
            await store.flush()
        tg.cancel_scope.cancel()
    await store.close()
    store = Store(path)
    await store.open()
    try:
        again = await store.load_run(run.id)
    finally:
        await store.close()
    assert again is not None
    return again


def _instances(run: Run) -> list[Instance]:
    return list(run.tasks["square"].instances.values())


@pytest.mark.anyio
async def test_a_reloaded_run_shares_its_repeated_strings_and_job_keys(tmp_path: Path) -> None:
    run = _fresh_run()
    again = await _store_and_reload(tmp_path / "s.sqlite", run)
    old, new = _instances(run), _instances(again)
    assert [(i.index, i.state, i.tag, i.job_id, i.job_key, i.reason, i.identity) for i in new] == [
        (i.index, i.state, i.tag, i.job_id, i.job_key, i.reason, i.identity) for i in old]
    first = new[0]
    for inst in new:
        assert inst.run_id is again.id and inst.task is again.tasks["square"].name
        assert inst.reason is first.reason
    for job in range(N // 1000):
        members = new[job * 1000:(job + 1) * 1000]
        assert len({id(i.tag) for i in members}) == 1 and len({id(i.job_id) for i in members}) == 1
        assert len({id(i.job_keys) for i in members}) == 1 and isinstance(members[0].job_keys, ArrayKeys)


@pytest.mark.anyio
async def test_a_reloaded_run_takes_no_more_memory_than_the_fresh_one(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    await _store_and_reload(path, _fresh_run())  # (the database, written once)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        fresh = _fresh_run()
        gc.collect()
        fresh_bytes = tracemalloc.get_traced_memory()[0] - base
        del fresh
        gc.collect()
        store = Store(path)
        await store.open()
        try:
            gc.collect()
            base = tracemalloc.get_traced_memory()[0]
            again = await store.load_run("run-0123456789abcdef")
            gc.collect()
            reloaded_bytes = tracemalloc.get_traced_memory()[0] - base
        finally:
            await store.close()
    finally:
        tracemalloc.stop()
    assert again is not None and len(_instances(again)) == N
    # (the reloaded run also holds its parsed manifest and options; per instance it must not hold more)
    assert reloaded_bytes <= fresh_bytes * 1.05 + 20_000, (reloaded_bytes / N, fresh_bytes / N)


def test_stored_job_keys_become_shared_only_when_they_are_the_elements_own() -> None:
    memo: dict[object, object] = {}
    keys: dict[tuple[str, int], ArrayKeys] = {}
    a = shared_job_key("77_3", "77", 3, memo, keys)
    b = shared_job_key("77_4", "77", 4, memo, keys)
    assert a is b and isinstance(a, ArrayKeys) and a(3) == "77_3" and a(None) == "77"
    offset = shared_job_key("77_0", "77", 10, memo, keys)  # (an array numbered from an offset)
    assert isinstance(offset, ArrayKeys) and offset(10) == "77_0" and offset is not a
    assert shared_job_key("77_03", "77", 3, memo, keys) == "77_03"  # zero-padded: kept as it is
    packed = shared_job_key("77_1", "77", None, memo, keys)  # a singleton's key is a string
    assert packed == "77_1" and shared_job_key("".join(["77", "_1"]), "77", None, memo, keys) is packed
    assert shared_job_key("77", "77", 5, memo, keys) == "77"
    assert shared_job_key("88_5", None, 5, memo, keys) == "88_5"


@pytest.mark.anyio
async def test_reloaded_jobs_share_run_task_and_cluster(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = Store(path)
    await store.open()
    request = SubmitRequest(tag="t", run_id="r1", task="square", job_dir="/tmp", log_dir="/tmp", workdir="/tmp",
                            worker_argv=["true"])
    for k in range(3):
        store.put_job(JobRecord(tag=f"t{k}", run_id="r" + "1", task="sq" + "uare", cluster="lo" + "cal",
                                request=request))
    async with anyio.create_task_group() as tg:
        tg.start_soon(store.run_writer)
        await store.flush()
        tg.cancel_scope.cancel()
    try:
        jobs = await store.jobs_for_runs(["r1"])
    finally:
        await store.close()
    assert len(jobs) == 3
    assert len({id(j.run_id) for j in jobs}) == len({id(j.task) for j in jobs}) == len({id(j.cluster) for j in jobs}) == 1


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4), max_leaves=20)


@given(_JSON_VALUES)
def test_dump_json_writes_what_json_dumps_writes(value: object) -> None:
    assert dump_json(value) == json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def test_dump_json_refuses_a_cycle_as_json_does() -> None:
    cycle: list[object] = []
    cycle.append(cycle)
    with pytest.raises(ValueError, match="Circular reference"):
        dump_json(cycle)
    with pytest.raises(TypeError):
        dump_json({"x": object()})


def test_the_ledger_sees_a_changed_log_level_within_its_recheck_interval() -> None:
    old = structlog.get_config()
    try:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
        assert ledger._debugging(1000.0) is False
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
        assert ledger._debugging(1000.0 + ledger.DEBUG_RECHECK_S / 2) is False  # (cached: no look per transition)
        assert ledger._debugging(1000.0 + ledger.DEBUG_RECHECK_S) is True
        assert ledger._debugging(10.0) is True  # (a clock set back: looked at again, not trusted for ever)
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
        assert ledger._debugging(5000.0) is False
    finally:
        structlog.configure(**old)
        ledger._debug_checked[0] = float("-inf")
