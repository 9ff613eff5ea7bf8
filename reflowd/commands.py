"""The daemon's command registry: validate a request's parameters, then execute.

Each command declares its parameters (name, type, required, default); the
server checks a request against that declaration before the handler runs,
so handlers see well-typed values and a client sending nonsense gets
``invalid params`` naming the parameter.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from reflow_client import codec
from reflow_client.manifest import MAX_PATH, Manifest, ManifestError, run_param_keys
from reflow_client.protocol import (
    CLUSTER_UNAVAILABLE,
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    PROTOCOL_VERSION,
    STORE_UNAVAILABLE,
    UNKNOWN_RUN,
    VERSION_MISMATCH,
    RpcError,
)

from .engine.engine import EngineError, InvalidRequest, UnknownRun
from .engine.states import RunState
from .transports.base import TransportError

if TYPE_CHECKING:
    from .clusters import ClusterRuntime
    from .daemon import Daemon

Handler = Callable[["Daemon", dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Field:
    kind: type | tuple[type, ...]
    required: bool = False
    default: Any = None
    check: Callable[[Any], str | None] | None = None  # returns a problem, or None


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    params: dict[str, Field] = field(default_factory=dict)
    streaming: bool = False
    help: str = ""

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise RpcError(
                INVALID_PARAMS,
                f"{self.name}: unknown parameter(s) {', '.join(unknown)} (accepted: {', '.join(self.params) or 'none'})",
            )
        out: dict[str, Any] = {}
        for name, spec in self.params.items():
            if name not in params or params[name] is None:
                if spec.required:
                    raise RpcError(INVALID_PARAMS, f"{self.name}: missing parameter {name!r}")
                out[name] = spec.default
                continue
            value = params[name]
            kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
            if isinstance(value, bool) and bool not in kinds:
                ok = False
            elif float in kinds and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            else:
                ok = isinstance(value, kinds)
            if not ok:
                names = "/".join(k.__name__ for k in kinds)
                raise RpcError(INVALID_PARAMS, f"{self.name}: parameter {name!r} must be {names}, "
                                               f"got {type(value).__name__}")
            problem = _plain_value(value)
            if problem:
                raise RpcError(INVALID_PARAMS, f"{self.name}: parameter {name!r} {problem}")
            if spec.check is not None:
                problem = spec.check(value)
                if problem:
                    raise RpcError(INVALID_PARAMS, f"{self.name}: parameter {name!r} {problem}")
            out[name] = value
        return out


def _plain_value(value: Any) -> str | None:
    """What every scalar parameter must be: a 64-bit integer, a finite number, text without NUL."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        return "is out of range (it must fit in 64 bits)"
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if isinstance(value, str) and "\0" in value:
        return "must not contain a NUL byte"
    return None


REGISTRY: dict[str, Command] = {}


def command(name: str, *, streaming: bool = False, help: str = "", **params: Field) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        REGISTRY[name] = Command(name, handler, dict(params), streaming, help)
        return handler

    return register


def lookup(name: str) -> Command:
    cmd = REGISTRY.get(name)
    if cmd is None:
        raise RpcError(METHOD_NOT_FOUND, f"unknown method {name!r} (known: {', '.join(sorted(REGISTRY))})")
    return cmd


def _positive(value: int) -> str | None:
    return None if value > 0 else "must be positive"


def _not_negative(value: int) -> str | None:
    return None if value >= 0 else "must not be negative"


def _nonempty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _nonempty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _path_text(value: str) -> str | None:
    if not value.strip():
        return "must not be empty"
    if len(value) > MAX_PATH:
        return f"is longer than {MAX_PATH} characters"
    if any(ord(c) < 32 or c == "\x7f" for c in value):
        return "must not contain control characters (newline, tab, ...)"
    return None


def _time_value(value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return _dt.datetime.fromisoformat(value).timestamp()
    except (ValueError, OverflowError, OSError):
        raise RpcError(INVALID_PARAMS, f"{value!r} is neither epoch seconds nor an ISO date/time") from None


def _require_writable(daemon: Daemon, what: str) -> None:
    """Refuse a change the state database could not record now; reads keep working."""
    store = daemon.engine.store
    if not store.writable:
        raise RpcError(STORE_UNAVAILABLE, f"{what} refused, nothing was changed: {store.write_error}",
                       {"store": _store_health(daemon)})


def _store_health(daemon: Daemon) -> dict[str, Any]:
    store = daemon.engine.store
    return {"writable": store.writable, "error": store.write_error, "since": store.write_error_since}


def _engine_call(exc: EngineError) -> RpcError:
    code = UNKNOWN_RUN if isinstance(exc, UnknownRun) else (INVALID_PARAMS if isinstance(exc, InvalidRequest)
                                                            else exc.code)
    return RpcError(code, str(exc), exc.data)


# ---------------------------------------------------------------------- commands


@command("hello", help="exchange protocol versions", protocol=Field(int), client=Field(str))
async def hello(daemon: Daemon, p: dict[str, Any]) -> dict[str, Any]:
    if p["protocol"] is not None and p["protocol"] != PROTOCOL_VERSION:
        raise RpcError(VERSION_MISMATCH, f"client speaks protocol {p['protocol']}, this reflowd speaks "
                                         f"{PROTOCOL_VERSION}; use matching versions of reflow and reflowd")
    return {"protocol": PROTOCOL_VERSION, "version": daemon.version, "pid": os.getpid(), "uid": os.getuid(),
            "socket": str(daemon.socket_path), "state_dir": str(daemon.state_dir)}


@command("ping", help="is the daemon alive")
async def ping(daemon: Daemon, p: dict[str, Any]) -> dict[str, Any]:
    return {"pong": True, "time": time.time(), "pid": os.getpid(), "store": _store_health(daemon)}


_RUN_OPTIONS = {"force", "force_tasks", "verify", "on_error"}


def _check_options(value: dict[str, Any]) -> str | None:
    unknown = set(value) - _RUN_OPTIONS
    if unknown:
        return f"has unknown option(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(_RUN_OPTIONS))})"
    if "force_tasks" in value and not (
        isinstance(value["force_tasks"], list) and all(isinstance(t, str) for t in value["force_tasks"])
    ):
        return "force_tasks must be a list of task names"
    if value.get("on_error", "continue") not in ("stop", "continue"):
        return "on_error must be 'stop' or 'continue'"
    for key in ("force", "verify"):
        if key in value and not isinstance(value[key], bool):
            return f"{key} must be true or false"
    return None


async def _check_cluster(runtime: ClusterRuntime) -> None:
    """Refuse a submission the cluster cannot take now (host key, credentials, outage): nothing is recorded."""
    try:
        await runtime.transport.check(timeout=runtime.config.command_timeout)
    except (TransportError, TimeoutError) as exc:
        raise RpcError(CLUSTER_UNAVAILABLE, f"cluster {runtime.name!r} cannot be used, nothing was submitted: "
                                            f"{exc or 'timed out'}") from None


@command(
    "submit",
    help="start a run from a manifest",
    manifest=Field(dict, required=True),
    params=Field(dict, default={}),
    run_dir=Field(str, required=True, check=_path_text),
    cluster=Field(str),
    options=Field(dict, default={}, check=_check_options),
)
async def submit(daemon: Daemon, p: dict[str, Any]) -> dict[str, Any]:
    _require_writable(daemon, "submit")
    try:
        manifest = Manifest.from_dict(p["manifest"], strict=True)
    except ManifestError as exc:
        raise RpcError(INVALID_PARAMS, f"invalid manifest: {exc}") from None
    except (RecursionError, ValueError, TypeError) as exc:  # nothing may slip past the door as a crash
        raise RpcError(INVALID_PARAMS, f"invalid manifest: {type(exc).__name__}: {exc}") from None
    known = run_param_keys(manifest)
    unknown = sorted(k for k in p["params"] if k not in known)
    if unknown:
        raise RpcError(INVALID_PARAMS, f"submit: unknown run parameter(s) {', '.join(map(repr, unknown[:10]))} for "
                                       f"workflow {manifest.workflow!r} (known: {', '.join(sorted(known)) or 'none'})")
    if not await anyio.to_thread.run_sync(os.path.isfile, manifest.entrypoint):
        raise RpcError(INVALID_PARAMS, f"invalid manifest: manifest.entrypoint: {manifest.entrypoint!r} is not a file "
                                       "reflowd can read (workers load the workflow from it)")
    cluster = p["cluster"] or daemon.default_cluster
    run_dir = p["run_dir"]
    if cluster in daemon.engine.clusters and not daemon.engine.clusters[cluster].remote and not os.path.isabs(run_dir):
        raise RpcError(INVALID_PARAMS, f"submit: run_dir {run_dir!r} must be an absolute path")
    if cluster in daemon.engine.clusters and daemon.engine.clusters[cluster].remote and not os.path.isabs(run_dir):
        base = daemon.engine.clusters[cluster].config.workdir
        if not base:
            raise RpcError(INVALID_PARAMS, f"submit: run_dir {run_dir!r} is relative but cluster {cluster!r} "
                                           "has no 'workdir' to put it under; give an absolute path")
        run_dir = os.path.join(base, run_dir)
    options = {"on_error": "continue", **p["options"]}
    runtime = daemon.engine.clusters.get(cluster)
    if runtime is not None and runtime.remote:
        await _check_cluster(runtime)
    try:
        run = await daemon.engine.submit_run(manifest, p["params"], run_dir, cluster, options)
    except EngineError as exc:
        raise _engine_call(exc) from None
    return {"run_id": run.id, "run_dir": run.run_dir, "cluster": run.cluster, "workflow": run.workflow}


@command("status", help="a run's progress", run_id=Field(str, required=True), task=Field(str),
         limit=Field(int, default=200, check=_positive), offset=Field(int, default=0, check=_not_negative))
async def status(daemon: Daemon, p: dict[str, Any]) -> dict[str, Any]:
    try:
        run = await daemon.engine.get_run(p["run_id"])
        result = daemon.engine.status(run, p["task"], min(p["limit"], 10_000), p["offset"])
    except EngineError as exc:
        raise _engine_call(exc) from None
    result["store"] = _store_health(daemon)
    return result


def _check_state(value: Any) -> str | None:
    states = [value] if isinstance(value, str) else value
    if not isinstance(states, list) or not all(isinstance(s, str) for s in states):
        return "must be a state name or a list of them"
    bad = [s for s in states if s not in {r.value for r in RunState}]
    return f"has unknown state(s) {', '.join(bad)} (known: {', '.join(r.value for r in RunState)})" if bad else None


@command("runs", help="list runs", workflow=Field(str), state=Field((str, list), check=_check_state),
         since=Field((float, str)), until=Field((float, str)), limit=Field(int, default=50, check=_positive))
async def runs(daemon: Daemon, p: dict[str, Any]) -> dict[str, Any]:
    states = [p["state"]] if isinstance(p["state"], str) else p["state"]
    if daemon.engine.store.writable:
        await daemon.engine.store.flush()  # the filter runs in SQL: make it see the latest states
    # (while the store cannot be written, the live state below still corrects the rows it returns)
    rows = await daemon.engine.store.list_runs(
        workflow=p["workflow"],
        states=states,
        since=None if p["since"] is None else _time_value(p["since"]),
        until=None if p["until"] is None else _time_value(p["until"]),
        limit=min(p["limit"], 10_000),
    )
    stored = await daemon.engine.store.run_summaries([r["id"] for r in rows if r["id"] not in daemon.engine.runs])
    for row in rows:
        live = daemon.engine.runs.get(row["id"])
        if live is not None:
            row["state"] = live.state.value
            row["summary"] = live.summary()
        else:  # finished runs dropped from memory (or a restarted daemon): counts from the store
            row["summary"] = stored.get(row["id"]) or None
    return {"runs": rows}


@command("cancel", help="cancel a run, one task, or one element of an array task", run_id=Field(str, required=True),
         task=Field(str), index=Field(int))
async def cancel(daemon: Daemon, p: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"cancelled": await daemon.engine.cancel(p["run_id"], p["task"], p["index"])}
    except EngineError as exc:
        raise _engine_call(exc) from None


@command("retry", help="retry failed or cancelled instances", run_id=Field(str, required=True), task=Field(str),
         verify=Field(bool, default=True))
async def retry(daemon: Daemon, p: dict[str, Any]) -> dict[str, Any]:
    _require_writable(daemon, "retry")
    try:
        return {"retried": await daemon.engine.retry(p["run_id"], p["task"], p["verify"])}
    except EngineError as exc:
        raise _engine_call(exc) from None


@command("logs", help="an instance's stdout and stderr", run_id=Field(str, required=True),
         task=Field(str, required=True), index=Field(int), max_bytes=Field(int, default=65536, check=_positive))
async def logs(daemon: Daemon, p: dict[str, Any]) -> dict[str, Any]:
    try:
        return await daemon.engine.logs(p["run_id"], p["task"], p["index"], min(p["max_bytes"], 4 * 1024 * 1024))
    except EngineError as exc:
        raise _engine_call(exc) from None


@command("describe", help="the manifest a run was submitted with", run_id=Field(str, required=True))
async def describe(daemon: Daemon, p: dict[str, Any]) -> dict[str, Any]:
    try:
        run = await daemon.engine.get_run(p["run_id"])
    except EngineError as exc:
        raise _engine_call(exc) from None
    return run.manifest.to_manifest_dict()


@command("stats", help="daemon counters")
async def stats(daemon: Daemon, p: dict[str, Any]) -> dict[str, Any]:
    data = {**daemon.engine.stats(), "server": daemon.server.stats() if daemon.server else {}}
    data["store"] = {**data.get("store", {}), **daemon.engine.store.health()}
    return data


@command("shutdown", help="stop the daemon (jobs keep running)")
async def shutdown(daemon: Daemon, p: dict[str, Any]) -> dict[str, Any]:
    daemon.request_shutdown("client request")
    return {"stopping": True}


@command("watch", streaming=True, help="stream transition events", run_id=Field(str))
async def watch(daemon: Daemon, p: dict[str, Any]) -> dict[str, Any]:
    """Handled by the server (it owns the connection); this validates and snapshots."""
    if p["run_id"] is None:
        return {"watching": None}
    try:
        run = await daemon.engine.get_run(p["run_id"])
    except EngineError as exc:
        raise _engine_call(exc) from None
    return {"watching": run.id, "status": daemon.engine.status(run)}


# ---------------------------------------------------------------------- run references and results


async def _resolve_ref(daemon: Daemon, ref: str, workflow: str | None) -> str:
    """A full run id from a reference: the id, any unambiguous prefix of it, or ``last``."""
    if daemon.engine.store.writable:  # (an unwritable store would make this wait for ever)
        await daemon.engine.store.flush()  # a run submitted a moment ago must be found
    if ref == "last":
        rows = await daemon.engine.store.list_runs(workflow=workflow, limit=1)
        if not rows:
            where = f" of workflow {workflow!r}" if workflow else ""
            raise RpcError(UNKNOWN_RUN, f"there is no run{where} yet, so 'last' names nothing; submit one first")
        return str(rows[0]["id"])
    if ref in daemon.engine.runs:
        return ref
    matches = await daemon.engine.store.run_ids_with_prefix(ref, workflow=workflow, limit=6)
    if ref in matches:
        return ref
    if not matches:
        raise RpcError(UNKNOWN_RUN, f"no run id starts with {ref!r}; list runs with 'reflow-client runs'")
    if len(matches) > 1:
        shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise RpcError(INVALID_PARAMS, f"run id prefix {ref!r} is ambiguous: it matches {shown}; "
                                       "type more of the id")
    return matches[0]


@command("resolve", help="the full run id for a prefix or 'last'", ref=Field(str, required=True, check=_nonempty),
         workflow=Field(str))
async def resolve(daemon: Daemon, p: dict[str, Any]) -> dict[str, Any]:
    return {"run_id": await _resolve_ref(daemon, p["ref"].strip(), p["workflow"])}


#: Results replies stay well below the protocol's message limit; the rest is counted, not sent.
_RESULTS_BUDGET = 4 * 1024 * 1024


@command("results", help="task outputs (encoded values); the final tasks' unless a task is named",
         run_id=Field(str, required=True), task=Field(str), index=Field(int), limit=Field(int, default=1000,
                                                                                          check=_positive))
async def results(daemon: Daemon, p: dict[str, Any]) -> dict[str, Any]:
    try:
        run = await daemon.engine.get_run(p["run_id"])
    except EngineError as exc:
        raise _engine_call(exc) from None
    task, index = p["task"], p["index"]
    if task is not None and task not in run.tasks:
        raise RpcError(INVALID_PARAMS, f"run {run.id} has no task {task!r} (tasks: {', '.join(run.tasks)})")
    if task is None and index is not None:
        raise RpcError(INVALID_PARAMS, "results: --index needs --task")
    needed = {d for tr in run.tasks.values() for d in tr.manifest.dependencies}
    names = [task] if task is not None else [n for n in run.tasks if n not in needed]
    budget = _RESULTS_BUDGET
    out = []
    for name in names:
        tr = run.tasks[name]
        instances = tr.ordered()
        if index is not None:
            if not tr.manifest.is_array:
                raise RpcError(INVALID_PARAMS, f"task {name!r} is not an array task; leave out --index")
            chosen = [i for i in instances if i.index == index]
            if not chosen:
                size = len(instances)
                valid = f"0-{size - 1}" if size else "none yet: the task has not expanded"
                raise RpcError(INVALID_PARAMS, f"task {name!r} has no element {index} (valid: {valid})")
            instances = chosen
        items = []
        for inst in instances[: p["limit"]]:
            item: dict[str, Any] = {"index": inst.index, "state": inst.state.value}
            if inst.ok:
                size = len(codec.canonical_json(inst.output))
                if size > budget:
                    item["omitted"] = f"{size} bytes; ask for this element alone with --task and --index"
                else:
                    budget -= size
                    item["output"] = inst.output
            items.append(item)
        out.append({"task": name, "is_array": tr.manifest.is_array, "expanded": tr.expanded,
                    "blocked": tr.blocked.value if tr.blocked else None, "total": len(tr.ordered()), "items": items})
    return {"run_id": run.id, "workflow": run.workflow, "state": run.state.value, "final": task is None,
            "index": index, "tasks": out}
