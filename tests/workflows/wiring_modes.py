"""Every wiring mode in one workflow, with real values (used by tests/test_wiring.py).

    src ──direct──> double
    items ──fanout──> square[] ──chain──> plus_one[] ──gather──> total
      │                  └──gather──> squares
      ├──fanout──> pairs[] ──gather_flatten──> flat
      │              └──chain_flatten──> neg[] ──gather──> negs
      ├──broadcast (inferred list -> list)──> offset[]
      └──broadcast (explicit, param Any)───> with_all[]
    square[] ──broadcast (explicit, array -> array)──> rank[]
    src, double ──gather (steps=[...])──> both
    items, flat ──gather_flatten (steps=[...])──> merged
    items, items2 ──fanout (steps=[...])──> concat[]
    nothing ──fanout (zero elements)──> each[] ──gather──> collected
"""

from __future__ import annotations

from typing import Annotated, Any

from reflow import Param, Result, Workflow

wf = Workflow("wiring_modes")


@wf.job()
def src(base: int = 3) -> int:
    return base


@wf.job()
def double(x: Annotated[int, Result(step="src")]) -> int:
    return 2 * x


@wf.job()
def items(n: Annotated[int, Param(help="number of items")] = 4) -> list[int]:
    return list(range(1, n + 1))


@wf.job()
def items2() -> list[int]:
    return [100, 200]


@wf.array_job()
def square(x: Annotated[int, Result(step="items")]) -> int:
    assert isinstance(x, int), x
    return x * x


@wf.array_job()
def plus_one(x: Annotated[int, Result(step="square")]) -> int:
    return x + 1


@wf.job()
def total(xs: Annotated[list[int], Result(step="plus_one")]) -> list[int]:
    return xs


@wf.job()
def squares(xs: Annotated[list[int], Result(step="square")]) -> list[int]:
    return xs


@wf.array_job()
def pairs(x: Annotated[int, Result(step="items")]) -> list[int]:
    return [x, 10 * x]


@wf.job()
def flat(xs: Annotated[list[int], Result(step="pairs")]) -> list[int]:
    return xs


@wf.array_job()
def neg(x: Annotated[int, Result(step="pairs")]) -> int:
    assert isinstance(x, int), x
    return -x


@wf.job()
def negs(xs: Annotated[list[int], Result(step="neg")]) -> list[int]:
    return xs


@wf.array_job()
def offset(
    x: Annotated[int, Result(step="items")],
    everything: Annotated[list[int], Result(step="items")],
) -> list[int]:
    return [x, *everything]


@wf.array_job()
def with_all(
    x: Annotated[int, Result(step="items")],
    whole: Annotated[Any, Result(step="items", broadcast=True)],
) -> list[Any]:
    return [x, whole]


@wf.array_job()
def rank(
    x: Annotated[int, Result(step="square")],
    all_squares: Annotated[list[int], Result(step="square", broadcast=True)],
) -> int:
    return sorted(all_squares).index(x)


@wf.job()
def both(xs: Annotated[list[int], Result(steps=["src", "double"])]) -> list[int]:
    return xs


@wf.job()
def merged(xs: Annotated[list[int], Result(steps=["items", "flat"])]) -> list[int]:
    return xs


@wf.array_job()
def concat(x: Annotated[int, Result(steps=["items", "items2"])]) -> int:
    return x


@wf.job()
def nothing(m: int = 0) -> list[int]:
    return list(range(m))


@wf.array_job()
def each(x: Annotated[int, Result(step="nothing")]) -> int:
    return x + 1


@wf.job()
def collected(xs: Annotated[list[int], Result(step="each")]) -> list[int]:
    return xs
