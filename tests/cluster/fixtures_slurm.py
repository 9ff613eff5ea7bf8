"""The real Slurm test cluster as a pytest fixture, in both of its modes.

``slurm_cluster`` is session-scoped and parametrized over ``plain`` (no
accounting) and ``accounting`` (slurmdbd + MariaDB): every test using it runs
against both, and pytest groups the tests by mode so the cluster switches
mode once. A test that needs one mode only parametrizes it indirectly:
``@pytest.mark.parametrize("slurm_cluster", ["accounting"], indirect=True)``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("slurm.sh")


@dataclass(frozen=True)
class SlurmCluster:
    mode: str
    partition: str = "debug"
    bad_partition: str = "drained"  # exists, State=DOWN: jobs pend with reason PartitionDown
    account: str = "reflowtest_acct"

    @property
    def accounting(self) -> bool:
        return self.mode == "accounting"


def _unavailable() -> str | None:
    if os.getuid() != 0:
        return "the Slurm test cluster needs root (it starts munged, slurmctld and slurmd)"
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        return "no Slurm and no apt-get to install it"
    return None


#: Where slurm.sh records the mode it last started the cluster in (any process's switch rewrites it).
MODE_MARK = Path("/var/lib/reflow-test-slurm/mode")


def _marked_mode() -> str | None:
    try:
        return MODE_MARK.read_text().strip()
    except OSError:
        return None


#: The mode this test process last put the cluster in (only start_slurm changes it, under the cluster lock).
_current: dict[str, str | None] = {"mode": None}


def start_slurm(mode: str) -> SlurmCluster:
    """Start (or switch) the test cluster to *mode*; skips the test where that is impossible.

    Two fixtures drive the one cluster (``slurm_cluster`` and the scheduler registry's
    ``wlm``), so each test re-asserts its mode; that costs nothing when it is already set.
    """
    if _current["mode"] == mode and _marked_mode() == mode:
        return SlurmCluster(mode=mode)
    why = _unavailable()
    if why:
        pytest.skip(why)
    args = [str(SCRIPT), "start"] + (["--accounting"] if mode == "accounting" else [])
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{' '.join(args)} did not finish within 15 minutes")
    if result.returncode != 0:
        pytest.skip(f"cannot start the Slurm test cluster ({mode}): {(result.stderr or result.stdout)[-1500:]}")
    _current["mode"] = mode
    return SlurmCluster(mode=mode)


@pytest.fixture(scope="session", params=["plain", "accounting"], ids=["slurm-plain", "slurm-acct"])
def slurm_cluster(request: pytest.FixtureRequest) -> SlurmCluster:
    return start_slurm(request.param)


@pytest.fixture(autouse=True)
def _slurm_mode_guard(request: pytest.FixtureRequest) -> None:
    """A test on ``slurm_cluster`` gets its mode even if another fixture switched the cluster since."""
    if "slurm_cluster" in request.fixturenames:
        start_slurm(request.getfixturevalue("slurm_cluster").mode)
