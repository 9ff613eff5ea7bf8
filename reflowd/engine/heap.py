"""When the daemon freezes its heap for Python's garbage collector, and when it collects what froze.

A full collection walks every tracked object (0.2-0.7 us each here: 0.5 s and more with 10^6 held
instances), a stall of the event loop. ``gc.freeze()`` moves what exists to the permanent generation,
which collections skip (see ``engine.FREEZE_AFTER`` for when the engine freezes). Freezing has two
costs, and this module bounds both:

* Garbage that exists at the moment of freezing (reference cycles not collected yet) would stay
  until the frozen heap is collected. :meth:`Heap.freeze` does not collect first: even a young
  collection walks the large containers the engine freezes right after making them (a list and a
  dict of 3x10^5 instances: 50 ms), and ``bench/engine_heap.py`` found no such garbage.
* Objects alive at a freeze that later die in a cycle (a finished task group, an exception and its
  frames) stay until the permanent generation is collected, which walks the whole heap. So that is
  done only when it is cheap (:meth:`Heap.tidy`, from the janitor while no run is running): when a
  freeze happened since the last such collection and the frozen heap is small (``SMALL`` objects, a
  collection of about the size Python's own full collections of an idle daemon have), e.g. once a
  large run has been dropped. A daemon that holds a large run for days keeps what died frozen
  meanwhile until then (``bench/engine_heap.py`` measures it: none in its fan-outs); ``stats`` shows
  how much is frozen and what the last tidy found (``Heap.to_dict``).
"""

from __future__ import annotations

import gc
import time
from typing import Any

#: The frozen heap (objects) under which collecting it is cheap enough to do between two loop steps
#: (a daemon's own modules and libraries are about 50,000 objects; 80,000 is a 20-50 ms collection here).
SMALL = 80_000


class Heap:
    """The engine's freeze policy and its counts (one per daemon)."""

    def __init__(self) -> None:
        self.freezes = 0
        self.tidies = 0
        #: A freeze happened since the permanent generation was last collected.
        self.owed = False
        self.last_found = 0
        self.last_seconds = 0.0

    def freeze(self) -> None:
        """Freeze what exists (collections skip it from now on); a collection of it is owed."""
        gc.freeze()
        self.freezes += 1
        self.owed = True

    def tidy(self, *, small: int = SMALL) -> bool:
        """Collect the frozen heap if a freeze left garbage there to find and the heap is small; True if done."""
        if not self.owed or gc.get_freeze_count() > small:
            return False
        started = time.perf_counter()
        gc.unfreeze()  # (and left unfrozen: Python's own collections walk a small heap cheaply; the engine
        self.last_found = gc.collect()  # freezes again at its next large hand-over)
        self.last_seconds = time.perf_counter() - started
        self.owed = False
        self.tidies += 1
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"frozen": gc.get_freeze_count(), "freezes": self.freezes, "tidies": self.tidies,
                "tidy_owed": self.owed, "last_tidy_found": self.last_found,
                "last_tidy_ms": round(self.last_seconds * 1000, 1)}
