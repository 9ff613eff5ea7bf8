"""Slurm: pure command builders and output parsers (no I/O).

Everything here is a function of its arguments so it can be tested against
recorded outputs of real ``sbatch``/``squeue``/``sacct``/``scontrol`` runs
(``tests/data/slurm/``). The async layer (``slurm.py``) only runs these argv
lists through a transport.
"""

from __future__ import annotations

import dataclasses

import re
import shlex
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from reflow_client.resources import format_time, parse_time

from . import option_map
from .base import (
    Answers,
    JobAnswer,
    Observation,
    Outcome,
    Phase,
    Presence,
    SubmitError,
    SubmitRequest,
    TaggedJob,
    command_chunks,
    compress_indices,
    log_path,
    size_bytes,
    size_text,
)
from .job_script import export_lines

# ---------------------------------------------------------------------- options

#: sbatch long options (Slurm 22.05, ``sbatch --help`` and the man page) a task may set.
SBATCH_OPTIONS = frozenset(
    """
    account acctg-freq batch bb bbf begin cluster-constraint clusters comment constraint container contiguous
    core-spec cores-per-socket cpu-freq cpus-per-gpu deadline delay-boot dependency distribution exclude
    exclusive export export-file extra-node-info get-user-env gpu-bind gpu-freq gpus gpus-per-node
    gpus-per-socket gpus-per-task gres gres-flags hint hold ignore-pbs kill-on-invalid-dep licenses mail-type
    mail-user mcs-label mem-bind mem-per-cpu mem-per-gpu mincpus network nice no-kill no-requeue nodefile
    nodelist nodes ntasks ntasks-per-core ntasks-per-gpu ntasks-per-node ntasks-per-socket open-mode
    overcommit oversubscribe partition power priority profile propagate qos reboot requeue reservation signal
    sockets-per-node spread-job switches thread-spec threads-per-core time-min tmp use-min-nodes wckey
    """.split()
)

#: Options reflow sets itself, with what to do instead.
RESERVED_OPTIONS = {
    "job-name": "reflow names jobs after their submission tag",
    "output": "reflow writes logs to <run_dir>/logs/",
    "error": "reflow writes logs to <run_dir>/logs/",
    "array": "array tasks become job arrays by themselves (use array_parallelism= for the %limit)",
    "parsable": "reflow sets it",
    "chdir": "jobs run in the run directory",
    "wrap": "reflow writes the job script",
    "cpus-per-task": "use job(cpus=...)",
    "cpus": "use job(cpus=...)",
    "time": "use job(time=...)",
    "mem": "use job(mem=...)",
    "input": "jobs read no standard input",
    "wait": "the daemon follows jobs without blocking sbatch",
    "test-only": "not a submission",
    "uid": "jobs run as you",
    "gid": "jobs run as you",
    "quiet": "reflow needs sbatch's output",
    "verbose": "reflow needs sbatch's output",
    "usage": "not a submission",
    "help": "not a submission",
    "version": "not a submission",
}


SYSTEM = option_map.system_label("Slurm", "slurm")

#: What a Slurm cluster accepts, as the refusal of any other key says.
ACCEPTED = (f"the portable keys ({', '.join(sorted(option_map.PORTABLE_OPTIONS))}), {option_map.NATIVE_OPTION} "
            "and every other sbatch long option (sbatch --help), written with _ or -")

#: sbatch flags reflow sets itself (refused inside native_args), long and short.
RESERVED_FLAGS = {**{f"--{flag}": why for flag, why in RESERVED_OPTIONS.items()},
                  "-J": RESERVED_OPTIONS["job-name"], "-o": RESERVED_OPTIONS["output"], "-e": RESERVED_OPTIONS["error"],
                  "-a": RESERVED_OPTIONS["array"], "-D": RESERVED_OPTIONS["chdir"], "-c": RESERVED_OPTIONS["cpus"],
                  "-t": RESERVED_OPTIONS["time"], "-W": RESERVED_OPTIONS["wait"]}


def option_flag(key: str) -> str:
    return key.strip().lstrip("-").replace("_", "-").lower()


def validate_options(options: Mapping[str, Any]) -> None:
    """Raise OptionError for an option sbatch does not know or reflow sets itself."""
    for key, value in options.items():
        flag = option_flag(key)
        if flag == option_map.NATIVE_OPTION.replace("_", "-"):
            if value is not None:
                option_map.native_words(SYSTEM, value, command="sbatch", reserved_flags=RESERVED_FLAGS)
            continue
        if flag in RESERVED_OPTIONS:
            raise option_map.reserved_refusal(key, SYSTEM, RESERVED_OPTIONS[flag])
        if flag not in SBATCH_OPTIONS:
            raise option_map.refusal(key, SYSTEM, ACCEPTED, why=f"sbatch has no option --{flag}",
                                     close=[o.replace("-", "_") for o in SBATCH_OPTIONS])
        if value is not None and value is not False:
            option_map.check_value(key, SYSTEM, value, flags=True)


def render_options(options: Mapping[str, Any]) -> list[str]:
    """``{"partition": "gpu", "exclusive": True, "gres": ["gpu:1", "tmp:10G"]}`` -> sbatch arguments.

    native_args words come last, as given.
    """
    args = []
    native: list[str] = []
    for key in sorted(options):
        value = options[key]
        flag = option_flag(key)
        if value is None or value is False:
            continue
        if flag == option_map.NATIVE_OPTION.replace("_", "-"):
            native.extend(option_map.native_words(SYSTEM, value, command="sbatch", reserved_flags=RESERVED_FLAGS))
        elif value is True:
            args.append(f"--{flag}")
        elif isinstance(value, (list, tuple)):
            args.append(f"--{flag}={','.join(str(v) for v in value)}")
        else:
            args.append(f"--{flag}={value}")
    return args + native


# ---------------------------------------------------------------------- submission


def array_spec(request: SubmitRequest) -> str:
    assert request.indices is not None
    spec = compress_indices(i - request.index_offset for i in request.indices)
    if request.array_parallelism:
        spec += f"%{request.array_parallelism}"
    return spec


def render_script(request: SubmitRequest) -> str:
    """The batch script: environment, then exec the worker (every word shell-quoted)."""
    lines = ["#!/bin/bash", f"# reflow job {request.tag}: run {request.run_id}, task {request.task}",
             *export_lines(request)]
    command = " ".join(shlex.quote(str(a)) for a in request.worker_argv)
    if request.indices is not None:
        command += f' --index "$((SLURM_ARRAY_TASK_ID + {int(request.index_offset)}))"'
    lines.append(f"exec {command}")
    return "\n".join(lines) + "\n"


def render_sbatch(request: SubmitRequest, script_path: str) -> list[str]:
    array_id = "%a" if request.indices is not None else None
    argv = [
        "sbatch",
        "--parsable",
        f"--job-name={request.job_name}",
        f"--chdir={request.workdir}",
        f"--output={log_path(request.log_dir, request.task, request.tag, array_id, 'out')}",
        f"--error={log_path(request.log_dir, request.task, request.tag, array_id, 'err')}",
        f"--cpus-per-task={int(request.cpus)}",
        f"--time={request.time}",
        f"--mem={request.mem}",
    ]
    if request.indices is not None:
        argv.append(f"--array={array_spec(request)}")
    argv.extend(render_options(request.options))
    argv.append(script_path)
    return argv


#: Messages meaning the controller did not answer: the job may or may not exist (resolve by tag).
_TRANSIENT = (
    "socket timed out",
    "unable to contact slurm controller",
    "connection refused",
    "temporarily unavailable",
    "try again",
    "slurmctld is busy",
    "submit limit",
    "communication connection failure",
    "zero bytes were transmitted",
)


def parse_sbatch(stdout: str, stderr: str, returncode: int) -> str:
    """The job id from ``sbatch --parsable`` (``123`` or ``123;cluster``), or SubmitError."""
    first = stdout.strip().splitlines()[0].strip() if stdout.strip() else ""
    if returncode == 0 and first:
        job_id = first.split(";", 1)[0]
        if job_id.isdigit():
            return job_id
        raise SubmitError(f"sbatch printed {first!r} instead of a job id", permanent=False)
    message = " ".join(line.strip() for line in (stderr.strip() or stdout.strip()).splitlines() if line.strip())
    # Everything else ("Invalid account", "invalid partition", a bad option, ...) is a refusal:
    # the same request would be refused again, and a retry loop helps nobody.
    raise SubmitError.from_output("sbatch", returncode, message, _TRANSIENT)


# ---------------------------------------------------------------------- states

_QUEUED = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "PD", "CF", "RQ",
           "RH", "RF", "RD"}
_RUNNING = {"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING", "R", "CG", "S",
            "ST", "SI", "SO", "RS"}
_DONE = {
    "COMPLETED": Outcome.COMPLETED,
    "CD": Outcome.COMPLETED,
    "FAILED": Outcome.FAILED,
    "F": Outcome.FAILED,
    "SPECIAL_EXIT": Outcome.FAILED,
    "SE": Outcome.FAILED,
    "TIMEOUT": Outcome.TIMEOUT,
    "TO": Outcome.TIMEOUT,
    "DEADLINE": Outcome.DEADLINE,
    "DL": Outcome.DEADLINE,
    "OUT_OF_MEMORY": Outcome.OUT_OF_MEMORY,
    "OOM": Outcome.OUT_OF_MEMORY,
    "NODE_FAIL": Outcome.NODE_FAIL,
    "NF": Outcome.NODE_FAIL,
    "PREEMPTED": Outcome.PREEMPTED,
    "PR": Outcome.PREEMPTED,
    "BOOT_FAIL": Outcome.BOOT_FAIL,
    "BF": Outcome.BOOT_FAIL,
    "CANCELLED": Outcome.CANCELLED,
    "CA": Outcome.CANCELLED,
    "REVOKED": Outcome.CANCELLED,
    "RV": Outcome.CANCELLED,
}


def observe(state: str, reason: str | None = None, exit_code: str | None = None) -> Observation:
    """A present job's observation from Slurm's state text (``CANCELLED by 1000`` included)."""
    native = state.strip()
    base = native.split()[0].rstrip("+").upper() if native else ""
    reason = None if reason in (None, "", "None", "(null)") else reason
    if base in _QUEUED:
        return Observation(Presence.PRESENT, Phase.QUEUED, None, native, reason, exit_code)
    if base in _RUNNING:
        return Observation(Presence.PRESENT, Phase.RUNNING, None, native, reason or (
            "suspended" if base in ("SUSPENDED", "S", "STOPPED", "ST") else None), exit_code)
    if base in _DONE:
        if base in ("CANCELLED", "CA") and " by " in native and not reason:
            reason = native
        return Observation(Presence.PRESENT, Phase.DONE, _DONE[base], native, reason, exit_code)
    return Observation(Presence.UNKNOWN, native_state=native, detail=f"unknown Slurm state {native!r}")


def expand_job_key(raw: str) -> list[str]:
    """``123``, ``123_4``, ``123_[1-3,7%2]`` -> observation keys (``123_1``, ...)."""
    raw = raw.strip()
    match = re.fullmatch(r"(\d+)_\[([0-9,\-]+)(?:%\d+)?\]", raw)
    if not match:
        return [raw]
    master, spec = match.groups()
    keys = []
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            keys.extend(f"{master}_{i}" for i in range(int(lo), int(hi) + 1))
        elif part:
            keys.append(f"{master}_{part}")
    return keys


def master_id(key: str) -> str:
    return key.split("_", 1)[0].split(".", 1)[0]


def job_spans(raw: str) -> tuple[str, list[tuple[int, int]]] | None:
    """``123_[1-3,7%2]`` -> ``("123", [(1, 3), (7, 7)])``; None for a plain job or one element."""
    match = re.fullmatch(r"(\d+)_\[([0-9,\-]+)(?:%\d+)?\]", raw.strip())
    if not match:
        return None
    master, spec = match.groups()
    spans = []
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            spans.append((int(lo), int(hi)))
        elif part:
            spans.append((int(part), int(part)))
    return master, spans


def answers_from(lines: Iterable[tuple[str, Observation]]) -> Answers:
    """Observations by raw key (as squeue/sacct print them) -> job by job, an array's collapsed
    line (``123_[0-999]``) kept as one span: a poll costs time per line, not per element."""
    elements: dict[str, dict[str, Observation]] = {}
    spans: dict[str, list[tuple[int, int, Observation]]] = {}
    for raw, obs in lines:
        collapsed = job_spans(raw)
        if collapsed is not None:
            master, pairs = collapsed
            spans.setdefault(master, []).extend((lo, hi, obs) for lo, hi in pairs)
            elements.setdefault(master, {})
            continue
        key = raw.strip()
        elements.setdefault(master_id(key), {})[key] = obs
    return Answers({job: JobAnswer(found, tuple(spans.get(job, ()))) for job, found in elements.items()})


# ---------------------------------------------------------------------- squeue

SQUEUE_FORMAT = "%i|%T|%r|%j"


def render_squeue(job_ids: Sequence[str], *, expand: bool = True) -> list[str]:
    """``expand=False`` leaves a pending array collapsed (one line, ``123_[0-999]``): see ``answers_from``."""
    return ["squeue", "-h", *(["-r"] if expand else []), "-t", "all", "-j", ",".join(job_ids), "-o", SQUEUE_FORMAT]


def _squeue_lines(stdout: str) -> Iterator[tuple[str, Observation]]:
    for line in stdout.splitlines():
        if not line.strip():
            continue
        parts = line.split("|", 3)
        if len(parts) < 3:
            continue
        yield parts[0], observe(parts[1], parts[2])


def parse_squeue(stdout: str) -> dict[str, Observation]:
    return {k: obs for key, obs in _squeue_lines(stdout) for k in expand_job_key(key)}


def parse_squeue_answers(stdout: str) -> Answers:
    return answers_from(_squeue_lines(stdout))


def squeue_all_absent(stderr: str, returncode: int) -> bool:
    """squeue exits 1 with 'Invalid job id specified' when none of the ids is known: all absent."""
    return returncode != 0 and "invalid job id specified" in stderr.lower()


# ---------------------------------------------------------------------- sacct

SACCT_FIELDS = "JobID,JobName,State,ExitCode,Reason,NodeList"


def render_sacct(job_ids: Sequence[str]) -> list[str]:
    return ["sacct", "-X", "-n", "-P", "-o", SACCT_FIELDS, "-j", ",".join(job_ids)]


def _sacct_lines(stdout: str) -> Iterator[tuple[str, Observation]]:
    for line in stdout.splitlines():
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) < 4:
            continue
        key, _name, state, exit_code = parts[:4]
        reason = parts[4] if len(parts) > 4 else None
        node = parts[5].strip() if len(parts) > 5 and parts[5].strip() not in ("", "None assigned") else None
        if "." in key:  # a step (batch, extern): -X should have left them out
            continue
        obs = observe(state, reason, exit_code)
        yield key, dataclasses.replace(obs, node=node) if node and obs.phase is Phase.DONE else obs


def parse_sacct(stdout: str) -> dict[str, Observation]:
    return {k: obs for key, obs in _sacct_lines(stdout) for k in expand_job_key(key)}


def parse_sacct_answers(stdout: str) -> Answers:
    return answers_from(_sacct_lines(stdout))


def out_of_memory_jobs(stdout: str) -> list[str]:
    """The jobs (``42_3``, ``43``) an ``sacct -X`` answer says ran out of memory: their peak is asked for apart."""
    if "OUT_OF_ME" not in stdout and "|OOM" not in stdout:  # the common case costs one scan in C
        return []
    return [key for key, obs in _sacct_lines(stdout) if obs.outcome is Outcome.OUT_OF_MEMORY and job_spans(key) is None]


def render_sacct_peaks(job_ids: Sequence[str]) -> list[str]:
    """Every step's MaxRSS (the allocation line of ``-X`` has none: Slurm measures memory per step)."""
    return ["sacct", "-n", "-P", "-o", "JobID,MaxRSS", "-j", ",".join(job_ids)]


def parse_peaks(stdout: str) -> dict[str, str]:
    """``42_3.batch|2097152K`` lines -> {"42_3": "2048M"}: the largest MaxRSS of any of a job's steps."""
    largest: dict[str, float] = {}
    for line in stdout.splitlines():
        key, sep, rss = line.strip().partition("|")
        value = size_bytes(rss) if sep else None
        if value:
            job = key.split(".", 1)[0]
            largest[job] = max(largest.get(job, 0.0), value)
    return {job: text for job, value in largest.items() if (text := size_text(value))}


def with_peaks(answers: Answers, peaks: Mapping[str, str]) -> Answers:
    """*answers* with each listed job's peak memory in its observation (the cause shows it)."""
    for key, peak in peaks.items():
        answer = answers.jobs.get(master_id(key))
        obs = answer.elements.get(key) if answer is not None else None
        if answer is not None and obs is not None:
            elements = {**answer.elements, key: dataclasses.replace(obs, peak_mem=peak)}
            answers.jobs[master_id(key)] = JobAnswer(elements, answer.spans)
    return answers


# ---------------------------------------------------------------------- tags


def render_squeue_names(tags: Sequence[str]) -> list[str]:
    return ["squeue", "-h", "-r", "-t", "all", f"--name={','.join(tags)}", "-o", SQUEUE_FORMAT]


def render_sacct_names(tags: Sequence[str], since: str = "now-7days") -> list[str]:
    return ["sacct", "-X", "-n", "-P", "-o", SACCT_FIELDS, "-S", since, f"--name={','.join(tags)}"]


def tagged_jobs(observations_text: str, fields_by: str, tags: Iterable[str]) -> dict[str, list[TaggedJob]]:
    """Group squeue/sacct lines by job name (= tag); one TaggedJob per master job id."""
    wanted = set(tags)
    found: dict[str, dict[str, bool]] = {t: {} for t in wanted}
    for line in observations_text.splitlines():
        parts = line.split("|")
        if fields_by == "squeue" and len(parts) >= 4:
            key, state, name = parts[0], parts[1], parts[3]
        elif fields_by == "sacct" and len(parts) >= 3:
            key, name, state = parts[0], parts[1], parts[2]
        else:
            continue
        if name not in wanted:
            continue
        obs = observe(state)
        active = obs.phase is not Phase.DONE
        master = master_id(key)
        found[name][master] = found[name].get(master, False) or active
    return {tag: [TaggedJob(job_id=j, tag=tag, active=a) for j, a in sorted(jobs.items())]
            for tag, jobs in found.items()}


# ---------------------------------------------------------------------- scontrol


def parse_scontrol_show_config(text: str) -> dict[str, str]:
    config: dict[str, str] = {}
    for line in text.splitlines():
        if "=" not in line:
            continue
        key, _, value = line.partition("=")
        if key.strip() and " " not in key.strip():
            config[key.strip()] = value.strip()
    return config


def max_array_size(config: Mapping[str, str], default: int = 1001) -> int:
    try:
        return int(config.get("MaxArraySize", default))
    except ValueError:
        return default


def fold_keys(keys: Iterable[str]) -> list[str]:
    """Job keys as ``scancel`` takes them, each array's tasks folded into ranges (``123_4 123_5 123_6 124`` ->
    ``124 123_[4-6]``); a job cancelled whole takes its tasks with it. A range list longer than
    ``COMMAND_CHARS`` is cut into several keys of the same job."""
    whole: dict[str, None] = {}
    tasks: dict[str, set[int]] = {}
    for key in keys:
        job, sep, task = key.partition("_")
        if sep and task.isdigit():
            tasks.setdefault(job, set()).add(int(task))
        else:
            whole[key] = None
    out = list(whole)
    for job, found in tasks.items():
        if job in whole:
            continue
        if len(found) == 1:
            out.append(f"{job}_{next(iter(found))}")
            continue
        spans = compress_indices(found).split(",")
        out.extend(f"{job}_[{','.join(piece)}]" for piece in command_chunks(spans))
    return out


def render_scancel(keys: Sequence[str]) -> list[list[str]]:
    """The ``scancel`` commands for *keys* (folded by :func:`fold_keys`), each within ``COMMAND_CHARS``."""
    return [["scancel", *chunk] for chunk in command_chunks(fold_keys(keys))]


# ---------------------------------------------------------------------- per-user queue limits (sacctmgr)

ASSOC_FIELDS = "User,MaxSubmit,GrpSubmit,QOS"
QOS_FIELDS = "Name,MaxSubmitPU,GrpSubmit"


def render_assoc_limits(user: str) -> list[str]:
    return ["sacctmgr", "-n", "-P", "show", "assoc", "where", f"user={user}", "format=" + ASSOC_FIELDS]


def render_qos_limits() -> list[str]:
    return ["sacctmgr", "-n", "-P", "show", "qos", "format=" + QOS_FIELDS]


def _limit(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def parse_queue_limit(assoc_out: str, qos_out: str) -> int | None:
    """The fewest jobs (array elements count one each) the user may have queued: the smallest of the
    association's MaxSubmit/GrpSubmit and the MaxSubmitPU/GrpSubmit of every QOS the association may use
    (conservative: reflow does not know which QOS a site's submit filter picks). None: no limit found."""
    limits: list[int] = []
    qos_names: set[str] = set()
    for line in assoc_out.splitlines():
        parts = line.split("|")
        if len(parts) < 4:
            continue
        limits.extend(v for v in (_limit(parts[1]), _limit(parts[2])) if v)
        qos_names.update(q.strip() for q in parts[3].split(",") if q.strip())
    for line in qos_out.splitlines():
        parts = line.split("|")
        if len(parts) < 3 or parts[0].strip() not in qos_names:
            continue
        limits.extend(v for v in (_limit(parts[1]), _limit(parts[2])) if v)
    return min(limits) if limits else None


# ---------------------------------------------------------------------- partition limits (escalation caps)


def render_partitions() -> list[str]:
    return ["scontrol", "show", "partition", "--oneliner"]


def render_node_memory() -> list[str]:
    """One line per node and partition: ``node|partition|RealMemory (MB)`` (the default partition ends in ``*``)."""
    return ["sinfo", "-h", "-N", "-o", "%N|%P|%m"]


def _words(line: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for word in line.split():
        key, sep, value = word.partition("=")
        if sep:
            out[key] = value
    return out


def _time_cap(text: str | None) -> str | None:
    if not text or text.upper() in ("UNLIMITED", "INFINITE", "NONE"):
        return None
    try:
        seconds = parse_time(text)
    except ValueError:
        return None
    return format_time(seconds) if seconds else None


def _mb(text: str | None) -> int | None:
    text = (text or "").strip().rstrip("+")
    return int(text) if text.isdigit() and int(text) > 0 else None


def parse_partition_slots(partitions_out: str) -> dict[str, int]:
    """How many one-CPU jobs each partition that is up runs at once: its ``TotalCPUs``, times N for
    ``OverSubscribe=FORCE:N`` (every job shares a CPU with up to N-1 others; ``YES:N`` only for jobs that
    ask, which reflow's do not). What packing spreads a fan-out over so that no slot stays idle."""
    out: dict[str, int] = {}
    for line in partitions_out.splitlines():
        fields = _words(line)
        name, cpus = fields.get("PartitionName"), fields.get("TotalCPUs", "")
        if not name or not cpus.isdigit() or int(cpus) < 1 or fields.get("State", "UP") != "UP":
            continue
        share = re.fullmatch(r"FORCE:(\d+)", fields.get("OverSubscribe", ""))
        out[name] = int(cpus) * (max(1, int(share.group(1))) if share else 1)
    return out


def parse_partition_limits(partitions_out: str, nodes_out: str = "") -> tuple[dict[str, dict[str, str | None]], str | None]:
    """Each partition's largest time (``MaxTime``) and memory per job (``MaxMemPerNode``, else its largest
    node's RealMemory: more is never granted), and the default partition. None where there is no limit."""
    node_mem: dict[str, int] = {}
    default = None
    for line in nodes_out.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 3:
            continue
        name = parts[1].strip()
        if name.endswith("*"):
            name = name[:-1]
            default = default or name
        mb = _mb(parts[2])
        if name and mb:
            node_mem[name] = max(node_mem.get(name, 0), mb)
    limits: dict[str, dict[str, str | None]] = {}
    for line in partitions_out.splitlines():
        fields = _words(line)
        name = fields.get("PartitionName")
        if not name:
            continue
        if fields.get("Default") == "YES":
            default = name
        caps = [mb for mb in (_mb(fields.get("MaxMemPerNode")), node_mem.get(name)) if mb]
        limits[name] = {"max_time": _time_cap(fields.get("MaxTime")), "max_mem": f"{min(caps)}M" if caps else None}
    return limits, default


# ---------------------------------------------------------------------- Slurm-side dependencies


def dependency_options(job_ids: Iterable[str], kind: str = "afterok") -> dict[str, str]:
    """sbatch options making a job wait in the queue for *job_ids* (``afterok``: every one of them, every
    array task, ended well; ``aftercorr``: the array task of the same id did) and die if that can never
    happen (``--kill-on-invalid-dep=yes``: an upstream failed), never run on a failed upstream."""
    if kind not in ("afterok", "aftercorr"):
        raise ValueError(f"unsupported dependency kind {kind!r} (afterok or aftercorr)")
    ids = sorted({master_id(str(j)) for j in job_ids}, key=lambda j: (len(j), j))
    if not ids or not all(j.isdigit() for j in ids):
        raise ValueError(f"a dependency needs Slurm job ids, not {ids!r}")
    return {"dependency": f"{kind}:{':'.join(ids)}", "kill-on-invalid-dep": "yes"}
