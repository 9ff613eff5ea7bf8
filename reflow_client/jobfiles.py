"""Layout of the files the daemon and the compute-node worker exchange.

One directory per submission (its tag), under the run directory::

    <run_dir>/.reflow/<run_id>/jobs/<tag>/
        job.json              what every element shares: workflow file, task, shared arguments
        job.sh                the batch script (schedulers that need one)
        inputs/<key>.json     one element's own arguments and identity
        inputs/slice-<k>.json packed jobs: those of every element array task k runs, by index
                              (one file per slice: creating a file is what a tiny element costs most)
        started/<key>.json    written by the worker when it begins (host, pid, time); a packed
                              worker links them all to one file, .started-<k>-<host>-<pid>
        results/<key>.json    written atomically by the worker when it ends
        cancel/<key>.json     packed jobs: the daemon cancelled this element; the worker skips it
                              (an early job, see reflowd/driver/early.py: the daemon withdrew it)

A job submitted before its upstream ended (Slurm-side dependencies) has no inputs file: its
``job.json`` holds a ``deferred`` recipe the worker resolves from the upstream's result files.

A packed job (``job.json`` has ``slices``) runs several elements per array task
and writes one log per array task, in sections: each element's output follows
a :func:`section_header` line naming it (:func:`log_section` cuts one out).

``<key>`` is the element index, or ``single`` for a singleton task. Both
sides import this module so they cannot disagree about paths or fields.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Generator
from typing import Any

from . import jsonpieces
from .protocol import MAX_DEPTH, MAX_NUMBER_DIGITS, check_value, loads

JOB_FILE = "job.json"
SCRIPT_FILE = "job.sh"
RESULT_FORMAT = 1
#: Largest result file the daemon accepts (outputs travel through the daemon and its database).
MAX_RESULT_BYTES = 64 * 1024 * 1024

#: Result states the worker can write.
SUCCEEDED = "succeeded"
FAILED = "failed"


def element_key(index: int | None) -> str:
    return "single" if index is None else str(index)


def reflow_dir(run_dir: str) -> str:
    return os.path.join(run_dir, ".reflow")


def run_files_dir(run_dir: str, run_id: str) -> str:
    return os.path.join(run_dir, ".reflow", run_id)


def job_dir(run_dir: str, run_id: str, tag: str) -> str:
    return os.path.join(run_dir, ".reflow", run_id, "jobs", tag)


def _under(job_dir_: str, sub: str, index: int | None) -> str:
    """``os.path.join(job_dir_, sub, f"{element_key(index)}.json")`` as one concatenation: the daemon makes
    two of these per element (its inputs file, its result file), and ``join`` is a Python function."""
    name = "single.json" if index is None else f"{index}.json"
    if job_dir_ and not job_dir_.endswith("/"):
        return f"{job_dir_}/{sub}/{name}"
    return os.path.join(job_dir_, sub, name)


def inputs_path(job_dir_: str, index: int | None) -> str:
    return _under(job_dir_, "inputs", index)


def slice_inputs_path(job_dir_: str, slot: int) -> str:
    """A packed job's inputs of array task *slot*: ``{"elements": {"<index>": <inputs/<key>.json's content>}}``."""
    return os.path.join(job_dir_, "inputs", f"slice-{slot}.json")


def started_path(job_dir_: str, index: int | None) -> str:
    return _under(job_dir_, "started", index)


def result_path(job_dir_: str, index: int | None) -> str:
    return _under(job_dir_, "results", index)


def cancel_path(job_dir_: str, index: int | None) -> str:
    return _under(job_dir_, "cancel", index)


#: Start of the line a packed worker writes to stdout and stderr before each element's output.
SECTION_MARK = "==== reflow element "


def section_header(index: int | None, attempt: int | None = None) -> str:
    return f"{SECTION_MARK}{element_key(index)}" + (f" attempt {attempt}" if attempt is not None else "") + " ===="


def log_section(text: str, index: int | None) -> str | None:
    """The output of element *index* in a packed job's log (its last section); None if it has none."""
    head = f"{SECTION_MARK}{element_key(index)} "
    start = -1
    at = 0
    while True:
        found = text.find(head, at)
        if found < 0:
            break
        if found == 0 or text[found - 1] == "\n":
            start = found
        at = found + len(head)
    if start < 0:
        return None
    body = text.index("\n", start) + 1 if "\n" in text[start:] else len(text)
    end = text.find("\n" + SECTION_MARK, body - 1)
    return text[body:] if end < 0 else text[body : end + 1]


def log_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "logs")


def dumps(data: Any) -> bytes:
    return jsonpieces.compact(data).encode("utf-8")


def dumps_steps(data: Any) -> Generator[None, None, bytes]:
    """:func:`dumps` with points to yield at: a job file holding a 10^6-element gather is encoded a slice
    at a time (``jsonpieces``), not in one 100 ms call. The same bytes."""
    text = yield from jsonpieces.dumps_steps(data)
    return text.encode("utf-8")


def write_bytes_atomic(path: str, data: bytes, mode: int = 0o644, *, durable: bool = True) -> None:
    """Write so that readers see the old file, no file, or the whole new file."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = _create_temporary(directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _create_temporary(directory: str) -> tuple[int, str]:
    """``tempfile.mkstemp`` without importing ``tempfile`` (and ``random``, ``shutil``): every worker writes
    its result through here, and a packed job's elements pay a worker's imports once, a lone element each time."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".tmp-{os.getpid()}-{os.urandom(6).hex()}~")
        try:
            return os.open(tmp, flags, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {directory}")


def write_json_atomic(path: str, data: Any) -> None:
    write_bytes_atomic(path, dumps(data))


#: Every digit as "0": a run of more than ``MAX_NUMBER_DIGITS`` digits is then one substring search.
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_TOO_MANY_DIGITS = b"0" * (MAX_NUMBER_DIGITS + 1)


#: What keeps a text from being parsed in C without a walk over the value (``_plain_text``), a pass
#: over the text each (5-10 ms over a 7 MB one: ``_plain_text_steps`` yields between them).
_NOT_PLAIN: tuple[Callable[[bytes], bool], ...] = (
    lambda raw: raw.count(b"[") + raw.count(b"{") >= MAX_DEPTH,
    lambda raw: b"\\u" in raw or b"\x00" in raw or raw.startswith(b"\xef\xbb\xbf"),
    lambda raw: _TOO_MANY_DIGITS in raw.translate(_DIGITS_AS_ZERO),
)


def _plain_text(raw: bytes | str) -> str | None:
    """The text, if it can be parsed in C with no walk over the value (``_loads_plain``): only when
    nothing in it could break a limit -- fewer containers than ``MAX_DEPTH``, strict UTF-8 (json's own
    decoding lets lone surrogates through) with no BOM or NUL (other encodings), no ``\\u`` escape,
    no run of digits longer than a number may have. A result holding a list of 10^5 numbers is then
    parsed in a few ms, not checked item by item in Python. None: take the checked way."""
    if not isinstance(raw, bytes):
        return None
    for not_plain in _NOT_PLAIN:
        if not_plain(raw):
            return None
    return _utf8(raw)


def _plain_text_steps(raw: bytes | str) -> Generator[None, None, str | None]:
    """:func:`_plain_text`, a check at a time."""
    if not isinstance(raw, bytes):
        return None
    for not_plain in _NOT_PLAIN:
        if not_plain(raw):
            return None
        yield None
    return _utf8(raw)


def _utf8(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # (as protocol.loads says it)
        raise ValueError(f"number {text[:40]} is too large (beyond about 1e308)")
    return value


def _no_constant(text: str) -> float:
    raise ValueError(f"{text} is not a JSON number")


#: ``json.loads`` with hooks builds a decoder (and its scanner) per call: one, shared. (``json.loads`` also
#: refuses a leading BOM, which ``_plain_text`` has already refused.)
_decode_plain = json.JSONDecoder(parse_float=_finite, parse_constant=_no_constant).decode


def _loads_plain(text: str) -> Any:
    """``protocol.loads`` for ``_plain_text``: its hooks run only for floats and constants."""
    return _decode_plain(text)


def parse_result(raw: bytes | str, where: str = "result") -> dict[str, Any]:
    """Validate a worker result file; a malformed one raises ValueError naming the problem.

    Bounded: at most ``MAX_RESULT_BYTES``, ``MAX_DEPTH`` levels of nesting and numbers a double can
    hold; text must be valid Unicode. Whatever a job leaves behind fails that instance, never the daemon.
    """
    plain = _result_text(raw, where)
    try:
        data = _loads_plain(plain) if plain is not None else loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where} is not valid JSON: {exc}") from None
    return _checked_result(data, where, plain is not None)


#: Results this large are decoded a stretch at a time by :func:`parse_result_steps` (a fan-out's list).
PIECES_FROM = 256 * 1024


def parse_result_steps(raw: bytes | str, where: str = "result") -> Generator[None, None, dict[str, Any]]:
    """:func:`parse_result` with points to yield at (``jsonpieces``): a large result (a 10^6-element list
    is 7 MB, 100-200 ms in one C call) is decoded a stretch at a time. The same result, or the same error."""
    if len(raw) < PIECES_FROM:
        return parse_result(raw, where)
    _check_size(raw, where)
    plain = yield from _plain_text_steps(raw)
    if plain is None:
        return parse_result(raw, where)
    yield None
    try:
        data = yield from jsonpieces.loads_steps(plain, parse_float=_finite, parse_constant=_no_constant)
    except ValueError as exc:
        raise ValueError(f"{where} is not valid JSON: {exc}") from None
    return _checked_result(data, where, True)


def _result_text(raw: bytes | str, where: str) -> str | None:
    """Refuses a result over the size bound; its text when it is plain (``_plain_text``)."""
    _check_size(raw, where)
    return _plain_text(raw)


def _check_size(raw: bytes | str, where: str) -> None:
    if len(raw) > MAX_RESULT_BYTES:
        raise ValueError(f"{where} is {len(raw)} bytes, more than the {MAX_RESULT_BYTES // 2**20} MiB a result may have")


def _checked_result(data: Any, where: str, plain: bool) -> dict[str, Any]:
    """*data* decoded from a result file, checked (``check_value`` walks it unless it came from plain text)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} is not a JSON object")
    problem = None if plain else check_value(data, "")
    if problem:
        raise ValueError(f"{where}: {problem}" + (f" (results may nest at most {MAX_DEPTH} levels)"
                                                  if "nesting" in problem else ""))
    if data.get("state") not in (SUCCEEDED, FAILED):
        raise ValueError(f"{where} has no valid state (got {str(data.get('state'))[:80]!r})")
    if data["state"] == SUCCEEDED and not isinstance(data.get("output_hash"), str):
        raise ValueError(f"{where} claims success but has no output_hash")
    for key in ("started_at", "ended_at"):
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{where}: {key} must be a time in seconds, not {type(value).__name__}")
    for key in ("host", "error", "traceback", "output_hash"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise ValueError(f"{where}: {key} must be text, not {type(data[key]).__name__}")
    if data.get("signal") is not None and not isinstance(data["signal"], (str, int)):
        raise ValueError(f"{where}: signal must be a name or a number, not {type(data['signal']).__name__}")
    return data
