"""Grid Engine through a transport (this machine, or a login node over SSH).

One status query per poll: ``qstat -xml`` lists every pending and running job
of the user. A tracked job (or array task) that qstat no longer lists has left
the queue; how it ended comes from the accounting file through ``qacct -j``
(exit status and the ``failed`` code), asked only for such jobs, all of them in
one command, and remembered once known. A job neither listed nor accounted for
(yet: sites buffer accounting for up to ``accounting_flush_time``) is absent,
which the engine only concludes on after its grace. A failed qstat, or a qacct
that cannot read the accounting file, is UNKNOWN for everything -- never absent.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Sequence
from typing import Any

import structlog

from reflow_client.jobfiles import SCRIPT_FILE

from ..transports.base import Transport, TransportError
from . import sge_commands as gc
from .base import Observation, OptionError, Phase, SubmitError, SubmitRequest, TaggedJob, command_chunks
from .batch import BatchScheduler

log = structlog.get_logger("reflowd.sge")

#: Seconds between new attempts to use qacct after the probe found it unusable.
ACCOUNTING_RECHECK = 300.0
#: Seconds between qacct look-ups for an array job qstat still lists (some tasks finished).
PARTIAL_ACCOUNTING_INTERVAL = 15.0


class SGEScheduler(BatchScheduler):
    kind = "sge"
    max_array_size = 75000
    probe_commands = 5

    def __init__(self, transport: Transport, settings: gc.SGESettings | None = None, *,
                 command_timeout: float = 30.0) -> None:
        super().__init__(transport, command_timeout=command_timeout)
        self.settings = settings or gc.SGESettings()
        self.accounting = False
        self.accounting_problem: str | None = "not probed yet"
        self._accounting_checked = float("-inf")
        self.version = "unknown"
        self.config: dict[str, str] = {}
        self.parallel_environments: list[str] | None = None
        #: Queue -> its h_rt/h_vmem as escalation caps (``max_time``/``max_mem``), from qconf -sq.
        self.queue_caps: dict[str, dict[str, str | None]] = {}
        self.qacct_calls = 0
        #: Task ids of each job we submitted or re-attached to (1-based); lets a poll tell which
        #: tasks of a still-listed array have finished. Without it (unknown job) qacct is asked.
        self._tasks: dict[str, set[int] | None] = {}
        #: Finished jobs/tasks whose accounting record was read: they never change again.
        self._done: dict[str, dict[str, Observation]] = {}
        self._asked: dict[str, float] = {}

    # ------------------------------------------------------------------ probe

    async def _probe(self) -> dict[str, Any]:
        """Version, array limit, parallel environments and whether qacct can read the accounting file."""
        result = await self._run(["qstat", "-help"])
        if not result.stdout.strip() and not result.ok:
            raise TransportError(f"qstat -help failed: {result.stderr.strip()[:300]}")
        self.version = gc.parse_version(result.stdout)
        conf = await self._run(["qconf", "-sconf"])
        if conf.ok:
            self.config = gc.parse_qconf_conf(conf.stdout)
            self.max_array_size = gc.max_array_size(self.config)
        elif gc.qmaster_unreachable(conf.stderr):
            raise TransportError(f"the Grid Engine qmaster does not answer: {conf.stderr.strip()[:300]}")
        else:
            log.warning("qconf -sconf failed; assuming the default max_aj_tasks", error=conf.stderr.strip()[:300])
        pes = await self._run(["qconf", "-spl"])
        self.parallel_environments = pes.stdout.split() if pes.ok else None
        await self._probe_queues()
        await self._check_accounting()
        return self.capabilities()

    async def _probe_queues(self) -> None:
        """Each queue's h_rt/h_vmem (caps for escalation); advisory: left unknown if qconf will not say."""
        shown = await self._run(["qconf", "-sq", "*"])  # every cluster queue, one block each
        if not shown.ok:
            log.warning("qconf -sq failed; escalation is capped only by the retry policy",
                        error=shown.stderr.strip()[:300])
            return
        try:
            self.queue_caps = {name: gc.queue_caps(conf) for name, conf in gc.parse_qconf_queues(shown.stdout).items()}
        except ValueError as exc:
            log.warning("cannot read the queues' limits", error=str(exc))

    async def _check_accounting(self) -> None:
        self._accounting_checked = time.monotonic()
        try:
            result = await self._run(gc.render_qacct(["2147483647"]))
        except TransportError as exc:
            self.accounting, self.accounting_problem = False, f"qacct did not answer: {exc}"
            return
        answer = gc.parse_qacct_batch(result.stdout).get("2147483647")
        if answer is None:
            self.accounting, self.accounting_problem = False, (result.stderr or result.stdout).strip()[:300]
            return
        problem = gc.accounting_problem(answer)
        self.accounting, self.accounting_problem = problem is None, problem

    def capabilities(self) -> dict[str, Any]:
        pe = self.settings.parallel_environment
        facts: dict[str, Any] = {
            "version": self.version,
            "max_array_size": self.max_array_size,
            "max_aj_instances": self.config.get("max_aj_instances"),
            "accounting": self.accounting,
            "parallel_environments": self.parallel_environments,
            "parallel_environment": pe,
            "memory_resource": self.settings.memory_resource,
        }
        if not self.accounting:
            facts["accounting_problem"] = self.accounting_problem
        facts["max_queued"] = gc.queue_limit(self.config)
        if self.queue_caps:
            facts["queue_caps"] = self.queue_caps
            # Without a queue to go by, the most any queue allows (None if one has no limit).
            for key in ("max_time", "max_mem"):
                values = [caps[key] for caps in self.queue_caps.values()]
                facts[key] = None if None in values else max(values, key=gc.cap_size)
        if pe and self.parallel_environments is not None and pe not in self.parallel_environments:
            facts["warning"] = (f"parallel_environment {pe!r} is not one of the site's "
                                f"({', '.join(self.parallel_environments) or 'none'})")
        return facts

    def validate_options(self, options: Any) -> None:
        gc.validate_options(options)

    # ------------------------------------------------------------------ submit

    async def submit(self, request: SubmitRequest) -> str:
        try:
            script = gc.render_script(request, self.settings)
            argv = gc.render_qsub(request, os.path.join(request.job_dir, SCRIPT_FILE))
        except OptionError as exc:
            raise SubmitError(str(exc), permanent=True) from None
        script_path = argv[-1]
        await self.transport.write_files({script_path: script.encode()}, timeout=self.command_timeout, mode=0o755)
        result = await self._run(argv, idempotent=False, timeout=self.command_timeout * 2)
        job_id = gc.parse_qsub(result.stdout, result.stderr, result.returncode)
        self._remember(job_id, request)
        return job_id

    def _remember(self, job_id: str, request: SubmitRequest) -> None:
        self._tasks[job_id] = set(gc.task_ids(request)) if request.indices is not None else None

    async def reattach(self, request: SubmitRequest, job_id: str) -> None:
        self._remember(job_id, request)

    def forget(self, job_id: str) -> None:
        self._tasks.pop(job_id, None)
        self._done.pop(job_id, None)
        self._asked.pop(job_id, None)

    # ------------------------------------------------------------------ query

    async def _query(self, ids: list[str]) -> dict[str, Observation]:
        listed = await self._qstat()
        wanted = set(ids)
        live = {k: o for k, o in listed.items() if gc.key_job(k) in wanted}
        now = time.monotonic()
        ask = [j for j in ids if self._needs_accounting(j, live, now)]
        if ask and not self.accounting and now - self._accounting_checked > ACCOUNTING_RECHECK:
            await self._check_accounting()
        out: dict[str, Observation] = {}
        if ask and self.accounting:
            out.update(await self._account(ask, live))
        for job in ids:
            out.update(self._done.get(job, {}))
        # qstat is the live view: a task it lists (again) is not finished, whatever an older
        # accounting record says (a rescheduled task leaves one record per attempt).
        out.update({k: o for k, o in live.items() if not (o.phase is Phase.DONE and o.outcome is None and k in out)})
        return out

    async def _qstat(self) -> dict[str, Observation]:
        result = await self._run(gc.render_qstat())
        if not result.ok:
            raise TransportError(f"qstat failed ({result.returncode}): {result.stderr.strip()[:300]}")
        try:
            return gc.parse_qstat(result.stdout)
        except ValueError as exc:
            raise TransportError(str(exc)) from None

    def _unaccounted(self, job_id: str, live: dict[str, Observation]) -> set[str] | None:
        """Keys of *job_id* that qstat no longer lists and whose end is not known yet.

        None when the job's tasks are not known (a job this daemon neither submitted nor
        re-attached to) and qstat does not list it as a whole.
        """
        done = self._done.get(job_id, {})
        listed = {k for k, o in live.items() if gc.key_job(k) == job_id and o.phase is not Phase.DONE}
        if job_id not in self._tasks:
            return set() if job_id in listed else None
        tasks = self._tasks[job_id]
        keys = {job_id} if tasks is None else {gc.task_key(job_id, t) for t in tasks}
        return keys - listed - set(done)

    def _needs_accounting(self, job_id: str, live: dict[str, Observation], now: float) -> bool:
        missing = self._unaccounted(job_id, live)
        if missing is not None and not missing:
            return False
        still_listed = any(gc.key_job(k) == job_id for k in live)
        if still_listed and now - self._asked.get(job_id, float("-inf")) < PARTIAL_ACCOUNTING_INTERVAL:
            # An array still running: its finished tasks almost always left a result file,
            # so reading the whole accounting file for them every poll is not worth it.
            return False
        return True

    async def _account(self, job_ids: Sequence[str], live: dict[str, Observation]) -> dict[str, Observation]:
        """Read the accounting records of *job_ids* into ``_done``; UNKNOWN for what could not be read."""
        self.qacct_calls += 1
        now = time.monotonic()
        for job in job_ids:
            self._asked[job] = now
        result = await self._run(gc.render_qacct(list(job_ids)), timeout=self.command_timeout * 2)
        answers = gc.parse_qacct_batch(result.stdout)
        unknown: dict[str, Observation] = {}
        for job in job_ids:
            answer = answers.get(job)
            problem = (gc.accounting_problem(answer) if answer is not None
                       else f"no answer ({(result.stderr or result.stdout).strip()[-200:]})")
            if problem is not None:
                if answer is not None:  # qacct itself says it cannot read the file
                    self.accounting, self.accounting_problem = False, problem
                    self._accounting_checked = now
                log.warning("qacct failed; those jobs are unknown this time", job=job, error=problem)
                keys = self._unaccounted(job, live)
                if keys is None:
                    raise TransportError(f"qacct -j {job} failed: {problem}")
                unknown.update({k: Observation.unknown(f"qacct failed: {problem}") for k in keys})
                continue
            if answer is None or answer.not_found:
                continue
            for key, obs in gc.parse_qacct_observations(job, answer.text).items():
                if obs.phase is Phase.DONE:
                    self._done.setdefault(job, {})[key] = obs
        return unknown

    # ------------------------------------------------------------------ tags, cancel

    async def find_tags(self, tags: Collection[str]) -> dict[str, list[TaggedJob]]:
        wanted = sorted(set(tags))
        if not wanted:
            return {}
        result = await self._run(gc.render_qstat())
        if not result.ok:
            raise TransportError(f"qstat failed ({result.returncode}): {result.stderr.strip()[:300]}")
        try:
            listed = gc.parse_qstat_jobs(result.stdout)
        except ValueError as exc:
            raise TransportError(str(exc)) from None
        finished: dict[str, str] = {}
        if self.accounting:
            self.qacct_calls += 1
            acct = await self._run(gc.render_qacct(wanted), timeout=self.command_timeout * 2)
            for tag, answer in gc.parse_qacct_batch(acct.stdout).items():
                problem = gc.accounting_problem(answer)
                if problem is not None:
                    raise TransportError(f"qacct -j {tag} failed: {problem}")
                finished[tag] = answer.text
            missing = set(wanted) - set(finished)
            if missing:
                raise TransportError(f"qacct gave no answer for {', '.join(sorted(missing))}")
        return gc.tagged_jobs(listed, finished, wanted)

    async def cancel(self, job_keys: Collection[str]) -> None:
        keys = sorted(set(job_keys))
        if not keys:
            return
        for chunk in command_chunks(keys):  # (one command line within what one shell argument takes: SSH)
            result = await self._run(gc.render_qdel(chunk))
            problem = gc.qdel_failed(result.stdout, result.stderr, result.returncode)
            if problem is not None:
                raise TransportError(f"qdel failed: {problem}")
            if not result.ok:
                # Jobs that already ended make qdel say "does not exist": not a failure to cancel.
                log.info("qdel reported", code=result.returncode,
                         message=(result.stdout + result.stderr).strip()[:300])

    def stats(self) -> dict[str, Any]:
        return {**self.capabilities(), "queries": self.queries, "qacct_calls": self.qacct_calls,
                "commands": self.commands}


__all__ = ["SGEScheduler"]
