"""The real Son of Grid Engine test cluster as a pytest fixture (``tests/cluster/sge.sh``).

``sge_cluster`` is session-scoped: the first test that needs it starts (or
takes over) the single-node cluster -- qmaster, execd, queue ``all.q`` with a
parallel environment ``smp`` -- and every later test reuses it. Where it
cannot be started (not root, no apt-get) the tests are skipped with the
reason; under CI that skip fails the run (``tests/conftest.py``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("sge.sh")


@dataclass(frozen=True)
class SGECluster:
    queue: str = "all.q"
    parallel_environment: str = "smp"
    bad_queue: str = "no_such.q"

    def job_names(self) -> dict[str, int]:
        """How many jobs Grid Engine knows under each name: live (qstat) and finished (qacct)."""
        return sge_job_names()


def _unavailable() -> str | None:
    if os.getuid() != 0:
        return "the Grid Engine test cluster needs root (it starts sge_qmaster and sge_execd)"
    if shutil.which("apt-get") is None and not os.path.exists("/usr/sbin/sge_qmaster"):
        return "no Grid Engine and no apt-get to install it"
    return None


@pytest.fixture(scope="session")
def sge_cluster() -> SGECluster:
    why = _unavailable()
    if why:
        pytest.skip(why)
    action = "start" if os.path.exists("/usr/sbin/sge_qmaster") else "install"
    try:
        result = subprocess.run([str(SCRIPT), action], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{SCRIPT} {action} did not finish within 15 minutes")
    if result.returncode != 0:
        pytest.skip(f"cannot start the Grid Engine test cluster: {(result.stderr or result.stdout)[-1500:]}")
    return SGECluster()


def sge_job_names() -> dict[str, int]:
    """Job name -> number of distinct job ids, over qstat (live) and the accounting file (finished)."""
    ids: dict[str, set[str]] = {}
    out = subprocess.run(["qstat", "-u", "*", "-xml"], capture_output=True, text=True, timeout=60)
    import xml.etree.ElementTree as ET

    if out.returncode == 0 and out.stdout.strip():
        for job in ET.fromstring(out.stdout).iter("job_list"):
            ids.setdefault(job.findtext("JB_name") or "", set()).add(job.findtext("JB_job_number") or "")
    accounting = Path("/var/lib/gridengine/default/common/accounting")
    if accounting.exists():
        # Colon-separated; field 5 is the job name, field 6 the job number (accounting(5)).
        for line in accounting.read_text(errors="replace").splitlines():
            if line.startswith("#"):
                continue
            fields = line.split(":")
            if len(fields) > 6:
                ids.setdefault(fields[4], set()).add(fields[5])
    return {name: len(jobs) for name, jobs in ids.items()}
