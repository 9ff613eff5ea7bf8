"""Wiring modes: how they are inferred, and real values flowing through them.

The runs use ``wf.run_local``: the real engine in this process and every task
instance in its own ``python -m reflow.worker`` subprocess, so each value
below went through the codec, job files, the worker and back.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import pytest

from reflow import Result, Workflow
from reflow.local_run import LocalRunResult
from reflow.loader import load_workflow

WORKFLOWS = Path(__file__).resolve().parent / "workflows"


# ---------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def wiring_run(tmp_path_factory: pytest.TempPathFactory) -> LocalRunResult:
    wf = load_workflow(WORKFLOWS / "wiring_modes.py")
    result = wf.run_local(tmp_path_factory.mktemp("wiring"), n=3)
    assert result.ok, result.failures
    return result


@pytest.fixture(scope="module")
def wiring_modes() -> dict[str, dict[str, list[tuple[str, str]]]]:
    wf = load_workflow(WORKFLOWS / "wiring_modes.py")
    return {
        t.name: {p: [(s.step, s.mode) for s in srcs] for p, srcs in t.inputs.items()} for t in wf.describe_typed().tasks
    }


@pytest.mark.parametrize(
    "task, param, expected",
    [
        ("double", "x", [("src", "direct")]),
        ("square", "x", [("items", "fanout")]),
        ("plus_one", "x", [("square", "chain")]),
        ("total", "xs", [("plus_one", "gather")]),
        ("flat", "xs", [("pairs", "gather_flatten")]),
        ("neg", "x", [("pairs", "chain_flatten")]),
        ("offset", "everything", [("items", "broadcast")]),
        ("with_all", "whole", [("items", "broadcast")]),
        ("rank", "all_squares", [("square", "broadcast")]),
        ("both", "xs", [("src", "gather"), ("double", "gather")]),
        ("merged", "xs", [("items", "gather_flatten"), ("flat", "gather_flatten")]),
        ("concat", "x", [("items", "fanout"), ("items2", "fanout")]),
        ("each", "x", [("nothing", "fanout")]),
    ],
)
def test_the_workflow_exercises_each_mode(wiring_modes: Any, task: str, param: str, expected: Any) -> None:
    assert wiring_modes[task][param] == expected


def test_direct(wiring_run: LocalRunResult) -> None:
    assert wiring_run.outputs["src"] == 3 and wiring_run.outputs["double"] == 6


def test_fanout_runs_one_element_per_item(wiring_run: LocalRunResult) -> None:
    assert wiring_run.outputs["items"] == [1, 2, 3]
    assert wiring_run.outputs["square"] == [1, 4, 9]
    assert wiring_run.summary["square"] == {"succeeded": 3}


def test_gather_collects_array_outputs_in_index_order(wiring_run: LocalRunResult) -> None:
    assert wiring_run.outputs["squares"] == [1, 4, 9]


def test_chain_feeds_element_i_to_element_i(wiring_run: LocalRunResult) -> None:
    assert wiring_run.outputs["plus_one"] == [2, 5, 10]
    assert wiring_run.outputs["total"] == [2, 5, 10]


def test_gather_flatten(wiring_run: LocalRunResult) -> None:
    assert wiring_run.outputs["pairs"] == [[1, 10], [2, 20], [3, 30]]
    assert wiring_run.outputs["flat"] == [1, 10, 2, 20, 3, 30]


def test_chain_flatten_runs_one_element_per_flattened_item(wiring_run: LocalRunResult) -> None:
    assert wiring_run.outputs["neg"] == [-1, -10, -2, -20, -3, -30]
    assert wiring_run.summary["neg"] == {"succeeded": 6}
    assert wiring_run.outputs["negs"] == [-1, -10, -2, -20, -3, -30]


def test_inferred_broadcast_gives_every_element_the_whole_list(wiring_run: LocalRunResult) -> None:
    assert wiring_run.outputs["offset"] == [[1, 1, 2, 3], [2, 1, 2, 3], [3, 1, 2, 3]]


def test_explicit_broadcast_gives_every_element_the_whole_list(wiring_run: LocalRunResult) -> None:
    assert wiring_run.outputs["with_all"] == [[1, [1, 2, 3]], [2, [1, 2, 3]], [3, [1, 2, 3]]]


def test_explicit_broadcast_of_an_array_gives_every_element_all_outputs(wiring_run: LocalRunResult) -> None:
    assert wiring_run.outputs["rank"] == [0, 1, 2]


def test_multi_step_gather(wiring_run: LocalRunResult) -> None:
    assert wiring_run.outputs["both"] == [3, 6], "steps in the order listed"
    assert wiring_run.outputs["merged"] == [1, 2, 3, 1, 10, 2, 20, 3, 30]


def test_multi_step_fanout_concatenates(wiring_run: LocalRunResult) -> None:
    assert wiring_run.outputs["concat"] == [1, 2, 3, 100, 200]


def test_empty_fanout_gives_the_gather_an_empty_list(wiring_run: LocalRunResult) -> None:
    assert wiring_run.outputs["nothing"] == []
    assert wiring_run.outputs["each"] == []
    assert wiring_run.summary["each"] == {}, "zero elements: nothing ran"
    assert wiring_run.outputs["collected"] == []
    assert wiring_run.summary["collected"] == {"succeeded": 1}


def test_every_task_succeeded(wiring_run: LocalRunResult) -> None:
    assert wiring_run.state == "succeeded" and wiring_run.failures == []
    assert all(set(counts) <= {"succeeded"} for counts in wiring_run.summary.values()), wiring_run.summary


@pytest.fixture(scope="module")
def values_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalRunResult, Any]:
    wf = load_workflow(WORKFLOWS / "value_types.py")
    # another workflow file loaded afterwards must not break decoding this one's classes
    other = tmp_path_factory.mktemp("other") / "other_workflow.py"
    other.write_text("from reflow import Workflow\nwf = Workflow('other')\n\n@wf.job()\ndef t() -> int:\n    return 1\n")
    load_workflow(other)
    result = wf.run_local(tmp_path_factory.mktemp("values"), name="GREEN", start=dt.datetime(2024, 2, 28, 6, 0))
    assert result.ok, result.failures
    return result, sys.modules[wf._module_name]


def test_path_and_run_dir(values_run: tuple[LocalRunResult, Any]) -> None:
    result, _ = values_run
    made = result.outputs["make_file"]
    assert isinstance(made, Path) and made == result.run_dir / "made.txt" and made.read_text() == "hello"
    text, where = result.outputs["read_file"]
    assert text == "hello" and isinstance(where, Path) and where == result.run_dir


def test_datetime(values_run: tuple[LocalRunResult, Any]) -> None:
    result, _ = values_run
    assert result.outputs["when"] == dt.datetime(2024, 2, 28, 6, 0), "a datetime run parameter reached the task"
    assert result.outputs["next_day"] == dt.datetime(2024, 2, 29, 6, 0)


def test_tuple(values_run: tuple[LocalRunResult, Any]) -> None:
    result, _ = values_run
    assert result.outputs["pair"] == (1, "one") and result.outputs["swapped"] == ("one", 1)
    assert isinstance(result.outputs["swapped"], tuple)


def test_enum_defined_in_the_workflow_file(values_run: tuple[LocalRunResult, Any]) -> None:
    result, module = values_run
    assert result.outputs["color"] is module.Color.GREEN
    assert result.outputs["other_color"] is module.Color.RED


def test_dataclass_through_fanout_and_gather(values_run: tuple[LocalRunResult, Any]) -> None:
    result, module = values_run
    point = module.Point
    assert result.outputs["moved"] == [point(1.0, 0.0), point(2.0, 2.0), point(3.0, 4.0)]
    assert all(type(p) is point for p in result.outputs["moved"])
    assert result.outputs["centroid"] == point(2.0, 2.0) and type(result.outputs["centroid"]) is point


def test_namedtuple(values_run: tuple[LocalRunResult, Any]) -> None:
    result, module = values_run
    assert result.outputs["span"] == module.Span(2, 5) and type(result.outputs["span"]) is module.Span
    assert result.outputs["widened"] == module.Span(2, 15)


def test_included_flows_run_with_rewritten_references(tmp_path: Path) -> None:
    wf = load_workflow(WORKFLOWS / "composed.py")
    result = wf.run_local(tmp_path, n=3, offset=5)
    assert result.ok, result.failures
    assert result.outputs["era5_split"] == [5, 6, 7] and result.outputs["cmip_split"] == [5, 6, 7]
    assert result.outputs["era5_convert"] == [50, 60, 70]
    assert result.outputs["compare"] == {"era5": [50, 60, 70], "cmip": [50, 60, 70]}
    assert set(result.outputs) == {
        "setup", "era5_split", "era5_convert", "era5_join", "cmip_split", "cmip_convert", "cmip_join", "compare"
    }


# ---------------------------------------------------------------------------- inference


def modes(wf: Workflow, task: str) -> dict[str, list[str]]:
    manifest = wf.describe_typed()
    return {p: [s.mode for s in srcs] for p, srcs in manifest.task(task).inputs.items()}


def two_tasks(up_ret: Any, up_array: bool, param: Any, down_array: bool, broadcast: bool = False,
              extra_fan: bool = False) -> Workflow:
    """upstream (returning *up_ret*) -> downstream(p: *param*); arrays get a fan-out source when needed."""
    wf = Workflow("infer")
    if up_array or extra_fan:
        wf.job(name="seed")(_returns(list[int]))
    up = _returns(up_ret)
    if up_array:
        up.__annotations__["s"] = Annotated[int, Result(step="seed")]
    wf.job(name="up", array=up_array)(up)
    down = _takes(param, Result(step="up", broadcast=broadcast))
    if extra_fan:
        down.__annotations__["s"] = Annotated[int, Result(step="seed")]
    wf.job(name="down", array=down_array)(down)
    return wf


def _returns(tp: Any) -> Any:
    """A task function returning *tp* (None: no return annotation at all)."""

    def f(s=None):  # type: ignore[no-untyped-def]
        return None

    f.__annotations__ = {} if tp is None else {"return": tp}
    return f


def _takes(tp: Any, marker: Result) -> Any:
    def f(p, s=None):  # type: ignore[no-untyped-def]
        return None

    f.__annotations__ = {"p": Annotated[tp, marker]}
    return f


@pytest.mark.parametrize(
    "up_ret, up_array, param, down_array, broadcast, extra_fan, expected",
    [
        (int, False, int, False, False, False, "direct"),
        (int, False, float, False, False, False, "direct"),
        (int, False, Optional[int], False, False, False, "direct"),
        (list[int], False, list[int], False, False, False, "direct"),
        (list[int], False, Sequence[int], False, False, False, "direct"),
        (None, False, int, False, False, False, "direct"),  # unannotated upstream: trusted
        (Any, False, int, False, False, False, "direct"),
        (list[int], False, int, True, False, False, "fanout"),
        (list[int], False, float, True, False, False, "fanout"),
        (tuple[int, ...], False, int, True, False, False, "fanout"),
        (Sequence[str], False, str, True, False, False, "fanout"),
        (None, False, int, True, False, False, "fanout"),
        (list[int], False, Any, True, False, False, "fanout"),
        (list[int], False, list[int], True, False, True, "broadcast"),
        (int, False, int, True, False, True, "broadcast"),
        (list[int], False, Any, True, True, True, "broadcast"),
        (int, True, list[int], False, False, False, "gather"),
        (int, True, Any, False, False, False, "gather"),
        (list[int], True, list[int], False, False, False, "gather_flatten"),
        (list[int], True, list[list[int]], False, False, False, "gather"),
        (int, True, int, True, False, False, "chain"),
        (None, True, int, True, False, False, "chain"),
        (list[int], True, int, True, False, False, "chain_flatten"),
        (list[int], True, list[int], True, False, False, "chain"),
        (int, True, list[int], True, True, True, "broadcast"),
    ],
)
def test_inferred_mode(up_ret: Any, up_array: bool, param: Any, down_array: bool, broadcast: bool, extra_fan: bool,
                       expected: str) -> None:
    wf = two_tasks(up_ret, up_array, param, down_array, broadcast, extra_fan)
    assert modes(wf, "down")["p"] == [expected]


@pytest.mark.parametrize(
    "up_ret, up_array, param, down_array, broadcast, extra_fan, message",
    [
        (str, False, int, False, False, False, "change one of the annotations"),
        (list[int], False, int, False, False, False, "change one of the annotations"),
        (int, False, int, False, True, False, "broadcast=True only applies when the downstream task is an array"),
        (list[str], False, int, True, False, False, "to fan out, the upstream must return list"),
        (int, False, str, True, False, True, "to fan out"),
        (list[int], False, str, True, True, True, "with broadcast=True the whole value is passed"),
        (int, True, int, False, False, False, "the parameter must be list"),
        (int, True, list[str], False, False, False, "element type must match"),
        (int, True, list[int], False, True, False, "broadcast=True only applies"),
        (int, True, str, True, False, False, "element i of the upstream feeds element i"),
        (int, True, int, True, True, True, "broadcasting an array's outputs passes list"),
    ],
)
def test_incompatible_edges(up_ret: Any, up_array: bool, param: Any, down_array: bool, broadcast: bool,
                            extra_fan: bool, message: str) -> None:
    wf = two_tasks(up_ret, up_array, param, down_array, broadcast, extra_fan)
    with pytest.raises(TypeError, match=message) as err:
        wf.validate()
    assert "'up' -> down.p" in str(err.value)


def test_several_steps_into_a_non_list_parameter() -> None:
    wf = Workflow("multi")

    @wf.job()
    def a() -> int:
        return 1

    @wf.job()
    def b() -> int:
        return 2

    @wf.job()
    def c(x: Annotated[int, Result(steps=["a", "b"])]) -> int:
        return x

    with pytest.raises(TypeError, match="a parameter fed by several steps must be a list"):
        wf.validate()


def test_mixed_fanout_and_broadcast_steps_in_one_parameter() -> None:
    wf = Workflow("mixed")

    @wf.job()
    def a() -> list[int]:
        return [1]

    @wf.job()
    def b() -> int:
        return 2

    @wf.array_job()
    def c(x: Annotated[int, Result(steps=["a", "b"])]) -> int:
        return x

    with pytest.raises(TypeError, match=r"parameter 'x' of array task 'c' mixes fanned-out and broadcast steps"):
        wf.validate()


def test_several_broadcast_steps_in_one_parameter() -> None:
    wf = Workflow("multicast")

    @wf.job()
    def seed() -> list[int]:
        return [1]

    @wf.job()
    def a() -> int:
        return 1

    @wf.job()
    def b() -> int:
        return 2

    @wf.array_job()
    def c(s: Annotated[int, Result(step="seed")], x: Annotated[Any, Result(steps=["a", "b"], broadcast=True)]) -> int:
        return s

    with pytest.raises(TypeError, match=r"parameter 'x' of array task 'c' broadcasts several steps"):
        wf.validate()
