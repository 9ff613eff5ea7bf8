"""Submitting to reflowd from the user's process (``Workflow.submit``, ``cli() submit``, ``reflow-client submit``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reflow_client.autostart import connect
from reflow_client.client import Client

from .executors import resolve_executor
from .local_run import run_options

if TYPE_CHECKING:
    from .executors import Executor
    from .run import Run
    from .workflow import Workflow


def client_for(wf: Workflow, store: Any, *, autostart: bool) -> Client:
    """``store`` may be a connected Client, a socket path, or None (the configured socket)."""
    if isinstance(store, Client):
        return store
    if store is not None and not isinstance(store, (str, os.PathLike)):
        raise TypeError(
            f"store must be a reflow_client.Client, a reflowd socket path or None (the configured daemon), "
            f"not {type(store).__name__}: runs are kept by reflowd"
        )
    sock = Path(store) if store is not None else wf.config.socket
    return connect(sock, autostart=autostart, state_dir=wf.config.state_dir if store is None else None,
                   config=wf.config.path)


def with_submit_options(manifest: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """*manifest* with run-wide submit options under each task's own (a task's options win)."""
    if not options:
        return manifest
    tasks = []
    for task in manifest["tasks"]:
        config = {**task["config"], "submit_options": {**options, **task["config"].get("submit_options", {})}}
        tasks.append({**task, "config": config})
    return {**manifest, "tasks": tasks}


def run_cluster(client: Client, run_id: str) -> str:
    return client.status(run_id).run.cluster


def check_run_executor(wf: Workflow, client: Client, run_id: str, executor: Executor | str | None) -> None:
    """An executor given for an existing run must name the cluster it runs on, with nothing to change."""
    if executor is None:
        return
    chosen, submit_options = resolve_executor(executor, wf.config)
    current = run_cluster(client, run_id)
    if chosen.name != current:
        raise ValueError(
            f"run {run_id} runs on cluster {current!r}; an executor for {chosen.name!r} cannot act on it "
            "(a run stays where it was submitted: submit a new run to use another cluster)"
        )
    if submit_options:
        raise ValueError(
            f"run {run_id}: submit options ({', '.join(sorted(submit_options))}) are fixed when a run is submitted; "
            "pass the executor without options, or submit a new run"
        )


def submit(
    wf: Workflow,
    run_dir: str | os.PathLike[str],
    *,
    store: Any = None,
    cluster: Executor | str | None = None,
    force: bool = False,
    force_tasks: list[str] | None = None,
    verify: bool = False,
    on_error: str = "continue",
    autostart: bool = True,
    parameters: dict[str, Any],
) -> Run:
    """Check everything, then hand the run to reflowd; ``cluster`` is an executor, a cluster name or None."""
    from .run import Run

    options = run_options(force=force, force_tasks=force_tasks, verify=verify, on_error=on_error)
    cluster_cfg, submit_options = resolve_executor(cluster, wf.config)
    wf.validate()
    params = wf.resolve_parameters(parameters)  # the reference's TypeError for missing parameters comes first
    wf.check_loadable()
    unknown = [t for t in options["force_tasks"] if t not in wf.tasks]
    if unknown:
        raise ValueError(f"force_tasks names unknown task(s): {', '.join(unknown)}")
    if cluster_cfg.remote:
        rd = str(run_dir)  # a path on the cluster; relative paths go under its workdir
    else:
        path = Path(run_dir).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        rd = str(path)
    client = client_for(wf, store, autostart=autostart)
    manifest = with_submit_options(wf.describe(), submit_options)
    result = client.submit(manifest, params, rd, cluster=cluster_cfg.name, options=options)
    return Run(wf, result.run_id, Path(result.run_dir), client)
