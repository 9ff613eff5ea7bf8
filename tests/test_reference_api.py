"""The reference API (reflow-hpc's "Core workflow objects"), walked section by section.

For every documented class and method: the documented parameters exist with
the documented names, order, kinds and defaults (``inspect.signature``; our
extra parameters come after them with defaults, so no documented call binds
differently), and the documented return annotation. Then each documented
behaviour runs through the public API: real runs through a reflowd process
(local scheduler) and through ``run_local``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import inspect
import json
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import pytest

import reflow
from reflow import (
    Flow,
    JobConfig,
    LocalExecutor,
    Result,
    Run,
    RunState,
    SlurmExecutor,
    TaskInterrupted,
    TaskState,
    Workflow,
    WorkflowDescription,
)
from reflow.executors import EXECUTORS, PBSExecutor, resolve_executor
from reflow.loader import load_workflow
from reflow.param_values import check_value
from reflow_client.client import Client
from reflow_client.config import SCHEDULER_KINDS, ConfigError, parse_config

from .support import ROOT, DaemonProcess, wait_for

ENTRY = ROOT / "tests" / "workflows" / "reference_api.py"

P = inspect.Parameter


def documented(text: str) -> list[inspect.Parameter]:
    """Parameters of a signature as the reference prints it, e.g. ``(name, prefix=None)``."""
    namespace: dict[str, Any] = {}
    exec(f"def f{text}: pass", namespace)
    return list(inspect.signature(namespace["f"]).parameters.values())


def assert_signature(func: Any, text: str, returns: str | None = None, *, method: bool = True) -> None:
    ours = list(inspect.signature(func).parameters.values())[1 if method else 0:]
    want = documented(text)
    names = {p.name for p in want}
    kept = [p for p in ours if p.name in names]
    assert [(p.name, p.kind, p.default) for p in kept] == [(p.name, p.kind, p.default) for p in want], func
    positional = (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)
    last = max((i for i, p in enumerate(ours) if p.name in names and p.kind in positional), default=-1)
    for i, p in enumerate(ours):
        if p.name not in names:
            assert p.kind is P.VAR_KEYWORD or p.default is not P.empty, f"{func}: extra {p.name} needs a default"
            assert i > last, f"{func}: extra parameter {p.name} comes before a documented positional one"
    if returns is not None:
        assert inspect.signature(func).return_annotation == returns, func


def resolved_return(func: Any) -> Any:
    return typing.get_type_hints(func, localns=vars(reflow))["return"]


# ============================================================================ names


def test_the_reference_names_import_from_reflow() -> None:
    for name in ("Flow", "Workflow", "JobConfig", "Run", "TaskState", "RunState", "TaskInterrupted", "TaskSpec",
                 "WorkflowDescription", "LocalExecutor", "SlurmExecutor", "PBSExecutor", "SGEExecutor", "LSFExecutor",
                 "FluxExecutor", "Param", "Result", "RunDir", "Config", "load_config"):
        assert hasattr(reflow, name), name
        assert name in reflow.__all__, name
    assert reflow.flow.Flow is Flow and reflow.flow.JobConfig is JobConfig
    assert reflow.workflow.Workflow is Workflow and reflow.run.Run is Run
    assert issubclass(Workflow, Flow)
    assert issubclass(TaskInterrupted, Exception)


def test_task_and_run_states_have_the_reference_values_mapped_from_ours() -> None:
    assert [s.value for s in TaskState] == ["PENDING", "SUBMITTED", "RUNNING", "SUCCESS", "FAILED", "CANCELLED",
                                          "RETRYING"]
    assert [s.value for s in RunState] == ["RUNNING", "SUCCESS", "FAILED", "CANCELLED"]
    assert TaskState.retriable() == {TaskState.FAILED, TaskState.CANCELLED}
    assert TaskState.terminal() == {TaskState.SUCCESS, TaskState.FAILED, TaskState.CANCELLED}
    assert TaskState.PENDING in TaskState.active() and TaskState.SUBMITTED in TaskState.cancellable()
    assert TaskState.SUCCESS == "SUCCESS" and json.dumps({"s": TaskState.SUCCESS}) == '{"s": "SUCCESS"}'
    folded = {s: TaskState.from_reflow(s).value for s in ("pending", "ready", "submitting", "queued", "running",
                                                         "succeeded", "cached", "failed", "timeout", "out_of_memory",
                                                         "node_fail", "submit_failed", "upstream_failed", "cancelled")}
    assert folded == {"pending": "PENDING", "ready": "PENDING", "submitting": "SUBMITTED", "queued": "SUBMITTED",
                      "running": "RUNNING", "succeeded": "SUCCESS", "cached": "SUCCESS", "failed": "FAILED",
                      "timeout": "FAILED", "out_of_memory": "FAILED", "node_fail": "FAILED", "submit_failed": "FAILED",
                      "upstream_failed": "FAILED", "cancelled": "CANCELLED"}
    assert RunState.from_reflow("succeeded") is RunState.SUCCESS and RunState.from_reflow("running") is RunState.RUNNING
    with pytest.raises(ValueError, match="unknown reflow task state 'sleeping'"):
        TaskState.from_reflow("sleeping")


# ============================================================================ reflow.flow.Flow


def test_flow_signatures() -> None:
    assert_signature(Flow.__init__, "(name)", "None")
    assert_signature(
        Flow.job,
        "(name=None, *, array=False, array_parallelism=None, cpus=1, time='00:30:00', mem='4G', after=None, "
        "submit_options=None, extra=None, version='1', cache=True, verify=None, backend=None, **scheduler_options)",
        "Callable[[Callable[..., Any]], Callable[..., Any]]",
    )
    assert_signature(
        Flow.array_job,
        "(name=None, *, cpus=1, time='00:30:00', mem='4G', after=None, array_parallelism=None, submit_options=None, "
        "extra=None, version='1', cache=True, verify=None, backend=None, **scheduler_options)",
        "Callable[[Callable[..., Any]], Callable[..., Any]]",
    )


def test_flow_registers_tasks_and_has_no_execution_machinery() -> None:
    flow = Flow("conversion")
    assert flow.name == "conversion" and flow.tasks == {} and flow._registration_order == []

    def check(out: Any) -> bool:
        return True

    @flow.job()
    def split(n: int = 2) -> list[int]:
        return list(range(n))

    @flow.job("renamed", array=True, cpus=4, time="01:00:00", mem="8G", after=["split"], array_parallelism=5,
              submit_options={"partition": "a", "qos": "q"}, extra={"partition": "b"}, version="2", cache=False,
              verify=check, backend="slurm", constraint="gpu")
    def convert(x: Annotated[int, Result(step="split")]) -> int:
        return x

    @flow.array_job(cpus=4, time="01:00:00", mem="8G", after=["split"], array_parallelism=5,
                    submit_options={"partition": "a", "qos": "q"}, extra={"partition": "b"}, version="2", cache=False,
                    verify=check, backend="slurm", constraint="gpu")
    def again(x: Annotated[int, Result(step="split")]) -> int:
        return x

    assert convert(3) == 3, "the decorator returns the function"
    assert list(flow.tasks) == ["split", "renamed", "again"] == flow._registration_order
    assert isinstance(flow.tasks["renamed"], reflow.TaskSpec)
    assert flow.tasks["renamed"].config == flow.tasks["again"].config, "array=True is array_job"
    cfg = flow.tasks["renamed"].config
    assert cfg.submit_options == {"partition": "b", "qos": "q", "constraint": "gpu"}, "merged, later wins"
    assert (cfg.cpus, cfg.time, cfg.mem, cfg.after, cfg.array, cfg.array_parallelism, cfg.version, cfg.cache,
            cfg.backend) == (4, "01:00:00", "8G", ["split"], True, 5, "2", False, "slurm")
    assert flow.tasks["renamed"].verify is check
    assert not hasattr(flow, "submit") and not hasattr(flow, "validate")


# ============================================================================ reflow.flow.JobConfig


def test_jobconfig_is_the_documented_dataclass() -> None:
    assert_signature(
        JobConfig.__init__,
        "(cpus=1, time='00:30:00', mem='4G', array=False, after=None, array_parallelism=None, submit_options=None, "
        "version='1', cache=True, backend=None, extra=None, **scheduler_options)",
        "None",
    )
    assert dataclasses.is_dataclass(JobConfig)
    cfg = JobConfig(2, "01:00:00", "2G", True, ["a"], 3, {"partition": "p"}, "4", False, "slurm", {"qos": "q"},
                    account="acct")
    data = dataclasses.asdict(cfg)
    assert {k: data[k] for k in ("cpus", "time", "mem", "array", "after", "array_parallelism", "submit_options",
                                 "version", "cache", "backend")} == {
        "cpus": 2, "time": "01:00:00", "mem": "2G", "array": True, "after": ["a"], "array_parallelism": 3,
        "submit_options": {"partition": "p", "qos": "q", "account": "acct"}, "version": "4", "cache": False,
        "backend": "slurm"}
    assert cfg.extra is cfg.submit_options, "extra: the backward-compatible alias"
    assert dataclasses.replace(cfg, cpus=8).cpus == 8 and dataclasses.replace(cfg, cpus=8).submit_options == data[
        "submit_options"]
    assert JobConfig(submit_options={"q": 1}, extra={"q": 2}, q=3).submit_options == {"q": 3}


# ============================================================================ reflow.workflow.Workflow


def test_workflow_signatures() -> None:
    assert_signature(Workflow.__init__, "(name, config=None)", "None")
    assert_signature(Workflow.include, "(flow, prefix=None)", "None")
    assert_signature(Workflow.validate, "()", "None")
    assert_signature(Workflow.cli, "(argv=None)", "int")
    assert_signature(
        Workflow.submit,
        "(run_dir, *, store=None, executor=None, force=False, force_tasks=None, verify=False, **parameters)",
        "Run",
    )
    assert_signature(Workflow.submit_run, "(run_dir, parameters, store=None, executor=None)", "str")
    assert_signature(Workflow.retry_failed, "(run_id, store, run_dir, task_name=None, executor=None, verify=True)",
                     "int")
    assert_signature(Workflow.describe_typed, "()", "WorkflowDescription")
    assert_signature(Workflow.describe, "()", "dict[str, Any]")
    assert resolved_return(Workflow.submit) is Run
    assert resolved_return(Workflow.describe_typed) is WorkflowDescription
    # The calls Run makes on its workflow.
    assert_signature(Workflow.run_status, "(run_id, store)")
    assert_signature(Workflow.cancel_run, "(run_id, store, task_name=None, executor=None)", "int")


def test_workflow_config_is_loaded_when_none() -> None:
    given = parse_config({})
    assert Workflow("with_config", given).config is given
    assert isinstance(Workflow("loaded").config, reflow.Config)


def test_include_rewrites_internal_references_under_a_prefix() -> None:
    flow = Flow("conversion")

    @flow.job()
    def split() -> list[int]:
        return [1]

    @flow.array_job(after=["split"])
    def convert(x: Annotated[int, Result(step="split")]) -> int:
        return x

    wf = Workflow("experiment")
    wf.include(flow, prefix="era5")
    wf.include(flow, prefix="cmip")
    assert list(wf.tasks) == ["era5_split", "era5_convert", "cmip_split", "cmip_convert"]
    assert wf.tasks["cmip_convert"].result_deps["x"].steps == ["cmip_split"]
    assert wf.tasks["cmip_convert"].config.after == ["cmip_split"]
    with pytest.raises(ValueError, match="cannot include flow 'conversion': task 'era5_split' already exists"):
        wf.include(flow, prefix="era5")


def test_validate_raises_value_error_for_references_and_cycles_and_type_error_for_wiring() -> None:
    unknown = Workflow("unknown")

    @unknown.job()
    def a(x: Annotated[int, Result(step="nope")]) -> int:
        return x

    with pytest.raises(ValueError, match="references unknown task 'nope'"):
        unknown.validate()

    cycle = Workflow("cycle")

    @cycle.job(after=["b"])
    def a2() -> int:
        return 1

    @cycle.job(after=["a2"])
    def b() -> int:
        return 1

    with pytest.raises(ValueError, match="dependency cycle"):
        cycle.validate()

    mistyped = Workflow("mistyped")

    @mistyped.job()
    def names() -> list[str]:
        return ["a"]

    @mistyped.array_job()
    def each(x: Annotated[int, Result(step="names")]) -> int:
        return x

    with pytest.raises(TypeError, match="incompatible wiring 'names' -> each.x"):
        mistyped.validate()

    single = Workflow("single")

    @single.job()
    def one() -> int:
        return 1

    @single.array_job()
    def fan(x: Annotated[int, Result(step="one")]) -> int:
        return x

    with pytest.raises(TypeError, match="array task 'fan' has no input to fan out over: 'one' -> x passes a single"):
        single.validate()


def test_describe_has_the_documented_keys_and_typed_objects() -> None:
    wf = load_workflow(ENTRY)
    desc = wf.describe_typed()
    assert isinstance(desc, WorkflowDescription)
    assert desc.name == "reference_api" and Path(desc.entrypoint) == ENTRY.resolve()
    assert Path(desc.python).exists() and Path(desc.working_dir).is_dir()
    data = wf.describe()
    assert json.loads(json.dumps(data)) == data, "JSON-safe"
    assert {"name", "entrypoint", "python", "working_dir", "tasks", "cli_params"} <= set(data)
    assert data["name"] == "reference_api"
    assert [t["name"] for t in data["tasks"]] == ["prepare", "square", "total", "linger"], "topological order"
    for task in data["tasks"]:
        assert {"name", "is_array", "config", "dependencies", "result_deps", "return_type", "has_verify"} <= set(task)
        assert task["config"] == dataclasses.asdict(wf.tasks[task["name"]].config)
    square = next(t for t in data["tasks"] if t["name"] == "square")
    assert square["is_array"] and square["dependencies"] == ["prepare"]
    assert square["result_deps"] == {"x": {"steps": ["prepare"]}} and square["return_type"] == "int"
    assert desc.task("square").result_deps == square["result_deps"] and desc.task("square").has_verify is False
    assert square["inputs"] == {"x": [{"step": "prepare", "mode": "fanout"}]}, "our wiring modes beside them"
    params = {p["name"]: p for p in data["cli_params"]}
    assert set(params) == {"n", "fail_on", "linger"}, "run_dir is the run directory, not a parameter"
    for p in params.values():
        assert {"name", "task", "flag", "type_repr", "required", "default", "namespace", "help", "choices"} <= set(p)
    assert (params["n"]["flag"], params["n"]["type_repr"], params["n"]["required"], params["n"]["default"],
            params["n"]["namespace"], params["n"]["help"], params["n"]["choices"]) == (
        "--n", "int", False, 3, "global", "how many elements", None)


def test_cli_returns_an_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    wf = load_workflow(ENTRY)
    assert wf.cli(["dag"]) == 0
    assert "square[]" in capsys.readouterr().out
    assert wf.cli(["describe"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "reference_api"


def test_a_workflow_made_inside_a_function_validates_describes_and_draws_but_is_not_submitted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def build() -> Workflow:
        inner = Workflow("inner")

        @inner.job()
        def make(n: int = 2) -> list[int]:
            return list(range(n))

        @inner.array_job()
        def use(x: Annotated[int, Result(step="make")]) -> int:
            return x

        return inner

    wf = build()
    wf.validate()
    assert wf.describe()["name"] == "inner"
    assert wf.cli(["dag"]) == 0 and "use[]" in capsys.readouterr().out
    message = r"workflow 'inner' is created inside function build\(\).* workers .* create it at the top level"
    with pytest.raises(RuntimeError, match=message):
        wf.run_local(tmp_path / "local")
    with pytest.raises(RuntimeError, match=message):
        wf.submit(tmp_path / "daemon", store=tmp_path / "no-daemon.sock")
    assert not (tmp_path / "no-daemon.sock").exists(), "refused before any daemon was contacted"


# ---------------------------------------------------------------------------- executors


CLUSTERS = parse_config({
    "clusters": {
        "hpc": {"scheduler": "slurm", "submit_options": {"partition": "compute", "qos": "normal"}},
        "pbs1": {"scheduler": "pbs"},
        "pbs2": {"scheduler": "pbs"},
    }
})


def test_executor_classes_name_a_cluster_kind_and_translate_to_cluster_configuration() -> None:
    assert set(EXECUTORS) == set(SCHEDULER_KINDS), "one executor class per scheduler kind"
    assert resolve_executor(None, CLUSTERS)[0].name == "local"
    assert resolve_executor("local", CLUSTERS) == (CLUSTERS.clusters["local"], {})
    assert resolve_executor(LocalExecutor(), CLUSTERS)[0].name == "local"
    assert resolve_executor("hpc", CLUSTERS)[0].name == "hpc"
    assert resolve_executor("slurm", CLUSTERS)[0].name == "hpc", "a scheduler kind picks its one cluster"
    cluster, options = resolve_executor(SlurmExecutor(partition="debug", account="proj", qos=None), CLUSTERS)
    assert cluster.name == "hpc" and options == {"partition": "debug", "account": "proj"}
    translated = SlurmExecutor(partition="debug", mail_type="END").cluster_config(CLUSTERS)
    assert translated.scheduler == "slurm"
    assert translated.submit_options == {"partition": "debug", "qos": "normal", "mail_type": "END"}
    assert CLUSTERS.clusters["hpc"].submit_options == {"partition": "compute", "qos": "normal"}, "not modified"
    assert PBSExecutor("pbs2", queue="short").cluster_config(CLUSTERS).submit_options == {"queue": "short"}
    with pytest.raises(ConfigError, match=r"several clusters run 'pbs' \(pbs1, pbs2\); name one"):
        PBSExecutor().select(CLUSTERS)
    with pytest.raises(ConfigError, match="no cluster with scheduler 'lsf' is configured"):
        resolve_executor(reflow.LSFExecutor(), CLUSTERS)
    with pytest.raises(ConfigError, match="cluster 'hpc' runs scheduler 'slurm', not 'pbs'"):
        PBSExecutor("hpc").select(CLUSTERS)
    with pytest.raises(ConfigError, match="unknown cluster 'nowhere'"):
        resolve_executor("nowhere", CLUSTERS)
    with pytest.raises(TypeError, match="executor must be an executor"):
        resolve_executor(42, CLUSTERS)  # type: ignore[arg-type]
    assert SlurmExecutor(partition="a") == SlurmExecutor(submit_options={"partition": "a"})
    assert repr(SlurmExecutor("hpc", partition="a")) == "SlurmExecutor('hpc', partition='a')"


# ============================================================================ reflow.run.Run


def test_run_signatures() -> None:
    assert_signature(Run.__init__, "(workflow, run_id, run_dir, store)", "None")
    assert_signature(Run.status, "(task=None, as_dict=False)", "dict[str, Any] | None")
    assert_signature(Run.cancel, "(task=None, executor=None)", "int")
    assert_signature(Run.retry, "(task=None, executor=None, verify=True)", "int")


# ============================================================================ real runs through reflowd


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    d = DaemonProcess(tmp_path_factory.mktemp("refd"), config='[clusters.local]\nscheduler = "local"\nmax_workers = 4\n')
    d.start()
    yield d
    d.stop()


@pytest.fixture
def wf(daemon: DaemonProcess):
    workflow = load_workflow(ENTRY)
    original = workflow.config
    workflow.config = parse_config({"clusters": {"hpc": {"scheduler": "slurm"}}})
    yield workflow
    workflow.config = original


def runs_of(daemon: DaemonProcess) -> list[str]:
    with daemon.client() as c:
        return [r.id for r in c.runs(workflow="reference_api", limit=1000)]


def test_submit_returns_a_run_whose_status_has_the_documented_layout_and_dict(
    wf: Workflow, daemon: DaemonProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = wf.submit(tmp_path / "run1", store=daemon.socket, executor="local", n=3)
    assert isinstance(run, Run) and run.workflow is wf and run.run_dir == (tmp_path / "run1").resolve()
    assert run.wait(timeout=120).state == "succeeded"
    assert (tmp_path / "run1" / "prepare-ran").read_text().startswith("PosixPath "), "run_dir injected by name"

    assert run.status() is None
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"Run      {run.run_id}" and out[1] == "Workflow reference_api"
    assert out[2] == "Status   succeeded" and re.fullmatch(r"Created  \d{4}-\d\d-\d\dT[\d:]+\+00:00", out[3])
    assert out[4] == ""
    assert out[5:9] == [f"  {'prepare':20s}  succeeded=1", f"  {'square':20s}  succeeded=3",
                        f"  {'total':20s}  succeeded=1", f"  {'linger':20s}  succeeded=1"]

    run.status(task="square")
    lines = capsys.readouterr().out.splitlines()
    assert lines[5:7] == [f"  {'square':20s}  succeeded=3", ""]
    prefixes = [f"    {f'[{i}]':6s}  {'succeeded':12s}  job=" for i in range(3)]
    assert [line[:len(p)] for line, p in zip(lines[7:10], prefixes)] == prefixes
    assert all(len(line) > len(p) for line, p in zip(lines[7:10], prefixes)), "each instance names its job"

    info = run.status(as_dict=True)
    assert info is not None
    assert (info["run"]["run_id"], info["run"]["graph_name"], info["run"]["status"]) == (
        run.run_id, "reference_api", RunState.SUCCESS)
    assert info["run"]["created_at"] == out[3].split()[-1]
    assert info["summary"] == {"prepare": {"SUCCESS": 1}, "square": {"SUCCESS": 3}, "total": {"SUCCESS": 1},
                               "linger": {"SUCCESS": 1}}
    by_task = {(i["task_name"], i["array_index"]): i for i in info["instances"]}
    assert set(by_task) == {("prepare", None), ("square", 0), ("square", 1), ("square", 2), ("total", None),
                            ("linger", None)}
    assert all(i["state"] == TaskState.SUCCESS and i["job_id"] for i in info["instances"])
    assert info["run"]["state"] == "succeeded" and info["tasks"][1]["counts"] == {"succeeded": 3}, "ours beside"


def test_retry_and_retry_failed_with_the_documented_messages(
    wf: Workflow, daemon: DaemonProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "retry"
    run = wf.submit(run_dir, store=daemon.socket, n=4, fail_on=2)
    assert run.wait(timeout=120).state == "failed"
    info = run.status(as_dict=True)
    assert info is not None and info["run"]["status"] == "FAILED"
    assert info["summary"]["square"] == {"SUCCESS": 3, "FAILED": 1} and info["summary"]["total"] == {"FAILED": 1}
    run.status()
    printed = capsys.readouterr().out
    assert f"  {'square':20s}  failed=1, succeeded=3" in printed and "square[2] failed: ValueError: bad element 2" in printed

    assert run.retry() == 1, "without the fix the element fails again"
    assert capsys.readouterr().out == "Marked 1 task instance(s) for retry.\n"
    assert run.wait(timeout=120).state == "failed"
    (run_dir / "fixed").write_text("")
    assert wf.retry_failed(run.run_id, daemon.socket, run_dir, task_name="square") == 1
    assert run.wait(timeout=120).state == "succeeded"
    assert run.retry(task="square", verify=False) == 0
    assert capsys.readouterr().out == "Marked 0 task instance(s) for retry.\n"


def test_cancel_raises_task_interrupted_in_the_running_task(
    wf: Workflow, daemon: DaemonProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "cancel"
    run = wf.submit(run_dir, store=daemon.socket, executor=LocalExecutor(), linger=300)
    wait_for(lambda: (run_dir / "linger-started").exists(), timeout=120, what="linger to start")
    with pytest.raises(ValueError, match=r"runs on cluster 'local'; an executor for 'hpc' cannot act on it"):
        run.cancel(executor=SlurmExecutor())
    assert run.cancel(task="linger", executor="local") == 1
    assert capsys.readouterr().out == "Cancelled 1 task instance(s).\n"
    wait_for(lambda: (run_dir / "checkpoint").exists(), timeout=60, what="the task's TaskInterrupted handler")
    assert (run_dir / "checkpoint").read_text() == "SIGTERM"
    final = run.wait(timeout=120)
    assert {t.name: t.counts for t in final.tasks}["linger"] == {"cancelled": 1}
    assert wf.cancel_run(run.run_id, daemon.socket) == 0


def test_submit_run_executors_and_their_submit_options(wf: Workflow, daemon: DaemonProcess, tmp_path: Path) -> None:
    run_id = wf.submit_run(tmp_path / "low", {"n": 2, "run_dir": str(tmp_path / "low")}, store=daemon.socket,
                           executor=LocalExecutor(comment="run"))
    assert isinstance(run_id, str) and run_id.startswith("reference_api-")
    with daemon.client() as c:
        assert c.wait(run_id, timeout=120).state == "succeeded"
        manifest = c.describe(run_id)
    options = {t["name"]: t["config"]["submit_options"] for t in manifest["tasks"]}
    assert options["prepare"] == {"comment": "run"}, "run-wide submit options reach every task"
    before = runs_of(daemon)
    with pytest.raises(ValueError, match=r"parameters\['run_dir'\] \(elsewhere\) differs from run_dir"):
        wf.submit_run(tmp_path / "low", {"run_dir": "elsewhere"}, store=daemon.socket)
    with pytest.raises(ConfigError, match="no cluster with scheduler 'pbs' is configured"):
        wf.submit(tmp_path / "pbs", store=daemon.socket, executor=PBSExecutor())
    with pytest.raises(TypeError, match="executor must be"):
        wf.submit(tmp_path / "bad", store=daemon.socket, executor=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="store must be a reflow_client.Client, a reflowd socket path or None"):
        wf.submit(tmp_path / "bad", store=3.5)
    assert runs_of(daemon) == before, "refused before anything was submitted"


def test_parameters_are_checked_like_the_cli_and_strings_convert_by_one_rule(
    wf: Workflow, daemon: DaemonProcess, tmp_path: Path
) -> None:
    before = runs_of(daemon)
    with pytest.raises(TypeError, match=r"parameter 'n' expects int, got 'five' \(str\)"):
        wf.submit(tmp_path / "typed", store=daemon.socket, n="five")
    with pytest.raises(TypeError, match=r"parameter 'n' expects int, got 2.5 \(float\)"):
        wf.submit(tmp_path / "typed", store=daemon.socket, n=2.5)
    with pytest.raises(TypeError, match=r"parameter 'linger' expects float, got True \(bool\)"):
        wf.submit_run(tmp_path / "typed", {"linger": True}, store=daemon.socket)
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) 'm'"):
        wf.submit(tmp_path / "typed", store=daemon.socket, m=1)
    assert runs_of(daemon) == before
    first = wf.submit(tmp_path / "typed", store=daemon.socket, n=3)
    assert first.wait(timeout=120).ok
    second = wf.submit(tmp_path / "typed", store=daemon.socket, n="3", linger="0")
    final = second.wait(timeout=120)
    assert {t.name: t.counts for t in final.tasks} == {"prepare": {"cached": 1}, "square": {"cached": 3},
                                                       "total": {"cached": 1}, "linger": {"cached": 1}}, \
        '"3" is the int 3 and "0" the float 0.0: the same run, all cached'


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@pytest.mark.parametrize(
    ("tp", "given", "expected"),
    [
        (int, 3, 3), (int, "3", 3), (float, 2, 2.0), (float, "2.5", 2.5), (bool, "yes", True), (bool, False, False),
        (str, "3", "3"), (Path, "a/b", Path("a/b")), (dt.date, "2025-01-31", dt.date(2025, 1, 31)),
        (Colour, "red", Colour.RED), (Colour, "BLUE", Colour.BLUE), (Colour, Colour.RED, Colour.RED),
        (Literal["a", 1], "1", 1), (Optional[int], None, None), (Optional[int], "4", 4),
        (list[int], ["1", 2], [1, 2]), (list[Path], ("x",), [Path("x")]), (dict[str, int], {"a": 1}, {"a": 1}),
        (int | str, "x", "x"), (int | str, 4, 4), ("Unresolvable", object, object), (Any, 2.5, 2.5),
    ],
)
def test_the_one_rule_for_parameter_values(tp: Any, given: Any, expected: Any) -> None:
    value = check_value("p", tp, given)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("tp", "given", "message"),
    [
        (int, "five", r"expects int, got 'five' \(str\)"), (int, 2.5, "expects int"), (int, True, "expects int"),
        (float, "x", "expects float"), (bool, 1, "expects bool"), (bool, "maybe", "expected yes/no"),
        (str, 3, "expects str"), (Path, 3, "expects Path"), (Colour, "green", "expected one of red, blue"),
        (Literal["a", "b"], "c", "expected one of a, b"), (int, None, "only accepted for Optional"),
        (list[int], "1 2", "give a list"), (list[int], [1, "x"], "expects list\\[int\\]"),
        (dict[str, int], [1], "expects dict"),
    ],
)
def test_values_the_cli_would_refuse_are_refused_naming_the_parameter(tp: Any, given: Any, message: str) -> None:
    with pytest.raises(TypeError, match=rf"parameter 'p' .*{message}"):
        check_value("p", tp, given)


def test_missing_required_parameters_raise_type_error(daemon: DaemonProcess, tmp_path: Path) -> None:
    required = Workflow("required")

    @required.job()
    def start_at(start: str, n: int = 1) -> int:
        return n

    with pytest.raises(TypeError, match=r"missing required parameter\(s\) for workflow 'required': --start"):
        required.submit(tmp_path / "r", store=daemon.socket)


def test_force_force_tasks_and_verify(wf: Workflow, daemon: DaemonProcess, tmp_path: Path) -> None:
    run_dir = tmp_path / "force"
    assert wf.submit(run_dir, store=daemon.socket, n=2).wait(timeout=120).ok

    def counts(run: Run) -> dict[str, dict[str, int]]:
        return {t.name: t.counts for t in run.wait(timeout=120).tasks}

    assert counts(wf.submit(run_dir, store=daemon.socket, n=2, force=True)) == {
        "prepare": {"succeeded": 1}, "square": {"succeeded": 2}, "total": {"succeeded": 1}, "linger": {"succeeded": 1}}
    assert counts(wf.submit(run_dir, store=daemon.socket, n=2, force_tasks=["total"])) == {
        "prepare": {"cached": 1}, "square": {"cached": 2}, "total": {"succeeded": 1}, "linger": {"cached": 1}}
    assert counts(wf.submit(run_dir, store=daemon.socket, n=2, verify=True))["square"] == {"cached": 2}


def test_a_run_handle_made_by_hand_reaches_the_same_run(wf: Workflow, daemon: DaemonProcess, tmp_path: Path) -> None:
    run = wf.submit(tmp_path / "by_hand", store=daemon.socket, n=1)
    again = Run(wf, run.run_id, tmp_path / "by_hand", Client(daemon.socket))
    assert again.wait(timeout=120).ok
    info = again.status(as_dict=True)
    assert info is not None and info["run"]["run_id"] == run.run_id and info["summary"]["square"] == {"SUCCESS": 1}


# ============================================================================ the same workflow through run_local


def test_run_local_runs_the_reference_workflow_with_the_same_parameter_rules(wf: Workflow, tmp_path: Path) -> None:
    result = wf.run_local(tmp_path / "local", n="4")
    assert result.ok and result["total"] == 0 + 1 + 4 + 9 and result["square"] == [0, 1, 4, 9]
    assert (tmp_path / "local" / "prepare-ran").read_text().startswith("PosixPath ")
    with pytest.raises(TypeError, match=r"parameter 'n' expects int, got 'four' \(str\)"):
        wf.run_local(tmp_path / "local", n="four")


# ============================================================================ a real workload manager


@pytest.mark.slurm
@pytest.mark.parametrize("slurm_cluster", ["plain"], indirect=True)
def test_slurm_executor_options_reach_sbatch_and_scancel_raises_task_interrupted(slurm_cluster: Any,
                                                                                tmp_path: Path) -> None:
    """The cluster's own partition is down; SlurmExecutor(partition=...) moves the run to a working one."""
    import subprocess
    import sys

    config = (f'[clusters.slurm]\nscheduler = "slurm"\npython = "{sys.executable}"\n'
              "min_poll_interval = 1\npoll_interval = 2\nmax_poll_interval = 10\n"
              f'submit_options = {{ partition = "{slurm_cluster.bad_partition}" }}\n')
    d = DaemonProcess(tmp_path / "d", config=config).start()
    workflow = load_workflow(ENTRY)
    original = workflow.config
    workflow.config = parse_config({"clusters": {"slurm": {"scheduler": "slurm"}}})
    try:
        run_dir = tmp_path / "slurm"
        run = workflow.submit(run_dir, store=d.socket, executor=SlurmExecutor(partition=slurm_cluster.partition),
                              n=2, linger=300)
        wait_for(lambda: (run_dir / "linger-started").exists(), timeout=240, what="linger to start on Slurm")
        info = run.status(task="linger", as_dict=True)
        assert info is not None
        job_id = next(i["job_id"] for i in info["instances"] if i["task_name"] == "linger")
        shown = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%P"], capture_output=True, text=True,
                               timeout=60)
        assert shown.stdout.strip() == slurm_cluster.partition, (shown.stdout, shown.stderr)
        assert run.cancel(task="linger", executor=SlurmExecutor()) == 1
        wait_for(lambda: (run_dir / "checkpoint").exists(), timeout=120, what="TaskInterrupted in the Slurm job")
        assert (run_dir / "checkpoint").read_text() == "SIGTERM"
        final = run.wait(timeout=240)
        assert {t.name: t.counts for t in final.tasks} == {"prepare": {"succeeded": 1}, "square": {"succeeded": 2},
                                                           "total": {"succeeded": 1}, "linger": {"cancelled": 1}}
    finally:
        workflow.config = original
        d.stop()
