"""Parsing of the resource strings users write (``time="1-12:00:00"``, ``mem="4G"``).

Checked when a task is registered so that a typo fails on the user's machine
with a useful message, not hours later in a queue.
"""

from __future__ import annotations

import re

_TIME_FORMS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
_MEM_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)B?\s*$", re.IGNORECASE)
_MEM_FACTOR_MB = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}


def parse_time(text: str) -> int | None:
    """Seconds in a Slurm-style time limit; None means no limit (``UNLIMITED``)."""
    if not isinstance(text, str):
        raise ValueError(f"time limit must be a string like '01:30:00', not {text!r}")
    value = text.strip()
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    days = 0
    clock = value
    if "-" in value:
        day_part, _, clock = value.partition("-")
        if not day_part.isdigit():
            raise ValueError(f"invalid time limit {text!r}: use {_TIME_FORMS}")
        days = int(day_part)
    parts = clock.split(":")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"invalid time limit {text!r}: use {_TIME_FORMS}")
    nums = [int(p) for p in parts]
    if days or len(nums) == 3:
        # D-HH[:MM[:SS]] and HH:MM:SS count from hours.
        hours, minutes, seconds = (nums + [0, 0])[:3]
        if minutes >= 60:
            raise ValueError(f"invalid time limit {text!r}: minutes must be below 60")
    else:
        # MM and MM:SS count from minutes.
        hours, minutes, seconds = 0, nums[0], (nums[1] if len(nums) == 2 else 0)
    if seconds >= 60:
        raise ValueError(f"invalid time limit {text!r}: seconds must be below 60")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise ValueError(f"invalid time limit {text!r}: it must be longer than zero")
    return total


def format_time(seconds: int) -> str:
    """Seconds as ``D-HH:MM:SS`` / ``HH:MM:SS`` (accepted by every scheduler we render for)."""
    days, rem = divmod(int(seconds), 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    if days:
        return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{hours:02d}:{minutes:02d}:{secs:02d}"


def parse_mem(text: str) -> int:
    """Megabytes in a memory request like ``4G``, ``500M``, ``2048`` (MB)."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str):
        raise ValueError(f"memory must be a string like '4G' or '500M', not {text!r}")
    match = _MEM_RE.match(text)
    if not match:
        raise ValueError(f"invalid memory request {text!r}: use a whole number with K, M, G or T, like '4G' or '500M'")
    amount = int(match.group(1)) * _MEM_FACTOR_MB[match.group(2).upper()]
    if amount <= 0:
        raise ValueError(f"invalid memory request {text!r}: it must be more than zero")
    return max(1, int(amount))


def format_mem(text: str) -> str:
    """Canonical scheduler spelling of a memory request (``4GB`` -> ``4G``)."""
    match = _MEM_RE.match(str(text))
    if not match:
        raise ValueError(f"invalid memory request {text!r}")
    return f"{int(match.group(1))}{match.group(2).upper()}"


# ---------------------------------------------------------------------- conversions for schedulers
# Each batch system wants limits in its own units; these keep the arithmetic in one tested place.

_UNIT_KB = {"KB": 1, "MB": 1024, "GB": 1024**2, "TB": 1024**3, "PB": 1024**4, "EB": 1024**5, "ZB": 1024**6}


def time_limit_seconds(text: str) -> int | None:
    """A task's time limit in seconds (None: unlimited); the same rules as :func:`parse_time`."""
    return parse_time(text)


def format_hms(seconds: int) -> str:
    """``HH:MM:SS`` with hours past 24 (PBS ``walltime``): 90061 s -> ``25:01:01``."""
    hours, rem = divmod(int(seconds), 3600)
    minutes, secs = divmod(rem, 60)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}"


def minutes_ceil(seconds: int) -> int:
    """Whole minutes, rounded up so a limit is never shortened (LSF ``-W``, Flux's default unit)."""
    return max(1, -(-int(seconds) // 60))


def mem_in_unit(text: str, unit: str) -> int:
    """A memory request (``4G``) as a whole number of *unit* (KB, MB, GB, ...), rounded up.

    LSF reads ``-M`` and ``rusage[mem=]`` numbers in the site's ``LSF_UNIT_FOR_LIMITS``.
    """
    key = unit.strip().upper()
    if key in ("K", "M", "G", "T", "P", "E", "Z"):
        key += "B"
    if key not in _UNIT_KB:
        raise ValueError(f"unknown memory unit {unit!r} (one of {', '.join(_UNIT_KB)})")
    match = _MEM_RE.match(str(text))
    if not match:
        raise ValueError(f"invalid memory request {text!r}: use a whole number with K, M, G or T, like '4G'")
    suffix = match.group(2).upper() or "M"  # a bare number means megabytes (Slurm's rule)
    kilobytes = int(match.group(1)) * _UNIT_KB[suffix + "B"]
    return max(1, -(-kilobytes // _UNIT_KB[key]))


def format_pbs_size(text: str) -> str:
    """A memory request in PBS size syntax (lower-case ``kb``/``mb``/``gb``/``tb``): ``4G`` -> ``4gb``."""
    match = _MEM_RE.match(str(text))
    if not match:
        raise ValueError(f"invalid memory request {text!r}: use a whole number with K, M, G or T, like '4G'")
    suffix = (match.group(2) or "M").lower()
    return f"{int(match.group(1))}{suffix}b"
