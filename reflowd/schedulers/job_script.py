"""The batch script and array layout shared by the PBS, LSF and Flux adapters (pure).

(The environment lines and directive quoting serve the Slurm and Grid Engine
scripts too.)

Those systems number array tasks their own way (PBS ``-J`` ranges, LSF's
1-based ``name[1-N]``, Flux's ``--cc`` id sets) and none takes an arbitrary
list of ids the way Slurm's ``--array`` does, yet a retried batch may hold any
set of elements. So every array goes out *dense*: the scheduler sees
positions ``0..n-1`` (or ``1..n``) and the script maps a position to the
element index. :class:`ArrayLayout` is that map, rebuilt from the
:class:`SubmitRequest` after a daemon restart, so nothing about it needs to be
stored.
"""

from __future__ import annotations

import re
import shlex
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .base import OptionError, SubmitRequest, log_path

T = TypeVar("T")

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class ArrayLayout:
    """Element indices of one submission in scheduler order (``None`` for a singleton)."""

    job_id: str
    indices: tuple[int, ...] | None
    offset: int = 0

    @classmethod
    def of(cls, request: SubmitRequest, job_id: str) -> ArrayLayout:
        indices = tuple(sorted(set(request.indices))) if request.indices is not None else None
        return cls(job_id, indices, request.index_offset)

    @property
    def is_array(self) -> bool:
        return self.indices is not None

    def key_at(self, position: int) -> str | None:
        """Observation key of the element at scheduler position *position* (0-based)."""
        if self.indices is None:
            return self.job_id
        if not 0 <= position < len(self.indices):
            return None
        return f"{self.job_id}_{self.indices[position] - self.offset}"

    def keys(self) -> list[str]:
        if self.indices is None:
            return [self.job_id]
        return [f"{self.job_id}_{i - self.offset}" for i in self.indices]

    def position_of(self, key: str) -> int | None:
        """Scheduler position (0-based) of an observation key, or None for the whole job."""
        if self.indices is None or key == self.job_id:
            return None
        prefix = f"{self.job_id}_"
        if not key.startswith(prefix) or not key[len(prefix):].lstrip("-").isdigit():
            return None
        element = int(key[len(prefix):]) + self.offset
        position = bisect_left(self.indices, element)  # (sorted: a cancel of 10^4 keys was 10^4 scans)
        return position if position < len(self.indices) and self.indices[position] == element else None


def split_key(key: str) -> tuple[str, str | None]:
    """``"<job id>_<k>"`` -> (job id, "k"); a key without an element part -> (key, None)."""
    head, sep, tail = key.rpartition("_")
    if sep and head and tail.isdigit():
        return head, tail
    return key, None


def _contiguous(indices: Sequence[int]) -> bool:
    return all(b == a + 1 for a, b in zip(indices, indices[1:]))


def export_lines(request: SubmitRequest) -> list[str]:
    """``export NAME=value`` for the job's environment (values shell-quoted; a bad name is refused)."""
    lines = []
    for name, value in sorted(request.env.items()):
        if not _ENV_NAME.match(name):
            raise OptionError(f"environment variable name {name!r} is not valid")
        lines.append(f"export {name}={shlex.quote(str(value))}")
    return lines


def directive_word(word: str) -> str:
    """One word of a ``#PBS``/``#BSUB`` line: bare when plain, else double-quoted (those parsers take quotes)."""
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./^\-]+", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_script(request: SubmitRequest, directives: Sequence[str], position_expr: str | None) -> str:
    """A bash batch script: directives, environment, logs, then exec the worker (every word quoted).

    *position_expr* is a bash arithmetic expression giving the 0-based array
    position (``PBS_ARRAY_INDEX``, ``LSB_JOBINDEX - 1``, ``FLUX_JOB_CC``);
    ``None`` for a singleton or a one-element array sent as a plain job.
    The script writes the worker's output to ``<log_dir>/<task>.<tag>[.<id>].out|err``
    itself, so logs are live and named alike on every system.
    """
    lines = ["#!/bin/bash", *directives, f"# reflow job {request.tag}: run {request.run_id}, task {request.task}"]
    lines.extend(export_lines(request))
    lines.append(f"cd {shlex.quote(request.workdir)} || exit 1")
    command = " ".join(shlex.quote(str(a)) for a in request.worker_argv)
    if request.indices is None:
        out = log_path(request.log_dir, request.task, request.tag, None, "out")
        err = log_path(request.log_dir, request.task, request.tag, None, "err")
        lines.append(f"exec >>{shlex.quote(out)} 2>>{shlex.quote(err)}")
        lines.append(f"exec {command}")
        return "\n".join(lines) + "\n"
    indices = sorted(set(request.indices))
    if position_expr is None:
        if len(indices) != 1:
            raise ValueError("an array of several elements needs the scheduler's position variable")
        lines.append(f"index={int(indices[0])}")
    elif _contiguous(indices):
        lines.append(f"index=$(( ({position_expr}) + {int(indices[0])} ))")
    else:
        lines.append(f"indices=({' '.join(str(int(i)) for i in indices)})")
        lines.append(f"index=${{indices[$(( {position_expr} ))]}}")
    lines.append(f"id=$(( index - {int(request.index_offset)} ))")
    base = f"{request.log_dir}/{request.task}.{request.tag}."
    lines.append(f'exec >>{shlex.quote(base)}"$id".out 2>>{shlex.quote(base)}"$id".err')
    lines.append(f'exec {command} --index "$index"')
    return "\n".join(lines) + "\n"


class Book(Generic[T]):
    """Per-job bookkeeping that outlives :meth:`Scheduler.forget` for a while.

    The engine forgets a job once it has concluded every element, but a
    cancel for one of those elements may still be on its way (a client
    cancel races the observer's pruning), so forgotten entries are retired
    to a bounded store instead of dropped.
    """

    def __init__(self, keep: int = 2000) -> None:
        self.live: dict[str, T] = {}
        self.retired: OrderedDict[str, T] = OrderedDict()
        self.keep = keep

    def get(self, key: str) -> T | None:
        return self.live.get(key, self.retired.get(key))

    def __contains__(self, key: object) -> bool:
        return key in self.live or key in self.retired

    def __setitem__(self, key: str, value: T) -> None:
        self.retired.pop(key, None)
        self.live[key] = value

    def retire(self, key: str) -> None:
        value = self.live.pop(key, None)
        if value is not None:
            self.retired[key] = value
            while len(self.retired) > self.keep:
                self.retired.popitem(last=False)
