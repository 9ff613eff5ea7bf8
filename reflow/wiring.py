"""Inferring how an upstream output reaches a downstream parameter.

The mode follows from four facts: is the upstream an array, is the downstream
an array, the upstream's return type and the parameter's type (plus an
explicit ``broadcast=True``). A list flowing into an array task whose
parameter also takes a list is broadcast whole, never zipped by accident.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reflow_client.manifest import ELEMENT_MODES

from .typeinfo import compatible, is_unknown, list_element, type_repr


@dataclass(frozen=True)
class Edge:
    """One (upstream step -> downstream parameter) connection."""

    upstream: str
    upstream_type: Any
    upstream_array: bool
    downstream: str
    param: str
    param_type: Any
    downstream_array: bool
    broadcast: bool
    n_steps: int


def _fail(edge: Edge, why: str) -> TypeError:
    up = f"{'array ' if edge.upstream_array else ''}task {edge.upstream!r} returns {type_repr(edge.upstream_type)}"
    down = (
        f"parameter {edge.param!r} of {'array ' if edge.downstream_array else ''}task {edge.downstream!r} "
        f"expects {type_repr(edge.param_type)}"
    )
    return TypeError(f"incompatible wiring {edge.upstream!r} -> {edge.downstream}.{edge.param}: {up}, but {down}; {why}")


def infer_mode(edge: Edge) -> str:
    """The wiring mode of one edge, or TypeError naming upstream, downstream and parameter."""
    r, p = edge.upstream_type, edge.param_type
    r_elem = None if is_unknown(r) else list_element(r)
    p_elem = None if is_unknown(p) else list_element(p)
    if not edge.upstream_array and not edge.downstream_array:
        if edge.broadcast:
            raise _fail(edge, "broadcast=True only applies when the downstream task is an array")
        if edge.n_steps == 1 and compatible(r, p):
            return "direct"
        if edge.n_steps > 1 and p_elem is None and not is_unknown(p):
            raise _fail(edge, "a parameter fed by several steps must be a list")
        if edge.n_steps > 1 and r_elem is not None and compatible(r, p):
            return "gather_flatten"
        if (p_elem is not None and compatible(r, p_elem)) or (is_unknown(p) and edge.n_steps > 1):
            return "gather"
        raise _fail(edge, "change one of the annotations")
    if not edge.upstream_array and edge.downstream_array:
        if edge.broadcast:
            if compatible(r, p):
                return "broadcast"
            raise _fail(edge, "with broadcast=True the whole value is passed, so the types must match")
        if is_unknown(r):
            return "broadcast" if p_elem is not None else "fanout"
        if is_unknown(p):
            return "fanout" if r_elem is not None else "broadcast"
        if r_elem is not None and p_elem is None and compatible(r_elem, p):
            return "fanout"
        if r_elem is not None and p_elem is not None:
            if compatible(r, p):
                return "broadcast"
            if compatible(r_elem, p):
                return "fanout"
        if r_elem is None and compatible(r, p):
            return "broadcast"
        hint = "to fan out, the upstream must return list[...] of the parameter's type"
        raise _fail(edge, hint)
    if edge.upstream_array and not edge.downstream_array:
        if edge.broadcast:
            raise _fail(edge, "broadcast=True only applies when the downstream task is an array")
        if is_unknown(p):
            return "gather"
        if p_elem is None:
            raise _fail(edge, "an array's outputs are gathered into a list, so the parameter must be list[...]")
        if compatible(r, p_elem):
            return "gather"
        if r_elem is not None and compatible(r_elem, p_elem):
            return "gather_flatten"
        raise _fail(edge, "the list's element type must match what each array element returns")
    # array -> array
    if edge.broadcast:
        if (p_elem is not None and compatible(r, p_elem)) or is_unknown(p):
            return "broadcast"
        raise _fail(edge, "broadcasting an array's outputs passes list[...] of them to every element")
    if is_unknown(r) or is_unknown(p) or compatible(r, p):
        return "chain"
    if r_elem is not None and compatible(r_elem, p):
        return "chain_flatten"
    raise _fail(edge, "element i of the upstream feeds element i of the downstream, so the types must match")


def check_param_modes(task: str, param: str, modes: list[str], downstream_array: bool) -> None:
    """Refuse combinations of steps that have no single meaning."""
    if not downstream_array or len(modes) < 2:
        return
    element = [m for m in modes if m in ELEMENT_MODES]
    if element and len(element) != len(modes):
        raise TypeError(
            f"parameter {param!r} of array task {task!r} mixes fanned-out and broadcast steps; "
            "split it into two parameters"
        )
    if not element:
        raise TypeError(
            f"parameter {param!r} of array task {task!r} broadcasts several steps; a broadcast parameter takes one step"
        )
