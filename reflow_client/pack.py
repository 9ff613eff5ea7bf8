"""The ``pack=`` setting: how many array elements one scheduler job runs.

One definition for every place that reads it (the ``pack=`` job keyword, the
manifest, a cluster's ``pack`` key, the daemon), so they cannot disagree:

* ``None`` (the keyword's default): follow the cluster's ``pack``.
* ``"off"``, ``False`` or ``1``: one element per job, always.
* a whole number ``N >= 2``: up to N elements per job.
* a duration (``"15m"``, ``"90s"``, ``"2h"``, ``"1h30m"``, or Slurm's ``"00:15:00"``):
  automatic -- about that much work per job, sized from the measured durations of
  earlier instances of the same task; without such history, one element per job.
* ``"auto"`` or ``True``: automatic with the default target (:data:`DEFAULT_TARGET`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .resources import parse_time

#: Work per job aimed at by automatic packing when no target is given: long enough that a
#: job's start-up is noise, short enough that a dying job loses little.
DEFAULT_TARGET = 300.0
#: Most elements one job may carry (a bound on job files and on work lost to one crash).
MAX_COUNT = 100_000
#: Longest target accepted (a week): beyond that a job outlives any site's limit.
MAX_TARGET = 7 * 86400.0

_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m|hr|h|d)", re.IGNORECASE)
_HINT = "use 'off', a number of elements like 50, a duration like '15m' or '90s', or 'auto'"


@dataclass(frozen=True)
class PackSpec:
    """A resolved ``pack`` setting: off, a fixed count, or a target duration (seconds)."""

    count: int | None = None
    target: float | None = None

    @property
    def off(self) -> bool:
        return self.count is None and self.target is None

    def describe(self) -> str:
        if self.count is not None:
            return f"up to {self.count} elements per job"
        if self.target is not None:
            return f"about {self.target:g} s of work per job (from measured durations)"
        return "off"


OFF = PackSpec()


def _duration(text: str) -> float | None:
    """Seconds in ``"15m"``, ``"1h30m"``, ``"90s"``; None if *text* is not written that way."""
    compact = text.replace(" ", "")
    if not compact or _PART.sub("", compact):
        return None
    return sum(float(n) * _UNITS[u.lower()] for n, u in _PART.findall(compact))


def parse_pack(value: Any, where: str = "pack") -> PackSpec | None:
    """The spec *value* stands for (None: not set, follow the cluster); ValueError names the problem."""
    if value is None:
        return None
    if isinstance(value, bool):
        return PackSpec(target=DEFAULT_TARGET) if value else OFF
    if isinstance(value, int):
        if value == 1:
            return OFF
        if 2 <= value <= MAX_COUNT:
            return PackSpec(count=value)
        raise ValueError(f"{where}: {value} elements per job is out of range (2 to {MAX_COUNT}, or 1/'off')")
    if not isinstance(value, str):
        raise ValueError(f"{where}: {value!r} is not a packing setting; {_HINT}")
    text = value.strip().lower()
    if text in ("off", "no", "none", "false"):
        return OFF
    if text in ("auto", "on", "true"):
        return PackSpec(target=DEFAULT_TARGET)
    if text.isdigit():
        raise ValueError(f"{where}: {value!r} is ambiguous; write pack={int(text)} (elements per job, a number) "
                         f"or pack='{text}m' (minutes of work per job)")
    seconds = _duration(text)
    if seconds is None and ":" in text:
        try:
            limit = parse_time(text)
        except ValueError:
            limit = None
        seconds = float(limit) if limit else None
    if seconds is None:
        raise ValueError(f"{where}: {value!r} is not a packing setting; {_HINT}")
    if not 1.0 <= seconds <= MAX_TARGET:
        raise ValueError(f"{where}: {value!r} is out of range (1 second to 7 days of work per job)")
    return PackSpec(target=seconds)


def effective(task_value: Any, cluster_value: Any) -> PackSpec:
    """The spec a task runs with: its own ``pack=`` if set, else its cluster's (``"auto"`` if unset)."""
    spec = parse_pack(task_value, "pack")
    if spec is None:
        spec = parse_pack(cluster_value if cluster_value is not None else "auto", "cluster pack")
    return spec or OFF
