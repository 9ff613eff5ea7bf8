"""The store's writer alone: persisted transitions per second (issue #13's goal: 50,000/s).

Usage::

    python bench/store_writer.py                          # this tree, 10^5 instances
    python bench/store_writer.py --against /tmp/wt-before # and another checkout, side by side
    python bench/store_writer.py -n 100000 --repeat 3 --profile

*n* instances of one array task are taken through four states by the engine's ledger
(``Ledger.instance``, as the engine calls it: the changed fields and a transition row per change,
the producer pacing on the writer) until all is committed. Each batch holds each instance once (no
two changes of one instance collapse). Evidence and fields are what the engine passes: one evidence
dict shared by a job's 1,000 elements when it submits and adopts them, a fresh but equal one per
element when they become ready and when their results are read; one tag, submission time and job id
per job, per-element identities, job keys and outputs. Printed per tree:
transitions/s of wall-clock time, and per CPU-second of the process (event loop and writer thread
together: what the machine's load changes least), and transition-log rows per transition (a row
stands for a group of elements since schema 6). Each tree is measured in its own subprocess with
that tree first on ``sys.path``, alternating, so "before" and "after" see the same minutes of load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GOAL = 50_000


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each of this process's threads (Linux ``/proc``; empty elsewhere)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            out[tid] = (int(fields[11]) + int(fields[12])) / tick
    except OSError:
        return {}
    return out


def measure(n: int, directory: Path, profile: bool = False, inline: bool = False, freeze: bool = True
            ) -> dict[str, float]:
    """One measurement in this process (with whatever ``reflowd`` is first on ``sys.path``); *inline*: SQLite
    on the event loop's thread (the simulation's connection), so a profile sees all of the work. *freeze*:
    ``gc.freeze()`` as the engine does (``engine.FREEZE_EVERY``: every so many new instances and every so
    many transitions), so Python's full collections do not walk the *n* instances (without it, they cost
    the loop and the encoding thread 2-3 us a transition at 3x10^5, growing with *n*)."""
    import gc
    from collections import Counter

    import anyio

    from reflow_client.manifest import Manifest
    from reflowd.engine.events import EventHub
    from reflowd.engine.ledger import Ledger
    from reflowd.engine.model import Instance, Run, TaskRun
    from reflowd.engine.states import State
    from reflowd.logging import configure
    from reflowd.store import ArrayKeys, Store

    try:
        from reflowd.engine.engine import FREEZE_EVERY
    except ImportError:  # (older trees)
        FREEZE_EVERY = 8192
    configure("info", stream=sys.stderr)  # (as the daemon runs: a transition's debug line is not written)
    def task(name: str, is_array: bool, deps: list[str], inputs: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "is_array": is_array, "config": {"version": "1", "cache": False}, "dependencies": deps,
                "inputs": inputs, "params": {}}

    manifest = {"version": 1, "workflow": "bench", "working_dir": "/tmp", "python": sys.executable,
                "entrypoint": str(ROOT / "bench" / "store_writer.py"), "cli_params": [],
                "tasks": [task("make", False, [], {}),
                          task("square", True, ["make"], {"x": [{"step": "make", "mode": "fanout"}]})]}

    async def go() -> dict[str, float]:
        if inline:
            sys.path.insert(0, str(ROOT))
            from tests.sim.sqlite_inline import Connector, inline as run_inline
            store = Store(directory / "writer.sqlite", connect=Connector(), offload=run_inline)
        else:
            store = Store(directory / "writer.sqlite")
        await store.open()
        m = Manifest.from_dict(manifest)
        run = Run(manifest=m, id="writer-run", cluster="bench", run_dir=str(directory))
        tr = TaskRun(manifest=m.tasks[1], run_id=run.id)
        run.tasks[tr.name] = tr
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.run_writer)
            store.put_run(run)
            store.put_task(run.id, tr)
            insts = [Instance(run_id=run.id, task=tr.name, index=i) for i in range(n)]
            for inst in insts:
                tr.add(inst)
                store.put_instance(inst)
                if len(tr.instances) % 1000 == 0:
                    await store.pace()
                if freeze and len(tr.instances) % FREEZE_EVERY == 0:
                    gc.freeze()  # (as the engine expanding a task)
            if freeze:
                gc.freeze()
            ledger = Ledger(store, EventHub(), Counter())
            await store.flush()
            before = store.transitions_written
            rows_before = getattr(store, "transition_rows_written", before)  # (older trees: a row each)
            prof = None
            if profile:
                import cProfile
                prof = cProfile.Profile()
                prof.enable()
            threads0 = thread_cpu()
            started, cpu0, loop0 = time.perf_counter(), time.process_time(), time.thread_time()
            steps = [State.READY, State.SUBMITTING, State.QUEUED, State.SUCCEEDED]
            job = 1000  # elements per array job
            changed = 0
            for new in steps:  # (the evidence and fields each change carries, as the engine's callers pass them)
                for k, inst in enumerate(insts):
                    changed += 1
                    if freeze and changed % FREEZE_EVERY == 0:
                        gc.freeze()  # (as ``Engine.transition``: what the last transitions left behind)
                    if k % job == 0:
                        await anyio.sleep(0)
                        await store.pace()
                        tag, job_id, now = f"t{k // job}", str(k // job), time.time()
                        # One evidence dict for a job's elements (``submit.send``, ``submit.adopt``) ...
                        submitted = {"source": "submitter", "tag": tag, "elements": job}
                        adopted = {"source": "scheduler", "job_id": job_id}
                        keys = ArrayKeys(job_id, k)  # (the job's one key maker, as ``packing.ElementKeys``)
                    if new is State.READY:  # ... a fresh but equal one per element elsewhere (``Engine``, ``decide``)
                        ledger.instance(run, inst, new, {"source": "dependencies"},
                                        {"identity": bytes.fromhex(f"{k:064x}")})
                    elif new is State.SUBMITTING:
                        ledger.instance(run, inst, new, submitted, {"tag": tag, "submitted_at": now, "not_before": None})
                    elif new is State.QUEUED:
                        ledger.instance(run, inst, new, adopted, {"job_id": job_id, "job_key": keys})
                    else:
                        ledger.instance(run, inst, new, {"source": "result_file", "state": "succeeded"},
                                        {"ended_at": now + 1.0, "host": "node1", "started_at": now + 0.5,
                                         "output": k * k, "output_hash": "h" * 64, "error": None, "traceback": None})
            await store.flush()
            elapsed, cpu, loop = time.perf_counter() - started, time.process_time() - cpu0, time.thread_time() - loop0
            threads = {t: c - threads0.get(t, 0.0) for t, c in thread_cpu().items()}
            if prof is not None:
                import pstats
                prof.disable()
                pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
            written = store.transitions_written - before
            rows = getattr(store, "transition_rows_written", store.transitions_written) - rows_before
            tg.cancel_scope.cancel()
        await store.close()
        return {"transitions": written, "wall_s": elapsed, "cpu_s": cpu, "per_s": written / elapsed,
                "per_cpu_s": written / cpu, "loop_us": loop / written * 1e6,
                "writer_us": (cpu - loop) / written * 1e6,
                "threads_us": sorted((round(c / written * 1e6, 1) for c in threads.values() if c), reverse=True),
                "db_bytes": (directory / "writer.sqlite").stat().st_size, "rows_per_transition": rows / written}

    return anyio.run(go)


def in_subprocess(root: Path, n: int, profile: bool, inline: bool = False, freeze: bool = True) -> dict[str, float]:
    """Measure *root*'s store in a fresh interpreter with *root* first on its path."""
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = (f"import sys; sys.path.insert(0, {str(root)!r}); sys.path.insert(0, {str(ROOT / 'bench')!r});"
            f"import json, pathlib, tempfile, store_writer as w\n"
            f"with tempfile.TemporaryDirectory(prefix='reflow-writer-') as d:\n"
            f"    print(json.dumps(w.measure({n}, pathlib.Path(d), {profile}, {inline}, {freeze})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, text=True, stdout=subprocess.PIPE)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=100_000, help="instances (each makes four transitions)")
    parser.add_argument("--against", type=Path, help="another checkout (e.g. main) measured alternately, as 'before'")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="cProfile the transitions (to stderr; slows them)")
    parser.add_argument("--inline", action="store_true", help="SQLite on the loop's thread (to profile all the work)")
    parser.add_argument("--no-freeze", dest="freeze", action="store_false",
                        help="no gc.freeze() as the engine does (full collections then walk every instance)")
    args = parser.parse_args()
    trees = [("before", args.against)] if args.against else []
    trees.append(("this tree", ROOT))
    results: dict[str, list[dict[str, float]]] = {label: [] for label, _ in trees}
    if not args.against:
        with tempfile.TemporaryDirectory(prefix="reflow-writer-") as d:
            results["this tree"].extend(measure(args.n, Path(d), args.profile, args.inline, args.freeze) for _ in range(args.repeat))
    else:
        for _ in range(args.repeat):
            for label, root in trees:
                results[label].append(in_subprocess(root.resolve(), args.n, args.profile, args.inline, args.freeze))
    print(f"store writer alone, n={args.n:,} instances x 4 transitions (best of {args.repeat}); goal >= {GOAL:,}/s")
    best: dict[str, dict[str, Any]] = {}
    for label, runs in results.items():
        b = best[label] = max(runs, key=lambda r: r["per_cpu_s"])
        print(f"  {label:10} {b['per_s']:>10,.0f} transitions/s wall  {b['per_cpu_s']:>10,.0f} per CPU-second"
              f"  ({b['wall_s']:.1f} s wall, {b['cpu_s']:.1f} s CPU;"
              f" per transition {b['loop_us']:.1f} us on the loop + {b['writer_us']:.1f} us in the writer's thread;"
              f" database {b['db_bytes'] / 1e6:.0f} MB)")
        rates = sorted(r["per_cpu_s"] for r in runs)
        if len(rates) > 2:  # (the best of a few runs on a loaded machine can be one lucky minute)
            print(f"  {'':10} per CPU-second by run: {', '.join(f'{r:,.0f}' for r in rates)}"
                  f" (median {rates[len(rates) // 2]:,.0f})")
        print(f"  {'':10} per transition by thread (us): {b['threads_us']};"
              f" transition rows per transition {b.get('rows_per_transition', 1.0):.3f}")
    if args.against:
        ratio = best["this tree"]["per_cpu_s"] / best["before"]["per_cpu_s"]
        medians = {label: sorted(r["per_cpu_s"] for r in runs)[len(runs) // 2] for label, runs in results.items()}
        print(f"  per CPU-second: {ratio:.2f}x the 'before' tree (best of each);"
              f" {medians['this tree'] / medians['before']:.2f}x (medians)")
    print(f"  (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
