"""Benchmark workflow: items -> work[] (fan-out) -> total (gather); each task does almost nothing
(or, with ``seconds``, each element sleeps that long)."""

from __future__ import annotations

import time
from typing import Annotated

from reflow import Result, Workflow

wf = Workflow("benchfanout")


@wf.job(time="00:05:00", mem="100M")
def items(n: int = 500, salt: str = "") -> list[int]:
    return list(range(n))


@wf.array_job(time="00:05:00", mem="100M")
def work(x: Annotated[int, Result(step="items")], salt: str = "", seconds: float = 0.0) -> int:
    if seconds:  # bench/packing_slurm.py --seconds: elements that take a while (sleep: no CPU contention)
        time.sleep(seconds)
    return x * x


@wf.job(time="00:05:00", mem="100M")
def total(values: Annotated[list[int], Result(step="work")], salt: str = "") -> int:
    return sum(values)
