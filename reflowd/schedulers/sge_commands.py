"""Grid Engine (Son of Grid Engine, Univa/Altair GE): pure command builders and output parsers.

No I/O here: everything is a function of its arguments, tested against
outputs recorded on the real test cluster (``tests/data/sge/``). The async
layer (``sge.py``) runs these argv lists through a transport.

Array tasks: Grid Engine numbers them from 1 and takes one range
``first-last:step`` per job. Element ``index`` of a request becomes task
``index - index_offset + 1``, so the engine's observation key
``<job>_<index - index_offset>`` is ``<job>_<task - 1>`` and can be computed
from ``qstat``/``qacct`` output alone, without remembering anything. Indices
that are not evenly spaced (a retry of a few scattered elements) are submitted
as the covering range; the script lets the tasks in between exit at once.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reflow_client.resources import format_time, parse_mem, parse_time

from . import option_map
from .base import (
    Observation,
    OptionError,
    Outcome,
    Phase,
    Presence,
    SubmitError,
    SubmitRequest,
    TaggedJob,
    log_path,
    size_bytes,
    size_text,
)
from .job_script import export_lines

SYSTEM = option_map.system_label("Grid Engine", "sge")

# ---------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SGESettings:
    """What differs between Grid Engine sites and is set in ``[clusters.NAME]``."""

    #: Parallel environment for ``cpus > 1`` (``qsub -pe <name> <cpus>``); sites name theirs
    #: (smp, threaded, shm, openmp ...): ``qconf -spl`` lists them. None: multi-cpu tasks are refused.
    parallel_environment: str | None = None
    #: The complex a memory request goes to: ``h_vmem`` (a hard limit), ``mem_free``
    #: (placement only), a site's own consumable, or ``none`` (not requested).
    memory_resource: str = "h_vmem"


# ---------------------------------------------------------------------- options

#: Slurm-style mail types (the seed's portable spelling) -> Grid Engine's -m letters.
MAIL_TYPES = {"NONE": "n", "BEGIN": "b", "END": "e", "FAIL": "a", "REQUEUE": "a", "ALL": "beas",
              "SUSPEND": "s", "ABORT": "a"}


def mail_letters(value: Any) -> str:
    """``"END,FAIL"``, ``["BEGIN", "END"]`` or Grid Engine's own ``"bea"`` -> ``-m`` letters."""
    return "".join(option_map.mail_types(SYSTEM, option_map.as_text(value), MAIL_TYPES, letters="beasn"))


def signal_lead(value: Any) -> int:
    """Seconds before the time limit that SIGUSR1 is wanted (Slurm's ``[B:]USR1[@secs]``, default 60)."""
    name, lead = option_map.parse_signal(SYSTEM, str(value))
    if name not in ("USR1", "10"):
        raise option_map.value_error("signal", SYSTEM, f"Grid Engine can only send SIGUSR1 before the time limit "
                                                       f"(through the soft limit s_rt); use 'USR1@<seconds>', "
                                                       f"not {value!r}")
    return lead


def _signal(value: str) -> list[str]:
    signal_lead(value)
    return []  # not a flag: it becomes the soft limit s_rt in the -l list (resource_requests)


OPTIONS = option_map.OptionSpec(
    system="Grid Engine",
    scheduler="sge",
    command="qsub",
    renderers={
        "partition": lambda v: ["-q", v],
        "queue": lambda v: ["-q", v],
        "account": lambda v: ["-P", v],
        "project": lambda v: ["-P", v],
        "mail_user": lambda v: ["-M", v],
        "mail_type": lambda v: ["-m", mail_letters(v)],
        "signal": _signal,
    },
    lacks={"qos": "Grid Engine has no quality of service; choose a queue (partition=) or a project (account=)"},
    reserved={
        "time": "use job(time=...); it becomes -l h_rt",
        "h_rt": "use job(time=...); it becomes -l h_rt",
        "mem": "use job(mem=...); it goes to the cluster's memory_resource",
        "h_vmem": "use job(mem=...) and the cluster's memory_resource",
        "mem_free": "use job(mem=...) and the cluster's memory_resource",
        "cpus": "use job(cpus=...); it becomes -pe <parallel_environment> <cpus>",
        "cpus_per_task": "use job(cpus=...)",
        "pe": "use job(cpus=...) and the cluster's parallel_environment",
        "array": "array tasks become job arrays by themselves (array_parallelism= gives -tc)",
    },
    reserved_flags={
        "-N": "the job name carries the submission tag",
        "-o": "logs go to <run_dir>/logs/",
        "-e": "logs go to <run_dir>/logs/",
        "-j": "logs go to <run_dir>/logs/",
        "-t": "array tasks become job arrays by themselves",
        "-tc": "use array_parallelism=",
        "-wd": "jobs run in the run directory",
        "-cwd": "jobs run in the run directory",
        "-S": "reflow's job script is a bash script",
        "-terse": "reflow sets it",
        "-sync": "the daemon follows jobs without blocking qsub",
        "-b": "reflow submits a job script",
        "-shell": "reflow submits a job script",
        "-C": "reflow's directives use the standard #$ prefix",
        "-now": "reflow's jobs are batch jobs",
        "-pe": "use job(cpus=...) and the cluster's parallel_environment",
    },
)


def validate_options(options: Mapping[str, Any]) -> None:
    """Raise OptionError for a key Grid Engine does not have, naming the accepted ones."""
    option_map.validate(OPTIONS, options)


# ---------------------------------------------------------------------- submission

_PLAIN = re.compile(r"^[A-Za-z0-9_./:,=@+%-]+$")


def directive_value(what: str, value: str) -> str:
    """A value for a ``#$`` line: bare when safe, else double-quoted (qsub's directive parser takes quotes)."""
    if _PLAIN.match(value):
        return value
    bad = next((c for c in ('"', "$", "\\", "\n", "\r", "\0", "`") if c in value), None)
    if bad is not None:
        raise OptionError(f"{what} {value!r} cannot be given to Grid Engine: it contains {bad!r} "
                          "(qsub expands $ in paths and cannot quote a double quote); choose a plainer path")
    return f'"{value}"'


def task_ids(request: SubmitRequest) -> list[int]:
    """Grid Engine task ids (1-based) of an array request."""
    assert request.indices is not None
    ids = sorted({i - request.index_offset + 1 for i in request.indices})
    if not ids:
        raise OptionError("an array needs at least one index")
    if ids[0] < 1:
        raise OptionError(f"index_offset {request.index_offset} is above the smallest index {min(request.indices)}")
    return ids


def task_range(ids: Sequence[int]) -> tuple[str, bool]:
    """``-t`` spec for sorted task ids, and whether the range is exact (no tasks in between to skip)."""
    if len(ids) == 1:
        return str(ids[0]), True
    step = ids[1] - ids[0]
    if all(b - a == step for a, b in zip(ids, ids[1:])):
        return f"{ids[0]}-{ids[-1]}:{step}", True
    return f"{ids[0]}-{ids[-1]}:1", False


def h_rt(seconds: int) -> str:
    hours, rem = divmod(int(seconds), 3600)
    return f"{hours}:{rem // 60:02d}:{rem % 60:02d}"


def resource_requests(request: SubmitRequest, settings: SGESettings) -> list[str]:
    """``-l`` items: run time, memory (per slot: Grid Engine multiplies by the slots of a $pe_slots job)."""
    items = []
    try:
        limit = parse_time(request.time)
        mem_mb = parse_mem(request.mem)
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    if limit is not None:
        items.append(f"h_rt={h_rt(limit)}")
    if settings.memory_resource != "none":
        per_slot = math.ceil(mem_mb / max(1, int(request.cpus)))
        items.append(f"{settings.memory_resource}={per_slot}M")
    signal = next((v for k, v in request.options.items() if option_map.normalise_key(k) == "signal"), None)
    if signal is not None and signal is not False:
        lead = signal_lead(signal)
        if limit is None:
            raise OptionError("submit option 'signal' needs a time limit: Grid Engine sends SIGUSR1 at the soft "
                              "limit s_rt, computed from time=")
        if lead >= limit:
            raise OptionError(f"submit option 'signal': {lead} s before the limit is not within time={request.time}")
        items.append(f"s_rt={h_rt(limit - lead)}")
    return items


def directives(request: SubmitRequest, settings: SGESettings) -> list[tuple[str, ...]]:
    """The ``#$`` lines of a job script, as (flag, value...) tuples."""
    groups, _native = option_map.render(OPTIONS, request.options)  # refuses bad options before anything else
    lines: list[tuple[str, ...]] = [
        ("-N", request.job_name),
        ("-S", "/bin/bash"),
        ("-wd", request.workdir),
        # Grid Engine's own output (before the script runs) goes into the job directory,
        # one file per task; the script sends the worker's output to <run_dir>/logs/.
        ("-o", request.job_dir.rstrip("/") + "/"),
        ("-j", "y"),
    ]
    cpus = int(request.cpus)
    if cpus > 1:
        if not settings.parallel_environment:
            raise OptionError(f"cpus={cpus} needs a parallel environment: set parallel_environment in the "
                              "cluster's [clusters.NAME] table (qconf -spl lists the site's, e.g. 'smp')")
        lines.append(("-pe", settings.parallel_environment, str(cpus)))
    resources = resource_requests(request, settings)
    if resources:
        lines.append(("-l", ",".join(resources)))
    if request.indices is not None:
        spec, _exact = task_range(task_ids(request))
        lines.append(("-t", spec))
        if request.array_parallelism:
            lines.append(("-tc", str(int(request.array_parallelism))))
    lines.extend(tuple(group) for group in groups)
    return lines


def render_script(request: SubmitRequest, settings: SGESettings) -> str:
    """The job script: ``#$`` directives, environment, log redirection, then exec the worker."""
    lines = ["#!/bin/bash"]
    for flag, *values in directives(request, settings):
        lines.append(f"#$ {flag} {' '.join(directive_value(f'qsub {flag}', v) for v in values)}")
    lines.append(f"# reflow job {request.tag}: run {request.run_id}, task {request.task}")
    lines.extend(export_lines(request))
    command = " ".join(shlex.quote(str(a)) for a in request.worker_argv)
    if request.indices is None:
        out = log_path(request.log_dir, request.task, request.tag, None, "out")
        err = log_path(request.log_dir, request.task, request.tag, None, "err")
        lines.append(f"exec >>{shlex.quote(out)} 2>>{shlex.quote(err)}")
    else:
        ids = task_ids(request)
        _spec, exact = task_range(ids)
        if not exact:
            # Tasks inside the range that are not ours (uneven indices) end at once.
            lines.append(f'case " {" ".join(map(str, ids))} " in *" $SGE_TASK_ID "*) ;; *) exit 0 ;; esac')
        # The engine's array id is index - index_offset = task id - 1.
        marker = "@@TASK@@"
        for stream, fd in (("out", ""), ("err", "2")):
            head, tail = log_path(request.log_dir, request.task, request.tag, marker, stream).split(marker)
            lines.append(f'exec {fd}>>{shlex.quote(head)}"$((SGE_TASK_ID - 1))"{shlex.quote(tail)}')
        command += f' --index "$((SGE_TASK_ID - 1 + {int(request.index_offset)}))"'
    lines.append(f"exec {command}")
    return "\n".join(lines) + "\n"


def render_qsub(request: SubmitRequest, script_path: str) -> list[str]:
    """qsub reads the directives from the script; native_args come on the command line (they win)."""
    _groups, native = option_map.render(OPTIONS, request.options)
    return ["qsub", "-terse", *native, script_path]


#: Messages meaning qsub could not reach the qmaster or was turned away for now: the job may
#: or may not exist (the engine resolves it by tag).
_TRANSIENT = (
    "unable to contact qmaster",
    "unable to send message to qmaster",
    "commlib error",
    "got send error",
    "failed receiving gdi request",
    "connection refused",
    "timed out",
    "timeout",
    "try again later",
    "jobs are allowed per user",
    "max_u_jobs",
    "max_jobs",
    "is not allowed to submit jobs",  # a submit host being re-registered
)

_JOB_ID = re.compile(r"^(\d+)(?:\.\d+-\d+:\d+)?$")
_YOUR_JOB = re.compile(r"Your job(?:-array)? (\d+)")


def parse_qsub(stdout: str, stderr: str, returncode: int) -> str:
    """The job id from ``qsub -terse`` (``123``, or ``123.1-10:1`` for an array), else SubmitError."""
    if returncode == 0:
        for line in stdout.splitlines():
            match = _JOB_ID.match(line.strip()) or _YOUR_JOB.search(line)
            if match:
                return match.group(1)
        raise SubmitError(f"qsub printed {stdout.strip()[:200]!r} instead of a job id", permanent=False)
    message = " ".join(line.strip() for line in (stderr.strip() or stdout.strip()).splitlines()
                       if line.strip() and line.strip() != "Exiting.")
    # A rejected job ("unknown queue", "project does not exist", a bad option) would be
    # rejected again: permanent.
    raise SubmitError.from_output("qsub", returncode, message, _TRANSIENT)


# ---------------------------------------------------------------------- states


def observe(state: str) -> Observation:
    """A job (or task) listed by qstat, from its state letters (qstat(1): d E h r R s S t T w q z).

    E: error, the job cannot start until ``qmod -cj``; d: being deleted; r/t: running or being
    sent to the host; s/S/T: suspended by the user, its queue, or a load threshold; h: held
    (``-h``, ``-hold_jid``, operator); R: restarted/rescheduled; q/w: waiting; z: finished.
    """
    native = state.strip()
    letters = set(native)
    if not letters or not letters <= set("dEhrRsStTwqz"):
        return Observation(Presence.UNKNOWN, native_state=native, detail=f"unknown Grid Engine state {native!r}")
    if "z" in letters:
        # Only with qstat -s z: finished, but qstat has no exit status (qacct does).
        return Observation(Presence.PRESENT, Phase.DONE, None, native, "finished (zombie)")
    running = bool(letters & set("rtsST"))
    if "E" in letters:
        return Observation(Presence.PRESENT, Phase.QUEUED, None, native,
                           f"error state {native}: Grid Engine cannot start the job (qstat -j shows why; "
                           "fix it and run qmod -cj, or cancel)")
    if "d" in letters:
        return Observation(Presence.PRESENT, Phase.RUNNING if running else Phase.QUEUED, None, native,
                           "being deleted")
    if running:
        reason = None
        if "s" in letters:
            reason = "suspended"
        elif "S" in letters:
            reason = "suspended (its queue is suspended)"
        elif "T" in letters:
            reason = "suspended (load threshold of its queue)"
        elif "R" in letters:
            reason = "restarted"
        return Observation(Presence.PRESENT, Phase.RUNNING, None, native, reason)
    reason = None
    if "h" in letters:
        reason = f"on hold ({native}: qhold, -h or a -hold_jid dependency)"
    elif "R" in letters:
        reason = f"rescheduled ({native})"
    return Observation(Presence.PRESENT, Phase.QUEUED, None, native, reason)


def expand_tasks(spec: str) -> list[int]:
    """qstat's task list: ``3``, ``3-10:1``, ``1,4-8:2`` -> task ids."""
    ids: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part)
        if not match:
            raise ValueError(f"cannot read Grid Engine task list {spec!r}")
        first = int(match.group(1))
        last = int(match.group(2) or first)
        step = int(match.group(3) or 1)
        ids.extend(range(first, last + 1, max(1, step)))
    return ids


def task_key(job_id: str, task: int | None) -> str:
    """Observation key: the job id, or ``<job>_<task - 1>`` (the engine's ``index - index_offset``)."""
    return job_id if task is None else f"{job_id}_{task - 1}"


def key_job(key: str) -> str:
    return key.split("_", 1)[0]


# ---------------------------------------------------------------------- qstat


def render_qstat() -> list[str]:
    """Every job of the calling user, pending and running, in one call."""
    return ["qstat", "-xml"]


@dataclass(frozen=True)
class ListedJob:
    job_id: str
    name: str
    state: str
    tasks: tuple[int, ...] | None  # None: not an array job


def parse_qstat_jobs(text: str) -> list[ListedJob]:
    """``qstat -xml`` (plain or ``-f``): one entry per listed job or task range."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise ValueError(f"qstat -xml printed something that is not XML ({exc})") from None
    jobs = []
    for element in root.iter("job_list"):
        job_id = (element.findtext("JB_job_number") or "").strip()
        if not job_id:
            continue
        tasks = element.findtext("tasks")
        jobs.append(ListedJob(job_id, (element.findtext("JB_name") or "").strip(),
                              (element.findtext("state") or "").strip(),
                              tuple(expand_tasks(tasks)) if tasks and tasks.strip() else None))
    return jobs


def parse_qstat(text: str) -> dict[str, Observation]:
    """Observations keyed as the engine keys them (``123``, ``123_<task-1>``)."""
    out: dict[str, Observation] = {}
    for job in parse_qstat_jobs(text):
        obs = observe(job.state)
        if job.tasks is None:
            out[job.job_id] = obs
        else:
            for task in job.tasks:
                out[task_key(job.job_id, task)] = obs
    return out


def qstat_unknown_jobs(text: str) -> list[str]:
    """``qstat -xml -j ID`` for unknown ids exits 0 and lists them under ``<unknown_jobs>``."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return []
    return [(e.text or "").strip() for e in root.iter("ST_name")] if root.tag == "unknown_jobs" else []


# ---------------------------------------------------------------------- qacct

#: accounting(5) ``failed`` codes (the shepherd's SSTATE_* and the qmaster's). Codes up to 11
#: mean the job never started; 24/25/30 mean Grid Engine will run it again.
FAILED_CODES = {
    0: "no failure",
    1: "assumedly before job",
    2: "on executing shepherd",
    3: "before writing config",
    4: "before writing PID",
    5: "on reading config file",
    6: "setting processor set",
    7: "before prolog",
    8: "in prolog",
    9: "before pestart",
    10: "in pestart",
    11: "before job",
    12: "before pestop",
    13: "in pestop",
    14: "before epilog",
    15: "in epilog",
    16: "releasing processor set",
    17: "through signal",
    18: "shepherd returned error",
    19: "before writing exit_status",
    20: "found unexpected error file",
    21: "in recognizing job",
    22: "removed manually (its host was lost)",
    23: "could not read the job's process ids",
    24: "migrating (checkpointing job)",
    25: "rescheduling",
    26: "opening input/output file",
    27: "searching requested shell",
    28: "changing into working directory",
    29: "setting up AFS credentials",
    30: "rescheduling on application error",
    36: "checking configured daemons",
    37: "qmaster enforced h_rt, h_cpu, or h_vmem limit",
    38: "setting the additional group id",
    100: "assumedly after job",
}

_RESCHEDULED = {24, 25, 30}
_NEVER_STARTED_HOST = set(range(1, 12)) | {22}
_SIGNAL_NAMES = {1: "SIGHUP", 2: "SIGINT", 6: "SIGABRT", 9: "SIGKILL", 10: "SIGUSR1", 11: "SIGSEGV",
                 12: "SIGUSR2", 15: "SIGTERM", 24: "SIGXCPU", 25: "SIGXFSZ"}


def parse_qacct(text: str) -> list[dict[str, str]]:
    """``qacct -j`` records (separated by ``=====`` lines) as key -> value (trailing blanks dropped)."""
    records: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    for line in text.splitlines():
        if line.startswith("====="):
            current = {}
            records.append(current)
            continue
        if current is None or not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        current[key] = value.strip()
    return [r for r in records if r]


def _code(text: str | None) -> int | None:
    match = re.match(r"\s*(-?\d+)", text or "")
    return int(match.group(1)) if match else None


def _seconds(text: str | None) -> float | None:
    match = re.match(r"\s*([\d.]+)s?\s*$", text or "")
    return float(match.group(1)) if match else None


def category_limits(category: str | None) -> dict[str, str]:
    """``-l h_rt=600,h_vmem=1G -pe smp 2`` (qacct's category) -> {"h_rt": "600", "h_vmem": "1G"}."""
    words = (category or "").split()
    limits: dict[str, str] = {}
    for flag, value in zip(words, words[1:]):
        if flag in ("-l", "-hard"):
            for item in value.split(","):
                key, eq, val = item.partition("=")
                if eq:
                    limits[key] = val
    return limits


def peak_text(maxvmem: str | None) -> str | None:
    """qacct's ``maxvmem`` (``379.027MB``) as a short size (``379M``); None when not measured (0)."""
    return size_text(size_bytes(maxvmem))


def record_observation(record: Mapping[str, str]) -> Observation:
    """How one accounting record says the job (or task) ended, with its host and peak memory (maxvmem)."""
    obs = _record_observation(record)
    if obs.phase is not Phase.DONE:
        return obs
    host = (record.get("hostname") or "").strip()
    return dataclasses.replace(obs, node=host or None, peak_mem=peak_text(record.get("maxvmem")))


def _record_observation(record: Mapping[str, str]) -> Observation:
    failed = _code(record.get("failed")) or 0
    exit_status = _code(record.get("exit_status"))
    exit_text = None if exit_status is None else str(exit_status)
    failed_text = FAILED_CODES.get(failed) or record.get("failed", "").partition(":")[2].strip() or "unknown"
    native = "finished" if failed == 0 else f"failed {failed}"
    if failed in _RESCHEDULED:
        return Observation(Presence.PRESENT, Phase.QUEUED, None, native,
                           f"rescheduled by Grid Engine (failed {failed}: {failed_text})", exit_text)
    if failed == 0:
        outcome = Outcome.COMPLETED if exit_status == 0 else Outcome.FAILED
        reason = None if exit_status == 0 else f"exit status {exit_status}"
        return Observation(Presence.PRESENT, Phase.DONE, outcome, native, reason, exit_text)
    limits = category_limits(record.get("category"))
    wallclock = _seconds(record.get("ru_wallclock"))
    h_rt_limit = _seconds(limits.get("h_rt"))
    maxvmem = size_bytes(record.get("maxvmem"))
    vmem_limit = size_bytes(limits.get("h_vmem"))
    slots = _code(record.get("slots")) or 1
    over_time = wallclock is not None and h_rt_limit is not None and wallclock >= h_rt_limit
    over_mem = maxvmem is not None and vmem_limit is not None and maxvmem >= 0.95 * vmem_limit * slots
    reason = f"failed {failed}: {failed_text}"
    if failed in (37, 100) and over_mem and not over_time:
        return Observation(Presence.PRESENT, Phase.DONE, Outcome.OUT_OF_MEMORY, native,
                           f"{reason} (maxvmem reached h_vmem)", exit_text)
    if failed == 37 or (failed == 100 and over_time):
        return Observation(Presence.PRESENT, Phase.DONE, Outcome.TIMEOUT, native,
                           f"{reason} (run time limit h_rt)" if over_time or h_rt_limit else reason, exit_text)
    if failed == 100:
        # Killed by a signal after it started. Grid Engine records qdel and any other kill
        # alike ("assumedly after job"); with no limit to explain it, it was cancelled.
        if exit_status is not None and exit_status > 128:
            name = _SIGNAL_NAMES.get(exit_status - 128, f"signal {exit_status - 128}")
            if exit_status - 128 in (9, 15):  # what qdel sends (SIGKILL; SIGTERM on some sites)
                return Observation(Presence.PRESENT, Phase.DONE, Outcome.CANCELLED, native,
                                   f"{reason}: killed by {name} (qdel, or a kill from outside)", exit_text)
            return Observation(Presence.PRESENT, Phase.DONE, Outcome.FAILED, native, f"{reason}: killed by {name}",
                               exit_text)
        return Observation(Presence.PRESENT, Phase.DONE, Outcome.FAILED, native, reason, exit_text)
    if failed in _NEVER_STARTED_HOST:
        return Observation(Presence.PRESENT, Phase.DONE, Outcome.NODE_FAIL, native,
                           f"{reason} (the execution host could not start the job)", exit_text)
    return Observation(Presence.PRESENT, Phase.DONE, Outcome.FAILED, native, reason, exit_text)


def parse_qacct_observations(job_id: str, text: str) -> dict[str, Observation]:
    """``qacct -j ID`` -> observation per key; for a task with several records (restarts), the last wins."""
    out: dict[str, Observation] = {}
    for record in parse_qacct(text):
        if record.get("jobnumber", job_id) != job_id:
            continue
        task = record.get("taskid", "undefined")
        key = task_key(job_id, int(task)) if task.isdigit() else job_id
        out[key] = record_observation(record)
    return out


_SECTION = "#reflow-qacct "
_RC = "#reflow-rc "


def render_qacct(names: Sequence[str]) -> list[str]:
    """One command for several ``qacct -j`` look-ups (qacct takes one job per call): a shell loop.

    Each section starts with ``#reflow-qacct <name>`` and ends with ``#reflow-rc <exit code>``.
    Names are job ids or tags, checked to be plain words before they get here.
    """
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"not a job id or tag: {name!r}")
    script = f'for j in "$@"; do echo "{_SECTION}$j"; qacct -j "$j" 2>&1; echo "{_RC}$?"; done'
    return ["sh", "-c", script, "sh", *names]


@dataclass(frozen=True)
class QacctAnswer:
    name: str
    returncode: int
    text: str

    @property
    def not_found(self) -> bool:
        """No record (yet): ``error: job id N not found`` / ``error: job name X not found``."""
        return self.returncode != 0 and bool(re.search(r"error: job (id|name) \S+ not found", self.text))

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def parse_qacct_batch(text: str) -> dict[str, QacctAnswer]:
    """Split the loop's output into one answer per name; a name without its end marker is missing."""
    out: dict[str, QacctAnswer] = {}
    name: str | None = None
    body: list[str] = []
    for line in text.splitlines():
        if line.startswith(_SECTION):
            name, body = line[len(_SECTION):].strip(), []
        elif line.startswith(_RC) and name is not None:
            rc = _code(line[len(_RC):])
            out[name] = QacctAnswer(name, rc if rc is not None else 1, "\n".join(body))
            name = None
        elif name is not None:
            body.append(line)
    return out


def accounting_problem(answer: QacctAnswer) -> str | None:
    """Why qacct cannot answer at all (no readable accounting file), or None when it works."""
    if answer.ok or answer.not_found:
        return None
    return answer.text.strip().replace("\n", " ")[:300] or f"qacct exited {answer.returncode}"


# ---------------------------------------------------------------------- tags


def tagged_jobs(listed: Iterable[ListedJob], finished: Mapping[str, str], tags: Iterable[str]) -> dict[str, list[TaggedJob]]:
    """Jobs per tag: live ones from qstat (active), finished ones from qacct text per tag (inactive)."""
    wanted = set(tags)
    found: dict[str, dict[str, bool]] = {t: {} for t in wanted}
    for job in listed:
        if job.name in wanted:
            found[job.name][job.job_id] = True
    for tag, text in finished.items():
        if tag not in wanted:
            continue
        for record in parse_qacct(text):
            if record.get("jobname") == tag and record.get("jobnumber", "").isdigit():
                found[tag].setdefault(record["jobnumber"], False)
    return {tag: [TaggedJob(job_id=j, tag=tag, active=a) for j, a in sorted(jobs.items(), key=lambda kv: int(kv[0]))]
            for tag, jobs in found.items()}


# ---------------------------------------------------------------------- cancel


def render_qdel(keys: Sequence[str]) -> list[str]:
    """``123`` -> whole job; ``123_4`` -> task 5 (``123.5``); all in one qdel."""
    words = []
    for key in keys:
        job, _, element = key.partition("_")
        if not job.isdigit() or (element and not element.isdigit()):
            raise ValueError(f"not a Grid Engine job key: {key!r}")
        words.append(job if not element else f"{job}.{int(element) + 1}")
    return ["qdel", *words]


def qdel_failed(stdout: str, stderr: str, returncode: int) -> str | None:
    """Why qdel could not reach the qmaster (the cancel must be retried), or None.

    An id that no longer exists ("denied: job ... does not exist") is not a failure to cancel.
    """
    if returncode == 0:
        return None
    text = f"{stdout}\n{stderr}".lower()
    if any(p in text for p in ("unable to contact qmaster", "unable to send message to qmaster", "commlib error",
                                "timed out", "timeout")):
        return " ".join(f"{stderr.strip()} {stdout.strip()}".split())[:300]
    return None


def qmaster_unreachable(stderr: str) -> bool:
    text = stderr.lower()
    return any(p in text for p in ("unable to contact qmaster", "unable to send message to qmaster", "commlib error"))


# ---------------------------------------------------------------------- probe


def parse_qconf_conf(text: str) -> dict[str, str]:
    """``qconf -sconf`` (``key  value`` lines; a trailing backslash continues the value)."""
    config: dict[str, str] = {}
    pending = ""
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        key, _, value = line.partition(" ")
        if key:
            config[key] = " ".join(value.split())
    return config


def max_array_size(config: Mapping[str, str], default: int = 75000) -> int:
    """Tasks per array job (``max_aj_tasks``; 0 means unlimited, capped for chunking)."""
    try:
        value = int(config.get("max_aj_tasks", default))
    except ValueError:
        return default
    return 100_000 if value <= 0 else value


def parse_version(qstat_help: str) -> str:
    """First line of ``qstat -help``: ``SGE 8.1.9``, ``UGE 8.6.0``, ``OGS/GE 2011.11``, ``AGE ...``."""
    for line in qstat_help.splitlines():
        if line.strip():
            return line.strip()
    return "unknown"


# ---------------------------------------------------------------------- limits (queue cap, escalation caps)


def queue_limit(config: Mapping[str, str]) -> int | None:
    """Jobs a user may have in the system at once: ``max_u_jobs`` (per user) and ``max_jobs`` (everyone's)
    of ``qconf -sconf``, the smaller that is set (0 means unlimited). qsub refuses a job over either
    ("job rejected: Only N jobs are allowed per user"); the scheduler's ``maxujobs`` and resource quota
    sets (``qconf -srqs``) limit only what *runs*, so they never refuse a submission."""
    limits = []
    for key in ("max_u_jobs", "max_jobs"):
        try:
            value = int(config.get(key, "0"))
        except ValueError:
            continue
        if value > 0:
            limits.append(value)
    return min(limits) if limits else None


def sge_seconds(text: str | None) -> int | None:
    """A Grid Engine TIME value (``0:0:20``, ``1:30:00``, ``3600``, ``INFINITY``) in seconds; None: unlimited."""
    value = (text or "").strip()
    if not value or value.upper() in ("INFINITY", "NONE"):
        return None
    parts = value.split(":")
    if not all(p.isdigit() for p in parts) or len(parts) > 3:
        raise ValueError(f"not a Grid Engine time: {text!r}")
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return seconds


_SGE_MEM = {"": 1, "k": 1000, "K": 1024, "m": 1000 ** 2, "M": 1024 ** 2, "g": 1000 ** 3, "G": 1024 ** 3,
            "t": 1000 ** 4, "T": 1024 ** 4}


def sge_megabytes(text: str | None) -> int | None:
    """A Grid Engine MEMORY value (``1G``, ``512M``, ``1.5g``, ``INFINITY``) in MB; None: unlimited.
    Upper-case units are powers of 1024, lower-case ones of 1000 (sge_types(1))."""
    value = (text or "").strip()
    if not value or value.upper() in ("INFINITY", "NONE"):
        return None
    match = re.fullmatch(r"([\d.]+)([kKmMgGtT]?)", value)
    if not match:
        raise ValueError(f"not a Grid Engine memory size: {text!r}")
    return int(float(match.group(1)) * _SGE_MEM[match.group(2)] // 1024 ** 2)


def parse_qconf_queues(text: str) -> dict[str, dict[str, str]]:
    """``qconf -sq Q1,Q2`` (one block per queue, each starting with ``qname``) -> queue -> settings."""
    queues: dict[str, dict[str, str]] = {}
    block: list[str] = []
    for line in [*text.splitlines(), "qname"]:
        if line.startswith("qname") and block:
            conf = parse_qconf_conf("\n".join(block))
            if conf.get("qname"):
                queues[conf["qname"]] = conf
            block = []
        block.append(line)
    return queues


def _default_value(setting: str | None) -> str | None:
    """A queue setting's cluster-wide value: ``0:0:20,[vm=1:0:0]`` -> ``0:0:20`` (host overrides in [])."""
    return None if setting is None else setting.split(",[", 1)[0].strip()


def queue_caps(queue: Mapping[str, str]) -> dict[str, str | None]:
    """The largest time and memory a job may ask for in a queue (its ``h_rt`` and ``h_vmem``), as the
    retry policy's caps (``HH:MM:SS``, ``<n>M``); None where the queue sets no limit. Host overrides
    (``[host=value]``) are not considered: the queue-wide value is what a job may count on."""
    seconds = sge_seconds(_default_value(queue.get("h_rt")))
    megabytes = sge_megabytes(_default_value(queue.get("h_vmem")))
    return {"max_time": format_time(seconds) if seconds else None, "max_mem": f"{megabytes}M" if megabytes else None}


def cap_size(cap: str) -> int:
    """A cap from :func:`queue_caps` as a number to compare (seconds, or MB)."""
    return parse_mem(cap) if cap.endswith("M") else parse_time(cap) or 0
