"""Whether, when and with what resources a failed instance is tried again (pure).

The engine asks :func:`decide` when an instance ends in a retriable state.
The answer depends on the *cause* (``causes.py``), not only the state: a node
failure, a boot failure or a preemption is the cluster's fault and is retried
without counting against the task's ``retries`` (up to ``max_free`` times);
everything else counts. After an out-of-memory or a time limit the policy may
escalate the memory or the time by a factor, capped by the policy's maximum
and by what the cluster allows (its probed partition limit). Escalation
changes only the resources of the next attempt, never the instance's identity,
so the cache key of its result is the same whatever it took to compute it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reflow_client.resources import format_time, parse_mem, parse_time
from reflow_client.retry import RetryPolicy, merge

from .model import Instance

from . import causes

_ESCALATES = {causes.OUT_OF_MEMORY: "mem", causes.TIME_LIMIT: "time"}


@dataclass(frozen=True)
class RetryDecision:
    retry: bool
    counted: bool = True
    delay: float = 0.0
    #: The next attempt's escalated resources ({"mem": ..., "time": ...}), or None to keep the current ones.
    resources: dict[str, Any] | None = None
    why: str = ""


def _mem_text(mb: int) -> str:
    return f"{mb // 1024}G" if mb % 1024 == 0 else f"{mb}M"


def escalate(key: str, current: str, factor: float, cap: str | None) -> tuple[str, bool]:
    """``current`` times ``factor``, at most ``cap``: (new value, whether it grew)."""
    if key == "mem":
        now = parse_mem(current)
        limit = parse_mem(cap) if cap else None
        new = int(now * factor + 0.5)
        if limit is not None:
            new = min(new, limit)
        return (_mem_text(new), True) if new > now else (current, False)
    now_s = parse_time(current)
    if now_s is None:  # unlimited already
        return current, False
    limit_s = parse_time(cap) if cap else None
    new_s = int(now_s * factor + 0.5)
    if limit_s is not None:
        new_s = min(new_s, limit_s)
    return (format_time(new_s), True) if new_s > now_s else (current, False)


def _smaller_cap(a: str | None, b: str | None, key: str) -> str | None:
    if a is None or b is None:
        return a or b
    parse = parse_mem if key == "mem" else parse_time
    va, vb = parse(a), parse(b)
    if va is None:
        return b
    if vb is None:
        return a
    return a if va <= vb else b


def backoff(policy: RetryPolicy, attempt: int, default: float, default_max: float) -> float:
    """Seconds before attempt ``attempt + 1`` after attempt ``attempt`` failed."""
    base = default if policy.backoff is None else policy.backoff
    top = default_max if policy.backoff_max is None else policy.backoff_max
    return float(min(base * policy.backoff_factor ** max(0, attempt - 1), top))


def decide(policy: RetryPolicy, *, cause: Mapping[str, Any] | None, attempt: int, retries: int,
           history: Sequence[Mapping[str, Any]], resources: Mapping[str, Any],
           caps: Mapping[str, str | None] | None = None, default_backoff: float = 5.0,
           default_backoff_max: float = 600.0) -> RetryDecision:
    """Retry an attempt that ended with *cause*? *history* holds the earlier attempts' records
    (``counted`` False for free retries); *resources* the failed attempt's; *caps* what the cluster allows."""
    kind = (cause or {}).get("kind", causes.UNKNOWN)
    if kind in (causes.CANCELLED, causes.SUBMIT_REFUSED, causes.UPSTREAM):
        return RetryDecision(False, why=f"{kind} is never retried automatically")
    free_used = sum(1 for a in history if not a.get("counted", True))
    counted_used = max(0, attempt - 1 - free_used)
    if kind in policy.free and free_used < policy.max_free:
        counted, why = False, f"{kind}: retried without counting against retries ({free_used + 1}/{policy.max_free})"
    elif counted_used < retries:
        counted, why = True, f"retry {counted_used + 1} of {retries}"
    else:
        return RetryDecision(False, why=f"no retries left ({retries} used)" if retries else "retries=0")
    new: dict[str, Any] | None = None
    key = _ESCALATES.get(kind)
    if key is not None and key in policy.escalate:
        cap = _smaller_cap(policy.max_mem if key == "mem" else policy.max_time, (caps or {}).get(key), key)
        value, grew = escalate(key, str(resources[key]), policy.escalate[key], cap)
        if grew:
            new = {key: value}
            why += f"; {key} {resources[key]} -> {value}"
        else:
            why += f"; {key} stays {resources[key]} (at its limit)"
    delay = backoff(policy, attempt, default_backoff, default_backoff_max)
    return RetryDecision(True, counted, delay, new, why)


def attempt_record(attempt: int, state: str, cause: Mapping[str, Any] | None, resources: Mapping[str, Any],
                   counted: bool, job_id: str | None) -> dict[str, Any]:
    """What ``status`` keeps of one finished attempt."""
    return {"attempt": attempt, "state": state, "cause": dict(cause) if cause else None,
            "resources": {k: resources[k] for k in ("cpus", "mem", "time") if k in resources},
            "counted": counted, "job_id": job_id}


def resources_of(inst: Instance, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The resources of the instance's current attempt: the task's, with any escalation on top."""
    config = config or {}
    base = {"cpus": config.get("cpus", 1), "mem": config.get("mem", "4G"), "time": config.get("time", "00:30:00")}
    return {**base, **(inst.resources or {})}


def plan(inst: Instance, task_config: Mapping[str, Any], retries: int, cluster_policy: Mapping[str, Any] | None,
         caps: Mapping[str, str | None] | None, default_backoff: float,
         default_backoff_max: float) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The automatic retry of an instance that just ended: (evidence, fields for READY), or None for no retry."""
    policy = merge(cluster_policy, task_config.get("retry_policy"))
    resources = resources_of(inst, task_config)
    cause = inst.cause or causes.infer(inst.state.value, inst.error, inst.reason)
    d = decide(policy, cause=cause, attempt=inst.attempt, retries=retries, history=inst.attempts or [],
               resources=resources, caps=caps, default_backoff=default_backoff, default_backoff_max=default_backoff_max)
    if not d.retry:
        return None
    record = attempt_record(inst.attempt, inst.state.value, cause, resources, d.counted, inst.job_key or inst.job_id)
    evidence = {"source": "auto_retry", "attempt": inst.attempt + 1, "of": retries + 1, "after": inst.state.value,
                "error": (inst.error or "")[:500], "delay": d.delay, "cause": (cause or {}).get("kind"),
                "counted": d.counted, "why": d.why}
    fields: dict[str, Any] = {"attempts": [*(inst.attempts or []), record]}
    if d.resources:
        fields["resources"] = {**(inst.resources or {}), **d.resources}
        evidence["resources"] = fields["resources"]
    fields["delay"] = d.delay
    return evidence, fields


def caps_from_probe(probe: Mapping[str, Any] | None, queue: str | None = None) -> dict[str, str | None]:
    """The largest time and memory the cluster allows, where its probe found them: the job's queue's
    (``probe["queue_caps"][queue]``, e.g. Grid Engine's h_rt/h_vmem per queue), else the cluster's."""
    probe = probe or {}
    own = (probe.get("queue_caps") or {}).get(queue) if queue else None
    if own is not None:
        return {"time": own.get("max_time"), "mem": own.get("max_mem")}
    return {"time": probe.get("max_time"), "mem": probe.get("max_mem")}


def queue_of(*option_sets: Mapping[str, Any] | None) -> str | None:
    """The queue (``partition``/``queue`` submit option) a task's jobs go to; later sets win."""
    queue = None
    for options in option_sets:
        for key in ("partition", "queue"):
            value = (options or {}).get(key)
            if isinstance(value, str) and value:
                queue = value
    return queue
