"""Benchmark workflow: items -> work[] (fan-out) -> double[] (element-wise chain: double[i] from work[i])
-> total (gather); each task does almost nothing (or, with ``seconds``, each work element sleeps that
long, element i a little longer than element i-1: the chain's elements can start one by one)."""

from __future__ import annotations

import time
from typing import Annotated

from reflow import Result, Workflow

wf = Workflow("benchchain")


@wf.job(time="00:05:00", mem="100M")
def items(n: int = 100, salt: str = "") -> list[int]:
    return list(range(n))


@wf.array_job(time="00:05:00", mem="100M")
def work(x: Annotated[int, Result(step="items")], salt: str = "", seconds: float = 0.0) -> int:
    if seconds:
        time.sleep(seconds)
    return x * x


@wf.array_job(time="00:05:00", mem="100M")
def double(value: Annotated[int, Result(step="work")], salt: str = "") -> int:
    return 2 * value


@wf.job(time="00:05:00", mem="100M")
def total(values: Annotated[list[int], Result(step="double")], salt: str = "") -> int:
    return sum(values)
