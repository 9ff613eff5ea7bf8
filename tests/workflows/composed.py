"""A Flow included twice under prefixes, wired to a workflow task (tests/test_wiring.py)."""

from __future__ import annotations

from typing import Annotated

from reflow import Flow, Result, Workflow

conversion = Flow("conversion")


@conversion.job()
def split(base: Annotated[int, Result(step="setup")], n: int = 2) -> list[int]:
    return [base + i for i in range(n)]


@conversion.array_job()
def convert(x: Annotated[int, Result(step="split")]) -> int:
    return x * 10


@conversion.job(after=["split"])
def join(xs: Annotated[list[int], Result(step="convert")]) -> list[int]:
    return xs


wf = Workflow("composed")


@wf.job()
def setup(offset: int = 1) -> int:
    return offset


wf.include(conversion, prefix="era5")
wf.include(conversion, prefix="cmip")


@wf.job()
def compare(
    a: Annotated[list[int], Result(step="era5_join")],
    b: Annotated[list[int], Result(step="cmip_join")],
) -> dict[str, list[int]]:
    return {"era5": a, "cmip": b}
