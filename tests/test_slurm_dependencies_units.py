"""Slurm-side dependencies, the pure parts: sbatch's dependency options, the recipe a job resolves its
inputs from (the same arguments and identity as the engine's own resolution), and the worker doing it
from real result files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from reflow_client import codec, jobfiles
from reflow_client.manifest import Manifest
from reflowd.engine import deferred
from reflowd.engine.resolve import UpstreamView, identity_for, resolve
from reflowd.schedulers.slurm_commands import dependency_options

COUNTING = Path(__file__).resolve().parent / "engine_workflows" / "counting.py"


def test_dependency_options_name_every_upstream_job_once_and_kill_on_an_invalid_one() -> None:
    assert dependency_options(["123", "99", "123_4", "124.batch"]) == {
        "dependency": "afterok:99:123:124", "kill-on-invalid-dep": "yes"}
    assert dependency_options(["7"], "aftercorr")["dependency"] == "aftercorr:7"
    with pytest.raises(ValueError, match="job ids"):
        dependency_options([])
    with pytest.raises(ValueError, match="job ids"):
        dependency_options(["rf0123"])
    with pytest.raises(ValueError, match="unsupported"):
        dependency_options(["1"], "afterany")


def counting_manifest() -> Manifest:
    from reflow.loader import load_workflow

    return Manifest.from_dict(load_workflow(COUNTING).describe())


def result(value: Any, state: str = "succeeded") -> dict[str, Any]:
    encoded = codec.encode(value)
    return {"state": state, "output": encoded, "output_hash": codec.value_hash(encoded)}


def test_a_gather_recipe_resolves_the_engines_arguments_and_identity(tmp_path: Path) -> None:
    manifest = counting_manifest()
    total = next(t for t in manifest.tasks if t.name == "total")
    outputs = [result(i * i) for i in range(5)]
    # the engine's way: an upstream view of the finished array
    view = UpstreamView(is_array=True, outputs=[r["output"] for r in outputs],
                        hashes=[r["output_hash"] for r in outputs], ok=[True] * 5)
    res = resolve(total, {"work": view}, {}, str(tmp_path))
    want = (res.shared, identity_for("counting", total, res, None))
    # the recipe's way: two elements already known (cache hits), three in result files
    elements = [["value", outputs[0]["output"], outputs[0]["output_hash"]],
                ["value", outputs[1]["output"], outputs[1]["output_hash"]]]
    elements += [["file", f"/jobs/t/results/{i}.json"] for i in range(2, 5)]
    recipe = json.loads(json.dumps(deferred.recipe("counting", total, {}, str(tmp_path), 0,
                                                   {"work": (True, elements)})))
    assert deferred.files(recipe) == [f"/jobs/t/results/{i}.json" for i in range(2, 5)]
    files = {f"/jobs/t/results/{i}.json": outputs[i] for i in range(2, 5)}
    assert deferred.resolve_recipe(recipe, files) == want

    with pytest.raises(deferred.DeferredError, match="element 3 did not succeed"):
        deferred.resolve_recipe(recipe, {**files, "/jobs/t/results/3.json": result(None, "failed")})
    with pytest.raises(deferred.DeferredError, match="element 4 left no result"):
        deferred.resolve_recipe(recipe, {**files, "/jobs/t/results/4.json": None})


def test_a_recipe_matches_only_the_results_it_reads_and_the_attempt_it_was_written_for() -> None:
    recipe = {"format": 1, "attempt": 0, "upstream": {"work": {"is_array": True, "elements": [
        ["file", "/a/results/0.json"], ["value", {"x": 1}, "h1"]]}}}
    ok = {0: ("/a/results/0.json", "h0"), 1: (None, "h1")}
    assert deferred.matches(recipe, 0, lambda dep, n: ok[n]) is None
    assert "attempt" in (deferred.matches(recipe, 1, lambda dep, n: ok[n]) or "")
    retried = {**ok, 0: ("/b/results/0.json", "h0")}  # the element succeeded in a retry's job
    assert "succeeded elsewhere" in (deferred.matches(recipe, 0, lambda dep, n: retried[n]) or "")
    assert "not succeeded" in (deferred.matches(recipe, 0, lambda dep, n: None if n == 0 else ok[n]) or "")
    changed = {**ok, 1: (None, "h2")}
    assert "another output" in (deferred.matches(recipe, 0, lambda dep, n: changed[n]) or "")


def early_job(tmp_path: Path, elements: list[list[Any]]) -> Path:
    manifest = counting_manifest()
    total = next(t for t in manifest.tasks if t.name == "total")
    job_dir = tmp_path / "jobs" / "early"
    jobfiles.write_json_atomic(str(job_dir / jobfiles.JOB_FILE), {
        "run_id": "run-1", "workflow": "counting", "task": "total", "entrypoint": str(COUNTING),
        "run_dir": str(tmp_path), "tag": "early", "kwargs": {},
        deferred.JOB_KEY: deferred.recipe("counting", total, {}, str(tmp_path), 0, {"work": (True, elements)})})
    return job_dir


def run_worker(job_dir: Path) -> tuple[int, dict[str, Any] | None]:
    proc = subprocess.run([sys.executable, "-m", "reflow.worker", str(job_dir)], capture_output=True, text=True,
                          timeout=120)
    path = job_dir / "results" / "single.json"
    return proc.returncode, json.loads(path.read_text()) if path.exists() else None


def test_the_worker_resolves_a_gather_from_upstream_result_files(tmp_path: Path) -> None:
    upstream = tmp_path / "jobs" / "up" / "results"
    for i in range(3):
        jobfiles.write_json_atomic(str(upstream / f"{i}.json"), result(i * i))
    job_dir = early_job(tmp_path, [["file", str(upstream / f"{i}.json")] for i in range(3)])
    code, out = run_worker(job_dir)
    assert code == 0 and out is not None and out["state"] == "succeeded", out
    assert codec.decode(out["output"]) == 0 + 1 + 4
    assert out["resolved_inputs"] is True and len(out["identity"]) == 64
    assert (tmp_path / "executions.txt").read_text().startswith("total ")


def test_the_worker_never_runs_the_task_on_a_failed_upstream_or_a_withdrawn_job(tmp_path: Path) -> None:
    upstream = tmp_path / "jobs" / "up" / "results"
    jobfiles.write_json_atomic(str(upstream / "0.json"), result(1))
    jobfiles.write_json_atomic(str(upstream / "1.json"), result(None, "failed"))
    job_dir = early_job(tmp_path, [["file", str(upstream / f"{i}.json")] for i in range(2)])
    code, out = run_worker(job_dir)
    assert code == 2 and out is not None and out["state"] == "failed"
    assert "upstream work element 1 did not succeed" in out["error"]
    assert not (tmp_path / "executions.txt").exists()

    (job_dir / "results" / "single.json").unlink()
    jobfiles.write_json_atomic(str(upstream / "1.json"), result(2))
    jobfiles.write_json_atomic(jobfiles.cancel_path(str(job_dir), None), {})
    code, out = run_worker(job_dir)
    assert code == 0 and out is None  # withdrawn by the daemon: no run, no result
    assert not (tmp_path / "executions.txt").exists()


def test_an_early_sbatch_only_takes_a_token_the_next_poll_does_not_need() -> None:
    from reflowd.budget import Budget
    from reflowd.driver.early import spare_token

    budget = Budget(12)  # a burst of 3 tokens, one every 5 s
    assert spare_token(budget)
    budget.charge_command("squeue")
    assert spare_token(budget)  # 2 left: one for the early sbatch, one for the next poll
    budget.charge_command("sbatch")
    assert not spare_token(budget)
    assert spare_token(Budget(600))


# ---------------------------------------------------------------------- element-wise chains (aftercorr)

ELEMENTWISE = Path(__file__).resolve().parent / "engine_workflows" / "early_elementwise.py"


def elementwise_tasks() -> dict[str, Any]:
    from reflow.loader import load_workflow

    return {t.name: t for t in Manifest.from_dict(load_workflow(ELEMENTWISE).describe()).tasks}


def test_only_an_array_mapped_element_by_element_over_one_array_is_a_chain() -> None:
    tasks = elementwise_tasks()
    assert deferred.chain_source(tasks["double"]) == "work"
    assert deferred.chain_source(tasks["work"]) is None  # a fan-out: its size is its upstream's output
    assert deferred.chain_source(tasks["total"]) is None  # a gather (the single early path's)
    both = tasks["double"].to_dict()  # the same upstream also feeding a whole-value parameter
    both["inputs"]["all"] = [{"step": "work", "mode": "broadcast"}]
    from reflow_client.manifest import TaskManifest
    assert deferred.chain_source(TaskManifest.from_dict(both, "t")) is None


def test_a_chained_element_resolves_the_engines_arguments_and_identity_from_its_upstream_element_alone(
        tmp_path: Path) -> None:
    double = elementwise_tasks()["double"]
    outputs = [result(i * i) for i in range(5)]
    params = {"offset": codec.encode(7)}
    view = UpstreamView(is_array=True, outputs=[r["output"] for r in outputs],
                        hashes=[r["output_hash"] for r in outputs], ok=[True] * 5)
    res = resolve(double, {"work": view}, params, str(tmp_path))  # the engine's, once every element is done
    recipe = json.loads(json.dumps(deferred.chain_recipe("early_elementwise", double, params, str(tmp_path), {},
                                                         "work", 5, "/jobs/up")))
    assert deferred.chain_file(recipe, 3) == "/jobs/up/results/3.json"
    # element 3 alone is known (the others may still run), element 4 failed, element 1 left nothing
    shared, found = deferred.resolve_chain(recipe, {3: outputs[3], 4: result(None, "failed"), 1: None})
    assert shared == res.shared
    assert found[3] == (dict(res.elements[3]), identity_for("early_elementwise", double, res, 3))
    assert "element 4 did not succeed" in str(found[4]) and "element 1 left no result" in str(found[1])
    with pytest.raises(deferred.DeferredError, match="does not map"):
        deferred.resolve_chain({**recipe, "chain": {**recipe["chain"], "dep": "prepare"}}, {})


def test_a_chained_recipe_matches_only_its_first_attempt_and_the_upstream_job_it_reads() -> None:
    recipe = {"format": 1, "attempt": 1, "chain": {"dep": "work", "size": 4, "job_dir": "/jobs/a"}}
    assert deferred.chain_matches(recipe, 1, 2, "/jobs/a/results/2.json") is None
    assert "attempt" in (deferred.chain_matches(recipe, 2, 2, "/jobs/a/results/2.json") or "")
    assert "did not succeed in" in (deferred.chain_matches(recipe, 1, 2, "/jobs/b/results/2.json") or "")  # retried
    assert "did not succeed in" in (deferred.chain_matches(recipe, 1, 2, None) or "")


def test_a_chain_goes_early_only_when_both_arrays_run_the_same_elements_per_array_task() -> None:
    from reflowd.driver.packing import Plan, aligned
    from reflowd.schedulers.base import SubmitRequest

    def request(indices: list[int] | None, slices: list[list[int]] | None = None) -> SubmitRequest:
        return SubmitRequest(tag="t", run_id="r", task="a", job_dir="/j", log_dir="/l", workdir="/w",
                             worker_argv=["w"], indices=indices, slices=slices)

    unpacked = request([0, 1, 2, 3])
    packed = request([0, 1], [[0, 1], [2, 3]])
    assert aligned(unpacked, None)
    assert not aligned(unpacked, Plan([[0, 1], [2, 3]], 1, "pack=2"))
    assert aligned(packed, Plan([[0, 1], [2, 3]], 1, "pack=2"))
    assert aligned(packed, Plan([[0, 1], [2, 3]], 2, "pack=2"))  # (how many run at once inside does not matter)
    assert not aligned(packed, Plan([[0, 1, 2], [3]], 1, "pack=3"))
    assert not aligned(packed, None)
    assert not aligned(request(None), None)  # a singleton has no array tasks to correspond to


def chained_job(tmp_path: Path, up: Path, size: int, slices: list[list[int]] | None = None) -> Path:
    double = elementwise_tasks()["double"]
    job_dir = tmp_path / "jobs" / "early"
    job: dict[str, Any] = {
        "run_id": "run-1", "workflow": "early_elementwise", "task": "double", "entrypoint": str(ELEMENTWISE),
        "run_dir": str(tmp_path), "tag": "early", "kwargs": {},
        deferred.JOB_KEY: deferred.chain_recipe("early_elementwise", double, {"offset": codec.encode(1)},
                                                str(tmp_path), {}, "work", size, str(up))}
    if slices is not None:
        job.update(slices=slices, width=1)
    jobfiles.write_json_atomic(str(job_dir / jobfiles.JOB_FILE), job)
    return job_dir


def worker(job_dir: Path, *args: str) -> int:
    return subprocess.run([sys.executable, "-m", "reflow.worker", str(job_dir), *args], capture_output=True,
                          text=True, timeout=120).returncode


def test_the_worker_runs_a_chained_element_from_its_upstream_elements_result_unpacked_and_packed(
        tmp_path: Path) -> None:
    up = tmp_path / "jobs" / "up"
    for i in (0, 2, 3):
        jobfiles.write_json_atomic(jobfiles.result_path(str(up), i), result(i * i))
    jobfiles.write_json_atomic(jobfiles.result_path(str(up), 1), result(None, "failed"))
    double = elementwise_tasks()["double"]
    view = UpstreamView(is_array=True, outputs=[codec.encode(i * i) for i in range(4)],
                        hashes=[codec.value_hash(codec.encode(i * i)) for i in range(4)], ok=[True] * 4)

    def identity(run_dir: Path, index: int) -> str:  # the engine's, once every element is done
        res = resolve(double, {"work": view}, {"offset": codec.encode(1)}, str(run_dir))
        return identity_for("early_elementwise", double, res, index)

    unpacked = chained_job(tmp_path / "u", up, 4)
    assert worker(unpacked, "--index", "2") == 0
    out = json.loads((unpacked / "results" / "2.json").read_text())
    assert out["state"] == "succeeded" and codec.decode(out["output"]) == 2 * 4 + 1
    assert out["resolved_inputs"] is True and out["identity"] == identity(tmp_path / "u", 2)
    assert worker(unpacked, "--index", "1") == 2  # its upstream element failed: not run
    assert "did not succeed" in json.loads((unpacked / "results" / "1.json").read_text())["error"]
    assert (tmp_path / "u" / "executions.txt").read_text().count("double") == 1

    packed = chained_job(tmp_path / "p", up, 4, slices=[[0, 1], [2, 3]])
    jobfiles.write_json_atomic(jobfiles.cancel_path(str(packed), 3), {})  # withdrawn by the daemon
    assert worker(packed, "--packed", "--index", "1") == 0
    out = json.loads((packed / "results" / "2.json").read_text())
    assert out["identity"] == identity(tmp_path / "p", 2) and out["resolved_inputs"] is True
    assert not (packed / "results" / "3.json").exists()
    assert worker(packed, "--packed", "--index", "0") != 0  # element 1's upstream failed; element 0 still runs
    assert json.loads((packed / "results" / "0.json").read_text())["state"] == "succeeded"
    assert "did not succeed" in json.loads((packed / "results" / "1.json").read_text())["error"]
    lines = (tmp_path / "p" / "executions.txt").read_text().splitlines()
    assert sorted(line.split(" pid=")[0] for line in lines) == ["double 0", "double 4"]


def test_an_early_array_task_is_adopted_for_its_wanted_elements_only_where_slurm_runs_or_ran_it() -> None:
    from reflowd.driver.chains import verdict

    piece = [4, 5]
    # waiting in the queue on an upstream task that succeeded whole: adopted
    assert verdict(piece, {4, 5}, {4, 5}, started=False, alive=True) == [4, 5]
    # element 5 is a cache hit (not wanted): 4 alone is adopted, 5 is skipped by its marker
    assert verdict(piece, {4}, {4, 5}, started=False, alive=True) == [4]
    # upstream element 5 failed (or was retried elsewhere): Slurm cancels the task; element 4 goes out again
    assert verdict(piece, {4}, {4}, started=False, alive=True) == []
    # gone from the queue without starting (cancelled for its dependency, or by hand)
    assert verdict(piece, {4, 5}, {4, 5}, started=False, alive=False) == []
    # it has started: whatever is wanted is adopted (an element whose upstream failed did not run: its
    # worker found the failed result), so nothing the early job ran runs again
    assert verdict(piece, {4}, {4}, started=True, alive=False) == [4]
    assert verdict(piece, set(), {4, 5}, started=True, alive=True) == []


def test_the_driver_mirrors_an_upstream_array_job_and_adopts_the_early_array_task_by_task(tmp_path: Path) -> None:
    """ChainJobs' bookkeeping behind fakes of the driver's seams (the real Slurm tests run it for real): which
    upstream job it mirrors, and how an early array is split between adoption and the normal way."""
    import os
    from collections import Counter
    from types import SimpleNamespace

    import anyio

    from reflowd.driver.chains import ChainJobs
    from reflowd.driver.policy import FileClock
    from reflowd.driver.track import JobTrack
    from reflowd.engine.model import Instance, JobRecord, Run, TaskRun, TaskState
    from reflowd.engine.states import State
    from reflowd.schedulers.base import Observation, Phase, Presence, SubmitRequest

    tasks = elementwise_tasks()
    manifest = Manifest(workflow="early_elementwise", tasks=list(tasks.values()), cli_params=[],
                        entrypoint=str(ELEMENTWISE), python=sys.executable, working_dir="/")
    run = Run(id="r1", manifest=manifest, params={}, run_dir=str(tmp_path), cluster="hpc")
    for name, task in tasks.items():
        run.tasks[name] = TaskRun(manifest=task, run_id="r1", name=name)
    done = result(list(range(4)))
    run.tasks["prepare"].add(Instance(run_id="r1", task="prepare", index=None, state=State.SUCCEEDED,
                                      output=done["output"], output_hash=done["output_hash"]))
    work = run.tasks["work"]
    work.state, work.size = TaskState.EXPANDED, 4
    for i in range(4):
        work.add(Instance(run_id="r1", task="work", index=i, state=State.QUEUED, tag="rfA"))

    def request(tag: str, indices: list[int], options: dict[str, Any] | None = None) -> SubmitRequest:
        return SubmitRequest(tag=tag, run_id="r1", task="x", job_dir=jobfiles.job_dir(str(tmp_path), "r1", tag),
                             log_dir="/l", workdir="/w", worker_argv=["w"], indices=indices, options=options or {})

    class Files:
        async def read_files(self, paths: list[str], timeout: float = 0) -> dict[str, bytes | None]:
            return {p: Path(p).read_bytes() if os.path.exists(p) else None for p in paths}

        async def exists(self, paths: list[str], timeout: float = 0) -> dict[str, bool]:
            return {p: os.path.exists(p) for p in paths}

        async def write_files(self, files: dict[str, bytes], timeout: float = 0) -> None:
            for p, data in files.items():
                jobfiles.write_json_atomic(p, json.loads(data))

    async def query(job_ids: list[str]) -> dict[str, Observation]:
        pending = Observation(Presence.PRESENT, Phase.QUEUED, None, "PENDING", "Dependency")
        return {"101_1": pending, "101_3": pending}  # 101_2: cancelled by Slurm (its upstream task failed)

    async def nothing(*args: Any) -> None:
        return None

    def transition(run: Run, inst: Instance, new: State, evidence: dict[str, Any], **fields: Any) -> bool:
        inst.state = new
        for key, value in fields.items():
            setattr(inst, key, value)
        return True

    counters: Counter[str] = Counter()
    given_back: list[Instance] = []
    upstream = JobTrack(JobRecord("rfA", "r1", "work", "hpc", request("rfA", [0, 1, 2, 3]), job_id="100"), run,
                        dict(work.instances.items()), FileClock(1.0, 2.0))
    d = SimpleNamespace(
        cluster=SimpleNamespace(config=SimpleNamespace(command_timeout=5.0, submit_options={}), metered=Files(),
                                scheduler=SimpleNamespace(query=query)),
        store=SimpleNamespace(put_job=lambda record: None, pace=nothing, flush=nothing),
        host=SimpleNamespace(transition=transition), tracks={"rfA": upstream}, cancels={}, emptied={},
        follow=lambda track: d.tracks.__setitem__(track.tag, track),  # (the driver's: indexes it too)
        query_due=False, wake=lambda: None, count=lambda name, n=1: counters.update({name: n}),
        submit=lambda run, insts: given_back.extend(insts),
        new_track=lambda record, run, insts: JobTrack(record, run, dict(insts), FileClock(1.0, 2.0)),
        packer=SimpleNamespace(keep_job=lambda key: False),
        early=SimpleNamespace(upstream_submitted=lambda run: None, _find=nothing))
    chains = ChainJobs(SimpleNamespace(d=d))  # type: ignore[arg-type]

    # while work's job is queued, double (not expanded) mirrors it
    [(tr, dep, values, track)] = chains.eligible(run)
    assert (tr.name, dep, values, track) == ("double", "work", {}, upstream)

    # the early array (as submit leaves it), and what happened meanwhile: work[2] failed and succeeded in a
    # retry's job; double[0] ran early; double[1] is a cache hit; the others were handed over READY
    early = JobRecord("rfB", "r1", "double", "hpc", request("rfB", [0, 1, 2, 3], {"dependency": "aftercorr:100"}),
                      job_id="101", state="early")
    jobfiles.write_json_atomic(str(Path(early.request.job_dir) / jobfiles.JOB_FILE), {deferred.JOB_KEY: deferred.chain_recipe(
        "early_elementwise", tasks["double"], {}, str(tmp_path), {}, "work", 4, upstream.request.job_dir)})
    jobfiles.write_json_atomic(jobfiles.started_path(early.request.job_dir, 0), {})
    chains.records[("r1", "double")] = {"rfB": early}
    chains.runs["r1"] = run
    for i, inst in work.instances.items():
        inst.state, inst.tag = State.SUCCEEDED, "rfA2" if i == 2 else "rfA"
    double = run.tasks["double"]
    double.state, double.size = TaskState.EXPANDED, 4
    for i in range(4):
        double.add(Instance(run_id="r1", task="double", index=i, state=State.CACHED if i == 1 else State.READY))
    assert chains.claim(run, double.instances[0]) and chains.claim(run, double.instances[2])
    chains.left(run, double.instances[1])
    anyio.run(chains.step)
    assert "rfB" in chains.records[("r1", "double")], "decided while double[3] was not past the cache check"
    assert chains.claim(run, double.instances[3])
    anyio.run(chains.step)
    assert chains.records == {}
    # task 0 started: adopted; task 3 waits on work[3], which succeeded in the job it reads: adopted;
    # task 2 reads a work[2] that failed there (Slurm cancelled it): dropped, double[2] goes the usual way;
    # task 1 holds only a cache hit: dropped
    states = {i: (inst.state, inst.tag, inst.job_id) for i, inst in double.instances.items()}
    assert states == {0: (State.QUEUED, "rfB", "101"), 1: (State.CACHED, None, None), 2: (State.READY, None, None),
                      3: (State.QUEUED, "rfB", "101")}
    assert given_back == [double.instances[2]]
    assert set(d.cancels) == {"101_1", "101_2"}
    withdrawn = {i for i in range(4) if os.path.exists(jobfiles.cancel_path(early.request.job_dir, i))}
    assert withdrawn == {1, 2}
    assert set(d.tracks["rfB"].live) == {0, 3}
    assert counters["chain_adopted_elements"] == 2 and counters["chain_dropped_tasks"] == 2
