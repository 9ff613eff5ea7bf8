"""Reading type annotations: markers, list element types, compatibility.

Wiring modes are inferred from annotations, so these rules decide what a
user's pipeline means. They are deliberately lenient where Python typing is
vague (``Any``, unannotated, unknown generics) and strict for plain classes.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from .params import Param, Result, RunDir

_LIST_ORIGINS = (list, collections.abc.Sequence, collections.abc.MutableSequence, collections.abc.Iterable)
_NONE = type(None)


def split_annotated(annotation: Any) -> tuple[Any, list[Any]]:
    """Return (underlying type, reflow markers) of a parameter annotation."""
    if annotation is inspect.Parameter.empty:
        return Any, []
    if annotation is RunDir:
        from pathlib import Path

        return Path, [RunDir()]
    if get_origin(annotation) is Annotated:
        base, *meta = get_args(annotation)
        markers = [m for m in meta if isinstance(m, (Param, Result, RunDir)) or m is RunDir]
        markers = [RunDir() if m is RunDir else m for m in markers]
        return base, markers
    return annotation, []


def strip_optional(tp: Any) -> tuple[Any, bool]:
    """``Optional[T]`` -> (T, True); anything else -> (tp, False)."""
    if is_union(tp):
        args = [a for a in get_args(tp) if a is not _NONE]
        if len(args) < len(get_args(tp)):
            if len(args) == 1:
                return args[0], True
            return Union[tuple(args)], True  # noqa: UP007 - runtime construction
    return tp, False


def is_union(tp: Any) -> bool:
    origin = get_origin(tp)
    return origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType))


def is_unknown(tp: Any) -> bool:
    return tp is Any or tp is inspect.Parameter.empty or tp is None or isinstance(tp, typing.TypeVar)


def list_element(tp: Any) -> Any | None:
    """Element type when *tp* is list-like (``list[T]``, ``Sequence[T]``, ``tuple[T, ...]``), else None."""
    tp, _ = strip_optional(tp)
    if tp in (list, tuple) or tp in _LIST_ORIGINS:
        return Any
    origin = get_origin(tp)
    if origin in _LIST_ORIGINS:
        args = get_args(tp)
        return args[0] if args else Any
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
    return None


def compatible(src: Any, dst: Any) -> bool:
    """Can a value of type *src* be passed where *dst* is expected?"""
    if is_unknown(src) or is_unknown(dst):
        return True
    if src == dst:
        return True
    dst_inner, dst_optional = strip_optional(dst)
    if src is _NONE:
        return dst_optional
    if is_union(dst_inner):
        return any(compatible(src, d) for d in get_args(dst_inner))
    src_inner, _ = strip_optional(src)
    if is_union(src_inner):
        return all(compatible(s, dst_inner) for s in get_args(src_inner) if s is not _NONE)
    if get_origin(dst_inner) is Literal:
        return get_origin(src_inner) is Literal and set(get_args(src_inner)) <= set(get_args(dst_inner))
    if get_origin(src_inner) is Literal:
        return all(compatible(type(v), dst_inner) for v in get_args(src_inner))
    src_elem, dst_elem = list_element(src_inner), list_element(dst_inner)
    if dst_elem is not None:
        return src_elem is not None and compatible(src_elem, dst_elem)
    if src_elem is not None:
        return False
    src_origin = get_origin(src_inner) or src_inner
    dst_origin = get_origin(dst_inner) or dst_inner
    if dst_origin is float and src_origin is int:
        return True
    if dst_origin is complex and src_origin in (int, float):
        return True
    if isinstance(src_origin, type) and isinstance(dst_origin, type):
        try:
            if not issubclass(src_origin, dst_origin):
                return False
        except TypeError:
            return True
        src_args, dst_args = get_args(src_inner), get_args(dst_inner)
        if src_args and dst_args and len(src_args) == len(dst_args):
            return all(compatible(s, d) for s, d in zip(src_args, dst_args))
        return True
    return True


def type_repr(tp: Any) -> str:
    """Readable, stable text for a type (manifest, error messages)."""
    if tp is inspect.Parameter.empty or tp is None:
        return "None" if tp is None else "Any"
    if tp is _NONE:
        return "None"
    if isinstance(tp, type) and not get_args(tp):
        plain = ("builtins", "__main__", "pathlib", "datetime", "typing", "decimal")
        return tp.__qualname__ if tp.__module__ in plain else f"{tp.__module__}.{tp.__qualname__}"
    text = repr(tp)
    for prefix in ("typing.", "collections.abc.", "pathlib.", "datetime."):
        text = text.replace(prefix, "")
    return text
