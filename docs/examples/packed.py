"""docs/packing.md: an array task whose elements run four to a job."""

from __future__ import annotations

from typing import Annotated

from reflow import Param, Result, Workflow

wf = Workflow("packed")


@wf.job()
def numbers(n: Annotated[int, Param(help="how many elements")] = 12) -> list[int]:
    return list(range(n))


@wf.array_job(pack=4, time="00:10:00")  # up to 4 elements per scheduler job
def square(x: Annotated[int, Result(step="numbers")]) -> int:
    print(f"squaring {x}")
    return x * x


@wf.job()
def total(values: Annotated[list[int], Result(step="square")]) -> int:
    return sum(values)


if __name__ == "__main__":
    raise SystemExit(wf.cli())
