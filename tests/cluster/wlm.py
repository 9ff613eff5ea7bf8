"""The workload managers the behavioural engine tests run against, as one registry.

``tests/test_scheduler_engine.py`` is written once and parametrised over the
entries here: real Slurm (plain and with accounting) and real Grid Engine,
and PBS, LSF and Flux on their emulators (``tests/emulators/``). Each entry
says how to bring its scheduler up for a test, which ``[clusters.X]`` table
points reflowd at it, how to kill one of its jobs from outside (as a user or
admin would), which job names it knows (exactly-once checks by tag), and the
few facts in which systems honestly differ. Adding a scheduler is one more
``register(SchedulerEnv(...))`` call.

Tests choose entries by feature (``envs(feature)``), so a system that lacks
something (Grid Engine shows no pending reasons in ``qstat -xml``) is never
parametrised into that test rather than skipped -- under CI a skip fails the run.
"""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import pytest

from ..emulators.environments import BAD_QUEUE, CANCELLED_REASON, JOB_ID, EmulatedScheduler
from ..emulators.environments import SCHEDULERS as EMULATED
from .fixtures_sge import sge_job_names
from .fixtures_slurm import start_slurm


@dataclass(frozen=True)
class SchedulerEnv:
    """One workload manager as the behavioural tests see it."""

    #: Test id, e.g. "slurm-plain", "sge", "pbs-emu".
    name: str
    #: The ``scheduler =`` value of the cluster table.
    scheduler: str
    #: pytest marks every test on this entry carries (cluster marks make a CI skip fail the run).
    marks: tuple[pytest.MarkDecorator, ...]
    #: Bring the system up for one test (cheap when it is already up) and return a handle.
    start: Callable[[pytest.FixtureRequest], Any]
    #: Keys of the ``[clusters.X]`` table besides python and the poll settings.
    table: Callable[[Any], dict[str, Any]]
    #: Kill one job from outside (``scancel``, ``qdel`` ...), by the id reflow shows.
    kill_job: Callable[[Any, str], None]
    #: Job name -> how many distinct jobs the system knows under it (live and finished).
    job_names: Callable[[Any], Counter[str]]
    #: Whether any of these job ids is still queued or running.
    live_jobs: Callable[[Any, Collection[str]], bool]
    #: A fragment of the reason reflow shows for a job killed from outside.
    cancelled_reason: str
    #: Submit options naming a queue that does not exist, and a fragment of the refusal.
    bad_queue: tuple[dict[str, str], str]
    #: The state reflow concludes when the worker process itself is killed with SIGKILL.
    worker_kill_state: str = "failed"
    #: Environment for the daemon (e.g. PATH to an emulator's commands).
    env: Callable[[Any], dict[str, str]] = field(default=lambda handle: {})
    #: Optional behaviours this system has (see FEATURES).
    features: frozenset[str] = frozenset()
    #: Submit options that keep a job queued with a visible reason, and fragments one of which it shows.
    pending_reason: tuple[dict[str, str], tuple[str, ...]] | None = None
    #: Submit options naming an account/project the system refuses, and a fragment of the refusal.
    bad_account: tuple[dict[str, str], str] | None = None
    #: What a job id reflow shows looks like (``<id>`` or an array element's ``<id>_<k>``): nothing in
    #: reflow may assume integers.
    job_id: str = r"\d+(_\d+)?"
    #: Poll settings of the cluster table (emulators answer at once: they are polled faster).
    poll: dict[str, float] = field(default_factory=lambda: dict(REAL_POLL))

    def has(self, feature: str) -> bool:
        return feature in self.features or getattr(self, feature, None) is not None


#: What a test may require of an entry.
FEATURES = {
    "pending_reason": "shows why a queued job waits (set the pending_reason field)",
    "bad_account": "refuses an unknown account/project at submission (set the bad_account field)",
    "time_limit": "the 1-minute time limit of tests/engine_workflows/slurmy.py is enforced as TIMEOUT",
    "ssh": "works through the loopback sshd (the commands are on the sshd user's PATH)",
}

#: Poll settings for a real cluster under test (a scheduler that must not be hammered).
REAL_POLL = {"min_poll_interval": 1, "poll_interval": 2, "max_poll_interval": 10, "lost_grace": 20}

REGISTRY: dict[str, SchedulerEnv] = {}


def register(env: SchedulerEnv) -> SchedulerEnv:
    unknown = env.features - set(FEATURES) - {"pending_reason", "bad_account"}
    if unknown:
        raise ValueError(f"{env.name}: unknown feature(s) {sorted(unknown)}")
    REGISTRY[env.name] = env
    return env


def envs(feature: str | None = None) -> list[Any]:
    """pytest params (with marks and ids) for the entries that have *feature*."""
    return [pytest.param(name, marks=env.marks, id=name) for name, env in REGISTRY.items()
            if feature is None or env.has(feature)]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------------- Slurm


def _slurm_names(handle: Any) -> Counter[str]:
    from ..support import slurm_job_names

    return slurm_job_names(handle.accounting)


def _slurm_live(handle: Any, ids: Collection[str]) -> bool:
    out = _run(["squeue", "-h", "-o", "%i", "-j", ",".join(sorted(ids))])
    return bool(out.stdout.strip())


def _slurm_kill(handle: Any, job_id: str) -> None:
    subprocess.run(["scancel", job_id], check=True, timeout=60)


def _slurm_env(mode: str) -> SchedulerEnv:
    marks = (pytest.mark.slurm,) + ((pytest.mark.slurm_accounting,) if mode == "accounting" else ())
    features = {"time_limit"} | (set() if mode == "accounting" else {"ssh"})
    return SchedulerEnv(
        name="slurm-acct" if mode == "accounting" else "slurm-plain",
        scheduler="slurm",
        marks=marks,
        start=lambda request: start_slurm(mode),
        table=lambda handle: {"scheduler": "slurm", "submit_options": {"partition": handle.partition}},
        kill_job=_slurm_kill,
        job_names=_slurm_names,
        live_jobs=_slurm_live,
        cancelled_reason="CANCELLED",
        bad_queue=({"partition": "no_such_partition"}, "partition"),
        features=frozenset(features),
        # "drained" exists with State=DOWN: jobs pend with reason PartitionDown.
        pending_reason=({"partition": "drained"}, ("Partition", "ReqNodeNotAvail")),
        # Accounts are enforced only with accounting.
        bad_account=({"account": "nobody_account"}, "account") if mode == "accounting" else None,
    )


register(_slurm_env("plain"))
register(_slurm_env("accounting"))


# ---------------------------------------------------------------------- Grid Engine


def _sge_live(handle: Any, ids: Collection[str]) -> bool:
    out = _run(["qstat", "-u", "*", "-xml"])
    if out.returncode != 0:
        raise AssertionError(f"qstat failed: {out.stderr}")
    listed = {j.findtext("JB_job_number") for j in ET.fromstring(out.stdout).iter("job_list")}
    return bool(listed & set(ids))


def _sge_kill(handle: Any, job_id: str) -> None:
    # reflow shows array element i of job J as J_i; Grid Engine calls it task i + 1 of J.
    job, _, element = job_id.partition("_")
    subprocess.run(["qdel", f"{job}.{int(element) + 1}" if element else job], check=True, timeout=60,
                   capture_output=True)


register(SchedulerEnv(
    name="sge",
    scheduler="sge",
    marks=(pytest.mark.sge,),
    start=lambda request: request.getfixturevalue("sge_cluster"),
    table=lambda handle: {"scheduler": "sge", "parallel_environment": handle.parallel_environment,
                          "submit_options": {"partition": handle.queue}},
    kill_job=_sge_kill,
    job_names=lambda handle: Counter(sge_job_names()),
    live_jobs=_sge_live,
    cancelled_reason="qdel",
    bad_queue=({"partition": "no_such.q"}, "unknown queue"),
    # Grid Engine's accounting records a qdel and any other SIGKILL alike (failed 100).
    worker_kill_state="cancelled",
    features=frozenset({"ssh"}),
    bad_account=({"account": "no_such_project"}, "project"),
))


# ---------------------------------------------------------------------- PBS, LSF, Flux (emulated)
#
# Not selected for them: ``ssh`` (the emulators are not on the sshd login's PATH;
# tests/test_wlm_ssh.py drives these adapters through the sshd with it set, as a
# site's login does), ``time_limit`` (the emulators enforce it, but the reason each
# system gives is its own text, not Slurm's TIMEOUT, and the parser tests cover it on
# recorded outputs), ``bad_account`` (the emulators accept any account, as sites
# without enforcement do). Only the Flux emulator can hold a job (``--urgency=0``).


def _emulator(kind: str, request: pytest.FixtureRequest) -> EmulatedScheduler:
    emu = EmulatedScheduler(kind, request.getfixturevalue("tmp_path") / "wlm", slots=10)
    request.addfinalizer(emu.close)
    return emu


def _cancel_outside(emu: EmulatedScheduler, job_id: str) -> None:
    result = emu.cancel_outside(job_id)
    assert result.returncode == 0, result.stderr


for _kind in EMULATED:
    register(SchedulerEnv(
        name=f"{_kind}-emu",
        scheduler=_kind,
        marks=(),
        start=lambda request, kind=_kind: _emulator(kind, request),
        table=lambda emu: {"scheduler": emu.kind, "max_calls_per_minute": 600},
        env=lambda emu: emu.env(),
        kill_job=_cancel_outside,
        job_names=lambda emu: emu.submissions_by_name(),
        live_jobs=lambda emu, ids: emu.live(ids),
        cancelled_reason=CANCELLED_REASON[_kind],
        bad_queue=BAD_QUEUE[_kind],
        job_id=JOB_ID[_kind],
        poll={"min_poll_interval": 0.3, "poll_interval": 1, "max_poll_interval": 2, "lost_grace": 10},
        pending_reason=({"native_args": "--urgency=0"}, ("held",)) if _kind == "flux" else None,
    ))


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session", params=list(REGISTRY), ids=list(REGISTRY))
def wlm_name(request: pytest.FixtureRequest) -> str:
    """Session-scoped so that pytest groups the tests of one scheduler together."""
    return request.param


@dataclass
class WLM:
    """One registry entry, brought up for this test."""

    env: SchedulerEnv
    handle: Any

    @property
    def name(self) -> str:
        return self.env.name

    def table(self, options: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        """The cluster table, with *options* merged into its submit_options."""
        table = {**self.env.table(self.handle), **extra}
        if options:
            table["submit_options"] = {**table.get("submit_options", {}), **options}
        return table

    def daemon_env(self) -> dict[str, str]:
        return self.env.env(self.handle)

    def kill_job(self, job_id: str) -> None:
        self.env.kill_job(self.handle, job_id)

    def job_names(self) -> Counter[str]:
        return self.env.job_names(self.handle)

    def live_jobs(self, ids: Collection[str]) -> bool:
        return self.env.live_jobs(self.handle, ids)

    def tags_used_once(self) -> None:
        names = self.job_names()
        twice = {name: n for name, n in names.items() if name.startswith("rf") and n != 1}
        assert not twice, f"{self.name}: submission tags used by more than one job: {twice}"


@pytest.fixture
def wlm(wlm_name: str, request: pytest.FixtureRequest) -> WLM:
    env = REGISTRY[wlm_name]
    return WLM(env, env.start(request))


def cluster_table(name: str, table: dict[str, Any]) -> str:
    """``[clusters.NAME]`` TOML for a flat table (strings, numbers, one level of inline tables)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return str(v)
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    return f"[clusters.{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in table.items())


__all__ = ["REGISTRY", "FEATURES", "SchedulerEnv", "WLM", "register", "envs", "cluster_table"]
