"""PBS Professional emulator: ``qsub``, ``qstat``, ``qselect``, ``qdel`` as the PBS Professional
Reference Guide documents them (test equipment; see ``_core.py``).

Covered: ``#PBS`` directives (command-line options override them), ``-N``,
``-l select=...:ncpus=..:mem=..``/``walltime=``, ``-J X-Y[:Z][%max]`` arrays
with ``PBS_ARRAY_INDEX`` and ``^array_index^`` in ``-o``, ``-q`` (known
queues: ``$WLM_EMU_QUEUES``, default ``workq,short``), ``-j oe``; ``qstat -f``
in text or ``-F json``, ``-x`` (job history, on unless ``WLM_EMU_HISTORY=0``),
``-t`` (subjobs), ``-Bf``, ``--version``; ``qselect -N [-x]``; ``qdel`` of
jobs, arrays, subjobs and ranges of subjobs (``123[2-5].server``). Environment knobs: ``WLM_EMU_MAX_ARRAY`` (10000),
``WLM_EMU_PBS_VERSION``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

import _core as core

SERVER = os.environ.get("WLM_EMU_SERVER", "emuserver")
VERSION = os.environ.get("WLM_EMU_PBS_VERSION", "2021.1.3.20220217134230")


def history() -> bool:
    return os.environ.get("WLM_EMU_HISTORY", "1") != "0"


def fail(prog: str, message: str, code: int) -> int:
    sys.stderr.write(f"{prog}: {message}\n")
    return code


def down(prog: str) -> int:
    sys.stderr.write(f"Connection refused\n{prog}: cannot connect to server {SERVER} (errno=15010)\n")
    return 2


# ---------------------------------------------------------------------- qsub

_ARG_OPTS = set("ANlJoejqPMmrWSvapkc")
_FLAG_OPTS = set("VhIzX")


def _parse_opts(words: list[str], prog: str) -> tuple[dict[str, list[str]], list[str]]:
    opts: dict[str, list[str]] = {}
    rest: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith("-") and len(word) >= 2 and word != "--":
            letter = word[1]
            if letter in _ARG_OPTS:
                value = word[2:] if len(word) > 2 else (words[i + 1] if i + 1 < len(words) else None)
                if value is None:
                    raise ValueError(f"option requires an argument -- '{letter}'")
                opts.setdefault(letter, []).append(value)
                i += 1 if len(word) > 2 else 2
                continue
            if letter in _FLAG_OPTS:
                opts.setdefault(letter, []).append("")
                i += 1
                continue
            raise ValueError(f"invalid option -- '{letter}'")
        rest.append(word)
        i += 1
    return opts, rest


def directives(script: str) -> list[str]:
    words: list[str] = []
    for line in script.splitlines()[1:] if script.startswith("#!") else script.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#PBS"):
            words.extend(shlex.split(stripped[4:]))
        elif stripped.startswith("#"):
            continue
        else:
            break
    return words


_SIZE = re.compile(r"^\d+(b|kb|mb|gb|tb|w|kw|mw|gw|tw)?$", re.IGNORECASE)


def qsub(args: list[str]) -> int:
    root = core.state_dir()
    try:
        core.check_up(root)
    except core.Down:
        return down("qsub")
    try:
        cli, rest = _parse_opts(args, "qsub")
    except ValueError as exc:
        return fail("qsub", f"{exc}\nusage: qsub [-a date_time] [-A account_string] ... [script | -- command [arg1 ...]]",
                    2)
    if not rest:
        return fail("qsub", "script file required (standard input is not supported by this emulator)", 2)
    script_path = Path(rest[0])
    try:
        script = script_path.read_text()
    except OSError as exc:
        return fail("qsub", f"script file:: {exc.strerror}", 1)
    try:
        from_script, _ = _parse_opts(directives(script), "qsub")
    except ValueError as exc:
        return fail("qsub", f"directive error: {exc}", 1)
    opts = {**from_script, **cli}  # the command line overrides directives
    queue = (opts.get("q") or ["workq"])[-1]
    if queue not in os.environ.get("WLM_EMU_QUEUES", "workq,short").split(","):
        return fail("qsub", "Unknown queue", 170)
    resources: dict[str, str] = {}
    for spec in opts.get("l", []):
        for item in spec.split(","):
            key, _, value = item.partition("=")
            resources[key] = value
    walltime = None
    if "walltime" in resources:
        if not re.fullmatch(r"\d+(:\d+){0,2}", resources["walltime"]):
            return fail("qsub", "Illegal attribute or resource value for walltime", 1)
        walltime = core.parse_duration(resources["walltime"])
    if "select" in resources:
        for chunk_part in resources["select"].split(":")[1:]:
            key, _, value = chunk_part.partition("=")
            if key == "mem" and not _SIZE.match(value):
                return fail("qsub", "Illegal attribute or resource value for select", 1)
            if key == "ncpus" and not value.isdigit():
                return fail("qsub", "Illegal attribute or resource value for select", 1)
    n, limit, start, step = 0, None, 0, 1
    if "J" in opts:
        match = re.fullmatch(r"(\d+)-(\d+)(?::(\d+))?(?:%(\d+))?", opts["J"][-1])
        if not match or int(match.group(2)) <= int(match.group(1)):
            return fail("qsub", "illegal -J value", 1)
        start, end, step = int(match.group(1)), int(match.group(2)), int(match.group(3) or 1)
        n = len(range(start, end + 1, step))
        limit = int(match.group(4)) if match.group(4) else None
        if end >= int(os.environ.get("WLM_EMU_MAX_ARRAY", "10000")):
            return fail("qsub", "Array job exceeds server or queue size limit", 1)
        if start != 0 or step != 1:
            return fail("qsub", "this emulator supports -J ranges that start at 0 with step 1", 1)
    limit_queued = max_queued()
    if limit_queued is not None:
        # max_queued = [u:PBS_GENERIC=N] (pbs_server_attributes(7B)): the user's queued and running jobs;
        # a job array counts as one job.
        live = sum(1 for meta in core.jobs(root)
                   if any(e["state"] != "done" for e in core.elements(root, meta)))
        if live >= limit_queued:
            return fail("qsub", "would exceed complex's per-user limit of jobs in 'Q' state", 1)
    name = (opts.get("N") or [script_path.name])[-1]
    seq = core.next_seq(root)
    job_id = f"{seq}[].{SERVER}" if n else f"{seq}.{SERVER}"
    spool = root / "jobs" / str(seq)
    spool.mkdir(parents=True, exist_ok=True)
    (spool / "script").write_text(script)
    out = (opts.get("o") or [f"{os.getcwd()}/{name}.o{seq}"])[-1]
    out = out.split(":", 1)[1] if re.match(r"^[A-Za-z0-9.\-]+:/", out) else out
    if os.path.isdir(out):
        out = os.path.join(out, f"{name}.o{seq}" + (".^array_index^" if n else ""))
    joined = "oe" in (opts.get("j") or [""])[-1]
    err = out if joined else (opts.get("e") or [f"{os.getcwd()}/{name}.e{seq}"])[-1]
    base_env = {k: os.environ[k] for k in ("HOME", "PATH", "USER", "LOGNAME", "LANG", "SHELL") if k in os.environ}
    env = {**base_env, "PBS_JOBNAME": name, "PBS_O_WORKDIR": os.getcwd(), "PBS_ENVIRONMENT": "PBS_BATCH",
           "PBS_QUEUE": queue, "PBS_O_HOST": os.uname().nodename}
    element_env = {"PBS_JOBID": f"{seq}[{{k}}].{SERVER}", "PBS_ARRAY_INDEX": "{k}",
                   "PBS_ARRAY_ID": job_id} if n else {"PBS_JOBID": job_id}
    core.submit(root, {
        "seq": seq, "system": "pbs", "name": name, "n": n, "limit": limit, "walltime": walltime, "queue": queue,
        "argv": ["/bin/bash", str(spool / "script")], "env": env, "element_env": element_env,
        "out": out.replace("^array_index^", "{k}"), "err": err.replace("^array_index^", "{k}"),
        "resources": resources, "account": (opts.get("A") or [None])[-1], "project": (opts.get("P") or [None])[-1],
        "job_id": job_id,
    })
    print(job_id)
    return 0


# ---------------------------------------------------------------------- qstat


def _ctime(t: float | None) -> str:
    return time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(t or time.time()))


def _element_attrs(meta: dict[str, Any], el: dict[str, Any], subjob: bool) -> dict[str, Any]:
    state = {"queued": "Q", "running": "R", "done": "X" if subjob else "F"}[el["state"]]
    attrs: dict[str, Any] = {"job_state": state, "substate": {"Q": 10, "R": 42}.get(state, 92)}
    if el["state"] == "running":
        attrs["comment"] = f"Job run at {_ctime(el.get('start'))} on (localhost:ncpus=1)"
        attrs["exec_host"] = "localhost/0"
    if el["state"] == "done":
        code = el.get("exit")
        reason = el.get("reason")
        if not el.get("started"):
            attrs["substate"] = 91
            attrs["comment"] = "Job deleted as result of a qdel command"
        else:
            attrs["Exit_status"] = code if code is not None and code >= 0 else 256 + (-(code or 0))
            if reason == "cancelled":
                attrs["substate"] = 91
                attrs["comment"] = f"Job run at {_ctime(el.get('start'))} on (localhost:ncpus=1) and terminated"
            elif reason == "walltime":
                attrs["substate"] = 93
                used = int((el.get("end") or 0) - (el.get("start") or 0))
                attrs["comment"] = f"job killed: walltime {used} exceeded limit {int(meta['walltime'])}"
            else:
                attrs["comment"] = f"Job run at {_ctime(el.get('start'))} on (localhost:ncpus=1) and finished"
    return attrs


def _common(meta: dict[str, Any]) -> dict[str, Any]:
    rl: dict[str, Any] = {"ncpus": 1, "nodect": 1, "place": "pack"}
    rl.update({k: v for k, v in meta.get("resources", {}).items()})
    attrs: dict[str, Any] = {
        "Job_Name": meta["name"], "Job_Owner": f"{os.environ.get('USER', 'user')}@{os.uname().nodename}",
        "queue": meta["queue"], "server": SERVER, "ctime": _ctime(meta["submit_time"]),
        "qtime": _ctime(meta["submit_time"]), "Rerunable": "True", "Resource_List": rl,
        "euser": os.environ.get("USER", "user"), "project": meta.get("project") or "_pbs_project_default",
    }
    if meta.get("account"):
        attrs["Account_Name"] = meta["account"]
    return attrs


def records_for(root: Path, meta: dict[str, Any], *, subjobs: bool) -> dict[str, dict[str, Any]]:
    els = core.elements(root, meta)
    seq = meta["seq"]
    out: dict[str, dict[str, Any]] = {}
    if not meta.get("n"):
        out[meta["job_id"]] = {**_common(meta), **_element_attrs(meta, els[0], False)}
        return out
    done = sum(e["state"] == "done" for e in els)
    started = any(e["state"] != "queued" for e in els)
    parent_state = "F" if done == len(els) else ("B" if started else "Q")
    parent = {**_common(meta), "job_state": parent_state, "substate": {"F": 92, "B": 15, "Q": 10}[parent_state],
              "array": "True", "array_indices_submitted": f"0-{len(els) - 1}",
              "array_indices_remaining": ",".join(str(k) for k, e in enumerate(els) if e["state"] == "queued") or "-",
              "array_state_count": f"Queued:{sum(e['state'] == 'queued' for e in els)} "
                                   f"Running:{sum(e['state'] == 'running' for e in els)} Exiting:0 Expired:{done} "}
    if parent_state == "F":
        codes = [e.get("exit") for e in els]
        parent["Exit_status"] = 2 if any(not e.get("started") or e.get("reason") == "cancelled" for e in els) else (
            0 if all(c == 0 for c in codes) else 1)
    out[meta["job_id"]] = parent
    if subjobs:
        for k, el in enumerate(els):
            rec = {**_common(meta), **_element_attrs(meta, el, True), "array_id": meta["job_id"], "array_index": k}
            out[f"{seq}[{k}].{SERVER}"] = rec
    return out


def _finished(root: Path, meta: dict[str, Any]) -> bool:
    return core.finished_at(core.elements(root, meta)) is not None


def _lookup(root: Path, job_id: str) -> tuple[dict[str, Any] | None, int | None]:
    match = re.fullmatch(r"(\d+)(?:\[(\d*)\])?(?:\.(.*))?", job_id)
    if not match:
        return None, None
    meta = core.job(root, int(match.group(1)))
    if meta is None or match.group(3) not in (None, "") and not SERVER.startswith(match.group(3)) \
            and not match.group(3).startswith(SERVER):
        return None, None
    index = match.group(2)
    if (index is not None) != bool(meta.get("n")):
        return None, None
    if index:
        if int(index) >= core.count(meta):
            return None, None
        return meta, int(index)
    return meta, None


def _text(records: dict[str, dict[str, Any]]) -> str:
    out = []
    for job_id, attrs in records.items():
        out.append(f"Job Id: {job_id}")
        for key, value in attrs.items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    out.append(f"    {key}.{sub} = {v}")
            else:
                out.append(f"    {key} = {value}")
        out.append("")
    return "\n".join(out) + ("\n" if out else "")


def max_queued() -> int | None:
    """``WLM_EMU_MAX_QUEUED``: the server's ``max_queued = [u:PBS_GENERIC=N]`` (unset: no limit)."""
    value = os.environ.get("WLM_EMU_MAX_QUEUED")
    return int(value) if value else None


def queue_attributes() -> str:
    """``qstat -Qf``: each queue (``WLM_EMU_QUEUES``); ``WLM_EMU_MAX_WALLTIME`` sets their resources_max.walltime."""
    out = []
    for queue in os.environ.get("WLM_EMU_QUEUES", "workq,short").split(","):
        out += [f"Queue: {queue}", "    queue_type = Execution", "    total_jobs = 0", "    enabled = True",
                "    started = True"]
        if os.environ.get("WLM_EMU_MAX_WALLTIME"):
            out.append(f"    resources_max.walltime = {os.environ['WLM_EMU_MAX_WALLTIME']}")
        out.append("")
    return "\n".join(out) + "\n"


def server_attributes() -> str:
    limit = max_queued()
    return "\n".join([
        f"Server: {SERVER}", "    server_state = Active", f"    server_host = {SERVER}", "    scheduling = True",
        *([f"    max_queued = [u:PBS_GENERIC={limit}]"] if limit is not None else []),
        "    default_queue = workq", f"    max_array_size = {os.environ.get('WLM_EMU_MAX_ARRAY', '10000')}",
        f"    pbs_version = {VERSION}",
        f"    job_history_enable = {'True' if history() else 'False'}",
        "    job_history_duration = 336:00:00", "",
    ]) + "\n"


def qstat(args: list[str]) -> int:
    if args == ["--version"]:
        print(f"pbs_version = {VERSION}")
        return 0
    root = core.state_dir()
    try:
        core.check_up(root)
    except core.Down:
        return down("qstat")
    flags: set[str] = set()
    fmt = None
    ids: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        if word == "-F":
            fmt = args[i + 1] if i + 1 < len(args) else None
            i += 2
            continue
        if word.startswith("-") and len(word) > 1:
            letters = word[1:]
            if any(c not in "fxtBQJHpsw1" for c in letters):
                return fail("qstat", f"invalid option -- '{next(c for c in letters if c not in 'fxtBQJHpsw1')}'", 2)
            flags.update(letters)
        else:
            ids.append(word)
        i += 1
    if "B" in flags:
        sys.stdout.write(server_attributes())
        return 0
    if "Q" in flags:
        sys.stdout.write(queue_attributes())
        return 0
    use_history = "x" in flags and history()
    records: dict[str, dict[str, Any]] = {}
    code = 0
    if not ids:
        for meta in core.jobs(root):
            if _finished(root, meta) and not use_history:
                continue
            records.update(records_for(root, meta, subjobs="t" in flags))
    for job_id in ids:
        meta, index = _lookup(root, job_id)
        if meta is None or (_finished(root, meta) and not history()):
            sys.stderr.write(f"qstat: Unknown Job Id {job_id}\n")
            code = 153
            continue
        if _finished(root, meta) and not use_history:
            sys.stderr.write(f"qstat: {job_id} Job has finished, use -x or -H to obtain historical job information\n")
            code = 35
            continue
        found = records_for(root, meta, subjobs=True)
        if index is not None:
            key = f"{meta['seq']}[{index}].{SERVER}"
            records[key] = found[key]
        elif "t" in flags:
            records.update(found)
        else:
            records[meta["job_id"]] = found[meta["job_id"]]
    if "f" not in flags:
        for job_id, attrs in records.items():
            print(f"{job_id:<16} {attrs['Job_Name'][:16]:<16} {attrs['euser']:<16} 0 {attrs['job_state']} "
                  f"{attrs['queue']}")
        return code
    if fmt == "json":
        doc = {"timestamp": int(time.time()), "pbs_version": VERSION, "pbs_server": SERVER}
        if records:
            doc["Jobs"] = records
        print(json.dumps(doc, indent=4))
    elif fmt is None:
        sys.stdout.write(_text(records))
    else:
        return fail("qstat", f"unsupported output format {fmt}", 2)
    return code


def qselect(args: list[str]) -> int:
    root = core.state_dir()
    try:
        core.check_up(root)
    except core.Down:
        return down("qselect")
    with_history = "-x" in args and history()
    name = args[args.index("-N") + 1] if "-N" in args and args.index("-N") + 1 < len(args) else None
    for meta in core.jobs(root):
        if name is not None and meta["name"] != name:
            continue
        if _finished(root, meta) and not with_history:
            continue
        print(meta["job_id"])
    return 0


#: A range of subjobs, qdel(1B) OPERANDS: ``<sequence number>[<first>-<last>][.<server name>]``.
_RANGE = re.compile(r"(\d+)\[(\d+)-(\d+)\](.*)")


def _qdel_range(root: Path, job_id: str, span: re.Match[str]) -> int:
    """As the server takes a range (OpenPBS req_deletejob): subjob by subjob, skipping indices the array
    lacks and finished subjobs; unknown only when the array is, or the range starts past its last index."""
    seq, first, last, rest = span.groups()
    meta, _index = _lookup(root, f"{seq}[]{rest}")
    if meta is None or int(first) > int(last) or int(first) >= core.count(meta):
        sys.stderr.write(f"qdel: Unknown Job Id {job_id}\n")
        return 153
    els = core.elements(root, meta)
    for k in range(int(first), min(int(last), core.count(meta) - 1) + 1):
        if els[k]["state"] != "done":
            core.request_cancel(root, meta["seq"], k)
    return 0


def qdel(args: list[str]) -> int:
    root = core.state_dir()
    try:
        core.check_up(root)
    except core.Down:
        return down("qdel")
    code = 0
    for job_id in [a for a in args if not a.startswith("-")]:
        if (span := _RANGE.fullmatch(job_id)) is not None:
            code = _qdel_range(root, job_id, span) or code
            continue
        meta, index = _lookup(root, job_id)
        if meta is None:
            sys.stderr.write(f"qdel: Unknown Job Id {job_id}\n")
            code = 153
            continue
        els = core.elements(root, meta)
        if (index is None and core.finished_at(els) is not None) or (index is not None and
                                                                     els[index]["state"] == "done"):
            sys.stderr.write(f"qdel: Job has finished {job_id}\n")
            code = 35
            continue
        core.request_cancel(root, meta["seq"], index)
    return code


def main(prog: str, args: list[str]) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    return {"qsub": qsub, "qstat": qstat, "qselect": qselect, "qdel": qdel}[prog](args)
