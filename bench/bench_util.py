"""Shared helpers for the benchmarks: a private reflowd, its CPU time, statistics."""

from __future__ import annotations

import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

from typing import Any

from reflow_client.client import Client, DaemonNotRunning

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU of a process so far, or of one of its threads (``thread=pid``: the main thread)."""
    stat = Path(f"/proc/{pid}/stat") if thread is None else Path(f"/proc/{pid}/task/{thread}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Daemon:
    def __init__(self, base: Path, config: str) -> None:
        base.mkdir(parents=True, exist_ok=True)
        (base / "config.toml").write_text(config)
        self.socket = base / "reflowd.sock"
        self.env = {**os.environ, "REFLOW_SOCKET": str(self.socket), "REFLOW_STATE_DIR": str(base / "state"),
                    "REFLOW_CONFIG": str(base / "config.toml"), "REFLOW_LOG_LEVEL": "warning"}
        self.log = open(base / "reflowd.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "reflowd"], env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                with Client(self.socket, timeout=5) as c:
                    c.ping()
                break
            except DaemonNotRunning:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"reflowd did not start; see {base / 'reflowd.log'}") from None
                time.sleep(0.1)

    def client(self) -> Client:
        c = Client(self.socket, timeout=120)
        c.connect()
        return c

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def describe(values: list[float]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return f"median {statistics.median(ordered):.3f} s, p95 {p95:.3f} s, max {ordered[-1]:.3f} s (n={len(ordered)})"


def fanout_run(base: Path, config: str, cluster: str, elements: int) -> dict[str, Any]:
    """bench/fanout_workflow.py through a private reflowd: timings, CPU, instances and the cluster's counters."""
    from reflow.loader import load_workflow

    daemon = Daemon(base / "daemon", config)
    try:
        wf = load_workflow(ROOT / "bench" / "fanout_workflow.py")
        params = wf.resolve_parameters({"n": elements, "salt": secrets.token_hex(4)})
        with daemon.client() as client:
            cpu0 = cpu_seconds(daemon.proc.pid)
            t0 = time.time()
            run = client.submit(wf.describe(), params, str(base / "run"), cluster=cluster)
            final = client.wait(run.run_id, timeout=3600)
            wall = time.time() - t0
            cpu = cpu_seconds(daemon.proc.pid) - cpu0
            if not final.ok:
                raise SystemExit(f"the benchmark run ended {final.state}: {final.failures[:1]}")
            views = {t: client.call("status", run_id=run.run_id, task=t, limit=100000)["instances"]
                     for t in ("items", "work", "total")}
            cluster_status = client.stats()["clusters"][cluster]
    finally:
        daemon.stop()
    return {"wall": wall, "cpu": cpu, "instances": views, "cluster": cluster_status}
