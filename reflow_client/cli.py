"""``reflow-client``: submit, follow and control runs from the shell.

    reflow-client submit WORKFLOW_FILE [options] [workflow parameters]
    reflow-client status RUN [--task T] [--json]      RUN: a run id, any unambiguous prefix, or 'last'
    reflow-client watch RUN                           live progress; exit 1 if the run failed
    reflow-client results RUN [--task T] [--index I]
    reflow-client logs RUN TASK [--index I] [--follow]
    reflow-client runs | cancel | retry | ping | stats | shutdown | completion SHELL

The same run commands (status, watch, results, logs, cancel, retry, runs) are
part of every workflow's own CLI (``python pipeline.py status last``); they are
built and carried out by the functions here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from . import cli_errors
from .cli_errors import CliError, fail
from .cli_parser import OWN_PREFIX, Parser, add_own_options, subparser_for, submit_options, suggest
from .client import Client, InstanceStatus, RunStatus

PROG = "reflow-client"
RUN_HELP = "run id, any unambiguous prefix of one, or 'last' (the newest run)"
RUN_STATES = ["running", "succeeded", "failed", "cancelled"]
#: Elements of an array task shown after --wait / run (the rest: ``results RUN --task T``).
RESULTS_PER_TASK = 10


def version() -> str:
    try:
        from importlib.metadata import version as _v

        return _v("reflow")
    except Exception:  # noqa: BLE001 - not installed as a distribution (a source checkout)
        return "0.1.0"


def write_json(data: Any, out: TextIO | None = None, *, compact: bool = False) -> None:
    out = out or sys.stdout
    out.write(json.dumps(data, default=str, separators=(",", ":") if compact else None,
                         indent=None if compact else 2) + "\n")
    out.flush()


def output_width(out: TextIO | None = None) -> int:
    """Columns to fit text into: the terminal's, or a generous fixed width for files and pipes."""
    out = out or sys.stdout
    try:
        tty = out.isatty()
    except (AttributeError, ValueError):
        tty = False
    import shutil

    return shutil.get_terminal_size((100, 24)).columns if tty else 160


def say(text: str) -> None:
    """A note for the person at the terminal (stderr, so stdout stays the command's output)."""
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- parsers


def add_global_options(parser: argparse.ArgumentParser, *, nested: bool) -> None:
    """--socket and --debug, accepted before and after the subcommand."""
    default = argparse.SUPPRESS if nested else None
    parser.add_argument("--socket", type=Path, metavar="PATH", default=default,
                        help="reflowd's socket (default: $REFLOW_SOCKET or $XDG_RUNTIME_DIR/reflow/reflowd.sock)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS if nested else False,
                        help="show Python tracebacks for errors (also REFLOW_DEBUG=1)")


def _run_arg(p: argparse.ArgumentParser, workflow_scoped: bool) -> None:
    arg = p.add_argument("run_id", metavar="RUN", help=RUN_HELP)
    arg.completer = complete_run_ids  # type: ignore[attr-defined]
    if not workflow_scoped:
        p.add_argument("--workflow", metavar="NAME", help="with 'last' or a prefix: only runs of this workflow")


def add_run_commands(sub: Any, *, workflow_scoped: bool, parser_class: type = Parser) -> None:
    """status, watch, results, logs, cancel, retry, runs: shared by reflow-client and the workflow CLIs."""

    def new(name: str, text: str, description: str = "") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=description or text[0].upper() + text[1:] + ".")
        if not workflow_scoped:
            add_global_options(p, nested=True)
        else:
            p.add_argument("--socket", type=Path, metavar="PATH",
                           help="reflowd's socket (default: $REFLOW_SOCKET or $XDG_RUNTIME_DIR/reflow/reflowd.sock)")
            p.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
        return p

    p = new("status", "a run's progress, failures and tracebacks")
    _run_arg(p, workflow_scoped)
    p.add_argument("--task", metavar="TASK", help="also list this task's instances with their outputs")
    p.add_argument("--json", action="store_true", help="print the status as one JSON document")

    p = new("watch", "follow a run's progress live until it ends (exit 1 if it failed)")
    _run_arg(p, workflow_scoped)
    p.add_argument("--json", action="store_true", help="print the events as JSON lines instead")

    p = new("results", "the outputs of a run's final tasks (or of one task), decoded for display")
    _run_arg(p, workflow_scoped)
    p.add_argument("--task", metavar="TASK", help="this task's outputs instead of the final tasks'")
    p.add_argument("--index", type=int, metavar="I", help="one element of an array task (needs --task)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON document")

    p = new("logs", "an instance's stdout and stderr")
    _run_arg(p, workflow_scoped)
    p.add_argument("task", metavar="TASK", help="the task")
    p.add_argument("--index", type=int, metavar="I", help="the element, for an array task")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output until the instance ends")
    p.add_argument("--json", action="store_true", help="print stdout, stderr and their paths as one JSON document")

    p = new("cancel", "cancel a run, or one of its tasks")
    _run_arg(p, workflow_scoped)
    p.add_argument("--task", metavar="TASK", help="cancel only this task")
    p.add_argument("--index", type=int, metavar="I", help="with --task: cancel only this element of the array task")
    p.add_argument("--json", action="store_true", help='print {"cancelled": N}')

    p = new("retry", "retry a run's failed or cancelled instances")
    _run_arg(p, workflow_scoped)
    p.add_argument("--task", metavar="TASK", help="retry only this task")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="do not re-check that earlier outputs still exist")
    p.add_argument("--json", action="store_true", help='print {"retried": N}')

    p = new("runs", "list runs, newest first" + (" (of this workflow)" if workflow_scoped else ""))
    if not workflow_scoped:
        p.add_argument("--workflow", metavar="NAME", help="only runs of this workflow")
    p.add_argument("--state", choices=RUN_STATES, help="only runs in this state")
    p.add_argument("--since", metavar="WHEN", help="created at or after (ISO date/time or epoch seconds)")
    p.add_argument("--until", metavar="WHEN", help="created at or before (ISO date/time or epoch seconds)")
    p.add_argument("--limit", type=int, default=20, metavar="N", help="at most N runs (default: 20)")
    p.add_argument("--json", action="store_true", help="print the runs as one JSON document (a list)")


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="Submit workflows to reflowd, the reflow daemon, and follow, inspect and control their runs.",
        epilog=f"RUN is a run id, any unambiguous prefix of one, or 'last'. {cli_errors.EXIT_CODES_HELP}. "
               "Shell completion: eval \"$(reflow-client completion bash)\" (or zsh, fish).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    add_global_options(parser, nested=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("submit", add_help=False, help="submit a workflow file to reflowd (started if needed)",
                       usage=f"{PROG} submit WORKFLOW_FILE [options] [workflow parameters]",
                       description="Submit the workflow defined in WORKFLOW_FILE. Give the file to see its "
                                   f"parameters: {PROG} submit FILE --help.", epilog=_OWN_NOTE)
    p.add_argument("workflow_file", metavar="WORKFLOW_FILE", help="the Python file that defines the workflow")
    group = p.add_argument_group("options")
    add_own_options(group, submit_options(run_dir_required=False, client=True), set())

    add_run_commands(sub, workflow_scoped=False)
    for name, text in (("ping", "is reflowd alive"), ("stats", "reflowd's counters: runs, jobs, store, clusters"),
                       ("shutdown", "stop reflowd (running jobs continue; the next reflowd picks them up)")):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        add_global_options(p, nested=True)
        p.add_argument("--json", action="store_true", help="print the answer as one JSON document")
    p = sub.add_parser("completion", help="print the shell completion script (bash, zsh or fish)",
                       description="Print a completion script for reflow-client and reflowd. Load it with: "
                                   "eval \"$(reflow-client completion bash)\" in ~/.bashrc, "
                                   "eval \"$(reflow-client completion zsh)\" in ~/.zshrc, or "
                                   "reflow-client completion fish > ~/.config/fish/completions/reflow-client.fish")
    p.add_argument("shell", choices=["bash", "zsh", "fish"], help="your shell")
    return parser


_OWN_NOTE = ("Every option also answers to --reflow-NAME. When a workflow parameter has the same name as an "
             "option, the parameter keeps the plain flag and the option is shown as --reflow-NAME.")


def complete_run_ids(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    """Shell completion of RUN: the newest run ids from reflowd (nothing if none answers quickly)."""
    try:
        with Client(_socket(parsed_args), timeout=2) as client:
            ids = [r.id for r in client.runs(limit=50)]
    except Exception:  # noqa: BLE001 - completion must never fail loudly
        ids = []
    return [i for i in ["last", *ids] if i.startswith(prefix)]


# ---------------------------------------------------------------------- entry point


_TOP_VALUE_OPTIONS = {"--socket"}


def _command_index(argv: list[str]) -> int | None:
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in _TOP_VALUE_OPTIONS:
            i += 2
        elif token.startswith("-"):
            i += 1
        else:
            return i
    return None


def _socket(args: argparse.Namespace) -> Path:
    given = getattr(args, "socket", None)
    if given:
        return Path(given).expanduser()
    from .config import ConfigError, load_config, socket_path

    try:
        return load_config().socket
    except ConfigError:
        return socket_path()


def run(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return cli_errors.guarded(PROG, lambda: _run(argv), debug=cli_errors.debug_enabled(argv))


def _run(argv: list[str]) -> int:
    parser = build_parser()
    _autocomplete(parser)
    idx = _command_index(argv)
    known = {s for a in parser._actions for s in a.option_strings}
    for token in argv[:idx]:
        if token.startswith("-") and token.split("=", 1)[0] not in known:
            hint = "" if suggest(token.split("=", 1)[0], known) else \
                f" (options of a command go after it: {PROG} COMMAND {token} ...)"
            parser.error(f"unrecognized arguments: {token}{hint}")  # the parser adds "did you mean"
    if idx is not None and argv[idx] == "submit":
        top = parser.parse_args([*argv[:idx], "ping"])  # the global options before 'submit'
        return _submit(top, argv[idx + 1:])
    args, extra = parser.parse_known_args(argv)
    if extra:  # report it where it happened, with that subcommand's usage and a suggestion
        target = subparser_for(parser, args.command) or parser
        target.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "completion":
        from .completion import script

        sys.stdout.write(script(args.shell))
        return 0
    from .autostart import connect

    with connect(_socket(args), autostart=False) as client:
        return dispatch(client, args)


def _autocomplete(parser: argparse.ArgumentParser) -> None:
    import os

    if "_ARGCOMPLETE" in os.environ:  # only when the shell asks: keeps normal start-up lean
        import argcomplete

        argcomplete.autocomplete(parser)


def _find_file(rest: list[str]) -> int | None:
    """Where the workflow file is among submit's arguments: the first .py (or existing file) argument."""
    candidates = [i for i, a in enumerate(rest) if not a.startswith("-")]
    for i in candidates:
        if rest[i].endswith(".py") or Path(rest[i]).is_file():
            return i
    if candidates and candidates[0] == 0:
        return 0
    return None


def _prescan(rest: list[str], names: tuple[str, ...]) -> str | None:
    for i, token in enumerate(rest):
        for name in names:
            if token == name and i + 1 < len(rest):
                return rest[i + 1]
            if token.startswith(name + "="):
                return token.split("=", 1)[1]
    return None


def _submit(top: argparse.Namespace, rest: list[str]) -> int:
    pos = _find_file(rest)
    if pos is None:
        stub = subparser_for(build_parser(), "submit")
        assert stub is not None
        if any(a in ("-h", "--help", f"--{OWN_PREFIX}help") for a in rest):
            stub.print_help()
            return 0
        stub.error("the following arguments are required: WORKFLOW_FILE (the Python file that defines the workflow)")
    file = rest.pop(pos)
    from reflow.cli import client_submit  # the user API, only for this command

    return client_submit(file, rest, socket=top.socket,
                         workflow=lambda: _prescan(rest, (f"--{OWN_PREFIX}workflow", "--workflow")))


# ---------------------------------------------------------------------- the run commands


def resolve_run(client: Client, args: argparse.Namespace, workflow: str | None = None) -> str:
    """The full run id for the RUN argument (prefix or 'last'); remembered in ``args.run_id``."""
    ref = str(args.run_id).strip()
    if not ref:
        fail("RUN is empty; give a run id, a prefix of one, or 'last'")
    args.run_id = client.resolve(ref, workflow or getattr(args, "workflow", None))
    return args.run_id


def dispatch(client: Client, args: argparse.Namespace, *, workflow: str | None = None) -> int:
    """Carry out a parsed run command (*workflow*: the workflow CLI's own workflow, scoping 'last' and runs)."""
    cmd = args.command
    if getattr(args, "run_id", None) is not None:
        resolve_run(client, args, workflow)
    if cmd == "status":
        return show_status(client, args)
    if cmd == "runs":
        runs = client.runs(workflow=workflow or args.workflow, state=args.state, since=args.since,
                           until=args.until, limit=args.limit)
        if args.json:
            from .values import plain

            write_json([{**r.__dict__, "params": plain(r.params)} for r in runs])
        else:
            from . import render

            sys.stdout.write(render.format_runs(runs))
        return 0
    if cmd == "cancel":
        n = client.cancel(args.run_id, args.task, args.index)
        write_json({"run_id": args.run_id, "cancelled": n}) if args.json else print(
            f"cancelled {n} task instance(s) of run {args.run_id}")
        return 0
    if cmd == "retry":
        n = client.retry(args.run_id, args.task, args.verify)
        write_json({"run_id": args.run_id, "retried": n}) if args.json else print(
            f"retrying {n} task instance(s) of run {args.run_id}")
        return 0
    if cmd == "watch":
        if args.json:
            return watch_json(client, args.run_id)
        return follow_run(client, args.run_id, show_results=True)
    if cmd == "results":
        return show_results(client, args)
    if cmd == "logs":
        return show_logs(client, args)
    if cmd == "ping":
        data = client.ping()
        write_json(data) if args.json else print(f"reflowd is alive (pid {data['pid']})")
        if not args.json and not (data.get("store") or {}).get("writable", True):
            print(f"reflowd cannot write its state database: {data['store'].get('error')}", file=sys.stderr)
        return 0
    if cmd == "stats":
        data = client.stats()
        if args.json:
            write_json(data)
        else:
            from . import render

            sys.stdout.write(render.format_stats(data))
        return 0
    if cmd == "shutdown":
        data = client.shutdown()
        write_json(data) if args.json else print("reflowd is stopping; running jobs continue")
        return 0
    raise CliError(f"unknown command {cmd!r}")


def _outputs(client: Client, run_id: str, task: str, limit: int) -> dict[Any, Any]:
    data = client.results(run_id, task, limit=limit)
    items = data["tasks"][0]["items"] if data.get("tasks") else []
    return {item["index"]: item["output"] for item in items if "output" in item}


def show_status(client: Client, args: argparse.Namespace) -> int:
    from . import render, values

    status = client.status(args.run_id, args.task)
    outputs = _outputs(client, args.run_id, args.task, 200) if args.task else {}
    if args.json:
        raw = dict(status.raw)
        for inst in raw.get("instances") or []:
            inst.pop("output", None)  # the daemon's text form; replaced by the JSON value
            if inst.get("index") in outputs:
                inst["output"] = values.plain(outputs[inst["index"]])
        for failure in raw.get("failures") or []:
            failure.pop("output", None)
        raw["failures_total"] = max(render.listed_failures(status, args.task), len(status.failures))
        raw["run"] = {**raw["run"], "params": values.plain(raw["run"].get("params") or {})}
        write_json(raw)
        return 0
    shown = {i: values.show(v, limit=80) for i, v in outputs.items()}
    sys.stdout.write(render.format_status(status, outputs=shown, task=args.task, width=output_width()))
    return 0


def show_results(client: Client, args: argparse.Namespace) -> int:
    from . import render

    if args.index is not None and args.task is None:
        fail("--index needs --task: results RUN --task TASK --index I")
    data = client.results(args.run_id, args.task, args.index)
    if args.json:
        write_json(render.results_json(data))
        return 0
    lines = render.result_lines(data, output_width())
    if not lines:
        what = f"task {args.task!r}" if args.task else "its final tasks"
        print(f"run {data['run_id']} ({data['state']}) has no results for {what} yet")
    else:
        print("\n".join(lines))
    return 0


def _array_check(client: Client, args: argparse.Namespace, poll: float = 1.0) -> None:
    """An array task needs --index; say which indices exist instead of 'no instance None'.

    With ``--follow`` an array that has no elements yet is waited for (its
    upstream is still running), as long as the run goes on.
    """
    status = client.status(args.run_id)
    task = next((t for t in status.tasks if t.name == args.task), None)
    if task is None:
        fail(f"run {args.run_id} has no task {args.task!r} (tasks: {', '.join(t.name for t in status.tasks)})")
    while getattr(args, "follow", False) and task.is_array and not task.expanded and status.state == "running":
        time.sleep(poll)
        status = client.status(args.run_id)
        task = next(t for t in status.tasks if t.name == args.task)
    if task.is_array and args.index is None:
        if not task.expanded:
            fail(f"task {args.task!r} is an array task and has no elements yet; try again once it has started")
        fail(f"task {args.task!r} is an array task with {task.total} element(s): pass --index N "
             f"(0-{task.total - 1})")
    if not task.is_array and args.index is not None:
        fail(f"task {args.task!r} is not an array task: leave out --index")
    if task.is_array and args.index is not None and not task.expanded:
        fail(f"task {args.task!r} is an array task and has no elements yet; try again once it has started "
             "(or add --follow to wait for it)")
    if task.is_array and args.index is not None and not 0 <= args.index < task.total:
        fail(f"task {args.task!r} has no element {args.index}: pass --index N (0-{task.total - 1})")


def show_logs(client: Client, args: argparse.Namespace) -> int:
    _array_check(client, args)
    data = client.logs(args.run_id, args.task, args.index)
    if args.json:
        write_json(data)
        return 0
    if data.get("note") and not args.follow:
        say(data["note"])
    sys.stdout.write(data.get("stdout", ""))
    sys.stdout.flush()
    sys.stderr.write(data.get("stderr", ""))
    sys.stderr.flush()
    if args.follow:
        return follow_logs(client, args, data)
    return 0


def _new_part(old: str, new: str) -> str:
    """What *new* (a tail of a growing file) adds to *old* (an earlier tail of it)."""
    if new.startswith(old):
        return new[len(old):]
    anchor = old[-2048:]
    at = new.rfind(anchor) if anchor else -1
    return new[at + len(anchor):] if at >= 0 else new


def follow_logs(client: Client, args: argparse.Namespace, first: dict[str, Any], interval: float = 1.0) -> int:
    """``logs --follow``: poll the tails and print what is new until the instance has ended."""
    seen = {"stdout": first.get("stdout", ""), "stderr": first.get("stderr", "")}
    terminal = {"succeeded", "cached", "failed", "timeout", "out_of_memory", "node_fail", "submit_failed",
                "upstream_failed", "cancelled"}
    try:
        while True:
            items = client.results(args.run_id, args.task, args.index, limit=1)["tasks"][0]["items"]
            done = not items or items[0]["state"] in terminal  # results names the state of any one element
            data = client.logs(args.run_id, args.task, args.index)
            for stream, out in (("stdout", sys.stdout), ("stderr", sys.stderr)):
                text = data.get(stream, "")
                part = _new_part(seen[stream], text)
                if part:
                    out.write(part)
                    out.flush()
                seen[stream] = text
            if done:
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return cli_errors.INTERRUPTED


# ---------------------------------------------------------------------- following a run


def watch_json(client: Client, run_id: str) -> int:
    """``watch --json``: the snapshot, every event and the end, one JSON document per line."""
    for event in client.watch(run_id):
        write_json(event, compact=True)
        if event.get("type") == "end":
            break
    return 0 if client.status(run_id).ok else cli_errors.RUN_FAILED


#: How long a follower waits for reflowd to come back (a restart) before giving up.
RECONNECT_FOR = 60.0


def _status_when_back(client: Client, run_id: str) -> RunStatus:
    """reflowd went away while we followed a run: wait for it (a restart) for a while."""
    from .client import DaemonNotRunning

    say(f"lost the connection to reflowd; trying again for {RECONNECT_FOR:.0f} s (the run is not affected)")
    deadline = time.monotonic() + RECONNECT_FOR
    while True:
        try:
            client.close()
            return client.status(run_id)
        except DaemonNotRunning:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _follow_events(client: Client, run_id: str, out: TextIO) -> RunStatus:
    from .client import DaemonNotRunning

    while True:
        try:
            final = _follow_once(client, run_id, out)
        except DaemonNotRunning:
            final = _status_when_back(client, run_id)
        if final.finished:
            return final
        # the stream ended early (the watcher fell behind, or reflowd restarted): attach again


def _wait_quietly(client: Client, run_id: str) -> RunStatus:
    """``--json``: wait for the end without drawing, through reflowd restarts."""
    from .client import DaemonNotRunning

    while True:
        try:
            return client.wait(run_id)
        except DaemonNotRunning:
            final = _status_when_back(client, run_id)
            if final.finished:
                return final


def _follow_once(client: Client, run_id: str, out: TextIO) -> RunStatus:
    """One watch stream, drawn until it ends; the run's status after it."""
    from .display import Progress, follow

    stream = client.watch(run_id)
    try:
        first = next(stream)
        status = RunStatus.from_dict(first["status"])
        if status.finished:
            return client.status(run_id)
        progress = Progress.from_status(status)
        for t in status.tasks:  # attached mid-run: time the tasks under way from their instances
            if any(t.counts.get(s) for s in ("succeeded", "cached", "running", "queued", "submitting")):
                progress.seed_times(t.name, client.status(run_id, t.name).instances or [])
        follow(progress, stream, out)
    finally:
        stream.close()
    return client.status(run_id)


def follow_run(client: Client, run_id: str, *, out: TextIO | None = None, cancel_on_interrupt: bool = False,
               show_results: bool = True, as_json: bool = False, extra: dict[str, Any] | None = None) -> int:
    """Follow a run to its end with the live display, then report; returns the exit code."""
    out = out or sys.stdout
    try:
        if as_json:
            final = _wait_quietly(client, run_id)
        else:
            final = _follow_events(client, run_id, out)
    except KeyboardInterrupt:
        return _interrupted(client, run_id, cancel_on_interrupt, out)
    report_end(client, final, out=out, show_results=show_results, as_json=as_json, extra=extra)
    return cli_errors.OK if final.ok else cli_errors.RUN_FAILED


def _interrupted(client: Client, run_id: str, cancel: bool, out: TextIO) -> int:
    out.flush()
    if cancel:
        n = client.cancel(run_id)
        say(f"interrupted: cancelled run {run_id} ({n} task instance(s) stopped)")
    else:
        say(f"interrupted: run {run_id} goes on in reflowd.\n"
            f"  follow it:  {PROG} watch {run_id}\n"
            f"  cancel it:  {PROG} cancel {run_id}")
    return cli_errors.INTERRUPTED


def _log_paths(client: Client, run_id: str, failures: list[InstanceStatus]) -> dict[str, str]:
    paths = {}
    for failure in failures:
        try:
            data = client.logs(run_id, failure.task, failure.index, max_bytes=1)
        except Exception:  # noqa: BLE001 - a missing log path must not hide the failure report
            continue
        if data.get("stderr_path"):
            paths[failure.label] = data["stderr_path"]
    return paths


def report_end(client: Client, final: RunStatus, *, out: TextIO, show_results: bool, as_json: bool = False,
               extra: dict[str, Any] | None = None) -> None:
    """The end of ``submit --wait`` and ``watch``: outcome, failures, the final tasks' results."""
    from . import render

    results = client.results(final.run.id) if show_results else {"tasks": []}
    totals = render.state_totals(final.tasks)
    total = max(render.listed_failures(final), len(final.failures))
    if as_json:
        doc = {**(extra or {}), "run_id": final.run.id, "state": final.state,
               "failures": [f.__dict__ for f in final.failures], "failures_total": total,
               "results": render.results_json(results)["results"]}
        write_json(doc, out, compact=True)
        return
    shown = [f for f in final.failures if f.state in render.FAILED][:render.FAILURES_SHOWN]
    lines = render.failure_report(final.run.id, final.state, final.failures, totals,
                                  _log_paths(client, final.run.id, shown),
                                  more_hint=f"{PROG} status {final.run.id}")
    lines[0] += f" after {render.duration((final.run.ended_at or time.time()) - final.run.created_at)}"
    result = render.result_lines(results, output_width(out), per_task=RESULTS_PER_TASK,
                                 more_hint=f"{PROG} results {final.run.id} --task {{task}}")
    if result:
        lines += ["", "results:", *result]
    out.write("\n".join(lines) + "\n")
    out.flush()


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
