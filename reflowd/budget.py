"""A cluster's budget: every command it runs is charged, and the token bucket paces the optional ones.

The charge is taken at the transport, by wrapping each cluster's transport in
a :class:`MeteredTransport`: whatever a scheduler adapter runs -- ``squeue``,
``sacct``, ``sbatch``, ``scancel``, a fall-back or a second query inside one
poll -- spends one token and is counted under its program name, without the
adapter knowing. Adapters therefore need no budget code of their own.

Contract:

* A *poll* (one ``Scheduler.query`` call) may run several commands; each is
  charged. The driver starts a poll only when a token is free, so polling
  never outruns ``max_calls_per_minute`` for long.
* Submissions, cancellations and tag look-ups are never delayed (they are the
  pipeline's progress and the user's requests), but they are charged: the
  bucket goes into debt, bounded at ``-burst``, and the next poll waits.
* File operations (SFTP batches over SSH, local file reads) are counted per
  operation and shown beside the commands; they are paced by the driver's
  file clock, not by this bucket, because they never reach the scheduler's
  controller.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import anyio

from . import world
from .transports.base import CommandResult, Transport, TransportHealth


class RateLimiter:
    """Token bucket: ``rate_per_minute`` tokens a minute, at most ``burst`` saved up."""

    def __init__(self, rate_per_minute: float, burst: float | None = None) -> None:
        self.rate_per_minute = max(rate_per_minute, 0.1)
        self.rate = self.rate_per_minute / 60.0
        self.burst = burst if burst is not None else max(2.0, rate_per_minute / 4)
        self.tokens = self.burst
        self._stamp = world.monotonic()

    def _refill(self) -> None:
        now = world.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def wait_time(self) -> float:
        self._refill()
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def spend(self) -> None:
        """Take a token now, going into (bounded) debt if needed."""
        self._refill()
        self.tokens = max(self.tokens - 1, -self.burst)

    async def acquire(self) -> None:
        """Wait for a token, then take it."""
        while (delay := self.wait_time()) > 0:
            await anyio.sleep(delay)
        self.tokens -= 1


class Budget:
    """What one cluster may spend on scheduler commands, and what it has spent."""

    def __init__(self, rate_per_minute: float, burst: float | None = None) -> None:
        self.bucket = RateLimiter(rate_per_minute, burst)
        self.commands: Counter[str] = Counter()  # program name -> commands run
        self.files: Counter[str] = Counter()  # file operation -> batches

    def charge_command(self, program: str) -> None:
        self.commands[program] += 1
        self.bucket.spend()

    def charge_files(self, operation: str) -> None:
        self.files[operation] += 1

    @property
    def charged(self) -> int:
        """Commands charged so far (each one a token)."""
        return sum(self.commands.values())

    def wait_time(self) -> float:
        return self.bucket.wait_time()

    def status(self) -> dict[str, Any]:
        self.bucket._refill()
        return {
            "rate_per_minute": self.bucket.rate_per_minute,
            "burst": self.bucket.burst,
            "tokens": round(self.bucket.tokens, 2),
            "commands_charged": self.charged,
            "commands": dict(self.commands),
            "file_batches": dict(self.files),
        }


class MeteredTransport(Transport):
    """A transport that charges every command to a :class:`Budget` before running it."""

    def __init__(self, inner: Transport, budget: Budget) -> None:
        # No Transport.__init__: health and stats are the inner transport's.
        self.inner = inner
        self.budget = budget
        self.name = inner.name

    @property  # type: ignore[override]
    def health(self) -> TransportHealth:
        return self.inner.health

    @property  # type: ignore[override]
    def stats(self) -> dict[str, float]:
        return self.inner.stats

    async def run(self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float = 30.0,
                  env: Mapping[str, str] | None = None, idempotent: bool = True) -> CommandResult:
        self.budget.charge_command(str(argv[0]).rsplit("/", 1)[-1] if argv else "?")
        return await self.inner.run(argv, stdin=stdin, timeout=timeout, env=env, idempotent=idempotent)

    async def read_files(self, paths: Sequence[str], *, timeout: float = 30.0) -> dict[str, bytes | None]:
        self.budget.charge_files("read")
        return await self.inner.read_files(paths, timeout=timeout)

    async def write_files(self, files: Mapping[str, bytes], *, timeout: float = 60.0, mode: int = 0o644) -> None:
        self.budget.charge_files("write")
        await self.inner.write_files(files, timeout=timeout, mode=mode)

    async def listdir(self, path: str, *, timeout: float = 30.0) -> list[str]:
        self.budget.charge_files("listdir")
        return await self.inner.listdir(path, timeout=timeout)

    async def exists(self, paths: Sequence[str], *, timeout: float = 30.0) -> dict[str, bool]:
        self.budget.charge_files("exists")
        return await self.inner.exists(paths, timeout=timeout)

    async def makedirs(self, paths: Sequence[str], *, timeout: float = 30.0) -> None:
        self.budget.charge_files("makedirs")
        await self.inner.makedirs(paths, timeout=timeout)

    async def check(self, *, timeout: float = 30.0) -> None:
        self.budget.charge_command("check")
        await self.inner.check(timeout=timeout)

    async def aclose(self) -> None:
        await self.inner.aclose()
