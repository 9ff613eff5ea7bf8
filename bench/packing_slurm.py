"""Packing on the local Slurm: the README pipeline's shape, packed, unpacked and chained by Slurm itself.

One task, an N-element fan-out of tasks that do almost nothing, a gather (bench/fanout_workflow.py),
measured in the same run three ways:

* ``sbatch --dependency=afterok`` chain of the same job shapes, one array element per element
  (each starting the same interpreter as a reflow worker: ``import reflow.worker``);
* reflowd with packing off (``pack = "off"``: one array element per element);
* reflowd with automatic packing (the default ``pack = "auto"``): a first run (``--history``
  elements) has no history and runs unpacked; the measured run comes after it, with the first
  one's durations known.

    flock /tmp/reflow-cluster.lock sudo .venv/bin/python bench/packing_slurm.py [--elements 100 1000]

Cluster settings are the tests' fast polling ones (``--user-polling`` for a user's defaults).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_util import ROOT  # noqa: E402
from packing_util import fanout_runs  # noqa: E402
from slurm_fanout import native_chain  # noqa: E402  (the same afterok chain as the fan-out benchmark)

FAST = "min_poll_interval = 0.3\npoll_interval = 1\nmax_poll_interval = 2\n"


def start_cluster() -> None:
    subprocess.run([str(ROOT / "tests" / "cluster" / "slurm.sh"), "start"], check=True, timeout=900)


def config(pack: str, fast: bool) -> str:
    return (f'[clusters.slurm]\nscheduler = "slurm"\npython = "{sys.executable}"\npack = "{pack}"\n'
            + (FAST if fast else "") + 'submit_options = { partition = "debug" }\n')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, nargs="+", default=[100])
    parser.add_argument("--repeat", type=int, default=1, help="measured runs of each kind (medians are printed)")
    parser.add_argument("--history", type=int, default=100, help="elements of the run that leaves history")
    parser.add_argument("--user-polling", action="store_true", help="a user's default poll settings")
    args = parser.parse_args()
    start_cluster()
    fast = not args.user_polling
    print(f"local Slurm (2 cores), fan-out + gather of tiny tasks, {'fast' if fast else 'default'} polling, "
          f"medians of {args.repeat}")
    for n in args.elements:
        with tempfile.TemporaryDirectory(prefix="reflow-bench-pack-") as tmp:
            base = Path(tmp)
            native = statistics.median(native_chain(base / f"native{k}", n) for k in range(args.repeat))
            off = fanout_runs(base / "off", config("off", fast), "slurm", n, args.repeat)
            auto = fanout_runs(base / "auto", config("auto", fast), "slurm", n, args.repeat + 1,
                               history=min(n, args.history))
        history, packed = auto[0], auto[1:]
        off_wall = statistics.median(r["wall"] for r in off)
        packed_wall = statistics.median(r["wall"] for r in packed)
        last = packed[-1]
        print(f"\n{n} elements")
        print(f"  sbatch afterok chain           {native:7.1f} s   ({n + 2} jobs)")
        print(f"  reflow, packing off            {off_wall:7.1f} s   ({off[-1]['submits']} submissions, "
              f"{off[-1]['array_tasks']} array tasks for the fan-out)  off / native = {off_wall / native:.2f}")
        print(f"  reflow, first run (no history) {history['wall']:7.1f} s   ({history['elements']} elements, "
              f"{history['submits']} submissions)")
        print(f"  reflow, packed (auto)          {packed_wall:7.1f} s   ({last['submits']} submissions, "
              f"{last['array_tasks']} array tasks for the fan-out)  packed / native = {packed_wall / native:.2f}, "
              f"packed / off = {packed_wall / off_wall:.2f}")
        print(f"  daemon CPU per element         off {1000 * off[-1]['cpu'] / n:.2f} ms, "
              f"packed {1000 * last['cpu'] / n:.2f} ms")


if __name__ == "__main__":
    main()
