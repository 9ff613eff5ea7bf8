"""Example pipeline: split a dataset into chunks, summarise each chunk in parallel, merge.

    python examples/etl.py run --run-dir runs/etl                 # on this machine, no daemon
    python examples/etl.py submit --run-dir runs/etl --wait       # through reflowd
    python examples/etl.py submit --run-dir /scratch/etl --cluster hpc --chunks 500
    python examples/etl.py dag --format mermaid

``extract`` returns a list of files, so ``summarise`` (an array task taking one
file) fans out over it; ``merge`` takes ``list[ChunkStats]`` and so gathers
every element's result.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

from reflow import Param, Result, RunDir, Workflow

wf = Workflow("etl")


@dataclass
class ChunkStats:
    chunk: str
    count: int
    mean: float
    stdev: float
    minimum: float
    maximum: float


@wf.job(time="00:05:00", mem="1G")
def extract(
    run_dir: Annotated[Path, RunDir()],
    chunks: Annotated[int, Param(help="how many chunk files to produce", short="n")] = 60,
    rows: Annotated[int, Param(help="values per chunk")] = 2000,
    seed: Annotated[int, Param(help="random seed")] = 42,
) -> list[Path]:
    """Write the raw data as chunk files (stands in for reading an instrument's output)."""
    out = run_dir / "data"
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files = []
    for i in range(chunks):
        path = out / f"chunk-{i:04d}.txt"
        centre = rng.uniform(-5, 5)
        path.write_text("\n".join(f"{rng.gauss(centre, 1.0):.6f}" for _ in range(rows)) + "\n")
        files.append(path)
    return files


@wf.array_job(time="00:10:00", mem="1G", retries=1)
def summarise(chunk: Annotated[Path, Result(step="extract")]) -> ChunkStats:
    """Statistics of one chunk (one array element per file)."""
    values = [float(line) for line in chunk.read_text().split()]
    mean = sum(values) / len(values)
    stdev = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))
    print(f"{chunk.name}: {len(values)} values, mean {mean:.4f}, stdev {stdev:.4f}")
    return ChunkStats(chunk.name, len(values), mean, stdev, min(values), max(values))


@wf.job(time="00:05:00", mem="1G")
def merge(
    stats: Annotated[list[ChunkStats], Result(step="summarise")],
    run_dir: Annotated[Path, RunDir()],
) -> dict[str, float]:
    """Combine the per-chunk statistics and write a report."""
    total = sum(s.count for s in stats)
    mean = sum(s.mean * s.count for s in stats) / total if total else float("nan")
    summary = {
        "chunks": len(stats),
        "values": total,
        "mean": round(mean, 6),
        "minimum": min((s.minimum for s in stats), default=float("nan")),
        "maximum": max((s.maximum for s in stats), default=float("nan")),
    }
    (run_dir / "report.json").write_text(json.dumps({"summary": summary, "chunks": [asdict(s) for s in stats]},
                                                    indent=2))
    return summary


if __name__ == "__main__":
    raise SystemExit(wf.cli())
