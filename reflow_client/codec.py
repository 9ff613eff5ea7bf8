"""JSON-safe value codec for task inputs and outputs.

Task outputs travel through files and the daemon as JSON. The daemon splits,
gathers and hashes *encoded* values without ever importing user code, so the
encoding must be plain JSON whose list structure mirrors the Python value:
a ``list`` stays a JSON array (fan-out splits it), everything JSON cannot say
natively becomes a tagged object ``{"__reflow__": kind, ...}``.

Decoding user classes (enums, dataclasses, named tuples) needs the class; it
is looked up by ``module:qualname`` among loaded modules. Classes defined in
the workflow file itself are stored under the alias ``__workflow__`` because
that file is ``__main__`` in the submitting process and a differently named
module in the worker.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as _dt
import enum
import hashlib
import importlib
import json
import math
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path, PurePath, PureWindowsPath
from typing import Any

TAG = "__reflow__"
WORKFLOW_ALIAS = "__workflow__"

# Name of the module that holds the user's workflow file in this process.
_workflow_module_name = "__main__"


class CodecError(TypeError):
    """A value cannot be encoded or decoded."""


def set_workflow_module(name: str) -> None:
    """Declare which loaded module is the user's workflow file (worker side)."""
    global _workflow_module_name
    _workflow_module_name = name


@contextlib.contextmanager
def workflow_module(name: str | None) -> Iterator[None]:
    """Temporarily treat module *name* as the workflow file (a process that loaded several workflows)."""
    global _workflow_module_name
    previous = _workflow_module_name
    if name:
        _workflow_module_name = name
    try:
        yield
    finally:
        _workflow_module_name = previous


def _class_ref(cls: type) -> str:
    module = cls.__module__
    if module in ("__main__", _workflow_module_name):
        module = WORKFLOW_ALIAS
    if "<locals>" in cls.__qualname__:
        raise CodecError(
            f"cannot encode an instance of {cls.__qualname__!r}: it is defined inside a "
            "function; define the class at module level so the worker can find it"
        )
    return f"{module}:{cls.__qualname__}"


def _resolve_class(ref: str) -> type:
    module_name, _, qualname = ref.partition(":")
    if module_name == WORKFLOW_ALIAS:
        module_name = _workflow_module_name
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise CodecError(f"cannot decode {ref!r}: module {module_name!r} not importable") from exc
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise CodecError(f"cannot decode {ref!r}: {qualname!r} not found in {module_name!r}")
    if not isinstance(obj, type):
        raise CodecError(f"cannot decode {ref!r}: it is not a class")
    return obj


def encode(value: Any, _path: str = "value") -> Any:
    """Return a JSON-safe form of *value*; raise CodecError naming what failed."""
    if isinstance(value, enum.Enum):  # before str/int: ``class Mode(str, Enum)`` must stay a Mode
        return {TAG: "enum", "cls": _class_ref(type(value)), "value": encode(value.value, _path)}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return {TAG: "float", "value": repr(value)}
    if isinstance(value, list):
        return [encode(v, f"{_path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return {
            TAG: "namedtuple",
            "cls": _class_ref(type(value)),
            "fields": {f: encode(getattr(value, f), f"{_path}.{f}") for f in value._fields},
        }
    if isinstance(value, tuple):
        return {TAG: "tuple", "items": [encode(v, f"{_path}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and TAG not in value:
            return {k: encode(v, f"{_path}[{k!r}]") for k, v in value.items()}
        return {
            TAG: "dict",
            "items": [[encode(k, f"{_path} key"), encode(v, f"{_path}[{k!r}]")] for k, v in value.items()],
        }
    if isinstance(value, PurePath):
        kind = "winpath" if isinstance(value, PureWindowsPath) else "path"
        return {TAG: kind, "value": str(value)}
    if isinstance(value, _dt.datetime):
        return {TAG: "datetime", "value": value.isoformat()}
    if isinstance(value, _dt.date):
        return {TAG: "date", "value": value.isoformat()}
    if isinstance(value, _dt.time):
        return {TAG: "time", "value": value.isoformat()}
    if isinstance(value, _dt.timedelta):  # exact: total_seconds() is a float and loses microseconds
        return {TAG: "timedelta", "days": value.days, "seconds": value.seconds, "microseconds": value.microseconds}
    if isinstance(value, (set, frozenset)):
        items = [encode(v, f"{_path} item") for v in value]
        items.sort(key=canonical_json)
        return {TAG: "frozenset" if isinstance(value, frozenset) else "set", "items": items}
    if isinstance(value, (bytes, bytearray)):
        return {TAG: "bytes", "value": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, Decimal):
        return {TAG: "decimal", "value": str(value)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            TAG: "dataclass",
            "cls": _class_ref(type(value)),
            "fields": {
                f.name: encode(getattr(value, f.name), f"{_path}.{f.name}")
                for f in dataclasses.fields(value)
                if f.init
            },
        }
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump) and hasattr(type(value), "model_validate"):
        return {TAG: "model", "cls": _class_ref(type(value)), "fields": encode(model_dump(), _path)}
    raise CodecError(
        f"cannot encode {_path} of type {type(value).__module__}.{type(value).__qualname__}: "
        "task outputs and parameters must be JSON-like values, Path, datetime/date/time/timedelta, "
        "tuple, set, bytes, Decimal, Enum, dataclass or NamedTuple"
    )


def decode(data: Any) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(data, list):
        return [decode(v) for v in data]
    if not isinstance(data, dict):
        return data
    kind = data.get(TAG)
    if kind is None:
        return {k: decode(v) for k, v in data.items()}
    try:
        if kind == "tuple":
            return tuple(decode(v) for v in data["items"])
        if kind == "dict":
            return {decode(k): decode(v) for k, v in data["items"]}
        if kind == "path":
            return Path(data["value"])
        if kind == "winpath":
            return PureWindowsPath(data["value"])
        if kind == "datetime":
            return _dt.datetime.fromisoformat(data["value"])
        if kind == "date":
            return _dt.date.fromisoformat(data["value"])
        if kind == "time":
            return _dt.time.fromisoformat(data["value"])
        if kind == "timedelta":
            if "value" in data:
                return _dt.timedelta(seconds=data["value"])
            return _dt.timedelta(days=data["days"], seconds=data["seconds"], microseconds=data["microseconds"])
        if kind == "float":
            return float(data["value"])
        if kind == "set":
            return {decode(v) for v in data["items"]}
        if kind == "frozenset":
            return frozenset(decode(v) for v in data["items"])
        if kind == "bytes":
            return base64.b64decode(data["value"])
        if kind == "decimal":
            return Decimal(data["value"])
        if kind == "enum":
            return _resolve_class(data["cls"])(decode(data["value"]))
        if kind in ("dataclass", "namedtuple"):
            cls = _resolve_class(data["cls"])
            return cls(**{k: decode(v) for k, v in data["fields"].items()})
        if kind == "model":
            return _resolve_class(data["cls"]).model_validate(decode(data["fields"]))
    except CodecError:
        raise
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"malformed encoded {kind!r} value: {exc}") from exc
    raise CodecError(f"unknown encoded kind {kind!r}")


def _canonical(data: Any) -> Any:
    """*data* with the items of non-str-key dicts sorted (JSON objects are sorted by ``sort_keys``)."""
    if isinstance(data, list):
        return [_canonical(v) for v in data]
    if isinstance(data, dict):
        out = {k: _canonical(v) for k, v in data.items()}
        if out.get(TAG) == "dict" and isinstance(out.get("items"), list):
            out["items"] = sorted(out["items"], key=canonical_json)
        return out
    return data


def canonical_json(data: Any) -> str:
    """Deterministic JSON text of an encoded value (for hashing and sorting); dict order does not matter."""
    return json.dumps(_canonical(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def value_hash(encoded: Any) -> str:
    """Content hash of an encoded value."""
    return hashlib.sha256(canonical_json(encoded).encode("utf-8")).hexdigest()


def elements(encoded: Any, what: str = "value") -> list[Any]:
    """Split an encoded sequence into encoded elements (daemon-side fan-out)."""
    if isinstance(encoded, list):
        return list(encoded)
    if isinstance(encoded, dict) and encoded.get(TAG) in ("tuple", "set", "frozenset"):
        return list(encoded["items"])
    raise CodecError(f"{what} is not a list, so it cannot be fanned out or flattened")


def encoded_paths(encoded: Any) -> list[str]:
    """Every filesystem path inside an encoded value (for output verification)."""
    found: list[str] = []
    stack = [encoded]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            if item.get(TAG) == "path":
                found.append(item["value"])
            else:
                stack.extend(item.values())
    return found


__all__ = [
    "CodecError",
    "canonical_json",
    "decode",
    "elements",
    "encode",
    "encoded_paths",
    "set_workflow_module",
    "value_hash",
    "workflow_module",
]
