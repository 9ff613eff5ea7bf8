"""The emulated scheduler environments (PBS, LSF, Flux) as engine tests use them.

Each one puts its emulator's commands first on a daemon's PATH and gives it a
private state directory, so the whole engine path (render, submit, query,
parse, results, cancel, restart and adopt by tag) runs against commands that
behave as the systems' manuals say.
"""

from __future__ import annotations

from typing import Any

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _core  # noqa: E402
import flux_emu  # noqa: E402

SCHEDULERS = ("pbs", "lsf", "flux")

#: The command that cancels one job from outside reflow, as a user would type it.
_CANCEL = {"pbs": ["qdel"], "lsf": ["bkill"], "flux": ["flux", "cancel"]}

#: A fragment of the reason reflow shows for a job cancelled from outside, per system.
CANCELLED_REASON = {"pbs": "terminated", "lsf": "TERM_OWNER", "flux": "cancel"}

#: What a job id looks like as reflow shows it (``<id>`` or ``<id>_<k>``), per system.
JOB_ID = {"pbs": r"\d+(\[\])?\.emuserver(_\d+)?", "lsf": r"\d+(_\d+)?", "flux": r"ƒ[1-9A-HJ-NP-Za-km-z]+(_\d+)?"}

#: Submit options naming a queue the emulator does not have, and a fragment of the refusal.
BAD_QUEUE = {"pbs": ({"queue": "no_such_queue"}, "Unknown queue"),
             "lsf": ({"queue": "no_such_queue"}, "No such queue"),
             "flux": ({"queue": "no_such_queue"}, "Invalid queue")}


@dataclass
class EmulatedScheduler:
    """One emulator with its own state directory."""

    kind: str
    state: Path
    slots: int = 4

    @property
    def bin_dir(self) -> Path:
        return HERE / self.kind

    def env(self) -> dict[str, str]:
        return {"PATH": os.pathsep.join([str(self.bin_dir), str(self._python_dir()), os.environ.get("PATH", "")]),
                "WLM_EMU_STATE": str(self.state), "WLM_EMU_SLOTS": str(self.slots)}

    def _python_dir(self) -> Path:
        """A directory whose ``python3`` is this interpreter, for the commands' ``#!/usr/bin/env python3``.

        Every command the daemon runs is a Python start; through a version manager's shim (pyenv's is a
        shell script that runs more processes) each costs twice the CPU.
        """
        bin_dir = self.state / ".python-bin"
        python = bin_dir / "python3"
        if not python.exists():
            bin_dir.mkdir(parents=True, exist_ok=True)
            python.symlink_to(sys.executable)
        return bin_dir

    def config(self, python: str, **extra: object) -> str:
        """A config.toml whose default cluster is this emulator, polled often (tests must be quick)."""
        lines = ["[defaults]", 'cluster = "emu"', "", "[clusters.emu]", f'scheduler = "{self.kind}"',
                 f'python = "{python}"', "min_poll_interval = 0.3", "poll_interval = 1", "max_poll_interval = 2",
                 "max_calls_per_minute = 600", "lost_grace = 10"]
        for key, value in extra.items():
            lines.append(f"{key} = {value!r}" if not isinstance(value, str) or not value.startswith("{")
                         else f"{key} = {value}")
        return "\n".join(lines) + "\n"

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), env={**os.environ, **self.env()}, capture_output=True, text=True,
                              timeout=60)

    def cancel_outside(self, job_id: str) -> subprocess.CompletedProcess[str]:
        return self.run(*_CANCEL[self.kind], job_id)

    def set_down(self, down: bool) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        marker = self.state / "down"
        if down:
            marker.write_text("down")
        elif marker.exists():
            marker.unlink()

    def submissions_by_name(self) -> Counter[str]:
        """How many times each job name was submitted (Flux bulk jobs are named ``<tag>.<cc>``)."""
        names: Counter[str] = Counter()
        if (self.state / "jobs").exists():
            for meta in _core.jobs(self.state):
                names[meta["name"]] += 1
        return names

    def live(self, job_ids: Collection[str]) -> bool:
        """Whether any of these jobs (ids as reflow shows them, elements ``<id>_<k>`` included) still runs."""
        if not (self.state / "jobs").exists():
            return False
        wanted: set[int] = set()
        for job_id in job_ids:
            head = job_id.rpartition("_")[0] if job_id.rpartition("_")[2].isdigit() else job_id
            if self.kind == "flux":
                value = flux_emu.parse_id(head)
                wanted.update(m["seq"] for m in _core.jobs(self.state) if value is not None
                              and (m.get("flux_id") == value or m["name"].startswith(self._flux_tag(value))))
            elif head.split("[")[0].split(".")[0].isdigit():
                wanted.add(int(head.split("[")[0].split(".")[0]))
        return any(e["state"] != "done" for m in _core.jobs(self.state) if m["seq"] in wanted
                   for e in _core.elements(self.state, m))

    def meta(self, job_id: str) -> dict[str, Any]:
        """The emulated scheduler's own record of a job (limits as it holds them), by the id reflow shows."""
        head = job_id.rpartition("_")[0] if job_id.rpartition("_")[2].isdigit() else job_id
        for meta in _core.jobs(self.state):
            if self.kind == "flux":
                if meta.get("flux_id") == flux_emu.parse_id(head):
                    return meta
            elif str(meta["seq"]) == head.split("[")[0].split(".")[0]:
                return meta
        raise KeyError(f"no emulated job {job_id}")

    def _flux_tag(self, value: int) -> str:
        """The tag a Flux job (and so its whole bulk submission) carries in its name."""
        for meta in _core.jobs(self.state):
            if meta.get("flux_id") == value:
                return meta["name"].rpartition(".")[0] + "." if "." in meta["name"] else meta["name"] + "\0"
        return "\0"

    def all_elements_done(self) -> bool:
        if not (self.state / "jobs").exists():
            return True
        return all(e["state"] == "done" for m in _core.jobs(self.state) for e in _core.elements(self.state, m))

    def close(self) -> None:
        if self.state.exists():
            _core.kill_everything(self.state)
