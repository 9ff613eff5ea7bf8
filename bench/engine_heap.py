"""What the engine's ``gc.freeze`` policy leaves frozen while a daemon holds a large run and others progress.

Usage::

    python bench/engine_heap.py                    # 20,000 held, then 12 runs of 2,000 elements
    python bench/engine_heap.py --held 100000 --runs 30 --size 2000

A private bench reflowd (``bench/engine_scale.py``'s instant scheduler) first queues ``--held``
instances that never start (so its frozen heap stays large: no collection of it is cheap), then
runs ``--runs`` fan-outs of ``--size`` elements one after another (each ~4 transitions an element:
the engine freezes every 8,192). After each fan-out the daemon is asked (``REFLOW_BENCH_HEAP``) how
many objects are frozen and how many of them are garbage -- reference cycles that died frozen,
which no collection of Python's own would ever find -- and collects those (so each figure is what
one fan-out left). Printed: garbage per fan-out, per 1,000 transitions, and the RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engine_scale import BenchDaemon, manifest, wait_state  # noqa: E402
from reflow_client.client import Client  # noqa: E402


def ask(d: BenchDaemon) -> dict[str, float]:
    out = d.base / "state" / "heap.json"
    out.unlink(missing_ok=True)
    (d.base / "state" / "heap.ask").touch()
    deadline = time.monotonic() + 120
    while not out.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the daemon did not answer about its heap")
        time.sleep(0.1)
    time.sleep(0.1)
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--held", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--size", type=int, default=2_000)
    args = parser.parse_args()
    os.environ["REFLOW_BENCH_HEAP"] = "1"
    with tempfile.TemporaryDirectory(prefix="reflow-bench-heap-") as tmp:
        d = BenchDaemon(Path(tmp) / "d")
        try:
            with Client(d.socket, timeout=600) as client:
                held = client.submit(manifest(True), {"n": args.held}, str(d.base / "work"), cluster="bench").run_id
                wait_state(client, held, lambda s: s["summary"].get("hold", {}).get("queued") == args.held, 3600)
                first = ask(d)
                print(f"held {args.held:,}: {first['frozen']:,} objects frozen, {first['garbage']:,} garbage "
                      f"(collecting all took {first['collect_s'] * 1000:.0f} ms), RSS {first['rss'] / 1e6:.0f} MB")
                found = []
                for k in range(args.runs):
                    run_id = client.submit(manifest(False), {"n": args.size}, str(d.base / f"work{k}"),
                                           cluster="bench").run_id
                    wait_state(client, run_id, lambda s: s["run"]["state"] != "running", 3600)
                    h = ask(d)
                    found.append(h["garbage"])
                    print(f"  fan-out {k + 1:>3}: {h['frozen']:>9,} frozen, {h['garbage']:>6,} of them garbage, "
                          f"RSS {h['rss'] / 1e6:.0f} MB, heap {client.stats().get('heap', {})}", flush=True)
                transitions = 4 * args.size + 3
                mean = sum(found) / len(found)
                print(f"garbage frozen per fan-out of {args.size:,}: {mean:,.0f} objects "
                      f"({mean / transitions * 1000:,.1f} per 1,000 transitions); "
                      f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        finally:
            d.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
