"""Long pure work run on the event loop in steps (``reflow_client.jsonpieces``: large JSON documents)."""

from __future__ import annotations

from collections.abc import Generator
from typing import TypeVar

import anyio.lowlevel

T = TypeVar("T")


async def run_steps(steps: Generator[None, None, T]) -> T:
    """Run *steps* to its end, letting the loop serve others (a ``ping``) at each of its yields."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        await anyio.lowlevel.checkpoint()
