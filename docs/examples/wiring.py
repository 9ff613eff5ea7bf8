"""The wiring modes of writing-workflows, each with the types that select it.

    python wiring.py dag      # shows the mode reflow inferred for every input
    python wiring.py run --run-dir runs/wiring
"""

from __future__ import annotations

from typing import Annotated

from reflow import Param, Result, Workflow

wf = Workflow("wiring")


@wf.job()
def numbers(n: Annotated[int, Param(help="how many numbers", short="n")] = 4) -> list[int]:
    return list(range(1, n + 1))


@wf.job()
def scale() -> int:
    return 10


@wf.array_job()
def square(x: Annotated[int, Result(step="numbers")]) -> int:             # job list[T] -> array T: fan-out
    return x * x


@wf.array_job()
def shift(x: Annotated[int, Result(step="square")],                        # array T -> array T: chain (element i to i)
          factor: Annotated[int, Result(step="scale", broadcast=True)]) -> int:  # whole value to every element
    return x * factor


@wf.array_job()
def neighbours(x: Annotated[int, Result(step="numbers")]) -> list[int]:
    return [x - 1, x + 1]


@wf.job()
def everything(shifted: Annotated[list[int], Result(step="shift")],        # array T -> job list[T]: gather
               flat: Annotated[list[int], Result(step="neighbours")]) -> dict[str, list[int]]:  # list[T] -> list[T]: gather-flatten
    return {"shifted": shifted, "flat": flat}


if __name__ == "__main__":
    wf.cli()
