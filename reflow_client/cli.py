"""``reflow-client``: submit, follow and control runs from the shell.

    reflow-client submit WORKFLOW_FILE [--run-dir DIR] [--cluster NAME] [workflow flags...]
    reflow-client status RUN_ID [--task T] [--json]
    reflow-client watch RUN_ID            live progress; exits 1 if the run failed
    reflow-client runs | cancel | retry | logs | ping | stats | shutdown
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from . import render
from .autostart import DaemonStartError, connect
from .client import Client, DaemonNotRunning, ReflowError, RunStatus, TaskStatus
from .config import ConfigError, load_config


def _json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reflow-client", allow_abbrev=False, description="Talk to reflowd, the reflow daemon.")
    parser.add_argument("--socket", type=Path, help="reflowd socket (default: $REFLOW_SOCKET or the XDG runtime dir)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("submit", allow_abbrev=False, help="submit a workflow file; extra flags are the workflow's parameters",
                       add_help=False)
    p.add_argument("workflow_file", type=Path)
    p.add_argument("-h", "--help", action="store_true", help="show help, including the workflow's flags")
    p.add_argument("--run-dir", type=Path, help="run directory (default: ./runs/<workflow>)")
    p.add_argument("--cluster", help="cluster from the configuration (default: its default, usually local)")
    p.add_argument("--name", help="the workflow to use when the file defines several")
    p.add_argument("--force", action="store_true")
    p.add_argument("--force-tasks", nargs="+", metavar="TASK")
    p.add_argument("--verify", action="store_true")
    p.add_argument("--on-error", choices=["stop", "continue"], default="continue")
    p.add_argument("--no-daemon", action="store_true", help="fail instead of starting reflowd")
    p.add_argument("--wait", action="store_true", help="follow progress until the run ends")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("status", allow_abbrev=False, help="a run's progress, failures and tracebacks")
    p.add_argument("run_id")
    p.add_argument("--task")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("runs", allow_abbrev=False, help="list runs")
    p.add_argument("--workflow")
    p.add_argument("--state", choices=["running", "succeeded", "failed", "cancelled"])
    p.add_argument("--since", help="ISO date/time or epoch seconds")
    p.add_argument("--until", help="ISO date/time or epoch seconds")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")

    for name, text in (("cancel", "cancel a run or one task"), ("retry", "retry failed or cancelled instances")):
        p = sub.add_parser(name, help=text, allow_abbrev=False)
        p.add_argument("run_id")
        p.add_argument("--task")
        p.add_argument("--json", action="store_true")
        if name == "retry":
            p.add_argument("--no-verify", dest="verify", action="store_false",
                           help="do not re-check that earlier outputs still exist")

    p = sub.add_parser("watch", allow_abbrev=False, help="live progress until the run ends (exit 1 if it failed)")
    p.add_argument("run_id")
    p.add_argument("--json", action="store_true", help="print events as JSON lines")

    p = sub.add_parser("logs", allow_abbrev=False, help="an instance's stdout and stderr")
    p.add_argument("run_id")
    p.add_argument("task")
    p.add_argument("--index", type=int, help="array element")
    p.add_argument("--json", action="store_true")

    for name, text in (("ping", "is reflowd alive"), ("stats", "daemon counters"),
                       ("shutdown", "stop reflowd (jobs keep running)")):
        p = sub.add_parser(name, help=text, allow_abbrev=False)
        p.add_argument("--json", action="store_true")
    return parser


def _socket(args: argparse.Namespace) -> Path:
    if args.socket:
        return args.socket
    try:
        return load_config().socket
    except ConfigError:
        from .config import socket_path

        return socket_path()


def watch_progress(client: Client, run_id: str, *, as_json: bool = False, out: Any = None) -> RunStatus:
    """Follow a run, redrawing one bar per task; returns the final status."""
    out = out or sys.stdout
    tty = out.isatty()
    tasks: dict[str, TaskStatus] = {}
    drawn = 0
    width = shutil.get_terminal_size((100, 24)).columns
    last_print = 0.0
    for event in client.watch(run_id):
        if as_json:
            out.write(json.dumps(event, default=str) + "\n")
            out.flush()
        if event["type"] == "snapshot":
            status = RunStatus.from_dict(event["status"]) if event.get("status") else None
            if status is not None:
                tasks = {t.name: t for t in status.tasks}
        elif event["type"] == "end":
            break
        else:
            render.apply_event(tasks, event)
        if as_json:
            continue
        lines = [render.task_line(t, width) for t in tasks.values()]
        if tty:
            if drawn:
                out.write(f"\x1b[{drawn}F")
            out.write("".join(f"\x1b[2K{line}\n" for line in lines))
            drawn = len(lines)
        elif time.monotonic() - last_print >= 2.0:  # logs and pipes: a snapshot every few seconds
            out.write("\n".join(lines) + "\n\n")
            last_print = time.monotonic()
        out.flush()
    if not tty and not as_json and tasks:
        out.write("\n".join(render.task_line(t, width) for t in tasks.values()) + "\n")
    final = client.status(run_id)
    if not as_json:
        out.write(f"\nrun {run_id} {final.state}\n")
        for failure in final.failures[:5]:
            out.write("\n".join(render.failure_lines(failure)) + "\n")
    return final


def _submit(args: argparse.Namespace, extra: list[str], sock: Path) -> int:
    from reflow.loader import load_workflow  # the user API, only for this command
    from reflow.session import submit_from_args

    wf = load_workflow(args.workflow_file, args.name)
    return submit_from_args(wf, args, extra, sock)


def run(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "submit":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    sock = _socket(args)
    try:
        if args.command == "submit":
            return _submit(args, extra, sock)
        with connect(sock, autostart=False) as client:
            return dispatch(client, args)
    except DaemonNotRunning as exc:
        print(f"reflow-client: {exc}", file=sys.stderr)
        return 3
    except DaemonStartError as exc:
        print(f"reflow-client: {exc}", file=sys.stderr)
        return 3
    except ReflowError as exc:
        print(f"reflow-client: {exc.message}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, ConfigError, FileNotFoundError) as exc:
        print(f"reflow-client: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def dispatch(client: Client, args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "status":
        status = client.status(args.run_id, args.task)
        _json(status.raw) if args.json else sys.stdout.write(render.format_status(status))
        return 0
    if cmd == "runs":
        runs = client.runs(workflow=args.workflow, state=args.state, since=args.since, until=args.until,
                           limit=args.limit)
        _json([r.__dict__ for r in runs]) if args.json else sys.stdout.write(render.format_runs(runs))
        return 0
    if cmd == "cancel":
        n = client.cancel(args.run_id, args.task)
        _json({"cancelled": n}) if args.json else print(f"cancelled {n} task instance(s)")
        return 0
    if cmd == "retry":
        n = client.retry(args.run_id, args.task, args.verify)
        _json({"retried": n}) if args.json else print(f"retrying {n} task instance(s)")
        return 0
    if cmd == "watch":
        final = watch_progress(client, args.run_id, as_json=args.json)
        return 0 if final.ok else 1
    if cmd == "logs":
        data = client.logs(args.run_id, args.task, args.index)
        if args.json:
            _json(data)
        else:
            if data.get("note"):
                print(data["note"], file=sys.stderr)
            sys.stdout.write(data.get("stdout", ""))
            sys.stderr.write(data.get("stderr", ""))
        return 0
    if cmd == "ping":
        data = client.ping()
        _json(data) if args.json else print(f"reflowd is alive (pid {data['pid']})")
        return 0
    if cmd == "stats":
        _json(client.stats())
        return 0
    if cmd == "shutdown":
        data = client.shutdown()
        _json(data) if args.json else print("reflowd is stopping; running jobs continue")
        return 0
    raise ValueError(f"unknown command {cmd}")


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
