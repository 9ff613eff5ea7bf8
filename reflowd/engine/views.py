"""What clients see of a run (pure functions of the model).

The fields come from the client's own view dataclasses (``RunInfo``,
``TaskStatus``, ``InstanceStatus`` in ``reflow_client/client.py``), so the
daemon cannot send a field the client does not declare, nor forget one it
does. Each view costs time per task, or per instance *shown*: a large array
is paged, never walked whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from reflow_client import codec
from reflow_client.client import InstanceStatus, RunInfo, TaskStatus

from . import causes
from .model import Instance, Run, TaskRun
from .retry_policy import resources_of
from .records import view_names
from .states import FAILURE, State

_RUN_FIELDS = [n for n in view_names(RunInfo) if n != "summary"]  # the summary is the ``runs`` command's
_TASK_FIELDS = view_names(TaskStatus)
_INSTANCE_FIELDS = view_names(InstanceStatus)
#: Failures shown in a status answer.
MAX_FAILURES = 20
OUTPUT_PREVIEW = 200


def _run_value(run: Run, name: str) -> Any:
    if name == "options":
        return run.options.to_dict()
    value = getattr(run, name)
    return value.value if name == "state" else value


def run_view(run: Run) -> dict[str, Any]:
    return {name: _run_value(run, name) for name in _RUN_FIELDS}


def task_view(tr: TaskRun) -> dict[str, Any]:
    values = {
        "name": tr.name,
        "is_array": tr.manifest.is_array,
        "expanded": tr.expanded,
        "size": tr.size if tr.manifest.is_array else 1,
        "counts": ({s.value: n for s, n in tr.counts.items() if n} if tr.expanded
                   else {(tr.blocked or State.PENDING).value: 1}),
        "blocked": tr.blocked.value if tr.blocked else None,
        "blocked_reason": tr.reason if tr.blocked else None,
    }
    return {name: values[name] for name in _TASK_FIELDS}


def _instance_value(inst: Instance, name: str, full: bool, config: dict[str, Any] | None = None) -> Any:
    if name == "resources":
        return resources_of(inst, config)
    if name == "cause":
        cause = inst.cause or causes.infer(inst.state.value, inst.error, inst.reason)
        return causes.view(cause, resources_of(inst, config))
    if name == "attempts":
        return [{**a, "cause": causes.view(a.get("cause"), a.get("resources"))} for a in inst.attempts] \
            if inst.attempts else None
    if name == "state":
        return inst.state.value
    if name == "job_id":
        return inst.job_key or inst.job_id
    if name == "traceback":
        return inst.traceback if full else None
    if name == "output":
        if not inst.ok:
            return None
        text = codec.canonical_json(inst.output)
        return text if len(text) <= OUTPUT_PREVIEW else text[: OUTPUT_PREVIEW - 3] + "..."
    return getattr(inst, name)


def instance_view(inst: Instance, full: bool, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """*config*: the task's manifest config (its default resources)."""
    view = {name: _instance_value(inst, name, full, config) for name in _INSTANCE_FIELDS}
    if not full:
        view.pop("traceback", None)
    for name in ("output", "cause", "attempts"):
        if view.get(name) is None:
            view.pop(name, None)
    return view


def failures(run: Run, task: str | None, limit: int = MAX_FAILURES) -> list[Instance]:
    """The first *limit* failed instances, looking only at tasks whose counts show failures."""
    out: list[Instance] = []
    wanted = FAILURE - {State.UPSTREAM_FAILED}
    for tr in run.tasks.values():
        if task is not None and tr.name != task:
            continue
        if not any(tr.counts.get(s) for s in wanted):
            continue
        for inst in _in_order(tr):
            if inst.state in wanted:
                out.append(inst)
                if len(out) >= limit:
                    return out
    return out


def _in_order(tr: TaskRun, start: int = 0) -> Iterator[Instance]:
    if not tr.manifest.is_array:
        if start == 0 and None in tr.instances:
            yield tr.instances[None]
        return
    for i in range(start, tr.size or 0):
        inst = tr.instances.get(i)
        if inst is not None:
            yield inst


def page(tr: TaskRun, offset: int, limit: int) -> list[Instance]:
    out = []
    for inst in _in_order(tr, offset):
        if len(out) >= limit:
            break
        out.append(inst)
    return out


def status(run: Run, task: str | None = None, limit: int = 200, offset: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {
        "run": run_view(run),
        "tasks": [task_view(tr) for tr in run.tasks.values()],
        "summary": run.summary(),
        "failures": [instance_view(i, full=True, config=run.tasks[i.task].manifest.config)
                     for i in failures(run, task)],
    }
    if task is not None:
        tr = run.tasks[task]
        out["instances"] = [instance_view(i, full=False, config=tr.manifest.config) for i in page(tr, offset, limit)]
        out["instances_total"] = len(tr.instances)
        if offset:
            out["instances_offset"] = offset
    return out
