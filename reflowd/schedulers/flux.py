"""Flux through a transport (this machine, or a login node over SSH).

A singleton is one Flux job; an array is one bulk ``flux submit --cc`` whose
jobs are named ``<tag>.<position>``. The engine knows a submission by one job
id, so an array is known by its lowest Flux id and this adapter keeps the
other members: from ``flux submit``'s output when it submits, and from one
listing of the user's jobs (matched by name) after a daemon restart. Each
poll is one ``flux jobs`` for every member of every tracked submission.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from reflow_client.jobfiles import SCRIPT_FILE

from ..transports.base import CommandResult, Transport, TransportError
from . import flux_commands as fc
from .base import Observation, SubmitRequest, TaggedJob, command_chunks
from .batch import BatchScheduler
from .job_script import ArrayLayout, Book, split_key

log = structlog.get_logger("reflowd.flux")


@dataclass
class Submission:
    """One ``flux submit``: a singleton job, or a bulk submission known by its lowest id."""

    layout: ArrayLayout
    tag: str
    #: position (None for a singleton) -> job id value
    members: dict[int | None, int] = field(default_factory=dict)
    #: values flux submit printed whose position is not known yet (learnt from their names)
    unplaced: set[int] = field(default_factory=set)


class FluxScheduler(BatchScheduler):
    kind = "flux"
    #: One bulk submission carries at most this many jobs (Flux itself sets no array limit).
    max_array_size = 1000
    probe_commands = 1

    def __init__(self, transport: Transport, *, command_timeout: float = 30.0) -> None:
        super().__init__(transport, command_timeout=command_timeout)
        self.version: str | None = None
        self.listings = 0
        self._subs: Book[Submission] = Book()

    async def _probe(self) -> dict[str, Any]:
        result = await self._run(["flux", "version"])
        if not result.ok:
            raise TransportError(f"flux version failed ({result.returncode}): "
                                 f"{(result.stderr or result.stdout).strip()[:300]}")
        self.version = fc.parse_version(result.stdout)
        return self.capabilities()

    def capabilities(self) -> dict[str, Any]:
        return {"version": self.version, "max_array_size": self.max_array_size,
                "finished_jobs_visible": "until the instance purges inactive jobs",
                "array_parallelism": False}

    def validate_options(self, options: Mapping[str, Any]) -> None:
        fc.validate_options(options)

    async def submit(self, request: SubmitRequest) -> str:
        self.validate_options(request.options)
        await self._ensure_probed()
        script_path = os.path.join(request.job_dir, SCRIPT_FILE)
        await self.transport.write_files({script_path: fc.render_job_script(request).encode()},
                                         timeout=self.command_timeout, mode=0o755)
        expected = 1 if request.indices is None else len(set(request.indices))
        result = await self._run(fc.render_submit(request, script_path), idempotent=False,
                                 timeout=self.command_timeout * 2 + expected * 0.05)
        ids = fc.parse_submit(result.stdout, result.stderr, result.returncode, expected)
        values = {i: fc.id_value(i) for i in ids}
        master = min(ids, key=lambda i: values[i] or 0)
        sub = self._remember(request, master)
        if request.indices is None:
            sub.members = {None: values[master] or 0}
        else:
            sub.unplaced = {v for v in values.values() if v is not None}
        return master

    def _remember(self, request: SubmitRequest, master: str) -> Submission:
        sub = Submission(ArrayLayout.of(request, master), request.tag)
        self._subs[master] = sub
        return sub

    async def reattach(self, request: SubmitRequest, job_id: str) -> None:
        sub = self._remember(request, job_id)
        if request.indices is None and (value := fc.id_value(job_id)) is not None:
            sub.members = {None: value}

    def forget(self, job_id: str) -> None:
        self._subs.retire(job_id)

    def _sub(self, master: str) -> Submission:
        """The submission *master* names; one not tracked is taken for a singleton with this id."""
        sub = self._subs.get(master)
        if sub is None:
            value = fc.id_value(master)
            sub = Submission(ArrayLayout(master, None), "", {None: value} if value is not None else {})
            self._subs[master] = sub
        return sub

    @staticmethod
    def _place(jobs: list[fc.FluxJob], subs: list[Submission]) -> None:
        by_tag = {sub.tag: sub for sub in subs if sub.tag}
        for job in jobs:
            tag, position = fc.tag_of(job.name)
            sub = by_tag.get(tag)
            if sub is None:
                continue
            if sub.layout.is_array and position is not None:
                sub.members[position] = job.value
                sub.unplaced.discard(job.value)
            elif not sub.layout.is_array and position is None:
                sub.members[None] = job.value

    async def _list_all(self) -> CommandResult:
        self.listings += 1
        result = await self._run(fc.render_jobs_all(), timeout=self.command_timeout * 2)
        _unknown, errors = fc.jobs_errors(result.stderr)
        if not result.ok or errors:
            raise TransportError(f"flux jobs failed ({result.returncode}): {' '.join(errors)[:300]}")
        return result

    async def _query(self, masters: list[str]) -> dict[str, Observation]:
        subs = [self._sub(m) for m in masters]
        if any(s.layout.is_array and not s.members and not s.unplaced for s in subs):
            # An array re-attached after a restart: its members are found by name in one listing.
            result = await self._list_all()
        else:
            values = sorted({v for s in subs for v in s.members.values()} | {v for s in subs for v in s.unplaced})
            if not values:
                return {}
            result = await self._run(fc.render_jobs([str(v) for v in values]))
            unknown, errors = fc.jobs_errors(result.stderr)
            if errors or (not result.ok and not unknown):
                raise TransportError(f"flux jobs failed ({result.returncode}): "
                                     f"{(' '.join(errors) or result.stderr.strip())[:300]}")
        jobs = fc.parse_jobs(result.stdout)
        self._place(jobs, subs)
        by_value = {job.value: job for job in jobs}
        out: dict[str, Observation] = {}
        for sub in subs:
            if not sub.layout.is_array:
                value = sub.members.get(None)
                if value in by_value:
                    out[sub.layout.job_id] = fc.observe(by_value[value])
                continue
            for position, key in enumerate(sub.layout.keys()):
                value = sub.members.get(position)
                if value is not None and value in by_value:
                    out[key] = fc.observe(by_value[value])
        return out

    async def find_tags(self, tags: Collection[str]) -> dict[str, list[TaggedJob]]:
        wanted = sorted(set(tags))
        if not wanted:
            return {}
        result = await self._list_all()
        return fc.tagged_jobs(fc.parse_jobs(result.stdout), wanted)

    async def cancel(self, job_keys: Collection[str]) -> None:
        targets: set[int] = set()
        subs = [s for s in (self._subs.get(split_key(k)[0]) for k in job_keys) if s is not None]
        # Learn which member holds which position (by name) before cancelling one of them.
        if any(s.layout.is_array and not s.members and not s.unplaced for s in subs):
            self._place(fc.parse_jobs((await self._list_all()).stdout), subs)
        unplaced = [s for s in subs if s.unplaced]
        if unplaced:
            values = sorted({v for s in unplaced for v in s.unplaced})
            result = await self._run(fc.render_jobs([str(v) for v in values]))
            self._place(fc.parse_jobs(result.stdout), unplaced)
        for key in set(job_keys):
            master, element = split_key(key)
            sub = self._subs.get(master)
            if sub is None:
                sub, element = self._sub(key), None
            if element is None or not sub.layout.is_array:
                targets.update(sub.members.values())
                targets.update(sub.unplaced)
                continue
            position = sub.layout.position_of(key)
            if position is not None and position in sub.members:
                targets.add(sub.members[position])
        if not targets:
            return
        for chunk in command_chunks([str(v) for v in sorted(targets)]):  # (within what one shell argument takes)
            result = await self._run(fc.render_cancel(chunk))
            if not result.ok:
                log.info("flux cancel reported", code=result.returncode, message=result.stderr.strip()[:300])

    def stats(self) -> dict[str, Any]:
        return {**self.capabilities(), "queries": self.queries, "listings": self.listings, "commands": self.commands}


__all__ = ["FluxScheduler"]
