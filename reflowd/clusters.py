"""Clusters: a scheduler adapter on a transport, with a rate limit and a poll clock.

Built from ``[clusters.NAME]`` in the configuration. Each cluster owns a
token bucket that caps the *optional* scheduler calls -- status queries wait
for a token; cancellations and tag look-ups are never delayed but spend a
token (the debt is bounded) -- while submissions, which are the pipeline's
progress, are never held back. The poll interval adapts: short after a
submission or a change, growing while nothing happens, long when the
scheduler answers slowly.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from reflow_client.config import ClusterConfig, ConfigError

from .engine.decide import Timing
from .schedulers.base import Scheduler
from .transports.base import Transport
from .transports.local import LocalTransport

log = structlog.get_logger("reflowd.clusters")


class RateLimiter:
    """Token bucket: ``rate_per_minute`` tokens a minute, at most ``burst`` saved up."""

    def __init__(self, rate_per_minute: float, burst: float | None = None) -> None:
        self.rate = max(rate_per_minute, 0.1) / 60.0
        self.burst = burst if burst is not None else max(2.0, rate_per_minute / 4)
        self.tokens = self.burst
        self._stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def wait_time(self) -> float:
        self._refill()
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def spend(self) -> None:
        """Take a token now, going into (bounded) debt if needed: cancellations, tag look-ups."""
        self._refill()
        self.tokens = max(self.tokens - 1, -self.burst)

    async def acquire(self) -> None:
        """Wait for a token (status queries)."""
        while (delay := self.wait_time()) > 0:
            await anyio.sleep(delay)
        self.tokens -= 1


class PollPolicy:
    """When to ask the scheduler next."""

    def __init__(self, minimum: float, base: float, maximum: float) -> None:
        self.minimum = minimum
        self.base = max(base, minimum)
        self.maximum = max(maximum, self.base)
        self.interval = self.minimum
        self.last_duration = 0.0

    def after_query(self, duration: float, changed: bool) -> None:
        self.last_duration = duration
        if duration > 2.0:  # a slow controller: back off in proportion
            self.interval = min(self.maximum, max(self.interval, duration * 10))
        elif changed:
            self.interval = self.minimum
        else:
            self.interval = min(self.base, self.interval * 1.5)

    def after_submit(self) -> None:
        self.interval = self.minimum


@dataclass
class ClusterRuntime:
    """One configured cluster as the engine uses it."""

    name: str
    config: ClusterConfig
    transport: Transport
    scheduler: Scheduler
    limiter: RateLimiter
    policy: PollPolicy
    result_interval: float
    timing: Timing
    calls: Counter[str] = field(default_factory=Counter)
    call_seconds: float = 0.0
    probe: dict[str, Any] = field(default_factory=dict)

    @property
    def remote(self) -> bool:
        return self.config.remote

    def python_for(self, manifest_python: str) -> str:
        """The interpreter workers use on this cluster."""
        if self.config.python:
            return self.config.python
        return manifest_python if not self.remote else "python3"

    def count(self, kind: str, seconds: float) -> None:
        self.calls[kind] += 1
        self.call_seconds += seconds

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "scheduler": self.scheduler.kind,
            "host": self.config.host,
            "transport": self.transport.name,
            "health": self.transport.health.to_dict(),
            "transport_stats": dict(self.transport.stats),
            "poll_interval": round(self.policy.interval, 2),
            "calls": dict(self.calls),
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


def _with_scheduler(config: ClusterConfig, transport: Transport, *, embedded: bool,
                    max_workers: int | None) -> ClusterRuntime:
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
        transport=transport,
        scheduler=scheduler,
        # The local scheduler answers from memory: nothing to protect, so no real cap.
        limiter=RateLimiter(config.max_calls_per_minute if config.scheduler != "local" else 6000.0),
        policy=PollPolicy(config.min_poll_interval, config.poll_interval, config.max_poll_interval),
        result_interval=result_interval,
        timing=timing,
    )


def default_python() -> str:
    return os.environ.get("REFLOW_PYTHON") or sys.executable
