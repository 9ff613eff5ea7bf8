"""One driver per cluster: it owns everything between the engine and that cluster's scheduler.

The engine hands a driver work (:meth:`Driver.submit` a READY instance,
:meth:`Driver.cancel_jobs`, :meth:`Driver.recover` a submission after a
restart) and tells it when an instance it follows leaves flight
(:meth:`Driver.instance_left`). The driver reports back through the narrow
:class:`Host` interface: state changes with their evidence, bookkeeping
updates, and failures it cannot attribute to a single instance.

Inside, the driver owns the cluster's ready queue, the submissions it tracks,
those whose outcome is unknown, pending cancellations, its wake-ups, the
budget and the poll policy, and runs two loops: the submit loop
(``submit.py``) and the observe loop (``observe.py``). No other module
touches these queues.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import os
from dataclasses import dataclass
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Protocol

import anyio
import structlog

from reflow_client.resources import parse_time

from .. import world
from ..clusters import ClusterRuntime
from ..engine.model import Instance, JobRecord, OwedKill, Run, TaskRun
from ..engine.resolve import Resolution
from ..engine.states import State
from ..schedulers.base import Phase
from ..store import Store
from ..transports.base import TransportError
from .early import EarlyJobs
from .health import AccountingHealth, ClusterHealth
from .observe import Observer
from .queue_limits import Lingering, QueueLimit
from .packing import Packer
from .policy import FileClock, PollPolicy
from .submit import Submitter
from .track import JobTrack

log = structlog.get_logger("reflowd.driver")

#: Seconds a job's time-limit deadlines are rounded up to (``add_deadline``): elements of a job starting
#: within this much of each other share one entry, and the poll after the limit comes at most this late.
DEADLINE_STEP = 5.0

#: Seconds between asking a degraded accounting whether it is back while nothing is tracked.
ACCOUNTING_CHECK = 30.0
#: Seconds before a driver loop that raised is started again (a bug that raises at once must not spin).
LOOP_RESTART = 5.0
#: A job row's state for a submission that failed inside the daemon before its job id was known: its tag is
#: looked up, the job cancelled if found (``Driver.conclude_failed``).
FAILED_JOB = "failed"
#: An owed kill's key for a job known only by its tag (``Driver.owe_lookup``): looked up, then killed.
BY_TAG = "tag:"


class InjectedFault(RuntimeError):
    """Test-only: raised at a ``raise:POINT`` fault point (the daemon must show it and go on)."""


class Host(Protocol):
    """What a driver may ask of the engine."""

    def transition(self, run: Run, inst: Instance, new: State, evidence: dict[str, Any], **fields: Any) -> bool:
        """Change an instance's state (checked against the table); False if refused."""
        ...

    def update(self, inst: Instance, **fields: Any) -> None:
        """Change bookkeeping fields (a pending reason, a start time) without a state change."""
        ...

    def resolution(self, run: Run, tr: TaskRun) -> Resolution:
        """A task's resolved inputs (what its job files carry)."""
        ...

    def internal_error(self, run: Run, where: str, exc: BaseException) -> None:
        """Something raised while handling *run*: show it on the run (never stop the daemon)."""
        ...


@dataclass
class DriverSettings:
    submit_concurrency: int = 4
    #: Test-only crash points, e.g. {"after_submit"}: the daemon exits hard there; "raise:POINT" raises
    #: :class:`InjectedFault` there instead, once (an unexpected exception the daemon must show and survive).
    fault_points: frozenset[str] = frozenset()
    #: Seconds before an unknown submission outcome is looked up by tag.
    resolve_delay: float = 5.0
    #: Longest a signalled worker's result waits for the scheduler to explain it.
    hold_max: float = 30.0
    #: Observer sleep while nothing is tracked.
    idle_wait: float = 5.0


class Driver:
    """A cluster's submit and observe loops and the queues they share."""

    def __init__(self, cluster: ClusterRuntime, store: Store, host: Host, settings: DriverSettings | None = None) -> None:
        self.cluster = cluster
        self.name = cluster.name
        self.store = store
        self.host = host
        self.settings = settings or DriverSettings()
        config = cluster.config
        self.policy = PollPolicy(config.min_poll_interval, config.poll_interval, config.max_poll_interval)
        # Owned queues: nothing outside the driver package touches these.
        # READY instances handed over: due now, or waiting out a retry back-off (with a heap of due times).
        self.ready: dict[Instance, Run] = {}  # keyed by the instance itself (identity): no key tuples
        self.waiting: dict[Instance, Run] = {}
        self.due_times: list[tuple[float, int, Instance]] = []
        self._seq = 0
        self.tracks: dict[str, JobTrack] = {}
        #: Indices over ``tracks`` (kept by :meth:`follow`, :meth:`unfollow`, :meth:`quiet`), so that a cycle's
        #: work follows what changed, not how many jobs wait: the tracks whose files the file clock looks at
        #: (``JobTrack.waiting`` false), and tracks by job id.
        self.awake: dict[str, JobTrack] = {}
        self.by_job: dict[str, JobTrack] = {}
        #: The awake tracks' file clocks by when they are due (``(next_at, seq, track)``; an entry whose track
        #: is no longer awake or whose clock moved since is stale and dropped when met): the file clock and the
        #: observer's sleep look at what is due, not at every awake track.
        self.file_due: list[tuple[float, int, JobTrack]] = []
        #: Tracks whose entry ``files_due`` took, until their check is over (``files_checked``).
        self.in_check: dict[str, JobTrack] = {}
        #: Submissions whose outcome is unknown (changed through :meth:`add_unresolved`, :meth:`drop_unresolved`).
        self.unresolved: dict[str, JobTrack] = {}
        #: Their look-ups by when they are due (``(resolve_after, seq, track)``; an entry whose track left
        #: ``unresolved`` or was given another time since is stale, dropped when met): the observer's look-ups and
        #: its sleep cost what is due, not a walk over every unresolved submission. Times change through
        #: :meth:`resolve_at` (or before :meth:`add_unresolved`).
        self.resolve_due: list[tuple[float, int, JobTrack]] = []
        #: Tracks whose entry ``resolves_due`` took, until their look-up is handled (``resolves_handled``).
        self.resolving: dict[str, JobTrack] = {}
        #: What a per-user queue limit counts of the tracks in ``tracks`` and ``unresolved`` (the ``queued_jobs``
        #: of each, once), kept as they come, go and lose instances: no walk per submit round.
        self.queued_count = 0
        self.cancels: dict[str, None] = {}  # job keys to cancel (ordered)
        #: Job keys whose kill is owed durably (a row in the store's ``kills``, see :meth:`owe_kill`), until the
        #: scheduler takes it (:meth:`kills_taken`); loaded at start (:meth:`load_owed_kills`).
        self.owed: dict[str, None] = {}
        self.lookups: dict[str, None] = {}  # tags of jobs to find and kill (owed by an earlier daemon: BY_TAG)
        self.staged: set[str] = set()  # run ids whose workflow file is on the cluster
        self.deadlines: list[tuple[float, str]] = []  # (when a running job passes its limit, tag)
        self.deadline_entries: set[tuple[float, str]] = set()  # (the same: one entry each, see add_deadline)
        self.emptied: dict[str, None] = {}  # tags whose last live instance left (pruned next cycle)
        self.held_tags: dict[str, None] = {}
        self.query_due = True
        self.unrecognised: dict[str, int] = {}  # native scheduler states we could not map
        self.last_query_error: str | None = None
        #: Unexpected exceptions inside this driver's loops (``loop_failed``): how many, and the last one, shown
        #: in ``status``/``stats`` (besides failing the run concerned, when there is one).
        self.internal_errors = 0
        self.last_internal_error: dict[str, Any] | None = None
        self._raised: set[str] = set()  # "raise:POINT" fault points already used (each raises once)
        #: The per-user queue limit (config, probe, refusals) and elements in batches being submitted now.
        self.queue_limit = QueueLimit(config.max_queued)
        #: Set once the first probe has answered (or failed): the first submissions wait for it (bounded), so a
        #: per-user queue limit the probe reads is known before a fan-out goes out, not after.
        self.first_probe = anyio.Event()
        #: Elements done here that the scheduler may still count toward a queue limit.
        self.lingering = Lingering()
        self.submitting = 0
        #: Is the scheduler answering? While not, nothing is concluded, submissions wait, probes are rare.
        self.health = ClusterHealth(base=max(1.0, config.poll_interval),
                                    maximum=max(config.max_poll_interval, config.poll_interval))
        #: Is the scheduler's accounting answering (Slurm's sacct)? While not, the adapter asks the controller.
        self.accounting = AccountingHealth()
        self.ready_wake = anyio.Event()
        self.observer_wake = anyio.Event()
        #: Set (and replaced) by the observer after each round of cancel delivery: see :meth:`cancels_sent`.
        self.cancel_round = anyio.Event()
        self.counters: dict[str, int] = {}
        self.packer = Packer(self)
        #: Early submissions waiting on their upstream in Slurm's queue (``early.py``).
        self.early = EarlyJobs(self)
        cluster.scheduler.on_change = self.scheduler_changed
        cluster.scheduler.on_accounting = self.accounting_answered

    def scheduler_changed(self) -> None:
        """The scheduler learnt of a change by itself (a local process ended): poll now."""
        self.query_due = True
        self.observer_wake.set()

    # ------------------------------------------------------------------ engine -> driver

    def submit(self, run: Run, insts: Iterable[Instance], *, wake: bool = True) -> None:
        """READY instances (past the cache check) to submit as soon as their back-off allows.

        ``wake=False``: more of the same hand-over follows (the engine hands 10^5 over in slices);
        the submit loop is woken by the last slice, so it forms whole arrays."""
        now = world.now()
        for inst in insts:
            if self.early.watching and self.early.claim(run, inst):
                continue  # it has an early job: adopted (or dropped) there
            if inst.not_before is not None and inst.not_before > now:
                self.waiting[inst] = run
                self._seq += 1
                heapq.heappush(self.due_times, (inst.not_before, self._seq, inst))
            else:
                self.ready[inst] = run
        if wake:
            self.ready_wake.set()

    def take_ready(self, now: float, limit: int | None = None) -> tuple[dict[Instance, Run], float | None]:
        """What is due for submission (taken off the queue; at most *limit*, oldest first, the rest
        taken next round), and when the next back-off ends."""
        while self.due_times and self.due_times[0][0] <= now:
            _, _, inst = heapq.heappop(self.due_times)
            run = self.waiting.get(inst)
            if run is not None and (inst.not_before is None or inst.not_before <= now):
                del self.waiting[inst]
                self.ready[inst] = run
        while self.due_times and self.due_times[0][2] not in self.waiting:
            heapq.heappop(self.due_times)  # left the queue since (cancelled, submitted)
        if limit is None or len(self.ready) <= limit:
            taken, self.ready = self.ready, {}
        else:  # a hand-over of 10^5 elements is formed into jobs a slice at a time, with yields between
            taken = {inst: self.ready[inst] for inst in itertools.islice(self.ready, limit)}
            for inst in taken:
                del self.ready[inst]
        return taken, (self.due_times[0][0] if self.due_times else None)

    def withdraw(self, inst: Instance) -> None:
        """The instance is no longer READY (cancelled, cached, failed): drop it from the queue."""
        self.ready.pop(inst, None)
        self.waiting.pop(inst, None)

    def owe_kill(self, key: str) -> None:
        """*key*'s job must be killed, whatever happens to this process: recorded in the store now, so the
        commit that holds the state change being made (an instance cancelled while its job was queued or
        running) holds the kill too. Sent once :meth:`cancel_jobs` queues it (a cancel request waits for its
        flush first, so no kill reaches the scheduler before the change is durable)."""
        if key not in self.owed:
            self.owed[key] = None
            self.store.put_kill(OwedKill(self.name, key, world.now()))

    def cancel_jobs(self, keys: Iterable[str]) -> None:
        """Ask the scheduler to cancel these jobs or array elements (retried until delivered; owed durably,
        so a crash meanwhile does not lose them: :meth:`load_owed_kills`).

        A packed job that still runs elements nobody cancelled is left alone: its cancelled
        elements get markers instead (see ``packing.Packer.left``)."""
        queued = False
        for key in keys:
            queued = True
            if key.startswith(BY_TAG):  # (only an earlier daemon's: see owe_lookup)
                self.lookups[key[len(BY_TAG):]] = None
                continue
            if self.packer.keep_job(key):
                self._release_kill(key)  # (owed before it was known that the job runs others)
                continue
            self.owe_kill(key)
            self.cancels[key] = None
        if queued:
            self.wake()

    def jobs_in_flight(self, run_id: str, task: str, most: int) -> Iterator[tuple[str, list[Instance]]]:
        """(job id, its instances in flight) for each followed job of *task* in run *run_id* with at most
        *most* of them: what a cancel of the whole task kills job by job (``Engine._cancel_jobs``). Each
        job's list is made as it is reached (the caller yields between jobs: 10^3 jobs of 10^3 elements
        listed at once were a 39 ms step)."""
        for track in [t for t in self.tracks.values() if t.run.id == run_id and t.record.task == task]:
            if track.record.job_id and 0 < len(track.live) <= most:
                yield track.record.job_id, list(track.live.values())

    def owe_lookup(self, track: JobTrack) -> None:
        """Every instance of *track* left flight while its sbatch was under way (a cancel) or its outcome
        unknown: whatever job the sbatch made must be killed, and only its tag names it. This process
        learns the job id when the sbatch answers (``adopt`` then owes the kill by id, ``lookup_settled``);
        a daemon that dies first would leave the job running unobserved -- no instance is in flight to
        make the next one look its tag up, and a cancelled run is not even reloaded. So the look-up is owed
        durably, in the commit of the change that made it so; the next daemon finds the job by its tag
        and kills it (``Observer.deliver_cancels``)."""
        self.owe_kill(BY_TAG + track.tag)

    def lookup_settled(self, tag: str) -> None:
        """*tag*'s submission is settled: its job is known (and what it owes is owed by id), or none exists."""
        self._release_kill(BY_TAG + tag)

    def _release_kill(self, key: str) -> None:
        if key in self.owed:
            del self.owed[key]
            self.store.drop_kill(self.name, key)

    def kills_taken(self, keys: Iterable[str]) -> None:
        """The scheduler took the cancel of *keys* (or no longer knows the jobs): no longer owed or queued."""
        for key in keys:
            self.cancels.pop(key, None)
            self._release_kill(key)

    async def load_owed_kills(self) -> int:
        """At start, before anything changes (``Engine.recover``): the kills an earlier daemon owed on this
        cluster. :meth:`run` sends them like any cancel (budgeted, timed out, retried until taken), whatever
        became of their runs -- a cancelled run is not even reloaded."""
        kills = await self.store.owed_kills(self.name)
        for kill in kills:
            self.owed[kill.job_key] = None
        if kills:
            self.count("owed_kills_loaded", len(kills))
            log.warning("kills an earlier daemon owed are sent again", cluster=self.name, jobs=len(kills),
                        oldest=kills[0].owed_at)
        return len(kills)

    def instance_left(self, inst: Instance, tag: str | None) -> None:
        """*inst*, in flight under *tag*, has just left flight (or that tag)."""
        if tag is None:
            return
        track = self.tracks.get(tag) or self.unresolved.get(tag)
        if track is None:
            return
        if track.live.get(inst.index) is inst:
            self.left_track(track, inst.index)
            if not track.live and track.record.job_id is None and self.unresolved.get(tag) is track:
                self.owe_lookup(track)
            if self.queue_limit.cap(world.now()) is not None and inst.job_key and track.record.job_id and not (
                    inst.observed is not None and inst.observed.phase is Phase.DONE) and not track.slot_busy(inst.index):
                self.lingering.add(inst.job_key, track.record.job_id, world.now())  # counted until it ends there
            track.held.pop(inst.index, None)
            if track.packed:
                self.packer.left(track, inst)
            if inst.state is State.SUCCEEDED:
                self.packer.learned(track.run, inst)
            if not track.live:
                self.emptied[tag] = None
                self.observer_wake.set()  # prune it now (the observer may sleep long while jobs wait)
            if self.ready and self.queue_limit.cap(world.now()) is not None:
                self.ready_wake.set()  # room in a capped queue: what waits for it may go out

    async def recover(self, record: JobRecord, run: Run, insts: dict[int | None, Instance]) -> None:
        """Follow a submission an earlier daemon made (after a restart)."""
        track = self.new_track(record, run, insts)
        track.stale_loaded = False  # requeue marks an earlier daemon kept: read before its first result
        if record.state == FAILED_JOB:  # failed before its job was known: looked up and cancelled, not followed
            track.failed = True
            self.add_unresolved(track)
            self.query_due = True
            return
        if record.job_id is None or any(i.state is State.SUBMITTING for i in insts.values()):
            self.add_unresolved(track)
        else:
            self.follow(track)
            await self.cluster.scheduler.reattach(record.request, record.job_id)
        if track.packed:
            self.packer.recovered(track)
        self.query_due = True

    def forget_run(self, run_id: str) -> None:
        self.staged.discard(run_id)

    def wake(self) -> None:
        self.observer_wake.set()

    async def cancels_sent(self, timeout: float) -> bool:
        """Wait (at most *timeout* s) until the cancels and cancel markers queued so far went out.

        A client told "cancelled" may kill reflowd at once; what only this process's memory held (a kill
        to send, a packed job's markers) would be lost, and a packed job would go on to elements that were
        cancelled. While the scheduler is unreachable nothing is sent: no wait (they go out on recovery of
        the connection)."""
        with anyio.move_on_after(timeout):
            for _ in range(3):  # a round that failed is retried by the observer anyway: do not spin on it
                if not (self.cancels or self.packer.skips) or not self.health.allows(world.monotonic()):
                    break
                round_done = self.cancel_round
                self.wake()
                await round_done.wait()
        return not (self.cancels or self.packer.skips)

    # ------------------------------------------------------------------ shared by the loops

    def new_track(self, record: JobRecord, run: Run, insts: dict[int | None, Instance]) -> JobTrack:
        # A job directory where nothing happens is looked at less and less, down to once per longest poll.
        clock = FileClock(self.cluster.result_interval, max(self.cluster.result_interval, self.policy.maximum))
        # Until the scheduler first answers for it, a new job may start and a short one end at any moment
        # (polls are few: the command budget): look often for a few checks (``FileClock.expect``).
        clock.expect(world.monotonic())
        # (by tag, not the track: a clock that referred to its track would make every track a reference cycle,
        # freed only by a collection -- and the heap policy freezes what the collector would look at)
        clock.on_change = functools.partial(self._files_moved, record.tag)
        return JobTrack(record, run, dict(insts), clock)

    def follow(self, track: JobTrack) -> None:
        """Observe *track* (its job is known to the scheduler)."""
        replaced = self.tracks.get(track.tag)
        self.tracks[track.tag] = track
        self._count_in(track)
        if replaced is not None and replaced is not track:
            self._count_out(replaced)
            if replaced.record.job_id and self.by_job.get(replaced.record.job_id) is replaced:
                del self.by_job[replaced.record.job_id]
        if track.record.job_id:
            self.by_job[track.record.job_id] = track
        if track.waiting:
            self.awake.pop(track.tag, None)
        else:
            self._wake_files(track)

    def unfollow(self, tag: str) -> JobTrack | None:
        """Stop observing *tag*'s job."""
        track = self.tracks.pop(tag, None)
        self.awake.pop(tag, None)
        self.held_tags.pop(tag, None)
        if track is not None:
            self._count_out(track)
            if track.record.job_id and self.by_job.get(track.record.job_id) is track:
                del self.by_job[track.record.job_id]
        return track

    def add_unresolved(self, track: JobTrack) -> None:
        """*track*'s submission has an unknown outcome (or is under way): its tag decides (``resolve_unresolved``),
        from ``track.resolve_after`` on."""
        replaced = self.unresolved.get(track.tag)
        self.unresolved[track.tag] = track
        self._count_in(track)
        if replaced is not None and replaced is not track:
            self._count_out(replaced)
        self._push_resolve(track)

    def resolve_at(self, track: JobTrack, at: float) -> None:
        """Look *track*'s tag up (again) from *at* on."""
        track.resolve_after = at
        if self.resolving.get(track.tag) is track:
            del self.resolving[track.tag]  # (handled: its next entry follows)
        if self.unresolved.get(track.tag) is track:
            self._push_resolve(track)

    def _push_resolve(self, track: JobTrack) -> None:
        if track.resolve_after == math.inf:
            return  # (its sbatch is under way: nothing to look up)
        self._seq += 1
        heapq.heappush(self.resolve_due, (track.resolve_after, self._seq, track))
        if len(self.resolve_due) > 2 * len(self.unresolved) + 64:  # stale entries: rebuilt (amortised)
            self.resolve_due = [(t.resolve_after, self._seq + n, t) for n, t in enumerate(self.unresolved.values(), 1)
                                if t.resolve_after != math.inf]
            self._seq += len(self.unresolved)
            heapq.heapify(self.resolve_due)

    def _resolve_stale(self, entry: tuple[float, int, JobTrack]) -> bool:
        at, _, track = entry
        return self.unresolved.get(track.tag) is not track or track.resolve_after != at

    def resolves_due(self, now: float) -> list[JobTrack]:
        """The unresolved submissions whose look-up is due at *now*, their entries taken: whoever handles one
        gives it its next time (:meth:`resolve_at`) or drops it (:meth:`drop_unresolved`)."""
        due: dict[int, JobTrack] = {}
        heap = self.resolve_due
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if not self._resolve_stale(entry):
                due[id(entry[2])] = entry[2]
        for track in due.values():
            self.resolving[track.tag] = track
        return list(due.values())

    def resolves_handled(self, tracks: Iterable[JobTrack]) -> None:
        """The look-ups of *tracks* are over: one still unresolved that got no next time goes back as it was."""
        for track in tracks:
            if self.resolving.get(track.tag) is track:
                del self.resolving[track.tag]
                if self.unresolved.get(track.tag) is track:
                    self._push_resolve(track)

    def next_resolve(self) -> float:
        """When the earliest look-up by tag is due (``inf``: none)."""
        heap = self.resolve_due
        while heap and self._resolve_stale(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else math.inf

    def drop_unresolved(self, tag: str) -> JobTrack | None:
        """*tag*'s outcome is known (or given up on)."""
        track = self.unresolved.pop(tag, None)
        if track is not None:
            self._count_out(track)
        return track

    def left_track(self, track: JobTrack, index: int | None) -> None:
        """Element *index* is no longer in flight under *track* (the only way ``track.live`` shrinks)."""
        fewer = track.leave(index)
        if track.counted:
            self.queued_count -= fewer

    def _count_in(self, track: JobTrack) -> None:
        if not track.counted:
            track.counted = True
            self.queued_count += track.queued_jobs()

    def _count_out(self, track: JobTrack) -> None:
        if track.counted and self.tracks.get(track.tag) is not track and self.unresolved.get(track.tag) is not track:
            track.counted = False
            self.queued_count -= track.queued_jobs()

    def quiet(self, track: JobTrack, answer: Any, live: int, active: bool) -> None:
        """The scheduler's *answer* for *track* changed nothing: an equal answer next time is skipped whole."""
        track.quiet_answer, track.quiet_live, track.quiet_active = answer, live, active
        if track.waiting:
            if self.awake.get(track.tag) is track:  # (by identity, as everywhere here: not another track's tag)
                del self.awake[track.tag]
        elif self.tracks.get(track.tag) is track:
            self._wake_files(track)

    def unquiet(self, track: JobTrack) -> None:
        """Something changed for *track*: its elements and files are looked at again."""
        track.quiet_answer = None
        if self.tracks.get(track.tag) is track:
            self._wake_files(track)

    # ------------------------------------------------------------------ file clocks due

    def _wake_files(self, track: JobTrack) -> None:
        """*track*'s files are looked at (again): its clock joins the heap of those due."""
        if self.awake.get(track.tag) is not track:
            self.awake[track.tag] = track
            self._push_files(track, track.files.next_at)

    def _files_moved(self, tag: str, at: float) -> None:
        """*tag*'s file clock moved to *at* (``FileClock.on_change``)."""
        checked = self.in_check.get(tag)
        if checked is not None and checked.files.next_at == at:
            del self.in_check[tag]  # its check moved it: back in the heap below (if awake), nothing left to do
        track = self.awake.get(tag)
        if track is not None and track.files.next_at == at:
            self._push_files(track, at)

    def _push_files(self, track: JobTrack, at: float) -> None:
        self._seq += 1
        heapq.heappush(self.file_due, (at, self._seq, track))
        if len(self.file_due) > 2 * len(self.awake) + 64:  # stale entries: rebuilt from what is awake (amortised)
            self.file_due = [(t.files.next_at, self._seq + n, t) for n, t in enumerate(self.awake.values(), 1)]
            self._seq += len(self.file_due)
            heapq.heapify(self.file_due)

    def _stale(self, entry: tuple[float, int, JobTrack]) -> bool:
        at, _, track = entry
        return self.awake.get(track.tag) is not track or track.files.next_at != at

    def files_due(self, now: float) -> list[JobTrack]:
        """The awake tracks whose file clock is due at *now*, their entries taken until :meth:`files_checked`
        (the check moves each clock, which puts it back)."""
        due: dict[int, JobTrack] = {}
        heap = self.file_due
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if not self._stale(entry):
                due[id(entry[2])] = entry[2]
        for track in due.values():
            self.in_check[track.tag] = track
        return list(due.values())

    def files_checked(self, tracks: Iterable[JobTrack]) -> None:
        """The check of *tracks* is over: one cut short before its clock moved goes back in the heap as it was."""
        for track in tracks:
            if self.in_check.get(track.tag) is track:
                del self.in_check[track.tag]
                if self.awake.get(track.tag) is track:
                    self._push_files(track, track.files.next_at)

    def next_file_check(self) -> float:
        """When the earliest awake file clock is due (``inf``: none)."""
        heap = self.file_due
        while heap and self._stale(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else float("inf")

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def add_deadline(self, track: JobTrack, inst: Instance) -> None:
        """When *inst* (just started) passes its job's time limit. One entry per job and DEADLINE_STEP
        seconds, not per element: 10^5 elements starting within a minute are a dozen entries, not 10^5."""
        try:
            limit = parse_time(track.request.time) if track.request.time else None
        except ValueError:
            limit = None
        if limit is not None and inst.started_at is not None:
            entry = (math.ceil((inst.started_at + limit + 5.0) / DEADLINE_STEP) * DEADLINE_STEP, track.tag)
            if entry not in self.deadline_entries:
                self.deadline_entries.add(entry)
                heapq.heappush(self.deadlines, entry)

    def deadline_due(self) -> bool:
        """Poll promptly once a running job passes its time limit (to see TIMEOUT without waiting)."""
        now = world.now()
        due = False
        while self.deadlines and self.deadlines[0][0] <= now:
            entry = heapq.heappop(self.deadlines)
            self.deadline_entries.discard(entry)
            due = due or entry[1] in self.tracks
        return due

    def queued_elements(self) -> int:
        """Jobs (array elements) this daemon has in the cluster's queue (or about to): what a per-user limit
        counts. A packed slice is one array element however many instances it runs."""
        return self.queued_count + self.submitting + len(self.lingering)

    def scheduler_failed(self, what: str, error: str) -> None:
        """A scheduler command (*what*) got no answer: count it toward the circuit breaker."""
        if self.health.failed(world.now(), world.monotonic(), what, error):
            log.warning("scheduler not answering; the cluster is degraded: nothing is failed, submissions wait",
                        cluster=self.name, command=what, error=error)

    def accounting_answered(self, error: str | None) -> None:
        """The adapter used the scheduler's accounting: it answered (*error* None) or failed with *error*."""
        if error is None:
            if self.accounting.succeeded(world.now()):
                log.warning("accounting answering again", cluster=self.name)
        elif self.accounting.failed(world.now(), error, fallback="squeue"):
            log.warning("accounting not answering; the cluster's accounting is degraded (the controller stands in)",
                        cluster=self.name, error=error)

    def scheduler_answered(self) -> None:
        if self.health.succeeded(world.now()):
            log.warning("scheduler answering again; the cluster has recovered", cluster=self.name)
            self.query_due = True
            self.ready_wake.set()
            self.observer_wake.set()

    def fault(self, point: str) -> None:
        """Test-only crash point: die like ``kill -9`` exactly here (or raise here once: ``raise:POINT``)."""
        if point in self.settings.fault_points:
            log.warning("fault point reached, exiting hard", point=point)
            os._exit(137)
        if f"raise:{point}" in self.settings.fault_points and point not in self._raised:
            self._raised.add(point)
            raise InjectedFault(f"injected fault at {point}")

    # ------------------------------------------------------------------ errors inside the loops

    def loop_failed(self, where: str, exc: Exception, run: Run | None = None) -> None:
        """An unexpected exception in a loop step: shown, never only logged -- on *run* (failed, with the error
        in its status) when it concerns one, and on the cluster (``status``, ``stats``) in any case. The loop
        goes on."""
        error = f"{type(exc).__name__}: {exc}"
        log.error("internal error in the cluster driver", cluster=self.name, where=where, error=error, exc_info=exc)
        self.internal_errors += 1
        self.last_internal_error = {"where": where, "error": error[:500], "at": world.now()}
        if run is not None:
            self.host.internal_error(run, where, exc)

    def track_failed(self, track: JobTrack, where: str, exc: Exception) -> None:
        """Something raised while handling one submission: its run fails with the error, the driver stops
        following it, its job is cancelled, and what was in flight under it fails with the error.

        In that order, and durably: the row says ``failed`` (``FAILED_JOB``) and the instances stay in flight
        until the job is cancelled -- looked up by its tag first, since a job whose id is not known may exist
        all the same (its sbatch may have run) -- and only then fail (:meth:`conclude_failed`, the next
        cycle of the observe loop). Their run stays open meanwhile, so a daemon that dies before recovers it
        and does the same (``recover``). Failed at once, as before, the run could end and a crash leave the
        job running with nobody following it (a finished run is not recovered)."""
        error = f"internal error while {where}: {type(exc).__name__}: {exc}"
        if not track.failed:
            track.failed, track.error = True, error
            track.record.state = FAILED_JOB
            self.store.put_job(track.record)
            if self.tracks.get(track.tag) is track:
                self.unfollow(track.tag)
                self.packer.skips.pop(track.tag, None)  # (its markers: the whole job is cancelled)
            self.loop_failed(where, exc, track.run)
            track.resolve_after = world.now()
            self.add_unresolved(track)
            self.wake()
            return
        # Concluding the failed submission raised in turn: fail what is left now, cancel what is known.
        for inst in list(track.live.values()):
            if inst.in_flight and inst.tag == track.tag:
                self.host.transition(track.run, inst, State.FAILED, {"source": "driver", "error": error[:500]},
                                     error=error)
        for index in list(track.live):
            self.left_track(track, index)
        self.drop_unresolved(track.tag)
        self.unfollow(track.tag)
        self.loop_failed(where, exc, track.run)
        if track.record.job_id:
            self.cancel_jobs([track.record.job_id])
        self.wake()

    async def conclude_failed(self, track: JobTrack, job_ids: list[str], now: float) -> None:
        """A failed submission (:meth:`track_failed`) whose tag was looked up: *job_ids* carry it (and its own
        job id, if known). They are cancelled, and only then do its instances fail with the error (a crash
        before leaves them in flight, to be done again). None found: asked once more (a job may show up late),
        then they fail all the same -- never submitted again, their run has failed."""
        ids = list(dict.fromkeys([*([track.record.job_id] if track.record.job_id else []), *job_ids]))
        if not ids:
            track.resolve_attempts += 1
            if track.resolve_attempts < 2:
                self.resolve_at(track, now + self.settings.resolve_delay)
                return
        else:
            if track.record.job_id != ids[0]:
                track.record.job_id = ids[0]
                self.store.put_job(track.record)
            self.cluster.count("cancel")
            await self.cluster.scheduler.cancel(ids)  # (a transport error: tried again at the next look-up)
            self.scheduler_answered()
            for job_id in ids:
                self.cluster.scheduler.forget(job_id)
        self.drop_unresolved(track.tag)
        self.lookup_settled(track.tag)  # (a cancel meanwhile owed it: the jobs are cancelled by now)
        error = track.error or (track.run.error if (track.run.error or "").startswith("internal error") else None) \
            or "internal error while submitting (before the daemon restarted)"
        for inst in list(track.live.values()):
            if inst.in_flight and inst.tag == track.tag:
                self.host.transition(track.run, inst, State.FAILED,
                                     {"source": "driver", "error": error[:500], "cancelled_jobs": ids},
                                     error=error)
        for index in list(track.live):
            self.left_track(track, index)
        track.record.state = "done" if ids else "not_submitted"
        self.store.put_job(track.record)
        log.info("failed submission concluded", cluster=self.name, tag=track.tag, cancelled=ids)

    # ------------------------------------------------------------------ loops

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        # What an earlier daemon owed goes out first; runs are recovered by now, so a packed job that still
        # runs wanted elements is told apart (``cancel_jobs``).
        self.cancel_jobs(list(self.owed))
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._kept, "probing the cluster", self._probe)
            tg.start_soon(self._kept, "the submit loop", Submitter(self).loop)
            tg.start_soon(self._kept, "the observe loop", Observer(self).loop)
            tg.start_soon(self._kept, "checking accounting", self._watch_accounting)
            tg.start_soon(self._kept, "the early-submission loop", self.early.loop)
            task_status.started()

    async def _kept(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run *loop*; if it raises (a bug its own steps did not catch), show the error and start it again:
        an exception must neither end the daemon (it would end every run) nor stop this cluster's work.
        Cancellation is not an ``Exception``: it goes through."""
        while True:
            try:
                await loop()
                return
            except Exception as exc:
                self.loop_failed(name, exc)
            await anyio.sleep(LOOP_RESTART)

    async def _watch_accounting(self) -> None:
        """A degraded accounting is asked now and then whether it is back when no poll would ask it (nothing is
        tracked), so that ``status`` does not show it degraded long after it recovered."""
        while True:
            await anyio.sleep(ACCOUNTING_CHECK)
            if self.accounting.degraded and not self.tracks and not self.lingering:
                try:
                    with anyio.fail_after(self.cluster.config.command_timeout * 2):
                        await self.cluster.scheduler.check_accounting()
                except (TransportError, TimeoutError) as exc:
                    log.info("accounting check failed", cluster=self.name, error=str(exc))

    async def _probe(self) -> None:
        """Learn the scheduler's limits and features; a cluster unreachable at start is probed again later."""
        cluster = self.cluster
        attempt = 0
        while True:
            try:
                with anyio.fail_after(cluster.config.command_timeout * 2):
                    cluster.probe = await cluster.scheduler.probe()
                    self.queue_limit.probed = cluster.probe.get("max_queued")
                self.first_probe.set()
                log.info("cluster ready", cluster=cluster.name, scheduler=cluster.scheduler.kind, **cluster.probe)
                return
            except Exception as exc:  # probing is advisory; observation shows the cluster's health meanwhile
                self.first_probe.set()  # submissions go on without what it would have said
                attempt += 1
                delay = min(120.0, 5.0 * 2 ** min(attempt - 1, 5))
                log.warning("cluster probe failed; will try again", cluster=cluster.name, error=str(exc),
                            retry_in=delay)
                await anyio.sleep(delay)

    # ------------------------------------------------------------------ views

    @property
    def tracked(self) -> int:
        return len(self.tracks)

    def status(self) -> dict[str, Any]:
        out = self.cluster.status()
        out["poll_interval"] = round(self.policy.interval, 2)
        out["tracked_jobs"] = len(self.tracks)
        out["unresolved_submissions"] = len(self.unresolved)
        out["ready"] = len(self.ready) + len(self.waiting)
        out["pending_cancels"] = len(self.cancels)
        out["owed_kills"] = len(self.owed)
        if self.unrecognised:
            out["unrecognised_states"] = dict(self.unrecognised)
        if self.last_query_error:
            out["last_query_error"] = self.last_query_error
        if self.last_internal_error is not None:
            out["internal_errors"] = {"count": self.internal_errors, **self.last_internal_error}
        out["scheduler_health"] = self.health.to_dict(world.monotonic())
        if self.cluster.probe.get("accounting") or self.accounting.episodes:
            out["accounting_health"] = self.accounting.to_dict()
        out.update(self.queue_limit.to_dict(world.now()))
        if self.counters:
            out["driver"] = dict(self.counters)
        return out
