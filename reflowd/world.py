"""What the daemon takes from the outside world besides I/O: the time and fresh random names.

Engine, drivers and ledger read the clock and draw tags through here, so a
deterministic simulation (``tests/sim``) can put a virtual clock and a seeded
generator in their place with :func:`install`. Sleeping goes through anyio,
whose clock is the event loop's -- the simulation's loop keeps that virtual too.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from collections.abc import Callable


@dataclass
class World:
    now: Callable[[], float] = time.time  # wall-clock seconds (stored, shown)
    monotonic: Callable[[], float] = time.monotonic  # intervals and deadlines
    token_hex: Callable[[int], str] = secrets.token_hex


_world = World()


def install(world: World | None) -> None:
    """Use *world* from now on (``None``: the real one)."""
    global _world
    _world = world or World()
    _last_now[0] = 0.0


_last_now = [0.0]


def now() -> float:
    """Wall-clock seconds; times within a millisecond of the last one share its float object (a run
    of a million instances stamped in one burst then holds one timestamp, not a million)."""
    t = _world.now()
    last = _last_now[0]
    if 0.0 <= t - last < 0.001:
        return last
    _last_now[0] = t
    return t


def monotonic() -> float:
    return _world.monotonic()


def token_hex(nbytes: int) -> str:
    return _world.token_hex(nbytes)
