"""Watching a cluster's jobs: two clocks, one poll per cycle.

* The **file clock** lists a tracked job directory's ``results/`` (and
  ``started/`` while something there has not started): no scheduler call,
  so jobs that end are noticed within a fraction of a second. Each job
  directory has its own clock, which slows down while nothing changes there.
* The **scheduler clock** (adaptive interval, paced by the budget) runs ONE
  poll -- ``Scheduler.query`` for every tracked job of the cluster -- and
  feeds each instance's observation to :mod:`~reflowd.engine.decide`. It
  tells what files cannot: pending reasons, kills, timeouts, out-of-memory,
  lost jobs. A job the scheduler reports finished has its result read at once.

Each cycle also delivers cancellations and resolves submissions whose outcome
is unknown, by their tag. Work per cycle follows what changed: instances
leave a track the moment they leave flight, and file checks read only names
not seen before.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import structlog

from reflow_client import jobfiles

from .. import world
from ..engine import decide
from ..engine.model import Instance
from ..engine.states import FAILURE, State
from ..schedulers.base import Answers, Observation, Phase, Presence
from ..steps import run_steps
from ..transports.base import TransportError
from . import requeue
from . import packing
from . import early
from .submit import adopt
from .track import JobTrack, index_of

if TYPE_CHECKING:
    from .driver import Driver

log = structlog.get_logger("reflowd.observer")

#: Job directories checked at once by the file clock.
FILE_CONCURRENCY = 16
#: Instances handled between two yields to the event loop when a poll or a file check answers for very many
#: (each is a result parsed, a decision and a transition with its rows: 60-100 us, so a step stays under ~10 ms).
YIELD_EVERY = 64


#: Tracks handled between two yields when a poll answers for very many jobs (an idle one costs a comparison).
TRACKS_PER_STEP = 64


def _by_index(inst: Instance) -> int:
    return -1 if inst.index is None else inst.index


def waiting_in_queue(track: JobTrack) -> bool:
    """The scheduler's unchanged answer says none of the job's elements has started: no result can be
    there to find, so its files are not looked at. The next poll that shows one running or finished
    ends this (the job's answer changes) and hurries its file clock."""
    return track.waiting


class Observer:
    def __init__(self, driver: Driver) -> None:
        self.d = driver
        self.cluster = driver.cluster
        self.host = driver.host

    def apply(self, track: JobTrack, inst: Instance, decision: decide.Decision) -> bool:
        if decision.state is None:
            self.host.update(inst, **decision.fields)
            return False
        ok = self.host.transition(track.run, inst, decision.state, decision.evidence, **decision.fields)
        if ok and decision.state is State.RUNNING:
            self.d.add_deadline(track, inst)
            self.expect_end(track)
        return ok

    def expect_end(self, track: JobTrack) -> None:
        """An element of *track* started: its result is likely about a typical duration of its task from now
        (what packing measured, when known; at once otherwise, for a short task), so the job's file clock
        looks then instead of after an interval that backed off while the job started."""
        manifest = track.run.tasks[track.record.task].manifest
        est = self.d.packer.known(track.run.workflow, manifest.name, manifest.version)
        track.files.expect(world.monotonic() + (est.mean if est is not None else 0.0))

    async def loop(self) -> None:
        d = self.d
        next_query = 0.0
        while True:
            d.observer_wake = wake = anyio.Event()
            # Each step on its own: one that raises is shown (``Driver.loop_failed``) and the others still run.
            await self.step("delivering cancellations", self.deliver_cancels)
            await self.step("resolving submissions by their tag", self.resolve_unresolved)
            if d.tracks or d.lingering:
                await self.step("checking job files", self.check_files)
                now = world.monotonic()
                due = d.query_due or next_query <= now or d.deadline_due() or bool(d.held_tags)
                if due and d.health.allows(now) and self.cluster.budget.wait_time() == 0:
                    d.query_due = False
                    await self.step("polling the scheduler", self.query)
                    next_query = world.monotonic() + max(d.policy.interval, d.health.interval())
            await self.step("pruning finished jobs", self.prune)
            try:
                sleep = self.sleep_time(next_query)
            except Exception as exc:
                d.loop_failed("timing the observe loop", exc)
                sleep = self.cluster.result_interval
            with anyio.move_on_after(sleep):
                await wake.wait()

    async def step(self, where: str, fn: Callable[[], Awaitable[None]]) -> None:
        """One step of a cycle; an exception a cluster throws at it is shown on the cluster, never only logged,
        and the cycle goes on (one tied to a job is handled where it happens: ``Driver.track_failed``)."""
        try:
            await fn()
        except Exception as exc:
            self.d.count("observer_errors")
            self.d.loop_failed(where, exc)

    def sleep_time(self, next_query: float) -> float:
        """Until something is due: the next file check, poll, deadline or look-up (never sooner than the
        result interval). Jobs that wait in a queue for hours then cost a few wake-ups a minute, not two a
        second; anything that changes meanwhile wakes the loop (``Driver.wake``)."""
        d = self.d
        base = self.cluster.result_interval
        if not (d.tracks or d.unresolved or d.cancels or d.lingering):
            return d.settings.idle_wait
        if d.cancels or d.lingering or d.held_tags or d.query_due or d.emptied or d.packer.skips:
            return base
        now_m, now = world.monotonic(), world.now()
        due = next_query - now_m
        if self.cluster.budget.wait_time() > 0 or not d.health.allows(now_m):
            due = min(due, max(self.cluster.budget.wait_time(), d.health.next_probe_at - now_m))
        due = min(due, d.next_file_check() - now_m)  # (those waiting in a queue have no file clock running)
        if due <= base:
            return base
        due = min(due, d.next_resolve() - now)
        if d.deadlines:
            due = min(due, d.deadlines[0][0] - now)
        return min(max(base, due), max(base, d.policy.maximum))

    # ------------------------------------------------------------------ file clock

    async def check_files(self) -> None:
        now = world.monotonic()
        due = self.d.files_due(now)
        if not due:
            return
        try:
            await self.check_due_files(due)
        finally:
            self.d.files_checked(due)

    async def check_due_files(self, due: list[JobTrack]) -> None:
        limiter = anyio.CapacityLimiter(FILE_CONCURRENCY)

        async def one(track: JobTrack) -> None:
            async with limiter:
                try:
                    changed = await self.check_track_files(track)
                except (TransportError, TimeoutError) as exc:
                    log.debug("result check failed", cluster=self.d.name, tag=track.tag, error=str(exc))
                    changed = False
                except Exception as exc:
                    self.track_failed(track, "reading job files", exc)
                    changed = True
                track.files.after_check(world.monotonic(), changed)

        if len(due) == 1:  # the common case: no task group to spawn
            await one(due[0])
            return
        async with anyio.create_task_group() as tg:
            for track in due:
                tg.start_soon(one, track)

    async def check_track_files(self, track: JobTrack) -> bool:
        if not track.live:
            return False
        timeout = self.cluster.config.command_timeout
        transport = self.cluster.metered
        names = await transport.listdir(os.path.join(track.request.job_dir, "results"), timeout=timeout)
        done = []
        for name in names:
            if name in track.seen_results:
                continue
            index = index_of(name)
            inst = track.live.get(index) if index is not False else None  # type: ignore[arg-type]
            if inst is not None:
                done.append(inst)
            else:
                track.seen_results.add(name)  # not ours to act on (any more): never look at it again
        changed = False
        if done:
            # In index order (a directory lists in no order): a job's elements ending together are then
            # consecutive transitions, which the store writes as one row (``store.group_transitions``).
            done.sort(key=_by_index)
            await self.read_results(track, done)
            changed = True
        if track.element_count < 0:
            track.element_count = len(packing.elements(track.request))
        if track.live and len(track.seen_started) < track.element_count:
            started = await transport.listdir(os.path.join(track.request.job_dir, "started"), timeout=timeout)
            begun = []
            for name in started:
                if name in track.seen_started:
                    continue
                track.seen_started.add(name)
                index = index_of(name)
                inst = track.live.get(index) if index is not False else None  # type: ignore[arg-type]
                if inst is not None and inst.state is State.QUEUED:
                    begun.append(inst)
            begun.sort(key=_by_index)  # (in index order, as results above)
            for inst in begun:
                if inst.state is State.QUEUED:
                    changed = True
                    self.apply(track, inst, decide.Decision(State.RUNNING, {"source": "started_file"},
                                                            {"started_at": world.now(), "reason": None}))
        return changed

    async def read_results(self, track: JobTrack, insts: list[Instance]) -> list[Instance]:
        """Read and apply result files; returns the instances that had none."""
        paths = {inst.index: jobfiles.result_path(track.request.job_dir, inst.index) for inst in insts}
        data = await self.cluster.metered.read_files(list(paths.values()), timeout=self.cluster.config.command_timeout)
        if not track.stale_loaded and any(raw is not None for raw in data.values()):
            await self.load_stale(track)
        missing = []
        now = world.now()
        for n, inst in enumerate(insts):
            if n and n % YIELD_EVERY == 0:
                await anyio.sleep(0)
            if self.d.store.pace_due:  # (asked first: a coroutine per element for nothing costs more)
                await self.d.store.pace()
            raw = data.get(paths[inst.index])
            if raw is None:
                missing.append(inst)
                continue
            track.seen_results.add(os.path.basename(paths[inst.index]))
            try:
                where = f"result file of {inst.label}"
                result = (jobfiles.parse_result(raw, where) if len(raw) < jobfiles.PIECES_FROM
                          else await run_steps(jobfiles.parse_result_steps(raw, where)))
            except Exception as exc:  # ValueError, and RecursionError for absurd nesting: the instance fails
                result = {"state": "failed", "error": f"unreadable result: {exc}"}
            if not (inst.in_flight and inst.tag == track.tag):
                continue
            stamp = requeue.mark(result)
            held = track.held.get(inst.index)
            if track.stale.get(inst.index) == stamp:
                track.seen_results.discard(os.path.basename(paths[inst.index]))  # a later run will overwrite it
                missing.append(inst)  # a requeued run's result is no result for the attempt
                continue
            if held is not None and requeue.mark(held[0]) == stamp:
                continue  # the result already held: nothing new
            if held is not None:
                track.held.pop(inst.index, None)  # a newer run's result replaces the held one
            obs = inst.observed
            if track.packed and not packing.explains(result):
                obs = None  # the job's end explains only the element a signal stopped, not another's own failure
            decision = decide.from_result(inst, result, obs)
            explained = obs is not None and obs.phase is Phase.DONE
            if decision.state is State.FAILED and result.get("signal") and not explained:
                # Killed by a signal: the scheduler knows why (time limit, cancel, preemption). Ask it first.
                # While the scheduler says the job runs (or runs again after a requeue), never conclude.
                since = track.held.setdefault(inst.index, (result, now))[1]
                self.d.held_tags[track.tag] = None
                track.seen_results.discard(os.path.basename(paths[inst.index]))  # a requeued run may overwrite it
                if now - since < self.d.settings.hold_max or requeue.still_running(obs):
                    continue
            track.held.pop(inst.index, None)
            self.apply(track, inst, decision)
        return missing

    async def mark_stale(self, track: JobTrack, index: int | None, stamp: tuple[Any, ...]) -> None:
        """Remember a requeued run's result as stale, in memory and in the job directory (for a restart)."""
        track.stale[index] = stamp
        try:
            await self.cluster.metered.write_files({requeue.stale_path(track.request.job_dir, index):
                                                    requeue.encode_mark(stamp)},
                                                   timeout=self.cluster.config.command_timeout)
        except (TransportError, OSError, TimeoutError) as exc:  # memory still has it; only a restart would miss it
            log.warning("cannot keep a requeue's stale mark in the job directory", cluster=self.d.name,
                        tag=track.tag, error=str(exc))

    async def load_stale(self, track: JobTrack) -> None:
        """The stale marks an earlier daemon kept for this submission (read once, before its first result)."""
        timeout = self.cluster.config.command_timeout
        names = await self.cluster.metered.listdir(os.path.join(track.request.job_dir, requeue.STALE_DIR),
                                                   timeout=timeout)
        keyed = {index_of(name): name for name in names}
        paths = {index: requeue.stale_path(track.request.job_dir, index) for index in keyed if index is not False}
        data = await self.cluster.metered.read_files(list(paths.values()), timeout=timeout) if paths else {}
        for index, path in paths.items():
            stamp = requeue.decode_mark(data.get(path))
            if stamp is not None:
                track.stale.setdefault(index, stamp)  # type: ignore[arg-type]
        track.stale_loaded = True

    # ------------------------------------------------------------------ scheduler clock

    async def query(self) -> None:
        d, cluster = self.d, self.cluster
        tracks = [t for t in d.tracks.values() if t.live and t.record.job_id]
        job_ids = sorted({t.record.job_id for t in tracks if t.record.job_id} | d.lingering.job_ids())
        if not job_ids:
            return
        started = world.monotonic()
        cluster.count("query")
        observations: dict[str, Observation] | None
        try:
            observations = await cluster.scheduler.query(job_ids)
            d.last_query_error = None
            d.scheduler_answered()
        except (TransportError, TimeoutError) as exc:
            log.info("status query failed; treating every job as unknown", cluster=d.name, error=str(exc))
            d.last_query_error = str(exc) or type(exc).__name__
            d.scheduler_failed("query", d.last_query_error)
            observations = None
        changed = False
        if d.lingering.observed(observations, world.now()) and d.ready:
            d.ready_wake.set()  # those elements ended at the scheduler: their queue slots are free
        for n, track in enumerate(tracks):
            if n and n % TRACKS_PER_STEP == 0:
                await anyio.lowlevel.checkpoint()  # 10^3 jobs' answers: let the loop answer clients meanwhile
            if self.d.tracks.get(track.tag) is not track:
                continue  # pruned meanwhile
            try:
                changed |= await self.apply_observations(track, observations)
            except (TransportError, TimeoutError):
                continue  # cannot look at the files: conclude nothing for this job this cycle
            except Exception as exc:
                self.track_failed(track, "applying the scheduler's answer", exc)
                changed = True
        # Poll promptly for the held results that are young; one held while its job still runs waits its turn.
        # (Only tags that held something can: a result is held where its tag is added to ``held_tags``.)
        hold_until = world.now() - d.settings.hold_max
        d.held_tags = {t: None for t in d.held_tags
                       if (tr := d.tracks.get(t)) is not None and any(since > hold_until for _, since in tr.held.values())}
        d.policy.after_query(world.monotonic() - started, changed)

    async def apply_observations(self, track: JobTrack, observations: dict[str, Observation] | None) -> bool:
        d = self.d
        now = world.now()
        changed = False
        ending: list[Instance] = []
        for index, (result, since) in list(track.held.items()):
            inst = track.live.get(index)
            if inst is None:
                track.held.pop(index, None)
                continue
            obs = observations.get(inst.job_key or "") if observations is not None else None
            if obs is not None:
                inst.observed = obs
            if requeue.requeued(obs):  # the signalled run was requeued: its result is not the attempt's
                del track.held[index]
                await self.mark_stale(track, index, requeue.mark(result))
                decision = decide.from_observation(inst, obs, now, self.cluster.timing)  # type: ignore[arg-type]
                if decision is not None:
                    changed |= self.apply(track, inst, decision)
                continue
            if (obs is not None and obs.phase is not Phase.RUNNING) or (
                    now - since >= d.settings.hold_max and not requeue.still_running(obs)):
                ending.append(inst)
        if ending:
            # A requeued job's later run may have overwritten the held result: look once more, then conclude.
            await self.read_results(track, ending)
            for inst in ending:
                held = track.held.pop(inst.index, None)
                if held is not None and inst.in_flight:
                    changed |= self.apply(track, inst, decide.from_result(inst, held[0], inst.observed))
                else:
                    changed = True
        if observations is None:
            d.unquiet(track)
            return changed
        # A scheduler answering job by job (``Answers``): the same answer as last time, when that one
        # changed nothing, changes nothing now either -- skip the job without looking at its elements.
        answer = observations.job(track.record.job_id or "") if isinstance(observations, Answers) else None
        if answer is not None and not track.held and track.quiet_live == len(track.live) \
                and track.quiet_answer is not None and (answer is track.quiet_answer or answer == track.quiet_answer):
            if track.quiet_active:
                track.files.hurry()
            d.count("unchanged_jobs_skipped")
            return changed
        d.unquiet(track)
        finished: list[Instance] = []
        concluding: list[tuple[Instance, decide.Decision]] = []
        active = False
        quiet = not changed and not track.held
        for n, inst in enumerate(list(track.live.values())):
            if n and n % YIELD_EVERY == 0:
                await anyio.sleep(0)  # a large array: let the loop answer clients meanwhile
                if not inst.in_flight:
                    quiet = False
                    continue
            if inst.index in track.held:
                quiet = False
                continue
            found = observations.get(inst.job_key or "")
            previous = inst.observed
            if found is not None and (found is previous or found == previous) and found.phase is not Phase.DONE \
                    and not inst.absent_count:
                active = active or found.phase is Phase.RUNNING
                continue  # the same answer as last time: nothing to decide (the common case, cheaply)
            quiet = False
            obs = found or Observation.absent()
            if obs.presence is Presence.UNKNOWN:
                self.not_understood(inst, obs)
                continue
            active = active or obs.phase is not Phase.QUEUED
            inst.observed = obs
            if obs.phase is Phase.DONE and inst.done_seen_at is None:
                finished.append(inst)  # read its result at once (the file clock may be asleep)
            decision = decide.from_observation(inst, obs, now, self.cluster.timing)
            if decision is None:
                continue
            if track.packed and decision.state is State.RUNNING:
                decision = packing.running_decision(decision)
            if decision.state in FAILURE:
                concluding.append((inst, decision))
                continue
            changed |= self.apply(track, inst, decision)
        if active:
            track.files.hurry()  # something runs (or ended): its results are due soon, look at its files often
            if track.packed and not track.seen_started:  # its worker is starting: its first element is near
                track.files.expect(world.monotonic())
        if quiet and answer is not None:
            d.quiet(track, answer, len(track.live), active)
        # Before concluding a failure from the scheduler alone, look once more for a result file.
        look = {id(i): i for i in finished} | {id(i): i for i, _ in concluding}
        if look:
            missing = await self.read_results(track, [i for i in look.values() if i.in_flight])
            changed |= len(missing) < len(look)
            missing_ids = {id(i) for i in missing}
            concluding = [(i, dec) for i, dec in concluding if id(i) in missing_ids and i.in_flight]
            made_early = bool(concluding) and d.early.made(track.record, track.run)
            if (track.packed or made_early) and concluding:
                started = set(await self.cluster.metered.listdir(os.path.join(track.request.job_dir, "started"),
                                                                 timeout=self.cluster.config.command_timeout))
                if track.packed:
                    concluding = packing.after_death(track, concluding, started)
                if made_early:  # cancelled by Slurm for a dependency that failed after adoption: not run yet
                    concluding = early.never_started(concluding, started)
            for inst, decision in concluding:
                if not inst.in_flight:
                    continue
                if track.packed and decision.state in FAILURE:
                    decision = packing.died_packed(inst, decision)  # its retry runs alone, after a restart too
                ok = self.apply(track, inst, decision)
                changed |= ok
                if ok and decision.state is State.READY:
                    self.d.count("early_requeued" if decision.evidence.get("source") == "early" else "packed_requeued")
                    inst.handed = True
                    self.d.submit(track.run, [inst])  # never started: its attempt is still to come
        return changed

    def not_understood(self, inst: Instance, obs: Observation) -> None:
        """An answer for this job that the adapter could not map: say so in the log and in ``status``."""
        if obs.native_state is None:
            return  # the whole query failed: nothing to show per instance
        native = obs.native_state
        if native not in self.d.unrecognised:
            log.warning("scheduler state not understood; the job is left as it was", cluster=self.d.name,
                        state=native, detail=obs.detail, job=inst.job_key)
        self.d.unrecognised[native] = self.d.unrecognised.get(native, 0) + 1
        reason = f"scheduler reports {native!r}, which reflow does not understand"
        if obs.detail:
            reason += f" ({obs.detail})"
        if inst.reason != reason:
            self.host.update(inst, reason=reason)

    def track_failed(self, track: JobTrack, where: str, exc: Exception) -> None:
        """Something raised while handling one job: its instances and run fail with the error; keep going."""
        self.d.count("observer_errors")
        self.d.track_failed(track, where, exc)

    # ------------------------------------------------------------------ housekeeping

    async def prune(self) -> None:
        d = self.d
        for n, tag in enumerate(list(d.emptied)):
            if n and n % TRACKS_PER_STEP == 0:
                await anyio.lowlevel.checkpoint()  # (each writes its job's row)
            if tag not in d.emptied:
                continue  # (taken meanwhile)
            del d.emptied[tag]
            track = d.tracks.get(tag)
            if track is None or track.live:
                continue
            d.unfollow(tag)
            d.packer.skips.pop(tag, None)
            track.record.state = "done"
            d.store.put_job(track.record)
            if track.record.job_id:
                self.cluster.scheduler.forget(track.record.job_id)

    async def deliver_cancels(self) -> None:
        try:
            await self._deliver_cancels()
        finally:
            done, self.d.cancel_round = self.d.cancel_round, anyio.Event()
            done.set()

    async def _deliver_cancels(self) -> None:
        d, cluster = self.d, self.cluster
        if d.packer.skips:
            markers, taken = d.packer.markers()
            try:
                if markers:
                    await cluster.metered.write_files(markers, timeout=cluster.config.command_timeout)
            except (TransportError, OSError, TimeoutError) as exc:
                d.packer.unwritten(taken)
                log.warning("cannot write cancel markers; will retry", cluster=d.name, error=str(exc))
        if not (d.cancels or d.lookups) or not d.health.allows(world.monotonic()):
            return
        if d.lookups and not await self._find_owed(sorted(d.lookups)):
            return
        if not d.cancels:
            return
        batch = sorted(d.cancels)
        d.fault("before_kill")  # (test-only: a crash with kills owed and not sent)
        cluster.count("cancel")
        try:
            await cluster.scheduler.cancel(batch)
        except (TransportError, TimeoutError) as exc:
            log.warning("cancel failed; will retry", cluster=d.name, jobs=len(batch), error=str(exc))
            d.scheduler_failed("cancel", str(exc) or type(exc).__name__)
            return
        d.scheduler_answered()
        d.kills_taken(batch)  # (owed ones: their rows go with the next commit)

    async def _find_owed(self, tags: list[str]) -> bool:
        """The jobs an earlier daemon owed kills of by tag (``Driver.owe_lookup``): found, their kills are
        owed by id (in the same commit as the look-up's row goes) and sent with this round's cancels."""
        d, cluster = self.d, self.cluster
        cluster.count("find_tags")
        try:
            found = await cluster.scheduler.find_tags(tags)
        except (TransportError, TimeoutError) as exc:
            log.warning("cannot look up jobs owed a kill; will retry", cluster=d.name, tags=len(tags), error=str(exc))
            d.scheduler_failed("find_tags", str(exc) or type(exc).__name__)
            return False
        d.scheduler_answered()
        for tag in tags:
            jobs = [j.job_id for j in found.get(tag, [])]
            if jobs:
                log.warning("killing a job submitted for instances that ended meanwhile", cluster=d.name, tag=tag,
                            jobs=jobs)
                d.cancel_jobs(jobs)
            d.lookups.pop(tag, None)
            d.lookup_settled(tag)
        return True

    async def resolve_unresolved(self) -> None:
        """Decide submissions whose outcome is unknown by looking their tag up (those due: ``Driver.resolves_due``)."""
        d = self.d
        now = world.now()
        if not d.unresolved or not d.health.allows(world.monotonic()):
            return
        due = d.resolves_due(now)
        if not due:
            return
        try:
            await self._resolve(due, now)
        finally:
            d.resolves_handled(due)

    async def _resolve(self, due: list[JobTrack], now: float) -> None:
        d, cluster = self.d, self.cluster
        cluster.count("find_tags")
        try:
            found = await cluster.scheduler.find_tags([t.tag for t in due])
        except (TransportError, TimeoutError) as exc:
            for track in due:
                track.resolve_attempts += 1
                d.resolve_at(track, now + min(60.0, d.settings.resolve_delay * 2 ** min(track.resolve_attempts, 4)))
            log.info("cannot look submissions up yet", cluster=d.name, error=str(exc))
            d.scheduler_failed("find_tags", str(exc) or type(exc).__name__)
            return
        d.scheduler_answered()
        for track in due:
            try:
                if track.failed:  # failed inside the daemon: its job, if any, is cancelled (never adopted)
                    await d.conclude_failed(track, [j.job_id for j in found.get(track.tag, [])], now)
                    continue
                await self.resolve_one(track, found.get(track.tag, []), now)
            except (TransportError, TimeoutError):
                d.resolve_at(track, now + d.settings.resolve_delay)
            except Exception as exc:
                d.drop_unresolved(track.tag)
                self.track_failed(track, "resolving a submission by its tag", exc)

    async def resolve_one(self, track: JobTrack, jobs: list, now: float) -> None:
        d, cluster = self.d, self.cluster
        if jobs:
            if len(jobs) > 1:
                log.error("several jobs carry one tag; adopting the first, cancelling the rest",
                          tag=track.tag, jobs=[j.job_id for j in jobs])
                d.cancel_jobs([j.job_id for j in jobs[1:]])
            d.drop_unresolved(track.tag)
            await adopt(d, track, jobs[0].job_id, {"source": "recovery", "found_by_tag": track.tag,
                                                   "job_id": jobs[0].job_id})
            await cluster.scheduler.reattach(track.request, jobs[0].job_id)
            log.info("adopted job found by tag", cluster=d.name, tag=track.tag, job_id=jobs[0].job_id)
            return
        track.resolve_attempts += 1
        if track.resolve_attempts < 2:  # a job may show up late: ask once more before concluding
            d.resolve_at(track, now + d.settings.resolve_delay)
            return
        await self.conclude_unsubmitted(track)
        d.drop_unresolved(track.tag)

    async def conclude_unsubmitted(self, track: JobTrack) -> None:
        """No job carries the tag: use the job directory's traces, else submit again."""
        d, cluster = self.d, self.cluster
        timeout = cluster.config.command_timeout
        results = set(await cluster.metered.listdir(os.path.join(track.request.job_dir, "results"), timeout=timeout))
        started = set(await cluster.metered.listdir(os.path.join(track.request.job_dir, "started"), timeout=timeout))
        live = [i for i in track.live.values() if i.tag == track.tag and i.state is State.SUBMITTING]
        traces = bool(results or started)
        with_result = [i for i in live if f"{jobfiles.element_key(i.index)}.json" in results]
        if with_result:
            await self.read_results(track, with_result)
        for inst in live:
            if inst.state is not State.SUBMITTING:
                continue
            key = f"{jobfiles.element_key(inst.index)}.json"
            if key in started:
                self.host.transition(track.run, inst, State.FAILED,
                                     {"source": "recovery", "tag": track.tag, "note": "started but its job vanished"},
                                     error=f"lost: job {track.tag} started but the scheduler no longer knows it",
                                     reason="lost")
            elif not traces or cluster.scheduler.can_requeue_unstarted:
                if self.host.transition(track.run, inst, State.READY, {"source": "recovery", "tag_not_found": track.tag},
                                        tag=None, submitted_at=None):
                    d.submit(track.run, [inst])
            else:
                self.host.transition(track.run, inst, State.FAILED,
                                     {"source": "recovery", "tag": track.tag, "note": "no trace of this element"},
                                     error=f"lost: job {track.tag} vanished before this element left a trace",
                                     reason="lost")
        track.record.state = "not_submitted" if not traces else "vanished"
        d.store.put_job(track.record)
        d.lookup_settled(track.tag)
        log.info("submission resolved without a job", cluster=d.name, tag=track.tag, traces=traces)
