"""Records described once: a dataclass field says how it is stored.

The model's dataclasses (``Run``, ``TaskRun``, ``Instance``, ``JobRecord``)
are the one definition of each record. A persisted field carries a
:class:`Column` in its metadata; from that the store derives its table
definitions, its column lists and both row conversions, and the engine
derives what a retry clears. Wire views are derived from the client's view
dataclasses (``reflow_client.client.InstanceStatus``, ``RunInfo``), which
name the fields a client sees.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from reflow_client import jsonpieces

T = TypeVar("T")

_MISSING: Any = dataclasses.MISSING


_ENCODE_STR = json.encoder.encode_basestring


def dump_json(value: Any) -> str:
    """*value* as compact JSON text (non-ASCII kept as it is), as ``json.dumps`` would write it."""
    if type(value) is str:
        return _ENCODE_STR(value)  # type: ignore[no-any-return]
    if type(value) in (list, dict) and len(value) > jsonpieces.SLICE:
        # A fan-out's 10^6-element output: slices, so on the store's writer thread the GIL changes hands
        # between them (one C call of 100-200 ms would hold the event loop that long).
        return "".join(jsonpieces.encode(value))
    try:
        return jsonpieces.compact(value)
    except RecursionError:
        raise ValueError("Circular reference detected (or nested too deeply to store)") from None


@dataclass(frozen=True)
class Column:
    """How one field is kept in SQLite."""

    sql: str  # column type and constraints, e.g. "TEXT NOT NULL"
    name: str | None = None  # column name when it differs from the field name
    key: bool = False  # part of the primary key
    reset: bool = False  # cleared when the record is tried again (instances)
    encode: Callable[[Any], Any] | None = None  # Python value -> SQLite value
    decode: Callable[[Any], Any] | None = None  # SQLite value -> Python value
    #: Many records hold equal values (a task name, a job's tag, a cluster): rows read back share one
    #: string per value (``Table.values`` with a memo), as records made in memory do.
    shared: bool = False


def column(sql: str, *, default: Any = _MISSING, default_factory: Any = _MISSING, name: str | None = None,
           key: bool = False, reset: bool = False, encode: Callable[[Any], Any] | None = None,
           decode: Callable[[Any], Any] | None = None, shared: bool = False) -> Any:
    """A persisted dataclass field (*shared*: its values repeat across records; see ``Column.shared``)."""
    meta = {"column": Column(sql, name, key, reset, encode, decode, shared)}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def transient(*, default: Any = _MISSING, default_factory: Any = _MISSING, reset: bool = False) -> Any:
    """A field kept in memory only (rebuilt after a restart)."""
    meta = {"transient_reset": reset}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta, repr=False, compare=False)
    return dataclasses.field(default=default, metadata=meta, repr=False, compare=False)


def json_column(sql: str = "TEXT", **kw: Any) -> Any:
    """A field stored as JSON text (None stays NULL)."""
    return column(sql, encode=lambda v: None if v is None else dump_json(v),
                  decode=lambda v: None if v is None else json.loads(v), **kw)


def index_column() -> Any:
    """An array element index; a singleton (None) is stored as -1 so it can be part of a key."""
    return column("INTEGER NOT NULL", name="idx", key=True, encode=lambda v: -1 if v is None else v,
                  decode=lambda v: None if v is None or v < 0 else v)


def enum_column(kind: type, sql: str = "TEXT NOT NULL", **kw: Any) -> Any:
    """A ``str`` enum: SQLite stores the member as its text as it is; reading makes it a member again."""
    return column(sql, decode=lambda v: None if v is None else kind(v), **kw)


@dataclass(frozen=True)
class Rare:
    """A field most records leave at its default (an error, a retry's history, absence bookkeeping).

    Such fields share one slot, a dict holding only the values that differ from their defaults, so
    a million instances do not each carry a slot per field (see :func:`rare_fields`). They are still
    fields of the record: ``Table`` stores a persisted one like any other column.
    """

    name: str
    default: Any = None
    column: Column | None = None  # None: kept in memory only
    reset: bool = False  # cleared when the record is tried again
    own: bool = False  # the class defines the property itself (:func:`derived`), not kept in ``rare``
    after: str | None = None  # a derived column's place in the table: after this field's column
    #: A derived field whose value is made off the event loop: a snapshot keeps these fields' values
    #: (what it is made from), and ``make(*values)`` makes it when the row is encoded (``derived``).
    made_from: tuple[str, ...] = ()
    make: Callable[..., Any] | None = None


def rare(name: str, sql: str | None = None, *, default: Any = None, reset: bool = False,
         encode: Callable[[Any], Any] | None = None, decode: Callable[[Any], Any] | None = None,
         shared: bool = False) -> Rare:
    """A rare field: persisted when *sql* is given (a column like :func:`column`), else transient."""
    col = Column(sql, None, False, reset, encode, decode, shared) if sql is not None else None
    return Rare(name, default, col, reset)


def rare_json(name: str, *, reset: bool = False) -> Rare:
    """A rare field stored as JSON text (None stays NULL), like :func:`json_column`."""
    return rare(name, "TEXT", reset=reset, encode=lambda v: None if v is None else dump_json(v),
                decode=lambda v: None if v is None else json.loads(v))


def derived(name: str, sql: str, *, after: str, reset: bool = False, encode: Callable[[Any], Any] | None = None,
            decode: Callable[[Any], Any] | None = None, made_from: tuple[str, ...] = (),
            make: Callable[..., Any] | None = None) -> Rare:
    """A persisted field the class keeps its own way, as a property it defines (e.g. worked out from a
    value its instances share when read, rather than a value kept per record). Given to
    :func:`rare_fields`: ``Table`` stores it as a column (placed after field *after*'s, where it was
    when it was a plain field), ``__init__`` takes it as a keyword (the property's setter), a retry
    clears it (to None) when *reset*. With *make*, a snapshot keeps the attributes *made_from* (the
    first one in the field's place; the others must be plain fields) and the value is ``make(*them)``,
    made when the row is encoded, in the writer's thread: the property is not read on the event loop
    (*make* must then only read what it is given, which nobody changes in place)."""
    return Rare(name, None, Column(sql, None, False, reset, encode, decode), reset, own=True, after=after,
                made_from=made_from, make=make)


def rare_fields(*rares: Rare) -> Callable[[type[T]], type[T]]:
    """Class decorator (above ``@dataclass(slots=True)`` with a ``rare: dict | None`` field): each of
    *rares* becomes a property over that dict (a :func:`derived` one is the class's own property), and
    ``__init__`` accepts them as keywords."""

    def apply(cls: type[T]) -> type[T]:
        for r in rares:
            if r.own:
                if not isinstance(getattr(cls, r.name, None), property):
                    raise TypeError(f"{cls.__name__}.{r.name} is declared derived but is not a property")
                continue
            setattr(cls, r.name, _rare_property(r.name, r.default))
        cls.__rare__ = rares  # type: ignore[attr-defined]
        names = frozenset(r.name for r in rares)
        base_init = cls.__init__

        def __init__(self: Any, *args: Any, **kw: Any) -> None:
            given = {k: kw.pop(k) for k in names.intersection(kw)} if kw else None
            base_init(self, *args, **kw)
            if given:
                for k, v in given.items():
                    setattr(self, k, v)

        __init__.__doc__ = base_init.__doc__
        cls.__init__ = __init__  # type: ignore[misc]
        return cls

    return apply


def _rare_property(name: str, default: Any) -> property:
    def get(self: Any) -> Any:
        values = self.rare
        return default if values is None else values.get(name, default)

    def put(self: Any, value: Any) -> None:
        values = self.rare
        if value is default or (value == default and type(value) is type(default)):
            if values is not None and name in values:
                del values[name]
                if not values:
                    self.rare = None
            return
        if values is None:
            self.rare = {name: value}
        else:
            values[name] = value

    return property(get, put, doc=f"a rare field (kept in ``rare`` while it differs from {default!r})")


class _Named(NamedTuple):
    """A persisted field as tables see it: its name (a dataclass field or a rare one)."""

    name: str


def _columns(cls: type) -> Iterator[tuple[_Named, Column]]:
    rares = [r for r in getattr(cls, "__rare__", ()) if r.column is not None]
    placed = {r.after: r for r in rares if r.after is not None}
    for f in dataclasses.fields(cls):
        col = f.metadata.get("column")
        if col is not None:
            yield _Named(f.name), col
        r = placed.get(f.name)
        if r is not None:
            yield _Named(r.name), r.column  # type: ignore[misc]
    for r in rares:
        if r.after is None:
            yield _Named(r.name), r.column  # type: ignore[misc]


#: ``is_null(value)``: True for None, NotImplemented otherwise -- a C call per value, for ``Table.insert_present``.
is_null = None.__eq__


class Present(NamedTuple):
    """``Table.insert_present``'s answer: the statement, the values it takes from a row, the row's values
    that must be None for it (``nulls``, as many Nones)."""

    sql: str
    take: Callable[[tuple[Any, ...]], tuple[Any, ...]]
    left: Callable[[tuple[Any, ...]], tuple[Any, ...]]
    nulls: tuple[None, ...]


def _getter(positions: list[int]) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
    """A tuple of the values at *positions* (``itemgetter`` returns a bare value for one, and needs one)."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    if positions:
        only = positions[0]
        return lambda row: (row[only],)
    return lambda row: ()


class Table:
    """A record class's table: schema, column list and row conversions, derived once."""

    def __init__(self, cls: type, name: str, indexes: tuple[tuple[str, str], ...] = (), *, upsert: bool = False) -> None:
        self.cls = cls
        self.name = name
        self.fields = list(_columns(cls))
        self.names = [col.name or f.name for f, col in self.fields]
        self.keys = [col.name or f.name for f, col in self.fields if col.key]
        self.indexes = indexes
        self._encoders = [(f.name, col.encode) for f, col in self.fields]
        self._decoders = [(f.name, col.name or f.name, col.decode) for f, col in self.fields]
        #: ``snapshot(record) -> tuple``: the fields' values as they are now (no encoding: cheap, done on
        #: the event loop when a batch is taken); ``encode(snapshot) -> row`` encodes them for SQLite (the
        #: store's writer does it off the loop). JSON-encoded values are replaced, never changed in place,
        #: so a snapshot's values still say what the record held when it was taken. A record with rare
        #: fields is snapshot as ``(its other fields' values, a copy of its rare dict or None)``: reading
        #: each rare field through its property would cost a Python call per field and snapshot.
        # (A derived field is the class's own property, not kept in the rare dict: read like a plain one.)
        self._rare = {r.name: r.default for r in getattr(cls, "__rare__", ()) if r.column is not None and not r.own}
        self._made = {r.name: r for r in getattr(cls, "__rare__", ()) if r.make is not None}
        plain = [f.name for f, _ in self.fields if f.name not in self._rare]
        getter = operator.attrgetter(*(self._made[n].made_from[0] if n in self._made else n for n in plain))
        self.snapshot: Callable[[Any], tuple[Any, ...]]
        if self._rare:
            def snapshot(o: Any) -> tuple[Any, ...]:
                rare = o.rare
                return (getter(o), rare.copy() if rare else None)
            self.snapshot = snapshot
        else:
            self.snapshot = getter if len(plain) > 1 else (lambda o: (getter(o),))
        self.encode = self._compile_encode()
        self.row = self._compile_row()
        self.values = self._compile_values()
        self._masks: dict[tuple[str, ...], int] = {}
        self._updates: dict[int, tuple[str, Callable[[tuple[Any, ...]], tuple[Any, ...]]]] = {}
        self._verb, self._conflict = f"INSERT OR REPLACE INTO {name}", ""
        if upsert and self.keys:  # update in place (REPLACE deletes and re-inserts): cheaper for a hot table
            changed = [n for n in self.names if n not in self.keys]
            self._verb = f"INSERT INTO {name}"
            self._conflict = (f" ON CONFLICT({', '.join(self.keys)}) DO UPDATE SET "
                              + ", ".join(f"{n}=excluded.{n}" for n in changed))
        self.insert = self._insert_of(self.names)
        self._present: dict[tuple[Any, ...], Present] = {}

    def _insert_of(self, names: list[str]) -> str:
        return f"{self._verb} ({', '.join(names)}) VALUES ({','.join('?' * len(names))}){self._conflict}"

    def insert_present(self, nulls: tuple[Any, ...]) -> Present:
        """``insert`` naming only a row's columns that are not NULL, and how to take their values from a
        row; *nulls* is ``tuple(map(is_null, row))``: rows alike in it share a statement.

        A column left out takes its default, NULL, on insert and through ``excluded`` on conflict: the
        same row as ``insert`` writes. Binding costs SQLite's writer as much per parameter as the insert
        itself (measured: 25 columns 6.7 us a row, 6 columns 1.8 us; ``sqlite3`` looks for an adapter for
        each None), and a new instance's row is mostly NULL (a fan-out's expansion inserts 10^5 at once)."""
        hit = self._present.get(nulls)
        if hit is None:
            kept = [i for i, flag in enumerate(nulls) if flag is not True]
            left = [i for i, flag in enumerate(nulls) if flag is True]
            hit = Present(self._insert_of([self.names[i] for i in kept]), _getter(kept), _getter(left),
                          (None,) * len(left))
            if len(self._present) < 256:  # (bounded: the patterns met are few, a state's columns)
                self._present[nulls] = hit
        return hit

    def inserts(self, rows: Iterable[tuple[Any, ...]]) -> list[tuple[str, list[tuple[Any, ...]]]]:
        """Whole rows as ``insert_present``'s statements, each with its rows' values. A row is first tried
        on the previous row's columns (rows of one batch mostly leave the same ones NULL: two item getters
        and a compare, a fifth of working its pattern out)."""
        out: dict[str, list[tuple[Any, ...]]] = {}
        last: Present | None = None
        values: list[tuple[Any, ...]] = []
        for row in rows:
            if last is not None:
                taken = last.take(row)
                if None not in taken and last.left(row) == last.nulls:
                    values.append(taken)
                    continue
            last = self.insert_present(tuple(map(is_null, row)))
            values = out.setdefault(last.sql, [])
            values.append(last.take(row))
        return list(out.items())

    @property
    def delete(self) -> str:
        """``DELETE`` of one record by its key (its parameters: ``key_of``'s values)."""
        return f"DELETE FROM {self.name} WHERE {' AND '.join(f'{k}=?' for k in self.keys)}"

    def create(self) -> str:
        cols = [f"{n} {col.sql}" for n, (_, col) in zip(self.names, self.fields)]
        if self.keys:
            cols.append(f"PRIMARY KEY ({', '.join(self.keys)})")
        out = [f"CREATE TABLE IF NOT EXISTS {self.name} ({', '.join(cols)});"]
        for index, expr in self.indexes:
            out.append(f"CREATE INDEX IF NOT EXISTS {index} ON {self.name}({expr});")
        return "\n".join(out)

    # Rows are built for every change a commit writes, and read back for every instance at recovery:
    # both conversions are compiled once from the field list (as ``dataclasses`` compiles ``__init__``),
    # which is several times faster than walking the fields for each row.

    def _compile_row(self) -> Callable[[Any], tuple[Any, ...]]:
        """``row(record) -> tuple`` in column order (for INSERT)."""
        return self._compile_tuple("row", "o", lambda i, name: f"o.{name}")

    def _compile_encode(self) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
        """``encode(snapshot) -> tuple``: a snapshot's values encoded for SQLite (for INSERT)."""
        if not self._rare and not self._made and all(encode is None for _, encode in self._encoders):
            return lambda values: values
        return self._compile_snapshot_tuple("encode", range(len(self.fields)))

    def _snapshot_access(self) -> tuple[str, Callable[[int, str], str], dict[str, Any]]:
        """How compiled code reads the i-th field from a snapshot ``v``: (prologue, access, scope)."""
        position = {}
        for f, _ in self.fields:
            if f.name not in self._rare:
                position[f.name] = len(position)
        scope: dict[str, Any] = {"_EMPTY": {}, **{f"default_{name}": d for name, d in self._rare.items()}}
        p = "p" if self._rare else "v"
        for name, r in self._made.items():
            scope[f"make_{name}"] = r.make

        def access(i: int, name: str) -> str:
            if name in self._rare:
                return f"r.get({name!r}, default_{name})"
            made = self._made.get(name)
            if made is not None:
                args = [f"{p}[{position[name]}]", *(f"{p}[{position[a]}]" for a in made.made_from[1:])]
                return f"make_{name}({', '.join(args)})"
            return f"{p}[{position[name]}]"

        return ("    p = v[0]\n    r = v[1] or _EMPTY\n" if self._rare else ""), access, scope

    def _compile_snapshot_tuple(self, fn: str, columns: Iterable[int]) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
        """``fn(snapshot) -> tuple`` of *columns*' values (by position in ``fields``), encoded."""
        prologue, access, scope = self._snapshot_access()
        return self._compile_tuple(fn, "v", access, columns, prologue, scope)

    def _compile_tuple(self, fn: str, arg: str, access: Callable[[int, str], str], columns: Iterable[int] | None = None,
                       prologue: str = "", scope: dict[str, Any] | None = None) -> Callable[[Any], tuple[Any, ...]]:
        """``fn(arg) -> tuple`` of the columns' values (``access``: how the i-th is read), encoded."""
        scope = dict(scope or {})
        parts = []
        for i in range(len(self.fields)) if columns is None else columns:
            name, encode = self._encoders[i]
            value = access(i, name)
            if encode is None:
                parts.append(value)
            else:
                scope[f"encode{i}"] = encode
                parts.append(f"encode{i}({value})")
        exec(f"def {fn}({arg}):\n{prologue}    return ({', '.join(parts)},)\n", scope)  # noqa: S102 - from field names
        return scope[fn]  # type: ignore[no-any-return]

    def _compile_values(self) -> Callable[..., dict[str, Any]]:
        """``values(row, memo=None) -> {field: value}`` from an ``sqlite3.Row`` (or a mapping). With a *memo*
        dict (one per load), a shared column's equal values come out as one object (see ``Column.shared``)."""
        scope: dict[str, Any] = {"_keep": lambda value, same: same}
        parts = []
        for i, ((_, c), (attr, col, decode)) in enumerate(zip(self.fields, self._decoders)):
            read = f"r[{col!r}]"
            if decode is not None:
                scope[f"decode{i}"] = decode
                read = f"decode{i}({read})"
            if c.shared:
                read = f"s(v{i} := {read}, v{i})"
            parts.append(f"{attr!r}: {read}")
        exec(f"def values(r, memo=None):\n    s = _keep if memo is None else memo.setdefault\n"  # noqa: S102
             f"    return {{{', '.join(parts)}}}\n", scope)  # (built from field names)
        return scope["values"]  # type: ignore[no-any-return]

    def mask(self, names: tuple[str, ...]) -> int:
        """The bit set of the columns that hold fields *names* (fields that are not columns are left out)."""
        mask = self._masks.get(names)
        if mask is None:
            wanted = set(names)
            mask = self._masks[names] = sum(1 << i for i, (f, col) in enumerate(self.fields)
                                            if f.name in wanted and not col.key)
        return mask

    def update(self, mask: int) -> tuple[str, Callable[[tuple[Any, ...]], tuple[Any, ...]]]:
        """``UPDATE`` of the columns in *mask* by key, and ``encode(snapshot) -> row`` for it.

        Writing only what a change touched binds and encodes a few values where an upsert of the whole
        row binds them all (the store's hot path: a state change of an instance).
        """
        hit = self._updates.get(mask)
        if hit is not None:
            return hit
        chosen = [i for i in range(len(self.fields)) if mask >> i & 1] or [
            i for i, (_, col) in enumerate(self.fields) if not col.key]
        keys = [i for i, (_, col) in enumerate(self.fields) if col.key]
        sql = (f"UPDATE {self.name} SET {', '.join(f'{self.names[i]}=?' for i in chosen)} "
               f"WHERE {' AND '.join(f'{self.names[i]}=?' for i in keys)}")
        hit = self._updates[mask] = (sql, self._compile_snapshot_tuple("encode", chosen + keys))
        return hit

    def update_range(self, mask: int, numbered: str | None = None) -> str:
        """``update(mask)``'s ``UPDATE`` for a range of records: those whose last key column lies between two
        values (one task's consecutive elements given identical values). Its rows are ``update``'s with the
        range's first and last value in place of the last key's one (``store.group_updates``). A
        *numbered* column is set to ``? || (<last key> - ?)`` (a prefix, then the key less an offset:
        an array element's job key), its value given as those two parameters."""
        sql, _ = self.update(mask)
        last = self.keys[-1]
        head, tail = sql.rsplit(f"{last}=?", 1)
        assert not tail, sql
        if numbered is not None:
            head = head.replace(f" {numbered}=?", f" {numbered}=? || ({last} - ?)", 1)
        return f"{head}{last} BETWEEN ? AND ?"

    def position(self, mask: int, name: str) -> int | None:
        """Where column *name* is in ``update(mask)``'s rows (None: not set by it)."""
        chosen = [self.names[i] for i in range(len(self.fields)) if mask >> i & 1]
        return chosen.index(name) if name in chosen else None

    def key_of(self, obj: Any) -> tuple[Any, ...]:
        return tuple(enc(getattr(obj, f.name)) if enc else getattr(obj, f.name)
                     for (f, col), (_, enc) in zip(self.fields, self._encoders) if col.key)


def reset_values(cls: type) -> dict[str, Any]:
    """Field -> default for every field a fresh attempt clears."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        col = f.metadata.get("column")
        if (col is not None and col.reset) or f.metadata.get("transient_reset"):
            out[f.name] = f.default_factory() if f.default_factory is not _MISSING else f.default
    for r in getattr(cls, "__rare__", ()):
        if r.reset:
            out[r.name] = r.default
    return out


def column_fields(cls: type) -> list[str]:
    """Names of the fields a record keeps in the store."""
    return [f.name for f, _ in _columns(cls)]


def view_names(view_cls: type) -> list[str]:
    """The fields a client's view dataclass declares: what the daemon puts on the wire."""
    return [f.name for f in dataclasses.fields(view_cls)]
