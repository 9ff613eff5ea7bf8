"""Slurm-side dependencies, the pure parts: sbatch's dependency options, the recipe a job resolves its
inputs from (the same arguments and identity as the engine's own resolution), and the worker doing it
from real result files."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from reflow_client import codec, jobfiles
from reflow_client.manifest import Manifest
from reflowd.engine import deferred
from reflowd.driver.policy import FileClock
from reflowd.engine.resolve import UpstreamView, identity_for, resolve
from reflowd.schedulers.base import SubmitRequest
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


class ChainWorld:
    """A run of ``early_elementwise`` (prepare -> work -> double -> total) behind fakes of a cluster driver's
    seams, for ChainJobs' bookkeeping and the observer's view of an early array (the real Slurm tests run
    the same code for real). Job files are real files under *tmp_path*; Slurm's answers are ``answers``
    (array task key -> observation); ``calls`` lists, in order, the markers written and the keys cancelled.
    ``work`` has 4 elements queued in job 100 (tag rfA); *slices* packs both arrays alike."""

    def __init__(self, tmp_path: Path, slices: list[list[int]] | None = None) -> None:
        from collections import Counter
        from types import SimpleNamespace

        from reflowd.driver.chains import ChainJobs
        from reflowd.driver.driver import Driver
        from reflowd.driver.early import EarlyJobs
        from reflowd.driver.packing import Packer
        from reflowd.engine.decide import Timing
        from reflowd.engine.model import Instance, JobRecord, Run, TaskRun, TaskState
        from reflowd.engine.states import State
        from reflowd.schedulers.base import Observation

        self.tmp_path, self.slices = tmp_path, slices
        self.tasks = elementwise_tasks()
        manifest = Manifest(workflow="early_elementwise", tasks=list(self.tasks.values()), cli_params=[],
                            entrypoint=str(ELEMENTWISE), python=sys.executable, working_dir="/")
        self.run = run = Run(id="r1", manifest=manifest, params={}, run_dir=str(tmp_path), cluster="hpc")
        for name, task in self.tasks.items():
            run.tasks[name] = TaskRun(manifest=task, run_id="r1", name=name)
        done = result(list(range(4)))
        run.tasks["prepare"].add(Instance(run_id="r1", task="prepare", index=None, state=State.SUCCEEDED,
                                          output=done["output"], output_hash=done["output_hash"]))
        work = run.tasks["work"]
        work.state, work.size = TaskState.EXPANDED, 4
        for i in range(4):
            work.add(Instance(run_id="r1", task="work", index=i, state=State.QUEUED, tag="rfA"))
        self.answers: dict[str, Observation] = {}
        self.calls: list[tuple[str, list[Any]]] = []
        self.counters: Counter[str] = Counter()
        self.given_back: list[Instance] = []
        self.on_write: list[Any] = []
        world = self

        class Files:
            async def read_files(self, paths: list[str], timeout: float = 0) -> dict[str, bytes | None]:
                return {p: Path(p).read_bytes() if os.path.exists(p) else None for p in paths}

            async def exists(self, paths: list[str], timeout: float = 0) -> dict[str, bool]:
                return {p: os.path.exists(p) for p in paths}

            async def listdir(self, path: str, timeout: float = 0) -> list[str]:
                return sorted(os.listdir(path)) if os.path.isdir(path) else []

            async def write_files(self, files: dict[str, bytes], timeout: float = 0) -> None:
                world.calls.append(("write", sorted(files)))
                while world.on_write:  # (what happens while the files are written)
                    world.on_write.pop(0)()
                for p, data in files.items():
                    jobfiles.write_json_atomic(p, json.loads(data))

        async def query(job_ids: list[str]) -> dict[str, Observation]:
            return dict(self.answers)

        async def cancel(keys: list[str]) -> None:
            self.calls.append(("cancel", sorted(keys)))

        async def nothing(*args: Any) -> None:
            return None

        def transition(run: Run, inst: Instance, new: State, evidence: dict[str, Any], **fields: Any) -> bool:
            old, tag = inst.state, inst.tag
            inst.state = new
            for key, value in fields.items():
                setattr(inst, key, value)
            if old in (State.SUBMITTING, State.QUEUED, State.RUNNING) and new not in (State.QUEUED, State.RUNNING):
                self.instance_left(inst, tag)
            return True

        def update(inst: Instance, **fields: Any) -> None:
            for key, value in fields.items():
                setattr(inst, key, value)

        def follow(track: JobTrack) -> None:  # (the driver's: indexes it too)
            d.tracks[track.tag] = track
            if track.record.job_id:
                d.by_job[track.record.job_id] = track

        from reflowd.driver.track import JobTrack

        def add_unresolved(track: JobTrack) -> None:  # (the driver's: counts it toward a queue limit too)
            d.unresolved[track.tag] = track

        config = SimpleNamespace(command_timeout=5.0, submit_options={})
        d = self.d = SimpleNamespace(
            name="hpc", cluster=SimpleNamespace(config=config, metered=Files(), timing=Timing(),
                                                scheduler=SimpleNamespace(query=query, cancel=cancel),
                                                count=lambda name: None),
            store=SimpleNamespace(put_job=lambda record: None, pace=nothing, pace_due=False, flush=nothing,
                                  put_kill=lambda kill: self.owed_rows.append(kill.job_key),
                                  drop_kill=lambda cluster, key: self.owed_rows.remove(key)),
            host=SimpleNamespace(transition=transition, update=update), tracks={}, unresolved={}, by_job={},
            cancels={}, emptied={}, held_tags={}, follow=follow, query_due=False, wake=lambda: None,
            add_unresolved=add_unresolved, drop_unresolved=lambda tag: d.unresolved.pop(tag, None),
            count=lambda name, n=1: self.counters.update({name: n}), submit=lambda run, insts: self.given_back.extend(insts),
            new_track=lambda record, run, insts: JobTrack(record, run, dict(insts), FileClock(1.0, 2.0)),
            settings=SimpleNamespace(hold_max=60.0), unquiet=lambda track: None, scheduler_answered=lambda: None,
            health=SimpleNamespace(allows=lambda now: True), cancel_round=SimpleNamespace(set=lambda: None))
        d.packer = Packer(d)  # type: ignore[arg-type]
        # The driver's own bookkeeping of cancels and owed kills (the store's rows: ``owed_rows``).
        self.owed_rows: list[str] = []
        d.owed, d.lookups, d.fault = {}, {}, lambda point: None
        for name in ("cancel_jobs", "owe_kill", "_release_kill", "kills_taken", "owe_lookup", "lookup_settled"):
            setattr(d, name, functools.partial(getattr(Driver, name), d))
        owner = SimpleNamespace(d=d, upstream_submitted=lambda run: None, _find=nothing)
        d.early = SimpleNamespace(upstream_submitted=lambda run: None, _find=nothing,
                                  made=functools.partial(EarlyJobs.made, owner))
        self.upstream = JobTrack(JobRecord("rfA", "r1", "work", "hpc", self.request("rfA"), job_id="100"), run,
                                 dict(work.instances.items()), FileClock(1.0, 2.0))
        follow(self.upstream)
        self.chains = ChainJobs(SimpleNamespace(d=d))  # type: ignore[arg-type]

    def request(self, tag: str, options: dict[str, Any] | None = None) -> SubmitRequest:
        indices = list(range(len(self.slices))) if self.slices else [0, 1, 2, 3]
        return SubmitRequest(tag=tag, run_id="r1", task="double" if tag.startswith("rfB") else "work",
                             job_dir=jobfiles.job_dir(str(self.tmp_path), "r1", tag), log_dir="/l", workdir="/w",
                             worker_argv=["w"], indices=indices, options=options or {}, slices=self.slices)

    def instance_left(self, inst: Any, tag: str | None) -> None:
        """``Driver.instance_left``'s packing part: the track (followed, or a submission under way) hears of it."""
        track = self.d.tracks.get(tag) or self.d.unresolved.get(tag)
        if track is not None and track.live.get(inst.index) is inst:
            del track.live[inst.index]
            if track.packed:
                self.d.packer.left(track, inst)

    def early_array(self) -> Any:
        """The early array of ``double`` as ``ChainJobs.submit`` leaves it (job 101, waiting on job 100), with
        ``work`` succeeded in job 100 and ``double`` expanded, its elements READY."""
        from reflowd.engine.model import Instance, JobRecord, TaskState
        from reflowd.engine.states import State

        early = JobRecord("rfB", "r1", "double", "hpc", self.request("rfB", dependency_options(["100"], "aftercorr")),
                          job_id="101", state="early")
        jobfiles.write_json_atomic(str(Path(early.request.job_dir) / jobfiles.JOB_FILE), {
            deferred.JOB_KEY: deferred.chain_recipe("early_elementwise", self.tasks["double"], {}, str(self.tmp_path),
                                                    {}, "work", 4, self.upstream.request.job_dir)})
        self.chains.records[("r1", "double")] = {"rfB": early}
        self.chains.runs["r1"] = self.run
        for inst in self.run.tasks["work"].instances.values():
            inst.state = State.SUCCEEDED
        double = self.run.tasks["double"]
        double.state, double.size = TaskState.EXPANDED, 4
        for i in range(4):
            double.add(Instance(run_id="r1", task="double", index=i, state=State.READY))
        return early

    def key(self, index: int) -> str:
        from reflowd.driver.packing import job_key, slot_map

        request = self.request("rfB")
        return job_key(request, "101", index, slot_map(request) if self.slices else None)

    def double(self) -> dict[int, Any]:
        return {i: (inst.state.value, inst.tag) for i, inst in self.run.tasks["double"].instances.items()}


def pending() -> Any:
    from reflowd.schedulers.base import Observation, Phase, Presence

    return Observation(Presence.PRESENT, Phase.QUEUED, None, "PENDING", "Dependency")


def test_the_driver_mirrors_an_upstream_array_job_and_adopts_the_early_array_task_by_task(tmp_path: Path) -> None:
    """ChainJobs' bookkeeping: which upstream job it mirrors, and how an early array is split between adoption
    and the normal way."""
    from reflowd.engine.states import State

    w = ChainWorld(tmp_path)
    run, chains, d = w.run, w.chains, w.d
    # while work's job is queued, double (not expanded) mirrors it
    [(tr, dep, values, track)] = chains.eligible(run)
    assert (tr.name, dep, values, track) == ("double", "work", {}, w.upstream)

    # the early array (as submit leaves it), and what happened meanwhile: work[2] failed and succeeded in a
    # retry's job; double[0] ran early; double[1] is a cache hit; the others were handed over READY
    early = w.early_array()
    jobfiles.write_json_atomic(jobfiles.started_path(early.request.job_dir, 0), {})
    w.answers = {"101_1": pending(), "101_3": pending()}  # 101_2: cancelled by Slurm (its upstream task failed)
    run.tasks["work"].instances[2].tag = "rfA2"
    double = run.tasks["double"]
    double.instances[1].state = State.CACHED
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
    assert w.given_back == [double.instances[2]]
    assert set(d.cancels) == {"101_1", "101_2"}
    withdrawn = {i for i in range(4) if os.path.exists(jobfiles.cancel_path(early.request.job_dir, i))}
    assert withdrawn == {1, 2}
    assert set(d.tracks["rfB"].live) == {0, 3}
    assert w.counters["chain_adopted_elements"] == 2 and w.counters["chain_dropped_tasks"] == 2
    assert d.unresolved == {}, "the adopted track left the hand-over place"


@pytest.mark.parametrize("slices", [None, [[0, 1], [2, 3]]], ids=["unpacked", "packed"])
def test_an_adopted_early_task_slurm_cancels_before_it_starts_goes_back_to_ready(
        tmp_path: Path, slices: list[list[int]] | None) -> None:
    """work's elements all wrote their results, then its job was killed (non-zero exit): Slurm cancels the
    chained tasks waiting on it (``--kill-on-invalid-dep``) although reflowd has already adopted them. Their
    elements never started: they go back to READY at their attempt (no failure) and out the usual way, once.
    An element whose started marker is there was run: it keeps the scheduler's verdict."""
    from reflowd.driver.observe import Observer
    from reflowd.schedulers.base import Observation, Outcome, Phase, Presence

    w = ChainWorld(tmp_path, slices)
    early = w.early_array()
    double = w.run.tasks["double"]
    w.answers = {w.key(i): pending() for i in range(4)}
    for inst in double.instances.values():
        assert w.chains.claim(w.run, inst)
    anyio.run(w.chains.step)
    assert w.double() == dict.fromkeys(range(4), ("queued", "rfB")), "adopted whole: every upstream element succeeded"
    track = w.d.tracks["rfB"]
    assert w.d.early.made(track.record, w.run) and not w.d.early.made(w.upstream.record, w.run)

    jobfiles.write_json_atomic(jobfiles.started_path(early.request.job_dir, 0), {})  # element 0 did start
    cancelled = Observation(Presence.PRESENT, Phase.DONE, Outcome.CANCELLED, "CANCELLED", "DependencyNeverSatisfied")
    w.answers = {w.key(i): cancelled for i in range(4)}
    anyio.run(Observer(w.d).apply_observations, track, {w.key(i): cancelled for i in range(4)})  # type: ignore[arg-type]
    assert w.double() == {0: ("cancelled", "rfB"), 1: ("ready", None), 2: ("ready", None), 3: ("ready", None)}
    assert all(double.instances[i].attempt == 1 and not double.instances[i].error for i in (1, 2, 3))
    assert sorted(i.index for i in w.given_back) == [1, 2, 3], "sent out the usual way, each once"
    assert w.counters["early_requeued"] + w.counters["packed_requeued"] == 3
    assert w.counters["early_requeued"] == (3 if slices is None else 2)  # (packed: 1 shares 0's started task)

    # the same ends of a job that is not an early one (its options are the task's own) keep their verdict
    w2 = ChainWorld(tmp_path / "own", slices)
    w2.early_array()
    for inst in w2.run.tasks["double"].instances.values():
        w2.chains.claim(w2.run, inst)
    w2.answers = {w2.key(i): pending() for i in range(4)}
    anyio.run(w2.chains.step)
    w2.d.cluster.config.submit_options = {"kill_on_invalid_dep": "yes"}
    anyio.run(Observer(w2.d).apply_observations, w2.d.tracks["rfB"], {w2.key(i): cancelled for i in range(4)})  # type: ignore[arg-type]
    assert w2.double() == dict.fromkeys(range(4), ("cancelled", "rfB")) and not w2.given_back


def test_a_cancelled_element_of_an_undecided_packed_early_array_is_marked_at_once_and_its_slice_mate_adopted(
        tmp_path: Path) -> None:
    """The user cancels double[1] while the early array waits for double[3] to pass the cache check; Slurm may
    start array task 0 (elements 0 and 1) any moment, since work's task 0 ended well. double[1]'s marker is
    written at once (the worker skips it), and it does not make task 0 look withdrawn: double[0] is adopted."""
    from reflowd.engine.states import State

    w = ChainWorld(tmp_path, [[0, 1], [2, 3]])
    early = w.early_array()
    w.answers = {w.key(i): pending() for i in range(4)}
    double = w.run.tasks["double"]
    for i in (0, 1, 2):
        assert w.chains.claim(w.run, double.instances[i])
    double.instances[1].state = State.CANCELLED  # (the engine's cancel, then its hook)
    w.chains.left(w.run, double.instances[1])
    anyio.run(w.chains.step)
    assert w.calls == [("write", [jobfiles.cancel_path(early.request.job_dir, 1)])], "marked before any decision"
    assert "rfB" in w.chains.records[("r1", "double")], "double[3] is not past the cache check yet"
    assert w.chains.claim(w.run, double.instances[3])
    anyio.run(w.chains.step)
    assert w.double() == {0: ("queued", "rfB"), 1: ("cancelled", None), 2: ("queued", "rfB"), 3: ("queued", "rfB")}
    assert w.d.cancels == {} and w.given_back == [], "no task dropped, nothing sent the usual way"
    assert not any(os.path.exists(jobfiles.cancel_path(early.request.job_dir, i)) for i in (0, 2, 3))


def test_cancelling_the_last_wanted_element_of_a_packed_task_writes_its_marker_before_the_scancel(
        tmp_path: Path) -> None:
    """double[0] is a cache hit; double[1], the one element array task 0 still runs, is cancelled while the task
    waits for its dependency: the task is cancelled whole, and double[1]'s marker goes out first in the same
    round, so a worker Slurm starts meanwhile skips it. A slice-mate still wanted (double[3] for double[2])
    keeps the task: a marker, no scancel. A whole run's cancel writes no marker per task (scancel suffices)."""
    from reflowd.driver.observe import Observer
    from reflowd.engine.states import State

    w = ChainWorld(tmp_path, [[0, 1], [2, 3]])
    early = w.early_array()
    w.answers = {w.key(i): pending() for i in range(4)}
    double = w.run.tasks["double"]
    double.instances[0].state = State.CACHED
    w.chains.left(w.run, double.instances[0])
    for i in (1, 2, 3):
        assert w.chains.claim(w.run, double.instances[i])
    anyio.run(w.chains.step)
    assert w.double() == {0: ("cached", None), 1: ("queued", "rfB"), 2: ("queued", "rfB"), 3: ("queued", "rfB")}
    w.calls.clear()

    def cancel(i: int) -> None:  # the engine's _cancel_element: the transition, then cancel_jobs([key])
        inst = double.instances[i]
        key = inst.job_key
        w.d.host.transition(w.run, inst, State.CANCELLED, {"source": "client"})
        w.d.cancel_jobs([key])

    cancel(1)
    cancel(2)
    w.calls.clear()
    anyio.run(Observer(w.d).deliver_cancels)  # type: ignore[arg-type]
    marks = [jobfiles.cancel_path(early.request.job_dir, i) for i in (1, 2)]
    assert w.calls == [("write", marks), ("cancel", [w.key(1)])], w.calls

    w3 = ChainWorld(tmp_path / "whole", [[0, 1], [2, 3]])
    w3.early_array()
    w3.answers = {w3.key(i): pending() for i in range(4)}
    for inst in w3.run.tasks["double"].instances.values():
        w3.chains.claim(w3.run, inst)
    anyio.run(w3.chains.step)
    w3.calls.clear()
    w3.run.cancel_requested = True
    for inst in w3.run.tasks["double"].instances.values():
        key = inst.job_key
        w3.d.host.transition(w3.run, inst, State.CANCELLED, {"source": "client"})
        w3.d.cancel_jobs([key])
    assert w3.owed_rows == [w3.key(0), w3.key(2)], "owed durably until the scancel goes out"
    anyio.run(Observer(w3.d).deliver_cancels)  # type: ignore[arg-type]
    assert w3.calls == [("cancel", [w3.key(0), w3.key(2)])], w3.calls
    assert w3.owed_rows == [] and w3.d.owed == {}


def test_an_element_cancelled_while_its_early_array_is_being_adopted_gets_its_marker(tmp_path: Path) -> None:
    """double[0] is cancelled while reflowd, having adopted array task 0 (elements 0 and 1), still drops task 1
    (work[3] succeeded in a retry's job, not where task 1 reads it): the adopted elements are then a submission
    under way, and the cancel finds them there, as any other: double[0]'s marker is written, double[1] runs."""
    from reflowd.driver.observe import Observer
    from reflowd.engine.states import State

    w = ChainWorld(tmp_path, [[0, 1], [2, 3]])
    early = w.early_array()
    w.run.tasks["work"].instances[3].tag = "rfA2"
    w.answers = {w.key(i): pending() for i in range(4)}
    double = w.run.tasks["double"]
    for inst in double.instances.values():
        assert w.chains.claim(w.run, inst)

    def user_cancels_0() -> None:
        assert double.instances[0].state is State.SUBMITTING
        w.d.host.transition(w.run, double.instances[0], State.CANCELLED, {"source": "client"})

    w.on_write.append(user_cancels_0)  # during the markers that drop task 1
    anyio.run(w.chains.step)
    assert w.double() == {0: ("cancelled", "rfB"), 1: ("queued", "rfB"), 2: ("ready", None), 3: ("ready", None)}
    assert set(w.d.cancels) == {w.key(2)}, "task 1 dropped; task 0 kept for double[1]"
    w.calls.clear()
    anyio.run(Observer(w.d).deliver_cancels)  # type: ignore[arg-type]
    assert w.calls == [("write", [jobfiles.cancel_path(early.request.job_dir, 0)]), ("cancel", [w.key(2)])], w.calls


def test_one_early_sbatch_sequence_for_single_tasks_and_chains() -> None:
    """``early.submit_early``: the record is flushed before the sbatch (its tag is durable: a restart finds the
    job), and the answer is a job id, None with the record refused (nothing queued: the normal way), or None
    with the record still ``early_submitting`` (outcome unknown: the tag will tell)."""
    from types import SimpleNamespace

    from reflowd.driver.early import REFUSED, submit_early
    from reflowd.engine.model import JobRecord
    from reflowd.schedulers.base import SubmitError
    from reflowd.transports.base import TransportError

    steps: list[str] = []
    answer: list[Any] = []

    async def submit(request: SubmitRequest) -> str:
        steps.append("sbatch")
        if isinstance(answer[0], BaseException):
            raise answer[0]
        return str(answer[0])

    async def flush() -> None:
        steps.append("flush")

    d = SimpleNamespace(store=SimpleNamespace(flush=flush, put_job=lambda record: steps.append(f"put {record.state}")),
                        fault=lambda name: steps.append(name), count=lambda name: steps.append(name),
                        cluster=SimpleNamespace(count=lambda name: None, scheduler=SimpleNamespace(submit=submit)))

    def attempt(outcome: Any) -> tuple[str | None, str]:
        steps.clear()
        answer[:] = [outcome]
        request = SubmitRequest(tag="rfX", run_id="r", task="t", job_dir="/j", log_dir="/l", workdir="/w",
                                worker_argv=["w"], options={"dependency": "afterok:7"})
        record = JobRecord("rfX", "r", "t", "hpc", request, state="early_submitting")
        return anyio.run(submit_early, d, record, "chain_submitted"), record.state  # type: ignore[arg-type]

    assert attempt("42") == ("42", "early")
    assert steps == ["flush", "before_early_submit", "early_submitted", "chain_submitted", "sbatch", "put early"]
    assert attempt(SubmitError("invalid partition", permanent=True)) == (None, REFUSED)
    assert steps[-1] == "put refused"
    assert attempt(SubmitError("socket timed out", permanent=False)) == (None, "early_submitting")
    assert attempt(TransportError("connection lost")) == (None, "early_submitting")
    assert "put" not in " ".join(steps)


def test_one_rule_says_whether_a_single_task_or_a_chain_may_go_early() -> None:
    """``early.may_go_early`` (used by ``EarlyJobs.eligible`` and ``ChainJobs.eligible`` alike): not a task that sets
    its own dependency options (or whose cluster does), nor a cached task whose upstream is forced."""
    from types import SimpleNamespace

    from reflow_client.manifest import TaskManifest
    from reflowd.driver.early import may_go_early
    from reflowd.engine.model import RunOptions

    def task(cache: bool = False, **options: Any) -> TaskManifest:
        return TaskManifest(name="t", is_array=False, config={"submit_options": options, "cache": cache},
                            dependencies=["up"])

    def d(**cluster_options: Any) -> Any:
        return SimpleNamespace(cluster=SimpleNamespace(config=SimpleNamespace(submit_options=cluster_options)))

    def run(**options: Any) -> Any:
        return SimpleNamespace(options=RunOptions(**options))

    assert may_go_early(d(), run(), task())
    assert not may_go_early(d(), run(), task(dependency="singleton"))
    assert not may_go_early(d(), run(), task(**{"--kill_on_invalid_dep": "no"}))
    assert not may_go_early(d(**{"kill-on-invalid-dep": "no"}), run(), task())
    assert may_go_early(d(partition="x"), run(), task(account="y"))
    assert not may_go_early(d(), run(force=True), task(cache=True))
    assert not may_go_early(d(), run(force_tasks=("up",)), task(cache=True))
    assert may_go_early(d(), run(force_tasks=("other",)), task(cache=True))
    assert may_go_early(d(), run(force=True), task(cache=False)), "not cached: forcing changes nothing for it"
