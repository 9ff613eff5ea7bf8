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
