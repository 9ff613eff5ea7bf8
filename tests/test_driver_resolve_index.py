"""Look-ups by tag follow what is due, not how many submissions wait for one (issue #13: work proportional
to change).

``Driver.unresolved`` holds every submission whose outcome is unknown -- during a fan-out, each batch whose
sbatch is under way. The observer's look-ups and its sleep take what is due from a heap
(``Driver.resolve_due``), never walking ``unresolved``; the simulation checks the heap against a walk after
each of its steps (``tests/sim/harness.driver_index_problems``).
"""

from __future__ import annotations

import math
from typing import Any

import anyio
from hypothesis import given, settings
from hypothesis import strategies as st

from reflowd import world
from reflowd.driver.observe import Observer
from tests.sim.harness import driver_index_problems
from tests.test_driver_index import driver, track


class NoWalk(dict):  # type: ignore[type-arg]
    """``unresolved`` that refuses to be walked (what the code before did on every observer cycle)."""

    def values(self) -> Any:
        raise AssertionError("unresolved walked")

    def items(self) -> Any:
        raise AssertionError("unresolved walked")

    def __iter__(self) -> Any:
        raise AssertionError("unresolved walked")


def test_the_observer_takes_what_is_due_without_walking_every_unresolved_submission() -> None:
    d = driver()
    now = world.now()
    waiting = [track(f"w{i}", None) for i in range(1000)]
    for t in waiting:
        t.resolve_after = math.inf  # its sbatch is under way
        d.add_unresolved(t)
    soon, later = track("soon", None), track("later", None)
    soon.resolve_after, later.resolve_after = now - 1.0, now + 30.0
    d.add_unresolved(soon)
    d.add_unresolved(later)
    kept = NoWalk(d.unresolved)
    d.unresolved = kept
    obs = Observer(d)
    assert d.next_resolve() == now - 1.0
    assert obs.sleep_time(math.inf) == d.cluster.result_interval
    looked: list[list[str]] = []

    async def find_tags(tags: list[str]) -> dict[str, list[Any]]:
        looked.append(sorted(tags))
        return {}

    d.cluster.scheduler.find_tags = find_tags
    d.cluster.count = lambda name: None
    d.health = type("Up", (), {"allows": lambda self, now: True})()
    d.scheduler_answered = lambda: None
    anyio.run(obs.resolve_unresolved)
    assert looked == [["soon"]], "only the one due is looked up"
    assert soon.resolve_after > now and d.next_resolve() == soon.resolve_after, "asked again later, once"
    assert not d.resolving


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "at", "drop", "take", "handled"]), st.integers(0, 4),
                          st.sampled_from([0.0, 5.0, 10.0, math.inf])), max_size=50))
def test_the_heap_of_look_ups_says_what_a_walk_over_every_unresolved_submission_says(
        ops: list[tuple[str, int, float]]) -> None:
    d = driver()
    made = {f"t{k}": track(f"t{k}", None) for k in range(5)}
    taken: list[Any] = []
    for kind, k, at in ops:
        t = made[f"t{k}"]
        if kind == "add":
            t.resolve_after = at
            d.add_unresolved(t)
        elif kind == "at":
            d.resolve_at(t, at)
        elif kind == "drop":
            d.drop_unresolved(t.tag)
        elif kind == "take":
            at = min(at, 20.0)  # (now, never infinite)
            taken += d.resolves_due(at)
            walk = {x.tag for x in d.unresolved.values() if x.resolve_after <= at} - set(d.resolving)
            assert not walk, f"due but not taken: {walk}"
        else:
            d.resolves_handled(taken)
            taken = []
        assert driver_index_problems(d) == [], (kind, k, at)
    d.resolves_handled(taken)
    want = min((x.resolve_after for x in d.unresolved.values()), default=math.inf)
    assert d.next_resolve() == want
