"""A 100-element fan-out on the local Grid Engine test cluster, through reflowd.

Prints the wall time against the same three-level chain submitted natively with
Grid Engine's own ``qsub -hold_jid`` dependencies (same interpreter start-up per
task), scheduler calls per task (qsub, qstat, the qacct look-ups), the daemon's
CPU seconds, and the time from a job's end to its downstream's submission.

    sudo flock /tmp/reflow-cluster.lock python bench/sge_fanout.py [--elements 100]

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


def start_cluster() -> None:
    subprocess.run([str(ROOT / "tests" / "cluster" / "sge.sh"), "start"], check=True, timeout=900)


def reflow_run(base: Path, elements: int) -> dict[str, float | str]:
    config = (f'[clusters.ge]\nscheduler = "sge"\npython = "{sys.executable}"\nparallel_environment = "smp"\n'
              'submit_options = { partition = "all.q" }\n')
    result = fanout_run(base, config, "ge", elements)
    wall, cpu, views = result["wall"], result["cpu"], result["instances"]
    calls = Counter(result["cluster"]["calls"])
    sched = result["cluster"]["scheduler_stats"]
    items, work, total = views["items"][0], views["work"], views["total"][0]
    return {
        "wall": wall,
        "cpu": cpu,
        "calls": sum(calls.values()),
        "submits": calls["submit"],
        "queries": calls["query"],
        "qacct": sched.get("qacct_calls", 0),
        "commands": sched.get("commands", 0),
        "fanout_reaction": min(w["submitted_at"] for w in work) - items["ended_at"],
        "gather_reaction": total["submitted_at"] - max(w["ended_at"] for w in work),
        "element_runtime": describe([w["ended_at"] - w["started_at"] for w in work if w["started_at"]]),
        "tasks": len(work) + 2,
        "version": sched.get("version", "?"),
    }


def native_chain(base: Path, elements: int) -> float:
    """The same three levels with Grid Engine's own -hold_jid dependencies."""
    base.mkdir(parents=True, exist_ok=True)
    script = base / "task.sh"
    script.write_text(f"#!/bin/bash\n{sys.executable} -c 'import reflow.worker'\n")
    done = base / "done"
    last = base / "last.sh"
    last.write_text(f"#!/bin/bash\n{sys.executable} -c 'import reflow.worker'\ndate +%s.%N > {done}\n")

    def qsub(*args: str) -> str:
        out = subprocess.run(["qsub", "-terse", "-S", "/bin/bash", "-o", "/dev/null", "-j", "y", "-l", "h_vmem=100M",
                              *args], capture_output=True, text=True, check=True, timeout=60)
        return out.stdout.strip().split(".")[0]

    t0 = time.time()
    first = qsub("-N", "native_items", str(script))
    array = qsub("-N", "native_work", "-hold_jid", first, "-t", f"1-{elements}", str(script))
    qsub("-N", "native_total", "-hold_jid", array, str(last))
    while not done.exists() or not done.read_text().strip():
        time.sleep(0.2)
    return float(done.read_text()) - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=100)
    args = parser.parse_args()
    start_cluster()
    with tempfile.TemporaryDirectory(prefix="reflow-bench-") as tmp:
        native = native_chain(Path(tmp) / "native", args.elements)
        r = reflow_run(Path(tmp) / "reflow", args.elements)
    print(f"reflowd on the local Grid Engine cluster ({r['version']}), {args.elements}-element fan-out + gather, "
          "2 cores")
    print(f"  wall time            reflow {r['wall']:.1f} s, qsub -hold_jid chain {native:.1f} s "
          f"(reflow / native = {float(r['wall']) / native:.2f})")
    print(f"  scheduler calls      {r['calls']:.0f} ({r['submits']:.0f} qsub, {r['queries']:.0f} status queries, "
          f"{r['qacct']:.0f} qacct look-up(s) among them) = {float(r['calls']) / float(r['tasks']):.3f} per task "
          f"({r['tasks']:.0f} tasks); {r['commands']:.0f} commands in all, probe included")
    print(f"  daemon CPU           {r['cpu']:.2f} s = {1000 * float(r['cpu']) / float(r['tasks']):.2f} ms per task")
    print(f"  end -> downstream    fan-out submitted {r['fanout_reaction']:.2f} s after its upstream ended; "
          f"gather submitted {r['gather_reaction']:.2f} s after the last element ended")
    print(f"  element run time     {r['element_runtime']}")


if __name__ == "__main__":
    main()
