"""What ``wf.cli()`` subcommands do once their arguments are parsed."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from reflow_client import render
from reflow_client.autostart import DaemonStartError
from reflow_client.client import Client, DaemonNotRunning, ReflowError
from reflow_client.config import ConfigError

if TYPE_CHECKING:
    from .workflow import Workflow


def _print_local_event(event: dict[str, Any]) -> None:
    if event.get("type") == "transition" and event.get("to") in ("failed", "timeout", "out_of_memory", "node_fail"):
        label = event["task"] if event.get("index") is None else f"{event['task']}[{event['index']}]"
        print(f"  {label} {event['to']}: {(event.get('error') or '').splitlines()[0] if event.get('error') else ''}",
              file=sys.stderr)


def _show_value(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cmd_run(wf: Workflow, args: argparse.Namespace, params: dict[str, Any]) -> int:
    from .local_run import run_local

    print(f"running workflow {wf.name!r} locally in {args.run_dir}")
    result = run_local(
        wf,
        args.run_dir,
        max_workers=args.max_workers,
        on_error=args.on_error,
        force=args.force,
        force_tasks=args.force_tasks,
        verify=args.verify,
        parameters=params,
        on_event=_print_local_event,
    )
    print(f"run {result.run_id} {result.state}")
    for task, counts in result.summary.items():
        print(f"  {task:24s} {render.counts_text(counts)}")
    sinks = [name for name in wf._topological_order() if not any(name in t.dependencies for t in wf.tasks.values())]
    print("results:")
    for name in sinks:
        print(f"  {name} = {_show_value(result.outputs.get(name))}")
    for failure in result.failures[:5]:
        label = failure["task"] if failure["index"] is None else f"{failure['task']}[{failure['index']}]"
        print(f"\n{label} {failure['state']}: {failure.get('error')}", file=sys.stderr)
        if failure.get("traceback"):
            print(failure["traceback"], file=sys.stderr)
    return 0 if result.ok else 1


def _client(wf: Workflow, args: argparse.Namespace) -> Client:
    sock = args.socket or wf.config.socket
    client = Client(sock)
    client.connect()
    return client


def dispatch(wf: Workflow, args: argparse.Namespace, params: dict[str, Any]) -> int:
    try:
        if args.command == "run":
            return cmd_run(wf, args, params)
        if args.command == "submit":
            from reflow_client.cli import watch_progress

            from .session import submit

            run = submit(wf, args.run_dir, store=args.socket, cluster=args.cluster, force=args.force,
                         force_tasks=args.force_tasks, verify=args.verify, autostart=not args.no_daemon,
                         parameters=params)
            if args.json:
                print(json.dumps({"run_id": run.run_id, "run_dir": str(run.run_dir)}))
            else:
                print(f"submitted run {run.run_id} (run dir {run.run_dir})")
            if args.wait:
                return 0 if watch_progress(run.client, run.run_id).ok else 1
            return 0
        from reflow_client.cli import dispatch as client_dispatch

        if args.command == "runs":  # this workflow's runs
            args.workflow, args.since, args.until = wf.name, None, None
        with _client(wf, args) as client:
            return client_dispatch(client, args)
    except (DaemonNotRunning, DaemonStartError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except ReflowError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, ConfigError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

