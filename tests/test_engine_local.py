"""Engine behaviour through run_local: the real engine, real worker processes, local scheduler."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reflow.loader import load_workflow

HERE = Path(__file__).resolve().parent / "engine_workflows"


@pytest.fixture(scope="module")
def behaviour():
    return load_workflow(HERE / "behaviour.py")


def log_entries(run_dir: Path) -> list[tuple[str, str, float, float, int]]:
    out = []
    for line in (run_dir / "log.txt").read_text().splitlines():
        task, index, start, end, pid = line.split()
        out.append((task, index, float(start), float(end), int(pid)))
    return out


def runs_of(run_dir: Path, task: str) -> int:
    return sum(1 for e in log_entries(run_dir) if e[0] == task)


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda p: (p[0], p[1]))
    best = current = 0
    for _, delta in points:
        current += delta
        best = max(best, current)
    return best


def test_full_run_then_cache_hits(behaviour, tmp_path: Path) -> None:
    first = behaviour.run_local(tmp_path, max_workers=4, n=6)
    assert first.ok, first.failures
    assert first.outputs["capped"] == [100, 101, 102, 103, 104, 105]
    assert first.outputs["final"] == "615:made.txt"
    capped = [(s, e) for task, _, s, e, _ in log_entries(tmp_path) if task == "capped"]
    assert len(capped) == 6
    assert max_overlap(capped) <= 2, "array_parallelism=2 caps concurrent elements"

    second = behaviour.run_local(tmp_path, max_workers=4, n=6)
    assert second.ok
    assert second.summary["capped"] == {"cached": 6}
    assert second.summary["source"] == {"cached": 1}
    assert second.summary["uncached"] == {"succeeded": 1}, "cache=False tasks always run"
    assert runs_of(tmp_path, "capped") == 6 and runs_of(tmp_path, "uncached") == 2
    assert second.outputs["final"] == "615:made.txt"


def test_changed_parameter_reruns_only_what_depends_on_it(behaviour, tmp_path: Path) -> None:
    assert behaviour.run_local(tmp_path, n=4).ok
    again = behaviour.run_local(tmp_path, n=4, hold=0.1)
    assert again.ok
    assert again.summary["source"] == {"cached": 1}
    assert again.summary["capped"] == {"succeeded": 4}, "hold is consumed by capped: its identity changed"
    assert again.summary["files"] == {"cached": 1}


def test_force_and_force_tasks(behaviour, tmp_path: Path) -> None:
    assert behaviour.run_local(tmp_path, n=3).ok
    forced = behaviour.run_local(tmp_path, n=3, force_tasks=["files"])
    assert forced.summary["files"] == {"succeeded": 1}
    assert forced.summary["capped"] == {"cached": 3}
    everything = behaviour.run_local(tmp_path, n=3, force=True)
    assert everything.summary["capped"] == {"succeeded": 3} and everything.summary["source"] == {"succeeded": 1}
    with pytest.raises(ValueError, match="unknown task"):
        behaviour.run_local(tmp_path, n=3, force_tasks=["nope"])


def test_verify_reruns_when_a_path_output_is_gone(behaviour, tmp_path: Path) -> None:
    assert behaviour.run_local(tmp_path, n=2).ok
    (tmp_path / "made.txt").unlink()
    again = behaviour.run_local(tmp_path, n=2)
    assert again.summary["files"] == {"succeeded": 1}, "the shared cache never reuses a result whose file is gone"
    assert (tmp_path / "made.txt").exists()
    (tmp_path / "made.txt").unlink()
    checked = behaviour.run_local(tmp_path, n=2, verify=True)
    assert checked.summary["files"] == {"succeeded": 1}
    assert (tmp_path / "made.txt").exists()


def test_custom_verify_runs_in_a_worker_process(behaviour, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BEHAVIOUR_VERIFY_DIR", str(tmp_path))
    assert behaviour.run_local(tmp_path, n=2).ok
    assert not (tmp_path / "verify.txt").exists(), "verify runs only on cache hits with verify=True"
    ok = behaviour.run_local(tmp_path, n=2, verify=True)
    assert ok.summary["source"] == {"cached": 1}
    pids = {int(p) for p in (tmp_path / "verify.txt").read_text().split()}
    assert pids and os.getpid() not in pids, "user verify code never runs in the engine's process"
    (tmp_path / "reject").write_text("")
    rejected = behaviour.run_local(tmp_path, n=2, verify=True)
    assert rejected.summary["source"] == {"succeeded": 1}, "a failed verify means the task runs again"


def test_version_bump_reruns(tmp_path: Path, monkeypatch) -> None:
    import subprocess
    import sys

    script = (
        "import sys\nfrom reflow.loader import load_workflow\n"
        f"wf = load_workflow({str(HERE / 'versioned.py')!r})\n"
        f"r = wf.run_local({str(tmp_path)!r})\n"
        "print(r.summary['step'], r.outputs['gather'])\n"
    )
    def run(version: str) -> str:
        env = {**os.environ, "REFLOW_TEST_VERSION": version}
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()
    assert run("1") == "{'succeeded': 1} 0", "an empty fan-out succeeds with zero elements"
    assert run("1") == "{'cached': 1} 0"
    assert run("2") == "{'succeeded': 1} 0"
    assert (tmp_path / "runs.txt").read_text().count("ran") == 2


def test_empty_fanout_is_a_success_with_zero_elements(tmp_path: Path) -> None:
    wf = load_workflow(HERE / "versioned.py")
    result = wf.run_local(tmp_path)
    assert result.ok
    assert result.summary["nothing"] == {}
    assert result.outputs["nothing"] == [] and result.outputs["gather"] == 0


def test_automatic_retries_with_backoff(behaviour, tmp_path: Path) -> None:
    result = behaviour.run_local(tmp_path, n=1, mode="flaky")
    assert result.ok, result.failures
    assert result.outputs["flaky"] == "ok after 3"
    starts = sorted(s for task, _, s, _, _ in log_entries(tmp_path) if task == "flaky")
    assert len(starts) == 3
    assert starts[1] - starts[0] >= 0.9 and starts[2] - starts[1] >= 1.9, "back-off doubles (1 s, then 2 s)"


def test_failure_shows_traceback_after_all_attempts(behaviour, tmp_path: Path) -> None:
    result = behaviour.run_local(tmp_path, n=2, mode="broken", on_error="continue")
    assert result.state == "failed"
    assert result.summary["flaky"] == {"failed": 1}
    failure = next(f for f in result.failures if f["task"] == "flaky")
    assert "RuntimeError: always broken" in failure["error"]
    assert "Traceback" in failure["traceback"]
    assert failure["attempt"] == 3, "retries=2 means three attempts"


def test_on_error_continue_finishes_independent_work(behaviour, tmp_path: Path) -> None:
    result = behaviour.run_local(tmp_path, n=2, mode="boom", on_error="continue")
    assert result.state == "failed"
    assert result.summary["boom"] == {"failed": 1}
    assert result.summary["final"] == {"succeeded": 1}, "independent branches finish"


def test_on_error_stop_cancels_what_has_not_started(behaviour, tmp_path: Path) -> None:
    result = behaviour.run_local(tmp_path, n=6, mode="boom", on_error="stop", max_workers=1)
    assert result.state == "failed"
    assert result.summary["boom"] == {"failed": 1}
    assert "cancelled" in result.summary["final"] or "cancelled" in result.summary["capped"]
    ran = runs_of(tmp_path, "capped")
    assert ran < 6, "the capped elements still queued when boom failed never ran"


def test_time_limit_gives_timeout(behaviour, tmp_path: Path) -> None:
    result = behaviour.run_local(tmp_path, n=1, mode="timeout")
    assert result.state == "failed"
    assert result.summary["slow"] == {"timeout": 1}
    failure = next(f for f in result.failures if f["task"] == "slow")
    assert failure["state"] == "timeout"
