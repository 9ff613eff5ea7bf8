"""Text for terminals: run status, run lists, progress bars (pure functions)."""

from __future__ import annotations

import datetime as _dt
import shutil
from collections.abc import Iterable
from typing import Any

from .client import InstanceStatus, RunInfo, RunStatus, TaskStatus

#: Order in which states appear in summaries and bars.
STATE_ORDER = (
    "succeeded", "cached", "running", "queued", "submitting", "ready", "pending",
    "failed", "timeout", "out_of_memory", "node_fail", "submit_failed", "upstream_failed", "cancelled",
)
_BAR_CHARS = {"succeeded": "#", "cached": "#", "running": ">", "queued": ".", "submitting": ".", "ready": " ",
              "pending": " ", "failed": "X", "timeout": "T", "out_of_memory": "M", "node_fail": "N",
              "submit_failed": "S", "upstream_failed": "-", "cancelled": "c"}


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def counts_text(counts: dict[str, int]) -> str:
    ordered = sorted(counts.items(), key=lambda kv: STATE_ORDER.index(kv[0]) if kv[0] in STATE_ORDER else 99)
    return ", ".join(f"{state}={n}" for state, n in ordered)


def bar(counts: dict[str, int], width: int) -> str:
    total = sum(counts.values())
    if total == 0 or width <= 0:
        return " " * max(width, 0)
    out = ""
    for state in STATE_ORDER:
        n = counts.get(state, 0)
        if n:
            out += _BAR_CHARS.get(state, "?") * max(1, round(n * width / total))
    return out[:width].ljust(width)


def task_line(task: TaskStatus, width: int) -> str:
    name = task.name + ("[]" if task.is_array else "")
    done = sum(n for s, n in task.counts.items() if s in ("succeeded", "cached"))
    total = task.total if task.expanded else 0
    tally = f"{done}/{total}" if task.expanded else "waiting"
    bar_width = max(10, min(40, width - 60))
    return f"  {name[:24]:24s} [{bar(task.counts, bar_width)}] {tally:>11s}  {counts_text(task.counts)}"


def format_status(status: RunStatus, *, width: int | None = None) -> str:
    width = width or shutil.get_terminal_size((100, 24)).columns
    run = status.run
    lines = [
        f"Run       {run.id}",
        f"Workflow  {run.workflow}",
        f"State     {run.state}" + (f"  ({run.error})" if run.error else ""),
        f"Cluster   {run.cluster}",
        f"Run dir   {run.run_dir}",
        f"Created   {when(run.created_at)}" + (f"   ended {when(run.ended_at)} after "
                                                f"{duration((run.ended_at or 0) - run.created_at)}" if run.ended_at else ""),
    ]
    health = (status.cluster or {}).get("health") or {}
    if health and not health.get("reachable", True):
        lines.append(f"Cluster   UNREACHABLE since {when(health.get('down_since'))}: {health.get('last_error')}")
    store = status.raw.get("store") or {}
    if not store.get("writable", True):
        lines.append(f"Store     UNWRITABLE since {when(store.get('since'))}: {store.get('error')}")
    lines.append("")
    for task in status.tasks:
        lines.append(task_line(task, width))
        if task.blocked_reason:
            lines.append(f"      {task.blocked}: {task.blocked_reason}")
    if status.instances is not None:
        lines.append("")
        lines.extend(instance_lines(status.instances))
        total = status.raw.get("instances_total", len(status.instances))
        if total > len(status.instances):
            lines.append(f"    ... {total - len(status.instances)} more")
    if status.failures:
        lines.append("")
        lines.append("Failures:")
        for failure in status.failures:
            lines.extend(failure_lines(failure))
    return "\n".join(lines) + "\n"


def instance_lines(instances: Iterable[InstanceStatus]) -> list[str]:
    lines = []
    for inst in instances:
        idx = f"[{inst.index}]" if inst.index is not None else "   "
        extra = inst.reason or (inst.error.splitlines()[0] if inst.error else "") or (inst.output or "")
        took = duration(inst.ended_at - inst.started_at) if inst.ended_at and inst.started_at else ""
        lines.append(f"    {idx:7s} {inst.state:15s} attempt={inst.attempt} job={inst.job_id or '-':14s} {took:>7s}  "
                     f"{extra[:80]}")
    return lines


def failure_lines(failure: InstanceStatus) -> list[str]:
    lines = [f"  {failure.label}: {failure.state} (attempt {failure.attempt}, job {failure.job_id or '-'})"]
    if failure.error:
        lines.append(f"    {failure.error}")
    if failure.reason and failure.reason not in (failure.error or ""):
        lines.append(f"    reason: {failure.reason}")
    if failure.traceback:
        lines.extend("    | " + line for line in failure.traceback.rstrip().splitlines())
    return lines


def format_runs(runs: list[RunInfo]) -> str:
    if not runs:
        return "no runs\n"
    lines = [f"{'RUN':44s} {'STATE':10s} {'CLUSTER':10s} {'CREATED':19s}  PROGRESS"]
    for run in runs:
        progress = ""
        if run.summary:
            total = sum(sum(c.values()) for c in run.summary.values())
            done = sum(n for c in run.summary.values() for s, n in c.items() if s in ("succeeded", "cached"))
            progress = f"{done}/{total}"
        lines.append(f"{run.id[:44]:44s} {run.state:10s} {run.cluster[:10]:10s} {when(run.created_at)}  {progress}")
    return "\n".join(lines) + "\n"


def apply_event(tasks: dict[str, TaskStatus], event: dict[str, Any]) -> None:
    """Update per-task counts from one watch event (pure bookkeeping for progress bars)."""
    task = tasks.get(event.get("task") or "")
    if task is None:
        return
    if event.get("type") == "expanded":
        task.expanded = True
        task.size = event.get("size")
        task.counts = {"pending": event.get("size") or 0} if event.get("size") else {}
        return
    if event.get("task_level"):
        task.counts = {event["to"]: 1}
        task.blocked = event["to"]
        return
    old, new = event.get("from"), event.get("to")
    if old in task.counts:
        task.counts[old] -= 1
        if task.counts[old] <= 0:
            del task.counts[old]
    if new:
        task.counts[new] = task.counts.get(new, 0) + 1
