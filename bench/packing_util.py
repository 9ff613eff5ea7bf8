"""Shared by the packing benchmarks: several runs of the fan-out workflow through one private reflowd.

One daemon serves the runs of one configuration, so that the second run finds the
first one's measured durations (automatic packing needs history) -- as a user's
daemon does.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

from bench_util import ROOT, Daemon, cpu_seconds


def fanout_runs(base: Path, config: str, cluster: str, elements: int, runs: int,
                history: int | None = None, extra: dict[str, Any] | None = None,
                workflow: str = "fanout_workflow.py") -> list[dict[str, Any]]:
    """*runs* runs of bench/fanout_workflow.py one after another (fresh salt each: no cache hits);
    with *history*, the first of them has only that many elements (it is there to leave durations)."""
    from reflow.loader import load_workflow

    daemon = Daemon(base / "daemon", config)
    out = []
    try:
        wf = load_workflow(ROOT / "bench" / workflow)
        with daemon.client() as client:
            for k in range(runs):
                n = history if history and k == 0 else elements
                params = wf.resolve_parameters({"n": n, "salt": secrets.token_hex(4), **(extra or {})})
                before = client.stats()["clusters"][cluster]["calls"].get("submit", 0)
                cpu0 = cpu_seconds(daemon.proc.pid)
                t0 = time.time()
                run = client.submit(wf.describe(), params, str(base / f"run{k}"), cluster=cluster)
                final = client.wait(run.run_id, timeout=7200)
                wall = time.time() - t0
                cpu = cpu_seconds(daemon.proc.pid) - cpu0
                if not final.ok:
                    raise SystemExit(f"the benchmark run ended {final.state}: {final.failures[:1]}")
                work = client.call("status", run_id=run.run_id, task="work", limit=1_000_000)["instances"]
                jobs = {str(w["job_id"]).split("_")[0] for w in work if w.get("job_id")}
                submits = client.stats()["clusters"][cluster]["calls"].get("submit", 0) - before
                out.append({"wall": wall, "cpu": cpu, "submits": submits, "work_jobs": len(jobs),
                            "array_tasks": len({w["job_id"] for w in work if w.get("job_id")}),
                            "elements": len(work)})
    finally:
        daemon.stop()
    return out
