"""Packing on the local scheduler: thousands of tiny elements, packed against one interpreter per element.

bench/fanout_workflow.py (one task, an N-element fan-out of tasks that do almost nothing, a
gather), measured in the same run:

* bare: N interpreter starts (``python -c 'import reflow.worker'``), ``--workers`` at a time --
  the floor of any one-process-per-element design (measured on ``--bare`` starts, scaled);
* through a private reflowd on the local scheduler: packing off (one worker process per
  element), and automatic packing (the default) after one 20-element run that leaves history;
* embedded (``wf.run_local``, the engine in this process, no daemon): a 20-element run, then
  the N-element run in the same run directory (whose store holds the history).

Rates are end to end: from the submission (or the ``run_local`` call) to the run's end,
the first task and the gather included. The machine's load average is printed with the
figures: on a shared machine every rate depends on it.

    .venv/bin/python bench/packing_local.py [--elements 2000] [--workers 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_util import ROOT  # noqa: E402
from packing_util import fanout_runs  # noqa: E402


def bare_starts(elements: int, workers: int) -> float:
    argv = [sys.executable, "-c", "import reflow.worker"]
    t0 = time.time()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda _: subprocess.run(argv, check=True, timeout=120), range(elements)))
    return time.time() - t0


def config(pack: str, workers: int) -> str:
    return f'[clusters.local]\nscheduler = "local"\nmax_workers = {workers}\npack = "{pack}"\n'


def embedded_runs(base: Path, elements: int, workers: int, repeat: int) -> list[dict[str, Any]]:
    """``run_local`` in one run directory: a 20-element run for history, then *repeat* N-element runs."""
    from reflow.loader import load_workflow

    os.environ["REFLOW_STATE_DIR"] = str(base / "state")  # a private shared cache
    wf = load_workflow(ROOT / "bench" / "fanout_workflow.py")
    out = []
    for k in range(repeat + 1):
        n = 20 if k == 0 else elements
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.time()
        result = wf.run_local(base / "run", max_workers=workers, n=n, salt=secrets.token_hex(4))
        wall = time.time() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        if not result.ok or len(result["work"]) != n:
            raise SystemExit(f"the embedded benchmark run ended {result.state}: {result.failures[:1]}")
        out.append({"wall": wall, "elements": n,
                    "cpu": cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime})
    return out


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def rates(runs: list[dict[str, Any]]) -> str:
    values = [r["elements"] / r["wall"] for r in runs]
    return f"median {statistics.median(values):5.0f} elements/s  (" + ", ".join(f"{v:.0f}" for v in values) + ")"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="measured packed runs of each kind")
    parser.add_argument("--bare", type=int, default=200, help="interpreter starts measured (scaled to --elements)")
    parser.add_argument("--off-elements", type=int, default=None,
                        help="elements of the packing-off run (default --elements; rates are compared)")
    parser.add_argument("--no-embedded", action="store_true", help="skip the run_local runs")
    args = parser.parse_args()
    n = args.elements
    print(f"start: {load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="reflow-bench-pack-local-") as tmp:
        base = Path(tmp)
        bare = bare_starts(args.bare, args.workers) * n / args.bare
        auto = fanout_runs(base / "auto", config("auto", args.workers), "local", n, 1 + args.repeat, history=20)
        embedded = [] if args.no_embedded else embedded_runs(base / "embedded", n, args.workers, args.repeat)
        n_off = args.off_elements or n
        off = fanout_runs(base / "off", config("off", args.workers), "local", n_off, 1)[0]
    history, packed = auto[0], auto[1:]
    bare_rate = n / bare
    best = statistics.median(n / r["wall"] for r in packed)
    off_rate = n_off / off["wall"]
    print(f"local scheduler, {args.workers} workers, {n}-element fan-out + gather of tiny tasks")
    print(f"  one interpreter per element ({args.bare} starts, scaled)  {bare:7.1f} s   {bare_rate:7.0f} elements/s")
    print(f"  reflowd, packing off ({n_off} elements)          {off['wall']:7.1f} s   {off_rate:7.0f} elements/s   "
          f"(daemon CPU {1000 * off['cpu'] / n_off:.2f} ms/element)")
    print(f"  reflowd, first run (20 elements, no history)  {history['wall']:7.1f} s")
    print(f"  reflowd, packed (auto)                        {rates(packed)}   "
          f"({packed[-1]['submits']} submissions, {packed[-1]['array_tasks']} worker processes for the fan-out; "
          f"daemon CPU {1000 * statistics.median(r['cpu'] for r in packed) / n:.2f} ms/element)")
    if embedded:
        print(f"  embedded run_local, first (20 elements)       {embedded[0]['wall']:7.1f} s")
        print(f"  embedded run_local, packed (auto)             {rates(embedded[1:])}   "
              f"(engine CPU {1000 * statistics.median(r['cpu'] for r in embedded[1:]) / n:.2f} ms/element)")
    print(f"  reflowd packed / one interpreter per element = {best / bare_rate:.1f}   "
          f"packed / packing off = {best / off_rate:.1f}")
    if embedded:
        print(f"  embedded packed / one interpreter per element = "
              f"{statistics.median(n / r['wall'] for r in embedded[1:]) / bare_rate:.1f}")
    print(f"end: {load()}")


if __name__ == "__main__":
    main()
