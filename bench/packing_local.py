"""Packing on the local scheduler: thousands of tiny elements, packed against one interpreter per element.

bench/fanout_workflow.py (one task, an N-element fan-out of tasks that do almost nothing, a
gather) through a private reflowd on the local scheduler, measured in the same run:

* bare: N interpreter starts (``python -c 'import reflow.worker'``), ``max_workers`` at a time --
  the floor of any one-process-per-element design;
* reflow with packing off (one worker process per element);
* reflow with automatic packing (the default), after one run that leaves history.

    .venv/bin/python bench/packing_local.py [--elements 2000] [--workers 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from packing_util import fanout_runs  # noqa: E402


def bare_starts(elements: int, workers: int) -> float:
    argv = [sys.executable, "-c", "import reflow.worker"]
    t0 = time.time()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda _: subprocess.run(argv, check=True, timeout=120), range(elements)))
    return time.time() - t0


def config(pack: str, workers: int) -> str:
    return f'[clusters.local]\nscheduler = "local"\nmax_workers = {workers}\npack = "{pack}"\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bare", type=int, default=200, help="interpreter starts measured (scaled to --elements)")
    args = parser.parse_args()
    n = args.elements
    with tempfile.TemporaryDirectory(prefix="reflow-bench-pack-local-") as tmp:
        base = Path(tmp)
        bare = bare_starts(args.bare, args.workers) * n / args.bare
        auto = fanout_runs(base / "auto", config("auto", args.workers), "local", n, 2)
        off = fanout_runs(base / "off", config("off", args.workers), "local", n, 1)[0]
    history, packed = auto
    print(f"local scheduler, {args.workers} workers, {n}-element fan-out + gather of tiny tasks")
    print(f"  {n} bare interpreter starts      {bare:7.1f} s   (from {args.bare}, scaled)   "
          f"{n / bare:7.0f} elements/s")
    print(f"  reflow, packing off              {off['wall']:7.1f} s   {n / off['wall']:7.0f} elements/s")
    print(f"  reflow, first run (no history)   {history['wall']:7.1f} s   {n / history['wall']:7.0f} elements/s")
    print(f"  reflow, packed (auto)            {packed['wall']:7.1f} s   {n / packed['wall']:7.0f} elements/s   "
          f"({packed['submits']} submissions, {packed['array_tasks']} worker processes for the fan-out)")
    print(f"  packed / off = {packed['wall'] / off['wall']:.3f}   packed / bare starts = {packed['wall'] / bare:.3f}")
    print(f"  daemon CPU per element: off {1000 * off['cpu'] / n:.2f} ms, packed {1000 * packed['cpu'] / n:.2f} ms")


if __name__ == "__main__":
    main()
