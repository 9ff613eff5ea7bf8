"""Benchmark workflow: items -> work[] (fan-out) -> total (gather); each task does almost nothing."""

from __future__ import annotations

from typing import Annotated

from reflow import Result, Workflow

wf = Workflow("benchfanout")


@wf.job(time="00:05:00", mem="100M")
def items(n: int = 500, salt: str = "") -> list[int]:
    return list(range(n))


@wf.array_job(time="00:05:00", mem="100M")
def work(x: Annotated[int, Result(step="items")], salt: str = "") -> int:
    return x * x


@wf.job(time="00:05:00", mem="100M")
def total(values: Annotated[list[int], Result(step="work")], salt: str = "") -> int:
    return sum(values)
