"""What ``wf.cli()`` subcommands (and ``reflow-client submit FILE``) do once their arguments are parsed."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reflow_client import cli_errors, render
from reflow_client.cli import PROG, RESULTS_PER_TASK, follow_run, output_width, say, write_json
from reflow_client.client import Client, InstanceStatus

if TYPE_CHECKING:
    from .local_run import LocalRunResult
    from .workflow import Workflow


def _final_tasks(wf: Workflow) -> list[str]:
    needed = {d for t in wf.tasks.values() for d in t.dependencies}
    return [name for name in wf._topological_order() if name not in needed]


def local_results(wf: Workflow, result: LocalRunResult) -> dict[str, Any]:
    """The final tasks' outputs of a local run, shaped like reflowd's ``results`` reply."""
    tasks = []
    for name in _final_tasks(wf):
        items = []
        for item in result.encoded.get(name, []):
            entry = {"index": item["index"], "state": item["state"]}
            if item["state"] in ("succeeded", "cached"):
                entry["output"] = item["output"]
            items.append(entry)
        tasks.append({"task": name, "is_array": wf.tasks[name].config.array, "total": len(items), "items": items})
    return {"run_id": result.run_id, "workflow": wf.name, "state": result.state, "tasks": tasks}


def cmd_run(wf: Workflow, args: argparse.Namespace) -> int:
    """``pipeline.py run``: the embedded engine, the live display, and the same report as ``submit --wait``."""
    from reflow_client.display import Progress, ProgressDisplay

    from .local_run import run_local

    progress = Progress.from_tasks("", [(n, wf.tasks[n].config.array) for n in wf._topological_order()])
    levels = {0: None, 1: "info"}
    log_level = levels.get(args.verbose or 0, "debug")
    if not args.json:
        print(f"running workflow {wf.name!r} here, in run dir {args.run_dir}", flush=True)

    def on_event(event: dict[str, Any]) -> None:
        if not progress.run_id and event.get("run_id"):
            progress.run_id = event["run_id"]
        if display is not None:
            display.update(event)

    display: ProgressDisplay | None = None
    started = time.time()
    try:
        if args.json:
            result = _run_local(run_local, wf, args, log_level, None)
        else:
            with ProgressDisplay(progress) as display:
                result = _run_local(run_local, wf, args, log_level, on_event)
    except KeyboardInterrupt:
        say("interrupted: the local run was cancelled and its processes stopped")
        return cli_errors.INTERRUPTED
    failures = [InstanceStatus(**{k: v for k, v in f.items() if k in InstanceStatus.__dataclass_fields__})
                for f in result.failures]
    results = local_results(wf, result)
    if args.json:
        write_json({"run_id": result.run_id, "state": result.state, "run_dir": str(result.run_dir),
                    "failures": [f.__dict__ for f in failures], "failures_total": result.failures_total,
                    "results": render.results_json(results)["results"]}, compact=True)
        return cli_errors.OK if result.ok else cli_errors.RUN_FAILED
    lines = render.failure_report(result.run_id, result.state, failures, render.state_totals(result.summary),
                                  result.log_paths,
                                  more_hint=f"their logs are in {result.run_dir / 'logs'}")
    lines[0] += f" after {render.duration(time.time() - started)}"
    shown = render.result_lines(results, output_width(), per_task=RESULTS_PER_TASK)
    if shown:
        lines += ["", "results:", *shown]
    print("\n".join(lines), flush=True)
    return cli_errors.OK if result.ok else cli_errors.RUN_FAILED


def _run_local(run_local: Any, wf: Workflow, args: argparse.Namespace, log_level: str | None,
               on_event: Any) -> LocalRunResult:
    return run_local(
        wf,
        args.run_dir,
        max_workers=args.max_workers,
        on_error=args.on_error or "stop",
        force=args.force,
        force_tasks=args.force_tasks,
        verify=args.verify,
        parameters=args.params,
        on_event=on_event,
        log_level=log_level,
    )


def cmd_submit(wf: Workflow, args: argparse.Namespace, *, prog: str) -> int:
    """``pipeline.py submit`` and ``reflow-client submit FILE``."""
    from .session import submit

    run_dir = args.run_dir if args.run_dir is not None else Path.cwd() / "runs" / wf.name
    run = submit(wf, run_dir, store=args.socket, cluster=args.cluster, force=args.force,
                 force_tasks=args.force_tasks, verify=args.verify, on_error=args.on_error or "continue",
                 autostart=not args.no_daemon, parameters=args.params)
    client = run.client
    submitted = {"run_id": run.run_id, "run_dir": str(run.run_dir), "workflow": wf.name}
    if not args.wait:
        if args.json:
            write_json(submitted, compact=True)
        else:
            print(f"submitted run {run.run_id}\n  run dir    {run.run_dir}\n"
                  f"  follow it  {prog} watch {run.run_id}\n  results    {prog} results {run.run_id}")
        return cli_errors.OK
    if not args.json:
        print(f"submitted run {run.run_id} (run dir {run.run_dir})", flush=True)
    return follow_run(client, run.run_id, cancel_on_interrupt=args.cancel_on_interrupt, as_json=args.json,
                      extra=submitted)


def _client(wf: Workflow, args: argparse.Namespace) -> Client:
    from reflow_client.autostart import connect

    sock = args.socket or wf.config.socket
    return connect(Path(sock), autostart=False)


def dispatch(wf: Workflow, args: argparse.Namespace) -> int:
    if args.command == "run":
        return cmd_run(wf, args)
    if args.command == "submit":
        return cmd_submit(wf, args, prog=PROG)
    from reflow_client.cli import dispatch as client_dispatch

    with _client(wf, args) as client:
        return client_dispatch(client, args, workflow=wf.name)
