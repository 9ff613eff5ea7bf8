"""Every command in docs/user-guide.md, run in order as a user would type it (issue #11's "Done when").

A ``console`` block's ``$ `` lines are commands; ``# exit N`` at the end of a
line is the exit code the guide promises (0 otherwise). They run in bash, in a
scratch directory with the examples, a private reflowd (started by the first
``submit``, as a user's would be) and a private HOME.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from .support import ROOT, DaemonProcess, wait_for

GUIDE = ROOT / "docs" / "user-guide.md"


def guide_commands(text: str) -> list[tuple[str, int]]:
    commands = []
    for block in re.findall(r"^```console\n(.*?)^```", text, re.S | re.M):
        for line in block.splitlines():
            if line.startswith("$ "):
                m = re.search(r"\s+# exit (\d+)$", line)
                commands.append((line[2:] if not m else line[2: m.start()], int(m.group(1)) if m else 0))
    return commands


def test_every_command_in_the_user_guide_runs(tmp_path: Path) -> None:
    commands = guide_commands(GUIDE.read_text())
    assert len(commands) >= 30, "the guide shows the commands as typed"
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    home = tmp_path / "home"
    home.mkdir()
    d = DaemonProcess(tmp_path / "daemon", config='[clusters.local]\nscheduler = "local"\nmax_workers = 4\n')
    env = {**d.env, "HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "REFLOW_LOG_LEVEL": "info"}
    try:
        for command, expected in commands:
            result = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=work, env=env,
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == expected, (command, result.returncode, result.stdout[-2000:],
                                                   result.stderr[-2000:])
            if expected:  # one error line last (after the usage, for a usage error); a traceback only with --debug
                lines = result.stderr.strip().splitlines()
                assert re.match(r"reflow-client( \w+)?: error: ", lines[-1]), (command, result.stderr)
                assert ("Traceback" in result.stderr) == ("--debug" in command), (command, result.stderr)
    finally:
        subprocess.run([sys.executable, "-m", "reflow_client.cli", "shutdown"], env=env, capture_output=True,
                       timeout=60)
        wait_for(lambda: not d.socket.exists(), timeout=60, what="the guide's reflowd to stop")
    assert "reflow-client completion bash" in (home / ".bashrc").read_text()
    assert (home / ".config" / "fish" / "completions" / "reflow-client.fish").read_text().strip()
