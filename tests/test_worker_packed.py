"""A packed slice (``python -m reflow.worker JOB_DIR --packed --index K``) run directly, with job files by hand.

What makes a tiny element cheap must not cost any of its semantics: each element still has its own
result and ``started/`` marker, starts with the environment and directory the slice started with,
and a stop signal still stops the element it lands in -- even after an earlier element of the same
process replaced the signal handler.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from reflow_client import codec, jobfiles

from .test_worker import leftovers, result_of, wait_for

ENTRY = Path(__file__).resolve().parent / "workflows" / "packed_worker_tasks.py"


def make_packed_job(run_dir: Path, task: str, slices: list[list[int]], kwargs: dict[int, dict[str, Any]],
                    *, per_element: bool = False) -> Path:
    """job.json with ``slices`` and an inputs file per slice, the way the submitter writes them (or, as an
    older reflowd did, one per element)."""
    job_dir = Path(jobfiles.job_dir(str(run_dir), "run-1", f"{task}-0"))
    jobfiles.write_json_atomic(str(job_dir / jobfiles.JOB_FILE), {
        "run_id": "run-1", "workflow": "packed_worker_tasks", "task": task, "entrypoint": str(ENTRY),
        "run_dir": str(run_dir), "tag": f"{task}-0", "kwargs": {}, "slices": slices, "width": 1})

    def inputs(index: int) -> dict[str, Any]:
        return {"index": index, "identity": f"ident-{index}", "attempt": 1,
                "kwargs": {k: codec.encode(v) for k, v in kwargs[index].items()}}

    for slot, piece in enumerate(slices):
        if per_element:
            for index in piece:
                jobfiles.write_json_atomic(jobfiles.inputs_path(str(job_dir), index), inputs(index))
        else:
            jobfiles.write_json_atomic(jobfiles.slice_inputs_path(str(job_dir), slot),
                                       {"elements": {str(i): inputs(i) for i in piece if i in kwargs}})
    return job_dir


def slice_cmd(job_dir: Path, slot: int, *, prelude: str = "") -> list[str]:
    code = f"{prelude}\nimport sys\nfrom reflow.worker import main\nsys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, str(job_dir), "--packed", "--index", str(slot)]


def started_names(job_dir: Path) -> list[str]:
    return sorted(os.listdir(job_dir / "started"))


def test_each_element_of_a_slice_has_its_own_result_and_marker_and_starts_clean(tmp_path: Path) -> None:
    job_dir = make_packed_job(tmp_path, "tidy", [[0, 1, 2], [3]], {i: {"x": i} for i in range(4)})
    env = {**os.environ, "REFLOW_TEST_KEEP": "kept"}
    env.pop("REFLOW_TEST_LEAK", None)
    proc = subprocess.run(slice_cmd(job_dir, 0), capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for index in (0, 1, 2):
        result = result_of(job_dir, index)
        assert result["state"] == jobfiles.SUCCEEDED and result["index"] == index
        seen = codec.decode(result["output"])
        assert seen == {"leak": None, "cwd": str(tmp_path)}, f"element {index} inherited the previous one's changes"
    assert not Path(jobfiles.result_path(str(job_dir), 3)).exists(), "slice 1 is another array task's"
    assert started_names(job_dir) == ["0.json", "1.json", "2.json"]
    # The markers are one file linked under each element's name: it names the process that ran the slice.
    inodes = {os.stat(jobfiles.started_path(str(job_dir), i)).st_ino for i in (0, 1, 2)}
    assert len(inodes) == 1
    marker = json.loads(Path(jobfiles.started_path(str(job_dir), 1)).read_text())
    assert marker["host"] == result_of(job_dir, 1)["host"] and marker["pid"] == result_of(job_dir, 1)["pid"]
    assert marker["slice"] == 0
    assert leftovers(job_dir / "results") == [] and leftovers(job_dir / "started") == []


def test_markers_are_plain_files_where_links_fail_and_inputs_per_element_still_work(tmp_path: Path) -> None:
    job_dir = make_packed_job(tmp_path, "tidy", [[0, 1]], {i: {"x": i} for i in range(2)}, per_element=True)
    no_links = ("import os, errno\n"
                "def _refuse(*a, **k):\n"
                "    raise OSError(errno.EPERM, 'no hard links on this file system')\n"
                "os.link = _refuse\n")
    proc = subprocess.run(slice_cmd(job_dir, 0, prelude=no_links), capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert started_names(job_dir) == ["0.json", "1.json"]
    assert {result_of(job_dir, i)["state"] for i in (0, 1)} == {jobfiles.SUCCEEDED}
    for index in (0, 1):
        assert json.loads(Path(jobfiles.started_path(str(job_dir), index)).read_text())["pid"] == \
            result_of(job_dir, index)["pid"]


def test_a_stop_signal_stops_the_element_it_lands_in_after_an_earlier_one_ignored_it(tmp_path: Path) -> None:
    job_dir = make_packed_job(tmp_path, "deaf", [[0, 1, 2]], {i: {"x": i} for i in range(3)})
    proc = subprocess.Popen(slice_cmd(job_dir, 0), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    try:
        wait_for(lambda: (tmp_path / "started-1.txt").exists() or proc.poll() is not None, what="element 1 to start")
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert result_of(job_dir, 0)["state"] == jobfiles.SUCCEEDED
    stopped = result_of(job_dir, 1)
    assert stopped["state"] == jobfiles.FAILED and stopped["signal"] == "SIGTERM", stopped
    assert started_names(job_dir) == ["0.json", "1.json"], "element 2 never started"
    assert not Path(jobfiles.result_path(str(job_dir), 2)).exists()


def test_a_broken_slice_inputs_file_fails_each_element_with_a_result(tmp_path: Path) -> None:
    job_dir = make_packed_job(tmp_path, "tidy", [[0, 1], [2, 3]], {0: {"x": 0}, 2: {"x": 2}, 3: {"x": 3}})
    Path(jobfiles.slice_inputs_path(str(job_dir), 1)).write_text("{not json")
    for slot in (0, 1):
        proc = subprocess.run(slice_cmd(job_dir, slot), capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr
    assert result_of(job_dir, 0)["state"] == jobfiles.SUCCEEDED
    missing = result_of(job_dir, 1)
    assert missing["state"] == jobfiles.FAILED and "has no element 1" in missing["error"], missing
    for index in (2, 3):
        broken = result_of(job_dir, index)
        assert broken["state"] == jobfiles.FAILED and "is corrupt" in broken["error"], broken
        assert "slice-1.json" in broken["error"]
