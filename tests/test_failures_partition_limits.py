"""Partition limits as escalation caps, and the accounting-degraded flag (pure parts, on recorded outputs).

The real-cluster checks are in tests/test_failures_slurm.py (the time-limit test escalates on a partition
with MaxTime=2, and the probe is run against the test cluster there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from reflow_client.render import scheduler_health_lines
from reflow_client.retry import RetryPolicy
from reflowd.driver.health import AccountingHealth
from reflowd.engine import retry_policy
from reflowd.schedulers.base import Phase
from reflowd.schedulers import slurm_commands as sc

DATA = Path(__file__).parent / "data" / "slurm"


def read(name: str) -> str:
    return (DATA / name).read_text()


def test_the_test_clusters_partitions_have_no_time_limit_and_the_nodes_memory() -> None:
    # Recorded on tests/cluster/slurm.sh's cluster (before its `short` partition): MaxTime=UNLIMITED everywhere.
    limits, default = sc.parse_partition_limits(read("scontrol_show_partition.txt"), read("sinfo_node_memory.txt"))
    assert default == "debug"
    assert limits["debug"] == {"max_time": None, "max_mem": "24105M"}
    assert set(limits) == {"debug", "drained"}


def test_a_sites_partitions_give_time_and_memory_caps() -> None:
    limits, default = sc.parse_partition_limits(read("scontrol_show_partition_site.txt"),
                                                read("sinfo_node_memory_site.txt"))
    assert default == "compute"
    assert limits["compute"] == {"max_time": "2-00:00:00", "max_mem": "250000M"}  # the largest node's memory
    assert limits["short"] == {"max_time": "00:30:00", "max_mem": "64000M"}  # MaxMemPerNode is below the nodes'
    assert limits["bigmem"] == {"max_time": "7-00:00:00", "max_mem": "2000000M"}
    # Without sinfo's answer, the memory cap is what the partition itself says (or none).
    alone, _ = sc.parse_partition_limits(read("scontrol_show_partition_site.txt"))
    assert alone["short"]["max_mem"] == "64000M" and alone["compute"]["max_mem"] is None


def test_unreadable_lines_and_odd_values_are_skipped() -> None:
    limits, default = sc.parse_partition_limits("garbage\nPartitionName=p MaxTime=soon MaxMemPerNode=lots\n",
                                                "x|y\nn1|p|?\n")
    assert limits == {"p": {"max_time": None, "max_mem": None}} and default is None


PROBE = {"queue_caps": {"compute": {"max_time": "2-00:00:00", "max_mem": "250000M"},
                        "short": {"max_time": "00:30:00", "max_mem": "64000M"}},
         "default_queue": "compute"}


def test_caps_follow_the_partition_a_job_goes_to() -> None:
    caps = retry_policy.caps_from_probe
    assert caps(PROBE) == {"time": "2-00:00:00", "mem": "250000M"}  # the site's default partition
    assert caps(PROBE, "short") == {"time": "00:30:00", "mem": "64000M"}
    # A job that may run in several partitions is capped by the smallest (it must fit wherever it starts).
    assert caps(PROBE, "compute,short") == {"time": "00:30:00", "mem": "64000M"}
    assert caps({**PROBE, "max_time": "01:00:00"}, "unknown") == {"time": "01:00:00", "mem": None}
    assert caps(None) == {"time": None, "mem": None}
    # The task's partition wins over the cluster's (submit options of the cluster, then the task).
    assert retry_policy.queue_of({"partition": "compute"}, {"partition": "short"}) == "short"
    assert retry_policy.queue_of({"partition": "compute"}, None) == "compute"
    assert retry_policy.queue_of(None, {}) is None


def test_escalation_stops_at_the_partitions_limit() -> None:
    policy = RetryPolicy(escalate={"time": 4, "mem": 4})
    caps = retry_policy.caps_from_probe(PROBE, "short")
    d = retry_policy.decide(policy, cause={"kind": "time_limit"}, attempt=1, retries=2, history=[],
                            resources={"time": "00:10:00", "mem": "4G"}, caps=caps)
    assert d.retry and d.resources == {"time": "00:30:00"}, d
    d = retry_policy.decide(policy, cause={"kind": "out_of_memory"}, attempt=1, retries=2, history=[],
                            resources={"time": "00:10:00", "mem": "32G"}, caps=caps)
    assert d.resources == {"mem": "64000M"}, d


def test_accounting_health_says_since_when_and_why_and_recovers() -> None:
    h = AccountingHealth()
    assert h.to_dict() == {"state": "ok"}
    assert h.failed(100.0, "sacct: error: Problem talking to the database: Connection refused", "squeue") is True
    assert h.failed(110.0, "still down", "squeue") is False
    view = h.to_dict()
    assert view["state"] == "degraded" and view["since"] == 100.0 and view["last_error"] == "still down"
    assert view["fallback"] == "squeue" and view["failures"] == 2
    lines = scheduler_health_lines({"accounting_health": view})
    assert len(lines) == 1 and "ACCOUNTING DEGRADED since" in lines[0] and "still down" in lines[0]
    assert h.succeeded(130.0) is True and h.succeeded(131.0) is False
    assert h.to_dict() == {"state": "ok", "degraded_episodes": 1, "recovered_at": 130.0}
    assert scheduler_health_lines({"accounting_health": h.to_dict()}) == []


class Commands:
    """A transport answering Slurm commands from a table (``sacct`` fails while ``dbd_down``)."""

    def __init__(self) -> None:
        self.dbd_down = False
        self.ran: list[str] = []

    async def run(self, argv: list[str], *, timeout: float = 30.0, idempotent: bool = True) -> Any:
        from reflowd.transports.base import CommandResult

        self.ran.append(argv[0])
        if argv[0] == "sacct":
            if self.dbd_down:
                return CommandResult(1, "", "sacct: error: Problem talking to the database: Connection refused")
            return CommandResult(0, "7|rfa|RUNNING|0:0|None|n1\n", "")
        if argv[0] == "squeue":
            return CommandResult(0, "7|RUNNING|None|rfa\n", "")
        raise AssertionError(argv)


def test_a_failing_sacct_is_reported_squeue_stands_in_and_sacct_is_retried_later(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from reflowd.schedulers import slurm

    clock = [1000.0]
    monkeypatch.setattr(slurm.time, "monotonic", lambda: clock[0])
    transport = Commands()
    s = slurm.SlurmScheduler(transport)  # type: ignore[arg-type]
    s.accounting = True
    reports: list[str | None] = []
    s.on_accounting = reports.append

    def poll() -> Any:
        return anyio.run(s.query, ["7"])

    assert poll()["7"].phase is Phase.RUNNING and reports == [None] and transport.ran == ["sacct"]
    transport.dbd_down = True
    assert poll()["7"].phase is Phase.RUNNING  # squeue answered
    assert reports[-1] and "Connection refused" in reports[-1] and transport.ran[-2:] == ["sacct", "squeue"]
    clock[0] += slurm.ACCOUNTING_RETRY / 2
    poll()
    assert transport.ran[-1] == "squeue" and transport.ran[-2] == "squeue", "sacct is not asked at every poll"
    transport.dbd_down = False
    clock[0] += slurm.ACCOUNTING_RETRY
    poll()
    assert transport.ran[-1] == "sacct" and reports[-1] is None and s.fallbacks == 1  # squeue was an extra command once
    # With nothing to poll, the driver asks accounting itself whether it is back (at most every ACCOUNTING_RETRY s).
    transport.dbd_down = True
    poll()
    assert reports[-1] and "Connection refused" in reports[-1]
    anyio.run(s.check_accounting)
    assert transport.ran[-1] == "squeue", "resting: not asked again before ACCOUNTING_RETRY"
    transport.dbd_down = False
    clock[0] += slurm.ACCOUNTING_RETRY
    anyio.run(s.check_accounting)
    assert transport.ran[-1] == "sacct" and reports[-1] is None
