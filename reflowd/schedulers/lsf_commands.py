"""IBM Spectrum LSF: pure command builders and output parsers (no I/O).

Follows the LSF Command Reference (``bsub``, ``bjobs``, ``bhist``, ``bkill``):

* submission: the script goes to ``bsub`` on standard input so its ``#BSUB``
  directives are read; the job is named after its submission tag (``-J``);
  arrays are ``-J "<tag>[1-n]%k"`` with ``LSB_JOBINDEX`` (1-based);
  memory numbers are in the site's ``LSF_UNIT_FOR_LIMITS`` (KB unless the site
  says otherwise); ``-W`` takes minutes;
* status: one ``bjobs -a -o "<fields>" -json <ids>`` for every tracked job,
  finished ones included while mbatchd keeps them (``CLEAN_PERIOD``);
  ``bhist -l`` only for jobs ``bjobs`` no longer knows;
* ``bkill <id>`` / ``bkill "<id>[<i>]"``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from reflow_client.resources import mem_in_unit, minutes_ceil, parse_time

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
    compress_indices,
    size_bytes,
    size_text,
)
from .job_script import ArrayLayout, directive_word, render_script

SYSTEM = option_map.system_label("IBM Spectrum LSF", "lsf")

# ---------------------------------------------------------------------- options

#: ``-B`` mails at dispatch, ``-N`` sends the job report when it ends (LSF has no "on failure only").
_MAIL: dict[str, tuple[str, ...]] = {"NONE": (), "BEGIN": ("-B",), "END": ("-N",), "FAIL": ("-N",),
                                     "ALL": ("-B", "-N")}


def _signal(value: str) -> list[str]:
    """Slurm-style ``[B:]USR1@90`` (seconds before the limit) -> ``-wa USR1 -wt <minutes>``."""
    name, seconds = option_map.parse_signal(SYSTEM, value)
    return ["-wa", name, "-wt", str(minutes_ceil(seconds))]


OPTIONS = option_map.OptionSpec(
    system="IBM Spectrum LSF",
    scheduler="lsf",
    command="bsub",
    renderers={
        "queue": lambda v: ["-q", v],
        "partition": lambda v: ["-q", v],
        "account": lambda v: ["-P", v],
        "project": lambda v: ["-P", v],
        "mail_user": lambda v: ["-u", v],
        "mail_type": lambda v: option_map.mail_types(SYSTEM, v, _MAIL),
        "signal": _signal,
    },
    lacks={"qos": "LSF has no quality of service; choose a queue (partition=), or an SLA through native_args"},
    reserved={"array": "array tasks become job arrays by themselves (array_parallelism= sets the %limit)"},
    reserved_flags={
        "-J": "the job name carries the submission tag (and the array range)",
        "-o": "logs go to <run_dir>/logs/",
        "-e": "logs go to <run_dir>/logs/",
        "-oo": "logs go to <run_dir>/logs/",
        "-eo": "logs go to <run_dir>/logs/",
    },
)


def validate_options(options: Mapping[str, Any]) -> None:
    option_map.validate(OPTIONS, options)


# ---------------------------------------------------------------------- submission


def job_name_spec(request: SubmitRequest) -> str:
    """``<tag>`` or ``<tag>[1-n]%k`` (LSF array indices start at 1)."""
    if request.indices is None:
        return request.job_name
    spec = f"{request.job_name}[1-{len(set(request.indices))}]"
    if request.array_parallelism:
        spec += f"%{int(request.array_parallelism)}"
    return spec


def render_directives(request: SubmitRequest, *, mem_unit: str = "KB") -> list[str]:
    mem = mem_in_unit(request.mem, mem_unit)
    lines = [
        f'#BSUB -J "{job_name_spec(request)}"',
        f"#BSUB -n {int(request.cpus)}",
        f'#BSUB -R "span[hosts=1] rusage[mem={mem}]"',
        f"#BSUB -M {mem}",
    ]
    seconds = parse_time(request.time)
    if seconds is not None:
        lines.append(f"#BSUB -W {minutes_ceil(seconds)}")
    suffix = ".%I" if request.indices is not None else ""
    lines.append(f"#BSUB -o {request.job_dir}/lsf.%J{suffix}.out")
    lines.append(f"#BSUB -e {request.job_dir}/lsf.%J{suffix}.err")
    groups, _native = option_map.render(OPTIONS, request.options)
    for group in groups:
        lines.append("#BSUB " + " ".join(directive_word(w) for w in group))
    return lines


def render_job_script(request: SubmitRequest, *, mem_unit: str = "KB") -> str:
    position = "LSB_JOBINDEX - 1" if request.indices is not None else None
    return render_script(request, render_directives(request, mem_unit=mem_unit), position)


def render_bsub(request: SubmitRequest) -> list[str]:
    """``bsub [native flags]``; the script comes on standard input (``bsub < job.sh``)."""
    _groups, native = option_map.render(OPTIONS, request.options)
    return ["bsub", *native]


_SUBMITTED = re.compile(r"Job <(\d+)> is submitted to (?:default )?queue <([^>]*)>")

#: mbatchd did not answer: the job may or may not exist.
_TRANSIENT = (
    "lsf is down",
    "batch system daemon not responding",
    "cannot connect to lsf",
    "failed in an lsf library call",
    "please wait",
    "timed out",
    "temporarily unavailable",
    "master lim is down",
)


def parse_bsub(stdout: str, stderr: str, returncode: int) -> str:
    """The job id from ``Job <123> is submitted to queue <normal>.``, or SubmitError."""
    match = _SUBMITTED.search(stdout)
    if returncode == 0 and match:
        return match.group(1)
    message = " ".join(line.strip() for line in (stderr.strip() + "\n" + stdout.strip()).splitlines() if line.strip())
    if match:  # submitted, but bsub exited non-zero (a warning): the job exists
        return match.group(1)
    raise SubmitError.from_output("bsub", returncode, message, _TRANSIENT)


# ---------------------------------------------------------------------- states

_QUEUED = {"PEND": None, "PSUSP": "suspended while pending", "WAIT": "waiting", "PROV": "provisioning"}
_RUNNING = {"RUN": None, "USUSP": "suspended by user", "SSUSP": "suspended by LSF",
            "UNKWN": "mbatchd lost contact with the execution host (UNKWN)",
            "ZOMBI": "being killed after its host became unreachable (ZOMBI)"}

#: ``TERM_*`` exit reasons (LSF "Termination reasons") that say more than "exited".
TERM_OUTCOME = {
    "TERM_RUNLIMIT": Outcome.TIMEOUT,
    "TERM_CPULIMIT": Outcome.TIMEOUT,
    "TERM_DEADLINE": Outcome.DEADLINE,
    "TERM_MEMLIMIT": Outcome.OUT_OF_MEMORY,
    "TERM_SWAP": Outcome.OUT_OF_MEMORY,
    "TERM_OWNER": Outcome.CANCELLED,
    "TERM_ADMIN": Outcome.CANCELLED,
    "TERM_FORCE_OWNER": Outcome.CANCELLED,
    "TERM_FORCE_ADMIN": Outcome.CANCELLED,
    "TERM_REQUEUE_OWNER": Outcome.CANCELLED,
    "TERM_REQUEUE_ADMIN": Outcome.CANCELLED,
    "TERM_REMOVE_HUNG_JOB": Outcome.CANCELLED,
    "TERM_PREEMPT": Outcome.PREEMPTED,
    "TERM_HOST": Outcome.NODE_FAIL,
    "TERM_LOAD": Outcome.NODE_FAIL,
    "TERM_ORPHAN_SYSTEM": Outcome.NODE_FAIL,
    "TERM_ZOMBIE": Outcome.NODE_FAIL,
    "TERM_CWD_NOTEXIST": Outcome.FAILED,
    "TERM_PRE_EXEC_FAIL": Outcome.FAILED,
}


def _blank(value: Any) -> str | None:
    text = "" if value is None else str(value).strip()
    return None if text in ("", "-") else text


def observe(stat: str, exit_code: str | None = None, exit_reason: str | None = None,
            pend_reason: str | None = None) -> Observation:
    state = stat.strip().upper()
    exit_code, exit_reason, pend_reason = _blank(exit_code), _blank(exit_reason), _blank(pend_reason)
    if state in _QUEUED:
        return Observation(Presence.PRESENT, Phase.QUEUED, None, state, pend_reason or _QUEUED[state], exit_code)
    if state in _RUNNING:
        return Observation(Presence.PRESENT, Phase.RUNNING, None, state, _RUNNING[state], exit_code)
    if state == "DONE":
        return Observation(Presence.PRESENT, Phase.DONE, Outcome.COMPLETED, state, exit_reason, exit_code or "0")
    if state == "EXIT":
        return Observation(Presence.PRESENT, Phase.DONE, exit_outcome(exit_reason), state,
                           exit_reason or (f"exit code {exit_code}" if exit_code else "exited"), exit_code)
    return Observation(Presence.UNKNOWN, native_state=state or None, detail=f"unknown LSF job state {state!r}")


def exit_outcome(reason: str | None) -> Outcome:
    term = re.search(r"\bTERM_[A-Z_]+", reason or "")
    return TERM_OUTCOME.get(term.group(0), Outcome.FAILED) if term else Outcome.FAILED


# ---------------------------------------------------------------------- bjobs

BJOBS_FIELDS = "jobid jobindex stat exit_code exit_reason pend_reason job_name exec_host max_mem"


def render_bjobs(job_ids: Sequence[str], *, json_output: bool = True) -> list[str]:
    if json_output:
        return ["bjobs", "-a", "-o", BJOBS_FIELDS, "-json", *job_ids]
    return ["bjobs", "-a", "-noheader", "-o", BJOBS_FIELDS + " delimiter='^'", *job_ids]


def render_bjobs_all(*, json_output: bool = True) -> list[str]:
    """Every job of this user mbatchd still holds (tag look-ups after a crash)."""
    return render_bjobs([], json_output=json_output)


_NOT_FOUND = re.compile(r"Job <(\d+)(?:\[(\d+)\])?> is not found", re.IGNORECASE)


def parse_bjobs_json(stdout: str) -> tuple[list[dict[str, str]], set[str]]:
    """(records, ids bjobs does not know) from ``bjobs -o ... -json``. Raises ValueError on other output."""
    text = stdout.strip()
    if not text:
        return [], set()
    data = json.loads(text)
    records = data.get("RECORDS") if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise ValueError("bjobs JSON has no RECORDS list")
    found: list[dict[str, str]] = []
    missing: set[str] = set()
    for rec in records:
        if not isinstance(rec, dict):
            continue
        if "ERROR" in rec:
            if m := _NOT_FOUND.search(str(rec["ERROR"])):
                missing.add(m.group(1))
            continue
        found.append({str(k).upper(): "" if v is None else str(v) for k, v in rec.items()})
    return found, missing


def parse_bjobs_text(stdout: str, stderr: str = "") -> tuple[list[dict[str, str]], set[str]]:
    """The ``delimiter='^'`` form (LSF before 10.1 FP4 has no ``-json``)."""
    names = [f.upper() for f in BJOBS_FIELDS.split()]
    found = []
    for line in stdout.splitlines():
        parts = line.split("^")
        if len(parts) == len(names):
            found.append(dict(zip(names, (p.strip() for p in parts))))
    missing = {m.group(1) for m in _NOT_FOUND.finditer(stdout + "\n" + stderr)}
    return found, missing


def record_key(record: Mapping[str, str]) -> tuple[str, int | None]:
    """(master job id, LSF array index or None) of one bjobs record."""
    raw = record.get("JOBID", "")
    match = re.fullmatch(r"(\d+)(?:\[(\d+)\])?", raw.strip())
    master = match.group(1) if match else raw.strip()
    index = match.group(2) if match and match.group(2) else _blank(record.get("JOBINDEX"))
    if index is not None and index.isdigit() and int(index) > 0:
        return master, int(index)
    return master, None


def observe_record(record: Mapping[str, str]) -> Observation:
    obs = observe(record.get("STAT", ""), record.get("EXIT_CODE"), record.get("EXIT_REASON"), record.get("PEND_REASON"))
    if obs.phase is not Phase.DONE:
        return obs
    return dataclasses.replace(obs, node=first_host(record.get("EXEC_HOST")), peak_mem=peak_text(record.get("MAX_MEM")))


def first_host(exec_host: str | None) -> str | None:
    """``4*hostA:2*hostB`` -> ``hostA`` (where the job script ran); ``-`` or empty: none."""
    host = (exec_host or "").split(":", 1)[0].rpartition("*")[2].strip()
    return host if host and host != "-" else None


def peak_text(max_mem: str | None) -> str | None:
    """bjobs' ``max_mem`` (``35 Mbytes``, ``1.2 Gbytes``) as a short size; None where not measured (``-``)."""
    return size_text(size_bytes(re.sub(r"bytes\s*$", "B", (max_mem or "").strip(), flags=re.IGNORECASE)))


def observations(records: Iterable[Mapping[str, str]], layouts: Iterable[ArrayLayout]) -> dict[str, Observation]:
    by_job: dict[tuple[str, int | None], Observation] = {record_key(r): observe_record(r) for r in records}
    out: dict[str, Observation] = {}
    for layout in layouts:
        if not layout.is_array:
            if (layout.job_id, None) in by_job:
                out[layout.job_id] = by_job[(layout.job_id, None)]
            continue
        for position, key in enumerate(layout.keys()):
            found = by_job.get((layout.job_id, position + 1))
            if found is not None:
                out[key] = found
    return out


def tagged_jobs(records: Iterable[Mapping[str, str]], tags: Iterable[str]) -> dict[str, list[TaggedJob]]:
    """Jobs whose name is a tag (``<tag>``, or ``<tag>[i]`` for array elements); one per master id."""
    wanted = set(tags)
    found: dict[str, dict[str, bool]] = {t: {} for t in wanted}
    for record in records:
        name = re.sub(r"\[\d+\]$", "", record.get("JOB_NAME", "").strip())
        if name not in wanted:
            continue
        master, _index = record_key(record)
        active = observe_record(record).phase is not Phase.DONE
        found[name][master] = found[name].get(master, False) or active
    return {tag: [TaggedJob(job_id=j, tag=tag, active=a) for j, a in sorted(jobs.items())]
            for tag, jobs in found.items()}


# ---------------------------------------------------------------------- bhist


def render_bhist(job_ids: Sequence[str]) -> list[str]:
    """Long history of jobs bjobs no longer knows (``-n 0``: every event log file)."""
    return ["bhist", "-l", "-n", "0", *job_ids]


_BHIST_JOB = re.compile(r"^Job <(\d+)(?:\[(\d+)\])?>")


def parse_bhist(stdout: str) -> dict[tuple[str, int | None], Observation]:
    """``bhist -l`` blocks -> the final state of each job (element) it shows.

    Long lines wrap onto lines indented by whitespace; those are joined back
    first. Only a block that shows how the job ended is an observation.
    """
    blocks: list[str] = []
    current: list[str] = []
    for line in stdout.splitlines():
        if line.startswith("Job <"):
            if current:
                blocks.append("".join(current))
            current = [line.strip()]
        elif current and line[:1].isspace() and line.strip() and not line.strip().startswith(("PEND", "Summary")):
            current.append(line.strip())
        elif current and line.strip():
            current.append("\n" + line.strip())
    if current:
        blocks.append("".join(current))
    out: dict[tuple[str, int | None], Observation] = {}
    for block in blocks:
        head = _BHIST_JOB.match(block)
        if not head:
            continue
        key = (head.group(1), int(head.group(2)) if head.group(2) else None)
        term = re.search(r"\bTERM_[A-Z_]+[^;\n]*", block)
        reason = term.group(0).strip() if term else None
        code = re.search(r"Exited with exit code (\d+)", block)
        if "Done successfully" in block:
            out[key] = Observation(Presence.PRESENT, Phase.DONE, Outcome.COMPLETED, "DONE", None, "0")
        elif code or "Exited" in block:
            exit_code = code.group(1) if code else None
            out[key] = Observation(Presence.PRESENT, Phase.DONE, exit_outcome(reason), "EXIT",
                                   reason or (f"exit code {exit_code}" if exit_code else "exited"), exit_code)
    return out


def history_observations(found: Mapping[tuple[str, int | None], Observation],
                         layouts: Iterable[ArrayLayout]) -> dict[str, Observation]:
    out: dict[str, Observation] = {}
    for layout in layouts:
        if not layout.is_array:
            if (layout.job_id, None) in found:
                out[layout.job_id] = found[(layout.job_id, None)]
            continue
        for position, key in enumerate(layout.keys()):
            if (layout.job_id, position + 1) in found:
                out[key] = found[(layout.job_id, position + 1)]
    return out


# ---------------------------------------------------------------------- bkill


def element_id(job_id: str, position: int) -> str:
    """LSF's id of the array element at 0-based *position*: ``123[position+1]``."""
    return f"{job_id}[{position + 1}]"


def render_bkill(targets: Sequence[str]) -> list[str]:
    return ["bkill", *targets]


#: Characters of one ``"job_ID[index_list]"`` word. LSF documents no limit for bkill's; it caps the index
#: list of ``bsub -J`` at 255 characters, and openlava (LSF's older code) copies each job ID argument into a
#: fixed buffer, so a longer list is cut into several words of the same job.
INDEX_WORD_CHARS = 255


def bkill_words(targets: Iterable[tuple[str, int | None]], *, word_limit: int = INDEX_WORD_CHARS) -> list[str]:
    """``bkill`` operands for ``(job id, 0-based position or None for the whole job)`` targets: whole jobs,
    then one ``job_ID[index_list]`` per array with its LSF indices (position + 1) folded
    (``4712[1-5,7,9-12]``).

    IBM Spectrum LSF 10.1 Command Reference, bkill: operands ``job_ID ... | "job_ID[index]" ...``; the
    index list is the ``start[-end[:step]]``, comma-separated form of ``bsub -J`` (Administering LSF, "Job
    arrays"), which bjobs and bresume name ``"job_ID[index_list]"``: the commands share one job ID parser
    (getJobIdIndexList in openlava's lsbatch/cmd/cmd.jobid.c).
    """
    whole, elements = cancel_targets(targets)
    words = list(whole)
    for job_id, positions in elements.items():
        spans = compress_indices(p + 1 for p in positions).split(",")
        room = max(word_limit - len(job_id) - 2, 1)  # the brackets
        words.extend(f"{job_id}[{','.join(piece)}]" for piece in command_chunks(spans, room))
    return words


def render_bkill_commands(targets: Iterable[tuple[str, int | None]], *, limit: int = COMMAND_CHARS,
                          word_limit: int = INDEX_WORD_CHARS) -> list[list[str]]:
    """The ``bkill`` commands for *targets* (folded by :func:`bkill_words`), each within *limit* characters
    of operands (what one SSH argument takes)."""
    return [render_bkill(chunk) for chunk in command_chunks(bkill_words(targets, word_limit=word_limit), limit)]


# ---------------------------------------------------------------------- probe


def parse_lsid(text: str) -> str | None:
    """``IBM Spectrum LSF Standard 10.1.0.13, Jan 20 2022`` -> ``10.1.0.13``."""
    match = re.search(r"LSF[^\d\n]*(\d+(?:\.\d+)+)", text)
    return match.group(1) if match else None


def parse_params(text: str) -> dict[str, str]:
    """``KEY = value`` lines of ``bparams -a`` or ``badmin showconf mbd``."""
    params: dict[str, str] = {}
    for line in text.splitlines():
        key, eq, value = line.strip().partition("=")
        if eq and key.strip() and " " not in key.strip():
            params[key.strip()] = value.strip()
    return params


def supports_json(version: str | None) -> bool:
    """``bjobs -json`` arrived in LSF 10.1.0.4 (Fix Pack 4)."""
    parts = tuple(int(p) for p in re.findall(r"\d+", version or "")[:4])
    return parts >= (10, 1, 0, 4)


def unit_for_limits(params: Mapping[str, str]) -> str:
    return (params.get("LSF_UNIT_FOR_LIMITS") or "KB").upper()


def max_array_size(params: Mapping[str, str], default: int = 1000) -> int:
    try:
        return int(params.get("MAX_JOB_ARRAY_SIZE", default))
    except ValueError:
        return default


def queue_limit(params: Mapping[str, str]) -> int | None:
    """``MAX_PEND_JOBS`` of ``bparams -a`` (lsb.params): how many pending jobs a user may have, each array
    element counted. Over it, bsub does not fail but waits ("Pending job threshold reached. Retrying in
    60 seconds..."), so staying under it is what keeps submissions quick. Per-user ``busers`` limits (MAX)
    are job slots that *run*: no cap on the queue."""
    value = params.get("MAX_PEND_JOBS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None
