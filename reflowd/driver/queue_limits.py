"""Staying under the site's per-user queue limits instead of being refused.

Sites cap how many jobs a user may have queued (Slurm's QOS/association
``MaxSubmitJobs``, Grid Engine's ``max_u_jobs``, PBS's ``max_queued``, ...).
Each array element counts as a job. A cluster's cap is the smallest of: the
``max_queued`` its config sets (for sites that publish limits only in their
docs), what the adapter's probe read (``probe()["max_queued"]``), and what a
refusal taught: a submission refused *for a limit* is not a failure; its
instances wait and go out again once the queue has drained, and until then
the cap is what was queued when the scheduler said no.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from ..schedulers.base import Observation, Phase, Presence

#: A batch as the submit loop forms it: (run, task run, instances); only the instances are looked at.
B = TypeVar("B", bound=tuple[Any, Any, Sequence[Any]])

#: Lower-case fragments of refusals that mean "over a limit, try later" (sbatch, qsub, bsub, flux submit).
LIMIT_FRAGMENTS = (
    "qosmaxsubmitjobperuserlimit",
    "assocmaxsubmitjoblimit",
    "assocgrpsubmitjobslimit",
    "qosgrpsubmitjoblimit",
    "maxsubmitjobs",
    "job violates accounting/qos policy",
    "job submit limit",
    "only allowed to submit",  # Grid Engine: "job rejected: only N jobs are allowed per user"
    "jobs are allowed per user",
    "would exceed queue",  # PBS: "would exceed queue generic's per-user limit"
    "per-user limit of jobs",  # PBS server-wide: "would exceed complex's per-user limit of jobs in 'Q' state"
    "maximum number of jobs already in queue",
    "user's job limit",  # LSF
    "pending job threshold",
)

#: Seconds a limit learnt from a refusal holds before a submission tries again.
LIMIT_WAIT = 30.0


#: Seconds an element reflow is done with is still counted while the scheduler never says it ended: a bound
#: (a query that keeps failing must not hold the queue for ever), not a wait.
LINGER_MAX = 120.0


def retries_first(batches: list[B]) -> list[B]:
    """Batches holding retried elements (attempt > 1) before the others, each side in its order: a retry takes the
    next free slot of a capped queue instead of waiting behind every element not yet submitted (an escalated retry
    is its own batch, formed after the fresh ones)."""
    return sorted(batches, key=lambda batch: not any(getattr(i, "attempt", 1) > 1 for i in batch[-1]))


def is_limit_refusal(message: str) -> bool:
    text = message.lower()
    return any(f in text for f in LIMIT_FRAGMENTS)


class QueueLimit:
    def __init__(self, configured: int | None = None) -> None:
        self.configured = configured
        self.probed: int | None = None
        self.learned: int | None = None
        self.learned_until = 0.0
        self.refusals = 0
        self.last_refusal: str | None = None

    def cap(self, now: float) -> int | None:
        """How many elements may be queued now (None: no limit known)."""
        caps = [c for c in (self.configured, self.probed) if c]
        if self.learned is not None and now < self.learned_until:
            caps.append(self.learned)
        return min(caps) if caps else None

    def room(self, now: float, queued: int) -> int | None:
        cap = self.cap(now)
        return None if cap is None else max(0, cap - queued)

    def refused(self, now: float, queued: int, message: str) -> float:
        """A submission was refused for a limit with *queued* elements in the queue: wait; returns until when."""
        self.refusals += 1
        self.last_refusal = message
        self.learned = max(0, queued)
        self.learned_until = now + LIMIT_WAIT
        return self.learned_until

    def to_dict(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        cap = self.cap(now)
        if cap is not None:
            out["max_queued"] = cap
        if self.refusals:
            out.update(limit_refusals=self.refusals, last_limit_refusal=self.last_refusal)
        return out


class Lingering:
    """Elements reflow is done with that the scheduler still counts.

    A worker writes its result file, and reflow takes the element's outcome from it, while the job is still
    running (then completing) for a moment: the site's limit counts it until the scheduler ends it. Such an
    element keeps its queue slot until a scheduler query shows it ended or gone (or LINGER_MAX passes)."""

    def __init__(self) -> None:
        #: job key (``123_4``) -> (the job id to query it by, since when)
        self.keys: dict[str, tuple[str, float]] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: str, job_id: str, now: float) -> None:
        self.keys.setdefault(key, (job_id, now))

    def job_ids(self) -> set[str]:
        return {job_id for job_id, _ in self.keys.values()}

    def observed(self, observations: Mapping[str, Observation] | None, now: float) -> bool:
        """Let go of what one query shows ended or gone (a failed query, *None*, shows nothing); True if any."""
        before = len(self.keys)
        for key, (_, since) in list(self.keys.items()):
            obs = observations.get(key) if observations is not None else None
            gone = observations is not None and (obs is None or obs.presence is Presence.ABSENT)
            ended = obs is not None and obs.phase is Phase.DONE
            if gone or ended or now - since >= LINGER_MAX:
                del self.keys[key]
        return len(self.keys) < before
