"""IBM Spectrum LSF emulator: ``bsub``, ``bjobs``, ``bhist``, ``bkill`` and the probes ``lsid``,
``bparams -a``, ``badmin showconf mbd``, as the LSF Command Reference documents them (test
equipment; see ``_core.py``).

Covered: ``bsub < script`` with ``#BSUB`` directives (command-line options
override them), ``-J "name[1-n]%k"`` arrays with ``LSB_JOBINDEX`` (1-based),
``-n``, ``-R``, ``-M``, ``-W [hour:]minute``, ``-q`` (known queues:
``$WLM_EMU_QUEUES``, default ``normal,short``), ``-P``, ``-o``/``-e`` with
``%J``/``%I``; ``bjobs -a -o "<fields>" [-json | -noheader ... delimiter='c']``
with ``Job <id> is not found`` for unknown ids; ``bkill`` of jobs, elements and
``"job_ID[index_list]"``; finished jobs leave ``bjobs`` after
``$WLM_EMU_CLEAN_PERIOD`` seconds (default 3600) and stay in ``bhist -l``.
``$WLM_EMU_LSF_UNIT`` is the site's LSF_UNIT_FOR_LIMITS (default MB).
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

VERSION = os.environ.get("WLM_EMU_LSF_VERSION", "10.1.0.13")
FIELDS = ("jobid", "jobindex", "stat", "exit_code", "exit_reason", "pend_reason", "job_name", "queue", "user",
          "exec_host", "max_mem")


def down(prog: str) -> int:
    sys.stderr.write("LSF is down. Please wait ...\nbatch system daemon not responding ... still trying\n")
    return 255


def clean_period() -> float:
    return float(os.environ.get("WLM_EMU_CLEAN_PERIOD", "3600"))


# ---------------------------------------------------------------------- bsub

_ARG = {"J", "n", "R", "M", "W", "q", "P", "o", "e", "oo", "eo", "u", "wa", "wt", "G", "app", "cwd", "L", "m",
        "sp", "w", "E", "Ep", "We", "g", "Lp", "b", "t", "c", "i"}
_FLAG = {"B", "N", "x", "r", "rn", "K", "I", "H", "Is"}


def _parse(words: list[str]) -> dict[str, list[str]]:
    opts: dict[str, list[str]] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("-"):
            raise ValueError(f"this emulator reads the job script from standard input, not {word!r}")
        name = word[1:]
        if name in _ARG:
            if i + 1 >= len(words):
                raise ValueError(f"option requires an argument -- {name}")
            opts.setdefault(name, []).append(words[i + 1])
            i += 2
        elif name in _FLAG:
            opts.setdefault(name, []).append("")
            i += 1
        else:
            raise ValueError(f"illegal option -- {name}")
    return opts


def directives(script: str) -> list[str]:
    words: list[str] = []
    for line in script.splitlines()[1:] if script.startswith("#!") else script.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#BSUB"):
            words.extend(shlex.split(stripped[5:]))
        elif not stripped.startswith("#"):
            break
    return words


def bsub(args: list[str]) -> int:
    root = core.state_dir()
    try:
        core.check_up(root)
    except core.Down:
        return down("bsub")
    script = sys.stdin.read()
    try:
        opts = {**_parse(directives(script)), **_parse(args)}
    except ValueError as exc:
        sys.stderr.write(f"bsub: {exc}\nUsage: bsub [-h] [-V] [-H] [-x] [-r | -rn] ... [command [argument ...]]\n")
        return 255
    queue = (opts.get("q") or ["normal"])[-1]
    if queue not in os.environ.get("WLM_EMU_QUEUES", "normal,short").split(","):
        sys.stderr.write(f"{queue}: No such queue. Job not submitted.\n")
        return 255
    for spec in opts.get("R", []):
        if spec.count("[") != spec.count("]"):
            sys.stderr.write("Bad resource requirement syntax. Job not submitted.\n")
            return 255
    if "M" in opts and not re.fullmatch(r"\d+(KB|MB|GB|TB|PB|EB|ZB)?", opts["M"][-1], re.IGNORECASE):
        sys.stderr.write(f"{opts['M'][-1]}: Bad argument for option -M. Job not submitted.\n")
        return 255
    walltime = None
    if "W" in opts:
        match = re.fullmatch(r"(?:(\d+):)?(\d+)", opts["W"][-1])
        if not match:
            sys.stderr.write(f"{opts['W'][-1]}: Bad RUNLIMIT specification. Job not submitted.\n")
            return 255
        walltime = (int(match.group(1) or 0) * 60 + int(match.group(2))) * 60
        walltime = float(os.environ.get("WLM_EMU_WALLTIME_SCALE", "1")) * walltime
    name_spec = (opts.get("J") or ["NONAME"])[-1]
    match = re.fullmatch(r"([^\[\]]+)(?:\[(\d+)-(\d+)\](?:%(\d+))?)?", name_spec)
    if not match:
        sys.stderr.write(f"{name_spec}: Bad job name. Job not submitted.\n")
        return 255
    name, first, last, limit = match.group(1), match.group(2), match.group(3), match.group(4)
    n = 0
    if first is not None:
        if int(first) != 1 or int(last) < int(first):
            sys.stderr.write("Bad job array index list. Job not submitted.\n")
            return 255
        n = int(last)
        if n > int(os.environ.get("WLM_EMU_MAX_ARRAY", "1000")):
            sys.stderr.write("Job array index too large. Job not submitted.\n")
            return 255
    seq = core.next_seq(root)
    spool = root / "jobs" / str(seq)
    spool.mkdir(parents=True, exist_ok=True)
    (spool / "script").write_text(script)

    def path(template: str | None) -> str | None:
        if template is None:
            return None
        return template.replace("%J", str(seq)).replace("%I", "{k}" if n else "0")

    base_env = {k: os.environ[k] for k in ("HOME", "PATH", "USER", "LOGNAME", "LANG", "SHELL") if k in os.environ}
    env = {**base_env, "LSB_JOBID": str(seq), "LSB_JOBNAME": name_spec, "LSB_QUEUE": queue}
    out = path((opts.get("o") or opts.get("oo") or [None])[-1]) or os.devnull
    core.submit(root, {
        "seq": seq, "system": "lsf", "name": name, "n": n, "limit": int(limit) if limit else None,
        "walltime": walltime, "queue": queue, "argv": ["/bin/bash", str(spool / "script")], "env": env,
        "element_env": {"LSB_JOBINDEX": "{k}" if n else "0"}, "index_base": 1,
        "out": out, "err": path((opts.get("e") or opts.get("eo") or [None])[-1]) or out,
        "project": (opts.get("P") or ["default"])[-1], "cwd": os.getcwd(),
    })
    print(f"Job <{seq}> is submitted to {'queue' if 'q' in opts else 'default queue'} <{queue}>.")
    return 0


# ---------------------------------------------------------------------- bjobs


def _stat(el: dict[str, Any]) -> str:
    if el["state"] == "queued":
        return "PEND"
    if el["state"] == "running":
        return "RUN"
    return "DONE" if el.get("exit") == 0 else "EXIT"


def _exit_fields(el: dict[str, Any]) -> tuple[str, str]:
    if el["state"] != "done" or el.get("exit") == 0:
        return "", ""
    code = el.get("exit")
    reason = el.get("reason")
    number = "" if code is None else str(code if code >= 0 else 128 - code)
    if reason == "cancelled":
        return number, "TERM_OWNER: job killed by owner"
    if reason == "walltime":
        return number, "TERM_RUNLIMIT: job killed after reaching LSF run time limit"
    return number, ""


def records(root: Path, meta: dict[str, Any], only: int | None = None) -> list[dict[str, str]]:
    out = []
    els = core.elements(root, meta)
    for k, el in enumerate(els):
        if only is not None and k != only:
            continue
        code, reason = _exit_fields(el)
        index = str(k + 1) if meta.get("n") else "0"
        out.append({
            "JOBID": str(meta["seq"]), "JOBINDEX": index, "STAT": _stat(el), "EXIT_CODE": code,
            "EXIT_REASON": reason,
            "PEND_REASON": "New job is waiting for scheduling;" if el["state"] == "queued" else "",
            "JOB_NAME": f"{meta['name']}[{k + 1}]" if meta.get("n") else meta["name"],
            "QUEUE": meta["queue"], "USER": os.environ.get("USER", "user"),
            # the host once the job started; the emulator measures no memory, which bjobs shows as "-"
            "EXEC_HOST": "" if el["state"] == "queued" else "localhost", "MAX_MEM": "",
        })
    return out


def _cleaned(root: Path, meta: dict[str, Any]) -> bool:
    end = core.finished_at(core.elements(root, meta))
    return end is not None and time.time() - end > clean_period()


def _lookup(root: Path, text: str) -> tuple[dict[str, Any] | None, int | None]:
    match = re.fullmatch(r"(\d+)(?:\[(\d+)\])?", text)
    if not match:
        return None, None
    meta = core.job(root, int(match.group(1)))
    if meta is None:
        return None, None
    if match.group(2) is not None:
        k = int(match.group(2)) - 1
        if not meta.get("n") or not 0 <= k < core.count(meta):
            return None, None
        return meta, k
    return meta, None


def bjobs(args: list[str]) -> int:
    root = core.state_dir()
    try:
        core.check_up(root)
    except core.Down:
        return down("bjobs")
    fields: list[str] | None = None
    delimiter = " "
    as_json = noheader = show_all = False
    ids: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        if word == "-o":
            spec = args[i + 1]
            if m := re.search(r"delimiter='(.)'", spec):
                delimiter = m.group(1)
                spec = spec[:m.start()]
            fields = spec.split()
            i += 2
            continue
        if word == "-json":
            as_json = True
        elif word == "-noheader":
            noheader = True
        elif word == "-a":
            show_all = True
        elif word.startswith("-"):
            sys.stderr.write(f"bjobs: illegal option -- {word[1:]}\n")
            return 255
        else:
            ids.append(word)
        i += 1
    fields = fields or ["jobid", "stat", "queue", "job_name"]
    for f in fields:
        if f.split(":")[0].lower() not in FIELDS:
            sys.stderr.write(f"{f}: Unknown field name\n")
            return 255
    if as_json and noheader:
        sys.stderr.write("The -json option cannot be used with -noheader.\n")
        return 255
    rows: list[dict[str, str]] = []
    errors: list[str] = []
    if ids:
        for text in ids:
            meta, k = _lookup(root, text)
            if meta is None or _cleaned(root, meta):
                errors.append(f"Job <{text}> is not found")
                continue
            rows.extend(records(root, meta, k))
    else:
        for meta in core.jobs(root):
            if _cleaned(root, meta):
                continue
            if not show_all and core.finished_at(core.elements(root, meta)) is not None:
                continue
            rows.extend(records(root, meta))
    names = [f.split(":")[0].upper() for f in fields]
    if as_json:
        recs: list[dict[str, str]] = [{n: r[n] for n in names} for r in rows]
        recs += [{"ERROR": e} for e in errors]
        print(json.dumps({"COMMAND": "bjobs", "JOBS": len(recs), "RECORDS": recs}, indent=2))
        return 0
    if not rows and not ids:
        sys.stderr.write("No job found\n" if show_all else "No unfinished job found\n")
        return 255
    if not noheader and rows:
        print(delimiter.join(names))
    for r in rows:
        print(delimiter.join(r[n] or "-" for n in names))
    for e in errors:
        sys.stderr.write(e + "\n")
    return 255 if errors and not rows else 0


# ---------------------------------------------------------------------- bhist


def _when(t: float | None) -> str:
    return time.strftime("%a %b %d %H:%M:%S", time.localtime(t or time.time()))


def _wrap(line: str) -> str:
    """bhist -l folds lines at 80 columns, continuing with 21 spaces."""
    out = [line[:79]]
    rest = line[79:]
    while rest:
        out.append(" " * 21 + rest[:58])
        rest = rest[58:]
    return "\n".join(out)


def bhist(args: list[str]) -> int:
    root = core.state_dir()
    try:
        core.check_up(root)
    except core.Down:
        return down("bhist")
    ids = [a for a in args if not a.startswith("-") and a.replace("[", "").replace("]", "").isdigit()]
    blocks = []
    for text in ids:
        meta, only = _lookup(root, text)
        if meta is None:
            continue
        for k, el in enumerate(core.elements(root, meta)):
            if only is not None and k != only:
                continue
            jid = f"{meta['seq']}[{k + 1}]" if meta.get("n") else str(meta["seq"])
            jname = f"{meta['name']}[{k + 1}]" if meta.get("n") else meta["name"]
            lines = [_wrap(f"Job <{jid}>, Job Name <{jname}>, User <{os.environ.get('USER', 'user')}>, "
                           f"Project <{meta.get('project', 'default')}>, Command <#!/bin/bash>"),
                     _wrap(f"{_when(meta['submit_time'])}: Submitted from host <localhost>, to Queue "
                           f"<{meta['queue']}>, CWD <{meta.get('cwd', '')}>;")]
            if el["state"] != "queued" and el.get("started", True):
                lines.append(f"{_when(el.get('start'))}: Dispatched 1 Task(s) on Host(s) <localhost>;")
                lines.append(f"{_when(el.get('start'))}: Starting (Pid {el.get('pid')});")
            if el["state"] == "done":
                code, reason = _exit_fields(el)
                if el.get("exit") == 0:
                    lines.append(f"{_when(el.get('end'))}: Done successfully. The CPU time used is 0.1 seconds;")
                else:
                    lines.append(_wrap(f"{_when(el.get('end'))}: Exited with exit code {code or 1}. "
                                       "The CPU time used is 0.1 seconds;"))
                    lines.append(_wrap(f"{_when(el.get('end'))}: Completed <exit>" + (f"; {reason};" if reason
                                                                                       else ";")))
            lines += ["", f"Summary of time in seconds spent in various states by  {_when(time.time())}",
                      "  PEND     PSUSP    RUN      USUSP    SSUSP    UNKWN    TOTAL",
                      "  0        0        0        0        0        0        0"]
            blocks.append("\n".join(lines))
    if not blocks:
        sys.stderr.write("No matching job found\n")
        return 255
    print("\n" + ("\n" + "-" * 78 + "\n\n").join(blocks))
    return 0


def _expand_index_list(text: str) -> list[str]:
    """``"123[1-3,7]"`` -> ``123[1] 123[2] 123[3] 123[7]``: bkill's ``"job_ID[index_list]"``, the index list
    of ``bsub -J`` (``start[-end[:step]]``, comma-separated); bkill then reports element by element. Any
    other word is left as it is."""
    match = re.fullmatch(r"(\d+)\[([\d,:\-]+)\]", text)
    if not match or not re.fullmatch(r"\d+(-\d+(:\d+)?)?(,\d+(-\d+(:\d+)?)?)*", match.group(2)):
        return [text]
    out: list[str] = []
    for part in match.group(2).split(","):
        span, _, step = part.partition(":")
        start, _, end = span.partition("-")
        out.extend(f"{match.group(1)}[{i}]" for i in range(int(start), int(end or start) + 1, int(step or 1)))
    return out


def bkill(args: list[str]) -> int:
    root = core.state_dir()
    try:
        core.check_up(root)
    except core.Down:
        return down("bkill")
    code = 0
    for text in [t for a in args if not a.startswith("-") for t in _expand_index_list(a)]:
        meta, k = _lookup(root, text)
        if meta is None:
            print(f"Job <{text}>: No matching job found")
            code = 255
            continue
        els = core.elements(root, meta)
        if (k is None and core.finished_at(els) is not None) or (k is not None and els[k]["state"] == "done"):
            print(f"Job <{text}>: Job has already finished")
            code = 255
            continue
        core.request_cancel(root, meta["seq"], k)
        print(f"Job <{text}> is being terminated")
    return code


def lsid(args: list[str]) -> int:
    print(f"IBM Spectrum LSF Standard {VERSION}, Jan 20 2022\nCopyright International Business Machines Corp. "
          "1992, 2016.\n\nMy cluster name is emucluster\nMy master name is localhost")
    return 0


def bparams(args: list[str]) -> int:
    root = core.state_dir()
    try:
        core.check_up(root)
    except core.Down:
        return down("bparams")
    print("System default parameters:\n    DEFAULT_QUEUE = normal\n    MBD_SLEEP_TIME = 10\n"
          f"    CLEAN_PERIOD = {int(clean_period())}\n"
          f"    MAX_JOB_ARRAY_SIZE = {os.environ.get('WLM_EMU_MAX_ARRAY', '1000')}\n    MAX_JOBID = 999999"
          + (f"\n    MAX_PEND_JOBS = {os.environ['WLM_EMU_MAX_PEND_JOBS']}" if os.environ.get("WLM_EMU_MAX_PEND_JOBS")
             else ""))
    return 0


def badmin(args: list[str]) -> int:
    if args[:2] != ["showconf", "mbd"]:
        sys.stderr.write("badmin: this emulator knows only 'badmin showconf mbd'\n")
        return 255
    print(f"MBD configuration at {_when(time.time())} 2026\n    LSF_CONFDIR=/etc/lsf\n"
          f"    LSF_UNIT_FOR_LIMITS={os.environ.get('WLM_EMU_LSF_UNIT', 'MB')}\n    LSB_JOB_MEMLIMIT=Y")
    return 0


def main(prog: str, args: list[str]) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    return {"bsub": bsub, "bjobs": bjobs, "bhist": bhist, "bkill": bkill, "lsid": lsid, "bparams": bparams,
            "badmin": badmin}[prog](args)
