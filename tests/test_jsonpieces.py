"""Large JSON documents a piece at a time (``reflow_client.jsonpieces``): the same text and values as
``json``, with yields between slices so the daemon's loop is never held for a whole document."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given, settings

from reflow_client import jobfiles, jsonpieces
from reflowd.engine.records import dump_json
from reflowd.steps import run_steps
from tests.support import json_values

values = json_values(40, width=6)


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def yields(steps: Any) -> tuple[int, Any]:
    count = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return count, done.value
        count += 1


@pytest.fixture
def small_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slices of a few items, so hypothesis's small values are cut too."""
    monkeypatch.setattr(jsonpieces, "SLICE", 3)
    monkeypatch.setattr(jsonpieces, "STRETCH", 8)
    monkeypatch.setattr(jsonpieces, "ITEMS_PER_STEP", 2)


@settings(max_examples=300, deadline=None)
@given(value=values)
def test_the_pieces_are_json_text_and_value_for_any_value(value: Any) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jsonpieces, "SLICE", 3)
        mp.setattr(jsonpieces, "STRETCH", 8)
        mp.setattr(jsonpieces, "ITEMS_PER_STEP", 2)
        text = compact(value)
        assert "".join(jsonpieces.encode(value)) == text
        assert jsonpieces.drive(jsonpieces.dumps_steps(value)) == text
        assert jsonpieces.drive(jsonpieces.loads_steps(text)) == json.loads(text)
        spaced = json.dumps(value, indent=1)  # (whitespace between every token)
        assert jsonpieces.drive(jsonpieces.loads_steps(spaced)) == json.loads(spaced)


def test_a_large_list_is_cut_into_many_short_steps() -> None:
    output = list(range(300_000))
    document = {"state": "succeeded", "output": output, "output_hash": "h"}
    text = compact(document)
    count, decoded = yields(jsonpieces.loads_steps(text))
    assert decoded == document
    assert count >= len(text) // jsonpieces.STRETCH // 2  # a yield about every STRETCH characters
    count, encoded = yields(jsonpieces.dumps_steps({"kwargs": {"xs": output}}))
    assert encoded == compact({"kwargs": {"xs": output}})
    assert count >= len(output) // jsonpieces.SLICE


def test_strings_and_nested_values_holding_commas_and_brackets_are_not_cut_inside(small_slices: None) -> None:
    value = {"output": ["a,b]" * 5, [",", "]", {"x": "],["}], *[[i, [i, "],"]] for i in range(50)], '",\\"]']}
    text = compact(value)
    assert jsonpieces.drive(jsonpieces.loads_steps(text)) == value


@pytest.mark.parametrize("text", ["[1,2", "[1 2]", '{"a" 1}', "[1,]", "{1:2}", "[1]x", "", "[" + "1," * 300 + "]",
                                  "[" + "1," * 300 + "x]", '{"a":[1,2],}'])
def test_a_malformed_text_is_refused_as_json_refuses_it(text: str, small_slices: None) -> None:
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    with pytest.raises(json.JSONDecodeError):
        jsonpieces.drive(jsonpieces.loads_steps(text))


def big_result(n: int, **extra: Any) -> bytes:
    return jobfiles.dumps({"state": "succeeded", "output": list(range(n)), "output_hash": "h", **extra})


def test_a_large_result_parses_in_steps_to_what_parse_result_gives() -> None:
    raw = big_result(100_000, started_at=1.5)
    assert len(raw) >= jobfiles.PIECES_FROM
    count, parsed = yields(jobfiles.parse_result_steps(raw, "result file of x[0]"))
    assert parsed == jobfiles.parse_result(raw, "result file of x[0]")
    assert count > 5


@pytest.mark.parametrize("raw, error", [
    (big_result(100_000)[:-5], "result file of x[0] is not valid JSON"),
    (big_result(100_000, started_at="soon"), "result file of x[0]: started_at must be a time in seconds, not str"),
    (jobfiles.dumps({"state": "odd", "output": list(range(100_000))}), "result file of x[0] has no valid state"),
    (jobfiles.dumps({"state": "succeeded", "output": [1e400 if i == 7 else i for i in range(100_000)], "output_hash": "h"})
     .replace(b"inf", b"1" + b"0" * 400), "number"),
], ids=["cut-short", "bad-started_at", "bad-state", "huge-number"])
def test_a_large_result_refused_in_steps_as_parse_result_refuses_it(raw: bytes, error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)) as whole:
        jobfiles.parse_result(raw, "result file of x[0]")
    with pytest.raises(ValueError, match=re.escape(error)) as stepped:
        jsonpieces.drive(jobfiles.parse_result_steps(raw, "result file of x[0]"))
    assert str(stepped.value).split(":")[0] == str(whole.value).split(":")[0]


@pytest.mark.anyio
async def test_run_steps_lets_other_tasks_run_between_the_steps() -> None:
    import anyio

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    raw = big_result(200_000)
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.lowlevel.checkpoint()
        before = ticks
        parsed = await run_steps(jobfiles.parse_result_steps(raw, "r"))
        during = ticks - before
        tg.cancel_scope.cancel()
    assert parsed["output"][-1] == 199_999
    assert during >= 10  # the ticker ran between the steps, not only after


def test_the_store_encodes_a_large_output_as_json_does() -> None:
    output = [{"i": i, "s": "é"} if i % 1000 == 0 else i for i in range(20_000)]
    assert dump_json(output) == compact(output)
    assert dump_json({str(i): i for i in range(10_000)}) == compact({str(i): i for i in range(10_000)})
