"""Slurm through a transport (this machine, or a login node over SSH).

One status query per call for every job asked about: ``sacct`` when the site
runs accounting (probed at start; it knows finished jobs for ever), else
``squeue -t all`` (finished jobs stay listed for ``MinJobAge``). A query that
fails or times out answers UNKNOWN for every job -- never absent.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Mapping
from typing import Any

import anyio
import structlog

from reflow_client.jobfiles import SCRIPT_FILE

from ..transports.base import CommandResult, Transport, TransportError
from . import slurm_commands as sc
from .base import Answers, JobAnswer, Observation, Phase, Scheduler, SubmitError, SubmitRequest, TaggedJob

#: Seconds between asking slurmctld (squeue) for the live reasons of pending jobs when sacct has none.
REASON_REFRESH = 60.0
#: Seconds between tries of sacct while it fails (slurmdbd down): squeue stands in meanwhile.
ACCOUNTING_RETRY = 20.0

log = structlog.get_logger("reflowd.slurm")


class SlurmScheduler(Scheduler):
    kind = "slurm"

    def __init__(self, transport: Transport, *, command_timeout: float = 30.0) -> None:
        self.transport = transport
        self.command_timeout = command_timeout
        self.accounting = False
        self.config: dict[str, str] = {}
        #: One-CPU jobs each partition runs at once (``sc.parse_partition_slots``), from the probe.
        self.queue_slots: dict[str, int] = {}
        #: Polls answered (``query`` calls); each runs one status command, plus the rare extras below.
        self.queries = 0
        #: Extra commands inside a poll: squeue for live pending reasons (at most every REASON_REFRESH s),
        #: and squeue standing in for a failed sacct. Every command is charged to the cluster's budget.
        self.reason_refreshes = 0
        self.fallbacks = 0
        self._reasons_asked = float("-inf")
        #: While sacct fails, it is tried again only after this (monotonic) time; squeue answers meanwhile.
        self._sacct_retry_at = float("-inf")

    async def _run(self, argv: list[str], *, idempotent: bool = True, timeout: float | None = None) -> CommandResult:
        return await self.transport.run(argv, timeout=timeout or self.command_timeout, idempotent=idempotent)

    async def _sacct_answers(self, attempts: int = 3, pause: float = 2.0) -> bool:
        """Whether sacct works. The choice holds for the daemon's life, so one slow or failed answer
        (slurmdbd busy or restarting) is asked again before the site is taken for one without accounting."""
        for attempt in range(attempts):
            check = await self._run(["sacct", "-n", "-X", "-S", "now-1minutes", "-o", "JobID"])
            if check.ok:
                return True
            log.warning("sacct does not answer; polling will use squeue if it keeps failing",
                        attempt=attempt + 1, stderr=check.stderr.strip()[-200:])
            if attempt + 1 < attempts:
                await anyio.sleep(pause)
        return False

    async def probe(self) -> dict[str, Any]:
        result = await self._run(["scontrol", "show", "config"])
        if not result.ok:
            raise TransportError(f"scontrol show config failed: {result.stderr.strip()}")
        self.config = sc.parse_scontrol_show_config(result.stdout)
        self.max_array_size = sc.max_array_size(self.config)
        storage = self.config.get("AccountingStorageType", "accounting_storage/none")
        self.accounting = False
        if storage != "accounting_storage/none":
            self.accounting = await self._sacct_answers()
        facts: dict[str, Any] = {"max_array_size": self.max_array_size, "accounting": self.accounting,
                                 "min_job_age": self.config.get("MinJobAge")}
        if self.accounting:
            facts["max_queued"] = await self._queue_limit()
        facts["queue_caps"], facts["default_queue"] = await self._partition_limits()
        facts["queue_slots"] = self.queue_slots
        return facts

    async def _partition_limits(self) -> tuple[dict[str, dict[str, str | None]], str | None]:
        """Each partition's MaxTime and memory cap: what escalation may ask for (advisory: empty if unreadable)."""
        parts = await self._run(sc.render_partitions())
        if not parts.ok:
            log.warning("cannot read the partitions' limits; escalation is capped by the retry policy only",
                        stderr=parts.stderr.strip()[-200:])
            return {}, None
        self.queue_slots = sc.parse_partition_slots(parts.stdout)
        nodes = await self._run(sc.render_node_memory())
        return sc.parse_partition_limits(parts.stdout, nodes.stdout if nodes.ok else "")

    async def _queue_limit(self) -> int | None:
        """The user's limit on queued jobs from the association and its QOSes (advisory: None if unreadable)."""
        who = await self._run(["id", "-un"])
        if not who.ok or not who.stdout.strip():
            return None
        assoc = await self._run(sc.render_assoc_limits(who.stdout.strip()))
        qos = await self._run(sc.render_qos_limits())
        if not (assoc.ok and qos.ok):
            return None
        return sc.parse_queue_limit(assoc.stdout, qos.stdout)

    def validate_options(self, options: Mapping[str, Any]) -> None:
        sc.validate_options(options)

    async def submit(self, request: SubmitRequest) -> str:
        self.validate_options(request.options)
        script_path = os.path.join(request.job_dir, SCRIPT_FILE)
        await self.transport.write_files({script_path: sc.render_script(request).encode()},
                                         timeout=self.command_timeout, mode=0o755)
        result = await self._run(sc.render_sbatch(request, script_path), idempotent=False,
                                 timeout=self.command_timeout * 2)
        return sc.parse_sbatch(result.stdout, result.stderr, result.returncode)

    async def query(self, job_ids: Collection[str]) -> Answers:
        """Job by job (``Answers``): a pending array Slurm prints as one line stays one span."""
        ids = sorted(set(job_ids))
        if not ids:
            return Answers()
        self.queries += 1
        if self.accounting:
            result = await self._sacct(sc.render_sacct(ids))
            if result is not None:
                observations = sc.parse_sacct_answers(result.stdout)
                await self._live_reasons(observations)
                return await self._peaks(observations, sc.out_of_memory_jobs(result.stdout))
        result = await self._run(sc.render_squeue(ids, expand=False))
        if result.ok:
            return sc.parse_squeue_answers(result.stdout)
        if sc.squeue_all_absent(result.stderr, result.returncode):
            return Answers()
        raise TransportError(f"squeue failed ({result.returncode}): {result.stderr.strip()[:300]}")

    async def check_accounting(self) -> None:
        if self.accounting:
            await self._sacct(["sacct", "-n", "-X", "-S", "now-1minutes", "-o", "JobID"])

    async def _peaks(self, observations: Answers, jobs: list[str]) -> Answers:
        """The peak memory of jobs that ran out of it (one more sacct, only then); without it the cause still
        says out of memory, so a failed or hanging query costs nothing else."""
        if not jobs:
            return observations
        try:
            result = await self._run(sc.render_sacct_peaks(jobs))
        except (TransportError, TimeoutError) as exc:
            log.info("no peak memory for jobs that ran out of it", jobs=jobs, error=str(exc) or type(exc).__name__)
            return observations
        return sc.with_peaks(observations, sc.parse_peaks(result.stdout)) if result.ok else observations

    async def _sacct(self, argv: list[str]) -> CommandResult | None:
        """sacct's answer, or None when accounting failed (reported; squeue stands in) or rests after failing."""
        if time.monotonic() < self._sacct_retry_at:
            return None
        try:
            result = await self._run(argv)
            error = None if result.ok else (result.stderr.strip()[:300] or f"sacct exited {result.returncode}")
        except (TransportError, TimeoutError) as exc:  # slurmdbd hanging: squeue may still answer
            result, error = None, f"sacct: {exc or type(exc).__name__}"
        if result is not None and error is None:
            self._sacct_retry_at = float("-inf")
            self._accounting_report(None)
            return result
        log.warning("sacct failed; using squeue until it answers again", error=error, retry_in=ACCOUNTING_RETRY)
        self._sacct_retry_at = time.monotonic() + ACCOUNTING_RETRY
        self._accounting_report(error)
        self.fallbacks += 1  # squeue is an extra command in this poll
        return None

    def _accounting_report(self, error: str | None) -> None:
        if self.on_accounting is not None:
            self.on_accounting(error)

    async def _live_reasons(self, observations: Answers) -> None:
        """Fill in why jobs pend: slurmdbd often keeps the reason a job had at submission ("None").

        Asked of slurmctld at most every REASON_REFRESH seconds, so accounting sites
        keep their one sacct call per cycle almost always; failure changes nothing.
        """
        def unexplained(obs: Observation) -> bool:
            return obs.phase is Phase.QUEUED and not obs.reason

        pending = sorted(job_id for job_id, a in observations.jobs.items()
                         if any(map(unexplained, a.elements.values())) or any(unexplained(o) for _, _, o in a.spans))
        now = time.monotonic()
        if not pending or now - self._reasons_asked < REASON_REFRESH:
            return
        self._reasons_asked = now
        self.reason_refreshes += 1
        try:
            result = await self._run(sc.render_squeue(pending, expand=False))
        except TransportError:
            return
        if not result.ok:
            return
        live = sc.parse_squeue_answers(result.stdout)
        for job_id in pending:
            mine, theirs = observations.jobs[job_id], live.job(job_id)
            if theirs is not None:
                observations.jobs[job_id] = with_live_reasons(job_id, mine, theirs)
    async def find_tags(self, tags: Collection[str]) -> dict[str, list[TaggedJob]]:
        wanted = sorted(set(tags))
        if not wanted:
            return {}
        result = await self._run(sc.render_squeue_names(wanted))
        if not result.ok and not sc.squeue_all_absent(result.stderr, result.returncode):
            raise TransportError(f"squeue --name failed: {result.stderr.strip()[:300]}")
        found = sc.tagged_jobs(result.stdout if result.ok else "", "squeue", wanted)
        if self.accounting:
            acct = await self._run(sc.render_sacct_names(wanted))
            if not acct.ok:  # squeue alone may miss a job that ended: no answer rather than a wrong one
                self._accounting_report(acct.stderr.strip()[:300] or f"sacct exited {acct.returncode}")
                raise TransportError(f"sacct --name failed: {acct.stderr.strip()[:300]}")
            self._accounting_report(None)
            for tag, jobs in sc.tagged_jobs(acct.stdout, "sacct", wanted).items():
                known = {j.job_id for j in found[tag]}
                found[tag].extend(j for j in jobs if j.job_id not in known)
        return found

    async def cancel(self, job_keys: Collection[str]) -> None:
        keys = sorted(set(job_keys))
        if not keys:
            return
        for command in sc.render_scancel(keys):
            result = await self._run(command)
            if not result.ok:
                # Already finished or unknown jobs make scancel complain; that is not a failure to cancel.
                log.info("scancel reported", code=result.returncode, message=result.stderr.strip()[:300])

    def stats(self) -> dict[str, Any]:
        return {"accounting": self.accounting, "max_array_size": self.max_array_size, "queries": self.queries,
                "reason_refreshes": self.reason_refreshes, "fallbacks": self.fallbacks}


def with_live_reasons(job_id: str, mine: JobAnswer, theirs: JobAnswer) -> JobAnswer:
    """*mine* (sacct's), with squeue's observation wherever sacct has a pending one without a reason and
    squeue still has it pending. A span squeue prints alike is replaced whole; otherwise element by element."""
    def better(obs: Observation | None) -> bool:
        return obs is not None and obs.phase is Phase.QUEUED

    elements = dict(mine.elements)
    for key, obs in mine.elements.items():
        new = theirs.get(key, job_id)
        if obs.phase is Phase.QUEUED and not obs.reason and better(new):
            elements[key] = new  # type: ignore[assignment]
    spans: list[tuple[int, int, Observation]] = []
    same = {(first, last): obs for first, last, obs in theirs.spans}
    for first, last, obs in mine.spans:
        if obs.phase is not Phase.QUEUED or obs.reason:
            spans.append((first, last, obs))
        elif better(same.get((first, last))):
            spans.append((first, last, same[(first, last)]))
        else:
            spans.append((first, last, obs))
            for k in range(first, last + 1):
                key = f"{job_id}_{k}"
                new = theirs.get(key, job_id)
                if key not in elements and better(new):
                    elements[key] = new  # type: ignore[assignment]
    return JobAnswer(elements, tuple(spans))


__all__ = ["SlurmScheduler", "SubmitError"]
