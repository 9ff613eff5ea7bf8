"""The shared result cache against the per-database cache table it replaced.

Usage::

    python bench/cache_shared.py                 # 20,000 entries
    python bench/cache_shared.py --sizes 10000,100000

For each size N, in one process: record N results and make them durable, then
look all N up, three ways:

* ``table``: the state database's own ``cache`` table (``Store`` without a
  ``CacheStore``; the baseline, what reflow did before the cache was shared);
* ``shared``: the user's ``cache.sqlite`` through ``CacheStore`` (values only);
* ``shared+files``: the same, each result a path to a real file, so recording
  takes a fingerprint and each lookup checks it (one ``stat`` per file).

Printed: microseconds per entry to record (put + commit) and to look up, and
the ratio to the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from reflowd.cache_store import CacheStore
from reflowd.store import Store


async def _table(base: Path, n: int) -> tuple[float, float]:
    store = Store(base / "reflowd.sqlite")
    await store.open()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.run_writer)
            start = time.perf_counter()
            for i in range(n):
                store.put_cache(f"id{i}", i, f"h{i}", "wf", "t", "run", i)
                await store.pace()
            await store.flush()
            recorded = time.perf_counter() - start
            start = time.perf_counter()
            found = await store.cache_lookup(f"id{i}" for i in range(n))
            looked = time.perf_counter() - start
            assert len(found) == n
            tg.cancel_scope.cancel()
    finally:
        await store.close()
    return recorded, looked


async def _shared(base: Path, n: int, files: bool) -> tuple[float, float]:
    outputs: list[Any] = list(range(n))
    if files:
        (base / "out").mkdir()
        for i in range(n):
            (base / "out" / f"{i}.txt").write_text(str(i))
        outputs = [{"__reflow__": "path", "value": str(base / "out" / f"{i}.txt")} for i in range(n)]
    cache = CacheStore(base / "cache.sqlite", origin="bench")
    await cache.open()
    try:
        start = time.perf_counter()
        for i in range(n):
            cache.put(f"id{i}", outputs[i], f"h{i}", "wf", "t", "run", i)
        await cache.commit()
        recorded = time.perf_counter() - start
        start = time.perf_counter()
        found = await cache.lookup(f"id{i}" for i in range(n))
        looked = time.perf_counter() - start
        assert len(found) == n, (len(found), cache.rejected)
    finally:
        await cache.close()
    return recorded, looked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000")
    args = parser.parse_args()
    for n in (int(s) for s in args.sizes.split(",")):
        results: dict[str, tuple[float, float]] = {}
        for name, run, extra in (("table", _table, ()), ("shared", _shared, (False,)),
                                 ("shared+files", _shared, (True,))):
            with tempfile.TemporaryDirectory() as tmp:
                results[name] = anyio.run(run, Path(tmp), n, *extra)
        base_rec, base_look = results["table"]
        print(f"N = {n:,}")
        for name, (rec, look) in results.items():
            print(f"  {name:13s} record {rec / n * 1e6:7.1f} us/entry ({rec / base_rec:4.2f}x)   "
                  f"lookup {look / n * 1e6:7.1f} us/entry ({look / base_look:4.2f}x)")


if __name__ == "__main__":
    main()
