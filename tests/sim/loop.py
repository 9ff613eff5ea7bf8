"""An asyncio event loop on virtual time that can crash between any two steps.

Time does not pass while there is work to do; when every task waits, the
clock jumps to the next timer. There is no real I/O and there are no threads
in the simulated world, so the order of callbacks -- and with it everything
the daemon does -- follows from the seed alone.

``crash_at`` makes the loop stop dead before step N (a step is one pass of
the loop: the callbacks that were ready plus the timers that fell due).
Whatever the daemon was awaiting then never resumes, like ``kill -9``.
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any


class Crash(BaseException):
    """The simulated daemon died here."""


class Stalled(RuntimeError):
    """Nothing is ready and nothing is scheduled: the simulation can never move again."""


class _VirtualSelector(selectors.DefaultSelector):
    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualLoop | None = None

    def select(self, timeout: float | None = None) -> list[Any]:
        events = super().select(0)
        if events:
            return events
        assert self.loop is not None
        if timeout is None:
            raise Stalled("the simulated world is waiting for nothing")
        if timeout > 0:
            self.loop.virtual += timeout
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self, start: float = 1_000_000.0) -> None:
        selector = _VirtualSelector()
        super().__init__(selector)
        selector.loop = self
        self.virtual = start
        # Above the float spacing at epoch-sized times, or a timer due "now" would never fire.
        self._clock_resolution = 1e-6
        self.steps = 0
        self.crash_at: int | None = None
        self.set_exception_handler(lambda loop, context: None)  # abandoned tasks say nothing

    def time(self) -> float:
        return self.virtual

    def _run_once(self) -> None:  # type: ignore[override]
        self.steps += 1
        if self.crash_at is not None and self.steps >= self.crash_at:
            raise Crash(self.steps)
        super()._run_once()


def abandon(loop: VirtualLoop) -> None:
    """Forget a crashed loop: its tasks are dropped without running their clean-up."""
    for task in asyncio.all_tasks(loop):
        coro = task.get_coro()
        try:
            # Close the innermost frames first is impossible from here; closing the task's coroutine
            # throws GeneratorExit in, and whatever clean-up awaits is refused -- never run.
            coro.close()  # type: ignore[union-attr]
        except BaseException:
            pass
    try:
        loop.close()
    except BaseException:
        pass
