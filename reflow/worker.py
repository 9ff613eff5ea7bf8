"""The compute-node worker: run one task instance and leave a result file.

    python -m reflow.worker JOB_DIR [--index N]
    python -m reflow.worker JOB_DIR --packed --index K      (slice K of a packed job)
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
import threading
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


_HOST: str | None = None


def _hostname() -> str:
    """Asked once per process: a packed worker names its host in every element's result."""
    global _HOST
    if _HOST is None:
        _HOST = socket.gethostname()
    return _HOST


def _base_result(task: str | None, index: int | None, run_id: str | None, started: float) -> dict[str, Any]:
    return {
        "format": jobfiles.RESULT_FORMAT,
        "task": task,
        "index": index,
        "run_id": run_id,
        "host": _hostname(),
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


def _load_task(job: dict[str, Any]) -> Any:
    """The task's spec from the workflow file (imported once per process: the loader caches the module)."""
    from .loader import load_workflow

    wf = load_workflow(job["entrypoint"], job.get("workflow"))
    task = job["task"]
    if task not in wf.tasks:
        raise LookupError(f"workflow {wf.name!r} in {job['entrypoint']} has no task {task!r} (was it renamed?)")
    return wf.tasks[task]


def _call_task(job: dict[str, Any], element: dict[str, Any], spec: Any = None) -> Any:
    spec = spec if spec is not None else _load_task(job)
    kwargs = {k: codec.decode(v) for k, v in {**job.get("kwargs", {}), **element.get("kwargs", {})}.items()}
    for pname in spec.run_dir_params:  # a str-annotated run_dir gets a str, as the reference passes it
        kwargs[pname] = str(job["run_dir"]) if spec.param_types.get(pname) is str else Path(job["run_dir"])
    return spec.func(**kwargs)


def _interrupted(base: dict[str, Any], signum: int, tb: str | None, note: str = "") -> dict[str, Any]:
    name = signal.Signals(signum).name
    return _failure(base, f"interrupted by {name}{note}", tb, name)


def _checkpoint_of(exc: BaseException | None) -> str | None:
    """The checkpoint a stopped task says it saved (``stop.checkpoint = path`` on the TaskInterrupted it
    re-raised, or raised another exception from)."""
    for _ in range(10):  # a chain of causes is short; never loop on a cycle
        if exc is None:
            return None
        value = getattr(exc, "checkpoint", None)
        if value:
            return str(value)[:1000]
        exc = exc.__cause__ or exc.__context__
    return None


def _noting_checkpoint(result: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    checkpoint = _checkpoint_of(exc)
    return {**result, "checkpoint": checkpoint} if checkpoint else result


def _check_job(job: dict[str, Any], job_dir: str) -> None:
    for key in ("entrypoint", "task", "run_dir"):
        if not isinstance(job.get(key), str):
            raise ValueError(f"job file in {job_dir} is corrupt: field {key!r} missing")


def _execute(job_dir: str, job: dict[str, Any], element: dict[str, Any], base: dict[str, Any],
             spec: Any, *, markers: _Markers | None = None) -> tuple[dict[str, Any], int]:
    """Mark the element started, call the task, and say how it ended (the result is not written yet).

    Without *markers* (an unpacked worker) the marker is written durably, with this element's time."""
    if markers is None:
        jobfiles.write_json_atomic(jobfiles.started_path(job_dir, base["index"]),
                                   {"host": base["host"], "pid": base["pid"], "at": base["started_at"]})
    else:
        markers.mark(base["index"])
    try:
        output = _call_task(job, element, spec)
        encoded = codec.encode(output, "the task's return value")
        return {
            **base,
            "state": jobfiles.SUCCEEDED,
            "output": encoded,
            "output_hash": codec.value_hash(encoded),
            "error": None,
            "traceback": None,
            "signal": None,
            "ended_at": _now(),
        }, EXIT_OK
    except (TaskInterrupted, WorkerInterrupted) as exc:
        return _noting_checkpoint(_interrupted(base, exc.signum, traceback.format_exc()), exc), 128 + exc.signum
    except Exception as exc:  # the task's own failure: report it, do not crash
        return _noting_checkpoint(_failure(base, f"{type(exc).__name__}: {exc}", traceback.format_exc()), exc), \
            EXIT_FAILED
    except SystemExit as exc:  # sys.exit() in the task: still leave a result saying so
        return _failure(base, f"SystemExit: the task called sys.exit({exc.code!r})", traceback.format_exc()), \
            EXIT_FAILED


def _stopped_anyway(result: dict[str, Any], code: int, base: dict[str, Any], stopped: int | None) -> tuple[dict[str, Any], int]:
    """The task caught TaskInterrupted and returned or raised something else: the job was still stopped."""
    if stopped is None or result.get("signal") is not None:
        return result, code
    what = "returned" if result["state"] == jobfiles.SUCCEEDED else f"raised {result['error']}"
    out = _interrupted(base, stopped, result.get("traceback"),
                       f" (the task caught TaskInterrupted and {what}; a stopped job's output is not kept)")
    if result.get("checkpoint"):
        out["checkpoint"] = result["checkpoint"]
    return out, 128 + stopped


def _report(result: dict[str, Any], index: int | None) -> None:
    if result["state"] == jobfiles.FAILED:
        print(f"reflow worker: task {result.get('task')} index {index} failed: {result['error']}", file=sys.stderr)
        if result.get("traceback"):
            print(result["traceback"], file=sys.stderr)


def _deferred_inputs(job: dict[str, Any]) -> dict[str, Any]:
    """A job submitted before its upstream ended (Slurm-side dependencies): its arguments and identity,
    resolved from the upstream's result files with the daemon's own resolution (``reflowd.engine.deferred``,
    pure; imported only here, so an ordinary worker does not pay for it). Its kwargs go into *job*."""
    from reflowd.engine import deferred

    recipe = job["deferred"]
    results: dict[str, Any] = {}
    try:
        for path in deferred.files(recipe):
            try:
                with open(path, "rb") as fh:
                    raw = fh.read()
            except FileNotFoundError:
                results[path] = None
                continue
            results[path] = jobfiles.parse_result(raw, f"upstream result {path}")
        kwargs, identity = deferred.resolve_recipe(recipe, results)
    except (KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"the job's input recipe is corrupt: {type(exc).__name__}: {exc}") from None
    job["kwargs"] = kwargs
    return {"index": None, "identity": identity, "attempt": recipe.get("attempt"), "kwargs": {}}


def _chained_inputs(job: dict[str, Any], indices: list[int]) -> dict[str, dict[str, Any] | str]:
    """Elements of an element-wise chain (``aftercorr``): each one's inputs and identity, resolved from its
    upstream element's result file alone (or why it cannot run). The shared arguments go into *job*."""
    from reflowd.engine import deferred

    recipe = job["deferred"]
    results: dict[int, Any] = {}
    try:
        for index in indices:
            path = deferred.chain_file(recipe, index)
            try:
                with open(path, "rb") as fh:
                    raw = fh.read()
            except FileNotFoundError:
                results[index] = None
                continue
            try:
                results[index] = jobfiles.parse_result(raw, f"upstream result {path}")
            except ValueError as exc:
                results[index] = {"state": f"unreadable: {exc}"}
        shared, resolved = deferred.resolve_chain(recipe, results)
    except (KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"the job's input recipe is corrupt: {type(exc).__name__}: {exc}") from None
    job["kwargs"] = shared
    out: dict[str, dict[str, Any] | str] = {}
    for index, found in resolved.items():
        out[str(index)] = found if isinstance(found, str) else {
            "index": index, "identity": found[1], "attempt": recipe.get("attempt"), "kwargs": found[0]}
    return out


def _chained_element(job: dict[str, Any], index: int) -> dict[str, Any]:
    found = _chained_inputs(job, [index])[str(index)]
    if isinstance(found, str):
        raise ValueError(found)
    return found


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
            if "deferred" in job:  # submitted before its upstream ended: resolve the inputs from its results
                if os.path.exists(jobfiles.cancel_path(job_dir, index)):
                    print("reflow worker: this early job was withdrawn by reflowd; not running it", file=sys.stderr)
                    return EXIT_OK
                element = _deferred_inputs(job) if index is None else _chained_element(job, index)
                base.update(resolved_inputs=True)
            else:
                element = _read_json(jobfiles.inputs_path(job_dir, index), "inputs")
            base.update(identity=element.get("identity"))
            _check_job(job, job_dir)
        except ValueError as exc:
            result = _failure(base, f"cannot start: {exc}")
            code = EXIT_BAD_INPUT
        else:
            result, code = _execute(job_dir, job, element, base, None)
    except (TaskInterrupted, WorkerInterrupted) as exc:  # a signal outside the task call (loading, writing started file)
        result = _interrupted(base, exc.signum, traceback.format_exc())
        code = 128 + exc.signum
    # From here on a signal must not stop us writing the result.
    interrupts.quiet()
    result, code = _stopped_anyway(result, code, base, interrupts.stopped)
    try:
        jobfiles.write_json_atomic(result_file, result)
    except (OSError, TypeError, ValueError) as exc:
        print(f"reflow worker: cannot write result {result_file}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    _report(result, index)
    return code


# ---------------------------------------------------------------------- packed jobs


def _write_plain(path: str, data: bytes) -> None:
    """A packed worker's marker: written without fsync (one per element; its name is what counts)."""
    try:
        with open(path, "wb") as fh:
            fh.write(data)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)


class _Markers:
    """A packed worker's ``started/<key>.json`` markers: hard links to one file per process.

    Only a marker's name counts (the daemon lists ``started/``; nobody reads its content), and on
    many file systems creating a file costs far more than linking one (an inode, or a metadata
    server's object on a parallel file system): a link per element instead of a new file makes
    a tiny element markedly cheaper. The linked file says which process ran the slice and since
    when; where links are not possible (a file system without them), each marker is its own file.
    """

    def __init__(self, job_dir: str, slot: int) -> None:
        self.job_dir = job_dir
        self.content = jobfiles.dumps({"host": _hostname(), "pid": os.getpid(), "at": _now(), "slice": slot})
        host = "".join(c if c.isalnum() or c in ".-" else "_" for c in _hostname())
        self.source: str | None = os.path.join(job_dir, f".started-{slot}-{host}-{os.getpid()}")
        self.ready = False

    def mark(self, index: int | None) -> None:
        path = jobfiles.started_path(self.job_dir, index)
        if self.source is not None:
            try:
                if not self.ready:
                    self._make_source()
                os.link(self.source, path)
                return
            except FileExistsError:
                return  # a requeued job's earlier run marked it: the name is there, as it should be
            except FileNotFoundError:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                try:
                    os.link(self.source, path)
                    return
                except OSError:
                    self.source = None
            except OSError:  # no hard links here (or the source vanished): plain files from now on
                self.source = None
        if not os.path.exists(path):  # (an earlier run's marker may be a link: never write through it)
            _write_plain(path, self.content)

    def _make_source(self) -> None:
        assert self.source is not None
        try:
            os.unlink(self.source)  # left by an earlier run of this slice on this host with this pid
        except FileNotFoundError:
            pass
        fd = os.open(self.source, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, self.content)
        finally:
            os.close(fd)
        self.ready = True

    def prepare(self) -> None:
        """Make the linked file now (before forking children that share it)."""
        if self.source is not None and not self.ready:
            try:
                self._make_source()
            except OSError:
                self.source = None


def _write_result(path: str, result: dict[str, Any]) -> None:
    """Atomic (a reader sees no file or the whole file) but not fsynced: a packed job writes one per element.
    A node that crashes before the daemon read it loses the result, and the element is retried."""
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}~")
    try:
        with open(tmp, "wb") as fh:
            fh.write(jobfiles.dumps(result))
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(jobfiles.dumps(result))
    os.replace(tmp, path)


def _section(index: int | None, attempt: Any) -> None:
    header = jobfiles.section_header(index, attempt if isinstance(attempt, int) else None)
    sys.stdout.flush()
    sys.stderr.flush()
    for fd in (1, 2):
        try:
            os.write(fd, (header + "\n").encode())
        except OSError:
            pass


#: Seconds between two looks for the cancel marker of an element a packed job is running.
CANCEL_POLL = 1.0
#: Seconds a cancelled element has to stop; one that does not (stuck in C code, swallowing the exception)
#: takes its worker down with it (the slice's unstarted elements then go back to the daemon, unharmed).
CANCEL_GRACE = 10.0
#: A packed worker's exit when a cancelled element would not stop.
EXIT_CANCEL_STUCK = 3
#: The error a cancelled element's result carries (the daemon ignores it: the element is cancelled already).
CANCELLED_WHILE_RUNNING = "cancelled by reflowd while running (its cancel marker appeared); the job went on"


class ElementCancelled(BaseException):
    """The daemon cancelled the element this packed worker runs (BaseException: ``except Exception`` keeps out)."""


class _CancelWatch:
    """Stops a running element of a packed job when the daemon leaves its ``cancel/<key>.json`` marker.

    A thread looks for the markers of the running elements every CANCEL_POLL seconds and calls
    ``stop(index)`` once for a marked one; if that element still runs CANCEL_GRACE seconds later,
    the worker exits (EXIT_CANCEL_STUCK): its slice-mates that never started go back to READY.
    """

    def __init__(self, job_dir: str, stop: Any) -> None:
        self.job_dir = job_dir
        self.stop = stop
        self.running: dict[int, float] = {}  # index -> monotonic time stop() was called (0.0: not yet)
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def begin(self, index: int) -> None:
        self.running[index] = 0.0
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="reflow-cancel-watch", daemon=True)
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())  # signals stay the main thread's
            try:
                self._thread.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def end(self, index: int) -> None:
        self.running.pop(index, None)

    def close(self) -> None:
        self._done.set()

    def _loop(self) -> None:
        while not self._done.wait(CANCEL_POLL):
            for index, since in list(self.running.items()):
                if since:
                    if time.monotonic() - since > CANCEL_GRACE and index in self.running:
                        print(f"reflow worker: cancelled element {index} did not stop within {CANCEL_GRACE:g} s; "
                              "leaving the rest of the slice to the daemon", file=sys.stderr)
                        os._exit(EXIT_CANCEL_STUCK)
                elif os.path.exists(jobfiles.cancel_path(self.job_dir, index)):
                    if self.running.get(index) == 0.0:
                        self.running[index] = time.monotonic()
                        try:
                            self.stop(index)
                        except OSError:
                            pass


class _Slice:
    """One array task of a packed job: its elements, run one after another (or ``width`` at a time)."""

    def __init__(self, job_dir: str, slot: int, interrupts: Interrupts) -> None:
        self.job_dir = job_dir
        self.slot = slot
        self.interrupts = interrupts
        self.job: dict[str, Any] = {}
        self.spec: Any = None
        self.load_error: tuple[str, str] | None = None
        self.failed = 0
        self.markers = _Markers(job_dir, slot)
        #: The slice's inputs by index (``inputs/slice-<k>.json``), or None: one file per element.
        self.inputs: dict[str, Any] | None = None
        self.inputs_error: str | None = None
        self.cancelled = 0
        self.watch = _CancelWatch(job_dir, self._stop_running)
        self._cancel: int | None = None  # the running element the watch asked to stop (sequential mode)
        #: The slice resolved its own inputs (an element-wise chain submitted early): results say so.
        self.resolved = False

    def _stop_running(self, index: int) -> None:
        """Called by the watch thread: stop element *index*, which the main thread is running.

        (A task run ``width`` at a time runs each element in a forked child with a watch of its own.)"""
        self._cancel = index
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGALRM)

    def install_cancel(self) -> None:
        """SIGALRM (the watch's nudge) raises ElementCancelled inside the element the watch means, and nowhere
        else; other SIGALRMs go to the handler that was there (the stop grace of :class:`Interrupts`)."""
        previous = signal.getsignal(signal.SIGALRM)

        def on_alarm(signum: int, frame: Any) -> None:
            index = self._cancel
            if index is not None and index in self.watch.running:
                self._cancel = None
                raise ElementCancelled(index)
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGALRM, on_alarm)

    def read(self) -> list[int]:
        job = _read_json(os.path.join(self.job_dir, jobfiles.JOB_FILE), "job")
        _check_job(job, self.job_dir)
        slices = job.get("slices")
        if not isinstance(slices, list) or not 0 <= self.slot < len(slices) or not isinstance(slices[self.slot], list):
            raise ValueError(f"job file in {self.job_dir} has no slice {self.slot}")
        indices = slices[self.slot]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
            raise ValueError(f"job file in {self.job_dir} is corrupt: slice {self.slot} is not a list of indices")
        self.job = job
        if "deferred" in job:  # an element-wise chain submitted early: inputs from the upstream's results
            self.read_chained(indices)
        else:
            self.read_inputs()
        return indices

    def read_chained(self, indices: list[int]) -> None:
        """Resolve the slice's elements from their upstream elements' results (any that cannot run fails,
        unrun, as with a broken inputs file). A withdrawn element (cancel marker) is skipped anyway."""
        try:
            resolved = _chained_inputs(self.job, [i for i in indices if not self.skip(i)])
        except ValueError as exc:
            self.inputs_error = str(exc)
            return
        self.resolved = True
        self.inputs = {}
        for key, found in resolved.items():
            self.inputs[key] = found if isinstance(found, dict) else {"error": found}

    def read_inputs(self) -> None:
        """The slice's inputs file, if the daemon wrote one (else each element has its own file, as a
        job submitted by an older reflowd has). A broken one fails each element, as a broken inputs file would."""
        path = jobfiles.slice_inputs_path(self.job_dir, self.slot)
        try:
            data = _read_json(path, "inputs")
        except ValueError as exc:
            if os.path.exists(path):
                self.inputs_error = str(exc)
            return
        elements = data.get("elements")
        if not isinstance(elements, dict):
            self.inputs_error = f"inputs file {path} is corrupt: no 'elements' object"
            return
        self.inputs = elements

    def inputs_of(self, index: int) -> dict[str, Any]:
        if self.inputs_error is not None:
            raise ValueError(self.inputs_error)
        if self.inputs is None:
            return _read_json(jobfiles.inputs_path(self.job_dir, index), "inputs")
        element = self.inputs.get(str(index))
        if isinstance(element, dict) and "error" in element:  # an element-wise chain's failed upstream element
            raise ValueError(str(element["error"]))
        if not isinstance(element, dict):
            raise ValueError(f"inputs file {jobfiles.slice_inputs_path(self.job_dir, self.slot)} has no "
                             f"element {index}")
        return element

    def load(self) -> None:
        """Import the workflow once, before any element is marked started (a crash here blames none)."""
        try:
            self.spec = _load_task(self.job)
        except Exception as exc:  # each element then reports it, as an unpacked worker would
            self.load_error = (f"{type(exc).__name__}: {exc}", traceback.format_exc())

    def skip(self, index: int) -> bool:
        """Cancelled by the daemon, or already done (a requeued job runs its slice again)."""
        return os.path.exists(jobfiles.cancel_path(self.job_dir, index)) or \
            os.path.exists(jobfiles.result_path(self.job_dir, index))

    def element(self, index: int) -> int:
        """Run one element and write its result; returns its exit code."""
        base = _base_result(self.job.get("task"), index, self.job.get("run_id"), _now())
        if self.resolved:
            base.update(resolved_inputs=True)
        try:
            element = self.inputs_of(index)
        except ValueError as exc:
            result, code = _failure(base, f"cannot start: {exc}"), EXIT_BAD_INPUT
        else:
            base.update(identity=element.get("identity"))
            _section(index, element.get("attempt"))
            cwd, env = os.getcwd(), _environment()
            outcome: tuple[dict[str, Any], int] | None = None
            cancelled = False
            try:
                self.watch.begin(index)
                try:
                    if self.load_error is not None:
                        self.markers.mark(index)
                        outcome = _failure(base, self.load_error[0], self.load_error[1]), EXIT_FAILED
                    else:
                        outcome = _execute(self.job_dir, self.job, element, base, self.spec, markers=self.markers)
                finally:
                    self.watch.end(index)
                self.interrupts.hold()
            except ElementCancelled:  # the daemon cancelled this element alone: the job goes on with the next
                self.watch.end(index)
                self.interrupts.hold()
                cancelled = True
                outcome = _failure(base, CANCELLED_WHILE_RUNNING, traceback.format_exc()), EXIT_OK
            except (TaskInterrupted, WorkerInterrupted) as exc:  # outside the task call: this element still ends here
                self.watch.end(index)
                self.interrupts.hold()
                if outcome is None:
                    outcome = _interrupted(base, exc.signum, traceback.format_exc()), 128 + exc.signum
            result, code = outcome
            if cancelled:
                self.cancelled += 1
            _restore(cwd, env)  # the next element starts where this one did, as a fresh worker would
        self.interrupts.hold()
        result, code = _stopped_anyway(result, code, base, self.interrupts.stopped)
        try:
            _write_result(jobfiles.result_path(self.job_dir, index), result)
        except (OSError, TypeError, ValueError) as exc:
            print(f"reflow worker: cannot write result of element {index}: {exc}", file=sys.stderr)
            code = EXIT_FAILED
        _report(result, index)
        if result["state"] == jobfiles.FAILED and result.get("error") != CANCELLED_WHILE_RUNNING:
            self.failed += 1
        return code

    def go_on(self) -> bool:
        return self.interrupts.stopped is None and self.interrupts.warned is None

    def run(self, indices: list[int], width: int) -> int:
        if width > 1:
            return self.run_parallel(indices, width)
        for index in indices:
            if not self.go_on():
                break
            if self.skip(index):
                continue
            self.interrupts.resume()
            code = self.element(index)
            if code > 128:
                return code
        return self.exit_code()

    def exit_code(self) -> int:
        if self.interrupts.stopped is not None:
            return 128 + self.interrupts.stopped
        return EXIT_FAILED if self.failed else EXIT_OK

    def run_parallel(self, indices: list[int], width: int) -> int:
        """*width* elements at a time, each in a child forked after the workflow was imported."""
        pending = list(indices)
        children: dict[int, int] = {}
        self.markers.prepare()
        while pending or children:
            while pending and len(children) < width and self.go_on():
                index = pending.pop(0)
                if self.skip(index):
                    continue
                pid = os.fork()
                if pid == 0:  # the child: its own signal handling, one element, then out
                    code = EXIT_FAILED
                    try:
                        self.watch = _CancelWatch(self.job_dir, self._stop_running)  # its own: not the parent's
                        self.interrupts = Interrupts()
                        self.interrupts.install()
                        self.install_cancel()  # after install(): it chains to the new stop grace
                        code = self.element(index)
                    finally:
                        os._exit(code)
                children[pid] = index
            if not children:
                break
            try:
                self.interrupts.hold()  # a stop signal reaches the children too (process group): note it, wait
                pid, status = os.wait()
            except ChildProcessError:
                break
            index = children.pop(pid, None)
            if index is None:
                continue
            if os.path.exists(jobfiles.cancel_path(self.job_dir, index)):
                continue  # cancelled by the daemon (the child stopped it): whatever it left is no failure
            if os.WIFSIGNALED(status) and not os.path.exists(jobfiles.result_path(self.job_dir, index)):
                name = signal.Signals(os.WTERMSIG(status)).name
                base = _base_result(self.job.get("task"), index, self.job.get("run_id"), _now())
                _write_result(jobfiles.result_path(self.job_dir, index),
                              _failure(base, f"the process running this element was killed by {name}", None, name))
                self.failed += 1
            elif os.WIFEXITED(status) and os.WEXITSTATUS(status) not in (EXIT_OK,):
                self.failed += 1
        return self.exit_code()


def _environment() -> dict[Any, Any]:
    """A copy of the environment to restore after an element, taken cheaply (once per element):
    the raw bytes mapping where the platform has one, else the decoded one."""
    raw = getattr(os.environ, "_data", None) if os.supports_bytes_environ else None
    return dict(raw) if isinstance(raw, dict) else dict(os.environ)


def _restore(cwd: str, env: dict[Any, Any]) -> None:
    try:
        if os.getcwd() != cwd:
            os.chdir(cwd)
    except OSError:
        pass
    if _environment() != env:
        target = os.environb if env and isinstance(next(iter(env)), bytes) else os.environ
        target.clear()  # type: ignore[attr-defined]
        target.update(env)  # type: ignore[attr-defined]


def run_slice(job_dir: str, slot: int) -> int:
    """Run array task *slot* of a packed job: its elements in order, each leaving its own result.

    The worker stops starting elements once the job is being stopped (a stop or warning
    signal); the ones it never started are left without a trace, for the daemon to submit again.
    """
    interrupts = Interrupts()
    interrupts.install()
    piece = _Slice(job_dir, slot, interrupts)
    try:
        try:
            indices = piece.read()
        except ValueError as exc:
            print(f"reflow worker: cannot start slice {slot}: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        piece.load()
        piece.install_cancel()
        width = piece.job.get("width", 1)
        return piece.run(indices, width if isinstance(width, int) and width > 0 else 1)
    except (TaskInterrupted, WorkerInterrupted) as exc:  # between elements: stop here
        return 128 + exc.signum
    except ElementCancelled:  # a nudge that landed between two elements: nothing was running
        return piece.exit_code()
    finally:
        piece.watch.close()
        interrupts.quiet()


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
    parser.add_argument("--index", help="array element index (omit for a singleton task); with --packed, the slice")
    parser.add_argument("--packed", action="store_true", help="run slice --index of a packed job (several elements)")
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
    if args.packed:
        if index is None:
            parser.error("--packed needs --index (the slice to run)")
        return run_slice(args.job_dir, index)
    return run_instance(args.job_dir, index)


if __name__ == "__main__":
    sys.exit(main())
