"""The workflow definition API: Flow/Workflow registration, JobConfig, include, validation, describe."""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import pytest

import reflow
from reflow import Flow, JobConfig, Param, Result, RunDir, Workflow
from reflow_client.manifest import InputSource, Manifest

# ---------------------------------------------------------------------------- registration


def test_public_names() -> None:
    for name in ("Flow", "JobConfig", "Param", "Result", "RunDir", "Workflow", "Config", "load_config"):
        assert hasattr(reflow, name), name
    assert issubclass(Workflow, Flow)


def test_decorators_return_the_function_unchanged() -> None:
    wf = Workflow("identity")

    def prepare() -> list[int]:
        return [1, 2]

    def each(x: Annotated[int, Result(step="prepare")]) -> int:
        return x

    assert wf.job()(prepare) is prepare
    assert wf.array_job()(each) is each
    assert prepare() == [1, 2] and each(5) == 5, "still callable as plain functions"
    assert wf.tasks["prepare"].func is prepare and wf.tasks["each"].func is each


def test_job_with_every_seed_parameter() -> None:
    flow = Flow("seed")

    def check(output: Any) -> bool:
        return True

    @flow.job()
    def prepare() -> list[int]:
        return [1]

    @flow.job(
        "renamed",
        array=True,
        array_parallelism=3,
        cpus=4,
        time="1-02:00:00",
        mem="16gb",
        after=["prepare"],
        submit_options={"partition": "compute", "qos": "normal"},
        extra={"qos": "high", "account": "proj"},
        version="7",
        cache=False,
        verify=check,
        backend="slurm",
        retries=2,
        pack=20,
        constraint="gpu",
        gres=["gpu:1"],
    )
    def original(x: Annotated[int, Result(step="prepare")]) -> int:
        return x

    assert "original" not in flow.tasks
    spec = flow.tasks["renamed"]
    assert spec.func is original and spec.verify is check
    assert spec.config.to_dict() == {
        "cpus": 4,
        "time": "1-02:00:00",
        "mem": "16G",  # normalised spelling
        "array": True,
        "after": ["prepare"],
        "array_parallelism": 3,
        "submit_options": {
            "partition": "compute",
            "qos": "high",
            "account": "proj",
            "constraint": "gpu",
            "gres": ["gpu:1"],
        },
        "version": "7",
        "cache": False,
        "backend": "slurm",
        "retries": 2,
        "pack": 20,
    }
    wf = Workflow("seed_wf")
    wf.include(flow)
    task = wf.describe_typed().task("renamed")
    assert task.has_verify is True and task.dependencies == ["prepare"] and task.is_array
    assert task.config == spec.config.to_dict()


def test_array_job_with_every_seed_parameter_equals_job_with_array_true() -> None:
    kwargs: dict[str, Any] = dict(
        cpus=2,
        time="10",
        mem="500M",
        after=["prepare"],
        array_parallelism=5,
        submit_options={"partition": "p"},
        extra={"account": "a"},
        version="3",
        cache=False,
        verify=bool,
        backend="pbs",
        retries=1,
        qos="low",
    )
    wf = Workflow("arrays")

    @wf.job()
    def prepare() -> list[int]:
        return [1]

    def body(x: Annotated[int, Result(step="prepare")]) -> int:
        return x

    wf.array_job("a", **kwargs)(body)
    wf.job("b", array=True, **kwargs)(body)
    a, b = wf.tasks["a"], wf.tasks["b"]
    assert a.config == b.config and a.config.array is True
    assert a.config.submit_options == {"partition": "p", "account": "a", "qos": "low"}
    assert a.verify is bool and a.config.version == "3" and a.config.time == "10"


def test_defaults() -> None:
    wf = Workflow("defaults")

    @wf.job()
    def plain() -> int:
        return 1

    assert wf.tasks["plain"].config.to_dict() == {
        "cpus": 1,
        "time": "00:30:00",
        "mem": "4G",
        "array": False,
        "after": [],
        "array_parallelism": None,
        "submit_options": {},
        "version": "1",
        "cache": True,
        "backend": None,
        "retries": 0,
        "pack": None,
    }


def test_job_without_parentheses_is_refused() -> None:
    wf = Workflow("parens")

    def f() -> int:
        return 1

    with pytest.raises(TypeError, match=r"@flow\.job\(\) with parentheses"):
        wf.job(f)  # type: ignore[arg-type]


def test_verify_must_be_callable() -> None:
    wf = Workflow("verify")
    with pytest.raises(TypeError, match="verify must be a callable"):

        @wf.job(verify="yes")  # type: ignore[arg-type]
        def f() -> int:
            return 1


# ---------------------------------------------------------------------------- JobConfig


def test_jobconfig_merge_order_later_wins() -> None:
    cfg = JobConfig(
        submit_options={"partition": "a", "qos": "x"},
        extra={"partition": "b", "account": "y"},
        partition="c",
        mail_type="END",
    )
    assert cfg.submit_options == {"partition": "c", "qos": "x", "account": "y", "mail_type": "END"}
    assert cfg.extra == {"partition": "c", "qos": "x", "account": "y", "mail_type": "END"}
    cfg.extra["qos"] = "y"
    assert cfg.submit_options["qos"] == "y", "extra is the same mapping, not a copy"
    assert JobConfig(submit_options={"q": 1}, extra={"q": 2}).submit_options == {"q": 2}
    assert JobConfig(submit_options={"q": 1}, q=3).submit_options == {"q": 3}


def test_jobconfig_does_not_alias_the_callers_dicts() -> None:
    opts = {"partition": "a"}
    cfg = JobConfig(submit_options=opts, extra={"x": 1})
    cfg.submit_options["partition"] = "changed"
    assert opts == {"partition": "a"}


def test_jobconfig_equality_and_repr() -> None:
    assert JobConfig(cpus=2, partition="p") == JobConfig(cpus=2, submit_options={"partition": "p"})
    assert JobConfig(cpus=2) != JobConfig(cpus=3)
    assert JobConfig() != "JobConfig()"
    assert "cpus=2" in repr(JobConfig(cpus=2)) and "partition" in repr(JobConfig(partition="p"))


def test_after_as_a_single_string_is_refused_not_split_into_letters() -> None:
    with pytest.raises(TypeError, match=r"after=\['prepare'\]"):
        JobConfig(after="prepare")  # type: ignore[arg-type]
    wf = Workflow("after_str")
    with pytest.raises(TypeError, match=r"not the string 'prepare'"):

        @wf.job(after="prepare")  # type: ignore[arg-type]
        def f() -> int:
            return 1


# ---------------------------------------------------------------------------- include


def make_flow() -> Flow:
    flow = Flow("conversion")

    @flow.job()
    def split(n: int = 3) -> list[int]:
        return list(range(n))

    @flow.array_job()
    def convert(x: Annotated[int, Result(step="split")], cfg: Annotated[str, Result(step="setup")]) -> int:
        return x

    @flow.job(after=["split"])
    def join(xs: Annotated[list[int], Result(step="convert")]) -> int:
        return sum(xs)

    return flow


def add_setup(wf: Workflow) -> None:
    @wf.job()
    def setup() -> str:
        return "cfg"


def test_include_without_prefix_keeps_names() -> None:
    flow = make_flow()
    wf = Workflow("plain_include")
    add_setup(wf)
    wf.include(flow)
    assert list(wf.tasks) == ["setup", "split", "convert", "join"]
    wf.validate()
    assert wf.tasks["convert"].dependencies == ["split", "setup"]


def test_include_with_prefix_rewrites_internal_references_only() -> None:
    flow = make_flow()
    wf = Workflow("prefixed")
    add_setup(wf)
    wf.include(flow, prefix="era5")
    wf.include(flow, prefix="cmip")
    assert list(wf.tasks) == [
        "setup", "era5_split", "era5_convert", "era5_join", "cmip_split", "cmip_convert", "cmip_join"
    ]
    convert = wf.tasks["era5_convert"]
    assert convert.result_deps["x"].steps == ["era5_split"]
    assert convert.result_deps["cfg"].steps == ["setup"], "references outside the flow are kept"
    join = wf.tasks["cmip_join"]
    assert join.result_deps["xs"].steps == ["cmip_convert"] and join.config.after == ["cmip_split"]
    assert join.func is flow.tasks["join"].func
    # the flow itself is untouched and can be included again
    assert flow.tasks["convert"].result_deps["x"].steps == ["split"] and flow.tasks["join"].config.after == ["split"]
    manifest = wf.describe_typed()
    assert manifest.task("era5_join").dependencies == ["era5_convert", "era5_split"]
    assert manifest.task("era5_convert").inputs["x"] == [InputSource("era5_split", "fanout")]
    assert manifest.task("era5_convert").inputs["cfg"] == [InputSource("setup", "broadcast")]
    # the same global parameter n is shared by both included copies
    n = next(p for p in manifest.cli_params if p.key == "n")
    assert n.tasks == ["era5_split", "cmip_split"]


def test_include_prefixes_local_parameters_with_the_new_task_name() -> None:
    flow = Flow("f")

    @flow.job()
    def step(level: Annotated[int, Param(namespace="local")] = 1) -> int:
        return level

    wf = Workflow("w")
    wf.include(flow, prefix="a")
    wf.include(flow, prefix="b")
    assert [p.flag for p in wf.cli_params()] == ["--a-step-level", "--b-step-level"]


def test_include_refuses_name_collisions() -> None:
    flow = make_flow()
    wf = Workflow("collide")
    add_setup(wf)
    wf.include(flow)
    with pytest.raises(ValueError, match=r"task 'split' already exists \(pass prefix=\.\.\."):
        wf.include(flow)
    wf.include(flow, prefix="x")
    with pytest.raises(ValueError, match=r"cannot include flow 'conversion': task 'x_split' already exists$"):
        wf.include(flow, prefix="x")


def test_include_collision_with_a_workflow_task() -> None:
    wf = Workflow("collide2")

    @wf.job()
    def split() -> list[int]:
        return []

    before = dict(wf.tasks)
    with pytest.raises(ValueError, match="'split' already exists"):
        wf.include(make_flow())
    assert wf.tasks == before and wf._registration_order == ["split"], "a refused include adds nothing"


def test_include_refuses_parameter_conflicts_and_adds_nothing() -> None:
    wf = Workflow("conflict")

    @wf.job()
    def setup(n: str = "x") -> str:
        return n

    with pytest.raises(TypeError, match="global parameter 'n' is int here but str in task 'setup'"):
        wf.include(make_flow())
    assert list(wf.tasks) == ["setup"]


def test_include_bad_prefix() -> None:
    with pytest.raises(ValueError, match="invalid prefix '1x'"):
        Workflow("w").include(make_flow(), prefix="1x")


# ---------------------------------------------------------------------------- validation


def test_workflow_name_is_checked() -> None:
    for bad in ("", "two words", "a/b"):
        with pytest.raises(ValueError, match="invalid workflow name"):
            Workflow(bad)


def test_empty_workflow_does_not_validate() -> None:
    with pytest.raises(ValueError, match="has no tasks"):
        Workflow("empty").validate()


def test_unknown_step_with_suggestion() -> None:
    wf = Workflow("typo")

    @wf.job()
    def prepare() -> int:
        return 1

    @wf.job()
    def use(x: Annotated[int, Result(step="prepar")]) -> int:
        return x

    with pytest.raises(ValueError, match=r"task 'use' parameter 'x' references unknown task 'prepar'; did you mean 'prepare'\?"):
        wf.validate()


def test_unknown_step_without_a_close_match_has_no_suggestion() -> None:
    wf = Workflow("typo2")

    @wf.job()
    def use(x: Annotated[int, Result(step="zzz")]) -> int:
        return x

    with pytest.raises(ValueError, match=r"unknown task 'zzz'$"):
        wf.validate()


def test_unknown_after_with_suggestion() -> None:
    wf = Workflow("after")

    @wf.job()
    def prepare() -> int:
        return 1

    @wf.job(after=["prepaer"])
    def use() -> int:
        return 1

    with pytest.raises(ValueError, match=r"task 'use' after=\['prepaer'\] references unknown task 'prepaer'; did you mean 'prepare'\?"):
        wf.validate()


def test_after_itself() -> None:
    wf = Workflow("selfafter")

    @wf.job(after=["a"])
    def a() -> int:
        return 1

    with pytest.raises(ValueError, match=r"task 'a' lists itself in after"):
        wf.validate()


def test_own_result_refused_at_registration() -> None:
    wf = Workflow("selfresult")
    with pytest.raises(ValueError, match=r"task 'a' parameter 'x': a task cannot take its own result"):

        @wf.job()
        def a(x: Annotated[int, Result(step="a")]) -> int:
            return x


def test_cycle_names_its_tasks() -> None:
    wf = Workflow("cycle")

    @wf.job()
    def independent() -> int:
        return 1

    @wf.job()
    def a(x: Annotated[int, Result(step="c")]) -> int:
        return x

    @wf.job()
    def b(x: Annotated[int, Result(step="a")]) -> int:
        return x

    @wf.job(after=["b"])
    def c() -> int:
        return 1

    @wf.job()
    def downstream(x: Annotated[int, Result(step="c")]) -> int:
        return x

    with pytest.raises(ValueError, match="dependency cycle") as err:
        wf.validate()
    message = str(err.value)
    cycle = message.split(": ", 1)[1].split(" -> ")
    assert cycle[0] == cycle[-1] and sorted(cycle[:-1]) == ["a", "b", "c"], message
    assert "independent" not in message and "downstream" not in message
    # the cycle is shown in data-flow direction: each task feeds the next
    for up, down in zip(cycle, cycle[1:]):
        assert up in wf.tasks[down].dependencies, message


def test_two_task_cycle_through_after() -> None:
    wf = Workflow("cycle2")

    @wf.job(after=["b"])
    def a() -> int:
        return 1

    @wf.job(after=["a"])
    def b() -> int:
        return 1

    with pytest.raises(ValueError, match=r"dependency cycle: (a -> b -> a|b -> a -> b)$"):
        wf.validate()


def test_incompatible_wiring_names_upstream_downstream_and_parameter() -> None:
    wf = Workflow("types")

    @wf.job()
    def prepare() -> str:
        return "x"

    @wf.job()
    def use(count: Annotated[int, Result(step="prepare")]) -> int:
        return count

    with pytest.raises(TypeError) as err:
        wf.validate()
    message = str(err.value)
    assert "'prepare' -> use.count" in message
    assert "task 'prepare' returns str" in message and "parameter 'count' of task 'use' expects int" in message


def test_incompatible_fanout_names_the_array_task() -> None:
    wf = Workflow("types2")

    @wf.job()
    def prepare() -> list[str]:
        return ["x"]

    @wf.array_job()
    def convert(n: Annotated[int, Result(step="prepare")]) -> int:
        return n

    with pytest.raises(TypeError, match=r"'prepare' -> convert\.n: .*list\[str\].*array task 'convert' expects int"):
        wf.validate()


def test_array_task_without_anything_to_fan_out_over() -> None:
    wf = Workflow("nofan")

    @wf.array_job()
    def lonely(n: int = 3) -> int:
        return n

    with pytest.raises(ValueError, match=r"array task 'lonely' has no input to fan out over"):
        wf.validate()


def test_array_task_with_only_a_broadcast_input_has_nothing_to_fan_out_over() -> None:
    wf = Workflow("nofan2")

    @wf.job()
    def prepare() -> int:
        return 1

    @wf.array_job()
    def each(x: Annotated[int, Result(step="prepare")]) -> int:
        return x

    with pytest.raises(TypeError, match=r"array task 'each' has no input to fan out over: 'prepare' -> x passes a "
                                        r"single value to every element"):
        wf.validate()


def test_same_task_name_twice() -> None:
    wf = Workflow("dups")

    @wf.job()
    def a() -> int:
        return 1

    with pytest.raises(ValueError, match=r"task 'a' is already registered in 'dups'"):

        @wf.job(name="a")
        def b() -> int:
            return 2

    assert wf.tasks["a"].func() == 1, "the first registration is kept"


@pytest.mark.parametrize("bad", ["", "1abc", "a-b", "a b", "a.b", "_private", "é", "x!"])
def test_invalid_task_names(bad: str) -> None:
    wf = Workflow("names")
    with pytest.raises(ValueError, match=r"invalid task name"):
        wf.job(name=bad)(lambda: 1)
    assert wf.tasks == {}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"time": "abc"}, r"task 'f': invalid time limit 'abc'"),
        ({"time": "01:61:00"}, r"minutes must be below 60"),
        ({"time": "10:70"}, r"seconds must be below 60"),
        ({"time": "0"}, r"must be longer than zero"),
        ({"time": "1-"}, r"invalid time limit"),
        ({"time": 3600}, r"time limit must be a string"),
        ({"mem": "4X"}, r"task 'f': invalid memory request '4X'"),
        ({"mem": "4.5G"}, r"invalid memory request"),
        ({"mem": "-1G"}, r"invalid memory request"),
        ({"mem": "0G"}, r"must be more than zero"),
        ({"mem": None}, r"memory must be a string"),
        ({"cpus": 0}, r"task 'f': cpus must be a positive whole number, not 0"),
        ({"cpus": -2}, r"cpus must be a positive whole number"),
        ({"cpus": 1.5}, r"cpus must be a positive whole number"),
        ({"cpus": "2"}, r"cpus must be a positive whole number"),
        ({"cpus": True}, r"cpus must be a positive whole number"),
        ({"array": True, "array_parallelism": 0}, r"array_parallelism must be a positive whole number or None, not 0"),
        ({"array": True, "array_parallelism": 2.0}, r"array_parallelism must be a positive whole number"),
        ({"array_parallelism": 2}, r"array_parallelism only applies to array tasks"),
        ({"retries": -1}, r"retries must be a whole number >= 0, not -1"),
        ({"retries": 1.5}, r"retries must be a whole number"),
        ({"retries": True}, r"retries must be a whole number"),
        ({"version": 2}, r"version must be a string such as '2'"),
        ({"after": [1]}, r"after=\[...\] takes task names"),
        ({"partition": object()}, r"submit option partition=.* must be a string, number, bool or a list"),
        ({"submit_options": {"gres": [object()]}}, r"submit option gres="),
    ],
)
def test_bad_resource_values(kwargs: dict[str, Any], message: str) -> None:
    wf = Workflow("resources")
    with pytest.raises(ValueError, match=message):

        @wf.job(**kwargs)
        def f() -> int:
            return 1

    assert "f" not in wf.tasks


@pytest.mark.parametrize("time", ["30", "30:00", "01:30:00", "2-00", "2-12:30", "2-12:30:15", "UNLIMITED", "infinite"])
def test_accepted_time_forms(time: str) -> None:
    wf = Workflow("times")
    wf.job(name="f", time=time)(lambda: 1)
    assert wf.tasks["f"].config.time == time


def test_memory_spelling_is_normalised() -> None:
    wf = Workflow("mem")
    wf.job(name="a", mem="500mb")(lambda: 1)
    wf.job(name="b", mem=" 2 G ")(lambda: 1)
    wf.job(name="c", mem="1024")(lambda: 1)
    assert [wf.tasks[n].config.mem for n in "abc"] == ["500M", "2G", "1024"]


def test_var_args_and_kwargs_are_refused() -> None:
    wf = Workflow("varargs")
    with pytest.raises(ValueError, match=r"task 'f' parameter 'args': \*args/\*\*kwargs cannot be filled"):

        @wf.job()
        def f(*args: int) -> int:
            return 1

    with pytest.raises(ValueError, match=r"task 'g' parameter 'options': \*args/\*\*kwargs"):

        @wf.job()
        def g(a: int = 1, **options: int) -> int:
            return 1


def test_positional_only_is_refused() -> None:
    wf = Workflow("posonly")
    with pytest.raises(ValueError, match=r"positional-only"):

        @wf.job()
        def f(a: int, /) -> int:
            return a


def test_several_markers_on_one_parameter_are_refused() -> None:
    wf = Workflow("markers")
    with pytest.raises(ValueError, match=r"use one of Param, Result or RunDir"):

        @wf.job()
        def f(a: Annotated[int, Param(), Result(step="x")]) -> int:
            return a


@pytest.mark.parametrize(
    "name", ["force", "force_tasks", "cluster", "verify", "help", "max_workers", "on_error", "json",
             "socket", "no_daemon", "wait", "format", "command", "task", "run_id", "index", "name"]
)
def test_parameter_named_like_a_builtin_flag_is_accepted(name: str) -> None:
    """No reserved names: the generated CLIs move their own options aside (tests/test_cli.py checks them)."""
    wf = Workflow("reserved")
    namespace: dict[str, Any] = {}
    exec(f"def f({name}: int = 1) -> int:\n    return 1", namespace)
    wf.job()(namespace["f"])
    assert [p.flag for p in wf.cli_params()] == ["--" + name.replace("_", "-")]


def test_bool_parameter_named_daemon_keeps_its_negative_flag() -> None:
    wf = Workflow("negative")

    @wf.job()
    def f(daemon: bool = True) -> int:
        return 1

    assert [p.flag for p in wf.cli_params()] == ["--daemon"]


def test_bool_negative_flag_colliding_with_another_parameter() -> None:
    wf = Workflow("negative2")

    @wf.job()
    def a(cache: bool = True) -> int:
        return 1

    with pytest.raises(ValueError, match=r"task 'b' parameter 'no_cache': its flag --no-cache collides with parameter 'cache' of task 'a'"):

        @wf.job()
        def b(no_cache: int = 0) -> int:
            return 1


def test_local_flag_colliding_with_a_global_parameter() -> None:
    wf = Workflow("clash")

    @wf.job()
    def a(b: Annotated[int, Param(namespace="local")] = 1) -> int:
        return b

    with pytest.raises(ValueError, match=r"task 'other' parameter 'a_b': its flag --a-b collides with parameter 'b' of task 'a'"):

        @wf.job()
        def other(a_b: int = 2) -> int:
            return a_b


def test_global_parameter_colliding_with_a_later_local_flag() -> None:
    wf = Workflow("clash2")

    @wf.job()
    def other(a_b: int = 2) -> int:
        return a_b

    with pytest.raises(ValueError, match=r"task 'a' parameter 'b': its flag --a-b collides with parameter 'a_b' of task 'other'"):

        @wf.job()
        def a(b: Annotated[int, Param(namespace="local")] = 1) -> int:
            return b


def test_conflicting_global_types() -> None:
    wf = Workflow("gtypes")

    @wf.job()
    def a(n: int = 1) -> int:
        return n

    with pytest.raises(TypeError, match=r"task 'b' parameter 'n': global parameter 'n' is str here but int in task 'a'"):

        @wf.job()
        def b(n: str = "1") -> int:
            return 1


def test_conflicting_global_defaults() -> None:
    wf = Workflow("gdefaults")

    @wf.job()
    def a(n: int = 1) -> int:
        return n

    with pytest.raises(ValueError, match=r"global parameter 'n' defaults to 2 here but to 1 in task 'a'"):

        @wf.job()
        def b(n: int = 2) -> int:
            return n


def test_shared_global_parameter_is_one_flag() -> None:
    wf = Workflow("shared")

    @wf.job()
    def a(n: Annotated[int, Param(help="count")] = 1, when: Optional[str] = None) -> int:
        return n

    @wf.job()
    def b(n: int = 1, when: str | None = None) -> int:  # same types, spelled differently
        return n

    @wf.job()
    def c(n: int) -> int:
        return n

    params = {p.key: p for p in wf.cli_params()}
    assert list(params) == ["n", "when"]
    assert params["n"].tasks == ["a", "b", "c"] and params["n"].required is False and params["n"].default == 1
    assert params["n"].help == "count"


def test_short_flag_collision() -> None:
    wf = Workflow("shorts")

    @wf.job()
    def a(count: Annotated[int, Param(short="n")] = 1) -> int:
        return count

    with pytest.raises(ValueError, match=r"task 'b' parameter 'number': short flag -n is already used by parameter 'count' of task 'a'"):

        @wf.job()
        def b(number: Annotated[int, Param(short="-n")] = 1) -> int:
            return number


def test_short_h_is_allowed() -> None:
    wf = Workflow("shorth")

    @wf.job()
    def a(hours: Annotated[int, Param(short="h")] = 1) -> int:
        return hours

    assert [p.short for p in wf.cli_params()] == ["h"]


@pytest.mark.parametrize("short", ["nn", "1", "", "-", "-1"])
def test_bad_short_flags(short: str) -> None:
    with pytest.raises(ValueError, match="single letter"):
        Param(short=short)


def test_param_short_accepts_a_leading_dash_and_namespace_is_checked() -> None:
    assert Param(short="-n").short == "n"
    with pytest.raises(ValueError, match="namespace must be 'global' or 'local'"):
        Param(namespace="task")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "needs step="),
        ({"step": "a", "steps": ["b"]}, "not both"),
        ({"steps": ["a", "a"]}, "repeat a task"),
        ({"steps": ["a", ""]}, "must be task names"),
        ({"step": 3}, "must be task names"),
    ],
)
def test_bad_result_markers(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Result(**kwargs)


def test_result_normalises_step_and_steps() -> None:
    assert Result(step="a").steps == ["a"] and Result(steps=["a"]).step == "a"
    assert Result(steps=["a", "b"]).step is None
    assert Result(steps=["a", "b"], broadcast=True).renamed({"a": "x_a"}) == Result(steps=["x_a", "b"], broadcast=True)


# ---------------------------------------------------------------------------- describe


def build_described() -> Workflow:
    wf = Workflow("order")

    # registered out of dependency order on purpose
    @wf.job()
    def final(
        parts: Annotated[list[int], Result(step="middle")],
        where: Annotated[Path, RunDir()],
        label: Annotated[str, Param(help="a label")] = "x",
    ) -> dict[str, int]:
        return {label: sum(parts)}

    @wf.array_job(array_parallelism=2)
    def middle(x: Annotated[int, Result(step="first")], level: Annotated[int, Param(namespace="local")] = 2) -> int:
        return x

    @wf.job(after=["first"], cpus=2, partition="debug")
    def side(where: RunDir) -> None:
        return None

    @wf.job()
    def first(n: int = 3) -> list[int]:
        return list(range(n))

    @wf.job(verify=lambda out: True)
    def unrelated():  # no annotations at all
        return 1

    return wf


def test_describe_typed_content() -> None:
    wf = build_described()
    manifest = wf.describe_typed()
    assert isinstance(manifest, Manifest)
    order = [t.name for t in manifest.tasks]
    assert sorted(order) == sorted(wf.tasks)
    for task in manifest.tasks:
        for dep in task.dependencies:
            assert order.index(dep) < order.index(task.name), order
    assert order.index("first") < order.index("unrelated"), "independent tasks keep registration order"
    assert order == [t.name for t in wf.describe_typed().tasks], "the order is deterministic"
    final, middle, side, first, unrelated = (manifest.task(n) for n in ("final", "middle", "side", "first", "unrelated"))
    assert final.dependencies == ["middle"] and middle.dependencies == ["first"] and side.dependencies == ["first"]
    assert final.inputs == {"parts": [InputSource("middle", "gather")]}
    assert middle.inputs == {"x": [InputSource("first", "fanout")]}
    assert side.inputs == {}, "after=[...] carries no data"
    assert final.params == {"label": "label"} and middle.params == {"level": "middle_level"} and first.params == {"n": "n"}
    assert final.run_dir_params == ["where"] and side.run_dir_params == ["where"]
    assert final.return_type == "dict[str, int]" and first.return_type == "list[int]"
    assert side.return_type == "None" and unrelated.return_type == "Any"
    assert middle.is_array and not final.is_array
    assert middle.config["array_parallelism"] == 2 and side.config["cpus"] == 2
    assert side.config["submit_options"] == {"partition": "debug"} and side.config["after"] == ["first"]
    assert unrelated.has_verify and not first.has_verify
    for task in manifest.tasks:
        source = inspect.getsource(wf.tasks[task.name].func)
        assert task.source_hash == hashlib.sha256(source.encode()).hexdigest()
    assert len({t.source_hash for t in manifest.tasks}) == len(manifest.tasks)
    assert [(p.key, p.flag, p.type_repr, p.required, p.default, p.namespace, p.help) for p in manifest.cli_params] == [
        ("label", "--label", "str", False, "x", "global", "a label"),
        ("middle_level", "--middle-level", "int", False, 2, "local", ""),
        ("n", "--n", "int", False, 3, "global", ""),
    ]
    assert manifest.entrypoint == str(Path(__file__).resolve())
    assert manifest.python == sys.executable and manifest.working_dir == os.getcwd()


def test_describe_is_the_typed_manifest_as_a_dict() -> None:
    wf = build_described()
    data = wf.describe()
    assert data == wf.describe_typed().to_manifest_dict()
    assert data["workflow"] == "order" and data["version"] == 1
    assert [t["name"] for t in data["tasks"]] == [t.name for t in wf.describe_typed().tasks]
    middle = next(t for t in data["tasks"] if t["name"] == "middle")
    assert middle["inputs"] == {"x": [{"step": "first", "mode": "fanout"}]}


def test_describe_validates_first() -> None:
    wf = Workflow("invalid")

    @wf.job()
    def a(x: Annotated[int, Result(step="nope")]) -> int:
        return x

    with pytest.raises(ValueError, match="unknown task 'nope'"):
        wf.describe()


def test_source_hash_follows_the_source() -> None:
    wf = Workflow("hashes")
    namespace: dict[str, Any] = {}
    exec("def f() -> int:\n    return 1\n", namespace)
    wf.job(name="one")(namespace["f"])
    exec("def f() -> int:\n    return 2\n", namespace)
    wf.job(name="two")(namespace["f"])
    hashes = {t.name: t.source_hash for t in wf.describe_typed().tasks}
    assert hashes["one"] and hashes["two"] and hashes["one"] != hashes["two"]


def test_resolve_parameters_fills_defaults_and_refuses_unknown_and_missing() -> None:
    wf = build_described()
    assert wf.resolve_parameters({"n": 5}) == {"label": "x", "middle_level": 2, "n": 5}
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) 'lable' .*did you mean 'label'"):
        wf.resolve_parameters({"lable": "y"})
    required = Workflow("required")

    @required.job()
    def a(start: str, n: int = 1) -> int:
        return n

    with pytest.raises(TypeError, match=r"missing required parameter\(s\) for workflow 'required': --start"):
        required.resolve_parameters({})
    with pytest.raises(TypeError, match=r"parameter 'start' expects str, got <object object .*> \(object\)"):
        required.resolve_parameters({"start": object()})

    @required.job()
    def b(anything=None) -> int:  # unannotated: any encodable value, checked by the codec
        return 1

    with pytest.raises(TypeError, match=r"parameter 'anything': cannot encode"):
        required.resolve_parameters({"start": "s", "anything": object()})
