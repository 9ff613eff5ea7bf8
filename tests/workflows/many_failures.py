"""An array task whose elements all fail (failure lists longer than the daemon's 20)."""

from __future__ import annotations

from typing import Annotated

from reflow import Param, Result, Workflow

wf = Workflow("many_failures")


@wf.job()
def items(n: Annotated[int, Param(help="elements")] = 25) -> list[int]:
    return list(range(n))


@wf.array_job()
def explode(x: Annotated[int, Result(step="items")]) -> int:
    raise RuntimeError(f"element {x} always fails")


if __name__ == "__main__":
    raise SystemExit(wf.cli())
