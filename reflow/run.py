"""``Run``: the reference's handle to a submitted run, kept here by reflowd.

``status(as_dict=True)`` returns the reference's dict -- ``run`` (``run_id``,
``graph_name``, ``status``, ``created_at``), ``summary`` (per task,
``TaskState`` value -> count) and ``instances`` (``task_name``,
``array_index``, ``state``, ``job_id``) -- with reflowd's own richer view
beside it: ``run.state``, ``tasks`` (counts by reflowd state), ``failures``
(errors and tracebacks), ``cluster`` (health) and, per instance,
``detailed_state``. The printed status uses the reference's layout with
reflowd's states, which say more (``timeout``, ``cached``, ...).
"""

from __future__ import annotations

import datetime as _dt
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reflow_client.client import Client, RunStatus

from .states import RunState, TaskState

if TYPE_CHECKING:
    from .executors import Executor
    from .workflow import Workflow


def _iso(timestamp: Any) -> Any:
    if isinstance(timestamp, (int, float)) and not isinstance(timestamp, bool):
        return _dt.datetime.fromtimestamp(timestamp, tz=_dt.timezone.utc).isoformat(timespec="seconds")
    return timestamp


def status_dict(raw: dict[str, Any], instances: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The reference's status dict from reflowd's ``status`` answer (pure)."""
    run = dict(raw["run"])
    run.update(
        run_id=run.get("id"),
        graph_name=run.get("workflow"),
        status=RunState.from_reflow(run["state"]).value,
        created_at=_iso(run.get("created_at")),
    )
    summary: dict[str, dict[str, int]] = {}
    for task in raw.get("tasks", []):
        folded: Counter[str] = Counter()
        for state, n in task.get("counts", {}).items():
            folded[TaskState.from_reflow(state).value] += n
        summary[task["name"]] = dict(folded)
    rows = [
        {
            **inst,
            "task_name": inst.get("task"),
            "array_index": inst.get("index"),
            "state": TaskState.from_reflow(inst["state"]).value,
            "detailed_state": inst["state"],
        }
        for inst in instances or []
    ]
    return {**raw, "run": run, "summary": summary, "instances": rows}


def render_status(info: dict[str, Any], task: str | None = None) -> str:
    """The reference's printed layout (pure), with reflowd's detailed states and failures below it."""
    run = info["run"]
    lines = [
        f"Run      {run.get('run_id', '?')}",
        f"Workflow {run.get('graph_name', '?')}",
        f"Status   {run.get('state', run.get('status', '?'))}",
        f"Created  {run.get('created_at', '?')}",
        "",
    ]
    for entry in info.get("tasks", []):
        if task and entry["name"] != task:
            continue
        parts = [f"{s}={n}" for s, n in sorted(entry.get("counts", {}).items())]
        lines.append(f"  {entry['name']:20s}  {', '.join(parts)}")
    if task:
        lines.append("")
        for inst in info.get("instances", []):
            if inst.get("task_name") != task:
                continue
            idx = inst.get("array_index")
            idx_str = f"[{idx}]" if idx is not None else "   "
            state = inst.get("detailed_state", inst.get("state", "?"))
            lines.append(f"    {idx_str:6s}  {state:12s}  job={inst.get('job_id') or '-'}")
    failures = [f for f in info.get("failures", []) if not task or f.get("task") == task]
    if failures:
        lines.append("")
        for failure in failures[:5]:
            label = failure["task"] if failure.get("index") is None else f"{failure['task']}[{failure['index']}]"
            error = (failure.get("error") or "").splitlines()
            lines.append(f"  {label} {failure.get('state')}: {error[0] if error else ''}")
        if len(failures) > 5:
            lines.append(f"  ... {len(failures) - 5} more failure(s)")
    health = (info.get("cluster") or {}).get("health") or {}
    if health and health.get("reachable") is False:
        lines.append(f"\nCluster UNREACHABLE: {health.get('last_error') or 'no answer'}")
    return "\n".join(lines) + "\n"


class Run:
    """Bound handle to a submitted run.

    ``store`` is how reflowd is reached: a connected ``reflow_client.Client``,
    its socket path, or None for the configured socket (the daemon keeps the
    runs; there is no store file to open here).
    """

    def __init__(self, workflow: Workflow, run_id: str, run_dir: Path, store: Any) -> None:
        self.workflow: Workflow = workflow
        self.run_id: str = run_id
        self.run_dir: Path = Path(run_dir)
        self.store: Any = store

    @property
    def client(self) -> Client:
        """The connection to reflowd (made once, from ``store``)."""
        if not isinstance(self.store, Client):
            from .session import client_for

            self.store = client_for(self.workflow, self.store, autostart=True)
        return self.store

    def __repr__(self) -> str:
        return f"Run({self.run_id!r}, run_dir={str(self.run_dir)!r})"

    def status(self, task: str | None = None, as_dict: bool = False) -> dict[str, Any] | None:
        """Print the run's status (the reference's layout), or return it as a dict with ``as_dict=True``.

        ``task`` shows that task's instances (and, in the dict, limits ``instances`` to it).
        """
        info = self.workflow.run_status(self.run_id, self.client, task_name=task, instances=as_dict or task is not None)
        if as_dict:
            return info
        print(render_status(info, task), end="")
        return None

    def cancel(self, task: str | None = None, executor: Executor | str | None = None) -> int:
        """Cancel active task instances (only ``task``'s with a task); returns how many were cancelled."""
        n = self.workflow.cancel_run(self.run_id, self.client, task_name=task, executor=executor)
        print(f"Cancelled {n} task instance(s).")
        return n

    def retry(self, task: str | None = None, executor: Executor | str | None = None, verify: bool = True) -> int:
        """Retry failed or cancelled instances; returns how many were marked for retry.

        With ``verify`` (the default) cached upstream outputs are checked first
        (``Path`` outputs exist, ``verify=`` callables pass) and produced again if not.
        """
        n = self.workflow.retry_failed(self.run_id, self.client, self.run_dir, task_name=task, executor=executor,
                                       verify=verify)
        print(f"Marked {n} task instance(s) for retry.")
        return n

    def wait(self, timeout: float | None = None) -> RunStatus:
        """Block until the run ends; raises TimeoutError after *timeout* seconds."""
        return self.client.wait(self.run_id, timeout=timeout)

    def logs(self, task: str, index: int | None = None) -> dict[str, Any]:
        """An instance's stdout and stderr (their last 64 KiB)."""
        return self.client.logs(self.run_id, task, index)
