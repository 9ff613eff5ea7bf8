"""A task stopped by its scheduler that saved a checkpoint: the worker notes it, status shows it.

The task catches ``TaskInterrupted``, saves its state, sets ``stop.checkpoint`` and re-raises (docs/failures.md).
The worker runs for real here (a subprocess, signalled as a scheduler does); the engine side is pure.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from reflow_client import jobfiles
from reflowd.engine import causes, decide
from reflowd.engine.model import Instance
from reflowd.engine.states import State
from reflowd.schedulers.base import Observation, Outcome, Phase, Presence

from .test_worker import interrupt, make_job, result_of


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["stop", "warning"])
def test_the_worker_notes_the_checkpoint_a_stopped_task_saved(tmp_path: Path, signum: int) -> None:
    job_dir = make_job(tmp_path, "checkpointing", {"seconds": 300.0, "then": "note"})
    proc, _ = interrupt(tmp_path, job_dir, signum)
    assert proc.returncode == 128 + signum
    result = result_of(job_dir)
    assert result["state"] == jobfiles.FAILED and result["signal"] == signal.Signals(signum).name
    assert result["checkpoint"] == str(tmp_path / "checkpoint.txt")
    assert (tmp_path / "checkpoint.txt").exists()


def test_a_checkpoint_is_noted_when_the_task_raises_another_exception_from_the_stop(tmp_path: Path) -> None:
    job_dir = make_job(tmp_path, "checkpointing", {"seconds": 300.0, "then": "note_and_fail"})
    proc, _ = interrupt(tmp_path, job_dir, signal.SIGTERM)
    result = result_of(job_dir)
    assert result["signal"] == "SIGTERM" and "gave up after saving" in result["error"]
    assert result["checkpoint"] == str(tmp_path / "checkpoint.txt")


def test_no_checkpoint_is_noted_when_the_task_saved_none(tmp_path: Path) -> None:
    job_dir = make_job(tmp_path, "checkpointing", {"seconds": 300.0, "then": "raise"})
    interrupt(tmp_path, job_dir, signal.SIGTERM)
    assert "checkpoint" not in result_of(job_dir)


def test_status_names_the_checkpoint_with_the_cause() -> None:
    stopped = {"state": "failed", "error": "interrupted by SIGTERM", "signal": "SIGTERM", "checkpoint": "/r/ck.json"}
    inst = Instance(run_id="r", task="t", index=None, state=State.RUNNING)
    timeout = Observation(Presence.PRESENT, Phase.DONE, Outcome.TIMEOUT, "TIMEOUT", None, "0:15")
    d = decide.from_result(inst, stopped, timeout)
    assert d.state is State.TIMEOUT and d.fields["cause"]["checkpoint"] == "/r/ck.json"
    text = causes.describe(d.fields["cause"], {"time": "00:01:00"})
    assert text == "time limit reached (limit 00:01:00); checkpoint saved: /r/ck.json"
    warned = causes.from_result({**stopped, "signal": "SIGUSR1"})
    assert warned["kind"] == "time_limit" and causes.describe(warned).endswith("checkpoint saved: /r/ck.json")
    raised = causes.from_result({"error": "RuntimeError: gave up", "checkpoint": "/r/ck.json"})
    assert raised["kind"] == "exception" and raised["checkpoint"] == "/r/ck.json"
    assert causes.view(raised, None)["text"] == "the task raised RuntimeError; checkpoint saved: /r/ck.json"
    assert "checkpoint" not in causes.describe(causes.from_result({"error": "ValueError: x"}))  # type: ignore[operator]
