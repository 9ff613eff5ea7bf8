"""Pure parts of the engine: the transition table, observation decisions, input resolution, the store."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reflow_client import codec
from reflow_client.manifest import InputSource, Manifest, TaskManifest
from reflowd.budget import RateLimiter
from reflowd.driver.policy import PollPolicy
from reflowd.engine import decide
from reflowd.engine import views
from reflowd.engine.engine import Engine, cleared
from reflowd.engine.model import Instance, Run, TaskRun
from reflowd.engine.resolve import ResolveError, UpstreamView, identity_for, resolve
from reflowd.engine.states import (
    ACTIVE,
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    RunState,
    State,
    check_transition,
    is_legal,
)
from reflowd.schedulers.base import Observation, Outcome, Phase, Presence
from reflowd.engine.model import JobRecord
from reflowd.schedulers.base import SubmitRequest
from reflowd.store import Store
from tests.support import json_values

# ---------------------------------------------------------------------- states


def test_every_state_has_a_row_and_terminal_success_is_final() -> None:
    assert set(TRANSITIONS) == set(State)
    assert TRANSITIONS[State.SUCCEEDED] == {State.READY}  # only verification can reopen it
    for state in ACTIVE:
        assert State.CANCELLED in TRANSITIONS[state], f"{state} can be cancelled"


@pytest.mark.parametrize(
    "old,new",
    [
        (State.PENDING, State.RUNNING),
        (State.SUCCEEDED, State.FAILED),
        (State.CACHED, State.RUNNING),
        (State.QUEUED, State.PENDING),  # (QUEUED -> READY: an element its packed job never started)
        (State.UPSTREAM_FAILED, State.SUCCEEDED),
        (State.READY, State.QUEUED),
    ],
)
def test_illegal_transitions_are_refused(old: State, new: State) -> None:
    assert not is_legal(old, new)
    with pytest.raises(IllegalTransition):
        check_transition(old, new, "x")


def _tiny_run() -> tuple[Run, Instance]:
    task = TaskManifest(name="a", is_array=False, config={}, dependencies=[])
    manifest = Manifest(workflow="w", tasks=[task], cli_params=[], entrypoint="/x.py", python="python", working_dir="/")
    run = Run(id="r1", manifest=manifest, params={}, run_dir="/tmp", cluster="local")
    inst = Instance(run_id="r1", task="a", index=None)
    run.tasks["a"] = TaskRun(manifest=task, run_id="r1", instances={None: inst})
    return run, inst


class _FakeStore:
    def __init__(self) -> None:
        self.instances: list[Instance] = []
        self.transitions: list[tuple] = []

    def put_instance(self, inst: Instance, changed: tuple[str, ...] | None = None) -> None:
        self.instances.append(inst)

    def add_transition(self, *args: object) -> None:
        self.transitions.append(args)

    def change_instance(self, inst: Instance, changed: tuple[str, ...], *transition: object) -> None:
        self.put_instance(inst, changed)
        self.add_transition(inst.run_id, inst.task, inst.index, *transition)


def test_engine_transition_records_evidence_and_refuses_illegal_changes() -> None:
    store = _FakeStore()
    engine = Engine(store, {})  # type: ignore[arg-type]
    run, inst = _tiny_run()
    sub = engine.subscribe("r1")
    assert not engine.transition(run, inst, State.RUNNING, {"source": "test"})
    assert inst.state is State.PENDING and store.transitions == []
    assert engine.counters["illegal_transitions"] == 1
    assert engine.transition(run, inst, State.READY, {"source": "test", "why": "deps"}, identity=b"abc")
    assert inst.state is State.READY and inst.identity == b"abc"
    (run_id, task, index, old, new, evidence, at) = store.transitions[-1]
    assert (run_id, task, index, old, new) == ("r1", "a", None, "pending", "ready")
    assert evidence == {"source": "test", "why": "deps"} and at > 0
    event = sub.receive.receive_nowait()
    assert event["from"] == "pending" and event["to"] == "ready"


# ---------------------------------------------------------------------- decide

T = decide.Timing(result_grace=10, lost_after=3, lost_grace=60)


def _inst(state: State = State.RUNNING) -> Instance:
    return Instance(run_id="r", task="t", index=None, state=state, job_id="5", job_key="5")


def test_result_file_decides_success() -> None:
    d = decide.from_result(_inst(), {"state": "succeeded", "output": 3, "output_hash": "h", "host": "n1"}, None)
    assert d.state is State.SUCCEEDED and d.fields["output"] == 3 and d.evidence["source"] == "result_file"


def test_scheduler_timeout_explains_a_signalled_failure() -> None:
    obs = Observation(Presence.PRESENT, Phase.DONE, Outcome.TIMEOUT, "TIMEOUT", "TimeLimit")
    d = decide.from_result(_inst(), {"state": "failed", "error": "interrupted by SIGTERM", "signal": "SIGTERM"}, obs)
    assert d.state is State.TIMEOUT and "TIMEOUT" in d.fields["reason"]


def test_unknown_never_changes_anything() -> None:
    assert decide.from_observation(_inst(), Observation.unknown("timeout"), 0.0, T) is None


def test_absent_becomes_lost_only_after_queries_and_grace() -> None:
    inst = _inst()
    now = 1000.0
    for i in range(5):
        d = decide.from_observation(inst, Observation.absent(), now + i, T)
        assert d is not None and d.state is None
        for k, v in d.fields.items():
            setattr(inst, k, v)
    assert inst.absent_count == 5
    d = decide.from_observation(inst, Observation.absent(), now + 61, T)
    assert d is not None and d.state is State.FAILED and d.fields["reason"] == "lost"


def test_completed_without_result_waits_for_the_grace_period() -> None:
    inst = _inst()
    obs = Observation(Presence.PRESENT, Phase.DONE, Outcome.COMPLETED, "COMPLETED")
    first = decide.from_observation(inst, obs, 100.0, T)
    assert first is not None and first.state is None
    inst.done_seen_at = first.fields["done_seen_at"]
    assert decide.from_observation(inst, obs, 105.0, T).state is None  # type: ignore[union-attr]
    late = decide.from_observation(inst, obs, 111.0, T)
    assert late is not None and late.state is State.FAILED and "no result file" in late.fields["error"]


@pytest.mark.parametrize(
    "outcome,state",
    [
        (Outcome.TIMEOUT, State.TIMEOUT),
        (Outcome.OUT_OF_MEMORY, State.OUT_OF_MEMORY),
        (Outcome.NODE_FAIL, State.NODE_FAIL),
        (Outcome.CANCELLED, State.CANCELLED),
        (Outcome.PREEMPTED, State.FAILED),
        (Outcome.BOOT_FAIL, State.NODE_FAIL),
        (Outcome.DEADLINE, State.TIMEOUT),
    ],
)
def test_final_scheduler_states_map_at_once(outcome: Outcome, state: State) -> None:
    obs = Observation(Presence.PRESENT, Phase.DONE, outcome, outcome.value.upper(), "r")
    d = decide.from_observation(_inst(), obs, 0.0, T)
    assert d is not None and d.state is state and d.fields["reason"]


def test_pending_reason_is_kept_and_start_is_seen() -> None:
    inst = _inst(State.QUEUED)
    d = decide.from_observation(inst, Observation(Presence.PRESENT, Phase.QUEUED, None, "PENDING", "Priority"), 0, T)
    assert d is not None and d.state is None and d.fields["reason"] == "Priority"
    d = decide.from_observation(inst, Observation(Presence.PRESENT, Phase.RUNNING, None, "RUNNING"), 0, T)
    assert d is not None and d.state is State.RUNNING
    requeued = decide.from_observation(_inst(State.RUNNING),
                                       Observation(Presence.PRESENT, Phase.QUEUED, None, "PENDING", "BeginTime"), 0, T)
    assert requeued is not None and requeued.state is State.QUEUED


# ---------------------------------------------------------------------- resolve


def _task(name: str, array: bool, inputs: dict[str, list[tuple[str, str]]], deps: list[str],
          params: dict[str, str] | None = None) -> TaskManifest:
    return TaskManifest(
        name=name, is_array=array, config={"version": "1"}, dependencies=deps,
        inputs={p: [InputSource(s, m) for s, m in srcs] for p, srcs in inputs.items()}, params=params or {},
    )


def view(outputs: list, array: bool = False, ok: list[bool] | None = None) -> UpstreamView:
    return UpstreamView(array, outputs, [codec.value_hash(o) for o in outputs], ok or [True] * len(outputs))


def test_fanout_chain_and_broadcast() -> None:
    task = _task("b", True, {"x": [("a", "fanout")], "all": [("a", "broadcast")]}, ["a"])
    res = resolve(task, {"a": view([[1, 2, 3]])}, {}, "/run")
    assert res.size == 3 and [e["x"] for e in res.elements] == [1, 2, 3]
    assert res.shared["all"] == [1, 2, 3]
    chain = _task("c", True, {"y": [("b", "chain")]}, ["b"])
    res = resolve(chain, {"b": view([10, 20], array=True, ok=[True, False])}, {}, "/run")
    assert res.size == 2 and res.element_blocked[0] is None and "did not succeed" in res.element_blocked[1]


def test_gather_flatten_and_multi_step_concatenation() -> None:
    task = _task("g", False, {"v": [("a", "gather_flatten"), ("s", "gather")]}, ["a", "s"])
    res = resolve(task, {"a": view([[1], [2, 3]], array=True), "s": view([9])}, {}, "/r")
    assert res.shared["v"] == [1, 2, 3, 9]


def test_mismatched_fanout_lengths_and_non_lists_are_errors() -> None:
    task = _task("b", True, {"x": [("a", "fanout")], "y": [("c", "fanout")]}, ["a", "c"])
    with pytest.raises(ResolveError, match="different lengths"):
        resolve(task, {"a": view([[1, 2]]), "c": view([[1]])}, {}, "/r")
    with pytest.raises(ResolveError, match="not a list"):
        resolve(_task("b", True, {"x": [("a", "fanout")]}, ["a"]), {"a": view([5])}, {}, "/r")


def test_failed_upstream_blocks_and_identity_tracks_inputs() -> None:
    task = _task("b", False, {"x": [("a", "direct")]}, ["a"], params={"k": "k"})
    assert resolve(task, {"a": view([1], ok=[False])}, {}, "/r").blocked
    one = resolve(task, {"a": view([1])}, {"k": 5}, "/r")
    same = resolve(task, {"a": view([1])}, {"k": 5}, "/r")
    other_param = resolve(task, {"a": view([1])}, {"k": 6}, "/r")
    other_input = resolve(task, {"a": view([2])}, {"k": 5}, "/r")
    ids = [identity_for("w", task, r, None) for r in (one, same, other_param, other_input)]
    assert ids[0] == ids[1] and len(set(ids)) == 3


def test_fanout_element_identity_follows_the_whole_upstream_output() -> None:
    """A path can name new content: a changed upstream list re-runs every element."""
    task = _task("b", True, {"x": [("a", "fanout")]}, ["a"])
    small = resolve(task, {"a": view([["p0", "p1"]])}, {}, "/r")
    big = resolve(task, {"a": view([["p0", "p1", "p2"]])}, {}, "/r")
    assert identity_for("w", task, small, 0) != identity_for("w", task, big, 0)


# ---------------------------------------------------------------------- store


@pytest.mark.anyio
async def test_store_group_commit_and_reload(tmp_path: Path) -> None:
    import anyio

    run, inst = _tiny_run()
    store = Store(tmp_path / "s.sqlite", commit_interval=0.05)
    await store.open()
    async with anyio.create_task_group() as tg:
        tg.start_soon(store.run_writer)
        store.put_run(run)
        store.put_task(run.id, run.tasks["a"])
        for i in range(500):  # many changes to one row and many transitions: few commits
            inst.attempt = i + 1
            store.put_instance(inst)
            store.add_transition(run.id, "a", None, "pending", "ready", {"i": i}, time.time())
        request = SubmitRequest(tag="tag1", run_id=run.id, task="a", job_dir="/j", log_dir="/l", workdir="/w",
                                worker_argv=["python"])
        store.put_job(JobRecord("tag1", run.id, "a", "local", request))
        store.put_cache("id1", [1, 2], "h", "w", "a", run.id, None)
        await store.flush()
        assert store.commits <= 3
        assert (await store.cache_lookup(["id1", "id2"])) == {
            "id1": {"output": [1, 2], "output_hash": "h", "run_id": "r1", "task": "a"}}
        tg.cancel_scope.cancel()
    await store.close()
    again = Store(tmp_path / "s.sqlite")
    await again.open()
    loaded = await again.load_run("r1")
    assert loaded is not None and loaded.state is RunState.RUNNING
    assert loaded.tasks["a"].instances[None].attempt == 500
    assert len(await again.transitions("r1")) == 500
    assert [r.tag for r in await again.jobs_for_runs(["r1"])] == ["tag1"]
    assert [r["id"] for r in await again.list_runs(states=["running"])] == ["r1"]
    assert await again.list_runs(states=["failed"]) == []
    await again.close()


@pytest.mark.anyio
async def test_identity_digest_and_shared_job_keys_are_stored_as_hex_and_key_text(tmp_path: Path) -> None:
    """An instance keeps its identity as 32 bytes and its job key as the job's shared ``ElementKeys``
    (memory: issue #13); the store still holds the hex identity and the key text, and a reload gives
    the same answers."""
    import anyio

    from reflowd.driver.packing import ElementKeys, job_key

    run, inst = _tiny_run()
    digest = bytes(range(32))
    request = SubmitRequest(tag="t", run_id=run.id, task="a", job_dir="/j", log_dir="/l", workdir="/w",
                            worker_argv=["python"], indices=[5, 6, 7], index_offset=5)
    packed = SubmitRequest(tag="p", run_id=run.id, task="a", job_dir="/j", log_dir="/l", workdir="/w",
                           worker_argv=["python"], indices=[0, 1], slices=[[5, 6], [7]])
    keys, packed_keys = ElementKeys(request, "42"), ElementKeys(packed, "43")
    assert [keys(i) for i in (5, 7)] == ["42_0", "42_2"] == [job_key(request, "42", i) for i in (5, 7)]
    assert [packed_keys(i) for i in (5, 6, 7)] == ["43_0", "43_0", "43_1"]
    inst.index, inst.identity, inst.job_id, inst.job_key = 7, digest, "42", keys
    assert inst.job_key == "42_2" and inst.job_keys is keys and inst.identity_hex == digest.hex()
    store = Store(tmp_path / "s.sqlite", commit_interval=0.05)
    await store.open()
    async with anyio.create_task_group() as tg:
        tg.start_soon(store.run_writer)
        store.put_run(run)
        store.put_task(run.id, run.tasks["a"])
        store.put_instance(inst)
        await store.flush()
        tg.cancel_scope.cancel()
    await store.close()
    with sqlite3.connect(tmp_path / "s.sqlite") as db:
        assert db.execute("SELECT identity, job_key FROM instances").fetchall() == [(digest.hex(), "42_2")]
    again = Store(tmp_path / "s.sqlite")
    await again.open()
    loaded = await again.load_run("r1")
    await again.close()
    assert loaded is not None
    back = loaded.tasks["a"].instances[7]
    assert (back.identity, back.job_key, back.job_id) == (digest, "42_2", "42")
    assert views.instance_view(back, full=False)["job_id"] == views.instance_view(inst, full=False)["job_id"] == "42_2"
    for name, value in cleared().items():
        setattr(back, name, value)
    assert back.job_key is None and back.job_keys is None and back.identity == digest  # (a retry keeps the identity)


# ---------------------------------------------------------------------- rate limit and poll clock


def test_rate_limiter_caps_and_bounds_debt() -> None:
    limiter = RateLimiter(60, burst=2)
    assert limiter.wait_time() == 0
    limiter.tokens = 0
    assert 0.5 < limiter.wait_time() <= 1.0
    for _ in range(10):
        limiter.spend()
    assert limiter.tokens >= -2


def test_poll_policy_adapts() -> None:
    policy = PollPolicy(1, 10, 60)
    assert policy.interval == 1
    for _ in range(10):
        policy.after_query(0.1, changed=False)
    assert policy.interval == 10
    policy.after_query(0.1, changed=True)
    assert policy.interval == 1
    policy.after_query(5.0, changed=False)
    assert policy.interval == 50
    policy.after_submit()
    assert policy.interval == 1


def test_terminal_and_active_partition_the_states() -> None:
    assert TERMINAL.isdisjoint(ACTIVE) and TERMINAL | ACTIVE == set(State)


# ---------------------------------------------------------------------- identities, fast and plain

_json = json_values(12, width=4, text=8)
_names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(
    workflow=_names, name=_names, version=st.text(max_size=4),
    shared=st.dictionaries(_names, _json, max_size=4), wired_shared=st.sets(_names, max_size=3),
    element_keys=st.lists(_names, min_size=0, max_size=3, unique=True),
    values=st.lists(_json, min_size=3, max_size=3), hashes=st.lists(st.text("0123456789abcdef", max_size=64), max_size=3),
)
def test_identity_of_elements_is_instance_identity_digit_for_digit(
        workflow: str, name: str, version: str, shared: dict, wired_shared: set, element_keys: list, values: list,
        hashes: list) -> None:
    """identity_for builds the shared part of the hashed text once per task; it must hash exactly the same text."""
    from reflowd.engine.resolve import Resolution, _identity_slow

    wired = set(element_keys) | (wired_shared & set(shared))
    task = TaskManifest(name=name, is_array=True, config={"version": version}, dependencies=[],
                        inputs={k: [InputSource("up", "fanout")] for k in wired})
    elements = [{k: values[(i + j) % 3] for j, k in enumerate(element_keys)} for i in range(3)]
    res = Resolution(size=3, shared=shared, shared_hashes=hashes, elements=elements,
                     element_hashes=[[h] for h in (hashes + ["x", "y", "z"])[:3]], element_blocked=[None] * 3)
    for index in (0, 1, 2):
        assert identity_for(workflow, task, res, index) == _identity_slow(workflow, task, res, index)
    single = Resolution(shared=shared, shared_hashes=hashes)
    assert identity_for(workflow, task, single, None) == _identity_slow(workflow, task, single, None)


_keyed_dict = st.builds(lambda items: {codec.TAG: "dict", "items": items},
                        st.lists(st.lists(_json, min_size=2, max_size=2), max_size=4))


@settings(max_examples=300, deadline=None)
@given(value=st.recursive(_json | _keyed_dict, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=12),
       texts=st.lists(st.text(max_size=6) | st.sampled_from(['"', "\\", "\x1f", "\u00e9", ""]), max_size=6))
def test_fast_canonical_json_is_canonical_json(value: Any, texts: list[str]) -> None:
    """The identity plan encodes with one C call (``_canon``) and joins hash strings (``_canon_items``);
    both must give canonical_json's text exactly, whatever the value holds."""
    from reflowd.engine.resolve import _canon, _canon_items

    assert _canon(value) == codec.canonical_json(value)
    assert _canon_items(texts) == codec.canonical_json(texts)[1:-1]


_result_text = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
    | st.sampled_from(["\ud800", "\\u", "1e999"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=400, deadline=None)
@given(value=_result_text, extra=st.sampled_from([b"", b"1" * 310, b"NaN", b"-Infinity", b"1e400", b"[" * 120]))
def test_result_files_parsed_in_c_take_the_same_decisions(value: Any, extra: bytes) -> None:
    """``parse_result`` skips the per-item walk when nothing in the text could break a limit; whatever the
    text, it must accept and refuse exactly what the checked parse (``protocol.loads`` + ``check_value``)
    does, with the same value."""
    from reflow_client import jobfiles
    from reflow_client.protocol import check_value, loads

    body = json.dumps(value, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")
    raw = b'{"state":"failed","output":' + body + (b',"x":' + extra if extra and not extra.startswith(b"[") else b"") \
        + b"}"
    raw = raw if not extra.startswith(b"[") else raw[:-1] + b',"y":' + extra + b"]" * len(extra) + b"}"

    def checked() -> Any:
        try:
            data = loads(raw)
        except (ValueError, UnicodeDecodeError):
            return "refused"
        return "refused" if check_value(data, "") else data

    def fast() -> Any:
        try:
            return jobfiles.parse_result(raw)
        except ValueError:
            return "refused"

    expected, got = checked(), fast()
    assert (got == "refused") == (expected == "refused") and (got == "refused" or json.dumps(got) == json.dumps(expected))
