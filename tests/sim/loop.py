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
import contextlib
import inspect
import os
import random
import selectors
from collections.abc import Iterable, Iterator, MutableSet
from typing import Any


class _OrderedSet(MutableSet[Any]):
    """A set that iterates in insertion order (a built-in set of tasks or cancel scopes iterates in the
    order of their memory addresses, which differs with whatever ran before in the process)."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[Any] = ()) -> None:
        self._items = dict.fromkeys(items)

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __iter__(self) -> Iterator[Any]:
        items = list(self._items)
        if _SHUFFLE is not None:
            _SHUFFLE.shuffle(items)
        return iter(items)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: Any) -> None:
        self._items[item] = None

    def discard(self, item: Any) -> None:
        self._items.pop(item, None)

    def remove(self, item: Any) -> None:
        del self._items[item]


_SHUFFLE = random.Random() if os.environ.get("REFLOW_SIM_SHUFFLE_SETS") else None  # to show the orders matter


@contextlib.contextmanager
def deterministic_anyio() -> Iterator[None]:
    """Make anyio deliver cancellation in a reproducible order while the simulation runs.

    anyio keeps a cancel scope's tasks and child scopes in built-in sets and cancels them in set order,
    which follows memory addresses: the same seed then wakes tasks in another order after other
    scenarios ran in the process (a replay in a fresh process did not fail where the suite had).
    """
    from anyio._backends import _asyncio as backend

    init = backend.CancelScope.__init__

    def ordered_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self._child_scopes = _OrderedSet()
        self._tasks = _OrderedSet()

    backend.CancelScope.__init__ = ordered_init  # type: ignore[method-assign]
    try:
        yield
    finally:
        backend.CancelScope.__init__ = init  # type: ignore[method-assign]


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
        self.created: list[asyncio.Task[Any]] = []  # every task, in creation order (all_tasks() is a set)
        self.set_task_factory(self._new_task)

    def _new_task(self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        self.created.append(task)
        return task

    def live_tasks(self) -> list[asyncio.Task[Any]]:
        """The tasks not finished, in the order they were created."""
        self.created = [t for t in self.created if not t.done()]
        return list(self.created)

    def time(self) -> float:
        return self.virtual

    def _run_once(self) -> None:  # type: ignore[override]
        self.steps += 1
        if self.crash_at is not None and self.steps >= self.crash_at:
            raise Crash(self.steps)
        super()._run_once()


def _close_unstarted(coro: Any, depth: int = 0) -> None:
    """Close a coroutine that never ran, and first the never-run coroutines it was handed (a task
    wrapper's, such as anyio's, holds the one it would have awaited): closed so, none of them warns that
    it "was never awaited" -- it was never meant to run, its process died first."""
    if depth < 3 and inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
        for value in coro.cr_frame.f_locals.values():
            inner = value if inspect.iscoroutine(value) else getattr(value, "_coro", None)
            if inspect.iscoroutine(inner) and inner is not coro:
                _close_unstarted(inner, depth + 1)
    coro.close()


def abandon(loop: VirtualLoop) -> None:
    """Forget a crashed loop: its tasks are dropped without running their clean-up.

    Closing a task's coroutine throws GeneratorExit in at its await; whatever clean-up would await is
    refused (RuntimeError), never run. A task that had not started yet is closed with what it wraps.
    """
    tasks = loop.live_tasks()
    if _SHUFFLE is not None:
        _SHUFFLE.shuffle(tasks)
    for task in tasks:
        coro = task.get_coro()
        try:
            if inspect.iscoroutine(coro):
                _close_unstarted(coro)
        except BaseException:
            pass
    try:
        loop.close()
    except BaseException:
        pass
