"""The compute-node worker: run one task instance and leave a result file.

    python -m reflow.worker JOB_DIR [--index N]
    python -m reflow.worker --verify REQUEST.json --out RESPONSE.json

Whatever happens -- the function raises, the inputs file is missing or
corrupt, the scheduler sends SIGTERM at the time limit -- the worker writes a
result file saying so before it exits, because a job that ends without a
result is the one outcome the daemon cannot explain to the user.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from reflow_client import codec, jobfiles

from .interrupt import Interrupts, TaskInterrupted, WorkerInterrupted

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def _now() -> float:
    return time.time()


def _base_result(task: str | None, index: int | None, run_id: str | None, started: float) -> dict[str, Any]:
    return {
        "format": jobfiles.RESULT_FORMAT,
        "task": task,
        "index": index,
        "run_id": run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": started,
    }


def _failure(base: dict[str, Any], message: str, tb: str | None = None, signame: str | None = None) -> dict[str, Any]:
    return {
        **base,
        "state": jobfiles.FAILED,
        "output": None,
        "output_hash": None,
        "error": message,
        "traceback": tb,
        "signal": signame,
        "ended_at": _now(),
    }


def _read_json(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise ValueError(f"{what} file {path} is missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} file {path} is corrupt: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} file {path} is corrupt: not a JSON object")
    return data


def _call_task(job: dict[str, Any], element: dict[str, Any]) -> Any:
    from .loader import load_workflow

    wf = load_workflow(job["entrypoint"], job.get("workflow"))
    task = job["task"]
    if task not in wf.tasks:
        raise LookupError(f"workflow {wf.name!r} in {job['entrypoint']} has no task {task!r} (was it renamed?)")
    spec = wf.tasks[task]
    kwargs = {k: codec.decode(v) for k, v in {**job.get("kwargs", {}), **element.get("kwargs", {})}.items()}
    for pname in spec.run_dir_params:  # a str-annotated run_dir gets a str, as the reference passes it
        kwargs[pname] = str(job["run_dir"]) if spec.param_types.get(pname) is str else Path(job["run_dir"])
    return spec.func(**kwargs)


def _interrupted(base: dict[str, Any], signum: int, tb: str | None, note: str = "") -> dict[str, Any]:
    name = signal.Signals(signum).name
    return _failure(base, f"interrupted by {name}{note}", tb, name)


def run_instance(job_dir: str, index: int | None) -> int:
    """Run one element; always leaves ``results/<key>.json``. Returns the exit code."""
    started = _now()
    result_file = jobfiles.result_path(job_dir, index)
    base = _base_result(None, index, None, started)
    interrupts = Interrupts()
    interrupts.install()
    code = EXIT_FAILED
    try:
        try:
            job = _read_json(os.path.join(job_dir, jobfiles.JOB_FILE), "job")
            base.update(task=job.get("task"), run_id=job.get("run_id"))  # named even if the inputs are broken
            element = _read_json(jobfiles.inputs_path(job_dir, index), "inputs")
            base.update(identity=element.get("identity"))
            for key in ("entrypoint", "task", "run_dir"):
                if not isinstance(job.get(key), str):
                    raise ValueError(f"job file in {job_dir} is corrupt: field {key!r} missing")
        except ValueError as exc:
            result = _failure(base, f"cannot start: {exc}")
            code = EXIT_BAD_INPUT
        else:
            jobfiles.write_json_atomic(
                jobfiles.started_path(job_dir, index), {"host": base["host"], "pid": base["pid"], "at": started}
            )
            try:
                output = _call_task(job, element)
                encoded = codec.encode(output, "the task's return value")
                result = {
                    **base,
                    "state": jobfiles.SUCCEEDED,
                    "output": encoded,
                    "output_hash": codec.value_hash(encoded),
                    "error": None,
                    "traceback": None,
                    "signal": None,
                    "ended_at": _now(),
                }
                code = EXIT_OK
            except (TaskInterrupted, WorkerInterrupted) as exc:
                result = _interrupted(base, exc.signum, traceback.format_exc())
                code = 128 + exc.signum
            except Exception as exc:  # the task's own failure: report it, do not crash
                result = _failure(base, f"{type(exc).__name__}: {exc}", traceback.format_exc())
            except SystemExit as exc:  # sys.exit() in the task: still leave a result saying so
                result = _failure(base, f"SystemExit: the task called sys.exit({exc.code!r})", traceback.format_exc())
    except (TaskInterrupted, WorkerInterrupted) as exc:  # a signal outside the task call (loading, writing started file)
        result = _interrupted(base, exc.signum, traceback.format_exc())
        code = 128 + exc.signum
    # From here on a signal must not stop us writing the result.
    interrupts.quiet()
    if interrupts.stopped is not None and result.get("signal") is None:
        # The task caught TaskInterrupted and returned or raised something else: the job was still stopped.
        what = "returned" if result["state"] == jobfiles.SUCCEEDED else f"raised {result['error']}"
        result = _interrupted(base, interrupts.stopped, result.get("traceback"),
                              f" (the task caught TaskInterrupted and {what}; a stopped job's output is not kept)")
        code = 128 + interrupts.stopped
    try:
        jobfiles.write_json_atomic(result_file, result)
    except (OSError, TypeError, ValueError) as exc:
        print(f"reflow worker: cannot write result {result_file}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if result["state"] == jobfiles.FAILED:
        print(f"reflow worker: task {result.get('task')} index {index} failed: {result['error']}", file=sys.stderr)
        if result.get("traceback"):
            print(result["traceback"], file=sys.stderr)
    return code


def run_verify(request_path: str, out_path: str) -> int:
    """Run users' ``verify`` callables on cached outputs (the daemon never runs user code)."""
    from .loader import load_workflow

    request = _read_json(request_path, "verify request")
    wf = load_workflow(request["entrypoint"], request.get("workflow"))
    answers = []
    for item in request.get("items", []):
        spec = wf.tasks.get(item.get("task", ""))
        if spec is None or spec.verify is None:
            answers.append({"ok": True, "error": None})
            continue
        try:
            ok = bool(spec.verify(codec.decode(item.get("output"))))
            answers.append({"ok": ok, "error": None if ok else "verify returned False"})
        except Exception as exc:
            answers.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    jobfiles.write_json_atomic(out_path, {"answers": answers})
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reflow.worker", description="Run one reflow task instance.")
    parser.add_argument("job_dir", nargs="?", help="the submission's job directory")
    parser.add_argument("--index", help="array element index (omit for a singleton task)")
    parser.add_argument("--verify", metavar="REQUEST", help="run verify callables listed in REQUEST (JSON)")
    parser.add_argument("--out", metavar="RESPONSE", help="where --verify writes its answers")
    args = parser.parse_args(argv)
    if args.verify:
        if not args.out:
            parser.error("--verify needs --out")
        return run_verify(args.verify, args.out)
    if not args.job_dir:
        parser.error("JOB_DIR is required")
    index: int | None = None
    if args.index not in (None, "", "single"):
        try:
            index = int(args.index)
        except ValueError:
            parser.error(f"--index must be a whole number, not {args.index!r}")
    sys.stdout.flush()
    return run_instance(args.job_dir, index)


if __name__ == "__main__":
    sys.exit(main())
