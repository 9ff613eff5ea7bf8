"""PBS Professional / OpenPBS through a transport (this machine, or a login node over SSH).

The first use probes the site (``qstat --version``, ``qstat -Bf``): PBS Pro
or Torque (refused, see :data:`pbs_commands.TORQUE_REFUSAL`), JSON output,
``max_array_size`` and whether finished jobs stay visible (job history).
Each poll is one ``qstat -f [-F json] -x -t`` for every tracked job. Without
job history a finished job simply leaves ``qstat``; the engine then concludes
from the job's result file, and a job gone without one counts as lost only
after the usual grace.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from typing import Any

import structlog

from reflow_client.jobfiles import SCRIPT_FILE

from ..transports.base import Transport, TransportError
from . import pbs_commands as pc
from .base import Observation, SubmitError, SubmitRequest, TaggedJob
from .batch import DenseArrayScheduler
from .job_script import split_key

log = structlog.get_logger("reflowd.pbs")


class PBSScheduler(DenseArrayScheduler):
    kind = "pbs"
    probe_commands = 4

    def __init__(self, transport: Transport, *, command_timeout: float = 30.0) -> None:
        super().__init__(transport, command_timeout=command_timeout)
        self.max_array_size = 10000
        self.flavour: str | None = None
        self.version: str | None = None
        self.json_output = False
        self.history = False
        self.array_limit = False
        self.refusal: str | None = None
        #: The user's queued-jobs limit (max_queued/queued_jobs_threshold), and each queue's resources_max.
        self.max_queued: int | None = None
        self.queue_caps: dict[str, dict[str, str | None]] = {}

    # ------------------------------------------------------------------ probe

    async def _probe(self) -> dict[str, Any]:
        version = await self._run(["qstat", "--version"])
        self.flavour, self.version = pc.detect_flavour(version.stdout + "\n" + version.stderr)
        if self.flavour == "torque":
            self.refusal = pc.TORQUE_REFUSAL.format(version=self.version)
            return self.capabilities()
        if not version.ok and self.flavour == "unknown":
            raise TransportError(f"qstat --version failed ({version.returncode}): {version.stderr.strip()[:300]}")
        server = await self._run(["qstat", "-Bf"])
        if not server.ok:
            raise TransportError(f"qstat -Bf failed ({server.returncode}): {server.stderr.strip()[:300]}")
        attrs = pc.parse_server_attributes(server.stdout)
        self.version = attrs.get("pbs_version", self.version)
        self.max_array_size = pc.max_array_size(attrs)
        self.history = pc.history_enabled(attrs)
        self.json_output = pc.supports_json(self.version)
        self.array_limit = pc.supports_array_limit(self.version)
        self.refusal = None
        await self._probe_limits(attrs)
        return self.capabilities()

    async def _probe_limits(self, server: dict[str, str]) -> None:
        """The user's queued-jobs limit (server and default queue) and each queue's resources_max (advisory)."""
        who = await self._run(["id", "-un"])
        queues_out = await self._run(["qstat", "-Qf"])
        queues = pc.parse_queue_attributes(queues_out.stdout) if queues_out.ok else {}
        self.queue_caps = {name: pc.queue_caps(attrs) for name, attrs in queues.items()}
        user = who.stdout.strip() if who.ok else ""
        default = queues.get(server.get("default_queue", ""))
        self.max_queued = pc.queue_limit(server, default, user) if user else None

    def capabilities(self) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "flavour": self.flavour, "version": self.version, "max_array_size": self.max_array_size,
            "finished_jobs_visible": self.history, "json": self.json_output,
            "array_parallelism": self.array_limit, "refused": self.refusal, "max_queued": self.max_queued,
        }
        if self.queue_caps:
            facts["queue_caps"] = self.queue_caps
        return facts

    def validate_options(self, options: Mapping[str, Any]) -> None:
        pc.validate_options(options)

    # ------------------------------------------------------------------ submit

    async def submit(self, request: SubmitRequest) -> str:
        self.validate_options(request.options)
        await self._ensure_probed()
        if self.refusal:
            raise SubmitError(self.refusal, permanent=True)
        script_path = os.path.join(request.job_dir, SCRIPT_FILE)
        script = pc.render_job_script(request, array_limit=self.array_limit)
        await self.transport.write_files({script_path: script.encode()}, timeout=self.command_timeout, mode=0o755)
        result = await self._run(pc.render_qsub(request, script_path), idempotent=False,
                                 timeout=self.command_timeout * 2)
        job_id = pc.parse_qsub(result.stdout, result.stderr, result.returncode)
        self._remember(request, job_id)
        return job_id

    # ------------------------------------------------------------------ query

    async def _query(self, ids: list[str]) -> dict[str, Observation]:
        records = await self._qstat(ids)
        return pc.observations(records, self._layouts_of(ids))

    async def _qstat(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """One ``qstat -f`` for *ids*; JSON some PBS versions print badly (unescaped values) falls back to text."""
        result = await self._run(pc.render_qstat(ids, json_output=self.json_output, history=self.history))
        unknown, errors = pc.qstat_errors(result.stderr)
        if errors and not result.stdout.strip():
            raise TransportError(f"qstat failed ({result.returncode}): {' '.join(errors)[:300]}")
        if not result.ok and not unknown:
            raise TransportError(f"qstat failed ({result.returncode}): {result.stderr.strip()[:300]}")
        if not self.json_output:
            return pc.parse_qstat_text(result.stdout)
        try:
            return pc.parse_qstat_json(result.stdout)
        except ValueError as exc:
            log.warning("qstat -F json printed invalid JSON; using the text format from now on", error=str(exc))
            self.json_output = False
            return await self._qstat(ids)

    async def find_tags(self, tags: Collection[str]) -> dict[str, list[TaggedJob]]:
        wanted = sorted(set(tags))
        if not wanted:
            return {}
        await self._ensure_probed()
        ids: list[str] = []
        for tag in wanted:
            result = await self._run(pc.render_qselect(tag, history=self.history))
            if not result.ok:
                raise TransportError(f"qselect -N {tag} failed ({result.returncode}): {result.stderr.strip()[:300]}")
            ids.extend(pc.parse_qselect(result.stdout))
        if not ids:
            return {t: [] for t in wanted}
        return pc.tagged_jobs(await self._qstat(sorted(set(ids))), wanted)

    # ------------------------------------------------------------------ cancel

    async def cancel(self, job_keys: Collection[str]) -> None:
        targets: list[tuple[str, int | None]] = []
        for key in sorted(set(job_keys)):
            job_id, element = split_key(key)
            layout = self._layouts.get(job_id)
            if element is None:
                targets.append((job_id, None))
                continue
            if layout is None:  # not tracked by this daemon: assume the array is dense from 0
                targets.append((job_id, int(element)))
                continue
            position = layout.position_of(key)
            if position is None:
                continue
            targets.append((job_id, None) if len(layout.indices or ()) < 2 else (job_id, position))
        # Subjobs folded into ranges, within what one shell argument takes (SSH).
        for argv in pc.render_qdel_commands(targets):
            result = await self._run(argv)
            if not result.ok:
                # A finished or unknown job makes qdel complain; that is not a failure to cancel.
                log.info("qdel reported", code=result.returncode, message=result.stderr.strip()[:300])

    def stats(self) -> dict[str, Any]:
        return {**self.capabilities(), "queries": self.queries, "commands": self.commands}


__all__ = ["PBSScheduler"]
