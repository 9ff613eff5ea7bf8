"""Annotation markers: where a task parameter's value comes from.

``Annotated[int, Param(help=...)]``   a run parameter, exposed as a CLI flag;
``Annotated[list[str], Result(step="prepare")]``   the output of another task;
``Annotated[Path, RunDir()]`` (or just ``RunDir``)   the run directory.
A parameter without a marker is a global run parameter too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Param:
    """A run parameter with CLI metadata.

    ``namespace="global"`` shares one ``--name`` flag between every task that
    declares the parameter; ``"local"`` gives this task its own
    ``--<task>-<name>`` flag.
    """

    help: str = ""
    short: str | None = None
    namespace: Literal["global", "local"] = "global"

    def __post_init__(self) -> None:
        if self.namespace not in ("global", "local"):
            raise ValueError(f"Param namespace must be 'global' or 'local', not {self.namespace!r}")
        if self.short is not None:
            short = self.short.lstrip("-")
            if len(short) != 1 or not short.isalpha():
                raise ValueError(f"Param short flag must be a single letter like 'n' or '-n', not {self.short!r}")
            object.__setattr__(self, "short", short)


@dataclass(frozen=True)
class Result:
    """Wire the output of one or more upstream tasks into this parameter.

    ``broadcast=True`` passes the whole value to every element of an array
    task instead of fanning it out.
    """

    step: str | None = None
    steps: list[str] = field(default_factory=list)
    broadcast: bool = False

    def __post_init__(self) -> None:
        steps = list(self.steps)
        if self.step is not None:
            if steps:
                raise ValueError("Result takes step=... or steps=[...], not both")
            steps = [self.step]
        if not steps:
            raise ValueError("Result needs step='task' or steps=['task', ...]")
        for s in steps:
            if not isinstance(s, str) or not s:
                raise ValueError(f"Result steps must be task names, got {s!r}")
        if len(set(steps)) != len(steps):
            raise ValueError(f"Result steps repeat a task: {steps}")
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "step", steps[0] if len(steps) == 1 else None)

    def renamed(self, mapping: dict[str, str]) -> Result:
        """The same wiring with step names rewritten (for ``Workflow.include(prefix=...)``)."""
        return Result(steps=[mapping.get(s, s) for s in self.steps], broadcast=self.broadcast)


class RunDir:
    """Marker: inject the run directory (a ``Path``) into this parameter."""

    def __repr__(self) -> str:
        return "RunDir()"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir)

    def __hash__(self) -> int:
        return hash(RunDir)
