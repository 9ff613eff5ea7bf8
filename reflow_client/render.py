"""Text for terminals: run status, failure reports, results, run lists, daemon stats (pure functions)."""

from __future__ import annotations

import datetime as _dt
import shutil
from collections.abc import Iterable
from typing import Any

from . import values
from .client import InstanceStatus, RunInfo, RunStatus, TaskStatus
from .display import FAILED, STATE_ORDER, Row, clock, fit_line, ordered_counts

#: Failures shown in full at the end of a run (the rest are counted).
FAILURES_SHOWN = 5
#: Failure states that ``status`` lists (the daemon sends at most 20 of them).
LISTED_FAILURES = FAILED | {"cancelled"}


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float | None) -> str:
    return clock(seconds)


def counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{state}={n}" for state, n in ordered_counts(counts))


def _width(width: int | None) -> int:
    return max(40, (width or shutil.get_terminal_size((100, 24)).columns) - 1)


def task_line(task: TaskStatus, width: int, name_width: int = 0) -> str:
    """One task as a static line (bar, done/total, counts), fitted to *width*."""
    row = Row(label=task.name + ("[]" if task.is_array else ""), counts=tuple(ordered_counts(task.counts)),
              done=sum(n for s, n in task.counts.items() if s in ("succeeded", "cached")),
              total=task.total if task.expanded else 0, waiting=not task.expanded and not task.blocked,
              elapsed=None, eta=None, complete=False)
    return "  " + "".join(s.text for s in fit_line(row, width - 2, unicode=False,
                                                   name_width=name_width or len(row.label), show_timing=False))


def listed_failures(status: RunStatus, task: str | None = None) -> int:
    """How many failed instances the run has (the daemon's list stops at 20)."""
    return sum(n for t in status.tasks if t.expanded and (task is None or t.name == task)
               for s, n in t.counts.items() if s in LISTED_FAILURES)


def format_status(status: RunStatus, *, width: int | None = None, outputs: dict[Any, str] | None = None,
                  task: str | None = None) -> str:
    """``status`` as text; *outputs* maps an instance index to its decoded output text (``--task``)."""
    w = _width(width)
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
    lines.extend(scheduler_health_lines(status.cluster))
    lines.extend(internal_error_lines(status.cluster, run.created_at, run.ended_at))
    store = status.raw.get("store") or {}
    if not store.get("writable", True):
        lines.append(f"Store     UNWRITABLE since {when(store.get('since'))}: {store.get('error')}")
    lines.append("")
    name_width = max((len(t.name) + (2 if t.is_array else 0) for t in status.tasks), default=8)
    for t in status.tasks:
        lines.append(task_line(t, w, name_width))
        if t.blocked_reason:
            lines.append(f"      {t.blocked}: {t.blocked_reason}"[:w])
    if status.instances is not None:
        lines.append("")
        lines.extend(instance_lines(status.instances, outputs or {}, w))
        total = status.raw.get("instances_total", len(status.instances))
        if total > len(status.instances):
            lines.append(f"    ... {total - len(status.instances)} more")
    if status.failures:
        lines.append("")
        lines.append("Failures:")
        for failure in status.failures:
            lines.extend(failure_lines(failure))
        more = listed_failures(status, task) - len(status.failures)
        if more > 0:
            hint = f"reflow-client status {run.id} --task TASK" if task is None else "reflow-client logs"
            lines.append(f"  ... and {more} more failure(s) not listed (see {hint})")
    return "\n".join(lines) + "\n"


def scheduler_health_lines(cluster: dict[str, Any] | None) -> list[str]:
    """A degraded scheduler (not answering): since when, the last error, and that nothing is failed meanwhile."""
    health = (cluster or {}).get("scheduler_health") or {}
    lines = []
    if health.get("state") == "degraded":
        lines.append(f"Cluster   DEGRADED since {when(health.get('since'))}: the scheduler is not answering "
                     f"({health.get('failed_command')}: {health.get('last_error')}); jobs are not failed meanwhile, "
                     f"submissions wait, next try in {health.get('next_probe_in')}s")
    accounting = (cluster or {}).get("accounting_health") or {}
    if accounting.get("state") == "degraded":
        lines.append(f"Cluster   ACCOUNTING DEGRADED since {when(accounting.get('since'))}: "
                     f"{accounting.get('last_error')}; using {accounting.get('fallback') or 'the controller'} "
                     "instead (jobs that ended long ago may be unknown until it answers)")
    return lines


def internal_error_lines(cluster: dict[str, Any] | None, since: float, until: float | None) -> list[str]:
    """The cluster driver's last unexpected error, when it came while this run was active (a run it concerned
    shows it as its own error as well)."""
    errors = (cluster or {}).get("internal_errors") or {}
    at = errors.get("at") or 0.0
    if not errors or at < since or (until is not None and at > until):
        return []
    return [f"Cluster   INTERNAL ERROR at {when(at)} while {errors.get('where')}: {errors.get('error')} "
            f"({errors.get('count')} so far; the daemon went on, see its log)"]


def instance_lines(instances: Iterable[InstanceStatus], outputs: dict[Any, str] | None = None,
                   width: int = 200) -> list[str]:
    """One line per instance; the output column shows decoded values, never the wire encoding."""
    lines = []
    for inst in instances:
        idx = f"[{inst.index}]" if inst.index is not None else "   "
        extra = ((inst.cause or {}).get("text") or inst.reason or (inst.error.splitlines()[0] if inst.error else "")
                 or (outputs or {}).get(inst.index, ""))
        took = duration(inst.ended_at - inst.started_at) if inst.ended_at and inst.started_at else ""
        line = (f"    {idx:7s} {inst.state:15s} attempt={inst.attempt} job={inst.job_id or '-':14s} {took:>7s}  "
                f"{extra}")
        lines.append(line if len(line) <= width else line[: width - 3] + "...")
        earlier = inst.attempts or []
        for attempt in earlier[-ATTEMPTS_SHOWN:]:  # why it took more than one try, succeeded or not
            text = f"            earlier {attempt_line(attempt)}"
            lines.append(text if len(text) <= width else text[: width - 3] + "...")
        if len(earlier) > ATTEMPTS_SHOWN:
            lines.append(f"            ... and {len(earlier) - ATTEMPTS_SHOWN} earlier attempt(s) (--json lists all)")
    return lines


#: Earlier attempts shown under an instance in ``status --task`` (the latest ones).
ATTEMPTS_SHOWN = 3


def attempt_line(attempt: dict[str, Any]) -> str:
    """One earlier attempt: its number, how it ended and the resources it had."""
    res = attempt.get("resources") or {}
    held = ", ".join(f"{k} {res[k]}" for k in ("mem", "time") if res.get(k))
    why = (attempt.get("cause") or {}).get("text") or attempt.get("state", "")
    free = "" if attempt.get("counted", True) else ", not counted against retries"
    return f"attempt {attempt.get('attempt')}: {why}" + (f" [{held}]" if held else "") + free


def failure_lines(failure: InstanceStatus, log_path: str | None = None) -> list[str]:
    lines = [f"  {failure.label}: {failure.state} (attempt {failure.attempt}, job {failure.job_id or '-'})"]
    if failure.cause and failure.cause.get("text"):
        lines.append(f"    cause: {failure.cause['text']}")
    for attempt in failure.attempts or []:
        lines.append(f"    earlier {attempt_line(attempt)}")
    if failure.error:
        lines.append(f"    {failure.error}")
    if failure.reason and failure.reason not in (failure.error or ""):
        lines.append(f"    reason: {failure.reason}")
    if failure.traceback:
        lines.extend("    | " + line for line in failure.traceback.rstrip().splitlines())
    if log_path:
        lines.append(f"    log: {log_path}")
    return lines


def state_totals(tasks: Iterable[TaskStatus] | dict[str, dict[str, int]]) -> dict[str, int]:
    """Instance counts by state over all tasks (task-level blocks of unexpanded arrays left out)."""
    totals: dict[str, int] = {}
    items = tasks.items() if isinstance(tasks, dict) else [(t.name, t.counts if t.expanded else {}) for t in tasks]
    for _, counts in items:
        for state, n in counts.items():
            totals[state] = totals.get(state, 0) + n
    return totals


def failure_report(run_id: str, state: str, failures: list[InstanceStatus], totals: dict[str, int],
                   log_paths: dict[str, str] | None = None, *, more_hint: str = "") -> list[str]:
    """How a run ended: the state line, the first failures in full, how many more, and what was cancelled."""
    lines = [f"run {run_id} {state}"]
    failed = [f for f in failures if f.state in FAILED]
    shown = failed[:FAILURES_SHOWN]
    for failure in shown:
        lines.append("")
        lines.extend(failure_lines(failure, (log_paths or {}).get(failure.label)))
    more = max(sum(n for s, n in totals.items() if s in FAILED), len(failed)) - len(shown)
    if more > 0:
        lines.append("")
        lines.append(f"... and {more} more failure(s){f' ({more_hint})' if more_hint else ''}")
    cancelled = [f.label for f in failures if f.state == "cancelled"]
    n_cancelled = max(totals.get("cancelled", 0), len(cancelled))
    if n_cancelled:
        named = ", ".join(cancelled[:8]) + (f" and {n_cancelled - len(cancelled[:8])} more"
                                            if n_cancelled > len(cancelled[:8]) else "")
        lines.append("")
        lines.append(f"cancelled: {named}")
    if totals.get("upstream_failed"):
        lines.append(f"not run because something they need failed: {totals['upstream_failed']} instance(s)")
    return lines


def result_lines(data: dict[str, Any], width: int | None = None, *, per_task: int | None = None,
                 more_hint: str = "") -> list[str]:
    """``task = value`` lines from a ``results`` reply (values decoded for display, never unpickled)."""
    w = _width(width)
    lines = []
    for task in data.get("tasks", []):
        name = task["task"]
        items = [i for i in task["items"] if "output" in i or "omitted" in i]
        if not items:
            continue  # nothing produced: a failed or never-run task has no result to show
        shown = items if per_task is None else items[:per_task]
        for item in shown:
            label = name if not task["is_array"] else f"{name}[{item['index']}]"
            prefix = f"  {label} = "
            text = values.show(item["output"], limit=max(20, w - len(prefix))) if "output" in item else \
                f"(not shown: {item['omitted']})"
            lines.append(prefix + text)
        hidden = task["total"] - len(shown) if task["is_array"] and data.get("index") is None else 0
        if hidden > 0:
            lines.append(f"  {name}: ... {hidden} more element(s){f' ({more_hint.format(task=name)})' if more_hint else ''}")
    return lines


def results_json(data: dict[str, Any]) -> dict[str, Any]:
    """A ``results`` reply with plain JSON values (a path is a string, a dataclass an object)."""
    records = []
    for task in data.get("tasks", []):
        for item in task["items"]:
            record = {"task": task["task"], "index": item["index"], "state": item["state"]}
            if "output" in item:
                record["value"] = values.plain(item["output"])
            elif "omitted" in item:
                record["omitted"] = item["omitted"]
            records.append(record)
    return {"run_id": data.get("run_id"), "workflow": data.get("workflow"), "state": data.get("state"),
            "results": records}


def format_runs(runs: list[RunInfo]) -> str:
    if not runs:
        return "no runs\n"
    width = max(len(r.id) for r in runs)
    lines = [f"{'RUN':{width}s}  {'STATE':10s} {'CLUSTER':10s} {'CREATED':19s}  PROGRESS"]
    for run in runs:
        progress = ""
        if run.summary:
            total = sum(sum(c.values()) for c in run.summary.values())
            done = sum(n for c in run.summary.values() for s, n in c.items() if s in ("succeeded", "cached"))
            progress = f"{done}/{total}"
        lines.append(f"{run.id:{width}s}  {run.state:10s} {run.cluster[:10]:10s} {when(run.created_at)}  {progress}")
    return "\n".join(lines) + "\n"


def format_stats(stats: dict[str, Any]) -> str:
    """``reflow-client stats`` for people (``--json`` has every counter)."""
    lines = [f"reflowd pid {stats.get('pid', '?')}, up {clock(stats.get('uptime'))}",
             f"runs       {stats.get('runs_active', 0)} active, {stats.get('runs_in_memory', 0)} in memory"]
    instances = stats.get("instances") or {}
    if instances:
        lines.append(f"instances  {counts_text(instances)}")
    tracked = stats.get("tracked_jobs") or {}
    if tracked:
        lines.append("jobs       " + ", ".join(f"{name}: {n} tracked" for name, n in tracked.items()))
    store = stats.get("store") or {}
    if store:
        lines.append(f"store      {store.get('commits', 0)} commits, {store.get('rows', 0)} rows written, "
                     f"backlog {store.get('backlog', 0)}")
        if not store.get("writable", True):
            lines.append(f"store      UNWRITABLE since {when(store.get('since'))}: {store.get('error')}")
    server = stats.get("server") or {}
    if server:
        lines.append("server     " + ", ".join(f"{k} {v}" for k, v in server.items() if not isinstance(v, dict)))
    lines.append(f"watchers   {stats.get('watchers', 0)}")
    for name, cluster in (stats.get("clusters") or {}).items():
        health = cluster.get("health") or {}
        reach = "reachable" if health.get("reachable", True) else f"UNREACHABLE since {when(health.get('down_since'))}"
        kind = cluster.get("scheduler") or cluster.get("kind") or ""
        lines.append(f"cluster    {name}{f' ({kind})' if kind else ''}: {reach}")
    counters = stats.get("counters") or {}
    if counters:
        lines.append("counters   " + ", ".join(f"{k} {v}" for k, v in sorted(counters.items())))
    return "\n".join(lines) + "\n"


__all__ = [
    "STATE_ORDER",
    "counts_text",
    "duration",
    "failure_lines",
    "failure_report",
    "state_totals",
    "format_runs",
    "format_stats",
    "format_status",
    "instance_lines",
    "result_lines",
    "results_json",
    "task_line",
    "when",
]
