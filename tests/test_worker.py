"""``python -m reflow.worker`` run directly as a subprocess, with job files written by hand.

Whatever happens, the worker must leave a result file the daemon can read:
these tests check that for success, exceptions, signals and broken inputs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from reflow_client import codec, jobfiles

WORKFLOWS = Path(__file__).resolve().parent / "workflows"
ENTRY = WORKFLOWS / "worker_tasks.py"
T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 60.0, what: str = "condition") -> T:
    """Poll *condition* until truthy; fail after *timeout* seconds (generous: the machine may be loaded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def make_job(
    run_dir: Path,
    task: str,
    shared: dict[str, Any] | None = None,
    elements: dict[int | None, dict[str, Any]] | None = None,
    *,
    entrypoint: Path = ENTRY,
    workflow: str | None = "worker_tasks",
) -> Path:
    """Write job.json and inputs/<key>.json the way the daemon's submitter does."""
    job_dir = Path(jobfiles.job_dir(str(run_dir), "run-1", f"{task}-0"))
    jobfiles.write_json_atomic(
        str(job_dir / jobfiles.JOB_FILE),
        {
            "run_id": "run-1",
            "workflow": workflow,
            "task": task,
            "entrypoint": str(entrypoint),
            "run_dir": str(run_dir),
            "tag": f"{task}-0",
            "kwargs": {k: codec.encode(v) for k, v in (shared or {}).items()},
        },
    )
    for index, kwargs in (elements if elements is not None else {None: {}}).items():
        jobfiles.write_json_atomic(
            jobfiles.inputs_path(str(job_dir), index),
            {"index": index, "identity": f"ident-{index}", "attempt": 1,
             "kwargs": {k: codec.encode(v) for k, v in kwargs.items()}},
        )
    return job_dir


def worker_cmd(job_dir: Path, index: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "reflow.worker", str(job_dir)]
    return cmd if index is None else [*cmd, "--index", str(index)]


def run_worker(job_dir: Path, index: int | None = None, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(worker_cmd(job_dir, index), capture_output=True, text=True, timeout=120,
                          env=env, cwd=cwd or job_dir)


def result_of(job_dir: Path, index: int | None = None) -> dict[str, Any]:
    raw = Path(jobfiles.result_path(str(job_dir), index)).read_bytes()
    return jobfiles.parse_result(raw, "result")


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".tmp-")] if directory.exists() else []


# ---------------------------------------------------------------------------- success


def test_success_writes_a_complete_result(tmp_path: Path) -> None:
    job_dir = make_job(tmp_path, "add", {"b": 10}, {None: {"a": 5}})
    before = time.time()
    proc = subprocess.Popen(worker_cmd(job_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    out, err = proc.communicate(timeout=120)
    after = time.time()
    assert proc.returncode == 0, err
    result = result_of(job_dir)
    assert result["state"] == jobfiles.SUCCEEDED
    assert result["output"] == 15
    assert result["output_hash"] == codec.value_hash(15)
    assert result["error"] is None and result["traceback"] is None and result["signal"] is None
    assert result["task"] == "add" and result["index"] is None and result["run_id"] == "run-1"
    assert result["identity"] == "ident-None"
    assert result["format"] == jobfiles.RESULT_FORMAT
    assert result["host"] == socket.gethostname()
    assert result["pid"] == proc.pid
    assert before <= result["started_at"] <= result["ended_at"] <= after
    started = json.loads(Path(jobfiles.started_path(str(job_dir), None)).read_text())
    assert started["pid"] == proc.pid and started["host"] == socket.gethostname()
    assert leftovers(job_dir / "results") == [] and leftovers(job_dir / "started") == [], "atomic writes leave no temp files"


def test_array_element_uses_its_own_inputs_and_the_shared_kwargs(tmp_path: Path) -> None:
    job_dir = make_job(tmp_path, "scale", {"factor": 3}, {0: {"x": 5}, 1: {"x": 7}, 2: {"x": 9}})
    assert run_worker(job_dir, 1).returncode == 0
    result = result_of(job_dir, 1)
    assert result["state"] == "succeeded" and result["output"] == 21 and result["index"] == 1
    assert result["identity"] == "ident-1"
    assert not Path(jobfiles.result_path(str(job_dir), 0)).exists(), "only the requested element ran"
    assert run_worker(job_dir, 2).returncode == 0
    assert result_of(job_dir, 2)["output"] == 27


def test_element_kwargs_override_shared_ones(tmp_path: Path) -> None:
    job_dir = make_job(tmp_path, "scale", {"factor": 3, "x": 1}, {0: {"x": 4, "factor": 5}})
    assert run_worker(job_dir, 0).returncode == 0
    assert result_of(job_dir, 0)["output"] == 20


def test_run_dir_parameters_are_injected(tmp_path: Path) -> None:
    job_dir = make_job(tmp_path, "where")
    assert run_worker(job_dir).returncode == 0
    result = result_of(job_dir)
    assert codec.decode(result["output"]) == tmp_path


@pytest.mark.parametrize(("task", "expected"), [("run_dir_by_name", "PosixPath"), ("run_dir_as_text", "str")])
def test_a_parameter_named_run_dir_gets_the_run_directory_without_a_marker(tmp_path: Path, task: str,
                                                                         expected: str) -> None:
    job_dir = make_job(tmp_path, task)
    assert run_worker(job_dir).returncode == 0
    assert codec.decode(result_of(job_dir)["output"]) == f"{expected}:{tmp_path}"


def test_workflow_name_may_be_omitted_when_the_file_has_one(tmp_path: Path) -> None:
    job_dir = make_job(tmp_path, "add", {"a": 1}, workflow=None)
    assert run_worker(job_dir).returncode == 0
    assert result_of(job_dir)["output"] == 2


def test_main_block_of_the_workflow_file_is_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "main-ran.txt"
    env = dict(os.environ, MAIN_MARKER=str(marker))
    job_dir = make_job(tmp_path, "add", {"a": 1})
    assert run_worker(job_dir, env=env, cwd=tmp_path).returncode == 0
    assert result_of(job_dir)["state"] == "succeeded"
    assert not marker.exists(), "the worker imported the workflow file as __main__"
    assert not (tmp_path / "main-block-ran.txt").exists()
    # control: running the file as a script does write the marker, so the check above means something
    control = subprocess.run([sys.executable, str(ENTRY), "dag"], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=120)
    assert control.returncode == 0, control.stderr
    assert marker.exists()


# ---------------------------------------------------------------------------- failures


def test_exception_gives_failed_result_with_traceback(tmp_path: Path) -> None:
    job_dir = make_job(tmp_path, "boom", {"message": "disk quota exceeded"})
    proc = run_worker(job_dir)
    assert proc.returncode == 1
    result = result_of(job_dir)
    assert result["state"] == jobfiles.FAILED
    assert result["error"] == "RuntimeError: disk quota exceeded"
    assert result["output"] is None and result["output_hash"] is None and result["signal"] is None
    assert "Traceback (most recent call last)" in result["traceback"]
    assert "worker_tasks.py" in result["traceback"] and "raise RuntimeError(message)" in result["traceback"]
    assert result["ended_at"] >= result["started_at"]
    assert "disk quota exceeded" in proc.stderr, "the failure also goes to the job's log"


def test_unencodable_return_value_fails_clearly(tmp_path: Path) -> None:
    job_dir = make_job(tmp_path, "unencodable")
    assert run_worker(job_dir).returncode == 1
    result = result_of(job_dir)
    assert result["state"] == "failed"
    assert "cannot encode the task's return value of type builtins.object" in result["error"]


def test_sys_exit_in_the_task_still_leaves_a_result(tmp_path: Path) -> None:
    job_dir = make_job(tmp_path, "quits", {"code": 3})
    proc = run_worker(job_dir)
    assert proc.returncode != 0
    result = result_of(job_dir)
    assert result["state"] == "failed" and "sys.exit(3)" in result["error"]


def test_workflow_file_calling_cli_at_import_fails_with_a_hint(tmp_path: Path) -> None:
    entry = tmp_path / "unguarded.py"
    entry.write_text(
        "from reflow import Workflow\n"
        "wf = Workflow('unguarded')\n\n"
        "@wf.job()\n"
        "def hello() -> str:\n"
        "    return 'hi'\n\n"
        "wf.cli()\n"
    )
    job_dir = make_job(tmp_path, "hello", entrypoint=entry, workflow="unguarded")
    proc = run_worker(job_dir)
    assert proc.returncode != 0
    result = result_of(job_dir)
    assert result["state"] == "failed"
    assert "while being imported" in result["error"] and "__main__" in result["error"]


def test_unknown_task(tmp_path: Path) -> None:
    job_dir = make_job(tmp_path, "renamed_away")
    assert run_worker(job_dir).returncode == 1
    assert "has no task 'renamed_away'" in result_of(job_dir)["error"]


def test_missing_workflow_file(tmp_path: Path) -> None:
    job_dir = make_job(tmp_path, "add", entrypoint=tmp_path / "gone.py")
    assert run_worker(job_dir).returncode == 1
    result = result_of(job_dir)
    assert result["state"] == "failed" and "gone.py does not exist" in result["error"]


def test_missing_inputs_file(tmp_path: Path) -> None:
    job_dir = make_job(tmp_path, "scale", {"factor": 2}, {0: {"x": 1}})
    proc = run_worker(job_dir, 5)
    assert proc.returncode == 2
    result = result_of(job_dir, 5)
    assert result["state"] == "failed" and result["index"] == 5
    assert result["error"].startswith("cannot start: inputs file ") and result["error"].endswith("5.json is missing")
    assert "Traceback" not in proc.stderr, "a clear message, not a crash"
    assert not Path(jobfiles.started_path(str(job_dir), 5)).exists(), "the task never started"


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b"\xff\xfe\x00"])
def test_corrupt_inputs_file(tmp_path: Path, content: bytes) -> None:
    job_dir = make_job(tmp_path, "add", {"a": 1})
    Path(jobfiles.inputs_path(str(job_dir), None)).write_bytes(content)
    proc = run_worker(job_dir)
    assert proc.returncode == 2
    result = result_of(job_dir)
    assert result["state"] == "failed"
    assert "cannot start: inputs file" in result["error"] and "is corrupt" in result["error"]
    assert result["task"] == "add", "the job file was readable, so the result names the task"
    assert "Traceback" not in proc.stderr


def test_missing_job_file(tmp_path: Path) -> None:
    job_dir = make_job(tmp_path, "add", {"a": 1})
    (job_dir / jobfiles.JOB_FILE).unlink()
    assert run_worker(job_dir).returncode == 2
    result = result_of(job_dir)
    assert result["state"] == "failed" and "job file" in result["error"] and "is missing" in result["error"]


@pytest.mark.parametrize("field", ["entrypoint", "task", "run_dir"])
def test_job_file_without_a_required_field(tmp_path: Path, field: str) -> None:
    job_dir = make_job(tmp_path, "add", {"a": 1})
    job_file = job_dir / jobfiles.JOB_FILE
    data = json.loads(job_file.read_text())
    del data[field]
    job_file.write_text(json.dumps(data))
    assert run_worker(job_dir).returncode == 2
    assert f"field {field!r} missing" in result_of(job_dir)["error"]


def test_malformed_encoded_argument_fails_clearly(tmp_path: Path) -> None:
    job_dir = make_job(tmp_path, "add")
    Path(jobfiles.inputs_path(str(job_dir), None)).write_text(
        json.dumps({"kwargs": {"a": {codec.TAG: "no-such-kind"}}})
    )
    assert run_worker(job_dir).returncode == 1
    assert "unknown encoded kind 'no-such-kind'" in result_of(job_dir)["error"]


def test_bad_index_argument() -> None:
    proc = subprocess.run([sys.executable, "-m", "reflow.worker", "/nonexistent", "--index", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--index must be a whole number" in proc.stderr


# ---------------------------------------------------------------------------- signals


@pytest.mark.parametrize("task", ["sleepy", "stubborn"])
def test_sigterm_while_the_task_runs(tmp_path: Path, task: str) -> None:
    """The scheduler's time limit: SIGTERM gives a FAILED result naming it (even if the task eats Exceptions)."""
    job_dir = make_job(tmp_path, task, {"seconds": 300.0})
    proc = subprocess.Popen(worker_cmd(job_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    try:
        wait_for(lambda: (tmp_path / "started.txt").exists() or proc.poll() is not None, what="the task to start")
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert proc.returncode == 128 + signal.SIGTERM
    result = result_of(job_dir)
    assert result["state"] == jobfiles.FAILED
    assert result["signal"] == "SIGTERM" and "SIGTERM" in result["error"]
    assert result["output"] is None
    assert "SIGTERM" in err


def interrupt(tmp_path: Path, job_dir: Path, signum: int) -> tuple[subprocess.Popen[str], str]:
    """Start the worker, wait until its task runs, send *signum*; returns the process and its stderr."""
    proc = subprocess.Popen(worker_cmd(job_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    try:
        wait_for(lambda: (tmp_path / "started.txt").exists() or proc.poll() is not None, what="the task to start")
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc, err


def test_a_task_catches_task_interrupted_to_checkpoint_and_reraises(tmp_path: Path) -> None:
    job_dir = make_job(tmp_path, "checkpointing", {"seconds": 300.0, "then": "raise"})
    proc, _ = interrupt(tmp_path, job_dir, signal.SIGTERM)
    assert (tmp_path / "checkpoint.txt").read_text() == "SIGTERM True", "TaskInterrupted is an Exception"
    assert proc.returncode == 128 + signal.SIGTERM
    result = result_of(job_dir)
    assert result["state"] == jobfiles.FAILED and result["signal"] == "SIGTERM"
    assert "TaskInterrupted" in result["traceback"]


def test_a_stopped_task_that_returns_anyway_is_still_recorded_as_interrupted(tmp_path: Path) -> None:
    job_dir = make_job(tmp_path, "checkpointing", {"seconds": 300.0, "then": "return"})
    proc, _ = interrupt(tmp_path, job_dir, signal.SIGTERM)
    assert (tmp_path / "checkpoint.txt").exists()
    assert proc.returncode == 128 + signal.SIGTERM
    result = result_of(job_dir)
    assert result["state"] == jobfiles.FAILED and result["signal"] == "SIGTERM" and result["output"] is None
    assert "caught TaskInterrupted and returned" in result["error"]


def test_a_task_that_swallows_the_stop_and_carries_on_is_stopped_after_the_grace(tmp_path: Path) -> None:
    from reflow.interrupt import STOP_GRACE

    job_dir = make_job(tmp_path, "checkpointing", {"seconds": 300.0, "then": "continue"})
    began = time.monotonic()
    proc, _ = interrupt(tmp_path, job_dir, signal.SIGTERM)
    assert time.monotonic() - began >= STOP_GRACE
    assert proc.returncode == 128 + signal.SIGTERM
    assert result_of(job_dir)["signal"] == "SIGTERM"


def test_a_stop_signal_the_main_thread_does_not_wake_for_still_interrupts_and_stops_after_the_grace(
        tmp_path: Path) -> None:
    """A signal that lands just before a blocking call does not interrupt it; neither the task nor the grace may wait
    for the call to end. Made certain here: the task's main thread blocks SIGTERM, so another thread takes it."""
    from reflow.interrupt import STOP_GRACE

    job_dir = make_job(tmp_path, "deaf_main_thread", {"seconds": 300.0})
    began = time.monotonic()
    proc, _ = interrupt(tmp_path, job_dir, signal.SIGTERM)
    assert time.monotonic() - began >= STOP_GRACE
    assert (tmp_path / "checkpoint.txt").read_text() == "SIGTERM", "the task saw TaskInterrupted during its sleep"
    assert proc.returncode == 128 + signal.SIGTERM
    assert result_of(job_dir)["signal"] == "SIGTERM"


def test_a_forked_child_stopped_by_the_task_does_not_stop_the_worker(tmp_path: Path) -> None:
    from reflow.interrupt import STOP_GRACE

    job_dir = make_job(tmp_path, "stops_a_forked_child", {"linger": STOP_GRACE + 2})
    proc = run_worker(job_dir)
    assert proc.returncode == 0, proc.stderr
    assert result_of(job_dir)["state"] == jobfiles.SUCCEEDED and result_of(job_dir)["signal"] is None


def test_a_warning_signal_raises_task_interrupted_and_a_task_that_handles_it_succeeds(tmp_path: Path) -> None:
    job_dir = make_job(tmp_path, "checkpointing", {"seconds": 0.5, "then": "continue"})
    proc, _ = interrupt(tmp_path, job_dir, signal.SIGUSR1)
    assert (tmp_path / "checkpoint.txt").read_text() == "SIGUSR1 True"
    assert proc.returncode == 0
    assert result_of(job_dir)["state"] == jobfiles.SUCCEEDED and result_of(job_dir)["output"] == "finished"


def test_an_unhandled_warning_signal_leaves_a_result_naming_it(tmp_path: Path) -> None:
    job_dir = make_job(tmp_path, "sleepy", {"seconds": 300.0})
    proc, _ = interrupt(tmp_path, job_dir, signal.SIGUSR2)
    assert proc.returncode == 128 + signal.SIGUSR2
    assert result_of(job_dir)["signal"] == "SIGUSR2"


def test_sigint_is_reported_too(tmp_path: Path) -> None:
    job_dir = make_job(tmp_path, "sleepy", {"seconds": 300.0})
    proc = subprocess.Popen(worker_cmd(job_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    try:
        wait_for(lambda: (tmp_path / "started.txt").exists() or proc.poll() is not None, what="the task to start")
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGINT
    assert result_of(job_dir)["signal"] == "SIGINT"


# ---------------------------------------------------------------------------- verify mode


def test_verify_mode_runs_the_tasks_verify_callables(tmp_path: Path) -> None:
    request = tmp_path / "verify.json"
    response = tmp_path / "verify.out.json"
    request.write_text(json.dumps({
        "entrypoint": str(ENTRY),
        "workflow": "worker_tasks",
        "items": [
            {"task": "checked", "output": 5},
            {"task": "checked", "output": -1},
            {"task": "checked", "output": 13},
            {"task": "add", "output": 1},  # no verify callable: nothing to check
            {"task": "ghost", "output": 1},
        ],
    }))
    proc = subprocess.run([sys.executable, "-m", "reflow.worker", "--verify", str(request), "--out", str(response)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    answers = json.loads(response.read_text())["answers"]
    assert answers == [
        {"ok": True, "error": None},
        {"ok": False, "error": "verify returned False"},
        {"ok": False, "error": "ValueError: unlucky output"},
        {"ok": True, "error": None},
        {"ok": True, "error": None},
    ]


def test_verify_mode_needs_out() -> None:
    proc = subprocess.run([sys.executable, "-m", "reflow.worker", "--verify", "x.json"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--verify needs --out" in proc.stderr
