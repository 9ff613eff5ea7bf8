"""Test equipment: a tiny batch system on local processes, shared by the PBS, LSF and Flux emulators.

The emulators' command-line front ends (``pbs_emu.py``, ``lsf_emu.py``,
``flux_emu.py``) implement each system's documented commands and output
formats; this module only keeps jobs on disk and runs them. It imports
nothing from reflow: the emulators follow the manuals, not the adapters.

State lives under ``$WLM_EMU_STATE``:

    seq                       last job sequence number (guarded by ``lock``)
    down                      present: the controller does not answer
    slots/<i>.lock            flock'ed by a running element (``$WLM_EMU_SLOTS`` of them, default 4)
    jobs/<seq>/meta.json      the submission (name, elements, limits, command, environment, ...)
    jobs/<seq>/el/<k>.json    element k: running (pid, start) or done (exit, end, reason)
    jobs/<seq>/cancel[.<k>]   a cancel request for the whole job or element k
    jobs/<seq>/runner.pid     the detached process that runs the job's elements

Each submission gets one detached runner (``python3 _core.py run <seq>``)
that starts elements as slots and the array limit allow, enforces the time
limit (SIGTERM, SIGKILL two seconds later) and carries out cancels.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


class Down(Exception):
    """The emulated controller is not answering."""


def state_dir() -> Path:
    path = os.environ.get("WLM_EMU_STATE")
    if not path:
        sys.stderr.write("emulator: WLM_EMU_STATE is not set\n")
        raise SystemExit(2)
    root = Path(path)
    (root / "jobs").mkdir(parents=True, exist_ok=True)
    (root / "slots").mkdir(exist_ok=True)
    return root


def check_up(root: Path) -> None:
    if (root / "down").exists():
        raise Down()


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def next_seq(root: Path, start: int = 100) -> int:
    with open(root / "lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        seq_file = root / "seq"
        seq = int(seq_file.read_text()) + 1 if seq_file.exists() else start
        seq_file.write_text(str(seq))
        return seq


def submit(root: Path, meta: dict[str, Any]) -> int:
    """Record a job and start its runner; returns the sequence number."""
    return submit_many(root, [meta])[0]


def submit_many(root: Path, metas: list[dict[str, Any]]) -> list[int]:
    """Record several jobs (a Flux bulk submission) run by one runner process."""
    seqs = []
    for meta in metas:
        seq = int(meta["seq"]) if "seq" in meta else next_seq(root)
        meta["seq"] = seq
        meta.setdefault("submit_time", time.time())
        job = root / "jobs" / str(seq)
        (job / "el").mkdir(parents=True, exist_ok=True)
        write_json(job / "meta.json", meta)
        seqs.append(seq)
    with open(os.devnull, "rb") as devnull_in, open(root / "jobs" / str(seqs[0]) / "runner.log", "ab") as log:
        subprocess.Popen([sys.executable, os.path.abspath(__file__), "run", *map(str, seqs)], stdin=devnull_in,
                         stdout=log, stderr=log, start_new_session=True, close_fds=True,
                         env={**os.environ, "WLM_EMU_STATE": str(root)})
    return seqs


def jobs(root: Path) -> list[dict[str, Any]]:
    out = []
    for entry in sorted((root / "jobs").iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else 0):
        meta = read_json(entry / "meta.json")
        if meta is not None:
            out.append(meta)
    return out


def job(root: Path, seq: int) -> dict[str, Any] | None:
    return read_json(root / "jobs" / str(seq) / "meta.json")


def count(meta: dict[str, Any]) -> int:
    return max(1, int(meta.get("n") or 0))


def element(root: Path, seq: int, k: int) -> dict[str, Any]:
    """``{"state": "queued" | "running" | "done", ...}`` for element *k* of job *seq*."""
    rec = read_json(root / "jobs" / str(seq) / "el" / f"{k}.json")
    if rec is None:
        return {"state": "queued"}
    return rec


def elements(root: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    return [element(root, meta["seq"], k) for k in range(count(meta))]


def finished_at(els: list[dict[str, Any]]) -> float | None:
    if all(e["state"] == "done" for e in els):
        return max(e.get("end", 0.0) for e in els)
    return None


def request_cancel(root: Path, seq: int, k: int | None = None) -> None:
    name = "cancel" if k is None else f"cancel.{k}"
    (root / "jobs" / str(seq) / name).write_text(str(time.time()))


# ---------------------------------------------------------------------- runner


def _try_slot(root: Path, slots: int) -> Any:
    for i in range(slots):
        fh = open(root / "slots" / f"{i}.lock", "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fh
        except OSError:
            fh.close()
    return None


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run(seqs: list[int]) -> None:
    """Run the elements of jobs *seqs* as slots, each job's array limit and time limit allow."""
    root = state_dir()
    metas = {seq: read_json(root / "jobs" / str(seq) / "meta.json") for seq in seqs}
    for seq in seqs:
        (root / "jobs" / str(seq) / "runner.pid").write_text(str(os.getpid()))
    slots = int(os.environ.get("WLM_EMU_SLOTS", "4"))
    pending = [(seq, k) for seq in seqs for k in range(count(metas[seq]))]
    running: dict[tuple[int, int], dict[str, Any]] = {}
    while pending or running:
        now = time.time()
        for seq, k in list(pending):
            jobdir = root / "jobs" / str(seq)
            if (jobdir / "cancel").exists() or (jobdir / f"cancel.{k}").exists():
                pending.remove((seq, k))
                write_json(jobdir / "el" / f"{k}.json", {"state": "done", "exit": None, "end": now,
                                                         "reason": "cancelled", "started": False})
        for (seq, k), slot in list(running.items()):
            jobdir = root / "jobs" / str(seq)
            proc = slot["proc"]
            walltime = metas[seq].get("walltime")
            if slot["reason"] is None:
                if (jobdir / "cancel").exists() or (jobdir / f"cancel.{k}").exists():
                    slot["reason"], slot["kill_at"] = "cancelled", now + 2.0
                    _killpg(proc.pid, signal.SIGTERM)
                elif walltime and now - slot["start"] > float(walltime):
                    slot["reason"], slot["kill_at"] = "walltime", now + 2.0
                    _killpg(proc.pid, signal.SIGTERM)
            elif now > slot["kill_at"]:
                _killpg(proc.pid, signal.SIGKILL)
            code = proc.poll()
            if code is not None:
                write_json(jobdir / "el" / f"{k}.json", {"state": "done", "exit": code, "end": time.time(),
                                                         "start": slot["start"], "pid": proc.pid,
                                                         "reason": slot["reason"], "started": True})
                slot["fh"].close()
                del running[(seq, k)]
        for seq, k in list(pending):
            meta = metas[seq]
            if meta.get("urgency") == 0:  # held
                continue
            limit = int(meta.get("limit") or count(meta))
            if sum(1 for s, _ in running if s == seq) >= limit:
                continue
            fh = _try_slot(root, slots)
            if fh is None:
                break
            pending.remove((seq, k))
            running[(seq, k)] = _start(root, root / "jobs" / str(seq), meta, k, fh)
        time.sleep(0.1)


def _start(root: Path, jobdir: Path, meta: dict[str, Any], k: int, fh: Any) -> dict[str, Any]:
    env = {**meta.get("env", {}), **{key: str(v).replace("{k}", str(k + int(meta.get("index_base", 0))))
                                       for key, v in meta.get("element_env", {}).items()}}
    out_path = str(meta.get("out") or os.devnull).replace("{k}", str(k + int(meta.get("index_base", 0))))
    err_path = str(meta.get("err") or out_path).replace("{k}", str(k + int(meta.get("index_base", 0))))
    argv = [a.replace("{k}", str(k + int(meta.get("index_base", 0)))) for a in meta["argv"]]
    out = open(out_path, "ab")
    err = out if err_path == out_path else open(err_path, "ab")
    with open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(argv, cwd=meta.get("cwd") or os.environ.get("HOME", "/"), env=env, stdin=devnull,
                                stdout=out, stderr=err, start_new_session=True)
    out.close()
    if err is not out:
        err.close()
    start = time.time()
    write_json(jobdir / "el" / f"{k}.json", {"state": "running", "pid": proc.pid, "start": start})
    return {"proc": proc, "fh": fh, "start": start, "reason": None, "kill_at": 0.0}


def kill_everything(root: Path) -> None:
    """Test teardown: stop every runner and element this state directory started."""
    for entry in (root / "jobs").iterdir() if (root / "jobs").exists() else []:
        for k_file in (entry / "el").glob("*.json") if (entry / "el").exists() else []:
            rec = read_json(k_file)
            if rec and rec.get("state") == "running":
                _killpg(int(rec["pid"]), signal.SIGKILL)
        pid_file = entry / "runner.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError, PermissionError):
                pass


def parse_duration(text: str) -> int:
    """``[[H:]M:]S`` -> seconds."""
    parts = [int(p) for p in text.split(":")]
    total = 0
    for p in parts:
        total = total * 60 + p
    return total


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "run":
        run([int(a) for a in sys.argv[2:]])
