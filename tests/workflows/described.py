"""A small workflow with every kind of run parameter (manifest, describe and CLI tests).

    python described.py run --run-dir DIR --start 2025-01-01 [...]
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import os
from pathlib import Path
from typing import Annotated, Literal, Optional

from reflow import Param, Result, RunDir, Workflow

wf = Workflow("described")


class Mode(enum.Enum):
    FAST = "fast"
    EXACT = "exact"


@wf.job(cpus=2, time="01:00:00", mem="8G", partition="compute", account="proj1")
def prepare(
    start: Annotated[dt.datetime, Param(help="first time step (ISO)")],
    count: Annotated[int, Param(help="number of chunks", short="n")] = 3,
    label: str = "run",
) -> list[str]:
    return [f"{label}-{start:%Y%m%d}-{i}" for i in range(count)]


@wf.array_job(array_parallelism=2, version="2", retries=1)
def convert(
    chunk: Annotated[str, Result(step="prepare")],
    out_dir: Annotated[Path, RunDir()],
    scale: float = 1.0,
    mode: Mode = Mode.FAST,
    level: Annotated[int, Param(namespace="local", help="compression level")] = 4,
) -> str:
    return f"{chunk}:{mode.value}:{scale}:{level}"


@wf.job(after=["prepare"], cache=False)
def report(
    converted: Annotated[list[str], Result(step="convert")],
    fmt: Literal["json", "text"] = "text",
    dry: bool = False,
    tags: list[str] = ["a", "b"],
    limit: Optional[int] = None,
) -> str:
    summary = {"converted": converted, "dry": dry, "tags": tags, "limit": limit}
    return json.dumps(summary, sort_keys=True) if fmt == "json" else f"{len(converted)} converted"


if __name__ == "__main__":
    marker = os.environ.get("DESCRIBED_MAIN_MARKER")
    if marker:
        with open(marker, "a") as fh:
            fh.write(f"{os.getpid()}\n")
    raise SystemExit(wf.cli())
