"""The per-element shortcuts of the engine's hot path give exactly what the plain way gives.

An element's identity read straight from the resolution's columns, the job files' paths built by
concatenation, the shared JSON encoder and result decoder: each is compared with the code it stands for.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from reflow_client import codec, jobfiles
from reflow_client.manifest import InputSource, TaskManifest
from reflowd.engine.resolve import UpstreamView, _identity_slow, identity_digest, identity_for, resolve
from tests.support import json_values

_json = json_values(8, width=3, text=6)
_names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=5)


def _view(outputs: list[Any], array: bool, ok: list[bool] | None = None) -> UpstreamView:
    return UpstreamView(array, outputs, [codec.value_hash(o) for o in outputs], ok or [True] * len(outputs))


@settings(max_examples=200, deadline=None)
@given(
    workflow=_names, version=st.text(max_size=3), fan=st.lists(_json, min_size=1, max_size=4),
    chained=st.lists(_json, min_size=1, max_size=4), both=st.booleans(), shared=_json, names=st.lists(
        _names, min_size=3, max_size=3, unique=True),
)
def test_element_identities_from_columns_equal_the_plain_identity(
        workflow: str, version: str, fan: list[Any], chained: list[Any], both: bool, shared: Any,
        names: list[str]) -> None:
    """Resolved the way the engine resolves (fan-out and chained columns, a broadcast input, a run
    parameter), every element's identity equals ``instance_identity`` of its plain arguments."""
    x, y, k = names
    inputs: dict[str, list[InputSource]] = {x: [InputSource("a", "fanout")], "all": [InputSource("a", "broadcast")]}
    upstream = {"a": _view([fan], False)}
    if both:  # a second element column, chained from an array of the same length
        inputs[y] = [InputSource("c", "chain")]
        upstream["c"] = _view((chained * 4)[:len(fan)], True)
    task = TaskManifest(name="t", is_array=True, config={"version": version}, dependencies=sorted(upstream),
                        inputs=inputs, params={k: "p"})
    res = resolve(task, upstream, {"p": shared}, "/run")
    assert res.size == len(fan) and not res.blocked
    for index in range(len(fan)):
        assert identity_for(workflow, task, res, index) == _identity_slow(workflow, task, res, index)
        assert identity_digest(workflow, task, res, index).hex() == _identity_slow(workflow, task, res, index)
    assert res.plan.columns is not None and res.plan.hash_columns is not None  # (the columns' way was taken)
    for index in (len(fan), -1):  # out of range: refused as the sequences refuse it
        try:
            identity_for(workflow, task, res, index)
        except IndexError:
            pass
        else:
            assert index == -1  # (a negative index counts from the end, as a list's does)


@given(job_dir=st.sampled_from(["/r/.reflow/x/jobs/t1", "/r/jobs/t1/", "rel/t", "", "/"]),
       index=st.none() | st.integers(0, 10**7))
def test_job_file_paths_are_what_os_path_join_makes(job_dir: str, index: int | None) -> None:
    name = f"{jobfiles.element_key(index)}.json"
    assert jobfiles.inputs_path(job_dir, index) == os.path.join(job_dir, "inputs", name)
    assert jobfiles.result_path(job_dir, index) == os.path.join(job_dir, "results", name)
    assert jobfiles.started_path(job_dir, index) == os.path.join(job_dir, "started", name)
    assert jobfiles.cancel_path(job_dir, index) == os.path.join(job_dir, "cancel", name)


@settings(max_examples=200, deadline=None)
@given(value=st.dictionaries(st.text(max_size=5), _json, max_size=5))
def test_shared_encoder_and_decoder_equal_json_dumps_and_loads(value: dict[str, Any]) -> None:
    data = jobfiles.dumps(value)
    assert data == json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert jobfiles.dumps(value) == data  # (nothing kept from one call to the next)
    text = data.decode("utf-8")
    expected = json.loads(text, parse_float=jobfiles._finite, parse_constant=jobfiles._no_constant)
    assert json.dumps(jobfiles._loads_plain(text)) == json.dumps(expected)


def test_an_instance_made_by_position_is_the_one_made_by_keywords() -> None:
    """``Engine._expand`` makes each element's instance from its key fields by position (cheaper)."""
    import dataclasses

    from reflowd.engine.model import Instance

    by_position = Instance("r1", "square", 3)
    by_position.updated_at = 5.0
    by_keyword = Instance(run_id="r1", task="square", index=3, updated_at=5.0)
    for f in dataclasses.fields(Instance):
        assert getattr(by_position, f.name) == getattr(by_keyword, f.name), f.name


def test_successes_share_one_evidence_and_failures_get_their_own() -> None:
    from reflowd.engine import decide
    from reflowd.engine.model import Instance

    ok = {"state": "succeeded", "output": 1, "output_hash": "h"}
    first = decide.from_result(Instance("r", "t", 0), ok, None)
    second = decide.from_result(Instance("r", "t", 1), ok, None)
    assert first.evidence is second.evidence and first.evidence == {"source": "result_file", "state": "succeeded"}
    bad = decide.from_result(Instance("r", "t", 2), {"state": "failed", "error": "x"}, None)
    assert bad.evidence == {"source": "result_file", "state": "failed"} and bad.evidence is not first.evidence


@settings(max_examples=300, deadline=None)
@given(value=_json | st.floats(allow_nan=True, allow_infinity=True) | st.dictionaries(
    st.text(max_size=3), st.floats(allow_nan=True), max_size=3))
def test_the_prebuilt_c_encoders_write_and_refuse_what_json_does(value: Any) -> None:
    """``jobfiles.dumps`` and ``resolve._canon`` call a C encoder built once instead of through
    ``JSONEncoder.encode``: the same text, and the same refusals (NaN in an identity)."""
    from reflowd.engine import resolve

    assert jobfiles.dumps(value) == json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    plain = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False, sort_keys=True)
    try:
        expected: Any = plain.encode(value)
    except ValueError as exc:
        expected = ("refused", str(exc))
    try:
        got: Any = resolve._canon(value)
    except ValueError as exc:
        got = ("refused", str(exc))
    assert got == expected


def test_a_cycle_is_refused_as_json_refuses_it() -> None:
    from reflowd.engine import resolve

    cycle: list[Any] = []
    cycle.append(cycle)
    for encode in (jobfiles.dumps, resolve._canon):
        try:
            encode(cycle)
        except ValueError as exc:
            assert "Circular reference" in str(exc)
        else:
            raise AssertionError("a cycle was encoded")


def test_a_fan_outs_elements_are_never_blocked_and_a_chains_are_asked() -> None:
    """``_ElementBlocks.clear`` lets the engine skip asking each element of a fan-out; a chain from an
    array with a failed element still blocks that element."""
    fan = TaskManifest(name="t", is_array=True, config={}, dependencies=["a"], inputs={"x": [InputSource("a", "fanout")]})
    res = resolve(fan, {"a": _view([[1, 2, 3]], False)}, {}, "/run")
    assert res.element_blocked.clear and [res.element_blocked[i] for i in range(3)] == [None, None, None]  # type: ignore[attr-defined]
    chain = TaskManifest(name="c", is_array=True, config={}, dependencies=["b"], inputs={"y": [InputSource("b", "chain")]})
    res = resolve(chain, {"b": _view([10, 20], True, ok=[True, False])}, {}, "/run")
    assert not res.element_blocked.clear  # type: ignore[attr-defined]
    assert res.element_blocked[0] is None and "did not succeed" in (res.element_blocked[1] or "")


@settings(max_examples=100, deadline=None)
@given(values=st.lists(_json, min_size=0, max_size=12), fan=st.lists(_json, min_size=1, max_size=3),
       piece=st.integers(1, 4), workflow=_names)
def test_identities_hashed_in_pieces_equal_the_plain_identity(
        values: list[Any], fan: list[Any], piece: int, workflow: str) -> None:
    """A gather's long input and upstream hashes are hashed a piece at a time (so the hashing thread lets
    the loop in between); the digest is the plain one: for the gather itself, and for the elements of an
    array that also takes the long list whole (a broadcast)."""
    import reflowd.engine.resolve as resolve_module

    saved = resolve_module.PIECE_ITEMS
    resolve_module.PIECE_ITEMS = piece  # (pieces of a few items: every boundary case with small lists)
    try:
        upstream = {"a": _view(values, True), "b": _view([fan], False)}
        gather = TaskManifest(name="g", is_array=False, config={}, dependencies=["a"],
                              inputs={"xs": [InputSource("a", "gather")]})
        res = resolve(gather, upstream, {}, "/run")
        assert identity_for(workflow, gather, res, None) == _identity_slow(workflow, gather, res, None)
        assert res.plan.in_pieces == (len(values) > piece)
        both = TaskManifest(name="t", is_array=True, config={}, dependencies=["a", "b"],
                            inputs={"x": [InputSource("b", "fanout")], "xs": [InputSource("a", "gather")]})
        res = resolve(both, upstream, {}, "/run")
        for index in range(len(fan)):
            assert identity_for(workflow, both, res, index) == _identity_slow(workflow, both, res, index)
    finally:
        resolve_module.PIECE_ITEMS = saved
