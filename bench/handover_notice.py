"""How soon reflowd notices an upstream's end on the local Slurm, against another source tree, interleaved.

The hand-over from one task to the next starts when the daemon notices the upstream's last result.
This runs the packed fan-out of bench/packing_slurm.py (one task, N tiny elements packed into one job,
a gather) through a fresh reflowd from each of two source trees in turn (``--baseline DIR``, e.g. a
``git worktree`` of main, and this one), each time after a 10-element run that leaves history, and
prints per tree the medians of: seconds from the upstream's last element ending (its worker's clock)
to the daemon recording it (its store's transition), the whole daemon share (until the downstream's job
files are written), the run's makespan and the daemon's CPU time. Alternating the trees run by run
keeps the machine's load (shared, 2 cores) out of the comparison as far as it can be.

    flock /tmp/reflow-cluster.lock .venv/bin/python bench/handover_notice.py --baseline /path/to/main --repeat 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_util import ROOT  # noqa: E402
from packing_slurm import config, handovers, noticed, start_cluster  # noqa: E402
from packing_util import fanout_runs  # noqa: E402


def one(tree: Path, base: Path, n: int, fast: bool) -> dict[str, float]:
    """One packed run (after a history run) through a reflowd started from *tree*."""
    here = os.getcwd()
    os.chdir(tree)  # `python -m reflowd` imports the package from its working directory first
    try:
        runs = fanout_runs(base, config("auto", fast), "slurm", n, 2, history=10)
    finally:
        os.chdir(here)
    seen = noticed(base / "run1")
    share = handovers(base / "run1")
    return {"notice": statistics.mean(seen.values()), "share": statistics.mean(s[0] for s in share.values()),
            "wall": runs[1]["wall"], "cpu_ms": 1000 * runs[1]["cpu"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="the source tree to compare against")
    parser.add_argument("--elements", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--user-polling", action="store_true", help="a user's default poll settings")
    args = parser.parse_args()
    start_cluster()
    trees = {"baseline": args.baseline.resolve(), "this tree": ROOT}
    found: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="reflow-bench-notice-") as tmp:
        for k in range(args.repeat):
            order = list(trees) if k % 2 == 0 else list(reversed(trees))
            for name in order:
                found[name].append(one(trees[name], Path(tmp) / f"{name.replace(' ', '-')}{k}", args.elements,
                                       not args.user_polling))
    print(f"local Slurm, {args.elements} tiny elements packed, {'default' if args.user_polling else 'fast'} "
          f"polling, medians of {args.repeat} "
          f"(each hand-over's figure is the mean of items -> work and work -> total); "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name, rows in found.items():
        med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        print(f"  {name:<10} noticed {med['notice']:.2f} s after the upstream's end "
              f"({', '.join(format(r['notice'], '.2f') for r in rows)}), daemon share {med['share']:.2f} s, "
              f"run {med['wall']:.1f} s, daemon CPU {med['cpu_ms']:.0f} ms")


if __name__ == "__main__":
    main()
