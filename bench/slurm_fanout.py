"""A 500-element fan-out on the local Slurm test cluster, through reflowd.

Prints scheduler calls per task, the daemon's CPU seconds, the time from a
job's end to its downstream's submission, and the same three-level chain
submitted natively with ``sbatch --dependency=afterok`` for comparison.

    sudo python bench/slurm_fanout.py [--elements 500] [--accounting]

Uses the cluster settings a user gets by default (poll interval 10 s, at most
12 status queries a minute), not the tests' fast ones.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_util import ROOT, describe, fanout_run  # noqa: E402



def start_cluster(accounting: bool) -> None:
    args = [str(ROOT / "tests" / "cluster" / "slurm.sh"), "start"] + (["--accounting"] if accounting else [])
    subprocess.run(args, check=True, timeout=900)


def reflow_run(base: Path, elements: int) -> dict[str, float]:
    config = f'[clusters.slurm]\nscheduler = "slurm"\npython = "{sys.executable}"\nsubmit_options = {{ partition = "debug" }}\n'
    result = fanout_run(base, config, "slurm", elements)
    wall, cpu, views = result["wall"], result["cpu"], result["instances"]
    calls = Counter(result["cluster"]["calls"])
    items, work, total = views["items"][0], views["work"], views["total"][0]
    return {
        "wall": wall,
        "cpu": cpu,
        "calls": sum(calls.values()),
        "submits": calls["submit"],
        "queries": calls["query"],
        "fanout_reaction": min(w["submitted_at"] for w in work) - items["ended_at"],
        "gather_reaction": total["submitted_at"] - max(w["ended_at"] for w in work),
        "element_runtime": describe([w["ended_at"] - w["started_at"] for w in work if w["started_at"]]),
        "tasks": len(work) + 2,
    }


def native_chain(base: Path, elements: int) -> float:
    """The same three levels with Slurm's own afterok dependencies, same interpreter start-up per job."""
    base.mkdir(parents=True, exist_ok=True)
    body = f"{sys.executable} -c 'import reflow.worker'"

    def sbatch(*args: str) -> str:
        out = subprocess.run(["sbatch", "--parsable", "-p", "debug", "-o", "/dev/null", "--mem=100M", *args],
                             capture_output=True, text=True, check=True, timeout=60)
        return out.stdout.strip().split(";")[0]

    t0 = time.time()
    first = sbatch("--wrap", body)
    array = sbatch(f"--dependency=afterok:{first}", f"--array=0-{elements - 1}", "--wrap", body)
    done = base / "done"
    sbatch(f"--dependency=afterok:{array}", "--wrap", f"{body}; date +%s.%N > {done}")
    while not done.exists() or not done.read_text().strip():
        time.sleep(0.2)
    return float(done.read_text()) - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=500)
    parser.add_argument("--accounting", action="store_true", help="run the cluster with slurmdbd accounting")
    args = parser.parse_args()
    start_cluster(args.accounting)
    with tempfile.TemporaryDirectory(prefix="reflow-bench-") as tmp:
        r = reflow_run(Path(tmp) / "reflow", args.elements)
        native = native_chain(Path(tmp) / "native", args.elements)
    mode = "accounting" if args.accounting else "no accounting"
    print(f"reflowd on the local Slurm cluster ({mode}), {args.elements}-element fan-out + gather, 2 cores")
    print(f"  wall time            reflow {r['wall']:.1f} s, sbatch afterok chain {native:.1f} s "
          f"(reflow / native = {r['wall'] / native:.2f})")
    print(f"  scheduler calls      {r['calls']:.0f} ({r['submits']:.0f} sbatch, {r['queries']:.0f} status queries) = "
          f"{r['calls'] / r['tasks']:.3f} per task ({r['tasks']:.0f} tasks)")
    print(f"  daemon CPU           {r['cpu']:.2f} s = {1000 * r['cpu'] / r['tasks']:.2f} ms per task")
    print(f"  end -> downstream    fan-out submitted {r['fanout_reaction']:.2f} s after its upstream ended; "
          f"gather submitted {r['gather_reaction']:.2f} s after the last element ended")
    print(f"  element run time     {r['element_runtime']}")


if __name__ == "__main__":
    main()
