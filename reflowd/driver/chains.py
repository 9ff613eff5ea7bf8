"""Element-wise chains submitted early: an array task B mapped over array task A, ``B[i]`` from ``A[i]``.

When A's elements are in Slurm's queue as an array job, B can go out at once as an array mirroring that
job -- the same array task ids running the same elements (both unpacked, or packed into the very same
slices: :func:`packing.aligned`) -- with ``--dependency=aftercorr:<A's job id> --kill-on-invalid-dep=yes``.
Slurm starts B's array task ``t`` the moment A's task ``t`` ends with exit code 0 (every element of that
slice succeeded), while A's other tasks still run; a failed A task cancels B's task ``t`` (invalid
dependency). The worker resolves each element's inputs and identity from ``A[i]``'s result file
(``engine/deferred.py``'s ``resolve_chain``).

B has no instances until A settles (the engine expands an array once its upstream is done), so the early
job belongs to this module until then. Once B is expanded and each element it covers has either been
handed to the driver (READY, past the cache check: *claimed*) or gone elsewhere (cached, cancelled,
upstream failed), it is decided slice by slice (an unpacked element is a slice of one):

* **adopted**: every element of the slice claimed, its upstream elements succeeded in the very job the
  recipe reads, no withdrawn marker, and the array task alive in the queue or started; the elements go
  SUBMITTING -> QUEUED under the early job's tag, with no second sbatch;
* **dropped** (anything else): ``cancel/<i>.json`` markers first (a worker that starts anyway skips the
  element), then ``scancel`` of that array task, and the claimed elements go out the normal way.

A whole early array is dropped when its run stops (cancel, ``on_error=stop``, an error) or B can no
longer expand. Every early array is a ``jobs`` record written before its sbatch (``early.py``'s states),
so a restarted daemon adopts or drops it the same way: never a second submission of an element.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import structlog

from reflow_client import jobfiles

from .. import world
from ..engine import deferred
from ..engine.model import Instance, JobRecord, Run, TaskRun
from ..engine.states import SUCCESS, RunState, State
from ..schedulers.base import Phase, Presence
from ..schedulers.slurm_commands import dependency_options, master_id
from ..transports.base import TransportError
from . import packing
from .early import RECHECK, REFUSED, CheckLater, load_job, may_go_early, resolve_by_tag, submit_early, write_job
from .submit import Submitter, adopt, entrypoint, new_tag

if TYPE_CHECKING:
    from .early import EarlyJobs
    from .track import JobTrack

log = structlog.get_logger("reflowd.early")

#: Upstream array sizes a chain may be submitted early for (its worker resolves a view of that many).
MAX_ELEMENTS = 10_000


def upstream_job(record: JobRecord) -> str | None:
    """The upstream array job an early chained array waits on (from its ``aftercorr`` option)."""
    dep = str(record.request.options.get("dependency", ""))
    kind, _, ids = dep.partition(":")
    return ids if kind == "aftercorr" and ids.isdigit() else None


class ChainJobs:
    """A cluster driver's early element-wise chains (owned by :class:`early.EarlyJobs`)."""

    def __init__(self, early: EarlyJobs) -> None:
        self.early = early
        self.d = early.d
        #: (run id, task) -> {tag: record}: early arrays not yet decided.
        self.records: dict[tuple[str, str], dict[str, JobRecord]] = {}
        #: (run id, task, upstream job id): upstream jobs already mirrored (or found unaligned).
        self.mirrored: set[tuple[str, str, str]] = set()
        self._elements: dict[str, set[int]] = {}
        self._claims: dict[str, dict[int, Instance]] = {}
        self._busy: set[str] = set()  # tags of early arrays whose sbatch is under way
        self._check: dict[str, Run] = {}  # runs with something to decide
        self.runs: dict[str, Run] = {}  # the runs of the records
        #: Elements cancelled while their early array is undecided: markers to write at once (tag -> indices).
        self._marks: dict[str, set[int]] = {}
        #: Early arrays whose check got no answer: when to decide them again (tag -> monotonic time).
        self._recheck: dict[str, float] = {}

    @property
    def active(self) -> bool:
        return bool(self.records)

    def elements(self, record: JobRecord) -> set[int]:
        found = self._elements.get(record.tag)
        if found is None:
            found = self._elements[record.tag] = {i for i in packing.elements(record.request) if i is not None}
        return found

    def _covering(self, run: Run, inst: Instance) -> JobRecord | None:
        for record in (self.records.get((run.id, inst.task)) or {}).values():
            if inst.index in self.elements(record):
                return record
        return None

    # ------------------------------------------------------------------ hooks (synchronous)

    def claim(self, run: Run, inst: Instance) -> bool:
        record = self._covering(run, inst) if inst.index is not None else None
        if record is None:
            return False
        self._claims.setdefault(record.tag, {})[inst.index] = inst  # type: ignore[index]
        self._check[run.id] = run
        return True

    def left(self, run: Run, inst: Instance) -> None:
        """Any instance of a run with early arrays changed: look at them again (an element left, the run
        stopped). A cancelled element gets its marker at once: Slurm may start its array task before the
        array is decided (its upstream task ended), and the worker must skip it then."""
        if inst.index is not None:
            record = self._covering(run, inst)
            if record is not None and inst.tag != record.tag:
                (self._claims.get(record.tag) or {}).pop(inst.index, None)
                if inst.state is State.CANCELLED:
                    self._marks.setdefault(record.tag, set()).add(inst.index)
        self._check[run.id] = run

    def upstream_left(self, run: Run, inst: Instance) -> None:
        """An element of an upstream array left flight otherwise than by succeeding (``EarlyJobs._upstream_left``):
        the element it feeds in an undecided early array is withdrawn at once (its marker), since Slurm starts
        it as soon as the element's array task there ends well -- which it may yet do after the daemon gave up
        on it (taken for lost) and sent it out again."""
        if inst.index is None:
            return
        for key, records in list(self.records.items()):
            tr = run.tasks.get(key[1]) if key[0] == run.id else None
            if tr is None or deferred.chain_source(tr.manifest) != inst.task:
                continue
            for record in records.values():
                if inst.index in self.elements(record):
                    self._marks.setdefault(record.tag, set()).add(inst.index)
                    self._check[run.id] = run

    def recovered(self, record: JobRecord, run: Run) -> bool:
        """An early array an earlier daemon made: kept if its task may still use it (False: drop it)."""
        tr = run.tasks.get(record.task)
        if tr is None or run.state is not RunState.RUNNING or run.cancel_requested or tr.blocked:
            return False
        if tr.expanded and not any(tr.instances.get(i) is not None and tr.instances[i].state in
                                   (State.PENDING, State.READY) for i in self.elements(record)):
            return False
        self.records.setdefault((run.id, record.task), {})[record.tag] = record
        self.runs[run.id] = run
        upstream = upstream_job(record)
        if upstream:
            self.mirrored.add((run.id, record.task, upstream))
        self._check[run.id] = run
        return True

    # ------------------------------------------------------------------ early submission

    def eligible(self, run: Run) -> list[tuple[TaskRun, str, dict[str, tuple[bool, list[list[Any]]]], JobTrack]]:
        """(chained array, its upstream, the other upstreams' values, an upstream array job to mirror)."""
        d = self.d
        out = []
        for tr in run.tasks.values():
            task = tr.manifest
            dep = deferred.chain_source(task) if task.is_array and tr.open else None
            if dep is None:
                continue
            if not may_go_early(d, run, task):
                continue
            atr = run.tasks.get(dep)
            if atr is None or not atr.expanded or not 2 <= (atr.size or 0) <= MAX_ELEMENTS:
                continue
            values = self._values(run, [t for t in task.dependencies if t != dep])
            if values is None:
                continue
            for track in list(d.tracks.values()):
                job_id = track.record.job_id
                if track.run is not run or track.record.task != dep or not job_id or track.request.indices is None \
                        or (run.id, tr.name, master_id(job_id)) in self.mirrored:
                    continue
                if all(u is not None and u.tag == track.tag and u.state in (State.QUEUED, State.RUNNING, State.SUCCEEDED)
                       for u in (atr.instances.get(i) for i in packing.elements(track.request))):
                    out.append((tr, dep, values, track))
        return out

    @staticmethod
    def _values(run: Run, deps: list[str]) -> dict[str, tuple[bool, list[list[Any]]]] | None:
        """The other upstream tasks' outputs, all known (else None: the chain waits for the normal way)."""
        out: dict[str, tuple[bool, list[list[Any]]]] = {}
        for dep in deps:
            dtr = run.tasks.get(dep)
            if dtr is None or not dtr.expanded:
                return None
            indices: list[int | None] = list(range(dtr.size or 0)) if dtr.manifest.is_array else [None]
            elements = []
            for i in indices:
                u = dtr.instances.get(i)
                if u is None or u.state not in SUCCESS:
                    return None
                elements.append(["value", u.output, u.output_hash])
            out[dep] = (dtr.manifest.is_array, elements)
        return out

    async def submit(self, run: Run, tr: TaskRun, dep: str, values: dict[str, tuple[bool, list[list[Any]]]],
                     upstream: JobTrack) -> None:
        d, cluster = self.d, self.d.cluster
        up_job = master_id(upstream.record.job_id or "")
        key = (run.id, tr.name, up_job)
        self.mirrored.add(key)  # one try per upstream job, whatever comes of it
        indices = [i for i in packing.elements(upstream.request) if i is not None]
        plan = await d.packer.plan_for(run, tr, indices)
        if not packing.aligned(upstream.request, plan):
            d.count("chain_unaligned")
            log.info("chained array packed otherwise than its upstream; it goes out the usual way", run_id=run.id,
                     task=tr.name, upstream=dep)
            return
        tag = new_tag()
        submitter = Submitter(d)
        request = submitter.build_request(run, tr, [], tag, plan, indices=indices)
        if request.indices != upstream.request.indices or request.index_offset != upstream.request.index_offset:
            d.count("chain_unaligned")
            return
        request = dataclasses.replace(request, options={**request.options, **dependency_options([up_job], "aftercorr")})
        recipe = deferred.chain_recipe(run.workflow, tr.manifest, run.params, run.run_dir, values, dep,
                                       run.tasks[dep].size or 0, upstream.request.job_dir)
        job: dict[str, Any] = {"run_id": run.id, "workflow": run.workflow, "task": tr.name,
                               "entrypoint": entrypoint(run, cluster.remote), "run_dir": run.run_dir, "tag": tag,
                               "kwargs": {}, deferred.JOB_KEY: recipe}
        if request.slices is not None and plan is not None:
            job["slices"] = [list(piece) for piece in request.slices]
            job["width"] = plan.width
        if not await write_job(submitter, run, tr.name, request, job):
            return
        if not tr.open or run.state is not RunState.RUNNING or run.cancel_requested or run.error:
            return  # moved on while we wrote (nothing was submitted)
        record = JobRecord(tag, run.id, tr.name, cluster.name, request, state="early_submitting",
                           submitted_at=world.now())
        d.store.put_job(record)
        self.records.setdefault((run.id, tr.name), {})[tag] = record
        self.runs[run.id] = run
        self._busy.add(tag)
        try:
            if await submit_early(d, record, "chain_submitted") is None and record.state == REFUSED:
                self._forget(record)
                self._give_back(run, self._claims.pop(tag, {}).values())
        finally:
            self._busy.discard(tag)
            self._check[run.id] = run

    # ------------------------------------------------------------------ deciding

    async def step(self) -> None:
        """Decide what can be decided: early arrays whose task expanded (or can no longer use them)."""
        await self._write_marks()
        runs, self._check = self._check, {}
        for run in runs.values():
            for key in [k for k in self.records if k[0] == run.id]:
                for record in list((self.records.get(key) or {}).values()):
                    if record.tag in self._busy or self._recheck.get(record.tag, 0.0) > world.monotonic():
                        self._check[run.id] = run  # its sbatch (or the cluster) has not answered yet: later
                        continue
                    self._recheck.pop(record.tag, None)
                    try:
                        what = self._ready(run, record)
                        if what == "drop":
                            await self._drop_all(run, record)
                        elif what == "decide":
                            await self._decide(run, record)
                    except Exception as exc:  # (each decision on its own: the others still go on)
                        self.early.shown(f"deciding the early array of {record.task} (run {run.id})", exc)

    async def _write_marks(self) -> None:
        """The markers of elements cancelled while their early array waits for a decision (the decision skips
        them anyway: an element with a marker is not wanted, and only a wanted one's marker means dropped)."""
        marks, self._marks = self._marks, {}
        files = {jobfiles.cancel_path(record.request.job_dir, i): b"{}" for tag, indices in marks.items()
                 if (record := self._record(tag)) is not None for i in indices}
        if not files:
            return
        cluster = self.d.cluster
        try:
            await cluster.metered.write_files(files, timeout=cluster.config.command_timeout * 2)
        except (TransportError, OSError, TimeoutError) as exc:
            log.warning("cannot mark cancelled elements of an early array; will retry", error=str(exc))
            for tag, indices in marks.items():
                self._marks.setdefault(tag, set()).update(indices)

    def _record(self, tag: str) -> JobRecord | None:
        for records in self.records.values():
            if tag in records:
                return records[tag]
        return None

    def sweep(self) -> None:
        """Look at every early array again (a run that stopped without an instance changing)."""
        for run_id, _ in list(self.records):
            run = self.runs.get(run_id)
            if run is not None:
                self._check[run_id] = run

    def _ready(self, run: Run, record: JobRecord) -> str | None:
        tr = run.tasks.get(record.task)
        if tr is None or run.state is not RunState.RUNNING or run.cancel_requested or run.error or tr.blocked:
            return "drop"
        if not tr.expanded:
            return None
        claims = self._claims.get(record.tag) or {}
        for i in self.elements(record):
            inst = tr.instances.get(i)
            if inst is None:
                return "drop"  # (another size than the recipe's: it is not this task's array any more)
            if inst.state is State.PENDING or (inst.state is State.READY and i not in claims and not inst.tag):
                return None  # not past the cache check yet
        return "decide"

    def _forget(self, record: JobRecord) -> None:
        key = (record.run_id, record.task)
        recs = self.records.get(key)
        if recs is not None:
            recs.pop(record.tag, None)
            if not recs:
                del self.records[key]
        self._elements.pop(record.tag, None)
        self._recheck.pop(record.tag, None)
        if not any(k[0] == record.run_id for k in self.records):
            self.runs.pop(record.run_id, None)

    def _give_back(self, run: Run, insts: Any) -> None:
        """Claimed elements that go out the normal way after all."""
        again = [i for i in insts if i.state is State.READY and not i.tag]
        if again:
            self.d.submit(run, again)

    async def _drop_all(self, run: Run, record: JobRecord) -> None:
        self._forget(record)
        claims = self._claims.pop(record.tag, {})
        self.d.count("early_dropped")
        if await self.early.withdraw(record, run, claims.values()):
            self._give_back(run, claims.values())

    async def drop(self, record: JobRecord, slots: list[int] | None) -> None:
        """Withdraw array tasks *slots* of an early array (None: all of it): their elements' markers first
        (a worker that starts anyway skips them), then ``scancel``."""
        d, cluster = self.d, self.d.cluster
        request = record.request
        pieces = request.slices or [[i] for i in request.indices or ()]
        chosen = range(len(pieces)) if slots is None else slots
        marks = {jobfiles.cancel_path(request.job_dir, i): b"{}" for t in chosen for i in pieces[t]}
        try:
            if marks:
                await cluster.metered.write_files(marks, timeout=cluster.config.command_timeout * 2)
        except (TransportError, OSError, TimeoutError) as exc:
            log.warning("cannot mark an early array's elements withdrawn; cancelling them", tag=record.tag,
                        error=str(exc))
        if not record.job_id:
            try:
                record.job_id = await self.early._find(record)  # noqa: SLF001 (the owner's look-up by tag)
            except (TransportError, TimeoutError) as exc:
                log.warning("cannot look an early array up by tag; its markers stop it", tag=record.tag,
                            error=str(exc))
        if record.job_id:  # (owed durably: a dropped record is not recovered)
            if slots is None:
                d.cancel_jobs([record.job_id])
            else:
                d.cancel_jobs([packing.job_key(request, record.job_id, pieces[t][0]) for t in slots])
        if slots is None:
            record.state = "dropped"
            d.store.put_job(record)
        log.info("early array dropped" if slots is None else "early array tasks dropped", run_id=record.run_id,
                 task=record.task, tag=record.tag, job_id=record.job_id, tasks=None if slots is None else len(slots))

    async def _decide(self, run: Run, record: JobRecord) -> None:
        d = self.d
        claims = self._claims.pop(record.tag, {})
        self._forget(record)
        where = f"adopting the early array of {record.task}"
        try:
            chosen = await self._adoptable(run, record, claims)
        except (TransportError, TimeoutError, OSError, CheckLater) as exc:  # its tasks may have started: again later
            log.info("cannot check an early array yet; will try again", run_id=run.id, task=record.task,
                     tag=record.tag, error=str(exc) or type(exc).__name__)
            self._later(run, record, claims)
            return
        except Exception as exc:  # its tasks may have started (finding out is what raised): none goes out again
            self.early.failed(run, claims.values(), where, exc, record)
            await self.early.withdraw(record)
            return
        chosen = {t: [i for i in picked if claims[i].state is State.READY and not claims[i].tag]
                  for t, picked in chosen.items()}
        chosen = {t: picked for t, picked in chosen.items() if picked}
        if not chosen:
            log.info("early array not adopted; its elements go out the usual way", run_id=run.id, task=record.task,
                     tag=record.tag)
            d.count("early_dropped")
            if await self.early.withdraw(record, run, claims.values()):
                self._give_back(run, claims.values())
            return
        request = record.request
        pieces = request.slices or [[i] for i in request.indices or ()]
        dropped = [t for t in range(len(pieces)) if t not in chosen]
        # elements of an adopted array task that are not adopted: the worker must skip them (markers)
        skipped = [i for t, picked in chosen.items() for i in pieces[t] if i not in picked]
        if skipped:
            try:
                await d.cluster.metered.write_files({jobfiles.cancel_path(request.job_dir, i): b"{}" for i in skipped},
                                                    timeout=d.cluster.config.command_timeout * 2)
            except (TransportError, OSError, TimeoutError) as exc:  # they must not run twice: drop it all
                log.warning("cannot mark an early array's elements withdrawn; dropping it", tag=record.tag,
                            error=str(exc))
                if await self.early.withdraw(record, run, claims.values()):
                    self._give_back(run, claims.values())
                return
        job_id = record.job_id or ""
        record.state = "submitting"
        d.store.put_job(record)
        now = world.now()
        adopted: dict[int | None, Instance] = {}
        evidence = {"source": "early", "tag": record.tag, "job_id": job_id, "chain": True}
        for picked in chosen.values():
            for i in picked:
                inst = claims[i]
                if d.host.transition(run, inst, State.SUBMITTING, evidence, tag=record.tag, submitted_at=now,
                                     not_before=None):
                    adopted[i] = inst
        d.count("early_adopted")
        d.count("chain_adopted_elements", len(adopted))
        track = d.new_track(record, run, adopted)
        try:
            await self._hand_over(run, record, track, claims, pieces, skipped, dropped)
        except Exception as exc:  # its elements are in flight under the early array: that submission failed
            d.count("early_errors")
            d.track_failed(d.tracks.get(record.tag) or track, where, exc)

    def _later(self, run: Run, record: JobRecord, claims: dict[int, Instance]) -> None:
        """*record* stays undecided (its check got no answer): decided again after ``early.RECHECK`` s."""
        self.records.setdefault((record.run_id, record.task), {})[record.tag] = record
        self.runs[run.id] = run
        kept = {i: inst for i, inst in claims.items() if inst.state is State.READY and not inst.tag}
        self._claims[record.tag] = {**kept, **self._claims.get(record.tag, {})}
        self._recheck[record.tag] = world.monotonic() + RECHECK
        self._check[run.id] = run

    async def _hand_over(self, run: Run, record: JobRecord, track: JobTrack, claims: dict[int, Instance],
                         pieces: list[list[int]], skipped: list[int], dropped: list[int]) -> None:
        """The adopted elements (SUBMITTING under the early array's tag) become that job's: the rest go the
        usual way (the array tasks that hold none of them withdrawn first), then the job is adopted."""
        d = self.d
        job_id = record.job_id or ""
        # Until it is adopted, a cancel of one of its elements finds the track where a submission under way
        # is (``packing.Packer.left`` writes the element's marker); the job id is known: nothing to look up.
        track.resolve_after = math.inf
        d.add_unresolved(track)
        try:
            self._give_back(run, [claims[i] for i in skipped if i in claims])
            if dropped:
                d.count("chain_dropped_tasks", len(dropped))
                try:
                    await self.drop(record, dropped)
                finally:
                    self._give_back(run, [claims[i] for t in dropped for i in pieces[t] if i in claims])
        finally:
            d.drop_unresolved(record.tag)
        if not job_id:
            resolve_by_tag(d, track)
            return
        await adopt(d, track, job_id, {"source": "scheduler", "job_id": job_id, "early": True})

    async def _adoptable(self, run: Run, record: JobRecord, claims: dict[int, Instance]) -> dict[int, list[int]]:
        """The elements to adopt, by array task (see :func:`verdict`)."""
        d, cluster = self.d, self.d.cluster
        timeout = cluster.config.command_timeout
        request = record.request
        pieces = request.slices or [[i] for i in request.indices or ()]
        if not record.job_id:
            record.job_id = await self.early._find(record)  # noqa: SLF001 (the owner's look-up by tag)
            if record.job_id:
                record.state = "early"
                d.store.put_job(record)
        path = f"{request.job_dir}/{jobfiles.JOB_FILE}"
        raw = (await cluster.metered.read_files([path], timeout=timeout)).get(path)
        if raw is None:
            return {}
        recipe = load_job(raw)[deferred.JOB_KEY]
        dep = recipe["chain"]["dep"]
        atr = run.tasks.get(dep)
        if atr is None or (atr.size or 0) != recipe["chain"]["size"]:
            return {}

        def current_value(name: str, n: int) -> tuple[str | None, str | None] | None:
            dtr = run.tasks[name]
            u = dtr.instances.get(n if dtr.manifest.is_array else None)
            return (None, u.output_hash) if u is not None and u.state in SUCCESS else None

        def upstream_ok(i: int) -> bool:  # A[i] succeeded in the very file the recipe reads
            u = atr.instances.get(i)
            found = jobfiles.result_path(jobfiles.job_dir(run.run_dir, run.id, u.tag), i) \
                if u is not None and u.state is State.SUCCEEDED and u.tag else None
            return deferred.chain_matches(recipe, recipe.get("attempt", 0), i, found) is None

        def wanted(i: int) -> bool:  # claimed, at the recipe's attempt, the other upstreams unchanged
            inst = claims.get(i)
            return inst is not None and inst.state is State.READY and not inst.tag \
                and inst.attempt == recipe.get("attempt") \
                and deferred.matches(recipe, inst.attempt, current_value) is None

        a_ok = {i for piece in pieces for i in piece if upstream_ok(i)}
        ok = {i for piece in pieces for i in piece if i in a_ok and wanted(i)}
        candidates = [t for t, piece in enumerate(pieces) if any(i in ok for i in piece)]
        if not candidates:
            return {}
        # a wanted element's marker means a daemon began dropping the task (another's only skips that element:
        # cancelled while the array waited, or not adopted by an earlier decision)
        withdrawn = {t: [jobfiles.cancel_path(request.job_dir, i) for i in pieces[t] if i in ok] for t in candidates}
        marks = {t: [p for i in pieces[t] for p in (jobfiles.started_path(request.job_dir, i),
                                                    jobfiles.result_path(request.job_dir, i))] for t in candidates}
        seen = await cluster.metered.exists([p for t in candidates for p in (*withdrawn[t], *marks[t])],
                                            timeout=timeout)
        started = {t for t in candidates if any(seen[p] for p in marks[t])}
        alive: set[int] = set()
        waiting = [t for t in candidates if t not in started]
        if not record.job_id:  # no job carries its tag (yet): its tag decides later (``early.resolve_by_tag``)
            alive = set(waiting)
        elif waiting:
            answers = await cluster.scheduler.query([record.job_id])
            for t in waiting:
                obs = answers.get(packing.job_key(request, record.job_id, pieces[t][0]))
                if obs is not None and obs.presence is Presence.PRESENT and obs.phase is not Phase.DONE:
                    alive.add(t)
            gone = [t for t in waiting if t not in alive]
            if gone:  # (it may have started and ended between the two looks)
                again = await cluster.metered.exists([p for t in gone for p in marks[t]], timeout=timeout)
                started |= {t for t in gone if any(again[p] for p in marks[t])}
        out = {}
        for t in candidates:
            if any(seen[p] for p in withdrawn[t]):
                continue  # a daemon began dropping it
            picked = verdict(pieces[t], ok, a_ok, t in started, t in alive)
            if picked:
                out[t] = picked
        return out


def verdict(piece: list[int], ok: set[int], upstream_ok: set[int], started: bool, alive: bool) -> list[int]:
    """The elements of one array task of an early array to adopt (empty: drop the task).

    *ok*: elements wanted (claimed, unchanged) whose upstream element succeeded where the recipe reads it;
    *upstream_ok*: elements whose upstream element did. A task that has started is adopted for its *ok*
    elements (the others are skipped by their markers, or failed without running: their upstream result
    says so). One that has not must be alive in the queue and wait on an upstream task that succeeded
    whole (else Slurm cancels it, or the worker would find a failed upstream element); then too only its
    *ok* elements are adopted."""
    chosen = [i for i in piece if i in ok]
    if not chosen or started:
        return chosen
    if not alive or not all(i in upstream_ok for i in piece):
        return []
    return chosen

