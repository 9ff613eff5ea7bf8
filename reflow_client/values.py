"""Showing encoded task values to people and to JSON readers, without importing user code.

The daemon keeps outputs in the codec's encoding (``{"__reflow__": "path",
...}``). A client that shows them must not import the classes they name (the
workflow file may not even be here), so these functions read the encoding
directly: :func:`show` gives Python-like text (``Path('/x')``,
``Stats(n=3)``), :func:`plain` gives JSON-native values (a path is a string,
a dataclass an object of its fields) for ``--json``.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from .codec import TAG


def _class_name(ref: str) -> str:
    return ref.partition(":")[2].rsplit(".", 1)[-1] or ref


def plain(data: Any) -> Any:
    """The encoded value as plain JSON (lossy for types JSON lacks; for machines reading ``--json``)."""
    if isinstance(data, list):
        return [plain(v) for v in data]
    if not isinstance(data, dict):
        return data
    kind = data.get(TAG)
    if kind is None:
        return {k: plain(v) for k, v in data.items()}
    if kind in ("tuple", "set", "frozenset"):
        return [plain(v) for v in data.get("items", [])]
    if kind == "dict":
        items = data.get("items", [])
        if all(isinstance(k, (str, int, float, bool)) or k is None for k, _ in items):
            return {str(k) if not isinstance(k, str) else k: plain(v) for k, v in items}
        return [[plain(k), plain(v)] for k, v in items]
    if kind in ("dataclass", "namedtuple"):
        return {k: plain(v) for k, v in data.get("fields", {}).items()}
    if kind == "model":
        return plain(data.get("fields"))
    if kind == "enum":
        return plain(data.get("value"))
    if kind == "timedelta":
        if "value" in data:
            return data["value"]
        return data.get("days", 0) * 86400 + data.get("seconds", 0) + data.get("microseconds", 0) / 1e6
    if kind == "float":
        return data.get("value")  # "inf"/"nan": JSON has no such numbers
    return data.get("value")  # path, winpath, datetime, date, time, decimal, bytes (base64)


def show(data: Any, limit: int = 300, max_items: int = 20) -> str:
    """Python-like text of an encoded value: at most *max_items* per sequence, cut to *limit* characters."""
    text = _show(data, max_items)
    return text if limit <= 0 or len(text) <= limit else text[: max(limit - 3, 1)] + "..."


def _items(items: list[Any], max_items: int) -> str:
    shown = [_show(v, max_items) for v in items[:max_items]]
    if len(items) > max_items:
        shown.append(f"... ({len(items)} items)")
    return ", ".join(shown)


def _show(data: Any, max_items: int) -> str:
    if isinstance(data, list):
        return f"[{_items(data, max_items)}]"
    if not isinstance(data, dict):
        return repr(data)
    kind = data.get(TAG)
    if kind is None:
        return _mapping(list(data.items()), max_items)
    value = data.get("value")
    if kind in ("path", "winpath"):
        return f"Path({value!r})"
    if kind in ("datetime", "date", "time"):
        return f"{kind}({value!r})"
    if kind == "timedelta":
        return f"timedelta(seconds={plain(data)!r})"
    if kind == "decimal":
        return f"Decimal({value!r})"
    if kind == "float":
        return f"float({value!r})"
    if kind == "bytes":
        raw = base64.b64decode(value or "")
        return repr(raw[:64]) + ("..." if len(raw) > 64 else "")
    if kind == "tuple":
        items = data.get("items", [])
        return f"({_items(items, max_items)}{',' if len(items) == 1 else ''})"
    if kind in ("set", "frozenset"):
        items = data.get("items", [])
        inner = "{" + _items(items, max_items) + "}" if items else "()"
        return inner if kind == "set" and items else f"{kind}({inner if items else ''})"
    if kind == "dict":
        return _mapping([(k, v) for k, v in data.get("items", [])], max_items)
    name = _class_name(data.get("cls", ""))
    if kind == "enum":
        return f"{name}({_show(value, max_items)})"
    if kind in ("dataclass", "namedtuple", "model"):
        fields = data.get("fields") or {}
        return f"{name}(" + ", ".join(f"{k}={_show(v, max_items)}" for k, v in fields.items()) + ")"
    return json.dumps(data, default=str)


def _mapping(items: list[tuple[Any, Any]], max_items: int) -> str:
    shown = [f"{_show(k, max_items)}: {_show(v, max_items)}" for k, v in items[:max_items]]
    if len(items) > max_items:
        shown.append(f"... ({len(items)} items)")
    return "{" + ", ".join(shown) + "}"
