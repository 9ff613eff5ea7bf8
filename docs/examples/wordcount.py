"""The tutorial's pipeline: count the words of some text files, in parallel, and add the counts up.

    python wordcount.py run --run-dir runs/wc            # on this machine, no daemon
    python wordcount.py submit --run-dir runs/wc --wait  # through reflowd
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

from reflow import Param, Result, RunDir, Workflow

wf = Workflow("wordcount")


# --8<-- [start:texts]
@wf.job(time="00:05:00", mem="1G")
def texts(
    run_dir: Annotated[Path, RunDir()],
    files: Annotated[int, Param(help="how many text files to write")] = 4,
) -> list[Path]:
    """Write the input files; a real pipeline would list files that already exist."""
    folder = run_dir / "texts"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(files):
        path = folder / f"text-{i}.txt"
        path.write_text("the quick brown fox " * (i + 1) + "jumps over the lazy dog\n")
        paths.append(path)
    return paths
# --8<-- [end:texts]


# --8<-- [start:count]
@wf.array_job(array_parallelism=8, time="00:05:00", mem="1G", retries=1)
def count(path: Annotated[Path, Result(step="texts")]) -> dict[str, int]:
    """One element per file: ``texts`` returns ``list[Path]`` and this takes one ``Path`` (fan-out)."""
    return dict(Counter(path.read_text().split()))
# --8<-- [end:count]


# --8<-- [start:total]
@wf.job(time="00:05:00", mem="1G")
def total(
    counts: Annotated[list[dict[str, int]], Result(step="count")],
    top: Annotated[int, Param(help="how many of the most frequent words to report")] = 3,
) -> list[tuple[str, int]]:
    """Gather: ``count`` is an array task and this takes ``list[...]`` of its outputs, in element order."""
    summed: Counter[str] = Counter()
    for one in counts:
        summed.update(one)
    return summed.most_common(top)
# --8<-- [end:total]


if __name__ == "__main__":
    wf.cli()
