"""What the command-line adapters (Grid Engine, PBS, LSF, Flux) share.

Every command goes through the cluster's transport (this machine, or a login
node over SSH) with a timeout, and is counted. The site is probed once
(version, array limits, history, accounting) and, where the daemon's start-up
probe did not get through, on first use. PBS and LSF also keep each job's
dense array layout (:class:`~reflowd.schedulers.job_script.ArrayLayout`),
rebuilt from the request when a restarted daemon re-attaches.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Sequence
from typing import Any

import anyio

from ..transports.base import CommandResult, Transport
from .base import Observation, Scheduler, SubmitRequest
from .job_script import ArrayLayout, Book


class BatchScheduler(Scheduler):
    """A batch system driven by its commands through a transport."""

    #: Commands the probe runs (its time budget on first use is this many command timeouts).
    probe_commands: int = 2

    def __init__(self, transport: Transport, *, command_timeout: float = 30.0) -> None:
        self.transport = transport
        self.command_timeout = command_timeout
        #: Every command this adapter ran (probe, submissions, queries, cancels), and the status queries.
        self.commands = 0
        self.queries = 0
        self._probed = False
        self._probe_lock = anyio.Lock()

    async def _run(self, argv: Sequence[str], *, stdin: bytes | None = None, idempotent: bool = True,
                   timeout: float | None = None) -> CommandResult:
        self.commands += 1
        return await self.transport.run(argv, stdin=stdin, timeout=timeout or self.command_timeout,
                                        idempotent=idempotent)

    async def probe(self) -> dict[str, Any]:
        async with self._probe_lock:
            facts = await self._probe()
            self._probed = True
            return facts

    async def query(self, job_ids: Collection[str]) -> dict[str, Observation]:
        ids = sorted(set(job_ids))
        if not ids:
            return {}
        await self._ensure_probed()
        self.queries += 1
        return await self._query(ids)

    @abc.abstractmethod
    async def _query(self, job_ids: list[str]) -> dict[str, Observation]:
        """The one status query of a poll cycle for these (sorted, distinct) jobs; see :meth:`Scheduler.query`."""

    @abc.abstractmethod
    async def _probe(self) -> dict[str, Any]:
        """Ask the site what it offers; return the facts ``stats`` shows. Raises TransportError."""

    async def _ensure_probed(self) -> None:
        """Probe before a first submission or query the start-up probe did not prepare (it failed, or never ran)."""
        if self._probed:
            return
        with anyio.fail_after(self.command_timeout * self.probe_commands):
            async with self._probe_lock:
                if not self._probed:  # the daemon's own probe may have finished meanwhile
                    await self._probe()
                    self._probed = True


class DenseArrayScheduler(BatchScheduler):
    """A system whose arrays go out dense (PBS, LSF): each job's layout maps positions back to elements."""

    def __init__(self, transport: Transport, *, command_timeout: float = 30.0) -> None:
        super().__init__(transport, command_timeout=command_timeout)
        self._layouts: Book[ArrayLayout] = Book()

    def _remember(self, request: SubmitRequest, job_id: str) -> None:
        self._layouts[job_id] = ArrayLayout.of(request, job_id)

    async def reattach(self, request: SubmitRequest, job_id: str) -> None:
        self._remember(request, job_id)

    def forget(self, job_id: str) -> None:
        self._layouts.retire(job_id)

    def _layouts_of(self, job_ids: Collection[str]) -> list[ArrayLayout]:
        """Layouts of *job_ids*; a job this daemon does not track is taken for a singleton."""
        return [self._layouts.get(i) or ArrayLayout(i, None) for i in job_ids]
