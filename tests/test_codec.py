"""The value codec: what task inputs and outputs may be, and how they travel as JSON."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import math
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reflow_client import codec
from reflow_client.codec import CodecError


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Mode(str, enum.Enum):
    FAST = "fast"
    SLOW = "slow"


class Shape(enum.Enum):
    SQUARE = (4, "square")


@dataclasses.dataclass
class Point:
    x: float
    y: float
    label: str = ""


@dataclasses.dataclass(frozen=True)
class Box:
    corner: Point
    size: tuple[int, int]
    tags: list[str] = dataclasses.field(default_factory=list)
    area: int = dataclasses.field(init=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "area", self.size[0] * self.size[1])


class Span(NamedTuple):
    start: int
    stop: int


def through_json(value: Any) -> Any:
    """Encode, go through JSON text (strictly: no NaN literals), decode."""
    text = json.dumps(codec.encode(value), allow_nan=False)
    return codec.decode(json.loads(text))


def assert_same(a: Any, b: Any) -> None:
    """Equal *and* of the same types all the way down (a tuple must not come back as a list)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), (a, b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b), (a, b)  # same keys, same order
        for k in a:
            assert_same(a[k], b[k])
    else:
        assert a == b, (a, b)


# ---------------------------------------------------------------------------- round trips


def _stable_id(value: object) -> str:
    """The value's repr, with set members sorted: they print in hash order, which differs between processes,
    and xdist's workers must agree on ids."""
    if isinstance(value, (set, frozenset)):
        return f"{type(value).__name__}({sorted(map(repr, value))})"
    return repr(value)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -7,
        2**80,
        1.5,
        -0.0,
        "",
        "ünïcödé ✓",
        [],
        {},
        [1, [2, [3, []]]],
        {"a": {"b": [1, {"c": None}]}},
        Path("/scratch/run1/out.nc"),
        Path("relative/file.txt"),
        dt.datetime(2025, 1, 31, 12, 30, 5, 123456),
        dt.datetime(2025, 1, 31, 12, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
        dt.date(2024, 2, 29),
        dt.time(23, 59, 59, 999999),
        dt.timedelta(days=2, seconds=5, microseconds=7),
        dt.timedelta(days=-1, microseconds=3),
        dt.timedelta(days=100000, microseconds=1),
        dt.timedelta.max,
        dt.timedelta.min,
        (),
        (1,),
        (1, "a", (2.5, None)),
        [(1, 2), (3, 4)],
        {"pairs": ((1, 2),), "nested": [{"t": (Path("/x"),)}]},
        {1, 2, 3},
        frozenset({"a", "b"}),
        {(1, 2), (3, 4)},
        b"\x00\xffbinary",
        b"",
        Decimal("3.14159265358979323846264338327950288"),
        Decimal("-0"),
        Decimal("1E+30"),
        float("inf"),
        float("-inf"),
        [float("inf"), {"x": float("-inf")}],
        {1: "one", 2: "two"},
        {(0, 0): "origin", (1, 0): "east"},
        {None: 1, True: 2, 3.5: 3},
        {frozenset({1}): "fs"},
        {"__reflow__": "not a tag", "other": 1},
        Color.BLUE,
        Level.HIGH,
        Mode.SLOW,
        Shape.SQUARE,
        [Color.RED, Color.BLUE],
        {"color": Color.RED},
        Point(1.0, 2.0, "p"),
        [Point(0.0, 0.0), Point(1.0, 1.0)],
        Box(Point(1.0, 2.0), (3, 4), ["a"]),
        Span(1, 5),
        [Span(0, 1), Span(1, 2)],
        {"span": Span(2, 3), "when": dt.date(2025, 1, 1)},
    ],
    ids=_stable_id,
)
def test_round_trip_through_json(value: Any) -> None:
    assert_same(value, through_json(value))


def test_nan_round_trips_as_nan() -> None:
    back = through_json([float("nan"), {"v": float("nan")}])
    assert math.isnan(back[0]) and math.isnan(back[1]["v"])


def test_decimal_nan_and_infinity_round_trip() -> None:
    back = through_json([Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity")])
    assert back[0].is_nan() and back[1] == Decimal("Infinity") and back[2] == Decimal("-Infinity")
    assert all(isinstance(d, Decimal) for d in back)


def test_lists_stay_json_arrays_so_the_daemon_can_split_them() -> None:
    encoded = codec.encode([Path("/a"), Path("/b")])
    assert isinstance(encoded, list) and len(encoded) == 2
    assert codec.elements(encoded) == encoded
    assert codec.elements(codec.encode((1, 2, 3))) == [1, 2, 3]
    assert sorted(codec.elements(codec.encode({3, 1, 2}))) == [1, 2, 3]
    with pytest.raises(CodecError, match="not a list"):
        codec.elements(codec.encode(5), "output of 'prepare'")


def test_plain_json_values_are_left_as_they_are() -> None:
    value = {"a": [1, 2.5, "x", None, True], "b": {"c": []}}
    assert codec.encode(value) == value


def test_dataclass_with_init_false_field_is_rebuilt_by_its_constructor() -> None:
    box = Box(Point(0.0, 0.0), (2, 5))
    encoded = codec.encode(box)
    assert "area" not in encoded["fields"], "init=False fields are not passed back to the constructor"
    back = through_json(box)
    assert back == box and back.area == 10 and isinstance(back.corner, Point)


def test_windows_and_pure_paths() -> None:
    win = PureWindowsPath(r"C:\data\in.txt")
    assert through_json(win) == win and isinstance(through_json(win), PureWindowsPath)
    assert through_json(PurePosixPath("/a/b")) == Path("/a/b")


def test_bytearray_comes_back_as_bytes() -> None:
    assert through_json(bytearray(b"abc")) == b"abc"


def test_str_enum_is_not_flattened_to_a_plain_string() -> None:
    encoded = codec.encode(Mode.FAST)
    assert isinstance(encoded, dict) and encoded[codec.TAG] == "enum"
    back = through_json(Mode.FAST)
    assert back is Mode.FAST


def test_enum_and_classes_are_referenced_by_module_and_qualname() -> None:
    assert codec.encode(Color.RED)["cls"] == f"{__name__}:Color"
    assert codec.encode(Span(1, 2))["cls"] == f"{__name__}:Span"


def test_workflow_module_classes_use_the_alias_and_resolve_to_the_declared_module() -> None:
    with codec.workflow_module(__name__):
        encoded = codec.encode(Point(1.0, 2.0))
        assert encoded["cls"] == f"{codec.WORKFLOW_ALIAS}:Point"
        assert codec.decode(encoded) == Point(1.0, 2.0)
    assert codec.encode(Point(1.0, 2.0))["cls"] == f"{__name__}:Point", "the context manager restores the module"


# JSON-like data with hypothesis: every such value must survive the trip unchanged.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
)
json_like = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
hashables = st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.tuples(st.integers(), st.text(max_size=3))
rich_scalars = (
    json_scalars
    | st.binary(max_size=16)
    | st.decimals(allow_nan=False, allow_infinity=False)
    | st.datetimes(timezones=st.none() | st.just(dt.timezone.utc))
    | st.dates()
    | st.times()
    | st.timedeltas()
    | st.sampled_from([Color.RED, Level.LOW, Mode.SLOW, Span(1, 2), Point(0.5, 1.5, "q")])
    | st.builds(PurePosixPath, st.text(alphabet="abc/._", min_size=1, max_size=10)).map(lambda p: Path(p))
    | st.floats(allow_nan=False).filter(lambda f: math.isinf(f))
)
rich = st.recursive(
    rich_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=8), children, max_size=3)
        | st.dictionaries(hashables, children, max_size=3)
        | st.frozensets(hashables, max_size=4)
        | st.sets(hashables, max_size=4)
    ),
    max_leaves=15,
)


@settings(max_examples=150, deadline=None)
@given(json_like)
def test_hypothesis_json_like_values_round_trip(value: Any) -> None:
    assert_same(value, through_json(value))


@settings(max_examples=150, deadline=None)
@given(rich)
def test_hypothesis_rich_values_round_trip_and_hash_stably(value: Any) -> None:
    encoded = codec.encode(value)
    assert_same(value, through_json(value))
    assert codec.value_hash(encoded) == codec.value_hash(json.loads(json.dumps(encoded)))


# ---------------------------------------------------------------------------- refusals


def test_arbitrary_object_is_refused_naming_its_type() -> None:
    with pytest.raises(CodecError, match=r"cannot encode value of type builtins\.object"):
        codec.encode(object())


def test_lambda_is_refused() -> None:
    with pytest.raises(CodecError, match="function"):
        codec.encode(lambda x: x)


def test_refusal_names_where_in_the_value() -> None:
    with pytest.raises(CodecError, match=r"value\['files'\]\[1\]"):
        codec.encode({"files": [Path("/a"), object()]})
    with pytest.raises(CodecError, match=r"output\.x"):
        codec.encode(Point(object(), 1.0), "output")  # type: ignore[arg-type]


def test_class_defined_inside_a_function_is_refused_with_a_hint() -> None:
    @dataclasses.dataclass
    class Local:
        a: int

    class LocalColor(enum.Enum):
        A = 1

    class LocalPair(NamedTuple):
        a: int

    for value in (Local(1), LocalColor.A, LocalPair(1)):
        with pytest.raises(CodecError, match="defined inside a function.*module level"):
            codec.encode(value)


def test_a_class_itself_is_not_a_value() -> None:
    with pytest.raises(CodecError):
        codec.encode(Point)


def test_codec_error_is_a_type_error() -> None:
    assert issubclass(CodecError, TypeError)


@pytest.mark.parametrize(
    "data, message",
    [
        ({codec.TAG: "nonsense"}, "unknown encoded kind 'nonsense'"),
        ({codec.TAG: "datetime"}, "malformed encoded 'datetime'"),
        ({codec.TAG: "datetime", "value": "not a date"}, "malformed encoded 'datetime'"),
        ({codec.TAG: "timedelta", "days": 10**12, "seconds": 0, "microseconds": 0}, "malformed encoded 'timedelta'"),
        ({codec.TAG: "enum", "cls": "no_such_module_xyz:Thing", "value": 1}, "not importable"),
        ({codec.TAG: "enum", "cls": f"{__name__}:Nope", "value": 1}, "'Nope' not found"),
        ({codec.TAG: "enum", "cls": f"{__name__}:assert_same", "value": 1}, "not a class"),
        ({codec.TAG: "enum", "cls": f"{__name__}:Color", "value": "green"}, "malformed encoded 'enum'"),
    ],
)
def test_malformed_encoded_values_raise_codec_error(data: Any, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        codec.decode(data)


def test_old_timedelta_encoding_still_decodes() -> None:
    assert codec.decode({codec.TAG: "timedelta", "value": 90.5}) == dt.timedelta(seconds=90.5)


# ---------------------------------------------------------------------------- hashing


def test_value_hash_ignores_dict_key_order() -> None:
    a = {"x": 1, "y": [1, 2], "z": {"p": 1, "q": 2}}
    b = {"z": {"q": 2, "p": 1}, "y": [1, 2], "x": 1}
    assert codec.value_hash(codec.encode(a)) == codec.value_hash(codec.encode(b))


def test_value_hash_ignores_order_of_non_string_keys() -> None:
    a = {1: "one", 2: "two", (3, 4): [{5: "five", 6: "six"}]}
    b = {(3, 4): [{6: "six", 5: "five"}], 2: "two", 1: "one"}
    assert codec.value_hash(codec.encode(a)) == codec.value_hash(codec.encode(b))


def test_value_hash_ignores_set_order() -> None:
    assert codec.value_hash(codec.encode({"b", "a", "c"})) == codec.value_hash(codec.encode({"c", "a", "b"}))


def test_value_hash_distinguishes_values_and_types() -> None:
    values = [1, 1.0, True, "1", [1], (1,), {1}, {"1": 1}, {1: 1}, Path("1"), None, [], {}, b"1", Decimal("1")]
    hashes = {codec.value_hash(codec.encode(v)) for v in values}
    assert len(hashes) == len(values)
    assert codec.value_hash(codec.encode([1, 2])) != codec.value_hash(codec.encode([2, 1])), "list order matters"


def test_value_hash_is_a_sha256_hex_digest() -> None:
    digest = codec.value_hash(codec.encode({"a": 1}))
    assert len(digest) == 64 and int(digest, 16) >= 0


HASH_SCRIPT = """
import json, sys
from pathlib import Path
from reflow_client import codec
value = {"names": {"b", "a", "c", "d"}, 3: (1, 2), "p": Path("/x"), "f": frozenset({"z", "y"})}
print(codec.value_hash(codec.encode(value)))
"""


def test_value_hash_is_stable_across_processes_and_hash_seeds() -> None:
    digests = set()
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", HASH_SCRIPT], capture_output=True, text=True, env=env, check=True)
        digests.add(out.stdout.strip())
    here = codec.value_hash(
        codec.encode({"names": {"b", "a", "c", "d"}, 3: (1, 2), "p": Path("/x"), "f": frozenset({"z", "y"})})
    )
    assert digests == {here}


def test_canonical_json_is_compact_and_sorted() -> None:
    assert codec.canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'
    assert codec.canonical_json("é") == '"é"'


def test_encoded_paths_finds_every_path() -> None:
    encoded = codec.encode({"out": [Path("/a"), {"inner": (Path("/b"),)}], "name": "/not/a/path"})
    assert sorted(codec.encoded_paths(encoded)) == ["/a", "/b"]
