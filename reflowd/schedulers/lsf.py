"""IBM Spectrum LSF through a transport (this machine, or a login node over SSH).

The first use probes ``lsid`` (version: ``bjobs -json`` needs 10.1.0.4),
``bparams -a`` (``MAX_JOB_ARRAY_SIZE``, ``CLEAN_PERIOD``: how long finished
jobs stay in ``bjobs``) and ``badmin showconf mbd`` (``LSF_UNIT_FOR_LIMITS``;
LSF's default, KB, when the site does not say). Each poll is one
``bjobs -a`` for every tracked job; only jobs it no longer knows are looked up
in ``bhist -l`` (a second call, in that cycle only).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import structlog

from ..transports.base import CommandResult, Transport, TransportError
from . import lsf_commands as lc
from .base import Observation, SubmitRequest, TaggedJob
from .batch import DenseArrayScheduler
from .job_script import ArrayLayout, split_key

log = structlog.get_logger("reflowd.lsf")


class LSFScheduler(DenseArrayScheduler):
    kind = "lsf"
    probe_commands = 3

    def __init__(self, transport: Transport, *, command_timeout: float = 30.0) -> None:
        super().__init__(transport, command_timeout=command_timeout)
        #: MAX_PEND_JOBS of bparams -a: the user's pending-jobs limit (the queue cap), where set.
        self.max_queued: int | None = None
        self.max_array_size = 1000
        self.version: str | None = None
        self.json_output = True
        self.mem_unit = "KB"
        self.mem_unit_source = "LSF default"
        self.clean_period: int | None = None
        self.history_queries = 0

    async def _probe(self) -> dict[str, Any]:
        lsid = await self._run(["lsid"])
        if not lsid.ok:
            raise TransportError(f"lsid failed ({lsid.returncode}): {(lsid.stderr or lsid.stdout).strip()[:300]}")
        self.version = lc.parse_lsid(lsid.stdout)
        self.json_output = lc.supports_json(self.version)
        params = await self._run(["bparams", "-a"])
        if params.ok:
            values = lc.parse_params(params.stdout)
            self.max_array_size = lc.max_array_size(values)
            clean = values.get("CLEAN_PERIOD", "")
            self.clean_period = int(clean) if clean.isdigit() else None
            self.max_queued = lc.queue_limit(values)
        conf = await self._run(["badmin", "showconf", "mbd"])
        if conf.ok and "LSF_UNIT_FOR_LIMITS" in conf.stdout:
            self.mem_unit = lc.unit_for_limits(lc.parse_params(conf.stdout))
            self.mem_unit_source = "badmin showconf mbd"
        return self.capabilities()

    def capabilities(self) -> dict[str, Any]:
        return {
            "version": self.version, "max_array_size": self.max_array_size, "json": self.json_output,
            "mem_unit": self.mem_unit, "mem_unit_source": self.mem_unit_source,
            "finished_jobs_visible_s": self.clean_period, "accounting": "bhist", "max_queued": self.max_queued,
        }

    def validate_options(self, options: Mapping[str, Any]) -> None:
        lc.validate_options(options)

    async def submit(self, request: SubmitRequest) -> str:
        self.validate_options(request.options)
        await self._ensure_probed()
        script = lc.render_job_script(request, mem_unit=self.mem_unit).encode()
        await self.transport.write_files({f"{request.job_dir}/job.sh": script}, timeout=self.command_timeout,
                                         mode=0o755)
        result = await self._run(lc.render_bsub(request), stdin=script, idempotent=False,
                                 timeout=self.command_timeout * 2)
        job_id = lc.parse_bsub(result.stdout, result.stderr, result.returncode)
        self._remember(request, job_id)
        return job_id

    def _parse(self, result: CommandResult) -> tuple[list[dict[str, str]], set[str]]:
        try:
            if self.json_output:
                return lc.parse_bjobs_json(result.stdout)
            return lc.parse_bjobs_text(result.stdout, result.stderr)
        except ValueError as exc:
            raise TransportError(f"bjobs printed output reflow cannot read ({exc}): "
                                 f"{(result.stderr or result.stdout).strip()[:300]}") from None

    async def _query(self, ids: list[str]) -> dict[str, Observation]:
        result = await self._run(lc.render_bjobs(ids, json_output=self.json_output))
        records, missing = self._parse(result)
        if not result.ok and not records and not missing:
            raise TransportError(f"bjobs failed ({result.returncode}): {(result.stderr or result.stdout).strip()[:300]}")
        layouts = self._layouts_of(ids)
        found = lc.observations(records, layouts)
        gone = [layout for layout in layouts if layout.job_id in missing]
        if gone:
            found.update(await self._history(gone))
        return found

    async def _history(self, layouts: list[ArrayLayout]) -> dict[str, Observation]:
        """Jobs bjobs has cleaned: their end from bhist; what bhist does not show stays absent."""
        self.history_queries += 1
        result = await self._run(lc.render_bhist([layout.job_id for layout in layouts]),
                                 timeout=self.command_timeout * 2)
        if not result.ok and not result.stdout.strip():
            if "no matching job" in (result.stderr + result.stdout).lower():
                return {}
            raise TransportError(f"bhist failed ({result.returncode}): {result.stderr.strip()[:300]}")
        return lc.history_observations(lc.parse_bhist(result.stdout), layouts)

    async def find_tags(self, tags: Collection[str]) -> dict[str, list[TaggedJob]]:
        wanted = sorted(set(tags))
        if not wanted:
            return {}
        await self._ensure_probed()
        result = await self._run(lc.render_bjobs_all(json_output=self.json_output))
        records, _missing = self._parse(result)
        if not result.ok and not records and "job found" not in (result.stdout + result.stderr).lower():
            raise TransportError(f"bjobs failed ({result.returncode}): {(result.stderr or result.stdout).strip()[:300]}")
        return lc.tagged_jobs(records, wanted)

    async def cancel(self, job_keys: Collection[str]) -> None:
        targets: list[tuple[str, int | None]] = []
        for key in sorted(set(job_keys)):
            job_id, element = split_key(key)
            if element is None:
                targets.append((job_id, None))
                continue
            layout = self._layouts.get(job_id)
            position = layout.position_of(key) if layout else int(element)
            if position is not None:
                targets.append((job_id, position))
        # One job_ID[index_list] word per array, within what one shell argument takes (SSH).
        for argv in lc.render_bkill_commands(targets):
            result = await self._run(argv)
            if not result.ok:
                log.info("bkill reported", code=result.returncode,
                         message=(result.stderr or result.stdout).strip()[:300])

    def stats(self) -> dict[str, Any]:
        return {**self.capabilities(), "queries": self.queries, "history_queries": self.history_queries,
                "commands": self.commands}


__all__ = ["LSFScheduler"]
