"""PBS Professional / OpenPBS: pure command builders and output parsers (no I/O).

Follows the PBS Professional Reference Guide (``qsub``, ``qstat``, ``qdel``):

* submission: ``qsub <script>`` with ``#PBS`` directives; the job is named
  after its submission tag (``-N``); arrays are ``-J 0-<n-1>[%<max>]`` with
  ``PBS_ARRAY_INDEX``; qsub prints ``123.server`` or ``123[].server``;
* status: one ``qstat -f [-F json] -x -t <ids>`` for every tracked job
  (``-x`` adds finished jobs when the server keeps job history, ``-t``
  expands arrays into subjobs ``123[4].server``); text ``qstat -f`` is parsed
  where JSON output is missing (before PBS Pro 14);
* exit status: ``Exit_status`` (negative values are PBS's own ``JOB_EXEC_*``
  codes, values above 256 mean "killed by signal value-256"), ``substate``
  91 (terminated by ``qdel``) and the job ``comment``.

Torque shares the command names but not the formats (``qstat -x`` is XML
there, no JSON, arrays are ``-t`` with ``PBS_ARRAYID``, finished jobs show
``C``), so :func:`detect_flavour` tells them apart and the adapter refuses
Torque with a message naming what is missing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from reflow_client.resources import format_hms, format_pbs_size, format_time, parse_time

from . import option_map
from .base import (
    COMMAND_CHARS,
    Observation,
    Outcome,
    Phase,
    Presence,
    SubmitError,
    SubmitRequest,
    TaggedJob,
    cancel_targets,
    command_chunks,
    index_runs,
    size_bytes,
    size_text,
)
from .job_script import ArrayLayout, directive_word, render_script

# ---------------------------------------------------------------------- options

SYSTEM = option_map.system_label("PBS Professional", "pbs")

#: Slurm-style mail types -> ``qsub -m`` letters (a: aborted, b: begins, e: ends, n: none, j: subjobs too).
_MAIL = {"NONE": "n", "BEGIN": "b", "END": "e", "FAIL": "a", "ALL": "abe"}

OPTIONS = option_map.OptionSpec(
    system="PBS Professional",
    scheduler="pbs",
    command="qsub",
    renderers={
        "queue": lambda v: ["-q", v],
        "partition": lambda v: ["-q", v],
        "account": lambda v: ["-A", v],
        "project": lambda v: ["-P", v],
        "mail_user": lambda v: ["-M", v],
        "mail_type": lambda v: ["-m", "".join(option_map.mail_types(SYSTEM, v, _MAIL, letters="abejn"))],
    },
    lacks={
        "qos": "PBS has no quality of service; choose a queue (partition=)",
        "signal": "PBS sends SIGTERM at the walltime limit and SIGKILL after the server's kill_delay, "
                  "with no earlier warning signal",
    },
    reserved={
        "array": "array tasks become job arrays by themselves (array_parallelism= sets the %limit)",
        "walltime": "use job(time=...)",
        "ncpus": "use job(cpus=...)",
        "select": "reflow writes select=1:ncpus=..:mem=..; pass other chunks through 'native_args'",
    },
    reserved_flags={
        "-N": "the job name carries the submission tag",
        "-J": "array tasks become job arrays by themselves",
        "-o": "logs go to <run_dir>/logs/",
        "-e": "logs go to <run_dir>/logs/",
        "-j": "logs go to <run_dir>/logs/",
    },
)


def validate_options(options: Mapping[str, Any]) -> None:
    option_map.validate(OPTIONS, options)


# ---------------------------------------------------------------------- submission


def walltime(request: SubmitRequest) -> str | None:
    seconds = parse_time(request.time)
    return format_hms(seconds) if seconds is not None else None


def render_directives(request: SubmitRequest, job_dir: str, *, array_limit: bool) -> list[str]:
    """``#PBS`` lines: name, resources, walltime, scheduler logs, array range, options."""
    mem = format_pbs_size(request.mem)
    lines = [f"#PBS -N {request.job_name}", f"#PBS -l select=1:ncpus={int(request.cpus)}:mem={mem}"]
    wall = walltime(request)
    if wall:
        lines.append(f"#PBS -l walltime={wall}")
    n = len(set(request.indices or ()))
    if request.indices is not None and n > 1:
        spec = f"0-{n - 1}"
        if request.array_parallelism and array_limit:
            spec += f"%{int(request.array_parallelism)}"
        lines.append(f"#PBS -J {spec}")
        lines.append(f"#PBS -o {job_dir}/pbs.^array_index^.out")
    else:
        lines.append(f"#PBS -o {job_dir}/pbs.out")
    lines.append("#PBS -j oe")
    groups, _native = option_map.render(OPTIONS, request.options)
    for group in groups:
        lines.append("#PBS " + " ".join(directive_word(w) for w in group))
    return lines


def position_expr(request: SubmitRequest) -> str | None:
    """Dense arrays of two or more elements use PBS_ARRAY_INDEX; one element goes out as a plain job."""
    if request.indices is None or len(set(request.indices)) < 2:
        return None
    return "PBS_ARRAY_INDEX"


def render_job_script(request: SubmitRequest, *, array_limit: bool = True) -> str:
    return render_script(request, render_directives(request, request.job_dir, array_limit=array_limit),
                         position_expr(request))


def render_qsub(request: SubmitRequest, script_path: str) -> list[str]:
    _groups, native = option_map.render(OPTIONS, request.options)
    return ["qsub", *native, script_path]


#: Messages meaning the server did not answer or was busy: the job may or may not exist.
_TRANSIENT = (
    "cannot connect to server",
    "connection refused",
    "connection timed out",
    "server is busy",
    "try again",
    "temporarily unavailable",
    "end of file",
    "communication failure",
    "pbs_iff",
    "errno=15010",
    "errno=15031",
)

_JOB_ID = re.compile(r"^\d+(\[\d*\])?(\.[A-Za-z0-9_.\-]+)?$")


def parse_qsub(stdout: str, stderr: str, returncode: int) -> str:
    """The job id qsub printed (``123.server``, ``123[].server``), or SubmitError."""
    first = stdout.strip().splitlines()[0].strip() if stdout.strip() else ""
    if returncode == 0 and first:
        if _JOB_ID.match(first):
            return first
        raise SubmitError(f"qsub printed {first!r} instead of a job id", permanent=False)
    message = " ".join(line.strip() for line in (stderr.strip() or stdout.strip()).splitlines() if line.strip())
    raise SubmitError.from_output("qsub", returncode, message, _TRANSIENT)


# ---------------------------------------------------------------------- job ids


def parse_job_id(job_id: str) -> tuple[str, str | None, str]:
    """``123[4].srv`` -> ("123", "4", ".srv"); ``123[].srv`` -> ("123", "", ".srv"); ``123.srv`` -> ("123", None, ".srv")."""
    match = re.fullmatch(r"(\d+)(?:\[(\d*)\])?(.*)", job_id.strip())
    if not match:
        return job_id, None, ""
    return match.group(1), match.group(2), match.group(3)


def subjob_id(array_id: str, position: int) -> str:
    """``123[].srv`` + 4 -> ``123[4].srv``."""
    seq, _idx, rest = parse_job_id(array_id)
    return f"{seq}[{position}]{rest}"


def same_job(a: str, b: str) -> bool:
    """Job ids name the same job when sequence number and index agree (the server suffix may be
    shortened: ``123.srv`` and ``123.srv.example.org``)."""
    sa, ia, ra = parse_job_id(a)
    sb, ib, rb = parse_job_id(b)
    if sa != sb or ia != ib:
        return False
    return not ra or not rb or ra.startswith(rb) or rb.startswith(ra)


# ---------------------------------------------------------------------- states

#: PBS Pro job states (Reference Guide, "Job States").
_QUEUED = {"Q": None, "H": "held", "W": "waiting for its execution time", "T": "being moved",
           "M": "moved to another server"}
_RUNNING = {"R": None, "E": "exiting", "B": None, "S": "suspended", "U": "suspended (workstation busy)"}
_DONE = {"F", "X"}

#: PBS's own negative Exit_status values (JOB_EXEC_* in the Reference Guide).
JOB_EXEC = {
    -1: ("JOB_EXEC_FAIL1", Outcome.NODE_FAIL, "job exec failed, before files, no retry"),
    -2: ("JOB_EXEC_FAIL2", Outcome.NODE_FAIL, "job exec failed, after files, no retry"),
    -3: ("JOB_EXEC_RETRY", Outcome.NODE_FAIL, "job exec failed, will retry"),
    -4: ("JOB_EXEC_INITABT", Outcome.NODE_FAIL, "job aborted on MoM initialization"),
    -5: ("JOB_EXEC_INITRST", Outcome.NODE_FAIL, "job aborted on MoM init, checkpoint, no migrate"),
    -6: ("JOB_EXEC_INITRMG", Outcome.NODE_FAIL, "job aborted on MoM init, checkpoint, ok migrate"),
    -7: ("JOB_EXEC_BADRESRT", Outcome.NODE_FAIL, "job restart failed"),
    -10: ("JOB_EXEC_FAILUID", Outcome.FAILED, "invalid uid/gid for job"),
    -11: ("JOB_EXEC_RERUN", Outcome.NODE_FAIL, "job rerun"),
    -12: ("JOB_EXEC_CHKP", Outcome.FAILED, "job was checkpointed and killed"),
    -13: ("JOB_EXEC_FAIL_PASSWORD", Outcome.FAILED, "job failed due to a bad password"),
    -14: ("JOB_EXEC_RERUN_ON_SIS_FAIL", Outcome.NODE_FAIL, "job requeued because a sister MoM failed"),
    -15: ("JOB_EXEC_QUERST", Outcome.NODE_FAIL, "requeue job for restart from checkpoint"),
    -16: ("JOB_EXEC_FAILHOOK_RERUN", Outcome.NODE_FAIL, "a hook failed; job requeued"),
    -17: ("JOB_EXEC_FAILHOOK_DELETE", Outcome.FAILED, "a hook failed; job deleted"),
    -18: ("JOB_EXEC_HOOK_RERUN", Outcome.NODE_FAIL, "a hook requested the job be rerun"),
    -19: ("JOB_EXEC_HOOK_DELETE", Outcome.CANCELLED, "a hook requested the job be deleted"),
    -20: ("JOB_EXEC_RERUN_MS_FAIL", Outcome.NODE_FAIL, "job requeued because the mother superior failed"),
    -24: ("JOB_EXEC_KILL_NCPUS_BURST", Outcome.FAILED, "killed: ncpus usage burst over the limit"),
    -25: ("JOB_EXEC_KILL_NCPUS_SUM", Outcome.FAILED, "killed: ncpus usage sum over the limit"),
    -26: ("JOB_EXEC_KILL_VMEM", Outcome.OUT_OF_MEMORY, "killed: vmem over the limit"),
    -27: ("JOB_EXEC_KILL_MEM", Outcome.OUT_OF_MEMORY, "killed: mem over the limit"),
    -28: ("JOB_EXEC_KILL_CPUT", Outcome.TIMEOUT, "killed: cput over the limit"),
    -29: ("JOB_EXEC_KILL_WALLTIME", Outcome.TIMEOUT, "killed: walltime over the limit"),
}

#: ``substate`` of a finished job: 91 terminated (qdel), 92 finished, 93 failed.
SUBSTATE_TERMINATED = "91"


def observe(record: Mapping[str, Any]) -> Observation:
    """One ``qstat -f`` record (JSON object or parsed text) -> observation."""
    state = str(record.get("job_state", "")).strip().upper()
    comment = str(record.get("comment", "") or "").strip() or None
    exit_raw = record.get("Exit_status", record.get("exit_status"))
    exit_code = None if exit_raw in (None, "") else str(exit_raw).strip()
    if state in _QUEUED:
        return Observation(Presence.PRESENT, Phase.QUEUED, None, state, _QUEUED[state] or comment, exit_code)
    if state in _RUNNING:
        return Observation(Presence.PRESENT, Phase.RUNNING, None, state, _RUNNING[state], exit_code)
    if state in _DONE:
        outcome, reason = finished_outcome(exit_code, str(record.get("substate", "")).strip(), comment)
        return Observation(Presence.PRESENT, Phase.DONE, outcome, state, reason, exit_code,
                           node=first_host(record.get("exec_host")), peak_mem=size_text(size_bytes(used_mem(record))))
    return Observation(Presence.UNKNOWN, native_state=state or None, detail=f"unknown PBS job state {state!r}")


def used_mem(record: Mapping[str, Any]) -> str | None:
    """``resources_used.mem`` (``4400kb``): a JSON record nests it, ``qstat -f`` text spells it dotted."""
    used = record.get("resources_used")
    value = used.get("mem") if isinstance(used, Mapping) else record.get("resources_used.mem")
    return None if value is None else str(value)


def first_host(exec_host: Any) -> str | None:
    """``node1/0*2+node2/0`` -> ``node1`` (the mother superior, where the job script ran)."""
    host = str(exec_host or "").split("+", 1)[0].split("/", 1)[0].strip()
    return host or None


def finished_outcome(exit_code: str | None, substate: str, comment: str | None) -> tuple[Outcome, str | None]:
    """How a finished (F) job or subjob (X) ended, from Exit_status, substate and comment."""
    text = (comment or "").lower()
    if "walltime" in text and "exceed" in text:
        return Outcome.TIMEOUT, comment
    if re.search(r"\b(v?mem|pmem)\b", text) and "exceed" in text:
        return Outcome.OUT_OF_MEMORY, comment
    if substate == SUBSTATE_TERMINATED or "deleted" in text:
        return Outcome.CANCELLED, comment or "deleted (qdel)"
    if exit_code is None or not exit_code.lstrip("-").isdigit():
        # Finished without ever running (deleted while queued leaves no Exit_status).
        return Outcome.CANCELLED, comment or "finished without running"
    code = int(exit_code)
    if code == 0:
        return Outcome.COMPLETED, comment
    if code in JOB_EXEC:
        name, outcome, meaning = JOB_EXEC[code]
        return outcome, f"{name}: {meaning}" + (f" ({comment})" if comment else "")
    if code > 256:
        return Outcome.FAILED, f"killed by signal {code - 256}" + (f" ({comment})" if comment else "")
    return Outcome.FAILED, comment or f"exit status {code}"


# ---------------------------------------------------------------------- qstat


def render_qstat(job_ids: Sequence[str], *, json_output: bool, history: bool) -> list[str]:
    argv = ["qstat", "-f"]
    if json_output:
        argv += ["-F", "json"]
    if history:
        argv.append("-x")
    argv.append("-t")
    return argv + list(job_ids)


def parse_qstat_json(stdout: str) -> dict[str, dict[str, Any]]:
    """``qstat -f -F json`` -> {job id: attributes}. Raises ValueError on output that is not that JSON."""
    if not stdout.strip():
        return {}
    data = json.loads(stdout)
    jobs = data.get("Jobs", {}) if isinstance(data, dict) else None
    if not isinstance(jobs, dict):
        raise ValueError("qstat JSON has no 'Jobs' object")
    return {str(k): v for k, v in jobs.items() if isinstance(v, dict)}


def parse_qstat_text(stdout: str) -> dict[str, dict[str, Any]]:
    """``qstat -f`` text: ``Job Id: X`` then ``    key = value`` lines; tab-indented lines continue a value."""
    jobs: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    last: str | None = None
    for line in stdout.splitlines():
        if line.startswith("Job Id:"):
            current = jobs.setdefault(line.split(":", 1)[1].strip(), {})
            last = None
        elif current is not None and line.startswith("\t") and last is not None:
            current[last] = str(current[last]) + line.strip()
        elif current is not None and " = " in line:
            key, _, value = line.strip().partition(" = ")
            current[key.strip()] = value.strip()
            last = key.strip()
    return jobs


_UNKNOWN_ID = re.compile(r"Unknown Job Id\s+(\S+)", re.IGNORECASE)
_HISTORY_ID = re.compile(r"(\S+)\s+Job has finished, use -x", re.IGNORECASE)


def qstat_errors(stderr: str) -> tuple[set[str], list[str]]:
    """(job ids qstat does not know, other error lines) from qstat's stderr."""
    unknown: set[str] = set()
    other: list[str] = []
    for line in stderr.splitlines():
        text = line.strip()
        if not text:
            continue
        if (m := _UNKNOWN_ID.search(text)) or (m := _HISTORY_ID.search(text)):
            unknown.add(m.group(1))
        else:
            other.append(text)
    return unknown, other


def observations(records: Mapping[str, Mapping[str, Any]], layouts: Iterable[ArrayLayout]) -> dict[str, Observation]:
    """Observation per key for the tracked submissions found in *records* (absent ones left out)."""
    out: dict[str, Observation] = {}
    for layout in layouts:
        if not layout.is_array or len(layout.indices or ()) < 2:
            record = _find(records, layout.job_id)
            if record is not None:
                for key in layout.keys():  # a one-element array was sent as a plain job
                    out[key] = observe(record)
            continue
        parent = _find(records, layout.job_id)
        for position, key in enumerate(layout.keys()):
            record = _find(records, subjob_id(layout.job_id, position))
            if record is not None:
                out[key] = observe(record)
            elif parent is not None and str(parent.get("job_state", "")).upper() == "Q":
                out[key] = observe(parent)  # subjobs not instantiated yet: queued with the array
    return out


def _find(records: Mapping[str, Mapping[str, Any]], job_id: str) -> Mapping[str, Any] | None:
    if job_id in records:
        return records[job_id]
    for key, value in records.items():
        if same_job(key, job_id):
            return value
    return None


def tagged_jobs(records: Mapping[str, Mapping[str, Any]], tags: Iterable[str]) -> dict[str, list[TaggedJob]]:
    """Jobs (not subjobs) carrying each tag as their ``Job_Name``."""
    wanted = set(tags)
    found: dict[str, list[TaggedJob]] = {t: [] for t in wanted}
    for job_id, record in sorted(records.items()):
        name = str(record.get("Job_Name", ""))
        if name not in wanted:
            continue
        _seq, index, _rest = parse_job_id(job_id)
        if index:  # a subjob: its array is listed too
            continue
        active = str(record.get("job_state", "")).upper() not in _DONE
        found[name].append(TaggedJob(job_id=job_id, tag=name, active=active))
    return found


def render_qselect(tag: str, *, history: bool) -> list[str]:
    """Job ids named *tag* (``qselect -N``; ``-x`` adds finished jobs kept in history)."""
    return ["qselect", *(["-x"] if history else []), "-N", tag]


def parse_qselect(stdout: str) -> list[str]:
    return [line.strip() for line in stdout.splitlines() if _JOB_ID.match(line.strip())]


def render_qdel(job_ids: Sequence[str]) -> list[str]:
    """``qdel`` (never ``-x``, which would purge finished jobs from history)."""
    return ["qdel", *job_ids]


def subjob_range(array_id: str, first: int, last: int) -> str:
    """``123[].srv``, 4, 9 -> ``123[4-9].srv``; a lone index stays a subjob id (``123[4].srv``)."""
    if first == last:
        return subjob_id(array_id, first)
    seq, _idx, rest = parse_job_id(array_id)
    return f"{seq}[{first}-{last}]{rest}"


def qdel_words(targets: Iterable[tuple[str, int | None]]) -> list[str]:
    """``qdel`` operands for ``(job id, subjob index or None for the whole job)`` targets: whole jobs, then
    each array's subjobs folded into ranges (``123[0-4].srv 123[7].srv``).

    qdel(1B), OPERANDS (PBS Professional Reference Guide; openpbs doc/man1/qdel.1B): "Ranges of subjobs
    have the form <sequence number>[<first>-<last>][.<server name>]" -- one range per operand, no comma
    lists. The server takes a range subjob by subjob, skipping unknown indices and exiting subjobs
    (OpenPBS src/server/req_delete.c, req_deletejob), so one finished element does not spare the rest.
    """
    whole, elements = cancel_targets(targets)
    words = list(whole)
    for job_id, positions in elements.items():
        words.extend(subjob_range(job_id, first, last) for first, last in index_runs(positions))
    return words


def render_qdel_commands(targets: Iterable[tuple[str, int | None]], *, limit: int = COMMAND_CHARS) -> list[list[str]]:
    """The ``qdel`` commands for *targets* (folded by :func:`qdel_words`), each within *limit* characters of
    operands (what one SSH argument takes)."""
    return [render_qdel(chunk) for chunk in command_chunks(qdel_words(targets), limit)]


# ---------------------------------------------------------------------- probe


def detect_flavour(version_text: str) -> tuple[str, str | None]:
    """(``pbspro`` | ``torque`` | ``unknown``, version) from ``qstat --version``."""
    text = version_text.strip()
    if m := re.search(r"pbs_version\s*=\s*(\S+)", text):
        return "pbspro", m.group(1)
    if m := re.search(r"^Version:\s*(\S+)", text, re.MULTILINE):
        return "torque", m.group(1)
    return "unknown", text.splitlines()[0] if text else None


TORQUE_REFUSAL = (
    "this site runs Torque ({version}), not PBS Professional/OpenPBS: reflow's PBS adapter needs "
    "'qstat -F json' or PBS Pro's 'qstat -f' attributes, job history through 'qstat -x' (Torque's -x is XML), "
    "and '-J' arrays with PBS_ARRAY_INDEX (Torque uses -t and PBS_ARRAYID); Torque is not supported"
)


def parse_server_attributes(text: str) -> dict[str, str]:
    """``qstat -Bf`` text -> server attributes (``max_array_size``, ``job_history_enable``, ...)."""
    attrs: dict[str, str] = {}
    last: str | None = None
    for line in text.splitlines():
        if line.startswith("Server:"):
            attrs["server"] = line.split(":", 1)[1].strip()
        elif line.startswith("\t") and last:
            attrs[last] += line.strip()
        elif " = " in line:
            key, _, value = line.strip().partition(" = ")
            attrs[key.strip()] = value.strip()
            last = key.strip()
    return attrs


def version_tuple(version: str | None) -> tuple[int, ...]:
    if not version:
        return ()
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def supports_json(version: str | None) -> bool:
    """``qstat -F json`` exists from PBS Professional 14 (OpenPBS numbers from 19/20 on)."""
    parts = version_tuple(version)
    return bool(parts) and parts[0] >= 14


def supports_array_limit(version: str | None) -> bool:
    """``-J X-Y%max`` (max_run_subjobs) exists from PBS Professional 2020.1 / OpenPBS 20."""
    parts = version_tuple(version)
    return bool(parts) and parts[0] >= 20


def history_enabled(attrs: Mapping[str, str]) -> bool:
    return attrs.get("job_history_enable", "").strip().lower() in ("true", "1", "t", "y", "yes")


def max_array_size(attrs: Mapping[str, str], default: int = 10000) -> int:
    try:
        return int(attrs.get("max_array_size", default))
    except ValueError:
        return default


# ---------------------------------------------------------------------- limits (queue cap, escalation caps)

_LIMIT_ENTRY = re.compile(r"\[\s*([ugpo])\s*:\s*([^=\]]+?)\s*=\s*(\d+)\s*\]")


def limit_for_user(value: str | None, user: str) -> int | None:
    """A PBS Professional limit attribute (``[u:PBS_GENERIC=100],[u:alice=20],[o:PBS_ALL=5000]``) for *user*:
    the user's own entry, else the generic one, and at most the overall one. Group and project entries are
    not counted (the user's groups are not known here); None when nothing applies."""
    own = generic = overall = None
    for kind, name, number in _LIMIT_ENTRY.findall(value or ""):
        if kind == "u" and name == user:
            own = int(number)
        elif kind == "u" and name == "PBS_GENERIC":
            generic = int(number)
        elif kind == "o" and name == "PBS_ALL":
            overall = int(number)
    limits = [v for v in ((own if own is not None else generic), overall) if v is not None]
    return min(limits) if limits else None


def parse_queue_attributes(text: str) -> dict[str, dict[str, str]]:
    """``qstat -Qf`` text -> queue -> attributes (``max_queued``, ``resources_max.walltime``, ...)."""
    queues: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    last: str | None = None
    for line in text.splitlines():
        if line.startswith("Queue:"):
            current = queues.setdefault(line.split(":", 1)[1].strip(), {})
            last = None
        elif current is None:
            continue
        elif line.startswith("\t") and last:
            current[last] += line.strip()
        elif " = " in line:
            key, _, value = line.strip().partition(" = ")
            current[key.strip()] = value.strip()
            last = key.strip()
    return queues


#: Attributes that refuse a submission over a count of the user's jobs (``max_queued`` counts queued and
#: running jobs; ``queued_jobs_threshold``, PBS Professional 19+, only queued ones), and the old-style
#: ``max_queuable`` (all users' jobs in the queue).
_COUNT_LIMITS = ("max_queued", "queued_jobs_threshold")


def queue_limit(server: Mapping[str, str], queue: Mapping[str, str] | None, user: str) -> int | None:
    """The smallest count of jobs *user* may have queued: the server's limits and those of the queue the
    jobs go to (its default queue, unless a ``queue`` option names another). qsub refuses a job over
    one ("would exceed complex's per-user limit of jobs in 'Q' state")."""
    limits = [limit_for_user(attrs.get(key), user) for attrs in (server, queue or {}) for key in _COUNT_LIMITS]
    try:
        limits.append(int((queue or {}).get("max_queuable", "")))
    except ValueError:
        pass
    positive = [v for v in limits if v is not None and v > 0]
    return min(positive) if positive else None


_PBS_SIZE = {"b": 1, "w": 8, "kb": 1024, "kw": 8 * 1024, "mb": 1024 ** 2, "mw": 8 * 1024 ** 2, "gb": 1024 ** 3,
             "gw": 8 * 1024 ** 3, "tb": 1024 ** 4, "tw": 8 * 1024 ** 4, "pb": 1024 ** 5}


def size_megabytes(text: str | None) -> int | None:
    """A PBS size (``64gb``, ``500mb``, ``1048576kb``, bytes without a unit) in MB; None when not set."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgtp]?[bw])?\s*", (text or "").lower())
    if not text or not match:
        return None
    return int(match.group(1)) * _PBS_SIZE[match.group(2) or "b"] // 1024 ** 2


def walltime_seconds(text: str | None) -> int | None:
    """``resources_max.walltime`` (``336:00:00``, ``01:30``, seconds) in seconds; None when not set."""
    parts = (text or "").strip().split(":")
    if not text or not all(p.isdigit() for p in parts) or len(parts) > 3:
        return None
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return seconds


def queue_caps(queue: Mapping[str, str]) -> dict[str, str | None]:
    """The largest time and memory a job may ask for in a queue (``resources_max.walltime``/``.mem``), as
    the retry policy's caps; None where the queue sets none."""
    seconds = walltime_seconds(queue.get("resources_max.walltime"))
    megabytes = size_megabytes(queue.get("resources_max.mem"))
    return {"max_time": format_time(seconds) if seconds else None, "max_mem": f"{megabytes}M" if megabytes else None}
