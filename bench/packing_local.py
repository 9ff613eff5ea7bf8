"""Packing on the local scheduler: thousands of tiny elements, packed against one interpreter per element.

bench/fanout_workflow.py (one task, an N-element fan-out of tasks that do almost nothing, a
gather) through a private reflowd on the local scheduler, measured in the same run:

* bare: N interpreter starts (``python -c 'import reflow.worker'``), ``max_workers`` at a time --
  the floor of any one-process-per-element design;
* reflow with packing off (one worker process per element);
* reflow with automatic packing (the default), after one 20-element run that leaves history.

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
    parser.add_argument("--off-elements", type=int, default=None,
                        help="elements of the packing-off run (default --elements; rates are compared)")
    args = parser.parse_args()
    n = args.elements
    with tempfile.TemporaryDirectory(prefix="reflow-bench-pack-local-") as tmp:
        base = Path(tmp)
        bare = bare_starts(args.bare, args.workers) * n / args.bare
        auto = fanout_runs(base / "auto", config("auto", args.workers), "local", n, 2, history=20)
        n_off = args.off_elements or n
        off = fanout_runs(base / "off", config("off", args.workers), "local", n_off, 1)[0]
    history, packed = auto
    print(f"local scheduler, {args.workers} workers, {n}-element fan-out + gather of tiny tasks")
    print(f"  {n} bare interpreter starts      {bare:7.1f} s   (from {args.bare}, scaled)   "
          f"{n / bare:7.0f} elements/s")
    print(f"  reflow, packing off ({n_off:5d})     {off['wall']:7.1f} s   {n_off / off['wall']:7.0f} elements/s")
    print(f"  reflow, first run (no history)   {history['wall']:7.1f} s   ({history['elements']} elements, "
          f"{history['elements'] / history['wall']:.0f} elements/s)")
    print(f"  reflow, packed (auto)            {packed['wall']:7.1f} s   {n / packed['wall']:7.0f} elements/s   "
          f"({packed['submits']} submissions, {packed['array_tasks']} worker processes for the fan-out)")
    rate, off_rate = n / packed["wall"], n_off / off["wall"]
    print(f"  elements/s packed / off = {rate / off_rate:.1f}   packed / bare interpreter starts = "
          f"{rate / (n / bare):.1f}")
    print(f"  daemon CPU per element: off {1000 * off['cpu'] / n_off:.2f} ms, packed {1000 * packed['cpu'] / n:.2f} ms")


if __name__ == "__main__":
    main()
