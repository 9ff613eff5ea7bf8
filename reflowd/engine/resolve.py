"""Turning upstream outputs into a task's arguments (pure, encoded values only).

Given the finished upstream tasks, decide for a task: how many elements it
has, which elements cannot run because what they need failed, the arguments
every element shares, the arguments of each element, and the Merkle identity
of each element. Nothing here imports user code or does I/O.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from reflow_client import codec
from reflow_client.identity import IDENTITY_SCHEME, instance_identity
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
    elements: Sequence[dict[str, Any]] = field(default_factory=list)  # encoded kwargs per element
    element_hashes: Sequence[list[str]] = field(default_factory=list)
    element_blocked: Sequence[str | None] = field(default_factory=list)  # per element reason
    plan: Any = field(default=None, repr=False, compare=False)  # identities of the elements (built on first use)


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

    element_lists: dict[str, Sequence[Any]] = {}
    element_hash_lists: dict[str, Sequence[str]] = {}
    element_ok_lists: dict[str, Sequence[bool]] = {}
    for pname, sources in task.inputs.items():
        if task.is_array and sources[0].mode in ELEMENT_MODES:
            # Each source's column as it is (the upstream's own list; a repeated value as one): joined
            # without copying, since a million-element fan-out would hold each copy for the run's life.
            values: list[Sequence[Any]] = []
            hashes: list[Sequence[str]] = []
            oks: list[Sequence[bool]] = []
            for src in sources:
                view = upstream[src.step]
                what = f"output of {src.step!r} (for {task.name}.{pname})"
                if src.mode == "fanout":
                    if not view.all_ok:
                        res.blocked = f"upstream task {src.step} did not succeed"
                        return res
                    items = _elements(view.outputs[0], what)
                    values.append(items)
                    # The upstream's whole output hash, not the element's: a path can name new content.
                    hashes.append(_Repeat(view.hashes[0] or "", len(items)))
                    oks.append(_Repeat(True, len(items)))
                elif src.mode == "chain_flatten":
                    if not view.all_ok:
                        res.blocked = f"upstream task {src.step} did not fully succeed (needed to flatten)"
                        return res
                    items = _safe(lambda v=view, w=what: _gathered(v, True, w))
                    values.append(items)
                    hashes.append(_Repeat(view.combined_hash, len(items)))
                    oks.append(_Repeat(True, len(items)))
                else:  # chain
                    values.append(view.outputs)
                    hashes.append([h or "" for h in view.hashes])
                    oks.append(view.ok)
            element_lists[pname] = _joined(values)
            element_hash_lists[pname] = _joined(hashes)
            element_ok_lists[pname] = _joined(oks)
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
    res.elements = _Elements(element_lists, size)
    res.element_hashes = _ElementHashes(element_hash_lists, size)
    res.element_blocked = _ElementBlocks(element_ok_lists, size)
    return res


class _Lazy(Sequence[Any]):
    """A read-only sequence whose elements are computed from shared storage when asked for (a
    million-element fan-out keeps no million copies). Subclasses set ``size`` and give ``_element``;
    bounds, negative indices and slices are handled here once."""

    __slots__ = ("size",)

    size: int

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._element(j) for j in range(*i.indices(self.size))]
        if not -self.size <= i < self.size:
            raise IndexError(i)
        return self._element(i % self.size)

    def _element(self, i: int) -> Any:
        """Element *i*, with ``0 <= i < size``."""
        raise NotImplementedError


class _Repeat(_Lazy):
    """One value *size* times (a fan-out's upstream hash for each of its elements), kept once."""

    __slots__ = ("value",)

    def __init__(self, value: Any, size: int) -> None:
        self.value = value
        self.size = size

    def _element(self, i: int) -> Any:
        return self.value


class _Chain(_Lazy):
    """Sequences one after another, read in place (the sources of one element parameter)."""

    __slots__ = ("parts", "starts")

    def __init__(self, parts: list[Sequence[Any]]) -> None:
        self.parts = parts
        self.starts = list(itertools.accumulate((len(p) for p in parts), initial=0))
        self.size = self.starts[-1]

    def _element(self, i: int) -> Any:
        k = bisect.bisect_right(self.starts, i) - 1
        return self.parts[k][i - self.starts[k]]


def _joined(parts: list[Sequence[Any]]) -> Sequence[Any]:
    """*parts* read as one sequence, without copying them."""
    if len(parts) == 1:
        return parts[0]
    return _Chain(parts)


class _Columns(_Lazy):
    """Per-element values kept as one list per parameter (shared with the upstream's outputs), each
    element's row built when asked for: a million-element fan-out holds no million dicts."""

    __slots__ = ("columns",)

    def __init__(self, columns: dict[str, Sequence[Any]], size: int) -> None:
        self.columns = columns
        self.size = size


class _Elements(_Columns):
    __slots__ = ()

    def _element(self, i: int) -> dict[str, Any]:
        return {p: col[i] for p, col in self.columns.items()}


class _ElementHashes(_Columns):
    __slots__ = ()

    def _element(self, i: int) -> list[str]:
        return [col[i] for col in self.columns.values()]


class _ElementBlocks(_Columns):
    __slots__ = ("clear",)

    def __init__(self, columns: dict[str, Sequence[Any]], size: int) -> None:
        super().__init__(columns, size)
        #: Every column one repeated True (a fan-out's): no element is blocked, and the engine need not ask
        #: element by element (``Engine._advance_task``).
        self.clear = all(type(col) is _Repeat and col.value is True for col in columns.values())

    def _element(self, i: int) -> str | None:
        bad = [p for p, oks in self.columns.items() if not oks[i]]
        return f"upstream element {i} feeding {', '.join(bad)} did not succeed" if bad else None


#: ``canonical_json``'s settings; it differs from plain JSON only inside encoded dicts with non-str keys.
_encode_plain = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False, sort_keys=True).encode
#: The C encoder ``_encode_plain`` builds afresh on every call, built once (an element's identity encodes
#: its value: a third of the cost). No circular check: a cycle ends in RecursionError, and ``_encode_plain``
#: then says what it says.
_c_encode_plain: Any = (
    json.encoder.c_make_encoder(None, json.JSONEncoder().default, json.encoder.encode_basestring, None, ":", ",",
                                True, False, False)
    if json.encoder.c_make_encoder is not None else None)
_KEYED_DICT = f'"{codec.TAG}":"dict"'


def _canon(value: Any) -> str:
    """``codec.canonical_json``, digit for digit, as one C-level encode (a gather over 10^5 elements
    is one call, not 10^5 Python steps). Only a value holding an encoded dict with non-str keys (whose
    items canonical_json sorts) takes the slow way; a string merely containing the marker's text shows
    escaped quotes there, so it never matches."""
    text: str
    try:
        text = "".join(_c_encode_plain(value, 0)) if _c_encode_plain is not None else _encode_plain(value)
    except RecursionError:
        text = _encode_plain(value)
    if _KEYED_DICT in text:
        return codec.canonical_json(value)
    return text


#: Bytes JSON would escape inside a string (besides '"', counted): backslash and control characters.
_ESCAPED = bytes(range(32)) + b"\\"


def _canon_items(values: Sequence[Any]) -> str:
    """The canonical JSON of each value, joined by commas (a JSON array's inside). Hashes are plain
    strings that JSON writes as they are: one join (a gather has 10^5 of them), checked in C."""
    if not values:
        return ""
    try:
        joined = '","'.join(values)  # type: ignore[arg-type]
        raw = joined.encode("utf-8")
    except (TypeError, UnicodeEncodeError):  # not all strings, or lone surrogates
        return _canon(list(values))[1:-1]
    if joined.count('"') != 2 * (len(values) - 1) or len(raw.translate(None, _ESCAPED)) != len(raw):
        return _canon(list(values))[1:-1]
    return f'"{joined}"'


#: Items per piece of a long JSON array in an identity's text (a gather's 10^6 upstream hashes or values).
#: The thread that hashes a gather's identity holds the GIL through each C call; as one text, a 64 MB join,
#: encode and scan took 50-200 ms each, and the loop waited for them (pings of 200-500 ms at 10^6). A piece
#: is about a millisecond's call, and the loop gets in between.
PIECE_ITEMS = 8192
#: Text gathered before it is hashed (``hashlib`` lets go of the GIL while it hashes more than 2 kB).
_HASH_CHUNK = 1 << 19


def _with_commas(pieces: list[str]) -> list[str]:
    out: list[str] = []
    for piece in pieces:
        if out:
            out.append(",")
        out.append(piece)
    return out


def _canon_pieces(value: Any) -> str | list[str]:
    """``_canon(value)``, a long list as pieces whose concatenation is that text (canonical JSON of a list
    is its items' joined by commas, so slices encode the same)."""
    if type(value) is not list or len(value) <= PIECE_ITEMS:
        return _canon(value)
    return ["[", *_with_commas([_canon(value[i:i + PIECE_ITEMS])[1:-1]
                                for i in range(0, len(value), PIECE_ITEMS)]), "]"]


def _canon_items_pieces(values: Sequence[Any]) -> list[str]:
    """``_canon_items(values)`` as pieces (one for a short list)."""
    if len(values) <= PIECE_ITEMS:
        return [_canon_items(values)]
    return _with_commas([_canon_items(values[i:i + PIECE_ITEMS]) for i in range(0, len(values), PIECE_ITEMS)])


def _sha256_pieces(pieces: Iterable[str]) -> bytes:
    """SHA-256 of the pieces' concatenation (UTF-8), never one call over the whole text."""
    digest = hashlib.sha256()
    held: list[str] = []
    size = 0
    for piece in pieces:
        held.append(piece)
        size += len(piece)
        if size >= _HASH_CHUNK:
            digest.update("".join(held).encode("utf-8"))
            held, size = [], 0
    digest.update("".join(held).encode("utf-8"))
    return digest.digest()


def _is_element_dep(task: TaskManifest, dep: str) -> bool:
    """Is *dep* only an element source of an array task (its failures block single elements)?"""
    if not task.is_array:
        return False
    modes = [s.mode for srcs in task.inputs.values() for s in srcs if s.step == dep]
    return bool(modes) and all(m in ELEMENT_MODES for m in modes)


def _elements(value: Any, what: str) -> list[Any]:
    if type(value) is list:  # the upstream's own output, read in place (outputs are replaced, never edited)
        return value
    try:
        return codec.elements(value, what)
    except codec.CodecError as exc:
        raise ResolveError(str(exc)) from None


def _safe(fn: Any) -> list[Any]:
    try:
        return fn()
    except codec.CodecError as exc:
        raise ResolveError(str(exc)) from None


def prepare_identities(workflow: str, task: TaskManifest, res: Resolution) -> None:
    """Encode once what every element's identity shares (for a gather, 10^5 hashes: its own loop step)."""
    if res.plan is None:
        res.plan = _IdentityPlan(workflow, task, res)


def identity_for(
    workflow: str,
    task: TaskManifest,
    res: Resolution,
    index: int | None,
) -> str:
    """Merkle identity of one instance from its resolution (``instance_identity``, digit for digit)."""
    return identity_digest(workflow, task, res, index).hex()


def identity_digest(
    workflow: str,
    task: TaskManifest,
    res: Resolution,
    index: int | None,
) -> bytes:
    """:func:`identity_for` as its 32 bytes (what an instance keeps: 65 bytes, not a 113-byte string)."""
    prepare_identities(workflow, task, res)
    return res.plan.identity(index)  # type: ignore[union-attr]


class _IdentityPlan:
    """The canonical JSON ``instance_identity`` hashes, with what every element shares encoded once.

    ``instance_identity`` hashes ``canonical_json`` of a dict whose keys sort as
    inputs, params, scheme, task, upstream, version, workflow. For the elements
    of one task only some inputs and upstream hashes differ, so the text of
    everything else is built once and each element costs the encoding of its
    own values and one SHA-256 (tests check the digests are the same).
    """

    def __init__(self, workflow: str, task: TaskManifest, res: Resolution) -> None:
        wired = set(task.inputs)
        self.res = res
        params = {k: v for k, v in res.shared.items() if k not in wired}
        shared = {k: _canon_pieces(v) for k, v in res.shared.items() if k in wired}
        self.after_inputs = (
            ',"params":' + _canon(params) + ',"scheme":' + _canon(IDENTITY_SCHEME) + ',"task":' + _canon(task.name)
            + ',"upstream":'
        )
        head = _canon_items_pieces(res.shared_hashes)  # a gather has 10^5 of them
        #: Long shared lists are kept in pieces (``PIECE_ITEMS``) and hashed piece by piece (``_pieces``);
        #: otherwise each part is one text and an identity one SHA-256 of one string (the per-element path).
        self.in_pieces = len(head) > 1 or any(type(v) is list for v in shared.values())
        self.upstream_pieces = head
        self.upstream_head = "" if self.in_pieces else head[0]
        self.shared_inputs: dict[str, Any] = shared
        self.tail = ',"version":' + _canon(str(task.version)) + ',"workflow":' + _canon(workflow) + "}"
        self.wired = wired
        self.workflow, self.task = workflow, task
        self.keys: dict[str, str] = {}  # an input's name as its JSON key text, ``"x":`` (the same for every element)
        # Each element's values and hashes read straight from their columns (``_Elements``/``_ElementHashes``:
        # what resolve() makes), not through a dict and a list built per element; None: through the sequences.
        elements, hashes = res.elements, res.element_hashes
        self.columns = list(elements.columns.items()) if type(elements) is _Elements else None
        self.hash_columns = list(hashes.columns.values()) if type(hashes) is _ElementHashes else None
        self.size = res.size

    def _key(self, name: str) -> str:
        text = self.keys.get(name)
        if text is None:
            text = self.keys[name] = _canon(name) + ":"
        return text

    def identity(self, index: int | None) -> bytes:
        inputs = self.shared_inputs
        upstream = self.upstream_head
        if index is not None:
            inputs = dict(inputs)
            columns, hash_columns = self.columns, self.hash_columns
            if columns is None or hash_columns is None or not 0 <= index < (self.size or 0):
                row, hashes = self.res.elements[index], self.res.element_hashes[index]  # (raises as it did)
                items: Any = row.items()
            else:
                items = [(k, col[index]) for k, col in columns]
                hashes = [col[index] for col in hash_columns]
            wired = self.wired
            for k, v in items:
                if k in wired:
                    inputs[k] = _canon(v)
                else:  # an element value that is not a wired input: resolve() makes none, but stay exact
                    return bytes.fromhex(_identity_slow(self.workflow, self.task, self.res, index))
            own = _canon_items(hashes)
            if self.in_pieces:
                return _sha256_pieces(self._pieces(inputs, own))
            upstream = f"{upstream},{own}" if upstream and own else upstream or own
        elif self.in_pieces:
            return _sha256_pieces(self._pieces(inputs, ""))
        key = self._key
        text = ('{"inputs":{' + ",".join(key(k) + inputs[k] for k in sorted(inputs)) + "}"
                + self.after_inputs + "[" + upstream + "]" + self.tail)
        return hashlib.sha256(text.encode("utf-8")).digest()

    def _pieces(self, inputs: dict[str, Any], own: str) -> Iterator[str]:
        """The text ``identity`` hashes, in pieces (a shared input or the shared upstream hashes are long)."""
        yield '{"inputs":{'
        for n, k in enumerate(sorted(inputs)):
            yield ("," if n else "") + self._key(k)
            value = inputs[k]
            if type(value) is list:
                yield from value
            else:
                yield value
        yield "}" + self.after_inputs + "["
        head = self.upstream_pieces
        if head != [""]:
            yield from head
            if own:
                yield ","
        yield own + "]" + self.tail


def _identity_slow(
    workflow: str,
    task: TaskManifest,
    res: Resolution,
    index: int | None,
) -> str:
    """``instance_identity`` of one instance, built the plain way."""
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
