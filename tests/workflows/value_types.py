"""Non-JSON values flowing between tasks; the classes live in this file (tests/test_wiring.py).

Each consumer checks the type it received (an ``assert`` fails the task) and
returns a transformed value of the same kind, so both directions of the codec
are exercised in the worker and in the test process.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, NamedTuple

from reflow import Result, RunDir, Workflow

wf = Workflow("value_types")


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


@dataclass
class Point:
    x: float
    y: float


class Span(NamedTuple):
    start: int
    stop: int


@wf.job()
def make_file(run_dir: RunDir, text: str = "hello") -> Path:
    assert isinstance(run_dir, Path) and run_dir.is_dir(), run_dir
    path = run_dir / "made.txt"
    path.write_text(text)
    return path


@wf.job()
def read_file(path: Annotated[Path, Result(step="make_file")], where: Annotated[Path, RunDir()]) -> tuple[str, Path]:
    assert isinstance(path, Path), type(path)
    assert path.parent == where, (path, where)
    return (path.read_text(), where)


@wf.job()
def when(start: dt.datetime = dt.datetime(2025, 1, 31, 12, 30)) -> dt.datetime:
    assert isinstance(start, dt.datetime), type(start)
    return start


@wf.job()
def next_day(t: Annotated[dt.datetime, Result(step="when")]) -> dt.datetime:
    assert isinstance(t, dt.datetime), type(t)
    return t + dt.timedelta(days=1)


@wf.job()
def pair() -> tuple[int, str]:
    return (1, "one")


@wf.job()
def swapped(p: Annotated[tuple[int, str], Result(step="pair")]) -> tuple[str, int]:
    assert isinstance(p, tuple), type(p)
    return (p[1], p[0])


@wf.job()
def color(name: str = "RED") -> Color:
    return Color[name]


@wf.job()
def other_color(c: Annotated[Color, Result(step="color")]) -> Color:
    assert isinstance(c, Color), type(c)
    return Color.GREEN if c is Color.RED else Color.RED


@wf.job()
def points() -> list[Point]:
    return [Point(0.0, 0.0), Point(1.0, 2.0), Point(2.0, 4.0)]


@wf.array_job()
def moved(p: Annotated[Point, Result(step="points")]) -> Point:
    assert isinstance(p, Point), type(p)
    return Point(p.x + 1, p.y)


@wf.job()
def centroid(ps: Annotated[list[Point], Result(step="moved")]) -> Point:
    assert all(isinstance(p, Point) for p in ps), ps
    return Point(sum(p.x for p in ps) / len(ps), sum(p.y for p in ps) / len(ps))


@wf.job()
def span() -> Span:
    return Span(2, 5)


@wf.job()
def widened(s: Annotated[Span, Result(step="span")]) -> Span:
    assert isinstance(s, Span), type(s)
    return s._replace(stop=s.stop + 10)
