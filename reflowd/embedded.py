"""Embedded mode: the daemon's engine in the user's process, local scheduler only.

``wf.run_local()`` and ``wf.cli() run`` use it: same state machine, same
worker, no daemon and no socket. The run's state lives in a SQLite file in
the run directory; results go to the user's shared cache (``cache_store``),
the same one the daemon uses, so a result made either way is reused by the
other. Ctrl-C cancels the run and stops its processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import anyio

from reflow_client.config import ClusterConfig
from reflow_client.manifest import Manifest

from .cache_store import CacheStore, open_cache
from .clusters import build_cluster
from .driver.packing import elements
from .driver.submit import log_paths_for
from .engine.engine import Engine, EngineSettings
from .engine.states import RunState
from .store import Store


async def run_embedded(
    manifest: Manifest,
    params: dict[str, Any],
    run_dir: str,
    *,
    options: dict[str, Any],
    store_path: str | os.PathLike[str],
    cache_path: str | os.PathLike[str] | None = None,
    max_workers: int | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    settings: EngineSettings | None = None,
) -> dict[str, Any]:
    """Run one workflow to its end; return its final status and every instance's encoded output.

    *cache_path* is the user's shared cache (None: the run directory's own database holds the cache).
    """
    cache = None if cache_path is None else CacheStore(cache_path, origin="embedded")
    store = Store(store_path, cache=cache)
    await store.open()
    if cache is not None:
        try:
            await open_cache(cache, adopt=store_path)  # results of runs made before the cache was shared
        except BaseException:
            with anyio.CancelScope(shield=True):
                await store.close()
            raise
    cluster = build_cluster(ClusterConfig(name="local", scheduler="local", max_workers=max_workers), embedded=True,
                            max_workers=max_workers)
    engine = Engine(store, {"local": cluster}, settings or EngineSettings(retry_backoff=1.0))
    result: dict[str, Any] = {}
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.run_writer)
            if cache is not None:
                tg.start_soon(cache.run_writer)
            await _abandon_interrupted(engine)
            await tg.start(engine.run)
            run = await engine.submit_run(manifest, params, run_dir, "local", options)
            subscription = engine.subscribe(run.id)
            async with subscription.receive:
                async for event in subscription.receive:
                    if on_event is not None:
                        on_event(event)
            if run.state is RunState.RUNNING:  # the event stream ended early (overflow): wait for the end
                while run.state is RunState.RUNNING:
                    await anyio.sleep(0.2)
            result = engine.status(run)
            result["outputs"] = {
                name: [{"index": i.index, "state": i.state.value, "output": i.output} for i in tr.ordered()]
                for name, tr in run.tasks.items()
            }
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await engine.close()
            try:
                await store.close()
            finally:
                if cache is not None:
                    await cache.close()
    return result


async def _abandon_interrupted(engine: Engine) -> None:
    """Runs left RUNNING by an interrupted earlier run_local cannot continue: mark them cancelled."""
    runs, broken = await engine.store.load_active_runs()
    for run in runs:
        engine.set_run_state(run, RunState.CANCELLED, {"source": "embedded", "note": "interrupted earlier"})
    for run_id, why in broken:
        engine.store.fail_run_row(run_id, why)
    await engine.store.flush()


async def failure_log_paths(db: str | os.PathLike[str], run_id: str, failures: list[dict[str, Any]]) -> dict[str, str]:
    """The stderr file of each failed instance (``task`` or ``task[i]``), from the embedded store's job records."""
    if not failures:
        return {}
    store = Store(db)
    await store.open()
    try:
        records = await store.jobs_for_runs([run_id])
    finally:
        await store.close()
    paths: dict[str, str] = {}
    for failure in failures:
        task, index = failure["task"], failure["index"]
        mine = [r for r in records if r.task == task and (index is None or index in elements(r.request))]
        if mine:
            latest = max(mine, key=lambda r: r.submitted_at)
            label = task if index is None else f"{task}[{index}]"
            paths[label] = log_paths_for(latest.request, index)[1]
    return paths
