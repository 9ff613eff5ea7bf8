"""Issue #8, item 5: result files are read with bounded depth and size.

A result no one could read (nested 5,000 deep, too large, not Unicode, wrong
types) fails its instance with a clear reason; the run ends instead of staying
"queued" forever while the observer logs errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reflow_client import jobfiles
from reflow_client.protocol import MAX_DEPTH

from .support import ROOT, DaemonProcess, wait_for

GATED = ROOT / "tests" / "engine_workflows" / "gated.py"
OK = {"state": "succeeded", "output_hash": "h", "output": 1}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"state":"succeeded","output_hash":"h","output":' + b"[" * 5000 + b"]" * 5000 + b"}",
         f"nesting deeper than {MAX_DEPTH} levels"),
        (b'{"state":"succeeded","output_hash":"h","output":' + b"[" * 150 + b"]" * 150 + b"}",
         f"results may nest at most {MAX_DEPTH} levels"),
        (b'{"state":"failed","error":"\\udcff"}', "error: text is not valid Unicode"),
        (b'{"state":"succeeded","output_hash":"h","output":1' + b"0" * 400 + b"}", "number with 401 digits"),
        (b'{"state":"succeeded","output_hash":"h","output":NaN}', "NaN is not a JSON number"),
        (b'{"state":"failed","ended_at":"yesterday"}', "ended_at must be a time in seconds"),
        (b'{"state":"failed","host":["a"]}', "host must be text"),
        (b'{"state":"succeeded","output_hash":7}', "claims success but has no output_hash"),
        (b'{"state":"failed","signal":{"n":15}}', "signal must be a name or a number"),
        (b"\xff\xfe", "is not valid JSON"),
        (b"[]", "is not a JSON object"),
    ],
)
def test_unreadable_results_raise_value_error_naming_the_problem(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError) as info:
        jobfiles.parse_result(raw, "result file of work[0]")
    assert message in str(info.value) and str(info.value).startswith("result file of work[0]")


def test_size_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobfiles, "MAX_RESULT_BYTES", 1000)
    raw = json.dumps({**OK, "output": "x" * 2000}).encode()
    with pytest.raises(ValueError, match="more than the 0 MiB a result may have"):
        jobfiles.parse_result(raw)
    assert jobfiles.parse_result(json.dumps(OK).encode())["output"] == 1


def test_a_result_nested_5000_deep_fails_that_instance_and_the_run_ends(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "d", config='[clusters.local]\nscheduler = "local"\nmax_workers = 4\n')
    d.start()
    try:
        gate = tmp_path / "gate"
        run_dir = tmp_path / "run"
        out = d.cli("submit", str(GATED), "--run-dir", str(run_dir), "--n", "2", "--gate", str(gate), "--no-daemon",
                    "--json", check=True)
        run_id = json.loads(out.stdout.strip().splitlines()[-1])["run_id"]
        with d.client() as c:
            wait_for(lambda: c.status(run_id).tasks[1].counts.get("running", 0) == 2, timeout=120,
                     what="both elements to run")
        # While the worker still runs, its result file turns up nested 5,000 deep (as the issue found it).
        job = next(p for p in (run_dir / ".reflow" / run_id / "jobs").iterdir() if (p / "inputs" / "0.json").exists())
        results = job / "results"
        deep = b'{"state":"succeeded","output_hash":"h","output":' + b"[" * 5000 + b"]" * 5000 + b"}"
        jobfiles.write_bytes_atomic(str(results / "0.json"), deep)
        with d.client() as c:
            status = wait_for(lambda: (s := c.status(run_id)).tasks[1].counts.get("failed") == 1 and s, timeout=120,
                              what="the element with the unreadable result to fail")
            failure = next(f for f in status.failures if f.index == 0)
            assert failure.error is not None and "unreadable result" in failure.error
            assert f"nesting deeper than {MAX_DEPTH} levels" in failure.error
            gate.write_text("go")
            final = wait_for(lambda: (s := c.status(run_id)).finished and s, timeout=120, what="the run to end")
            assert final.state == "failed" and final.tasks[1].counts == {"failed": 1, "succeeded": 1}
        assert "observer cycle failed" not in d.log()
    finally:
        d.stop()
