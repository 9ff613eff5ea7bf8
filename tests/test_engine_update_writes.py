"""``Engine.update`` (a pending reason, a back-off time) writes only the columns that changed.

A poll that changes the pending reason of 10^4 queued elements must cost 10^4 narrow ``UPDATE``s,
not 10^4 whole rows re-encoded (issue #13: work proportional to change).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reflowd.engine.engine import Engine
from reflowd.store import INSTANCES, Store

from .support import flush_store, one_task_run


@pytest.mark.anyio
async def test_a_reason_update_writes_only_the_reason_and_its_time(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    await store.open()
    try:
        engine = Engine(store, {})
        run = one_task_run(2, cluster="none")
        a, b = run.tasks["a"].instances.values()
        store.put_run(run)
        store.put_task(run.id, run.tasks["a"])
        for inst in (a, b):
            store.put_instance(inst)
        await flush_store(store)  # the rows exist: what follows are changes
        executed: list[str] = []
        assert store._db is not None
        await store._db.set_trace_callback(executed.append)
        engine.update(a, reason="Priority")
        engine.update(b, reason=None)  # unchanged: nothing written
        await flush_store(store)
        await store._db.set_trace_callback(None)
        writes = [sql for sql in executed if sql.startswith(("UPDATE instances", "INSERT INTO instances"))]
        assert len(writes) == 1 and writes[0].startswith("UPDATE instances"), writes
        assigned = writes[0].split(" SET ", 1)[1].split(" WHERE ", 1)[0]
        columns = {part.split("=")[0].strip() for part in assigned.split(",")}
        assert columns == {"reason", "updated_at"}, writes[0]
    finally:
        await store.close()
    again = Store(tmp_path / "s.sqlite")
    await again.open()
    try:
        loaded = await again.load_run("r1")
        assert loaded is not None
        assert {i.index: INSTANCES.row(i) for i in loaded.tasks["a"].instances.values()} == \
            {i.index: INSTANCES.row(i) for i in run.tasks["a"].instances.values()}
        assert loaded.tasks["a"].instances[0].reason == "Priority"
    finally:
        await again.close()


@pytest.mark.anyio
async def test_an_update_of_fields_that_are_not_columns_writes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    await store.open()
    try:
        engine = Engine(store, {})
        run = one_task_run(1, cluster="none")
        (a,) = run.tasks["a"].instances.values()
        engine.update(a, handed=True)  # memory only: the driver's bookkeeping
        assert a.handed
        assert not store._instances, "nothing queued for the writer"
    finally:
        await store.close()
