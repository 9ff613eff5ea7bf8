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

With ``--chain`` it is an element-wise chain instead (items -> work[] -> double[] -> total, both arrays
unpacked), with Slurm-side dependencies (``aftercorr``: double's elements start as work's end) and without.

With ``--seconds S`` it is the timed-elements benchmark instead: N elements that each sleep S seconds,
packed toward ``--target`` (default one minute of work per job, after a 10-element run that leaves
history) and with packing off, printing the number of jobs, the makespan against the ideal (total work
divided by the job slots: CPUs times the partition's ``OverSubscribe=FORCE:N``, 4 on the test cluster)
and the daemon's CPU time per element. The issue's 10,000 x 1 s takes 1,250 s ideal on the test node's
8 slots (5,000 s on its 2 cores); a scaled run is ``--elements 300 --seconds 1``.

Cluster settings are the tests' fast polling ones (``--user-polling`` for a user's defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_util import ROOT  # noqa: E402
from packing_util import fanout_runs  # noqa: E402
from slurm_fanout import native_chain  # noqa: E402  (the same afterok chain as the fan-out benchmark)

FAST = "min_poll_interval = 0.3\npoll_interval = 1\nmax_poll_interval = 2\n"


def start_cluster() -> None:
    subprocess.run([str(ROOT / "tests" / "cluster" / "slurm.sh"), "start"], check=True, timeout=900)


#: ``--calls-per-minute``: the clusters' command budget (None: the configuration's default, 12).
CALLS: list[float] = []


def config(pack: str, fast: bool, dependencies: bool = True) -> str:
    return (f'[clusters.slurm]\nscheduler = "slurm"\npython = "{sys.executable}"\npack = "{pack}"\n'
            f'slurm_dependencies = {"true" if dependencies else "false"}\n'
            + (f"max_calls_per_minute = {CALLS[0]}\n" if CALLS else "")
            + (FAST if fast else "") + 'submit_options = { partition = "debug" }\n')


def handovers(run_dir: Path) -> dict[str, tuple[float, float]]:
    """For items -> work and work -> total: seconds from the upstream's last element ending (its worker's
    clock) to the downstream's job files being written (the daemon noticing, resolving, planning: what
    Slurm-side dependencies would save), and from then to its first element starting (sbatch, Slurm's
    scheduling, the interpreter and the workflow import: paid either way)."""
    spans: dict[str, tuple[float, float]] = {}
    written: dict[str, float] = {}
    for job in run_dir.glob(".reflow/*/jobs/*/job.json"):
        task = json.loads(job.read_text())["task"]
        written[task] = min(written.get(task, float("inf")), job.stat().st_mtime)
        for path in job.parent.glob("results/*.json"):
            r = json.loads(path.read_text())
            first, last = spans.get(task, (float("inf"), 0.0))
            spans[task] = (min(first, r["started_at"]), max(last, r["ended_at"]))
    out = {}
    for up, down in (("items", "work"), ("work", "total")):
        out[f"{up} -> {down}"] = (written[down] - spans[up][1], spans[down][0] - written[down])
    return out


def noticed(run_dir: Path) -> dict[str, float]:
    """For each hand-over: seconds from the upstream's last element ending (its worker's clock) to the daemon
    recording that element's success (its transition, from the daemon's store): the noticing part of the
    daemon's share, the rest being reading results, resolving and writing the downstream's job files."""
    import sqlite3

    run_id = next(run_dir.glob(".reflow/*/jobs")).parent.name
    ended: dict[str, float] = {}
    for job in run_dir.glob(".reflow/*/jobs/*/job.json"):
        task = json.loads(job.read_text())["task"]
        for path in job.parent.glob("results/*.json"):
            ended[task] = max(ended.get(task, 0.0), json.loads(path.read_text())["ended_at"])
    db = sqlite3.connect(f"file:{run_dir.parent / 'daemon' / 'state' / 'reflowd.sqlite'}?mode=ro", uri=True)
    try:
        seen = dict(db.execute("SELECT task, max(at) FROM transitions WHERE run_id=? AND to_state='succeeded' "
                               "AND task IS NOT NULL GROUP BY task", (run_id,)).fetchall())
    finally:
        db.close()
    return {f"{up} -> {down}": seen[up] - ended[up] for up, down in (("items", "work"), ("work", "total"))}


def slurm_handovers(base: Path, jobs: int = 3) -> list[float]:
    """The same hand-over done by Slurm itself: a chain of single jobs with ``afterok``, each starting an
    interpreter that imports the benchmark's workflow (as a worker does before its first element); seconds
    from one job's end to the next one being ready to run its first element."""
    base.mkdir(parents=True, exist_ok=True)
    workflow = ROOT / "bench" / "fanout_workflow.py"
    previous = None
    for k in range(jobs):
        start = (f"from reflow.loader import load_workflow; load_workflow({str(workflow)!r}); import time; "
                 f"open({str(base / f's{k}')!r}, 'w').write(repr(time.time()))")
        body = f"{sys.executable} -c {shlex.quote(start)}; date +%s.%N > {base}/e{k}"
        dep = [f"--dependency=afterok:{previous}", "--kill-on-invalid-dep=yes"] if previous else []
        out = subprocess.run(["sbatch", "--parsable", "-p", "debug", "-o", "/dev/null", "--mem=100M", *dep,
                              "--wrap", body], capture_output=True, text=True, check=True, timeout=60)
        previous = out.stdout.strip().split(";")[0]
    last = base / f"e{jobs - 1}"
    deadline = time.time() + 600
    while not (last.exists() and last.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    return [float((base / f"s{k + 1}").read_text()) - float((base / f"e{k}").read_text()) for k in range(jobs - 1)]


def slots(partition: str = "debug") -> tuple[int, int]:
    """CPUs of the partition and how many one-CPU jobs it runs at once: a partition with
    ``OverSubscribe=FORCE:N`` (the test cluster's, for sleep-only work) runs N jobs per CPU."""
    out = subprocess.run(["sinfo", "-h", "-p", partition, "-o", "%C"], capture_output=True, text=True, timeout=60)
    try:
        cpus = int(out.stdout.split()[0].split("/")[-1])  # allocated/idle/other/total
    except (IndexError, ValueError):
        cpus = 2
    part = subprocess.run(["scontrol", "show", "partition", partition], capture_output=True, text=True, timeout=60)
    found = re.search(r"OverSubscribe=(?:FORCE|YES):(\d+)", part.stdout)
    return cpus, cpus * (int(found.group(1)) if found else 1)


def timed_elements(n: int, seconds: float, target: str, fast: bool, history: int, off_n: int | None = None) -> None:
    """N elements of S seconds each (sleep), packed toward *target* of work per job, and with packing off
    (*off_n* elements, N unless given; 0 skips it: the off run takes twice as long or more):
    jobs, makespan against the ideal (total work / job slots) and the daemon's CPU time per element."""
    ncpus, nslots = slots()
    ideal = n * seconds / nslots
    off_n = n if off_n is None else off_n
    print(f"local Slurm ({ncpus} CPUs running {nslots} one-CPU jobs at once), {n} elements of {seconds:g} s, "
          f"pack = {target!r}, {'fast' if fast else 'default'} polling; ideal makespan = total work / job slots = "
          f"{n} x {seconds:g} s / {nslots} = {ideal:.1f} s ({n * seconds / ncpus:.1f} s on {ncpus} cores)")
    extra = {"seconds": seconds}
    with tempfile.TemporaryDirectory(prefix="reflow-bench-pack-") as tmp:
        base = Path(tmp)
        auto = fanout_runs(base / "auto", config(target, fast), "slurm", n, 2, history=min(n, history), extra=extra)
        off = fanout_runs(base / "off", config("off", fast), "slurm", off_n, 1, extra=extra) if off_n else []
    first, packed = auto[0], auto[1]
    print(f"  history run (no history yet)  {first['wall']:7.1f} s   {first['elements']} elements, "
          f"{first['array_tasks']} fan-out jobs")
    rows = [("packed", packed, n)] + [("packing off", r, off_n) for r in off]
    for name, r, count in rows:
        best = count * seconds / nslots
        print(f"  {name:<14} {count:>6} x {seconds:g} s {r['wall']:7.1f} s   {r['array_tasks']} fan-out jobs (+2), "
              f"makespan / ideal ({best:.1f} s) = {r['wall'] / best:.2f}, "
              f"daemon CPU {1000 * r['cpu'] / count:.2f} ms per element")
    print(f"  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if off and off_n == n:
        print(f"  packed / off = {packed['wall'] / off[0]['wall']:.2f}, jobs {packed['array_tasks'] + 2} "
              f"against {off[0]['array_tasks'] + 2}")


def chain_spans(run_dir: Path) -> tuple[float, int]:
    """An element-wise chain's run: seconds from work's last element ending to double's last ending (worker
    clocks), and how many double elements started before work's last element ended (early, on aftercorr)."""
    started: dict[str, list[float]] = {"work": [], "double": []}
    ended: dict[str, list[float]] = {"work": [], "double": []}
    for job in run_dir.glob(".reflow/*/jobs/*/job.json"):
        task = json.loads(job.read_text())["task"]
        if task not in started:
            continue
        for path in job.parent.glob("results/*.json"):
            r = json.loads(path.read_text())
            if r.get("state") == "succeeded":
                started[task].append(r["started_at"])
                ended[task].append(r["ended_at"])
    last_work = max(ended["work"])
    return max(ended["double"]) - last_work, sum(1 for t in started["double"] if t < last_work)


def chain_benchmark(n: int, repeat: int, fast: bool) -> None:
    """items -> work[] -> double[] (element-wise) -> total, unpacked (``pack = "off"``: so that double can
    mirror work's array job on ``aftercorr``), with Slurm-side dependencies and without."""
    print(f"local Slurm (2 cores), element-wise chain of tiny tasks, {n} elements, unpacked, "
          f"{'fast' if fast else 'default'} polling, medians of {repeat}")
    with tempfile.TemporaryDirectory(prefix="reflow-bench-chain-") as tmp:
        base = Path(tmp)
        rows = {}
        for name, deps in (("with", True), ("without", False)):
            runs = fanout_runs(base / name, config("off", fast, dependencies=deps), "slurm", n, repeat,
                               workflow="chain_workflow.py")
            spans = [chain_spans(base / name / f"run{k}") for k in range(repeat)]
            rows[name] = (statistics.median(r["wall"] for r in runs), statistics.median(s[0] for s in spans),
                          statistics.median(s[1] for s in spans), runs[-1]["submits"])
    for name, (wall, tail, early, submits) in rows.items():
        print(f"  {name:<7} Slurm-side dependencies {wall:6.1f} s   work's end -> double's end {tail:5.2f} s, "
              f"double elements started before work ended: {early:g} of {n} ({submits} submissions)")
    print(f"  with / without = {rows['with'][0] / rows['without'][0]:.2f}   "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, nargs="+", default=[100])
    parser.add_argument("--repeat", type=int, default=1, help="measured runs of each kind (medians are printed)")
    parser.add_argument("--history", type=int, default=100, help="elements of the run that leaves history")
    parser.add_argument("--user-polling", action="store_true", help="a user's default poll settings")
    parser.add_argument("--seconds", type=float, default=0.0,
                        help="each element sleeps this long: the timed-elements benchmark (packed toward --target "
                             "and off; jobs, makespan against the ideal, daemon CPU per element)")
    parser.add_argument("--target", default="1m", help="with --seconds: the pack target (default 1m)")
    parser.add_argument("--off-elements", type=int, default=None,
                        help="with --seconds: elements of the packing-off run (default: as many; 0 skips it)")
    parser.add_argument("--chain", action="store_true",
                        help="the element-wise chain benchmark (items -> work[] -> double[] -> total), with "
                             "Slurm-side dependencies (aftercorr) and without")
    parser.add_argument("--calls-per-minute", type=float, default=None,
                        help="the clusters' command budget (max_calls_per_minute; default the configuration's, 12)")
    args = parser.parse_args()
    if args.calls_per_minute:
        CALLS.append(args.calls_per_minute)
    start_cluster()
    fast = not args.user_polling
    if args.chain:
        for n in args.elements:
            chain_benchmark(n, args.repeat, fast)
        return
    if args.seconds:
        for n in args.elements:
            timed_elements(n, args.seconds, args.target, fast, min(args.history, 10), args.off_elements)
        return
    print(f"local Slurm (2 cores), fan-out + gather of tiny tasks, {'fast' if fast else 'default'} polling, "
          f"medians of {args.repeat}")
    for n in args.elements:
        with tempfile.TemporaryDirectory(prefix="reflow-bench-pack-") as tmp:
            base = Path(tmp)
            native = statistics.median(native_chain(base / f"native{k}", n) for k in range(args.repeat))
            off = fanout_runs(base / "off", config("off", fast), "slurm", n, args.repeat)
            auto = fanout_runs(base / "auto", config("auto", fast), "slurm", n, args.repeat + 1,
                               history=min(n, args.history))
            nodeps = fanout_runs(base / "nodeps", config("auto", fast, dependencies=False), "slurm", n,
                                 args.repeat + 1, history=min(n, args.history))
            gaps = [handovers(base / "auto" / f"run{k}") for k in range(1, args.repeat + 1)]
            notices = [noticed(base / "auto" / f"run{k}") for k in range(1, args.repeat + 1)]
            nodeps_gaps = [handovers(base / "nodeps" / f"run{k}") for k in range(1, args.repeat + 1)]
            native_gaps = slurm_handovers(base / "handover")
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
        for name in gaps[0]:
            notice = statistics.median(g[name][0] for g in gaps)
            launch = statistics.median(g[name][1] for g in gaps)
            seen = statistics.median(g[name] for g in notices)
            print(f"  hand-over {name:<14}   {notice + launch:5.2f} s: {notice:.2f} s until its job files were "
                  f"written ({seen:.2f} s until the daemon recorded the upstream's end), {launch:.2f} s from then "
                  f"to its first element starting")
        nodeps_wall = statistics.median(r["wall"] for r in nodeps[1:])
        print(f"  reflow, packed, dependencies off {nodeps_wall:5.1f} s   ({nodeps[-1]['submits']} submissions)  "
              f"packed with Slurm-side dependencies / without = {packed_wall / nodeps_wall:.2f}")
        for name in gaps[0]:
            on = statistics.median(sum(g[name]) for g in gaps)
            off_gap = statistics.median(sum(g[name]) for g in nodeps_gaps)
            print(f"  hand-over {name:<14}   upstream's end to downstream's first element: {on:5.2f} s with "
                  f"Slurm-side dependencies, {off_gap:5.2f} s without")
        floor = statistics.median(native_gaps)
        total = sum(statistics.median(sum(g[name]) for g in gaps) for name in gaps[0])
        saved = max(0.0, total - len(gaps[0]) * floor)
        print(f"  hand-over by Slurm (afterok)   {floor:5.2f} s ({', '.join(f'{g:.2f}' for g in native_gaps)}) from "
              f"one job's end to the next one's first element; the packed run's hand-overs take {saved:.2f} s more "
              f"than that ({saved / packed_wall:.0%} of its {packed_wall:.1f} s)")

if __name__ == "__main__":
    main()
