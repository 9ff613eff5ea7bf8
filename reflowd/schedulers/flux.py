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
from typing import Any

import anyio
import structlog

from ..transports.base import CommandResult, Transport, TransportError
from . import flux_commands as fc
from .base import Observation, Scheduler, SubmitRequest, TaggedJob
from .job_script import ArrayLayout, split_key

log = structlog.get_logger("reflowd.flux")


class FluxScheduler(Scheduler):
    kind = "flux"
    array_index_env = "FLUX_JOB_CC"
    #: One bulk submission carries at most this many jobs (Flux itself sets no array limit).
    max_array_size = 1000

    def __init__(self, transport: Transport, *, command_timeout: float = 30.0) -> None:
        self.transport = transport
        self.command_timeout = command_timeout
        self.version: str | None = None
        self.queries = 0
        self.listings = 0
        self._layouts: dict[str, ArrayLayout] = {}
        self._tags: dict[str, str] = {}
        #: master id -> {position (None for a singleton): job id value}
        self._members: dict[str, dict[int | None, int]] = {}
        #: master id -> values flux submit printed whose position is not known yet
        self._unplaced: dict[str, set[int]] = {}
        self._probed = False
        self._probe_lock = anyio.Lock()

    async def _run(self, argv: list[str], *, idempotent: bool = True, timeout: float | None = None) -> CommandResult:
        return await self.transport.run(argv, timeout=timeout or self.command_timeout, idempotent=idempotent)

    async def probe(self) -> dict[str, Any]:
        async with self._probe_lock:
            result = await self._run(["flux", "version"])
            if not result.ok:
                raise TransportError(f"flux version failed ({result.returncode}): "
                                     f"{(result.stderr or result.stdout).strip()[:300]}")
            self.version = fc.parse_version(result.stdout)
            self._probed = True
            return self.capabilities()

    def capabilities(self) -> dict[str, Any]:
        return {"version": self.version, "max_array_size": self.max_array_size,
                "finished_jobs_visible": "until the instance purges inactive jobs",
                "array_parallelism": False}

    def validate_options(self, options: Mapping[str, Any]) -> None:
        fc.validate_options(options)

    async def submit(self, request: SubmitRequest) -> str:
        self.validate_options(request.options)
        if not self._probed:
            with anyio.fail_after(self.command_timeout * 2):
                await self.probe()
        script_path = os.path.join(request.job_dir, "job.sh")
        await self.transport.write_files({script_path: fc.render_job_script(request).encode()},
                                         timeout=self.command_timeout, mode=0o755)
        expected = 1 if request.indices is None else len(set(request.indices))
        result = await self._run(fc.render_submit(request, script_path), idempotent=False,
                                 timeout=self.command_timeout * 2 + expected * 0.05)
        ids = fc.parse_submit(result.stdout, result.stderr, result.returncode, expected)
        values = {i: fc.id_value(i) for i in ids}
        master = min(ids, key=lambda i: values[i] or 0)
        self._remember(request, master)
        if request.indices is None:
            self._members[master] = {None: values[master] or 0}
        else:
            self._unplaced[master] = {v for v in values.values() if v is not None}
        return master

    def _remember(self, request: SubmitRequest, master: str) -> None:
        self._layouts[master] = ArrayLayout.of(request, master)
        self._tags[master] = request.tag
        self._members.setdefault(master, {})

    async def reattach(self, request: SubmitRequest, job_id: str) -> None:
        self._remember(request, job_id)
        if request.indices is None:
            value = fc.id_value(job_id)
            if value is not None:
                self._members[job_id] = {None: value}

    def forget(self, job_id: str) -> None:
        for table in (self._layouts, self._tags, self._members, self._unplaced):
            table.pop(job_id, None)  # type: ignore[attr-defined]

    def _needs_listing(self, masters: list[str]) -> bool:
        """An array re-attached after a restart: its members are found by name in one listing."""
        for master in masters:
            layout = self._layouts.get(master)
            if layout and layout.is_array and not self._members.get(master) and not self._unplaced.get(master):
                return True
        return False

    def _place(self, jobs: list[fc.FluxJob], masters: list[str]) -> None:
        by_tag = {self._tags[m]: m for m in masters if m in self._tags}
        for job in jobs:
            tag, position = fc.tag_of(job.name)
            master = by_tag.get(tag)
            if master is None:
                continue
            layout = self._layouts[master]
            if layout.is_array and position is not None:
                self._members[master][position] = job.value
                self._unplaced.get(master, set()).discard(job.value)
            elif not layout.is_array and position is None:
                self._members[master][None] = job.value

    async def query(self, job_ids: Collection[str]) -> dict[str, Observation]:
        masters = sorted(set(job_ids))
        if not masters:
            return {}
        for master in masters:
            if master not in self._layouts:  # not tracked: treat it as a singleton with this id
                value = fc.id_value(master)
                self._layouts[master] = ArrayLayout(master, None)
                self._members[master] = {None: value} if value is not None else {}
        self.queries += 1
        unknown: set[int] = set()
        if self._needs_listing(masters):
            self.listings += 1
            result = await self._run(fc.render_jobs_all(), timeout=self.command_timeout * 2)
            _unknown, errors = fc.jobs_errors(result.stderr)
            if not result.ok or errors:
                raise TransportError(f"flux jobs failed ({result.returncode}): {' '.join(errors)[:300]}")
        else:
            values = sorted({v for m in masters for v in self._members.get(m, {}).values()}
                            | {v for m in masters for v in self._unplaced.get(m, set())})
            if not values:
                return {}
            result = await self._run(fc.render_jobs([str(v) for v in values]))
            unknown, errors = fc.jobs_errors(result.stderr)
            if errors or (not result.ok and not unknown):
                raise TransportError(f"flux jobs failed ({result.returncode}): "
                                     f"{(' '.join(errors) or result.stderr.strip())[:300]}")
        jobs = fc.parse_jobs(result.stdout)
        self._place(jobs, masters)
        by_value = {job.value: job for job in jobs}
        out: dict[str, Observation] = {}
        for master in masters:
            layout = self._layouts[master]
            members = self._members.get(master, {})
            if not layout.is_array:
                value = members.get(None)
                if value in by_value:
                    out[master] = fc.observe(by_value[value])
                continue
            for position, key in enumerate(layout.keys()):
                value = members.get(position)
                if value is not None and value in by_value:
                    out[key] = fc.observe(by_value[value])
        return out

    async def find_tags(self, tags: Collection[str]) -> dict[str, list[TaggedJob]]:
        wanted = sorted(set(tags))
        if not wanted:
            return {}
        self.listings += 1
        result = await self._run(fc.render_jobs_all(), timeout=self.command_timeout * 2)
        _unknown, errors = fc.jobs_errors(result.stderr)
        if not result.ok or errors:
            raise TransportError(f"flux jobs failed ({result.returncode}): {' '.join(errors)[:300]}")
        return fc.tagged_jobs(fc.parse_jobs(result.stdout), wanted)

    async def cancel(self, job_keys: Collection[str]) -> None:
        targets: set[int] = set()
        for key in set(job_keys):
            master, element = split_key(key)
            if master not in self._layouts:
                master, element = key, None
            members = self._members.get(master, {})
            layout = self._layouts.get(master)
            if element is None or layout is None or not layout.is_array:
                targets.update(members.values())
                targets.update(self._unplaced.get(master, set()))
                if not members and (value := fc.id_value(master)) is not None:
                    targets.add(value)
                continue
            position = layout.position_of(key)
            if position is not None and position in members:
                targets.add(members[position])
        if not targets:
            return
        result = await self._run(fc.render_cancel([str(v) for v in sorted(targets)]))
        if not result.ok:
            log.info("flux cancel reported", code=result.returncode, message=result.stderr.strip()[:300])

    def stats(self) -> dict[str, Any]:
        return {**self.capabilities(), "queries": self.queries, "listings": self.listings}


__all__ = ["FluxScheduler"]
