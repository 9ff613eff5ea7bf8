"""Retry policies as users write them (pure parsing, shared by the API, the config file and the daemon).

A policy is a small mapping, given per task (``@flow.job(retry_policy={...})``)
or per cluster (``[clusters.NAME] retry_policy = {...}``); a task's keys win::

    {"free": ["node_fail", "boot_fail", "preempted"],  # retried without counting against retries
     "max_free": 5,                                     # ... at most this many times
     "backoff": 5, "backoff_factor": 2, "backoff_max": 600,   # seconds before attempt n: backoff * factor**(n-2)
     "escalate": {"mem": 2, "time": 2},                 # after out-of-memory / a time limit, times this factor
     "max_mem": "64G", "max_time": "2-00:00:00"}        # escalation stops here (and at the partition's limit)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .resources import format_mem, parse_mem, parse_time

#: Causes a policy may list under ``free`` (see ``reflowd/engine/causes.py``).
FREE_CAUSES = ("node_fail", "boot_fail", "preempted", "time_limit", "out_of_memory", "lost", "signal", "exit_code",
               "exception")
DEFAULT_FREE = ("node_fail", "boot_fail", "preempted")
KEYS = ("free", "max_free", "backoff", "backoff_factor", "backoff_max", "escalate", "max_mem", "max_time")


class RetryPolicyError(ValueError):
    """A retry policy that cannot be used; the message names the key and the fix."""


@dataclass(frozen=True)
class RetryPolicy:
    free: frozenset[str] = frozenset(DEFAULT_FREE)
    max_free: int = 5
    backoff: float | None = None  # None: the daemon's default (5 s; 1 s for local runs)
    backoff_factor: float = 2.0
    backoff_max: float | None = None
    escalate: Mapping[str, float] = field(default_factory=dict)  # "mem" / "time" -> factor > 1
    max_mem: str | None = None
    max_time: str | None = None


def _number(value: Any, where: str, minimum: float, *, whole: bool = False, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RetryPolicyError(f"{where}: expected a number, got {value!r}")
    if whole and value != int(value):
        raise RetryPolicyError(f"{where}: expected a whole number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise RetryPolicyError(f"{where}: must be {'above' if strict else 'at least'} {minimum}, got {value!r}")
    return value


def check(data: Any, where: str = "retry_policy") -> dict[str, Any]:
    """Validate a policy mapping; returns it (plain, JSON-able) or raises RetryPolicyError."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise RetryPolicyError(f"{where}: expected a mapping like {{'escalate': {{'mem': 2}}}}, got {data!r}")
    for key in data:
        if key not in KEYS:
            raise RetryPolicyError(f"{where}: unknown key {key!r} (known: {', '.join(KEYS)})")
    if "free" in data:
        free = data["free"]
        if not isinstance(free, (list, tuple)) or not all(isinstance(c, str) for c in free):
            raise RetryPolicyError(f"{where}.free: expected a list of causes like ['node_fail', 'preempted']")
        bad = [c for c in free if c not in FREE_CAUSES]
        if bad:
            raise RetryPolicyError(f"{where}.free: unknown cause(s) {', '.join(bad)} (known: {', '.join(FREE_CAUSES)})")
    if "max_free" in data:
        _number(data["max_free"], f"{where}.max_free", 0, whole=True)
    for key in ("backoff", "backoff_max"):
        if key in data:
            _number(data[key], f"{where}.{key}", 0)
    if "backoff_factor" in data:
        _number(data["backoff_factor"], f"{where}.backoff_factor", 1)
    escalate = data.get("escalate", {})
    if not isinstance(escalate, Mapping):
        raise RetryPolicyError(f"{where}.escalate: expected a mapping like {{'mem': 2, 'time': 1.5}}")
    for key, factor in escalate.items():
        if key not in ("mem", "time"):
            raise RetryPolicyError(f"{where}.escalate: {key!r} cannot be escalated (use 'mem' or 'time')")
        _number(factor, f"{where}.escalate.{key}", 1, strict=True)
    if data.get("max_mem") is not None:
        try:
            parse_mem(data["max_mem"])
        except ValueError as exc:
            raise RetryPolicyError(f"{where}.max_mem: {exc}") from None
    if data.get("max_time") is not None:
        try:
            parse_time(data["max_time"])
        except ValueError as exc:
            raise RetryPolicyError(f"{where}.max_time: {exc}") from None
    return dict(data)


def merge(cluster: Mapping[str, Any] | None, task: Mapping[str, Any] | None) -> RetryPolicy:
    """The policy in force for one task on one cluster: the task's keys over the cluster's over the defaults."""
    data = {**(cluster or {}), **(task or {})}
    return RetryPolicy(
        free=frozenset(data.get("free", DEFAULT_FREE)),
        max_free=int(data.get("max_free", 5)),
        backoff=None if data.get("backoff") is None else float(data["backoff"]),
        backoff_factor=float(data.get("backoff_factor", 2.0)),
        backoff_max=None if data.get("backoff_max") is None else float(data["backoff_max"]),
        escalate={k: float(v) for k, v in (data.get("escalate") or {}).items()},
        max_mem=None if data.get("max_mem") is None else format_mem(str(data["max_mem"])),
        max_time=data.get("max_time"),
    )
