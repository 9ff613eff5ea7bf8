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

An **element-wise chain** (array task B mapped over array task A, ``B[i]`` from ``A[i]`` alone, submitted
with ``aftercorr`` on A's array job) carries one recipe for the whole array: its other upstream tasks
(done, as values) under ``upstream`` and, under ``chain``, A's name and size and the job directory whose
``results/<i>.json`` holds ``A[i]``'s output. Element ``i`` resolves with only ``A[i]`` known (the other
elements of A may still run): its arguments and identity depend on ``A[i]`` alone (:func:`chain_source`
admits only such tasks), so they are the engine's to the digit (tests compare them)::

    {..., "upstream": {dep: ... values only ...}, "chain": {"dep": A, "size": n, "job_dir": A's job dir}}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from reflow_client import jobfiles
from reflow_client.manifest import ELEMENT_MODES, TaskManifest

from .resolve import Resolution, UpstreamView, identity_for, resolve

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
    res = _resolved(task, views, data)
    return dict(res.shared), identity_for(data["workflow"], task, res, None)


def _resolved(task: TaskManifest, views: Mapping[str, UpstreamView], data: Mapping[str, Any]) -> Resolution:
    """The engine's own :func:`resolve` on the views a recipe gave, so worker and daemon agree to the
    digit; a recipe that names too few upstreams, or inputs that block the task, cannot run."""
    missing = [d for d in task.dependencies if d not in views]
    if missing:
        raise DeferredError(f"recipe has no upstream {', '.join(missing)}")
    res = resolve(task, views, data["params"], data["run_dir"])
    if res.blocked:
        raise DeferredError(res.blocked)
    return res


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


# ---------------------------------------------------------------------- element-wise chains

#: The attempt a task's instances start at (``Instance.attempt``): a chained array goes out before it expands.
FIRST_ATTEMPT = 1


def chain_source(task: TaskManifest) -> str | None:
    """The array task *task* maps element by element (every element-wise parameter fed by ``chain`` from
    that one task, which feeds nothing else), or None: only then does element ``i`` need ``A[i]`` alone."""
    if not task.is_array:
        return None
    sources = {(s.step, s.mode) for srcs in task.inputs.values() for s in srcs if s.mode in ELEMENT_MODES}
    if len(sources) != 1:
        return None
    (dep, mode), = sources
    if mode != "chain":
        return None
    for srcs in task.inputs.values():
        if any(s.step == dep for s in srcs) and (len(srcs) != 1 or srcs[0].mode != "chain"):
            return None  # A also feeds a whole-value parameter (or shares one with another step)
    return dep


def chain_recipe(workflow: str, task: TaskManifest, params: Mapping[str, Any], run_dir: str,
                 values: Mapping[str, tuple[bool, list[list[Any]]]], dep: str, size: int,
                 job_dir: str) -> dict[str, Any]:
    """The recipe of a chained array (every element at its first attempt): *values* holds the other
    upstream tasks' outputs (``["value", output, hash]`` elements), *job_dir* the job of *dep* whose
    ``results/<i>.json`` element ``i`` reads."""
    data = recipe(workflow, task, params, run_dir, FIRST_ATTEMPT, values)
    data["chain"] = {"dep": dep, "size": size, "job_dir": job_dir}
    return data


def chain_file(data: Mapping[str, Any], index: int) -> str:
    """The result file element *index* of a chained array reads."""
    return jobfiles.result_path(data["chain"]["job_dir"], index)


def resolve_chain(data: Mapping[str, Any], results: Mapping[int, Mapping[str, Any] | None]
                  ) -> tuple[dict[str, Any], dict[int, tuple[dict[str, Any], str] | str]]:
    """A chained array's shared keyword arguments, and for each element of *results* (its upstream
    element's parsed result, None: missing) its own arguments and identity -- or why it cannot run."""
    if data.get("format") != FORMAT:
        raise DeferredError(f"recipe format {data.get('format')!r} is not {FORMAT} (a newer reflowd wrote it)")
    task = TaskManifest.from_dict(data["task"], "deferred.task")
    chain = data["chain"]
    dep, size = chain["dep"], int(chain["size"])
    if not task.is_array or chain_source(task) != dep:
        raise DeferredError(f"task {task.name!r} does not map {dep!r} element by element")
    outputs: list[Any] = [None] * size
    hashes: list[str | None] = [""] * size
    ok = [False] * size
    why: dict[int, str] = {}
    for index, result in results.items():
        if not 0 <= index < size:
            why[index] = f"element {index} is outside upstream {dep} ({size} elements)"
        elif result is None:
            why[index] = f"upstream {dep} element {index} left no result ({chain_file(data, index)})"
        elif result.get("state") != "succeeded":
            why[index] = f"upstream {dep} element {index} did not succeed ({chain_file(data, index)})"
        else:
            outputs[index], hashes[index], ok[index] = result.get("output"), result.get("output_hash"), True
    views = {name: _value_view(name, up) for name, up in data["upstream"].items()}
    views[dep] = UpstreamView(is_array=True, outputs=outputs, hashes=hashes, ok=ok)
    res = _resolved(task, views, data)
    if res.size != size:
        raise DeferredError(f"the task resolves to {res.size} elements, the recipe was written for {size}")
    out: dict[int, tuple[dict[str, Any], str] | str] = {}
    for index in results:
        if index in why:
            out[index] = why[index]
        else:
            out[index] = (dict(res.elements[index]), identity_for(data["workflow"], task, res, index))
    return dict(res.shared), out


def _value_view(dep: str, up: Mapping[str, Any]) -> UpstreamView:
    if any(e[0] != "value" for e in up["elements"]):
        raise DeferredError(f"a chained array's other upstream {dep} must be known (values, not files)")
    return UpstreamView(is_array=bool(up["is_array"]), outputs=[e[1] for e in up["elements"]],
                        hashes=[e[2] for e in up["elements"]], ok=[True] * len(up["elements"]))


def chain_matches(data: Mapping[str, Any], attempt: int, index: int, result_path: str | None) -> str | None:
    """Does a chained array's recipe still describe element *index*? None if so, else why not.
    *result_path*: where the engine's upstream element ``index`` succeeded (None: it has not, or not in a job)."""
    if data.get("format") != FORMAT or "chain" not in data:
        return f"recipe format {data.get('format')!r}"
    if data.get("attempt") != attempt:
        return f"written for attempt {data.get('attempt')}, element {index} is at {attempt}"
    want = chain_file(data, index)
    if result_path != want:
        return f"upstream {data['chain']['dep']} element {index} did not succeed in {want}"
    return None


__all__ = ["DeferredError", "FIRST_ATTEMPT", "FORMAT", "JOB_KEY", "RESULT_KEY", "chain_file", "chain_matches",
           "chain_recipe", "chain_source", "files", "matches", "recipe", "resolve_chain", "resolve_recipe"]
