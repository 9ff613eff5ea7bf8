"""Inputs a job resolves itself, from its upstream's result files (pure; no I/O, no user code).

A job submitted before its upstream ended (Slurm-side dependencies, ``reflowd/driver/early.py``)
cannot carry its arguments: they are the upstream's outputs. Its ``job.json`` carries a *recipe*
instead -- the task's manifest, its run parameters, and for every upstream element either the
path of the result file that will hold its output or, for one that already succeeded, its output
and hash -- and the worker, once Slurm releases the job, reads those files and resolves the
arguments and the instance's identity with the engine's own :func:`resolve.resolve`, so both
sides agree to the digit. The daemon checks a recipe against what it knows before it adopts
the job (:func:`matches`), and the worker's identity against its own when the result comes back.

Recipe (JSON)::

    {"format": 1, "workflow": ..., "task": <TaskManifest.to_dict()>, "params": {key: encoded},
     "run_dir": ..., "attempt": n,
     "upstream": {dep: {"is_array": bool, "elements": [["file", path] | ["value", output, hash], ...]}}}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from reflow_client.manifest import TaskManifest

from .resolve import UpstreamView, identity_for, resolve

FORMAT = 1
#: The key of ``job.json`` that holds the recipe (and marks a job that resolves its own inputs).
JOB_KEY = "deferred"
#: Set in such a job's result: the daemon compares the identity the worker resolved with its own.
RESULT_KEY = "resolved_inputs"


class DeferredError(ValueError):
    """The inputs cannot be resolved from the upstream results (missing, failed or malformed)."""


def recipe(workflow: str, task: TaskManifest, params: Mapping[str, Any], run_dir: str, attempt: int,
           upstream: Mapping[str, tuple[bool, list[list[Any]]]]) -> dict[str, Any]:
    """The recipe of one singleton instance; *upstream* maps each dependency to (is_array, elements)."""
    return {
        "format": FORMAT,
        "workflow": workflow,
        "task": task.to_dict(),
        "params": {key: params[key] for key in task.params.values() if key in params},
        "run_dir": run_dir,
        "attempt": attempt,
        "upstream": {dep: {"is_array": is_array, "elements": elements}
                     for dep, (is_array, elements) in upstream.items()},
    }


def files(data: Mapping[str, Any]) -> list[str]:
    """The result files a recipe reads."""
    return [e[1] for up in data["upstream"].values() for e in up["elements"] if e[0] == "file"]


def resolve_recipe(data: Mapping[str, Any], results: Mapping[str, Mapping[str, Any] | None]
                   ) -> tuple[dict[str, Any], str]:
    """The instance's encoded keyword arguments and identity, given the parsed result files by path
    (None: missing). Raises DeferredError if an upstream element has no successful result."""
    if data.get("format") != FORMAT:
        raise DeferredError(f"recipe format {data.get('format')!r} is not {FORMAT} (a newer reflowd wrote it)")
    task = TaskManifest.from_dict(data["task"], "deferred.task")
    if task.is_array:
        raise DeferredError(f"task {task.name!r} is an array task: only single instances resolve their inputs")
    views: dict[str, UpstreamView] = {}
    for dep, up in data["upstream"].items():
        outputs: list[Any] = []
        hashes: list[str | None] = []
        for n, element in enumerate(up["elements"]):
            if element[0] == "value":
                outputs.append(element[1])
                hashes.append(element[2])
                continue
            result = results.get(element[1])
            if result is None:
                raise DeferredError(f"upstream {dep} element {n} left no result ({element[1]})")
            if result.get("state") != "succeeded":
                raise DeferredError(f"upstream {dep} element {n} did not succeed ({element[1]})")
            outputs.append(result.get("output"))
            hashes.append(result.get("output_hash"))
        views[dep] = UpstreamView(is_array=bool(up["is_array"]), outputs=outputs, hashes=hashes,
                                  ok=[True] * len(outputs))
    missing = [d for d in task.dependencies if d not in views]
    if missing:
        raise DeferredError(f"recipe has no upstream {', '.join(missing)}")
    res = resolve(task, views, data["params"], data["run_dir"])
    if res.blocked:
        raise DeferredError(res.blocked)
    return dict(res.shared), identity_for(data["workflow"], task, res, None)


def matches(data: Mapping[str, Any], attempt: int,
            current: Callable[[str, int], tuple[str | None, str | None] | None]) -> str | None:
    """Does a recipe still describe the instance's inputs? None if so, else why not.

    *current(dep, n)* says how the engine knows upstream element *n* of *dep* now: ``(result path, output
    hash)`` if it succeeded (path None for one that succeeded without a job, a cache hit), None if not."""
    if data.get("format") != FORMAT:
        return f"recipe format {data.get('format')!r}"
    if data.get("attempt") != attempt:
        return f"written for attempt {data.get('attempt')}, the instance is at {attempt}"
    for dep, up in data["upstream"].items():
        for n, element in enumerate(up["elements"]):
            now = current(dep, n)
            if now is None:
                return f"upstream {dep} element {n} has not succeeded"
            if element[0] == "file" and now[0] != element[1]:
                return f"upstream {dep} element {n} succeeded elsewhere ({now[0]}), not in {element[1]}"
            if element[0] == "value" and now[1] != element[2]:
                return f"upstream {dep} element {n} has another output now"
    return None


__all__ = ["DeferredError", "FORMAT", "JOB_KEY", "RESULT_KEY", "files", "matches", "recipe", "resolve_recipe"]
