"""The simulated cluster as Slurm with dependencies, for the early (dependency) submissions of ``driver/early.py``.

:class:`DependentCluster` is :class:`~tests.sim.cluster.SimCluster` plus what Slurm's manual says of
``--dependency`` with ``--kill-on-invalid-dep=yes``: a job waiting ``afterok:<ids>`` starts once every element
of those jobs ended well and is cancelled (``DependencyNeverSatisfied``) as soon as one did not; an array task
waiting ``aftercorr:<id>`` does the same against the upstream array task of the same index. Its workers do what
``reflow.worker`` does with a deferred job: skip an element whose ``cancel`` marker is there, resolve the inputs
from the upstream result files the recipe names (``engine/deferred.py``, as the worker does), and fail the
element (without running the task) when an upstream element did not succeed. Job ids are Slurm's: digits.

:func:`slurm_like` is an ``adjust`` for :func:`~tests.sim.harness.simulate` that makes the runtime's scheduler
say ``slurm`` and turns ``slurm_dependencies`` on, so the real driver submits early against this cluster.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

from reflow_client import jobfiles
from reflowd.clusters import ClusterRuntime
from reflowd.engine import deferred
from reflowd.schedulers.base import Outcome, Phase, SubmitRequest

from .cluster import SimCluster, SimElement, SimJob
from .harness import Harness, Report, run_seed


class DependentCluster(SimCluster):
    """A simulated Slurm that honours ``afterok``/``aftercorr`` dependencies and runs deferred jobs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Elements waiting on their dependency: (job, element, kind, upstream job ids).
        self.held_back: list[tuple[SimJob, SimElement, str, list[str]]] = []
        self.dependency_cancels: list[str] = []  # element keys cancelled for a dependency that failed

    # ------------------------------------------------------------------ sbatch

    def submit(self, request: SubmitRequest, now: float) -> str:
        dependency = str(request.options.get("dependency", ""))
        job_id = super().submit(request, now)
        if not dependency:
            return job_id
        kind, _, ids = dependency.partition(":")
        job = self.jobs[job_id]
        held = {id(e) for e in job.elements.values()}
        self._queued = [(j, e) for j, e in self._queued if id(e) not in held]
        self.held_back.extend((job, e, kind, ids.split(":")) for e in job.elements.values())
        return job_id

    def _new_id(self, n: int) -> str:
        return str(1000 + n)

    # ------------------------------------------------------------------ the clock

    def next_due(self, now: float) -> float:
        if any(self._verdict(j, e, kind, ids) is not None for j, e, kind, ids in self.held_back):
            return now
        return super().next_due(now)

    def tick(self, now: float) -> None:
        waiting = []
        for job, element, kind, ids in self.held_back:
            if element.phase is not Phase.QUEUED or job.dropped:
                continue  # cancelled (scancel) while it waited
            verdict = self._verdict(job, element, kind, ids)
            if verdict is None:
                waiting.append((job, element, kind, ids))
            elif verdict:
                self._queued.append((job, element))
            else:  # --kill-on-invalid-dep=yes
                element.phase, element.outcome, element.cancelled = Phase.DONE, Outcome.CANCELLED, True
                self.dependency_cancels.append(element.key)
                self.trace.append((now, "dependency never satisfied", element.key))
        self.held_back = waiting
        super().tick(now)

    def _verdict(self, job: SimJob, element: SimElement, kind: str, ids: list[str]) -> bool | None:
        """True: the dependency is satisfied; False: it never will be; None: not yet."""
        upstream: list[SimElement] = []
        for up_id in ids:
            up = self.jobs.get(up_id)
            if up is None:
                return False
            if kind == "aftercorr":
                corr = up.elements.get(element.index)
                if corr is None:
                    return False
                upstream.append(corr)
            else:
                upstream.extend(up.elements.values())
        if any(u.phase is Phase.DONE and u.outcome is not Outcome.COMPLETED for u in upstream):
            return False
        return True if all(u.phase is Phase.DONE for u in upstream) else None

    # ------------------------------------------------------------------ the worker

    def _start(self, job: SimJob, element: SimElement, now: float) -> None:
        req = job.request
        shared = json.loads(self.fs.get(f"{req.job_dir}/{jobfiles.JOB_FILE}", b"{}") or b"{}")
        recipe = shared.get(deferred.JOB_KEY)
        if recipe is None:
            super()._start(job, element, now)
            return
        element.phase = Phase.RUNNING
        element.ends_at = now + self.rng.choice([0.2, 1.0, 3.0])
        self._running.append((job, element))
        if jobfiles.cancel_path(req.job_dir, element.index) in self.fs:
            self.trace.append((now, "skipped (withdrawn)", element.key))
            return  # the daemon withdrew it: the worker exits at once, no result
        try:
            kwargs = self._resolve(recipe, element.index)
        except deferred.DeferredError as exc:  # the worker fails the element without running the task
            element.result = jobfiles.dumps({"state": "failed", "error": f"cannot resolve inputs: {exc}"})
            return
        self._execute(req, element, int(recipe.get("attempt", 1)), kwargs, now)

    def _resolve(self, recipe: dict[str, Any], index: int | None) -> dict[str, Any]:
        def parsed(path: str) -> dict[str, Any] | None:
            raw = self.fs.get(path)
            return json.loads(raw) if raw else None

        if "chain" in recipe:
            assert index is not None
            shared, elements = deferred.resolve_chain(recipe, {index: parsed(deferred.chain_file(recipe, index))})
            mine = elements[index]
            if isinstance(mine, str):
                raise deferred.DeferredError(mine)
            return {**shared, **mine[0]}
        shared, _identity = deferred.resolve_recipe(recipe, {p: parsed(p) for p in deferred.files(recipe)})
        return shared


def slurm_like(runtime: ClusterRuntime) -> None:
    """``adjust`` for :func:`~tests.sim.harness.simulate`: the driver sees Slurm with dependencies on."""
    runtime.scheduler.kind = "slurm"  # type: ignore[misc]
    runtime.config = dataclasses.replace(runtime.config, slurm_dependencies=True)


class EarlyHarness(Harness):
    """The seeded scenarios of :class:`~tests.sim.harness.Harness` (crashes, lost answers, ...) on the simulated
    Slurm with dependencies: downstream tasks go out early, and every invariant must still hold."""

    def __init__(self, seed: int, workdir: Path) -> None:
        super().__init__(seed, workdir)
        self.cluster = DependentCluster(random.Random(seed * 7919 + 1), self.faults, slots=self.cluster.slots)
        # No retries: an element an early array ran for a run that then stopped (cancelled, failed) never
        # became an instance, so a retry runs it again at the same attempt number -- the work is done again, as
        # the user asked, but the invariant (one execution per attempt) cannot tell that from a bug.
        self.plan = [a for a in self.plan if a.kind != "retry"]

    def _runtime(self) -> ClusterRuntime:
        runtime = super()._runtime()
        slurm_like(runtime)
        return runtime


class BuggyEarlyHarness(EarlyHarness):
    """The same, on an adapter with bugs (``Faults.internal_errors``, as ``tests/sim/buggy.py``): an sbatch --
    early or not -- that raises after its job exists, a poll that raises."""

    def __init__(self, seed: int, workdir: Path) -> None:
        super().__init__(seed, workdir)
        self.faults.internal_errors = 0.15


def run_early_seed(seed: int, workdir: Path | None = None, buggy: bool = False) -> Report:
    return run_seed(seed, workdir, BuggyEarlyHarness if buggy else EarlyHarness)


def main(argv: list[str]) -> int:
    """``python -m tests.sim.early [--buggy] SEED [SEED...]``: replay scenarios with early submissions."""
    from .replay import replay

    return replay(argv, lambda seed, flags: run_early_seed(seed, buggy="--buggy" in flags),
                  lambda r: f"{r.runs} runs {dict(r.states)}", "python -m tests.sim.early [--buggy] SEED [SEED...]")


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
