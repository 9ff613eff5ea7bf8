"""Submitting to reflowd from the user's process (``Workflow.submit``, ``cli() submit``, ``reflow-client submit``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reflow_client.autostart import connect
from reflow_client.client import Client

from .local_run import run_options

if TYPE_CHECKING:
    from .run import Run
    from .workflow import Workflow


def client_for(wf: Workflow, store: Any, *, autostart: bool) -> Client:
    """``store`` may be a connected Client, a socket path, or None (the configured socket)."""
    if isinstance(store, Client):
        return store
    if store is not None and not isinstance(store, (str, os.PathLike)):
        raise TypeError(f"store must be a reflow_client.Client or a socket path, not {type(store).__name__}")
    sock = Path(store) if store is not None else wf.config.socket
    return connect(sock, autostart=autostart, state_dir=wf.config.state_dir if store is None else None,
                   config=wf.config.path)


def submit(
    wf: Workflow,
    run_dir: str | os.PathLike[str],
    *,
    store: Any = None,
    cluster: str | None = None,
    force: bool = False,
    force_tasks: list[str] | None = None,
    verify: bool = False,
    on_error: str = "continue",
    autostart: bool = True,
    parameters: dict[str, Any],
) -> Run:
    from .run import Run

    options = run_options(force=force, force_tasks=force_tasks, verify=verify, on_error=on_error)
    wf.validate()
    wf.check_loadable()
    unknown = [t for t in options["force_tasks"] if t not in wf.tasks]
    if unknown:
        raise ValueError(f"force_tasks names unknown task(s): {', '.join(unknown)}")
    params = wf.resolve_parameters(parameters)
    cluster_name = cluster or wf.config.default_cluster
    cluster_cfg = wf.config.cluster(cluster_name)
    if cluster_cfg.remote:
        rd = str(run_dir)  # a path on the cluster; relative paths go under its workdir
    else:
        path = Path(run_dir).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        rd = str(path)
    client = client_for(wf, store, autostart=autostart)
    result = client.submit(wf.describe(), params, rd, cluster=cluster_name, options=options)
    return Run(wf, result.run_id, Path(result.run_dir), client)
