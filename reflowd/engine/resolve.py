"""Turning upstream outputs into a task's arguments (pure, encoded values only).

Given the finished upstream tasks, decide for a task: how many elements it
has, which elements cannot run because what they need failed, the arguments
every element shares, the arguments of each element, and the Merkle identity
of each element. Nothing here imports user code or does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from reflow_client import codec
from reflow_client.identity import instance_identity
from reflow_client.manifest import ELEMENT_MODES, TaskManifest


class ResolveError(ValueError):
    """The inputs cannot be built (e.g. fan-out over something that is not a list)."""


@dataclass(frozen=True)
class UpstreamView:
    """A finished upstream task: outputs in index order (one for a singleton)."""

    is_array: bool
    outputs: Sequence[Any]
    hashes: Sequence[str | None]
    ok: Sequence[bool]
    #: The task never got its elements (upstream failure, cancel): nothing of it exists to chain from.
    blocked: bool = False

    @property
    def all_ok(self) -> bool:
        return all(self.ok)

    @property
    def combined_hash(self) -> str:
        return codec.value_hash(list(self.hashes))


@dataclass
class Resolution:
    """What a task's instances need, or why they cannot run."""

    blocked: str | None = None  # whole task cannot run (reason)
    size: int | None = None  # elements (arrays only)
    shared: dict[str, Any] = field(default_factory=dict)  # encoded kwargs common to all elements
    shared_hashes: list[str] = field(default_factory=list)
    elements: list[dict[str, Any]] = field(default_factory=list)  # encoded kwargs per element
    element_hashes: list[list[str]] = field(default_factory=list)
    element_blocked: list[str | None] = field(default_factory=list)  # per element reason


def _gathered(view: UpstreamView, flatten: bool, what: str) -> list[Any]:
    if not flatten:
        return list(view.outputs)
    out: list[Any] = []
    for i, item in enumerate(view.outputs):
        out.extend(codec.elements(item, f"{what} element {i}"))
    return out


def resolve(
    task: TaskManifest,
    upstream: Mapping[str, UpstreamView],
    params: Mapping[str, Any],
    run_dir: str,
) -> Resolution:
    """Resolve *task* against finished upstream tasks. Raises ResolveError for malformed values."""
    res = Resolution()
    never_ran = [dep for dep in task.dependencies if upstream[dep].blocked]
    if never_ran:
        res.blocked = f"upstream task(s) {', '.join(never_ran)} never ran"
        return res
    failed_shared = [
        dep for dep in task.dependencies if not _is_element_dep(task, dep) and not upstream[dep].all_ok
    ]
    if failed_shared:
        res.blocked = f"upstream task(s) {', '.join(failed_shared)} did not succeed"
        return res

    # Run parameters and the run directory.
    for pname, key in task.params.items():
        if key in params:
            res.shared[pname] = params[key]
    for pname in task.run_dir_params:
        res.shared[pname] = {codec.TAG: "path", "value": run_dir}

    element_lists: dict[str, list[Any]] = {}
    element_hash_lists: dict[str, list[str]] = {}
    element_ok_lists: dict[str, list[bool]] = {}
    for pname, sources in task.inputs.items():
        if task.is_array and sources[0].mode in ELEMENT_MODES:
            values: list[Any] = []
            hashes: list[str] = []
            oks: list[bool] = []
            for src in sources:
                view = upstream[src.step]
                what = f"output of {src.step!r} (for {task.name}.{pname})"
                if src.mode == "fanout":
                    if not view.all_ok:
                        res.blocked = f"upstream task {src.step} did not succeed"
                        return res
                    items = _elements(view.outputs[0], what)
                    values.extend(items)
                    # The upstream's whole output hash, not the element's: a path can name new content.
                    hashes.extend([view.hashes[0] or ""] * len(items))
                    oks.extend([True] * len(items))
                elif src.mode == "chain_flatten":
                    if not view.all_ok:
                        res.blocked = f"upstream task {src.step} did not fully succeed (needed to flatten)"
                        return res
                    items = _safe(lambda v=view, w=what: _gathered(v, True, w))
                    values.extend(items)
                    hashes.extend([view.combined_hash] * len(items))
                    oks.extend([True] * len(items))
                else:  # chain
                    values.extend(view.outputs)
                    hashes.extend(h or "" for h in view.hashes)
                    oks.extend(view.ok)
            element_lists[pname] = values
            element_hash_lists[pname] = hashes
            element_ok_lists[pname] = oks
            continue
        contribution: list[Any] = []
        single: Any = None
        for src in sources:
            view = upstream[src.step]
            what = f"output of {src.step!r} (for {task.name}.{pname})"
            res.shared_hashes.extend(h or "" for h in view.hashes)
            if src.mode == "direct":
                single = view.outputs[0]
            elif src.mode == "broadcast":
                single = view.outputs[0] if not view.is_array else list(view.outputs)
            elif src.mode == "gather":
                contribution.extend(view.outputs)
            elif src.mode == "gather_flatten":
                contribution.extend(_safe(lambda v=view, w=what: _gathered(v, True, w)))
            else:
                raise ResolveError(f"mode {src.mode!r} cannot feed parameter {pname!r} of task {task.name!r}")
        if sources[0].mode in ("direct", "broadcast"):
            res.shared[pname] = single
        else:
            res.shared[pname] = contribution

    # after=[...] dependencies carry no data but their outputs are part of the identity.
    wired = {s.step for srcs in task.inputs.values() for s in srcs}
    for dep in task.dependencies:
        if dep not in wired:
            res.shared_hashes.append(upstream[dep].combined_hash)

    if not task.is_array:
        return res

    lengths = {p: len(v) for p, v in element_lists.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{p!r} has {n}" for p, n in lengths.items())
        raise ResolveError(f"array task {task.name!r} fans out over inputs of different lengths: {detail}")
    size = next(iter(lengths.values()), 0)
    res.size = size
    for i in range(size):
        res.elements.append({p: element_lists[p][i] for p in element_lists})
        res.element_hashes.append([element_hash_lists[p][i] for p in element_lists])
        bad = [p for p in element_lists if not element_ok_lists[p][i]]
        res.element_blocked.append(
            f"upstream element {i} feeding {', '.join(bad)} did not succeed" if bad else None
        )
    return res


def _is_element_dep(task: TaskManifest, dep: str) -> bool:
    """Is *dep* only an element source of an array task (its failures block single elements)?"""
    if not task.is_array:
        return False
    modes = [s.mode for srcs in task.inputs.values() for s in srcs if s.step == dep]
    return bool(modes) and all(m in ELEMENT_MODES for m in modes)


def _elements(value: Any, what: str) -> list[Any]:
    try:
        return codec.elements(value, what)
    except codec.CodecError as exc:
        raise ResolveError(str(exc)) from None


def _safe(fn: Any) -> list[Any]:
    try:
        return fn()
    except codec.CodecError as exc:
        raise ResolveError(str(exc)) from None


def identity_for(
    workflow: str,
    task: TaskManifest,
    res: Resolution,
    index: int | None,
) -> str:
    """Merkle identity of one instance from its resolution."""
    wired = set(task.inputs)
    kwargs = dict(res.shared)
    hashes = list(res.shared_hashes)
    if index is not None:
        kwargs.update(res.elements[index])
        hashes.extend(res.element_hashes[index])
    return instance_identity(
        workflow=workflow,
        task=task.name,
        version=task.version,
        params={k: v for k, v in kwargs.items() if k not in wired},
        inputs={k: v for k, v in kwargs.items() if k in wired},
        upstream_hashes=hashes,
    )
