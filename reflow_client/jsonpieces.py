"""Large JSON documents encoded and decoded a piece at a time.

One ``json.dumps`` or ``json.loads`` of a fan-out's 10^6-element list is a single C call of 100-300 ms that
holds the GIL throughout: on the daemon's event loop nothing else runs meanwhile (a ``ping`` waits), and on
another thread the loop cannot take the GIL back either. Here the long lists and objects near the top of a
value are cut into slices, each a short C call, so the caller can yield (or the GIL can change hands)
between them. The text is byte for byte what ``json.dumps(value, separators=(",", ":"), ensure_ascii=False)``
writes, and the value decoded is what ``json.loads`` returns with the same hooks.

Both are generators: each ``yield`` is a point where the caller may let others run (``drive`` runs one to
its end at once; the daemon's async callers await a checkpoint at each yield).
"""

from __future__ import annotations

import json
import json.decoder
from collections.abc import Callable, Generator, Iterator
from typing import Any, TypeVar

#: Items encoded or decoded between two yields (one slice: about a millisecond of C at most for small items).
SLICE = 4096
#: Containers this deep or deeper are encoded whole (one C call each): the cuts are near the top, where a
#: job file's inputs (``{"kwargs": {"xs": [...]}}``) and a result's output (``{"output": [...]}``) are.
CUT_DEPTH = 3
#: Decoding goes item by item in Python only in the top-level container and the containers it holds
#: directly (a result's output); deeper ones are decoded whole, so a list of 10^6 small objects costs one
#: C call per object, not a Python step per key.
DECODE_CUT_DEPTH = 2

#: Items decoded one by one (in Python) between two yields.
ITEMS_PER_STEP = 512
#: Characters of an array decoded in one C call (``loads_steps``): about a millisecond's work.
STRETCH = 64 * 1024

_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
#: json's C encoder, built once: ``json.dumps`` with options builds an encoder per call, and
#: ``JSONEncoder.encode`` a C encoder per call (with a closure) -- half the cost of a small document.
#: No circular check: a cycle ends in RecursionError, and ``compact`` then lets json say what it says.
_C_ENCODE: Any = (json.encoder.c_make_encoder(None, _ENCODER.default, json.encoder.encode_basestring, None, ":", ",",
                                              False, False, True)
                  if json.encoder.c_make_encoder is not None else None)


def compact(value: Any) -> str:
    """``json.dumps(value, separators=(",", ":"), ensure_ascii=False)``, in one C call: the daemon's one
    way of writing JSON (job files, store columns). A cycle raises json's ValueError, absurd nesting
    RecursionError."""
    if _C_ENCODE is None or type(value) is str:
        return _ENCODER.encode(value)
    try:
        return "".join(_C_ENCODE(value, 0))
    except RecursionError:
        return _ENCODER.encode(value)


_WHITESPACE = json.decoder.WHITESPACE

T = TypeVar("T")


def drive(steps: Generator[Any, None, T]) -> T:
    """Run a pieces generator to its end at once (in a thread, or where yielding does not matter)."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


_CONTAINERS = frozenset((list, dict))


def _big(value: Any) -> bool:
    return type(value) in _CONTAINERS and len(value) > SLICE


def encode(value: Any, depth: int = 0) -> Iterator[str]:
    """The compact JSON text of *value* in pieces (joined: ``json.dumps`` with compact separators, non-ASCII
    kept). A yield of ``""`` marks a point between two slices."""
    if depth >= CUT_DEPTH or type(value) not in _CONTAINERS or (
            type(value) is list and len(value) <= SLICE and _CONTAINERS.isdisjoint(map(type, value))):
        yield compact(value)
        return
    if type(value) is list:
        yield "["
        for start in range(0, len(value), SLICE):
            piece = value[start:start + SLICE]
            if start:
                yield ","
            if not _CONTAINERS.isdisjoint(map(type, piece)) and any(_big(item) for item in piece):
                for n, item in enumerate(piece):
                    if n:
                        yield ","
                    yield from encode(item, depth + 1)
            else:
                yield compact(piece)[1:-1]
            yield ""
        yield "]"
        return
    yield "{"
    for n, (key, item) in enumerate(value.items()):
        if n:
            yield ","
        # (json.dumps turns int, float, bool and None keys into text its own way: let it)
        yield (_ENCODER.encode(key) if isinstance(key, str) else _ENCODER.encode({key: None})[1:-6]) + ":"
        yield from encode(item, depth + 1)
        if n % SLICE == SLICE - 1:
            yield ""
    yield "}"


def dumps_steps(value: Any) -> Generator[None, None, str]:
    """:func:`encode` as a steps generator: yields between slices, returns the whole text."""
    parts: list[str] = []
    for part in encode(value):
        if part:
            parts.append(part)
        else:
            yield None
    return "".join(parts)


def loads_steps(text: str, parse_float: Callable[[str], Any] | None = None,
                parse_constant: Callable[[str], Any] | None = None) -> Generator[None, None, Any]:
    """Decode *text* (as ``json.loads(text, parse_float=..., parse_constant=...)`` would), yielding between
    slices of the long arrays and objects near the top; a malformed text raises ``json.JSONDecodeError``."""
    decoder = json.JSONDecoder(parse_float=parse_float, parse_constant=parse_constant)
    counter = [0]
    value, end = yield from _value(decoder, text, _skip(text, 0), 0, counter)
    end = _skip(text, end)
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


def _skip(text: str, at: int) -> int:
    return _WHITESPACE.match(text, at).end()  # type: ignore[union-attr]


def _scan(decoder: json.JSONDecoder, text: str, at: int) -> tuple[Any, int]:
    try:
        return decoder.scan_once(text, at)  # type: ignore[attr-defined,no-any-return]
    except StopIteration as stop:
        raise json.JSONDecodeError("Expecting value", text, stop.value) from None


def _value(decoder: json.JSONDecoder, text: str, at: int, depth: int,
           counter: list[int]) -> Generator[None, None, tuple[Any, int]]:
    opener = text[at:at + 1]
    if depth >= DECODE_CUT_DEPTH or opener not in ("[", "{"):
        return _scan(decoder, text, at)
    closer = "]" if opener == "[" else "}"
    items: list[Any] = []
    pairs: dict[str, Any] = {}
    at = _skip(text, at + 1)
    if text[at:at + 1] == closer:
        return ([] if opener == "[" else {}), at + 1
    tried = at  # (a stretch that cut a nested value or a string is not tried again before its end)
    while True:
        if opener == "[" and at >= tried and len(items) >= 64:  # (a short array is not worth an attempt)
            # A stretch of items in one C call: cut at a comma about STRETCH characters on and decoded as
            # an array of its own. A cut inside a string or a nested value leaves one of them open, which
            # no JSON text can be; so a stretch that decodes was cut between two items of this array.
            cut = text.find(",", at + STRETCH)
            if cut != -1:
                try:
                    items.extend(decoder.decode("[" + text[at:cut] + "]"))
                except ValueError:
                    tried = cut + 1
                    yield None  # (the attempt cost about as much as a stretch)
                else:
                    at = _skip(text, cut + 1)
                    yield None
                    continue
        counter[0] += 1
        if counter[0] % ITEMS_PER_STEP == 0:
            yield None
        if opener == "[":
            item, at = yield from _value(decoder, text, at, depth + 1, counter)
            items.append(item)
        else:
            if text[at:at + 1] != '"':
                raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, at)
            key, at = _scan(decoder, text, at)
            at = _skip(text, at)
            if text[at:at + 1] != ":":
                raise json.JSONDecodeError("Expecting ':' delimiter", text, at)
            item, at = yield from _value(decoder, text, _skip(text, at + 1), depth + 1, counter)
            pairs[key] = item
        at = _skip(text, at)
        sep = text[at:at + 1]
        if sep == closer:
            return (items if opener == "[" else pairs), at + 1
        if sep != ",":
            raise json.JSONDecodeError("Expecting ',' delimiter", text, at)
        at = _skip(text, at + 1)
