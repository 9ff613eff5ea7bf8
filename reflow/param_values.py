"""Run-parameter values given from Python, checked by the command line's rules.

One rule, the same for ``wf.submit(...)``, ``wf.run_local(...)`` and
``submit_run``: a value that already has the parameter's type is taken as
it is; a string is parsed exactly as the generated CLI parses that flag's
text (``"3"`` from a config file is the int 3, ``"yes"`` a bool,
``"2025-01-31"`` a date, ``"red"`` an enum member); an int is accepted for a
float; a list or tuple for ``list[T]``, element by element. Anything else
is refused with a TypeError naming the parameter, before anything runs.
"""

from __future__ import annotations

import argparse
import enum
from pathlib import PurePath
from typing import Any, ForwardRef, Literal, Union, get_args, get_origin

from .typeinfo import is_union, is_unknown, list_element, strip_optional, type_repr


class _Mismatch(Exception):
    """The value does not fit the type (internal; becomes a TypeError naming the parameter)."""


def check_value(name: str, tp: Any, value: Any) -> Any:
    """*value* for parameter *name* of type *tp*, converted by the rule above, or TypeError."""
    try:
        return _coerce(tp, value)
    except _Mismatch as exc:
        why = f": {exc}" if str(exc) else ""
        raise TypeError(
            f"parameter {name!r} expects {type_repr(tp)}, got {value!r} ({type(value).__name__}){why}"
        ) from None


def _coerce(tp: Any, value: Any) -> Any:
    if is_unknown(tp) or isinstance(tp, (str, ForwardRef)):  # unknown, or an annotation Python could not resolve
        return value
    inner, optional = strip_optional(tp)
    if value is None:
        if optional or inner is type(None):
            return None
        raise _Mismatch("None is only accepted for Optional[...] parameters")
    if is_union(inner):
        arms = [a for a in get_args(inner) if a is not type(None)]
        for arm in arms:  # a value that already fits an arm keeps its type
            try:
                return _exact(arm, value)
            except _Mismatch:
                continue
        for arm in arms:
            try:
                return _coerce(arm, value)
            except _Mismatch:
                continue
        raise _Mismatch()
    elem = list_element(inner)
    if elem is not None:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch("give a list")
        items = [_coerce(elem, v) for v in value]
        return tuple(items) if (get_origin(inner) or inner) is tuple else items
    if isinstance(value, str) and inner is not str:
        return _parse(inner, value)
    return _exact(inner, value)


def _parse(tp: Any, text: str) -> Any:
    """Text the way the CLI reads it for this type."""
    from .cli import value_parser  # the CLI's own parsers: one definition of "what a flag's text means"

    try:
        parse, _ = value_parser(tp)
    except TypeError:  # a type the command line cannot give: text is simply the wrong type
        raise _Mismatch() from None
    try:
        return parse(text)
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise _Mismatch(str(exc) if isinstance(exc, argparse.ArgumentTypeError) else "") from None


def _exact(tp: Any, value: Any) -> Any:
    """*value* if it already is a *tp* (int widened to float, an enum's value to its member)."""
    if is_unknown(tp):
        return value
    origin = get_origin(tp)
    if origin is Literal:
        for choice in get_args(tp):
            if type(choice) is type(value) and choice == value:
                return value
        raise _Mismatch(f"choose one of {', '.join(repr(c) for c in get_args(tp))}")
    if origin is Union or is_union(tp) or list_element(tp) is not None:
        return _coerce(tp, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch()
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        try:
            return tp(value)
        except ValueError:
            raise _Mismatch(f"choose one of {', '.join(repr(m.value) for m in tp)}") from None
    if isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, PurePath):
            return tp(value)
        raise _Mismatch()
    check = origin or tp
    if isinstance(check, type):
        try:
            ok = isinstance(value, check)
        except TypeError:  # a class that refuses isinstance checks: nothing to check against
            return value
        if not ok:
            raise _Mismatch()
    return value
