"""Flux: pure command builders and output parsers (no I/O).

Follows the flux-core manual pages (flux-submit(1), flux-jobs(1), flux-cancel(1)):

* submission: ``flux submit`` runs the batch script as the job's command;
  the job name carries the tag (``--job-name``); arrays are one *bulk*
  submission ``--cc=0-<n-1>`` whose jobs are named ``<tag>.{cc}`` and get
  ``FLUX_JOB_CC`` in their environment; ``flux submit`` prints one job id per
  job, in F58 (``ƒ2Zs8Fq7``) unless the site prints another encoding;
* status: one ``flux jobs -n -o <format> <ids...>`` for every tracked job
  (inactive jobs included while the instance keeps them); an id it does not
  know is reported on stderr as ``JobID <id> unknown``;
* ``flux cancel <ids...>``.

Flux job ids are 64-bit numbers that are *written* several ways (F58, with
``ƒ`` or ASCII ``f``; decimal; ``0x`` hex; dotted hex). Reflow keeps the
spelling ``flux submit`` printed and compares ids by value
(:func:`id_value`), never assuming one spelling.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reflow_client.resources import parse_time

from . import option_map
from .base import Observation, Outcome, Phase, Presence, SubmitError, SubmitRequest, TaggedJob
from .job_script import render_script

SYSTEM = option_map.system_label("Flux", "flux")

# ---------------------------------------------------------------------- job ids

_F58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_F58_VALUE = {c: i for i, c in enumerate(_F58)}


def id_value(text: str) -> int | None:
    """The numeric value of a Flux job id in any of its encodings, or None if it is not one."""
    raw = text.strip()
    if not raw:
        return None
    if raw[0] in ("ƒ", "f") and len(raw) > 1 and all(c in _F58_VALUE for c in raw[1:]):
        value = 0
        for c in raw[1:]:
            value = value * 58 + _F58_VALUE[c]
        return value
    if raw.isdigit():
        return int(raw)
    if re.fullmatch(r"0x[0-9a-fA-F]+", raw):
        return int(raw, 16)
    if re.fullmatch(r"[0-9a-fA-F]{4}(\.[0-9a-fA-F]{4}){3}", raw):
        return int(raw.replace(".", ""), 16)
    return None


def f58(value: int) -> str:
    """F58 spelling of a job id (``ƒ`` prefix), as ``flux submit`` prints it by default."""
    digits = ""
    while True:
        value, rem = divmod(value, 58)
        digits = _F58[rem] + digits
        if value == 0:
            return "ƒ" + digits


# ---------------------------------------------------------------------- options


def _signal(value: str) -> list[str]:
    """Slurm-style ``[B:]USR1@90`` (seconds) -> ``--signal=USR1@90s`` (Flux standard duration)."""
    name, seconds = option_map.parse_signal(SYSTEM, value)
    return [f"--signal={name}@{seconds}s"]


OPTIONS = option_map.OptionSpec(
    system="Flux",
    scheduler="flux",
    command="flux submit",
    renderers={
        "queue": lambda v: [f"--queue={v}"],
        "partition": lambda v: [f"--queue={v}"],
        "account": lambda v: [f"--setattr=system.bank={v}"],
        "bank": lambda v: [f"--setattr=system.bank={v}"],
        "signal": _signal,
    },
    lacks={
        "qos": "Flux has no quality of service; choose a queue (partition=) or a bank (account=)",
        "mail_user": "flux submit sends no mail",
        "mail_type": "flux submit sends no mail",
    },
    reserved={
        "cc": "array tasks become bulk submissions by themselves",
        "time_limit": "use job(time=...)",
        "cores_per_task": "use job(cpus=...)",
    },
    reserved_flags={
        "--job-name": "the job name carries the submission tag",
        "--cc": "array tasks become bulk submissions by themselves",
        "--bcc": "array tasks become bulk submissions by themselves",
        "--output": "logs go to <run_dir>/logs/",
        "--error": "logs go to <run_dir>/logs/",
    },
)


def validate_options(options: Mapping[str, Any]) -> None:
    option_map.validate(OPTIONS, options)


# ---------------------------------------------------------------------- submission


def element_name(tag: str, position: int | str) -> str:
    return f"{tag}.{position}"


def render_job_script(request: SubmitRequest) -> str:
    position = "FLUX_JOB_CC" if request.indices is not None else None
    return render_script(request, [], position)


def render_submit(request: SubmitRequest, script_path: str) -> list[str]:
    """``flux submit`` of the script (``--cc`` for an array; ``{cc}`` is replaced per job)."""
    argv = ["flux", "submit", f"--cwd={request.workdir}", "--ntasks=1", f"--cores-per-task={int(request.cpus)}"]
    seconds = parse_time(request.time)
    if seconds is not None:
        argv.append(f"--time-limit={seconds}s")
    if request.indices is None:
        argv += [f"--job-name={request.job_name}", f"--output={request.job_dir}/flux.out"]
    else:
        n = len(set(request.indices))
        argv += [f"--cc=0-{n - 1}" if n > 1 else "--cc=0", f"--job-name={element_name(request.job_name, '{cc}')}",
                 f"--output={request.job_dir}/flux.{{cc}}.out"]
    groups, native = option_map.render(OPTIONS, request.options)
    for group in groups:
        argv += group
    argv += native
    argv += ["/bin/bash", script_path]
    return argv


_TRANSIENT = (
    "unable to connect",
    "connection refused",
    "timed out",
    "timeout",
    "temporarily unavailable",
    "try again",
    "broker",
    "no such file or directory",
)


def parse_submit(stdout: str, stderr: str, returncode: int, expected: int) -> list[str]:
    """The job ids ``flux submit`` printed (one per line), or SubmitError.

    Fewer ids than jobs asked for means part of a bulk submission failed: the
    jobs that exist will be found by their names (the caller treats this as an
    unknown outcome, never as "nothing submitted").
    """
    ids = [line.strip() for line in stdout.splitlines() if id_value(line.strip()) is not None]
    message = " ".join(line.strip() for line in stderr.strip().splitlines() if line.strip())
    if returncode == 0 and len(ids) == expected:
        return ids
    if ids:
        raise SubmitError(f"flux submit created {len(ids)} of {expected} jobs: {message or 'no message'}",
                          permanent=False)
    raise SubmitError.from_output("flux submit", returncode, message, _TRANSIENT)


# ---------------------------------------------------------------------- states

JOBS_FORMAT = "{id}|{state}|{result}|{returncode}|{urgency}|{exception.type}|{name}|{exception.note}"


@dataclass(frozen=True)
class FluxJob:
    """One line of ``flux jobs -o JOBS_FORMAT``."""

    value: int
    state: str
    result: str
    returncode: str
    urgency: str
    exception_type: str
    name: str
    note: str


def parse_jobs(stdout: str) -> list[FluxJob]:
    jobs = []
    for line in stdout.splitlines():
        parts = line.split("|", 7)
        if len(parts) < 8:
            continue
        value = id_value(parts[0])
        if value is None:
            continue
        jobs.append(FluxJob(value, *(p.strip() for p in parts[1:7]), parts[7].strip()))
    return jobs


_UNKNOWN = re.compile(r"JobID (\S+) unknown")


def jobs_errors(stderr: str) -> tuple[set[int], list[str]]:
    """(values of ids flux jobs does not know, other error lines)."""
    unknown: set[int] = set()
    other: list[str] = []
    for line in stderr.splitlines():
        text = line.strip()
        if not text:
            continue
        match = _UNKNOWN.search(text)
        value = id_value(match.group(1)) if match else None
        if value is not None:
            unknown.add(value)
        else:
            other.append(text)
    return unknown, other


_PENDING = {"NEW": None, "DEPEND": "waiting for dependencies", "PRIORITY": "waiting for priority",
            "SCHED": None}
_ACTIVE = {"RUN": None, "CLEANUP": "cleaning up"}


def observe(job: FluxJob) -> Observation:
    """RFC 21 states; ``result`` and the exception tell how an INACTIVE job ended."""
    state = job.state.upper()
    code = job.returncode or None
    if state in _PENDING:
        reason = "held (urgency 0)" if job.urgency == "0" else _PENDING[state]
        return Observation(Presence.PRESENT, Phase.QUEUED, None, state, reason, None)
    if state in _ACTIVE:
        return Observation(Presence.PRESENT, Phase.RUNNING, None, state, _ACTIVE[state], code)
    if state == "INACTIVE":
        outcome = result_outcome(job.result, job.exception_type)
        reason = " ".join(p for p in (job.exception_type and f"{job.exception_type}:", job.note) if p) or None
        if outcome is Outcome.FAILED and not reason and code:
            reason = f"exit code {code}"
        return Observation(Presence.PRESENT, Phase.DONE, outcome, f"INACTIVE {job.result}".strip(), reason, code)
    return Observation(Presence.UNKNOWN, native_state=job.state, detail=f"unknown Flux job state {job.state!r}")


def result_outcome(result: str, exception_type: str = "") -> Outcome:
    kind = exception_type.lower()
    if "oom" in kind:
        return Outcome.OUT_OF_MEMORY
    if "node" in kind or kind in ("exec", "alloc", "start"):
        return Outcome.NODE_FAIL if "node" in kind else Outcome.FAILED
    return {"COMPLETED": Outcome.COMPLETED, "CANCELED": Outcome.CANCELLED, "CANCELLED": Outcome.CANCELLED,
            "TIMEOUT": Outcome.TIMEOUT}.get(result.upper(), Outcome.FAILED)


# ---------------------------------------------------------------------- queries


def render_jobs(job_ids: Sequence[str]) -> list[str]:
    return ["flux", "jobs", "-n", "-o", JOBS_FORMAT, *job_ids]


def render_jobs_all(count: int = 100000) -> list[str]:
    """Every job of this user the instance still lists, finished ones included (tag look-ups)."""
    return ["flux", "jobs", "-a", "-n", f"--count={count}", "-o", JOBS_FORMAT]


def tag_of(name: str) -> tuple[str, int | None]:
    """``rfabc`` -> (rfabc, None); ``rfabc.7`` -> (rfabc, 7)."""
    head, sep, tail = name.rpartition(".")
    if sep and tail.isdigit():
        return head, int(tail)
    return name, None


def tagged_jobs(jobs: Iterable[FluxJob], tags: Iterable[str], spell: Mapping[int, str] | None = None
                ) -> dict[str, list[TaggedJob]]:
    """Submissions carrying each tag: a singleton's id, or for a bulk submission its lowest id."""
    wanted = set(tags)
    groups: dict[str, list[FluxJob]] = {}
    for job in jobs:
        tag, _position = tag_of(job.name)
        if tag in wanted:
            groups.setdefault(tag, []).append(job)
    out: dict[str, list[TaggedJob]] = {t: [] for t in wanted}
    for tag, members in groups.items():
        first = min(members, key=lambda j: j.value)
        active = any(j.state.upper() != "INACTIVE" for j in members)
        out[tag].append(TaggedJob(job_id=(spell or {}).get(first.value, f58(first.value)), tag=tag, active=active))
    return out


def render_cancel(job_ids: Sequence[str]) -> list[str]:
    return ["flux", "cancel", *job_ids]


def parse_version(text: str) -> str | None:
    """``flux version``: ``commands:  0.61.2`` -> ``0.61.2``."""
    match = re.search(r"commands:\s*(\S+)", text)
    return match.group(1) if match else None
