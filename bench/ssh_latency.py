"""Per-command latency and commands per poll cycle over SSH, against the same work run locally.

Starts a private sshd on 127.0.0.1 (tests/cluster/sshd.sh) in front of the
local Slurm test cluster, then measures:

1. one command (``squeue``, ``true``) run locally vs through one SSH exec
   channel each vs through one persistent remote shell (the alternative the
   design asked us to measure before choosing), and SFTP reads one by one vs in
   a batch;
2. a fan-out run through reflowd twice -- the cluster reached locally, then
   the same cluster reached over SSH -- with scheduler calls, transport
   commands and SFTP operations per poll cycle, and the wall time.

    sudo python bench/ssh_latency.py [--elements 100] [--repeat 30]
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import asyncssh

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_util import ROOT, fanout_run  # noqa: E402

from reflowd.transports.local import LocalTransport  # noqa: E402
from reflowd.transports.ssh import SSHSettings, SSHTransport  # noqa: E402
from tests.cluster.fixtures_ssh import SSHServer, free_port  # noqa: E402

SQUEUE = ["squeue", "-h", "-t", "all", "-o", "%i|%T|%r"]


def ms(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return f"median {1000 * statistics.median(ordered):6.1f} ms, p95 {1000 * p95:6.1f} ms"


async def timed(n: int, fn) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


class PersistentShell:
    """The alternative to one exec channel per command: one long-lived ``sh``, commands framed by a sentinel."""

    def __init__(self, conn: asyncssh.SSHClientConnection) -> None:
        self.conn = conn

    async def start(self) -> None:
        self.proc = await self.conn.create_process("sh", encoding="utf-8", stderr=asyncssh.DEVNULL)

    async def run(self, argv: list[str]) -> str:
        import shlex

        marker = f"__reflow_{secrets.token_hex(4)}__"
        self.proc.stdin.write(f"{shlex.join(argv)} </dev/null; echo {marker}$?\n")
        out = await self.proc.stdout.readuntil(marker)
        await self.proc.stdout.readline()
        return out

    def close(self) -> None:
        self.proc.close()


async def micro(server: SSHServer, repeat: int, files_dir: Path) -> None:
    local = LocalTransport()
    settings = SSHSettings(host=server.host, port=server.port, user=server.user, identity_file=str(server.key),
                           known_hosts=str(server.known_hosts))
    t0 = time.perf_counter()
    ssh = SSHTransport(settings)
    await ssh.run(["true"])
    connect = time.perf_counter() - t0
    try:
        local_squeue = await timed(repeat, lambda: local.run(SQUEUE))
        ssh_squeue = await timed(repeat, lambda: ssh.run(SQUEUE))
        ssh_true = await timed(repeat, lambda: ssh.run(["true"]))
        conn = await ssh._connection()
        shell = PersistentShell(conn)
        await shell.start()
        shell_squeue = await timed(repeat, lambda: shell.run(SQUEUE))
        shell.close()
        paths = []
        for i in range(100):
            p = files_dir / f"r{i}.json"
            p.write_text('{"state": "succeeded"}')
            paths.append(str(p))
        sftp_one = await timed(repeat, lambda: ssh.read_files(paths[:1]))
        sftp_batch = await timed(max(3, repeat // 5), lambda: ssh.read_files(paths))
        local_batch = await timed(max(3, repeat // 5), lambda: local.read_files(paths))
    finally:
        await ssh.aclose()
    print(f"per-command latency (n={repeat}; sshd on 127.0.0.1, connect + auth once: {1000 * connect:.0f} ms)")
    print(f"  squeue, local subprocess        {ms(local_squeue)}")
    print(f"  squeue, one SSH exec channel    {ms(ssh_squeue)}   "
          f"(x{statistics.median(ssh_squeue) / statistics.median(local_squeue):.1f} local)")
    print(f"  true,   one SSH exec channel    {ms(ssh_true)}")
    print(f"  squeue, persistent remote sh    {ms(shell_squeue)}   "
          f"(saves {1000 * (statistics.median(ssh_squeue) - statistics.median(shell_squeue)):.1f} ms a command)")
    print(f"  SFTP read, 1 file               {ms(sftp_one)}")
    print(f"  SFTP read, 100 files in a batch {ms(sftp_batch)}   (local thread: {ms(local_batch)})")


def fanout(base: Path, config: str, cluster: str, elements: int) -> dict[str, float]:
    result = fanout_run(base, config, cluster, elements)
    wall, cpu, status = result["wall"], result["cpu"], result["cluster"]
    calls = status["calls"]
    stats = status.get("transport_stats") or {}
    return {
        "wall": wall,
        "cpu": cpu,
        "submits": calls.get("submit", 0),
        "queries": calls.get("query", 0),
        "scheduler_calls": sum(calls.values()),
        "commands": stats.get("commands", sum(calls.values())),
        "command_seconds": stats.get("command_seconds", 0.0),
        "sftp_ops": stats.get("sftp_ops", 0),
        "connects": stats.get("connects", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    subprocess.run([str(ROOT / "tests" / "cluster" / "slurm.sh"), "start"], check=True, timeout=900)
    with tempfile.TemporaryDirectory(prefix="reflow-bench-ssh-") as tmp:
        base = Path(tmp)
        server = SSHServer(dir=base / "sshd", port=free_port())
        server.dir.mkdir()
        server.start()
        try:
            (base / "files").mkdir()
            anyio.run(micro, server, args.repeat, base / "files")
            common = (f'python = "{sys.executable}"\nsubmit_options = {{ partition = "debug" }}\n'
                      "min_poll_interval = 1\npoll_interval = 2\nmax_poll_interval = 10\n")
            local_cfg = f'[clusters.slurm]\nscheduler = "slurm"\n{common}'
            remote_cfg = server.config_table("remote", workdir=str(base / "remote")) + common
            os.makedirs(base / "remote", exist_ok=True)
            here = fanout(base / "local", local_cfg, "slurm", args.elements)
            there = fanout(base / "ssh", remote_cfg, "remote", args.elements)
        finally:
            server.stop()
    print(f"\n{args.elements}-element fan-out + gather through reflowd (poll interval 1-10 s), same Slurm cluster")
    print(f"  {'':24}{'local':>14}{'over SSH':>14}")
    rows = [
        ("wall time (s)", "wall", "{:.1f}"),
        ("daemon CPU (s)", "cpu", "{:.2f}"),
        ("sbatch calls", "submits", "{:.0f}"),
        ("poll cycles (queries)", "queries", "{:.0f}"),
        ("commands run", "commands", "{:.0f}"),
        ("SFTP operations", "sftp_ops", "{:.0f}"),
        ("SSH connections", "connects", "{:.0f}"),
    ]
    for label, key, fmt in rows:
        print(f"  {label:24}{fmt.format(here[key]):>14}{fmt.format(there[key]):>14}")
    for name, r in (("local", here), ("over SSH", there)):
        per_cycle = (r["commands"] - r["submits"]) / max(1, r["queries"])
        mean = (r["command_seconds"] / r["commands"]) if r["command_seconds"] and r["commands"] else float("nan")
        print(f"  {name:9} commands per poll cycle {per_cycle:.2f}; "
              f"SFTP ops per poll cycle {r['sftp_ops'] / max(1, r['queries']):.1f}; "
              f"mean command latency {1000 * mean:.0f} ms")


if __name__ == "__main__":
    main()
