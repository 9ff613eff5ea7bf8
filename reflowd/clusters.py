"""Clusters: a scheduler adapter on a metered transport, built from ``[clusters.NAME]``.

Each cluster's transport is wrapped in a :class:`~reflowd.budget.MeteredTransport`
before the scheduler adapter gets it, so every command the adapter runs is
charged to the cluster's :class:`~reflowd.budget.Budget` (see ``budget.py``).
The cluster's driver (``reflowd/driver``) owns the runtime and decides when
to poll.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import structlog

from reflow_client.config import ClusterConfig, ConfigError

from .budget import Budget, MeteredTransport
from .engine.decide import Timing
from .schedulers.base import Scheduler
from .transports.base import Transport
from .transports.local import LocalTransport

log = structlog.get_logger("reflowd.clusters")


@dataclass
class ClusterRuntime:
    """One configured cluster as the engine uses it."""

    name: str
    config: ClusterConfig
    transport: Transport  # as configured (its name, health and counters are shown)
    metered: Transport  # the same, charging every command to ``budget``: all I/O goes through this one
    scheduler: Scheduler
    budget: Budget
    result_interval: float
    timing: Timing
    #: Scheduler operations by kind (submit, query, cancel, find_tags); one may run several commands.
    calls: Counter[str] = field(default_factory=Counter)
    probe: dict[str, Any] = field(default_factory=dict)

    @property
    def remote(self) -> bool:
        return self.config.remote

    def python_for(self, manifest_python: str) -> str:
        """The interpreter workers use on this cluster."""
        if self.config.python:
            return self.config.python
        return manifest_python if not self.remote else "python3"

    def count(self, kind: str) -> None:
        self.calls[kind] += 1

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "scheduler": self.scheduler.kind,
            "host": self.config.host,
            "transport": self.transport.name,
            "health": self.transport.health.to_dict(),
            "transport_stats": dict(self.transport.stats),
            "calls": dict(self.calls),
            "budget": self.budget.status(),
            "scheduler_stats": self.scheduler.stats(),
        }


def build_cluster(config: ClusterConfig, *, embedded: bool = False, max_workers: int | None = None) -> ClusterRuntime:
    """Transport and scheduler for one ``[clusters.NAME]`` table."""
    transport: Transport
    if config.remote:
        from .transports.ssh import SSHSettings, SSHTransport

        settings = SSHSettings(
            host=config.host or "",
            port=config.port,
            user=config.user,
            identity_file=config.identity_file,
            known_hosts=config.known_hosts,
            proxy_jump=config.proxy_jump,
            max_channels=config.max_channels,
            keepalive_interval=config.keepalive_interval,
            connect_timeout=config.command_timeout,
        )
        try:
            transport = SSHTransport(settings)
        except ValueError as exc:  # proxy_jump or max_channels the transport cannot use
            raise ConfigError(f"cluster {config.name!r}: {exc}") from None
    else:
        transport = LocalTransport()
    return _with_scheduler(config, transport, embedded=embedded, max_workers=max_workers)


def _with_scheduler(config: ClusterConfig, inner: Transport, *, embedded: bool,
                    max_workers: int | None) -> ClusterRuntime:
    # The local scheduler answers from memory: nothing to protect, so no real cap.
    budget = Budget(config.max_calls_per_minute if config.scheduler != "local" else 6000.0)
    transport = MeteredTransport(inner, budget)  # what the scheduler adapter gets: every command charged
    scheduler: Scheduler
    if config.scheduler == "local":
        if config.remote:
            raise ConfigError(f"cluster {config.name!r}: scheduler 'local' cannot run on a remote host")
        from .schedulers.local import LocalScheduler

        scheduler = LocalScheduler(max_workers or config.max_workers, kill_on_close=embedded)
        result_interval = 1.0
        timing = Timing(result_grace=0.0, lost_after=3, lost_grace=5.0)
    elif config.scheduler == "slurm":
        from .schedulers.slurm import SlurmScheduler

        scheduler = SlurmScheduler(transport, command_timeout=config.command_timeout)
        result_interval = 2.0 if config.remote else 0.5
        timing = Timing(result_grace=10.0, lost_after=3, lost_grace=config.lost_grace)
    elif config.scheduler in ("pbs", "lsf", "flux"):
        from .schedulers.flux import FluxScheduler
        from .schedulers.lsf import LSFScheduler
        from .schedulers.pbs import PBSScheduler

        kinds: dict[str, type[PBSScheduler] | type[LSFScheduler] | type[FluxScheduler]] = {
            "pbs": PBSScheduler, "lsf": LSFScheduler, "flux": FluxScheduler}
        scheduler = kinds[config.scheduler](transport, command_timeout=config.command_timeout)
        result_interval = 2.0 if config.remote else 0.5
        timing = Timing(result_grace=10.0, lost_after=3, lost_grace=config.lost_grace)
    elif config.scheduler == "sge":
        from .schedulers.sge import SGEScheduler
        from .schedulers.sge_commands import SGESettings

        scheduler = SGEScheduler(transport, SGESettings(config.parallel_environment, config.memory_resource),
                                 command_timeout=config.command_timeout)
        result_interval = 2.0 if config.remote else 0.5
        timing = Timing(result_grace=10.0, lost_after=3, lost_grace=config.lost_grace)
    else:
        raise ConfigError(
            f"cluster {config.name!r}: scheduler {config.scheduler!r} is not supported by this reflowd yet "
            "(supported: local, slurm, sge, pbs, lsf, flux)"
        )
    return ClusterRuntime(
        name=config.name,
        config=config,
        transport=inner,
        metered=transport,
        scheduler=scheduler,
        budget=budget,
        result_interval=result_interval,
        timing=timing,
    )

