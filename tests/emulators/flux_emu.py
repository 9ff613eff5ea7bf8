"""Flux emulator: ``flux submit``, ``flux jobs``, ``flux cancel`` and ``flux version`` as the
flux-core manual pages (flux-submit(1), flux-jobs(1), flux-cancel(1)) document them (test
equipment; see ``_core.py``).

Covered: ``flux submit [options] COMMAND...`` printing F58 job ids, ``--cc``/
``--bcc`` bulk submission with ``{cc}`` replaced in options and the command
and ``FLUX_JOB_CC`` set (``--cc``), ``--job-name``, ``--cwd``, ``-t`` (minutes
or FSD), ``--output``/``--error``, ``-q`` (queues ``$WLM_EMU_QUEUES``,
default ``batch,debug``), ``--urgency`` (0 holds); ``flux jobs [-a] [-n]
[-c N] [-o FORMAT] [--name] [JOBID...]`` with Python format fields, job ids
accepted in any encoding and ``JobID <id> unknown`` on stderr for unknown ones;
``flux cancel JOBID...``. Bulk submissions print ids in reverse order, as
asynchronous submission may.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import _core as core

VERSION = os.environ.get("WLM_EMU_FLUX_VERSION", "0.61.2")
_F58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def f58(value: int) -> str:
    digits = ""
    while True:
        value, rem = divmod(value, 58)
        digits = _F58[rem] + digits
        if value == 0:
            return "ƒ" + digits


def parse_id(text: str) -> int | None:
    raw = text.strip()
    if raw[:1] in ("ƒ", "f") and len(raw) > 1 and all(c in _F58 for c in raw[1:]):
        value = 0
        for c in raw[1:]:
            value = value * 58 + _F58.index(c)
        return value
    if raw.isdigit():
        return int(raw)
    if re.fullmatch(r"0x[0-9a-fA-F]+", raw):
        return int(raw, 16)
    if re.fullmatch(r"[0-9a-fA-F]{4}(\.[0-9a-fA-F]{4}){3}", raw):
        return int(raw.replace(".", ""), 16)
    return None


class JobID(int):
    """A job id that formats as decimal and offers the documented encodings as attributes."""

    @property
    def f58(self) -> str:
        return f58(int(self))

    @property
    def f58plain(self) -> str:
        return "f" + f58(int(self))[1:]

    @property
    def dec(self) -> str:
        return str(int(self))

    @property
    def hex(self) -> str:
        return hex(int(self))

    @property
    def dothex(self) -> str:
        h = f"{int(self):016x}"
        return ".".join(h[i:i + 4] for i in range(0, 16, 4))


class Bag:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)

    def __format__(self, spec: str) -> str:
        return format("", spec)


def broker_down(prog: str) -> int:
    sys.stderr.write(f"flux-{prog}: ERROR: Unable to connect to Flux: broker socket /run/flux/local was not found\n")
    return 1


# ---------------------------------------------------------------------- submit

_WITH_ARG = {"--job-name", "--cwd", "--ntasks", "--cores-per-task", "--time-limit", "--output", "--error", "--queue",
             "--setattr", "--setopt", "--signal", "--cc", "--bcc", "--urgency", "--nodes", "--gpus-per-task",
             "--dependency", "--begin-time", "--env", "--log", "--log-stderr", "--taskmap", "--flags"}
_SHORT = {"-n": "--ntasks", "-c": "--cores-per-task", "-t": "--time-limit", "-q": "--queue", "-S": "--setattr",
          "-o": "--setopt", "-N": "--nodes", "-g": "--gpus-per-task"}
_FLAGS = {"--quiet", "--wait", "--exclusive", "--unbuffered", "-u", "-v", "--verbose", "--debug"}


def _idset(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        elif part:
            out.append(int(part))
    return out


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text)
    if not match:
        raise ValueError(f"invalid Flux standard duration '{text}'")
    value = float(match.group(1))
    return value * {"": 60, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def submit(args: list[str]) -> int:
    root = core.state_dir()
    try:
        core.check_up(root)
    except core.Down:
        return broker_down("submit")
    opts: dict[str, list[str]] = {}
    flags: set[str] = set()
    i = 0
    while i < len(args) and args[i].startswith("-"):
        word = args[i]
        name, eq, value = word.partition("=")
        name = _SHORT.get(name, name)
        if name in _WITH_ARG:
            if not eq:
                if i + 1 >= len(args):
                    sys.stderr.write(f"flux-submit: error: argument {name}: expected one argument\n")
                    return 2
                value = args[i + 1]
                i += 1
            opts.setdefault(name, []).append(value)
        elif name in _FLAGS:
            flags.add(name)
        else:
            sys.stderr.write(f"usage: flux submit [OPTIONS...] COMMAND [ARGS...]\nflux-submit: error: "
                             f"unrecognized arguments: {word}\n")
            return 2
        i += 1
    command = args[i:]
    if not command:
        sys.stderr.write("flux-submit: ERROR: job command and arguments are missing\n")
        return 1
    queue = (opts.get("--queue") or [None])[-1]
    queues = os.environ.get("WLM_EMU_QUEUES", "batch,debug").split(",")
    if queue is not None and queue not in queues:
        sys.stderr.write(f"flux-submit: ERROR: [Errno 22] Invalid queue '{queue}' specified\n")
        return 1
    try:
        limit = _seconds(opts["--time-limit"][-1]) if "--time-limit" in opts else None
    except ValueError as exc:
        sys.stderr.write(f"flux-submit: ERROR: {exc}\n")
        return 1
    for attr in opts.get("--setattr", []):
        if not re.fullmatch(r"[\w.^]+(=.*)?", attr):
            sys.stderr.write(f"flux-submit: ERROR: invalid --setattr {attr!r}\n")
            return 1
    cc = opts.get("--cc") or opts.get("--bcc")
    ccs: list[int | None] = list(_idset(cc[-1])) if cc else [None]
    base_env = dict(os.environ)
    ids: list[str] = []
    metas: list[dict[str, Any]] = []
    for c in ccs:
        def sub(text: str, c: int | None = c) -> str:
            return text.replace("{cc}", "" if c is None else str(c))

        seq = core.next_seq(root, start=1)
        value = ((int(time.time() * 1000) % (1 << 32)) << 24) | (seq & 0xFFFFFF)
        env = {**base_env, "FLUX_JOB_ID": f58(value)}
        if c is not None and "--cc" in opts:
            env["FLUX_JOB_CC"] = str(c)
        out = sub((opts.get("--output") or [os.devnull])[-1])
        err = sub((opts.get("--error") or [out])[-1])
        urgency = int((opts.get("--urgency") or ["16"])[-1].replace("hold", "0").replace("default", "16"))
        metas.append({
            "seq": seq, "system": "flux", "flux_id": value, "name": sub((opts.get("--job-name") or
                                                                         [os.path.basename(command[0])])[-1]),
            "n": 0, "walltime": limit, "queue": queue or "", "argv": [sub(a) for a in command], "env": env,
            "out": out.replace("{{id}}", f58(value)), "err": err.replace("{{id}}", f58(value)),
            "cwd": sub((opts.get("--cwd") or [os.getcwd()])[-1]), "urgency": urgency,
        })
        ids.append(f58(value))
    core.submit_many(root, metas)
    if "--quiet" not in flags:
        print("\n".join(reversed(ids)))
    return 0


# ---------------------------------------------------------------------- jobs


def _info(root: Path, meta: dict[str, Any]) -> dict[str, Any]:
    el = core.element(root, meta["seq"], 0)
    state, result, code, exc_type, note = "SCHED", "", "", "", ""
    if el["state"] == "running":
        state = "RUN"
    elif el["state"] == "done":
        state = "INACTIVE"
        exit_code = el.get("exit")
        reason = el.get("reason")
        if reason == "cancelled":
            result, exc_type, note = "CANCELED", "cancel", ""
            code = "-128" if not el.get("started") else str(exit_code)
        elif reason == "walltime":
            result, exc_type, note = "TIMEOUT", "timeout", "resource allocation expired"
            code = str(exit_code)
        else:
            result = "COMPLETED" if exit_code == 0 else "FAILED"
            code = str(exit_code)
    abbrev = {"COMPLETED": "CD", "FAILED": "F", "CANCELED": "CA", "TIMEOUT": "TO"}
    return {
        "id": JobID(meta["flux_id"]), "name": meta["name"], "state": state, "state_single": state[0],
        "result": result, "result_abbrev": abbrev.get(result, ""), "returncode": code,
        "status": result or state, "status_abbrev": abbrev.get(result, state[0]),
        "urgency": meta.get("urgency", 16), "priority": meta.get("urgency", 16),
        "userid": os.getuid(), "username": os.environ.get("USER", "user"), "queue": meta.get("queue", ""),
        "ntasks": 1, "success": "" if not result else str(result == "COMPLETED"),
        "exception": Bag(occurred="" if not result else str(bool(exc_type)), type=exc_type, note=note,
                         severity="0" if exc_type else ""),
        "t_submit": meta["submit_time"], "runtime": 0.0, "nodelist": "localhost" if el["state"] != "queued" else "",
    }


def _by_value(root: Path) -> dict[int, dict[str, Any]]:
    return {int(m["flux_id"]): m for m in core.jobs(root) if "flux_id" in m}


def jobs(args: list[str]) -> int:
    root = core.state_dir()
    try:
        core.check_up(root)
    except core.Down:
        return broker_down("jobs")
    fmt = "{id.f58:>12} {username:<8.8} {name:<10.10} {status_abbrev:>2.2} {ntasks:>6} {nodelist}"
    show_all = no_header = False
    name_filter = None
    count = 1000
    ids: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        key, eq, value = word.partition("=")
        if key in ("-o", "--format", "-c", "--count", "--name", "-f", "--filter", "-u", "--user"):
            if not eq:
                value = args[i + 1]
                i += 1
            if key in ("-o", "--format"):
                fmt = value
            elif key in ("-c", "--count"):
                count = int(value)
            elif key == "--name":
                name_filter = value
            elif key in ("-f", "--filter"):
                show_all = show_all or "inactive" in value.lower()
        elif word in ("-a", "-A"):
            show_all = True
        elif word in ("-n", "--no-header", "--suppress-header"):
            no_header = True
        elif word.startswith("-"):
            sys.stderr.write(f"flux-jobs: error: unrecognized arguments: {word}\n")
            return 2
        else:
            ids.append(word)
        i += 1
    table = _by_value(root)
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    if ids:
        for text in ids:
            value = parse_id(text)
            if value is None:
                sys.stderr.write(f"flux-jobs: error: argument JOBID: invalid JobID value: '{text}'\n")
                return 2
            if value not in table:
                errors.append(f"JobID {text} unknown")
                continue
            rows.append(_info(root, table[value]))
    else:
        for value in sorted(table, reverse=True):
            info = _info(root, table[value])
            if not show_all and info["state"] == "INACTIVE":
                continue
            if name_filter is not None and info["name"] != name_filter:
                continue
            rows.append(info)
        rows = rows[:count] if count > 0 else rows
    if not no_header and rows:
        print(re.sub(r"\{([\w.]+)[^}]*\}", lambda m: m.group(1).split(".")[0].upper(), fmt))
    for info in rows:
        print(fmt.format(**info))
    for e in errors:
        sys.stderr.write(f"flux-jobs: ERROR: {e}\n")
    return 1 if errors else 0


def cancel(args: list[str]) -> int:
    root = core.state_dir()
    try:
        core.check_up(root)
    except core.Down:
        return broker_down("cancel")
    table = _by_value(root)
    code = 0
    for text in [a for a in args if not a.startswith("-")]:
        value = parse_id(text)
        meta = table.get(value) if value is not None else None
        if meta is None:
            sys.stderr.write(f"flux-cancel: ERROR: {text}: unknown job id\n")
            code = 1
            continue
        if core.element(root, meta["seq"], 0)["state"] == "done":
            sys.stderr.write(f"flux-cancel: ERROR: {text}: job is inactive\n")
            code = 1
            continue
        core.request_cancel(root, meta["seq"])
    return code


def version(args: list[str]) -> int:
    print(f"commands:    \t\t{VERSION}\nlibflux-core:\t\t{VERSION}\nbuild-options:\t\t+hwloc==2.9.0+zmq==4.3.4")
    return 0


def main(prog: str, args: list[str]) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if not args:
        sys.stderr.write("usage: flux [OPTIONS] COMMAND ARGS\n")
        return 1
    commands = {"submit": submit, "jobs": jobs, "cancel": cancel, "version": version}
    if args[0] not in commands:
        sys.stderr.write(f"flux: '{args[0]}' is not a command known to this emulator\n")
        return 1
    return commands[args[0]](args[1:])
